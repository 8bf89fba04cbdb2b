//! The key cache's lock-free half: which domain each hardware key is bound to, and how many
//! threads currently hold it in their view (pins).
//!
//! # The protocol (invariant 2 of the design)
//!
//! A key may be handed to another domain only when no thread's PKRU grants it. A thread's
//! PKRU grants a key only between *pin* and *unpin*:
//!
//! ```text
//! enter (any thread, no lock)              evict (under the manager's lock)
//! ---------------------------              --------------------------------
//! s = domain.slot            (Acquire)     owner[s] = EVICTING        (SeqCst)
//! pins[s] += 1               (SeqCst)      if pins[s] != 0:           (SeqCst)
//! if owner[s] != domain:     (SeqCst)          owner[s] = victim; try another slot
//!     pins[s] -= 1; miss                   re-tag the victim's pages, then hand s on
//! ...WRPKRU granting s...
//! ...WRPKRU revoking s...
//! pins[s] -= 1               (Release)
//! ```
//!
//! With sequentially consistent pin/owner accesses on both sides (Dekker's pattern), either
//! the evictor sees the pin and gives up, or the pinner sees `EVICTING` (or the new owner) and
//! backs off; it cannot happen that both proceed. So a pinned, validated slot keeps its owner
//! until it is unpinned. `tests/loom.rs` checks this exhaustively over interleavings.
//!
//! Each pin also counts a *use* (the high 32 bits of the pin word), so the evictor can see
//! which keys were used since it last looked, for LRU bookkeeping, without the hit path
//! touching any shared structure besides the key's own cache line.

use crate::primitive::{AtomicU32, AtomicU64, Ordering, seqcst_fence_for_loom};

/// `owner` value of a free slot.
pub(crate) const FREE: u64 = 0;
/// `owner` value while the evictor checks for pins.
pub(crate) const EVICTING: u64 = u64::MAX;
/// `Domain::slot` value of a domain without a key.
pub(crate) const NO_SLOT: u32 = u32::MAX;

const PIN: u64 = 1;
const USE: u64 = 1 << 32;
const PIN_MASK: u64 = USE - 1;

/// One hardware key's shared state, on its own cache line(s) so threads using different keys
/// do not contend.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Slot {
    /// Uid of the bound domain, [`FREE`] or [`EVICTING`]. Written only under the manager's
    /// lock.
    owner: AtomicU64,
    /// Low 32 bits: pins; high 32 bits: uses (wrapping).
    pins: AtomicU64,
}

impl Slot {
    pub(crate) fn new() -> Slot {
        Slot {
            owner: AtomicU64::new(FREE),
            pins: AtomicU64::new(0),
        }
    }

    /// Pins the slot for domain `uid` if it is (still) bound to it. Lock-free; the hit path.
    #[inline]
    pub(crate) fn try_pin(&self, uid: u64) -> bool {
        self.pins.fetch_add(PIN | USE, Ordering::SeqCst);
        seqcst_fence_for_loom();
        if self.owner.load(Ordering::SeqCst) == uid {
            true
        } else {
            self.pins.fetch_sub(PIN, Ordering::Release);
            false
        }
    }

    /// Releases a pin taken by [`Slot::try_pin`] (after PKRU stopped granting the key).
    /// Returns `true` when this was the last pin.
    #[inline]
    pub(crate) fn unpin(&self) -> bool {
        // SeqCst: pairs with the waiter registration in the manager (see `Manager::unpin`).
        self.pins.fetch_sub(PIN, Ordering::SeqCst) & PIN_MASK == 1
    }

    /// Pins a slot whose owner cannot change meanwhile (the caller holds the manager's
    /// lock, under which alone owners change).
    pub(crate) fn pin_locked(&self) {
        self.pins.fetch_add(PIN | USE, Ordering::SeqCst);
    }

    /// The bound domain's uid, [`FREE`] or [`EVICTING`].
    #[cfg(all(test, loom))]
    pub(crate) fn owner(&self) -> u64 {
        self.owner.load(Ordering::SeqCst)
    }

    /// Current pin count.
    pub(crate) fn pin_count(&self) -> u64 {
        self.pins.load(Ordering::SeqCst) & PIN_MASK
    }

