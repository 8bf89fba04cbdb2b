//! Backends: one API, three machines.
//!
//! The manager needs three things from a machine: protection keys it may bind, "set these
//! pages' protection and key", and "set this thread's rights". Each backend provides them:
//!
//! | backend | keys | tagging | thread rights | enforcement |
//! |---|---|---|---|---|
//! | [`Hardware`] | `pkey_alloc`ed | `pkey_mprotect` | WRPKRU through the checked gate | per thread, by the CPU |
//! | [`Emulated`] | virtual 1..=n | `mprotect` of the bound range | a per-thread PKRU value; pages get the *union* of the rights of all threads | process-wide, by the MMU |
//! | [`Simulated`] | virtual 1..=n | a model page table | a per-thread PKRU value | none: a model answers "would this fault" |
//!
//! [`Machine`] is the run-time choice between the two real ones (see [`crate::Mode`]).
//!
//! # Emulated: what "process-wide" means
//!
//! Without PKU there is one set of page protections for all threads. The emulated backend
//! keeps, per virtual key, how many threads' current rights grant read-write and read-only,
//! and gives the pages bound to the key the strongest of them: read-write if any thread's
//! current view grants read-write, read-only if any grants read-only, none otherwise. So a
//! thread can reach a domain *while any other thread's current view grants it*, even if its
//! own view does not. With one thread (or threads that never overlap in time) this is exactly
//! the hardware semantics; with several it is weaker, and a host that runs untrusted code
//! concurrently on this backend must run one domain-using thread per process. Every change
//! of rights that changes a key's union costs one `mprotect` — this is also the
//! mprotect-per-switch baseline MPK papers compare against.
//!
//! The trait is sealed: its methods are crate-internal, so code outside mpkvirt cannot
//! change protections or PKRU behind the manager's back.

mod arena;
mod emulated;
mod hardware;
mod simulated;

use std::fmt;
use std::os::fd::BorrowedFd;

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::signal::{Access, SegvCode};
use mpkvirt_sys::{Pkey, Pkru};

pub use emulated::Emulated;
pub use hardware::Hardware;
pub use simulated::Simulated;

use crate::error::Result;

/// Which machine a backend is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BackendKind {
    /// Real protection keys and PKRU.
    Hardware,
    /// `mprotect` emulation with process-wide protection.
    Emulated,
    /// A model without memory.
    Simulated,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Hardware => "hardware",
            BackendKind::Emulated => "emulated",
            BackendKind::Simulated => "simulated",
        })
    }
}

/// The calling thread's rights as a backend tracks them (kept by the manager per thread).
#[derive(Clone, Copy, Debug)]
pub struct ThreadRegs {
    /// The thread's (virtual) PKRU for the emulated and simulated backends.
    pub(crate) pkru: Pkru,
    /// The trusted memory slot the hardware gate writes PKRU from and re-checks against.
    pub(crate) gate_slot: u32,
}

impl Default for ThreadRegs {
    fn default() -> ThreadRegs {
        ThreadRegs {
            pkru: Pkru::LINUX_INIT,
            gate_slot: Pkru::LINUX_INIT.bits(),
        }
    }
}

/// A memory access that faulted (or, for the simulated backend, would have).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RawFault {
    /// The faulting address.
    pub addr: usize,
    /// Read, write or fetch, when known.
    pub access: Option<Access>,
    /// `si_code`.
    pub code: SegvCode,
    /// `si_pkey` for protection-key faults.
    pub pkey: Option<Pkey>,
}

/// A machine the manager can run on. Sealed: implemented by [`Hardware`], [`Emulated`],
/// [`Simulated`] and [`Machine`] only.
pub trait Backend: sealed::BackendOps + Send + Sync + fmt::Debug + 'static {}

pub(crate) mod sealed {
    use super::*;

