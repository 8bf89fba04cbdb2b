//! The tenant ABI of `include/mpkvirt_fn.h` for tenants written in Rust: `no_std`, no
//! dependencies, built as `cdylib`s by `host/build.rs` (one file each, with this module).
//!
//! A Rust tenant imports nothing but what `core` needs from the C library (`memcpy` and
//! friends, `abort`), which the host's loader allows, and allocates only through the host
//! table — in its own instance.

use core::ffi::{c_char, c_int, c_void};

/// `MPKVIRT_FN_ABI_VERSION`.
pub const ABI_VERSION: u32 = 1;

/// `struct mpkvirt_host_api`.
#[repr(C)]
pub struct HostApi {
    pub version: u32,
    pub alloc: unsafe extern "C" fn(usize) -> *mut c_void,
    pub free: unsafe extern "C" fn(*mut c_void),
    pub log: unsafe extern "C" fn(*const c_char, usize),
    pub time_ns: unsafe extern "C" fn() -> u64,
    pub random: unsafe extern "C" fn(*mut c_void, usize) -> c_int,
    pub invoke: unsafe extern "C" fn(
        *const c_char,
        usize,
        *const u8,
        usize,
        *mut *mut u8,
        *mut usize,
    ) -> c_int,
}

/// `struct mpkvirt_response`.
#[repr(C)]
pub struct Response {
    pub data: *mut u8,
    pub len: usize,
}

unsafe extern "C" {
    safe fn abort() -> !;
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SIGABRT: the runtime ends the invocation.
    abort()
}

/// The unwinding personality the precompiled `core` refers to; never called (the tenants are
/// built with `-C panic=abort`). Defined here so that the object imports nothing but the C
/// library's functions the loader allows.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Bytes in instance memory from the host's `alloc`, grown by copying into a larger block.
pub struct Buf<'h> {
    host: &'h HostApi,
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

impl<'h> Buf<'h> {
    /// An empty buffer with room for `cap` bytes; `None` when the instance's quota is spent.
    pub fn with_capacity(host: &'h HostApi, cap: usize) -> Option<Buf<'h>> {
        let cap = cap.max(16);
        // SAFETY: the host's allocator (any size; null when it refuses).
        let ptr = unsafe { (host.alloc)(cap) }.cast::<u8>();
        (!ptr.is_null()).then_some(Buf {
            host,
            ptr,
            len: 0,
            cap,
        })
    }

    fn grow(&mut self, need: usize) -> Option<()> {
        let cap = need.checked_next_power_of_two()?.max(self.cap * 2);
        // SAFETY: as in `with_capacity`.
        let ptr = unsafe { (self.host.alloc)(cap) }.cast::<u8>();
        if ptr.is_null() {
            return None;
        }
        // SAFETY: the old block holds `len` bytes, the new one `cap` > `len`; distinct blocks.
        unsafe { core::ptr::copy_nonoverlapping(self.ptr, ptr, self.len) };
        // SAFETY: the old block, from the host's `alloc`, no longer used.
        unsafe { (self.host.free)(self.ptr.cast()) };
        self.ptr = ptr;
        self.cap = cap;
        Some(())
    }

    /// Appends `b`; `None` when the quota is spent.
    #[inline]
    pub fn push(&mut self, b: u8) -> Option<()> {
        if self.len == self.cap {
            self.grow(self.len + 1)?;
        }
        // SAFETY: `len < cap`, inside the block.
        unsafe { self.ptr.add(self.len).write(b) };
        self.len += 1;
        Some(())
    }

    /// The bytes so far.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the block are initialized.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Hands the bytes to the host as the response.
    pub fn respond(self, response: &mut Response) {
        response.data = self.ptr;
        response.len = self.len;
        core::mem::forget(self);
    }
}

impl Drop for Buf<'_> {
    fn drop(&mut self) {
        // SAFETY: the block from the host's `alloc`, no longer used.
        unsafe { (self.host.free)(self.ptr.cast()) };
    }
}

/// The entry's arguments as Rust types: the host table and the request.
///
/// # Safety
///
/// The pointers the host passes to `mpkvirt_fn_entry` (`include/mpkvirt_fn.h`).
pub unsafe fn args<'a>(
    host: *const HostApi,
    request: *const u8,
    request_len: usize,
    response: *mut Response,
) -> (&'a HostApi, &'a [u8], &'a mut Response) {
    // SAFETY: the caller's contract: a host table, `request_len` bytes, a response slot.
    unsafe {
        (
            &*host,
            if request_len == 0 {
                &[]
            } else {
                core::slice::from_raw_parts(request, request_len)
            },
            &mut *response,
        )
    }
}
