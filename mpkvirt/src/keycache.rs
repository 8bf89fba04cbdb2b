//! The key cache's lock-free half: which domain each hardware key is bound to, and which
//! threads currently hold it in a view (pins).
//!
//! # The protocol (invariant 2 in `ARCHITECTURE.md`)
//!
//! A key may be handed to another domain only when no thread's PKRU grants it. A thread's
//! PKRU grants a key only between *pin* and *unpin*. Each thread pins in its own
//! [`ThreadPins`] cell — a word per key, pin count and use counter, written only by that
//! thread — so the hit path
//! makes no atomic read-modify-write and threads never contend on a shared counter:
//!
//! ```text
//! enter (any thread, no lock)               evict (under the manager's lock)
//! ---------------------------               --------------------------------
//! s = domain.slot            (Acquire)      owner[s] = EVICTING          (SeqCst)
//! mine.pins[s] += 1          (plain store)  HEAVY FENCE
//! LIGHT FENCE                               if any thread's pins[s] != 0:
//! if owner[s] != domain:                        owner[s] = victim; try another slot
//!     mine.pins[s] -= 1; miss               park the victim's pages, then hand s on
//! ...WRPKRU granting s...
//! ...WRPKRU revoking s...
//! mine.pins[s] -= 1          (Release)
//! ```
//!
//! This is Dekker's pattern: each side stores, fences, then loads what the other stores, so
//! at least one of them sees the other and backs off. The fences come in two
//! [`FenceMode`]s:
//!
//! - **Asymmetric** (when the kernel has `membarrier(2)`): the light fence is a compiler
//!   fence, the heavy one is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every
//!   running thread of the process execute a full barrier before it returns (threads not
//!   running pass one when scheduled). The hit path then has no barrier instruction at all;
//!   an eviction pays one system call more.
//! - **Symmetric**: both fences are `fence(SeqCst)`.
//!
//! Each pin also counts a *use* in the thread's cell, so the evictor can tell which keys were
//! used since it last looked (LRU bookkeeping) without the hit path touching shared state.
//!
//! The loom model at the bottom checks the symmetric protocol exhaustively; the asymmetric
//! one rests on membarrier's guarantee that it orders like a fence on every other thread.

use crate::primitive::{AtomicU32, AtomicU64, Ordering, compiler_fence, fence};

/// `owner` value of a free slot.
pub(crate) const FREE: u64 = 0;
/// `owner` value while the evictor checks for pins.
pub(crate) const EVICTING: u64 = u64::MAX;
/// `owner` value of a slot whose domain was destroyed while a view (forgotten, or of a thread
/// that has not backed off yet) still pinned it: bound to nobody, and free again once no
/// thread pins it (`try_claim(.., RETIRED, ..)`).
pub(crate) const RETIRED: u64 = u64::MAX - 1;
/// `owner` value of a slot that can never be used again (its pages could not be parked).
pub(crate) const DEAD: u64 = u64::MAX - 2;
/// Bit set in `owner` while a waiter drains the slot: pins for the owner fail (new users
/// queue behind the waiter) until the slot is claimed or the drain is abandoned.
pub(crate) const DRAINING: u64 = 1 << 63;
/// `Domain::slot` value of a domain without a key.
pub(crate) const NO_SLOT: u32 = u32::MAX;
/// Slots a cache can have (one per PKRU key).
pub(crate) const MAX_SLOTS: usize = 16;

/// How the pin/evict handshake is fenced (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum FenceMode {
    /// Compiler fence on the hit path, `membarrier` on eviction.
    Asymmetric,
    /// `fence(SeqCst)` on both sides.
    Symmetric,
}

/// One hardware key's binding, on its own cache line(s).
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Slot {
    /// Uid of the bound domain, [`FREE`] or [`EVICTING`]. Written only under the manager's
    /// lock.
    owner: AtomicU64,
}

impl Slot {
    pub(crate) fn new() -> Slot {
        Slot {
            owner: AtomicU64::new(FREE),
        }
    }

    /// The bound domain's uid, [`FREE`] or [`EVICTING`].
    #[cfg(all(test, loom))]
    pub(crate) fn owner(&self) -> u64 {
        self.owner.load(Ordering::SeqCst)
    }

    /// Publishes `uid` as the owner (after its pages are tagged with the key), or [`FREE`].
    /// Call only under the manager's lock.
    pub(crate) fn set_owner(&self, uid: u64) {
        self.owner.store(uid, Ordering::SeqCst);
    }

    /// The owner word (uid, [`FREE`], [`RETIRED`], [`DEAD`], possibly with [`DRAINING`]).
    /// Stable under the manager's lock.
    pub(crate) fn owner_locked(&self) -> u64 {
        self.owner.load(Ordering::Relaxed)
    }
}

