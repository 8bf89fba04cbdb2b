//! Op arguments: library code reads and writes caller memory only where the calling thread
//! could read or write itself.
//!
//! **Attack** (attacker class 2: arbitrary code that calls the gate with forged arguments).
//! Ops run with every key open and the library key writable, and their argument pointers were
//! checked for null and alignment only (`ops.rs` `Args::serve`, `manager/ops.rs` V_ENTER's
//! `doms` and the hint/prefetch lists), so:
//!
//! - **read gadget**: V_ENTER with `doms` pointing into a domain outside the caller's view
//!   read a `DomRef` there and echoed its `uid` in `Error::ForeignDomain` — 8 bytes of the
//!   other domain per call;
//! - **write gadget into library memory**: an op's output (`Result<O>`, 40 bytes) landed
//!   wherever `args` pointed — e.g. the caller's own saved view (`Entry::bits`), which the
//!   next resync installed as PKRU;
//! - **write gadget into another domain**: the same output written into a domain outside the
//!   caller's view.
//!
//! **Defence** (`ops::caller_may_access`, used by `Args::serve` for the whole block before the
//! op and for the output again before it is written, and by every list an op reads): the range
//! must not wrap or leave the user address space, must not overlap library memory (bounds kept
//! in the root), and where it touches an arena granule (the library's own arena map) it must
//! lie in one live domain bound to a key for which the thread's *legitimate* rights — the
//! record's PKRU and views in library memory, never the PKRU it entered with — allow the
//! access. A refused block is `STATUS_BAD_CALL` with nothing read; a refused list is
//! `Error::InvalidConfig`. Blocks on the caller's stack (key 0, no arena) stay a few compares.
//!
//! The native tests (any metadata mode; without PKU library memory is ordinary memory, so an
//! unchecked write would land) use `testing::raw_call`; the `pku_*` tests call
//! `mpkvirt_gate_call` directly, as the attacker does.
//!
//! # Safety
//!
//! Direct calls of the call gate (and of the calling path, `testing::raw_call`) with crafted
//! argument blocks — what the threat model's attacker does — and mpkvirt's probes.
#![allow(unsafe_code, reason = "forged op calls, probes")]

mod common;

use std::mem::MaybeUninit;

use common::config;
use mpkvirt::{Domain, DomainOptions, Emulated, Error, Hardware, Manager, Rights};
use mpkvirt_sys::require_pku;

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

const OP_VIEW_MARK: u64 = 4;
const OP_SPAWN_PREPARE: u64 = 5;
const OP_SPAWN_DONE: u64 = 6;
const EMU: u64 = 2 << 16;
const HW: u64 = 3 << 16;
const M_STATS: u64 = 3;
const V_ENTER: u64 = 30;
/// `ops::STATUS_BAD_CALL`.
const BAD_CALL: u64 = 0x8000_0000_0000_0010;

/// A forged call through the gate (PKU guest).
fn gate(op: u64, args: *mut u8) -> u64 {
    // SAFETY: the attacker's call: any op, any argument pointer (the library must cope).
    unsafe { mpkvirt_asm::mpkvirt_gate_call(op, args) }
}

/// A forged call through this process's calling path (any mode).
fn raw(op: u64, args: *mut u8) -> u64 {
    // SAFETY: as for `gate`; the blocks the tests pass are theirs, library memory, or
    // addresses outside the user address space.
    unsafe { mpkvirt::testing::raw_call(op, args) }.unwrap()
}

/// The name of the one live manager of backend `tag`, found the way an attacker would: uids
/// are sequential, slots small.
fn find_mgr(tag: u64, call: fn(u64, *mut u8) -> u64) -> Ref {
    for idx in 0..4u32 {
        for uid in 1..400u64 {
            let mut c = Call::<Ref, mpkvirt::Stats> {
                input: Ref { idx, uid },
                output: MaybeUninit::uninit(),
            };
            if call(tag | M_STATS, (&raw mut c).cast()) == 0 {
                // SAFETY: status 0: the library wrote the output.
                if unsafe { c.output.assume_init() }.is_ok() {
                    return Ref { idx, uid };
                }
            }
        }
    }
    panic!("no manager found");
}

fn probe(addr: usize) -> Option<u8> {
    // SAFETY: domain memory; mpkvirt's SIGSEGV handler recovers the probe.
    let v = unsafe { mpkvirt_asm::mpkvirt_probe_read8(addr as *const u8) };
    (v != u64::MAX).then_some(v as u8)
}

