//! `pkey_alloc`, `pkey_free` and `pkey_mprotect` as raw system calls.
//!
//! # Safety
//!
//! The calls go through `libc::syscall` because glibc before 2.27 lacks wrappers. The first
//! two take and return integers only. `pkey_mprotect` changes the protection of memory, which
//! is why it is an `unsafe fn` with the same contract as `mprotect`.
#![allow(unsafe_code, reason = "raw pkey system calls")]

use crate::error::{Error, Op, Result};
use crate::mman::Prot;
use crate::pkey::Pkey;
use crate::pkru::AccessRights;

/// Allocates a protection key, giving the *calling thread* `init` rights for it.
///
/// Other threads keep the rights they already had for the key (normally none). Use
/// [`AccessRights::DISABLE_ACCESS`] unless the calling thread should reach the key's pages
/// right away.
///
/// # Errors
///
/// [`Error::KeysExhausted`] when every key is taken (`ENOSPC`). `EINVAL` when the kernel has
/// no PKU support (on x86 kernels before the 2026 fix, the first call without OSPKE returns
/// `EINVAL` and later ones `ENOSPC`; check [`crate::cpu::Pku::new`] first). `ENOSYS` on
/// kernels built without `CONFIG_X86_INTEL_MEMORY_PROTECTION_KEYS`.
///
/// # References
///
/// pkey_alloc(2)
pub fn pkey_alloc(init: AccessRights) -> Result<Pkey> {
    // SAFETY: pkey_alloc takes two integers (flags, which must be 0, and the initial rights)
    // and touches no user memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pkey_alloc,
            0 as libc::c_ulong,
            libc::c_ulong::from(init.bits()),
        )
    };
    if ret < 0 {
        let err = Error::last(Op::PkeyAlloc);
        return Err(if err.errno().0 == libc::ENOSPC {
            Error::KeysExhausted
        } else {
            err
        });
    }
    u8::try_from(ret)
        .ok()
        .and_then(Pkey::new)
        .ok_or(Error::Sys {
            op: Op::PkeyAlloc,
            errno: crate::Errno(libc::ERANGE),
        })
}

/// Frees a protection key.
///
/// The kernel does not re-tag pages still carrying the key: free a key only after every page
/// tagged with it has been re-tagged or unmapped, or a later allocation of the same number
/// inherits them.
///
/// # Errors
///
/// `EINVAL` when the key is not allocated.
///
/// # Safety
///
/// No page may still carry `key`, and no thread may still hold rights to it that matter: the
/// next `pkey_alloc` (of any code in the process) can return the same number, and its pages
/// would then be reachable through those rights, and stale pages through its rights.
///
/// # References
///
/// pkey_free(2)
pub unsafe fn pkey_free(key: Pkey) -> Result<()> {
    // SAFETY: pkey_free takes one integer and touches no user memory; what the freed number
    // means afterwards is the caller's obligation (above).
    let ret = unsafe { libc::syscall(libc::SYS_pkey_free, libc::c_long::from(key.index())) };
    if ret < 0 {
        Err(Error::last(Op::PkeyFree))
    } else {
        Ok(())
    }
}

/// Sets the protection of `[addr, addr + len)` to `prot` and tags its pages with `key`.
///
/// One call covers the whole range whatever its size: the kernel walks the page tables once
/// (cost grows with the populated pages, the number of system calls does not).
///
/// # Errors
///
/// `EINVAL` for an unallocated key or unaligned range, `ENOMEM` when part of the range is not
/// mapped or the mapping count limit (`vm.max_map_count`) would be exceeded.
///
/// # Safety
///
/// The range must be memory the caller owns (a mapping it created or was given). No live
/// Rust reference into the range may be used afterwards in a way the new protection
/// forbids.
///
/// # References
///
/// pkey_mprotect(2)
pub unsafe fn pkey_mprotect(addr: *mut u8, len: usize, prot: Prot, key: Pkey) -> Result<()> {
    // SAFETY: sound by this function's contract (the caller owns the range and no reference
    // into it is used against the new protection); the system call dereferences no user
    // pointer, it only changes page-table entries. Arguments are passed at full width.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pkey_mprotect,
            addr,
            len,
            libc::c_long::from(prot.bits()),
            libc::c_long::from(key.index()),
        )
    };
    if ret < 0 {
        Err(Error::last(Op::PkeyMprotect))
    } else {
        Ok(())
    }
}
