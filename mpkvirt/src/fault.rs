//! Faults: the SIGSEGV handler, checked single-byte accesses (probes), guarded calls, and
//! reports that name the virtual domain.
//!
//! One process-wide SIGSEGV handler is installed the first time a real backend is built. It
//! decides, using only async-signal-safe state (atomics and const-initialised thread-locals),
//! whether a fault is *ours*:
//!
//! 1. the interrupted instruction is a probe's access (`mpkvirt_probe_*_insn`): the probe is
//!    resumed and returns "faulted";
//! 2. the thread is inside a guarded call and the address is domain memory (the arena map of
//!    `backend/arena.rs`: O(1), however many arenas) or the guarded stack's guard page: the
//!    guarded call is resumed at `mpkvirt_stack_call_resume` with the deny PKRU (key 0 only)
//!    in the frame, and returns the fault;
//! 3. otherwise, for domain memory, a one-line report is written to stderr;
//!
//! and then every fault it does not resume goes to the previously installed handler (Rust's
//! stack-overflow handler, a sanitizer, or the default action). The handler runs with the
//! kernel's initial PKRU (key 0 only) and touches only key-0 memory.
//!
//! # Guarded calls
//!
//! `run_guarded` runs a closure on a separate stack (mpkvirt-asm's `mpkvirt_stack_call`),
//! calling it through a reference held in the caller's frame. When the closure faults on
//! domain memory, the frames on the guarded stack are *abandoned*: never resumed, their
//! destructors never run (locks they hold stay held). The closure object itself — what it
//! captured — lives in the caller's frame and is dropped normally, and the stack's pages are
//! given back and the stack reused, so a million faults cost no more memory than one. This is
//! sound only if nothing refers to the abandoned frames afterwards: `run_guarded` is `unsafe`
//! and its callers promise that no thread the closure started still borrows from it. Panics
//! inside the closure are caught on its stack and resumed on the caller's; a fault while a
//! panic unwinds aborts (see `run_guarded`).
//!
//! # Safety
//!
//! The handler reads the kernel's `siginfo_t`/`ucontext_t` and redirects the interrupted
//! context only to the two resume points mpkvirt-asm defines for this purpose, with the
//! stack pointer they expect. The probes access arbitrary addresses, so they are reachable
//! only through backends that check the address lies in their reservations (memory no Rust
//! reference points to). The guarded call hands a pointer to a stack-allocated closure record
//! to the trampoline and reads it back only after the call returned or was abandoned. When it
//! redirects a guarded call, the handler writes the deny value into the frame's PKRU.
#![allow(unsafe_code, reason = "signal handler, probes and stack switching")]

use std::cell::Cell;
use std::ffi::c_void;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use mpkvirt_asm::{PROBE_FAULTED, addr};
use mpkvirt_sys::Pkey;
use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::signal::{self, Access, SegvCode};

use crate::backend::RawFault;
use crate::domain::DomainId;
use crate::error::{Error, Result};

/// What a guarded call or checked access ran into.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultKind {
    /// An access to domain memory the thread's view does not allow.
    Violation,
    /// The guarded call overflowed its stack.
    StackOverflow,
}

/// A fault translated into mpkvirt's terms.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FaultReport {
    /// What happened.
    pub kind: FaultKind,
    /// The virtual domain owning the address (`None` if no live domain does).
    pub domain: Option<DomainId>,
    /// The faulting address.
    pub addr: usize,
    /// Read, write or instruction fetch, when the CPU said.
    pub access: Option<Access>,
    /// The hardware key (`si_pkey`) for protection-key faults.
    pub hw_key: Option<Pkey>,
    /// `si_code`: `SEGV_PKUERR` on the hardware backend for a denied key, `SEGV_ACCERR` for
    /// a page protection (evicted domains, the emulated backend).
    pub code: SegvCode,
}

impl fmt::Display for FaultReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = match self.access {
            Some(Access::Read) => "read",
            Some(Access::Write) => "write",
            Some(Access::Execute) => "instruction fetch",
            None => "access",
        };
        match self.kind {
            FaultKind::StackOverflow => write!(
                f,
                "stack overflow in a guarded call ({access} at {:#x})",
                self.addr
            )?,
            FaultKind::Violation => {
                write!(f, "domain violation: {access} at {:#x}", self.addr)?;
                match self.domain {
                    Some(d) => write!(f, " in domain {d}")?,
                    None => write!(f, " (no live domain)")?,
                }
            }
        }
        if let Some(k) = self.hw_key {
            write!(f, ", hardware key {k}")?;
        }
        write!(f, " ({:?})", self.code)
    }
}

