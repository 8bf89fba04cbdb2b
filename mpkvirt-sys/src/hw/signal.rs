//! SIGSEGV decoding, signal-context registers and handler installation (x86-64 Linux).
//!
//! # Safety
//!
//! `si_pkey` is not exposed by the `libc` crate: it is read at its kernel ABI offset inside
//! the 128-byte `siginfo_t` (0x20 on x86-64, after `si_addr` and `si_addr_lsb`; see the
//! kernel's `include/uapi/asm-generic/siginfo.h` and the pkey selftests). Installing a
//! handler and calling a previous one are foreign calls whose contracts are spelled out on
//! each function.
#![allow(unsafe_code, reason = "siginfo layout access and sigaction")]

use std::mem::MaybeUninit;

use crate::error::{Error, Op, Result};
use crate::pkey::Pkey;
use crate::signal::{Access, SegvCode, SegvInfo, access_from_error_code};

/// A `SA_SIGINFO` signal handler.
pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Byte offset of `si_pkey` in x86-64 `siginfo_t`.
const SI_PKEY_OFFSET: usize = 0x20;
const _: () = assert!(SI_PKEY_OFFSET + 4 <= size_of::<libc::siginfo_t>());

/// x86 exception vector of a page fault (`REG_TRAPNO`).
const TRAP_PAGE_FAULT: i64 = 14;

/// Decodes a SIGSEGV `siginfo_t`: address, `si_code`, and `si_pkey` for `SEGV_PKUERR`.
pub fn decode_segv(info: &libc::siginfo_t) -> SegvInfo {
    let code = SegvCode::from_raw(info.si_code);
    // SAFETY: `siginfo_t` is plain integer storage fully initialised by the kernel (or by
    // whoever built the reference); `si_addr()` reads the 8 bytes at offset 16, and any bit
    // pattern is a valid pointer value. Meaningful for SIGSEGV/SIGBUS, defined for any.
    let addr = unsafe { info.si_addr() } as usize;
    let pkey = if code == SegvCode::PkuErr {
        let base: *const libc::siginfo_t = info;
        // SAFETY: the offset plus 4 lies inside the referenced 128-byte struct (asserted
        // above), so the pointer stays in bounds of one allocation.
        let field = unsafe { base.cast::<u8>().add(SI_PKEY_OFFSET) };
        // SAFETY: `field` is in bounds (above) and 4-byte aligned (`siginfo_t` is 8-byte
        // aligned, the offset is a multiple of 4); the kernel writes `si_pkey` there for
        // SEGV_PKUERR, and any bit pattern is a valid u32.
        let raw = unsafe { field.cast::<u32>().read() };
        u8::try_from(raw).ok().and_then(Pkey::new)
    } else {
        None
    };
    SegvInfo { addr, code, pkey }
}

/// The kind of access that caused a page fault, from the error code the kernel saved in the
/// signal context; `None` when the signal did not come from a page fault.
pub fn fault_access(ctx: &libc::ucontext_t) -> Option<Access> {
    let gregs = &ctx.uc_mcontext.gregs;
    if gregs[libc::REG_TRAPNO as usize] != TRAP_PAGE_FAULT {
        return None;
    }
    Some(access_from_error_code(gregs[libc::REG_ERR as usize] as u64))
}

/// The interrupted instruction pointer.
pub fn ip(ctx: &libc::ucontext_t) -> usize {
    ctx.uc_mcontext.gregs[libc::REG_RIP as usize] as usize
}

/// The interrupted stack pointer.
pub fn sp(ctx: &libc::ucontext_t) -> usize {
    ctx.uc_mcontext.gregs[libc::REG_RSP as usize] as usize
}

/// Rewrites the interrupted context so that returning from the handler resumes at `ip` with
/// stack pointer `sp` and `rax` in RAX; other registers are left as they were.
///
/// # Safety
///
/// `ctx` must be the context the kernel passed to the running handler of *this* thread, and
/// `(ip, sp, rax)` must be a state the code at `ip` is written to be entered in (for example
/// `mpkvirt_stack_call_resume` with the stack pointer it saved). Resuming anywhere else
/// corrupts the thread.
pub unsafe fn redirect(ctx: &mut libc::ucontext_t, ip: usize, sp: usize, rax: u64) {
    let gregs = &mut ctx.uc_mcontext.gregs;
    gregs[libc::REG_RIP as usize] = ip as i64;
    gregs[libc::REG_RSP as usize] = sp as i64;
    gregs[libc::REG_RAX as usize] = rax as i64;
}

