//! The C API: libmpk's paper interface (`mpk_*`) on mpkvirt, plus `mpkvirt_*` extensions.
//! The contract for C callers is `include/mpkvirt.h`; this file implements it.
//!
//! One process-wide [`Manager`] is created by `mpk_init`. Virtual keys are `int`s chosen by
//! the program; each names one domain, created by the first `mpk_mmap` or `mpk_malloc` for
//! it. `mpk_begin`/`mpk_end` add domains to and remove them from the calling thread's set of
//! begun domains, which is entered as one mpkvirt view whenever it changes.
//!
//! Every function reports failure by returning -1 (or `NULL`/`MAP_FAILED` for pointers) and
//! setting `errno`. No panic crosses into C: one raised inside (a bug) is caught and reported
//! as `EFAULT`, because unwinding into C is undefined behaviour.
//!
//! # Safety
//!
//! The functions are `extern "C"` entry points called from C with C's types. The unsafe
//! parts are confined to: writing `errno`, reading a C function pointer and argument for a
//! guarded call, writing the caller's `struct mpkvirt_fault`, and the `no_mangle` attribute
//! (the exported names are unique to this library). Pointers into domains are handed to C
//! as raw addresses, as the API promises; the library never dereferences them.
#![allow(
    unsafe_code,
    reason = "the C ABI: exported symbols, errno, out-parameters, C callbacks"
)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_long, c_void};
use std::os::fd::BorrowedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use mpkvirt_sys::mman::{self, Prot};
use parking_lot::RwLock;

use crate::backend::Machine;
use crate::config::Config;
use crate::domain::{Domain, DomainId, DomainOptions};
use crate::error::Error;
use crate::fault::FaultReport;
use crate::manager::{Manager, OwnedViewGuard, Rights};
use crate::{Access, BackendKind};

/// Address space reserved for each virtual key's domain beyond its first mapping.
const DOMAIN_HEADROOM: usize = 64 << 20;

struct CState {
    mgr: Manager<Machine>,
    domains: RwLock<Domains>,
}

#[derive(Default)]
struct Domains {
    by_vkey: HashMap<c_int, Arc<Domain>>,
    vkey_of: HashMap<DomainId, c_int>,
}

static STATE: OnceLock<CState> = OnceLock::new();

/// The calling thread's begun domains and the view that grants them.
#[derive(Default)]
struct Begun {
    set: Vec<(c_int, Arc<Domain>, Rights)>,
    view: Option<OwnedViewGuard>,
}

thread_local! {
    static BEGUN: RefCell<Begun> = RefCell::new(Begun::default());
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location takes no arguments and returns the calling thread's errno
    // slot.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: that slot is valid for writes for the thread's lifetime.
    unsafe { *slot = e };
}

/// Runs `f`, turning an error (or, defensively, a panic) into `errno` and `fail`.
fn ffi<T>(fail: T, f: impl FnOnce() -> Result<T, c_int>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_errno(e);
            fail
        }
        Err(_) => {
            set_errno(libc::EFAULT);
            fail
        }
    }
}

fn state() -> Result<&'static CState, c_int> {
    STATE.get().ok_or(libc::EINVAL)
}

fn domain(st: &CState, vkey: c_int) -> Result<Arc<Domain>, c_int> {
    st.domains
        .read()
        .by_vkey
        .get(&vkey)
        .cloned()
        .ok_or(libc::EINVAL)
}

fn errno_of(e: &Error) -> c_int {
    e.errno()
}

