//! Sandboxes: untrusted code run on a stack of its own inside one domain's view, which it
//! leaves only by yielding back to the code that ran it.
//!
//! A view is part of a per-thread stack of views, and every op is reachable through the
//! call gate: code run inside a plain view could leave it (and get the view below back) or
//! enter a view of any domain whose uid it guesses. A *sandbox* closes both doors.
//! [`Manager::sandbox_run`] is one op, `S_RUN`, that enters a view of one domain and makes the
//! gate leave on a stack inside that domain (a [`Context`]), with that view's rights; the
//! thread's record remembers where the run was called from. While the thread is sandboxed,
//! the library refuses every op but three:
//!
//! - `OP_SANDBOX_YIELD` ([`yield_now`]): the sandbox's view ends and the gate leaves on the
//!   stack `sandbox_run` was called from, with the rights the caller had; `sandbox_run`
//!   returns the yielded value and the context's stack pointer, to run it again later.
//! - `OP_SANDBOX_QUERY` ([`query`]) and `OP_SANDBOX_SIGNAL` ([`signal`]), for the runner's
//!   signal handlers: whether the thread's normal context is sandboxed; preempting it (it
//!   yields [`PREEMPTED`], and continues where it was when run again) or abandoning it (it
//!   yields a value for good from the top of its stack). The second takes its block and the
//!   signal context on the thread's alternate stack only.
//! - `OP_SYNC`, mpkvirt's own signal handler taking new process-wide rights, only with its
//!   argument block on the thread's alternate signal stack.
//!
//! Both stack pointers live in the record, in library memory: a jump into the middle of the
//! switch code (`asm/x86_64/sandbox.S`) reaches only the gate's entry, and a yield always
//! resumes the runner's stack where it called `sandbox_run`. What that stack holds (the
//! return address, the callee-saved registers) is the runner's to keep out of the sandbox's
//! reach: a runner whose stack the sandboxed code can write (key-0 memory, say) gives it
//! control after the yield, with the runner's rights. What the sandboxed code can still do with the gate is yield (with any value: the
//! runner validates it) and ask whether it is sandboxed.
//!
//! Sandboxes need a stack-switching gate: the protected and gate-only metadata modes
//! ([`crate::MetadataMode`]), and cooperative mode on machines without PKU (through the
//! gate-only path; the direct path refuses sandboxed threads too). Cooperative mode on PKU
//! hardware is refused.
//!
//! # Safety
//!
//! Calls into the switch assembly, and writes a new context's first frame into the domain's
//! memory. [`Manager::sandbox_run`] is `unsafe`: the runner promises that the context's
//! stack pointer is one [`Context::new`] prepared or a yield returned, not run since.
#![allow(unsafe_code, reason = "stack switching through the call gate")]

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;

use crate::backend::Backend;
use crate::domain::Domain;
use crate::error::{Error, Result};
use crate::gate::ThreadRecord;
use crate::manager::Manager;
use crate::manager::shared::{DomRef, MgrRef};
use crate::ops::{Call, Pod, STATUS_BAD_CALL, STATUS_OK};
use mpkvirt_asm::addr;
use mpkvirt_sys::AccessRights;

/// A thread's sandbox state, in its record.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct State {
    /// Whether the thread's normal context runs sandboxed code.
    pub(crate) active: bool,
    /// Where the gate leaves when the sandboxed code yields: the runner's stack pointer.
    host_rsp: u64,
    /// Where a handler may send the sandboxed context to yield from (top of its stack).
    exit_sp: u64,
    /// The thread's view sequence number before the sandbox's view.
    mark: u64,
    /// The runner's output slot (its argument block), written when the sandbox yields.
    out: u64,
    /// The sandbox's domain, `[base, end)`.
    base: u64,
    end: u64,
    /// Whether it keeps the process-wide grants and other managers' rights.
    pub(crate) shared: bool,
    /// The runner's PKRU before the run: the fields of keys no manager owns come back from
    /// it at the yield (the managers' own are recomputed).
    pre_pkru: u32,
}

/// `S_RUN`'s input.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunIn {
    pub(crate) m: MgrRef,
    pub(crate) d: DomRef,
    /// The context's stack pointer.
    pub(crate) sp: u64,
    /// Where a handler may send it to yield from.
    pub(crate) exit_sp: u64,
    /// What the context's pending yield returns (or its entry function receives).
    pub(crate) value: u64,
    /// Non-zero: the sandbox keeps the process-wide grants and other managers' rights.
    pub(crate) shared: u64,
}
// SAFETY: integers only (MgrRef and DomRef are Pod).
unsafe impl Pod for RunIn {}

