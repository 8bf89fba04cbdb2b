//! The manager: domains, the key cache, and per-thread views.
//!
//! # Hit path and slow path
//!
//! Entering a view pins each domain's key slot in the calling thread's own pin cell
//! (`keycache.rs`); when every domain of the view holds a key this is the whole cost: per
//! domain a store to the thread's cell and a load of the slot's owner (with `membarrier`
//! available, not even a barrier instruction), then at most one PKRU write (none when the
//! value is unchanged). On PKU hardware and the simulated backend that is no system call,
//! no lock and no shared cache line written (after the thread's first use of the manager,
//! which registers its pin cell); the emulated backend's PKRU write is an `mprotect` under
//! a lock whenever the union of the threads' rights changes.
//!
//! Only a *miss* takes the manager's mutex: it binds a free key, or evicts a victim the
//! policy chooses among unpinned keys — one `membarrier` to see every thread's pins, one
//! system call to park the victim's pages *before* the key is re-bound, one more to tag the
//! new domain's pages.
//!
//! # Views
//!
//! A thread's rights are those of the most recently entered view that is still alive (a view
//! *replaces* the rights of the views around it; it does not add to them). Views nest; each
//! keeps its keys pinned until it is dropped, in any order. Bits of keys the manager does not
//! own are left as they are.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::{AccessRights, Pkey, Pkru};
use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::alloc::{DomainHeap, FreeRanges};
use crate::backend::{Backend, BackendKind, Machine, RawFault, Simulated, ThreadRegs};
use crate::config::{Config, Selection};
use crate::domain::{Domain, DomainId, DomainInner, DomainOptions};
use crate::error::{Error, Result};
use crate::fault::{self, FaultKind, FaultReport};
use crate::keycache::{self, FREE, FenceMode, Slot, SlotRef, ThreadPins};
use crate::policy::{Policy, new_policy};

/// What a view grants a domain.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Rights {
    /// Reads and writes (as far as the domain's page protection allows).
    ReadWrite,
    /// Reads only.
    ReadOnly,
}

impl Rights {
    fn access_rights(self) -> AccessRights {
        match self {
            Rights::ReadWrite => AccessRights::READ_WRITE,
            Rights::ReadOnly => AccessRights::READ_ONLY,
        }
    }

    /// `bits` with the PKRU field `(mask, read_only_value)` set for these rights.
    #[inline]
    fn apply_to(self, bits: Pkru, (mask, read_only): (u32, u32)) -> Pkru {
        let value = match self {
            Rights::ReadWrite => 0,
            Rights::ReadOnly => read_only,
        };
        Pkru::from_bits((bits.bits() & !mask) | value)
    }
}

/// Counters of a manager (all threads).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Stats {
    /// Domains alive.
    pub domains: u64,
    /// Domains created so far.
    pub created: u64,
    /// Domains that had to be bound to a key (cold or after eviction).
    pub misses: u64,
    /// Bindings that evicted another domain.
    pub evictions: u64,
    /// Bindings made ahead of use by [`Manager::prefetch`].
    pub prefetched: u64,
}

/// Counters of the calling thread for one manager.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ThreadStats {
    /// Views entered.
    pub enters: u64,
    /// Views whose entry took the slow path (the manager's lock): some domain had no key.
    /// The others (`enters - slow_paths`) took no lock of the manager's and, on PKU hardware
    /// and the simulated backend, no system call.
    pub slow_paths: u64,
    /// PKRU writes (WRPKRU through the gate on hardware).
    pub pkru_writes: u64,
    /// PKRU writes skipped because the value was already in place.
    pub pkru_writes_skipped: u64,
}

/// One live view of a thread.
#[derive(Clone, Copy, Debug)]
struct Entry {
    id: u64,
    /// The view's bits for the manager's keys.
    bits: Pkru,
    /// Slots it pinned (bit i: slot i).
    pinned: u16,
}

struct ThreadCx {
    mgr_uid: u64,
    regs: ThreadRegs,
    /// This thread's pins, also registered (weakly) with the manager for evictors.
    pins: Arc<ThreadPins>,
    stack: Vec<Entry>,
    next_id: u64,
    stats: ThreadStats,
    /// The manager, to end views whose guards will never drop (thread exit, guarded calls).
    owner: Option<Weak<dyn CxOwner>>,
}

impl fmt::Debug for ThreadCx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadCx")
            .field("mgr_uid", &self.mgr_uid)
            .field("stack", &self.stack)
            .finish()
    }
}

impl ThreadCx {
    fn new(mgr_uid: u64, pins: Arc<ThreadPins>, owner: Option<Weak<dyn CxOwner>>) -> ThreadCx {
        ThreadCx {
            mgr_uid,
            regs: ThreadRegs::default(),
            pins,
            stack: Vec::with_capacity(8),
            next_id: 0,
            stats: ThreadStats::default(),
            owner,
        }
    }
}

