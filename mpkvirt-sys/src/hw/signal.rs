//! SIGSEGV decoding, signal-context registers and handler installation (x86-64 Linux).
//!
//! # Safety
//!
//! `si_pkey` is not exposed by the `libc` crate: it is read at its kernel ABI offset inside
//! the 128-byte `siginfo_t` (0x20 on x86-64, after `si_addr` and `si_addr_lsb`; see the
//! kernel's `include/uapi/asm-generic/siginfo.h` and the pkey selftests). Installing a
//! handler and calling a previous one are foreign calls whose contracts are spelled out on
//! each function. The frame probe ([`frames_written_with_keys_open`]) forks with the raw
//! system call and makes its child fault with key 0 write-disabled; the child touches only
//! its own copies of two mappings made for it.
#![allow(
    unsafe_code,
    reason = "siginfo layout access, sigaction and the frame probe"
)]

use std::mem::MaybeUninit;

use crate::error::{Error, Op, Result};
use crate::pkey::Pkey;
use crate::pkru::AccessRights;
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

/// `FP_XSTATE_MAGIC1`: marks a signal frame's FXSAVE area as followed by XSAVE state.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// Offset of the software-reserved bytes (`struct _fpx_sw_bytes`) in the FXSAVE area.
const SW_BYTES_OFFSET: usize = 464;
/// Offset of the XSAVE header (`xstate_bv` first) in the XSAVE area.
const XSAVE_HEADER_OFFSET: usize = 512;
/// XSAVE state component of PKRU.
const XFEATURE_PKRU: u32 = 9;

/// Offset of the PKRU component in the standard (non-compacted) XSAVE layout the kernel
/// uses for signal frames: CPUID.(EAX=0DH, ECX=9):EBX; `None` when the CPU has no PKRU state.
fn pkru_xsave_offset() -> Option<usize> {
    use std::arch::x86_64::__cpuid_count;
    static OFFSET: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        if __cpuid_count(0, 0).eax < 0xd {
            return None;
        }
        let supported = __cpuid_count(0xd, 0).eax;
        if supported & (1 << XFEATURE_PKRU) == 0 {
            return None;
        }
        let leaf = __cpuid_count(0xd, XFEATURE_PKRU);
        (leaf.eax >= 4).then_some(leaf.ebx as usize)
    })
}

/// The XSAVE area of a signal frame, as bytes, when it holds the PKRU component (with the
/// component's offset).
fn frame_xsave(ctx: &libc::ucontext_t) -> Option<(*mut u8, usize, usize)> {
    let offset = pkru_xsave_offset()?;
    let area = ctx.uc_mcontext.fpregs.cast::<u8>();
    if area.is_null() {
        return None;
    }
    // SAFETY: `fpregs` points to the frame's 512-byte FXSAVE area (the kernel sets it for every
    // signal on x86-64), which this handler invocation owns; only read here.
    let fx: &[u8; 512] = unsafe { &*area.cast::<[u8; 512]>() };
    let sw = &fx[SW_BYTES_OFFSET..];
    let word = |at: usize, n: usize| {
        sw[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |v, &b| v << 8 | u64::from(b))
    };
    let (magic, xfeatures, xstate_size) = (word(0, 4), word(8, 8), word(16, 4) as usize);
    if magic != u64::from(FP_XSTATE_MAGIC1)
        || xfeatures & (1 << XFEATURE_PKRU) == 0
        || offset + 4 > xstate_size
        || xstate_size < XSAVE_HEADER_OFFSET + 8
    {
        return None;
    }
    Some((area, xstate_size, offset))
}

/// How many bytes from a frame's `fpregs` pointer [`frame_pkru`] and [`set_frame_pkru`]
/// read or write (the XSAVE header and the PKRU component); 0 without PKRU state. A handler
/// that does not trust the pointer checks this range before it calls them.
pub fn frame_pkru_extent() -> usize {
    pkru_xsave_offset().map_or(0, |o| (o + 4).max(XSAVE_HEADER_OFFSET + 8))
}

/// The PKRU value `rt_sigreturn` will restore for the interrupted context, when the frame
/// holds one.
pub fn frame_pkru(ctx: &libc::ucontext_t) -> Option<u32> {
    let (area, size, offset) = frame_xsave(ctx)?;
    // SAFETY: `frame_xsave` checked that the frame's XSAVE area is `size` bytes (its own
    // `xstate_size`) and includes PKRU; only read here.
    let x = unsafe { std::slice::from_raw_parts(area.cast_const(), size) };
    let bv = u64::from_le_bytes(
        x[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8]
            .try_into()
            .ok()?,
    );
    if bv & (1 << XFEATURE_PKRU) == 0 {
        // The component is in its initial state, which for PKRU is 0.
        return Some(0);
    }
    Some(u32::from_le_bytes(x[offset..offset + 4].try_into().ok()?))
}