/// What a sandboxed context yielded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct Yielded {
    /// The context, to run again ([`Manager::sandbox_run`]).
    pub sp: usize,
    /// The value it yielded: anything the sandboxed code chose.
    pub value: u64,
}

/// What [`query`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Query {
    /// The thread runs no sandboxed code (or the gate was busy: library code was
    /// interrupted).
    NotSandboxed,
    /// The interrupted context had the library's rights: the gate itself, entering or
    /// leaving. Leave it alone.
    Library,
    /// Sandboxed code: a handler may resume it at a function that yields, on a stack that
    /// ends at `exit_sp` (16-byte aligned; the function starts at `exit_sp - 8`, as after a
    /// call).
    Sandboxed {
        /// The top of the stack to yield from.
        exit_sp: usize,
    },
}

/// A new sandboxed context: a stack prepared inside a domain so that its first run calls
/// `f(arg, value)` on it.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// The stack pointer to run.
    pub sp: usize,
}

/// Words of a new context's first frame (see `asm/x86_64/sandbox.S`).
const FRAME_WORDS: usize = 9;

impl Context {
    /// Prepares a context whose stack ends at `top` (rounded down to 16 bytes) to call
    /// `f(arg, value)`, `value` being the first run's. `f` runs with the sandbox's rights on
    /// that stack and must never return: it ends by yielding for good.
    ///
    /// # Safety
    ///
    /// The 72 bytes below `top` must be writable by the caller now and belong to the
    /// domain the context will run in, and nothing else may use them.
    pub unsafe fn new(top: usize, f: extern "C" fn(u64, u64), arg: u64) -> Context {
        let top = top & !15;
        let sp = top - FRAME_WORDS * 8;
        let frame: [u64; FRAME_WORDS] = [
            mpkvirt_asm::addr::sandbox_resume() as u64,
            0x1F80 | (0x037F << 32),
            0,
            0,
            arg,
            f as usize as u64,
            0,
            0,
            mpkvirt_asm::addr::sandbox_entry() as u64,
        ];
        // SAFETY: the caller vouches the 72 bytes below `top` are writable and its own; `sp`
        // is 8-byte aligned.
        unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), sp as *mut u64, FRAME_WORDS) };
        Context { sp }
    }
}

