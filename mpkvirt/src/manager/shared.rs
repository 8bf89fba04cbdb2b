//! The manager's state inside the library: [`Shared`] (one per manager, in library memory,
//! named by a registry slot and uid), domain records, and each thread's [`ThreadCx`].
//!
//! Nothing here is reachable from application memory except through validated names: a
//! handle carries `(registry slot, uid)` for its manager and `(record index, uid)` for a
//! domain, and every op looks both up in library tables before use.
//!
//! # Safety
//!
//! `Inner` lists threads' contexts by raw pointer; it is declared `Send` because those
//! pointers are dereferenced only under the manager's lock while the contexts are listed,
//! and a thread unlists its context under that lock before freeing it.
#![allow(unsafe_code, reason = "Inner lists thread contexts by raw pointer")]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::{AccessRights, Pkey, Pkru};

use crate::alloc::{DomainHeap, FreeRanges};
use crate::backend::sealed::{LiveOps, Spec};
use crate::backend::{Backend, Regs};
use crate::config::Config;
use crate::error::Result;
use crate::keycache::{FenceMode, MAX_SLOTS, Registered, Slot, SlotRef, ThreadPins};
use crate::meta::{MBox, MVec, Meta};
use crate::policy::LivePolicy;
use crate::slab::Slab;
use crate::treap::Treap;

use super::{Stats, ThreadStats};

/// A domain's name inside its manager: record index and uid (never reused).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub(crate) struct DomRef {
    pub(crate) idx: u32,
    pub(crate) uid: u64,
}

/// A manager's name: registry slot and uid.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub(crate) struct MgrRef {
    pub(crate) idx: u32,
    pub(crate) uid: u64,
}

/// A domain record, in the manager's slab. Reused after the domain is destroyed (a new uid).
#[derive(Debug, Default)]
pub(crate) struct DomainRec {
    /// The domain's uid; 0 while the record is free.
    pub(crate) uid: AtomicU64,
    pub(crate) base: AtomicUsize,
    pub(crate) len: AtomicUsize,
    /// The address-space arena the range was carved from (ranges are given back to it).
    pub(crate) arena: AtomicU32,
    /// The key slot the domain holds, if resident. Written under the manager's lock.
    pub(crate) slot: SlotRef,
    /// Process-wide page protection (`Prot` bits). Written under the manager's lock.
    pub(crate) prot: AtomicU32,
    /// Whether files were mapped into the range (a discard must then replace mappings).
    pub(crate) mapped_files: AtomicBool,
    /// The domain's allocator; `None` while the record is free.
    pub(crate) heap: Mutex<Option<MBox<DomainHeap<Meta>>>>,
}

impl DomainRec {
    #[inline]
    pub(crate) fn uid(&self) -> u64 {
        self.uid.load(Ordering::Acquire)
    }
    pub(crate) fn base(&self) -> usize {
        self.base.load(Ordering::Relaxed)
    }
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
    pub(crate) fn prot(&self) -> Prot {
        Prot::from_bits_truncate(self.prot.load(Ordering::Relaxed) as i32)
    }
}

/// One live view of a thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) id: u64,
    /// The thread-wide sequence number of the view (for ending views after a fault).
    pub(crate) seq: u64,
    /// The view's bits for the manager's keys.
    pub(crate) bits: Pkru,
    /// Slots it pinned (bit i: slot i).
    pub(crate) pinned: u16,
}

/// A thread's state for one manager, in library memory: its pins (read by evictors), its
/// stack of live views, its virtual PKRU (emulated and simulated backends), its counters.
#[derive(Debug)]
pub(crate) struct ThreadCx {
    pub(crate) mgr_uid: u64,
    pub(crate) pins: ThreadPins,
    /// Whether evictors see `pins` (the thread is in the manager's list).
    pub(crate) registered: Registered,
    /// The thread's use counters as the last miss saw them (written by evictors, under the
    /// manager's lock): unchanged across two misses and no pin means idle.
    pub(crate) seen_activity: AtomicU32,
    pub(crate) stack: MVec<Entry>,
    pub(crate) next_id: u64,
    pub(crate) stats: ThreadStats,
    /// The thread's rights for this manager's keys on backends without PKU.
    pub(crate) virt_pkru: Pkru,
    /// The futex word the thread sleeps on while it waits in the manager's queue behind
    /// others: bumped (under the manager's lock) when it moves to the front.
    pub(crate) turn: AtomicU32,
}

impl ThreadCx {
    pub(crate) fn new(mgr_uid: u64) -> ThreadCx {
        ThreadCx {
            mgr_uid,
            pins: ThreadPins::new(),
            registered: Registered::new(),
            seen_activity: AtomicU32::new(u32::MAX),
            stack: MVec::new_in(Meta),
            next_id: 0,
            stats: ThreadStats::default(),
            virt_pkru: Pkru::LINUX_INIT,
            turn: AtomicU32::new(0),
        }
    }

