//! Threads that never come back from a wait inside the library.
//!
//! **Attack.** A thread can stop inside the library for good: a signal handler ends it with
//! `SYS_exit` while it sleeps in `Manager::enter`'s slow path (a handler that blocks, or
//! `siglongjmp`s out, has the same effect). It used to break its manager for good:
//!
//! - its entry stayed at the head of the FIFO queue, so every later miss queued behind it and
//!   failed with `KeysBusy` after `pin_wait`, even with free keys, and the victims it had
//!   drained kept their DRAINING mark, so their own hit path failed too;
//! - its record kept `active_mgr`, so dropping the manager spun forever in `release`, which
//!   waited for every non-dead record's op on it with no bound and no liveness check.
//!
//! **Defence.** Every waiter notes, under the manager's lock, each time it looks at the queue
//! (at least every `SYNC_POLL`). A waiter that has not looked for a while is checked
//! (`tgkill(tid, 0)`) and removed when its thread is gone, or when it has not looked for much
//! longer (stuck in a handler): the drains end when nobody waits any more, and a live waiter
//! that comes back requeues at the tail (`views::prune_waiters`). `release` waits only for
//! ops of threads that are alive, and for at most `pin_wait` plus a margin; after that it
//! leaves the manager's state in place (leaked, never freed under an op) and says so.
//!
//! **Attack, second form.** A thread that ends inside an op leaves its record's busy word
//! set. glibc hands its stack and TCB (its FS base) to the next thread created with the same
//! stack size; when that thread's creator still carries the dead thread's GS base (it was
//! created by the dead thread and never called mpkvirt), the new thread looks like the dead
//! one to the gate, finds it busy, and got `Reentrant` for every call, for good.
//!
//! **Defence.** A caller that finds its record busy while none of its own ops runs, and whose
//! thread id is not the record's, lets go of the record (`gate::leave_orphaned_record`: its GS
//! base is cleared) and registers afresh; the busy record is never handed out again.
//!
//! # Safety
//!
//! A SIGUSR1 handler that ends its thread with the raw `exit` system call (no unwinding, no
//! destructors: the thread's Rust state is simply abandoned, and the test never joins it).
//! The child scenario hands that thread a manager and a domain by address: it dies before
//! they are dropped.
#![allow(unsafe_code, reason = "a signal handler ending its thread")]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use mpkvirt::{Config, Domain, DomainOptions, Emulated, Manager, MetadataMode, Rights};
use mpkvirt_sys::require_pku;
use mpkvirt_sys::thread::tgkill;

extern "C" fn exit_thread(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: ends only the calling thread; nothing runs on it afterwards.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
}