thread_local! {
    /// Whether the thread made an op through `gate::call` (which registers it and arms its
    /// exit hook) before its first sandbox.
    static READY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The gate a sandbox switches through in this process's metadata mode.
fn gate() -> Result<unsafe extern "sysv64" fn(u64, *mut u8) -> u64> {
    match crate::meta::init()? {
        crate::MetadataMode::Protected => Ok(mpkvirt_asm::mpkvirt_gate_call),
        crate::MetadataMode::GateOnly => Ok(mpkvirt_asm::mpkvirt_gate_call_nopku),
        // Without PKU the gate-only path serves a cooperative process too (the records and
        // their stacks are the same); with PKU it would write no PKRU.
        crate::MetadataMode::Cooperative if mpkvirt_sys::Pku::new().is_none() => {
            Ok(mpkvirt_asm::mpkvirt_gate_call_nopku)
        }
        crate::MetadataMode::Cooperative => Err(Error::Unsupported(
            "sandboxes in cooperative metadata mode on PKU hardware (no gate writes the sandbox's PKRU)",
        )),
    }
}

impl<B: Backend> Manager<B> {
    /// Runs the sandboxed context `sp` inside a view of `domain` (read-write) until it yields,
    /// and returns what it yielded. `value` is what its pending yield returns (for a new
    /// [`Context`], its function's second argument). `exit_sp` is where the thread's signal
    /// handlers may send it to yield from ([`query`]); it must lie in `domain` too.
    ///
    /// While it runs, the thread's views are sealed: the sandboxed code can end neither the
    /// sandbox's view nor any below it, and can enter no other view. On PKU hardware its
    /// rights are `domain`'s and key 0's only: every other key is denied, the process-wide
    /// grants and other managers' views included ([`Manager::sandbox_run_shared`] keeps
    /// those), and key 0 is read-only where the kernel allows it ([`seals_key0`]). The thread's alternate signal stack becomes the library's (handlers find the
    /// sandboxed context's frame there), if it was another.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] in cooperative metadata mode; [`Error::InvalidConfig`] when a
    /// stack pointer lies outside `domain` or the thread is already sandboxed (or in a signal
    /// handler); and [`Manager::enter`]'s errors.
    ///
    /// # Safety
    ///
    /// `sp` must be a context prepared by [`Context::new`] in `domain`'s memory, or one a
    /// yield returned, and not run since. The sandboxed code runs with the view's rights: it
    /// may write everything in `domain`, and key-0 memory unless [`seals_key0`].
    pub unsafe fn sandbox_run(
        &self,
        domain: &Domain<B>,
        sp: usize,
        exit_sp: usize,
        value: u64,
    ) -> Result<Yielded> {
        // SAFETY: the caller's contract.
        unsafe { self.run_sandbox(domain, sp, exit_sp, value, false) }
    }

    /// [`Manager::sandbox_run`] for code the runner trusts with what the thread reaches
    /// beyond this manager: the sandbox keeps the thread's process-wide grants and the
    /// rights of other managers' views (a host's own functions, run in an instance, reach
    /// the host's heap). The seal and the view of `domain` are the same; this manager's other
    /// domains stay out of reach. [`signal`] neither preempts nor aborts it: the code may
    /// hold the runner's locks (its allocator's), so it runs to its yields, and a fault in
    /// it is a fault of the runner's.
    ///
    /// # Errors
    ///
    /// As [`Manager::sandbox_run`].
    ///
    /// # Safety
    ///
    /// As [`Manager::sandbox_run`]; the sandboxed code may also write whatever the thread's
    /// process-wide rights and other views grant.
    pub unsafe fn sandbox_run_shared(
        &self,
        domain: &Domain<B>,
        sp: usize,
        exit_sp: usize,
        value: u64,
    ) -> Result<Yielded> {
        // SAFETY: the caller's contract.
        unsafe { self.run_sandbox(domain, sp, exit_sp, value, true) }
    }

    /// # Safety
    ///
    /// As [`Manager::sandbox_run`].
    unsafe fn run_sandbox(
        &self,
        domain: &Domain<B>,
        sp: usize,
        exit_sp: usize,
        value: u64,
        shared: bool,
    ) -> Result<Yielded> {
        if domain.manager_ref() != self.mref() {
            return Err(Error::ForeignDomain(domain.id()));
        }
        let gate = gate()?;
        // Registers the thread (and arms its exit hook) the way every op does, so that the
        // switch below goes straight through the gate.
        // (Once per thread. `OP_NOP` writes no output: only its status is read.)
        if !READY.get() {
            crate::gate::call(crate::ops::OP_NOP, std::ptr::null_mut())?;
            READY.set(true);
        }
        let mut c = Call {
            input: RunIn {
                m: self.mref(),
                d: domain.dref(),
                sp: sp as u64,
                exit_sp: exit_sp as u64,
                value,
                shared: u64::from(shared),
            },
            output: MaybeUninit::<Result<Yielded>>::uninit(),
        };
        let code = crate::manager::ops::code::<B>(crate::manager::ops::S_RUN);
        let _in_op = crate::gate::InOp::new();
        // SAFETY: `gate` is this mode's call gate, and the thread is registered; the block
        // is `S_RUN`'s. The caller vouches for `sp` (see above); the gate comes back here
        // when the context yields, with this frame intact (it lives on this thread's stack,
        // which the sandboxed code's view may write only if it is key-0 memory).
        let status = unsafe { mpkvirt_asm::mpkvirt_sandbox_run(code, (&raw mut c).cast(), gate) };
        match status {
            // SAFETY: STATUS_OK means the library wrote the output: at the yield, or with
            // the error that kept the run from starting.
            STATUS_OK => unsafe { c.output.assume_init() },
            crate::ops::STATUS_PANIC => Err(Error::Unsupported(
                "an internal error of mpkvirt (a panic inside the library)",
            )),
            _ => Err(Error::Unsupported("a sandbox run the library refused")),
        }
    }
}

/// Yields from sandboxed code: the thread returns to the runner's [`Manager::sandbox_run`]
/// with `value`; returns what the next run resumes this context with. Outside a sandbox it
/// returns at once with a status word of the library's (bit 63 set).
pub fn yield_now(value: u64) -> u64 {
    let Ok(gate) = gate() else {
        return STATUS_BAD_CALL;
    };
    // SAFETY: this mode's call gate; the op takes no argument block (`value` is not read as
    // a pointer). Inside a sandbox the call comes back here only when the context is run
    // again, on this same stack.
    unsafe { mpkvirt_asm::mpkvirt_sandbox_yield(value, gate) }
}

/// For signal handlers: whether the thread's normal context runs sandboxed code, given the
/// interrupted context's PKRU from its signal frame (`None` on machines without PKU).
///
/// Async-signal-safe: one gate call, no allocation.
pub fn query(frame_pkru: Option<u32>) -> Query {
    let Ok(gate) = gate() else {
        return Query::NotSandboxed;
    };
    let arg = frame_pkru.map_or(1 << 32, u64::from);
    // SAFETY: this mode's call gate; the op reads no argument block (the value is passed as
    // the block's address and never dereferenced).
    let status = unsafe { gate(crate::ops::OP_SANDBOX_QUERY, arg as *mut u8) };
    match status {
        QUERY_LIBRARY => Query::Library,
        s if s >= 16 && s & (1 << 63) == 0 => Query::Sandboxed {
            exit_sp: s as usize,
        },
        _ => Query::NotSandboxed,
    }
}

/// What a preempted sandbox yields (`asm/include/gate.h`).
pub const PREEMPTED: u64 = 3;
const _: () = assert!(PREEMPTED == 3 && XSAVE_MAX == 16384, "gate.h's values");

/// Bytes the preemption stub keeps for the extended state (`gate.h`'s `XSAVE_MAX`).
const XSAVE_MAX: u32 = 16384;

/// What a signal handler asks the library to do with the sandboxed context it interrupted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Make it yield [`PREEMPTED`] as soon as the handler returns, and continue, when it is
    /// run again, exactly where it was interrupted (every register and the extended state).
    Preempt,
    /// Abandon it: it yields this value, for good, from the top of its stack (`exit_sp`).
    Abort(u64),
}