    /// The bits of the thread's current view for `sh`'s keys (base bits without a view).
    pub(crate) fn top_bits(&self, base: Pkru) -> Pkru {
        self.stack.last().map_or(base, |e| e.bits)
    }
}

/// A thread in a manager's queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waiter {
    pub(crate) cx: *const ThreadCx,
    /// Its thread's id (to tell a waiter that stopped looking at the queue from one that died).
    pub(crate) tid: i32,
    /// When it last looked at the queue while at its head (or when it became the head): the
    /// head looks at least every `SYNC_POLL`.
    pub(crate) seen: std::time::Instant,
}

/// The part of a manager behind its lock.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) policy: LivePolicy<Meta>,
    /// The domain bound to each slot.
    pub(crate) bound: [Option<DomRef>; MAX_SLOTS],
    /// When each slot was last bound (a counter of bindings): waiters drain the slot bound
    /// longest ago, so that keys rotate among contending threads.
    pub(crate) bound_at: [u64; MAX_SLOTS],
    pub(crate) bindings: u64,
    /// Sum of all threads' use counters of each slot when last swept into the policy.
    pub(crate) seen_uses: [u32; MAX_SLOTS],
    /// Pin cells of the threads evictors must look at (see `keycache::Registered`).
    pub(crate) threads: MVec<*const ThreadCx>,
    /// Parked address space not given to any domain: start -> (len, arena).
    pub(crate) free: FreeRanges<Meta>,
    /// Free domain record indices.
    pub(crate) free_records: MVec<u32>,
    /// Id of the next arena (reservation) the manager makes: free ranges merge only within
    /// one.
    pub(crate) next_arena: u32,
    /// Threads waiting for keys, first come first served.
    pub(crate) queue: MVec<Waiter>,
    /// Slots being drained for the head of the queue (bit i: slot i).
    pub(crate) draining: u16,
    /// Slots whose domain has process-wide rights (never evicted or drained; see
    /// `global.rs`).
    pub(crate) global_pins: u16,
    /// Slots some thread may hold stale process-wide rights to (a revocation it did not
    /// acknowledge): they become dead instead of free when their domain lets go.
    pub(crate) tainted: u16,
    /// Per slot: revocations of its process-wide rights still waiting for threads. While one
    /// is, the slot keeps its global pin (only the last one to end may drop it), and a later
    /// revocation of the domain (or its destruction) waits for it (`global::set`).
    pub(crate) revoking: [u32; MAX_SLOTS],
    /// Per slot: threads the last failed revocation did not hear from (with `tainted`).
    pub(crate) unsynced: [u32; MAX_SLOTS],
    /// The process-wide rights as one more contributor (emulated backend).
    pub(crate) global_virt: Pkru,
    pub(crate) stats: Stats,
}

// SAFETY: the raw pointers name `ThreadCx`s in library memory; they are dereferenced only
// under the manager's lock, while their threads keep them registered (a thread removes its
// cx from these lists, under the same lock, before freeing it).
unsafe impl Send for Inner {}

/// One manager, in library memory.
pub(crate) struct Shared<B: Backend> {
    pub(crate) uid: u64,
    pub(crate) slot_idx: u32,
    pub(crate) live: <B as Spec>::Live,
    /// The keys, and per slot its PKRU field as a mask with the field's read-only value
    /// (read-write is zero), so the hit path merges without shifting.
    pub(crate) keys: [Pkey; MAX_SLOTS],
    pub(crate) nkeys: usize,
    pub(crate) key_fields: [(u32, u32); MAX_SLOTS],
    pub(crate) slots: [Slot; MAX_SLOTS],
    /// PKRU fields of the manager's keys.
    pub(crate) our_mask: u32,
    /// Every key of the manager access-disabled.
    pub(crate) base_bits: Pkru,
    /// Whether the keys are hardware keys (threads' PKRU carries the process-wide rights).
    pub(crate) hardware: bool,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) domains: Slab<DomainRec>,
    pub(crate) fence: FenceMode,
    pub(crate) config: Config,
    /// Live domains by address, for fault reports: base -> (len, uid).
    pub(crate) ranges: RwLock<Treap<u64, Meta>>,
    /// Threads waiting for a key; leavers wake them through `wake`.
    pub(crate) waiters: AtomicU32,
    pub(crate) wake: AtomicU32,
    /// Bumped whenever waiters leave the queue (its progress, which waiters far back watch).
    pub(crate) queue_gen: AtomicU32,
    /// Bumped whenever a revocation of process-wide rights ends; revokers that join one in
    /// progress wait on it (`global::set`).
    pub(crate) revoked_gen: AtomicU32,
    /// Whether the manager is being torn down (its ops fail).
    pub(crate) dying: AtomicBool,
}

impl<B: Backend> std::fmt::Debug for Shared<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("uid", &self.uid)
            .field("keys", &&self.keys[..self.nkeys])
            .finish()
    }
}

impl<B: Backend> Shared<B> {
    pub(crate) fn keys(&self) -> &[Pkey] {
        &self.keys[..self.nkeys]
    }

