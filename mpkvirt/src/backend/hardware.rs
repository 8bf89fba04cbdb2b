//! The hardware backend: real protection keys (`pkey_alloc`, `pkey_mprotect`) and PKRU
//! written through mpkvirt-asm's checked gate.
//!
//! # Safety
//!
//! This file changes page protections and PKRU. Both are confined: `tag` acts only on
//! ranges inside this backend's reservations (checked first), into which mpkvirt hands out
//! only raw pointers, never Rust references, so no reference can observe a protection
//! change (mapping over reservations is `arena.rs`'s business). PKRU is written only through `write_pkru`, which the manager calls with values
//! that change nothing but the bits of this backend's keys (invariant 2 is the manager's
//! business; see `keycache.rs`).
#![allow(
    unsafe_code,
    reason = "pkey_mprotect over reservations and the WRPKRU gate"
)]

use std::os::fd::BorrowedFd;

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::pkey::{pkey_alloc, pkey_free, pkey_mprotect};
use mpkvirt_sys::{AccessRights, Error as SysError, Pkey, Pkru, Pku};

use super::arena::Arenas;
use super::sealed::BackendOps;
use super::{BackendKind, RawFault, ThreadRegs};
use crate::error::{Error, Result};
use crate::fault;

/// Real PKU: keys from `pkey_alloc`, tags with `pkey_mprotect`, rights with WRPKRU.
#[derive(Debug)]
pub struct Hardware {
    pku: Pku,
    keys: Vec<Pkey>,
    arenas: Arenas,
    /// Set when a thread may still be granted a key: the keys are then never freed.
    keys_retired: std::sync::atomic::AtomicBool,
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
            arenas: Arenas::default(),
            keys_retired: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl Drop for Hardware {
    fn drop(&mut self) {
        // Pages first, keys after: a key freed while pages still carry it would hand those
        // pages to the next owner of the key number.
        drop(std::mem::take(&mut self.arenas));
        if self.keys_retired.load(std::sync::atomic::Ordering::Relaxed) {
            return;
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
        self.arenas.reserve(len)
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

    fn retire_keys(&self) {
        self.keys_retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn map_fd(&self, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<()> {
        self.arenas.map_file(addr, len, fd, offset)
    }

    #[inline]
    fn read_pkru(&self, _regs: &ThreadRegs) -> Pkru {
        self.pku.rdpkru()
    }

    #[inline]
    fn write_pkru(&self, regs: &mut ThreadRegs, new: Pkru) {
        regs.gate_slot = new.bits();
        // SAFETY: `self.pku` proves OSPKE (the gate's WRPKRU is legal). `regs` is the calling
        // thread's own (its context, or a local during thread exit), so no other thread writes
        // the slot during the gate, and it is key-0 memory, readable under every value the
        // manager writes (it never restricts key 0). The manager grants only keys this thread
        // has pinned, and revokes before unpinning (see `keycache.rs`).
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
        self.arenas.contains(addr, len)
    }
}
