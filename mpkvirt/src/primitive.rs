//! Atomics used by the lock-free parts (the key cache), swapped for loom's under `cfg(loom)`
//! so that the loom model in `keycache.rs` checks the real code; and, for the loom model of
//! the allocator's free path (`alloc.rs`), loom's mutex.
//!
//! loom models `SeqCst` loads and stores as acquire/release (tokio-rs/loom#180) but does
//! model `fence(SeqCst)`; the key cache therefore states its store-load orderings with
//! explicit fences, which both the real memory model and loom understand.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// A compiler-only fence (loom has none; there it is a real `SeqCst` fence, which is at least
/// as strong).
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::compiler_fence;

#[cfg(loom)]
pub(crate) fn compiler_fence(order: Ordering) {
    loom::sync::atomic::fence(order);
}

/// A mutex loom can see: the allocator's model locks a heap with it, as the manager does
/// (`manager/lifecycle.rs::free`).
#[cfg(all(test, loom))]
pub(crate) use loom::sync::Mutex;
