//! The address space the real backends hand out: reservations and the ways of mapping over
//! them, shared by the hardware and emulated backends; and the process-wide *arena map* the
//! fault handler asks "is this domain memory?".
//!
//! Reservations are kept in library memory (a treap by start address: `owns` is
//! O(log n)). Each is aligned to and a multiple of [`GRANULE`] (2 MiB), so that the arena map
//! — one bit per granule of the 47-bit user address space, 8 MiB of lazily touched address
//! space — can say in O(1), without locks and from a signal handler, whether an address lies
//! in some arena, however many there are.
//!
//! The map exists twice. Library code reads and writes its own copy in the metadata region,
//! found through the root (library memory): argument checks (`ops`) trust it. The fault
//! handler runs with the kernel's initial PKRU, which cannot read library memory, so it reads
//! a copy in application memory, found through the `ARENA_MAP` static; library code writes
//! that copy only through the pointer the root keeps, so a stray write to the static or to
//! the copy can mislead the handler of a faulting thread but never redirects a write of the
//! library (`meta.rs`: no state reached through application memory).
//!
//! # Safety
//!
//! Every operation acts only on a range inside a reservation made here (checked first), and
//! mpkvirt hands out only raw pointers into reservations, never Rust references, so no
//! reference can observe the change. Dropping [`Arenas`] unmaps the reservations; the live
//! backend owning it is dropped only after every domain in them is gone. The arena maps are a
//! block of the region and a private anonymous mapping, each made once and never freed;
//! their words are atomics.
#![allow(
    unsafe_code,
    reason = "mmap, madvise and munmap over the backend's own reservations; the arena map"
)]

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::RwLock;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use allocator_api2::alloc::{Allocator, Layout};
use mpkvirt_sys::Error as SysError;
use mpkvirt_sys::mman::{self, Prot};

use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::treap::Treap;

/// Alignment and size unit of reservations (and of the arena map's bits).
pub(crate) const GRANULE: usize = 2 << 20;
const GRANULE_SHIFT: u32 = GRANULE.trailing_zeros();
/// User address space covered by the arena map (x86-64, 4-level paging).
const USER_SPACE: usize = 1 << 47;
const MAP_WORDS: usize = USER_SPACE / GRANULE / 64;
/// End of the user address space the library accepts argument addresses in.
pub(crate) const USER_END: usize = USER_SPACE;

/// The fault handler's pointer to its copy of the map (application memory: the handler runs
/// with the kernel's initial PKRU, which cannot read library memory). Only the handler reads
/// it; library code never uses it — it writes the handler's copy through the pointer kept in
/// the root (`meta::Root::arena_shadow`), so a stray write here misleads at most the
/// handler of a faulting thread, never a write of the library.
static ARENA_MAP: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());

const MAP_BYTES: usize = MAP_WORDS * 8;

/// The library's map (in the region) and the handler's copy, made on first use. Library
/// code only (inside an op): both pointers come from the root, in library memory.
fn maps() -> Option<(&'static [AtomicU64], &'static [AtomicU64])> {
    let r = crate::meta::root();
    let mut lib = r.arena_map.load(Ordering::Acquire);
    if lib.is_null() {
        let layout = Layout::from_size_align(MAP_BYTES, 8).ok()?;
        // A block of 64 KiB or more is fresh from the region or was given back with
        // `MADV_DONTNEED` when freed: it reads as zero (see `meta`) but for its first word,
        // the free-list link of a reused block. Untouched pages cost nothing.
        let fresh = Meta.allocate(layout).ok()?.cast::<AtomicU64>().as_ptr();
        // SAFETY: the block was just allocated for us, 8-aligned and MAP_BYTES long.
        unsafe { fresh.write(AtomicU64::new(0)) };
        match r.arena_map.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => lib = fresh,
            Err(winner) => {
                // SAFETY: `fresh` was just allocated with `layout` by this call and lost the
                // race: no one else has seen it.
                unsafe { Meta.deallocate(NonNull::new(fresh.cast())?, layout) };
                lib = winner;
            }
        }
    }
    let mut shadow = r.arena_shadow.load(Ordering::Acquire);
    if shadow.is_null() {
        let fresh = mman::reserve(MAP_BYTES, Prot::READ_WRITE)
            .ok()?
            .cast::<AtomicU64>();
        match r.arena_shadow.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => shadow = fresh,
            Err(winner) => {
                // SAFETY: `fresh` was just mapped by this call and lost the race: no one else
                // has seen it.
                let _ = unsafe { mman::munmap(fresh.cast(), MAP_BYTES) };
                shadow = winner;
            }
        }
        // Published for the handler (a fact for it, never read back by library code).
        ARENA_MAP.store(shadow, Ordering::Release);
    }
    // SAFETY: the library's map is a zero-filled block of MAP_WORDS u64 words published once
    // in the root (library memory) and never freed; AtomicU64 has the layout of u64 and
    // all-zero is a valid value.
    let lib = unsafe { std::slice::from_raw_parts(lib, MAP_WORDS) };
    // SAFETY: as above: the handler's copy, a private zero-filled mapping of MAP_WORDS words
    // whose address the root keeps, never unmapped.
    let shadow = unsafe { std::slice::from_raw_parts(shadow, MAP_WORDS) };
    Some((lib, shadow))
}

