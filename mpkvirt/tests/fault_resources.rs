//! Resources after many faulting guarded calls (issue 8, item 10): each abandoned call
//! gives back its stack's pages and mappings, and drops the closure with what it captured,
//! so after 100,000 faults the process has the mappings, resident memory, handles and keys
//! it had before. A test binary of its own: the counts are process-wide.
//!
//! # Safety
//!
//! The test accesses domain memory through raw pointers (no Rust reference ever points
//! there), and calls `Manager::guarded` with closures that start no threads.
#![allow(
    unsafe_code,
    reason = "the test accesses domain memory through raw pointers"
)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{config, mappings};
use mpkvirt::{Backend, Config, Domain, DomainOptions, Emulated, Error, Hardware, Manager, Mode};
use mpkvirt_sys::require_pku;

fn poke(addr: usize) {
    // SAFETY: `addr` is domain memory, which Rust code never references; the fault is
    // recovered by the guarded call around this.
    unsafe { (addr as *mut u8).write_volatile(1) }
}

/// `Manager::guarded` for closures that start no threads.
fn guard<B: Backend, R>(mgr: &Manager<B>, f: impl FnMut() -> R) -> mpkvirt::Result<R> {
    // SAFETY: the closures of these tests start no thread, so nothing can use their frames
    // after a fault abandons them.
    unsafe { mgr.guarded(f) }
}

/// Resident pages (`/proc/self/statm`, second field).
fn resident_pages() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One faulting guarded call whose closure owns a clone of the manager handle and of the
/// domain handle.
fn fault_once<B: Backend>(mgr: &Arc<Manager<B>>, d: &Arc<Domain<B>>, addr: usize) {
    let (m, dom) = (Arc::clone(mgr), Arc::clone(d));
    let err = guard(mgr, move || {
        // The closure owns the clones; they must be dropped although it never returns.
        std::hint::black_box((&m, &dom));
        poke(addr);
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Fault(r) if r.domain == Some(d.id())),
        "{err:?}"
    );
}

/// `faults` faulting guarded calls; afterwards mappings, resident memory, handle counts and
/// keys are back to (about) where they were. A second manager built the way a program would
/// (`Manager::new` in `mode`) must still get as many keys, and the faulting manager's keys
/// once it is dropped. Natively 100,000 faults take about 0.5 s (5 µs each); in the PKU
/// guest (TCG) 40,000 take about 7.5 s.
fn faults_give_everything_back<B: Backend>(mgr: Manager<B>, faults: usize, mode: Mode) {
    let machine = || Manager::new(Config { mode, ..config(15) });
    let keys_before = machine().unwrap().keys().len();
    let own_keys = mgr.keys().to_vec();
    let mgr = Arc::new(mgr);
    let d = Arc::new(mgr.create_domain(DomainOptions::default()).unwrap());
    let addr = d.base().as_ptr() as usize + 8;
    // Warm up: the first guarded call maps the thread's stack and the first fault touches
    // what the handler needs.
    for _ in 0..100 {
        fault_once(&mgr, &d, addr);
    }
    let (maps0, rss0) = (mappings(), resident_pages());
    let t0 = Instant::now();
    for _ in 0..faults {
        fault_once(&mgr, &d, addr);
    }
    let elapsed = t0.elapsed();
    let (maps1, rss1) = (mappings(), resident_pages());
    let page = mpkvirt_sys::mman::page_size();
    eprintln!(
        "{faults} faults in {elapsed:?} ({:.2} us each): mappings {maps0} -> {maps1}, resident {} KiB -> {} KiB",
        elapsed.as_secs_f64() * 1e6 / faults as f64,
        rss0 * page / 1024,
        rss1 * page / 1024
    );
    assert_eq!(Arc::strong_count(&d), 1, "domain handles leaked");
    assert_eq!(Arc::strong_count(&mgr), 1, "manager handles leaked");
    assert!(maps1 <= maps0 + 4, "mappings grew from {maps0} to {maps1}");
    // 1 MiB of slack: allocator noise, not a stack (or two mappings) per fault.
    assert!(
        rss1 <= rss0 + (1 << 20) / page,
        "resident memory grew from {rss0} to {rss1} pages"
    );
    // The manager and the domain still work...
    mgr.with_view(&[(&d, mpkvirt::Rights::ReadWrite)], || {
        guard(&mgr, move || poke(addr)).unwrap();
    })
    .unwrap();
    assert_eq!(mgr.keys(), &own_keys[..]);
    // A program still gets as many keys as before the faults...
    assert_eq!(machine().unwrap().keys().len(), keys_before);
    // ...and once every handle is gone the manager goes away and its keys come back too.
    drop(d);
    drop(Arc::into_inner(mgr).expect("the last manager handle"));
    assert_eq!(
        machine().unwrap().keys().len(),
        (keys_before + own_keys.len()).min(15)
    );
}

#[test]
fn emulated_resources_come_back_after_100k_faults() {
    let _g = common::real_backend();
    faults_give_everything_back(
        Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap(),
        100_000,
        Mode::Emulated,
    );
}

/// In the PKU guest (TCG) faults are slow: fewer, but still more than the ~32,000 at which
/// leaked stacks would reach `vm.max_map_count`.
#[test]
fn pku_resources_come_back_after_40k_faults() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    faults_give_everything_back(
        Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap(),
        40_000,
        Mode::Hardware,
    );
}
