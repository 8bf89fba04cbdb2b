//! Atomics used by the lock-free parts (the key cache), swapped for loom's under `cfg(loom)`
//! so that the loom model in `keycache.rs` checks the real code.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Placed between the store and the load of a store-buffering (Dekker) pattern whose
/// accesses are all `SeqCst`.
///
/// In Rust's (C++20) memory model, `SeqCst` accesses alone forbid both sides reading the old
/// value, so normal builds need no fence and this compiles to nothing. loom, however, models
/// `SeqCst` loads and stores as acquire/release (tokio-rs/loom#180) and would report that
/// forbidden outcome; it does model `fence(SeqCst)`, so under `cfg(loom)` the fence restores
/// the total order the real accesses already have.
#[inline(always)]
pub(crate) fn seqcst_fence_for_loom() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}