/// What [`signal`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Signalled {
    /// The thread runs no sandboxed code (or the library was interrupted, or refused).
    NotSandboxed,
    /// The interrupted context had the library's rights (inside the gate): left alone.
    Library,
    /// Preempted: it yields [`PREEMPTED`] next.
    Preempted,
    /// Abandoned: it yields the abort value next (also what a preemption becomes when the
    /// context's stack pointer is not inside its domain, or the CPU's extended state does
    /// not fit the stub's room).
    Aborted,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SignalIn {
    ctx: u64,
    /// 0: preempt; 1: abort.
    action: u64,
    value: u64,
}
// SAFETY: integers only.
unsafe impl Pod for SignalIn {}

/// For a signal handler on the thread's alternate stack (where mpkvirt's handlers run):
/// preempts or abandons the sandboxed context the signal interrupted, by rewriting the
/// handler's `ctx` (the kernel's `ucontext_t`, which must be on the alternate stack too).
/// The context resumes with the sandbox's legitimate PKRU, whatever its frame held.
/// For an abort, the value should be one the runner does not take for a host call.
///
/// On a thread whose normal context runs a sealed sandbox ([`seals_key0`]) a successful call
/// does not return: the library returns from the signal itself (the handler's stack is key-0
/// memory, read-only at every level of such a thread), so the handler must have nothing left
/// to do, and must block asynchronous signals while it runs
/// (`mpkvirt_sys::signal::install_blocking_async`).
///
/// Async-signal-safe: one gate call, no allocation.
pub fn signal(ctx: *mut libc::ucontext_t, action: Action) -> Signalled {
    let (action, value) = match action {
        Action::Preempt => (0, 0),
        Action::Abort(v) => (1, v),
    };
    let input = SignalIn {
        ctx: ctx as u64,
        action,
        value,
    };
    // Straight to the gate, without the thread-local bookkeeping of `gate::call`: on a
    // thread whose normal context runs a sealed sandbox the op ends the handler (the library
    // returns from the signal itself), and that bookkeeping would never be undone. (A thread
    // that never went through a gate registers the masked way: it runs no sandbox.)
    let out = if crate::gate::registered() {
        direct_signal_op(input)
    } else {
        crate::ops::call::<SignalIn, u64>(crate::ops::OP_SANDBOX_SIGNAL, input)
    };
    match out {
        Ok(1) => Signalled::Library,
        Ok(2) => Signalled::Preempted,
        Ok(3) => Signalled::Aborted,
        _ => Signalled::NotSandboxed,
    }
}

/// Whether the context of signal frame `uc` ran with key 0 write-disabled: a sealed
/// sandbox's (no other code runs so).
pub(crate) fn frame_sealed(uc: &libc::ucontext_t) -> bool {
    mpkvirt_sys::signal::frame_pkru(uc).is_some_and(|p| p & 0b10 != 0)
}

