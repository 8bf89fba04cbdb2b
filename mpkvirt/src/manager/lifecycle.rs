//! Domains over their lives, inside the library: creation (address space carved from the
//! manager's arenas in O(log n)), allocation inside a domain, protection, reset, file
//! mappings, and destruction.
//!
//! Lock order: a domain's heap, then the manager's lock. Never the other way round.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::{Errno, Error as SysError, Op as SysOp};

use crate::alloc::{AllocError, DomainHeap};
use crate::backend::Backend;
use crate::backend::sealed::LiveOps;
use crate::domain::DomainId;
use crate::error::{Error, Result};
use crate::fault;
use crate::meta::{MBox, Meta, lock, lock_rw, read_rw, root};
use crate::policy::Policy;

use super::binding::{self, Released};
use super::shared::{DomRef, DomainRec, Inner, Shared};

/// What a new domain is, for its handle.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DomInfo {
    pub(crate) d: DomRef,
    pub(crate) base: usize,
    pub(crate) len: usize,
}

fn no_memory(len: usize) -> Error {
    Error::Reserve {
        len,
        source: SysError::Sys {
            op: SysOp::Mmap,
            errno: Errno(libc::ENOMEM),
        },
    }
}

/// Creates a domain reserving `reserve` bytes (the default when `None`) with protection
/// `prot`.
pub(crate) fn create<B: Backend>(
    sh: &Shared<B>,
    reserve: Option<usize>,
    prot: Prot,
) -> Result<DomInfo> {
    let want = reserve.unwrap_or(sh.config.default_reserve).max(1);
    // A domain's length must be a page multiple that fits the address space: reject what
    // cannot be (`usize::MAX` would round to 0 and alias the next domain).
    let len = want
        .checked_next_multiple_of(mman::page_size())
        .filter(|&l| l <= isize::MAX as usize)
        .ok_or_else(|| no_memory(want))?;
    let page = mman::page_size();
    let mut inner = lock(&sh.inner);
    let idx = match inner.free_records.pop() {
        Some(i) => i,
        None => sh
            .domains
            .push()
            .ok_or(Error::Unsupported("more than 2^32 domain records"))?,
    };
    let rec = sh.domains.get(idx).expect("a record just handed out");
    let (base, arena) = match carve(sh, &mut inner, len) {
        Ok(v) => v,
        Err(e) => {
            let _ = inner.free_records.try_reserve(1);
            inner.free_records.push(idx);
            return Err(e);
        }
    };
    rec.base.store(base, Ordering::Relaxed);
    rec.len.store(len, Ordering::Relaxed);
    rec.arena.store(arena, Ordering::Relaxed);
    rec.slot.set(None);
    rec.prot.store(prot.bits() as u32, Ordering::Relaxed);
    rec.mapped_files.store(false, Ordering::Relaxed);
    *lock(&rec.heap) = Some(MBox::new_in(DomainHeap::new_in(len, page, Meta), Meta));
    let uid = root().next_uid();
    rec.uid.store(uid, Ordering::Release);
    inner.stats.created += 1;
    inner.stats.domains += 1;
    drop(inner);
    let d = DomRef { idx, uid };
    if lock_rw(&sh.ranges).try_insert(base, len, uid).is_err() {
        destroy(sh, d);
        return Err(Error::Unsupported(
            "recording a domain (metadata exhausted)",
        ));
    }
    Ok(DomInfo { d, base, len })
}

/// First fit from the parked free ranges (O(log n)), else a fresh reservation of at least
/// `arena_chunk` bytes, whose rest becomes free ranges of its own arena.
fn carve<B: Backend>(sh: &Shared<B>, inner: &mut Inner, len: usize) -> Result<(usize, u32)> {
    if let Some(found) = inner.free.take_first_fit(len) {
        return Ok(found);
    }
    let chunk = len.max(sh.config.arena_chunk);
    let start = sh.live.reserve(chunk)?;
    let arena = inner.next_arena;
    inner.next_arena = inner.next_arena.wrapping_add(1);
    if chunk > len {
        // The rest of the reservation: a failure to record it only loses that space.
        let _ = inner.free.try_give_back(start + len, chunk - len, arena);
    }
    Ok((start, arena))
}