/// Sets the PKRU value `rt_sigreturn` restores for the interrupted context. Returns `false`
/// when the frame holds no PKRU (no PKU, or no XSAVE frame).
///
/// # Safety
///
/// `ctx` must be the context the kernel passed to the running handler of this thread, and
/// the caller must own the interrupted code's PKRU (the value decides which memory it may
/// touch once the handler returns).
pub unsafe fn set_frame_pkru(ctx: &mut libc::ucontext_t, pkru: u32) -> bool {
    let Some((area, size, offset)) = frame_xsave(ctx) else {
        return false;
    };
    // SAFETY: as in `frame_pkru`; the area belongs to this handler invocation, which the
    // caller owns (`ctx` is `&mut`), so nothing else reads or writes it meanwhile.
    let x = unsafe { std::slice::from_raw_parts_mut(area, size) };
    // Marking the component present in `xstate_bv` makes XRSTOR load the value instead of
    // the initial state.
    let bv = &mut x[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8];
    let v = u64::from_le_bytes((&*bv).try_into().unwrap_or([0; 8])) | (1 << XFEATURE_PKRU);
    bv.copy_from_slice(&v.to_le_bytes());
    x[offset..offset + 4].copy_from_slice(&pkru.to_le_bytes());
    true
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
/// previous action (to chain to it). See [`install_blocking_async`] for handlers that call
/// into mpkvirt.
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
    // SAFETY: the caller's contract.
    unsafe { install_with(sig, handler, flags, false) }
}

/// [`install`], with every asynchronous signal blocked while the handler runs (only the
/// synchronous faults, `SIGSEGV`, `SIGBUS`, `SIGFPE`, `SIGILL` and `SIGTRAP`, may still
/// arrive): for handlers that call into mpkvirt, where a signal arriving meanwhile would land
/// on the library's stack (the alternate stack is disarmed while a handler runs on it), which
/// its handler cannot write.
///
/// # Errors
///
/// As [`install`].
///
/// # Safety
///
/// As [`install`].
pub unsafe fn install_blocking_async(
    sig: libc::c_int,
    handler: Handler,
    flags: libc::c_int,
) -> Result<libc::sigaction> {
    // SAFETY: the caller's contract.
    unsafe { install_with(sig, handler, flags, true) }
}

/// [`install`] and [`install_blocking_async`].
///
/// # Safety
///
/// As [`install`].
unsafe fn install_with(
    sig: libc::c_int,
    handler: Handler,
    flags: libc::c_int,
    block_async: bool,
) -> Result<libc::sigaction> {
    // SAFETY: all-zero is a valid `sigaction` (integers, an empty mask, a null restorer).
    let mut new: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    new.sa_sigaction = handler as usize;
    new.sa_flags = libc::SA_SIGINFO | flags;
    // SAFETY: sigemptyset/sigfillset/sigdelset only write the mask field of the struct we own.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    if block_async {
        // SAFETY: as above.
        unsafe { libc::sigfillset(&mut new.sa_mask) };
    }
    for fault in [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGILL,
        libc::SIGTRAP,
    ] {
        // SAFETY: as above.
        unsafe { libc::sigdelset(&mut new.sa_mask, fault) };
    }
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

unsafe extern "C" {
    /// glibc's `pkey_set(3)` (2.27 on): RDPKRU, the key's two bits replaced, WRPKRU.
    fn pkey_set(key: libc::c_int, rights: libc::c_uint) -> libc::c_int;
}

