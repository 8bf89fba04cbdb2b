//! Entering and leaving views, inside the library.
//!
//! # Hit path
//!
//! Every domain of the view that holds a key is pinned in the thread's own cell (plain
//! stores), one light fence, then each pin is validated against the slot's owner and the
//! thread's registration (see `keycache.rs`). When all validate, the view's bits are pushed
//! and written: no lock, no system call, no shared cache line written.
//!
//! # Slow path: binding, and waiting fairly
//!
//! Otherwise every pin of the view is released first (a thread never holds some of a view's
//! keys while it waits for the others: two views that fit together can never block each
//! other), and the whole view is pinned under the manager's lock, binding keys as needed.
//!
//! When every key is pinned by other views, the thread joins the manager's FIFO queue. Only
//! the head of the queue binds; it *drains* as many victims as it needs — their owner words
//! get the DRAINING bit, so new users of those domains fall to the slow path and queue behind
//! it — and sleeps on a futex until their pins drop. Leaving threads wake the head when
//! anyone waits (one shared-counter load on the leave path); the other waiters sleep on a
//! word of their own and are woken one at a time as they move to the front, so a leave
//! wakes one thread however long the queue. Each waiter's wait is bounded by
//! `Config::pin_wait`. A thread behind the queue still enters at once a view whose keys are
//! all resident (pinning a drained key only when its own outer view already pins it): it
//! takes nothing the head waits for. The head notes when it last looked at the queue (at
//! least every `SYNC_POLL`), and the waiter behind it watches: a head that stopped looking
//! is checked (`tgkill`) and removed when its thread is gone or it stayed away for `STUCK`
//! (a signal handler ended it, blocks, or left the library with `siglongjmp`): it must not
//! stay the head for good. A removed waiter that comes back queues again at the tail. A view that needs more keys than the thread's *own* other views leave
//! free can never succeed by waiting and fails at once with [`Error::ViewsExceedKeys`];
//! [`Error::KeysBusy`] means only that other threads' views kept the keys.
//!
//! # Signal handlers
//!
//! A handler runs with the kernel's PKRU, and `rt_sigreturn` restores the interrupted PKRU.
//! If a handler could end a view of the code it interrupted, that code would resume with the
//! view's rights but without its pins. So the first call from a handler's context (on PKU
//! hardware; see `gate::note_context` for how a call knows its context) starts a new
//! *level* whose seal covers the views entered before it, with every manager: the handler
//! may enter and end views of its own, and ending a sealed view fails with
//! [`Error::InterruptedView`]. A handler that interrupts a handler holding views gets a level
//! of its own, sealed above that handler's views. The first call back at a lower level (the
//! normal context, or a handler the nested one interrupted) ends the levels above it, the
//! views they left behind with them, and their seals.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mpkvirt_sys::Pkru;
use mpkvirt_sys::thread::{futex_wait, futex_wake, tgkill};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::gate::ThreadRecord;
use crate::keycache::{self, DRAINING};
use crate::meta::lock;

use super::binding::{self, Bound};
use super::shared::{DomRef, DomainRec, Entry, Inner, Shared, SlotIter, ThreadCx, Waiter};

/// One domain of a view, as the op received it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ViewItem {
    pub(crate) d: DomRef,
    pub(crate) read_only: bool,
}

/// A live view's identity, handed to its guard.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Token {
    pub(crate) id: u64,
}

