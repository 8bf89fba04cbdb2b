//! The emulated backend: protection keys without PKU, enforced with `mprotect`.
//!
//! Each virtual key is bound to at most one range (the domain that holds it). The pages of
//! that range get the union of the rights of all threads' current views (see the module
//! docs of [`crate::backend`] for what that means for several threads).
//!
//! # Safety
//!
//! `mprotect` acts only on ranges inside this backend's reservations (checked before every
//! call, or recorded by a checked call), into which mpkvirt hands out raw pointers only, never
//! Rust references. Mapping over reservations is `arena.rs`'s business.
#![allow(unsafe_code, reason = "mprotect over the backend's own reservations")]

use std::os::fd::BorrowedFd;

use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::{AccessRights, Pkey, Pkru};
use parking_lot::Mutex;

use super::arena::Arenas;
use super::sealed::BackendOps;
use super::{BackendKind, RawFault, ThreadRegs, effective};
use crate::error::{Error, Result};
use crate::fault;

#[derive(Clone, Copy, Debug, Default)]
struct KeyState {
    /// The range bound to the key and its page protection.
    bound: Option<(usize, usize, Prot)>,
    /// Threads whose current rights for the key are read-write / read-only.
    rw: u32,
    ro: u32,
}

impl KeyState {
    fn rights(&self) -> AccessRights {
        if self.rw > 0 {
            AccessRights::READ_WRITE
        } else if self.ro > 0 {
            AccessRights::READ_ONLY
        } else {
            AccessRights::NONE
        }
    }
}

/// The range starting at `addr` leaves whichever key it was bound to.
fn unbind(state: &mut [KeyState; Pkey::COUNT], addr: usize) {
    for ks in state.iter_mut() {
        if ks.bound.is_some_and(|(a, _, _)| a == addr) {
            ks.bound = None;
        }
    }
}

/// `mprotect` emulation of protection keys (no PKU needed).
#[derive(Debug)]
pub struct Emulated {
    keys: Vec<Pkey>,
    state: Box<Mutex<[KeyState; Pkey::COUNT]>>,
    arenas: Arenas,
}

impl Emulated {
    /// An emulation with `keys` virtual keys (1 to 15).
    ///
    /// # Errors
    ///
    /// Fails only when the SIGSEGV handler cannot be installed.
    pub fn new(keys: usize) -> Result<Emulated> {
        fault::install_handler()?;
        let keys = (1..=keys.clamp(1, 15) as u8)
            .filter_map(Pkey::new)
            .collect();
        Ok(Emulated {
            keys,
            state: Box::new(Mutex::new([KeyState::default(); Pkey::COUNT])),
            arenas: Arenas::default(),
        })
    }

    fn mprotect(addr: usize, len: usize, prot: Prot, key: Pkey) -> Result<()> {
        // SAFETY: callers pass ranges inside this backend's reservations (checked in `tag`,
        // or recorded by it), into which mpkvirt hands out no Rust references.
        unsafe { mman::mprotect(addr as *mut u8, len, prot) }.map_err(|source| Error::Retag {
            addr,
            len,
            prot,
            key,
            source,
        })
    }
}

impl BackendOps for Emulated {
    fn kind(&self) -> BackendKind {
        BackendKind::Emulated
    }

    fn keys(&self) -> &[Pkey] {
        &self.keys
    }

    fn reserve(&self, len: usize) -> Result<usize> {
        self.arenas.reserve(len)
    }

    fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()> {
        self.arenas.check(addr, len);
        let mut state = self.state.lock();
        unbind(&mut state, addr);
        match key {
            None => Self::mprotect(addr, len, Prot::NONE, Pkey::DEFAULT),
            Some(k) => {
                let ks = &mut state[k.index() as usize];
                ks.bound = Some((addr, len, prot));
                Self::mprotect(addr, len, effective(prot, ks.rights()), k)
            }
        }
    }

    fn discard(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        if mapped_files {
            unbind(&mut self.state.lock(), addr);
            return self.arenas.replace(addr, len);
        }
        // Park first (see the hardware backend), then empty in place (keeps it mergeable).
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

    fn read_pkru(&self, regs: &ThreadRegs) -> Pkru {
        regs.pkru
    }

    fn write_pkru(&self, regs: &mut ThreadRegs, new: Pkru) {
        let old = std::mem::replace(&mut regs.pkru, new);
        let mut state = self.state.lock();
        for &k in &self.keys {
            let (before, after) = (old.rights(k), new.rights(k));
            if before == after {
                continue;
            }
            let ks = &mut state[k.index() as usize];
            let union_before = ks.rights();
            for (rights, delta) in [(before, -1i32), (after, 1)] {
                let counter = if rights.can_write() {
                    &mut ks.rw
                } else if rights.can_read() {
                    &mut ks.ro
                } else {
                    continue;
                };
                *counter = counter
                    .checked_add_signed(delta)
                    .expect("emulated rights count");
            }
            let union_after = ks.rights();
            if union_after != union_before
                && let Some((addr, len, prot)) = ks.bound
                && let Err(e) = Self::mprotect(addr, len, effective(prot, union_after), k)
            {
                // Failing to *grant* leaves the pages closed: accesses fault, the safe
                // direction. Failing to *revoke* would leave a domain open to threads whose
                // view no longer grants it; there is no safe way to continue.
                if union_after.can_write() || (union_after.can_read() && !union_before.can_write())
                {
                    eprintln!("mpkvirt: emulated backend could not grant rights: {e}");
                } else {
                    eprintln!("mpkvirt: emulated backend could not revoke rights: {e}; aborting");
                    std::process::abort();
                }
            }
        }
    }

    fn access(
        &self,
        _regs: &ThreadRegs,
        addr: usize,
        write: Option<u8>,
    ) -> std::result::Result<u8, RawFault> {
        fault::probe(addr, write)
    }

    fn owns(&self, addr: usize, len: usize) -> bool {
        self.arenas.contains(addr, len)
    }
}