fn in_arena(a: usize) -> bool {
    crate::backend::arena_map_contains(a)
}

// ---- per-thread recovery state (async-signal-safe: const-initialised, no destructors) -------

#[derive(Clone, Copy)]
struct Recovery {
    /// Address of the `jmp` word of the innermost guarded call (0: none).
    jmp: usize,
    /// That call's stack: `[guard page start, top)`; the guard page is its first page.
    stack: (usize, usize),
    /// The end of the guard page.
    guard_end: usize,
    /// The thread's signal mask when the call started: a recovery resumes with it (the
    /// faulting code may have been a signal handler, whose frame's mask — with the handler's
    /// own signals blocked — would otherwise stay in force for good).
    mask: libc::sigset_t,
}

/// An empty signal set, as a constant (all bits clear).
const NO_SIGNALS: libc::sigset_t = {
    // SAFETY: `sigset_t` is plain integers; all-zero is the empty set.
    unsafe { std::mem::zeroed() }
};

thread_local! {
    static RECOVERY: Cell<Recovery> = const {
        Cell::new(Recovery { jmp: 0, stack: (0, 0), guard_end: 0, mask: NO_SIGNALS })
    };
    static LAST_FAULT: Cell<Option<RawFault>> = const { Cell::new(None) };
}

// ---- the handler ------------------------------------------------------------------------------

struct PrevAction(libc::sigaction);
// SAFETY: written once (by `OnceLock::get_or_init`) and never mutated afterwards; it is plain
// data (addresses, flags, a signal mask). The handler may run before it is written and then
// finds `PREV` unset, which it tolerates.
unsafe impl Sync for PrevAction {}
// SAFETY: as above: plain data moved once into the static.
unsafe impl Send for PrevAction {}

static PREV: OnceLock<std::result::Result<PrevAction, mpkvirt_sys::Error>> = OnceLock::new();

