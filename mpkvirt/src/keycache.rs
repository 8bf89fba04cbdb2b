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

/// Model check of destroying a domain while another thread evicts it and a third enters it
/// through a stale binding (issue 7, item 1): `RUSTFLAGS="--cfg loom" cargo test -p mpkvirt
/// --lib --release loom` (`ci/test.sh loom`).
///
/// The manager's policy is restated here on the real [`Slot`], [`SlotRef`], [`ThreadPins`],
/// [`try_claim`] and [`validate`], with the manager's lock as a loom mutex:
///
/// - the *destroyer* of domain D takes D's key back as `manager/binding.rs::release_key`
///   does: D's slot is read under the lock, the lock is held across every claim attempt
///   (so nobody can evict D and bind the slot meanwhile), and a key that stays pinned is
///   retired (bound to nobody) rather than freed or left with the dead domain;
/// - the *evictor* binds a new domain N as `binding::bind` does: a free slot, else a retired
///   slot nobody pins any more, else D evicted (claim, park, then publish N);
/// - the *stale pinner* enters D's view on the hit path: it reads D's slot without the lock,
///   pins it, fences, validates, and unpins;
/// - afterwards the next miss binds a third domain M.
///
/// Invariants, checked at every release of the lock (owners change only under it) and by
/// the pinner while its validated pin stands: no slot is owned by two live domains; a free
/// or retired slot is one no live domain still believes it holds; no destroyed domain holds
/// or is listed with a key; a slot with a validated pin for D is never handed on (a retired
/// slot in particular is handed out only once unpinned). The old destroy (the slot captured
/// once, the lock dropped between attempts, the key left with the dead domain when the pin
/// stayed) breaks them, and the two `old_` models show that loom finds it.
///
/// The preemption bound defaults to 4 (`LOOM_MAX_PREEMPTIONS` overrides it): the bug needs
/// two. Bounded, the model runs in seconds; without a bound (`LOOM_MAX_PREEMPTIONS=100`)
/// it took 9 min 20 s on two cores and passed as well.
#[cfg(all(test, loom))]
mod loom_destroy {
    use super::*;
    use crate::primitive::Mutex;
    use loom::sync::Arc;
    use loom::thread;
    use std::sync::atomic::{AtomicUsize as StdCount, Ordering as StdOrdering};

    /// Domain uids; a domain's index in [`Table::refs`] is `uid - 1`.
    const D: u64 = 1;
    const N: u64 = 2;
    const M: u64 = 3;
    const DOMAINS: usize = 3;
    /// One key: every binding of N or M must take D's.
    const SLOTS: usize = 1;
    /// Claim attempts of a destroy (the library makes 16; two already let a transient pin
    /// go away between them).
    const ATTEMPTS: usize = 2;

    fn idx(uid: u64) -> usize {
        (uid - 1) as usize
    }

    /// What the manager's lock protects.
    struct Inner {
        /// `Inner::bound`: the domain each slot is listed under.
        bound: [Option<u64>; SLOTS],
        destroyed: [bool; DOMAINS],
    }

    struct Table {
        slots: [Slot; SLOTS],
        /// Each domain's `DomainRec::slot` (written under the lock, read by the hit path
        /// without it).
        refs: [SlotRef; DOMAINS],
        /// The pin cell of the thread that enters D's view (the only registered thread).
        pins: ThreadPins,
        inner: Mutex<Inner>,
        /// Paths taken, over every execution of one model (not a loom object: loom does not
        /// explore it).
        seen: std::sync::Arc<Counts>,
    }

    impl Table {
        /// D bound to slot 0; N and M unbound.
        fn new(seen: std::sync::Arc<Counts>) -> Table {
            let t = Table {
                slots: std::array::from_fn(|_| Slot::new()),
                refs: std::array::from_fn(|_| SlotRef::new()),
                pins: ThreadPins::new(),
                inner: Mutex::new(Inner {
                    bound: [Some(D)],
                    destroyed: [false; DOMAINS],
                }),
                seen,
            };
            t.refs[idx(D)].set(Some(0));
            t.slots[0].set_owner(D);
            t
        }

        fn claim(&self, s: usize, owner: u64) -> bool {
            try_claim(&self.slots, s, owner, [&self.pins], || {
                fence(Ordering::SeqCst)
            })
        }
    }

    /// Which paths the executions took (over all of them), so that the model shows it
    /// reached the interleavings it is about.
    #[derive(Clone, Copy)]
    enum Seen {
        /// Destroy found D already evicted.
        DestroyNotBound,
        DestroyFreed,
        /// Destroy retired the key: a pin stayed over every attempt.
        DestroyRetired,
        /// The evictor took the key from D.
        EvictedD,
        /// The evictor took a retired key (its pin was gone).
        ReusedRetired,
        /// The evictor found every key pinned or retired and pinned: nothing bound.
        Busy,
        /// The pinner held a validated pin.
        Validated,
        /// The pinner read a stale binding and backed off.
        BackedOff,
    }
    const SEEN: usize = 8;
    type Counts = [StdCount; SEEN];

