//! A test allocator for the collections that take one ([`crate::treap::Treap`] and what is
//! built on it): it counts the bytes held through it and refuses to go past a budget, to
//! show that a collection keeps its memory where it is told and to test allocation failure.
#![allow(
    unsafe_code,
    reason = "implementing `Allocator` (an unsafe trait) by forwarding to `Global`"
)]

use std::cell::Cell;
use std::ptr::NonNull;
use std::rc::Rc;

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};

#[derive(Debug)]
struct State {
    held: Cell<usize>,
    limit: Cell<usize>,
}

/// Bytes from [`Global`], at most `limit` held at once. Clones share the count.
#[derive(Clone, Debug)]
pub(crate) struct Budget(Rc<State>);

impl Budget {
    pub(crate) fn new(limit: usize) -> Budget {
        Budget(Rc::new(State {
            held: Cell::new(0),
            limit: Cell::new(limit),
        }))
    }

    /// Bytes allocated and not yet freed.
    pub(crate) fn held(&self) -> usize {
        self.0.held.get()
    }

    /// Fails every allocation that would hold more than `limit` bytes.
    pub(crate) fn set_limit(&self, limit: usize) {
        self.0.limit.set(limit);
    }
}

// SAFETY: every block comes from `Global` and goes back to it with the layout it was
// allocated with, so blocks stay valid as long as `Global`'s do; clones share one state and
// forward to the same `Global`, so a block may be freed through any clone. The provided
// `grow`/`shrink` use `allocate` and `deallocate` below.
unsafe impl Allocator for Budget {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let held = self.held().checked_add(layout.size()).ok_or(AllocError)?;
        if held > self.0.limit.get() {
            return Err(AllocError);
        }
        let block = Global.allocate(layout)?;
        self.0.held.set(held);
        Ok(block)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        self.0.held.set(self.held() - layout.size());
        // SAFETY: the caller guarantees that `ptr` is a block of this allocator (or a clone)
        // allocated with `layout`; all of them come from `Global` with that layout.
        unsafe { Global.deallocate(ptr, layout) }
    }
}