fn blocked_in(tid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// One key, two domains: A holds the key with a view of `d1`; W queues for `d2` (head of the
/// queue, drains `d1`) and is ended by its signal handler while it sleeps; then A's view
/// ends. `w` runs W's call (with the handles it is given by address).
fn kill_a_waiter(
    mgr: &Manager<Emulated>,
    d1: &Domain<Emulated>,
    w: impl FnOnce() + Send + 'static,
) {
    // SAFETY: the handler only ends its own thread; it runs on the alternate stack mpkvirt
    // gives registered threads (W sleeps on its library stack in protected mode).
    unsafe { mpkvirt_sys::signal::install(libc::SIGUSR1, exit_thread, libc::SA_ONSTACK) }.unwrap();
    static TID: AtomicI32 = AtomicI32::new(0);
    TID.store(0, Ordering::SeqCst);
    let (a_tx, a_rx) = std::sync::mpsc::channel::<()>();
    let (a_ready_tx, a_ready_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let holder = s.spawn(move || {
            let v = mgr.enter(&[(d1, Rights::ReadWrite)]).unwrap();
            a_ready_tx.send(()).unwrap();
            a_rx.recv().unwrap();
            drop(v);
        });
        a_ready_rx.recv().unwrap();
        std::thread::spawn(move || {
            TID.store(mpkvirt_sys::thread::gettid(), Ordering::SeqCst);
            w();
            unreachable!("W is ended by its signal handler while it waits");
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while TID.load(Ordering::SeqCst) == 0
            || blocked_in(TID.load(Ordering::SeqCst)) != Some(libc::SYS_futex)
        {
            assert!(Instant::now() < deadline, "setup: W never waited");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        let tid = TID.load(Ordering::SeqCst);
        tgkill(tid, libc::SIGUSR1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while tgkill(tid, 0).is_ok() {
            assert!(Instant::now() < deadline, "setup: W did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A's view ends: the key is free now.
        a_tx.send(()).unwrap();
        holder.join().unwrap();
    });
}

fn config() -> Config {
    Config {
        max_keys: 1,
        pin_wait: Duration::from_secs(3),
        ..common::config(1)
    }
}

/// After the dead waiter, with the key free: a view of the drained domain, and then of the
/// other one, succeed at once (they used to fail with `KeysBusy` after `pin_wait`, for good).
fn assert_views_work(mgr: &Manager<Emulated>, d1: &Domain<Emulated>, d2: &Domain<Emulated>) {
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let r = mgr.enter(&[(d1, Rights::ReadWrite)]).map(drop);
    let waited = t0.elapsed();
    let again = mgr.enter(&[(d2, Rights::ReadWrite)]).map(drop);
    assert!(
        r.is_ok() && again.is_ok() && waited < Duration::from_secs(1),
        "after a waiter died inside the library, with the key free: a view of the drained \
         domain got {r:?} after {waited:?}, then a view of the other {again:?}"
    );
}

/// In this process's mode (cooperative natively: the direct path).
#[test]
fn a_waiter_that_never_returns_loses_its_place_in_the_queue() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), config()).unwrap();
    let d1 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let d2 = std::sync::Arc::new(mgr.create_domain(DomainOptions::reserve(4096)).unwrap());
    let (mgr_w, d2_w) = (mgr.clone(), d2.clone());
    kill_a_waiter(&mgr, &d1, move || {
        let _ = mgr_w.enter(&[(&*d2_w, Rights::ReadWrite)]);
    });
    assert_views_work(&mgr, &d1, &d2);
}

/// The child: a waiter dies inside an op of a manager whose handles it holds by address only
/// (its record keeps `active_mgr`); the queue recovers and dropping the manager returns.
#[test]
#[ignore = "run as a child process by the tests below"]
fn dead_waiter_child() {
    if std::env::var("MPKVIRT_DEAD_WAITERS_CHILD").as_deref() != Ok("1") {
        println!("dead_waiter_child: only meaningful as a child process");
        return;
    }
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), config()).unwrap();
    let mode = mgr.metadata_mode();
    println!("metadata mode: {mode:?}");
    let want = match std::env::var("MPKVIRT_METADATA").as_deref() {
        Ok("gate") => MetadataMode::GateOnly,
        _ => MetadataMode::Protected,
    };
    assert_eq!(mode, want, "setup: the child runs in the mode it was given");
    let d1 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let d2 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let (mgr_w, d2_w) = (&raw const mgr as usize, &raw const d2 as usize);
    kill_a_waiter(&mgr, &d1, move || {
        // SAFETY: the manager outlives W: it is dropped only after W ended (`kill_a_waiter`
        // waits for that), and W never runs again.
        let m = unsafe { &*(mgr_w as *const Manager<Emulated>) };
        // SAFETY: as above, for the domain.
        let d = unsafe { &*(d2_w as *const Domain<Emulated>) };
        let _ = m.enter(&[(d, Rights::ReadWrite)]);
    });
    assert_views_work(&mgr, &d1, &d2);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop((d1, d2));
        drop(mgr);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(15))
        .expect("dropping the manager never returned (release waits for the dead waiter)");
    println!("dead waiter child: ok");
}

