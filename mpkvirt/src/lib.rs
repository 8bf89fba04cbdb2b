//! mpkvirt: any number of protection domains on a machine with 15 protection keys.
//!
//! Intel/AMD memory protection keys (MPK/PKU) let a thread switch its access to tagged pages
//! with one unprivileged instruction (WRPKRU), but a process has only 15 usable keys.
//! mpkvirt multiplexes an unlimited number of *virtual* domains onto them, libmpk's idea
//! (Park et al., USENIX ATC 2019) done on a stock kernel and safe for threads:
//!
//! - a [`Domain`] is a contiguous reserved page range with its own allocator;
//! - a thread *enters a view* — a set of domains with read-write or read-only rights — and
//!   while the [`ViewGuard`] lives it can reach exactly those domains;
//! - the key cache binds resident domains to hardware keys; on PKU hardware (and the
//!   simulated backend) a view whose domains all hold keys is entered with no system call
//!   and no lock, at most one PKRU write (the emulation pays an `mprotect` per change);
//! - a miss evicts a domain chosen by a pluggable [`policy`] (LRU, or hints from a scheduler
//!   that knows what runs next), re-tagging its pages with `pkey_mprotect` — one system call
//!   per range whatever its size — only after no thread's PKRU grants the key;
//! - a fault on domain memory becomes a [`FaultReport`] naming the virtual domain
//!   ([`Manager::guarded`], [`Manager::read_byte`]).
//!
//! Three backends implement the machine: real PKU ([`Hardware`]), an `mprotect` emulation
//! with real enforcement for machines without PKU ([`Emulated`]), and a memory-less model
//! ([`Simulated`]) for property tests and fuzzing. [`Manager::new`] picks hardware or
//! emulation by [`Mode`].
//!
//! # Example
//!
//! ```
//! use mpkvirt::{Config, DomainOptions, Manager, Rights};
//!
//! # fn main() -> Result<(), mpkvirt::Error> {
//! let mgr = Manager::new(Config::default())?; // hardware PKU, or the emulation without it
//! let secret = mgr.create_domain(DomainOptions::reserve(64 << 10))?;
//! let buf = secret.alloc(16, 8)?.as_ptr() as usize;
//!
//! // Inside a view granting the domain, its memory is reachable...
//! mgr.with_view(&[(&secret, Rights::ReadWrite)], || mgr.write_byte(buf, 42))??;
//! assert_eq!(mgr.with_view(&[(&secret, Rights::ReadOnly)], || mgr.read_byte(buf))??, 42);
//!
//! // ...outside it, an access faults, and the fault names the domain.
//! let err = mgr.read_byte(buf).unwrap_err();
//! assert!(matches!(err, mpkvirt::Error::Fault(r) if r.domain == Some(secret.id())));
//! # Ok(())
//! # }
//! ```
//!
//! # Where each invariant lives
//!
//! See `ARCHITECTURE.md` at the repository root, which lists every invariant with the file
//! that keeps it and the test that proves it, and the threat model: accessible-iff-granted
//! (`manager/views.rs`, checked against `tests/model.rs` and `tests/concurrent.rs`), no
//! re-binding while pinned (`keycache.rs`, `manager/binding.rs`, loom models), library state
//! behind the call gate (`meta.rs`, `gate.rs`, `tests/gates.rs`), the hit path
//! (`manager/views.rs`, `tests/hit_path.rs`), process-wide rights (`manager/global.rs`,
//! `tests/process_wide.rs`), signal handlers (`gate.rs`, `tests/signals.rs`).
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod alloc;
pub mod backend;
#[cfg(target_os = "linux")]
pub mod capi;
mod claim;
pub mod config;
mod domain;
mod error;
pub mod fault;
mod gate;
mod keycache;
mod manager;
mod meta;
mod ops;
pub mod policy;
mod primitive;
pub mod sandbox;
pub mod scan;
mod slab;
mod sync;
#[cfg(test)]
mod test_alloc;
#[cfg(feature = "testing")]
pub mod testing;
pub mod thread;
mod treap;

pub use backend::{Backend, BackendKind, Emulated, Hardware, Machine, Simulated};
pub use config::{Config, Mode, Selection, select};
pub use domain::{Domain, DomainId, DomainOptions};
pub use error::{Error, Result};
pub use fault::{FaultKind, FaultReport};
pub use manager::{Manager, OwnedViewGuard, Rights, Stats, ThreadStats, ViewGuard};
pub use meta::{MetadataMode, is_metadata};
pub use mpkvirt_sys::mman::Prot;
pub use mpkvirt_sys::signal::{Access, SegvCode};
pub use mpkvirt_sys::{Pkey, Pkru};
pub use policy::PolicyKind;