    /// The use counter (wraps); changes whenever the slot is pinned.
    pub(crate) fn uses(&self) -> u32 {
        (self.pins.load(Ordering::Relaxed) >> 32) as u32
    }

    /// Tries to take the slot from its current owner `uid` for re-binding: succeeds only if
    /// no thread has it pinned, and then no thread can pin it for `uid` any more. On failure
    /// the slot is left bound to `uid`. Call only under the manager's lock.
    pub(crate) fn try_claim(&self, uid: u64) -> bool {
        self.owner.store(EVICTING, Ordering::SeqCst);
        seqcst_fence_for_loom();
        if self.pins.load(Ordering::SeqCst) & PIN_MASK != 0 {
            self.owner.store(uid, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Publishes `uid` as the owner (after its pages are tagged with the key), or [`FREE`].
    /// Call only under the manager's lock.
    pub(crate) fn set_owner(&self, uid: u64) {
        self.owner.store(uid, Ordering::SeqCst);
    }
}

/// A domain's link to its slot: [`NO_SLOT`] or a slot index. Written under the manager's
/// lock, read by the hit path.
#[derive(Debug)]
pub(crate) struct SlotRef(AtomicU32);

impl SlotRef {
    pub(crate) fn new() -> SlotRef {
        SlotRef(AtomicU32::new(NO_SLOT))
    }

    #[inline]
    pub(crate) fn get(&self) -> Option<usize> {
        match self.0.load(Ordering::Acquire) {
            NO_SLOT => None,
            s => Some(s as usize),
        }
    }

    pub(crate) fn set(&self, slot: Option<usize>) {
        let v = slot.map_or(NO_SLOT, |s| {
            u32::try_from(s).expect("slot index fits in u32")
        });
        self.0.store(v, Ordering::Release);
    }
}

/// Model check of the pin/evict protocol: `RUSTFLAGS="--cfg loom" cargo test -p mpkvirt
/// --lib --release loom` (see `ci/loom.sh`). Every interleaving of two pinners and an
/// evictor is explored; a thread that validated its pin must never see the slot handed to
/// another domain before it unpins.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    const A: u64 = 1;
    const B: u64 = 2;

    fn pinner(slot: Arc<Slot>) -> thread::JoinHandle<bool> {
        thread::spawn(move || {
            if !slot.try_pin(A) {
                return false;
            }
            // While pinned for A the slot may be briefly EVICTING (an evictor that will back
            // off) but never bound to B.
            assert_ne!(slot.owner(), B, "re-bound while pinned");
            assert_ne!(slot.owner(), B, "re-bound while pinned");
            slot.unpin();
            true
        })
    }

    #[test]
    fn a_validated_pin_blocks_rebinding() {
        loom::model(|| {
            let slot = Arc::new(Slot::new());
            slot.set_owner(A);
            let p1 = pinner(Arc::clone(&slot));
            let p2 = pinner(Arc::clone(&slot));
            let evicted = slot.try_claim(A);
            if evicted {
                slot.set_owner(B);
            }
            let (a, b) = (p1.join().unwrap(), p2.join().unwrap());
            if evicted {
                // Nobody who pinned for A overlapped the claim... or they validated before it
                // and unpinned before it looked: both fine. Late pinners must have failed.
                assert_eq!(slot.owner(), B);
            } else {
                // The evictor backed off because of a pin, possibly the transient pin of a
                // pinner that then saw EVICTING and backed off too (both conservative).
                assert_eq!(slot.owner(), A, "a failed claim restores the owner");
            }
            let _ = (a, b);
            assert_eq!(slot.pin_count(), 0);
        });
    }

    #[test]
    fn a_claimed_slot_rejects_late_pinners() {
        loom::model(|| {
            let slot = Arc::new(Slot::new());
            slot.set_owner(A);
            let p = pinner(Arc::clone(&slot));
            if slot.try_claim(A) {
                slot.set_owner(B);
                // A pin for A that starts now must fail.
                assert!(!slot.try_pin(A));
            }
            p.join().unwrap();
        });
    }
}
