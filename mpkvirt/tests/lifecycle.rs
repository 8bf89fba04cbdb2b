//! Views and keys at the edges of their lives: threads that exit inside a view, guarded
//! calls abandoning views of several managers, domains whose pages cannot be emptied,
//! reused memory, managers dropped while a forgotten view still pins a key; domains never
//! span two reservations.
//!
//! # Safety
//!
//! The tests access domain memory through raw pointers (no Rust reference ever points
//! there), `mlock` a domain's page, and call `Manager::guarded` with closures that start no
//! threads.
#![allow(
    unsafe_code,
    reason = "raw accesses to domain memory and mlock in tests"
)]

mod common;

use std::sync::Arc;

use common::config;
use mpkvirt::{Backend, DomainOptions, Emulated, Error, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

/// `Manager::guarded` for closures that start no threads.
fn guard<B: Backend, R>(mgr: &Manager<B>, f: impl FnMut() -> R) -> mpkvirt::Result<R> {
    // SAFETY: the closures of these tests start no thread, so nothing can use their frames
    // after a fault abandons them.
    unsafe { mgr.guarded(f) }
}

fn poke(addr: usize) {
    // SAFETY: `addr` is domain memory, which Rust code never references; the fault is
    // recovered by the guarded call around this.
    unsafe { (addr as *mut u8).write_volatile(1) }
}

/// A thread that exits with a view still live (its guard forgotten) leaves no rights and no
/// pins behind: with one key, another domain can be bound right away (pin wait is zero).
fn thread_exit_ends_its_views<B: Backend>(mgr: &Manager<B>) {
    let a = mgr.create_domain(DomainOptions::default()).unwrap();
    let b = mgr.create_domain(DomainOptions::default()).unwrap();
    let a_addr = a.base().as_ptr() as usize;
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let view = mgr.enter(&[(&a, Rights::ReadWrite)]).unwrap();
            mgr.write_byte(a_addr, 1).unwrap();
            std::mem::forget(view);
        });
        // Joined explicitly: the scope alone does not wait for thread-local destructors.
        t.join().unwrap();
    });
    // On the emulated backend the exited thread's rights would otherwise keep `a` open to
    // the whole process.
    assert!(matches!(mgr.read_byte(a_addr), Err(Error::Fault(_))));
    let _view = mgr
        .enter(&[(&b, Rights::ReadWrite)])
        .expect("the exited thread's pin is gone");
}

#[test]
fn simulated_thread_exit_ends_its_views() {
    thread_exit_ends_its_views(&Manager::simulated(1, config(1)).unwrap());
}

#[test]
fn emulated_thread_exit_ends_its_views() {
    let _g = common::real_backend();
    thread_exit_ends_its_views(
        &Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap(),
    );
}

#[test]
fn pku_thread_exit_ends_its_views() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    thread_exit_ends_its_views(
        &Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap(),
    );
}

