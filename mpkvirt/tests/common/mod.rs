//! Helpers shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses part of this module")]

pub(crate) mod map_limit;
pub(crate) mod syscalls;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use mpkvirt::Config;

/// A configuration with `keys` keys that fails at once when every key is pinned (the model
/// predicts those failures) and reserves address space in 4 GiB chunks.
pub(crate) fn config(keys: usize) -> Config {
    Config {
        max_keys: keys,
        pin_wait: Duration::ZERO,
        arena_chunk: 4 << 30,
        ..Config::default()
    }
}

/// Real backends allocate process-wide keys and install handlers: tests using them take
/// this lock so they do not run into each other.
pub(crate) fn real_backend() -> MutexGuard<'static, ()> {
    static REAL: Mutex<()> = Mutex::new(());
    REAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `(name, value)` of the symbols of `/proc/self/exe` whose name contains `part`.
pub(crate) fn symbols(part: &str) -> Vec<(String, u64)> {
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

/// The run-time address of the mpkvirt static whose mangled name contains `part` (its
/// symbol's value plus the load bias of `mpkvirt_gate_call`): where a stray write into the
/// program's statics lands.
pub(crate) fn mpkvirt_static(part: &str) -> usize {
    let gate = symbols("mpkvirt_gate_call")
        .into_iter()
        .find(|(n, _)| n == "mpkvirt_gate_call")
        .expect("mpkvirt_gate_call in the symbol table")
        .1;
    let bias = mpkvirt_asm::mpkvirt_gate_call as *const () as usize - gate as usize;
    let (_, v) = symbols(part)
        .into_iter()
        .find(|(n, _)| n.contains("mpkvirt"))
        .unwrap_or_else(|| panic!("mpkvirt's static {part} in the symbol table"));
    bias + v as usize
}

/// The process's memory mappings (lines of `/proc/self/maps`).
pub(crate) fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}
