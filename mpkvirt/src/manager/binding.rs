//! Binding domains to keys, under the manager's lock: free keys, retired keys coming back,
//! evicting a victim the policy picks, draining keys for waiters, and taking a destroyed
//! domain's key back.
//!
//! Invariant 2 (`ARCHITECTURE.md`): a key is handed to another domain only when no thread's
//! view pins it. Every hand-over goes through [`claim`] (`keycache::try_claim`: EVICTING,
//! heavy fence, look at every registered thread's pins), and the victim's pages are parked
//! before the new owner is published.

use mpkvirt_sys::membarrier;

use crate::backend::Backend;
use crate::backend::sealed::LiveOps;
use crate::error::{Error, Result};
use crate::keycache::{self, DEAD, DRAINING, EVICTING, FREE, FenceMode, RETIRED};
use crate::policy::Policy;

use super::shared::{DomRef, DomainRec, Inner, Shared, SlotIter, ThreadCx};

/// The heavy half of the pin/evict fence. `false` when `membarrier` failed after it was
/// registered: then pins seen may be stale, and nothing may be handed on.
pub(crate) fn heavy_fence(mode: FenceMode) -> bool {
    match mode {
        // Every running thread executes a barrier before this returns: their pins stored
        // before it are visible to the loads that follow.
        FenceMode::Asymmetric => membarrier::private_expedited().is_ok(),
        FenceMode::Symmetric => {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            true
        }
    }
}

/// The process's fence mode: asymmetric once `membarrier` is registered (it is
/// process-wide, so every manager uses the same mode). Inside the library only; kept in the
/// root (library memory), so a stray write cannot make one side of the protocol skip its
/// fence.
pub(crate) fn process_fence() -> FenceMode {
    let mode = &crate::meta::root().fence_mode;
    match mode.load(std::sync::atomic::Ordering::Relaxed) {
        1 => FenceMode::Asymmetric,
        2 => FenceMode::Symmetric,
        _ => {
            // Registering twice (threads racing here) is harmless; both find the same answer.
            let (m, code) = if membarrier::register_private_expedited().is_ok() {
                (FenceMode::Asymmetric, 1)
            } else {
                (FenceMode::Symmetric, 2)
            };
            mode.store(code, std::sync::atomic::Ordering::Relaxed);
            m
        }
    }
}

/// The registered threads' pin cells.
fn threads<'a>(inner: &'a Inner) -> impl Iterator<Item = &'a ThreadCx> + Clone + 'a {
    // SAFETY-free: `Inner::threads` holds pointers to live cxs (see its Send impl): a thread
    // removes its cx under the lock before freeing it, and we hold the lock.
    inner.threads.iter().map(|&p| deref_cx(p))
}

/// A registered cx (see [`threads`]).
pub(crate) fn deref_cx<'a>(p: *const ThreadCx) -> &'a ThreadCx {
    super::cx_ref(p)
}

/// Takes slot `s` from `owner` if no registered thread pins it (see
/// `keycache::try_claim`). On failure the owner word is restored.
pub(crate) fn claim<B: Backend>(sh: &Shared<B>, inner: &Inner, s: usize, owner: u64) -> bool {
    claim_with(sh, inner, s, owner, || {}).0
}

/// [`claim`], running `before_fence` between the EVICTING store and the heavy fence (so that
/// stores it makes are ordered by the same fence). Returns whether the slot was claimed and
/// whether the fence worked.
fn claim_with<B: Backend>(
    sh: &Shared<B>,
    inner: &Inner,
    s: usize,
    owner: u64,
    before_fence: impl FnOnce(),
) -> (bool, bool) {
    let mut fenced = true;
    let fence = sh.fence;
    let claimed = keycache::try_claim(&sh.slots, s, owner, threads(inner).map(|t| &t.pins), || {
        before_fence();
        fenced = heavy_fence(fence);
    });
    if !fenced {
        // Without the barrier the pins seen may be stale: nothing is handed on.
        if claimed {
            sh.slots[s].set_owner(owner);
        }
        return (false, false);
    }
    (claimed, true)
}

/// [`claim`], retried a few times: a pin seen may be transient (a thread that read a stale
/// binding and is about to back off without the lock).
pub(crate) fn claim_patiently<B: Backend>(
    sh: &Shared<B>,
    inner: &Inner,
    s: usize,
    owner: u64,
) -> bool {
    for attempt in 0..16 {
        if attempt > 0 {
            std::thread::yield_now();
        }
        if claim(sh, inner, s, owner) {
            return true;
        }
    }
    false
}