/// A faulting guarded call of manager `m1` ends the views `f` entered with another manager
/// `m2`, and a view `f` entered after dropping the one it was given.
fn guarded_ends_every_view_f_entered<B: Backend>(m1: &Manager<B>, m2: &Manager<B>) {
    let x = m1.create_domain(DomainOptions::default()).unwrap();
    let x_addr = x.base().as_ptr() as usize;
    let b = Arc::new(m2.create_domain(DomainOptions::default()).unwrap());
    let b_addr = b.base().as_ptr() as usize;
    let (m2c, bc) = (m2.clone(), Arc::clone(&b));
    let err = guard(m1, move || {
        let _other = m2c
            .enter_owned(&[(Arc::clone(&bc), Rights::ReadWrite)])
            .unwrap();
        poke(x_addr); // x (of m1) is in no view
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Fault(r) if r.domain == Some(x.id())),
        "{err:?}"
    );
    assert!(
        matches!(m2.read_byte(b_addr), Err(Error::Fault(_))),
        "m2's view ended"
    );
    let c = m2.create_domain(DomainOptions::default()).unwrap();
    drop(
        m2.enter(&[(&c, Rights::ReadWrite)])
            .expect("m2's only key is free again"),
    );

    // `f` owns a view, drops it, enters another and faults: the new one is ended too.
    let a = Arc::new(m1.create_domain(DomainOptions::default()).unwrap());
    let n = Arc::new(m1.create_domain(DomainOptions::default()).unwrap());
    let n_addr = n.base().as_ptr() as usize;
    let mut outer = Some(
        m1.enter_owned(&[(Arc::clone(&a), Rights::ReadWrite)])
            .unwrap(),
    );
    let (m1c, nc) = (m1.clone(), Arc::clone(&n));
    let err = guard(m1, move || {
        drop(outer.take());
        let _v = m1c
            .enter_owned(&[(Arc::clone(&nc), Rights::ReadWrite)])
            .unwrap();
        poke(x_addr);
    })
    .unwrap_err();
    assert!(matches!(err, Error::Fault(_)));
    assert!(
        matches!(m1.read_byte(n_addr), Err(Error::Fault(_))),
        "the view entered inside ended"
    );
}

#[test]
fn emulated_guarded_ends_every_view_f_entered() {
    let _g = common::real_backend();
    let m1 = Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap();
    let m2 = Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap();
    guarded_ends_every_view_f_entered(&m1, &m2);
}

#[test]
fn pku_guarded_ends_every_view_f_entered() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let m1 = Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap();
    let m2 = Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap();
    guarded_ends_every_view_f_entered(&m1, &m2);
}

/// Destroying a domain whose pages cannot be emptied (they are locked) keeps its range out of
/// circulation and its old pages closed. Its key goes on: the pages were parked (no access,
/// key 0) before the emptying failed, so the key grants nothing of them any more.
fn locked_pages_retire_key_and_range<B: Backend>(mgr: &Manager<B>) {
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let addr = d.base().as_ptr() as usize;
    let old_key = {
        let _v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(addr, 0x5a).unwrap();
        // SAFETY: mlock only pins the (domain's own) page in memory; it reads nothing.
        let rc = unsafe { libc::mlock(addr as *const libc::c_void, 4096) };
        assert_eq!(rc, 0, "mlock");
        d.key().unwrap()
    };
    drop(d);
    let e = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let _v = mgr.enter(&[(&e, Rights::ReadWrite)]).unwrap();
    mgr.write_byte(e.base().as_ptr() as usize, 1).unwrap();
    let _ = old_key;
    assert_ne!(
        e.base().as_ptr() as usize,
        addr,
        "the retired range is not reused"
    );
    // No live domain owns the range any more: a checked access refuses it without touching
    // it, and a real access faults (the old pages stay closed).
    assert!(matches!(
        mgr.read_byte(addr),
        Err(Error::NotAllocated { addr: a, .. }) if a == addr
    ));
    let err = guard(mgr, move || poke(addr)).unwrap_err();
    assert!(
        matches!(err, Error::Fault(r) if r.domain.is_none() && r.addr == addr),
        "{err:?}"
    );
}

#[test]
fn emulated_locked_pages_retire_key_and_range() {
    let _g = common::real_backend();
    locked_pages_retire_key_and_range(
        &Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap(),
    );
}

#[test]
fn pku_locked_pages_retire_key_and_range() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    locked_pages_retire_key_and_range(
        &Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap(),
    );
}

/// Freed page runs read as zero when they are allocated again.
fn freed_pages_come_back_zeroed<B: Backend>(mgr: &Manager<B>) {
    let d = mgr
        .create_domain(DomainOptions::reserve(16 * 4096))
        .unwrap();
    let _v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
    let p = d.alloc_pages(2).unwrap().as_ptr() as usize;
    mgr.write_byte(p + 4096, 9).unwrap();
    d.free(std::ptr::NonNull::new(p as *mut u8).unwrap())
        .unwrap();
    let q = d.alloc_pages(2).unwrap().as_ptr() as usize;
    assert_eq!(q, p, "the run is reused");
    assert_eq!(mgr.read_byte(q + 4096).unwrap(), 0);
}

