//! The hit path under each metadata mode, side by side in one run: an enter/leave pair of a
//! resident view on the simulated backend (no PKU needed), in a child process per mode
//! (the mode is chosen once per process, from `MPKVIRT_METADATA`).
//!
//! - `cooperative`: the library's state in ordinary memory, ops called directly.
//! - `gate`: every op through the call gate (thread identified through `%gs`, library stack,
//!   dispatcher) without the PKRU writes — the protected path minus its two WRPKRUs and one
//!   RDPKRU per op.
//! - `protected` (PKU machines only): the full gate, the library's state under its own key.
//!
//! Each criterion sample runs `iters` pairs in a fresh child and reports the child's own
//! timing of the loop (process start-up is not measured).

use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use mpkvirt::{Config, DomainOptions, Manager, Rights};

const CHILD: &str = "MPKVIRT_BENCH_MODES_CHILD";

/// In a child: `iters` enter/leave pairs; prints the nanoseconds they took.
fn child(iters: u64) -> ! {
    let mgr = Manager::simulated(
        4,
        Config {
            max_keys: 4,
            ..Config::default()
        },
    )
    .expect("manager");
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    for _ in 0..1000 {
        drop(mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap());
    }
    let start = Instant::now();
    for _ in 0..iters {
        drop(std::hint::black_box(
            mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap(),
        ));
    }
    println!("{}", start.elapsed().as_nanos());
    std::process::exit(0)
}

fn run_child(mode: &str, iters: u64) -> Duration {
    let out = Command::new(std::env::current_exe().expect("bench binary"))
        .env(CHILD, iters.to_string())
        .env("MPKVIRT_METADATA", mode)
        .output()
        .expect("child");
    assert!(
        out.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("nanoseconds");
    Duration::from_nanos(ns)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("metadata_modes");
    let mut modes = vec!["cooperative", "gate"];
    if mpkvirt_sys::detect::pku().is_ok() {
        modes.push("protected");
    } else {
        eprintln!("metadata_modes/protected: skipped: no PKU");
    }
    for mode in modes {
        g.bench_function(format!("simulated-hit/{mode}"), |b| {
            b.iter_custom(|iters| run_child(mode, iters))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}

fn main() {
    if let Some(iters) = std::env::var_os(CHILD) {
        child(iters.to_string_lossy().parse().expect("iterations"));
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
