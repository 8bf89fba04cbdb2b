//! Nested signal handlers, and guarded calls a handler interrupted (`gate.rs::note_context`,
//! *Levels*; `manager/views.rs`, *Signal handlers*).
//!
//! A handler's views must outlive it only as long as nothing it interrupted runs again, and
//! nobody but the context that entered a view may end it while that context can resume.
//! The attacks:
//!
//! - **A handler interrupting a handler.** H1 enters a view of X, a second signal runs H2
//!   on top of it, and H2 ends H1's view. Were that allowed, X's key would lose its pin
//!   while H1 resumes (`rt_sigreturn`) with X's rights; the key then goes to another domain,
//!   whose secret H1 reads without any view of it. The defence: every handler level that
//!   holds views gets its own seal (the thread's view sequence number when the level began);
//!   H2 gets `InterruptedView` and the key stays pinned. When H1 calls again, H2 has
//!   returned: the level ends, and so do the views H2 left behind.
//! - **A guarded call interrupted by a handler.** A handler that calls the library during a
//!   guarded closure starts a level; if the closure then faults, the recovery op arrives with
//!   the kernel's PKRU (the fault handler left none). Taken for the handler's, it would keep
//!   the seal and spell the handler's context into the thread's normal PKRU for good, and
//!   the thread could never end its earlier views (their keys pinned until it exits). The
//!   defence: the guarded call's mark carries the level it started at, and recovery returns
//!   there (the fault abandoned everything on the guarded stack; the caller resumes).
//!
//! Telling handlers apart needs PKU, so every test here runs in the guest only (`pku_*`).
//! The C API's `mpk_begin`/`mpk_end` in a re-entered handler: `capi/tests/test_signal_nested.c`.
//!
//! # Safety
//!
//! The tests install SIGUSR1 and SIGUSR2 handlers that run closures their thread set in
//! thread-locals, at points where the thread raised the signal itself (`tgkill` returns
//! after the handler ran) and holds no lock the closures take; the closures call the library
//! and read domain memory through mpkvirt's probe, which its SIGSEGV handler recovers. A
//! guarded closure reads a domain outside its view on purpose (the fault is what guarded
//! calls are for).
#![allow(
    unsafe_code,
    reason = "signal handlers, mpkvirt's probe and a faulting guarded call"
)]

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use common::config;
use mpkvirt::{Domain, DomainOptions, Error, Hardware, Manager, Rights, ViewGuard};
use mpkvirt_sys::require_pku;
use mpkvirt_sys::thread::{gettid, tgkill};

type Slot = RefCell<Option<Box<dyn FnMut()>>>;

thread_local! {
    /// What the SIGUSR1 handler runs on this thread.
    static ON_USR1: Slot = const { RefCell::new(None) };
    /// What the SIGUSR2 handler runs on this thread.
    static ON_USR2: Slot = const { RefCell::new(None) };
}

fn run_slot(slot: &'static LocalKey<Slot>) {
    let saved = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let _ = slot.try_with(|f| {
        if let Ok(mut f) = f.try_borrow_mut()
            && let Some(f) = f.as_mut()
        {
            f();
        }
    });
    // SAFETY: __errno_location takes no arguments and returns this thread's errno slot.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: that slot is valid for writes for the thread's lifetime.
    unsafe { *slot = saved };
}

extern "C" fn on_usr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    run_slot(&ON_USR1);
}

extern "C" fn on_usr2(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    run_slot(&ON_USR2);
}

fn install_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handler runs the closure its thread set (see the module's `# Safety`)
        // and restores errno; on the alternate stack mpkvirt gives the threads it registers.
        unsafe { mpkvirt_sys::signal::install(libc::SIGUSR1, on_usr1, libc::SA_ONSTACK) }.unwrap();
        // SAFETY: as above; SIGUSR2 may interrupt the SIGUSR1 handler (nesting is the point).
        unsafe { mpkvirt_sys::signal::install(libc::SIGUSR2, on_usr2, libc::SA_ONSTACK) }.unwrap();
    });
}

fn set(slot: &'static LocalKey<Slot>, f: impl FnMut() + 'static) {
    slot.with(|s| *s.borrow_mut() = Some(Box::new(f)));
}

/// Sends `sig` to the calling thread: its handler has run when this returns.
fn raise_here(sig: libc::c_int) {
    tgkill(gettid(), sig).expect("tgkill");
}

fn leak<T>(v: T) -> &'static T {
    Box::leak(Box::new(v))
}

fn domain(mgr: &Manager<Hardware>) -> &'static Domain<Hardware> {
    leak(mgr.create_domain(DomainOptions::reserve(4096)).unwrap())
}

fn addr(d: &Domain<Hardware>) -> usize {
    d.base().as_ptr() as usize
}