/// Installs the SIGSEGV handler (once per process).
///
/// # Errors
///
/// [`Error::Unsupported`] when `sigaction` fails.
pub(crate) fn install_handler() -> Result<()> {
    if std::env::var_os("MPKVIRT_DEBUG_FAULTS").is_some_and(|v| v == "1") {
        DEBUG.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let prev = PREV.get_or_init(|| {
        // SAFETY: `on_segv` is async-signal-safe (atomics, const thread-locals, write(2)) and
        // chains every fault it does not recover to the action it replaces.
        unsafe { signal::install(libc::SIGSEGV, on_segv, libc::SA_ONSTACK) }.map(PrevAction)
    });
    prev.as_ref()
        .map(drop)
        .map_err(|_| Error::Unsupported("installing the SIGSEGV handler"))
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // The interrupted code may be reading errno; chained handlers and write(2) may change it.
    let saved_errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    handle_segv(sig, info, ctx);
    // SAFETY: __errno_location takes no arguments and returns this thread's errno slot.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: that slot is valid for writes for the thread's lifetime.
    unsafe { *slot = saved_errno };
}

fn handle_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: installed with SA_SIGINFO, so the kernel passes a non-null, valid `siginfo_t`
    // that belongs to this handler invocation.
    let info_ref = unsafe { &*info };
    // SAFETY: likewise a non-null, valid `ucontext_t`, which only this invocation uses.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    // Only faults the kernel raised for an access are ours to interpret (`si_code > 0`); a
    // SIGSEGV sent with kill/tgkill goes straight to the previous handler.
    if info_ref.si_code <= 0 {
        chain_prev(sig, info, ctx);
        return;
    }
    let decoded = signal::decode_segv(info_ref);
    let raw = RawFault {
        addr: decoded.addr,
        access: signal::fault_access(uc),
        code: decoded.code,
        pkey: decoded.pkey,
    };
    // A grant this thread has not taken yet (grants reach threads at their next access).
    if let (SegvCode::PkuErr, Some(key)) = (decoded.code, decoded.pkey)
        && crate::sync::take_lazy_grant(uc, key)
    {
        return; // the access runs again with the new rights
    }
    let ip = signal::ip(uc);
    if ip == addr::probe_read8_insn() || ip == addr::probe_write8_insn() {
        LAST_FAULT.set(Some(raw));
        // SAFETY: the thread stopped at a probe's only access; probes push nothing, so with
        // the same %rsp `mpkvirt_probe_fault_ret` returns PROBE_FAULTED to the probe's caller.
        unsafe { signal::redirect(uc, addr::probe_fault_ret(), signal::sp(uc), PROBE_FAULTED) };
        return;
    }
    let rec = RECOVERY.get();
    let in_guard_page = (rec.stack.0..rec.guard_end).contains(&raw.addr);
    let on_guarded_stack = (rec.stack.0..rec.stack.1).contains(&signal::sp(uc));
    if rec.jmp != 0 && on_guarded_stack && (in_guard_page || in_arena(raw.addr)) {
        // SAFETY: `rec.jmp` is the address of the `jmp` word of the innermost guarded call on
        // this thread, still in progress (RECOVERY is restored before that call's frame
        // returns); the word is key-0 memory on the caller's stack, readable here.
        let sp = unsafe { (rec.jmp as *const usize).read_volatile() };
        if sp != 0 {
            LAST_FAULT.set(Some(raw));
            // SAFETY: the thread was running on this call's stack (checked above) and `sp` is
            // the non-zero stack pointer mpkvirt_stack_call saved for exactly this resume
            // point, which expects %rax = 1. The frames left behind are never resumed.
            unsafe { signal::redirect(uc, addr::stack_call_resume(), sp, 1) };
            // The call's caller resumes with the signal mask it had.
            uc.uc_sigmask = rec.mask;
            // Whatever PKRU the faulting code had (it may have reached a gate's WRPKRU with a
            // forged value before faulting), it resumes with none but key 0; the guarded
            // call's caller installs its legitimate view again through the gate.
            // SAFETY: `uc` is this handler's own context; mpkvirt owns the interrupted
            // thread's PKRU, and the deny value keeps key 0 (the stack, the code) readable.
            unsafe { signal::set_frame_pkru(uc, mpkvirt_sys::Pkru::LINUX_INIT.bits()) };
            return;
        }
    }
    if in_arena(raw.addr) {
        report_unhandled(&raw);
    }
    if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        report_debug(&raw, ip, signal::sp(uc), signal::frame_pkru(uc));
    }
    chain_prev(sig, info, ctx);
}

/// `MPKVIRT_DEBUG_FAULTS=1`: every fault the handler does not recover is described on
/// stderr before it goes on (instruction pointer, address, code, key, PKRU).
static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn report_debug(raw: &RawFault, ip: usize, sp: usize, pkru: Option<u32>) {
    let mut buf = [0u8; 240];
    let mut w = Cursor {
        buf: &mut buf,
        len: 0,
    };
    w.put(b"mpkvirt: fault: ip 0x");
    w.hex(ip as u64);
    w.put(b" (handler at 0x");
    w.hex(handle_segv as *const () as u64);
    w.put(b") sp 0x");
    w.hex(sp as u64);
    w.put(b" addr 0x");
    w.hex(raw.addr as u64);
    w.put(b" code ");
    w.hex(match raw.code {
        SegvCode::MapErr => 1,
        SegvCode::AccErr => 2,
        SegvCode::PkuErr => 4,
        SegvCode::Other(c) => c as u64,
    });
    if let Some(k) = raw.pkey {
        w.put(b" key ");
        w.hex(u64::from(k.index()));
    }
    if let Some(p) = pkru {
        w.put(b" pkru 0x");
        w.hex(u64::from(p));
    }
    w.put(b"\n");
    let len = w.len;
    // SAFETY: write(2) is async-signal-safe; the buffer is a live local of `len` bytes.
    unsafe { libc::write(2, buf.as_ptr().cast(), len) };
}

/// Passes the signal to the handler that was installed before ours.
fn chain_prev(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    if let Some(Ok(prev)) = PREV.get() {
        // SAFETY: called from the SIGSEGV handler with the kernel's arguments, and `prev` is
        // the action `install` replaced for SIGSEGV.
        unsafe { signal::chain(&prev.0, sig, info, ctx) };
    }
}

