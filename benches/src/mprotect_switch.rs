//! The mprotect-per-switch baseline: entering a domain makes its pages readable and
//! writable, leaving makes them inaccessible again — two `mprotect` calls per switch pair,
//! process-wide. This is what MPK papers compare against (libmpk reports 8.1x over it).
//!
//! # Safety
//!
//! The region is a private mapping owned by the value; only its protection changes.
#![allow(unsafe_code, reason = "mprotect of the baseline's own mapping")]

use mpkvirt_sys::mman::{self, Prot};

/// A region protected by switching its page protection.
#[derive(Debug)]
pub struct MprotectDomain {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the region is a private mapping owned by this value; only its protection is
// changed, which is a process-wide operation safe to request from any thread.
unsafe impl Send for MprotectDomain {}
// SAFETY: as above; `&self` methods only issue mprotect on the owned range.
unsafe impl Sync for MprotectDomain {}

impl MprotectDomain {
    /// Maps `len` bytes (inaccessible).
    pub fn new(len: usize) -> MprotectDomain {
        let len = mman::page_round_up(len);
        MprotectDomain {
            addr: mman::reserve(len, Prot::NONE).expect("mmap"),
            len,
        }
    }

    /// Opens the region (read-write).
    pub fn enter(&self) {
        // SAFETY: our own mapping; no Rust reference points into it.
        unsafe { mman::mprotect(self.addr, self.len, Prot::READ_WRITE) }.expect("mprotect");
    }

    /// Closes the region.
    pub fn leave(&self) {
        // SAFETY: as for `enter`.
        unsafe { mman::mprotect(self.addr, self.len, Prot::NONE) }.expect("mprotect");
    }
}

impl Drop for MprotectDomain {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used.
        let _ = unsafe { mman::munmap(self.addr, self.len) };
    }
}
