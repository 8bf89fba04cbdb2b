//! Every size a caller can pass, over the whole `usize` range (issue 8, item 12):
//! `DomainOptions::reserve`, `Domain::alloc` (size and alignment), `Domain::alloc_pages` and
//! `Domain::map_fd`. Never a panic, never a domain of length 0, never an allocation outside
//! its domain (or misaligned), only the documented errors — and afterwards the manager and
//! its other domains work as before.

mod common;

use std::io::Write;
use std::os::fd::AsFd;

use common::config;
use mpkvirt::{
    Backend, Domain, DomainOptions, Emulated, Error, Hardware, Manager, Rights, Simulated,
};
use mpkvirt_sys::require_pku;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const PAGE: usize = 4096;
/// Pages of the domain allocations are made in.
const HEAP_PAGES: usize = 16;

/// Sizes from the whole `usize` range, weighted towards the edges where arithmetic wraps.
fn size() -> impl Strategy<Value = usize> {
    let edges = [
        0,
        1,
        PAGE - 1,
        PAGE,
        PAGE + 1,
        HEAP_PAGES * PAGE - 1,
        HEAP_PAGES * PAGE,
        HEAP_PAGES * PAGE + 1,
        u32::MAX as usize,
        u32::MAX as usize + 1,
        1 << 46,
        (1 << 46) + 1,
        1 << 47,
        isize::MAX as usize - PAGE + 1,
        isize::MAX as usize,
        isize::MAX as usize + 1,
        usize::MAX - 2 * PAGE,
        usize::MAX - PAGE,
        usize::MAX - (PAGE - 2),
        usize::MAX - 1,
        usize::MAX,
    ];
    prop_oneof![
        3 => proptest::sample::select(edges.to_vec()),
        2 => 0usize..4 * HEAP_PAGES * PAGE,
        2 => (0u32..64, -2 * PAGE as i64..2 * PAGE as i64)
            .prop_map(|(s, d)| (1usize << s).wrapping_add_signed(d as isize)),
        1 => any::<usize>(),
    ]
}

/// Alignments: powers of two up to 2^63 and everything that is not one.
fn align() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => (0u32..64).prop_map(|s| 1usize << s),
        1 => proptest::sample::select(vec![0, 3, 6, 12, 4095, 4097, usize::MAX, isize::MAX as usize]),
        1 => any::<usize>(),
    ]
}

fn addr<B: Backend>(d: &Domain<B>) -> usize {
    d.base().as_ptr() as usize
}

/// Whether `[p, p + len)` lies inside `d` (no wrapping).
fn inside<B: Backend>(d: &Domain<B>, p: usize, len: usize) -> bool {
    p >= addr(d) && p.checked_add(len).is_some_and(|e| e <= addr(d) + d.len())
}

/// The manager works: a fresh domain can be created, entered, written and read, and
/// `survivor` (a domain made before the probe) still holds its byte and is found by
/// address.
fn still_works<B: Backend>(
    mgr: &Manager<B>,
    survivor: &Domain<B>,
    stamp: u8,
) -> Result<(), TestCaseError> {
    let fresh = mgr.create_domain(DomainOptions::reserve(PAGE)).unwrap();
    prop_assert!(
        addr(&fresh) + fresh.len() <= addr(survivor)
            || addr(survivor) + survivor.len() <= addr(&fresh),
        "a new domain overlaps a live one"
    );
    for d in [&fresh, survivor] {
        prop_assert_eq!(mgr.domain_at(addr(d)), Some(d.id()));
        prop_assert_eq!(mgr.domain_at(addr(d) + d.len() - 1), Some(d.id()));
    }
    let _v = mgr
        .enter(&[(&fresh, Rights::ReadWrite), (survivor, Rights::ReadWrite)])
        .unwrap();
    mgr.write_byte(addr(&fresh), 9).unwrap();
    prop_assert_eq!(mgr.read_byte(addr(&fresh)).unwrap(), 9);
    prop_assert_eq!(mgr.read_byte(addr(survivor)).unwrap(), stamp);
    Ok(())
}

/// A survivor domain, stamped with a byte at its base.
fn survivor<B: Backend>(mgr: &Manager<B>) -> Domain<B> {
    let d = mgr.create_domain(DomainOptions::reserve(PAGE)).unwrap();
    mgr.with_view(&[(&d, Rights::ReadWrite)], || {
        mgr.write_byte(addr(&d), 0x5a).unwrap()
    })
    .unwrap();
    d
}