#[test]
fn simulated_freed_pages_come_back_zeroed() {
    freed_pages_come_back_zeroed(&Manager::simulated(2, config(2)).unwrap());
}

#[test]
fn emulated_freed_pages_come_back_zeroed() {
    let _g = common::real_backend();
    freed_pages_come_back_zeroed(
        &Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap(),
    );
}

#[test]
fn pku_freed_pages_come_back_zeroed() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    freed_pages_come_back_zeroed(
        &Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap(),
    );
}

/// Keys never go back to the kernel (a thread that kept rights by accident must not reach
/// pages other code tags with the same number), and a manager dropped while a forgotten view
/// still pins its keys retires them: no later manager gets them. Keys of a manager dropped
/// without live views go back to mpkvirt's pool and are handed out again.
#[test]
fn pku_keys_of_a_forgotten_view_are_never_handed_on() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    std::thread::scope(|s| {
        s.spawn(|| {
            let before = mpkvirt_sys::detect::count_free_keys().unwrap();
            let mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
            let retired = mgr.keys().to_vec();
            let d = mgr.create_domain(DomainOptions::default()).unwrap();
            std::mem::forget(mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap());
            drop(d);
            drop(mgr);
            // (The two keys may have come from mpkvirt's pool rather than the kernel: the
            // kernel's count can only have gone down.)
            assert!(
                mpkvirt_sys::detect::count_free_keys().unwrap() <= before,
                "not given back to the kernel"
            );
            let m2 = Manager::with_backend(Hardware::new(15).unwrap(), config(15)).unwrap();
            let mut got = m2.keys().to_vec();
            assert!(
                got.iter().all(|k| !retired.contains(k)),
                "{got:?} reuses a retired key of {retired:?}"
            );
            drop(m2);
            assert_eq!(
                mpkvirt_sys::detect::count_free_keys().unwrap(),
                0,
                "m2 took every key the kernel had, and kept them in the pool when dropped"
            );
            let m3 = Manager::with_backend(Hardware::new(15).unwrap(), config(15)).unwrap();
            let mut again = m3.keys().to_vec();
            got.sort_by_key(|k| k.index());
            again.sort_by_key(|k| k.index());
            assert_eq!(again, got, "the pool hands the free keys out again");
        });
    });
}

