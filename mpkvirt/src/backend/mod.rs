//! Backends: one API, three machines.
//!
//! The manager needs three things from a machine: protection keys it may bind, "set these
//! pages' protection and key", and "set this thread's rights". Each backend provides them:
//!
//! | backend | keys | tagging | thread rights | enforcement |
//! |---|---|---|---|---|
//! | [`Hardware`] | `pkey_alloc`ed (pooled by mpkvirt) | `pkey_mprotect` | the thread record's PKRU, installed by the gates | per thread, by the CPU |
//! | [`Emulated`] | virtual 1..=n | `mprotect` of the bound range | a per-thread PKRU value; pages get the *union* of the rights of all threads | process-wide, by the MMU |
//! | [`Simulated`] | virtual 1..=n | a model page table | a per-thread PKRU value | none: a model answers "would this fault" |
//!
//! [`Machine`] is the run-time choice between the two real ones (see [`crate::Mode`]).
//!
//! # Specification and live state
//!
//! A backend value the program builds ([`Hardware::new`], [`Emulated::new`],
//! [`Simulated::new`], [`Machine`]) is only a *specification*: how many keys, which machine.
//! The manager builds the *live* backend from it inside the library — keys allocated, arenas
//! recorded, the model's page table — in library memory, so nothing the program can write
//! decides which keys or ranges the backend believes it owns.
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
//! The traits are sealed: their methods are crate-internal, so code outside mpkvirt cannot
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

pub(crate) use arena::{USER_END, arena_map_contains, arena_map_touches};
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

impl BackendKind {
    pub(crate) fn tag(self) -> u32 {
        match self {
            BackendKind::Simulated => 1,
            BackendKind::Emulated => 2,
            BackendKind::Hardware => 3,
        }
    }

    pub(crate) fn from_tag(tag: u32) -> Option<BackendKind> {
        match tag {
            1 => Some(BackendKind::Simulated),
            2 => Some(BackendKind::Emulated),
            3 => Some(BackendKind::Hardware),
            _ => None,
        }
    }
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

/// The calling thread's rights registers as a live backend sees them during an op: the
/// thread's virtual PKRU for this manager (emulated, simulated) and the thread record's real
/// PKRU (hardware: the gate installs it when the op returns).
#[derive(Debug)]
pub struct Regs<'a> {
    pub(crate) virt: &'a mut Pkru,
    pub(crate) real: &'a mut u32,
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

/// A machine the manager can run on: the specification the program builds. Sealed:
/// implemented by [`Hardware`], [`Emulated`], [`Simulated`] and [`Machine`] only.
pub trait Backend: sealed::Spec + Send + Sync + fmt::Debug + 'static {}

pub(crate) mod sealed {
    use super::*;

    /// The specification half (program side); crate-internal.
    pub trait Spec: Sized {
        /// The live state the manager keeps in library memory.
        type Live: LiveOps;
        /// The registry tag of managers of this type (one per Rust type).
        const TAG: u32;
        /// Which machine this specification asks for.
        fn kind(&self) -> BackendKind;
        /// Builds the live backend (inside the library: keys, tables).
        fn build(self) -> Result<Self::Live>;
        /// The specification as plain data, to cross into the library.
        fn to_pod(&self) -> crate::manager::ops::SpecPod;
        /// The specification back from plain data (inside the library: validated).
        fn from_pod(p: crate::manager::ops::SpecPod) -> Result<Self>;
    }

