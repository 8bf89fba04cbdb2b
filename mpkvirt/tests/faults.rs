//! Fault reports: guarded calls turn domain violations into errors naming the domain,
//! unwind the views the abandoned code entered, report stack overflows, let panics through,
//! and leave every fault that is not theirs to the previous handler (the process dies).
//!
//! # Safety
//!
//! The tests access domain memory through raw pointers (no Rust reference ever points
//! there), and call `Manager::guarded` with closures that start no threads.
#![allow(
    unsafe_code,
    reason = "the tests access domain memory through raw pointers"
)]

mod common;

use common::config;

use std::process::Command;
use std::sync::Arc;

use mpkvirt::{
    Access, Backend, DomainOptions, Emulated, Error, FaultKind, Hardware, Manager, Rights, SegvCode,
};
use mpkvirt_sys::require_pku;

/// Writes through a raw pointer into domain memory (no Rust reference exists to it).
fn poke(addr: usize, v: u8) {
    // SAFETY: `addr` is inside a domain reservation, which Rust code never references; a
    // fault here is recovered by the guarded call around it.
    unsafe { (addr as *mut u8).write_volatile(v) }
}

fn peek(addr: usize) -> u8 {
    // SAFETY: as for `poke`.
    unsafe { (addr as *const u8).read_volatile() }
}

/// `Manager::guarded` for closures that start no threads.
fn guard<B: Backend, R>(mgr: &Manager<B>, f: impl FnMut() -> R) -> mpkvirt::Result<R> {
    // SAFETY: the closures of these tests start no thread, so nothing can use their frames
    // after a fault abandons them.
    unsafe { mgr.guarded(f) }
}

/// `resident_code`: how the backend reports a denied access to a domain that holds a key
/// (a parked domain is always `SEGV_ACCERR`: its pages have no access at all).
fn guarded_calls_report_violations<B: Backend>(mgr: &Manager<B>, resident_code: SegvCode) {
    let d = mgr.create_domain(DomainOptions::reserve(8192)).unwrap();
    let addr = d.base().as_ptr() as usize + 100;

    // Outside every view: the write faults and is reported, the process lives on.
    for (resident, code) in [(false, SegvCode::AccErr), (true, resident_code)] {
        if resident {
            drop(mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap());
        }
        assert_eq!(d.is_resident(), resident);
        let err = guard(mgr, move || poke(addr, 7)).unwrap_err();
        let Error::Fault(report) = err else {
            panic!("expected a fault, got {err:?}")
        };
        assert_eq!(report.kind, FaultKind::Violation);
        assert_eq!(report.domain, Some(d.id()));
        assert_eq!(report.addr, addr);
        assert_eq!(report.access, Some(Access::Write));
        assert_eq!(report.code, code, "resident: {resident}");
        assert!(report.to_string().contains(&d.id().to_string()), "{report}");
    }

    // Inside a view granting it, the same code runs to completion.
    let v = mgr
        .with_view(&[(&d, Rights::ReadWrite)], || {
            guard(mgr, move || {
                poke(addr, 9);
                peek(addr)
            })
        })
        .unwrap()
        .unwrap();
    assert_eq!(v, 9);

    // Read-only: reads work, the write is reported as a write.
    let err = mgr
        .with_view(&[(&d, Rights::ReadOnly)], || {
            guard(mgr, move || poke(addr, 1))
        })
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, Error::Fault(r) if r.access == Some(Access::Write) && r.domain == Some(d.id())),
        "{err:?}"
    );
    assert_eq!(
        mgr.with_view(&[(&d, Rights::ReadOnly)], || guard(mgr, move || peek(addr)))
            .unwrap()
            .unwrap(),
        9
    );
}

#[test]
fn emulated_guarded_calls_report_violations() {
    let _g = common::real_backend();
    guarded_calls_report_violations(
        &Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap(),
        SegvCode::AccErr,
    );
}

#[test]
fn pku_guarded_calls_report_violations_with_the_hardware_key() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    guarded_calls_report_violations(&mgr, SegvCode::PkuErr);
    let d = mgr.create_domain(DomainOptions::default()).unwrap();
    let addr = d.base().as_ptr() as usize;
    drop(mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap()); // resident, not granted
    let Err(Error::Fault(r)) = guard(&mgr, move || peek(addr)) else {
        panic!("expected a fault")
    };
    assert_eq!(r.hw_key, d.key(), "si_pkey names the domain's key");
}