/// Destroys domain `d`: its key is taken back (or retired while a view still pins it, bound
/// to nobody), its pages parked and emptied, its range given back, its record freed. A name
/// that is not a live domain is ignored.
pub(crate) fn destroy<B: Backend>(sh: &Shared<B>, d: DomRef) {
    let Some(rec) = sh.domain(d) else {
        return;
    };
    let (base, len) = (rec.base(), rec.len());
    lock_rw(&sh.ranges).remove(base);
    let mut heap = lock(&rec.heap);
    let mut inner = lock(&sh.inner);
    if rec.uid() != d.uid {
        return; // destroyed meanwhile (a forged second handle)
    }
    inner.stats.domains -= 1;
    let released = binding::release_key(sh, &mut inner, d, rec);
    if let Released::Retired(s) = released {
        fault::log_fmt(format_args!(
            "mpkvirt: domain {} destroyed while a view still pins its key {}; the key is retired until unpinned\n",
            DomainId(d.uid),
            sh.key(s),
        ));
    }
    if let Released::Dead(s) = released {
        fault::log_fmt(format_args!(
            "mpkvirt: domain {} destroyed while threads may hold process-wide rights to its key {}; the key is retired for good\n",
            DomainId(d.uid),
            sh.key(s),
        ));
    }
    if let Released::Freed(s) | Released::Retired(s) | Released::Dead(s) = released
        && let Err(e) = sh.live.tag(base, len, rec.prot(), None)
    {
        // The pages still carry the key: it can never be handed to anyone again.
        sh.slots[s].set_owner(crate::keycache::DEAD);
        fault::log_error(
            "mpkvirt: cannot park a destroyed domain; its key is retired for good: ",
            &e,
        );
    }
    inner.policy.forget(d.uid);
    // Park and empty the pages before the range can go to another domain.
    match sh
        .live
        .discard(base, len, rec.mapped_files.load(Ordering::Relaxed))
    {
        Ok(()) => {
            // A failure to record the range only loses that address space.
            let _ = inner
                .free
                .try_give_back(base, len, rec.arena.load(Ordering::Relaxed));
        }
        Err(e) => fault::log_error(
            "mpkvirt: cannot discard a destroyed domain; its address range is retired: ",
            &e,
        ),
    }
    *heap = None;
    rec.uid.store(0, Ordering::Release);
    let _ = inner.free_records.try_reserve(1);
    inner.free_records.push(d.idx);
}

fn heap_err(d: DomRef, base: usize, e: AllocError) -> Error {
    match e {
        AllocError::OutOfMemory { requested } => Error::OutOfMemory {
            domain: DomainId(d.uid),
            requested,
        },
        AllocError::BadAlignment(a) => Error::BadAlignment(a),
        AllocError::NotAllocated(off) => Error::NotAllocated {
            domain: DomainId(d.uid),
            addr: base + off,
        },
    }
}

fn record<B: Backend>(sh: &Shared<B>, d: DomRef) -> Result<&DomainRec> {
    sh.domain(d).ok_or(Error::ForeignDomain(DomainId(d.uid)))
}

/// Allocates `size` bytes aligned to `align` in `d`; returns the address.
pub(crate) fn alloc<B: Backend>(
    sh: &Shared<B>,
    d: DomRef,
    size: usize,
    align: usize,
) -> Result<usize> {
    let rec = record(sh, d)?;
    let mut heap = lock(&rec.heap);
    let h = heap.as_mut().ok_or(Error::ForeignDomain(DomainId(d.uid)))?;
    let off = h
        .alloc(size, align, rec.base())
        .map_err(|e| heap_err(d, rec.base(), e))?;
    debug_assert!(
        off.saturating_add(size) <= rec.len(),
        "inside the reservation"
    );
    Ok(rec.base() + off)
}

/// Allocates `n` pages in `d`; returns the address.
pub(crate) fn alloc_pages<B: Backend>(sh: &Shared<B>, d: DomRef, n: usize) -> Result<usize> {
    let rec = record(sh, d)?;
    let mut heap = lock(&rec.heap);
    let h = heap.as_mut().ok_or(Error::ForeignDomain(DomainId(d.uid)))?;
    let off = h.alloc_pages(n).map_err(|e| heap_err(d, rec.base(), e))?;
    Ok(rec.base() + off)
}

/// Frees the allocation at `addr` of `d`; returns its size. A page run is emptied *before*
/// it goes back to the heap, with the heap held, so no concurrent allocation can receive it
/// and then lose what it wrote to a late emptying.
pub(crate) fn free<B: Backend>(sh: &Shared<B>, d: DomRef, addr: usize) -> Result<usize> {
    let rec = record(sh, d)?;
    let base = rec.base();
    let not_allocated = Error::NotAllocated {
        domain: DomainId(d.uid),
        addr,
    };
    if !(base..base + rec.len()).contains(&addr) {
        return Err(not_allocated);
    }
    let mut heap = lock(&rec.heap);
    let h = heap.as_mut().ok_or(Error::ForeignDomain(DomainId(d.uid)))?;
    let freed = h
        .free_begin(addr - base)
        .map_err(|e| heap_err(d, base, e))?;
    if let Some((start, len)) = freed.run {
        zero_run(sh, rec, base + start, len)?;
        h.release_run(start, len);
    }
    Ok(freed.size)
}

