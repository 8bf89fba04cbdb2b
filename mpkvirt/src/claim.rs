//! Who may run on a thread record's library stack: the protocol of the record's busy word.
//!
//! A thread finds its record through its GS base and tells it is its own by the record's
//! owner word (the FS base, i.e. the TCB, of the thread it was issued to). glibc hands the
//! TCB of an ended thread to a new one, and `register` re-issues the record of an ended
//! thread to another thread. So two threads can pass the owner check of one record: the
//! thread on the dead owner's TCB, and the record's new owner. Both running on the record's
//! stack would corrupt it.
//!
//! - **A caller** (the call gate, `callgate.S`, and [`claim`] for the cooperative paths)
//!   checks the owner, claims the busy word with an atomic swap, and checks the owner *again*.
//! - **`register`** re-issues a record only after claiming its busy word with a
//!   compare-exchange ([`claim_for_reissue`]); it writes the new owner while it holds the
//!   word and lets go ([`release`]) once the record is ready.
//!
//! The busy word orders the two: a caller whose swap came first makes the re-issue's
//! compare-exchange fail (the record is not taken); one whose swap came after the release
//! sees the new owner at its second check and lets go. A caller whose swap falls inside the
//! re-issue finds the word busy. The loom model below checks this against every
//! interleaving; the call gate's assembly follows the same steps.

use crate::primitive::Ordering;

/// A busy word: the record's (a `u32` of the gate record, seen as an atomic), or loom's.
pub(crate) trait BusyWord {
    fn swap(&self, v: u32, order: Ordering) -> u32;
    fn compare_exchange(
        &self,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u32, u32>;
    fn store(&self, v: u32, order: Ordering);
}

macro_rules! busy_word {
    ($t:ty) => {
        impl BusyWord for $t {
            fn swap(&self, v: u32, order: Ordering) -> u32 {
                <$t>::swap(self, v, order)
            }
            fn compare_exchange(
                &self,
                current: u32,
                new: u32,
                success: Ordering,
                failure: Ordering,
            ) -> Result<u32, u32> {
                <$t>::compare_exchange(self, current, new, success, failure)
            }
            fn store(&self, v: u32, order: Ordering) {
                <$t>::store(self, v, order)
            }
        }
    };
}

busy_word!(std::sync::atomic::AtomicU32);
#[cfg(loom)]
busy_word!(loom::sync::atomic::AtomicU32);

/// How claiming a record went.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Claim {
    /// The caller holds the word and is the record's owner.
    Held,
    /// Busy: an op of the record's thread is under way (a signal handler interrupted it), its
    /// thread died inside an op, or `register` is re-issuing it.
    Busy,
    /// Re-issued to another thread after the caller's first owner check; the word is free
    /// again.
    Lost,
}

/// Claims `busy` for the caller `me`, which found `owner()` equal to `me` before: swap, then
/// the owner again.
pub(crate) fn claim(busy: &impl BusyWord, owner: impl Fn() -> u64, me: u64) -> Claim {
    if busy.swap(1, Ordering::AcqRel) != 0 {
        return Claim::Busy;
    }
    if owner() != me {
        busy.store(0, Ordering::Release);
        return Claim::Lost;
    }
    Claim::Held
}

/// Claims `busy` of a record `register` would re-issue; `false` if anyone holds it.
pub(crate) fn claim_for_reissue(busy: &impl BusyWord) -> bool {
    busy.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// Lets go of `busy`: an op ended, or a re-issue is complete.
pub(crate) fn release(busy: &impl BusyWord) {
    busy.store(0, Ordering::Release);
}

/// # Safety
///
/// The model writes loom's `UnsafeCell` (the "library stack") through the raw pointer loom
/// hands out; loom checks that no two threads access it at once.
#[cfg(all(test, loom))]
#[allow(
    unsafe_code,
    reason = "loom's UnsafeCell is written through a raw pointer"
)]
mod loom_model {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU32, AtomicU64};
    use loom::thread;

    /// FS bases: the dead owner's TCB (reused by `OLD`'s thread) and the new owner's.
    const OLD: u64 = 1;
    const NEW: u64 = 2;

    struct Record {
        busy: AtomicU32,
        owner: AtomicU64,
        /// The library stack: loom reports two threads on it at once.
        stack: UnsafeCell<u64>,
    }

    /// One call of `me` through the gate: owner check, claim; on the stack while held.
    /// Returns whether it ran there.
    fn call(r: &Record, me: u64) -> bool {
        if r.owner.load(Ordering::Relaxed) != me {
            return false; // registers instead
        }
        match claim(&r.busy, || r.owner.load(Ordering::Relaxed), me) {
            Claim::Held => {
                // SAFETY: loom's cell checks that no other thread touches it meanwhile.
                r.stack.with_mut(|s| unsafe { *s = me });
                assert_eq!(
                    r.owner.load(Ordering::Relaxed),
                    me,
                    "ran on a record not its own"
                );
                release(&r.busy);
                true
            }
            Claim::Busy | Claim::Lost => false,
        }
    }

    /// A thread on the dead owner's TCB calls while another thread registers (and, if it got
    /// the record, calls): never both on the stack, never on a record that is not its own.
    #[test]
    fn a_record_is_never_run_on_by_two_threads() {
        loom::model(|| {
            let r = Arc::new(Record {
                busy: AtomicU32::new(0),
                owner: AtomicU64::new(OLD),
                stack: UnsafeCell::new(0),
            });
            let old = {
                let r = Arc::clone(&r);
                thread::spawn(move || call(&r, OLD))
            };
            let got = claim_for_reissue(&r.busy);
            if got {
                r.owner.store(NEW, Ordering::Relaxed);
                // SAFETY: as in `call` (re-issuing writes the record).
                r.stack.with_mut(|s| unsafe { *s = 0 });
                release(&r.busy);
                call(&r, NEW);
            }
            old.join().unwrap();
        });
    }
}
