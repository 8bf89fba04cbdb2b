//! A table of records that never move: index → record, readable without a lock.
//!
//! Records live in chunks of [`CHUNK`] that are allocated once and never freed or moved while
//! the table lives, so a reference obtained from [`Slab::get`] stays valid for the table's
//! life even while other threads grow it. The chunk pointers sit in a *top* array that is
//! replaced (doubled) when full; old top arrays are kept until the table is dropped, so a
//! reader that loaded an old top still reads valid pointers. Growing takes `&mut`-free
//! `&self` but must be serialised by the caller (the manager's lock).
//!
//! Records are reused rather than freed: a record carries its own liveness (a uid), checked
//! by whoever looks it up.
//!
//! # Safety
//!
//! Chunks and top arrays are allocated in the metadata region and published with release
//! stores; readers acquire-load the top pointer and then the chunk pointer, so every record
//! they reach is initialised. Nothing is freed before the slab itself is dropped (`&mut
//! self`, no readers left).
#![allow(unsafe_code, reason = "lock-free reads of never-moving chunks")]

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::meta::{MBox, MVec, Meta};

/// Records per chunk.
pub(crate) const CHUNK: usize = 256;

struct Top<T> {
    chunks: MBox<[AtomicPtr<[T; CHUNK]>]>,
}

/// See the module docs.
pub(crate) struct Slab<T: Default> {
    top: AtomicPtr<Top<T>>,
    /// Records handed out so far (the next index).
    len: AtomicUsize,
    /// Every top array ever published (the current one last), freed on drop.
    tops: std::sync::Mutex<MVec<*mut Top<T>>>,
}

// SAFETY: the slab hands out `&T` to any thread (T: Sync) and moves records between threads
// only as part of the slab (T: Send); its own pointers are published with release/acquire.
unsafe impl<T: Default + Send + Sync> Sync for Slab<T> {}
// SAFETY: as above.
unsafe impl<T: Default + Send + Sync> Send for Slab<T> {}

impl<T: Default> std::fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slab")
            .field("len", &self.len.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T: Default> Slab<T> {
    /// An empty table.
    pub(crate) fn new() -> Slab<T> {
        Slab {
            top: AtomicPtr::new(std::ptr::null_mut()),
            len: AtomicUsize::new(0),
            tops: std::sync::Mutex::new(MVec::new_in(Meta)),
        }
    }

    /// The record at `idx`, if it was ever handed out.
    #[inline]
    pub(crate) fn get(&self, idx: u32) -> Option<&T> {
        let idx = idx as usize;
        if idx >= self.len.load(Ordering::Acquire) {
            return None;
        }
        let top = self.top.load(Ordering::Acquire);
        // SAFETY: `len` > idx was published after the chunk holding `idx` and a top pointing
        // to it (release in `push`); top arrays are never freed while the slab lives.
        let top = unsafe { &*top };
        let chunk = top.chunks.get(idx / CHUNK)?.load(Ordering::Acquire);
        // SAFETY: as above: the chunk was published before `len` covered `idx`, is never
        // freed or moved while the slab lives, and holds initialised records.
        Some(unsafe { &(*chunk)[idx % CHUNK] })
    }

    /// Hands out the next record index (a fresh, default record). Callers serialise pushes.
    pub(crate) fn push(&self) -> Option<u32> {
        let idx = self.len.load(Ordering::Relaxed);
        let n = u32::try_from(idx).ok()?;
        if idx.is_multiple_of(CHUNK) {
            let chunk_no = idx / CHUNK;
            let mut top = self.top.load(Ordering::Relaxed);
            // SAFETY: a published top array (or null), never freed while the slab lives.
            let old: Option<&Top<T>> = unsafe { top.as_ref() };
            let cap = old.map_or(0, |t| t.chunks.len());
            if chunk_no >= cap {
                let new_cap = (cap * 2).max(4);
                let mut chunks = MVec::with_capacity_in(new_cap, Meta);
                for i in 0..new_cap {
                    let p = old.map_or(std::ptr::null_mut(), |t| {
                        t.chunks
                            .get(i)
                            .map_or(std::ptr::null_mut(), |c| c.load(Ordering::Relaxed))
                    });
                    chunks.push(AtomicPtr::new(p));
                }
                let new = MBox::into_raw(MBox::new_in(
                    Top {
                        chunks: chunks.into_boxed_slice(),
                    },
                    Meta,
                ));
                crate::meta::lock(&self.tops).push(new);
                self.top.store(new, Ordering::Release);
                top = new;
            }
            // Built in place: a chunk can be larger than a library stack.
            let mut chunk = MBox::<[T; CHUNK]>::new_uninit_in(Meta);
            let first = chunk.as_mut_ptr().cast::<T>();
            for k in 0..CHUNK {
                // SAFETY: `first + k` lies inside the freshly allocated, uninitialised array of
                // CHUNK elements; each element is written exactly once here.
                let slot = first.wrapping_add(k);
                // SAFETY: as above.
                unsafe { slot.write(T::default()) };
            }
            // SAFETY: every element was initialised above.
            let chunk = unsafe { chunk.assume_init() };
            // SAFETY: `top` is the current, published top array, never freed while the slab
            // lives.
            let top: &Top<T> = unsafe { &*top };
            top.chunks[chunk_no].store(MBox::into_raw(chunk), Ordering::Release);
        }
        self.len.store(idx + 1, Ordering::Release);
        Some(n)
    }
}

impl<T: Default> Drop for Slab<T> {
    fn drop(&mut self) {
        let tops = std::mem::replace(
            self.tops.get_mut().unwrap_or_else(|e| e.into_inner()),
            MVec::new_in(Meta),
        );
        if let Some(&last) = tops.last() {
            // SAFETY: `last` is the current top; no reader is left (`&mut self`). Each chunk
            // pointer was made by `MBox::into_raw` exactly once and appears in the current top
            // (tops copy the pointers of their predecessors).
            for c in unsafe { (*last).chunks.iter() } {
                let p = c.load(Ordering::Relaxed);
                if !p.is_null() {
                    // SAFETY: as above.
                    drop(unsafe { MBox::from_raw_in(p, Meta) });
                }
            }
        }
        for t in tops {
            // SAFETY: every top was made by `MBox::into_raw` once and is dropped once here.
            drop(unsafe { MBox::from_raw_in(t, Meta) });
        }
    }
}