/// A thread's pins: how many of its live views use each slot, and a use counter per slot,
/// packed in one word per slot (low byte: pins; the rest: uses, wrapping). Written only by
/// its thread (plain loads and stores); read by evictors.
#[repr(align(64))]
#[derive(Debug)]
pub(crate) struct ThreadPins {
    words: [AtomicU32; MAX_SLOTS],
}

const PIN: u32 = 1;
const USE: u32 = 1 << 8;
const PIN_MASK: u32 = USE - 1;

impl ThreadPins {
    pub(crate) fn new() -> ThreadPins {
        ThreadPins {
            words: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// Adds a pin on `slot` and counts a use; `false` (nothing changed) when the thread
    /// already holds the maximum of 255 pins on it. Owner thread only.
    #[inline]
    fn add(&self, slot: usize) -> bool {
        let w = self.words[slot].load(Ordering::Relaxed);
        if w & PIN_MASK == PIN_MASK {
            return false;
        }
        self.words[slot].store(w.wrapping_add(PIN | USE), Ordering::Relaxed);
        true
    }

    /// Removes a pin on `slot`. Owner thread only; call after PKRU stopped granting the key.
    #[inline]
    pub(crate) fn unpin(&self, slot: usize) {
        let w = self.words[slot].load(Ordering::Relaxed);
        self.words[slot].store(w - PIN, Ordering::Release);
    }

    /// Pins `slot` for domain `uid` if the slot is (still) bound to it: the hit path's
    /// protocol for one slot (the manager batches several pins under one fence).
    #[cfg(all(test, loom))]
    #[inline]
    pub(crate) fn try_pin(&self, slots: &[Slot], slot: usize, uid: u64, mode: FenceMode) -> bool {
        if !self.add(slot) {
            return false;
        }
        light_fence(mode);
        if slots[slot].owner.load(Ordering::SeqCst) == uid {
            true
        } else {
            self.unpin(slot);
            false
        }
    }

    /// Pins a slot whose owner cannot change meanwhile (the caller holds the manager's lock,
    /// under which alone owners change); `false` when the thread's pins on it are at the
    /// maximum.
    pub(crate) fn pin_locked(&self, slot: usize) -> bool {
        self.add(slot)
    }

    /// Whether this thread holds `slot`.
    pub(crate) fn pinned(&self, slot: usize) -> bool {
        self.words[slot].load(Ordering::Acquire) & PIN_MASK != 0
    }

    /// The slots this thread holds, as a mask.
    pub(crate) fn pinned_mask(&self) -> u16 {
        (0..MAX_SLOTS).fold(0, |m, s| if self.pinned(s) { m | (1 << s) } else { m })
    }

    /// Adds a pin on `slot` without validating the owner: the hit path pins every domain of a
    /// view first, then fences once and validates them all ([`validate`]). Owner thread only;
    /// `false` when the thread already holds the maximum of 255 pins on it.
    #[inline]
    pub(crate) fn pin_unvalidated(&self, slot: usize) -> bool {
        self.add(slot)
    }

    /// This thread's use counter of `slot` (wraps).
    pub(crate) fn uses(&self, slot: usize) -> u32 {
        self.words[slot].load(Ordering::Relaxed) >> 8
    }
}

/// The light half of the fence, for the hit path's batch of pins (see [`FenceMode`]).
#[inline]
pub(crate) fn light_fence(mode: FenceMode) {
    match mode {
        FenceMode::Asymmetric => compiler_fence(Ordering::SeqCst),
        FenceMode::Symmetric => fence(Ordering::SeqCst),
    }
}

/// Tries to take `slot` from its owner `uid` for re-binding: succeeds only if no thread in
/// `threads` has it pinned, and then no thread can pin it for `uid` any more. On failure the
/// slot is left bound to `uid`. `heavy_fence` is `membarrier` in asymmetric mode, a SeqCst
/// fence otherwise. Call only under the manager's lock, with every live thread's pins.
pub(crate) fn try_claim<'a>(
    slots: &[Slot],
    slot: usize,
    uid: u64,
    threads: impl IntoIterator<Item = &'a ThreadPins>,
    heavy_fence: impl FnOnce(),
) -> bool {
    slots[slot].owner.store(EVICTING, Ordering::SeqCst);
    heavy_fence();
    if threads.into_iter().any(|t| t.pinned(slot)) {
        slots[slot].owner.store(uid, Ordering::SeqCst);
        return false;
    }
    true
}

/// Whether `slot` is (still) bound to `uid`, read after the pins and the light fence.
#[inline]
pub(crate) fn validate(slots: &[Slot], slot: usize, uid: u64) -> bool {
    slots[slot].owner.load(Ordering::SeqCst) == uid
}

/// Whether a thread's registration in an evictor's list is still current.
///
/// Evictors look only at the pins of *registered* threads, so that a miss does not sweep
/// every thread that ever used the manager. An evictor drops a thread that holds no pin:
/// it clears the registration, runs its heavy fence, and removes the thread only if it still
/// holds no pin. The hit path checks the registration after its pins and its light fence; a
/// thread that finds it cleared re-registers under the manager's lock before it trusts its
/// pins. Dekker's pattern once more: either the evictor sees the new pin and keeps the
/// thread, or the thread sees the cleared registration.
#[derive(Debug)]
pub(crate) struct Registered(AtomicU32);

impl Registered {
    pub(crate) fn new() -> Registered {
        Registered(AtomicU32::new(0))
    }