/// Enters `view` for the calling thread.
pub(crate) fn enter<B: Backend>(
    sh: &Shared<B>,
    rec: &mut ThreadRecord,
    cx: &mut ThreadCx,
    view: &[ViewItem],
) -> Result<Token> {
    // A confined thread names only its domains (every path to a view comes here: the op,
    // the direct path, the C API).
    for v in view {
        rec.may_name(v.d.uid)?;
    }
    if view.len() > sh.nkeys {
        return Err(Error::ViewTooLarge {
            domains: view.len(),
            keys: sh.nkeys,
        });
    }
    let mut recs: [Option<&DomainRec>; 16] = [None; 16];
    for (i, item) in view.iter().enumerate() {
        let r = sh
            .domain(item.d)
            .ok_or(Error::ForeignDomain(crate::DomainId(item.d.uid)))?;
        if view[..i].iter().any(|e| e.d == item.d) {
            return Err(Error::DuplicateDomain(crate::DomainId(item.d.uid)));
        }
        recs[i] = Some(r);
    }
    // Hit path: pin, one light fence, validate.
    let mut pinned: u16 = 0;
    let mut slot_of = [usize::MAX; 16];
    let mut all = true;
    for (i, r) in recs[..view.len()].iter().enumerate() {
        let r = r.expect("filled above");
        match r.slot.get() {
            Some(s) if cx.pins.pin_unvalidated(s) => slot_of[i] = s,
            _ => all = false,
        }
    }
    let (bits, pinned) = 'fast: {
        if !all {
            break 'fast None;
        }
        keycache::light_fence(sh.fence);
        if !cx.registered.is_set() {
            break 'fast None;
        }
        let mut bits = sh.base_bits;
        for (i, item) in view.iter().enumerate() {
            let s = slot_of[i];
            if !keycache::validate(&sh.slots, s, item.d.uid) {
                break 'fast None;
            }
            pinned |= 1 << s;
            bits = sh.grant(bits, s, item.read_only);
        }
        Some((bits, pinned))
    }
    .map_or_else(
        || {
            // Release every pin of this view before waiting for anything (no hold-and-wait).
            for &s in slot_of[..view.len()].iter().filter(|&&s| s != usize::MAX) {
                cx.pins.unpin(s);
            }
            cx.stats.slow_paths += 1;
            slow_enter(sh, rec, cx, view, &recs[..view.len()])
        },
        Ok,
    )?;
    cx.next_id += 1;
    let id = cx.next_id;
    rec_seq_bump(rec);
    if cx.stack.try_reserve(1).is_err() {
        for s in SlotIter(pinned) {
            cx.pins.unpin(s);
        }
        return Err(Error::Unsupported("recording a view (metadata exhausted)"));
    }
    cx.stack.push(Entry {
        id,
        seq: rec_seq(rec),
        bits,
        pinned,
    });
    cx.stats.enters += 1;
    if let Err(e) = sh.apply(cx, &mut rec.gate.pkru, &rec.holds, bits) {
        // Some key could not be opened (emulated backend, at the mapping limit): the view
        // is not entered. Back to the rights of the views before it, then unpinned.
        cx.stack.pop();
        let top = cx.top_bits(sh.base_bits);
        // (Only keys this view opened change back; a grant that fails here leaves those
        // keys closed, which the backend already reported.)
        let _ = sh.apply(cx, &mut rec.gate.pkru, &rec.holds, top);
        unpin_and_wake(sh, cx, pinned);
        return Err(e);
    }
    Ok(Token { id })
}

/// The thread-wide view sequence (views of every manager, in order of entry).
fn rec_seq(rec: &ThreadRecord) -> u64 {
    rec.view_seq
}

fn rec_seq_bump(rec: &mut ThreadRecord) {
    rec.view_seq += 1;
}

/// The longest the head of the queue (and the waiter behind it) sleeps before it looks at
/// the queue and the process-wide rights again.
const SYNC_POLL: Duration = Duration::from_millis(10);

/// The same for waiters further back: they look at the queue only when woken.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// How the slow path ended one attempt.
enum Attempt {
    Done(Pkru, u16),
    /// Keys are pinned by other views (or drained for another waiter).
    Wait,
}