impl Drop for ThreadCx {
    /// The thread is exiting (or the manager's slot is reused) with views still live: their
    /// guards may never drop, or drop after this state is gone. End them now, while the rights
    /// can still be revoked, so that no key stays granted without a pin.
    fn drop(&mut self) {
        if self.stack.is_empty() {
            return;
        }
        if let Some(owner) = self.owner.take().and_then(|w| w.upgrade()) {
            owner.end_views_from(self, 0);
        }
    }
}

/// What a thread's state needs from its manager to end views without their guards.
trait CxOwner: Send + Sync {
    /// Ends the views of `cx` (the calling thread's) whose id is at least `from_id`: rights
    /// revoked first (PKRU back to the newest remaining view), pins released second.
    fn end_views_from(&self, cx: &mut ThreadCx, from_id: u64);
}

thread_local! {
    /// Per-thread state of every manager, indexed by the manager's `tls_index`.
    static CONTEXTS: RefCell<Vec<ThreadCx>> = const { RefCell::new(Vec::new()) };
}

/// Small indices for managers' per-thread state; recycled.
static TLS_INDICES: Mutex<(usize, Vec<usize>)> = Mutex::new((0, Vec::new()));
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

fn next_uid() -> u64 {
    NEXT_UID.fetch_add(1, Ordering::Relaxed)
}

struct Inner {
    policy: Box<dyn Policy>,
    /// The domain bound to each slot.
    bound: Vec<Option<Arc<DomainInner>>>,
    /// Sum of all threads' use counters of each slot when last swept into the policy.
    seen_uses: Vec<u32>,
    /// Pin cells of the threads that used this manager (dead threads' cells are pruned).
    threads: Vec<Weak<ThreadPins>>,
    /// Parked address space not given to any domain.
    free: FreeRanges,
    stats: Stats,
}

pub(crate) struct Shared<B: Backend> {
    uid: u64,
    tls_index: usize,
    backend: B,
    keys: Box<[Pkey]>,
    /// Per slot: its PKRU field as a mask, and the field's value for read-only rights
    /// (read-write is zero), so the hit path merges without shifting.
    key_fields: Box<[(u32, u32)]>,
    slots: Box<[Slot]>,
    /// PKRU fields of the manager's keys.
    our_mask: u32,
    /// Every key of the manager access-disabled.
    base_bits: Pkru,
    inner: Mutex<Inner>,
    fence: FenceMode,
    config: Config,
    selection: Option<Selection>,
    /// Live domains by address, for fault reports: base -> (end, id).
    ranges: RwLock<BTreeMap<usize, (usize, DomainId)>>,
}

impl<B: Backend> Shared<B> {
    /// Writes the thread's PKRU for the view bits `bits`, unless it already holds them.
    #[inline]
    fn apply(&self, cx: &mut ThreadCx, bits: Pkru) {
        let cur = self.backend.read_pkru(&cx.regs);
        let new = cur.merge(bits, self.our_mask);
        if new == cur {
            cx.stats.pkru_writes_skipped += 1;
        } else {
            self.backend.write_pkru(&mut cx.regs, new);
            cx.stats.pkru_writes += 1;
        }
    }
}

impl<B: Backend> CxOwner for Shared<B> {
    fn end_views_from(&self, cx: &mut ThreadCx, from_id: u64) {
        let mut ended = Vec::new();
        cx.stack.retain(|e| {
            let keep = e.id < from_id;
            if !keep {
                ended.push(e.pinned);
            }
            keep
        });
        let top = cx.stack.last().map_or(self.base_bits, |e| e.bits);
        self.apply(cx, top);
        for pinned in ended {
            for s in SlotIter(pinned) {
                cx.pins.unpin(s);
            }
        }
    }
}

impl<B: Backend> Drop for Shared<B> {
    fn drop(&mut self) {
        // A view whose guard was forgotten (`mem::forget`) still pins its key, and its thread
        // may still have the rights: freeing the key would let the next `pkey_alloc` hand
        // those rights over. Keep such keys allocated.
        let all = u16::try_from((1u32 << self.keys.len()) - 1).unwrap_or(u16::MAX);
        let inner = self.inner.get_mut();
        if live_threads(inner).iter().any(|t| t.pins_any(all)) {
            self.backend.retire_keys();
            fault::log_line(
                "mpkvirt: manager dropped while views of it are live (forgotten guards); its keys stay allocated\n",
            );
        }
        TLS_INDICES.lock().1.push(self.tls_index);
    }
}

/// The pin cells of the threads alive now (pruning the cells of threads that exited).
fn live_threads(inner: &mut Inner) -> Vec<Arc<ThreadPins>> {
    let mut live = Vec::with_capacity(inner.threads.len());
    inner.threads.retain(|w| match w.upgrade() {
        Some(t) => {
            live.push(t);
            true
        }
        None => false,
    });
    live
}

/// Owns a backend, its keys and the domains created through it. Cheap to clone (a handle).
pub struct Manager<B: Backend = Machine> {
    pub(crate) shared: Arc<Shared<B>>,
}