/// `OP_SANDBOX_SIGNAL` through the call gate directly (see [`signal`]).
fn direct_signal_op(input: SignalIn) -> Result<u64> {
    let gate = gate()?;
    let mut c = Call {
        input,
        output: MaybeUninit::<Result<u64>>::uninit(),
    };
    // SAFETY: this mode's call gate and the op's argument block, on this handler's stack
    // (the alternate stack, where the op requires it). A sealed sandbox's thread is
    // registered (it entered the sandbox through an op).
    match unsafe { gate(crate::ops::OP_SANDBOX_SIGNAL, (&raw mut c).cast()) } {
        // SAFETY: STATUS_OK means the dispatcher wrote the output.
        STATUS_OK => unsafe { c.output.assume_init() },
        _ => Err(Error::Unsupported("a signal op the library refused")),
    }
}

/// For mpkvirt's sync handler: on a thread whose normal context runs a sealed sandbox, the
/// library acknowledges the synchronisation when the handler interrupted the sandboxed code
/// (a sealed sandbox takes no process-wide rights) and returns from the signal itself, and
/// this does not return. Returns on any other thread: the handler goes on as usual.
pub(crate) fn sync_sealed(ctx: *mut libc::ucontext_t) {
    if crate::gate::registered() {
        let _ = direct_signal_op(SignalIn {
            ctx: ctx as u64,
            action: ACTION_SYNC,
            value: 0,
        });
    }
}

/// `SignalIn::action` of [`sync_sealed`].
const ACTION_SYNC: u64 = 2;

/// Whether the thread's normal context runs a sealed sandbox (key 0 read-only: see
/// [`sealed_pkru`]).
pub(crate) fn sealed(rec: &ThreadRecord) -> bool {
    rec.sandbox.active
        && !rec.sandbox.shared
        && crate::meta::root().seal_key0.load(Ordering::Relaxed)
}

/// Whether the CPU's XSAVE area (for the components the OS enabled) fits the preemption
/// stub's room.
fn xsave_fits() -> bool {
    static FITS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FITS.get_or_init(|| {
        // CPUID leaf 0xD, subleaf 0: EBX is the XSAVE area's size for XCR0's components.
        let size = std::arch::x86_64::__cpuid_count(0xD, 0).ebx;
        size <= XSAVE_MAX
    })
}

/// `OP_SANDBOX_SIGNAL` (library side).
pub(crate) fn signal_op(rec: &mut ThreadRecord, i: SignalIn) -> Result<u64> {
    // A shared sandbox runs code its runner trusts with the runner's heap and locks: it is
    // neither preempted nor abandoned (a fault there is the runner's, as outside a sandbox).
    if !rec.sandbox.active || rec.sandbox.shared {
        return Ok(0);
    }
    let ctx = i.ctx as usize;
    if ctx == 0
        || !ctx.is_multiple_of(align_of::<libc::ucontext_t>())
        || !rec.on_altstack(ctx, size_of::<libc::ucontext_t>())
    {
        return Err(Error::InvalidConfig(
            "a signal context off the alternate stack",
        ));
    }
    if !sealed(rec) {
        return signal_frame(rec, &i, ctx);
    }
    // A handler of a sealed sandbox's thread runs on the key-0 alternate stack, which the
    // thread's rights keep read-only at every level: the op ends the handler. The library
    // returns from the signal itself (`gate::finish_signal`), so no gate exit ever installs
    // rights for the handler. It does so only with the kernel's word that a handler is
    // running (the disarmed alternate stack: sandboxed code can forge a handler's entry to
    // the gate, and a frame on the alternate stack, but cannot run while one is live).
    if !rec.interrupted || !rec.handler_live() {
        return Err(Error::InvalidConfig(
            "a signal op without a signal handler running",
        ));
    }
    let out = signal_frame(rec, &i, ctx)?;
    rec.sigreturn_ctx = ctx;
    Ok(out)
}