fn slow_enter<B: Backend>(
    sh: &Shared<B>,
    rec: &mut ThreadRecord,
    cx: &mut ThreadCx,
    view: &[ViewItem],
    recs: &[Option<&DomainRec>],
) -> Result<(Pkru, u16)> {
    let mut inner = lock(&sh.inner);
    register(&mut inner, cx)?;
    binding::sweep_uses(sh, &mut inner);
    // Views this thread already holds: those keys stay pinned while it waits.
    let own = binding::own_pins(cx);
    let mut needed_new = 0usize;
    for r in recs {
        let r = r.expect("filled");
        match r.slot.get() {
            Some(s) if own & (1 << s) != 0 => {}
            _ => needed_new += 1,
        }
    }
    // Keys views can use: not dead, not held by a domain with process-wide rights (unless
    // that domain is in this view).
    let in_view = recs
        .iter()
        .filter_map(|r| r.and_then(|r| r.slot.get()))
        .fold(0u16, |m, s| m | (1 << s));
    let unusable =
        binding::dead_slots(sh) | ((inner.global_pins | inner.tainted) & !in_view & !own);
    let usable = sh.nkeys - unusable.count_ones() as usize;
    if own.count_ones() as usize + needed_new > usable {
        return Err(Error::ViewsExceedKeys {
            needed: needed_new,
            held: own.count_ones() as usize,
            keys: usable,
        });
    }
    let me: *const ThreadCx = cx;
    let tid = rec.tid();
    let mut deadline: Option<Option<Instant>> = None;
    let mut queued = false;
    // Once it waits, the thread takes signals only while it sleeps: a handler that ended it
    // (or left with `siglongjmp`) while it held the manager's lock would stop the manager for
    // good; one that ends it asleep only leaves a waiter that stops looking (pruned).
    let mut blocked: Option<crate::gate::Blocked> = None;
    let result = loop {
        // Where the thread stands: 0 is the head (it binds, drains and sleeps on `sh.wake`,
        // which every leave bumps); 1 watches the head (it looks every `SYNC_POLL` too, so a
        // head that stopped looking is pruned); the others sleep on their own word until they
        // move up, so a leave wakes one thread, not the whole queue.
        let mut pos = None;
        if queued {
            match inner.queue.iter_mut().position(|w| w.cx == me) {
                Some(i) => {
                    if i == 0 {
                        inner.queue[0].seen = Instant::now();
                    }
                    pos = Some(i);
                }
                // Removed while it did not look (`prune_waiters`): it queues again, at the tail.
                None => queued = false,
            }
        }
        prune_waiters(sh, &mut inner, me);
        if queued {
            pos = inner.queue.iter().position(|w| w.cx == me);
        }
        // First come, first served: a thread arriving while others wait queues behind them
        // (binding now could take the keys the head is draining for itself).
        let is_head = if queued {
            pos == Some(0)
        } else {
            inner.queue.is_empty()
        };
        let seen = sh.wake.load(Ordering::SeqCst);
        let turn = cx.turn.load(Ordering::SeqCst);
        // (Only the head looks at pins, so only it needs the heavy half of the Dekker with
        // `unpin_and_wake`.)
        if queued && is_head && !binding::heavy_fence(sh.fence) {
            break Err(Error::Unsupported("membarrier failed"));
        }
        // Behind others, a view whose keys are all resident (some drained for the head, but
        // pinned by this thread's own outer views) still goes ahead: it takes nothing the head
        // waits for, and making it wait would be a hold-and-wait, since the head's drain waits
        // for this thread's outer views to end.
        match attempt(sh, &mut inner, cx, view, recs, is_head) {
            Ok(Attempt::Done(bits, pinned)) => {
                // An eviction in this attempt may have pruned this thread (it held no pin
                // then): evictors must see the pins it holds now.
                if let Err(e) = register(&mut inner, cx) {
                    for s in SlotIter(pinned) {
                        cx.pins.unpin(s);
                    }
                    break Err(e);
                }
                break Ok((bits, pinned));
            }
            Ok(Attempt::Wait) => {}
            Err(e) => break Err(e),
        }
        // Keys are pinned by other threads' views (or others are ahead in the queue).
        let until = *deadline.get_or_insert_with(|| Instant::now().checked_add(sh.config.pin_wait));
        let now = Instant::now();
        if sh.config.pin_wait.is_zero() || until.is_some_and(|u| now >= u) {
            break Err(Error::KeysBusy {
                keys: sh.nkeys,
                waited: sh.config.pin_wait,
            });
        }
        if !queued {
            if inner.queue.try_reserve(1).is_err() {
                break Err(Error::Unsupported(
                    "queueing for a key (metadata exhausted)",
                ));
            }
            inner.queue.push(Waiter {
                cx: me,
                tid,
                seen: now,
            });
            sh.waiters.fetch_add(1, Ordering::SeqCst);
            queued = true;
            if blocked.is_none() {
                drop(inner);
                blocked = Some(crate::gate::Blocked::new());
                inner = lock(&sh.inner);
            }
            continue; // re-check after announcing ourselves (no lost wake-up)
        }
        if is_head {
            drain(sh, &mut inner, cx, view, recs);
        }
        drop(inner);
        // The word to sleep on, and how long at most before looking again: a waiting thread
        // takes process-wide rights that change meanwhile (their initiator waits for it; its
        // signal cuts the sleep short unless the application blocks it).
        let (word, expect, poll) = match pos {
            Some(0) => (&sh.wake, seen, SYNC_POLL),
            Some(1) => (&cx.turn, turn, SYNC_POLL),
            _ => (&cx.turn, turn, IDLE_POLL),
        };
        // The queue's progress when this sleep began: a waiter far back that sees none for
        // as long as a head may stay quiet looks itself (the head and the waiter behind it
        // may both have stopped looking: nobody else would prune them).
        let (mut gen0, mut since) = (sh.queue_gen.load(Ordering::SeqCst), Instant::now());
        let stuck = stuck_after(sh);
        loop {
            let now = Instant::now();
            let left = until.map(|u| u.saturating_duration_since(now));
            let sleep = || futex_wait(word, expect, Some(left.map_or(poll, |t| t.min(poll))));
            let _ = match &blocked {
                Some(b) => b.unblocked(sleep),
                None => sleep(),
            };
            super::global::acknowledge(rec, Some((sh.slot_idx, cx.top_bits(sh.base_bits))));
            // Far back in the queue, the thread looks again (under the lock) only when it
            // moved up or its wait is over.
            let now = Instant::now();
            let queue_gen = sh.queue_gen.load(Ordering::SeqCst);
            if queue_gen != gen0 {
                (gen0, since) = (queue_gen, now);
            }
            if pos.is_some_and(|p| p <= 1)
                || word.load(Ordering::SeqCst) != expect
                || until.is_some_and(|u| now >= u)
                || now - since >= stuck
            {
                break;
            }
        }
        inner = lock(&sh.inner);
    };
    if queued {
        unqueue(sh, &mut inner, |w| w.cx == me);
    }
    // (Signals pending meanwhile are delivered once the lock is dropped and the mask
    // restored.)
    drop(inner);
    drop(blocked);
    result
}

