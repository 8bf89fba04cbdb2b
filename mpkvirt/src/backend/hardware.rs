//! The hardware backend: real protection keys (`pkey_alloc`, `pkey_mprotect`) and PKRU
//! written through mpkvirt-asm's checked gate.
//!
//! # Safety
//!
//! This file changes page protections and PKRU. Both are confined: `tag`, `discard` and
//! `map_fd` act only on ranges inside reservations this backend made (checked with
//! [`Reservations::contains`] before every call), and mpkvirt hands out only raw pointers
//! into those reservations, never Rust references, so no reference can observe a protection
//! change. PKRU is written only through `write_pkru`, which the manager calls with values
//! that change nothing but the bits of this backend's keys (invariant 2 is the manager's
//! business; see `keycache.rs`).
#![allow(
    unsafe_code,
    reason = "pkey_mprotect, mmap over reservations and the WRPKRU gate"
)]

use std::os::fd::BorrowedFd;

use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::pkey::{pkey_alloc, pkey_free, pkey_mprotect};
use mpkvirt_sys::{AccessRights, Error as SysError, Pkey, Pkru, Pku};

use super::sealed::BackendOps;
use super::{BackendKind, RawFault, Reservations, ThreadRegs};
use crate::error::{Error, Result};
use crate::fault;

/// Real PKU: keys from `pkey_alloc`, tags with `pkey_mprotect`, rights with WRPKRU.
#[derive(Debug)]
pub struct Hardware {
    pku: Pku,
    keys: Vec<Pkey>,
    reservations: Reservations,
}

impl Hardware {
    /// Allocates up to `max_keys` protection keys (at least one) with access disabled for the
    /// calling thread.
    ///
    /// # Errors
    ///
    /// [`Error::HardwareRequired`] when PKU is unusable; [`Error::AllocKeys`] when no key can
    /// be allocated.
    pub fn new(max_keys: usize) -> Result<Hardware> {
        let pku = mpkvirt_sys::detect::pku().map_err(Error::HardwareRequired)?;
        let mut keys = Vec::new();
        while keys.len() < max_keys.min(15) {
            match pkey_alloc(AccessRights::DISABLE_ACCESS) {
                Ok(k) => keys.push(k),
                Err(SysError::KeysExhausted) if !keys.is_empty() => break,
                Err(source) => {
                    for k in keys {
                        let _ = pkey_free(k);
                    }
                    return Err(Error::AllocKeys(source));
                }
            }
        }
        fault::install_handler()?;
        Ok(Hardware {
            pku,
            keys,
            reservations: Reservations::default(),
        })
    }

    fn check(&self, addr: usize, len: usize) {
        assert!(
            self.reservations.contains(addr, len),
            "range {addr:#x}+{len:#x} is not a reservation of this backend"
        );
    }
}

impl Drop for Hardware {
    fn drop(&mut self) {
        // Pages first, keys after: a key freed while pages still carry it would hand those
        // pages to the next owner of the key number.
        for (start, len) in self.reservations.take() {
            fault::unregister_arena(start);
            // SAFETY: the reservation was made by this backend, every domain in it is gone
            // (domains keep the manager, and so this backend, alive) and no Rust reference
            // points into it.
            let _ = unsafe { mman::munmap(start as *mut u8, len) };
        }
        for &k in &self.keys {
            let _ = pkey_free(k);
        }
    }
}

impl BackendOps for Hardware {
    fn kind(&self) -> BackendKind {
        BackendKind::Hardware
    }

    fn keys(&self) -> &[Pkey] {
        &self.keys
    }

    fn reserve(&self, len: usize) -> Result<usize> {
        let start =
            mman::reserve_mergeable(len).map_err(|source| Error::Reserve { len, source })? as usize;
        self.reservations.add(start, len);
        fault::register_arena(start, len);
        Ok(start)
    }

    fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()> {
        self.check(addr, len);
        let (prot, key) = match key {
            Some(k) => (prot, k),
            None => (Prot::NONE, Pkey::DEFAULT),
        };
        // SAFETY: the range is inside one of this backend's reservations (checked above),
        // into which mpkvirt never hands out Rust references.
        unsafe { pkey_mprotect(addr as *mut u8, len, prot, key) }.map_err(|source| Error::Retag {
            addr,
            len,
            prot,
            key,
            source,
        })
    }

    fn discard(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        self.check(addr, len);
        let err = |source| Error::Retag {
            addr,
            len,
            prot: Prot::NONE,
            key: Pkey::DEFAULT,
            source,
        };
        if mapped_files {
            // SAFETY: as for `tag`; the contents are given up on purpose (domain destroyed
            // or reset) and the fresh anonymous pages replacing the file mappings are parked.
            return unsafe { mman::map_fixed_anonymous(addr as *mut u8, len, Prot::NONE) }
                .map_err(err);
        }
        // Emptying the pages in place (rather than mapping over them) keeps the range's
        // anon_vma, so it merges with its parked neighbours again (see `reserve`).
        // SAFETY: as for `tag`; the contents are given up on purpose.
        unsafe { mman::madvise_dontneed(addr as *mut u8, len) }.map_err(err)?;
        self.tag(addr, len, Prot::NONE, None)
    }

    fn map_fd(&self, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<()> {
        self.check(addr, len);
        // SAFETY: as for `discard`. The mapping is private, so later changes of the file do
        // not show through pages already copied; it starts parked (PROT_NONE) and the
        // caller re-applies the domain's key, because mmap resets it to 0.
        unsafe { mman::map_fixed_fd(addr as *mut u8, len, Prot::NONE, false, fd, offset) }.map_err(
            |source| Error::Retag {
                addr,
                len,
                prot: Prot::NONE,
                key: Pkey::DEFAULT,
                source,
            },
        )
    }

    #[inline]
    fn read_pkru(&self, _regs: &ThreadRegs) -> Pkru {
        self.pku.rdpkru()
    }

    #[inline]
    fn write_pkru(&self, regs: &mut ThreadRegs, new: Pkru) {
        regs.gate_slot = new.bits();
        // SAFETY: `self.pku` proves OSPKE (the gate's WRPKRU is legal). The slot lives in the
        // calling thread's context, is not shared with other threads, and is key-0 memory, so
        // it stays readable under every value the manager writes (it never restricts key 0).
        // The manager owns this thread's bits for our keys (see the module docs).
        unsafe { mpkvirt_asm::mpkvirt_gate_write(&regs.gate_slot) };
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
        self.reservations.contains(addr, len)
    }
}