impl<B: Backend> Clone for Manager<B> {
    fn clone(&self) -> Self {
        Manager {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: Backend> fmt::Debug for Manager<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("backend", &self.shared.backend.kind())
            .field("keys", &self.shared.keys)
            .finish()
    }
}

impl Manager<Machine> {
    /// A manager on the machine `config.mode` selects (hardware PKU or the emulation).
    ///
    /// # Errors
    ///
    /// [`Error::HardwareRequired`] for `Mode::Hardware` without PKU; key allocation and
    /// handler installation failures.
    pub fn new(config: Config) -> Result<Manager<Machine>> {
        let (machine, selection) = Machine::new(&config)?;
        Ok(Manager::build(machine, config, Some(selection)))
    }
}

impl Manager<Simulated> {
    /// A manager on the simulated backend with `keys` keys (no memory behind it).
    pub fn simulated(keys: usize, config: Config) -> Manager<Simulated> {
        Manager::with_backend(Simulated::new(keys), config)
    }
}

impl<B: Backend> Manager<B> {
    /// A manager on an explicitly built backend.
    pub fn with_backend(backend: B, config: Config) -> Manager<B> {
        Manager::build(backend, config, None)
    }

    fn build(backend: B, config: Config, selection: Option<Selection>) -> Manager<B> {
        let keys: Box<[Pkey]> = backend.keys().into();
        assert!(
            !keys.is_empty() && keys.len() <= 16,
            "a backend provides 1 to 16 keys"
        );
        let our_mask = keys.iter().fold(0, |m, &k| m | Pkru::key_mask(k));
        let base_bits = keys
            .iter()
            .fold(Pkru::ALLOW_ALL, |p, &k| p.with(k, AccessRights::NONE));
        let tls_index = {
            let mut ix = TLS_INDICES.lock();
            ix.1.pop().unwrap_or_else(|| {
                ix.0 += 1;
                ix.0 - 1
            })
        };
        let n = keys.len();
        // Asymmetric fences need membarrier; registering is idempotent and cheap.
        let fence = if mpkvirt_sys::membarrier::register_private_expedited().is_ok() {
            FenceMode::Asymmetric
        } else {
            FenceMode::Symmetric
        };
        let inner = Inner {
            policy: new_policy(config.policy, n),
            bound: vec![None; n],
            seen_uses: vec![0; n],
            threads: Vec::new(),
            free: FreeRanges::default(),
            stats: Stats::default(),
        };
        Manager {
            shared: Arc::new(Shared {
                uid: next_uid(),
                tls_index,
                backend,
                slots: (0..n).map(|_| Slot::new()).collect(),
                key_fields: keys
                    .iter()
                    .map(|&k| {
                        (
                            Pkru::key_mask(k),
                            Pkru::ALLOW_ALL.with(k, AccessRights::READ_ONLY).bits(),
                        )
                    })
                    .collect(),
                keys,
                our_mask,
                base_bits,
                inner: Mutex::new(inner),
                fence,
                config,
                selection,
                ranges: RwLock::new(BTreeMap::new()),
            }),
        }
    }

    /// Which backend this manager runs on.
    pub fn backend_kind(&self) -> BackendKind {
        self.shared.backend.kind()
    }

    /// Why this backend was chosen (managers built with [`Manager::new`]).
    pub fn selection(&self) -> Option<&Selection> {
        self.shared.selection.as_ref()
    }

    /// The hardware (or virtual) keys domains are bound to.
    pub fn keys(&self) -> &[Pkey] {
        &self.shared.keys
    }

