//! The address space the real backends hand out: reservations and the ways of mapping over
//! them, shared by the hardware and emulated backends.
//!
//! # Safety
//!
//! Every operation acts only on a range inside a reservation made here (checked first), and
//! mpkvirt hands out only raw pointers into reservations, never Rust references, so no
//! reference can observe the change. Dropping [`Arenas`] unmaps the reservations; the
//! backend owning it is dropped only after every domain in them is gone (domains keep their
//! manager, and so its backend, alive).
#![allow(
    unsafe_code,
    reason = "mmap, madvise and munmap over the backend's own reservations"
)]

use std::os::fd::BorrowedFd;

use mpkvirt_sys::Error as SysError;
use mpkvirt_sys::mman::{self, Prot};

use super::Reservations;
use crate::error::{Error, Result};
use crate::fault;

/// Reservations of a real backend, registered with the fault handler as domain memory.
#[derive(Debug, Default)]
pub(crate) struct Arenas(Reservations);

fn remap_error(addr: usize, len: usize) -> impl FnOnce(SysError) -> Error {
    move |source| Error::Remap { addr, len, source }
}

impl Arenas {
    /// Reserves `len` bytes: inaccessible, key 0, primed to stay mergeable
    /// ([`mman::reserve_mergeable`]).
    pub(crate) fn reserve(&self, len: usize) -> Result<usize> {
        let start =
            mman::reserve_mergeable(len).map_err(|source| Error::Reserve { len, source })? as usize;
        self.0.add(start, len);
        fault::register_arena(start, len);
        Ok(start)
    }

    /// Whether `[addr, addr + len)` lies in one reservation.
    pub(crate) fn contains(&self, addr: usize, len: usize) -> bool {
        self.0.contains(addr, len)
    }

    /// Panics unless `[addr, addr + len)` lies in one reservation (a manager bug otherwise).
    pub(crate) fn check(&self, addr: usize, len: usize) {
        assert!(
            self.contains(addr, len),
            "range {addr:#x}+{len:#x} is not a reservation of this backend"
        );
    }

    /// Discards the contents of an anonymous range in place (`MADV_DONTNEED`): it reads as
    /// zero afterwards and keeps its mapping (and so its mergeability), protection and key.
    pub(crate) fn empty(&self, addr: usize, len: usize) -> Result<()> {
        self.check(addr, len);
        // SAFETY: the range is inside a reservation (checked); its contents are given up on
        // purpose (the domain is destroyed or reset).
        unsafe { mman::madvise_dontneed(addr as *mut u8, len) }.map_err(remap_error(addr, len))
    }

    /// Replaces a range (file mappings included) with fresh anonymous pages, inaccessible and
    /// with key 0.
    pub(crate) fn replace(&self, addr: usize, len: usize) -> Result<()> {
        self.check(addr, len);
        // SAFETY: as for `empty`; the new pages have no access at all.
        unsafe { mman::map_fixed_anonymous(addr as *mut u8, len, Prot::NONE) }
            .map_err(remap_error(addr, len))
    }

    /// Maps `len` bytes of `fd` from `offset` privately (copy-on-write) over a range,
    /// inaccessible and with key 0; the caller tags it as the domain it belongs to.
    pub(crate) fn map_file(
        &self,
        addr: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<()> {
        self.check(addr, len);
        // SAFETY: as for `empty`. The mapping is private, so later changes of the file do not
        // show through pages already copied.
        unsafe { mman::map_fixed_fd(addr as *mut u8, len, Prot::NONE, false, fd, offset) }
            .map_err(remap_error(addr, len))
    }
}

impl Drop for Arenas {
    fn drop(&mut self) {
        for (start, len) in self.0.take() {
            fault::unregister_arena(start);
            // SAFETY: the reservation was made here and every domain in it is gone (see the
            // module docs); nothing refers to it any more.
            let _ = unsafe { mman::munmap(start as *mut u8, len) };
        }
    }
}