/// Writes a one-line report without allocating (async-signal-safe).
fn report_unhandled(raw: &RawFault) {
    let mut buf = [0u8; 160];
    let mut w = Cursor {
        buf: &mut buf,
        len: 0,
    };
    w.put(b"mpkvirt: unhandled domain fault: ");
    w.put(match raw.access {
        Some(Access::Read) => b"read",
        Some(Access::Write) => b"write",
        Some(Access::Execute) => b"fetch",
        None => b"access",
    });
    w.put(b" at 0x");
    w.hex(raw.addr as u64);
    if let Some(k) = raw.pkey {
        w.put(b", key ");
        w.hex(u64::from(k.index()));
    }
    w.put(b" (run it in a guarded call to get a report)\n");
    let len = w.len;
    // SAFETY: write(2) is async-signal-safe; the buffer is a live local of `len` bytes.
    unsafe { libc::write(2, buf.as_ptr().cast(), len) };
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Cut at a character boundary so the buffer stays UTF-8.
        let room = self.buf.len() - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.put(&s.as_bytes()[..n]);
        Ok(())
    }
}

impl Cursor<'_> {
    fn put(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    fn hex(&mut self, v: u64) {
        let digits = if v == 0 {
            1
        } else {
            (67 - v.leading_zeros() as usize) / 4
        };
        for i in (0..digits).rev() {
            let d = ((v >> (4 * i)) & 0xf) as u8;
            self.put(&[if d < 10 { b'0' + d } else { b'a' + d - 10 }]);
        }
    }
}

// ---- probes -----------------------------------------------------------------------------------

/// Reads (`write == None`) or writes one byte at `addr`, returning the fault instead of dying.
///
/// The caller (a backend's `access`) has checked that `addr` lies in one of its reservations:
/// domain memory, to which mpkvirt never hands out Rust references.
pub(crate) fn probe(addr: usize, write: Option<u8>) -> std::result::Result<u8, RawFault> {
    LAST_FAULT.set(None);
    let v = match write {
        // SAFETY: one byte access done by assembly, like a volatile access. `addr` lies in one
        // of the backend's reservations (checked by its caller), which Rust code never holds
        // references into, and the handler installed with the backend recovers a fault.
        // Other threads touching the byte at the same time are the caller's business, as for
        // any volatile access to shared memory.
        None => unsafe { mpkvirt_asm::mpkvirt_probe_read8(addr as *const u8) },
        // SAFETY: as above; a successful write changes only that byte of domain memory.
        Some(b) => unsafe { mpkvirt_asm::mpkvirt_probe_write8(addr as *mut u8, b) },
    };
    if v == PROBE_FAULTED {
        Err(LAST_FAULT.take().unwrap_or(RawFault {
            addr,
            access: None,
            code: SegvCode::Other(0),
            pkey: None,
        }))
    } else {
        Ok(v as u8)
    }
}

// ---- guarded calls ------------------------------------------------------------------------

/// Usable size of a guarded call's stack (address space; pages are touched on demand).
const STACK_SIZE: usize = 1 << 20;

/// A stack for guarded calls: `[guard page][usable stack]`.
struct GuardStack {
    base: usize,
    len: usize,
}

impl GuardStack {
    /// The length of every stack's mapping: the guard page and the usable stack.
    fn len() -> usize {
        STACK_SIZE + mman::page_size()
    }

    fn new() -> Result<GuardStack> {
        let page = mman::page_size();
        let len = GuardStack::len();
        let base = mman::reserve(len, Prot::NONE)
            .map_err(|source| Error::Reserve { len, source })? as usize;
        // SAFETY: the range was just reserved by us and nothing refers to it.
        unsafe { mman::mprotect((base + page) as *mut u8, STACK_SIZE, Prot::READ_WRITE) }.map_err(
            |source| Error::Retag {
                addr: base + page,
                len: STACK_SIZE,
                prot: Prot::READ_WRITE,
                key: Pkey::DEFAULT,
                source,
            },
        )?;
        Ok(GuardStack { base, len })
    }
    fn top(&self) -> usize {
        self.base + self.len
    }
    fn guard(&self) -> (usize, usize) {
        (self.base, self.base + mman::page_size())
    }
}

impl GuardStack {
    /// Gives the stack's touched pages back (after its frames were abandoned).
    fn release_pages(&self) {
        let page = mman::page_size();
        // SAFETY: the usable part of a stack whose frames were abandoned and are never
        // resumed; nothing refers to it (see `run_guarded`'s contract). It reads as zero
        // afterwards and stays mapped.
        let _ = unsafe { mman::madvise_dontneed((self.base + page) as *mut u8, self.len - page) };
    }
}