    pub(crate) fn key_of_slot(&self, slot: usize) -> Pkey {
        self.shared.keys[slot]
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Counters for all threads.
    pub fn stats(&self) -> Stats {
        self.shared.inner.lock().stats
    }

    /// Counters for the calling thread.
    pub fn thread_stats(&self) -> ThreadStats {
        self.with_cx(|cx| cx.stats).unwrap_or_default()
    }

    /// The calling thread's PKRU as the backend sees it (the real register on hardware).
    pub fn current_pkru(&self) -> Pkru {
        self.with_cx(|cx| self.shared.backend.read_pkru(&cx.regs))
            .unwrap_or(Pkru::LINUX_INIT)
    }

    /// Runs `f` on the calling thread's state for this manager (`None` during thread exit).
    #[inline]
    fn with_cx<R>(&self, f: impl FnOnce(&mut ThreadCx) -> R) -> Option<R> {
        let sh = &*self.shared;
        CONTEXTS
            .try_with(|c| {
                let mut v = c.borrow_mut();
                if v.get(sh.tls_index).is_none_or(|cx| cx.mgr_uid != sh.uid) {
                    self.init_cx(&mut v);
                }
                f(&mut v[sh.tls_index])
            })
            .ok()
    }

    /// First use of this manager on this thread: a fresh state, with a pin cell registered
    /// for evictors. Out of line: it allocates and takes the manager's lock.
    #[cold]
    #[inline(never)]
    fn init_cx(&self, v: &mut Vec<ThreadCx>) {
        let sh = &*self.shared;
        if v.len() <= sh.tls_index {
            v.resize_with(sh.tls_index + 1, || {
                ThreadCx::new(0, Arc::new(ThreadPins::new()), None)
            });
        }
        let pins = Arc::new(ThreadPins::new());
        sh.inner.lock().threads.push(Arc::downgrade(&pins));
        let owner: Weak<dyn CxOwner> = Arc::downgrade(&self.shared) as Weak<dyn CxOwner>;
        v[sh.tls_index] = ThreadCx::new(sh.uid, pins, Some(owner));
    }

    // ---- domains ------------------------------------------------------------------------

    /// Creates a domain. It holds no key until a view uses it, and costs no system call
    /// unless the manager needs more address space.
    ///
    /// # Errors
    ///
    /// [`Error::Reserve`] when address space runs out.
    pub fn create_domain(&self, opts: DomainOptions) -> Result<Domain<B>> {
        let sh = &*self.shared;
        let len = mman::page_round_up(opts.reserve.unwrap_or(sh.config.default_reserve).max(1));
        let mut inner = sh.inner.lock();
        let base = self.carve(&mut inner, len)?;
        let id = DomainId(next_uid());
        let dom = Arc::new(DomainInner {
            id,
            base,
            len,
            slot: SlotRef::new(),
            prot: Mutex::new(opts.prot),
            heap: Mutex::new(DomainHeap::new(len, mman::page_size())),
            mapped_files: std::sync::atomic::AtomicBool::new(false),
        });
        inner.stats.created += 1;
        inner.stats.domains += 1;
        drop(inner);
        sh.ranges.write().insert(base, (base + len, id));
        Ok(Domain {
            inner: dom,
            mgr: self.clone(),
        })
    }

    /// First fit from the parked free ranges, else a fresh reservation.
    fn carve(&self, inner: &mut Inner, len: usize) -> Result<usize> {
        if let Some(start) = inner.free.take_first_fit(len) {
            return Ok(start);
        }
        let chunk = len.max(self.shared.config.arena_chunk);
        let start = self.shared.backend.reserve(chunk)?;
        if chunk > len {
            inner.free.give_back(start + len, chunk - len);
        }
        Ok(start)
    }

    pub(crate) fn destroy(&self, d: &Arc<DomainInner>) {
        let sh = &*self.shared;
        sh.ranges.write().remove(&d.base);
        let mut inner = sh.inner.lock();
        inner.stats.domains -= 1;
        // Take the key back once no thread pins it. A pin seen now may be transient (a thread
        // with a stale binding about to back off), so look again a few times.
        let slot = d.slot.get();
        let claimed = match slot {
            None => true,
            Some(s) => {
                let mut claimed = false;
                for attempt in 0..64 {
                    if attempt > 0 {
                        MutexGuard::unlocked(&mut inner, std::thread::yield_now);
                    }
                    if self.claim(&mut inner, s, d.id.0) {
                        claimed = true;
                        break;
                    }
                }
                claimed
            }
        };
        // Park and empty the pages before the key may go to another domain.
        let discarded = sh
            .backend
            .discard(d.base, d.len, d.mapped_files.load(Ordering::Relaxed));
        if let Some(s) = slot {
            if claimed && discarded.is_ok() {
                d.slot.set(None);
                sh.slots[s].set_owner(FREE);
                inner.bound[s] = None;
                inner.policy.unbind(s);
            } else {
                // A forgotten view still pins the key, or the pages could not be parked: the
                // key stays with the dead domain for good, so nobody else is granted it.
                if claimed {
                    sh.slots[s].set_owner(d.id.0);
                }
                fault::log_line(&format!(
                    "mpkvirt: domain {} destroyed while its key {} is pinned or its pages could not be parked; the key is retired\n",
                    d.id, sh.keys[s]
                ));
            }
        }
        match discarded {
            Ok(()) => {
                inner.free.give_back(d.base, d.len);
            }
            Err(e) => fault::log_line(&format!(
                "mpkvirt: cannot discard domain {}: {e}; its address range is retired\n",
                d.id
            )),
        }
    }

    pub(crate) fn protect(&self, d: &Domain<B>, prot: Prot) -> Result<()> {
        let sh = &*self.shared;
        let _inner = sh.inner.lock();
        let old = std::mem::replace(&mut *d.inner.prot.lock(), prot);
        if let Some(s) = d.inner.slot.get()
            && let Err(e) = sh
                .backend
                .tag(d.inner.base, d.inner.len, prot, Some(sh.keys[s]))
        {
            *d.inner.prot.lock() = old;
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn reset(&self, d: &Domain<B>) -> Result<()> {
        let sh = &*self.shared;
        let _inner = sh.inner.lock();
        *d.inner.heap.lock() = DomainHeap::new(d.inner.len, mman::page_size());
        let files = d.inner.mapped_files.swap(false, Ordering::Relaxed);
        sh.backend.discard(d.inner.base, d.inner.len, files)?;
        // Discarding parked the range (no access, key 0): apply the binding again.
        self.retag_whole(d)
    }

    pub(crate) fn map_fd(
        &self,
        d: &Domain<B>,
        addr: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<()> {
        let sh = &*self.shared;
        let _inner = sh.inner.lock();
        d.inner.mapped_files.store(true, Ordering::Relaxed);
        sh.backend.map_fd(addr, len, fd, offset)?;
        // mmap gave the new pages key 0 and no access: apply the binding to the whole domain
        // (one call, and the emulated backend keeps the whole range as the key's).
        self.retag_whole(d)
    }

    /// Applies the domain's binding to its whole range again after part of it was mapped
    /// over (the new pages have no access and key 0). One system call when resident; nothing
    /// to do when parked. Call with the manager's lock held.
    fn retag_whole(&self, d: &Domain<B>) -> Result<()> {
        let sh = &*self.shared;
        match d.inner.slot.get() {
            Some(s) => sh.backend.tag(
                d.inner.base,
                d.inner.len,
                *d.inner.prot.lock(),
                Some(sh.keys[s]),
            ),
            None => Ok(()),
        }
    }

    /// Gives a freed page run of `d` zero pages again (and its memory back to the system).
    pub(crate) fn zero_run(&self, d: &Domain<B>, addr: usize, len: usize) -> Result<()> {
        let sh = &*self.shared;
        let _inner = sh.inner.lock();
        let files = d.inner.mapped_files.load(Ordering::Relaxed);
        sh.backend.zero(addr, len, files)?;
        if files { self.retag_whole(d) } else { Ok(()) }
    }

    /// The live domain whose reservation contains `addr`.
    pub fn domain_at(&self, addr: usize) -> Option<DomainId> {
        let ranges = self.shared.ranges.read();
        let (_, &(end, id)) = ranges.range(..=addr).next_back()?;
        (addr < end).then_some(id)
    }

    fn report(&self, raw: RawFault, kind: FaultKind) -> FaultReport {
        FaultReport {
            kind,
            domain: self.domain_at(raw.addr),
            addr: raw.addr,
            access: raw.access,
            hw_key: raw.pkey,
            code: raw.code,
        }
    }

    // ---- views ------------------------------------------------------------------------------

    /// Enters a view: until the guard is dropped, the calling thread may access exactly the
    /// listed domains, with the listed rights (and no other domain of this manager).
    ///
    /// # Errors
    ///
    /// [`Error::ViewTooLarge`], [`Error::DuplicateDomain`], [`Error::ForeignDomain`] for a
    /// malformed view; [`Error::KeysBusy`] when every key stays pinned by other views for
    /// [`Config::pin_wait`]; [`Error::Retag`] when binding fails.
    #[inline]
    pub fn enter<'a>(&'a self, view: &[(&'a Domain<B>, Rights)]) -> Result<ViewGuard<'a, B>> {
        let token = self.enter_token(view)?;
        Ok(ViewGuard {
            mgr: self,
            token,
            _borrow: PhantomData,
        })
    }

    /// Like [`Manager::enter`], for domains shared through `Arc`: the guard keeps them alive
    /// (a domain whose last handle is dropped is destroyed only after the views using it
    /// end). This is what the C API's `mpk_begin`/`mpk_end` pairs use.
    ///
    /// # Errors
    ///
    /// As [`Manager::enter`].
    pub fn enter_owned(&self, view: &[(Arc<Domain<B>>, Rights)]) -> Result<OwnedViewGuard<B>> {
        let refs: Vec<(&Domain<B>, Rights)> = view.iter().map(|(d, r)| (&**d, *r)).collect();
        let token = self.enter_token(&refs)?;
        let domains = view.iter().map(|(d, _)| Arc::clone(d)).collect();
        Ok(OwnedViewGuard {
            mgr: self.clone(),
            token,
            _domains: domains,
        })
    }

    #[inline]
    fn enter_token(&self, view: &[(&Domain<B>, Rights)]) -> Result<Token> {
        let sh = &*self.shared;
        if view.len() > sh.keys.len() {
            return Err(Error::ViewTooLarge {
                domains: view.len(),
                keys: sh.keys.len(),
            });
        }
        let entered = self.with_cx(|cx| {
            let mut pinned: u16 = 0;
            let mut bits = sh.base_bits;
            let mut missing: u16 = 0;
            for (i, (d, r)) in view.iter().enumerate() {
                if !Arc::ptr_eq(&d.mgr.shared, &self.shared) {
                    self.unpin(&cx.pins, pinned);
                    return Err(Error::ForeignDomain(d.id()));
                }
                if i > 0 && view[..i].iter().any(|(e, _)| e.inner.id == d.inner.id) {
                    self.unpin(&cx.pins, pinned);
                    return Err(Error::DuplicateDomain(d.id()));
                }
                match d.inner.slot.get() {
                    Some(s) if cx.pins.try_pin(&sh.slots, s, d.inner.id.0, sh.fence) => {
                        pinned |= 1 << s;
                        bits = r.apply_to(bits, sh.key_fields[s]);
                    }
                    _ => missing |= 1 << i,
                }
            }
            if missing != 0 {
                cx.stats.slow_paths += 1;
                if let Err(e) = self.slow_enter(&cx.pins, view, missing, &mut pinned, &mut bits) {
                    self.unpin(&cx.pins, pinned);
                    return Err(e);
                }
            }
            cx.next_id += 1;
            let id = cx.next_id;
            cx.stack.push(Entry { id, bits, pinned });
            cx.stats.enters += 1;
            self.apply(cx, bits);
            Ok(Token {
                id,
                pinned,
                _not_send: PhantomData,
            })
        });
        entered.unwrap_or(Err(Error::Unsupported(
            "entering a view while the thread is exiting",
        )))
    }

    /// Runs `f` inside a view (see [`Manager::enter`]); the view ends when `f` returns or
    /// unwinds.
    ///
    /// # Errors
    ///
    /// As [`Manager::enter`].
    pub fn with_view<R>(&self, view: &[(&Domain<B>, Rights)], f: impl FnOnce() -> R) -> Result<R> {
        let _guard = self.enter(view)?;
        Ok(f())
    }

    /// Writes the thread's PKRU for the view bits `bits`, unless it already holds them.
    #[inline]
    fn apply(&self, cx: &mut ThreadCx, bits: Pkru) {
        self.shared.apply(cx, bits);
    }

    /// Releases the pins of `pinned` slots in the calling thread's cell.
    #[inline]
    fn unpin(&self, pins: &ThreadPins, pinned: u16) {
        for s in SlotIter(pinned) {
            pins.unpin(s);
        }
    }

    #[inline]
    fn leave(&self, id: u64, pinned: u16) {
        let sh = &*self.shared;
        let left = self.with_cx(|cx| {
            // Views usually end in reverse order of entry: the top of the stack.
            let found = match cx.stack.last() {
                Some(top) if top.id == id => cx.stack.pop().is_some(),
                _ => cx
                    .stack
                    .iter()
                    .rposition(|e| e.id == id)
                    .map(|pos| cx.stack.remove(pos))
                    .is_some(),
            };
            let top = cx.stack.last().map_or(sh.base_bits, |e| e.bits);
            self.apply(cx, top);
            // Revoked first, unpinned second. An entry already gone was ended (and unpinned)
            // by `unwind_views`.
            if found {
                self.unpin(&cx.pins, pinned);
            }
        });
        if left.is_none() && sh.backend.kind() == BackendKind::Hardware {
            // The thread's state (and with it its pins) is gone: the thread is exiting. Its
            // real PKRU can still be reset, and should be before it runs any further code.
            let mut regs = ThreadRegs::default();
            let cur = sh.backend.read_pkru(&regs);
            sh.backend
                .write_pkru(&mut regs, cur.merge(sh.base_bits, sh.our_mask));
        }
    }

    // ---- the slow path ----------------------------------------------------------------------

    fn slow_enter(
        &self,
        pins: &ThreadPins,
        view: &[(&Domain<B>, Rights)],
        missing: u16,
        pinned: &mut u16,
        bits: &mut Pkru,
    ) -> Result<()> {
        let sh = &*self.shared;
        // Read the clock only if we have to wait (it can be a system call).
        let mut deadline = None;
        let mut inner = sh.inner.lock();
        self.sweep_uses(&mut inner);
        for i in SlotIter(missing) {
            let (d, r) = view[i];
            let s = loop {
                let bound = match d.inner.slot.get() {
                    // Bound meanwhile (by another thread); owners change only under the lock.
                    Some(s) => Some(Ok(s)),
                    None => self.bind(&mut inner, &d.inner, *pinned, |_| true),
                };
                if let Some(result) = bound {
                    let s = result?;
                    if !pins.pin_locked(s) {
                        return Err(Error::Unsupported(
                            "more than 255 nested views of one domain on a thread",
                        ));
                    }
                    break s;
                }
                // Every key is pinned. Unpinning is a plain store that wakes nobody, so poll:
                // let other threads run (and end their views) for a moment, then look again.
                let until = *deadline.get_or_insert_with(|| Instant::now() + sh.config.pin_wait);
                if Instant::now() >= until {
                    return Err(Error::KeysBusy {
                        keys: sh.keys.len(),
                        waited: sh.config.pin_wait,
                    });
                }
                MutexGuard::unlocked(&mut inner, || {
                    std::thread::sleep(Duration::from_micros(100))
                });
                self.sweep_uses(&mut inner);
            };
            *pinned |= 1 << s;
            *bits = bits.with(sh.keys[s], r.access_rights());
        }
        Ok(())
    }

    /// Feeds the policy the uses of each key since the last sweep (hits do not touch the
    /// policy; each thread counts its uses in its own cell).
    fn sweep_uses(&self, inner: &mut Inner) {
        let live = live_threads(inner);
        for s in 0..self.shared.slots.len() {
            let uses = live.iter().fold(0u32, |acc, t| acc.wrapping_add(t.uses(s)));
            if inner.bound[s].is_some() && uses != inner.seen_uses[s] {
                inner.seen_uses[s] = uses;
                inner.policy.touch(s);
            }
        }
    }

    /// Takes slot `s` from `uid` if no thread pins it (see `keycache::try_claim`).
    fn claim(&self, inner: &mut Inner, s: usize, uid: u64) -> bool {
        let sh = &*self.shared;
        let live = live_threads(inner);
        let fence = sh.fence;
        let mut fenced = true;
        let claimed =
            keycache::try_claim(
                &sh.slots,
                s,
                uid,
                live.iter().map(|t| &**t),
                || match fence {
                    // Every running thread executes a barrier before this returns: their pins
                    // stored before it are visible to the loads that follow.
                    FenceMode::Asymmetric => {
                        fenced = mpkvirt_sys::membarrier::private_expedited().is_ok()
                    }
                    FenceMode::Symmetric => std::sync::atomic::fence(Ordering::SeqCst),
                },
            );
        if claimed && !fenced {
            // membarrier failed after registering succeeded: without the barrier the pins
            // seen may be stale, so do not hand the key on.
            sh.slots[s].set_owner(uid);
            return false;
        }
        claimed
    }

    /// Binds `d` to a free key, or to one taken from an unpinned victim that `evictable`
    /// accepts and that is not in `exclude`. `None`: no key could be had.
    fn bind(
        &self,
        inner: &mut Inner,
        d: &Arc<DomainInner>,
        exclude: u16,
        evictable: impl Fn(u64) -> bool,
    ) -> Option<Result<usize>> {
        let sh = &*self.shared;
        let n = sh.keys.len();
        let slot = match inner.bound.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                let mut tried = exclude;
                loop {
                    let candidates: Vec<usize> = (0..n)
                        .filter(|&s| tried & (1 << s) == 0)
                        .filter(|&s| inner.bound[s].as_ref().is_some_and(|v| evictable(v.id.0)))
                        .collect();
                    if candidates.is_empty() {
                        return None;
                    }
                    let v = inner.policy.victim(&candidates);
                    tried |= 1 << v;
                    let victim = inner.bound[v].clone().expect("candidates are bound");
                    if !self.claim(inner, v, victim.id.0) {
                        continue; // pinned by some thread's view
                    }
                    // Park the victim's pages *before* the key can be handed on.
                    victim.slot.set(None);
                    if let Err(e) =
                        sh.backend
                            .tag(victim.base, victim.len, *victim.prot.lock(), None)
                    {
                        victim.slot.set(Some(v));
                        sh.slots[v].set_owner(victim.id.0);
                        return Some(Err(e));
                    }
                    sh.slots[v].set_owner(FREE);
                    inner.bound[v] = None;
                    inner.policy.unbind(v);
                    inner.stats.evictions += 1;
                    break v;
                }
            }
        };
        if let Err(e) = sh
            .backend
            .tag(d.base, d.len, *d.prot.lock(), Some(sh.keys[slot]))
        {
            return Some(Err(e));
        }
        d.slot.set(Some(slot));
        sh.slots[slot].set_owner(d.id.0);
        inner.bound[slot] = Some(Arc::clone(d));
        inner.policy.bind(slot, d.id.0);
        inner.stats.misses += 1;
        Some(Ok(slot))
    }

    /// Tells the eviction policy which domains will be used next, soonest first (for
    /// [`crate::PolicyKind::Hinted`]; the LRU policy ignores it). A scheduler passes its run
    /// queue.
    pub fn hint(&self, upcoming: &[&Domain<B>]) {
        let uids: Vec<u64> = upcoming.iter().map(|d| d.inner.id.0).collect();
        self.shared.inner.lock().policy.hint(&uids);
    }

    /// Binds keys for `upcoming` domains (soonest first) ahead of use, taking free keys or
    /// evicting only domains that are not in `upcoming`. Also hints the policy. Returns how
    /// many domains were bound.
    ///
    /// # Errors
    ///
    /// [`Error::Retag`] when tagging fails.
    pub fn prefetch(&self, upcoming: &[&Domain<B>]) -> Result<usize> {
        let sh = &*self.shared;
        let uids: Vec<u64> = upcoming.iter().map(|d| d.inner.id.0).collect();
        let mut inner = sh.inner.lock();
        self.sweep_uses(&mut inner);
        inner.policy.hint(&uids);
        let mut bound = 0;
        for d in upcoming {
            if !Arc::ptr_eq(&d.mgr.shared, &self.shared) || d.inner.slot.get().is_some() {
                continue;
            }
            match self.bind(&mut inner, &d.inner, 0, |uid| !uids.contains(&uid)) {
                Some(r) => {
                    r?;
                    bound += 1;
                    inner.stats.prefetched += 1;
                }
                None => break,
            }
        }
        Ok(bound)
    }

    // ---- accesses and faults ------------------------------------------------------------------

    fn checked_access(&self, addr: usize, write: Option<u8>) -> Result<u8> {
        let sh = &*self.shared;
        if !sh.backend.owns(addr, 1) {
            return Err(Error::NotAllocated {
                domain: self.domain_at(addr).unwrap_or(DomainId(0)),
                addr,
            });
        }
        match self.with_cx(|cx| sh.backend.access(&cx.regs, addr, write)) {
            Some(r) => r.map_err(|raw| Error::Fault(self.report(raw, FaultKind::Violation))),
            None => Err(Error::Unsupported("accesses while the thread is exiting")),
        }
    }

    /// Reads the byte at `addr` (domain memory of this manager) as the calling thread, and
    /// returns the fault report instead of crashing when its view does not allow it. On the
    /// simulated backend the answer comes from the model.
    ///
    /// # Errors
    ///
    /// [`Error::Fault`] with the report; [`Error::NotAllocated`] for addresses outside this
    /// manager's domains.
    pub fn read_byte(&self, addr: usize) -> Result<u8> {
        self.checked_access(addr, None)
    }

    /// Writes `value` at `addr` as the calling thread; see [`Manager::read_byte`].
    ///
    /// # Errors
    ///
    /// As [`Manager::read_byte`].
    pub fn write_byte(&self, addr: usize, value: u8) -> Result<()> {
        self.checked_access(addr, Some(value)).map(drop)
    }

    /// Runs `f` on a separate stack; if it faults on domain memory, returns the report
    /// instead of killing the process, and ends every view `f` entered (with any manager)
    /// whose guard it had not dropped.
    ///
    /// A faulting `f` is abandoned: its frames never resume, their destructors never run
    /// (locks they hold stay held) and their stack is never reused. `f` must be `'static`
    /// so that nothing it borrows outlives the abandonment. A panic in `f` propagates.
    ///
    /// # Errors
    ///
    /// [`Error::Fault`] with the report; [`Error::Unsupported`] on the simulated backend.
    pub fn guarded<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + 'static,
    {
        if self.shared.backend.kind() == BackendKind::Simulated {
            return Err(Error::Unsupported(
                "guarded calls (the simulated backend has no memory)",
            ));
        }
        let marks = view_marks();
        match fault::run_guarded(f) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(payload)) => std::panic::resume_unwind(payload),
            Err((raw, kind)) => {
                end_views_since(&marks);
                Err(Error::Fault(self.report(raw, kind)))
            }
        }
    }
}

/// Where each manager's view ids stood on the calling thread: `(tls index, manager uid,
/// last id given out)`. Views entered later have larger ids.
fn view_marks() -> Vec<(usize, u64, u64)> {
    CONTEXTS
        .try_with(|c| {
            c.borrow()
                .iter()
                .enumerate()
                .map(|(i, cx)| (i, cx.mgr_uid, cx.next_id))
                .collect()
        })
        .unwrap_or_default()
}

/// Ends every view the calling thread entered, with any manager, since `marks` were taken
/// (their guards were abandoned with a faulting guarded call).
fn end_views_since(marks: &[(usize, u64, u64)]) {
    let _ = CONTEXTS.try_with(|c| {
        for (i, cx) in c.borrow_mut().iter_mut().enumerate() {
            let from = match marks.iter().find(|m| m.0 == i && m.1 == cx.mgr_uid) {
                Some(&(_, _, last)) => last + 1,
                None => 0, // the manager's state on this thread was created since
            };
            if let Some(owner) = cx.owner.as_ref().and_then(Weak::upgrade) {
                owner.end_views_from(cx, from);
            }
        }
    });
}

/// Iterates the set bits of a 16-bit mask.
struct SlotIter(u16);

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

/// The identity of one live view on the calling thread. Not `Send`: PKRU belongs to the
/// thread that entered the view.
#[derive(Debug)]
struct Token {
    id: u64,
    pinned: u16,
    _not_send: PhantomData<*const ()>,
}

/// A live view of the calling thread, borrowing its domains; dropping it ends the view. Not
/// `Send`. Forgetting it (`mem::forget`) keeps its keys pinned for good.
#[must_use = "the view ends when the guard is dropped"]
pub struct ViewGuard<'a, B: Backend = Machine> {
    mgr: &'a Manager<B>,
    token: Token,
    _borrow: PhantomData<&'a Domain<B>>,
}

/// A live view of the calling thread that keeps its domains alive; see
/// [`Manager::enter_owned`]. Not `Send`.
#[must_use = "the view ends when the guard is dropped"]
pub struct OwnedViewGuard<B: Backend = Machine> {
    mgr: Manager<B>,
    token: Token,
    _domains: Vec<Arc<Domain<B>>>,
}

impl<B: Backend> fmt::Debug for ViewGuard<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewGuard")
            .field("id", &self.token.id)
            .field("pinned", &format_args!("{:#06x}", self.token.pinned))
            .finish()
    }
}

impl<B: Backend> fmt::Debug for OwnedViewGuard<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedViewGuard")
            .field("id", &self.token.id)
            .field("pinned", &format_args!("{:#06x}", self.token.pinned))
            .finish()
    }
}

impl<B: Backend> Drop for ViewGuard<'_, B> {
    #[inline]
    fn drop(&mut self) {
        self.mgr.leave(self.token.id, self.token.pinned);
    }
}

impl<B: Backend> Drop for OwnedViewGuard<B> {
    fn drop(&mut self) {
        self.mgr.leave(self.token.id, self.token.pinned);
    }
}