/// First half of dropping idle threads from the evictors' list (see
/// `keycache::Registered`): threads that hold no pin *and* entered no view since the last
/// miss looked at them are marked unregistered. The heavy fence of the claim that follows
/// orders these stores; [`prune_end`] then drops the threads that still hold no pin. A miss
/// thus costs O(threads in use), not O(threads that ever used the manager), while threads
/// that are busy between two views stay registered and keep their hit path.
fn prune_begin(inner: &Inner, me: *const ThreadCx) -> bool {
    let mut cleared = false;
    for t in threads(inner).filter(|&t| !std::ptr::eq(t, me)) {
        let activity =
            (0..crate::keycache::MAX_SLOTS).fold(0u32, |a, s| a.wrapping_add(t.pins.uses(s)));
        let seen = t
            .seen_activity
            .swap(activity, std::sync::atomic::Ordering::Relaxed);
        if seen == activity && t.pins.pinned_mask() == 0 {
            t.registered.clear();
            cleared = true;
        }
    }
    cleared
}

/// Second half (after the heavy fence): threads that pinned meanwhile stay registered.
fn prune_end(inner: &mut Inner, fenced: bool) {
    inner.threads.retain(|&p| {
        let t = deref_cx(p);
        if !fenced || t.pins.pinned_mask() != 0 {
            t.registered.set();
        }
        t.registered.is_set()
    });
}

/// Feeds the policy the uses of each key since the last sweep (hits do not touch the
/// policy; each thread counts its uses in its own cell).
pub(crate) fn sweep_uses<B: Backend>(sh: &Shared<B>, inner: &mut Inner) {
    for s in 0..sh.nkeys {
        let uses = threads(inner).fold(0u32, |acc, t| acc.wrapping_add(t.pins.uses(s)));
        if inner.bound[s].is_some() && uses != inner.seen_uses[s] {
            inner.seen_uses[s] = uses;
            inner.policy.touch(s);
        }
    }
}

/// What [`bind`] could do.
pub(crate) enum Bound {
    /// The domain holds this slot now.
    Slot(usize),
    /// Every key is in use by views (or drained for someone else); nothing changed.
    Busy,
}

/// Slots that can never hold a domain again.
pub(crate) fn dead_slots<B: Backend>(sh: &Shared<B>) -> u16 {
    (0..sh.nkeys).fold(0, |m, s| {
        if sh.slots[s].owner_locked() == DEAD {
            m | (1 << s)
        } else {
            m
        }
    })
}

/// Binds domain `d` (record `rec`) for the calling thread `me` (never pruned here) to a key: a free one, a retired one nobody pins any more,
/// or one taken from an unpinned victim the policy picks, which `evictable` accepts and which
/// is not in `exclude` (slots of the view being entered) or being drained. The victim's pages
/// are parked before the key is handed on.
pub(crate) fn bind<B: Backend>(
    sh: &Shared<B>,
    inner: &mut Inner,
    me: *const ThreadCx,
    d: DomRef,
    rec: &DomainRec,
    exclude: u16,
    evictable: impl Fn(u64) -> bool,
) -> Result<Bound> {
    let n = sh.nkeys;
    let free = (0..n).find(|&s| sh.slots[s].owner_locked() == FREE && inner.bound[s].is_none());
    let slot = match free {
        Some(s) => s,
        None => {
            let retired = (0..n)
                .find(|&s| sh.slots[s].owner_locked() == RETIRED && claim(sh, inner, s, RETIRED));
            match retired {
                Some(s) => s,
                None => match evict(sh, inner, me, exclude, &evictable)? {
                    Some(s) => s,
                    None => return Ok(Bound::Busy),
                },
            }
        }
    };
    // The slot is free and claimed (owner EVICTING, or FREE): tag the pages, then publish.
    if let Err(e) = sh
        .live
        .tag(rec.base(), rec.len(), rec.prot(), Some(sh.key(slot)))
    {
        sh.slots[slot].set_owner(FREE);
        return Err(e);
    }
    rec.slot.set(Some(slot));
    sh.slots[slot].set_owner(d.uid);
    inner.bound[slot] = Some(d);
    inner.bindings += 1;
    inner.bound_at[slot] = inner.bindings;
    inner.policy.bind(slot, d.uid);
    inner.stats.misses += 1;
    Ok(Bound::Slot(slot))
}

