//! The hardware backend: real protection keys (`pkey_alloc`, `pkey_mprotect`), and a thread's
//! rights in its record, which the gates install with WRPKRU.
//!
//! Keys come from mpkvirt's process-wide pool (`meta::Root::take_keys`): a manager's keys go
//! back to the pool when it is dropped (or are retired for good if a forgotten view may still
//! grant them), never to the kernel, so no other code of the process is ever handed a key a
//! thread may still hold rights to.
//!
//! # Safety
//!
//! `tag` changes page protections only on ranges inside this backend's reservations (checked
//! first), into which mpkvirt hands out only raw pointers, never Rust references, so no
//! reference can observe the change (mapping over reservations is `arena.rs`'s business).
#![allow(unsafe_code, reason = "pkey_mprotect over reservations")]

use std::os::fd::BorrowedFd;

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::pkey::pkey_mprotect;
use mpkvirt_sys::{Pkey, Pkru, Pku};

use super::arena::Arenas;
use super::sealed::{LiveOps, Spec};
use super::{BackendKind, Regs};
use crate::error::{Error, Result};
use crate::meta::{MVec, root};

/// Real PKU: keys from `pkey_alloc` (through mpkvirt's pool), tags with `pkey_mprotect`,
/// rights with WRPKRU through the gates. A specification: the keys are taken when a manager
/// is built from it.
#[derive(Debug)]
pub struct Hardware {
    _pku: Pku,
    max_keys: usize,
}

impl Hardware {
    /// Asks for up to `max_keys` protection keys (at least one is taken when a manager is
    /// built; fewer than asked when other code holds keys).
    ///
    /// # Errors
    ///
    /// [`Error::HardwareRequired`] when PKU is unusable; [`Error::InvalidConfig`] when `max_keys`
    /// is not 1 to 15.
    pub fn new(max_keys: usize) -> Result<Hardware> {
        let pku = mpkvirt_sys::detect::pku().map_err(Error::HardwareRequired)?;
        if !(1..=15).contains(&max_keys) {
            return Err(Error::InvalidConfig("max_keys must be 1 to 15"));
        }
        Ok(Hardware {
            _pku: pku,
            max_keys,
        })
    }
}

/// The live hardware backend, in library memory.
#[derive(Debug)]
pub struct HardwareLive {
    keys: MVec<Pkey>,
    arenas: Arenas,
}

impl Spec for Hardware {
    type Live = HardwareLive;
    const TAG: u32 = 3;
    fn kind(&self) -> BackendKind {
        BackendKind::Hardware
    }
    fn to_pod(&self) -> crate::manager::ops::SpecPod {
        super::pod(BackendKind::Hardware, self.max_keys)
    }
    fn from_pod(p: crate::manager::ops::SpecPod) -> Result<Self> {
        if p.kind != BackendKind::Hardware.tag() {
            return Err(Error::InvalidConfig("backend"));
        }
        Hardware::new(p.keys as usize)
    }
    fn build(self) -> Result<HardwareLive> {
        let keys = root().take_keys(self.max_keys)?;
        crate::fault::install_handler()?;
        Ok(HardwareLive {
            keys,
            arenas: Arenas::default(),
        })
    }
}

impl LiveOps for HardwareLive {
    fn kind(&self) -> BackendKind {
        BackendKind::Hardware
    }

    fn keys(&self) -> &[Pkey] {
        &self.keys
    }

    fn reserve(&self, len: usize) -> Result<usize> {
        self.arenas.reserve(len).map(|(start, _)| start)
    }

    fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()> {
        self.arenas.check(addr, len);
        let (prot, key) = match key {
            Some(k) => (prot, k),
            None => (Prot::NONE, Pkey::DEFAULT),
        };
        // SAFETY: the range is inside one of this backend's reservations (checked above),
        // into which mpkvirt never hands out Rust references (only raw pointers, whose users
        // must be inside a view). The manager parks (`key == None`) only after `try_claim`
        // proved that no thread pins the key, so no thread is inside a view of the domain.
        unsafe { pkey_mprotect(addr as *mut u8, len, prot, key) }.map_err(|source| Error::Retag {
            addr,
            len,
            prot,
            key,
            source,
        })
    }

    fn discard(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        if mapped_files {
            // Parks and empties in one step: fresh anonymous pages, no access, key 0.
            return self.arenas.replace(addr, len);
        }
        // Park first: if emptying fails (locked pages), the old contents are at least closed.
        // Emptying in place (rather than mapping over) keeps the range mergeable with its
        // parked neighbours (see `mman::reserve_mergeable`).
        self.tag(addr, len, Prot::NONE, None)?;
        self.arenas.empty(addr, len)
    }

    fn zero(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        if mapped_files {
            self.arenas.replace(addr, len)
        } else {
            self.arenas.empty(addr, len)
        }
    }

    fn map_fd(&self, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<()> {
        self.arenas.map_file(addr, len, fd, offset)
    }

    #[inline]
    fn read_pkru(&self, regs: &Regs<'_>) -> Pkru {
        Pkru::from_bits(*regs.real)
    }

    #[inline]
    fn write_pkru(&self, regs: &mut Regs<'_>, new: Pkru) -> Result<()> {
        // The thread record's value; the gate installs it when the op returns.
        *regs.real = new.bits();
        Ok(())
    }

    fn owns(&self, addr: usize, len: usize) -> bool {
        self.arenas.contains(addr, len)
    }

    fn release(&self, retired: bool) {
        // Pages first, keys after: a key handed on while pages still carry it would give
        // those pages to the next owner of the key number.
        self.arenas.unmap_all();
        root().return_keys(&self.keys, retired);
    }
}