/// [`signal_op`] for a checked context `ctx`.
fn signal_frame(rec: &mut ThreadRecord, i: &SignalIn, ctx: usize) -> Result<u64> {
    if i.action == ACTION_SYNC {
        // When the handler interrupted the sandboxed code (its frame has key 0 read-only):
        // a sealed sandbox takes no process-wide rights, so the synchronisation only needs
        // the acknowledgement. (Interrupted library code — the gate's windows — acknowledges
        // at its op's end, as `OP_SYNC` would have it.)
        // SAFETY: a `ucontext_t` on the thread's alternate stack (checked by the caller);
        // any bits are valid.
        let uc: libc::ucontext_t =
            unsafe { std::ptr::read_volatile(ctx as *const libc::ucontext_t) };
        if sealed(rec) && rec.on_altstack(uc.uc_mcontext.fpregs as usize, 512) && frame_sealed(&uc)
        {
            rec.inherited = false;
            crate::manager::global::acknowledge(rec, None);
        }
        return Ok(0);
    }
    // The frame is key-0 memory, which another thread may be writing: it is copied once,
    // checked and changed in library memory, and only the registers are written back.
    // SAFETY: a `ucontext_t` on the thread's alternate stack (checked: aligned, inside the
    // record's own stack mapping); read once, and any bits are valid integers and pointers.
    let mut uc: libc::ucontext_t =
        unsafe { std::ptr::read_volatile(ctx as *const libc::ucontext_t) };
    let pku = mpkvirt_sys::Pku::new().is_some();
    // Whether the interrupted context had the library key writable: between a gate's raising
    // WRPKRU and its busy claim (had it claimed, this op would not run), or between its
    // release and its lowering WRPKRU. An abort may go ahead there (the gate did nothing, or
    // is done); a preemption may not (the gate would resume without the library's rights).
    let mut in_gate = false;
    let mut frame = None;
    if pku {
        // `set_frame_pkru` writes through the copy's pointer, checked here.
        let fp = uc.uc_mcontext.fpregs as usize;
        if fp == 0 || !rec.on_altstack(fp, mpkvirt_sys::signal::frame_pkru_extent().max(512)) {
            return Err(Error::InvalidConfig(
                "a signal frame off the alternate stack",
            ));
        }
        let Some(f) = mpkvirt_sys::signal::frame_pkru(&uc) else {
            return Err(Error::InvalidConfig("a signal frame without PKRU"));
        };
        frame = Some(f);
        in_gate = crate::meta::root()
            .library_key()
            .is_some_and(|k| mpkvirt_sys::Pkru::from_bits(f).rights(k).can_write());
    }
    let st = rec.sandbox;
    let gregs = &mut uc.uc_mcontext.gregs;
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let rsp = gregs[libc::REG_RSP as usize] as u64;
    if i.action == 0 {
        if in_gate {
            return Ok(1);
        }
        // Whether the signal interrupted a handler (mpkvirt's sync handler, say), not the
        // sandboxed code: then the preemption waits for the next tick. With PKU, by the
        // frame's PKRU, not by the stack pointer (sandboxed code that points its own at the
        // alternate stack would never be preempted): on a sealed thread every value the
        // gate installs has key 0 read-only and every handler's has it writable; elsewhere
        // the sandboxed code runs with the rights spelled for the normal context.
        let in_handler = match frame {
            Some(f) if sealed(rec) => f & 0b10 == 0,
            Some(f) => f != crate::gate::normal_pkru(rec),
            None => rec.on_altstack(rsp as usize, 8),
        };
        if in_handler {
            return Ok(0);
        }
        if (addr::sandbox_stubs_start()..addr::sandbox_stubs_end()).contains(&rip) {
            // Already on its way out (a preemption delivered before the stub ran, or a
            // second one while it saves the state): pushing another would only grow the
            // stack, a signal at a time (a slow handler under a fast tick never lets the stub
            // run).
            return Ok(2);
        }
    }
    // The interrupted %rip goes below the red zone; that word must lie in the domain.
    let slot = rsp.wrapping_sub(136);
    let preempt = i.action == 0
        && xsave_fits()
        && slot >= st.base
        && slot.checked_add(8).is_some_and(|e| e <= st.end)
        && rsp <= st.end;
    let out = if preempt {
        // SAFETY: a word inside the sandbox's domain (checked), which its view keeps bound
        // and the library may write; the sandboxed context is interrupted and does not run.
        unsafe { (slot as *mut u64).write_unaligned(rip as u64) };
        gregs[libc::REG_RSP as usize] = slot as i64;
        gregs[libc::REG_RIP as usize] = if pku {
            addr::sandbox_preempted_pku()
        } else {
            addr::sandbox_preempted_nopku()
        } as i64;
        2
    } else {
        // An abort (or a preemption the context made impossible: its stack pointer outside
        // its domain).
        gregs[libc::REG_RSP as usize] = (st.exit_sp - 8) as i64;
        gregs[libc::REG_RDI as usize] = i.value as i64;
        gregs[libc::REG_RIP as usize] = if pku {
            addr::sandbox_abort_pku()
        } else {
            addr::sandbox_abort_nopku()
        } as i64;
        3
    };
    if pku {
        // SAFETY: the copy's XSAVE area pointer, checked above to lie on the thread's
        // alternate stack, in the frame this thread's handler owns while it runs.
        unsafe { mpkvirt_sys::signal::set_frame_pkru(&mut uc, crate::gate::normal_pkru(rec)) };
    }
    let gregs_at = ctx + std::mem::offset_of!(libc::ucontext_t, uc_mcontext);
    // SAFETY: the frame's `mcontext_t` (checked above with the whole `ucontext_t`); only its
    // general registers are written back, from the copy.
    unsafe {
        std::ptr::write_volatile(gregs_at as *mut [libc::greg_t; 23], uc.uc_mcontext.gregs);
    }
    Ok(out)
}

