//! State library code trusts lives in library memory, not in the program's statics.
//!
//! **Attack** (attacker class 1: one stray write into the program's .bss/.data). Library code
//! runs with every key open; whatever it takes from application memory, a stray write
//! chooses. Besides the arena map's pointer (`tests/arena_map.rs`), two values of ops lived
//! in statics: the process's fence mode (`manager::binding::process_fence`: with
//! `membarrier` unavailable, forging "asymmetric" made ops skip the fence that orders their
//! manager announcement against `release`, so a manager could be freed under a running op)
//! and the exit hook's pthread key (`gate::exit_key`, handed to `pthread_setspecific` inside
//! an op: a forged key makes glibc write the library's marker through another key's slot).
//!
//! **Defence.** Both are kept in the root (library memory, `meta::Root::fence_mode`,
//! `exit_key`). The test reads the test binary's symbol table: no such static exists.
//!
//! # Safety
//!
//! None needed beyond reading our own executable: no unsafe code.

use mpkvirt::{Config, DomainOptions, Emulated, Manager, Rights};

/// `(name, value)` of the symbols of `/proc/self/exe` whose name contains `part`.
fn symbols(part: &str) -> Vec<(String, u64)> {
    let d = std::fs::read("/proc/self/exe").unwrap();
    let u16_at = |o: usize| u16::from_le_bytes(d[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap());
    let (shoff, shentsize, shnum) = (u64_at(0x28) as usize, u16_at(0x3a), u16_at(0x3c));
    let mut out = Vec::new();
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        if u32_at(sh + 4) != 2 {
            continue; // SHT_SYMTAB
        }
        let (off, size, link, entsize) = (
            u64_at(sh + 0x18) as usize,
            u64_at(sh + 0x20) as usize,
            u32_at(sh + 0x28),
            u64_at(sh + 0x38) as usize,
        );
        let strtab = u64_at(shoff + link * shentsize + 0x18) as usize;
        for s in (off..off + size).step_by(entsize) {
            let name_at = strtab + u32_at(s);
            let end = d[name_at..].iter().position(|&b| b == 0).unwrap();
            let name = String::from_utf8_lossy(&d[name_at..name_at + end]).into_owned();
            if name.contains(part) {
                out.push((name, u64_at(s + 8)));
            }
        }
    }
    out
}

/// Statics of mpkvirt whose values library code used inside ops.
const TRUSTED_STATICS: [&str; 2] = ["process_fence4MODE", "exit_key3KEY"];

#[test]
fn library_state_trusted_by_ops_is_in_no_static() {
    // Use the library (ops, arenas, views), so that the linker keeps all of it.
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), Config::default()).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    drop(mgr.enter(&[(&d, Rights::ReadWrite)]).unwrap());
    let found: Vec<(String, u64)> = TRUSTED_STATICS
        .iter()
        .flat_map(|part| symbols(part))
        .filter(|(n, _)| n.contains("mpkvirt"))
        .collect();
    assert!(
        found.is_empty(),
        "library code takes state from statics in application memory: {found:?}"
    );
    // The scan works: it finds a static that is meant to stay (the fault handler's pointer).
    assert!(
        !symbols("5arena9ARENA_MAP").is_empty(),
        "the symbol table was read"
    );
}
