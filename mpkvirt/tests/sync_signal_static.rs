//! The sync signal's number: library code must not take it from application memory.
//!
//! **Attack** (attacker class 1: one stray 4-byte write into the program's .bss). A
//! revocation of process-wide rights sends every thread the sync signal (`manager::global::
//! broadcast`, inside an op). Its number used to come from a `OnceLock` static of the
//! program (`sync::signal_number`): one write of 9 there, and the next revocation sent
//! `SIGKILL` to every thread of the process (a tenant killing its host).
//!
//! **Defence.** The number is kept in the root (library memory, `meta::Root::sync_sig`),
//! written when the handler is installed at initialisation; ops read only that. The test
//! makes the stray write, then syncs every thread as a revocation does while another thread
//! runs, in a child process: the child must survive and the sync succeed.
//!
//! # Safety
//!
//! The stray write itself (into mpkvirt's own static, found through the ELF symbol table).
#![allow(unsafe_code, reason = "the simulated memory-safety bug")]

mod common;

use std::process::Command;
use std::sync::mpsc;

use common::mpkvirt_static;

#[test]
#[ignore = "run by a_stray_write_does_not_choose_the_sync_signal in a child process"]
fn sync_signal_child() {
    // The library initialised, the signal number chosen (and used once).
    mpkvirt::thread::sync_process_wide().unwrap();
    // The stray write: the word of the static (a `OnceLock<i32>`: its state and its value)
    // that holds the number gets 9.
    let at = mpkvirt_static("13signal_number3SIG");
    let sig = libc::SIGRTMIN() + 7;
    let words = at as *mut i32;
    let mut hit = false;
    for i in 0..2 {
        // SAFETY: the memory-safety bug being simulated: a stray write into the program's
        // .bss, inside mpkvirt's 8-byte static.
        let w = unsafe { words.add(i) };
        // SAFETY: as above (a read of the same word first).
        if unsafe { w.read_volatile() } == sig {
            // SAFETY: as above.
            unsafe { w.write_volatile(libc::SIGKILL) };
            hit = true;
        }
    }
    assert!(hit, "setup: the static holds the sync signal's number");
    // Another thread that the revocation must reach.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        ready_tx.send(()).unwrap();
        let _ = stop_rx.recv();
    });
    ready_rx.recv().unwrap();
    // What every revocation of process-wide rights does: signal every thread.
    mpkvirt::thread::sync_process_wide().unwrap();
    stop_tx.send(()).unwrap();
    other.join().unwrap();
    println!("revoked and survived");
}

#[test]
fn a_stray_write_does_not_choose_the_sync_signal() {
    stray_write_in_a_child();
}

/// In the PKU guest (protected metadata: the sync itself runs inside the library).
#[test]
fn pku_a_stray_write_does_not_choose_the_sync_signal() {
    let _pku = mpkvirt_sys::require_pku!();
    stray_write_in_a_child();
}

fn stray_write_in_a_child() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "sync_signal_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("revoked and survived"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