    /// The live backend (library side); crate-internal.
    pub trait LiveOps: Send + Sync + fmt::Debug + 'static {
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
        /// Maps `fd` privately (copy-on-write) over `[addr, addr + len)`, parked; the caller
        /// re-applies the domain's tag.
        fn map_fd(&self, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<()>;
        /// The calling thread's rights.
        fn read_pkru(&self, regs: &Regs<'_>) -> Pkru;
        /// Sets the calling thread's rights. The manager only changes the bits of
        /// [`LiveOps::keys`]. An error means some key's rights could not be *granted*
        /// (the emulated backend's `mprotect` failed): those keys keep their old rights in
        /// `regs` (closed, the safe direction) and the others are changed.
        fn write_pkru(&self, regs: &mut Regs<'_>, new: Pkru) -> Result<()>;
        /// For backends without memory: the outcome of a read (`write == None`) or write of
        /// one byte at `addr` by a thread with rights `pkru`. `None`: the access must be made
        /// for real, by the caller.
        fn model_access(
            &self,
            _pkru: Pkru,
            _addr: usize,
            _write: Option<u8>,
        ) -> Option<std::result::Result<u8, RawFault>> {
            None
        }
        /// Whether `[addr, addr + len)` lies in one of this backend's reservations.
        fn owns(&self, addr: usize, len: usize) -> bool;
        /// Called when the manager goes away: `retired` when a thread may still hold rights
        /// to the keys (a forgotten view), which must then never be handed out again.
        fn release(&self, retired: bool);
    }
}

use sealed::{LiveOps, Spec};

/// The real machine chosen at run time: [`Hardware`] when PKU is usable (or required),
/// [`Emulated`] otherwise. See [`crate::Mode`].
#[derive(Debug)]
pub enum Machine {
    /// Real PKU.
    Hardware(Hardware),
    /// `mprotect` emulation.
    Emulated(Emulated),
}

/// The live state of a [`Machine`].
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per manager, inside library memory: boxing would only add an indirection"
)]
pub enum MachineLive {
    /// Real PKU.
    Hardware(hardware::HardwareLive),
    /// `mprotect` emulation.
    Emulated(emulated::EmulatedLive),
}

impl Backend for Machine {}
impl Backend for Hardware {}
impl Backend for Emulated {}
impl Backend for Simulated {}

impl Spec for Machine {
    type Live = MachineLive;
    const TAG: u32 = 4;
    fn kind(&self) -> BackendKind {
        match self {
            Machine::Hardware(_) => BackendKind::Hardware,
            Machine::Emulated(_) => BackendKind::Emulated,
        }
    }
    fn build(self) -> Result<MachineLive> {
        Ok(match self {
            Machine::Hardware(h) => MachineLive::Hardware(h.build()?),
            Machine::Emulated(e) => MachineLive::Emulated(e.build()?),
        })
    }
    fn to_pod(&self) -> crate::manager::ops::SpecPod {
        match self {
            Machine::Hardware(h) => h.to_pod(),
            Machine::Emulated(e) => e.to_pod(),
        }
    }
    fn from_pod(p: crate::manager::ops::SpecPod) -> Result<Machine> {
        match BackendKind::from_tag(p.kind) {
            Some(BackendKind::Hardware) => Hardware::from_pod(p).map(Machine::Hardware),
            Some(BackendKind::Emulated) => Emulated::from_pod(p).map(Machine::Emulated),
            _ => Err(crate::error::Error::InvalidConfig("backend")),
        }
    }
}

/// The plain-data form of a specification with `keys` keys.
pub(crate) fn pod(kind: BackendKind, keys: usize) -> crate::manager::ops::SpecPod {
    crate::manager::ops::SpecPod {
        kind: kind.tag(),
        keys: u32::try_from(keys).unwrap_or(u32::MAX),
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            MachineLive::Hardware($b) => $e,
            MachineLive::Emulated($b) => $e,
        }
    };
}

impl LiveOps for MachineLive {
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
    fn map_fd(&self, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<()> {
        dispatch!(self, b => b.map_fd(addr, len, fd, offset))
    }
    #[inline]
    fn read_pkru(&self, regs: &Regs<'_>) -> Pkru {
        dispatch!(self, b => b.read_pkru(regs))
    }
    #[inline]
    fn write_pkru(&self, regs: &mut Regs<'_>, new: Pkru) -> Result<()> {
        dispatch!(self, b => b.write_pkru(regs, new))
    }
    fn owns(&self, addr: usize, len: usize) -> bool {
        dispatch!(self, b => b.owns(addr, len))
    }
    fn release(&self, retired: bool) {
        dispatch!(self, b => b.release(retired))
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
