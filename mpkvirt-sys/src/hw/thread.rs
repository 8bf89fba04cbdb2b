//! Thread identity and waiting (x86-64 Linux): kernel thread ids, `tgkill`, the FS/GS base
//! registers, and futexes.
//!
//! # Safety
//!
//! RDFSBASE/RDGSBASE are executed with inline assembly only through an [`FsGsBase`] token,
//! which exists only when the kernel reports `HWCAP2_FSGSBASE` (it set CR4.FSGSBASE; without
//! it the instructions raise #UD). They read a register and touch no memory. Setting the GS
//! base (`arch_prctl(ARCH_SET_GS)`) changes what every `%gs:`-relative access of the thread
//! reads; it is `unsafe` and its contract is on [`set_gs_base`]. Unregistering the C
//! library's restartable-sequences area ([`rseq_unregister`]) is `unsafe` too (its contract
//! is there); finding it reads two variables glibc exports. The futex calls pass the
//! address of an `AtomicU32` the caller borrows for the duration of the call; the kernel
//! only reads it (wait) or uses it as a key (wake).

#![allow(
    unsafe_code,
    reason = "RDFSBASE/RDGSBASE, arch_prctl and futex system calls"
)]

use std::arch::asm;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::error::{Errno, Error, Op, Result};

/// The calling thread's kernel thread id (`gettid(2)`).
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Sends `sig` to thread `tid` of this process (`tgkill(2)`). With `sig == 0` only checks
/// that the thread exists.
///
/// # Errors
///
/// `ESRCH` when no such thread of this process exists any more.
pub fn tgkill(tid: i32, sig: i32) -> Result<()> {
    let pid = std::process::id();
    // SAFETY: tgkill takes three integers and touches no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::c_long::from(pid),
            libc::c_long::from(tid),
            libc::c_long::from(sig),
        )
    };
    if ret < 0 {
        Err(Error::last(Op::Tgkill))
    } else {
        Ok(())
    }
}

/// The signature glibc registers its rseq area with on x86-64 (`RSEQ_SIG`).
const RSEQ_SIG: u32 = 0x5305_3053;
/// `RSEQ_FLAG_UNREGISTER`.
const RSEQ_FLAG_UNREGISTER: libc::c_int = 1;

