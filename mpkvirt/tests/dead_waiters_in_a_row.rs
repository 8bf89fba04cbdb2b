//! The key queue with two dead waiters in a row (found by review).
//!
//! `prune_waiters` judges only the head, and the threads that look at the queue are the
//! head and the waiter at position 1 (every `SYNC_POLL`), and arrivals; waiters further back
//! sleep on their own `turn` word. When the head and the waiter behind it were both dead,
//! nobody pruned the head: the live waiters behind them slept until `pin_wait` ran out and
//! failed with `KeysBusy` although every key was free. Now a waiter far back that sees the
//! queue make no progress for as long as a head may stay quiet takes the lock and prunes.
//!
//! # Safety
//!
//! A SIGUSR1 handler ends its thread with the raw `exit` system call (no unwinding, no
//! destructors): the threads it ends are never joined, and get the handles they use by
//! `Arc` clones that are simply leaked.
#![allow(unsafe_code, reason = "a signal handler ending its thread")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use mpkvirt::{Config, DomainOptions, Emulated, Manager, Rights};
use mpkvirt_sys::thread::tgkill;

extern "C" fn exit_thread(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: ends only the calling thread; nothing runs on it afterwards.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
}

fn blocked_in(tid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

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