impl Drop for GuardStack {
    fn drop(&mut self) {
        // SAFETY: a stack is dropped when no guarded call runs on it (its call returned or
        // was abandoned, or the cache was full); by `run_guarded`'s contract nothing
        // refers to abandoned frames on it.
        let _ = unsafe { mman::munmap(self.base as *mut u8, self.len) };
    }
}

/// How many finished stacks the process keeps for reuse (more guarded calls at once map
/// stacks of their own and unmap them when they end).
const CACHED_STACKS: usize = 64;

/// Stacks of finished guarded calls, ready for reuse by any thread: each slot holds a
/// stack's base (0: empty). Process-wide rather than per thread: a thread's cache would have
/// to be emptied when the thread ends, and no hook runs reliably then (a Rust thread-local
/// first used from a pthread-key destructor never gets its destructor run, nor does a key
/// set in glibc's last destructor round). Lock-free: signal handlers make guarded calls too.
static FREE_STACKS: [AtomicUsize; CACHED_STACKS] = [const { AtomicUsize::new(0) }; CACHED_STACKS];

/// A stack from the cache.
fn cached_stack() -> Option<GuardStack> {
    FREE_STACKS.iter().find_map(|slot| {
        if slot.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let base = slot.swap(0, Ordering::Acquire);
        (base != 0).then(|| GuardStack {
            base,
            len: GuardStack::len(),
        })
    })
}

/// Puts a stack back in the cache (or unmaps it when the cache is full).
fn keep(stack: GuardStack) {
    for slot in &FREE_STACKS {
        if slot.load(Ordering::Relaxed) == 0
            && slot
                .compare_exchange(0, stack.base, Ordering::Release, Ordering::Relaxed)
                .is_ok()
        {
            std::mem::forget(stack);
            return;
        }
    }
    drop(stack);
}

/// Why a guarded call ended without `f`'s result.
pub(crate) enum Failed {
    /// `f` faulted (and was abandoned).
    Fault(RawFault, FaultKind),
    /// No stack could be mapped for the call; `f` did not run.
    NoStack(Error),
}

struct Call<'f, F, R> {
    f: &'f mut F,
    out: Option<std::thread::Result<R>>,
}