/// The domain for `vkey`, created with `reserve` bytes and `prot` if it does not exist;
/// `true` when this call created it.
fn domain_or_create(
    st: &CState,
    vkey: c_int,
    reserve: usize,
    prot: Prot,
) -> Result<(Arc<Domain>, bool), c_int> {
    if let Some(d) = st.domains.read().by_vkey.get(&vkey) {
        return Ok((Arc::clone(d), false));
    }
    let mut doms = st.domains.write();
    if let Some(d) = doms.by_vkey.get(&vkey) {
        return Ok((Arc::clone(d), false));
    }
    let d = Arc::new(
        st.mgr
            .create_domain(DomainOptions {
                reserve: Some(reserve),
                prot,
            })
            .map_err(|e| errno_of(&e))?,
    );
    doms.vkey_of.insert(d.id(), vkey);
    doms.by_vkey.insert(vkey, Arc::clone(&d));
    Ok((d, true))
}

/// `result` as an errno; when it failed and this call created `vkey`'s domain, the domain
/// is forgotten again, so that a failed call changes nothing.
fn undo_on_error<T>(
    st: &CState,
    vkey: c_int,
    d: &Domain,
    created: bool,
    result: Result<T, Error>,
) -> Result<T, c_int> {
    result.map_err(|e| {
        if created {
            let mut doms = st.domains.write();
            doms.by_vkey.remove(&vkey);
            doms.vkey_of.remove(&d.id());
        }
        errno_of(&e)
    })
}

fn prot_of(prot: c_int) -> Result<Prot, c_int> {
    Prot::from_bits(prot).ok_or(libc::EINVAL)
}

/// Re-enters the thread's begun set as one view (or none when it is empty).
fn enter_set(
    st: &CState,
    b: &mut Begun,
    set: Vec<(c_int, Arc<Domain>, Rights)>,
) -> Result<(), c_int> {
    if set.is_empty() {
        b.view = None;
    } else {
        let view: Vec<(Arc<Domain>, Rights)> =
            set.iter().map(|(_, d, r)| (Arc::clone(d), *r)).collect();
        let guard = st.mgr.enter_owned(&view).map_err(|e| errno_of(&e))?;
        // The new view is live before the old one ends, so the keys both use stay pinned.
        b.view = Some(guard);
    }
    b.set = set;
    Ok(())
}

/// `int mpk_init(int evict_rate)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_init(evict_rate: c_int) -> c_int {
    ffi(-1, || {
        let _ = evict_rate; // every value evicts on a miss, as libmpk's -1 (see the header)
        if STATE.get().is_some() {
            return Err(libc::EBUSY);
        }
        let config = Config::from_env().map_err(|e| errno_of(&e))?;
        let mgr = Manager::new(config).map_err(|e| errno_of(&e))?;
        STATE
            .set(CState {
                mgr,
                domains: RwLock::new(Domains::default()),
            })
            .map_err(|_| libc::EBUSY)?;
        Ok(0)
    })
}

/// `void *mpk_mmap(int vkey, void *addr, size_t len, int prot, int flags, int fd, off_t offset)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_mmap(
    vkey: c_int,
    _addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: c_long,
) -> *mut c_void {
    ffi(libc::MAP_FAILED, || {
        let st = state()?;
        let prot = prot_of(prot)?;
        if len == 0 || flags & (libc::MAP_FIXED | libc::MAP_SHARED) != 0 || offset < 0 {
            return Err(libc::EINVAL);
        }
        let anonymous = flags & libc::MAP_ANONYMOUS != 0 || fd < 0;
        let len = mman::page_round_up(len);
        let (d, created) = domain_or_create(st, vkey, len + DOMAIN_HEADROOM, prot)?;
        if d.prot() != prot {
            return Err(libc::EINVAL); // one protection per domain: use mpk_mprotect
        }
        let p = if anonymous {
            d.alloc_pages(len / mman::page_size())
        } else {
            // SAFETY: `fd` is not negative here (negative means anonymous, handled above), and
            // the caller passes an open descriptor (mmap's contract); it is only borrowed for
            // the duration of this call.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            d.map_fd(fd, offset as u64, len)
        };
        undo_on_error(st, vkey, &d, created, p).map(|p| p.as_ptr().cast())
    })
}

