//! The lowering gate `mpkvirt_gate_sync` on its own: its shape (checked everywhere) and, on
//! PKU hardware, that landing on its WRPKRU with a forged EAX leaves the record's value.
//! The call gates need mpkvirt's dispatcher; they are tested in `mpkvirt/tests/gates.rs`.
//!
//! # Safety
//!
//! The tests point this thread's GS base at a local [`GateRecord`] (restoring 0 before the
//! record goes out of scope), write PKRU directly with `Pku::wrpkru` to set up and undo
//! forged states, and call into the gate's middle with chosen registers.
#![allow(
    unsafe_code,
    reason = "tests set the GS base, write PKRU and jump into the gate's middle"
)]

use std::arch::asm;

use mpkvirt_asm::{GateRecord, addr, mpkvirt_gate_sync};
use mpkvirt_sys::thread::{FsGsBase, set_gs_base};
use mpkvirt_sys::{AccessRights, Pkey, Pkru, require_pku};

const WRPKRU: [u8; 3] = [0x0f, 0x01, 0xef];

/// The first bytes of a gate's machine code.
fn code_of(gate: usize, len: usize) -> &'static [u8] {
    // SAFETY: `gate` is the address of one of the gates, which are followed by at least
    // `len` bytes of mapped, readable code (.text is r-x); the slice is only read.
    unsafe { std::slice::from_raw_parts(gate as *const u8, len) }
}

/// Offset of the (first) WRPKRU in `code`.
fn wrpkru_offset(code: &[u8]) -> usize {
    code.windows(3)
        .position(|w| w == WRPKRU)
        .expect("gate contains a WRPKRU")
}

#[test]
fn gate_sync_rechecks_through_gs() {
    let code = code_of(addr::gate_sync(), 40);
    let at = wrpkru_offset(code);
    // xor ecx,ecx; xor edx,edx; mov eax, gs:[40]; WRPKRU; cmp eax, gs:[40]; jne back
    // (40: the record's normal-context PKRU, `GateRecord::normal_pkru`).
    let load_gs40 = [0x65, 0x8b, 0x04, 0x25, 40, 0, 0, 0];
    assert_eq!(&code[..4], &[0x31, 0xc9, 0x31, 0xd2], "{code:02x?}");
    assert_eq!(&code[4..at], &load_gs40, "mov eax, gs:[40]: {code:02x?}");
    assert_eq!(
        &code[at + 3..at + 11],
        &[0x65, 0x3b, 0x04, 0x25, 40, 0, 0, 0],
        "cmp eax, gs:[40]: {code:02x?}"
    );
    assert_eq!(code[at + 11], 0x75, "jne rel8: {code:02x?}");
    let target = (at + 13) as isize + isize::from(code[at + 12] as i8);
    assert_eq!(target, 0, "jne goes back to the start of the gate");
    assert_eq!(
        code.windows(3).filter(|w| *w == WRPKRU).count(),
        1,
        "one WRPKRU"
    );
}

/// Calls `addr` as if control flow had landed there with EAX = `eax`, ECX = EDX = 0 (what an
/// attacker who reached the WRPKRU would control).
///
/// # Safety
///
/// `addr` must be inside a gate, at an instruction boundary from which the gate returns.
unsafe fn land_at(addr: usize, eax: u32) {
    // SAFETY: the caller names an instruction inside a gate; the gate only clobbers EAX, ECX,
    // EDX and flags (declared via the clobber ABI) and returns with `ret`, which pops the
    // return address pushed by this `call`.
    unsafe {
        asm!("call {f}", f = in(reg) addr, inout("eax") eax => _, inout("ecx") 0 => _,
             inout("edx") 0 => _, clobber_abi("sysv64"));
    }
}

/// Runs `f` with this thread's GS base pointing at `rec`, then sets it back to 0.
fn with_record<R>(rec: &GateRecord, f: impl FnOnce() -> R) -> R {
    FsGsBase::new().expect("FSGSBASE (Linux >= 5.9)");
    // SAFETY: nothing else in this test binary uses the GS base; `rec` outlives the call and
    // the base is reset to 0 before returning.
    unsafe { set_gs_base((&raw const *rec) as usize) }.expect("arch_prctl(ARCH_SET_GS)");
    let r = f();
    // SAFETY: as above; 0 is the initial GS base.
    unsafe { set_gs_base(0) }.expect("arch_prctl(ARCH_SET_GS)");
    r
}

fn record(pkru: Pkru) -> GateRecord {
    GateRecord {
        self_addr: 0,
        pkru: pkru.bits(),
        busy: 0,
        saved_rsp: 0,
        stack_top: 0,
        owner_fs: 0,
        normal_pkru: pkru.bits(),
        _pad: 0,
    }
}

#[test]
fn pku_gate_sync_installs_the_record_value_and_rejects_a_forged_eax() {
    let pku = require_pku!();
    let saved = pku.rdpkru();
    let legit = Pkru::LINUX_INIT.with(Pkey::new(2).expect("key"), AccessRights::READ_ONLY);
    let forged = Pkru::ALLOW_ALL.with(Pkey::new(7).expect("key"), AccessRights::NONE);
    let rec = record(legit);
    let at = addr::gate_sync() + wrpkru_offset(code_of(addr::gate_sync(), 40));
    let (called, landed, control) = with_record(&rec, || {
        // SAFETY: PKU is enabled and the record keeps key 0 accessible.
        unsafe { mpkvirt_gate_sync() };
        let called = pku.rdpkru();
        // Control: a bare WRPKRU with the forged EAX keeps it, so the check can fail.
        // SAFETY: the forged value keeps key 0 accessible; PKRU is restored below.
        unsafe { pku.wrpkru(forged) };
        let control = pku.rdpkru();
        // SAFETY: LINUX_INIT keeps key 0 accessible.
        unsafe { pku.wrpkru(Pkru::LINUX_INIT) };
        // SAFETY: `at` is the WRPKRU inside the gate; the gate returns normally.
        unsafe { land_at(at, forged.bits()) };
        (called, pku.rdpkru(), control)
    });
    // SAFETY: `saved` is the value this thread had on entry.
    unsafe { pku.wrpkru(saved) };
    assert_eq!(called, legit, "the gate writes the record's value");
    assert_eq!(
        control, forged,
        "an unchecked WRPKRU keeps the forged value"
    );
    assert_eq!(landed, legit, "gate left {landed} after a forged landing");
}