    /// The domain record `d`, if `d` names a live domain of this manager.
    #[inline]
    pub(crate) fn domain(&self, d: DomRef) -> Option<&DomainRec> {
        let rec = self.domains.get(d.idx)?;
        (d.uid != 0 && rec.uid() == d.uid).then_some(rec)
    }

    /// The calling thread's rights for this manager's keys.
    pub(crate) fn regs<'a>(&self, cx: &'a mut ThreadCx, real: &'a mut u32) -> Regs<'a> {
        Regs {
            virt: &mut cx.virt_pkru,
            real,
        }
    }

    /// Writes the thread's rights for the view bits `bits` (merged into the bits of keys
    /// other managers own), unless they already hold them. `holds`: the thread record's
    /// (process-wide rights taken here are recorded in it: `global::with_globals_held`).
    ///
    /// An error: some key's rights could not be granted (the emulated backend's `mprotect`
    /// failed, at the process's mapping limit); that key keeps the thread's old rights.
    pub(crate) fn apply(
        &self,
        cx: &mut ThreadCx,
        real: &mut u32,
        holds: &AtomicU32,
        bits: Pkru,
    ) -> Result<()> {
        let mut regs = Regs {
            virt: &mut cx.virt_pkru,
            real,
        };
        let cur = self.live.read_pkru(&regs);
        let bits = if self.hardware {
            super::global::with_globals_held(self, holds, bits)
        } else {
            bits
        };
        let new = cur.merge(bits, self.our_mask);
        if new == cur {
            cx.stats.pkru_writes_skipped += 1;
            Ok(())
        } else {
            cx.stats.pkru_writes += 1;
            self.live.write_pkru(&mut regs, new)
        }
    }

    /// `bits` with slot `s` granted `rights`.
    #[inline]
    pub(crate) fn grant(&self, bits: Pkru, s: usize, read_only: bool) -> Pkru {
        let (mask, ro) = self.key_fields[s];
        Pkru::from_bits((bits.bits() & !mask) | if read_only { ro } else { 0 })
    }

    /// The key of slot `s`.
    pub(crate) fn key(&self, s: usize) -> Pkey {
        self.keys[s]
    }

    /// Builds the state of a manager from a backend specification (inside the library).
    pub(crate) fn build(spec: B, config: Config, uid: u64) -> crate::error::Result<Shared<B>> {
        let live = spec.build()?;
        let live_keys = live.keys();
        let nkeys = live_keys.len().min(MAX_SLOTS - 1);
        if nkeys == 0 {
            return Err(crate::error::Error::AllocKeys(
                mpkvirt_sys::Error::KeysExhausted,
            ));
        }
        let mut keys = [Pkey::DEFAULT; MAX_SLOTS];
        keys[..nkeys].copy_from_slice(&live_keys[..nkeys]);
        let our_mask = keys[..nkeys].iter().fold(0, |m, &k| m | Pkru::key_mask(k));
        let base_bits = keys[..nkeys]
            .iter()
            .fold(Pkru::ALLOW_ALL, |p, &k| p.with(k, AccessRights::NONE));
        let mut key_fields = [(0, 0); MAX_SLOTS];
        for (s, &k) in keys[..nkeys].iter().enumerate() {
            key_fields[s] = (
                Pkru::key_mask(k),
                Pkru::ALLOW_ALL.with(k, AccessRights::READ_ONLY).bits(),
            );
        }
        // Asymmetric fences need membarrier (registered once per process).
        let fence = super::binding::process_fence();
        let free_records = MVec::new_in(Meta);
        let bound = [None; MAX_SLOTS];
        let hardware = live.kind() == crate::backend::BackendKind::Hardware;
        Ok(Shared {
            uid,
            slot_idx: u32::MAX,
            live,
            keys,
            nkeys,
            key_fields,
            slots: std::array::from_fn(|_| Slot::new()),
            our_mask,
            base_bits,
            hardware,
            inner: Mutex::new(Inner {
                policy: crate::policy::new_policy_in(config.policy, nkeys, Meta),
                bound,
                bound_at: [0; MAX_SLOTS],
                bindings: 0,
                seen_uses: [0; MAX_SLOTS],
                threads: MVec::new_in(Meta),
                free: FreeRanges::new_in(Meta),
                free_records,
                next_arena: 0,
                queue: MVec::new_in(Meta),
                draining: 0,
                global_pins: 0,
                tainted: 0,
                revoking: [0; MAX_SLOTS],
                unsynced: [0; MAX_SLOTS],
                global_virt: base_bits,
                stats: Stats::default(),
            }),
            domains: Slab::new(),
            fence,
            config,
            ranges: RwLock::new(Treap::new_in(Meta)),
            waiters: AtomicU32::new(0),
            wake: AtomicU32::new(0),
            queue_gen: AtomicU32::new(0),
            revoked_gen: AtomicU32::new(0),
            dying: AtomicBool::new(false),
        })
    }
}

/// Iterates the set bits of a 16-bit mask.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotIter(pub(crate) u16);

impl Iterator for SlotIter {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let i = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(i)
    }
}
