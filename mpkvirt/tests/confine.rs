//! Confined threads: names are no capability, confinement is.
//!
//! **Attack** (attacker class 2, arbitrary code in one thread). A domain's name — its
//! manager's registry slot and uid, its own record index and uid — is no secret: uids are
//! sequential, `Manager::domain_at` (the `D_AT` op) answers one for any address, handles live
//! in ordinary memory. Code that can call the library's gate with forged arguments, or that
//! simply holds a handle it was never meant to use, named any domain of the process: a forged
//! `V_ENTER` entered another tenant's domain and read it.
//!
//! **Defence** (`thread::confine`, `mpk_confine`; `gate::Confinement`, kept in the thread's
//! record, i.e. library memory). A confined thread may name only the domains it was given and
//! those it creates: every op that names another domain fails with `Error::Confined`
//! (`EPERM`), `domain_at` answers `None` for them, and ops that act on every thread or a
//! whole manager are refused. The set only narrows. Threads it creates inherit the set when
//! they register (through the GS base `clone` copies), also after it ended: its record is
//! never re-issued.
//!
//! Natively the checks run inside the ops in every metadata mode (they are library code, not
//! PKU); the `pku_*` test makes the forged gate call of the review in protected mode.
//!
//! # Safety
//!
//! Forged op calls (`testing::raw_call`, the call gate itself) with crafted argument blocks —
//! what the threat model's attacker does — and mpkvirt's probe.
#![allow(unsafe_code, reason = "forged op calls, probes")]

mod common;

use std::mem::MaybeUninit;
use std::sync::mpsc::channel;

use common::config;
use mpkvirt::{
    Domain, DomainOptions, Emulated, Error, Hardware, Manager, Rights, Simulated, thread,
};
use mpkvirt_sys::require_pku;

fn confined<T>(r: mpkvirt::Result<T>) -> bool {
    matches!(r, Err(Error::Confined(_)))
}

/// Everything a confined thread may not do with a domain outside its set, each checked; and
/// what it may do with its own.
fn assert_confined_to<B: mpkvirt::Backend>(mgr: &Manager<B>, own: &Domain<B>, victim: &Domain<B>) {
    let v = mgr.enter(&[(victim, Rights::ReadOnly)]).map(drop);
    assert!(confined(v.clone()), "view of the victim: {v:?}");
    let both = mgr
        .enter(&[(own, Rights::ReadWrite), (victim, Rights::ReadOnly)])
        .map(drop);
    assert!(
        confined(both.clone()),
        "view of its own and the victim: {both:?}"
    );
    assert!(confined(victim.alloc(16, 8)), "allocating in the victim");
    assert!(confined(victim.reset()), "resetting the victim");
    assert!(
        confined(victim.protect(mpkvirt::Prot::READ)),
        "changing the victim's protection"
    );
    assert!(
        confined(victim.set_process_wide(Some(Rights::ReadWrite))),
        "process-wide rights to the victim"
    );
    assert!(
        confined(own.set_process_wide(Some(Rights::ReadWrite))),
        "process-wide rights (to its own domain: they reach every thread)"
    );
    assert_eq!(
        mgr.domain_at(victim.base().as_ptr() as usize),
        None,
        "domain_at names the victim"
    );
    assert!(confined(mgr.prefetch(&[victim])), "prefetching");
    // Its own domain works.
    assert_eq!(mgr.domain_at(own.base().as_ptr() as usize), Some(own.id()));
    let p = own.alloc(64, 8).expect("allocating in its own domain");
    {
        let _v = mgr
            .enter(&[(own, Rights::ReadWrite)])
            .expect("a view of its own domain");
        mgr.write_byte(p.as_ptr() as usize, 7).unwrap();
        assert_eq!(mgr.read_byte(p.as_ptr() as usize).unwrap(), 7);
    }
    own.free(p).unwrap();
}