    /// Whether evictors see this thread's pins (read by the thread itself, after its light
    /// fence).
    #[inline]
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }

    /// Marks the thread registered (under the manager's lock, when it joins the list).
    pub(crate) fn set(&self) {
        self.0.store(1, Ordering::SeqCst);
    }

    /// Marks it unregistered (the evictor, before its heavy fence).
    pub(crate) fn clear(&self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

/// A domain's link to its slot: [`NO_SLOT`] or a slot index. Written under the manager's
/// lock, read by the hit path.
#[derive(Debug)]
pub(crate) struct SlotRef(AtomicU32);

impl Default for SlotRef {
    fn default() -> SlotRef {
        SlotRef::new()
    }
}

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

    /// The word itself (tests that attack library memory write it from outside).
    #[cfg(feature = "testing")]
    pub(crate) fn word(&self) -> &AtomicU32 {
        &self.0
    }

    pub(crate) fn set(&self, slot: Option<usize>) {
        let v = slot.map_or(NO_SLOT, |s| {
            u32::try_from(s).expect("slot index fits in u32")
        });
        self.0.store(v, Ordering::Release);
    }
}

/// Model check of the pin/evict protocol (symmetric fences): `RUSTFLAGS="--cfg loom" cargo
/// test -p mpkvirt --lib --release loom` (`ci/test.sh loom`). Every interleaving of two
/// pinning threads and an evictor is explored; a thread that validated its pin must never
/// see the slot handed to another domain before it unpins.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    const A: u64 = 1;
    const B: u64 = 2;

    fn pinner(slots: Arc<[Slot; 1]>, mine: Arc<ThreadPins>) -> thread::JoinHandle<bool> {
        thread::spawn(move || {
            if !mine.try_pin(&slots[..], 0, A, FenceMode::Symmetric) {
                return false;
            }
            // While pinned for A the slot may be briefly EVICTING (an evictor that will back
            // off) but never bound to B.
            assert_ne!(slots[0].owner(), B, "re-bound while pinned");
            mine.unpin(0);
            true
        })
    }

    #[test]
    fn a_validated_pin_blocks_rebinding() {
        loom::model(|| {
            let slots = Arc::new([Slot::new()]);
            slots[0].set_owner(A);
            let (t1, t2) = (Arc::new(ThreadPins::new()), Arc::new(ThreadPins::new()));
            let p1 = pinner(Arc::clone(&slots), Arc::clone(&t1));
            let p2 = pinner(Arc::clone(&slots), Arc::clone(&t2));
            let evicted = try_claim(&slots[..], 0, A, [&*t1, &*t2], || fence(Ordering::SeqCst));
            if evicted {
                slots[0].set_owner(B);
            }
            p1.join().unwrap();
            p2.join().unwrap();
            // A failed claim restores the owner (it failed because of a pin, possibly the
            // transient pin of a pinner that then saw EVICTING and backed off too).
            assert_eq!(slots[0].owner(), if evicted { B } else { A });
            assert!(!t1.pinned(0) && !t2.pinned(0));
        });
    }

    #[test]
    fn a_claimed_slot_rejects_late_pinners() {
        loom::model(|| {
            let slots = Arc::new([Slot::new()]);
            slots[0].set_owner(A);
            let t1 = Arc::new(ThreadPins::new());
            let p = pinner(Arc::clone(&slots), Arc::clone(&t1));
            let late = ThreadPins::new();
            if try_claim(&slots[..], 0, A, [&*t1, &late], || fence(Ordering::SeqCst)) {
                slots[0].set_owner(B);
                // A pin for A that starts now must fail.
                assert!(!late.try_pin(&slots[..], 0, A, FenceMode::Symmetric));
            }
            p.join().unwrap();
        });
    }
}