/// `OP_SANDBOX_QUERY`'s answer for an interrupted context with the library's rights.
const QUERY_LIBRARY: u64 = 1;

// ----- library side -----

/// Whether a sandboxed thread may make op `op` (global ops: tag 0) with argument block
/// `args`.
pub(crate) fn allowed(rec: &ThreadRecord, op: u64, args: usize) -> bool {
    match op {
        crate::ops::OP_SANDBOX_YIELD
        | crate::ops::OP_SANDBOX_QUERY
        | crate::ops::OP_NOP
        | crate::ops::OP_REGISTER => true,
        // mpkvirt's sync handler puts its block on the thread's alternate stack. Anywhere
        // else, a wild block would fault inside the library, with the record busy, where no
        // handler may recover it.
        crate::ops::OP_SYNC | crate::ops::OP_SANDBOX_SIGNAL => rec.on_altstack(args, 64),
        _ => false,
    }
}

/// `S_RUN`, after the manager's part (`enter`: the view entered, or why not; returns the
/// view mark before it and the domain's bounds): the switch.
pub(crate) fn serve_run(
    args: crate::ops::Args,
    rec: &mut ThreadRecord,
    enter: impl FnOnce(&mut ThreadRecord, &RunIn) -> Result<(u64, u64, u64)>,
) -> u64 {
    let Some((input, out)) = args.read::<RunIn, Yielded>(rec) else {
        return STATUS_BAD_CALL;
    };
    // The signals that preempt or end a sandbox need the library's alternate stack. A thread
    // first registered inside a signal handler (on another alternate stack), or one with a
    // large one of its own, did not get it; one registered by a signal before its runtime set
    // up its own lost it. So the first run asks the kernel (one system call per thread) —
    // every sealed run: a handler frame abandoned elsewhere (a guarded call's recovery) can
    // leave the stack disarmed, which a sealed thread's signal ops take for a live handler.
    let sealed_run = input.shared == 0 && crate::meta::root().seal_key0.load(Ordering::Relaxed);
    if (!rec.altstack_checked || sealed_run) && !rec.interrupted {
        rec.ensure_altstack(true);
        rec.altstack_checked = rec.has_altstack();
    }
    // A sealed sandbox's key 0 is read-only, and the kernel writes the thread's rseq area
    // (glibc's, in its thread control block: key 0) with the thread's PKRU whenever it is
    // preempted, migrated or signalled: a failed write is a SIGSEGV that kills the process.
    // So the thread's first sealed run gives the area up (glibc then asks the kernel for the
    // CPU number instead of reading it).
    let sealed = input.shared == 0 && crate::meta::root().seal_key0.load(Ordering::Relaxed);
    if sealed && !rec.rseq_dropped && !rec.interrupted {
        let off = crate::meta::root().rseq_offset.load(Ordering::Relaxed);
        let area = (rec.gate.owner_fs as usize).wrapping_add_signed(off as isize);
        rec.rseq_dropped = off == i64::MIN
            // SAFETY: the calling thread's own registration, at the offset glibc exports from
            // its thread pointer (the record's owner's FS base, checked by the gate); the
            // thread is inside a library op, not in an rseq critical section, and glibc reads
            // only the CPU number there, which the kernel marks unknown.
            || unsafe { mpkvirt_sys::thread::rseq_unregister(area) }.is_ok()
            // Given up already (by an earlier record of the same thread): the kernel marked
            // the CPU number unknown (`RSEQ_CPU_ID_UNINITIALIZED`), and writes nothing more.
            // SAFETY: `cpu_id`, the second word of the thread's own rseq area (in its thread
            // control block, which every key the library runs with may read).
            || unsafe { ((area + 4) as *const i32).read_volatile() } == -1;
    }
    let pre_pkru = rec.gate.pkru;
    let started = if rec.sandbox.active || rec.interrupted {
        Err(Error::InvalidConfig(
            "a sandbox runs only from a thread's normal, unsandboxed context",
        ))
    } else if !rec.altstack_checked {
        Err(Error::InvalidConfig(
            "a sandbox needs the library's alternate signal stack (sigaltstack failed)",
        ))
    } else if sealed && !rec.rseq_dropped {
        Err(Error::Unsupported(
            "a sealed sandbox on a thread whose rseq area cannot be unregistered (the kernel would write it with key 0 read-only)",
        ))
    } else {
        enter(rec, &input)
    };
    match started {
        Err(e) => crate::ops::Args::write(rec, out, Err(e)),
        Ok((mark, base, end)) => {
            rec.sandbox = State {
                active: true,
                host_rsp: rec.gate.saved_rsp,
                exit_sp: input.exit_sp,
                mark,
                out: out as u64,
                base,
                end,
                shared: input.shared != 0,
                pre_pkru,
            };
            rec.gate.saved_rsp = input.sp;
            input.value
        }
    }
}

