//! Memory mappings: reserving, mapping over, protecting and releasing page ranges.
//!
//! Addresses and lengths must be page-aligned (the kernel returns `EINVAL` otherwise).
//! Anonymous mappings are `MAP_PRIVATE | MAP_NORESERVE`: reserved address space costs no
//! commit charge until pages are touched.
//!
//! **`mmap` over a range resets its protection key to 0; `mprotect` keeps it** (pkeys(7)).
//! Callers that remap tagged memory must tag it again.
//!
//! # Safety
//!
//! The wrappers that create a *new* mapping at an address the kernel picks are safe: nothing
//! can refer to memory that did not exist. The ones that replace, re-protect, discard or
//! unmap existing memory are `unsafe fn`s whose contract is that the caller owns the range
//! and no Rust reference into it outlives the change.
//!
//! # References
//!
//! mmap(2), mprotect(2), munmap(2), madvise(2).

#![allow(unsafe_code, reason = "memory-mapping system calls")]

use bitflags::bitflags;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Op, Result};

static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// The system page size (`sysconf(_SC_PAGESIZE)`), cached.
pub fn page_size() -> usize {
    match PAGE_SIZE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf reads a system constant and touches no memory of ours.
            let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let size = usize::try_from(size).unwrap_or(4096);
            PAGE_SIZE.store(size, Ordering::Relaxed);
            size
        }
        size => size,
    }
}

const ANON: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

fn check_map(ret: *mut libc::c_void) -> Result<*mut u8> {
    if ret == libc::MAP_FAILED {
        Err(Error::last(Op::Mmap))
    } else {
        Ok(ret.cast())
    }
}

/// Reserves `len` bytes of address space with `prot` (typically [`Prot::NONE`]) at an
/// address the kernel picks. Pages are private, zero-filled on first touch, not charged to
/// the commit limit (`MAP_NORESERVE`) and tagged with key 0.
///
/// # Errors
///
/// `ENOMEM` when no such range is free or `vm.max_map_count` is reached.
///
/// # References
///
/// mmap(2)
pub fn reserve(len: usize, prot: Prot) -> Result<*mut u8> {
    // SAFETY: a null hint without MAP_FIXED lets the kernel choose a free range, so no
    // existing memory is affected.
    let ret = unsafe { libc::mmap(std::ptr::null_mut(), len, prot.bits(), ANON, -1, 0) };
    check_map(ret)
}

/// Like [`reserve`], for a range that will be split into many differently tagged pieces
/// which should merge back into one mapping when they are tagged alike again.
///
/// The kernel merges two adjacent anonymous mappings only if they share an `anon_vma` (or
/// one has none). A piece split off a mapping shares its parent's, but a piece that is first
/// written while it differs from its neighbours in more than access bits — a different
/// protection key, typically — gets a fresh one of its own and can never merge again: with
/// many such pieces the process runs into `vm.max_map_count` (65,530 by default). Writing
/// one byte while the whole range is still one mapping gives it an `anon_vma` that every
/// later piece inherits. The byte's page is discarded again; the range ends inaccessible.
/// Three extra system calls per reservation.
///
/// # Errors
///
/// As [`reserve`], plus failures of the priming calls.
pub fn reserve_mergeable(len: usize) -> Result<*mut u8> {
    prime(reserve(len, Prot::NONE)?, len)
}

