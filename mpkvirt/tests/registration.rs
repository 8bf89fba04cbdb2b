//! A signal whose handler calls the library, arriving while the thread registers (its first
//! library call; `gate.rs`, `register`, and the call gate's register path).
//!
//! The attack (or accident): registration holds a process-wide lock — the call gate's boot
//! lock, or the records mutex in cooperative mode — and sets the thread's GS base last. A
//! handler that calls the library in that window finds no record yet and registers again:
//! it waits for the lock its own interrupted frame holds, and the thread hangs for good,
//! and with it every later registration and every process-wide sync. mpkvirt's own sync
//! signal is such a signal: a revocation (here `sync_process_wide`) signals every thread
//! without a record, including one registering right now.
//!
//! The defence: a thread's first call registers it with its signals blocked (all but the
//! synchronous fault signals); what arrived meanwhile is delivered once it is registered,
//! and the sync handler's call then works.
//!
//! The test spawns fresh threads whose first library call registers them while another
//! thread syncs back to back, and fails when one of them does not return. Natively it
//! tests the cooperative path (the records mutex); on PKU machines, the call gate's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn registrations_survive_the_sync_signal() {
    // Some library use first, so the process is initialised.
    mpkvirt::thread::without_rights(|| ()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The initiator: process-wide syncs back to back (what every revocation does).
    let syncer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = mpkvirt::thread::sync_process_wide();
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut spawned = 0u32;
    let mut hung = None;
    while Instant::now() < deadline && spawned < 20_000 {
        let (tx, rx) = mpsc::channel();
        // A fresh thread whose first library call registers it.
        std::thread::spawn(move || {
            let r = mpkvirt::thread::without_rights(|| ());
            let _ = tx.send(r.is_ok());
        });
        spawned += 1;
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(ok) => assert!(ok, "thread #{spawned}: its first library call failed"),
            Err(_) => {
                hung = Some(spawned);
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    // (After a hang the syncer may be stuck on the lock too: it is not joined then.)
    assert!(
        hung.is_none(),
        "thread #{} never returned from its first library call: a signal interrupted its \
         registration and the handler's own registration waits for the lock the interrupted \
         frame holds",
        hung.unwrap_or(0)
    );
    syncer.join().unwrap();
    eprintln!("{spawned} threads registered while the sync signal flew");
}

#[test]
fn registration_survives_the_sync_signal() {
    registrations_survive_the_sync_signal();
}

/// In the PKU guest: the call gate's register path (the boot lock), in protected mode.
#[test]
fn pku_registration_survives_the_sync_signal() {
    let _pku = mpkvirt_sys::require_pku!();
    registrations_survive_the_sync_signal();
}