unsafe extern "sysv64" fn trampoline<F: FnMut() -> R, R>(arg: *mut c_void) {
    // SAFETY: `arg` is the `Call` record `run_guarded` passed to mpkvirt_stack_call; it
    // outlives this call and nothing else touches it while the closure runs.
    let call = unsafe { &mut *arg.cast::<Call<'_, F, R>>() };
    // Panics must not unwind through the assembly frame: catch them here.
    call.out = Some(catch_unwind(AssertUnwindSafe(&mut *call.f)));
}

/// Makes sure the thread has an alternate signal stack, so the handler can run when a
/// guarded call overflows its stack (Rust gives its own threads one; foreign threads may not
/// have any).
fn ensure_altstack() {
    let mut old = std::mem::MaybeUninit::<libc::stack_t>::zeroed();
    // SAFETY: querying (null new stack) only writes `old`.
    if unsafe { libc::sigaltstack(std::ptr::null(), old.as_mut_ptr()) } != 0 {
        return;
    }
    // SAFETY: sigaltstack succeeded and filled `old`.
    if unsafe { old.assume_init() }.ss_flags & libc::SS_DISABLE == 0 {
        return;
    }
    let size = 64 << 10;
    let Ok(stack) = mman::reserve(size, Prot::READ_WRITE) else {
        return;
    };
    let new = libc::stack_t {
        ss_sp: stack.cast(),
        ss_flags: 0,
        ss_size: size,
    };
    // SAFETY: `stack` is a fresh private mapping used for nothing else; it is leaked on
    // purpose (a thread's alternate stack must outlive the thread's signal handling).
    unsafe { libc::sigaltstack(&new, std::ptr::null_mut()) };
}

/// Runs `f` on a separate stack. Returns `Ok` with `f`'s result (or its panic payload), or
/// the fault that made the handler abandon it (see the module docs). The stack goes back to
/// the cache either way.
///
/// # Safety
///
/// No thread `f` starts may keep borrowing from it once it returns or is abandoned (see
/// `Manager::guarded`).
pub(crate) unsafe fn run_guarded<F, R>(
    mut f: F,
) -> std::result::Result<std::thread::Result<R>, Failed>
where
    F: FnMut() -> R,
{
    ensure_altstack();
    let stack = match cached_stack() {
        Some(s) => s,
        None => GuardStack::new().map_err(Failed::NoStack)?,
    };
    let mut mask = NO_SIGNALS;
    // SAFETY: queries the calling thread's mask into `mask` (no new mask).
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &raw mut mask) };
    let was_panicking = std::thread::panicking();
    let mut call = Call {
        f: &mut f,
        out: None,
    };
    let mut jmp: usize = 0;
    let prev = RECOVERY.replace(Recovery {
        jmp: (&raw mut jmp) as usize,
        stack: (stack.base, stack.top()),
        guard_end: stack.guard().1,
        mask,
    });
    // SAFETY: `stack.top()` is 16-byte aligned (the mapping is page-aligned and its length a
    // page multiple) and tops a read-write stack with a guard page below that no live frame
    // uses (a fresh one, or one whose previous call returned or was abandoned — abandoned
    // frames are never resumed, and by this function's contract nothing else refers to
    // them); `jmp` and `call` outlive the call; the trampoline catches panics, so nothing
    // unwinds through the assembly.
    let faulted = unsafe {
        mpkvirt_asm::mpkvirt_stack_call(
            (&raw mut call).cast(),
            trampoline::<F, R>,
            stack.top() as *mut u8,
            &raw mut jmp,
        )
    };
    RECOVERY.set(prev);
    if faulted != 0 {
        if std::thread::panicking() && !was_panicking {
            // The fault interrupted a panic's unwinding: the unwinder cannot go on from the
            // fault, and abandoning it leaves the thread's panic state set for good (Rust
            // treats a panic in a destructor during unwinding the same way).
            log_line(
                "mpkvirt: a guarded call faulted while a panic was unwinding through it; aborting\n",
            );
            std::process::abort();
        }
        let raw = LAST_FAULT.take().unwrap_or(RawFault {
            addr: 0,
            access: None,
            code: SegvCode::Other(0),
            pkey: None,
        });
        let kind = if (stack.guard().0..stack.guard().1).contains(&raw.addr) {
            FaultKind::StackOverflow
        } else {
            FaultKind::Violation
        };
        // The touched pages of the abandoned frames go back to the system; the stack (and
        // its two mappings) is reused.
        stack.release_pages();
        keep(stack);
        drop(call);
        return Err(Failed::Fault(raw, kind));
    }
    keep(stack);
    Ok(call
        .out
        .take()
        .unwrap_or_else(|| Err(Box::new("guarded call did not run"))))
}

/// Writes a line to stderr in one `write(2)` system call: no allocation, no lock, and not a
/// cancellation point (library code calls it).
pub(crate) fn log_line(line: &str) {
    // SAFETY: a raw write of a live buffer of that length to file descriptor 2.
    unsafe {
        libc::syscall(
            libc::SYS_write,
            2 as libc::c_long,
            line.as_ptr(),
            line.len(),
        )
    };
}

/// Formats into a fixed buffer (truncating) and writes it with [`log_line`]: usable from
/// library code, which must not allocate.
pub(crate) fn log_fmt(args: fmt::Arguments<'_>) {
    let mut buf = [0u8; 512];
    let mut w = Cursor {
        buf: &mut buf,
        len: 0,
    };
    let _ = fmt::Write::write_fmt(&mut w, args);
    let len = w.len;
    log_line(std::str::from_utf8(&buf[..len]).unwrap_or("mpkvirt: (unprintable message)\n"));
}

/// Logs `prefix` and an error on one line (see [`log_fmt`]).
pub(crate) fn log_error(prefix: &str, e: &Error) {
    log_fmt(format_args!("{prefix}{e}\n"));
}

/// Runs `f` with `fd` borrowed.
pub(crate) fn with_borrowed_fd<R>(fd: i32, f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> R) -> R {
    assert!(fd >= 0, "callers pass non-negative descriptors");
    // SAFETY: `fd` is not negative, so not the -1 niche `BorrowedFd` reserves; the kernel
    // checks that it names an open file when it is used (EBADF otherwise), and the borrow
    // lasts only for `f`, which hands it to one system call.
    f(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
}