fn read_u64(addr: usize) -> u64 {
    // SAFETY: memory the calling thread may read (library memory, readable to application
    // code, or a domain of its current view), 8-aligned.
    unsafe { (addr as *const u64).read_volatile() }
}

// ---- any machine, any metadata mode -------------------------------------------------------

/// An op's output aimed at the caller's own saved view (library memory) is refused and the
/// word is unchanged.
#[test]
fn op_arguments_an_output_aimed_at_library_memory_is_refused() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let view = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
    let bits = mpkvirt::testing::view_bits_word(&mgr, 0).unwrap();
    let args = (bits & !7) - 8;
    let before = [read_u64(args), read_u64(args + 8), read_u64(args + 16)];
    let status = raw(OP_VIEW_MARK, args as *mut u8);
    let after = [read_u64(args), read_u64(args + 8), read_u64(args + 16)];
    drop(view);
    assert_eq!(
        (status, after),
        (BAD_CALL, before),
        "an op wrote its output into library memory"
    );
}

/// A `doms` list in library memory (the root) is refused: nothing read there.
#[test]
fn op_arguments_a_list_in_library_memory_is_refused() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(2).unwrap(), config(2)).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    drop(mgr.enter(&[(&d, Rights::ReadOnly)]).unwrap());
    let lib = mpkvirt::testing::library_memory();
    let m = find_mgr(EMU, raw);
    for at in [lib.root.0 + 64, lib.region.0] {
        let mut c = Call::<EnterIn, u64> {
            input: EnterIn {
                m,
                n: 1,
                ro: 1,
                doms: at as u64,
            },
            output: MaybeUninit::uninit(),
        };
        assert_eq!(raw(EMU | V_ENTER, (&raw mut c).cast()), 0);
        // SAFETY: status 0: the library wrote the output.
        let out = unsafe { c.output.assume_init() };
        assert!(
            matches!(out, Err(Error::InvalidConfig(_))),
            "V_ENTER read its list from library memory at {at:#x}: {out:?}"
        );
    }
}

/// Blocks that wrap around or leave the user address space are refused (overflow-safe range
/// arithmetic), without faulting.
#[test]
fn op_arguments_blocks_outside_the_user_address_space_are_refused() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap();
    drop(mgr.create_domain(DomainOptions::reserve(4096)).unwrap());
    for at in [usize::MAX - 15, (1usize << 47) - 8, 1 << 47] {
        assert_eq!(
            raw(OP_VIEW_MARK, at as *mut u8),
            BAD_CALL,
            "block at {at:#x}"
        );
    }
}

// ---- PKU guest ----------------------------------------------------------------------------

/// A manager of two keys and a victim domain holding `secret` at offset 8, resident (bound
/// to a key) but in no view of the attacker's thread.
fn scene(secret: u64) -> (Manager<Hardware>, Domain<Hardware>) {
    let mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
    let victim = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    {
        let _v = mgr.enter(&[(&victim, Rights::ReadWrite)]).unwrap();
        for (i, b) in secret.to_le_bytes().iter().enumerate() {
            mgr.write_byte(victim.base().as_ptr() as usize + 8 + i, *b)
                .unwrap();
        }
    }
    assert!(victim.key().is_some(), "setup: resident");
    (mgr, victim)
}

/// Read gadget: V_ENTER's `doms` aimed at a domain outside the view reads nothing there.
#[test]
fn pku_op_arguments_enter_reads_no_list_in_a_domain_outside_the_view() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    const SECRET: u64 = 0x5345_4352_4554_2121; // "!!TERCES"
    let (mgr, victim) = scene(SECRET);
    let base = victim.base().as_ptr() as usize;
    assert!(
        matches!(mgr.read_byte(base + 8), Err(Error::Fault(_))),
        "setup: no view, no access"
    );
    let m = find_mgr(HW, gate);
    let mut c = Call::<EnterIn, u64> {
        input: EnterIn {
            m,
            n: 1,
            ro: 0,
            doms: base as u64,
        },
        output: MaybeUninit::uninit(),
    };
    assert_eq!(gate(HW | V_ENTER, (&raw mut c).cast()), 0);
    // SAFETY: status 0: the library wrote the output.
    let out = unsafe { c.output.assume_init() };
    assert!(
        matches!(out, Err(Error::InvalidConfig(_))),
        "read gadget: V_ENTER read its list from a domain outside the view ({out:?}; the \
         secret is {SECRET:#x})"
    );
}