/// Where glibc keeps each thread's rseq area: its offset from the thread pointer
/// (`__rseq_offset`), or `None` when glibc registers none (`__rseq_size` is 0: glibc before
/// 2.35, a kernel without rseq, or `GLIBC_TUNABLES=glibc.pthread.rseq=0`).
pub fn glibc_rseq_offset() -> Option<isize> {
    let find = |name: &std::ffi::CStr| {
        // SAFETY: a symbol lookup in the global scope by a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    let size = find(c"__rseq_size")?;
    let offset = find(c"__rseq_offset")?;
    // SAFETY: glibc defines `__rseq_size` as a `const unsigned int`, set before `main`.
    if unsafe { size.cast::<u32>().read() } == 0 {
        return None;
    }
    // SAFETY: glibc defines `__rseq_offset` as a `const ptrdiff_t`, set before `main`.
    Some(unsafe { offset.cast::<isize>().read() })
}

/// Unregisters the calling thread's rseq area at `area` (`rseq(2)` with
/// `RSEQ_FLAG_UNREGISTER` and glibc's signature): the kernel no longer writes it when the
/// thread is preempted, migrated or signalled — writes it makes with the thread's PKRU, so a
/// thread that runs with key 0 write-disabled (where the area is) would get a SIGSEGV at its
/// next preemption. The kernel marks the area's CPU number unknown, and glibc's
/// `sched_getcpu` falls back to the system call. The registered length is not exported: the
/// lengths glibc has used (32, then the kernel's feature size rounded up) are tried.
///
/// # Errors
///
/// `rseq`'s, when no length matches (`EINVAL`) or the thread has none registered there.
///
/// # Safety
///
/// No code of the thread may be inside an rseq critical section, or rely on the area being
/// updated from now on (glibc itself reads only the CPU number).
pub unsafe fn rseq_unregister(area: usize) -> Result<()> {
    let mut last = Error::Sys {
        op: Op::Rseq,
        errno: Errno(libc::EINVAL),
    };
    for len in [32u32, 64, 96, 128, 160, 192, 224, 256] {
        // SAFETY: the system call only compares `area`, `len` and the signature with the
        // thread's registration and drops it on a match; it writes the area (its CPU
        // fields), which the caller's contract covers.
        let ret =
            unsafe { libc::syscall(libc::SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) };
        if ret == 0 {
            return Ok(());
        }
        last = Error::last(Op::Rseq);
        if last
            != (Error::Sys {
                op: Op::Rseq,
                errno: Errno(libc::EINVAL),
            })
        {
            break;
        }
    }
    Err(last)
}

const HWCAP2_FSGSBASE: u64 = 1 << 1;

/// Proof that user space may execute RDFSBASE/RDGSBASE (the kernel set CR4.FSGSBASE, Linux
/// 5.9 or later on a CPU with the instructions).
#[derive(Clone, Copy, Debug)]
pub struct FsGsBase {
    _private: (),
}

impl FsGsBase {
    /// The token, if the kernel advertises `HWCAP2_FSGSBASE` in the auxiliary vector.
    pub fn new() -> Option<FsGsBase> {
        // SAFETY: getauxval reads the process's auxiliary vector; it has no preconditions.
        let hwcap2 = unsafe { libc::getauxval(libc::AT_HWCAP2) };
        (hwcap2 & HWCAP2_FSGSBASE != 0).then_some(FsGsBase { _private: () })
    }

    /// The calling thread's FS base (its thread pointer: glibc's TCB).
    #[inline]
    pub fn fs_base(self) -> usize {
        let v: usize;
        // SAFETY: `self` proves CR4.FSGSBASE is set, so RDFSBASE does not fault; it only
        // writes the destination register.
        unsafe { asm!("rdfsbase {}", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }

    /// The calling thread's GS base (0 unless someone set it; mpkvirt keeps its per-thread
    /// record there).
    #[inline]
    pub fn gs_base(self) -> usize {
        let v: usize;
        // SAFETY: as for `fs_base`, with RDGSBASE.
        unsafe { asm!("rdgsbase {}", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }
}

const ARCH_SET_GS: libc::c_long = 0x1001;

/// Sets the calling thread's GS base (`arch_prctl(ARCH_SET_GS)`).
///
/// # Errors
///
/// `EPERM`/`EINVAL` when the kernel refuses (a non-canonical address).
///
/// # Safety
///
/// Every `%gs:`-relative access the thread makes afterwards reads and writes at `addr`: the
/// caller must own the thread's GS base (nothing else in the process may use it) and `addr`
/// must point to memory laid out as those accesses expect, for as long as it is installed.
pub unsafe fn set_gs_base(addr: usize) -> Result<()> {
    // SAFETY: arch_prctl(ARCH_SET_GS, addr) changes only this thread's GS base register;
    // what the thread then reads through it is the caller's obligation (above).
    let ret = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, addr as libc::c_long) };
    if ret < 0 {
        Err(Error::last(Op::ArchPrctl))
    } else {
        Ok(())
    }
}

/// Sleeps while `*word == expected`, until [`futex_wake`] on the same word, a signal, or
/// `timeout` (none: no limit). Returns `Ok(false)` when the time ran out, `Ok(true)` otherwise
/// (woken, the value had already changed, or a signal interrupted the wait: callers re-check
/// their condition in a loop).
///
/// This is a raw `futex(FUTEX_WAIT_PRIVATE)` system call, not a POSIX cancellation point.
///
/// # Errors
///
/// Unexpected kernel errors (`EINVAL`, `EFAULT`) only.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Result<bool> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos()),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live AtomicU32 (4-byte aligned) the kernel only reads; `ts_ptr` is
    // null or points to a timespec on this stack that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ts_ptr,
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    match Errno::last().0 {
        libc::EAGAIN | libc::EINTR => Ok(true),
        libc::ETIMEDOUT => Ok(false),
        errno => Err(Error::Sys {
            op: Op::Futex,
            errno: Errno(errno),
        }),
    }
}

/// Wakes up to `n` threads sleeping in [`futex_wait`] on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live AtomicU32; FUTEX_WAKE only uses its address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        )
    };
}

