//! Oracles for mpkvirt's fuzz targets, independent of the fuzzing engine (wasmtime's
//! generators/oracles split): libFuzzer calls them from `fuzz_targets/`, and
//! `tests/smoke.rs` calls them on fixed seeds under plain `cargo test`.

use mpkvirt::policy::{PolicyKind, simulate};
use mpkvirt::testing::{self, Semantics, concurrent, linearize};
use mpkvirt::{Config, Manager};

/// Runs the domain program encoded in `data` on the simulated backend against the
/// reference model (unlimited keys, per-thread rights) and panics on any disagreement.
///
/// The first byte picks the number of keys (1 to 6), so programs explore heavy eviction
/// and "every key pinned" as well as roomy caches; the rest is the program
/// (`mpkvirt::testing::decode`).
pub fn domain_ops(data: &[u8]) {
    let Some((&keys, program)) = data.split_first() else {
        return;
    };
    let keys = 1 + usize::from(keys % 6);
    let config = Config {
        max_keys: keys,
        pin_wait: std::time::Duration::ZERO,
        ..Config::default()
    };
    let mgr = Manager::simulated(keys, config).unwrap();
    if let Err(d) = testing::run(&mgr, &testing::decode(program), Semantics::PerThread) {
        panic!("divergence from the model with {keys} keys: {d}");
    }
}

/// Node budget of the linearizability check per fuzz input: enough for any history the
/// generator makes with ordinary schedules (they need about one node per event), small
/// enough that a pathological schedule cannot stall the fuzzer.
const CONCURRENT_BUDGET: usize = 200_000;

/// Runs the concurrent program encoded in `data` on the simulated backend with three threads
/// that really overlap, and panics unless the history is linearizable against the reference
/// model (unlimited keys, per-thread rights).
///
/// The first byte picks the number of keys (1 to 4); the rest is the program
/// (`mpkvirt::testing::concurrent::decode_concurrent`). The schedule is not part of the
/// input: an input that crashed once may pass the next time, so a crash is replayed by
/// running its input several times. A history whose check runs out of budget counts as
/// passing (the check could not decide).
pub fn domain_ops_concurrent(data: &[u8]) {
    let Some((&keys, program)) = data.split_first() else {
        return;
    };
    let keys = 1 + usize::from(keys % 4);
    let config = Config {
        max_keys: keys,
        pin_wait: std::time::Duration::ZERO,
        ..Config::default()
    };
    let mgr = Manager::simulated(keys, config).expect("a simulated manager");
    let history = concurrent::record_concurrent(&mgr, &concurrent::decode_concurrent(program));
    if let Err(d) = linearize::check(&history, keys, Semantics::PerThread, CONCURRENT_BUDGET) {
        panic!("no linearization agrees with the model ({keys} keys): {d}");
    }
}

/// Replays the trace encoded in `data` (one domain id per byte, from a small alphabet so
/// domains recur) through every policy and checks what must hold whatever the trace:
/// accounting adds up, nobody beats Belady's OPT, and the hinted policy given the whole
/// future *is* OPT.
pub fn policy_trace(data: &[u8]) {
    let Some((&cap, bytes)) = data.split_first() else {
        return;
    };
    let capacity = 1 + usize::from(cap % 15);
    let trace: Vec<u64> = bytes.iter().map(|b| u64::from(b % 40)).collect();
    let opt = simulate(&trace, capacity, PolicyKind::Opt, 0);
    let distinct = trace.iter().collect::<std::collections::HashSet<_>>().len() as u64;
    for (kind, lookahead) in [
        (PolicyKind::Lru, 0),
        (PolicyKind::Hinted, 0),
        (PolicyKind::Hinted, 8),
        (PolicyKind::Hinted, trace.len()),
    ] {
        let s = simulate(&trace, capacity, kind, lookahead);
        assert_eq!(
            s.hits + s.misses,
            trace.len() as u64,
            "{kind:?}: accounting"
        );
        assert!(
            s.misses >= distinct,
            "{kind:?}: fewer misses than distinct domains"
        );
        assert!(
            s.misses >= opt.misses,
            "{kind:?}/{lookahead}: {} misses beat OPT's {}",
            s.misses,
            opt.misses
        );
        if kind == PolicyKind::Hinted && lookahead == trace.len() {
            assert_eq!(
                s.misses, opt.misses,
                "hinted with the whole future must equal OPT"
            );
        }
    }
}
