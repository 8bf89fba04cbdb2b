//! Process-wide rights taken by a signal handler's view change (`manager/global.rs`
//! `with_globals_held`, `manager/shared.rs` `apply`).
//!
//! The attack: a registered thread whose last sync predates a grant (grants reach threads
//! lazily) runs a signal handler that enters and leaves a view of the granted domain. The
//! view change merges the *current* process-wide rights into its PKRU, but an op in a
//! handler's context acknowledges no epoch, so the thread's `holds` would never learn of
//! them: a revocation's snapshot skips the thread and returns `Ok` while the handler still
//! has the key, which then goes to another domain whose secret the handler reads.
//!
//! The defence: every view change records the process-wide rights it takes in the thread's
//! `holds` before it reads them (Dekker with the revoker, which stores the rights, then reads
//! `holds`), in whatever context it runs. The revocation signals the thread; the handler's
//! context cannot acknowledge for the context it interrupted, so the revocation waits, reports
//! `ThreadsNotSynced` and taints the key — or, had the thread dropped the rights, returns `Ok`
//! and the handler cannot read the next owner's secret. Either way the test ends by trying.
//!
//! # Safety
//!
//! Signal handlers installed for SIGUSR1 (process-wide, used only by the thread that raises
//! it), raw reads of PKRU, and mpkvirt's probes (a read that a SIGSEGV handler recovers).
#![allow(unsafe_code, reason = "signal handlers, probes")]

mod common;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::config;
use mpkvirt::{Domain, DomainOptions, Error, Hardware, Manager, Rights};
use mpkvirt_sys::thread::{gettid, tgkill};
use mpkvirt_sys::{Pkru, Pku, require_pku};

const SECRET: u8 = 77;

static MGR: OnceLock<&'static Manager<Hardware>> = OnceLock::new();
static DOM: OnceLock<&'static Domain<Hardware>> = OnceLock::new();
/// Protocol between the main thread and the handler: 0 idle, 1 the handler is parked,
/// 2 the handler may go on, 3 the handler finished.
static STAGE: AtomicU32 = AtomicU32::new(0);
/// Address the handler (or the thread after it) reads at stage 2.
static TARGET: AtomicUsize = AtomicUsize::new(0);
/// PKRU seen in the handler when parked, and what the read at stage 2 returned
/// (`u64::MAX`: it faulted).
static PARKED_PKRU: AtomicU32 = AtomicU32::new(0);
static LATE_PKRU: AtomicU32 = AtomicU32::new(0);
static READ: AtomicU64 = AtomicU64::new(0);

fn wait_stage(want: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while STAGE.load(Ordering::SeqCst) != want {
        assert!(Instant::now() < deadline, "stage {want} never came");
        std::thread::yield_now();
    }
}

fn rdpkru() -> u32 {
    Pku::new().map_or(0, |p| p.rdpkru().bits())
}

fn install(handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)) {
    // No SA_ONSTACK: the handler runs on the thread's own stack, so that mpkvirt's sync
    // signal (SA_ONSTACK) finds the alternate stack free.
    // SAFETY: the handlers below touch only atomics and mpkvirt.
    unsafe { mpkvirt_sys::signal::install(libc::SIGUSR1, handler, 0) }.expect("sigaction");
}

fn write_in_view(mgr: &Manager<Hardware>, d: &Domain<Hardware>, v: u8) {
    let _view = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
    mgr.write_byte(d.base().as_ptr() as usize, v).unwrap();
}

/// SIGUSR1 handler of finding 1: enters and leaves a view of the granted domain (any op that
/// recomputes PKRU with `with_globals` does), parks, then reads `TARGET` through the library.
extern "C" fn handler_with_view(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let mgr = *MGR.get().unwrap();
    let d = *DOM.get().unwrap();
    if let Ok(v) = mgr.enter(&[(d, Rights::ReadOnly)]) {
        drop(v);
    }
    PARKED_PKRU.store(rdpkru(), Ordering::SeqCst);
    STAGE.store(1, Ordering::SeqCst);
    while STAGE.load(Ordering::SeqCst) != 2 {
        std::hint::spin_loop();
    }
    LATE_PKRU.store(rdpkru(), Ordering::SeqCst);
    let r = match mgr.read_byte(TARGET.load(Ordering::SeqCst)) {
        Ok(v) => u64::from(v),
        Err(_) => u64::MAX,
    };
    READ.store(r, Ordering::SeqCst);
    STAGE.store(3, Ordering::SeqCst);
}

/// A registered thread whose last sync predates a grant runs a signal handler that enters and
/// leaves a view of the granted domain, then parks; a revocation follows. It must not report
/// success while the handler keeps the key, nor let the key go to a domain the handler reads.
#[test]
fn pku_a_handlers_view_change_is_counted_as_holding_process_wide_rights() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr: &'static Manager<Hardware> = Box::leak(Box::new(
        Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap(),
    ));
    MGR.set(mgr).unwrap();
    let d: &'static Domain<Hardware> = Box::leak(Box::new(
        mgr.create_domain(DomainOptions::reserve(4096)).unwrap(),
    ));
    write_in_view(mgr, d, 1);
    let key = d.key().unwrap();
    DOM.set(d).unwrap();
    install(handler_with_view);

    let (to_t, from_main) = std::sync::mpsc::channel::<()>();
    let (to_main, from_t) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        // Registered, last sync before the grant: `holds` has no field of `key`.
        mpkvirt::thread::without_rights(|| ()).unwrap();
        to_main.send(()).unwrap();
        from_main.recv().unwrap();
        // The handler runs before tgkill returns.
        tgkill(gettid(), libc::SIGUSR1).unwrap();
    });
    from_t.recv().unwrap();
    d.set_process_wide(Some(Rights::ReadWrite)).unwrap();
    to_t.send(()).unwrap();
    wait_stage(1);
    assert!(
        Pkru::from_bits(PARKED_PKRU.load(Ordering::SeqCst))
            .rights(key)
            .can_write(),
        "setup: the handler took the grant through its view change"
    );
    match d.set_process_wide(None) {
        Ok(()) => {}
        // The key is tainted: no other domain will get it. That is the safe answer.
        Err(Error::ThreadsNotSynced { .. }) => {
            STAGE.store(2, Ordering::SeqCst);
            t.join().unwrap();
            return;
        }
        Err(e) => panic!("revocation: {e:?}"),
    }
    // Success claims every thread dropped the rights; the key may now go to anyone: with one
    // key, the next domain's view evicts `d` (no longer pinned process-wide) and takes it.
    let e = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    write_in_view(mgr, &e, SECRET);
    assert_eq!(
        e.key(),
        Some(key),
        "one key: the revoked key went to the new domain"
    );
    TARGET.store(e.base().as_ptr() as usize, Ordering::SeqCst);
    STAGE.store(2, Ordering::SeqCst);
    wait_stage(3);
    t.join().unwrap();
    let late = Pkru::from_bits(LATE_PKRU.load(Ordering::SeqCst));
    let read = READ.load(Ordering::SeqCst);
    assert!(
        !late.rights(key).can_read() && read == u64::MAX,
        "isolation break: after a successful revocation the handler still has key {key} \
         ({:?}) and read the new domain's secret: {read}",
        late.rights(key)
    );
}