    impl Table {
        fn saw(&self, what: Seen) {
            self.seen[what as usize].fetch_add(1, StdOrdering::Relaxed);
        }
    }

    /// The invariants, in a state the lock makes stable (all owner words are written under
    /// it).
    fn check(t: &Table, inner: &Inner) {
        let live = |uid: u64| !inner.destroyed[idx(uid)];
        for s in 0..SLOTS {
            let owner = t.slots[s].owner_locked();
            let holders: Vec<u64> = [D, N, M]
                .into_iter()
                .filter(|&u| live(u) && t.refs[idx(u)].get() == Some(s))
                .collect();
            assert!(
                holders.len() <= 1,
                "keycache invariant: slot {s} owned by two live domains {holders:?} (owner word {owner})"
            );
            match owner {
                FREE | RETIRED | DEAD => {
                    assert!(
                        holders.is_empty(),
                        "keycache invariant: slot {s} is free or retired (owner word {owner}) while domain {holders:?} still believes it holds it"
                    );
                    assert_eq!(
                        inner.bound[s], None,
                        "keycache invariant: slot {s} is unbound but listed under a domain"
                    );
                }
                EVICTING => panic!("keycache invariant: slot {s} left EVICTING"),
                uid => {
                    assert!(
                        live(uid),
                        "keycache invariant: slot {s} stays bound to destroyed domain {uid}"
                    );
                    assert_eq!(
                        holders,
                        [uid],
                        "keycache invariant: slot {s} is bound to {uid} but held by {holders:?}"
                    );
                    assert_eq!(inner.bound[s], Some(uid));
                }
            }
        }
        for u in [D, N, M].into_iter().filter(|&u| !live(u)) {
            assert_eq!(
                t.refs[idx(u)].get(),
                None,
                "keycache invariant: destroyed domain {u} holds a slot"
            );
            assert!(
                !inner.bound.contains(&Some(u)),
                "keycache invariant: a key is listed under destroyed domain {u}"
            );
        }
    }

    /// `binding::release_key` (today's): the slot read under the lock, every attempt under
    /// the same lock, retired when the pin stays.
    fn destroy_today(t: &Table, check_each: bool) {
        let mut inner = t.inner.lock().unwrap();
        match t.refs[idx(D)].get() {
            None => t.saw(Seen::DestroyNotBound),
            Some(s) => {
                let owner = t.slots[s].owner_locked();
                let mut claimed = false;
                if owner & !DRAINING == D {
                    for attempt in 0..ATTEMPTS {
                        if attempt > 0 {
                            // `claim_patiently` yields with the lock held.
                            thread::yield_now();
                        }
                        // Nobody can re-bind the slot while we hold the lock.
                        assert_eq!(t.refs[idx(D)].get(), Some(s));
                        if t.claim(s, owner) {
                            claimed = true;
                            break;
                        }
                    }
                }
                t.refs[idx(D)].set(None);
                inner.bound[s] = None;
                if claimed {
                    t.slots[s].set_owner(FREE);
                    t.saw(Seen::DestroyFreed);
                } else {
                    t.slots[s].set_owner(RETIRED);
                    t.saw(Seen::DestroyRetired);
                }
            }
        }
        inner.destroyed[idx(D)] = true;
        if check_each {
            check(t, &inner);
        }
    }

    /// The destroy before issue 7's fix: the slot captured once, the lock dropped between
    /// attempts, and a key that stayed pinned left with the dead domain.
    fn destroy_old(t: &Table, check_each: bool) {
        let mut inner = t.inner.lock().unwrap();
        let slot = t.refs[idx(D)].get();
        match slot {
            None => t.saw(Seen::DestroyNotBound),
            Some(s) => {
                let mut claimed = false;
                for attempt in 0..ATTEMPTS {
                    if attempt > 0 {
                        drop(inner);
                        thread::yield_now();
                        inner = t.inner.lock().unwrap();
                    }
                    if t.claim(s, D) {
                        claimed = true;
                        break;
                    }
                }
                if claimed {
                    t.refs[idx(D)].set(None);
                    t.slots[s].set_owner(FREE);
                    inner.bound[s] = None;
                    t.saw(Seen::DestroyFreed);
                } else {
                    t.saw(Seen::DestroyRetired);
                }
            }
        }
        inner.destroyed[idx(D)] = true;
        if check_each {
            check(t, &inner);
        }
    }

