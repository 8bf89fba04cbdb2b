//! Guarded-call stacks: no word of application memory decides where they are (found by
//! review).
//!
//! **Attack** (attacker class 1: stray writes into the program's .bss, no code execution).
//! The guarded-stack cache used to hold stack bases in a static; a forged base made a
//! faulting guarded call's cleanup `madvise(MADV_DONTNEED)` whatever range it named —
//! `MADV_DONTNEED` ignores protections and keys, so the library emptied a domain the thread
//! had no rights to (in the PKU guest too).
//!
//! **Defence.** Cached stacks are slots of a region mpkvirt reserves when it starts, found
//! from the region's base in the root (library memory). What stays in application memory is
//! two bitmaps (slots in use, slots made usable); forging them can only make calls share a
//! slot, map stacks of their own, or run on a slot not yet usable — which faults on the stack
//! itself and is reported as an overflow, after which the slot is prepared again.
//!
//! The test forges both bitmaps and repeats the old attack (a guarded call in a view of its
//! own domain reads a victim domain next to it): the victim's bytes must survive, the call
//! must report a fault, and guarded calls must work afterwards.
//!
//! # Safety
//!
//! The stray writes themselves (into mpkvirt's own statics, found through the ELF symbol
//! table), and raw accesses to domain memory (no Rust reference points there).
#![allow(
    unsafe_code,
    reason = "the simulated memory-safety bug, domain memory accesses"
)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::{config, mpkvirt_static};
use mpkvirt::{Backend, DomainOptions, Emulated, Error, FaultKind, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

fn forge(part: &str, value: u64) {
    // SAFETY: the simulated memory-safety bug: a word of mpkvirt's own static.
    unsafe { &*(mpkvirt_static(part) as *const AtomicU64) }.store(value, Ordering::SeqCst);
}

fn forged_bitmaps_empty_nothing<B: Backend>(mgr: Manager<B>) {
    let d = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let e = mgr.create_domain(DomainOptions::reserve(2 << 20)).unwrap();
    let db = d.base().as_ptr() as usize;
    mgr.with_view(&[(&d, Rights::ReadWrite)], || {
        for i in 0..(64 << 10) {
            // SAFETY: D's memory, inside a view granting it.
            unsafe { ((db + i) as *mut u8).write_volatile(0xAA) };
        }
    })
    .unwrap();
    let attack = || {
        let read_d = || {
            // SAFETY: a read of domain memory the view does not grant: it faults, and the
            // guarded call reports it.
            std::hint::black_box(unsafe { (db as *const u8).read_volatile() })
        };
        mgr.with_view(&[(&e, Rights::ReadWrite)], || {
            // SAFETY: the closure starts no thread.
            unsafe { mgr.guarded(read_d) }
        })
        .unwrap()
    };
    // Every slot but the last in use, and every slot "usable": the call takes the last
    // slot, which nothing made usable.
    forge("POOL_BUSY", !(1 << 63));
    forge("POOL_READY", u64::MAX);
    let first = attack();
    assert!(
        matches!(first, Err(Error::Fault(ref f)) if f.kind == FaultKind::StackOverflow),
        "a call on a slot not made usable: {first:?}"
    );
    // Every slot free and none marked usable (each is prepared on use): the old attack.
    forge("POOL_BUSY", 0);
    forge("POOL_READY", 0);
    let second = attack();
    assert!(
        matches!(second, Err(Error::Fault(ref f)) if f.kind == FaultKind::Violation),
        "the attacker's read of D: {second:?}"
    );
    let mut changed = 0;
    mgr.with_view(&[(&d, Rights::ReadWrite)], || {
        for i in 0..(64 << 10) {
            // SAFETY: D's memory, inside a view granting it.
            if unsafe { ((db + i) as *const u8).read_volatile() } != 0xAA {
                changed += 1;
            }
        }
    })
    .unwrap();
    assert_eq!(changed, 0, "{changed} bytes of domain D changed");
    // Guarded calls still work (slots are prepared again when needed).
    for _ in 0..70 {
        // SAFETY: the closure starts no thread.
        assert_eq!(unsafe { mgr.guarded(|| 7) }.unwrap(), 7);
    }
}

#[test]
fn forged_pool_bitmaps_empty_nothing_emulated() {
    let _g = common::real_backend();
    forged_bitmaps_empty_nothing(
        Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap(),
    );
}

#[test]
fn pku_forged_pool_bitmaps_empty_nothing() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    forged_bitmaps_empty_nothing(
        Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap(),
    );
}
