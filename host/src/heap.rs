//! The host's heap: Rust's global allocator, in a domain that tenants' sandboxes cannot reach.
//!
//! Every `Box`, `Vec` and `Arc` of the host — the run queues, the application table, tasks and
//! their callbacks, the workers' stacks — holds the host's integrity: a tenant that could write
//! one could redirect the host's control flow with the worker's rights. So once a host starts
//! ([`init`], called by [`crate::runtime::Host::start`]), the process's global allocator
//! serves every new allocation from one mpkvirt domain, the *host domain*:
//!
//! - the domain has process-wide read-write rights (`Domain::set_process_wide`): every thread
//!   of the process reaches it without entering a view, and threads created later inherit it;
//! - a sandbox's rights are its own domain's only (`mpkvirt::sandbox`: the sealed PKRU denies
//!   every other key, process-wide grants included), so tenant code cannot read or write it;
//! - the allocator's state (dlmalloc's bins, its lock) lives at the start of the domain, and
//!   the one pointer to it sits alone on a page of the executable that is made read-only once
//!   set: nothing of the allocator is key-0 memory a tenant could rewrite.
//!
//! Allocations made before [`init`] stay where the C library's allocator put them (key 0) and
//! are freed there; the address says which heap a block belongs to.
//!
//! Limits. On the emulated backend rights are process-wide page protections, so the host
//! domain is open to tenants too (the runtime serializes tenants there and says so). A signal
//! handler runs with the kernel's initial PKRU, which denies the host domain: the host's
//! handlers touch no heap memory (`runtime::tenant`). Memory the heap takes from the domain
//! is never given back to the system (dlmalloc reuses it).
//!
//! # Safety
//!
//! The allocator implements `GlobalAlloc` over dlmalloc (`Dlmalloc::malloc`/`free`/`realloc`
//! with the caller's layout, as its contract asks) behind a mutex, and over the C library's
//! allocator for blocks from before [`init`]. The domain's range is reserved for the
//! process's lifetime (its manager and handle are leaked), readable and writable by every
//! thread once the grant returns, and handed out once: dlmalloc gets page runs from a bump
//! pointer over it. The anchor page holds only `Anchor` (page-aligned and page-sized).
#![allow(unsafe_code, reason = "the global allocator")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use mpkvirt::{Config, DomainOptions, Manager, Rights};

/// Address space the host domain reserves (`MAP_NORESERVE`: a page costs memory once
/// touched).
pub const RESERVE: usize = 16 << 30;

const PAGE: usize = 4096;

/// The process's global allocator: the host domain once [`init`] ran, the C library's before.
#[derive(Debug)]
pub struct HostHeap;

#[global_allocator]
static HEAP: HostHeap = HostHeap;

/// Where the heap is: alone on its page, made read-only once set.
#[repr(C, align(4096))]
struct Anchor {
    state: AtomicPtr<State>,
    base: AtomicUsize,
    end: AtomicUsize,
}

static ANCHOR: Anchor = Anchor {
    state: AtomicPtr::new(std::ptr::null_mut()),
    base: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
};

const _: () = assert!(std::mem::size_of::<Anchor>() == PAGE);

/// The allocator's state, at the start of the host domain.
struct State {
    dl: Mutex<dlmalloc::Dlmalloc<Pages>>,
}

/// dlmalloc's source of memory: page runs from a bump pointer over the domain.
struct Pages {
    next: AtomicUsize,
    end: usize,
}

// SAFETY: `alloc` hands out each byte of `[next, end)` at most once (the bump pointer only
// grows; dlmalloc calls it under the heap's mutex), pages never handed out before, so zero;
// nothing is remapped or released (the methods that would say so refuse).
unsafe impl dlmalloc::Allocator for Pages {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let Some(size) = size.checked_next_multiple_of(PAGE) else {
            return (std::ptr::null_mut(), 0, 0);
        };
        let at = self.next.load(Ordering::Relaxed);
        match at.checked_add(size) {
            Some(end) if end <= self.end => {
                self.next.store(end, Ordering::Relaxed);
                (at as *mut u8, size, 0)
            }
            _ => (std::ptr::null_mut(), 0, 0),
        }
    }
    fn remap(&self, _: *mut u8, _: usize, _: usize, _: bool) -> *mut u8 {
        std::ptr::null_mut()
    }
    fn free_part(&self, _: *mut u8, _: usize, _: usize) -> bool {
        false
    }
    fn free(&self, _: *mut u8, _: usize) -> bool {
        false
    }
    fn can_release_part(&self, _: u32) -> bool {
        false
    }
    fn allocates_zeros(&self) -> bool {
        true
    }
    fn page_size(&self) -> usize {
        PAGE
    }
}

fn state() -> Option<&'static State> {
    let p = ANCHOR.state.load(Ordering::Acquire);
    // SAFETY: set once by `activate` to the state it wrote at the domain's start, which lives
    // (and stays reachable) for the rest of the process.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Whether `p` came from the host domain (rather than from before [`init`]).
fn in_heap(p: *mut u8) -> bool {
    let a = p as usize;
    a >= ANCHOR.base.load(Ordering::Acquire) && a < ANCHOR.end.load(Ordering::Acquire)
}

