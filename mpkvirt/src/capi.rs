//! The C API: libmpk's paper interface (`mpk_*`) on mpkvirt, plus `mpkvirt_*` extensions.
//! The contract for C callers is `include/mpkvirt.h`; this file implements it.
//!
//! One process-wide manager is created by `mpk_init`. Virtual keys are `int`s chosen by
//! the program; each names one domain, created by the first `mpk_mmap` or `mpk_malloc` for
//! it. `mpk_begin`/`mpk_end` add domains to and remove them from the calling thread's set of
//! begun domains, which is entered as one mpkvirt view whenever it changes.
//!
//! Like the manager's, the C API's state — the vkey table and each thread's begun set —
//! lives inside the library and changes only in ops. A call that creates a vkey's domain
//! publishes it only once the call succeeded, so a failed call changes nothing for any
//! thread.
//!
//! Every function reports failure by returning -1 (or `NULL`/`MAP_FAILED` for pointers) and
//! setting `errno`. No panic crosses into C: one raised inside (a bug) is caught and reported
//! as `EFAULT`, because unwinding into C is undefined behaviour. Each entry point disables
//! thread cancellation while it runs, so `pthread_cancel` takes effect at the caller's next
//! cancellation point instead of inside the library.
//!
//! # Safety
//!
//! The functions are `extern "C"` entry points called from C with C's types. The unsafe
//! parts are confined to: writing `errno`, reading a C function pointer and argument for a
//! guarded call, writing the caller's `struct mpkvirt_fault`, the `no_mangle` attribute (the
//! exported names are unique to this library), the C API's state as a raw allocation in the
//! metadata region (created once, never freed), and thread creation through
//! `pthread_create`. Pointers into domains are handed to C as raw addresses, as the API
//! promises; the library never dereferences them.
#![allow(
    unsafe_code,
    reason = "the C ABI: exported symbols, errno, out-parameters, C callbacks"
)]

use std::ffi::{c_char, c_int, c_long, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU8, Ordering};

use mpkvirt_sys::mman::{self, Prot};

use crate::Access;
use crate::backend::sealed::Spec;
use crate::backend::{BackendKind, Machine};
use crate::config::Config;
use crate::domain::DomainId;
use crate::error::Error;
use crate::fault::FaultReport;
use crate::gate::ThreadRecord;
use crate::manager::ops as mops;
use crate::manager::shared::{DomRef, MgrRef, Shared};
use crate::manager::views::{self, ViewItem};
use crate::manager::{Rights, global, lifecycle};
use crate::meta::{MBox, MMap, MVec, Meta, lock, lock_rw, mmap, read_rw, root};
use crate::ops::{Pod, STATUS_BAD_CALL, call};

/// Address space reserved for each virtual key's domain beyond its first mapping (the
/// largest `mpk_malloc` domain is 64 MiB).
pub const DOMAIN_HEADROOM: usize = 64 << 20;

/// First op code of the C API (below: the library's global ops).
pub(crate) const OP_BASE: u64 = 0x100;
const C_INIT: u64 = OP_BASE;
const C_MMAP: u64 = OP_BASE + 1;
const C_MUNMAP: u64 = OP_BASE + 2;
const C_BEGIN: u64 = OP_BASE + 3;
const C_END: u64 = OP_BASE + 4;
const C_MPROTECT: u64 = OP_BASE + 5;
const C_MALLOC: u64 = OP_BASE + 6;
const C_FREE: u64 = OP_BASE + 7;
const C_GUARD_START: u64 = OP_BASE + 8;
pub(crate) const C_GUARD_END: u64 = OP_BASE + 9;
const C_FAULT_VKEY: u64 = OP_BASE + 10;
const C_KEYS: u64 = OP_BASE + 11;
const C_CONFINE: u64 = OP_BASE + 12;

/// A vkey's domain and how many threads have it begun.
#[derive(Clone, Copy, Debug)]
struct VDom {
    d: DomRef,
    prot: Prot,
    begun: u32,
}

/// The C API's state, in library memory.
#[derive(Debug)]
struct CState {
    m: MgrRef,
    table: RwLock<Table>,
}

#[derive(Debug)]
struct Table {
    by_vkey: MMap<c_int, VDom>,
    vkey_of: MMap<u64, c_int>,
}

/// A thread's begun domains and the view that grants them (in its thread record).
#[derive(Debug, Default)]
pub(crate) struct ThreadBegun {
    set: Option<MBox<BegunSet>>,
}

impl ThreadBegun {
    /// Whether the thread has C API state (begun vkeys).
    pub(crate) fn holds_state(&self) -> bool {
        self.set.is_some()
    }