/// W registers, creates H (which inherits W's GS base and waits), and dies inside an op (its
/// signal handler ends it while it waits for the key `d1`'s view holds). After W is joined,
/// H creates T on W's stack and TCB: T's first call must work, on a record of its own.
#[test]
#[ignore = "run as a child process by the tests below"]
fn tcb_reuse_child() {
    if std::env::var("MPKVIRT_DEAD_WAITERS_CHILD").as_deref() != Ok("1") {
        println!("tcb_reuse_child: only meaningful as a child process");
        return;
    }
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc::channel;
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), config()).unwrap();
    println!("metadata mode: {:?}", mgr.metadata_mode());
    let d1 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let d2 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let bases = || {
        let t = mpkvirt_sys::thread::FsGsBase::new().expect("FSGSBASE");
        (t.fs_base(), t.gs_base())
    };
    // SAFETY: the handler only ends its own thread; it runs on the alternate stack mpkvirt
    // gives registered threads.
    unsafe { mpkvirt_sys::signal::install(libc::SIGUSR1, exit_thread, libc::SA_ONSTACK) }.unwrap();
    let view = mgr.enter(&[(&d1, Rights::ReadWrite)]).unwrap();
    let (w_tx, w_rx) = channel();
    let (h_go_tx, h_go_rx) = channel::<()>();
    let (t_tx, t_rx) = channel();
    let (mgr_w, d1_h, d2_w) = (
        &raw const mgr as usize,
        &raw const d1 as usize,
        &raw const d2 as usize,
    );
    let w = std::thread::spawn(move || {
        mpkvirt::thread::without_rights(|| ()).unwrap();
        let w_bases = bases();
        let mgr_h = mgr_w;
        std::thread::spawn(move || {
            h_go_rx.recv().unwrap();
            let t_tx = t_tx.clone();
            std::thread::spawn(move || {
                let b = bases();
                // SAFETY: the manager lives until the main thread got T's answer.
                let m = unsafe { &*(mgr_h as *const Manager<Emulated>) };
                // SAFETY: as above, for `d1`.
                let d = unsafe { &*(d1_h as *const Domain<Emulated>) };
                let r = m.enter(&[(d, Rights::ReadWrite)]).map(drop);
                t_tx.send((b, bases(), r)).unwrap();
            });
            std::thread::park();
        });
        w_tx.send((w_bases, mpkvirt_sys::thread::gettid())).unwrap();
        // SAFETY: the manager outlives W: W dies here, before the main thread goes on.
        let m = unsafe { &*(mgr_w as *const Manager<Emulated>) };
        // SAFETY: as above, for `d2`.
        let d = unsafe { &*(d2_w as *const Domain<Emulated>) };
        let _ = m.enter(&[(d, Rights::ReadWrite)]);
        unreachable!("W is ended by its signal handler while it waits");
    });
    let (w_bases, tid) = w_rx.recv().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while blocked_in(tid) != Some(libc::SYS_futex) {
        assert!(Instant::now() < deadline, "setup: W never waited");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    tgkill(tid, libc::SIGUSR1).unwrap();
    // W never returns to Rust: join it as a pthread (glibc caches its stack and TCB) and
    // forget the Rust handle, whose result W never wrote.
    let pt = w.as_pthread_t();
    std::mem::forget(w);
    // SAFETY: W's pthread, joinable, joined once (its Rust handle is forgotten).
    assert_eq!(unsafe { libc::pthread_join(pt, std::ptr::null_mut()) }, 0);
    drop(view);
    h_go_tx.send(()).unwrap();
    let (t_bases, t_after, r) = t_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("T never answered");
    assert_eq!(
        t_bases, w_bases,
        "setup: glibc gave T W's TCB and T inherited W's record (through H)"
    );
    assert!(
        r.is_ok(),
        "a thread on the TCB of a thread that died inside an op is refused for good: {r:?}"
    );
    assert_ne!(t_after.1, w_bases.1, "T works on a record of its own");
    println!("tcb reuse child: ok");
}