/// [`reserve`] of `len` bytes aligned to `align` (a power of two, at least the page size):
/// over-reserves by `align` and unmaps the excess on both sides.
///
/// # Errors
///
/// As [`reserve`]; `EINVAL` for a bad `align`, `ENOMEM` when `len + align` overflows.
pub fn reserve_aligned(len: usize, align: usize, prot: Prot) -> Result<*mut u8> {
    if !align.is_power_of_two() || align < page_size() {
        return Err(Error::Sys {
            op: Op::Mmap,
            errno: crate::Errno(libc::EINVAL),
        });
    }
    let total = len.checked_add(align).ok_or(Error::Sys {
        op: Op::Mmap,
        errno: crate::Errno(libc::ENOMEM),
    })?;
    let raw = reserve(total, prot)? as usize;
    let start = raw.next_multiple_of(align);
    let (head, tail) = (start - raw, raw + total - (start + len));
    if head > 0 {
        // SAFETY: `[raw, start)` is part of the mapping just made and unreferenced.
        unsafe { munmap(raw as *mut u8, head) }?;
    }
    if tail > 0 {
        // SAFETY: as above, the part after `start + len`.
        unsafe { munmap((start + len) as *mut u8, tail) }?;
    }
    Ok(start as *mut u8)
}

/// [`reserve_mergeable`] aligned to `align` (see [`reserve_aligned`]).
///
/// # Errors
///
/// As [`reserve_aligned`], plus failures of the priming calls.
pub fn reserve_mergeable_aligned(len: usize, align: usize) -> Result<*mut u8> {
    prime(reserve_aligned(len, align, Prot::NONE)?, len)
}

/// Gives a fresh inaccessible reservation one `anon_vma` (see [`reserve_mergeable`]); unmaps
/// it on failure.
fn prime(start: *mut u8, len: usize) -> Result<*mut u8> {
    let prime = || -> Result<()> {
        // SAFETY: the range was just reserved by the caller and nothing refers to it.
        unsafe { mprotect(start, len, Prot::READ_WRITE) }?;
        // SAFETY: `start` is the first byte of the now writable, private, fresh mapping; no
        // Rust reference points into it. The write makes the kernel attach an anon_vma.
        unsafe { start.write_volatile(0) };
        // SAFETY: as above: our own mapping, unreferenced.
        unsafe { mprotect(start, len, Prot::NONE) }?;
        // SAFETY: as above; the page written above is given back.
        unsafe { madvise_dontneed(start, page_size()) }
    };
    if let Err(e) = prime() {
        // SAFETY: the range is ours and unreferenced.
        let _ = unsafe { munmap(start, len) };
        return Err(e);
    }
    Ok(start)
}

/// Replaces `[addr, addr + len)` with fresh zero pages of protection `prot`
/// (`MAP_FIXED`). The pages' protection key is reset to 0.
///
/// # Errors
///
/// `EINVAL` for an unaligned range; `ENOMEM` when the mapping count limit is reached.
///
/// # Safety
///
/// The caller must own the range; every Rust reference into it is invalidated (the old
/// contents are gone).
pub unsafe fn map_fixed_anonymous(addr: *mut u8, len: usize, prot: Prot) -> Result<()> {
    // SAFETY: MAP_FIXED replaces only the given range, which the caller owns and no longer
    // borrows.
    let ret = unsafe { libc::mmap(addr.cast(), len, prot.bits(), ANON | libc::MAP_FIXED, -1, 0) };
    check_map(ret).map(drop)
}

/// Maps `len` bytes of `fd` from `offset` over `[addr, addr + len)` (`MAP_FIXED`), shared
/// (`MAP_SHARED`) or private copy-on-write. The pages' protection key is reset to 0.
///
/// # Errors
///
/// `EBADF`/`EACCES` when `fd` does not allow `prot`; `EINVAL` for unaligned arguments.
///
/// # Safety
///
/// As for [`map_fixed_anonymous`]. In addition, a shared mapping's contents change whenever
/// the file does; the caller must not hold Rust references into it that assume otherwise.
pub unsafe fn map_fixed_fd(
    addr: *mut u8,
    len: usize,
    prot: Prot,
    shared: bool,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> Result<()> {
    let share = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let offset = libc::off_t::try_from(offset).map_err(|_| Error::Sys {
        op: Op::Mmap,
        errno: crate::Errno(libc::EINVAL),
    })?;
    // SAFETY: MAP_FIXED replaces only the given range, which the caller owns and no longer
    // borrows; `fd` is a live descriptor for the duration of the call (borrowed).
    let ret = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            prot.bits(),
            share | libc::MAP_FIXED,
            fd.as_raw_fd(),
            offset,
        )
    };
    check_map(ret).map(drop)
}