    /// Whether the thread has vkeys begun now.
    pub(crate) fn begun_any(&self) -> bool {
        self.set.as_ref().is_some_and(|b| !b.begun.is_empty())
    }
}

/// Begun vkeys: (vkey, domain, read-only).
type BegunList = MVec<(c_int, DomRef, bool)>;

#[derive(Debug)]
struct BegunSet {
    begun: BegunList,
    view: Option<u64>,
    /// Begun sets saved by guarded calls in progress, innermost last.
    saved: MVec<(u64, BegunList)>,
    /// Per signal-handler level on the thread (hardware), innermost last: the level, and the
    /// begun set and view of the contexts it interrupted, which it may add to but not take
    /// from. Restored when the thread is back at a lower level (`gate::note_context`).
    levels: MVec<(usize, BegunList, Option<u64>)>,
}

/// `root().capi` while `mpk_init` runs.
const INITIALISING: *mut () = std::ptr::dangling_mut::<()>();

/// The backend `mpk_init` chose (for `mpkvirt_backend`, which must not fail): 0 none yet.
static BACKEND: AtomicU8 = AtomicU8::new(0);

fn state<'a>() -> Result<&'a CState, c_int> {
    let p = root().capi.load(Ordering::Acquire);
    if p.is_null() || p == INITIALISING {
        return Err(libc::EINVAL);
    }
    // SAFETY: a non-null, non-sentinel pointer was stored once by `init` from
    // `MBox::into_raw` of a `CState` and is never freed.
    Ok(unsafe { &*p.cast::<CState>() })
}

fn shared<'a>(st: &CState) -> Result<&'a Shared<Machine>, c_int> {
    crate::manager::ops::shared_pub::<Machine>(st.m).ok_or(libc::EINVAL)
}

// glibc's <pthread.h> (not in the libc crate).
const PTHREAD_CANCEL_DISABLE: c_int = 1;
unsafe extern "C" {
    fn pthread_setcancelstate(state: c_int, oldstate: *mut c_int) -> c_int;
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location takes no arguments and returns the calling thread's errno
    // slot.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: that slot is valid for writes for the thread's lifetime.
    unsafe { *slot = e };
}

/// Runs `f` with cancellation disabled, turning an error (or, defensively, a panic) into
/// `errno` and `fail`.
fn ffi<T>(fail: T, f: impl FnOnce() -> Result<T, c_int>) -> T {
    let mut old: c_int = 0;
    // SAFETY: sets this thread's cancel state; `old` is a live local.
    unsafe { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old) };
    let r = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_errno(e);
            fail
        }
        Err(_) => {
            set_errno(libc::EFAULT);
            fail
        }
    };
    let mut ignored: c_int = 0;
    // SAFETY: restores the state saved above.
    unsafe { pthread_setcancelstate(old, &mut ignored) };
    r
}

fn errno_of(e: &Error) -> c_int {
    e.errno()
}

fn op<I: Pod, O>(code: u64, input: I) -> Result<O, c_int> {
    call::<I, Result<O, c_int>>(code, input).map_err(|e| errno_of(&e))?
}

fn prot_of(prot: c_int) -> Result<Prot, c_int> {
    Prot::from_bits(prot).ok_or(libc::EINVAL)
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct CArgs {
    vkey: i32,
    prot: i32,
    a: u64,
    b: u64,
    c: u64,
}
// SAFETY: integers only.
unsafe impl Pod for CArgs {}

fn args(vkey: c_int, prot: c_int, a: u64, b: u64, c: u64) -> CArgs {
    CArgs {
        vkey,
        prot,
        a,
        b,
        c,
    }
}

/// `int mpk_init(int evict_rate)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_init(evict_rate: c_int) -> c_int {
    ffi(-1, || {
        let _ = evict_rate; // every value evicts on a miss, as libmpk's -1 (see the header)
        if BACKEND.load(Ordering::Acquire) != 0 {
            return Err(libc::EBUSY);
        }
        let config = Config::from_env().map_err(|e| errno_of(&e))?;
        let (machine, _) = Machine::new(&config).map_err(|e| errno_of(&e))?;
        let kind = machine.kind();
        op::<mops::CreateIn, ()>(
            C_INIT,
            mops::CreateIn {
                spec: machine.to_pod(),
                config: mops::ConfigPod::of(&config),
            },
        )?;
        BACKEND.store(kind.tag() as u8, Ordering::Release);
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
        prot_of(prot)?;
        if len == 0 || flags & (libc::MAP_FIXED | libc::MAP_SHARED) != 0 || offset < 0 {
            return Err(libc::EINVAL);
        }
        let anonymous = flags & libc::MAP_ANONYMOUS != 0 || fd < 0;
        let fd = if anonymous { -1 } else { fd };
        let p: usize = op(
            C_MMAP,
            args(vkey, prot, len as u64, fd as i64 as u64, offset as u64),
        )?;
        Ok(p as *mut c_void)
    })
}

