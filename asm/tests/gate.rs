//! The checked WRPKRU gates: the ERIM byte pattern (checked everywhere) and, on PKU
//! hardware, that landing on a gate's WRPKRU with a forged EAX does not keep the forged value.
#![allow(
    unsafe_code,
    reason = "tests call assembly gates and jump into their middle"
)]

use std::arch::asm;

use mpkvirt_asm::{addr, mpkvirt_gate_allow_all, mpkvirt_gate_write};
use mpkvirt_sys::{AccessRights, Pkey, Pkru, Pku, require_pku};

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
fn gate_allow_all_has_the_erim_shape() {
    let code = code_of(addr::gate_allow_all(), 32);
    let at = wrpkru_offset(code);
    // xor ecx,ecx; xor edx,edx; mov eax, imm32; WRPKRU; cmp eax, imm32; jne back to the start.
    assert_eq!(at, 9, "{code:02x?}");
    assert_eq!(
        &code[..9],
        &[0x31, 0xc9, 0x31, 0xd2, 0xb8, 0, 0, 0, 0],
        "{code:02x?}"
    );
    assert_eq!(
        &code[at + 3..at + 8],
        &[0x3d, 0, 0, 0, 0],
        "cmp eax, 0: {code:02x?}"
    );
    assert_eq!(code[at + 8], 0x75, "jne rel8: {code:02x?}");
    let target = (at + 10) as isize + isize::from(code[at + 9] as i8);
    assert_eq!(target, 0, "jne goes back to the start of the gate");
}

#[test]
fn gate_write_rechecks_from_memory() {
    let code = code_of(addr::gate_write(), 32);
    let at = wrpkru_offset(code);
    assert_eq!(
        &code[..6],
        &[0x31, 0xc9, 0x31, 0xd2, 0x8b, 0x07],
        "mov eax, [rdi]: {code:02x?}"
    );
    assert_eq!(
        &code[at + 3..at + 5],
        &[0x3b, 0x07],
        "cmp eax, [rdi]: {code:02x?}"
    );
    assert_eq!(code[at + 5], 0x75, "jne rel8: {code:02x?}");
}

/// Calls `addr` as if control flow had landed there with EAX = `eax`, ECX = EDX = 0 and
/// RDI = `rdi` (what an attacker who reached the WRPKRU would control).
///
/// # Safety
///
/// `addr` must be inside a gate, at an instruction boundary from which the gate returns.
unsafe fn land_at(addr: usize, eax: u32, rdi: usize) {
    // SAFETY: the caller names an instruction inside a gate; gates only clobber EAX, ECX,
    // EDX and flags (declared via the clobber ABI) and return with `ret`, which pops the
    // return address pushed by this `call`.
    unsafe {
        asm!("call {f}", f = in(reg) addr, inout("eax") eax => _, inout("ecx") 0 => _,
             inout("edx") 0 => _, in("rdi") rdi, clobber_abi("sysv64"));
    }
}

fn forged() -> Pkru {
    // A value an attacker might want: every key open except a few, but key 0 kept so the
    // test itself can go on.
    Pkru::ALLOW_ALL.with(Pkey::new(7).expect("key"), AccessRights::NONE)
}

#[test]
fn pku_gate_allow_all_rejects_a_forged_eax() {
    let pku = require_pku!();
    let saved = pku.rdpkru();
    let at = addr::gate_allow_all() + wrpkru_offset(code_of(addr::gate_allow_all(), 32));

    // Control: a bare WRPKRU with the forged EAX keeps it, so the check below can fail.
    // SAFETY: the forged value keeps key 0 accessible; PKRU is restored below.
    unsafe { pku.wrpkru(forged()) };
    assert_eq!(
        pku.rdpkru(),
        forged(),
        "an unchecked WRPKRU keeps the forged value"
    );

    // SAFETY: Pkru::LINUX_INIT keeps key 0 accessible.
    unsafe { pku.wrpkru(Pkru::LINUX_INIT) };
    // SAFETY: `at` is the WRPKRU inside the gate; the gate returns normally.
    unsafe { land_at(at, forged().bits(), 0) };
    let after = pku.rdpkru();
    // SAFETY: `saved` is the value this thread had on entry.
    unsafe { pku.wrpkru(saved) };
    assert_eq!(
        after,
        Pkru::ALLOW_ALL,
        "gate left {after} after a forged landing"
    );
}

#[test]
fn pku_gate_write_rejects_a_forged_eax() {
    let pku = require_pku!();
    let saved = pku.rdpkru();
    let at = addr::gate_write() + wrpkru_offset(code_of(addr::gate_write(), 32));
    let expected = Pkru::LINUX_INIT.with(Pkey::new(2).expect("key"), AccessRights::READ_ONLY);
    let slot: u32 = expected.bits();

    // SAFETY: the slot is a live local, readable under every value written here (key 0).
    unsafe { mpkvirt_gate_write(&slot) };
    assert_eq!(pku.rdpkru(), expected, "the gate writes *expected");

    // SAFETY: the forged value keeps key 0 accessible.
    unsafe { pku.wrpkru(Pkru::LINUX_INIT) };
    // SAFETY: `at` is the WRPKRU inside the gate and RDI points at the trusted slot.
    unsafe { land_at(at, forged().bits(), (&raw const slot) as usize) };
    let after = pku.rdpkru();
    // SAFETY: `saved` is the value this thread had on entry.
    unsafe { pku.wrpkru(saved) };
    assert_eq!(after, expected, "gate left {after} after a forged landing");
}

#[test]
fn pku_gate_allow_all_sets_every_key_open() {
    let pku: Pku = require_pku!();
    let saved = pku.rdpkru();
    // SAFETY: LINUX_INIT keeps key 0 accessible.
    unsafe { pku.wrpkru(Pkru::LINUX_INIT) };
    // SAFETY: PKU is enabled (token above); opening every key is undone below.
    unsafe { mpkvirt_gate_allow_all() };
    let after = pku.rdpkru();
    // SAFETY: restores this thread's value on entry.
    unsafe { pku.wrpkru(saved) };
    assert_eq!(after, Pkru::ALLOW_ALL);
}