/// Changes the protection of `[addr, addr + len)`; the pages keep their protection key.
///
/// # Errors
///
/// `ENOMEM` when part of the range is unmapped or the mapping count limit is reached.
///
/// # Safety
///
/// The caller must own the range, and no Rust reference into it may be used afterwards in a
/// way the new protection forbids.
pub unsafe fn mprotect(addr: *mut u8, len: usize, prot: Prot) -> Result<()> {
    // SAFETY: sound by this function's contract (the caller owns the range and no reference
    // into it is used against the new protection); mprotect dereferences no user pointer.
    let ret = unsafe { libc::mprotect(addr.cast(), len, prot.bits()) };
    if ret < 0 {
        Err(Error::last(Op::Mprotect))
    } else {
        Ok(())
    }
}

/// Unmaps `[addr, addr + len)`.
///
/// # Errors
///
/// `EINVAL` for an unaligned range.
///
/// # Safety
///
/// The caller must own the range and no Rust reference into it may be used again.
pub unsafe fn munmap(addr: *mut u8, len: usize) -> Result<()> {
    // SAFETY: the caller owns the range and has given up every reference into it.
    let ret = unsafe { libc::munmap(addr.cast(), len) };
    if ret < 0 {
        Err(Error::last(Op::Munmap))
    } else {
        Ok(())
    }
}

/// Discards the contents of `[addr, addr + len)` (`MADV_DONTNEED`): private anonymous pages
/// read as zero afterwards. Protection and protection key are kept.
///
/// # Errors
///
/// `EINVAL` for an unaligned range or locked pages.
///
/// # Safety
///
/// The caller must own the range; references into it see zeroes afterwards.
pub unsafe fn madvise_dontneed(addr: *mut u8, len: usize) -> Result<()> {
    // SAFETY: the caller owns the range and accepts that its contents become zero.
    let ret = unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) };
    if ret < 0 {
        Err(Error::last(Op::Madvise))
    } else {
        Ok(())
    }
}

bitflags! {
    /// Page protection (`PROT_*`).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct Prot: i32 {
        /// `PROT_READ`
        const READ = libc::PROT_READ;
        /// `PROT_WRITE`
        const WRITE = libc::PROT_WRITE;
        /// `PROT_EXEC`
        const EXEC = libc::PROT_EXEC;
    }
}

impl Prot {
    /// `PROT_NONE`
    pub const NONE: Prot = Prot::empty();
    /// `PROT_READ | PROT_WRITE`
    pub const READ_WRITE: Prot = Prot::READ.union(Prot::WRITE);
}

/// Rounds `len` up to a multiple of the page size.
pub fn page_round_up(len: usize) -> usize {
    let page = page_size();
    len.div_ceil(page) * page
}

/// The protection key of the mapping containing `addr`, from the `ProtectionKey:` field of
/// `/proc/self/smaps` (present on kernels with pkeys). `Ok(None)` when no mapping contains
/// `addr` or the kernel shows no key.
///
/// For diagnostics and tests; it parses a text file and is slow.
///
/// # Errors
///
/// Reading `/proc/self/smaps` failed.
///
/// # References
///
/// proc_pid_smaps(5)
pub fn smaps_protection_key(addr: usize) -> std::io::Result<Option<crate::Pkey>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
        if let Some((lo, hi)) = range
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = (lo..hi).contains(&addr);
            continue;
        }
        if inside && let Some(v) = line.strip_prefix("ProtectionKey:") {
            return Ok(v.trim().parse().ok().and_then(crate::Pkey::new));
        }
    }
    Ok(None)
}
