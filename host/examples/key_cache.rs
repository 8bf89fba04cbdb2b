//! How far the key cache stretches across time: more runnable instances than hardware keys,
//! time-sliced on one worker, and the key cache's misses with the LRU policy against the
//! hinted one (each worker names the domains of the tasks it runs next; an eviction takes
//! the domain used furthest ahead, or not named).
//!
//! `N` invocations of the native `spin` function (each `--ms` of work) are submitted at once
//! to a host with one worker and a `--quantum-us` quantum, so that the worker cycles through
//! all `N` instances, one quantum each, in FIFO order — the pattern that defeats LRU once `N`
//! exceeds the keys. Reported per `N` and policy: the key cache's misses (each a key binding:
//! a `pkey_mprotect` on PKU hardware, an `mprotect` here) over the whole run, and its wall
//! time; the ratio is LRU's misses over the hinted policy's.
//!
//! Natively the emulated backend (15 keys, real `mprotect`s) runs it, in the measurement mode
//! (`measure_without_isolation`, one worker); on PKU hardware pass `--isolated`.
//!
//! `cargo run --release -p mpkvirt-host --example key_cache -- [--ms M] [--quantum-us Q]
//!   [--isolated] [N ...]`
#![allow(clippy::cast_precision_loss, reason = "ratios")]

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mpkvirt::PolicyKind;
use mpkvirt_host::app::native::NativeFunction;
use mpkvirt_host::runtime::{App, Code, Host, HostConfig, Limits};

fn spin_code() -> Code {
    let path = std::path::Path::new(env!("OUT_DIR")).join("tenants/libspin.so");
    // SAFETY: the project's own tenant, validated on load; it has no constructors.
    #[allow(unsafe_code, reason = "loading the project's own tenant")]
    let f = unsafe { NativeFunction::load(&path) }.expect("tenants/libspin.so");
    Code::Native(Arc::new(f))
}

/// Rounds of `spin` for about `ms` milliseconds through `host` (the median of 5 runs).
fn rounds_for(host: &Host, ms: f64) -> u64 {
    let probe: u64 = 20_000_000;
    let mut ns: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            host.invoke_here("spin-0", &probe.to_le_bytes())
                .expect("spin");
            t.elapsed().as_nanos() as f64
        })
        .collect();
    ns.sort_by(f64::total_cmp);
    (probe as f64 / ns[2] * ms * 1e6) as u64
}

struct Run {
    misses: u64,
    wall: Duration,
}

fn run(
    n: usize,
    (policy, hints): (PolicyKind, bool),
    ms: f64,
    quantum: Duration,
    isolated: bool,
) -> Run {
    let host = Host::start(HostConfig {
        workers: Some(1),
        quantum: Some(quantum),
        policy,
        hints,
        slots: n + 4,
        slot_size: 256 << 10,
        stack_size: 32 << 10,
        measure_without_isolation: !isolated,
        ..HostConfig::default()
    })
    .expect("a host");
    let code = spin_code();
    for i in 0..n {
        host.register(App {
            name: format!("spin-{i}"),
            code: code.clone(),
            limits: Limits {
                timeout: Duration::from_secs(600),
                ..Limits::default()
            },
        });
    }
    let rounds = rounds_for(&host, ms);
    let before = host.key_stats().misses;
    let (tx, rx) = mpsc::channel();
    let t = Instant::now();
    for i in 0..n {
        let tx = tx.clone();
        host.submit(
            &format!("spin-{i}"),
            rounds.to_le_bytes().to_vec(),
            move |r| {
                let _ = tx.send(r.is_ok());
            },
        )
        .expect("submit");
    }
    drop(tx);
    let ok = rx.iter().filter(|&ok| ok).count();
    assert_eq!(ok, n, "every invocation succeeds");
    let wall = t.elapsed();
    let misses = host.key_stats().misses - before;
    Run { misses, wall }
}

fn main() {
    let mut ms = 20.0;
    let mut quantum = Duration::from_micros(500);
    let mut isolated = false;
    let mut ns = Vec::new();
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        match v[i].as_str() {
            "--ms" => {
                ms = v[i + 1].parse().expect("--ms M");
                i += 1;
            }
            "--quantum-us" => {
                quantum = Duration::from_micros(v[i + 1].parse().expect("--quantum-us Q"));
                i += 1;
            }
            "--isolated" => isolated = true,
            n => ns.push(n.parse::<usize>().expect("N: instances")),
        }
        i += 1;
    }
    if ns.is_empty() {
        ns = vec![8, 14, 20, 28, 40];
    }
    println!(
        "one worker, {} µs quantum, {ms} ms of work per function; key misses over the run",
        quantum.as_micros()
    );
    println!(
        "{:>4} {:>8} {:>10} {:>8} {:>7} {:>8} {:>10} {:>10}",
        "N", "LRU", "no hints", "hinted", "ratio", "LRU ms", "no hints", "hinted ms"
    );
    for n in ns {
        let lru = run(n, (PolicyKind::Lru, false), ms, quantum, isolated);
        let predicted = run(n, (PolicyKind::Hinted, false), ms, quantum, isolated);
        let hinted = run(n, (PolicyKind::Hinted, true), ms, quantum, isolated);
        println!(
            "{n:>4} {:>8} {:>10} {:>8} {:>7.2} {:>8.1} {:>10.1} {:>10.1}",
            lru.misses,
            predicted.misses,
            hinted.misses,
            lru.misses as f64 / hinted.misses.max(1) as f64,
            lru.wall.as_secs_f64() * 1e3,
            predicted.wall.as_secs_f64() * 1e3,
            hinted.wall.as_secs_f64() * 1e3
        );
    }
}