/// `int mpk_munmap(int vkey)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_munmap(vkey: c_int) -> c_int {
    ffi(-1, || {
        let st = state()?;
        let mut doms = st.domains.write();
        let d = doms.by_vkey.get(&vkey).ok_or(libc::EINVAL)?;
        // Another reference means some thread has it begun.
        if Arc::strong_count(d) > 1 {
            return Err(libc::EBUSY);
        }
        let d = doms.by_vkey.remove(&vkey).expect("present");
        doms.vkey_of.remove(&d.id());
        drop(doms);
        drop(d); // destroys the domain: pages gone, key freed
        Ok(0)
    })
}

/// `int mpk_begin(int vkey, int prot)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_begin(vkey: c_int, prot: c_int) -> c_int {
    ffi(-1, || {
        let st = state()?;
        let rights = match prot_of(prot)? & Prot::READ_WRITE {
            p if p.contains(Prot::WRITE) => Rights::ReadWrite,
            p if p.contains(Prot::READ) => Rights::ReadOnly,
            _ => return Err(libc::EINVAL),
        };
        let d = domain(st, vkey)?;
        BEGUN.with_borrow_mut(|b| {
            let mut set = b.set.clone();
            match set.iter_mut().find(|(k, _, _)| *k == vkey) {
                Some(entry) => entry.2 = rights,
                None => set.push((vkey, d, rights)),
            }
            enter_set(st, b, set)
        })?;
        Ok(0)
    })
}

/// `int mpk_end(int vkey)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_end(vkey: c_int) -> c_int {
    ffi(-1, || {
        let st = state()?;
        BEGUN.with_borrow_mut(|b| {
            let pos = b
                .set
                .iter()
                .position(|(k, _, _)| *k == vkey)
                .ok_or(libc::EINVAL)?;
            let mut set = b.set.clone();
            set.remove(pos);
            enter_set(st, b, set)
        })?;
        Ok(0)
    })
}

/// `int mpk_mprotect(int vkey, int prot)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_mprotect(vkey: c_int, prot: c_int) -> c_int {
    ffi(-1, || {
        let st = state()?;
        let prot = prot_of(prot)?;
        domain(st, vkey)?.protect(prot).map_err(|e| errno_of(&e))?;
        Ok(0)
    })
}

/// `void *mpk_malloc(int vkey, size_t size)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_malloc(vkey: c_int, size: usize) -> *mut c_void {
    ffi(std::ptr::null_mut(), || {
        let st = state()?;
        let (d, created) = domain_or_create(st, vkey, DOMAIN_HEADROOM, Prot::READ_WRITE)?;
        undo_on_error(st, vkey, &d, created, d.alloc(size.max(1), 16)).map(|p| p.as_ptr().cast())
    })
}

/// `int mpk_free(void *ptr)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_free(ptr: *mut c_void) -> c_int {
    ffi(-1, || {
        let Some(p) = std::ptr::NonNull::new(ptr.cast::<u8>()) else {
            return Ok(0);
        };
        let st = state()?;
        let id = st.mgr.domain_at(p.as_ptr() as usize).ok_or(libc::EINVAL)?;
        let d = {
            let doms = st.domains.read();
            let vkey = doms.vkey_of.get(&id).ok_or(libc::EINVAL)?;
            Arc::clone(&doms.by_vkey[vkey])
        };
        d.free(p).map(drop).map_err(|e| errno_of(&e))?;
        Ok(0)
    })
}

// ---- extensions ---------------------------------------------------------------------------

/// `struct mpkvirt_fault` (layout checked against the header by `capi/tests`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpkvirtFault {
    /// Virtual key of the domain the address belongs to, -1 if none.
    pub vkey: c_int,
    /// 0 unknown, 1 read, 2 write, 3 instruction fetch.
    pub access: c_int,
    /// `si_code` of the SIGSEGV.
    pub si_code: c_int,
    /// Hardware protection key (`si_pkey`), -1 if none.
    pub hw_key: c_int,
    /// Faulting address.
    pub addr: usize,
}

