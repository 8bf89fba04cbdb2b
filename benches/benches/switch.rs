//! View switches on the hit path: mpkvirt on each backend against a libmpk-style cache and
//! the mprotect-per-switch baseline, with one and two threads. One iteration is a pair:
//! enter a view (or `mpk_begin`) and leave it (`mpk_end`).
#![allow(
    unsafe_code,
    reason = "raw RDPKRU/WRPKRU pairs as the floor on PKU hardware"
)]

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mpkvirt::{Backend, Config, Domain, DomainOptions, Emulated, Hardware, Manager, Rights};
use mpkvirt_benches::libmpk_style::LibmpkStyle;
use mpkvirt_benches::mprotect_switch::MprotectDomain;
use mpkvirt_sys::{AccessRights, Pkey, Pkru};

/// Runs `f(thread)` `iters` times on each of two threads at once; returns the wall time.
fn two_threads(iters: u64, f: &(dyn Fn(usize) + Sync)) -> Duration {
    let barrier = Barrier::new(3);
    std::thread::scope(|s| {
        for t in 0..2 {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    f(t);
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

/// Benchmarks mpkvirt's enter/leave pair on `mgr` with one and with two threads (each
/// thread its own resident domain).
fn bench_mpkvirt<B: Backend>(c: &mut Criterion, name: &str, mgr: &Manager<B>) {
    let doms: Vec<Domain<B>> = (0..2)
        .map(|_| mgr.create_domain(DomainOptions::reserve(4096)).unwrap())
        .collect();
    for d in &doms {
        drop(mgr.enter(&[(d, Rights::ReadWrite)]).unwrap());
    }
    let pair = |t: usize| {
        drop(black_box(
            mgr.enter(&[(&doms[t], Rights::ReadWrite)]).unwrap(),
        ))
    };
    let mut g = c.benchmark_group("hit");
    g.bench_function(format!("{name}/1-thread"), |b| b.iter(|| pair(0)));
    g.bench_function(format!("{name}/2-threads"), |b| {
        b.iter_custom(|iters| two_threads(iters, &pair))
    });
    g.finish();
}

fn bench_libmpk_style(c: &mut Criterion, name: &str, lm: &LibmpkStyle) {
    lm.register(1, 0x1000, 4096);
    lm.register(2, 0x2000, 4096);
    for v in [1, 2] {
        lm.begin(v, AccessRights::READ_WRITE);
        lm.end(v);
    }
    let pair = |t: usize| {
        let vkey = black_box(1 + t as u32);
        lm.begin(vkey, AccessRights::READ_WRITE);
        lm.end(vkey);
    };
    let mut g = c.benchmark_group("hit");
    g.bench_function(format!("{name}/1-thread"), |b| b.iter(|| pair(0)));
    g.bench_function(format!("{name}/2-threads"), |b| {
        b.iter_custom(|iters| two_threads(iters, &pair))
    });
    g.finish();
}

fn keys(n: u8) -> Vec<Pkey> {
    (1..=n).filter_map(Pkey::new).collect()
}

fn benches(c: &mut Criterion) {
    let cfg = || Config {
        arena_chunk: 1 << 30,
        ..Config::default()
    };
    bench_mpkvirt(
        c,
        "mpkvirt-simulated",
        &Manager::simulated(15, cfg()).unwrap(),
    );
    bench_libmpk_style(
        c,
        "libmpk-style-simulated",
        &LibmpkStyle::new(keys(15), Box::new(|_, _, _, _| {}), None),
    );
    bench_mpkvirt(
        c,
        "mpkvirt-emulated",
        &Manager::with_backend(Emulated::new(15).unwrap(), cfg()).unwrap(),
    );

    let m = [MprotectDomain::new(4096), MprotectDomain::new(4096)];
    let pair = |t: usize| {
        m[t].enter();
        m[t].leave();
    };
    let mut g = c.benchmark_group("hit");
    g.bench_function("mprotect-per-switch/1-thread", |b| b.iter(|| pair(0)));
    g.bench_function("mprotect-per-switch/2-threads", |b| {
        b.iter_custom(|iters| two_threads(iters, &pair))
    });
    g.finish();

    match mpkvirt_sys::detect::pku() {
        Ok(pku) => {
            bench_mpkvirt(
                c,
                "mpkvirt-hardware",
                &Manager::with_backend(Hardware::new(15).unwrap(), cfg()).unwrap(),
            );
            let hw_keys: Vec<Pkey> = (0..15)
                .map_while(|_| mpkvirt_sys::pkey::pkey_alloc(AccessRights::DISABLE_ACCESS).ok())
                .collect();
            let lm = LibmpkStyle::new(hw_keys, Box::new(|_, _, _, _| {}), Some(pku));
            bench_libmpk_style(c, "libmpk-style-hardware", &lm);
            let (a, b) = (
                pku.rdpkru(),
                pku.rdpkru()
                    .with(Pkey::new(1).unwrap(), AccessRights::READ_WRITE),
            );
            let write = |v: Pkru| {
                // SAFETY: both values used keep key 0 open and differ only in key 1's bits;
                // the benchmark owns this thread's PKRU and ends on its original value.
                unsafe { pku.wrpkru(v) }
            };
            c.bench_function("hit/raw-wrpkru-pair/1-thread", |bn| {
                bn.iter(|| {
                    write(black_box(b));
                    write(black_box(a));
                })
            });
            let _: Pkru = a;
        }
        Err(why) => eprintln!("hit/*-hardware: skipped: no PKU ({why})"),
    }
}

criterion_group! {
    name = switch;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(switch);
