//! A revocation acknowledged by a thread that the sync signal registers inside an
//! application's signal handler (`ops.rs` `OP_SYNC`, `gate.rs` `looks_normal`, `sync.rs`).
//!
//! The attack: a thread created while a domain has process-wide rights inherits them in its
//! PKRU and has no record. The revocation signals it while it runs an application signal
//! handler, so mpkvirt's sync handler runs nested and its frame holds the *handler's* PKRU.
//! If the registration (or `OP_SYNC`) took the fresh thread's interrupted context for its
//! normal one and acknowledged, the revocation would return `Ok`; the application handler
//! returns and `rt_sigreturn` restores the thread's inherited PKRU — still granting the key,
//! which goes to another domain next.
//!
//! The defence: registration takes the rights in force but acknowledges nothing; until a sync
//! finds the thread in its normal context, its record is *inherited* (every revocation
//! signals it), and `OP_SYNC` acknowledges only when the interrupted context looks normal —
//! the library key read-only in its PKRU (a handler starts with the kernel's initial value,
//! which denies it) or no signal blocked (a handler blocks its own). A handler's context gets
//! the current rights spelled as a handler's, so it never looks normal later. The revocation
//! then reports `ThreadsNotSynced` (the key is tainted); once the handler has returned, the
//! thread acknowledges from its normal context and loses the rights there.
//!
//! # Safety
//!
//! A SIGUSR1 handler (touching only atomics), raw reads of PKRU, and mpkvirt's probe (a read
//! that mpkvirt's SIGSEGV handler recovers).
#![allow(unsafe_code, reason = "signal handler, probe")]

mod common;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::config;
use mpkvirt::{Domain, DomainOptions, Error, Hardware, Manager, Rights};
use mpkvirt_sys::thread::{gettid, tgkill};
use mpkvirt_sys::{Pkru, Pku, require_pku};

const SECRET: u8 = 77;

static STAGE: AtomicU32 = AtomicU32::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(0);
static AFTER_PKRU: AtomicU32 = AtomicU32::new(0);
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

/// An application's SIGUSR1 handler that runs for a while (it never calls mpkvirt).
extern "C" fn slow_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STAGE.store(1, Ordering::SeqCst);
    while STAGE.load(Ordering::SeqCst) != 2 {
        std::hint::spin_loop();
    }
}

fn write_in_view(mgr: &Manager<Hardware>, d: &Domain<Hardware>, v: u8) {
    let _view = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
    mgr.write_byte(d.base().as_ptr() as usize, v).unwrap();
}

/// A thread created while a domain has process-wide rights (it inherits them, and has no
/// record) sits in an application signal handler when the revocation signals it. The
/// revocation must not report success while the thread will resume with the rights, nor let
/// the key go to a domain it then reads; once back in its normal context, the thread takes
/// the revocation when signalled again.
#[test]
fn pku_a_thread_registered_inside_a_handler_does_not_acknowledge_for_its_normal_context() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    write_in_view(&mgr, &d, 1);
    d.set_process_wide(Some(Rights::ReadWrite)).unwrap();
    let key = d.key().unwrap();
    // SAFETY: the handler touches only atomics.
    unsafe { mpkvirt_sys::signal::install(libc::SIGUSR1, slow_handler, 0) }.expect("sigaction");

    // Created now: inherits the process-wide rights (the kernel copies PKRU); never calls
    // mpkvirt itself.
    let t = std::thread::spawn(move || {
        assert!(
            Pkru::from_bits(rdpkru()).rights(key).can_write(),
            "setup: inherited"
        );
        tgkill(gettid(), libc::SIGUSR1).unwrap();
        // Back in the thread's normal context.
        AFTER_PKRU.store(rdpkru(), Ordering::SeqCst);
        let target = TARGET.load(Ordering::SeqCst);
        if target != 0 {
            // SAFETY: a live domain's address; mpkvirt's SIGSEGV handler recovers the probe.
            let r = unsafe { mpkvirt_asm::mpkvirt_probe_read8(target as *const u8) };
            READ.store(r, Ordering::SeqCst);
        }
        // Wait (in user code, signals unblocked) for another sync.
        STAGE.store(3, Ordering::SeqCst);
        while STAGE.load(Ordering::SeqCst) != 4 {
            std::hint::spin_loop();
        }
        LATE_PKRU.store(rdpkru(), Ordering::SeqCst);
    });
    // Another sync once the thread is back in its normal context: it acknowledges there and
    // ends up without the revoked rights.
    let resync = |t: std::thread::JoinHandle<()>| {
        wait_stage(3);
        mpkvirt::thread::sync_process_wide().unwrap();
        STAGE.store(4, Ordering::SeqCst);
        t.join().unwrap();
        let late = Pkru::from_bits(LATE_PKRU.load(Ordering::SeqCst));
        assert!(
            !late.rights(key).can_read(),
            "after a sync in its normal context the thread still has key {key}: {:?}",
            late.rights(key)
        );
    };
    wait_stage(1);
    match d.set_process_wide(None) {
        Ok(()) => {}
        Err(Error::ThreadsNotSynced { .. }) => {
            // The key is tainted: the safe answer.
            STAGE.store(2, Ordering::SeqCst);
            resync(t);
            return;
        }
        Err(e) => panic!("revocation: {e:?}"),
    }
    // Ok: every thread dropped the rights, so the key may go to another domain.
    drop(d);
    let e = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    write_in_view(&mgr, &e, SECRET);
    assert_eq!(
        e.key(),
        Some(key),
        "one key: the revoked key went to the new domain"
    );
    TARGET.store(e.base().as_ptr() as usize, Ordering::SeqCst);
    STAGE.store(2, Ordering::SeqCst);
    wait_stage(3);
    let after = Pkru::from_bits(AFTER_PKRU.load(Ordering::SeqCst));
    let read = READ.load(Ordering::SeqCst);
    assert!(
        !after.rights(key).can_read() && read == u64::MAX,
        "isolation break: the revocation returned Ok, yet the thread resumed with key {key} \
         {:?} and read another domain's secret: {read}",
        after.rights(key)
    );
    resync(t);
}