/// Calls `f` with the kernel thread id of each of this process's threads (the entries of
/// `/proc/self/task`), without allocating: safe to call where the program's allocator must
/// not run.
///
/// # Errors
///
/// When `/proc` is not mounted or cannot be read.
pub fn for_each_thread(mut f: impl FnMut(i32)) -> Result<()> {
    const PATH: &[u8] = b"/proc/self/task\0";
    // SAFETY: `PATH` is a NUL-terminated string; open touches no other memory of ours.
    let fd = unsafe {
        libc::open(
            PATH.as_ptr().cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::last(Op::ListThreads));
    }
    let mut buf = [0u64; 512];
    let result = loop {
        // SAFETY: the kernel writes at most `size_of_val(&buf)` bytes into `buf`, which we
        // own for the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd,
                buf.as_mut_ptr(),
                std::mem::size_of_val(&buf),
            )
        };
        if n < 0 {
            break Err(Error::last(Op::ListThreads));
        }
        if n == 0 {
            break Ok(());
        }
        let bytes = &buf_bytes(&buf)[..n as usize];
        let mut at = 0;
        // Each record: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name (NUL-ended).
        while at + 19 <= bytes.len() {
            let reclen = usize::from(u16::from_ne_bytes([bytes[at + 16], bytes[at + 17]]));
            if reclen == 0 || at + reclen > bytes.len() {
                break;
            }
            let name = &bytes[at + 19..at + reclen];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(tid) = parse_tid(name) {
                f(tid);
            }
            at += reclen;
        }
    };
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    result
}

/// The bytes of the directory buffer (aligned as `linux_dirent64` records need).
fn buf_bytes(buf: &[u64; 512]) -> &[u8] {
    // SAFETY: any initialised u64 array is a valid byte array of 8x its length, same lifetime.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), std::mem::size_of_val(buf)) }
}

/// A decimal thread id (not `.` or `..`).
fn parse_tid(name: &[u8]) -> Option<i32> {
    if name.is_empty() || name.len() > 10 {
        return None;
    }
    name.iter().try_fold(0i32, |v, &b| {
        b.is_ascii_digit()
            .then(|| v.checked_mul(10)?.checked_add(i32::from(b - b'0')))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_each_thread_lists_every_live_thread_and_only_numbers() {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::Barrier::new(5));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (tx, stop) = (tx.clone(), stop.clone());
                std::thread::spawn(move || {
                    tx.send(gettid()).unwrap();
                    stop.wait();
                })
            })
            .collect();
        let mut want: Vec<i32> = (0..4).map(|_| rx.recv().unwrap()).collect();
        want.push(gettid());
        let mut seen = Vec::new();
        for_each_thread(|t| seen.push(t)).unwrap();
        stop.wait();
        for t in threads {
            t.join().unwrap();
        }
        for t in &want {
            assert!(seen.contains(t), "{t} missing from {seen:?}");
        }
        assert!(seen.iter().all(|&t| t > 0), "{seen:?}");
        let mut dedup = seen.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(dedup.len(), seen.len(), "{seen:?}");
    }

    #[test]
    fn thread_ids_parse_only_as_decimal_numbers() {
        assert_eq!(parse_tid(b"1234"), Some(1234));
        assert_eq!(parse_tid(b"."), None);
        assert_eq!(parse_tid(b".."), None);
        assert_eq!(parse_tid(b""), None);
        assert_eq!(parse_tid(b"99999999999"), None);
        assert_eq!(parse_tid(b"2147483648"), None);
        assert_eq!(parse_tid(b"2147483647"), Some(i32::MAX));
    }
}