/// Whether the kernel writes a signal frame with every key open, whatever the interrupted
/// PKRU denies (Linux 6.12 on; before, a frame the interrupted PKRU may not write is a
/// fatal SIGSEGV). Probed once per call in a child process: it write-disables key 0, the
/// key of the alternate stack it set up, and faults on purpose; the frame of that fault is
/// written only by a kernel that opens every key for it, and then the child's handler exits
/// with status 0.
///
/// The child is made with the raw `fork` system call (no `pthread_atfork` handlers run in
/// it: they may wait for locks another thread of the parent held) and makes only system
/// calls and glibc's `pkey_set` (which writes its own PKRU) before it exits. It needs `_pku`:
/// `pkey_set` raises #UD without OSPKE.
pub fn frames_written_with_keys_open(_pku: crate::Pku) -> bool {
    const ALT: usize = 64 << 10;
    let map = |len| {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(p)
    };
    let Some(alt) = map(ALT) else { return false };
    let Some(target) = map(4096) else {
        // SAFETY: the mapping made above, unused.
        unsafe { libc::munmap(alt, ALT) };
        return false;
    };
    // (Looked up here: `dlsym` in the child of a multithreaded process may wait for a lock.)
    let rseq = crate::imp::thread::glibc_rseq_offset();
    // SAFETY: the raw system call; the child runs only `probe_child`, which never returns.
    let pid = unsafe { libc::syscall(libc::SYS_fork) };
    if pid == 0 {
        probe_child(alt, ALT, target.cast(), rseq);
    }
    let mut status = 0;
    let waited = pid > 0
        && loop {
            // SAFETY: waits for the child made above; `status` is a local.
            let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
            if r == pid as libc::pid_t {
                break true;
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break false;
            }
        };
    // SAFETY: the mapping made above; the child (its own copy) is gone.
    unsafe { libc::munmap(alt, ALT) };
    // SAFETY: as above.
    unsafe { libc::munmap(target, 4096) };
    waited && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// The probe's child: see [`frames_written_with_keys_open`]. Exits with 0 from the handler
/// when the fault's frame was written, 2 when the write it should not make went through, 3
/// when setting up failed; a kernel that cannot write the frame kills it with SIGSEGV. The
/// child first gives up the rseq area it inherited (at `rseq` from its thread pointer): the
/// kernel writes that with the thread's PKRU at every signal, which is not what is probed
/// (mpkvirt gives it up on every thread that runs with key 0 write-disabled).
fn probe_child(alt: *mut libc::c_void, len: usize, target: *mut u8, rseq: Option<isize>) -> ! {
    if let Some(off) = rseq {
        let mut fs = 0usize;
        // SAFETY: `arch_prctl(ARCH_GET_FS)` writes the thread pointer into `fs`.
        if unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &raw mut fs) } == 0 {
            // SAFETY: the child's own registration (inherited), at glibc's offset from its
            // thread pointer; nothing in the child uses rseq.
            let _ = unsafe { crate::imp::thread::rseq_unregister(fs.wrapping_add_signed(off)) };
        }
    }
    extern "C" fn exit_ok(_sig: libc::c_int) {
        // The handler must be able to write key 0 too (its own stack is there): a store
        // first, which kills the child if it faults (SIGSEGV is blocked in its own handler).
        static WRITTEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        WRITTEN.store(1, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: `_exit` ends the child at once; it is async-signal-safe.
        unsafe { libc::_exit(i32::from(WRITTEN.load(std::sync::atomic::Ordering::SeqCst)) - 1) }
    }
    let stack = libc::stack_t {
        ss_sp: alt,
        ss_flags: 0,
        ss_size: len,
    };
    // SAFETY: a zeroed `sigaction` is valid (empty mask, no flags) before the fields below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = exit_ok as extern "C" fn(libc::c_int) as usize;
    act.sa_flags = libc::SA_ONSTACK;
    // SAFETY: all-zero is a valid `sigset_t`, emptied and filled below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the functions write only `set`, a local.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above.
    unsafe { libc::sigaddset(&mut set, libc::SIGSEGV) };
    // SAFETY: system calls on this (forked, single-threaded) process's own state: the
    // alternate stack is the child's copy of a mapping the parent made for it, the handler
    // only exits.
    let ok = unsafe { libc::sigaltstack(&stack, std::ptr::null_mut()) } == 0
        // SAFETY: as above.
        && unsafe { libc::sigaction(libc::SIGSEGV, &act, std::ptr::null_mut()) } == 0
        // SAFETY: as above.
        && unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) } == 0;
    if !ok {
        // SAFETY: ends the child.
        unsafe { libc::_exit(3) }
    }
    // SAFETY: key 0 becomes write-disabled for this thread of the child: its next write to
    // key-0 memory (the store below, or a spill to its stack before it) faults, which is the
    // probe. The child never returns from here.
    unsafe { pkey_set(0, AccessRights::DISABLE_WRITE.bits()) };
    // SAFETY: the child's copy of the page the parent mapped for this write (key 0).
    unsafe { std::ptr::write_volatile(target, 1) };
    // SAFETY: ends the child (the write went through: the probe failed).
    unsafe { libc::_exit(2) }
}
