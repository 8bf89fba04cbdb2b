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

mod common;

use common::symbols;
use mpkvirt::{Config, DomainOptions, Emulated, Manager, Rights};

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
