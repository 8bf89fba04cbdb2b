//! Invariant 6: every path that maps over a domain's range (reset, file mappings) applies
//! the domain's key again, because mmap resets a range's key to 0.

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
    reset_reapplies_the_key(&Manager::simulated(2, config(2)));
}

#[test]
fn emulated_reset_and_file_mappings_reapply_the_key() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2));
    reset_reapplies_the_key(&mgr);
    map_fd_reapplies_the_key(&mgr);
}

#[test]
fn pku_reset_and_file_mappings_reapply_the_key() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2));
    reset_reapplies_the_key(&mgr);
    map_fd_reapplies_the_key(&mgr);
}