/// How long a waiter may go without looking at the queue before its thread's liveness is
/// checked (a live waiter looks at least every `SYNC_POLL`, when it is scheduled).
const QUIET: Duration = Duration::from_millis(50);

/// How long a live waiter may go without looking before it loses its place: its thread is
/// stuck (a signal handler that blocks, or that left the library with `siglongjmp`). If it
/// comes back, it queues again at the tail. A quarter of the manager's `pin_wait` when that
/// is shorter (but at least two polls): the waiters behind a stuck head must still be served
/// within their own `pin_wait`. (A live waiter the OS leaves unscheduled that long loses its place too: a
/// cost in fairness, never in safety.)
const STUCK: Duration = Duration::from_millis(250);

/// How long a head may go without looking before it loses its place (see `STUCK`).
fn stuck_after<B: Backend>(sh: &Shared<B>) -> Duration {
    STUCK.min(sh.config.pin_wait / 4).max(2 * SYNC_POLL)
}

/// Removes the head of the queue if it stopped looking and its thread is gone (or it has
/// not looked for `STUCK`): a thread that never returns from a wait must not stay the head,
/// nor keep the victims it drained (the drains end when nobody waits any more). Waiters
/// further back are judged when they reach the head.
fn prune_waiters<B: Backend>(sh: &Shared<B>, inner: &mut Inner, me: *const ThreadCx) {
    // (No clock read on a miss nobody waits at: where the clock is no vDSO call, a miss makes
    // no system call beyond binding.)
    let Some(&head) = inner.queue.first() else {
        return;
    };
    if head.cx == me {
        return;
    }
    let now = Instant::now();
    let stuck = stuck_after(sh);
    let quiet = now.saturating_duration_since(head.seen);
    if quiet >= stuck || (quiet >= QUIET.min(stuck) && tgkill(head.tid, 0).is_err()) {
        unqueue(sh, inner, |w| w.cx == head.cx);
    }
}

