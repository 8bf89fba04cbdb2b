//! A guarded call's recovery from a fault inside a signal handler restores the caller's
//! signal mask.
//!
//! **Attack** (review of issue 8, finding 5). A guarded call's closure raises a signal whose
//! handler (installed without `SA_ONSTACK`, so it runs on the guarded stack) touches a domain
//! outside the thread's view. The recovery abandons the handler's frame — and its
//! `rt_sigreturn`, which would have restored the mask — so the context resumed with the
//! SIGSEGV frame's mask, the one inside the handler: the handler's signal stayed blocked on
//! the thread for good, and a second `raise` never ran it.
//!
//! **Defence** (`fault::run_guarded` keeps the mask at the call's start in the thread's
//! recovery state; the SIGSEGV handler writes it into the frame it redirects).
//!
//! # Safety
//!
//! A SIGUSR1 handler that reads domain memory (faulting on purpose) and counts its runs; the
//! signal mask query.
#![allow(unsafe_code, reason = "a signal handler that faults on purpose")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use mpkvirt::{DomainOptions, Emulated, Error, Manager};

static TARGET: AtomicUsize = AtomicUsize::new(0);
static RUNS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn touch(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RUNS.fetch_add(1, Ordering::SeqCst);
    let p = TARGET.load(Ordering::SeqCst);
    if p != 0 {
        // SAFETY: a read of domain memory outside the thread's view: it faults, and the
        // guarded call's recovery abandons this frame.
        unsafe { std::ptr::read_volatile(p as *const u8) };
    }
}

fn usr1_blocked() -> bool {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: queries the calling thread's mask into `set`.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), set.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: filled by pthread_sigmask; `sigismember` only reads it.
    unsafe { libc::sigismember(set.as_ptr(), libc::SIGUSR1) == 1 }
}

#[test]
fn a_recovery_from_a_faulting_handler_restores_the_signal_mask() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), common::config(1)).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    // SAFETY: the handler only reads domain memory (recovered by the guarded call) and counts.
    unsafe { mpkvirt_sys::signal::install(libc::SIGUSR1, touch, 0) }.unwrap();
    TARGET.store(d.base().as_ptr() as usize, Ordering::SeqCst);
    std::thread::spawn(move || {
        assert!(!usr1_blocked(), "setup: SIGUSR1 unblocked");
        let f = || {
            // SAFETY: raises a signal whose handler is installed above.
            unsafe { libc::raise(libc::SIGUSR1) };
        };
        // SAFETY: the closure starts no thread.
        let r = unsafe { mgr.guarded(f) };
        assert!(
            matches!(r, Err(Error::Fault(_))),
            "setup: the handler faulted: {r:?}"
        );
        assert!(
            !usr1_blocked(),
            "after the recovery SIGUSR1 stays blocked on the thread (the handler's mask)"
        );
        TARGET.store(0, Ordering::SeqCst);
        let before = RUNS.load(Ordering::SeqCst);
        // SAFETY: as above; the handler now only counts.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(
            RUNS.load(Ordering::SeqCst),
            before + 1,
            "the handler runs again"
        );
        drop(d);
    })
    .join()
    .unwrap();
}
