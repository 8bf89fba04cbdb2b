//! Process-wide rights: libmpk's `mpk_mprotect` mode, where a domain is reachable by every
//! thread of the process without entering a view.
//!
//! A domain with process-wide rights holds its key for as long as it has them (a *global
//! pin*: no eviction or drain takes it). Every thread's rights for a manager's keys are the
//! union of its own current view and the process-wide rights — as PKRU fields, the AND of the
//! two (a set bit denies). The process-wide fields live in the manager's registry slot
//! (`MgrSlot::global`), which is never freed, so any thread can recompute its PKRU at any time
//! without touching a manager that may be going away.
//!
//! - **Emulated backend**: rights are already process-wide: the grant is one more
//!   contributor to the key's union, one `mprotect`.
//! - **Simulated backend**: the model adds the grant at every access.
//! - **Hardware**: every thread's PKRU must change. The initiator bumps the process's sync
//!   epoch and signals every thread of the process (`crate::sync`, `SIGRTMIN + 7` by
//!   default); each handler enters the library (registering the thread if it never did),
//!   recomputes the thread's PKRU from its views and the process-wide rights, writes it into
//!   the signal frame (so `rt_sigreturn` installs it) and acknowledges the epoch. A thread
//!   inside the library when the signal comes acknowledges when its op ends (the dispatcher
//!   checks the epoch after every op) or while it waits for keys; the initiator signals
//!   threads that have not acknowledged again every few milliseconds. It then lists the
//!   threads again (a thread created meanwhile copied its creator's PKRU, which may predate
//!   the change) and repeats until no new thread appears. A thread registered by the signal
//!   (or a fault) acknowledges only from a context that looks like its normal one
//!   (`gate::looks_normal`): the context it interrupted may be a signal handler's, below
//!   which the inherited PKRU waits to be restored.
//!
//! A thread that does not acknowledge within [`SYNC_WAIT`] (it blocks the signal, or replaced
//! the handler) fails the call with [`Error::ThreadsNotSynced`]. For a grant that thread
//! merely lacks the rights; for a revocation it may keep them, so the key is *tainted*: it
//! stays with the domain and, once the domain lets go of it, is never handed to another
//! domain (it becomes dead).
//!
//! A revocation in progress is recorded per key slot (`Inner::revoking`). While one is, the
//! slot keeps its global pin — only the last revocation to end may drop it, and a failed one
//! taints the key under the same lock, while the key still belongs to the domain — and a later
//! revocation of the domain, or its destruction (which revokes first), *joins* it: it waits
//! until that one ends (acknowledging syncs meanwhile) and then answers what it finds. A
//! revocation of a tainted key reports [`Error::ThreadsNotSynced`]: some thread may still
//! hold the rights.
//!
//! Limits (documented in `ARCHITECTURE.md`): a signal frame older than the handler that
//! received the sync signal (a handler interrupted by it) restores the PKRU it saved when that
//! handler returns — the same behaviour libmpk's kernel `pkey_sync` has — so a thread that
//! sits in a signal handler acknowledges only once it is back in its normal context.
//!
//! This is what libmpk did with a kernel patch (`pkey_sync`: an IPI and a task-work hook), on
//! a stock kernel.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mpkvirt_sys::Pkru;

use crate::backend::sealed::LiveOps;
use crate::backend::{Backend, BackendKind, Regs};
use crate::error::{Error, Result};
use crate::gate::{self, ThreadRecord};
use crate::meta::{MVec, Meta, MgrSlot, lock, root};

use super::binding::{self, Bound};
use super::shared::{DomRef, Shared, ThreadCx};
use super::{Rights, ops::cx_ref};

/// How long the initiator waits for every thread to take new process-wide rights.
pub(crate) const SYNC_WAIT: Duration = Duration::from_secs(2);

/// How often threads that have not acknowledged are signalled again.
const RESEND: Duration = Duration::from_millis(2);

/// The PKRU field value (AD|WD bits) of `rights` for slot `s`: 0 read-write, WD read-only,
/// AD|WD none.
fn field<B: Backend>(sh: &Shared<B>, s: usize, rights: Option<Rights>) -> u32 {
    let (mask, ro) = sh.key_fields[s];
    match rights {
        Some(Rights::ReadWrite) => 0,
        Some(Rights::ReadOnly) => ro,
        None => mask,
    }
}

/// The manager's registry slot.
pub(crate) fn slot_of<B: Backend>(sh: &Shared<B>) -> &'static MgrSlot {
    &root().managers[sh.slot_idx as usize]
}