/// Removes the waiters `which` selects: drains end when nobody waits any more, and the
/// threads that moved to the front are woken (the new head binds; the one behind it
/// watches the head).
pub(crate) fn unqueue<B: Backend>(
    sh: &Shared<B>,
    inner: &mut Inner,
    mut which: impl FnMut(&Waiter) -> bool,
) {
    let front = |q: &[Waiter]| [q.first().map(|w| w.cx), q.get(1).map(|w| w.cx)];
    let before = inner.queue.len();
    let was = front(&inner.queue);
    inner.queue.retain(|w| !which(w));
    let removed = before - inner.queue.len();
    if removed == 0 {
        return;
    }
    sh.waiters.fetch_sub(removed as u32, Ordering::SeqCst);
    sh.queue_gen.fetch_add(1, Ordering::SeqCst);
    // Drains serve the whole queue: they end only when nobody waits any more.
    if inner.queue.is_empty() {
        binding::undrain(sh, inner);
        return;
    }
    let now = front(&inner.queue);
    if now[0] != was[0] {
        // Its time as the head starts now (see `prune_waiters`).
        inner.queue[0].seen = Instant::now();
    }
    for (i, cx) in now.into_iter().enumerate() {
        if let Some(cx) = cx
            && Some(cx) != was[i]
        {
            // (A queued cx is live: it is freed only after its thread's exit took it off
            // the queue, under this lock.)
            let turn = &binding::deref_cx(cx).turn;
            turn.fetch_add(1, Ordering::SeqCst);
            futex_wake(turn, 1);
        }
    }
}

/// Lists the thread with the evictors (under the lock) unless it is.
fn register(inner: &mut Inner, cx: &ThreadCx) -> Result<()> {
    if cx.registered.is_set() {
        return Ok(());
    }
    let p: *const ThreadCx = cx;
    if !inner.threads.contains(&p) {
        inner
            .threads
            .try_reserve(1)
            .map_err(|_| Error::Unsupported("registering a thread (metadata exhausted)"))?;
        inner.threads.push(p);
    }
    cx.registered.set();
    Ok(())
}