    /// `binding::bind` of `uid` under the lock: a free slot, a retired one nobody pins, or
    /// the key of an unpinned victim (parked first). `false` when every key is busy.
    fn bind(t: &Table, inner: &mut Inner, uid: u64) -> bool {
        let free =
            (0..SLOTS).find(|&s| t.slots[s].owner_locked() == FREE && inner.bound[s].is_none());
        let retired =
            || (0..SLOTS).find(|&s| t.slots[s].owner_locked() == RETIRED && t.claim(s, RETIRED));
        let evict = |inner: &mut Inner| {
            for s in 0..SLOTS {
                if let Some(v) = inner.bound[s]
                    && t.slots[s].owner_locked() == v
                    && t.claim(s, v)
                {
                    // Park the victim, then free the slot.
                    t.refs[idx(v)].set(None);
                    t.slots[s].set_owner(FREE);
                    inner.bound[s] = None;
                    return Some((s, v));
                }
            }
            None
        };
        let s = match free {
            Some(s) => s,
            None => match retired() {
                Some(s) => {
                    t.saw(Seen::ReusedRetired);
                    s
                }
                None => match evict(inner) {
                    Some((s, v)) => {
                        if v == D {
                            t.saw(Seen::EvictedD);
                        }
                        s
                    }
                    None => return false,
                },
            },
        };
        t.refs[idx(uid)].set(Some(s));
        t.slots[s].set_owner(uid);
        inner.bound[s] = Some(uid);
        true
    }

    fn evictor(t: &Table, check_each: bool) {
        let mut inner = t.inner.lock().unwrap();
        if !bind(t, &mut inner, N) {
            t.saw(Seen::Busy);
        }
        if check_each {
            check(t, &inner);
        }
    }

    /// The hit path entering D's view with whatever binding it reads, without the lock.
    fn stale_pinner(t: &Table) {
        let Some(s) = t.refs[idx(D)].get() else {
            return;
        };
        assert!(t.pins.pin_unvalidated(s));
        light_fence(FenceMode::Symmetric);
        if validate(&t.slots, s, D) {
            t.saw(Seen::Validated);
            // The key grants D's pages now: it may be retired (D destroyed under the view)
            // or transiently EVICTING (a claim about to back off), never handed on.
            let owner = t.slots[s].owner();
            assert!(
                owner == D || owner == EVICTING || owner == RETIRED,
                "keycache invariant: slot {s} handed to {owner} while a validated pin for D stands"
            );
        } else {
            t.saw(Seen::BackedOff);
        }
        t.pins.unpin(s);
    }

    fn model(destroy: fn(&Table, bool), check_each: bool) -> Vec<usize> {
        let counts: std::sync::Arc<Counts> =
            std::sync::Arc::new(std::array::from_fn(|_| StdCount::new(0)));
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(4);
        }
        let seen = std::sync::Arc::clone(&counts);
        builder.check(move || {
            let t = Arc::new(Table::new(std::sync::Arc::clone(&seen)));
            let spawn = |f: fn(&Table, bool)| {
                let t = Arc::clone(&t);
                thread::spawn(move || f(&t, check_each))
            };
            let threads = [
                spawn(destroy),
                spawn(evictor),
                spawn(|t, _| stale_pinner(t)),
            ];
            for h in threads {
                h.join().unwrap();
            }
            // The next miss gives the key to a third domain.
            let mut inner = t.inner.lock().unwrap();
            bind(&t, &mut inner, M);
            check(&t, &inner);
            assert!(!t.pins.pinned(0));
        });
        counts
            .iter()
            .map(|c| c.load(StdOrdering::Relaxed))
            .collect()
    }

    /// Every path the model is about was taken at least once.
    fn assert_coverage(counts: &[usize]) {
        for (what, &n) in [
            "destroy found D evicted",
            "destroy freed the key",
            "destroy retired the key",
            "the evictor took D's key",
            "the evictor reused a retired key",
            "the evictor found every key busy",
            "a validated pin",
            "a stale pin backed off",
        ]
        .iter()
        .zip(counts)
        {
            assert!(n > 0, "no execution where {what} (counts {counts:?})");
        }
    }

    #[test]
    fn loom_destroy_evict_and_a_stale_pin_keep_one_owner_per_key() {
        let counts = model(destroy_today, true);
        assert_coverage(&counts);
    }

    /// The old destroy frees the slot the evictor just gave N, while N still believes it
    /// holds it (or leaves the key listed under the dead domain).
    #[test]
    #[should_panic(expected = "keycache invariant")]
    fn loom_old_destroy_breaks_the_binding() {
        model(destroy_old, true);
    }

    /// ...and the next miss then gives that key to M as well: entering N grants M's pages.
    #[test]
    #[should_panic(expected = "owned by two live domains")]
    fn loom_old_destroy_gives_one_key_to_two_live_domains() {
        model(destroy_old, false);
    }
}