/// `int mpk_munmap(int vkey)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_munmap(vkey: c_int) -> c_int {
    ffi(-1, || {
        op::<CArgs, ()>(C_MUNMAP, args(vkey, 0, 0, 0, 0))?;
        Ok(0)
    })
}

/// `int mpk_begin(int vkey, int prot)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_begin(vkey: c_int, prot: c_int) -> c_int {
    ffi(-1, || {
        prot_of(prot)?;
        op::<CArgs, ()>(C_BEGIN, args(vkey, prot, 0, 0, 0))?;
        Ok(0)
    })
}

/// `int mpk_end(int vkey)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_end(vkey: c_int) -> c_int {
    ffi(-1, || {
        op::<CArgs, ()>(C_END, args(vkey, 0, 0, 0, 0))?;
        Ok(0)
    })
}

/// `int mpk_mprotect(int vkey, int prot)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_mprotect(vkey: c_int, prot: c_int) -> c_int {
    ffi(-1, || {
        prot_of(prot)?;
        op::<CArgs, ()>(C_MPROTECT, args(vkey, prot, 0, 0, 0))?;
        Ok(0)
    })
}

/// `void *mpk_malloc(int vkey, size_t size)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_malloc(vkey: c_int, size: usize) -> *mut c_void {
    ffi(std::ptr::null_mut(), || {
        let p: usize = op(C_MALLOC, args(vkey, 0, size as u64, 0, 0))?;
        Ok(p as *mut c_void)
    })
}

/// `int mpk_confine(const int *vkeys, size_t n)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_confine(vkeys: *const c_int, n: usize) -> c_int {
    ffi(-1, || {
        op::<CArgs, ()>(C_CONFINE, args(0, 0, vkeys as u64, n as u64, 0))?;
        Ok(0)
    })
}

