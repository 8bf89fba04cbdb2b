//! Loading a validated tenant shared object and calling its entry point.
//!
//! [`NativeFunction::load`] reads the file, validates it ([`super::image::validate`]), and
//! maps it with `dlopen(RTLD_NOW | RTLD_LOCAL)`: every symbol is bound at load (an unresolved
//! one is a load error, not a crash at the first call), and none of the object's symbols
//! become visible to other objects. Validation refused code that would run while the object
//! is loaded or unloaded (constructors, destructors, IFUNC resolvers), instructions that
//! change PKRU or the thread pointer, and imports outside the allowed list; the object is
//! never unloaded (`dlclose` would walk the dynamic linker's lists, key-0 memory). The
//! imports of `image::REBOUND_IMPORTS` (the allocator, `abort`) are rebound to the
//! runtime's, and the object's writable segments become read-only. `load` stays `unsafe`:
//! the dynamic linker trusts the object's tables.
//!
//! [`NativeFunction::call`] runs the entry with a [`HostApi`] table. It runs the tenant's code
//! *with the caller's rights*: the runtime calls it on an instance's green thread, inside the
//! instance's view; this module only knows the ABI (`include/mpkvirt_fn.h`).
//!
//! # Safety
//!
//! `dlopen`/`dlsym`/`dlclose` and calls through the function pointers they give. The object
//! was validated first; what its code does when called is the caller's contract
//! ([`NativeFunction::call`] is `unsafe`).
#![allow(unsafe_code, reason = "dlopen and calls into the tenant's code")]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::image::{self, ENTRY, ImageError};

/// `struct mpkvirt_host_api` (`include/mpkvirt_fn.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HostApi {
    /// `MPKVIRT_FN_ABI_VERSION`.
    pub version: u32,
    /// Memory for the tenant (NULL when its quota is spent).
    pub alloc: unsafe extern "C" fn(len: usize) -> *mut c_void,
    /// Gives memory from `alloc` back.
    pub free: unsafe extern "C" fn(p: *mut c_void),
    /// A line for the host's log.
    pub log: unsafe extern "C" fn(msg: *const c_char, len: usize),
    /// Nanoseconds of a monotonic clock.
    pub time_ns: unsafe extern "C" fn() -> u64,
    /// Random bytes; 0 on success.
    pub random: unsafe extern "C" fn(buf: *mut c_void, len: usize) -> c_int,
    /// Another function's invocation; 0 on success.
    pub invoke: unsafe extern "C" fn(
        name: *const c_char,
        name_len: usize,
        request: *const u8,
        request_len: usize,
        response: *mut *mut u8,
        response_len: *mut usize,
    ) -> c_int,
}

/// `struct mpkvirt_response`.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) data: *mut u8,
    pub(crate) len: usize,
}

/// The entry's type (`mpkvirt_fn_entry`).
pub(crate) type Entry = unsafe extern "C" fn(
    host: *const HostApi,
    request: *const u8,
    request_len: usize,
    response: *mut Response,
) -> c_int;

