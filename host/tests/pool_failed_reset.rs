//! A slot whose reset fails in `Pool::acquire` is not lent again (found by review: it went
//! to the clean list and the next acquisition lent it to another application without a
//! reset, with the first application's data).
//!
//! A reset fails when emptying the pages fails; `mlock`ed pages do that (MADV_DONTNEED
//! refuses locked pages, EINVAL). `mlock` is not on design.md §5's interposition list, so a
//! tenant can lock its own instance pages; the test locks them the way it would.
//!
//! # Safety
//!
//! `mlock`/`munlock` of the slot's own range (no memory access through them).
#![allow(unsafe_code, reason = "mlock of the slot's pages")]

use mpkvirt::{Config, Emulated, Manager, Rights};
use mpkvirt_host::instance::pool::{Pool, Release, Slot};

const SLOT: usize = 64 << 10;

fn bytes(mgr: &Manager<Emulated>, s: &Slot<Emulated>) -> (u8, u8) {
    let d = s.domain();
    let a = d.base().as_ptr() as usize;
    mgr.with_view(&[(d, Rights::ReadOnly)], || {
        (
            mgr.read_byte(a).unwrap(),
            mgr.read_byte(a + d.len() - 1).unwrap(),
        )
    })
    .unwrap()
}

#[test]
fn a_slot_whose_reset_failed_is_never_lent_again() {
    let mgr = Manager::with_backend(
        Emulated::new(4).unwrap(),
        Config {
            max_keys: 4,
            ..Config::default()
        },
    )
    .unwrap();
    let mut pool = Pool::new(mgr.clone(), SLOT, 0, 1).unwrap();
    // Application 1 writes a secret and locks its pages (as a tenant may), released warm.
    let a = pool.acquire(1).unwrap();
    let d = a.domain();
    let (base, len) = (d.base().as_ptr() as usize, d.len());
    mgr.with_view(&[(d, Rights::ReadWrite)], || {
        mgr.write_byte(base, 0xA1).unwrap();
        mgr.write_byte(base + len - 1, 0xA1).unwrap();
        // SAFETY: the slot's own range.
        let rc = unsafe { libc::mlock(base as *const libc::c_void, len) };
        assert_eq!(rc, 0, "mlock: {}", std::io::Error::last_os_error());
    })
    .unwrap();
    pool.release(a, Release::Warm).unwrap();
    // Application 2: the pool is at its limit, so app 1's warm slot is reset for it: fails.
    let first = pool.acquire(2);
    println!("first acquire for app 2: {first:?}");
    if let Ok(s) = first {
        println!("reset succeeded; bytes {:?}", bytes(&mgr, &s));
        return;
    }
    // Application 2 asks again: it must not get that slot.
    let s = pool.acquire(2).expect("second acquire");
    // Other domains cycle through the keys (as other instances do), so the slot's key is
    // evicted and bound again: binding re-applies the domain's protection to its range.
    let others: Vec<_> = (0..6)
        .map(|_| {
            mgr.create_domain(mpkvirt::DomainOptions::reserve(4096))
                .unwrap()
        })
        .collect();
    for o in &others {
        mgr.with_view(&[(o, Rights::ReadWrite)], || ()).unwrap();
    }
    let seen = bytes(&mgr, &s);
    println!(
        "second acquire for app 2: slot of app {}, bytes {seen:02x?}",
        s.app()
    );
    // SAFETY: as above.
    unsafe { libc::munlock(base as *const libc::c_void, len) };
    assert_ne!(
        seen,
        (0xA1, 0xA1),
        "application 1's data was lent to application 2"
    );
}