fn reserve<B: Backend>(mgr: &Manager<B>, size: usize) -> Result<(), TestCaseError> {
    let s = survivor(mgr);
    match mgr.create_domain(DomainOptions::reserve(size)) {
        Ok(d) => {
            // (`is_empty` is always false: the length itself is checked.)
            prop_assert!(
                d.len() >= PAGE,
                "a domain of {:#x} bytes (less than a page) for {size:#x}",
                d.len()
            );
            prop_assert!(d.len() >= size, "{:#x} bytes for {size:#x}", d.len());
            prop_assert_eq!(d.len() % PAGE, 0);
            prop_assert!(addr(&d).checked_add(d.len()).is_some());
            prop_assert_eq!(mgr.domain_at(addr(&d)), Some(d.id()));
            prop_assert!(
                addr(&d) + d.len() <= addr(&s) || addr(&s) + s.len() <= addr(&d),
                "overlaps another domain"
            );
            // The next domain does not share its range either, and dropping it leaves the
            // others registered.
            let next = mgr.create_domain(DomainOptions::reserve(PAGE)).unwrap();
            prop_assert!(addr(&d) + d.len() <= addr(&next) || addr(&next) + next.len() <= addr(&d));
            drop(d);
            prop_assert_eq!(mgr.domain_at(addr(&next)), Some(next.id()));
        }
        Err(Error::Reserve { .. }) => {}
        Err(e) => prop_assert!(false, "reserve({size:#x}): {e:?}"),
    }
    still_works(mgr, &s, 0x5a)
}

fn alloc<B: Backend>(mgr: &Manager<B>, size: usize, align: usize) -> Result<(), TestCaseError> {
    let s = survivor(mgr);
    let d = mgr
        .create_domain(DomainOptions::reserve(HEAP_PAGES * PAGE))
        .unwrap();
    match d.alloc(size, align) {
        Ok(p) => {
            let p = p.as_ptr() as usize;
            prop_assert!(align.is_power_of_two(), "alloc with alignment {align:#x}");
            prop_assert!(
                inside(&d, p, size.max(1)),
                "{size:#x} bytes at {p:#x}: outside {:#x}+{:#x}",
                addr(&d),
                d.len()
            );
            prop_assert_eq!(
                p % align,
                0,
                "{:#x} bytes aligned to {:#x} at {:#x}",
                size,
                align,
                p
            );
            {
                let _v = mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap();
                mgr.write_byte(p, 1).unwrap();
                mgr.write_byte(p + size.max(1) - 1, 2).unwrap();
            }
            prop_assert!(
                d.free(std::ptr::NonNull::new(p as *mut u8).unwrap())
                    .unwrap()
                    >= size
            );
        }
        Err(Error::BadAlignment(a)) => {
            prop_assert_eq!(a, align);
            prop_assert!(!align.is_power_of_two());
        }
        Err(Error::OutOfMemory { domain, .. }) => {
            prop_assert_eq!(domain, d.id());
            prop_assert!(align.is_power_of_two());
            // An empty domain of HEAP_PAGES pages has room for a page with page alignment.
            prop_assert!(
                size > PAGE || align > PAGE,
                "no room for {size:#x} bytes aligned to {align:#x} in an empty domain"
            );
        }
        Err(e) => prop_assert!(false, "alloc({size:#x}, {align:#x}): {e:?}"),
    }
    // The domain's heap still works.
    let q = d.alloc(16, 16).unwrap().as_ptr() as usize;
    prop_assert!(inside(&d, q, 16));
    still_works(mgr, &s, 0x5a)
}

fn alloc_pages<B: Backend>(mgr: &Manager<B>, n: usize) -> Result<(), TestCaseError> {
    let s = survivor(mgr);
    let d = mgr
        .create_domain(DomainOptions::reserve(HEAP_PAGES * PAGE))
        .unwrap();
    match d.alloc_pages(n) {
        Ok(p) => {
            let p = p.as_ptr() as usize;
            prop_assert!(n <= HEAP_PAGES);
            prop_assert_eq!(p % PAGE, 0);
            prop_assert!(inside(&d, p, n.max(1) * PAGE), "{n} pages at {p:#x}");
        }
        Err(Error::OutOfMemory { domain, .. }) => {
            prop_assert_eq!(domain, d.id());
            prop_assert!(n > HEAP_PAGES, "no room for {n} pages in an empty domain");
        }
        Err(e) => prop_assert!(false, "alloc_pages({n:#x}): {e:?}"),
    }
    prop_assert!(d.alloc_pages(1).is_ok() || n.max(1) >= HEAP_PAGES);
    still_works(mgr, &s, 0x5a)
}