/// Gives a freed page run of `rec` zero pages again (and its memory back to the system).
fn zero_run<B: Backend>(sh: &Shared<B>, rec: &DomainRec, addr: usize, len: usize) -> Result<()> {
    let files = rec.mapped_files.load(Ordering::Relaxed);
    if !files {
        return sh.live.zero(addr, len, false);
    }
    let _inner = lock(&sh.inner);
    sh.live.zero(addr, len, true)?;
    retag_whole(sh, rec)
}

/// Bytes allocated in `d`.
pub(crate) fn in_use<B: Backend>(sh: &Shared<B>, d: DomRef) -> Result<usize> {
    let rec = record(sh, d)?;
    Ok(lock(&rec.heap).as_ref().map_or(0, |h| h.in_use()))
}

/// Changes `d`'s page protection: one `pkey_mprotect` when resident, applied at the next bind
/// otherwise.
pub(crate) fn protect<B: Backend>(sh: &Shared<B>, d: DomRef, prot: Prot) -> Result<()> {
    let rec = record(sh, d)?;
    let _inner = lock(&sh.inner);
    let old = rec.prot.swap(prot.bits() as u32, Ordering::Relaxed);
    if let Some(s) = rec.slot.get()
        && let Err(e) = sh.live.tag(rec.base(), rec.len(), prot, Some(sh.key(s)))
    {
        rec.prot.store(old, Ordering::Relaxed);
        return Err(e);
    }
    Ok(())
}

/// Discards `d`'s contents and allocations and applies its binding again.
pub(crate) fn reset<B: Backend>(sh: &Shared<B>, d: DomRef) -> Result<()> {
    let rec = record(sh, d)?;
    let mut heap = lock(&rec.heap);
    let _inner = lock(&sh.inner);
    *heap = Some(MBox::new_in(
        DomainHeap::new_in(rec.len(), mman::page_size(), Meta),
        Meta,
    ));
    let files = rec.mapped_files.swap(false, Ordering::Relaxed);
    sh.live.discard(rec.base(), rec.len(), files)?;
    // Discarding parked the range (no access, key 0): apply the binding again.
    retag_whole(sh, rec)
}

/// Maps `len` bytes of `fd` from `offset` at a fresh page run of `d` and applies the domain's
/// key again (mmap resets it to 0).
pub(crate) fn map_fd<B: Backend>(
    sh: &Shared<B>,
    d: DomRef,
    fd: i32,
    offset: u64,
    len: usize,
) -> Result<usize> {
    if fd < 0 {
        return Err(Error::Remap {
            addr: 0,
            len,
            source: SysError::Sys {
                op: SysOp::Mmap,
                errno: Errno(libc::EBADF),
            },
        });
    }
    let rec = record(sh, d)?;
    let page = mman::page_size();
    let pages = len
        .max(1)
        .checked_next_multiple_of(page)
        .ok_or(Error::OutOfMemory {
            domain: DomainId(d.uid),
            requested: len,
        })?
        / page;
    let mut heap = lock(&rec.heap);
    let h = heap.as_mut().ok_or(Error::ForeignDomain(DomainId(d.uid)))?;
    let off = h
        .alloc_pages(pages)
        .map_err(|e| heap_err(d, rec.base(), e))?;
    let addr = rec.base() + off;
    let inner = lock(&sh.inner);
    rec.mapped_files.store(true, Ordering::Relaxed);
    let mapped = borrow_fd(fd, |fd| sh.live.map_fd(addr, pages * page, fd, offset))
        .and_then(|()| retag_whole(sh, rec));
    drop(inner);
    if let Err(e) = mapped {
        // The run may hold part of the mapping: replace it before giving it back.
        if let Ok(freed) = h.free_begin(off)
            && let Some((start, len)) = freed.run
            && zero_run(sh, rec, rec.base() + start, len).is_ok()
        {
            h.release_run(start, len);
        }
        return Err(e);
    }
    Ok(addr)
}

fn borrow_fd<R>(fd: i32, f: impl FnOnce(BorrowedFd<'_>) -> R) -> R {
    crate::fault::with_borrowed_fd(fd, f)
}

/// Applies the domain's binding to its whole range again after part of it was mapped over
/// (the new pages have no access and key 0). Call with the manager's lock held.
fn retag_whole<B: Backend>(sh: &Shared<B>, rec: &DomainRec) -> Result<()> {
    match rec.slot.get() {
        Some(s) => sh
            .live
            .tag(rec.base(), rec.len(), rec.prot(), Some(sh.key(s))),
        None => Ok(()),
    }
}

/// The live domain whose reservation contains `addr`.
pub(crate) fn domain_at<B: Backend>(sh: &Shared<B>, addr: usize) -> Option<DomainId> {
    let (start, len, uid) = read_rw(&sh.ranges).floor(addr)?;
    (addr - start < len).then_some(DomainId(uid))
}
