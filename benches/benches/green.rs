//! Green-thread switches against OS-thread handoffs (the scheduling question's first data
//! point), natively.
//!
//! - `green/round-trip`: a fiber resumed and suspending itself again — two switches
//!   (`host/src/sched/green.rs`, `asm/x86_64/green.S`).
//! - `green/round-trip+view`: the same, with the fiber's rights installed as a worker does
//!   it: a one-domain view entered before each resume and left after (mpkvirt's simulated
//!   backend, so "PKRU" is a variable; on PKU hardware add two WRPKRUs, see `pkru`).
//! - `os/round-trip`: two OS threads handing control back and forth (`thread::park` /
//!   `unpark`, i.e. futex wait and wake): the kernel's switch.
//!
//! `cargo bench -p mpkvirt-benches --bench green`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use mpkvirt::{Config, DomainOptions, Manager, Rights};
use mpkvirt_host::sched::green::{Fiber, Resumed};

fn looping_fiber() -> Fiber {
    Fiber::new(64 << 10, |s| {
        loop {
            s.suspend();
        }
    })
    .unwrap()
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("green");
    let mut f = looping_fiber();
    g.bench_function("round-trip", |b| {
        b.iter(|| black_box(matches!(f.resume(), Resumed::Suspended)))
    });
    let mgr = Manager::simulated(15, Config::default()).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let mut f = looping_fiber();
    g.bench_function("round-trip+view", |b| {
        b.iter(|| {
            let v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
            black_box(matches!(f.resume(), Resumed::Suspended));
            drop(v);
        })
    });
    g.finish();

    // Two OS threads: `turn` says whose turn it is; each parks until it is its turn.
    let mut g = c.benchmark_group("os");
    let turn = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let main = std::thread::current();
    let peer = {
        let (turn, stop, main) = (Arc::clone(&turn), Arc::clone(&stop), main.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if turn.load(Ordering::Acquire) == 1 {
                    turn.store(0, Ordering::Release);
                    main.unpark();
                } else {
                    std::thread::park();
                }
            }
        })
    };
    g.bench_function("round-trip", |b| {
        b.iter(|| {
            turn.store(1, Ordering::Release);
            peer.thread().unpark();
            while turn.load(Ordering::Acquire) != 0 {
                std::thread::park();
            }
        })
    });
    g.finish();
    stop.store(true, Ordering::Release);
    peer.thread().unpark();
    peer.join().unwrap();
}

criterion_group!(green, benches);
criterion_main!(green);
