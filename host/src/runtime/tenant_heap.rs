//! A native tenant's `malloc`, `calloc`, `realloc` and `free`: an allocator in its own
//! instance.
//!
//! The loader points the object's references to the C library's allocator at the functions
//! here (`app::native`, `image::REBOUND_IMPORTS`). They run inside the tenant's sandbox, with
//! its rights, and keep a dlmalloc in the instance: its state and its memory come from the
//! host's `alloc` call (chunks of [`CHUNK`] bytes or more, within the invocation's memory
//! quota, given back by the host when the invocation ends). Nothing is shared with the C
//! library's allocator or with another instance, so a tenant preempted or abandoned in the
//! middle of an allocation leaves no lock held anywhere but in its own (discarded) heap.
//!
//! The state is found from the sandbox's exit stack pointer, which the library keeps
//! ([`mpkvirt::sandbox::query`]: one library call per allocation, no system call): the word at it (a [`Header`] just above the stack, written
//! by the worker for each invocation) holds the heap's address, 0 until the first
//! allocation. A tenant that rewrites the word reaches nothing it could not write already:
//! the functions run with its rights.
//!
//! Outside a sandbox (a tenant called directly, as `NativeFunction::call` does in tests) they
//! use the C library's allocator.
//!
//! # Safety
//!
//! The functions follow the C allocator's contract for the pointers they hand out. Inside a
//! sandbox they dereference the header at the sandbox's exit stack pointer (inside the
//! instance, checked by `S_RUN`) and the heap state it names, both written by this module in
//! memory the instance owns (a tenant that corrupts them faults or corrupts its own heap).
#![allow(unsafe_code, reason = "a C allocator for tenant code")]

use std::ffi::c_void;

use mpkvirt::sandbox::{self, Query};

use super::tenant::{CALL_ALLOC, host_call};

/// Bytes above the top of each invocation's stack for the [`Header`].
pub(crate) const HEADER: usize = 64;

/// Where a tenant's heap is found: at the sandbox's exit stack pointer.
#[repr(C)]
pub(crate) struct Header {
    /// The heap's state in the instance, 0 before the invocation's first allocation.
    pub(crate) heap: u64,
}

/// The least memory the heap asks the host for at a time.
const CHUNK: usize = 16 << 10;

/// dlmalloc's source of memory: the host's `alloc`, in the instance.
struct Chunks;

// SAFETY: `alloc` returns memory the host allocated in the instance for this invocation,
// never handed out twice; it may hold an earlier invocation's bytes of the same application
// (a warm slot), so `allocates_zeros` says no; nothing is released early (the host takes
// every chunk back when the invocation ends).
unsafe impl dlmalloc::Allocator for Chunks {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let size = size.max(CHUNK).next_multiple_of(4096);
        let p = host_call(CALL_ALLOC, [size as u64, 0, 0, 0, 0, 0]);
        if p == 0 || p & (1 << 63) != 0 {
            return (std::ptr::null_mut(), 0, 0);
        }
        (p as *mut u8, size, 0)
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
        false
    }
    fn page_size(&self) -> usize {
        4096
    }
}

type Heap = dlmalloc::Dlmalloc<Chunks>;

/// The sandboxed invocation's heap, made at its first use; `None` outside a sandbox, or
/// when the quota has no room for the heap's state.
fn heap() -> Option<Option<&'static mut Heap>> {
    let Query::Sandboxed { exit_sp } = sandbox::query(None) else {
        return None;
    };
    let header = exit_sp as *mut Header;
    // SAFETY: the header the worker wrote at the exit stack pointer, inside the instance
    // (the library checked `exit_sp` against the domain when the sandbox started).
    let at = unsafe { (*header).heap };
    if at != 0 {
        // SAFETY: the state this function placed there at the invocation's first allocation
        // (see the module docs for a tenant that rewrote the word).
        return Some(Some(unsafe { &mut *(at as *mut Heap) }));
    }
    let p = host_call(CALL_ALLOC, [size_of::<Heap>() as u64, 0, 0, 0, 0, 0]);
    if p == 0 || p & (1 << 63) != 0 {
        return Some(None);
    }
    let state = p as *mut Heap;
    let mut h = Heap::new_with_allocator(Chunks);
    // Chunks as small as the quota may be (dlmalloc's default asks for 64 KiB at a time).
    h.set_granularity(CHUNK);
    // SAFETY: fresh memory of the heap's size from the host (16-aligned), in the instance.
    unsafe { state.write(h) };
    // SAFETY: the header, as above.
    unsafe { (*header).heap = p };
    // SAFETY: just written.
    Some(Some(unsafe { &mut *state }))
}

/// `malloc`.
pub(crate) unsafe extern "C" fn tenant_malloc(size: usize) -> *mut c_void {
    match heap() {
        // SAFETY: dlmalloc's C-shaped entry point, any size.
        Some(Some(h)) => unsafe { h.c_malloc(size) }.cast(),
        Some(None) => std::ptr::null_mut(),
        // SAFETY: the C library's, outside a sandbox.
        None => unsafe { libc::malloc(size) },
    }
}

/// `calloc`.
pub(crate) unsafe extern "C" fn tenant_calloc(n: usize, size: usize) -> *mut c_void {
    let Some(bytes) = n.checked_mul(size) else {
        return std::ptr::null_mut();
    };
    match heap() {
        Some(Some(h)) => {
            // SAFETY: as in `tenant_malloc`.
            let p = unsafe { h.c_malloc(bytes) };
            if !p.is_null() {
                // SAFETY: the block just allocated, `bytes` long.
                unsafe { std::ptr::write_bytes(p, 0, bytes) };
            }
            p.cast()
        }
        Some(None) => std::ptr::null_mut(),
        // SAFETY: the C library's, outside a sandbox.
        None => unsafe { libc::calloc(n, size) },
    }
}

/// `realloc`.
pub(crate) unsafe extern "C" fn tenant_realloc(p: *mut c_void, size: usize) -> *mut c_void {
    match heap() {
        // SAFETY: `p` is null or a block of this heap (the C contract), resized or moved.
        Some(Some(h)) => unsafe { h.c_realloc(p.cast(), size) }.cast(),
        Some(None) => std::ptr::null_mut(),
        // SAFETY: the C library's, outside a sandbox.
        None => unsafe { libc::realloc(p, size) },
    }
}

/// `free`.
pub(crate) unsafe extern "C" fn tenant_free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    match heap() {
        // SAFETY: a block of this heap (the C contract).
        Some(Some(h)) => unsafe { h.c_free(p.cast()) },
        Some(None) => {}
        // SAFETY: the C library's, outside a sandbox.
        None => unsafe { libc::free(p) },
    }
}
