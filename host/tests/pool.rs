//! The instance slot pool (`instance::pool`): warm reuse stays within an application, a slot
//! changes hands only reset, the limit is an error, and lending maps nothing.
//!
//! On mpkvirt's emulated backend (real memory, natively); the pool is backend-agnostic.

use mpkvirt::{Config, Emulated, Manager, Rights};
use mpkvirt_host::instance::pool::{Pool, PoolError, Release, Slot};

fn manager() -> Manager<Emulated> {
    Manager::with_backend(
        Emulated::new(4).unwrap(),
        Config {
            max_keys: 4,
            ..Config::default()
        },
    )
    .unwrap()
}

const SLOT: usize = 64 << 10;

/// Writes `v` at the slot's first byte and at its last.
fn write(mgr: &Manager<Emulated>, s: &Slot<Emulated>, v: u8) {
    let d = s.domain();
    let (a, b) = (
        d.base().as_ptr() as usize,
        d.base().as_ptr() as usize + d.len() - 1,
    );
    mgr.with_view(&[(d, Rights::ReadWrite)], || {
        mgr.write_byte(a, v).unwrap();
        mgr.write_byte(b, v).unwrap();
    })
    .unwrap();
}

fn read(mgr: &Manager<Emulated>, s: &Slot<Emulated>) -> (u8, u8) {
    let d = s.domain();
    let (a, b) = (
        d.base().as_ptr() as usize,
        d.base().as_ptr() as usize + d.len() - 1,
    );
    mgr.with_view(&[(d, Rights::ReadOnly)], || {
        (mgr.read_byte(a).unwrap(), mgr.read_byte(b).unwrap())
    })
    .unwrap()
}

#[test]
fn warm_slots_stay_with_their_application_and_change_hands_only_reset() {
    let mgr = manager();
    let mut pool = Pool::new(mgr.clone(), SLOT, 0, 2).unwrap();
    let a = pool.acquire(1).unwrap();
    write(&mgr, &a, 0xA1);
    pool.release(a, Release::Warm).unwrap();
    // The same application gets its warm slot back, as it left it.
    let a = pool.acquire(1).unwrap();
    assert_eq!(read(&mgr, &a), (0xA1, 0xA1));
    assert_eq!(pool.stats().warm_hits, 1);
    pool.release(a, Release::Warm).unwrap();
    // Another application gets a new slot while the pool is below its limit...
    let b = pool.acquire(2).unwrap();
    assert_eq!(read(&mgr, &b), (0, 0));
    write(&mgr, &b, 0xB2);
    // ... and at the limit, application 1's warm slot, reset first.
    let c = pool.acquire(3).unwrap();
    assert_eq!(
        read(&mgr, &c),
        (0, 0),
        "application 3 read application 1's data"
    );
    assert_eq!(pool.stats().created, 2);
    assert_eq!(pool.stats().resets, 1);
    // Every slot lent: the limit is an error, and nothing is lost.
    assert!(matches!(
        pool.acquire(4),
        Err(PoolError::Exhausted { slots: 2 })
    ));
    pool.release(b, Release::Reset).unwrap();
    let d = pool.acquire(4).unwrap();
    assert_eq!(
        read(&mgr, &d),
        (0, 0),
        "a reset slot kept application 2's data"
    );
    assert_eq!(pool.in_use(), 2);
    pool.release(c, Release::Warm).unwrap();
    pool.release(d, Release::Warm).unwrap();
}

#[test]
fn reclaim_resets_the_oldest_warm_slots() {
    let mgr = manager();
    let mut pool = Pool::new(mgr.clone(), SLOT, 3, 3).unwrap();
    let slots: Vec<_> = (0..3).map(|app| pool.acquire(app).unwrap()).collect();
    for (i, s) in slots.iter().enumerate() {
        write(&mgr, s, 0x10 + i as u8);
    }
    for s in slots {
        pool.release(s, Release::Warm).unwrap();
    }
    assert_eq!(pool.reclaim(1).unwrap(), 2);
    // Application 2 released last: still warm. 0 and 1 were reset.
    let s = pool.acquire(2).unwrap();
    assert_eq!(read(&mgr, &s), (0x12, 0x12));
    let t = pool.acquire(0).unwrap();
    assert_eq!(read(&mgr, &t), (0, 0));
    pool.release(s, Release::Warm).unwrap();
    pool.release(t, Release::Warm).unwrap();
}

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

