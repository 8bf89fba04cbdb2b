//! Errors of the domain layer: one variant per failing operation, carrying its context.

use std::fmt;
use std::time::Duration;

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::{Error as SysError, Pkey, Unavailable};

use crate::domain::DomainId;
use crate::fault::FaultReport;

/// Everything that can go wrong in mpkvirt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// [`crate::Mode::Hardware`] was requested but PKU is not usable here.
    HardwareRequired(Unavailable),
    /// The hardware backend could not allocate a single protection key.
    AllocKeys(SysError),
    /// Reserving address space failed.
    Reserve {
        /// Bytes requested.
        len: usize,
        /// The `mmap` failure.
        source: SysError,
    },
    /// Changing the protection or key of a range failed.
    Retag {
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// Protection requested.
        prot: Prot,
        /// Key requested (key 0 when parking).
        key: Pkey,
        /// The system call's failure.
        source: SysError,
    },
    /// Emptying or mapping over a range failed (`madvise`, `mmap(MAP_FIXED)`).
    Remap {
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The system call's failure.
        source: SysError,
    },
    /// Every key is pinned by views of running threads and none became free in time.
    KeysBusy {
        /// Keys the manager has.
        keys: usize,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The view needs more keys than the thread's own other live views leave free: waiting
    /// cannot help (those views end only when the thread goes on).
    ViewsExceedKeys {
        /// Keys the view needs beyond those the thread already holds.
        needed: usize,
        /// Keys the thread's other live views hold.
        held: usize,
        /// Keys the manager can bind.
        keys: usize,
    },
    /// A signal handler tried to end a view of the code it interrupted (that code would
    /// resume with the view's rights but without its pins); a handler may end only the views
    /// it entered itself.
    InterruptedView,
    /// The thread is already inside the library: a signal handler interrupted a library call
    /// and called the library again. Nothing was done.
    Reentrant,
    /// Process-wide rights changed, but some threads did not take the change within the
    /// wait (they block mpkvirt's sync signal or replaced its handler). Every other thread
    /// has the new rights; a revoked key stays with its domain and is never handed to
    /// another one.
    ThreadsNotSynced {
        /// Threads that had not acknowledged.
        threads: usize,
        /// How long the caller waited.
        waited: Duration,
    },
    /// A configuration value is out of range.
    InvalidConfig(&'static str),
    /// A view names more domains than there are keys.
    ViewTooLarge {
        /// Domains in the view.
        domains: usize,
        /// Keys the manager has.
        keys: usize,
    },
    /// A view names the same domain twice.
    DuplicateDomain(DomainId),
    /// The domain belongs to another manager.
    ForeignDomain(DomainId),
    /// A domain's reservation has no room for an allocation.
    OutOfMemory {
        /// The domain.
        domain: DomainId,
        /// Bytes requested.
        requested: usize,
    },
    /// An alignment that is not a power of two.
    BadAlignment(usize),
    /// A pointer that is not the start of a live allocation of the domain.
    NotAllocated {
        /// The domain.
        domain: DomainId,
        /// The pointer.
        addr: usize,
    },
    /// An access faulted (checked accesses and guarded calls).
    Fault(FaultReport),
    /// The operation does not exist on this backend (e.g. guarded calls on the simulated
    /// one, which has no memory).
    Unsupported(&'static str),
    /// A configuration value could not be parsed.
    Config(String),
    /// The calling thread is confined ([`crate::thread::confine`]) and the call names a
    /// domain outside its confinement, or does what confined threads may not (what, here).
    Confined(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::HardwareRequired(why) => write!(
                f,
                "hardware backend requested but PKU is unavailable: {why}"
            ),
            Error::AllocKeys(e) => write!(f, "cannot allocate a protection key: {e}"),
            Error::Reserve { len, source } => write!(
                f,
                "cannot reserve {len:#x} bytes of address space: {source}"
            ),
            Error::Retag {
                addr,
                len,
                prot,
                key,
                source,
            } => write!(
                f,
                "cannot tag range (addr = {addr:#x}, len = {len:#x}, prot = {:#b}, key = {key}): {source}",
                prot.bits()
            ),
            Error::Remap { addr, len, source } => {
                write!(
                    f,
                    "cannot empty or map over range (addr = {addr:#x}, len = {len:#x}): {source}"
                )
            }
            Error::KeysBusy { keys, waited } => {
                write!(
                    f,
                    "all {keys} protection keys are pinned by active views (waited {waited:?})"
                )
            }
            Error::ViewsExceedKeys { needed, held, keys } => write!(
                f,
                "the view needs {needed} more keys but the thread's other views hold {held} of {keys}"
            ),
            Error::InterruptedView => write!(
                f,
                "a signal handler cannot end a view of the code it interrupted"
            ),
            Error::Reentrant => write!(
                f,
                "mpkvirt was called from a signal handler that interrupted a call into it"
            ),
            Error::ThreadsNotSynced { threads, waited } => write!(
                f,
                "{threads} threads did not take new process-wide rights within {waited:?}"
            ),
            Error::InvalidConfig(what) => write!(f, "invalid configuration: {what}"),
            Error::ViewTooLarge { domains, keys } => {
                write!(
                    f,
                    "a view of {domains} domains cannot fit in {keys} protection keys"
                )
            }
            Error::DuplicateDomain(d) => write!(f, "domain {d} appears twice in one view"),
            Error::ForeignDomain(d) => write!(f, "domain {d} belongs to another manager"),
            Error::OutOfMemory { domain, requested } => {
                write!(f, "domain {domain} has no room for {requested} bytes")
            }
            Error::BadAlignment(a) => write!(f, "alignment {a} is not a power of two"),
            Error::NotAllocated { domain, addr } => {
                write!(f, "{addr:#x} is not a live allocation of domain {domain}")
            }
            Error::Fault(report) => write!(f, "{report}"),
            Error::Unsupported(what) => write!(f, "{what} is not supported by this backend"),
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Confined(what) => write!(f, "the calling thread is confined: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::HardwareRequired(e) => Some(e),
            Error::AllocKeys(e)
            | Error::Reserve { source: e, .. }
            | Error::Retag { source: e, .. }
            | Error::Remap { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

impl Error {
    /// The closest `errno` value, for the C API.
    pub fn errno(&self) -> i32 {
        match self {
            Error::HardwareRequired(_) | Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::AllocKeys(e)
            | Error::Reserve { source: e, .. }
            | Error::Retag { source: e, .. }
            | Error::Remap { source: e, .. } => e.errno().0,
            Error::KeysBusy { .. } => libc::EBUSY,
            Error::ThreadsNotSynced { .. } => libc::ETIMEDOUT,
            Error::ViewTooLarge { .. } | Error::ViewsExceedKeys { .. } => libc::E2BIG,
            Error::InterruptedView | Error::Reentrant => libc::EDEADLK,
            Error::OutOfMemory { .. } => libc::ENOMEM,
            Error::Fault(_) => libc::EFAULT,
            Error::Confined(_) => libc::EPERM,
            Error::DuplicateDomain(_)
            | Error::ForeignDomain(_)
            | Error::BadAlignment(_)
            | Error::NotAllocated { .. }
            | Error::InvalidConfig(_)
            | Error::Config(_) => libc::EINVAL,
        }
    }
}

/// `Result` with mpkvirt's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
