//! The arena map: library code must never write through a pointer kept in application
//! memory.
//!
//! **Attack** (attacker class 1: one stray 8-byte write, no code execution). The arena map
//! (`backend/arena.rs`: one bit per 2 MiB granule, "is this domain memory?") used to be found
//! through `static ARENA_MAP: AtomicPtr<AtomicU64>` in the program's .bss, and
//! `arena_map_mark` — run inside ops with every key open (a new arena when a domain is
//! created, every arena when a manager is dropped) — did its `fetch_or`/`fetch_and` at
//! `ARENA_MAP + granule / 64`. Redirecting the static made those read-modify-writes land in
//! library memory: dropping an ordinary manager cleared the caller's own saved view
//! (`Entry::bits`), which the next resync installed — every key of the manager read-write.
//!
//! **Defence.** Library code reads and writes its own map, in the metadata region, through a
//! pointer in the root (library memory). The static now only tells the fault handler (which
//! cannot read library memory) where its copy is; library code writes that copy through the
//! root's pointer too. The tests make the same stray write and check that no library word
//! changed (natively, any mode) and that the thread gained no rights (PKU guest).
//!
//! # Safety
//!
//! The stray write itself (into mpkvirt's own static, found through the ELF symbol table),
//! and mpkvirt's probe.
#![allow(unsafe_code, reason = "the simulated memory-safety bug, probes")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{config, mpkvirt_static};
use mpkvirt::{Backend, Config, DomainOptions, Emulated, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

/// The run-time address of mpkvirt's `ARENA_MAP` static (what a stray pointer would hit).
fn arena_map_static() -> usize {
    mpkvirt_static("5arena9ARENA_MAP")
}

fn probe(addr: usize) -> Option<u8> {
    // SAFETY: domain memory; mpkvirt's SIGSEGV handler recovers the probe.
    let v = unsafe { mpkvirt_asm::mpkvirt_probe_read8(addr as *const u8) };
    (v != u64::MAX).then_some(v as u8)
}

/// The attack: with the calling thread inside a view of `m1` (its saved view's word at
/// `word`), one stray write redirects the arena map static so that the `fetch_and`s of
/// dropping an ordinary manager (one arena of 128 granules) would clear that word; the
/// manager is dropped and the static put back.
fn stray_write_then_drop_a_manager(word: usize) {
    let static_addr = arena_map_static();
    let m2 = Manager::with_backend(
        Emulated::new(1).unwrap(),
        Config {
            arena_chunk: 256 << 20,
            ..config(1)
        },
    )
    .unwrap();
    let d = m2.create_domain(DomainOptions::reserve(4096)).unwrap();
    let g0 = d.base().as_ptr() as usize >> 21;
    drop(d);
    // The first map word every bit of which the arena covers.
    let full = g0.div_ceil(64);
    // SAFETY: the memory-safety bug being simulated: one stray 8-byte write into the
    // program's .bss (mpkvirt's static holds a plain pointer).
    let saved = unsafe { (static_addr as *mut usize).read_volatile() };
    // SAFETY: as above.
    unsafe { (static_addr as *mut usize).write_volatile(word - 8 * full) };
    // The program drops the manager (an op: `release` -> `unmap_all` ->
    // `arena_map_mark(.., false)` with every key open).
    drop(m2);
    // SAFETY: as above (put back, so that the rest of the process is unaffected).
    unsafe { (static_addr as *mut usize).write_volatile(saved) };
}

/// The 8-byte word holding the calling thread's saved view of `m` (library memory, readable).
fn saved_view_word<B: Backend>(m: &Manager<B>) -> usize {
    mpkvirt::testing::view_bits_word(m, 0).unwrap() & !7
}

fn read_word(addr: usize) -> u64 {
    // SAFETY: a word of library memory, which application code may read (read-only under
    // the library key with protection, ordinary memory otherwise); the library changes it
    // only inside the calling thread's own ops, none of which runs now.
    unsafe { (addr as *const u64).read_volatile() }
}

/// Any machine, any metadata mode (natively: cooperative, library memory is ordinary
/// memory, so a redirected write would land): no word of library memory changes.
#[test]
fn arena_map_a_stray_write_to_its_static_changes_no_library_word() {
    let _g = common::real_backend();
    let m1 = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    let own = m1.create_domain(DomainOptions::reserve(4096)).unwrap();
    let view = m1.enter(&[(&own, Rights::ReadWrite)]).unwrap();
    let word = saved_view_word(&m1);
    let before = read_word(word);
    assert_ne!(before, 0, "setup: the saved view denies some key");
    stray_write_then_drop_a_manager(word);
    let after = read_word(word);
    drop(view);
    assert_eq!(
        after, before,
        "a stray write into application memory redirected the library's arena map writes \
         into its own memory: the thread's saved view changed"
    );
}

/// PKU guest: the thread gains no right (a cleared saved view would open every key).
#[test]
fn pku_arena_map_a_stray_write_to_its_static_opens_no_key() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let m1 = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
    let victim = m1.create_domain(DomainOptions::reserve(4096)).unwrap();
    let secret = victim.base().as_ptr() as usize;
    {
        let _v = m1.enter(&[(&victim, Rights::ReadWrite)]).unwrap();
        m1.write_byte(secret, 0x5a).unwrap();
    }
    static OUT: AtomicUsize = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            // The program's thread: a view of its own domain, none of the victim.
            let own = m1.create_domain(DomainOptions::reserve(4096)).unwrap();
            let view = m1.enter(&[(&own, Rights::ReadWrite)]).unwrap();
            assert_eq!(probe(secret), None, "setup: no access to the victim");
            stray_write_then_drop_a_manager(saved_view_word(&m1));
            // Any resync installs the saved view.
            mpkvirt::thread::without_rights(|| ()).unwrap();
            OUT.store(
                probe(secret).map_or(0, |v| 0x100 | usize::from(v)),
                Ordering::SeqCst,
            );
            std::mem::forget(view);
        });
    });
    let got = OUT.load(Ordering::SeqCst);
    assert_eq!(
        got,
        0,
        "a stray write into application memory made the library clear the thread's saved \
         view: it read the victim's byte {:#x}",
        got & 0xff
    );
}
