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
use std::sync::Mutex;

use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::{AccessRights, Pkey, Pkru};

use super::arena::Arenas;
use super::sealed::{LiveOps, Spec};
use super::{BackendKind, Regs, effective};
use crate::error::{Error, Result};
use crate::fault;
use crate::meta::{MVec, Meta, lock};

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

    /// Moves one thread's rights for the key from `from` to `to` in the counts.
    fn count(&mut self, from: AccessRights, to: AccessRights) {
        for (rights, delta) in [(from, -1i32), (to, 1)] {
            let counter = if rights.can_write() {
                &mut self.rw
            } else if rights.can_read() {
                &mut self.ro
            } else {
                continue;
            };
            *counter = counter
                .checked_add_signed(delta)
                .expect("emulated rights count");
        }
    }
}

/// `mprotect` emulation of protection keys (no PKU needed). A specification: the live state
/// is built when a manager is.
#[derive(Debug)]
pub struct Emulated {
    keys: usize,
}

impl Emulated {
    /// An emulation with `keys` virtual keys (1 to 15).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `keys` is not 1 to 15.
    pub fn new(keys: usize) -> Result<Emulated> {
        if !(1..=15).contains(&keys) {
            return Err(Error::InvalidConfig("keys must be 1 to 15"));
        }
        Ok(Emulated { keys })
    }
}

/// The live emulated backend, in library memory. Each virtual key has its own lock, so
/// threads changing rights for different keys do not serialise.
#[derive(Debug)]
pub struct EmulatedLive {
    keys: MVec<Pkey>,
    state: [Mutex<KeyState>; Pkey::COUNT],
    arenas: Arenas,
}

impl Spec for Emulated {
    type Live = EmulatedLive;
    const TAG: u32 = 2;
    fn kind(&self) -> BackendKind {
        BackendKind::Emulated
    }
    fn to_pod(&self) -> crate::manager::ops::SpecPod {
        super::pod(BackendKind::Emulated, self.keys)
    }
    fn from_pod(p: crate::manager::ops::SpecPod) -> Result<Self> {
        if p.kind != BackendKind::Emulated.tag() {
            return Err(Error::InvalidConfig("backend"));
        }
        Emulated::new(p.keys as usize)
    }
    fn build(self) -> Result<EmulatedLive> {
        fault::install_handler()?;
        let mut keys = MVec::new_in(Meta);
        for k in (1..=self.keys as u8).filter_map(Pkey::new) {
            keys.push(k);
        }
        Ok(EmulatedLive {
            keys,
            state: std::array::from_fn(|_| Mutex::new(KeyState::default())),
            arenas: Arenas::default(),
        })
    }
}

impl EmulatedLive {
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

    /// Every key's state, locked in key order: tags (binding and parking ranges, which
    /// happen under the manager's lock, so rarely) are atomic with respect to every change
    /// of rights, while rights changes lock only the keys they change.
    fn lock_all(&self) -> [std::sync::MutexGuard<'_, KeyState>; Pkey::COUNT] {
        std::array::from_fn(|k| lock(&self.state[k]))
    }
}

/// The range starting at `addr` leaves whichever key it was bound to.
fn unbind(states: &mut [std::sync::MutexGuard<'_, KeyState>], addr: usize) {
    for ks in states.iter_mut() {
        if ks.bound.is_some_and(|(a, _, _)| a == addr) {
            ks.bound = None;
        }
    }
}

impl LiveOps for EmulatedLive {
    fn kind(&self) -> BackendKind {
        BackendKind::Emulated
    }

    fn keys(&self) -> &[Pkey] {
        &self.keys
    }

    fn reserve(&self, len: usize) -> Result<usize> {
        self.arenas.reserve(len).map(|(start, _)| start)
    }

    fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()> {
        self.arenas.check(addr, len);
        let mut states = self.lock_all();
        unbind(&mut states, addr);
        match key {
            None => Self::mprotect(addr, len, Prot::NONE, Pkey::DEFAULT),
            Some(k) => {
                let ks = &mut states[k.index() as usize];
                ks.bound = Some((addr, len, prot));
                Self::mprotect(addr, len, effective(prot, ks.rights()), k)
            }
        }
    }

    fn discard(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        if mapped_files {
            let mut states = self.lock_all();
            unbind(&mut states, addr);
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

    fn read_pkru(&self, regs: &Regs<'_>) -> Pkru {
        *regs.virt
    }

    fn write_pkru(&self, regs: &mut Regs<'_>, new: Pkru) -> Result<()> {
        let old = *regs.virt;
        // What the thread ends up with: `new`, except keys whose grant failed.
        let mut applied = new;
        let mut failed = None;
        for &k in self.keys.iter() {
            let (before, after) = (old.rights(k), new.rights(k));
            if before == after {
                continue;
            }
            let mut ks = lock(&self.state[k.index() as usize]);
            let union_before = ks.rights();
            ks.count(before, after);
            let union_after = ks.rights();
            if union_after != union_before
                && let Some((addr, len, prot)) = ks.bound
                && let Err(e) = Self::mprotect(addr, len, effective(prot, union_after), k)
            {
                // Failing to *grant* leaves the pages as they were: the thread keeps its old
                // rights for the key (the counts go back) and the caller hears of it (an
                // enter fails). Failing to *revoke* would leave a domain open to threads
                // whose view no longer grants it; there is no safe way to continue.
                let granting = union_after.can_write()
                    || (union_after.can_read() && !union_before.can_write());
                if !granting {
                    fault::log_error("mpkvirt: emulated backend could not change rights: ", &e);
                    fault::log_line("mpkvirt: a revocation failed; aborting\n");
                    std::process::abort();
                }
                // `mprotect` changes a range mapping by mapping and stops at the first split it
                // cannot make: the mappings before it are open already. The whole range goes
                // back to the rights it had (a change that only merges mappings back); if even
                // that fails, continuing would leave part of the domain open.
                if Self::mprotect(addr, len, effective(prot, union_before), k).is_err() {
                    fault::log_error("mpkvirt: emulated backend could not change rights: ", &e);
                    fault::log_line("mpkvirt: undoing a failed grant failed; aborting\n");
                    std::process::abort();
                }
                ks.count(after, before);
                applied = applied.with(k, before);
                failed.get_or_insert(e);
            }
        }
        *regs.virt = applied;
        failed.map_or(Ok(()), Err)
    }

    fn owns(&self, addr: usize, len: usize) -> bool {
        self.arenas.contains(addr, len)
    }

    fn release(&self, _retired: bool) {
        self.arenas.unmap_all();
    }
}
