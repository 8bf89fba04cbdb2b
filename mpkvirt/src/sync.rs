//! The sync signal: how a thread takes new process-wide rights (`manager::global`) while it
//! runs application code.
//!
//! The initiator of a change sends every thread of the process this signal (`SIGRTMIN + 7`,
//! or the number in `MPKVIRT_SYNC_SIGNAL`; its handler is installed when mpkvirt starts, and
//! the number kept in the root, library memory, for ops to send). The handler calls the library (`OP_SYNC`), which
//! recomputes the thread's PKRU and acknowledges the change, and writes the new value into
//! the signal frame, so that `rt_sigreturn` installs it in the interrupted context.
//!
//! The handler leaves the frame alone when the thread was inside a library call (the gate
//! answers `Reentrant`; the call acknowledges when it ends) or when the interrupted context
//! is not the thread's normal one
//! (its PKRU is not the value the library last set: another signal handler, whose own frame
//! would restore the old value later). The initiator signals such threads again.
//!
//! A thread the library has not yet seen in its normal context (registered by this handler or
//! a fault, so its normal PKRU may still be the one it inherited) acknowledges only when the
//! interrupted context looks normal (`gate::looks_normal`: the library key read-only in its
//! PKRU, or no signal blocked — the handler passes `gate::SYNC_MASKED`); otherwise it only
//! takes the current rights for the interrupted context, spelled as a handler's.
//!
//! # Safety
//!
//! Installing a handler is a foreign call with a process-wide effect; the handler reads and
//! rewrites the signal frame the kernel passed to it.
#![allow(unsafe_code, reason = "a signal handler and its frame")]

use std::sync::OnceLock;

use mpkvirt_sys::signal;

use crate::error::{Error, Result};

/// `OP_SYNC`'s answer when the interrupted context must keep its PKRU (see the module docs).
pub(crate) const NOT_NOW: u64 = u64::MAX;

/// The signal number (`SIGRTMIN + 7` unless `MPKVIRT_SYNC_SIGNAL` names another one).
pub(crate) fn signal_number() -> i32 {
    static SIG: OnceLock<i32> = OnceLock::new();
    *SIG.get_or_init(|| {
        std::env::var("MPKVIRT_SYNC_SIGNAL")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&s| s >= libc::SIGRTMIN() && s <= libc::SIGRTMAX())
            .unwrap_or(libc::SIGRTMIN() + 7)
    })
}

/// Installs the handler (once per process, from `meta::init`, outside the library) and
/// returns the signal's number.
///
/// # Errors
///
/// [`Error::Unsupported`] when the signal already has a handler that is not mpkvirt's, or
/// `sigaction` fails.
pub(crate) fn install_handler() -> Result<i32> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let ok = *INSTALLED.get_or_init(|| {
        let sig = signal_number();
        let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: a null new action only queries the current one into `old`.
        if unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) } != 0 {
            return false;
        }
        // SAFETY: sigaction succeeded and filled `old`.
        let old = unsafe { old.assume_init() };
        if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != on_sync as *const () as usize {
            return false;
        }
        // SAFETY: `on_sync` is async-signal-safe (see its docs); the signal had no handler,
        // so nothing is replaced. On its alternate stack: the interrupted stack may belong to
        // a domain the handler's initial PKRU cannot write.
        unsafe { signal::install_blocking_async(sig, on_sync, libc::SA_ONSTACK | libc::SA_RESTART) }
            .is_ok()
    });
    if ok {
        Ok(signal_number())
    } else {
        Err(Error::Unsupported("installing the sync signal handler"))
    }
}

/// `OP_SYNC`'s argument for the interrupted context `uc`: the PKRU in its frame, and whether
/// it blocks some signal (`gate::SYNC_MASKED`; a signal handler's context usually does).
fn sync_arg(uc: &libc::ucontext_t, frame: u32) -> u64 {
    let masked = (1..=libc::SIGRTMAX()).any(|s| {
        // SAFETY: `uc_sigmask` is an initialised set in the frame the kernel passed;
        // `sigismember` only reads it (async-signal-safe).
        unsafe { libc::sigismember(&uc.uc_sigmask, s) == 1 }
    });
    u64::from(frame) | if masked { crate::gate::SYNC_MASKED } else { 0 }
}

/// A protection-key fault on `key` in the context `uc`: if the thread's PKRU predates
/// process-wide rights granted since (grants reach threads lazily), takes them and rewrites
/// the frame's PKRU. Returns whether the key's rights grew (the access is worth retrying).
/// Called from the SIGSEGV handler.
pub(crate) fn take_lazy_grant(uc: &mut libc::ucontext_t, key: mpkvirt_sys::Pkey) -> bool {
    // A sealed sandbox takes no grant; and a handler of its thread may make no op that
    // returns (see `sandbox::signal`).
    if crate::sandbox::frame_sealed(uc) {
        return false;
    }
    // (A fault inside the library gets `Reentrant` from the gate: nothing to take.)
    let Some(frame) = signal::frame_pkru(uc) else {
        return false;
    };
    let Ok(new) = crate::ops::call::<u64, u64>(crate::ops::OP_SYNC, sync_arg(uc, frame)) else {
        return false;
    };
    if new == NOT_NOW || new as u32 == frame {
        return false;
    }
    let new = new as u32;
    // SAFETY: `uc` is the handler's own frame; the value is the thread's legitimate PKRU as
    // the library computed it (its views and the process-wide rights).
    unsafe { signal::set_frame_pkru(uc, new) };
    let denied = |p: u32| {
        let f = (p >> (2 * u32::from(key.index()))) & 3;
        // Access-disabled denies writes too.
        if f & 1 != 0 { 3 } else { f }
    };
    denied(new) & !denied(frame) == 0 && denied(new) != denied(frame)
}

/// The handler. Async-signal-safe: the library gate (which takes no lock the interrupted
/// code can hold: the code was not inside the library, or the gate refuses the call at
/// once), and writes to its own frame.
extern "C" fn on_sync(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The interrupted code may be reading errno; system calls below change it.
    // SAFETY: __errno_location takes no arguments and returns this thread's errno slot,
    // valid for reads and writes for the thread's lifetime.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *errno };
    // SAFETY: installed with SA_SIGINFO: the kernel passes a valid `ucontext_t` that belongs
    // to this handler invocation.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    // A thread that runs a sealed sandbox: the library acknowledges and returns from the
    // signal itself (no op may return to a handler there: its rights keep the handler's
    // stack read-only). Anywhere else this comes back, and the handler goes on.
    crate::sandbox::sync_sealed(ctx.cast());
    let frame = signal::frame_pkru(uc);
    let arg = sync_arg(uc, frame.unwrap_or(0));
    if let Ok(new) = crate::ops::call::<u64, u64>(crate::ops::OP_SYNC, arg)
        && new != NOT_NOW
        && frame.is_some()
    {
        // SAFETY: `uc` is this invocation's frame; the library computed the value for this
        // thread (its views and the process-wide rights), which the interrupted context ran
        // with already but for the change being synchronised.
        unsafe { signal::set_frame_pkru(uc, new as u32) };
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}
