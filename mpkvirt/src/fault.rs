//! Faults: the SIGSEGV (and SIGBUS) handler, checked single-byte accesses (probes), guarded
//! calls, and reports that name the virtual domain.
//!
//! One process-wide handler, for SIGSEGV and for SIGBUS (a file page of a domain beyond the
//! end of its file), is installed the first time a real backend is built. It
//! decides, using only async-signal-safe state (atomics and const-initialised thread-locals),
//! whether a fault is *ours*:
//!
//! 1. the interrupted instruction is a probe's access (`mpkvirt_probe_*_insn`): the probe is
//!    resumed and returns "faulted";
//! 2. the thread is inside a guarded call and the address is domain memory (the arena map of
//!    `backend/arena.rs`: O(1), however many arenas) or the guarded call's own stack: the
//!    guarded call is resumed at `mpkvirt_stack_call_resume` with the deny PKRU (key 0 only)
//!    in the frame, and returns the fault;
//! 3. otherwise, for domain memory, a one-line report is written to stderr;
//!
//! and then every fault it does not resume goes to the previously installed handler (Rust's
//! stack-overflow handler, a sanitizer, or the default action). The handler runs with the
//! kernel's initial PKRU (key 0 only) and touches only key-0 memory.
//!
//! Guarded calls run on stacks kept for reuse in slots of a region reserved when mpkvirt
//! starts; the region's base is in the root (library memory), so no address the library
//! `mprotect`s or empties comes from application memory (more than `POOL_SLOTS` calls at once
//! map stacks of their own).
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
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// A bus error (SIGBUS): an access to a page of a file mapping beyond the end of the
    /// file (a mapping longer than the file, or a file truncated after it was mapped).
    BusError,
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
            FaultKind::BusError => write!(
                f,
                "bus error: {access} at {:#x}, beyond the end of a mapped file",
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
        Cell::new(Recovery { jmp: 0, stack: (0, 0), mask: NO_SIGNALS })
    };
    static LAST_FAULT: Cell<Option<RawFault>> = const { Cell::new(None) };
    /// The signal of the fault in `LAST_FAULT` (SIGSEGV or SIGBUS).
    static LAST_SIGNAL: Cell<libc::c_int> = const { Cell::new(0) };
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
/// The action the handler replaced for SIGBUS (as `PREV` for SIGSEGV).
static PREV_BUS: OnceLock<std::result::Result<PrevAction, mpkvirt_sys::Error>> = OnceLock::new();