/// Lending and taking back slots, warm or reset, maps nothing once the slots exist.
#[test]
fn lending_maps_nothing() {
    let mgr = manager();
    let mut pool = Pool::new(mgr.clone(), SLOT, 4, 4).unwrap();
    // One round first: bindings and parked ranges settle.
    for app in 0..4 {
        let s = pool.acquire(app).unwrap();
        write(&mgr, &s, 1);
        pool.release(s, Release::Reset).unwrap();
    }
    let before = mappings();
    for round in 0..500u32 {
        let app = round % 7;
        let s = pool.acquire(app).unwrap();
        write(&mgr, &s, round as u8);
        let how = if round % 3 == 0 {
            Release::Reset
        } else {
            Release::Warm
        };
        pool.release(s, how).unwrap();
    }
    let after = mappings();
    assert_eq!(pool.stats().created, 4);
    // (The emulated backend splits and merges mappings as rights change: the count moves a
    // little with whichever domains hold keys; it does not grow with the rounds.)
    assert!(
        after <= before + 8,
        "mappings {before} -> {after} after 500 rounds"
    );
}

/// Slots released for reset, and warm slots beyond the clean stock, are reset by a cleaner
/// outside the pool (`to_clean`, `cleaned`); an acquisition then takes a clean slot without
/// resetting one. A dirty slot is never lent as it is, cleaner or not.
#[test]
fn a_cleaner_resets_slots_off_the_acquisition_path() {
    let mgr = manager();
    let mut pool = Pool::new(mgr.clone(), SLOT, 0, 3).unwrap();
    let (a, b, c) = (
        pool.acquire(1).unwrap(),
        pool.acquire(2).unwrap(),
        pool.acquire(3).unwrap(),
    );
    for (s, v) in [(&a, 0xA1), (&b, 0xB2), (&c, 0xC3)] {
        write(&mgr, s, v);
    }
    pool.release(a, Release::Reset).unwrap();
    pool.release(b, Release::Warm).unwrap();
    pool.release(c, Release::Warm).unwrap();
    assert_eq!((pool.dirty(), pool.clean(), pool.stats().resets), (1, 0, 0));

    // Two clean wanted: the dirty slot and the oldest warm one (application 2's).
    let out = pool.to_clean(2, 8);
    assert_eq!((out.len(), pool.dirty()), (2, 2));
    // Nothing more while those are out.
    assert!(pool.to_clean(2, 8).is_empty());
    for d in out {
        let r = d.reset();
        pool.cleaned(d, r).unwrap();
    }
    assert_eq!((pool.dirty(), pool.clean(), pool.stats().resets), (0, 2, 2));

    // Application 3 keeps its warm slot; others get clean ones, reading zero, with no reset
    // on the way.
    let c = pool.acquire(3).unwrap();
    assert_eq!(read(&mgr, &c), (0xC3, 0xC3));
    let x = pool.acquire(4).unwrap();
    let y = pool.acquire(2).unwrap();
    assert_eq!((read(&mgr, &x), read(&mgr, &y)), ((0, 0), (0, 0)));
    assert_eq!(pool.stats().resets, 2);

    // With no clean slot left, a dirty one is reset by the acquisition itself.
    write(&mgr, &x, 0x44);
    pool.release(x, Release::Reset).unwrap();
    let z = pool.acquire(5).unwrap();
    assert_eq!(read(&mgr, &z), (0, 0));
    assert_eq!(pool.stats().resets, 3);
    drop((c, y, z));
}

/// Below its limit the pool keeps warm slots warm: the cleaner gets only dirty ones, and
/// the clean stock is made of new slots.
#[test]
fn below_the_limit_warm_slots_stay_warm_and_the_stock_is_new_slots() {
    let mgr = manager();
    let mut pool = Pool::new(mgr.clone(), SLOT, 0, 8).unwrap();
    let a = pool.acquire(1).unwrap();
    write(&mgr, &a, 0xA1);
    pool.release(a, Release::Warm).unwrap();
    assert!(pool.to_clean(4, 8).is_empty());
    assert_eq!(pool.prefill(4, 8).unwrap(), 4);
    assert_eq!(
        (pool.clean(), pool.stats().created, pool.stats().resets),
        (4, 5, 0)
    );
    let a = pool.acquire(1).unwrap();
    assert_eq!(read(&mgr, &a), (0xA1, 0xA1));
    // At most the limit.
    assert_eq!(pool.prefill(100, 100).unwrap(), 3);
    drop(a);
}
