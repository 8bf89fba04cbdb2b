//! Invariant 3: entering a view whose domains hold keys makes no system call, takes no lock
//! and writes PKRU at most once (not at all when the value is unchanged).
//! Invariant 4: a miss costs the same number of system calls whatever the domain's size.

mod common;

use common::config;
use common::syscalls::count_syscalls;

use mpkvirt::{Backend, Domain, DomainOptions, Emulated, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

fn check_hit_path<B: Backend>(mgr: &Manager<B>) {
    let rounds = 1000u64;
    let doms: Vec<Domain<B>> = (0..3)
        .map(|_| mgr.create_domain(DomainOptions::reserve(4096)).unwrap())
        .collect();
    // Bind every domain (binding is process-wide), so the counted rounds are all hits.
    for d in &doms {
        drop(mgr.enter(&[(d, Rights::ReadWrite)]).unwrap());
    }
    let ((before, after), calls) = count_syscalls(|m| {
        let before = mgr.thread_stats(); // also sets up this thread's state
        let ((), calls) = m.measure(|| {
            for i in 0..rounds {
                let d = &doms[(i % 3) as usize];
                let _outer = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
                // Nested view with the same rights: PKRU already holds the value.
                let _same = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
            }
        });
        ((before, mgr.thread_stats()), calls)
    });
    assert_eq!(calls, 0, "{rounds} hit rounds made system calls");
    assert_eq!(
        after.slow_paths, before.slow_paths,
        "a hit took the manager's lock"
    );
    assert_eq!(after.enters - before.enters, 2 * rounds);
    // Per round: the outer enter writes, the nested one finds the value in place and skips,
    // leaving the nested view restores the outer value (in place: skip), leaving the outer
    // view writes. At most one write per view change, none when unchanged.
    assert_eq!(
        after.pkru_writes - before.pkru_writes,
        2 * rounds,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        after.pkru_writes_skipped - before.pkru_writes_skipped,
        2 * rounds
    );
}

#[test]
fn the_counter_sees_system_calls() {
    // Control: the harness is not blind.
    let ((), n) = count_syscalls(|m| {
        m.measure(|| {
            // SAFETY: getppid takes no arguments and touches no memory.
            let _ = unsafe { libc::getppid() };
        })
    });
    assert_eq!(n, 1, "getppid counted once");
}

#[test]
fn simulated_hit_path_makes_no_system_call() {
    check_hit_path(&Manager::simulated(4, config(4)).unwrap());
}

#[test]
fn pku_hit_path_makes_no_system_call_and_one_pkru_write_per_change() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    check_hit_path(&Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap());
}

#[test]
fn pku_a_miss_does_make_system_calls() {
    // Control for the test above: with one key, alternating two domains misses every time,
    // and each miss parks the victim and tags the new domain: two system calls.
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap();
    let a = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let b = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    drop(mgr.enter(&[(&a, Rights::ReadWrite)]).unwrap());
    let ((), calls) = count_syscalls(|m| {
        let _ = mgr.thread_stats();
        m.measure_calls(|| drop(mgr.enter(&[(&b, Rights::ReadWrite)]).unwrap()))
    });
    let pkey_mprotect = libc::SYS_pkey_mprotect as i32;
    assert_eq!(
        calls,
        [evict_fence(), vec![pkey_mprotect, pkey_mprotect]].concat(),
        "fence, park, tag"
    );
}

/// The call an eviction makes first to see every thread's pins: `membarrier`, where the
/// kernel has it (then the hit path needs no barrier instruction).
fn evict_fence() -> Vec<i32> {
    if mpkvirt_sys::membarrier::register_private_expedited().is_ok() {
        vec![libc::SYS_membarrier as i32]
    } else {
        vec![]
    }
}

/// System calls of one evicting miss into a domain of `len` bytes, with `touched` pages
/// populated, on a one-key manager.
fn miss_calls<B: Backend>(mgr: &Manager<B>, len: usize, touched: usize) -> Vec<i32> {
    let small = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let big = mgr.create_domain(DomainOptions::reserve(len)).unwrap();
    {
        let _g = mgr.enter(&[(&big, Rights::ReadWrite)]).unwrap();
        for p in 0..touched {
            mgr.write_byte(big.base().as_ptr() as usize + p * (len / touched.max(1)), 1)
                .unwrap();
        }
    }
    drop(mgr.enter(&[(&small, Rights::ReadWrite)]).unwrap());
    // Evict `small`, bind `big` (re-tag all of it), then the reverse.
    let (into_big, into_small) = count_syscalls(|m| {
        let _ = mgr.thread_stats();
        let ((), into_big) =
            m.measure_calls(|| drop(mgr.enter(&[(&big, Rights::ReadWrite)]).unwrap()));
        let ((), into_small) =
            m.measure_calls(|| drop(mgr.enter(&[(&small, Rights::ReadWrite)]).unwrap()));
        (into_big, into_small)
    });
    assert_eq!(
        into_big, into_small,
        "evicting a big domain costs the same as evicting a small one"
    );
    into_big
}

#[test]
fn emulated_miss_cost_does_not_grow_with_domain_size() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap();
    let one_page = miss_calls(&mgr, 4096, 1);
    let one_gib = miss_calls(&mgr, 1 << 30, 64);
    // Park the victim, tag the new domain (still closed: no thread grants it), open it for
    // this thread's view, close it when the view ends: four mprotects, whatever the size.
    let mprotect = libc::SYS_mprotect as i32;
    let expected = [evict_fence(), vec![mprotect; 4]].concat();
    assert_eq!((&one_page, &one_gib), (&expected, &expected));
}

#[test]
fn pku_miss_cost_does_not_grow_with_domain_size() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap();
    let one_page = miss_calls(&mgr, 4096, 1);
    let one_gib = miss_calls(&mgr, 1 << 30, 64);
    let pkey_mprotect = libc::SYS_pkey_mprotect as i32;
    let expected = [evict_fence(), vec![pkey_mprotect; 2]].concat();
    assert_eq!(
        (&one_page, &one_gib),
        (&expected, &expected),
        "fence, park, tag, whatever the size"
    );
}