/// A confined thread holding the victim's real handle (a name no forgery can beat) reaches
/// nothing of it; the victim is untouched for everyone else.
#[test]
fn a_confined_thread_uses_no_domain_it_was_not_given() {
    let mgr = Manager::with_backend(Simulated::new(4).unwrap(), config(4)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(1 << 16)).unwrap();
    let victim = mgr.create_domain(DomainOptions::reserve(1 << 16)).unwrap();
    let secret = victim.alloc(8, 8).unwrap().as_ptr() as usize;
    {
        let _v = mgr.enter(&[(&victim, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(secret, 0x5a).unwrap();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            thread::confine(&[&own]).unwrap();
            assert_confined_to(&mgr, &own, &victim);
            // Creating a manager (it would take keys every thread needs) is refused too.
            let m2 = Manager::with_backend(Simulated::new(1).unwrap(), config(1));
            assert!(confined(m2.map(drop)), "creating a manager");
        })
        .join()
        .unwrap();
    });
    // The victim is intact, and unconfined threads still use it.
    let _v = mgr.enter(&[(&victim, Rights::ReadOnly)]).unwrap();
    assert_eq!(mgr.read_byte(secret).unwrap(), 0x5a);
}

/// A domain a confined thread creates is its own; a second confinement only narrows; confining
/// with a view open is refused.
#[test]
fn confinement_narrows_and_admits_what_the_thread_creates() {
    let mgr = Manager::with_backend(Simulated::new(4).unwrap(), config(4)).unwrap();
    let a = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let b = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let c = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            {
                let _v = mgr.enter(&[(&a, Rights::ReadWrite)]).unwrap();
                assert!(
                    confined(thread::confine(&[&a])),
                    "confining with a view open"
                );
            }
            thread::confine(&[&a, &b]).unwrap();
            // {a, b} ∩ {a, c} = {a}: c was never given, b is given up.
            thread::confine(&[&a, &c]).unwrap();
            assert!(mgr.enter(&[(&a, Rights::ReadWrite)]).is_ok());
            assert!(confined(mgr.enter(&[(&b, Rights::ReadWrite)]).map(drop)));
            assert!(confined(mgr.enter(&[(&c, Rights::ReadWrite)]).map(drop)));
            let mine = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
            assert!(mgr.enter(&[(&mine, Rights::ReadWrite)]).is_ok());
            assert!(mine.alloc(8, 8).is_ok());
        })
        .join()
        .unwrap();
    });
}

/// Threads a confined thread creates are confined to its set, also when they first call the
/// library after it ended and other threads took records meanwhile.
#[test]
fn threads_a_confined_thread_creates_inherit_its_confinement() {
    let mgr = Manager::with_backend(Simulated::new(4).unwrap(), config(4)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(1 << 16)).unwrap();
    let victim = mgr.create_domain(DomainOptions::reserve(1 << 16)).unwrap();
    let (go_tx, go_rx) = channel::<()>();
    std::thread::scope(|s| {
        let late = s
            .spawn(|| {
                thread::confine(&[&own]).unwrap();
                // A child that uses the library at once.
                std::thread::scope(|s2| {
                    s2.spawn(|| assert_confined_to(&mgr, &own, &victim))
                        .join()
                        .unwrap();
                });
                // A child that first calls the library after this thread ended.
                s.spawn(move || {
                    go_rx.recv().unwrap();
                    assert_confined_to(&mgr, &own, &victim);
                })
            })
            .join()
            .unwrap();
        // The creator is gone; 64 threads register at once — taking every record that can be
        // handed on, the creator's too if it could — and end; then the late child makes its
        // first call.
        let all = std::sync::Barrier::new(64);
        std::thread::scope(|s2| {
            for _ in 0..64 {
                s2.spawn(|| {
                    thread::without_rights(|| ()).unwrap();
                    all.wait();
                });
            }
        });
        go_tx.send(()).unwrap();
        late.join().unwrap();
    });
}

// ---- forged calls -------------------------------------------------------------------------

/// `manager::shared::MgrRef` / `DomRef` (plain `repr(C)` data).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Ref {
    idx: u32,
    uid: u64,
}

/// `manager::ops::EnterIn`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct EnterIn {
    m: Ref,
    n: u32,
    ro: u32,
    doms: u64,
}

/// `ops::Call<I, O>`.
#[repr(C)]
struct Call<I, O> {
    input: I,
    output: MaybeUninit<mpkvirt::Result<O>>,
}

const EMU: u64 = 2 << 16;
const HW: u64 = 3 << 16;
const M_STATS: u64 = 3;
const V_ENTER: u64 = 30;

