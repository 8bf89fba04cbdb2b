//! Threads created inside a view (`mpkvirt::thread`): the kernel copies the creator's PKRU
//! into a new thread, which holds no pins. Once the view ends and its key is bound to
//! another domain, a thread created with plain `std::thread::spawn` inside the view reads
//! the new owner's pages; one created with `mpkvirt::thread::spawn` does not.
//!
//! The spawned threads never call mpkvirt: any call would compute their rights again and
//! hide the inherited PKRU. They read through a raw volatile load in a child process forked
//! with the raw system call (no atfork handlers), which inherits exactly the forking
//! thread's PKRU; a child that cannot read dies of SIGSEGV.
//!
//! # Safety
//!
//! Domain memory is read through raw pointers only (no Rust reference points there), in
//! forked children that run nothing but that load and `_exit`.
#![allow(unsafe_code, reason = "raw reads of domain memory in forked children")]

mod common;

use common::config;

use std::sync::mpsc;

use mpkvirt::{DomainOptions, Error, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

const SECRET: u8 = 0x5e;

/// Reads the byte at `addr` with the calling thread's PKRU, in a child forked with the raw
/// `fork` system call: `Some(byte)` when the read worked, `None` when the child died of
/// SIGSEGV. Makes no mpkvirt call.
fn read_in_child(addr: usize) -> Option<u8> {
    // SAFETY: the raw system call runs no atfork handler; the child below only restores the
    // default SIGSEGV action, loads one byte and exits, all async-signal-safe.
    let pid = unsafe { libc::syscall(libc::SYS_fork) };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // A fault kills the child outright (mpkvirt's handler, inherited, stays out of it).
        // SAFETY: SIG_DFL for SIGSEGV, in the single-threaded child.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        // SAFETY: `addr` is domain memory, never referenced by Rust code; a fault ends the
        // child.
        let v = unsafe { (addr as *const u8).read_volatile() };
        // SAFETY: ends the child at once, without running the parent's exit handlers.
        unsafe { libc::_exit(i32::from(v)) };
    }
    let pid = pid as libc::pid_t;
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a local the kernel writes.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status) as u8)
    } else {
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
            "the reading child ended with status {status:#x}"
        );
        None
    }
}

/// A thread that waits for an address, reads it with [`read_in_child`] and reports.
fn reader() -> (
    mpsc::Sender<usize>,
    mpsc::Receiver<Option<u8>>,
    impl FnOnce() + Send + 'static,
) {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (res_tx, res_rx) = mpsc::channel();
    let body = move || {
        let addr = addr_rx.recv().unwrap();
        res_tx.send(read_in_child(addr)).unwrap();
    };
    (addr_tx, res_rx, body)
}

#[test]
fn pku_a_thread_spawned_inside_a_view_reads_the_keys_next_owner_unless_made_by_thread_spawn() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    // One key: entering B evicts A and hands B A's key.
    let mgr = Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap();
    let a = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let b = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let b_addr = b.base().as_ptr() as usize;

    let (to_wrapped, from_wrapped, wrapped_body) = reader();
    let (to_plain, from_plain, plain_body) = reader();
    let view = mgr.enter(&[(&a, Rights::ReadWrite)]).unwrap();
    let key = a.key().expect("A is bound inside its view");
    let wrapped = mpkvirt::thread::spawn(wrapped_body).unwrap();
    let plain = std::thread::spawn(plain_body);
    drop(view);

    // A's key goes to B, which gets a secret.
    mgr.with_view(&[(&b, Rights::ReadWrite)], || {
        // SAFETY: inside a view granting B; no Rust reference points at domain memory.
        unsafe { (b_addr as *mut u8).write_volatile(SECRET) };
        // The probe reads what the forking thread's rights allow.
        assert_eq!(read_in_child(b_addr), Some(SECRET));
    })
    .unwrap();
    assert_eq!(b.key(), Some(key), "B holds A's old key");
    assert!(!a.is_resident());
    assert_eq!(read_in_child(b_addr), None, "outside views B is closed");
    assert!(matches!(mgr.read_byte(b_addr), Err(Error::Fault(_))));

    to_wrapped.send(b_addr).unwrap();
    assert_eq!(
        from_wrapped.recv().unwrap(),
        None,
        "a thread made by mpkvirt::thread::spawn inside A's view reads B, the key's next owner"
    );
    to_plain.send(b_addr).unwrap();
    assert_eq!(
        from_plain.recv().unwrap(),
        Some(SECRET),
        "a thread made by std::thread::spawn inside A's view should keep the view's PKRU \
         (the hazard mpkvirt::thread::spawn exists for): it could not read B"
    );
    wrapped.join().unwrap();
    plain.join().unwrap();
}

/// `without_rights(f)` ends its rightless window even when `f` unwinds: a panic while
/// creating threads, caught further up, must not leave the thread in the window, where every
/// op computes its PKRU without its views (views entered afterwards would grant nothing).
#[test]
fn pku_a_panic_inside_without_rights_leaves_later_views_their_rights() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let addr = d.base().as_ptr() as usize;
    let caught = std::panic::catch_unwind(|| {
        mpkvirt::thread::without_rights(|| panic!("thread creation failed")).unwrap()
    });
    assert!(caught.is_err(), "the panic propagates");
    let v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
    let w = mgr.write_byte(addr, 1);
    drop(v);
    assert!(
        w.is_ok(),
        "a view entered after a panic in without_rights grants nothing: {w:?}"
    );
}