/// A read through mpkvirt's probe: `None` when it faults.
fn probe(addr: usize) -> Option<u8> {
    // SAFETY: the probe's access is recovered by mpkvirt's SIGSEGV handler when it faults
    // (installed with the hardware backend); the address is a domain's, never referenced by
    // Rust code.
    let v = unsafe { mpkvirt_asm::mpkvirt_probe_read8(addr as *const u8) };
    (v != mpkvirt_asm::PROBE_FAULTED).then_some(v as u8)
}

fn wait_for(stage: &AtomicU32, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stage.load(Ordering::SeqCst) != want {
        assert!(Instant::now() < deadline, "stage {want} never came");
        std::thread::yield_now();
    }
}

/// Result codes a handler stores: 0 not run, 1 `Ok`, 2 `InterruptedView`, 3 other error.
fn code(r: &mpkvirt::Result<()>) -> u32 {
    match r {
        Ok(()) => 1,
        Err(Error::InterruptedView) => 2,
        Err(_) => 3,
    }
}

// ---- 1. a nested handler cannot end the outer handler's view ---------------------------

/// H1 (SIGUSR1) enters a view of X, the manager's only key, and raises SIGUSR2; H2 tries to
/// end H1's view (`end` takes the guard: the view stays, guardless). Then, while H1 still
/// runs, another thread wants the key for domain Y and writes a secret into Y if it gets it;
/// H1 reads Y's page. H2 must get `InterruptedView`, the other thread `KeysBusy`, H1 no
/// secret. The view H1 cannot end any more ends with its level, at the thread's next call
/// in its normal context: the key is free afterwards.
#[test]
fn pku_nesting_a_handler_cannot_end_the_view_of_the_handler_it_interrupted() {
    const SECRET: u8 = 77;
    let _pku = require_pku!();
    let _g = common::real_backend();
    install_handlers();
    let mgr: &'static Manager<Hardware> =
        leak(Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap());
    let x = domain(mgr);
    let y = domain(mgr);
    let y_addr = addr(y);
    let stage = Arc::new(AtomicU32::new(0));
    let h2_end = Arc::new(AtomicU32::new(0));
    let read = Arc::new(AtomicU64::new(0));
    let t = {
        let (stage, h2_end, read) = (stage.clone(), h2_end.clone(), read.clone());
        std::thread::spawn(move || {
            mpkvirt::thread::without_rights(|| ()).unwrap(); // registered
            let h1_view: Rc<RefCell<Option<ViewGuard<'static, Hardware>>>> = Rc::default();
            let v2 = h1_view.clone();
            set(&ON_USR2, move || {
                if let Some(g) = v2.borrow_mut().take() {
                    let r = g.end();
                    h2_end.store(code(&r), Ordering::SeqCst);
                }
            });
            set(&ON_USR1, move || {
                let g = mgr.enter(&[(x, Rights::ReadWrite)]).unwrap();
                *h1_view.borrow_mut() = Some(g);
                raise_here(libc::SIGUSR2); // H2 runs here
                stage.store(1, Ordering::SeqCst);
                wait_for(&stage, 2);
                read.store(probe(y_addr).map_or(u64::MAX, u64::from), Ordering::SeqCst);
            });
            raise_here(libc::SIGUSR1); // H1 (and H2 inside it) run here
            let _ = mgr.stats(); // back in the normal context: the levels end
        })
    };
    wait_for(&stage, 1);
    let other = mgr.enter(&[(y, Rights::ReadWrite)]);
    let got_key = other.is_ok();
    if let Ok(v) = other {
        mgr.write_byte(y_addr, SECRET).unwrap();
        drop(v);
    }
    stage.store(2, Ordering::SeqCst);
    t.join().unwrap();
    let read = read.load(Ordering::SeqCst);
    assert_eq!(
        h2_end.load(Ordering::SeqCst),
        2,
        "H2's end() of H1's view (2: InterruptedView)"
    );
    assert!(
        !got_key,
        "another thread got X's key while H1 still had X's view"
    );
    assert_ne!(
        read,
        u64::from(SECRET),
        "H1 read Y's secret through X's key"
    );
    let v = mgr.enter(&[(y, Rights::ReadWrite)]);
    assert!(v.is_ok(), "X's key after the handlers: {:?}", v.err());
}

// ---- 2. levels end when the context below calls again ----------------------------------