/// Installs the fault handler for SIGSEGV and SIGBUS (once per process): a guarded call that
/// touches a file page beyond the end of its file gets SIGBUS, and is recovered the same way.
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
        unsafe { signal::install_blocking_async(libc::SIGSEGV, on_segv, libc::SA_ONSTACK) }
            .map(PrevAction)
    });
    let prev_bus = PREV_BUS.get_or_init(|| {
        // SAFETY: as above, for SIGBUS (chained to SIGBUS's previous action).
        unsafe { signal::install_blocking_async(libc::SIGBUS, on_segv, libc::SA_ONSTACK) }
            .map(PrevAction)
    });
    prev.as_ref()
        .and(prev_bus.as_ref())
        .map(drop)
        .map_err(|_| Error::Unsupported("installing the SIGSEGV and SIGBUS handlers"))
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
    // (SIGBUS codes overlap SIGSEGV's numbers: only a SIGSEGV is a key fault.)
    if let (libc::SIGSEGV, SegvCode::PkuErr, Some(key)) = (sig, decoded.code, decoded.pkey)
        && crate::sync::take_lazy_grant(uc, key)
    {
        return; // the access runs again with the new rights
    }
    let ip = signal::ip(uc);
    if ip == addr::probe_read8_insn() || ip == addr::probe_write8_insn() {
        LAST_FAULT.set(Some(raw));
        LAST_SIGNAL.set(sig);
        // SAFETY: the thread stopped at a probe's only access; probes push nothing, so with
        // the same %rsp `mpkvirt_probe_fault_ret` returns PROBE_FAULTED to the probe's caller.
        unsafe { signal::redirect(uc, addr::probe_fault_ret(), signal::sp(uc), PROBE_FAULTED) };
        return;
    }
    let rec = RECOVERY.get();
    // (The whole stack, not only its guard: a pool slot that was not made usable faults on
    // its first push, see `POOL_READY`.)
    let in_stack = (rec.stack.0..rec.stack.1).contains(&raw.addr);
    // (Up to and including the top: a push that faults leaves %rsp where it was.)
    let on_guarded_stack = (rec.stack.0..=rec.stack.1).contains(&signal::sp(uc));
    if rec.jmp != 0 && on_guarded_stack && (in_stack || in_arena(raw.addr)) {
        // SAFETY: `rec.jmp` is the address of the `jmp` word of the innermost guarded call on
        // this thread, still in progress (RECOVERY is restored before that call's frame
        // returns); the word is key-0 memory on the caller's stack, readable here.
        let sp = unsafe { (rec.jmp as *const usize).read_volatile() };
        if sp != 0 {
            LAST_FAULT.set(Some(raw));
            LAST_SIGNAL.set(sig);
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
    let prev = if sig == libc::SIGBUS {
        &PREV_BUS
    } else {
        &PREV
    };
    if let Some(Ok(prev)) = prev.get() {
        // SAFETY: called from the handler of `sig` with the kernel's arguments, and `prev` is
        // the action `install` replaced for `sig`.
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

/// Stacks kept for reuse, in a region mpkvirt reserves when it starts (`meta::init`).
pub(crate) const POOL_SLOTS: usize = 64;
/// Each pool slot: a guard area (a multiple of any page size) below a usable stack.
const POOL_GUARD: usize = 64 << 10;
/// A pool slot's span in the region.
pub(crate) const POOL_SPAN: usize = POOL_GUARD + STACK_SIZE;

/// Which pool slots are in use (bit `i`), and which have their usable part read-write.
/// Application memory, so only hints: a stray write here can make two calls share a slot
/// (its frames are key-0 memory, writable by any thread anyway), make every call map a
/// stack of its own, or make one call run on a slot not yet made read-write (it then faults
/// on its own stack, which is reported as an overflow, and the slot is prepared again). No
/// address is taken from here: slots are found from the region's base in the root, so the
/// library never empties or changes memory outside the region it reserved.
static POOL_BUSY: AtomicU64 = AtomicU64::new(0);
static POOL_READY: AtomicU64 = AtomicU64::new(0);

/// A stack for a guarded call: `[guard][usable stack]`, a pool slot or a mapping of its own.
struct GuardStack {
    base: usize,
    guard_len: usize,
    /// The pool slot, or `None` for a mapping made for this call alone.
    slot: Option<usize>,
}

impl GuardStack {
    /// A pool slot if one is free (and the pool's base can be read: not in a signal
    /// handler's context, whose PKRU may deny library memory), else a stack of its own.
    fn acquire() -> Result<GuardStack> {
        if let Some(stack) = GuardStack::from_pool() {
            return Ok(stack);
        }
        let page = mman::page_size();
        let len = STACK_SIZE + page;
        let base = mman::reserve(len, Prot::NONE)
            .map_err(|source| Error::Reserve { len, source })? as usize;
        let stack = GuardStack {
            base,
            guard_len: page,
            slot: None,
        };
        stack.make_usable()?;
        Ok(stack)
    }

    fn from_pool() -> Option<GuardStack> {
        if !crate::meta::library_readable() {
            return None;
        }
        let pool = crate::meta::root().guard_pool.load(Ordering::Acquire);
        if pool == 0 {
            return None;
        }
        let mut busy = POOL_BUSY.load(Ordering::Relaxed);
        let i = loop {
            let i = (!busy).trailing_zeros() as usize;
            if i >= POOL_SLOTS {
                return None;
            }
            match POOL_BUSY.compare_exchange_weak(
                busy,
                busy | 1 << i,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break i,
                Err(now) => busy = now,
            }
        };
        let stack = GuardStack {
            base: pool + i * POOL_SPAN,
            guard_len: POOL_GUARD,
            slot: Some(i),
        };
        if POOL_READY.load(Ordering::Acquire) & 1 << i == 0 {
            if stack.make_usable().is_err() {
                return None; // (dropping `stack` frees the slot)
            }
            POOL_READY.fetch_or(1 << i, Ordering::Release);
        }
        Some(stack)
    }

    /// Makes the usable part read-write.
    fn make_usable(&self) -> Result<()> {
        let usable = self.base + self.guard_len;
        // SAFETY: the usable part of a stack in a range mpkvirt reserved (a pool slot, found
        // from the root's base, or a reservation just made); no guarded call runs on it.
        unsafe { mman::mprotect(usable as *mut u8, STACK_SIZE, Prot::READ_WRITE) }.map_err(
            |source| Error::Retag {
                addr: usable,
                len: STACK_SIZE,
                prot: Prot::READ_WRITE,
                key: Pkey::DEFAULT,
                source,
            },
        )
    }

    fn top(&self) -> usize {
        self.base + self.guard_len + STACK_SIZE
    }

    fn guard(&self) -> (usize, usize) {
        (self.base, self.base + self.guard_len)
    }

    /// Gives the stack's touched pages back (after its frames were abandoned).
    fn release_pages(&self) {
        let usable = self.base + self.guard_len;
        // SAFETY: the usable part of a stack mpkvirt mapped (see `make_usable`) whose frames
        // were abandoned and are never resumed; nothing refers to them (see `run_guarded`'s
        // contract). It reads as zero afterwards and stays mapped.
        let _ = unsafe { mman::madvise_dontneed(usable as *mut u8, STACK_SIZE) };
    }

    /// After a fault on the stack itself outside its guard: the slot may not be usable
    /// (see `POOL_READY`); it is prepared again on its next use.
    fn unready(&self) {
        if let Some(i) = self.slot {
            POOL_READY.fetch_and(!(1 << i), Ordering::Release);
        }
    }
}

impl Drop for GuardStack {
    fn drop(&mut self) {
        match self.slot {
            Some(i) => {
                POOL_BUSY.fetch_and(!(1 << i), Ordering::Release);
            }
            None => {
                // SAFETY: the mapping `acquire` made for this call alone, which has returned
                // or was abandoned; by `run_guarded`'s contract nothing refers to its frames.
                let _ = unsafe { mman::munmap(self.base as *mut u8, self.guard_len + STACK_SIZE) };
            }
        }
    }
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
    let stack = GuardStack::acquire().map_err(Failed::NoStack)?;
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
        let on_stack = (stack.base..stack.top()).contains(&raw.addr);
        let kind = if on_stack {
            // The guard, or the stack itself when its slot was not usable (see `POOL_READY`).
            if raw.addr >= stack.guard().1 {
                stack.unready();
            }
            FaultKind::StackOverflow
        } else if LAST_SIGNAL.get() == libc::SIGBUS {
            FaultKind::BusError
        } else {
            FaultKind::Violation
        };
        // The touched pages of the abandoned frames go back to the system; a pool slot is
        // reused, a stack of the call's own unmapped.
        stack.release_pages();
        drop(stack);
        drop(call);
        return Err(Failed::Fault(raw, kind));
    }
    drop(stack);
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
