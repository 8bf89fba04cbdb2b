//! The simulated backend: a model of 16 keys, per-thread PKRU values and a page table,
//! without any memory behind it.
//!
//! Addresses it hands out are fictitious (they are never mapped) and must not be
//! dereferenced; [`crate::Manager::read_byte`] and [`crate::Manager::write_byte`] answer
//! "would this access fault?" from the model and keep the bytes written, so property tests
//! and fuzzers can replay domain programs against the reference model at full speed.
//!
//! The model follows x86-64 Linux: a `PROT_NONE` page faults with `SEGV_ACCERR` before keys
//! are looked at (the PTE is not present); otherwise a key whose PKRU field forbids the access
//! faults with `SEGV_PKUERR`; otherwise a protection that forbids it faults with
//! `SEGV_ACCERR`. Key 0's field is honoured like any other.

use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::signal::{Access, SegvCode};
use mpkvirt_sys::{Pkey, Pkru};

use super::sealed::{LiveOps, Spec};
use super::{BackendKind, RawFault, Regs};
use crate::error::{Error, Result};
use crate::meta::{MVec, Meta, lock};
use crate::treap::Treap;

/// Start of the fictitious address space (high, so it never collides with real pointers
/// in the same process by accident).
const SIM_BASE: usize = 0x6000_0000_0000;
/// End of it: reservations past this fail like an exhausted address space.
const SIM_END: usize = 0x7000_0000_0000;

#[derive(Debug)]
struct Model {
    /// Page ranges: start -> (len, (prot, key)); non-overlapping.
    ranges: Treap<(Prot, Pkey), Meta>,
    /// Bytes written (absent reads as zero), by address.
    bytes: Treap<u8, Meta>,
    next: usize,
}

impl Model {
    /// Sets `[start, end)` to `(prot, key)`, splitting ranges it overlaps.
    fn set(&mut self, start: usize, end: usize, prot: Prot, key: Pkey) {
        let mut at = self
            .ranges
            .floor(start)
            .filter(|&(s, l, _)| s + l > start)
            .map_or(start, |(s, _, _)| s);
        while let Some((s, l, v)) = self.ranges.ceiling(at) {
            if s >= end {
                break;
            }
            self.ranges.remove(s);
            let e = s + l;
            if s < start {
                self.ranges.insert(s, start - s, v);
            }
            if e > end {
                self.ranges.insert(end, e - end, v);
            }
            at = e;
        }
        self.ranges.insert(start, end - start, (prot, key));
    }

    fn lookup(&self, addr: usize) -> Option<(Prot, Pkey)> {
        let (s, l, v) = self.ranges.floor(addr)?;
        (addr < s + l).then_some(v)
    }

    fn forget_bytes(&mut self, addr: usize, len: usize) {
        while let Some((a, _, _)) = self.bytes.ceiling(addr) {
            if a >= addr + len {
                break;
            }
            self.bytes.remove(a);
        }
    }
}

/// A model of PKU without memory: for property tests and fuzzing. A specification: the model
/// is built when a manager is.
#[derive(Debug)]
pub struct Simulated {
    keys: usize,
}

impl Simulated {
    /// A model with `keys` keys (1 to 15).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `keys` is not 1 to 15.
    pub fn new(keys: usize) -> Result<Simulated> {
        if !(1..=15).contains(&keys) {
            return Err(Error::InvalidConfig("keys must be 1 to 15"));
        }
        Ok(Simulated { keys })
    }
}

/// The live simulated backend: the model, in library memory.
#[derive(Debug)]
pub struct SimulatedLive {
    keys: MVec<Pkey>,
    model: Mutex<Model>,
    /// Reservations: start -> len.
    reservations: std::sync::RwLock<Treap<(), Meta>>,
}

impl Spec for Simulated {
    type Live = SimulatedLive;
    const TAG: u32 = 1;
    fn kind(&self) -> BackendKind {
        BackendKind::Simulated
    }
    fn to_pod(&self) -> crate::manager::ops::SpecPod {
        super::pod(BackendKind::Simulated, self.keys)
    }
    fn from_pod(p: crate::manager::ops::SpecPod) -> Result<Self> {
        if p.kind != BackendKind::Simulated.tag() {
            return Err(Error::InvalidConfig("backend"));
        }
        Simulated::new(p.keys as usize)
    }
    fn build(self) -> Result<SimulatedLive> {
        let mut keys = MVec::new_in(Meta);
        for k in (1..=self.keys as u8).filter_map(Pkey::new) {
            keys.push(k);
        }
        Ok(SimulatedLive {
            keys,
            model: Mutex::new(Model {
                ranges: Treap::new_in(Meta),
                bytes: Treap::new_in(Meta),
                next: SIM_BASE,
            }),
            reservations: std::sync::RwLock::new(Treap::new_in(Meta)),
        })
    }
}

impl SimulatedLive {
    /// Whether an access of kind `access` at `addr` by a thread with rights `pkru` would
    /// fault, and how.
    pub(crate) fn check(
        &self,
        pkru: Pkru,
        addr: usize,
        access: Access,
    ) -> std::result::Result<(), RawFault> {
        let fault = |code, pkey| {
            Err(RawFault {
                addr,
                access: Some(access),
                code,
                pkey,
            })
        };
        let Some((prot, key)) = lock(&self.model).lookup(addr) else {
            return fault(SegvCode::MapErr, None);
        };
        if prot == Prot::NONE {
            return fault(SegvCode::AccErr, None);
        }
        let rights = pkru.rights(key);
        let key_ok = match access {
            Access::Read => rights.can_read(),
            Access::Write => rights.can_write(),
            Access::Execute => true,
        };
        if !key_ok {
            return fault(SegvCode::PkuErr, Some(key));
        }
        let prot_ok = match access {
            Access::Read => prot.contains(Prot::READ),
            Access::Write => prot.contains(Prot::WRITE),
            Access::Execute => prot.contains(Prot::EXEC),
        };
        if prot_ok {
            Ok(())
        } else {
            fault(SegvCode::AccErr, None)
        }
    }

