//! Invariant 6: every path that replaces a domain's pages (reset, file mappings) applies the
//! domain's key again: mmap resets a range's key to 0, and discarding parks it.

mod common;

use common::config;

use std::io::Write;
use std::os::fd::AsFd;

use mpkvirt::{
    Backend, BackendKind, DomainOptions, Emulated, Error, Hardware, Manager, Rights, SegvCode,
};
use mpkvirt_sys::mman::smaps_protection_key;
use mpkvirt_sys::require_pku;

/// After the remap the domain is reachable inside its view, not outside, and (on hardware)
/// its pages carry its key again.
fn check_keyed<B: Backend>(mgr: &Manager<B>, d: &mpkvirt::Domain<B>, addr: usize, expect: u8) {
    let v = mgr
        .with_view(&[(d, Rights::ReadWrite)], || mgr.read_byte(addr))
        .unwrap();
    assert_eq!(
        v.unwrap(),
        expect,
        "readable inside the view after the remap"
    );
    let outside = mgr.read_byte(addr).unwrap_err();
    let Error::Fault(r) = outside else {
        panic!("{outside:?}")
    };
    assert_eq!(r.domain, Some(d.id()));
    if mgr.backend_kind() == BackendKind::Hardware {
        let key = d.key().expect("still resident");
        assert_eq!(
            r.code,
            SegvCode::PkuErr,
            "denied by the key, not by a reset protection"
        );
        assert_eq!(smaps_protection_key(addr).unwrap(), Some(key));
    }
}

fn reset_reapplies_the_key<B: Backend>(mgr: &Manager<B>) {
    let d = mgr.create_domain(DomainOptions::reserve(4 * 4096)).unwrap();
    let addr = d.alloc(64, 8).unwrap().as_ptr() as usize;
    mgr.with_view(&[(&d, Rights::ReadWrite)], || mgr.write_byte(addr, 42))
        .unwrap()
        .unwrap();
    d.reset().unwrap();
    assert_eq!(d.in_use(), 0, "the heap is empty after a reset");
    check_keyed(mgr, &d, addr, 0);
}

fn map_fd_reapplies_the_key<B: Backend>(mgr: &Manager<B>) {
    let mut file = tempfile();
    file.write_all(b"image bytes").unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(8 * 4096)).unwrap();
    drop(mgr.enter(&[(&d, Rights::ReadOnly)]).unwrap()); // resident before the mapping
    let p = d.map_fd(file.as_fd(), 0, 4096).unwrap().as_ptr() as usize;
    check_keyed(mgr, &d, p, b'i');
    let v = mgr
        .with_view(&[(&d, Rights::ReadOnly)], || mgr.read_byte(p + 6))
        .unwrap()
        .unwrap();
    assert_eq!(v, b'b');
}

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "mpkvirt-remap-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

#[test]
fn simulated_reset_reapplies_the_key() {
    reset_reapplies_the_key(&Manager::simulated(2, config(2)).unwrap());
}

#[test]
fn emulated_reset_and_file_mappings_reapply_the_key() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    reset_reapplies_the_key(&mgr);
    map_fd_reapplies_the_key(&mgr);
}

#[test]
fn pku_reset_and_file_mappings_reapply_the_key() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
    reset_reapplies_the_key(&mgr);
    map_fd_reapplies_the_key(&mgr);
}

/// libmpk's "protection-key use-after-free": after a domain is destroyed, the next domain
/// bound to the same key must not expose the old domain's pages. With one key, the new
/// domain necessarily gets the old one's key.
fn destroyed_pages_stay_closed<B: Backend>(mgr: &Manager<B>) {
    // Same size: the new domain reuses the old range. Bigger, with a spacer after the old
    // range: it cannot, and the old range stays a hole.
    for new_len in [4096, 3 * 4096] {
        destroyed_pages_stay_closed_once(mgr, new_len);
    }
}

fn destroyed_pages_stay_closed_once<B: Backend>(mgr: &Manager<B>, new_len: usize) {
    let old = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let _spacer = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let old_addr = old.base().as_ptr() as usize;
    let old_key = mgr.with_view(&[(&old, Rights::ReadWrite)], || {
        mgr.write_byte(old_addr, 0x5a).unwrap();
        old.key()
    });
    drop(old);
    let new = mgr.create_domain(DomainOptions::reserve(new_len)).unwrap();
    let new_addr = new.base().as_ptr() as usize;
    assert_eq!(
        new_addr == old_addr,
        new_len == 4096,
        "the case this run is meant to test"
    );
    let _view = mgr.enter(&[(&new, Rights::ReadWrite)]).unwrap();
    assert_eq!(
        new.key(),
        old_key.unwrap(),
        "one key: the new domain holds the old one's key"
    );
    match mgr.read_byte(old_addr) {
        // The old range may be reused by the new domain itself (then it is fresh memory).
        Ok(v) => assert!(
            new_addr == old_addr && v == 0,
            "old contents visible: {v:#x}"
        ),
        Err(Error::Fault(r)) => assert_eq!(r.domain, None, "the old range belongs to no domain"),
        Err(e) => assert!(matches!(e, Error::NotAllocated { .. }), "{e:?}"),
    }
    if mgr.backend_kind() == BackendKind::Hardware && new_addr != old_addr {
        assert_eq!(
            smaps_protection_key(old_addr).unwrap(),
            Some(mpkvirt::Pkey::DEFAULT),
            "old pages keep no key"
        );
    }
}

#[test]
fn simulated_destroyed_pages_stay_closed() {
    destroyed_pages_stay_closed(&Manager::simulated(1, config(1)).unwrap());
}

#[test]
fn emulated_destroyed_pages_stay_closed() {
    let _g = common::real_backend();
    destroyed_pages_stay_closed(
        &Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap(),
    );
}

#[test]
fn pku_destroyed_pages_stay_closed() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    destroyed_pages_stay_closed(
        &Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap(),
    );
}

/// Mapping a file into a resident domain while a view is open must not leave the rest of
/// the domain open once the view ends (the emulated backend once recorded only the file's
/// run as the key's range).
fn map_fd_keeps_the_rest_closed<B: Backend>(mgr: &Manager<B>) {
    let mut file = tempfile();
    file.write_all(b"x").unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(8 * 4096)).unwrap();
    let heap = d.alloc(64, 8).unwrap().as_ptr() as usize;
    {
        let _v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(heap, 3).unwrap();
        let mapped = d.map_fd(file.as_fd(), 0, 4096).unwrap().as_ptr() as usize;
        assert_eq!(mgr.read_byte(mapped).unwrap(), b'x');
        assert_eq!(
            mgr.read_byte(heap).unwrap(),
            3,
            "the rest of the domain stays reachable in the view"
        );
    }
    assert!(
        matches!(mgr.read_byte(heap), Err(Error::Fault(_))),
        "closed again after the view"
    );
}

#[test]
fn emulated_map_fd_keeps_the_rest_closed() {
    let _g = common::real_backend();
    map_fd_keeps_the_rest_closed(
        &Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap(),
    );
}

#[test]
fn pku_map_fd_keeps_the_rest_closed() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    map_fd_keeps_the_rest_closed(
        &Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap(),
    );
}