fn run_child(mode: &str) {
    run_named_child("dead_waiter_child", "dead waiter child: ok", mode);
}

fn run_named_child(name: &str, ok: &str, mode: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MPKVIRT_METADATA", mode)
        .env("MPKVIRT_DEAD_WAITERS_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{mode} child:\n{stdout}\n{stderr}");
    assert!(
        out.status.success() && stdout.contains(ok),
        "the {mode} child failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
}

/// Through the gate without PKU (`MPKVIRT_METADATA=gate`): every op is announced
/// (`active_mgr`), as in protected mode.
#[test]
fn a_thread_dead_inside_an_op_blocks_neither_the_queue_nor_dropping_its_manager() {
    run_child("gate");
}

/// The same in protected mode (the waiter sleeps on its library stack with the library key
/// open; its handler runs on the alternate stack).
#[test]
fn pku_dead_waiters_protected_mode() {
    let _pku = require_pku!();
    run_child("protected");
}

/// A SIGUSR2 handler that keeps its thread away for 3 s (a live thread stuck in a handler).
extern "C" fn stay_away(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let t = libc::timespec {
        tv_sec: 3,
        tv_nsec: 0,
    };
    // SAFETY: nanosleep is async-signal-safe; `t` is a valid timespec on this frame and the
    // remainder pointer may be null.
    unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
}

/// A live waiter at the head of the queue that a signal handler keeps away (3 s here) loses
/// its place soon enough for the waiters behind it to be served within their own `pin_wait`
/// (500 ms here): before, it stayed the head for 1 s whatever `pin_wait` was, and they failed
/// with `KeysBusy` with the key free.
#[test]
fn waiters_behind_a_stuck_head_are_served_within_their_pin_wait() {
    let _g = common::real_backend();
    // SAFETY: the handler only sleeps (async-signal-safe); SIGUSR2 is raised only by this
    // test, at its own thread W.
    unsafe { mpkvirt_sys::signal::install(libc::SIGUSR2, stay_away, libc::SA_ONSTACK) }.unwrap();
    let mgr = Manager::with_backend(
        Emulated::new(1).unwrap(),
        Config {
            pin_wait: Duration::from_millis(500),
            ..config()
        },
    )
    .unwrap();
    let d1 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let d2 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let d3 = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    static TID: AtomicI32 = AtomicI32::new(0);
    let held = mgr.enter(&[(&d1, Rights::ReadWrite)]).unwrap();
    std::thread::scope(|s| {
        // W: queues for the one key, then its handler keeps it away.
        let w = s.spawn(|| {
            TID.store(mpkvirt_sys::thread::gettid(), Ordering::SeqCst);
            mgr.enter(&[(&d2, Rights::ReadWrite)]).map(drop)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while TID.load(Ordering::SeqCst) == 0
            || blocked_in(TID.load(Ordering::SeqCst)) != Some(libc::SYS_futex)
        {
            assert!(Instant::now() < deadline, "setup: W never waited");
            std::thread::sleep(Duration::from_millis(5));
        }
        tgkill(TID.load(Ordering::SeqCst), libc::SIGUSR2).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // X queues behind W; the key comes free right after.
        let x = s.spawn(|| mgr.enter(&[(&d3, Rights::ReadWrite)]).map(drop));
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        let got = x.join().unwrap();
        assert!(
            got.is_ok(),
            "a waiter behind a head stuck in a signal handler, with the key free: {got:?}"
        );
        // W comes back after its handler and queues again (or times out): either is fine.
        let _ = w.join().unwrap();
    });
}

/// A thread on the TCB of a thread that died inside an op, in each metadata mode natively
/// (cooperative: the direct path; gate: the call gate without PKU).
#[test]
fn a_thread_on_the_tcb_of_one_dead_inside_an_op_gets_a_record_of_its_own() {
    for mode in ["cooperative", "gate"] {
        run_named_child("tcb_reuse_child", "tcb reuse child: ok", mode);
    }
}

/// The same in protected mode.
#[test]
fn pku_tcb_reuse_after_a_death_inside_an_op() {
    let _pku = require_pku!();
    run_named_child("tcb_reuse_child", "tcb reuse child: ok", "protected");
}

/// Waits until thread `tid` sleeps in a futex wait (and a little longer).
fn wait_in_futex(tid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while blocked_in(tid) != Some(libc::SYS_futex) {
        assert!(
            Instant::now() < deadline,
            "setup: thread {tid} never waited"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
}

/// Two dead waiters in a row (found by review). `prune_waiters` judges only the head, and the
/// threads that look at the queue are the head and the waiter behind it (every `SYNC_POLL`),
/// and arrivals; waiters further back sleep on their own word. When the head and the waiter
/// behind it were both dead, nobody pruned the head: the live waiters behind them slept until
/// `pin_wait` ran out and failed with `KeysBusy` although every key was free. Now a waiter far
/// back that sees the queue make no progress for as long as a head may stay quiet prunes.
#[test]
fn two_dead_waiters_in_a_row_do_not_block_the_queue() {
    let _g = common::real_backend();
    let pin_wait = Duration::from_secs(4);
    let mgr = Manager::with_backend(
        Emulated::new(1).unwrap(),
        Config {
            max_keys: 1,
            pin_wait,
            ..common::config(1)
        },
    )
    .unwrap();
    let doms: Vec<_> = (0..4)
        .map(|_| Arc::new(mgr.create_domain(DomainOptions::reserve(4096)).unwrap()))
        .collect();
    // SAFETY: the handler only ends its own thread; it runs on the alternate stack mpkvirt
    // gives registered threads.
    unsafe { mpkvirt_sys::signal::install(libc::SIGUSR1, exit_thread, libc::SA_ONSTACK) }.unwrap();
    // A holds the only key.
    let hold = mgr.enter(&[(&*doms[0], Rights::ReadWrite)]).unwrap();
    // W1 (head), W2 (behind it) and W3 queue, in that order.
    let mut tids = Vec::new();
    for d in &doms[1..3] {
        let (m, d) = (mgr.clone(), d.clone());
        let tid = Arc::new(AtomicI32::new(0));
        let t = tid.clone();
        std::thread::spawn(move || {
            t.store(mpkvirt_sys::thread::gettid(), Ordering::SeqCst);
            let _ = m.enter(&[(&*d, Rights::ReadWrite)]);
            unreachable!("ended by its handler while it waits");
        });
        while tid.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        wait_in_futex(tid.load(Ordering::SeqCst));
        tids.push(tid.load(Ordering::SeqCst));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let w3_tid = Arc::new(AtomicI32::new(0));
    {
        let (m, d, t) = (mgr.clone(), doms[3].clone(), w3_tid.clone());
        std::thread::spawn(move || {
            t.store(mpkvirt_sys::thread::gettid(), Ordering::SeqCst);
            let t0 = Instant::now();
            let r = m.enter(&[(&*d, Rights::ReadWrite)]).map(drop);
            tx.send((r, t0.elapsed())).unwrap();
        });
    }
    while w3_tid.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    wait_in_futex(w3_tid.load(Ordering::SeqCst));
    // W1 and W2 die while they wait.
    for &tid in &tids {
        tgkill(tid, libc::SIGUSR1).unwrap();
    }
    for &tid in &tids {
        let deadline = Instant::now() + Duration::from_secs(5);
        while tgkill(tid, 0).is_ok() {
            assert!(Instant::now() < deadline, "setup: waiter did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The key is free now.
    drop(hold);
    let (r, waited) = rx.recv_timeout(pin_wait * 2).expect("W3 never returned");
    assert!(
        r.is_ok(),
        "with the only key free and the two waiters ahead dead, W3 got {r:?} after {waited:?} \
         (pin_wait {pin_wait:?})"
    );
}