/// Pins the whole view under the lock, binding what is unbound; undoes its pins when some key
/// cannot be had.
fn attempt<B: Backend>(
    sh: &Shared<B>,
    inner: &mut Inner,
    cx: &mut ThreadCx,
    view: &[ViewItem],
    recs: &[Option<&DomainRec>],
    may_bind: bool,
) -> Result<Attempt> {
    // Drained slots whose pins are gone are taken now (parked, free).
    for s in SlotIter(if may_bind { inner.draining } else { 0 }) {
        let owner = sh.slots[s].owner_locked();
        if let Some(v) = inner.bound[s]
            && owner == v.uid | DRAINING
            && binding::claim(sh, inner, s, owner)
        {
            binding::park(sh, inner, s, v)?;
            inner.stats.evictions += 1;
            inner.draining &= !(1 << s);
        }
    }
    let mut pinned: u16 = 0;
    let mut bits = sh.base_bits;
    let undo = |cx: &ThreadCx, pinned: u16| {
        for s in SlotIter(pinned) {
            cx.pins.unpin(s);
        }
    };
    // The view's domains that hold keys: pinned first, so binding the others cannot evict
    // them.
    let mut unbound = [false; 16];
    for (i, item) in view.iter().enumerate() {
        let r = recs[i].expect("filled");
        let owner = |s: usize| sh.slots[s].owner_locked();
        match r.slot.get() {
            // Resident; or draining while this thread itself pins it (an outer view): the
            // drain cannot end before this thread unpins anyway, and a nested view of the
            // domain needs no other key.
            Some(s)
                if owner(s) == item.d.uid
                    || (owner(s) == item.d.uid | DRAINING
                        && cx.pins.pinned_mask() & (1 << s) != 0) =>
            {
                if !cx.pins.pin_locked(s) {
                    undo(cx, pinned);
                    return Err(Error::Unsupported(
                        "more than 255 nested views of one domain on a thread",
                    ));
                }
                pinned |= 1 << s;
                bits = sh.grant(bits, s, item.read_only);
            }
            _ => unbound[i] = true,
        }
    }
    for (i, item) in view.iter().enumerate() {
        if !unbound[i] {
            continue;
        }
        let r = recs[i].expect("filled");
        let s = match r.slot.get() {
            // Bound but draining (someone ahead drains it) or being evicted: wait.
            Some(_) => {
                undo(cx, pinned);
                return Ok(Attempt::Wait);
            }
            // Only the head of the queue binds.
            None if !may_bind => {
                undo(cx, pinned);
                return Ok(Attempt::Wait);
            }
            None => match binding::bind(sh, inner, cx, item.d, r, pinned, |_| true) {
                Ok(Bound::Slot(s)) => s,
                Ok(Bound::Busy) => {
                    undo(cx, pinned);
                    return Ok(Attempt::Wait);
                }
                Err(e) => {
                    undo(cx, pinned);
                    return Err(e);
                }
            },
        };
        // Owners change only under the lock, which we hold: no validation needed.
        if !cx.pins.pin_locked(s) {
            undo(cx, pinned);
            return Err(Error::Unsupported(
                "more than 255 nested views of one domain on a thread",
            ));
        }
        pinned |= 1 << s;
        bits = sh.grant(bits, s, item.read_only);
    }
    Ok(Attempt::Done(bits, pinned))
}

/// The head of the queue marks as many victims as it still needs as draining.
fn drain<B: Backend>(
    sh: &Shared<B>,
    inner: &mut Inner,
    cx: &ThreadCx,
    view: &[ViewItem],
    recs: &[Option<&DomainRec>],
) {
    // The head's missing keys, and one for every thread queued behind it: the keys rotate
    // through the whole queue while threads whose domains stay resident would otherwise keep
    // them on the hit path for as long as they like.
    let missing = recs
        .iter()
        .filter(|r| r.is_some_and(|r| r.slot.get().is_none()))
        .count()
        + inner.queue.len().saturating_sub(1);
    // Slots queued threads pin: they cannot leave until served, so a drain of one cannot end
    // before them (it does not count as one under way), and draining one would wait for
    // ourselves.
    let mut queue_pins = 0u16;
    for w in inner.queue.iter() {
        queue_pins |= binding::deref_cx(w.cx).pins.pinned_mask();
    }
    let have = (inner.draining & !queue_pins).count_ones() as usize;
    if missing <= have {
        return;
    }
    // Slots the view itself uses, and slots held by queued threads (they cannot leave until
    // served: draining those would wait for ourselves).
    let mut exclude = cx.pins.pinned_mask() | inner.draining | inner.global_pins | inner.tainted;
    for (i, r) in recs.iter().enumerate() {
        if let Some(s) = r.and_then(|r| r.slot.get()) {
            let _ = view[i];
            exclude |= 1 << s;
        }
    }
    exclude |= queue_pins;
    let mut candidates = [0usize; 16];
    let mut nc = 0;
    for s in 0..sh.nkeys {
        if exclude & (1 << s) == 0
            && let Some(v) = inner.bound[s]
            && sh.slots[s].owner_locked() == v.uid
        {
            candidates[nc] = s;
            nc += 1;
        }
    }
    for _ in have..missing {
        if nc == 0 {
            break;
        }
        // Not the policy's choice: with threads queued, every resident domain is in use, and
        // the least recently used one is arbitrary. The slot bound longest ago goes first, so
        // keys rotate among the contending threads and none keeps its key for good.
        let v = *candidates[..nc]
            .iter()
            .min_by_key(|&&s| inner.bound_at[s])
            .expect("nc > 0");
        let owner = sh.slots[v].owner_locked();
        sh.slots[v].set_owner(owner | DRAINING);
        inner.draining |= 1 << v;
        let pos = candidates[..nc]
            .iter()
            .position(|&c| c == v)
            .expect("chosen");
        candidates[pos] = candidates[nc - 1];
        nc -= 1;
    }
}

