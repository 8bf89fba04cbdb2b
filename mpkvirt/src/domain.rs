//! Domains: named page ranges whose accessibility the manager controls.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use mpkvirt_sys::mman::Prot;

use crate::backend::Backend;
use crate::error::Result;
use crate::manager::ops;
use crate::manager::shared::{DomRef, MgrRef};
use crate::manager::{Manager, Rights};

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

/// A virtual protection domain: a reserved, contiguous page range plus an allocator for it.
///
/// Its memory is reachable only inside a view that grants the domain (see
/// [`Manager::enter`]); pointers returned by [`Domain::alloc`] are raw on purpose. Dropping
/// the handle destroys the domain: its pages are discarded and its key (if it holds one) is
/// freed for other domains. The handle holds the domain's name; its state lives inside the
/// library.
pub struct Domain<B: Backend = crate::Machine> {
    mgr: Manager<B>,
    d: DomRef,
    base: usize,
    len: usize,
}

impl<B: Backend> fmt::Debug for Domain<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Domain")
            .field("id", &self.id())
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .finish()
    }
}

impl<B: Backend> Domain<B> {
    pub(crate) fn from_parts(mgr: Manager<B>, d: DomRef, base: usize, len: usize) -> Domain<B> {
        Domain { mgr, d, base, len }
    }

    pub(crate) fn dref(&self) -> DomRef {
        self.d
    }

    pub(crate) fn manager_ref(&self) -> MgrRef {
        self.mgr.mref()
    }

    /// The manager the domain belongs to.
    pub fn manager(&self) -> &Manager<B> {
        &self.mgr
    }

    /// The domain's id.
    pub fn id(&self) -> DomainId {
        DomainId(self.d.uid)
    }

    /// Start of the domain's reservation.
    pub fn base(&self) -> NonNull<u8> {
        NonNull::new(self.base as *mut u8).expect("reservations are never at address 0")
    }

    /// Size of the domain's reservation in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a domain reserves at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `addr` lies inside the domain's reservation.
    pub fn contains(&self, addr: usize) -> bool {
        addr.checked_sub(self.base)
            .is_some_and(|off| off < self.len)
    }

    fn info(&self) -> (Option<mpkvirt_sys::Pkey>, Prot) {
        self.mgr
            .dom_op(ops::D_INFO, self.d, 0, 0, 0)
            .unwrap_or((None, Prot::NONE))
    }

    /// Whether the domain currently holds a hardware key.
    pub fn is_resident(&self) -> bool {
        self.info().0.is_some()
    }

    /// The key the domain holds right now, if resident (it can change as soon as no view
    /// pins it; for diagnostics and tests).
    pub fn key(&self) -> Option<mpkvirt_sys::Pkey> {
        self.info().0
    }

    /// The domain's process-wide page protection.
    pub fn prot(&self) -> Prot {
        self.info().1
    }

    fn ptr(addr: usize) -> NonNull<u8> {
        NonNull::new(addr as *mut u8).expect("inside a reservation")
    }

    /// Allocates `size` bytes aligned to `align` inside the domain, reachable only inside
    /// views granting the domain. Memory never used before reads as zero (see
    /// [`Domain::free`] for reused memory).
    ///
    /// # Errors
    ///
    /// [`crate::Error::OutOfMemory`] when the reservation is full (or `size` can never fit),
    /// [`crate::Error::BadAlignment`].
    pub fn alloc(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.mgr
            .dom_op(ops::D_ALLOC, self.d, size as u64, align as u64, 0)
            .map(Self::ptr)
    }

    /// Allocates `n` whole pages inside the domain.
    ///
    /// # Errors
    ///
    /// [`crate::Error::OutOfMemory`] when the reservation is full.
    pub fn alloc_pages(&self, n: usize) -> Result<NonNull<u8>> {
        self.mgr
            .dom_op(ops::D_ALLOC_PAGES, self.d, n as u64, 0, 0)
            .map(Self::ptr)
    }