fn map_fd<B: Backend>(
    mgr: &Manager<B>,
    file: &std::fs::File,
    len: usize,
) -> Result<(), TestCaseError> {
    let s = survivor(mgr);
    let d = mgr
        .create_domain(DomainOptions::reserve(HEAP_PAGES * PAGE))
        .unwrap();
    match d.map_fd(file.as_fd(), 0, len) {
        Ok(p) => {
            let p = p.as_ptr() as usize;
            prop_assert_eq!(p % PAGE, 0);
            prop_assert!(inside(&d, p, len.max(1)), "{len:#x} bytes mapped at {p:#x}");
        }
        Err(Error::OutOfMemory { domain, .. }) => {
            prop_assert_eq!(domain, d.id());
            prop_assert!(
                len > HEAP_PAGES * PAGE,
                "no room for {len:#x} bytes in an empty domain"
            );
        }
        Err(e) => prop_assert!(false, "map_fd({len:#x}): {e:?}"),
    }
    still_works(mgr, &s, 0x5a)
}

/// A file of one heap's worth of bytes to map.
fn file() -> std::fs::File {
    // A name of its own per call: the tests of this binary run in parallel.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("mpkvirt-bad-sizes-{}-{n}", std::process::id()));
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.write_all(&[7u8; HEAP_PAGES * PAGE]).unwrap();
    f
}

fn simulated() -> Manager<Simulated> {
    Manager::simulated(2, config(2)).unwrap()
}

fn emulated() -> Manager<Emulated> {
    Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn simulated_reserve_any_size(size in size()) {
        reserve(&simulated(), size)?;
    }

    #[test]
    fn simulated_alloc_any_size_and_alignment(size in size(), align in align()) {
        alloc(&simulated(), size, align)?;
    }

    #[test]
    fn simulated_alloc_pages_any_count(n in size()) {
        alloc_pages(&simulated(), n)?;
    }

    #[test]
    fn simulated_map_fd_any_length(len in size()) {
        map_fd(&simulated(), &file(), len)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn emulated_reserve_any_size(size in size()) {
        let _g = common::real_backend();
        reserve(&emulated(), size)?;
    }

    #[test]
    fn emulated_alloc_any_size_and_alignment(size in size(), align in align()) {
        let _g = common::real_backend();
        alloc(&emulated(), size, align)?;
    }

    #[test]
    fn emulated_alloc_pages_any_count(n in size()) {
        let _g = common::real_backend();
        alloc_pages(&emulated(), n)?;
    }

    #[test]
    fn emulated_map_fd_any_length(len in size()) {
        let _g = common::real_backend();
        map_fd(&emulated(), &file(), len)?;
    }
}

/// The edges themselves, on every backend, without relying on proptest's sampling; the
/// hardware backend runs them in the PKU guest.
fn edges<B: Backend>(new: impl Fn() -> Manager<B>) {
    let f = file();
    let run = |r: Result<(), TestCaseError>| r.unwrap_or_else(|e| panic!("{e}"));
    for size in [
        0,
        1,
        PAGE - 1,
        PAGE,
        PAGE + 1,
        isize::MAX as usize,
        isize::MAX as usize + 1,
        usize::MAX - (PAGE - 2),
        usize::MAX,
    ] {
        run(reserve(&new(), size));
        run(alloc_pages(&new(), size));
        run(map_fd(&new(), &f, size));
        for align in [0, 1, 3, 16, PAGE, 2 * PAGE, 1 << 20, 1 << 63, usize::MAX] {
            run(alloc(&new(), size, align));
        }
    }
}

#[test]
fn simulated_size_edges() {
    edges(simulated);
}

#[test]
fn emulated_size_edges() {
    let _g = common::real_backend();
    edges(emulated);
}

#[test]
fn pku_size_edges() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    edges(|| Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap());
}

/// `Domain::alloc` promises an address aligned to `align`, also above a page, where a
/// domain's base (only page-aligned) is not aligned itself: the heap used to align offsets.
fn alloc_aligns_addresses<B: Backend>(mgr: &Manager<B>) {
    let mut wrong = Vec::new();
    // A one-page domain before each heap domain: the heaps' bases fall on odd pages too.
    let mut small = Vec::new();
    let mut big = Vec::new();
    for _ in 0..4 {
        small.push(mgr.create_domain(DomainOptions::reserve(PAGE)).unwrap());
        big.push(
            mgr.create_domain(DomainOptions::reserve(HEAP_PAGES * PAGE))
                .unwrap(),
        );
    }
    for d in &big {
        for align in [2 * PAGE, 4 * PAGE] {
            let p = d.alloc(1, align).unwrap().as_ptr() as usize;
            if !p.is_multiple_of(align) {
                wrong.push(format!(
                    "alloc(1, {align:#x}) = {p:#x} (domain base {:#x})",
                    addr(d)
                ));
            }
        }
    }
    drop(small);
    assert!(wrong.is_empty(), "misaligned: {wrong:#?}");
}

#[test]
fn simulated_alloc_aligns_addresses_above_a_page() {
    alloc_aligns_addresses(&simulated());
}

#[test]
fn emulated_alloc_aligns_addresses_above_a_page() {
    let _g = common::real_backend();
    alloc_aligns_addresses(&emulated());
}