/// Marks (or unmarks) `[start, start + len)` — granule-aligned — as domain memory, in the
/// library's map and the handler's copy.
pub(crate) fn arena_map_mark(start: usize, len: usize, on: bool) {
    let Some((lib, shadow)) = maps() else {
        return;
    };
    for g in (start >> GRANULE_SHIFT)..((start + len) >> GRANULE_SHIFT) {
        let (word, bit) = (g / 64, 1u64 << (g % 64));
        for map in [lib, shadow] {
            if let Some(w) = map.get(word) {
                if on {
                    w.fetch_or(bit, Ordering::Release);
                } else {
                    w.fetch_and(!bit, Ordering::Release);
                }
            }
        }
    }
}

/// Whether `[start, end)` (`start < end <= 2^47`) touches a granule of some real backend's
/// arena: the library's map (library code; one load per 64 granules).
#[inline]
pub(crate) fn arena_map_touches(start: usize, end: usize) -> bool {
    let p = crate::meta::root().arena_map.load(Ordering::Acquire);
    if p.is_null() {
        return false;
    }
    // SAFETY: a published map has MAP_WORDS words, never freed (see `maps`).
    let map = unsafe { std::slice::from_raw_parts(p, MAP_WORDS) };
    let (first, last) = (start >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT);
    (first / 64..=last / 64).any(|w| {
        let lo = if w == first / 64 { first % 64 } else { 0 };
        let hi = if w == last / 64 { last % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        map.get(w)
            .is_some_and(|word| word.load(Ordering::Acquire) & mask != 0)
    })
}

/// Whether `addr` lies in an arena of any real backend of the process, as the fault handler
/// sees it (its copy of the map). Lock-free and async-signal-safe (the map exists once any
/// arena does). Never used by library code to decide anything.
pub(crate) fn arena_map_contains(addr: usize) -> bool {
    let p = ARENA_MAP.load(Ordering::Acquire);
    if p.is_null() || addr >= USER_SPACE {
        return false;
    }
    let g = addr >> GRANULE_SHIFT;
    // SAFETY: a published map has MAP_WORDS words and `g / 64 < MAP_WORDS` for addresses
    // below USER_SPACE (checked above).
    let w = p.wrapping_add(g / 64);
    // SAFETY: see above; a shared reference to an atomic word of the live map.
    let w = unsafe { &*w };
    w.load(Ordering::Acquire) & (1 << (g % 64)) != 0
}

/// Reservations of a real backend, in library memory: start -> len.
#[derive(Debug)]
pub(crate) struct Arenas(RwLock<Treap<(), Meta>>);

impl Default for Arenas {
    fn default() -> Arenas {
        Arenas(RwLock::new(Treap::new_in(Meta)))
    }
}

fn remap_error(addr: usize, len: usize) -> impl FnOnce(SysError) -> Error {
    move |source| Error::Remap { addr, len, source }
}

impl Arenas {
    /// Reserves at least `len` bytes, granule-aligned: inaccessible, key 0, primed to stay
    /// mergeable ([`mman::reserve_mergeable`]). Returns the start and the reserved length.
    pub(crate) fn reserve(&self, len: usize) -> Result<(usize, usize)> {
        let len = len
            .checked_next_multiple_of(GRANULE)
            .ok_or(Error::Reserve {
                len,
                source: SysError::Sys {
                    op: mpkvirt_sys::Op::Mmap,
                    errno: mpkvirt_sys::Errno(libc::ENOMEM),
                },
            })?;
        let start = mman::reserve_mergeable_aligned(len, GRANULE)
            .map_err(|source| Error::Reserve { len, source })? as usize;
        if crate::meta::lock_rw(&self.0)
            .try_insert(start, len, ())
            .is_err()
        {
            // SAFETY: just reserved by us; nothing refers to it.
            let _ = unsafe { mman::munmap(start as *mut u8, len) };
            return Err(Error::Unsupported(
                "recording a reservation (metadata exhausted)",
            ));
        }
        arena_map_mark(start, len, true);
        Ok((start, len))
    }

    /// Whether `[addr, addr + len)` lies in one reservation.
    pub(crate) fn contains(&self, addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        crate::meta::read_rw(&self.0)
            .floor(addr)
            .is_some_and(|(s, l, ())| end <= s + l)
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

impl Arenas {
    /// Unmaps every reservation (the backend's manager is gone: no domain is left in them).
    pub(crate) fn unmap_all(&self) {
        let mut t = crate::meta::lock_rw(&self.0);
        while let Some((start, len, ())) = t.ceiling(0) {
            t.remove(start);
            arena_map_mark(start, len, false);
            // SAFETY: the reservation was made here and every domain in it is gone (see the
            // module docs); nothing refers to it any more.
            let _ = unsafe { mman::munmap(start as *mut u8, len) };
        }
    }
}

impl Drop for Arenas {
    fn drop(&mut self) {
        self.unmap_all();
    }
}