/// The normal context is in a view of N; H1 enters X and raises SIGUSR2; H2 enters and ends
/// a view of Y (its own: allowed), then enters Z and leaves that view behind. Back in H1,
/// its `end()` of X works and finds H2's level over: Z's view is gone too (H1 is left with
/// the rights of the view it interrupted, N, not Z's). Back in the normal context the thread
/// ends N itself.
#[test]
fn pku_nesting_the_interrupted_handler_ends_its_own_view_and_what_the_nested_one_left() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    install_handlers();
    let mgr: &'static Manager<Hardware> =
        leak(Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap());
    let (n, x, y, z) = (domain(mgr), domain(mgr), domain(mgr), domain(mgr));
    let t = std::thread::spawn(move || {
        let outer = mgr.enter(&[(n, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(addr(n), 1).unwrap();
        let results: Rc<RefCell<Vec<(&'static str, String)>>> = Rc::default();
        let r2 = results.clone();
        set(&ON_USR2, move || {
            let mut r = r2.borrow_mut();
            match mgr.enter(&[(y, Rights::ReadWrite)]) {
                Ok(g) => r.push(("H2 ends its own view of Y", format!("{:?}", g.end()))),
                Err(e) => r.push(("H2 ends its own view of Y", format!("enter: {e:?}"))),
            }
            match mgr.enter(&[(z, Rights::ReadOnly)]) {
                Ok(g) => std::mem::forget(g), // left behind
                Err(e) => r.push(("H2 enters Z", format!("{e:?}"))),
            }
        });
        let r1 = results.clone();
        set(&ON_USR1, move || {
            let g = mgr.enter(&[(x, Rights::ReadWrite)]).unwrap();
            raise_here(libc::SIGUSR2); // H2 runs here
            let mut r = r1.borrow_mut();
            r.push(("H1 reads X after H2", format!("{:?}", probe(addr(x)))));
            r.push(("H1 ends its view of X", format!("{:?}", g.end())));
            r.push(("H1 reads Z afterwards", format!("{:?}", probe(addr(z)))));
            r.push(("H1 reads N afterwards", format!("{:?}", probe(addr(n)))));
        });
        raise_here(libc::SIGUSR1); // H1 (and H2 inside it) run here
        let back = probe(addr(n));
        let ended = outer.end();
        let after = probe(addr(n));
        let mut r = results.take();
        r.push(("the normal context reads N", format!("{back:?}")));
        r.push(("the normal context ends N", format!("{ended:?}")));
        r.push((
            "the normal context reads N afterwards",
            format!("{after:?}"),
        ));
        r
    });
    let results = t.join().unwrap();
    let want = [
        ("H2 ends its own view of Y", "Ok(())"),
        ("H1 reads X after H2", "Some(0)"),
        ("H1 ends its view of X", "Ok(())"),
        ("H1 reads Z afterwards", "None"),
        ("H1 reads N afterwards", "Some(1)"),
        ("the normal context reads N", "Some(1)"),
        ("the normal context ends N", "Ok(())"),
        ("the normal context reads N afterwards", "None"),
    ];
    let got: Vec<(&str, &str)> = results.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(got, want);
}

// ---- 3. a guarded call a handler interrupted -------------------------------------------

/// The thread is in two views of A (an outer and an inner one). A guarded closure raises
/// SIGUSR1, whose handler calls the library (a level begins), then reads B outside any view
/// and faults. The recovery must put the thread back in its normal context: afterwards it
/// enters and ends views of B and ends both views of A itself.
#[test]
fn pku_nesting_a_guarded_call_a_handler_interrupted_recovers_into_the_normal_context() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    install_handlers();
    let mgr: &'static Manager<Hardware> =
        leak(Manager::with_backend(Hardware::new(3).unwrap(), config(3)).unwrap());
    let (a, b) = (domain(mgr), domain(mgr));
    let t = std::thread::spawn(move || {
        set(&ON_USR1, move || {
            let _ = mgr.stats(); // any library call from the handler
        });
        let outer = mgr.enter(&[(a, Rights::ReadWrite)]).unwrap();
        let inner = mgr.enter(&[(a, Rights::ReadOnly)]).unwrap();
        drop(mgr.enter(&[(b, Rights::ReadWrite)]).unwrap()); // B resident, outside any view
        let b_addr = addr(b);
        let touch = move || {
            raise_here(libc::SIGUSR1); // the handler runs here
            // SAFETY: a domain address the closure has no view of; the guarded call catches
            // the fault.
            unsafe { (b_addr as *const u8).read_volatile() }
        };
        // SAFETY: the closure borrows nothing and starts no thread.
        let r = unsafe { mgr.guarded(touch) };
        let faulted = matches!(&r, Err(Error::Fault(f)) if f.domain == Some(b.id()));
        let mut views_of_b = Vec::new();
        for _ in 0..3 {
            let v = mgr.enter(&[(b, Rights::ReadOnly)]).unwrap();
            views_of_b.push(v.end());
        }
        (
            faulted,
            views_of_b,
            inner.end(),
            outer.end(),
            probe(addr(a)),
        )
    });
    let (faulted, views_of_b, inner, outer, after) = t.join().unwrap();
    assert!(faulted, "setup: the guarded closure faults on B");
    assert!(views_of_b.iter().all(Result::is_ok), "{views_of_b:?}");
    assert_eq!(
        (inner, outer),
        (Ok(()), Ok(())),
        "the thread, back in its normal context, ends its own views of A"
    );
    assert_eq!(after, None, "no view of A is left");
}