/// Picks and takes a victim's key (see [`bind`]); `None` when every candidate is pinned.
fn evict<B: Backend>(
    sh: &Shared<B>,
    inner: &mut Inner,
    me: *const ThreadCx,
    exclude: u16,
    evictable: &impl Fn(u64) -> bool,
) -> Result<Option<usize>> {
    // Domains with process-wide rights keep their keys.
    let mut tried = exclude | inner.draining | inner.global_pins | inner.tainted;
    let mut pruned = false;
    loop {
        let mut candidates = [0usize; 16];
        let mut nc = 0;
        for s in 0..sh.nkeys {
            if tried & (1 << s) == 0
                && let Some(v) = inner.bound[s]
                && sh.slots[s].owner_locked() == v.uid
                && evictable(v.uid)
            {
                candidates[nc] = s;
                nc += 1;
            }
        }
        if nc == 0 {
            return Ok(None);
        }
        let v = inner.policy.victim(&candidates[..nc]);
        tried |= 1 << v;
        let victim = inner.bound[v].expect("candidates are bound");
        let claimed = if pruned {
            claim(sh, inner, v, victim.uid)
        } else {
            // The first claim of a miss also drops idle threads, under the same fence.
            pruned = true;
            let mut cleared = false;
            let (claimed, fenced) = claim_with(sh, inner, v, victim.uid, || {
                cleared = prune_begin(inner, me)
            });
            if cleared {
                prune_end(inner, fenced);
            }
            claimed
        };
        if !claimed {
            continue; // pinned by some thread's view
        }
        park(sh, inner, v, victim)?;
        inner.stats.evictions += 1;
        return Ok(Some(v));
    }
}

/// Parks the domain bound to claimed slot `s` (owner EVICTING) and frees the slot: its pages
/// get no access and key 0 *before* the key can be handed on. On failure the binding is
/// restored.
pub(crate) fn park<B: Backend>(
    sh: &Shared<B>,
    inner: &mut Inner,
    s: usize,
    victim: DomRef,
) -> Result<()> {
    let Some(rec) = sh.domain(victim) else {
        // Cannot happen (bound domains are live); never hand on a key whose pages are unknown.
        sh.slots[s].set_owner(DEAD);
        inner.bound[s] = None;
        return Err(Error::Unsupported("a bound domain without a record"));
    };
    rec.slot.set(None);
    if let Err(e) = sh.live.tag(rec.base(), rec.len(), rec.prot(), None) {
        rec.slot.set(Some(s));
        sh.slots[s].set_owner(victim.uid);
        return Err(e);
    }
    sh.slots[s].set_owner(FREE);
    inner.bound[s] = None;
    inner.policy.unbind(s);
    Ok(())
}

/// What happened to a destroyed domain's key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Released {
    /// The domain held no key.
    NotBound,
    /// The key (slot) is free again.
    Freed(usize),
    /// A view still pins it: it is retired until no thread does, bound to nobody.
    Retired(usize),
    /// Threads may hold process-wide rights to it (a revocation they did not acknowledge,
    /// or a grant racing with the destruction): it is never handed on.
    Dead(usize),
}

/// Takes the key of domain `d` (being destroyed) back. The slot is read again under the lock
/// on every attempt — another thread may evict `d` meanwhile — and the lock is held throughout,
/// so no other thread can bind the slot between the attempts. If a view keeps the key pinned
/// (a forgotten guard), the slot is *retired*: unlisted from `d` and bound to nobody, free again
/// once unpinned. The caller parks and empties the pages next, either way.
pub(crate) fn release_key<B: Backend>(
    sh: &Shared<B>,
    inner: &mut Inner,
    d: DomRef,
    rec: &DomainRec,
) -> Released {
    let Some(s) = rec.slot.get() else {
        return Released::NotBound;
    };
    debug_assert_eq!(inner.bound[s], Some(d), "a domain's slot names it");
    let owner = sh.slots[s].owner_locked();
    let claimed = owner & !DRAINING == d.uid && claim_patiently(sh, inner, s, owner);
    rec.slot.set(None);
    inner.bound[s] = None;
    inner.policy.unbind(s);
    inner.draining &= !(1 << s);
    let bit = 1 << s;
    if (inner.global_pins | inner.tainted) & bit != 0 {
        inner.global_pins &= !bit;
        inner.tainted &= !bit;
        inner.unsynced[s] = 0;
        // Threads drop the rights at their next sync; the key tags nothing from now on.
        let slot = super::global::slot_of(sh);
        let (mask, _) = sh.key_fields[s];
        slot.global
            .fetch_or(mask, std::sync::atomic::Ordering::SeqCst);
        sh.slots[s].set_owner(DEAD);
        return Released::Dead(s);
    }
    if claimed {
        sh.slots[s].set_owner(FREE);
        Released::Freed(s)
    } else {
        sh.slots[s].set_owner(RETIRED);
        Released::Retired(s)
    }
}

/// The slots of the thread's own live views.
pub(crate) fn own_pins(cx: &ThreadCx) -> u16 {
    cx.pins.pinned_mask()
}

/// Ends the drains the head of the queue started (the owners get their keys back).
pub(crate) fn undrain<B: Backend>(sh: &Shared<B>, inner: &mut Inner) {
    for s in SlotIter(inner.draining) {
        let owner = sh.slots[s].owner_locked();
        if owner & DRAINING != 0 && owner != EVICTING {
            sh.slots[s].set_owner(owner & !DRAINING);
        }
    }
    inner.draining = 0;
}
