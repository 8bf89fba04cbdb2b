//! Test support: counting the system calls a closure makes.
//!
//! [`count_syscalls`] runs a closure on a fresh thread under a seccomp filter that allows
//! `rt_sigreturn` and any call issued from mpkvirt-asm's trampoline page, and traps every
//! other call (`SECCOMP_RET_TRAP`). The SIGSYS handler counts the call, re-issues it through
//! the trampoline and puts the result in RAX, so the thread behaves as before while every
//! system call it makes is counted.
#![allow(
    unsafe_code,
    reason = "seccomp filter installation and a SIGSYS handler"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use mpkvirt_asm::{addr, mpkvirt_syscall6};

static TRAPPED: AtomicU64 = AtomicU64::new(0);
/// The numbers of the last calls trapped (a ring), for assertion messages.
static RECENT: [std::sync::atomic::AtomicI32; 32] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; 32];
/// One counting thread at a time: the counter is process-wide.
static COUNTING: Mutex<()> = Mutex::new(());

/// Offset of `_sigsys._syscall` in x86-64 `siginfo_t` (after `_call_addr`).
const SI_SYSCALL_OFFSET: usize = 0x18;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t of 128 bytes; the offset stays inside it.
    let field = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET) };
    // SAFETY: `field` is in bounds and 4-byte aligned; the kernel wrote `_syscall` there.
    let nr = unsafe { field.cast::<i32>().read() };
    let n = TRAPPED.fetch_add(1, Ordering::SeqCst);
    RECENT[(n % 32) as usize].store(nr, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid ucontext_t owned by this handler invocation.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let g = &mut uc.uc_mcontext.gregs;
    let arg = |r: i32| g[r as usize] as u64;
    // SAFETY: re-issues exactly the call the thread attempted, with its own arguments, from
    // the trampoline page the filter allows.
    let ret = unsafe {
        mpkvirt_syscall6(
            i64::from(nr),
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
            arg(libc::REG_R8),
            arg(libc::REG_R9),
        )
    };
    g[libc::REG_RAX as usize] = ret;
}

fn filter() -> Vec<libc::sock_filter> {
    let start = addr::trampoline_start() as u64;
    let end = addr::trampoline_end() as u64;
    assert_eq!(
        start >> 32,
        (end - 1) >> 32,
        "the trampoline page does not cross a 4 GiB line"
    );
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let (ld, jeq, jge, ret) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    vec![
        stmt(ld, 0),                                    // nr
        jump(jeq, libc::SYS_rt_sigreturn as u32, 8, 0), // -> allow
        jump(jeq, libc::SYS_munmap as u32, 7, 0),       // -> allow
        jump(jeq, libc::SYS_sigaltstack as u32, 6, 0),  // -> allow
        stmt(ld, 12),                                   // ip >> 32
        jump(jeq, (start >> 32) as u32, 0, 5),          // else -> trap
        stmt(ld, 8),                                    // ip & 0xffff_ffff
        jump(jge, start as u32, 0, 3),                  // below -> trap
        jump(jge, end as u32, 2, 0),                    // above -> trap
        stmt(ret, libc::SECCOMP_RET_ALLOW),             // (padding target)
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ret, libc::SECCOMP_RET_TRAP),
    ]
}

/// Measures system calls inside a counting thread (see [`count_syscalls`]).
pub(crate) struct Meter(());

impl Meter {
    /// Runs `g` and returns its result with the number of system calls it made.
    pub(crate) fn measure<T>(&self, g: impl FnOnce() -> T) -> (T, u64) {
        let (r, calls) = self.measure_calls(g);
        (r, calls.len() as u64)
    }

    /// Runs `g` and returns its result with the numbers of the system calls it made (the
    /// last 32 at most).
    pub(crate) fn measure_calls<T>(&self, g: impl FnOnce() -> T) -> (T, Vec<i32>) {
        let before = TRAPPED.load(Ordering::SeqCst);
        let r = g();
        let after = TRAPPED.load(Ordering::SeqCst);
        let calls = (before.max(after.saturating_sub(32))..after)
            .map(|i| RECENT[(i % 32) as usize].load(Ordering::SeqCst))
            .collect();
        (r, calls)
    }
}

/// Runs `f` on a new thread whose every system call (outside the trampoline) is counted.
/// `f` measures the parts it wants with [`Meter::measure`], after whatever warm-up the fresh
/// thread needs (its first allocation maps a malloc arena, for instance).
pub(crate) fn count_syscalls<R: Send>(f: impl FnOnce(&Meter) -> R + Send) -> R {
    static HANDLER: Once = Once::new();
    HANDLER.call_once(|| {
        // SAFETY: the handler counts, re-issues the trapped call through the trampoline and
        // writes the result back; it is async-signal-safe (an atomic and a raw syscall).
        // SA_ONSTACK: a call trapped inside mpkvirt interrupts code on its library stack,
        // which a handler cannot use (its PKRU denies the library's key). The filter lets
        // munmap and sigaltstack through, so the thread's exit, which takes its alternate
        // stack down, never runs the handler on that stack.
        unsafe { mpkvirt_sys::signal::install(libc::SIGSYS, on_sigsys, libc::SA_ONSTACK) }
            .expect("install SIGSYS handler");
    });
    let _one_at_a_time = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|s| {
        s.spawn(|| {
            let prog = filter();
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr().cast_mut(),
            };
            // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(rc, 0);
            // SAFETY: `fprog` points at a live BPF program; the kernel copies it. Without
            // SECCOMP_FILTER_FLAG_TSYNC the filter applies to this thread only.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &raw const fprog,
                )
            };
            assert_eq!(rc, 0, "seccomp: {}", std::io::Error::last_os_error());
            f(&Meter(()))
        })
        .join()
        .expect("counting thread")
    })
}