/// The process-wide rights of `sh`'s keys, as PKRU fields (see [`MgrSlot::global`]).
#[inline]
pub(crate) fn globals<B: Backend>(sh: &Shared<B>) -> u32 {
    slot_of(sh).global.load(Ordering::Acquire)
}

/// `bits` (a thread's view of `sh`'s keys) with the process-wide rights added.
#[inline]
pub(crate) fn with_globals<B: Backend>(sh: &Shared<B>, bits: Pkru) -> Pkru {
    Pkru::from_bits(canonical(
        normalized(bits.bits()) & (globals(sh) | !sh.our_mask),
    ))
}

/// [`with_globals`] for a thread that is about to run with the result (`holds`: its
/// record's). The fields of the process-wide rights it takes are recorded in `holds` *before*
/// the rights are read (Dekker with [`broadcast`], which stores the rights, then reads
/// `holds`): a revocation either signals the thread, or the thread reads the revoked value.
/// Any view change takes the rights in force, in whatever context it runs (a signal
/// handler's op does not acknowledge an epoch, so without this its `holds` would not know).
pub(crate) fn with_globals_held<B: Backend>(sh: &Shared<B>, holds: &AtomicU32, bits: Pkru) -> Pkru {
    let mut g = globals(sh);
    loop {
        let taken = granted_fields(g & sh.our_mask, sh.our_mask);
        // (Only the thread itself writes its `holds`.)
        if taken & !holds.load(Ordering::Relaxed) == 0 {
            break;
        }
        holds.fetch_or(taken, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        g = globals(sh);
    }
    Pkru::from_bits(canonical(normalized(bits.bits()) & (g | !sh.our_mask)))
}

/// The usual spelling of PKRU fields: no access as access-disabled alone (`01`).
#[inline]
pub(crate) fn canonical(bits: u32) -> u32 {
    bits & !((bits & (bits >> 1) & 0x5555_5555) << 1)
}

/// PKRU fields with every access-disabled field write-disabled too, so that the AND of two
/// values is the union of their rights (none `11`, read-only `10`, read-write `00`).
#[inline]
pub(crate) fn normalized(bits: u32) -> u32 {
    bits | ((bits & 0x5555_5555) << 1)
}

/// Gives domain `d` process-wide `rights` (`None`: takes them back). A grant takes effect
/// for each thread at its next access (hardware: a thread whose PKRU predates it faults once
/// and the fault handler syncs it) or its next library call; anything that takes a right
/// away waits until every thread that may hold it has dropped it.
///
/// # Errors
///
/// [`Error::ForeignDomain`] for a dead domain, [`Error::KeysBusy`] when no key can be bound
/// for a grant (every key pinned by views), a backend error from binding, and
/// [`Error::ThreadsNotSynced`] when some thread did not acknowledge a revocation in time
/// (see the module docs: it holds for every other thread, and the key is tainted).
pub(crate) fn set<B: Backend>(
    sh: &Shared<B>,
    rec: &mut ThreadRecord,
    cx: &mut ThreadCx,
    d: DomRef,
    rights: Option<Rights>,
) -> Result<()> {
    let rec_d = sh
        .domain(d)
        .ok_or(Error::ForeignDomain(crate::DomainId(d.uid)))?;
    let (slot, revoked) = {
        let mut inner = lock(&sh.inner);
        let mut join_deadline = None;
        let s = loop {
            let s = match rec_d.slot.get() {
                Some(s) => s,
                // Unbound: it has no process-wide rights to take back.
                None if rights.is_none() => return Ok(()),
                None => match binding::bind(sh, &mut inner, cx, d, rec_d, 0, |_| true)? {
                    Bound::Slot(s) => s,
                    Bound::Busy => {
                        return Err(Error::KeysBusy {
                            keys: sh.nkeys,
                            waited: Duration::ZERO,
                        });
                    }
                },
            };
            if rights.is_some() || inner.revoking[s] == 0 {
                break s;
            }
            // A revocation of the key is still waiting for threads: this one (or the
            // destruction that calls it) joins it — it may not say the rights are gone, nor
            // let the key go, before that one knows.
            // Each revocation waits at most `SYNC_WAIT` for threads; one that has not ended
            // after twice that (its initiator ended inside it, or overlapping lowerings keep
            // the count up) is not waited for any longer: the caller hears that the rights
            // may still be held, and the key keeps its pin (the safe direction).
            let deadline = *join_deadline.get_or_insert_with(|| Instant::now() + 2 * SYNC_WAIT);
            if Instant::now() >= deadline {
                return Err(Error::ThreadsNotSynced {
                    threads: inner.unsynced[s].max(1) as usize,
                    waited: 2 * SYNC_WAIT,
                });
            }
            let seen = sh.revoked_gen.load(Ordering::SeqCst);
            drop(inner);
            // Its initiator may be waiting for this thread meanwhile.
            acknowledge(rec, Some((sh.slot_idx, cx.top_bits(sh.base_bits))));
            let _ = mpkvirt_sys::thread::futex_wait(&sh.revoked_gen, seen, Some(RESEND));
            inner = lock(&sh.inner);
            if sh.domain(d).is_none() {
                return Err(Error::ForeignDomain(crate::DomainId(d.uid)));
            }
        };
        let bit = 1u16 << s;
        if rights.is_none() && inner.global_pins & bit == 0 {
            // Nothing to take back — unless a revocation of it failed: some thread may still
            // hold the rights, and the caller must not hear otherwise.
            if inner.tainted & bit != 0 {
                return Err(Error::ThreadsNotSynced {
                    threads: inner.unsynced[s].max(1) as usize,
                    waited: SYNC_WAIT,
                });
            }
            return Ok(());
        }
        let (mask, _) = sh.key_fields[s];
        let old = slot_of(sh).global.load(Ordering::Relaxed);
        let new = (old & !mask) | field(sh, s, rights);
        let was_pinned = inner.global_pins & bit != 0;
        slot_of(sh).global.store(new, Ordering::SeqCst);
        if rights.is_some() {
            inner.global_pins |= bit;
        }
        if sh.live.kind() == BackendKind::Emulated {
            // One more contributor to the key's union of rights.
            let virt = (inner.global_virt.bits() & !sh.our_mask) | (new & sh.our_mask);
            let mut unused = 0;
            let mut regs = Regs {
                virt: &mut inner.global_virt,
                real: &mut unused,
            };
            if let Err(e) = sh.live.write_pkru(&mut regs, Pkru::from_bits(virt)) {
                // The grant failed (at the mapping limit): the key's process-wide rights
                // stay as they were.
                slot_of(sh).global.store(old, Ordering::SeqCst);
                if !was_pinned {
                    inner.global_pins &= !bit;
                }
                return Err(e);
            }
        }
        // Deny bits the new value sets that the old one did not: something was taken away.
        // Taking the rights away while the key is globally pinned always waits for the
        // threads (the field may read revoked already only while another revocation runs,
        // which this one joined above).
        let revoked = rights.is_none() || new & !old & mask != 0;
        if revoked {
            // In progress: the key keeps its global pin until the last revocation ends.
            // (A `u32`: one per thread inside a revocation, and Linux caps threads at
            // 2^22, so it cannot wrap.)
            inner.revoking[s] += 1;
        }
        (s, revoked)
    };
    let current = Some((sh.slot_idx, cx.top_bits(sh.base_bits)));
    let acked = if !sh.hardware {
        Ok(())
    } else if revoked {
        broadcast(rec, current, Some(sh.key_fields[slot].0))
    } else {
        // A grant: every thread takes it lazily (its next access or call); the caller now.
        bump(rec, current);
        Ok(())
    };
    if revoked {
        let mut inner = lock(&sh.inner);
        let bit = 1u16 << slot;
        inner.revoking[slot] -= 1;
        // The slot still names the domain (a global pin keeps it bound; a destruction meanwhile
        // made it dead, and a dead key needs neither a taint nor an unpin).
        if inner.bound[slot] == Some(d) {
            if let Err(e) = &acked {
                // Some thread may still hold the rights: the key goes to no other domain. Set
                // before the pin is dropped, under the same lock: no eviction sees the slot
                // unpinned and untainted.
                inner.tainted |= bit;
                let threads = match *e {
                    Error::ThreadsNotSynced { threads, .. } => threads,
                    _ => 0,
                };
                inner.unsynced[slot] = u32::try_from(threads).unwrap_or(u32::MAX);
            }
            let (mask, _) = sh.key_fields[slot];
            // Unless another thread granted again meanwhile, or another revocation of the key
            // still waits for threads.
            if inner.revoking[slot] == 0 && globals(sh) & mask == mask {
                inner.global_pins &= !bit;
            }
        }
        drop(inner);
        sh.revoked_gen.fetch_add(1, Ordering::SeqCst);
        mpkvirt_sys::thread::futex_wake(&sh.revoked_gen, i32::MAX);
        if acked.is_err() {
            crate::fault::log_line(
                "mpkvirt: a thread did not drop process-wide rights in time; the key is tainted\n",
            );
        }
    }
    acked
}

/// Takes back every process-wide right of `sh` (it is being torn down); `false` when some
/// thread did not acknowledge (the keys must then be retired).
pub(crate) fn revoke_all<B: Backend>(sh: &Shared<B>, rec: &mut ThreadRecord) -> bool {
    let slot = slot_of(sh);
    if slot.global.load(Ordering::Acquire) & sh.our_mask == sh.our_mask {
        return true;
    }
    slot.global.store(sh.our_mask, Ordering::SeqCst);
    !sh.hardware || broadcast(rec, None, Some(sh.our_mask)).is_ok()
}

/// A new epoch, taken by the calling thread at once: threads inside the library take it
/// when their op ends, every other thread lazily.
fn bump(rec: &mut ThreadRecord, current: Option<(u32, Pkru)>) -> u64 {
    let epoch = root().sync_epoch.fetch_add(1, Ordering::SeqCst) + 1;
    // The initiator has its rights at once (its gate exit installs them).
    resync(rec, current);
    rec.synced.fetch_max(epoch, Ordering::SeqCst);
    announce_ack();
    epoch
}

/// Makes threads of the process take the current process-wide rights and waits for them:
/// every thread (`fields: None`), or those that may hold rights to any key of the PKRU
/// `fields` (threads mpkvirt does not know — their PKRU is inherited — and threads whose
/// last sync or view change took process-wide rights to those keys, or that are syncing
/// right now).
/// `current` is the manager the calling thread is inside an op of, with its view bits (its
/// cx is borrowed by the caller).
pub(crate) fn broadcast(
    rec: &mut ThreadRecord,
    current: Option<(u32, Pkru)>,
    fields: Option<u32>,
) -> Result<()> {
    // (Dekker with `resync`: the new rights are stored, then the threads' `holds` and
    // `resyncing` are read; a thread sets `resyncing`, then reads the rights.)
    std::sync::atomic::fence(Ordering::SeqCst);
    let epoch = bump(rec, current);
    let sig = root().sync_sig.load(Ordering::Relaxed);
    if sig == 0 {
        crate::fault::log_line(
            "mpkvirt: the sync signal already had a handler when mpkvirt started; set MPKVIRT_SYNC_SIGNAL to a free real-time signal\n",
        );
        return Err(Error::Unsupported("installing the sync signal handler"));
    }
    let me = rec.tid();
    let mut signalled: MVec<i32> = MVec::new_in(Meta);
    let mut skipped: MVec<i32> = MVec::new_in(Meta);
    let deadline = Instant::now() + SYNC_WAIT;
    let not_synced = |n: usize| Error::ThreadsNotSynced {
        threads: n,
        waited: SYNC_WAIT,
    };
    loop {
        let known = gate::sync_snapshot();
        let mut new = false;
        let mut oom = known.is_none();
        let listed = mpkvirt_sys::thread::for_each_thread(|tid| {
            if tid == me || oom {
                return;
            }
            let (Err(at), Err(at_skip)) =
                (signalled.binary_search(&tid), skipped.binary_search(&tid))
            else {
                return;
            };
            let needed = match (fields, known.as_ref().and_then(|k| gate::find(k, tid))) {
                (None, _) | (_, None) => true,
                (Some(f), Some(t)) => t.resyncing || t.holds & f != 0,
            };
            let list = if needed { &mut signalled } else { &mut skipped };
            if list.try_reserve(1).is_err() {
                oom = true;
                return;
            }
            list.insert(if needed { at } else { at_skip }, tid);
            new = true;
            if needed {
                // A thread that exited meanwhile has nothing to take.
                let _ = mpkvirt_sys::thread::tgkill(tid, sig);
            }
        });
        if listed.is_err() {
            return Err(Error::Unsupported("listing the process's threads"));
        }
        if oom {
            return Err(not_synced(signalled.len()));
        }
        if !new {
            return Ok(());
        }
        if Instant::now() >= deadline {
            // Threads keep appearing (some may have been created with the old rights by a
            // thread that had not taken the new ones yet): the revocation ends here rather
            // than run for as long as the churn lasts, and reports them.
            return Err(not_synced(signalled.len()));
        }
        // Wait for every signalled thread that still exists to acknowledge.
        let mut last_send = Instant::now();
        loop {
            let seen = root().sync_acks.load(Ordering::SeqCst);
            let resend = last_send.elapsed() >= RESEND;
            let pending = gate::unacknowledged(&signalled, epoch, |tid| {
                if resend {
                    let _ = mpkvirt_sys::thread::tgkill(tid, sig);
                }
            });
            if resend {
                last_send = Instant::now();
            }
            if pending == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(not_synced(pending));
            }
            // Another initiator may be waiting for this thread meanwhile.
            acknowledge(rec, current);
            let r = root();
            r.sync_waiters.fetch_add(1, Ordering::SeqCst);
            let _ = mpkvirt_sys::thread::futex_wait(
                &r.sync_acks,
                seen,
                Some(RESEND.min(deadline - now)),
            );
            r.sync_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Counts an acknowledgement and wakes the initiators waiting for one.
pub(crate) fn announce_ack() {
    let r = root();
    r.sync_acks.fetch_add(1, Ordering::SeqCst);
    if r.sync_waiters.load(Ordering::SeqCst) != 0 {
        mpkvirt_sys::thread::futex_wake(&r.sync_acks, i32::MAX);
    }
}

/// Takes the current process-wide rights if an epoch passed since the thread last did.
/// `current` as for [`broadcast`].
pub(crate) fn acknowledge(rec: &mut ThreadRecord, current: Option<(u32, Pkru)>) {
    let epoch = root().sync_epoch.load(Ordering::SeqCst);
    if rec.synced.load(Ordering::Relaxed) < epoch {
        resync(rec, current);
        rec.synced.fetch_max(epoch, Ordering::SeqCst);
        announce_ack();
    }
}

/// Recomputes the thread's PKRU for every hardware manager: its current view's bits (or none)
/// with the process-wide rights. `current`: the registry slot whose view bits the caller
/// passes instead of reading the thread's cx (borrowed by the caller).
pub(crate) fn resync(rec: &mut ThreadRecord, current: Option<(u32, Pkru)>) {
    if rec.sandbox.active && !rec.sandbox.shared {
        // A sandbox's rights are its own domain's only (`sandbox::sealed_pkru`): it takes no
        // process-wide grant (and so holds none), and gets them back when it yields.
        let holds = if rec.inherited { u32::MAX } else { 0 };
        rec.holds.store(holds, Ordering::SeqCst);
        return;
    }
    // (Dekker with `broadcast`: announce, then read the rights.)
    rec.resyncing.store(true, Ordering::SeqCst);
    std::sync::atomic::fence(Ordering::SeqCst);
    // While the thread creates threads without rights, it gets the value without views.
    let mut with_views = rec.gate.pkru;
    let mut without_views = rec.gate.pkru;
    let mut holds = 0;
    let high = root().slots_high.load(Ordering::Acquire);
    for (idx, slot) in root().managers[..high].iter().enumerate() {
        let Some((uid, mask, global)) = read_slot(slot) else {
            continue;
        };
        let bits = match current {
            Some((i, bits)) if i as usize == idx => bits.bits(),
            _ => match rec.cxs.get(idx).copied().flatten() {
                Some(p) if cx_ref(p.as_ptr()).mgr_uid == uid => {
                    cx_ref(p.as_ptr()).top_bits(Pkru::from_bits(mask)).bits()
                }
                _ => mask,
            },
        };
        with_views = (with_views & !mask) | canonical(normalized(bits) & global & mask);
        without_views = (without_views & !mask) | canonical(global & mask);
        holds |= granted_fields(global & mask, mask);
    }
    rec.gate.pkru = if rec.spawning {
        without_views
    } else {
        with_views
    };
    // A context that still runs with the inherited PKRU may hold anything its creator did.
    let holds = if rec.inherited { u32::MAX } else { holds };
    rec.holds.store(holds, Ordering::SeqCst);
    rec.resyncing.store(false, Ordering::SeqCst);
}

/// The fields (both bits) of the keys in `mask` whose value in `g` grants some access.
fn granted_fields(g: u32, mask: u32) -> u32 {
    // A field denies everything when both its bits are set.
    let none = g & (g >> 1) & 0x5555_5555;
    let some = mask & 0x5555_5555 & !none;
    some | (some << 1)
}

/// A live hardware manager's slot: `(uid, mask, global)`, read consistently.
fn read_slot(slot: &MgrSlot) -> Option<(u64, u32, u32)> {
    if !slot.hardware.load(Ordering::Acquire) {
        return None;
    }
    let uid = slot.uid.load(Ordering::Acquire);
    if uid == 0 || slot.ptr.load(Ordering::Acquire).is_null() {
        return None;
    }
    let mask = slot.mask.load(Ordering::Acquire);
    let global = slot.global.load(Ordering::Acquire);
    // The slot was not released and claimed again meanwhile (uids are never reused).
    (slot.uid.load(Ordering::Acquire) == uid && slot.hardware.load(Ordering::Acquire))
        .then_some((uid, mask, global))
}