fn abandoned_views_are_unwound<B: Backend>(mgr: &Manager<B>) {
    // One key: if the view abandoned inside the guarded call kept its pin, nothing else
    // could be entered afterwards.
    let a = Arc::new(mgr.create_domain(DomainOptions::default()).unwrap());
    let b = mgr.create_domain(DomainOptions::default()).unwrap();
    let b_addr = b.base().as_ptr() as usize;
    let before = mgr.current_pkru();
    let (m, a2) = (mgr.clone(), Arc::clone(&a));
    let err = guard(mgr, move || {
        let _view = m
            .enter_owned(&[(Arc::clone(&a2), Rights::ReadWrite)])
            .unwrap();
        poke(b_addr, 1); // b is not in the view
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Fault(r) if r.domain == Some(b.id())),
        "{err:?}"
    );
    assert_eq!(
        mgr.current_pkru(),
        before,
        "the thread's rights are back to what they were"
    );
    let _view = mgr
        .enter(&[(&b, Rights::ReadWrite)])
        .expect("the abandoned view's key was unpinned");
    mgr.write_byte(b_addr, 5).unwrap();
}

#[test]
fn emulated_abandoned_views_are_unwound() {
    let _g = common::real_backend();
    abandoned_views_are_unwound(
        &Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap(),
    );
}

#[test]
fn pku_abandoned_views_are_unwound() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    abandoned_views_are_unwound(
        &Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap(),
    );
}

#[inline(never)]
#[allow(unconditional_recursion, reason = "overflowing the stack is the point")]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth as u8; 512]);
    recurse(depth + 1).wrapping_add(u64::from(frame[0]))
}

#[test]
fn a_stack_overflow_in_a_guarded_call_is_reported() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    let err = guard(&mgr, || recurse(0)).unwrap_err();
    assert!(
        matches!(err, Error::Fault(r) if r.kind == FaultKind::StackOverflow),
        "{err:?}"
    );
    // The thread is fine afterwards and guarded calls still work.
    assert_eq!(guard(&mgr, || 41 + 1).unwrap(), 42);
}

#[test]
fn a_panic_in_a_guarded_call_propagates() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        guard(&mgr, || panic!("boom"))
    }));
    let payload = caught.expect_err("the panic reaches the caller");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
}

#[test]
fn guarded_calls_are_unsupported_on_the_simulated_backend() {
    let mgr = Manager::simulated(2, config(2)).unwrap();
    assert!(matches!(guard(&mgr, || 1), Err(Error::Unsupported(_))));
}

/// Child-process scenarios, run by `faults_that_are_not_ours_kill_the_process`.
#[test]
#[ignore = "run as a child process by faults_that_are_not_ours_kill_the_process"]
fn crash_child() {
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    match std::env::var("MPKVIRT_CRASH").as_deref() {
        // A wild pointer inside a guarded call is not a domain violation.
        Ok("wild") => drop(guard(&mgr, || poke(16, 1))),
        // A domain violation outside a guarded call is reported, then the process dies.
        Ok("unguarded") => {
            let d = mgr.create_domain(DomainOptions::default()).unwrap();
            poke(d.base().as_ptr() as usize, 1);
        }
        // Issue 8, item 11: the closure panics, and a destructor run by the unwinding faults
        // on domain memory. The unwinder cannot go on from the fault: the process must abort
        // rather than go on with the thread believing it is still panicking.
        Ok("unwinding") => {
            let d = mgr.create_domain(DomainOptions::default()).unwrap();
            let addr = d.base().as_ptr() as usize;
            struct PokeOnDrop(usize);
            impl Drop for PokeOnDrop {
                fn drop(&mut self) {
                    poke(self.0, 1);
                }
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                guard(&mgr, move || {
                    let _p = PokeOnDrop(addr);
                    panic!("boom");
                })
            }));
            println!(
                "returned {:?}; panicking: {}",
                r.map_err(|_| "a panic"),
                std::thread::panicking()
            );
        }
        other => panic!("unknown scenario {other:?}"),
    }
    println!("survived");
}

#[test]
fn faults_that_are_not_ours_kill_the_process() {
    use std::os::unix::process::ExitStatusExt;
    for scenario in ["wild", "unguarded"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MPKVIRT_CRASH", scenario)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSEGV),
            "{scenario}: {:?}\n{stderr}",
            out.status
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"));
        if scenario == "unguarded" {
            assert!(
                stderr.contains("mpkvirt: unhandled domain fault: write at 0x"),
                "{stderr}"
            );
        }
    }
}

/// Issue 8, item 11: a fault while a panic unwinds through a guarded call aborts the process
/// with a message saying so (as a panic in a destructor during unwinding does); the thread
/// never goes on with its panic state stuck.
#[test]
fn a_fault_while_a_panic_unwinds_aborts() {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MPKVIRT_CRASH", "unwinding")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("faulted while a panic was unwinding"),
        "{stderr}"
    );
    assert!(!stdout.contains("survived"), "{stdout}");
}
