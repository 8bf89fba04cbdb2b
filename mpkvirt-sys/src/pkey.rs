//! Protection keys and the Linux system calls that manage them.
//!
//! A protection key is a 4-bit tag in each page-table entry. `pkey_alloc` reserves a key for
//! the process, `pkey_mprotect` tags pages with it (and sets their protection, like
//! `mprotect`), and `pkey_free` returns it. Key 0 is the default key of every page and is
//! never allocated or freed.
//!
//! Kernel facts the layers above depend on (pkeys(7), `arch/x86/mm/pkeys.c`):
//!
//! - `pkey_alloc(0, rights)` writes `rights` into the *calling thread's* PKRU only; other
//!   threads keep whatever bits they had for the key (normally access-disabled).
//! - `pkey_free` does not re-tag pages. Freeing a key that still tags pages and allocating it
//!   again silently gives the new owner those pages ("protection-key use-after-free").
//! - `mmap` over a tagged range resets the new pages to key 0; `mprotect` keeps the key.
//! - On x86 at most 15 keys can be allocated, fewer when other code (or the kernel's
//!   execute-only key) holds some.
//!
//! # References
//!
//! pkeys(7), pkey_alloc(2), pkey_mprotect(2).

use std::fmt;

pub use crate::imp::pkey::{pkey_alloc, pkey_free, pkey_mprotect};

/// A protection key, `0..=15`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pkey(u8);

impl Pkey {
    /// Number of keys the x86 PKRU register describes.
    pub const COUNT: usize = 16;
    /// Key 0, the default key of every page.
    pub const DEFAULT: Pkey = Pkey(0);

    /// The key with this number, if it is below 16.
    pub const fn new(index: u8) -> Option<Pkey> {
        if (index as usize) < Pkey::COUNT {
            Some(Pkey(index))
        } else {
            None
        }
    }

    /// The key's number.
    pub const fn index(self) -> u8 {
        self.0
    }

    /// All 16 keys, in order.
    pub fn all() -> impl Iterator<Item = Pkey> + Clone {
        (0..Pkey::COUNT as u8).map(Pkey)
    }
}

impl fmt::Debug for Pkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pkey{}", self.0)
    }
}

impl fmt::Display for Pkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
