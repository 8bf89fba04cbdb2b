//! The emulated backend at the mapping limit, with a domain of several mappings (found by
//! review; `tests/map_limit.rs` covers one mapping).
//!
//! A grant whose `mprotect` fails at the mapping limit makes the enter fail with
//! `Error::Retag`, and must change nothing. But `mprotect` over several mappings changes them
//! one after the other and stops at the first split it cannot make: the mappings before it
//! keep the new protection. A domain with a file mapped at its start (`Domain::map_fd`) and
//! anonymous pages after it is two mappings; at the limit the enter failed — and the file
//! page stayed open (read-write) with no view granting the domain, to every thread. Now the
//! backend puts the whole range back to its old protection.
//!
//! The scenario runs in a child process (it uses up the process's mappings).
//!
//! # Safety
//!
//! The child makes a memfd and probes pages with `write(2)`/`read(2)` (the kernel reports
//! EFAULT for an inaccessible buffer); `common::map_limit` uses up the mappings.
#![allow(
    unsafe_code,
    reason = "a memfd, and probes of pages through system calls"
)]

mod common;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use common::map_limit::MapFiller;
use mpkvirt::{Config, DomainOptions, Error, Manager, Mode, Rights};

const PAGE: usize = 4096;

/// Whether the kernel can read (`write(2)` from it) and write (`read(2)` into it) the page.
fn probe(addr: usize) -> (bool, bool) {
    let mut fds = [0; 2];
    // SAFETY: a fresh pipe.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: write(2) of one byte at `addr`: the kernel checks the buffer (EFAULT).
    let readable = unsafe { libc::write(fds[1], addr as *const libc::c_void, 1) } == 1;
    // SAFETY: a byte into the pipe so the read below has something to return.
    unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) };
    if readable {
        let mut b = [0u8; 1];
        // SAFETY: drain the byte read from `addr`.
        unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
    }
    // SAFETY: read(2) of one byte into `addr`: the kernel checks the buffer (EFAULT).
    let writable = unsafe { libc::read(fds[0], addr as *mut libc::c_void, 1) } == 1;
    for fd in fds {
        // SAFETY: one end of the pipe made above, closed once.
        unsafe { libc::close(fd) };
    }
    (readable, writable)
}

#[test]
#[ignore = "run by a_failed_grant_leaves_nothing_open in a child process"]
fn map_limit_child() {
    let mgr = Manager::new(Config {
        mode: Mode::Emulated,
        ..Config::default()
    })
    .unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4 * PAGE)).unwrap();
    let _e = mgr.create_domain(DomainOptions::reserve(4 * PAGE)).unwrap();
    // SAFETY: a fresh memfd.
    let fd = unsafe { libc::memfd_create(c"map_limit_files".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a page of file.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), PAGE as i64) }, 0);
    let file_page = {
        let v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
        let p = d.map_fd(fd.as_fd(), 0, PAGE).unwrap().as_ptr() as usize;
        mgr.write_byte(p, 7).unwrap();
        let q = d.alloc_pages(1).unwrap().as_ptr() as usize;
        mgr.write_byte(q, 8).unwrap();
        drop(v);
        p
    };
    println!(
        "domain {:#x}+{:#x}, file page {file_page:#x}",
        d.base().as_ptr() as usize,
        d.len()
    );
    assert_eq!(
        probe(file_page),
        (false, false),
        "setup: the page is closed outside a view"
    );
    let filler = MapFiller::new();
    let r = mgr.enter(&[(&d, Rights::ReadWrite)]);
    let failed = matches!(r, Err(Error::Retag { .. }));
    let outcome = format!("{:?}", r.as_ref().map(|_| ()));
    drop(r);
    let open = probe(file_page);
    drop(filler);
    println!(
        "enter at the limit: {outcome}; failed: {failed}; file page (readable, writable) with no view: {open:?}"
    );
}

#[test]
fn a_failed_grant_leaves_nothing_open() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "map_limit_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("enter at the limit"))
        .unwrap_or_else(|| {
            panic!(
                "child: {:?}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        line.contains("failed: true"),
        "setup: the enter must fail at the limit: {line}"
    );
    assert!(
        line.ends_with("(false, false)"),
        "a failed enter (Error::Retag, 'changes nothing') left the domain's page open to \
         every thread: {line}\n{stdout}"
    );
}