/// A domain lies in one reservation: two neighbouring reservations freed side by side are
/// never handed out as one domain spanning both (the backend refuses to act on such a
/// range). Ported from the wt-treap branch. The kernel often places consecutive
/// reservations next to each other; the test counts how often it did, and is right either
/// way.
fn no_domain_spans_two_reservations<B: Backend>(new: impl Fn() -> Manager<B>) -> usize {
    let page = mpkvirt_sys::mman::page_size();
    let mut adjacent = 0;
    for _ in 0..8 {
        // One reservation per domain, of exactly its size.
        let mgr = new();
        // A first domain, so that the next two reservations are made back to back (other
        // memory mapped during the first creation tends to land between them).
        let _first = mgr.create_domain(DomainOptions::reserve(page)).unwrap();
        let a = mgr.create_domain(DomainOptions::reserve(page)).unwrap();
        let b = mgr.create_domain(DomainOptions::reserve(page)).unwrap();
        let (pa, pb) = (a.base().as_ptr() as usize, b.base().as_ptr() as usize);
        adjacent += usize::from(pa.abs_diff(pb) == page);
        drop((a, b));
        let c = mgr.create_domain(DomainOptions::reserve(2 * page)).unwrap();
        let addr = c.base().as_ptr() as usize;
        let _v = mgr.enter(&[(&c, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(addr + page, 7).unwrap();
        assert_eq!(mgr.read_byte(addr + page).unwrap(), 7);
    }
    adjacent
}

#[test]
fn emulated_no_domain_spans_two_reservations() {
    let _g = common::real_backend();
    let cfg = mpkvirt::Config {
        arena_chunk: mpkvirt_sys::mman::page_size(),
        ..config(1)
    };
    let adjacent = no_domain_spans_two_reservations(|| {
        Manager::with_backend(Emulated::new(1).unwrap(), cfg.clone()).unwrap()
    });
    eprintln!("neighbouring reservations: {adjacent} of 8 rounds");
}

#[test]
fn pku_no_domain_spans_two_reservations() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let cfg = mpkvirt::Config {
        arena_chunk: mpkvirt_sys::mman::page_size(),
        ..config(1)
    };
    let adjacent = no_domain_spans_two_reservations(|| {
        Manager::with_backend(Hardware::new(1).unwrap(), cfg.clone()).unwrap()
    });
    eprintln!("neighbouring reservations: {adjacent} of 8 rounds");
}

/// Issue 8, item 5, with `arena_chunk` = 1 MiB: two 1 MiB domains, each in an arena of its
/// own, are freed; a 2 MiB domain must not be carved from the two as one range (it would
/// span two reservations: entering and dropping it would fail). Every byte at the edges of
/// its halves is reachable in its view.
fn freed_neighbouring_arenas_stay_apart<B: Backend>(new: impl Fn() -> Manager<B>) -> usize {
    const MIB: usize = 1 << 20;
    let mut adjacent = 0;
    for round in 0..8u8 {
        let mgr = new();
        let _first = mgr.create_domain(DomainOptions::reserve(MIB)).unwrap();
        let a = mgr.create_domain(DomainOptions::reserve(MIB)).unwrap();
        let b = mgr.create_domain(DomainOptions::reserve(MIB)).unwrap();
        let (pa, pb) = (a.base().as_ptr() as usize, b.base().as_ptr() as usize);
        adjacent += usize::from(pa.abs_diff(pb) == MIB);
        drop((a, b));
        let c = mgr.create_domain(DomainOptions::reserve(2 * MIB)).unwrap();
        let addr = c.base().as_ptr() as usize;
        let view = mgr.enter(&[(&c, Rights::ReadWrite)]).unwrap();
        for off in [0, MIB - 1, MIB, 2 * MIB - 1] {
            mgr.write_byte(addr + off, round).unwrap();
            assert_eq!(mgr.read_byte(addr + off).unwrap(), round);
        }
        drop(view);
        drop(c);
        // The manager goes on working with the ranges given back.
        let d = mgr.create_domain(DomainOptions::reserve(2 * MIB)).unwrap();
        let _v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(d.base().as_ptr() as usize + 2 * MIB - 1, 1)
            .unwrap();
    }
    adjacent
}

#[test]
fn emulated_freed_neighbouring_arenas_stay_apart() {
    let _g = common::real_backend();
    let cfg = mpkvirt::Config {
        arena_chunk: 1 << 20,
        ..config(1)
    };
    let adjacent = freed_neighbouring_arenas_stay_apart(|| {
        Manager::with_backend(Emulated::new(1).unwrap(), cfg.clone()).unwrap()
    });
    eprintln!("neighbouring reservations: {adjacent} of 8 rounds");
}

#[test]
fn pku_freed_neighbouring_arenas_stay_apart() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let cfg = mpkvirt::Config {
        arena_chunk: 1 << 20,
        ..config(1)
    };
    let adjacent = freed_neighbouring_arenas_stay_apart(|| {
        Manager::with_backend(Hardware::new(1).unwrap(), cfg.clone()).unwrap()
    });
    eprintln!("neighbouring reservations: {adjacent} of 8 rounds");
}