/// A sandbox's PKRU: `pkru` with every field denied but key 0's, the library key's (the gate
/// spells the thread's context there) and `own`'s (the sandbox's domain, bound by its view).
/// Key 0 is write-disabled where the kernel writes signal frames with every key open
/// (`Root::seal_key0`): the sandboxed code can then write none of the process's common
/// memory — statics, other threads' stacks and thread-local storage, signal frames — only its
/// domain. Elsewhere the kernel writes a frame with the interrupted PKRU, onto the key-0
/// alternate stack, so key 0 stays writable.
pub(crate) fn sealed_pkru(pkru: u32, own: Option<mpkvirt_sys::Pkey>) -> u32 {
    let mut keep = 0b11;
    for k in [crate::meta::root().library_key(), own]
        .into_iter()
        .flatten()
    {
        keep |= mpkvirt_sys::Pkru::key_mask(k);
    }
    // Denied fields as access-disabled alone; the gate's exit respells the markers.
    let v = (pkru & keep) | (0x5555_5555 & !keep);
    if crate::meta::root()
        .seal_key0
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        (v & !0b11) | AccessRights::DISABLE_WRITE.bits()
    } else {
        v
    }
}

/// Whether sandboxes run with key 0 write-disabled here (see [`Manager::sandbox_run`]): the
/// process uses PKU through the protected gate, and the kernel writes signal frames with
/// every key open (Linux 6.12 on). For reports: read from application memory.
pub fn seals_key0() -> bool {
    crate::meta::init().is_ok()
        && crate::meta::SEAL_KEY0_HINT.load(std::sync::atomic::Ordering::Relaxed)
}

/// `OP_SANDBOX_YIELD`: back to the runner.
pub(crate) fn yield_op(rec: &mut ThreadRecord, value: u64) -> u64 {
    if !rec.sandbox.active || rec.interrupted {
        return STATUS_BAD_CALL;
    }
    let st = std::mem::take(&mut rec.sandbox);
    rec.gate.pkru = st.pre_pkru;
    crate::manager::ops::end_views_since(rec, st.mark);
    // The sandbox's PKRU denied every other key, the process-wide grants included
    // (`sealed_pkru`): the runner's fields come back from its PKRU before the run, and the
    // managers' keys are recomputed from its views and the grants in force now.
    crate::manager::global::resync(rec, None);
    let y = Yielded {
        sp: rec.gate.saved_rsp as usize,
        value,
    };
    rec.gate.saved_rsp = st.host_rsp;
    crate::ops::Args::write(rec, st.out as *mut MaybeUninit<Result<Yielded>>, Ok(y))
}

/// `OP_SANDBOX_QUERY`.
pub(crate) fn query_op(rec: &ThreadRecord, arg: u64) -> u64 {
    if !rec.sandbox.active {
        return 0;
    }
    if arg >> 32 == 0
        && let Some(k) = crate::meta::root().library_key()
        && mpkvirt_sys::Pkru::from_bits(arg as u32)
            .rights(k)
            .can_write()
    {
        return QUERY_LIBRARY;
    }
    rec.sandbox.exit_sp
}
