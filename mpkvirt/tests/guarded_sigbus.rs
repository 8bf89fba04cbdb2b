//! A guarded call that touches a file mapping of a domain past the file's end (a `map_fd`
//! longer than the file, or a file truncated afterwards by anyone holding it) gets SIGBUS,
//! not SIGSEGV (found by review). `Manager::guarded` promises a report instead of the
//! process's death for faults on domain memory; with a handler for SIGSEGV only, the process
//! died. Now the fault handler takes SIGBUS too, and reports `FaultKind::BusError`. A binary
//! of its own: before the fix the process was killed.
//!
//! # Safety
//!
//! Raw reads of domain memory (no Rust reference points there); `Manager::guarded` with a
//! closure that starts no thread.
#![allow(unsafe_code, reason = "domain memory accesses, guarded calls")]

mod common;

use std::io::Write;
use std::os::fd::AsFd;

use common::config;
use mpkvirt::{Backend, DomainOptions, Emulated, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

fn past_eof<B: Backend>(mgr: Manager<B>) {
    let page = mpkvirt_sys::mman::page_size();
    let path = std::env::temp_dir().join(format!("mpkvirt_guarded_sigbus_{}", std::process::id()));
    let mut f = std::fs::File::create_new(&path).unwrap();
    f.write_all(&vec![7u8; page]).unwrap();
    drop(f);
    let f = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(1 << 20)).unwrap();
    // Two pages of a one-page file: the kernel accepts it.
    let p = d.map_fd(f.as_fd(), 0, 2 * page).unwrap().as_ptr() as usize;
    let read = || {
        // SAFETY: domain memory inside a view that grants it; the second page lies past the
        // file's end.
        std::hint::black_box(unsafe { ((p + page) as *const u8).read_volatile() })
    };
    let r = mgr.with_view(&[(&d, Rights::ReadWrite)], || {
        // SAFETY: the closure starts no thread.
        unsafe { mgr.guarded(read) }
    });
    eprintln!("guarded read past the file's end: {r:?}");
    assert!(
        matches!(r, Ok(Err(mpkvirt::Error::Fault(ref f))) if f.kind == mpkvirt::FaultKind::BusError),
        "expected a bus-error report, got {r:?}"
    );
}

#[test]
fn a_guarded_read_past_a_files_end_is_reported_emulated() {
    let _g = common::real_backend();
    past_eof(Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap());
}

#[test]
fn pku_a_guarded_read_past_a_files_end_is_reported() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    past_eof(Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap());
}