    /// Frees an allocation made by [`Domain::alloc`], [`Domain::alloc_pages`] or
    /// [`Domain::map_fd`]; returns its size. Page runs (allocations of a page or more, and file
    /// mappings) are given back to the system and read as zero when reused; small blocks keep
    /// their contents until reused, as with `malloc`. Safe to call from several threads.
    ///
    /// # Errors
    ///
    /// [`crate::Error::NotAllocated`] for any other pointer (double frees included).
    pub fn free(&self, ptr: NonNull<u8>) -> Result<usize> {
        self.mgr
            .dom_op(ops::D_FREE, self.d, ptr.as_ptr() as u64, 0, 0)
    }

    /// Bytes allocated in the domain.
    pub fn in_use(&self) -> usize {
        self.mgr.dom_op(ops::D_IN_USE, self.d, 0, 0, 0).unwrap_or(0)
    }

    /// Changes the domain's page protection for every thread: one `pkey_mprotect` when
    /// resident, applied at the next bind otherwise. Views still decide which threads reach
    /// the pages; the protection bounds what they may do.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Retag`] when the kernel refuses.
    pub fn protect(&self, prot: Prot) -> Result<()> {
        self.mgr
            .dom_op(ops::D_PROTECT, self.d, prot.bits() as u64, 0, 0)
    }

    /// Gives every thread of the process `rights` to the domain without entering a view
    /// (`None` takes them back): libmpk's `mpk_mprotect` mode. When this returns, every
    /// thread has the new rights — threads that never called mpkvirt included, and threads
    /// created later. A thread's rights are the union of its own view's and these; views keep
    /// their thread-local meaning.
    ///
    /// The domain holds its key while it has process-wide rights (no view can evict it). On
    /// PKU hardware every thread's PKRU changes: each thread is sent a signal (`SIGRTMIN + 7`,
    /// or `MPKVIRT_SYNC_SIGNAL`) and updates its own; on the emulated backend this is one
    /// `mprotect`. See `manager/global.rs` for the protocol and its limits.
    ///
    /// # Errors
    ///
    /// [`crate::Error::KeysBusy`] when every key is pinned by views (for a grant),
    /// [`crate::Error::ThreadsNotSynced`] when some thread did not take the change in time
    /// (it blocks the signal): every other thread has it, and a key whose revocation a thread
    /// missed is never handed to another domain.
    pub fn set_process_wide(&self, rights: Option<Rights>) -> Result<()> {
        let code = match rights {
            None => 0,
            Some(Rights::ReadOnly) => 1,
            Some(Rights::ReadWrite) => 2,
        };
        self.mgr.dom_op(ops::D_PROCESS_WIDE, self.d, code, 0, 0)
    }

    /// Discards the domain's contents and allocations: fresh zero pages, an empty heap. The
    /// key (if resident) is applied again, because discarding parks the range (no access,
    /// key 0) — and mapping over a range, which it does for file mappings, resets the key to
    /// 0 too (invariant 6).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Retag`] when the kernel refuses.
    pub fn reset(&self) -> Result<()> {
        self.mgr.dom_op(ops::D_RESET, self.d, 0, 0, 0)
    }

    /// Maps `len` bytes of `fd` from `offset` (page-aligned) privately, copy-on-write, at a
    /// fresh page run of the domain, and re-applies the domain's key (mmap resets it to 0).
    /// Writes through the mapping stay private to the process.
    ///
    /// # Errors
    ///
    /// [`crate::Error::OutOfMemory`] when the reservation has no room, [`crate::Error::Remap`] when the
    /// kernel refuses the mapping.
    pub fn map_fd(&self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<NonNull<u8>> {
        self.mgr
            .dom_op(
                ops::D_MAP_FD,
                self.d,
                fd.as_raw_fd() as u64,
                offset,
                len as u64,
            )
            .map(Self::ptr)
    }
}

impl<B: Backend> Drop for Domain<B> {
    fn drop(&mut self) {
        let _ = self.mgr.dom_op::<()>(ops::D_DESTROY, self.d, 0, 0, 0);
    }
}
