//! 100,000 domains alive at once, two threads switching among them, every access checked
//! against the model.
//!
//! Each round, both threads enter a view of one domain of their own half, check that it
//! still holds what was last written (it may have been evicted many times since), write a
//! new value, and then — while both views are live — probe the other thread's domain and a
//! domain in no view. The model: a domain in no view faults for everyone; the other
//! thread's domain faults on hardware (rights are per thread) and is readable on the
//! emulation (rights are the union of the threads' current views).

mod common;

use std::sync::Barrier;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use mpkvirt::policy::trace::SplitMix;
use mpkvirt::testing::Semantics;
use mpkvirt::{Backend, Config, Domain, DomainOptions, Emulated, Error, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

const DOMAINS: usize = 100_000;

fn rounds() -> usize {
    std::env::var("MPKVIRT_MANY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn config() -> Config {
    Config {
        pin_wait: Duration::from_secs(10),
        ..Config::default()
    }
}

/// Runs the program; returns (accesses checked, faults among them, evictions).
fn run<B: Backend>(mgr: &Manager<B>, rounds: usize, semantics: Semantics) -> (u64, u64, u64) {
    let doms: Vec<Domain<B>> = (0..DOMAINS)
        .map(|_| mgr.create_domain(DomainOptions::reserve(4096)).unwrap())
        .collect();
    assert_eq!(mgr.stats().domains, DOMAINS as u64);
    let model: Vec<AtomicU8> = (0..DOMAINS).map(|_| AtomicU8::new(0)).collect();
    let picks = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let barrier = Barrier::new(2);
    let addr = |i: usize| doms[i].base().as_ptr() as usize;
    let probe = |i: usize| mgr.read_byte(addr(i));
    let expect_fault = |i: usize, what: &str| match probe(i) {
        Err(Error::Fault(r)) if r.domain == Some(doms[i].id()) => {}
        other => panic!(
            "{what}: read of {} gave {other:?}; the model says it faults",
            doms[i].id()
        ),
    };

    let totals: Vec<(u64, u64)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2usize)
            .map(|t| {
                let (doms, model, picks, barrier) = (&doms, &model, &picks, &barrier);
                s.spawn(move || {
                    let (mut accesses, mut faults) = (0u64, 0u64);
                    // Phase 1: each domain of this thread's half is entered and written once.
                    for i in (t..DOMAINS).step_by(2) {
                        let _view = mgr.enter(&[(&doms[i], Rights::ReadWrite)]).unwrap();
                        let sig = (i % 251) as u8 + 1;
                        mgr.write_byte(addr(i), sig).unwrap();
                        model[i].store(sig, Ordering::Relaxed);
                        accesses += 1;
                    }
                    // Phase 2: lockstep rounds.
                    let mut rng = SplitMix::new(0x5eed + t as u64);
                    for round in 0..rounds {
                        let mine = 2 * rng.below((DOMAINS / 2) as u64) as usize + t;
                        picks[t].store(mine, Ordering::SeqCst);
                        let view = mgr.enter(&[(&doms[mine], Rights::ReadWrite)]).unwrap();
                        let got = probe(mine).unwrap();
                        let want = model[mine].load(Ordering::Relaxed);
                        assert_eq!(
                            got,
                            want,
                            "round {round}: {} lost its contents",
                            doms[mine].id()
                        );
                        let v = (round % 200) as u8 + 1 + t as u8 * 50;
                        mgr.write_byte(addr(mine), v).unwrap();
                        model[mine].store(v, Ordering::Relaxed);
                        accesses += 2;

                        barrier.wait(); // both views live, both writes done
                        let theirs = picks[1 - t].load(Ordering::SeqCst);
                        match semantics {
                            Semantics::PerThread => {
                                expect_fault(theirs, "the other thread's domain");
                                faults += 1;
                            }
                            Semantics::Union => {
                                let got = probe(theirs)
                                    .unwrap_or_else(|e| panic!("round {round}: union rights: {e}"));
                                assert_eq!(got, model[theirs].load(Ordering::Relaxed));
                            }
                        }
                        let mut idle = rng.below(DOMAINS as u64) as usize;
                        while idle == mine || idle == theirs {
                            idle = (idle + 1) % DOMAINS;
                        }
                        expect_fault(idle, "a domain in no view");
                        accesses += 2;
                        faults += 1;
                        barrier.wait(); // probes done before anyone leaves
                        drop(view);
                    }
                    (accesses, faults)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let (accesses, faults) = totals.iter().fold((0, 0), |a, t| (a.0 + t.0, a.1 + t.1));
    // Parked domains merge back into one mapping: the mapping count stays far below the
    // kernel's limit (65,530) although every domain was written.
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        let n = maps.lines().count();
        assert!(n < 2_000, "{n} mappings for {DOMAINS} domains");
    }
    (accesses, faults, mgr.stats().evictions)
}

#[test]
fn simulated_100k_domains_two_threads() {
    let mgr = Manager::simulated(15, config()).unwrap();
    let (accesses, faults, evictions) = run(&mgr, rounds(), Semantics::PerThread);
    assert!(evictions > DOMAINS as u64 / 2, "{evictions} evictions");
    assert!(accesses > DOMAINS as u64 && faults > 0);
}

#[test]
fn emulated_100k_domains_two_threads() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(15).unwrap(), config()).unwrap();
    let (accesses, _, evictions) = run(&mgr, rounds(), Semantics::Union);
    assert!(
        evictions > DOMAINS as u64 / 2 && accesses > DOMAINS as u64,
        "{evictions} evictions"
    );
}

#[test]
fn pku_100k_domains_two_threads() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(15).unwrap(), config()).unwrap();
    let (accesses, faults, evictions) = run(&mgr, rounds(), Semantics::PerThread);
    eprintln!(
        "hardware: {accesses} accesses ({faults} faults) agreed with the model; {evictions} evictions"
    );
    assert!(evictions > DOMAINS as u64 / 2 && faults > 0);
}