/// Installs `handler` for `sig` with `SA_SIGINFO | flags` and an empty mask, returning the
/// previous action (to chain to it).
///
/// Pass `SA_ONSTACK` for handlers that must run when the stack overflowed (on the thread's
/// alternate stack, which Rust's runtime gives the main thread and the threads it spawns).
/// Leave it out for handlers that may run while the thread tears its alternate stack down.
///
/// # Errors
///
/// `EINVAL` for a signal that cannot be caught.
///
/// # Safety
///
/// `handler` must be async-signal-safe and must honour the process's other users of `sig`
/// (chain to the returned action for signals it does not handle). Replacing a handler that
/// other code relies on changes that code's behaviour.
pub unsafe fn install(
    sig: libc::c_int,
    handler: Handler,
    flags: libc::c_int,
) -> Result<libc::sigaction> {
    // SAFETY: all-zero is a valid `sigaction` (integers, an empty mask, a null restorer).
    let mut new: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    new.sa_sigaction = handler as usize;
    new.sa_flags = libc::SA_SIGINFO | flags;
    // SAFETY: sigemptyset only writes the mask field of the struct we own.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    let mut old = MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: `new` and `old` point to valid `sigaction` structs for the kernel to read and
    // write; the handler's own contract is the caller's obligation.
    let ret = unsafe { libc::sigaction(sig, &new, old.as_mut_ptr()) };
    if ret < 0 {
        return Err(Error::last(Op::Sigaction));
    }
    // SAFETY: sigaction succeeded, so the kernel filled `old` completely.
    Ok(unsafe { old.assume_init() })
}

/// Passes a signal on to a previously installed action.
///
/// A `SA_SIGINFO` handler gets `(sig, info, ctx)`, a plain handler gets `sig`. For `SIG_DFL`
/// the default disposition is restored: a fault raised by the kernel (`si_code > 0`) then
/// happens again when the instruction re-executes, and a signal sent by a process is raised
/// again, so either way the default action (termination) takes place. `SIG_IGN` ignores a
/// sent signal and treats a fault like `SIG_DFL` (a fault cannot be ignored).
///
/// # Safety
///
/// Must be called from a handler of `sig` running on this thread, with the `info` and `ctx`
/// the kernel passed to it and `prev` as returned by [`install`] for `sig`.
pub unsafe fn chain(
    prev: &libc::sigaction,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let action = prev.sa_sigaction;
    // SAFETY: the caller passes the kernel's `info` for this handler: null-checked, and valid
    // for reads when not null.
    let raised_by_kernel = !info.is_null() && unsafe { (*info).si_code } > 0;
    if action == libc::SIG_IGN && !raised_by_kernel {
        return;
    }
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: all-zero is a valid `sigaction`, and its handler field 0 is SIG_DFL.
        let dfl: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: `dfl` is a valid struct for the kernel to read; sigaction is
        // async-signal-safe.
        unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        if !raised_by_kernel {
            // SAFETY: raise is async-signal-safe; the signal stays pending until this handler
            // returns, then takes the default action.
            unsafe { libc::raise(sig) };
        }
        return;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: `action` is neither SIG_DFL nor SIG_IGN (checked above), so it is the
        // non-null handler address a `sigaction` caller registered with SA_SIGINFO, i.e. a
        // three-argument handler; we pass it the arguments the kernel gave us.
        let handler: Handler = unsafe { std::mem::transmute::<usize, Handler>(action) };
        handler(sig, info, ctx);
    } else {
        // SAFETY: as above, registered without SA_SIGINFO: a one-argument handler.
        let handler: extern "C" fn(libc::c_int) =
            unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(action) };
        handler(sig);
    }
}