/// Why an object could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read.
    Read(std::io::Error),
    /// Validation refused it.
    Invalid(ImageError),
    /// The dynamic linker refused it (an unresolved symbol, a missing library), with its
    /// message.
    Link(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read(e) => write!(f, "cannot read the object: {e}"),
            LoadError::Invalid(e) => write!(f, "invalid object: {e}"),
            LoadError::Link(e) => write!(f, "cannot link the object: {e}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// How a call ended without a response.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CallError {
    /// The entry returned this non-zero code.
    Failed(c_int),
    /// It returned 0 but left a null response with a non-zero length.
    BadResponse,
}

/// A loaded tenant function.
#[derive(Debug)]
pub struct NativeFunction {
    handle: *mut c_void,
    entry: Entry,
    /// Its read-only segments as mapped, `(start, end)`.
    read_only: Vec<(usize, usize)>,
}

// SAFETY: the handle and the entry are process-wide (dlopen's handle may be used from any
// thread); calls are `unsafe` and their contract is the caller's.
unsafe impl Send for NativeFunction {}
// SAFETY: as above: `&NativeFunction` only reads the two pointers.
unsafe impl Sync for NativeFunction {}

/// Points the object's references to the C library functions of `image::REBOUND_IMPORTS`
/// (found by validation) at the runtime's (`runtime::tenant::rebound`), then makes every
/// writable segment of the object read-only. `bias`: where the object's virtual address 0
/// was mapped. Each word lies in a writable segment (validation checked every relocation).
fn rebind_and_seal(info: &image::ImageInfo, bias: usize) -> Result<(), LoadError> {
    if bias == 0 {
        return Err(LoadError::Link(
            "the object's load address is unknown (dladdr)".into(),
        ));
    }
    let page = 4096usize;
    let pages = |at: usize, len: usize| (at & !(page - 1), (at + len).next_multiple_of(page));
    let protect = |(start, end): (usize, usize), p: mpkvirt_sys::mman::Prot, what: &str| {
        // SAFETY: pages of the object's writable segments, mapped by the dynamic linker for
        // the object alone (segments start on a page of their own); no code of the object
        // runs meanwhile (it was just loaded), and the C library writes nothing there after
        // linking (the object has no destructors, TLS or lazy bindings).
        unsafe { mpkvirt_sys::mman::mprotect(start as *mut u8, end - start, p) }
            .map_err(|e| LoadError::Link(format!("{what}: {e}")))
    };
    for &(vaddr, name) in &info.rebinds {
        let to = crate::runtime::tenant::rebound(name)
            .ok_or_else(|| LoadError::Link(format!("no binding for {name}")))?;
        let at = bias + vaddr as usize;
        // (The word may be in the RELRO range the dynamic linker already made read-only.)
        protect(
            pages(at, 8),
            mpkvirt_sys::mman::Prot::READ_WRITE,
            &format!("rebinding {name}"),
        )?;
        // SAFETY: an 8-byte word of the object's data, writable now (above); the dynamic
        // linker wrote the C library's function there, which nothing reads until the
        // object's code runs.
        unsafe { (at as *mut usize).write_unaligned(to) };
    }
    for &(vaddr, len) in &info.writable {
        protect(
            pages(bias + vaddr as usize, len as usize),
            mpkvirt_sys::mman::Prot::READ,
            "making the object's data read-only",
        )?;
    }
    Ok(())
}

/// Whether the ELF header and program headers mapped at `base` are those of `bytes` (a
/// validated object: its program headers lie in its first page, which its first segment
/// maps at `base`).
fn same_headers(bytes: &[u8], base: usize) -> bool {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let phoff = bytes
        .get(0x20..0x28)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let (Some(phoff), Some(entsize), Some(num)) = (phoff, u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let len = phoff
        .saturating_add(entsize.saturating_mul(num))
        .clamp(64, 4096)
        .min(bytes.len());
    // SAFETY: `base` is where the dynamic linker mapped the object's first segment (from
    // `dladdr`), readable and at least a page long; `len` is at most a page.
    let mapped = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
    mapped == &bytes[..len]
}

/// `dlerror()`'s message, or a placeholder.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a C string valid until the next dl* call on this
    // thread, copied out at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "(no message)".into()
    } else {
        // SAFETY: non-null: a NUL-terminated string from the dynamic linker.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl NativeFunction {
    /// Reads, validates and links the object at `path`.
    ///
    /// # Errors
    ///
    /// [`LoadError`]: unreadable, refused by validation, or by the dynamic linker.
    ///
    /// # Safety
    ///
    /// Linking runs the object's constructors and IFUNC resolvers on the calling thread
    /// with its rights, as [`NativeFunction::call`] runs its entry: the caller provides the
    /// isolation.
    pub unsafe fn load(path: &Path) -> Result<NativeFunction, LoadError> {
        let bytes = std::fs::read(path).map_err(LoadError::Read)?;
        let info = image::validate(&bytes).map_err(LoadError::Invalid)?;
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| LoadError::Link("a path with a NUL byte".into()))?;
        // SAFETY: a NUL-terminated path; what the object's code does while it is linked is
        // the caller's contract (see above).
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(LoadError::Link(dl_error()));
        }
        let name = CString::new(ENTRY).expect("no NUL");
        // SAFETY: a live handle and a NUL-terminated name.
        let sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if sym.is_null() {
            let e = dl_error();
            // SAFETY: the handle from above, closed once.
            unsafe { libc::dlclose(handle) };
            return Err(LoadError::Link(e));
        }
        // SAFETY: validation found `ENTRY` as a function symbol of the object; the ABI
        // header declares its type.
        let entry = unsafe { std::mem::transmute::<*mut c_void, Entry>(sym) };
        // Where the object was mapped: its ELF header's address, from the entry's symbol.
        let mut dl = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
        // SAFETY: `sym` is an address inside the object just linked; `dl` is valid for writes.
        let found = unsafe { libc::dladdr(sym, dl.as_mut_ptr()) } != 0;
        let base = if found {
            // SAFETY: zero-initialised (pointers may be null), and filled by dladdr.
            unsafe { dl.assume_init() }.dli_fbase as usize
        } else {
            0
        };
        let low = info.read_only.iter().map(|&(v, _)| v).min().unwrap_or(0) as usize & !4095;
        let read_only = if base == 0 {
            Vec::new()
        } else {
            info.read_only
                .iter()
                .map(|&(v, len)| {
                    let start = base - low + v as usize;
                    (start, start + len as usize)
                })
                .collect()
        };
        // The object the dynamic linker mapped must be the one validated: `dlopen` of a path
        // loaded before returns the old mapping, whose file may have been replaced since
        // (the rebinding would then write where the new file's tables say).
        if base != 0 && !same_headers(&bytes, base) {
            return Err(LoadError::Link(
                "the object mapped is not the file validated (replaced since it was first loaded?)"
                    .into(),
            ));
        }
        if let Err(e) = rebind_and_seal(&info, base - low) {
            // SAFETY: the handle from above, closed once; nothing of the object runs.
            unsafe { libc::dlclose(handle) };
            return Err(e);
        }
        Ok(NativeFunction {
            handle,
            entry,
            read_only,
        })
    }

    /// Its read-only segments as mapped (`(start, end)`): host calls may read there.
    pub(crate) fn read_only(&self) -> &[(usize, usize)] {
        &self.read_only
    }

    /// The entry's address (the runtime calls it inside an instance's sandbox).
    pub(crate) fn entry_addr(&self) -> usize {
        self.entry as usize
    }

    /// Calls the entry with `request` and `host`; returns the response's bytes (copied out,
    /// and the tenant's buffer given back with `host.free`).
    ///
    /// # Errors
    ///
    /// [`CallError`] when the entry reports a failure or an inconsistent response.
    ///
    /// # Safety
    ///
    /// The tenant's code runs on the calling thread with its rights: the caller provides the
    /// isolation (an instance's view) and a `host` table whose functions are safe to call
    /// with any arguments the tenant passes.
    pub unsafe fn call(&self, host: &HostApi, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let mut resp = Response {
            data: std::ptr::null_mut(),
            len: 0,
        };
        // SAFETY: the caller's contract (see above); the arguments follow the ABI.
        let rc = unsafe { (self.entry)(host, request.as_ptr(), request.len(), &raw mut resp) };
        if rc != 0 {
            return Err(CallError::Failed(rc));
        }
        if resp.data.is_null() {
            return if resp.len == 0 {
                Ok(Vec::new())
            } else {
                Err(CallError::BadResponse)
            };
        }
        // SAFETY: the tenant returned `len` bytes it wrote at `data` (memory from
        // `host.alloc`), per the ABI; the caller's contract covers a tenant that lies.
        let out = unsafe { std::slice::from_raw_parts(resp.data, resp.len) }.to_vec();
        // SAFETY: `data` came from `host.alloc` (the ABI), given back once.
        unsafe { (host.free)(resp.data.cast()) };
        Ok(out)
    }
}

impl Drop for NativeFunction {
    fn drop(&mut self) {
        // The object stays mapped: `dlclose` would walk the dynamic linker's lists (key-0
        // memory a tenant may have rewritten) with the dropping thread's rights. Validation
        // refused destructors, so there is nothing to run either. A path loaded again gets
        // the same handle.
        let _ = self.handle;
    }
}
