//! Errors: which operation failed and the `errno` it failed with.

use std::fmt;

/// An OS error number (`errno`), as returned by a failed system call.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current `errno`.
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The symbolic name for the common values (`"ENOSPC"`), else `None`.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::ENOSYS => "ENOSYS",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ESRCH => "ESRCH",
            libc::EDEADLK => "EDEADLK",
            libc::E2BIG => "E2BIG",
            libc::ETIMEDOUT => "ETIMEDOUT",
            _ => return None,
        })
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0);
        match self.name() {
            Some(name) => write!(f, "{name}: {text}"),
            None => write!(f, "{text}"),
        }
    }
}

/// The operation an [`Error`] comes from; named after the system call or instruction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Op {
    /// `pkey_alloc(2)`
    PkeyAlloc,
    /// `pkey_free(2)`
    PkeyFree,
    /// `pkey_mprotect(2)`
    PkeyMprotect,
    /// `mmap(2)`
    Mmap,
    /// `mprotect(2)`
    Mprotect,
    /// `munmap(2)`
    Munmap,
    /// `madvise(2)`
    Madvise,
    /// `sigaction(2)`
    Sigaction,
    /// `membarrier(2)`
    Membarrier,
    /// RDPKRU or WRPKRU
    Pkru,
    /// `arch_prctl(2)`
    ArchPrctl,
    /// `futex(2)`
    Futex,
    /// `tgkill(2)`
    Tgkill,
    /// `rseq(2)`
    Rseq,
    /// Listing the process's threads (`/proc/self/task`)
    ListThreads,
}

impl Op {
    /// The C name of the operation.
    pub fn name(self) -> &'static str {
        match self {
            Op::PkeyAlloc => "pkey_alloc",
            Op::PkeyFree => "pkey_free",
            Op::PkeyMprotect => "pkey_mprotect",
            Op::Mmap => "mmap",
            Op::Mprotect => "mprotect",
            Op::Munmap => "munmap",
            Op::Madvise => "madvise",
            Op::Sigaction => "sigaction",
            Op::Membarrier => "membarrier",
            Op::Pkru => "rdpkru/wrpkru",
            Op::ArchPrctl => "arch_prctl",
            Op::Futex => "futex",
            Op::Tgkill => "tgkill",
            Op::Rseq => "rseq",
            Op::ListThreads => "listing /proc/self/task",
        }
    }
}

/// A failed machine operation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Error {
    /// `pkey_alloc` found no free protection key (`ENOSPC` on a kernel with PKU enabled).
    KeysExhausted,
    /// A system call failed.
    Sys {
        /// What was attempted.
        op: Op,
        /// Why the kernel refused.
        errno: Errno,
    },
    /// The operation does not exist on this target (not x86-64 Linux, or built with
    /// `--cfg mpkvirt_no_hw`).
    Unsupported {
        /// What was attempted.
        op: Op,
    },
}

impl Error {
    /// The `errno` this error corresponds to (`ENOSPC` for [`Error::KeysExhausted`],
    /// `EOPNOTSUPP` for [`Error::Unsupported`]).
    pub fn errno(self) -> Errno {
        match self {
            Error::KeysExhausted => Errno(libc::ENOSPC),
            Error::Sys { errno, .. } => errno,
            Error::Unsupported { .. } => Errno(libc::EOPNOTSUPP),
        }
    }

    /// The failed operation.
    pub fn op(self) -> Op {
        match self {
            Error::KeysExhausted => Op::PkeyAlloc,
            Error::Sys { op, .. } | Error::Unsupported { op } => op,
        }
    }

    pub(crate) fn last(op: Op) -> Error {
        Error::Sys {
            op,
            errno: Errno::last(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::KeysExhausted => {
                write!(f, "pkey_alloc: every protection key is allocated (ENOSPC)")
            }
            Error::Sys { op, errno } => write!(f, "{} failed: {errno}", op.name()),
            Error::Unsupported { op } => {
                write!(f, "{} is not supported on this target", op.name())
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        std::io::Error::from_raw_os_error(e.errno().0)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
