//! Helpers shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses part of this module")]

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