/// The name of the one live manager of backend `tag`, found the way an attacker would: uids
/// are sequential, slots small.
fn find_mgr(tag: u64, call: fn(u64, *mut u8) -> u64) -> Ref {
    for idx in 0..4u32 {
        for uid in 1..400u64 {
            let mut c = Call::<Ref, mpkvirt::Stats> {
                input: Ref { idx, uid },
                output: MaybeUninit::uninit(),
            };
            if call(tag | M_STATS, (&raw mut c).cast()) == 0
                // SAFETY: status 0: the library wrote the output.
                && unsafe { c.output.assume_init() }.is_ok()
            {
                return Ref { idx, uid };
            }
        }
    }
    panic!("no manager found");
}

/// Forged V_ENTERs naming the domain of uid `uid` under every record index a small process
/// has: whether one of them entered it.
fn forged_enter(tag: u64, call: fn(u64, *mut u8) -> u64, uid: u64) -> bool {
    let m = find_mgr(tag, call);
    (0..64u32).any(|idx| {
        let dom = Ref { idx, uid };
        let mut c = Call::<EnterIn, u64> {
            input: EnterIn {
                m,
                n: 1,
                ro: 0,
                doms: (&raw const dom) as u64,
            },
            output: MaybeUninit::uninit(),
        };
        call(tag | V_ENTER, (&raw mut c).cast()) == 0
            // SAFETY: status 0: the library wrote the output.
            && unsafe { c.output.assume_init() }.is_ok()
    })
}

/// A forged call through this process's calling path (any mode).
fn raw(op: u64, args: *mut u8) -> u64 {
    // SAFETY: the attacker's call: blocks on the caller's stack (the library checks them).
    unsafe { mpkvirt::testing::raw_call(op, args) }.unwrap()
}

/// The review's attack, natively: the uid comes from `domain_at` (unconfined: the setup that
/// shows the forgery works), then a confined thread forges V_ENTER with it under every index.
#[test]
fn a_confined_thread_enters_nothing_with_forged_names() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let victim = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let addr = victim.base().as_ptr() as usize;
    let (unconfined, confined_got) = std::thread::scope(|s| {
        s.spawn(|| {
            let uid = mgr.domain_at(addr).expect("a live domain").get();
            let unconfined = forged_enter(EMU, raw, uid);
            // (The forged view of the setup ends with the thread's views.)
            let confined_got = std::thread::scope(|s2| {
                s2.spawn(|| {
                    thread::confine(&[&own]).unwrap();
                    (mgr.domain_at(addr), forged_enter(EMU, raw, uid))
                })
                .join()
                .unwrap()
            });
            (unconfined, confined_got)
        })
        .join()
        .unwrap()
    });
    assert!(
        unconfined,
        "setup: an unconfined thread's forged name enters the victim"
    );
    assert_eq!(
        confined_got,
        (None, false),
        "a confined thread learned the victim's id or entered it with a forged name"
    );
}

/// A forged call through the gate (PKU guest).
fn gate(op: u64, args: *mut u8) -> u64 {
    // SAFETY: the attacker's call: any op, any argument pointer (the library must cope).
    unsafe { mpkvirt_asm::mpkvirt_gate_call(op, args) }
}

fn probe(addr: usize) -> Option<u8> {
    // SAFETY: domain memory; mpkvirt's SIGSEGV handler recovers the probe.
    let v = unsafe { mpkvirt_asm::mpkvirt_probe_read8(addr as *const u8) };
    (v != u64::MAX).then_some(v as u8)
}

/// The review's attack in protected mode (`review_arg_gadgets.rs`, forged names): a confined
/// thread forges V_ENTER through the gate with the victim's uid under every index, and then
/// probes the victim's memory.
#[test]
fn pku_a_confined_thread_enters_nothing_with_forged_names() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let victim = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let addr = victim.base().as_ptr() as usize + 8;
    {
        let _v = mgr.enter(&[(&victim, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(addr, 0x43).unwrap();
    }
    let uid = victim.id().get();
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            thread::confine(&[&own]).unwrap();
            let entered = forged_enter(HW, gate, uid);
            (entered, probe(addr))
        })
        .join()
        .unwrap()
    });
    assert_eq!(
        got,
        (false, None),
        "a confined thread entered the victim through a forged name (and read it)"
    );
    // Unconfined, the same forgery works: the confinement is what stops it.
    let unconfined = std::thread::scope(|s| {
        s.spawn(|| {
            let entered = forged_enter(HW, gate, uid);
            (entered, probe(addr))
        })
        .join()
        .unwrap()
    });
    assert_eq!(unconfined, (true, Some(0x43)), "setup: the forgery works");
}