/// Write gadget into library memory: an op's output aimed at the caller's own saved view is
/// refused, and the next resync grants nothing new.
#[test]
fn pku_op_arguments_an_output_aimed_at_a_saved_view_opens_no_key() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    const SECRET: u64 = 0x4141_4141_4141_4141;
    let (mgr, victim) = scene(SECRET);
    let base = victim.base().as_ptr() as usize;
    // The attacker: a fresh thread (its view sequence starts at 0) with a view of its own
    // domain, none of the victim.
    let mgr2 = mgr.clone();
    let got = std::thread::spawn(move || {
        let own = mgr2.create_domain(DomainOptions::reserve(4096)).unwrap();
        let view = mgr2.enter(&[(&own, Rights::ReadWrite)]).unwrap();
        let before = probe(base + 8);
        // Its saved view in library memory (readable to it: the library key is read-only).
        let bits = mpkvirt::testing::view_bits_word(&mgr2, 0).unwrap();
        // OP_VIEW_MARK writes Ok(view_seq): the tag at args, the u64 at args + 8 — i.e.
        // Entry::bits := 1 (the thread's first view), every manager key read-write.
        let status = gate(OP_VIEW_MARK, (bits - 8) as *mut u8);
        // Any resync installs the saved view.
        for op in [OP_SPAWN_PREPARE, OP_SPAWN_DONE] {
            let mut c = Call::<(), ()> {
                input: (),
                output: MaybeUninit::uninit(),
            };
            gate(op, (&raw mut c).cast());
        }
        let after = probe(base + 8);
        std::mem::forget(view);
        (status, before, after)
    })
    .join()
    .unwrap();
    assert_eq!(got.1, None, "setup: the attacker cannot read the victim");
    assert_eq!(
        (got.0, got.2),
        (BAD_CALL, None),
        "write gadget: an op's output written into the caller's saved view (library memory) \
         gave it the victim's key: it reads {:#x?} (status {:#x})",
        got.2,
        got.0
    );
}

/// Write gadget into another domain: an op's output aimed at a domain outside the view is
/// refused and the domain is unchanged.
#[test]
fn pku_op_arguments_an_output_aimed_at_a_domain_outside_the_view_is_refused() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    const SECRET: u64 = 0x4242_4242_4242_4242;
    let (mgr, victim) = scene(SECRET);
    let base = victim.base().as_ptr() as usize;
    // No view of the victim: OP_VIEW_MARK's output would go to the victim's bytes 8..48.
    let status = gate(OP_VIEW_MARK, (base + 8) as *mut u8);
    let _v = mgr.enter(&[(&victim, Rights::ReadOnly)]).unwrap();
    let now = (0..8).fold(0u64, |a, i| {
        a | u64::from(mgr.read_byte(base + 8 + i).unwrap()) << (8 * i)
    });
    assert_eq!(
        (status, now),
        (BAD_CALL, SECRET),
        "write gadget: a thread without a view changed the victim's memory (status {status:#x})"
    );
}

/// The other side: argument blocks and lists in domains of the caller's view are served —
/// a block in a read-write domain, a list in a read-only one — and a block in a read-only
/// domain is refused (the output needs write rights).
#[test]
fn pku_op_arguments_in_domains_of_the_view_are_served_with_the_views_rights() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
    let rw = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let ro = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let (rw_base, ro_base) = (rw.base().as_ptr() as usize, ro.base().as_ptr() as usize);
    let m = find_mgr(HW, gate);
    let _v = mgr
        .enter(&[(&rw, Rights::ReadWrite), (&ro, Rights::ReadOnly)])
        .unwrap();
    // A block in the read-write domain: served, the output written there.
    let status = gate(OP_VIEW_MARK, rw_base as *mut u8);
    // SAFETY: the block the library just wrote, in a domain the thread may read (its view).
    let out = unsafe { (rw_base as *const mpkvirt::Result<u64>).read() };
    assert_eq!(status, 0, "a block in a read-write domain of the view");
    assert!(out.is_ok(), "{out:?}");
    // A block in the read-only domain: refused.
    assert_eq!(gate(OP_VIEW_MARK, ro_base as *mut u8), BAD_CALL);
    // A list in the read-only domain (all zero: a name no domain has): read, and the name
    // refused as foreign — not the list.
    let mut c = Call::<EnterIn, u64> {
        input: EnterIn {
            m,
            n: 1,
            ro: 1,
            doms: ro_base as u64,
        },
        output: MaybeUninit::uninit(),
    };
    assert_eq!(gate(HW | V_ENTER, (&raw mut c).cast()), 0);
    // SAFETY: status 0: the library wrote the output.
    let out = unsafe { c.output.assume_init() };
    assert!(
        matches!(out, Err(Error::ForeignDomain(_))),
        "a list in a read-only domain of the view: {out:?}"
    );
}
