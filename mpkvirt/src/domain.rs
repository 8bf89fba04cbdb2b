//! Domains: named page ranges whose accessibility the manager controls.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use mpkvirt_sys::mman::{self, Prot};
use parking_lot::Mutex;

use crate::alloc::{AllocError, DomainHeap};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::keycache::SlotRef;
use crate::manager::Manager;

/// A domain's identity: unique for the life of the process, never reused, so a stale id
/// cannot name a later domain (libmpk's "protection-key use-after-free" cannot recur at the
/// level of ids either).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DomainId(pub(crate) u64);

impl DomainId {
    /// The number behind the id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// How a domain is created.
#[derive(Clone, Copy, Debug)]
pub struct DomainOptions {
    /// Bytes of address space reserved for the domain (rounded up to pages). The domain's
    /// allocations and mappings live inside it; it never moves.
    pub reserve: Option<usize>,
    /// Page protection of the domain's memory, process-wide (default read-write).
    pub prot: Prot,
}

impl Default for DomainOptions {
    fn default() -> DomainOptions {
        DomainOptions {
            reserve: None,
            prot: Prot::READ_WRITE,
        }
    }
}

impl DomainOptions {
    /// Options reserving `bytes`.
    pub fn reserve(bytes: usize) -> DomainOptions {
        DomainOptions {
            reserve: Some(bytes),
            ..DomainOptions::default()
        }
    }
}

/// Shared state of a domain, reachable from its handle and from the key cache.
#[derive(Debug)]
pub(crate) struct DomainInner {
    pub(crate) id: DomainId,
    pub(crate) base: usize,
    pub(crate) len: usize,
    /// The key slot the domain holds, if resident. Written under the manager's lock.
    pub(crate) slot: SlotRef,
    /// Process-wide page protection. Written under the manager's lock.
    pub(crate) prot: Mutex<Prot>,
    pub(crate) heap: Mutex<DomainHeap>,
    /// Whether files were mapped into the range (a discard must then replace mappings).
    pub(crate) mapped_files: std::sync::atomic::AtomicBool,
}

/// A virtual protection domain: a reserved, contiguous page range plus an allocator for it.
///
/// Its memory is reachable only inside a view that grants the domain (see
/// [`Manager::enter`]); pointers returned by [`Domain::alloc`] are raw on purpose. Dropping
/// the handle destroys the domain: its pages are discarded and its key (if it holds one) is
/// freed for other domains.
pub struct Domain<B: Backend = crate::Machine> {
    pub(crate) inner: Arc<DomainInner>,
    pub(crate) mgr: Manager<B>,
}

impl<B: Backend> fmt::Debug for Domain<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Domain")
            .field("id", &self.inner.id)
            .field("base", &format_args!("{:#x}", self.inner.base))
            .field("len", &self.inner.len)
            .finish()
    }
}

impl<B: Backend> Domain<B> {
    /// The domain's id.
    pub fn id(&self) -> DomainId {
        self.inner.id
    }

    /// Start of the domain's reservation.
    pub fn base(&self) -> NonNull<u8> {
        NonNull::new(self.inner.base as *mut u8).expect("reservations are never at address 0")
    }

    /// Size of the domain's reservation in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Always `false`: a domain reserves at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `addr` lies inside the domain's reservation.
    pub fn contains(&self, addr: usize) -> bool {
        (self.inner.base..self.inner.base + self.inner.len).contains(&addr)
    }

    /// Whether the domain currently holds a hardware key.
    pub fn is_resident(&self) -> bool {
        self.inner.slot.get().is_some()
    }

    /// The key the domain holds right now, if resident (it can change as soon as no view
    /// pins it; for diagnostics and tests).
    pub fn key(&self) -> Option<mpkvirt_sys::Pkey> {
        self.inner.slot.get().map(|s| self.mgr.key_of_slot(s))
    }

    /// The domain's process-wide page protection.
    pub fn prot(&self) -> Prot {
        *self.inner.prot.lock()
    }

    fn heap_err(&self, e: AllocError) -> Error {
        match e {
            AllocError::OutOfMemory { requested } => Error::OutOfMemory {
                domain: self.id(),
                requested,
            },
            AllocError::BadAlignment(a) => Error::BadAlignment(a),
            AllocError::NotAllocated(off) => Error::NotAllocated {
                domain: self.id(),
                addr: self.inner.base + off,
            },
        }
    }

