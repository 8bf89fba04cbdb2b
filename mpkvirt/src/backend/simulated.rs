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

use std::collections::{BTreeMap, HashMap};
use std::os::fd::BorrowedFd;

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::signal::{Access, SegvCode};
use mpkvirt_sys::{Pkey, Pkru};
use parking_lot::Mutex;

use super::sealed::BackendOps;
use super::{BackendKind, RawFault, Reservations, ThreadRegs};
use crate::error::Result;

/// Start of the fictitious address space (high, so it never collides with real pointers
/// in the same process by accident).
const SIM_BASE: usize = 0x6000_0000_0000;

#[derive(Debug, Default)]
struct Model {
    /// Page ranges: start -> (end, prot, key); non-overlapping.
    ranges: BTreeMap<usize, (usize, Prot, Pkey)>,
    /// Bytes written (absent reads as zero).
    bytes: HashMap<usize, u8>,
    next: usize,
}

impl Model {
    /// Sets `[start, end)` to `(prot, key)`, splitting ranges it overlaps.
    fn set(&mut self, start: usize, end: usize, prot: Prot, key: Pkey) {
        let overlapping: Vec<usize> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, (e, _, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let (e, p, k) = self.ranges.remove(&s).expect("range");
            if s < start {
                self.ranges.insert(s, (start, p, k));
            }
            if e > end {
                self.ranges.insert(end, (e, p, k));
            }
        }
        self.ranges.insert(start, (end, prot, key));
    }

    fn lookup(&self, addr: usize) -> Option<(Prot, Pkey)> {
        let (_, &(end, prot, key)) = self.ranges.range(..=addr).next_back()?;
        (addr < end).then_some((prot, key))
    }
}

/// A model of PKU without memory: for property tests and fuzzing.
#[derive(Debug)]
pub struct Simulated {
    keys: Vec<Pkey>,
    model: Mutex<Model>,
    reservations: Reservations,
}

impl Simulated {
    /// A model with `keys` keys (1 to 15).
    pub fn new(keys: usize) -> Simulated {
        let keys = (1..=keys.clamp(1, 15) as u8)
            .filter_map(Pkey::new)
            .collect();
        Simulated {
            keys,
            model: Mutex::new(Model {
                next: SIM_BASE,
                ..Model::default()
            }),
            reservations: Reservations::default(),
        }
    }

    /// Whether an access of kind `access` at `addr` by a thread with rights `pkru` would
    /// fault, and how.
    pub fn check(
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
        let Some((prot, key)) = self.model.lock().lookup(addr) else {
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
}

impl BackendOps for Simulated {
    fn kind(&self) -> BackendKind {
        BackendKind::Simulated
    }

    fn keys(&self) -> &[Pkey] {
        &self.keys
    }

    fn reserve(&self, len: usize) -> Result<usize> {
        let mut m = self.model.lock();
        let start = m.next;
        // Leave a gap so that reservations never touch (an overflow past one faults).
        m.next = start + len + (1 << 20);
        m.set(start, start + len, Prot::NONE, Pkey::DEFAULT);
        drop(m);
        self.reservations.add(start, len);
        Ok(start)
    }

    fn tag(&self, addr: usize, len: usize, prot: Prot, key: Option<Pkey>) -> Result<()> {
        assert!(
            self.reservations.contains(addr, len),
            "tag outside the reservations"
        );
        let (prot, key) = key.map_or((Prot::NONE, Pkey::DEFAULT), |k| (prot, k));
        self.model.lock().set(addr, addr + len, prot, key);
        Ok(())
    }

    fn discard(&self, addr: usize, len: usize, _mapped_files: bool) -> Result<()> {
        assert!(
            self.reservations.contains(addr, len),
            "discard outside the reservations"
        );
        let mut m = self.model.lock();
        m.set(addr, addr + len, Prot::NONE, Pkey::DEFAULT);
        m.bytes.retain(|a, _| !(addr..addr + len).contains(a));
        Ok(())
    }

    fn zero(&self, addr: usize, len: usize, mapped_files: bool) -> Result<()> {
        let mut m = self.model.lock();
        m.bytes.retain(|a, _| !(addr..addr + len).contains(a));
        if mapped_files {
            m.set(addr, addr + len, Prot::NONE, Pkey::DEFAULT);
        }
        Ok(())
    }

    fn map_fd(&self, addr: usize, len: usize, _fd: BorrowedFd<'_>, _offset: u64) -> Result<()> {
        // The model has no file contents: the range reads as zero, like an empty file.
        self.discard(addr, len, true)
    }

    fn read_pkru(&self, regs: &ThreadRegs) -> Pkru {
        regs.pkru
    }

    fn write_pkru(&self, regs: &mut ThreadRegs, new: Pkru) {
        regs.pkru = new;
    }

    fn access(
        &self,
        regs: &ThreadRegs,
        addr: usize,
        write: Option<u8>,
    ) -> std::result::Result<u8, RawFault> {
        let kind = if write.is_some() {
            Access::Write
        } else {
            Access::Read
        };
        self.check(regs.pkru, addr, kind)?;
        let mut m = self.model.lock();
        Ok(match write {
            Some(v) => {
                m.bytes.insert(addr, v);
                0
            }
            None => m.bytes.get(&addr).copied().unwrap_or(0),
        })
    }

    fn owns(&self, addr: usize, len: usize) -> bool {
        self.reservations.contains(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mpkvirt_sys::AccessRights;

    #[test]
    fn model_splits_ranges_and_checks_keys_then_protection() {
        let sim = Simulated::new(15);
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