    fn check_reserved(&self, addr: usize, len: usize, what: &str) {
        assert!(self.owns(addr, len), "{what} outside the reservations");
    }
}

impl LiveOps for SimulatedLive {
    fn kind(&self) -> BackendKind {
        BackendKind::Simulated
    }

    fn keys(&self) -> &[Pkey] {
        &self.keys
    }

    fn reserve(&self, len: usize) -> Result<usize> {
        let mut m = lock(&self.model);
        let start = m.next;
        // Leave a gap so that reservations never touch (an overflow past one faults).
        let next = start
            .checked_add(len)
            .and_then(|e| e.checked_add(1 << 20))
            .filter(|&n| n <= SIM_END)
            .ok_or(Error::Reserve {
                len,
                source: mpkvirt_sys::Error::Sys {
                    op: mpkvirt_sys::Op::Mmap,
                    errno: mpkvirt_sys::Errno(libc::ENOMEM),
                },
            })?;
        m.next = next;
        m.set(start, start + len, Prot::NONE, Pkey::DEFAULT);
        drop(m);
        crate::meta::lock_rw(&self.reservations).insert(start, len, ());
        Ok(start)
    }

    fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()> {
        self.check_reserved(addr, len, "tag");
        let (prot, key) = key.map_or((Prot::NONE, Pkey::DEFAULT), |k| (prot, k));
        lock(&self.model).set(addr, addr + len, prot, key);
        Ok(())
    }

    fn discard(&self, addr: usize, len: usize, _mapped_files: bool) -> Result<()> {
        self.check_reserved(addr, len, "discard");
        let mut m = lock(&self.model);
        m.set(addr, addr + len, Prot::NONE, Pkey::DEFAULT);
        m.forget_bytes(addr, len);
        Ok(())
    }

    fn zero(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        let mut m = lock(&self.model);
        m.forget_bytes(addr, len);
        if mapped_files {
            m.set(addr, addr + len, Prot::NONE, Pkey::DEFAULT);
        }
        Ok(())
    }

    fn map_fd(&self, addr: usize, len: usize, _fd: BorrowedFd<'_>, _offset: u64) -> Result<()> {
        // The model has no file contents: the range reads as zero, like an empty file.
        self.discard(addr, len, true)
    }

    fn read_pkru(&self, regs: &Regs<'_>) -> Pkru {
        *regs.virt
    }

    fn write_pkru(&self, regs: &mut Regs<'_>, new: Pkru) -> Result<()> {
        *regs.virt = new;
        Ok(())
    }

    fn model_access(
        &self,
        pkru: Pkru,
        addr: usize,
        write: Option<u8>,
    ) -> Option<std::result::Result<u8, RawFault>> {
        let kind = if write.is_some() {
            Access::Write
        } else {
            Access::Read
        };
        if let Err(f) = self.check(pkru, addr, kind) {
            return Some(Err(f));
        }
        let mut m = lock(&self.model);
        Some(Ok(match write {
            Some(v) => {
                m.bytes.insert(addr, 1, v);
                0
            }
            None => m.bytes.get(addr).map_or(0, |(_, v)| v),
        }))
    }

    fn owns(&self, addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        crate::meta::read_rw(&self.reservations)
            .floor(addr)
            .is_some_and(|(s, l, ())| end <= s + l)
    }

    fn release(&self, _retired: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use mpkvirt_sys::AccessRights;

    #[test]
    fn model_splits_ranges_and_checks_keys_then_protection() {
        crate::meta::init().unwrap();
        let sim = Simulated::new(15).unwrap().build().unwrap();
        let base = sim.reserve(0x10000).unwrap();
        let k1 = Pkey::new(1).unwrap();
        sim.tag(base + 0x1000, 0x2000, Prot::READ_WRITE, Some(k1))
            .unwrap();
        let open = Pkru::LINUX_INIT.with(k1, AccessRights::READ_WRITE);
        assert_eq!(sim.check(open, base + 0x1000, Access::Write), Ok(()));
        assert_eq!(sim.check(open, base + 0x2fff, Access::Read), Ok(()));
        let parked = sim.check(open, base, Access::Read).unwrap_err();
        assert_eq!(parked.code, SegvCode::AccErr);
        let denied = sim
            .check(Pkru::LINUX_INIT, base + 0x1000, Access::Read)
            .unwrap_err();
        assert_eq!((denied.code, denied.pkey), (SegvCode::PkuErr, Some(k1)));
        let ro = Pkru::LINUX_INIT.with(k1, AccessRights::READ_ONLY);
        assert_eq!(
            sim.check(ro, base + 0x1000, Access::Write)
                .unwrap_err()
                .code,
            SegvCode::PkuErr
        );
        sim.tag(base + 0x1000, 0x1000, Prot::READ, Some(k1))
            .unwrap();
        assert_eq!(
            sim.check(open, base + 0x1000, Access::Write)
                .unwrap_err()
                .code,
            SegvCode::AccErr
        );
        assert_eq!(
            sim.check(open, base + 0x2000, Access::Write),
            Ok(()),
            "second page kept RW"
        );
        assert_eq!(
            sim.check(open, base + 0x20000, Access::Read)
                .unwrap_err()
                .code,
            SegvCode::MapErr
        );
    }
}