/// Ends the view `id` of the calling thread: rights revoked first (PKRU back to the newest
/// remaining view), pins released second. An id that is not live (ended already, after a
/// fault) is not an error.
pub(crate) fn leave<B: Backend>(
    sh: &Shared<B>,
    rec: &mut ThreadRecord,
    cx: &mut ThreadCx,
    id: u64,
) -> Result<()> {
    // Views usually end in reverse order of entry: the top of the stack.
    let pos = match cx.stack.last() {
        Some(top) if top.id == id => Some(cx.stack.len() - 1),
        _ => cx.stack.iter().rposition(|e| e.id == id),
    };
    let Some(pos) = pos else {
        return Ok(());
    };
    if rec.levels.seal().is_some_and(|f| cx.stack[pos].seq <= f) {
        return Err(Error::InterruptedView);
    }
    let entry = cx.stack.remove(pos);
    let top = cx.top_bits(sh.base_bits);
    // Leaving revokes; it grants only where an inner view narrowed an outer one (read-only
    // inside read-write). Such a grant that fails leaves the outer view's key closed: its
    // accesses fault (the safe direction; the backend reported it).
    let _ = sh.apply(cx, &mut rec.gate.pkru, &rec.holds, top);
    unpin_and_wake(sh, cx, entry.pinned);
    Ok(())
}

/// Releases `pinned` (after the rights were revoked) and wakes waiters if there are any.
pub(crate) fn unpin_and_wake<B: Backend>(sh: &Shared<B>, cx: &ThreadCx, pinned: u16) {
    if pinned == 0 {
        return;
    }
    for s in SlotIter(pinned) {
        cx.pins.unpin(s);
    }
    // Dekker with a waiter: it announces itself, fences, then looks at pins; we unpinned,
    // fence, then look for waiters.
    keycache::light_fence(sh.fence);
    if sh.waiters.load(Ordering::SeqCst) != 0 {
        sh.wake.fetch_add(1, Ordering::SeqCst);
        futex_wake(&sh.wake, i32::MAX);
    }
}

/// Ends every view of `cx` whose thread-wide sequence number is above `mark` (their guards
/// were abandoned with a faulting guarded call), or all of them (`mark == 0` at thread exit).
pub(crate) fn end_views_since<B: Backend>(
    sh: &Shared<B>,
    rec_pkru: &mut u32,
    holds: &AtomicU32,
    cx: &mut ThreadCx,
    mark: u64,
) {
    if cx.stack.iter().all(|e| e.seq <= mark) {
        return;
    }
    // Revoke first: the newest view that stays decides the rights.
    let top = cx
        .stack
        .iter()
        .rev()
        .find(|e| e.seq <= mark)
        .map_or(sh.base_bits, |e| e.bits);
    // (As in `leave`.)
    let _ = sh.apply(cx, rec_pkru, holds, top);
    let mut i = 0;
    while i < cx.stack.len() {
        if cx.stack[i].seq > mark {
            let e = cx.stack.remove(i);
            unpin_and_wake(sh, cx, e.pinned);
        } else {
            i += 1;
        }
    }
}
