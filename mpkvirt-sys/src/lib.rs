//! The machine layer under mpkvirt: Linux protection-key system calls, the PKRU register,
//! PKU detection, memory mappings and SIGSEGV decoding for x86-64.
//!
//! # Layers
//!
//! | module | concept | touches the machine |
//! |---|---|---|
//! | [`pkru`] | the PKRU value: two bits per key, `Display` per key | no (pure) |
//! | [`pkey`] | `pkey_alloc`, `pkey_free`, `pkey_mprotect` ([`Pkey`]) | system calls |
//! | [`cpu`] | RDPKRU/WRPKRU behind a proof of OSPKE ([`Pku`]), CPUID bits | instructions |
//! | [`detect`] | why PKU is or is not usable here ([`Support`]) | CPUID + a kernel probe |
//! | [`mman`] | `mmap`/`mprotect`/`munmap`/`madvise` on page-aligned ranges (portable Linux) | system calls |
//! | [`membarrier`] | `membarrier(2)`: the heavy half of an asymmetric fence | system call |
//! | [`error`] | which operation failed, with its `errno` | no |
//! | [`signal`] | SIGSEGV `siginfo` (`SEGV_PKUERR`, `si_pkey`), fault access kind, handler install, PKRU in a signal frame | signal state |
//! | [`thread`] | kernel thread ids, `tgkill`, FS/GS base registers, futexes | system calls, instructions |
//!
//! On targets other than x86-64 Linux (or with `--cfg mpkvirt_no_hw`) the machine halves of
//! [`cpu`], [`pkey`], [`membarrier`] and [`signal`] are replaced by a same-API twin whose functions report [`Error::Unsupported`] and
//! whose [`Pku`] token cannot be constructed.
//!
//! # Safety model
//!
//! The crate root denies `unsafe_code`; the few files that need it opt in and say why in a
//! `# Safety` section of their module docs. Reading PKRU, CPUID and decoding signal
//! information are safe. Changing protections ([`pkey::pkey_mprotect`], [`mman::mprotect`])
//! and writing PKRU ([`Pku::wrpkru`]) are `unsafe`: they change which memory the program may
//! touch, and the layers above rely on knowing every such change (a key may only be handed to
//! another domain once no thread's PKRU grants it).
//!
//! # What this crate does not do
//!
//! It has no notion of domains, views or eviction (that is `mpkvirt`), does not sandbox
//! anything by itself, and cannot tell whether other code in the process also uses keys.
//!
//! # References
//!
//! pkeys(7), pkey_alloc(2), pkey_mprotect(2); Intel SDM Vol. 3A §2.7 (PKRU) and §4.6.2
//! (protection keys); Vol. 2 RDPKRU/WRPKRU.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cpu;
pub mod detect;
pub mod error;
pub mod mman;

/// `membarrier(2)` (the machine half lives in `hw/membarrier.rs`).
pub mod membarrier {
    pub use crate::imp::membarrier::{private_expedited, register_private_expedited};
}
pub mod pkey;
pub mod pkru;
pub mod signal;
pub mod thread;

// The machine-touching half of each module above: real on x86-64 Linux, a same-API twin that
// reports `Unsupported` elsewhere (wasmtime's enabled/disabled pattern). Chosen here, once.
#[cfg(all(target_arch = "x86_64", target_os = "linux", not(mpkvirt_no_hw)))]
#[path = "hw/mod.rs"]
mod imp;
#[cfg(not(all(target_arch = "x86_64", target_os = "linux", not(mpkvirt_no_hw))))]
#[path = "unsupported.rs"]
mod imp;

pub use cpu::Pku;
pub use detect::{Support, Unavailable};
pub use error::{Errno, Error, Op, Result};
pub use pkey::Pkey;
pub use pkru::{AccessRights, Pkru};

/// Skips the calling test unless PKU is usable, printing why; fails it instead when the
/// environment variable `MPKVIRT_REQUIRE_PKU=1` is set (inside the PKU guest).
///
/// Evaluates to the [`Pku`] token. Hardware tests are named `pku_*` by convention:
/// `scripts/pku-vm test` runs exactly the tests whose name starts with `pku_` (libtest's
/// `cargo test -- pku_` filter is a substring match and may select a few more).
#[macro_export]
macro_rules! require_pku {
    () => {
        match $crate::detect::pku() {
            Ok(pku) => pku,
            Err(reason) => {
                $crate::detect::report_skip(&reason);
                return;
            }
        }
    };
}