const _: () =
    assert!(size_of::<MpkvirtFault>() == 24 && std::mem::offset_of!(MpkvirtFault, addr) == 16);

fn to_c(st: &CState, r: &FaultReport) -> MpkvirtFault {
    let vkey = r
        .domain
        .and_then(|id| st.domains.read().vkey_of.get(&id).copied())
        .unwrap_or(-1);
    let access = match r.access {
        None => 0,
        Some(Access::Read) => 1,
        Some(Access::Write) => 2,
        Some(Access::Execute) => 3,
    };
    let si_code = match r.code {
        mpkvirt_sys::signal::SegvCode::MapErr => mpkvirt_sys::signal::SEGV_MAPERR,
        mpkvirt_sys::signal::SegvCode::AccErr => mpkvirt_sys::signal::SEGV_ACCERR,
        mpkvirt_sys::signal::SegvCode::PkuErr => mpkvirt_sys::signal::SEGV_PKUERR,
        mpkvirt_sys::signal::SegvCode::Other(c) => c,
    };
    MpkvirtFault {
        vkey,
        access,
        si_code,
        hw_key: r.hw_key.map_or(-1, |k| c_int::from(k.index())),
        addr: r.addr,
    }
}

/// `int mpkvirt_guarded_call(void (*fn)(void *), void *arg, struct mpkvirt_fault *fault)`
///
/// # Safety
///
/// `f` must be a valid function that does not unwind (no C++ exceptions escape it); `fault`
/// must be null or valid for a write of `struct mpkvirt_fault`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mpkvirt_guarded_call(
    f: Option<unsafe extern "C" fn(*mut c_void)>,
    arg: *mut c_void,
    fault: *mut MpkvirtFault,
) -> c_int {
    let arg = arg as usize;
    let report = ffi(Err(None), || {
        let st = state()?;
        let f = f.ok_or(libc::EINVAL)?;
        // SAFETY: the caller promises `f` is a valid, non-unwinding C function taking `arg`.
        let run = move || unsafe { f(arg as *mut c_void) };
        // The thread's begun domains before the call: a faulting `f` is abandoned, and with it
        // whatever it began or ended, so the set is restored afterwards.
        let before = BEGUN.with_borrow(|b| b.set.clone());
        Ok(match st.mgr.guarded(run) {
            Ok(()) => Ok(()),
            Err(Error::Fault(r)) => {
                BEGUN.with_borrow_mut(|b| enter_set(st, b, before))?;
                Err(Some(to_c(st, &r)))
            }
            Err(e) => return Err(errno_of(&e)),
        })
    });
    match report {
        Ok(()) => 0,
        Err(None) => -1, // errno already set
        Err(Some(c)) => {
            if !fault.is_null() {
                // SAFETY: the caller passes null or a pointer valid for a write of the struct.
                unsafe { fault.write(c) };
            }
            set_errno(libc::EFAULT);
            -1
        }
    }
}

/// `const char *mpkvirt_backend(void)`: `"hardware"`, `"emulated"`, or `NULL` before
/// `mpk_init`.
#[unsafe(no_mangle)]
pub extern "C" fn mpkvirt_backend() -> *const c_char {
    match STATE.get().map(|s| s.mgr.backend_kind()) {
        Some(BackendKind::Hardware) => c"hardware".as_ptr(),
        Some(BackendKind::Emulated) => c"emulated".as_ptr(),
        Some(BackendKind::Simulated) => c"simulated".as_ptr(),
        None => std::ptr::null(),
    }
}

/// `int mpkvirt_key_count(void)`: keys the library multiplexes domains onto, -1 before
/// `mpk_init`.
#[unsafe(no_mangle)]
pub extern "C" fn mpkvirt_key_count() -> c_int {
    ffi(-1, || {
        Ok(c_int::try_from(state()?.mgr.keys().len()).unwrap_or(c_int::MAX))
    })
}