/// `int mpk_free(void *ptr)`
#[unsafe(no_mangle)]
pub extern "C" fn mpk_free(ptr: *mut c_void) -> c_int {
    ffi(-1, || {
        if ptr.is_null() {
            return Ok(0);
        }
        op::<CArgs, ()>(C_FREE, args(0, 0, ptr as u64, 0, 0))?;
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

fn to_c(r: &FaultReport, vkey: c_int) -> MpkvirtFault {
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
/// `f` must be a valid function that does not unwind (no C++ exceptions escape it) and
/// leaves no thread using its stack when it faults; `fault` must be null or valid for a write
/// of `struct mpkvirt_fault`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mpkvirt_guarded_call(
    f: Option<unsafe extern "C" fn(*mut c_void)>,
    arg: *mut c_void,
    fault: *mut MpkvirtFault,
) -> c_int {
    let arg = arg as usize;
    let report = ffi(Err(None), || {
        if BACKEND.load(Ordering::Acquire) == 0 {
            return Err(libc::EINVAL);
        }
        let f = f.ok_or(libc::EINVAL)?;
        // SAFETY: the caller promises `f` is a valid, non-unwinding C function taking `arg`.
        let run = move || unsafe { f(arg as *mut c_void) };
        // The thread's begun domains before the call: a faulting `f` is abandoned, and with it
        // whatever it began or ended, so the set is restored afterwards.
        let mark: u64 = op(C_GUARD_START, args(0, 0, 0, 0, 0))?;
        // SAFETY: forwarded from this function's contract (no thread borrows `f`'s stack).
        let outcome = unsafe { crate::fault::run_guarded(run) };
        Ok(match outcome {
            Ok(Ok(())) => {
                op::<CArgs, ()>(C_GUARD_END, args(0, 0, mark, 0, 0))?;
                Ok(())
            }
            Ok(Err(_)) => {
                op::<CArgs, ()>(C_GUARD_END, args(0, 0, mark, 0, 0))?;
                return Err(libc::EFAULT);
            }
            Err(crate::fault::Failed::NoStack(e)) => {
                op::<CArgs, ()>(C_GUARD_END, args(0, 0, mark, 0, 0))?;
                return Err(errno_of(&e));
            }
            Err(crate::fault::Failed::Fault(raw, kind)) => {
                // Ends the views `f` entered, restores the begun set and with it the thread's
                // legitimate PKRU (the handler left it with none).
                op::<CArgs, ()>(C_GUARD_END, args(0, 0, mark, 1, 0))?;
                let (domain, vkey): (Option<DomainId>, c_int) =
                    op(C_FAULT_VKEY, args(0, 0, raw.addr as u64, 0, 0))?;
                let r = FaultReport {
                    kind,
                    domain,
                    addr: raw.addr,
                    access: raw.access,
                    hw_key: raw.pkey,
                    code: raw.code,
                };
                Err(Some(to_c(&r, vkey)))
            }
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
    match BackendKind::from_tag(u32::from(BACKEND.load(Ordering::Acquire))) {
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
        let n: u64 = op(C_KEYS, args(0, 0, 0, 0, 0))?;
        Ok(c_int::try_from(n).unwrap_or(c_int::MAX))
    })
}

/// `int mpk_pthread_create(pthread_t *thread, const pthread_attr_t *attr,
/// void *(*start)(void *), void *arg)`: `pthread_create` whose new thread starts with no
/// begun domain, whatever the caller has begun (a plain `pthread_create` copies the caller's
/// PKRU, so the new thread would keep rights it never began).
///
/// # Safety
///
/// As for `pthread_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mpk_pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: Option<extern "C" fn(*mut c_void) -> *mut c_void>,
    arg: *mut c_void,
) -> c_int {
    let Some(start) = start else {
        return libc::EINVAL;
    };
    crate::thread::without_rights(|| {
        // SAFETY: forwarded from this function's contract.
        unsafe { libc::pthread_create(thread, attr, start, arg) }
    })
    .unwrap_or(libc::EDEADLK)
}

// ---- inside the library ---------------------------------------------------------------------

/// Runs C API op `code` (inside the library).
pub(crate) fn run(code: u64, a: crate::ops::Args, rec: &mut ThreadRecord) -> u64 {
    {
        match code {
            C_INIT => a.serve(rec, |rec, i: mops::CreateIn| {
                Ok(if rec.confined != 0 {
                    Err(libc::EPERM)
                } else {
                    init(i)
                })
            }),
            C_MMAP => a.serve(rec, |rec, i: CArgs| Ok(mmap_op(rec, i))),
            C_MUNMAP => a.serve(rec, |rec, i: CArgs| Ok(munmap_op(rec, i))),
            C_BEGIN => a.serve(rec, |rec, i: CArgs| Ok(begin_op(rec, i))),
            C_END => a.serve(rec, |rec, i: CArgs| Ok(end_op(rec, i))),
            C_MPROTECT => a.serve(rec, |rec, i: CArgs| Ok(mprotect_op(rec, i))),
            C_MALLOC => a.serve(rec, |rec, i: CArgs| Ok(malloc_op(rec, i))),
            C_FREE => a.serve(rec, |rec, i: CArgs| Ok(free_op(rec, i))),
            C_CONFINE => a.serve(rec, |rec, i: CArgs| Ok(confine_op(rec, i))),
            C_GUARD_START => a.serve(rec, |rec, _: CArgs| Ok(guard_start(rec))),
            // The end of a guarded call, after a fault too (it stays in its context:
            // `gate::note_context`).
            C_GUARD_END => a.serve(rec, |rec, i: CArgs| Ok(guard_end(rec, i.a, i.b != 0))),
            C_FAULT_VKEY => a.serve(rec, |rec, i: CArgs| {
                // A confined thread learns nothing of domains outside its set.
                Ok(fault_vkey(i.a as usize).map(|(d, v)| match d {
                    Some(id) if !rec.names(id.get()) => (None, -1),
                    _ => (d, v),
                }))
            }),
            C_KEYS => a.serve(rec, |_, _: CArgs| -> crate::Result<Result<u64, c_int>> {
                Ok(state().and_then(|st| shared(st).map(|sh| sh.nkeys as u64)))
            }),
            _ => STATUS_BAD_CALL,
        }
    }
}

fn init(i: mops::CreateIn) -> Result<(), c_int> {
    if root()
        .capi
        .compare_exchange(
            std::ptr::null_mut(),
            INITIALISING,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        return Err(libc::EBUSY);
    }
    let made = mops::create_pub::<Machine>(i).map_err(|e| errno_of(&e));
    let m = match made {
        Ok(m) => m,
        Err(e) => {
            root().capi.store(std::ptr::null_mut(), Ordering::Release);
            return Err(e);
        }
    };
    let st = MBox::new_in(
        CState {
            m: m.m,
            table: RwLock::new(Table {
                by_vkey: mmap(),
                vkey_of: mmap(),
            }),
        },
        Meta,
    );
    root()
        .capi
        .store(MBox::into_raw(st).cast(), Ordering::Release);
    Ok(())
}

/// The domain of `vkey`, or a new one made by `create` (reserve, prot), on which `then` runs;
/// the new domain is published only if `then` succeeds, and destroyed otherwise.
fn with_domain<T>(
    rec: &mut ThreadRecord,
    vkey: c_int,
    create: Option<(usize, Prot)>,
    then: impl Fn(&Shared<Machine>, VDom) -> Result<T, c_int>,
) -> Result<T, c_int> {
    let st = state()?;
    let sh = shared(st)?;
    if let Some(&v) = read_rw(&st.table).by_vkey.get(&vkey) {
        rec.may_name(v.d.uid).map_err(|e| errno_of(&e))?;
        return then(sh, v);
    }
    let Some((reserve, prot)) = create else {
        return Err(libc::EINVAL);
    };
    // vkeys are one namespace for the whole program: a confined thread that created one
    // would own the domain the program later fills under that number.
    if rec.confined != 0 {
        return Err(libc::EPERM);
    }
    let mut table = lock_rw(&st.table);
    if let Some(&v) = table.by_vkey.get(&vkey) {
        drop(table);
        rec.may_name(v.d.uid).map_err(|e| errno_of(&e))?;
        return then(sh, v);
    }
    let info = lifecycle::create(sh, Some(reserve), prot).map_err(|e| errno_of(&e))?;
    let v = VDom {
        d: info.d,
        prot,
        begun: 0,
    };
    // Nobody else can see the domain yet: a failure destroys it and changes nothing.
    match then(sh, v) {
        Ok(t) => {
            if table.by_vkey.try_reserve(1).is_err() || table.vkey_of.try_reserve(1).is_err() {
                lifecycle::destroy(sh, info.d);
                return Err(libc::ENOMEM);
            }
            table.by_vkey.insert(vkey, v);
            table.vkey_of.insert(info.d.uid, vkey);
            Ok(t)
        }
        Err(e) => {
            lifecycle::destroy(sh, info.d);
            Err(e)
        }
    }
}

fn mmap_op(rec: &mut ThreadRecord, i: CArgs) -> Result<usize, c_int> {
    let prot = prot_of(i.prot)?;
    let len = usize::try_from(i.a).map_err(|_| libc::EINVAL)?;
    // A length that cannot be rounded to pages is no mapping at all (it used to wrap to one
    // page): ENOMEM, as mmap answers for a length that cannot fit.
    let len = len
        .checked_next_multiple_of(mman::page_size())
        .filter(|&l| l <= isize::MAX as usize)
        .ok_or(libc::ENOMEM)?;
    let reserve = len.checked_add(DOMAIN_HEADROOM).ok_or(libc::ENOMEM)?;
    let fd = i.b as i64 as i32;
    with_domain(rec, i.vkey, Some((reserve, prot)), |sh, v| {
        if v.prot != prot {
            return Err(libc::EINVAL); // one protection per domain: use mpk_mprotect
        }
        let r = if fd < 0 {
            lifecycle::alloc_pages(sh, v.d, len / mman::page_size())
        } else {
            lifecycle::map_fd(sh, v.d, fd, i.c, len)
        };
        r.map_err(|e| errno_of(&e))
    })
}

fn munmap_op(rec: &mut ThreadRecord, i: CArgs) -> Result<(), c_int> {
    let st = state()?;
    let sh = shared(st)?;
    let mut table = lock_rw(&st.table);
    let v = *table.by_vkey.get(&i.vkey).ok_or(libc::EINVAL)?;
    rec.may_name(v.d.uid).map_err(|e| errno_of(&e))?;
    if v.begun > 0 {
        return Err(libc::EBUSY);
    }
    table.by_vkey.remove(&i.vkey);
    table.vkey_of.remove(&v.d.uid);
    drop(table);
    // Every thread drops process-wide rights first (see `manager::global`).
    if let Ok(cx) = mops::cx_pub(sh, rec) {
        let _ = global::set(sh, rec, cx, v.d, None);
    }
    lifecycle::destroy(sh, v.d);
    Ok(())
}

fn begun(rec: &mut ThreadRecord) -> Result<&mut BegunSet, c_int> {
    if rec.capi.set.is_none() {
        rec.capi.set = Some(MBox::new_in(
            BegunSet {
                begun: MVec::new_in(Meta),
                view: None,
                saved: MVec::new_in(Meta),
                levels: MVec::new_in(Meta),
            },
            Meta,
        ));
    }
    rec.capi.set.as_deref_mut().ok_or(libc::ENOMEM)
}

/// Enters `set` as the thread's one view (the new view is live before the old one ends, so
/// keys both use stay pinned), or ends the view when the set is empty. The interrupted
/// code's view (while a signal handler runs) is never ended here.
fn enter_set(
    sh: &Shared<Machine>,
    rec: &mut ThreadRecord,
    set: MVec<(c_int, DomRef, bool)>,
) -> Result<(), c_int> {
    let (old, sealed, back) = {
        let b = begun(rec)?;
        let sealed = b.levels.last().and_then(|(_, _, v)| *v);
        // A handler back to the interrupted code's set: its view serves again.
        let back = b
            .levels
            .last()
            .is_some_and(|(_, saved, _)| same_set(saved, &set));
        (b.view, sealed, back)
    };
    let cx = mops::cx_pub(sh, rec).map_err(|e| errno_of(&e))?;
    let new = if set.is_empty() || back {
        None
    } else {
        let mut view = [ViewItem {
            d: DomRef::default(),
            read_only: false,
        }; 16];
        if set.len() > 16 {
            return Err(libc::E2BIG);
        }
        for (k, &(_, d, ro)) in set.iter().enumerate() {
            view[k] = ViewItem { d, read_only: ro };
        }
        Some(
            views::enter(sh, rec, cx, &view[..set.len()])
                .map_err(|e| errno_of(&e))?
                .id,
        )
    };
    if let Some(id) = old
        && old != sealed
        && let Err(e) = views::leave(sh, rec, cx, id)
    {
        // Nothing may change: the new view goes again.
        if let Some(n) = new {
            let _ = views::leave(sh, rec, cx, n);
        }
        return Err(errno_of(&e));
    }
    let b = begun(rec)?;
    b.view = if back { sealed } else { new };
    b.begun = set;
    Ok(())
}

fn begin_op(rec: &mut ThreadRecord, i: CArgs) -> Result<(), c_int> {
    let prot = prot_of(i.prot)?;
    let read_only = match prot & Prot::READ_WRITE {
        p if p.contains(Prot::WRITE) => false,
        p if p.contains(Prot::READ) => true,
        _ => return Err(libc::EINVAL),
    };
    let st = state()?;
    let sh = shared(st)?;
    let mut set = MVec::new_in(Meta);
    set.try_reserve(begun(rec)?.begun.len() + 1)
        .map_err(|_| libc::ENOMEM)?;
    set.extend(begun(rec)?.begun.iter().copied());
    let fresh = !set.iter().any(|(k, _, _)| *k == i.vkey);
    // The vkey counts as begun from here on (mpk_munmap says EBUSY), but the table is not
    // locked while the view waits for keys: the thread holding them may need it to end its
    // own view.
    let d = {
        let mut table = lock_rw(&st.table);
        let v = table.by_vkey.get_mut(&i.vkey).ok_or(libc::EINVAL)?;
        rec.may_name(v.d.uid).map_err(|e| errno_of(&e))?;
        if fresh {
            v.begun += 1;
        }
        v.d
    };
    match set.iter_mut().find(|(k, _, _)| *k == i.vkey) {
        Some(e) => e.2 = read_only,
        None => set.push((i.vkey, d, read_only)),
    }
    let entered = enter_set(sh, rec, set);
    if entered.is_err()
        && fresh
        && let Some(e) = lock_rw(&st.table).by_vkey.get_mut(&i.vkey)
    {
        e.begun = e.begun.saturating_sub(1);
    }
    entered
}

fn end_op(rec: &mut ThreadRecord, i: CArgs) -> Result<(), c_int> {
    let st = state()?;
    let sh = shared(st)?;
    let b = begun(rec)?;
    let pos = b
        .begun
        .iter()
        .position(|(k, _, _)| *k == i.vkey)
        .ok_or(libc::EINVAL)?;
    // A signal handler cannot end what the code it interrupted has begun (the innermost
    // level's saved set holds what every lower level began).
    if b.levels
        .last()
        .is_some_and(|(_, saved, _)| saved.iter().any(|(k, _, _)| *k == i.vkey))
    {
        return Err(libc::EDEADLK);
    }
    let mut set = MVec::new_in(Meta);
    set.try_reserve(b.begun.len()).map_err(|_| libc::ENOMEM)?;
    set.extend(b.begun.iter().copied());
    set.remove(pos);
    enter_set(sh, rec, set)?;
    if let Some(e) = lock_rw(&st.table).by_vkey.get_mut(&i.vkey) {
        e.begun = e.begun.saturating_sub(1);
    }
    Ok(())
}

fn same_set(a: &BegunList, b: &BegunList) -> bool {
    a.len() == b.len() && a.iter().all(|e| b.contains(e))
}

/// A new signal-handler level (`level`) on the thread: the begun set is the interrupted
/// contexts', saved to come back when the level ends.
pub(crate) fn enter_handler_level(rec: &mut ThreadRecord, level: usize) {
    if state().is_err() {
        return;
    }
    let Ok(b) = begun(rec) else {
        return;
    };
    let mut copy = MVec::new_in(Meta);
    if copy.try_reserve(b.begun.len()).is_err() || b.levels.try_reserve(1).is_err() {
        // (The views' seal still keeps the interrupted contexts' view: ending it fails.)
        return;
    }
    copy.extend(b.begun.iter().copied());
    b.levels.push((level, copy, b.view));
}

/// Whether the current signal-handler level began vkeys of its own (its begun set is not
/// the one it started with).
pub(crate) fn level_holds_state(rec: &ThreadRecord) -> bool {
    let Some(b) = rec.capi.set.as_deref() else {
        return false;
    };
    match b.levels.last() {
        Some((_, saved, view)) => !same_set(saved, &b.begun) || *view != b.view,
        None => !b.begun.is_empty(),
    }
}

/// The thread is back at signal-handler level `level` (the views the levels above left
/// behind are ended already): the begun set of that level comes back, and vkeys the levels
/// above began and did not end are no longer begun.
pub(crate) fn leave_handler_level(rec: &mut ThreadRecord, level: usize) {
    let Some(b) = rec.capi.set.as_deref_mut() else {
        return;
    };
    let Some(pos) = b.levels.iter().position(|(l, _, _)| *l > level) else {
        return;
    };
    let (_, saved, view) = b.levels.remove(pos);
    b.levels.truncate(pos);
    if let Ok(st) = state() {
        let mut table = lock_rw(&st.table);
        for &(k, _, _) in b.begun.iter() {
            if !saved.iter().any(|e| e.0 == k)
                && let Some(e) = table.by_vkey.get_mut(&k)
            {
                e.begun = e.begun.saturating_sub(1);
            }
        }
    }
    b.begun = saved;
    b.view = view;
}

/// libmpk's `mpk_mprotect`: every thread of the process gets `prot`'s read/write rights
/// (`manager::global`). The page protection only grows to allow them (and takes `prot`'s
/// `PROT_EXEC`, which keys cannot express): with the domain resident, a change of rights is
/// no page-table change at all, and threads that begun the vkey keep what they begun.
fn mprotect_op(rec: &mut ThreadRecord, i: CArgs) -> Result<(), c_int> {
    // Process-wide: it acts on every thread.
    rec.unconfined("mpk_mprotect").map_err(|e| errno_of(&e))?;
    let prot = prot_of(i.prot)?;
    let rights = if prot.contains(Prot::WRITE) {
        Some(Rights::ReadWrite)
    } else if prot.contains(Prot::READ) {
        Some(Rights::ReadOnly)
    } else {
        None
    };
    let st = state()?;
    let sh = shared(st)?;
    let (d, old) = {
        let mut table = lock_rw(&st.table);
        let v = table.by_vkey.get_mut(&i.vkey).ok_or(libc::EINVAL)?;
        let old = v.prot;
        let page = (old - Prot::EXEC) | (prot & Prot::READ_WRITE) | (prot & Prot::EXEC);
        if page != old {
            lifecycle::protect(sh, v.d, page).map_err(|e| errno_of(&e))?;
            v.prot = page;
        }
        (v.d, old)
    };
    // The table lock is not held while every thread takes the rights.
    let cx = mops::cx_pub(sh, rec).map_err(|e| errno_of(&e))?;
    match global::set(sh, rec, cx, d, rights) {
        Ok(()) => Ok(()),
        // Taken by every other thread: the call did its work; the caller learns of the rest.
        Err(e @ Error::ThreadsNotSynced { .. }) => Err(errno_of(&e)),
        Err(e) => {
            // Nothing changed for any thread: the protection goes back too.
            let mut table = lock_rw(&st.table);
            if let Some(v) = table.by_vkey.get_mut(&i.vkey)
                && v.d == d
                && v.prot != old
                && lifecycle::protect(sh, d, old).is_ok()
            {
                v.prot = old;
            }
            Err(errno_of(&e))
        }
    }
}

fn malloc_op(rec: &mut ThreadRecord, i: CArgs) -> Result<usize, c_int> {
    let size = usize::try_from(i.a).map_err(|_| libc::ENOMEM)?.max(1);
    with_domain(
        rec,
        i.vkey,
        Some((DOMAIN_HEADROOM, Prot::READ_WRITE)),
        |sh, v| lifecycle::alloc(sh, v.d, size, 16).map_err(|e| errno_of(&e)),
    )
}

fn free_op(rec: &mut ThreadRecord, i: CArgs) -> Result<(), c_int> {
    let st = state()?;
    let sh = shared(st)?;
    let addr = i.a as usize;
    let id = lifecycle::domain_at(sh, addr).ok_or(libc::EINVAL)?;
    rec.may_name(id.get()).map_err(|e| errno_of(&e))?;
    let table = read_rw(&st.table);
    let vkey = *table.vkey_of.get(&id.get()).ok_or(libc::EINVAL)?;
    let v = *table.by_vkey.get(&vkey).ok_or(libc::EINVAL)?;
    lifecycle::free(sh, v.d, addr).map_err(|e| errno_of(&e))?;
    Ok(())
}

/// Saves the begun set for a guarded call; returns the thread's view mark.
fn guard_start(rec: &mut ThreadRecord) -> Result<u64, c_int> {
    let mark = crate::gate::guard_mark(rec);
    let b = begun(rec)?;
    let mut copy = MVec::new_in(Meta);
    copy.try_reserve(b.begun.len()).map_err(|_| libc::ENOMEM)?;
    copy.extend(b.begun.iter().copied());
    b.saved.try_reserve(1).map_err(|_| libc::ENOMEM)?;
    b.saved.push((mark, copy));
    Ok(mark)
}

/// Ends a guarded call started at `mark`; after a fault, ends the views entered since and
/// enters the saved begun set again.
fn guard_end(rec: &mut ThreadRecord, mark: u64, faulted: bool) -> Result<(), c_int> {
    let b = begun(rec)?;
    let pos = b
        .saved
        .iter()
        .rposition(|(m, _)| *m == mark)
        .ok_or(libc::EINVAL)?;
    let (_, saved) = b.saved.remove(pos);
    b.saved.truncate(pos);
    // Back in the guarded call's caller, at its level (handlers that began levels meanwhile
    // returned, or were abandoned with the faulting closure).
    crate::gate::resume_level(rec, mark);
    if !faulted {
        return Ok(());
    }
    mops::end_views_since(rec, crate::gate::split_mark(mark).0);
    let st = state()?;
    let sh = shared(st)?;
    {
        // The begun counts follow the set back.
        let b = begun(rec)?;
        let mut table = lock_rw(&st.table);
        for &(k, _, _) in b.begun.iter() {
            if !saved.iter().any(|e| e.0 == k)
                && let Some(e) = table.by_vkey.get_mut(&k)
            {
                e.begun = e.begun.saturating_sub(1);
            }
        }
        for &(k, _, _) in saved.iter() {
            if !b.begun.iter().any(|e| e.0 == k)
                && let Some(e) = table.by_vkey.get_mut(&k)
            {
                e.begun += 1;
            }
        }
    }
    // Enters the saved set again (ending whatever view of the set survived).
    enter_set(sh, rec, saved)
}

fn fault_vkey(addr: usize) -> Result<(Option<DomainId>, c_int), c_int> {
    let st = state()?;
    let sh = shared(st)?;
    let d = lifecycle::domain_at(sh, addr);
    let vkey = d
        .and_then(|id| read_rw(&st.table).vkey_of.get(&id.get()).copied())
        .unwrap_or(-1);
    Ok((d, vkey))
}

/// Thread exit (after its views ended): its begun domains are no longer begun.
pub(crate) fn thread_exit(rec: &mut ThreadRecord) {
    let Some(set) = rec.capi.set.take() else {
        return;
    };
    if let Ok(st) = state() {
        let mut table = lock_rw(&st.table);
        for &(vkey, _, _) in set.begun.iter() {
            if let Some(e) = table.by_vkey.get_mut(&vkey) {
                e.begun = e.begun.saturating_sub(1);
            }
        }
    }
}

/// `C_CONFINE`: confines the thread to the domains of the vkeys listed at `i.a` (`i.b` of
/// them; see `thread::confine`).
fn confine_op(rec: &mut ThreadRecord, i: CArgs) -> Result<(), c_int> {
    if rec.capi.begun_any() || mops::views_above(rec, 0) {
        return Err(libc::EBUSY);
    }
    let len = usize::try_from(i.b)
        .ok()
        .filter(|&l| l <= 1 << 16)
        .ok_or(libc::EINVAL)?;
    let base = i.a as usize as *const c_int;
    if len > 0
        && (base.is_null()
            || !base.is_aligned()
            || !crate::ops::caller_may_access(rec, base as usize, len * size_of::<c_int>(), false))
    {
        return Err(libc::EFAULT);
    }
    let st = state()?;
    let mut uids = MVec::new_in(Meta);
    uids.try_reserve(len).map_err(|_| libc::ENOMEM)?;
    {
        let table = read_rw(&st.table);
        for k in 0..len {
            // SAFETY: `len` ints at `base`, checked for null, alignment and that the thread
            // may read them itself (`caller_may_access`; an unmapped address faults in the
            // library, see `ops`); each is read once, and any bits are a valid int.
            let vkey = unsafe { std::ptr::read_volatile(base.wrapping_add(k)) };
            uids.push(table.by_vkey.get(&vkey).ok_or(libc::EINVAL)?.d.uid);
        }
    }
    // Under the records lock (see `ops::confine`).
    let _records = lock(&root().records);
    rec.confine(&uids).map_err(|e| errno_of(&e))
}