    /// The operations behind [`Backend`](super::Backend); crate-internal.
    pub trait BackendOps {
        fn kind(&self) -> BackendKind;
        /// The keys domains may be bound to (distinct, none is key 0).
        fn keys(&self) -> &[Pkey];
        /// Reserves `len` bytes of address space (page multiple): inaccessible, key 0, and
        /// primed so that its pieces can merge again ([`mpkvirt_sys::mman::reserve_mergeable`]).
        fn reserve(&self, len: usize) -> Result<usize>;
        /// Gives `[addr, addr + len)` (inside a reservation) protection `prot` and `key`, or
        /// parks it (no access, key 0) when `key` is `None`. One system call on real
        /// backends, whatever the length.
        fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()>;
        /// Parks `[addr, addr + len)` (no access, key 0) and then gives it fresh zero pages.
        /// `mapped_files`: whether file mappings were placed in the range (they must be
        /// replaced, not just emptied). On error the range must not be reused: it may still
        /// hold its old contents.
        fn discard(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()>;
        /// Gives `[addr, addr + len)` zero pages again, keeping its protection and key when it
        /// holds no file mappings; with `mapped_files` the range comes back parked and the
        /// caller re-tags it.
        fn zero(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()>;
        /// The keys may still be granted by a thread whose view was forgotten: never give
        /// them back to the kernel.
        fn retire_keys(&self) {}
        /// Maps `fd` privately (copy-on-write) over `[addr, addr + len)`, parked; the caller
        /// re-applies the domain's tag.
        fn map_fd(&self, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<()>;
        /// The calling thread's rights.
        fn read_pkru(&self, regs: &ThreadRegs) -> Pkru;
        /// Sets the calling thread's rights. The manager only changes the bits of
        /// [`BackendOps::keys`].
        fn write_pkru(&self, regs: &mut ThreadRegs, new: Pkru);
        /// Reads (`write == None`) or writes one byte at `addr` as the calling thread,
        /// reporting a fault instead of dying.
        fn access(
            &self,
            regs: &ThreadRegs,
            addr: usize,
            write: Option<u8>,
        ) -> std::result::Result<u8, RawFault>;
        /// Whether `[addr, addr + len)` lies in one of this backend's reservations.
        fn owns(&self, addr: usize, len: usize) -> bool;
    }
}

use sealed::BackendOps;

/// The real machine chosen at run time: [`Hardware`] when PKU is usable (or required),
/// [`Emulated`] otherwise. See [`crate::Mode`].
#[derive(Debug)]
pub enum Machine {
    /// Real PKU.
    Hardware(Hardware),
    /// `mprotect` emulation.
    Emulated(Emulated),
}

impl Backend for Machine {}
impl Backend for Hardware {}
impl Backend for Emulated {}
impl Backend for Simulated {}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Machine::Hardware($b) => $e,
            Machine::Emulated($b) => $e,
        }
    };
}

impl BackendOps for Machine {
    fn kind(&self) -> BackendKind {
        dispatch!(self, b => b.kind())
    }
    fn keys(&self) -> &[Pkey] {
        dispatch!(self, b => b.keys())
    }
    fn reserve(&self, len: usize) -> Result<usize> {
        dispatch!(self, b => b.reserve(len))
    }
    fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()> {
        dispatch!(self, b => b.tag(addr, len, prot, key))
    }
    fn discard(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        dispatch!(self, b => b.discard(addr, len, mapped_files))
    }
    fn zero(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        dispatch!(self, b => b.zero(addr, len, mapped_files))
    }
    fn retire_keys(&self) {
        dispatch!(self, b => b.retire_keys())
    }
    fn map_fd(&self, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<()> {
        dispatch!(self, b => b.map_fd(addr, len, fd, offset))
    }
    #[inline]
    fn read_pkru(&self, regs: &ThreadRegs) -> Pkru {
        dispatch!(self, b => b.read_pkru(regs))
    }
    #[inline]
    fn write_pkru(&self, regs: &mut ThreadRegs, new: Pkru) {
        dispatch!(self, b => b.write_pkru(regs, new))
    }
    fn access(
        &self,
        regs: &ThreadRegs,
        addr: usize,
        write: Option<u8>,
    ) -> std::result::Result<u8, RawFault> {
        dispatch!(self, b => b.access(regs, addr, write))
    }
    fn owns(&self, addr: usize, len: usize) -> bool {
        dispatch!(self, b => b.owns(addr, len))
    }
}

/// Reservations made by a backend: `(start, len)` pairs, checked by `owns`.
#[derive(Debug, Default)]
pub(crate) struct Reservations(parking_lot::RwLock<Vec<(usize, usize)>>);

impl Reservations {
    pub(crate) fn add(&self, start: usize, len: usize) {
        self.0.write().push((start, len));
    }
    pub(crate) fn contains(&self, addr: usize, len: usize) -> bool {
        let end = addr.saturating_add(len);
        self.0
            .read()
            .iter()
            .any(|&(s, l)| addr >= s && end <= s + l)
    }
    pub(crate) fn take(&self) -> Vec<(usize, usize)> {
        std::mem::take(&mut *self.0.write())
    }
}

/// `Prot` as the rights a PKRU field allows: the effective protection of pages with `prot`
/// for a thread with `rights` for their key.
pub(crate) fn effective(prot: Prot, rights: mpkvirt_sys::AccessRights) -> Prot {
    if !rights.can_read() {
        Prot::NONE
    } else if !rights.can_write() {
        prot - Prot::WRITE
    } else {
        prot
    }
}