    /// Allocates `size` bytes aligned to `align` inside the domain, reachable only inside
    /// views granting the domain. Memory never used before reads as zero (see
    /// [`Domain::free`] for reused memory).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfMemory`] when the reservation is full, [`Error::BadAlignment`].
    pub fn alloc(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let off = self
            .inner
            .heap
            .lock()
            .alloc(size, align)
            .map_err(|e| self.heap_err(e))?;
        Ok(self.ptr(off))
    }

    /// Allocates `n` whole pages inside the domain.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfMemory`] when the reservation is full.
    pub fn alloc_pages(&self, n: usize) -> Result<NonNull<u8>> {
        let off = self
            .inner
            .heap
            .lock()
            .alloc_pages(n)
            .map_err(|e| self.heap_err(e))?;
        Ok(self.ptr(off))
    }

    /// Frees an allocation made by [`Domain::alloc`], [`Domain::alloc_pages`] or
    /// [`Domain::map_fd`]; returns its size. Page runs (allocations of a page or more, and file
    /// mappings) are given back to the system and read as zero when reused; small blocks keep
    /// their contents until reused, as with `malloc`.
    ///
    /// # Errors
    ///
    /// [`Error::NotAllocated`] for any other pointer (double frees included).
    pub fn free(&self, ptr: NonNull<u8>) -> Result<usize> {
        let addr = ptr.as_ptr() as usize;
        if !self.contains(addr) {
            return Err(Error::NotAllocated {
                domain: self.id(),
                addr,
            });
        }
        let freed = self
            .inner
            .heap
            .lock()
            .free(addr - self.inner.base)
            .map_err(|e| self.heap_err(e))?;
        if let Some((start, len)) = freed.run {
            self.mgr.zero_run(self, self.inner.base + start, len)?;
        }
        Ok(freed.size)
    }

    /// Bytes allocated in the domain.
    pub fn in_use(&self) -> usize {
        self.inner.heap.lock().in_use()
    }

    fn ptr(&self, off: usize) -> NonNull<u8> {
        NonNull::new((self.inner.base + off) as *mut u8).expect("inside the reservation")
    }

    /// Changes the domain's page protection for every thread (libmpk's `mpk_mprotect`): one
    /// `pkey_mprotect` when resident, applied at the next bind otherwise. Views still decide
    /// which threads reach the pages; the protection bounds what they may do.
    ///
    /// # Errors
    ///
    /// [`Error::Retag`] when the kernel refuses.
    pub fn protect(&self, prot: Prot) -> Result<()> {
        self.mgr.protect(self, prot)
    }

    /// Discards the domain's contents and allocations: fresh zero pages, an empty heap. The
    /// key (if resident) is applied again, because discarding parks the range (no access,
    /// key 0) — and mapping over a range, which it does for file mappings, resets the key to
    /// 0 too (invariant 6).
    ///
    /// # Errors
    ///
    /// [`Error::Retag`] when the kernel refuses.
    pub fn reset(&self) -> Result<()> {
        self.mgr.reset(self)
    }

    /// Maps `len` bytes of `fd` from `offset` (page-aligned) privately, copy-on-write, at a
    /// fresh page run of the domain, and re-applies the domain's key (mmap resets it to 0).
    /// Writes through the mapping stay private to the process.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfMemory`] when the reservation has no room, [`Error::Retag`] when the
    /// kernel refuses the mapping.
    pub fn map_fd(&self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<NonNull<u8>> {
        let pages = mman::page_round_up(len.max(1)) / mman::page_size();
        let ptr = self.alloc_pages(pages)?;
        if let Err(e) = self.mgr.map_fd(
            self,
            ptr.as_ptr() as usize,
            pages * mman::page_size(),
            fd,
            offset,
        ) {
            let _ = self.free(ptr);
            return Err(e);
        }
        Ok(ptr)
    }
}

impl<B: Backend> Drop for Domain<B> {
    fn drop(&mut self) {
        self.mgr.destroy(&self.inner);
    }
}
