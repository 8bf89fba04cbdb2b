//! The host's key cache under time slicing: with more instances than keys on one worker
//! (FIFO, the cyclic pattern that defeats LRU), the host's default policy (hinted: the
//! workers name the tasks they run next, and unnamed domains are ranked by their reuse gap)
//! misses far less than LRU. Most of that comes from the reuse-gap prediction; what the run
//! queue's names add on top is measured by `host/examples/key_cache.rs` (a few per cent in
//! these FIFO loads), not asserted here.
//!
//! Natively (emulated backend, 15 keys) in the measurement mode (one worker, no
//! serialization lock in the way).

mod common;

use std::sync::{Arc, mpsc};
use std::time::Duration;

use mpkvirt::PolicyKind;
use mpkvirt_host::app::native::NativeFunction;
use mpkvirt_host::runtime::{App, Code, Host, HostConfig, Limits};

/// Key misses while 24 functions, each `rounds` of spinning, share one worker.
fn misses(policy: PolicyKind, code: &Code, rounds: u64) -> u64 {
    let n = 24;
    let host = Host::start(HostConfig {
        workers: Some(1),
        quantum: Some(Duration::from_micros(500)),
        policy,
        slots: n + 2,
        slot_size: 256 << 10,
        stack_size: 32 << 10,
        measure_without_isolation: true,
        ..HostConfig::default()
    })
    .unwrap();
    for i in 0..n {
        host.register(App {
            name: format!("spin-{i}"),
            code: code.clone(),
            limits: Limits {
                timeout: Duration::from_secs(120),
                ..Limits::default()
            },
        });
    }
    let before = host.key_stats().misses;
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let tx = tx.clone();
        host.submit(
            &format!("spin-{i}"),
            rounds.to_le_bytes().to_vec(),
            move |r| {
                let _ = tx.send(r);
            },
        )
        .unwrap();
    }
    drop(tx);
    for r in rx.iter() {
        assert_eq!(r.unwrap(), rounds.to_le_bytes());
    }
    host.key_stats().misses - before
}

#[test]
fn the_hosts_key_cache_misses_less_than_lru_under_time_slicing() {
    // SAFETY: the project's own tenant; loading runs none of its code.
    #[allow(unsafe_code, reason = "loading the project's own tenant")]
    let f = unsafe { NativeFunction::load(&common::build_c("spin")) }.unwrap();
    let code = Code::Native(Arc::new(f));
    // Enough work for each function to be preempted many times (tens of quanta).
    let rounds = 100_000_000;
    let lru = misses(PolicyKind::Lru, &code, rounds);
    let hinted = misses(PolicyKind::Hinted, &code, rounds);
    eprintln!("key misses: LRU {lru}, hinted {hinted}");
    assert!(
        hinted * 3 < lru * 2,
        "the hinted policy should save a third of LRU's misses at least: LRU {lru}, hinted {hinted}"
    );
}