fn dl(st: &State) -> std::sync::MutexGuard<'_, dlmalloc::Dlmalloc<Pages>> {
    // (dlmalloc does not panic while the lock is held; a poisoned lock's state is whole.)
    st.dl
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// SAFETY: each method forwards the caller's layout to the allocator that owns the block:
// dlmalloc for blocks inside the host domain (its contract: the same size and alignment as at
// allocation, which `GlobalAlloc`'s callers guarantee), the C library's otherwise.
unsafe impl GlobalAlloc for HostHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match state() {
            // SAFETY: a non-zero-sized layout (`GlobalAlloc`'s contract), under the lock.
            Some(st) => unsafe { dl(st).malloc(layout.size(), layout.align()) },
            // SAFETY: as the caller's contract.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match state() {
            // SAFETY: as in `alloc`.
            Some(st) => unsafe { dl(st).calloc(layout.size(), layout.align()) },
            // SAFETY: as the caller's contract.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match state() {
            // SAFETY: a block of the host domain, allocated by dlmalloc with `layout`.
            Some(st) if in_heap(ptr) => unsafe { dl(st).free(ptr, layout.size(), layout.align()) },
            // SAFETY: a block from before `init`, the C library's.
            _ => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(st) = state() else {
            // SAFETY: as the caller's contract.
            return unsafe { System.realloc(ptr, layout, new_size) };
        };
        if in_heap(ptr) {
            // SAFETY: a block of the host domain, allocated by dlmalloc with `layout`.
            return unsafe { dl(st).realloc(ptr, layout.size(), layout.align(), new_size) };
        }
        // A block from before `init` moves into the host domain.
        // SAFETY: `new_size` is non-zero and, rounded to the alignment, fits (the caller's
        // contract).
        let new = unsafe { dl(st).malloc(new_size, layout.align()) };
        if !new.is_null() {
            // SAFETY: both blocks hold the smaller of the sizes; they are distinct blocks.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: the old block, the C library's, no longer used.
            unsafe { System.dealloc(ptr, layout) };
        }
        new
    }
}

/// Why the host domain could not be set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapError(pub String);

impl std::fmt::Display for HeapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the host domain: {}", self.0)
    }
}

impl std::error::Error for HeapError {}

/// Moves the global allocator into the host domain (once per process; later calls return
/// the first one's result).
///
/// # Errors
///
/// When mpkvirt cannot create the domain or grant it to every thread (a thread that blocks
/// mpkvirt's sync signal): the heap then stays the C library's, and a host must not start.
pub fn init() -> Result<(), HeapError> {
    static INIT: OnceLock<Result<(), HeapError>> = OnceLock::new();
    INIT.get_or_init(activate).clone()
}

/// Whether new allocations come from the host domain.
pub fn is_active() -> bool {
    state().is_some()
}

/// Whether `addr` lies in the host domain.
pub fn contains(addr: usize) -> bool {
    is_active() && in_heap(addr as *mut u8)
}

fn activate() -> Result<(), HeapError> {
    let err = |e: mpkvirt::Error| HeapError(e.to_string());
    // One key: the host domain is never evicted (a process-wide grant pins it).
    let mgr = Manager::new(Config {
        max_keys: 1,
        ..Config::default()
    })
    .map_err(err)?;
    let dom = mgr
        .create_domain(DomainOptions::reserve(RESERVE))
        .map_err(err)?;
    dom.set_process_wide(Some(Rights::ReadWrite)).map_err(err)?;
    // A grant reaches other threads lazily, at their first fault on the domain; a thread
    // whose first touch of the heap comes from a context the library cannot take for its
    // normal one would not get it there. Every thread takes it now.
    mpkvirt::thread::sync_process_wide().map_err(err)?;
    let (base, len) = (dom.base().as_ptr() as usize, dom.len());
    let first = std::mem::size_of::<State>().next_multiple_of(PAGE);
    let st = base as *mut State;
    // SAFETY: the domain's first pages, readable and writable by this thread since the grant
    // returned, which nothing else uses (`Pages` starts after them); aligned (page).
    unsafe {
        st.write(State {
            dl: Mutex::new(dlmalloc::Dlmalloc::new_with_allocator(Pages {
                next: AtomicUsize::new(base + first),
                end: base + len,
            })),
        })
    };
    // The domain lives as long as the process (from here on the heap serves from it).
    std::mem::forget(dom);
    std::mem::forget(mgr);
    ANCHOR.base.store(base, Ordering::Release);
    ANCHOR.end.store(base + len, Ordering::Release);
    ANCHOR.state.store(st, Ordering::Release);
    // SAFETY: the anchor's own page (page-aligned, page-sized: nothing else shares it),
    // written for the last time above.
    unsafe {
        mpkvirt_sys::mman::mprotect(
            (&raw const ANCHOR).cast_mut().cast(),
            PAGE,
            mpkvirt::Prot::READ,
        )
    }
    .map_err(|e| HeapError(format!("sealing the anchor: {e}")))?;
    Ok(())
}
