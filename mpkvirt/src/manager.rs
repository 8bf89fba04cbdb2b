//! The manager: domains, the key cache, and per-thread views.
//!
//! # Hit path and slow path
//!
//! Entering a view pins each domain's key slot lock-free ([`crate::keycache`]); when every
//! domain of the view holds a key this is the whole cost: per domain one atomic add and one
//! load, then at most one PKRU write (none when the value is unchanged). No system call, no
//! lock. Only a *miss* takes the manager's mutex: it binds a free key, or evicts a victim the
//! policy chooses among unpinned keys (parking the victim's pages — one system call — before
//! the key is re-bound, then tagging the new domain's pages — one more).
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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::{AccessRights, Pkey, Pkru};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::alloc::DomainHeap;
use crate::backend::{Backend, BackendKind, Machine, RawFault, Simulated, ThreadRegs};
use crate::config::{Config, Selection};
use crate::domain::{Domain, DomainId, DomainInner, DomainOptions};
use crate::error::{Error, Result};
use crate::fault::{self, FaultKind, FaultReport};
use crate::keycache::{FREE, Slot, SlotRef};
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
    /// Views entered without taking the manager's lock (every domain was resident).
    pub fast_enters: u64,
    /// Times the slow path (the manager's lock) was taken.
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

#[derive(Debug)]
struct ThreadCx {
    mgr_uid: u64,
    regs: ThreadRegs,
    stack: Vec<Entry>,
    next_id: u64,
    stats: ThreadStats,
}

impl ThreadCx {
    fn new(mgr_uid: u64) -> ThreadCx {
        ThreadCx {
            mgr_uid,
            regs: ThreadRegs::default(),
            stack: Vec::new(),
            next_id: 0,
            stats: ThreadStats::default(),
        }
    }
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
    /// Use counters of each slot when last swept into the policy.
    seen_uses: Vec<u32>,
    /// Parked address space not given to any domain: start -> len.
    free: BTreeMap<usize, usize>,
    stats: Stats,
}

pub(crate) struct Shared<B: Backend> {
    uid: u64,
    tls_index: usize,
    backend: B,
    keys: Box<[Pkey]>,
    slots: Box<[Slot]>,
    /// PKRU fields of the manager's keys.
    our_mask: u32,
    /// Every key of the manager access-disabled.
    base_bits: Pkru,
    inner: Mutex<Inner>,
    unpinned: Condvar,
    waiters: AtomicU32,
    config: Config,
    selection: Option<Selection>,
    /// Live domains by address, for fault reports: base -> (end, id).
    ranges: RwLock<BTreeMap<usize, (usize, DomainId)>>,
}

impl<B: Backend> Drop for Shared<B> {
    fn drop(&mut self) {
        TLS_INDICES.lock().1.push(self.tls_index);
    }
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
        let inner = Inner {
            policy: new_policy(config.policy, n),
            bound: vec![None; n],
            seen_uses: vec![0; n],
            free: BTreeMap::new(),
            stats: Stats::default(),
        };
        Manager {
            shared: Arc::new(Shared {
                uid: next_uid(),
                tls_index,
                backend,
                slots: (0..n).map(|_| Slot::new()).collect(),
                keys,
                our_mask,
                base_bits,
                inner: Mutex::new(inner),
                unpinned: Condvar::new(),
                waiters: AtomicU32::new(0),
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

    fn with_cx<R>(&self, f: impl FnOnce(&mut ThreadCx) -> R) -> Option<R> {
        let sh = &*self.shared;
        CONTEXTS
            .try_with(|c| {
                let mut v = c.borrow_mut();
                if v.len() <= sh.tls_index {
                    v.resize_with(sh.tls_index + 1, || ThreadCx::new(0));
                }
                let cx = &mut v[sh.tls_index];
                if cx.mgr_uid != sh.uid {
                    *cx = ThreadCx::new(sh.uid);
                }
                f(cx)
            })
            .ok()
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
        let fit = inner
            .free
            .iter()
            .find(|(_, l)| **l >= len)
            .map(|(s, l)| (*s, *l));
        let (start, avail) = match fit {
            Some(f) => f,
            None => {
                let chunk = len.max(self.shared.config.arena_chunk);
                (self.shared.backend.reserve(chunk)?, chunk)
            }
        };
        inner.free.remove(&start);
        if avail > len {
            inner.free.insert(start + len, avail - len);
        }
        Ok(start)
    }

    fn release_range(inner: &mut Inner, mut start: usize, mut len: usize) {
        if let Some(next) = inner.free.remove(&(start + len)) {
            len += next;
        }
        if let Some((&p, &pl)) = inner.free.range(..start).next_back()
            && p + pl == start
        {
            inner.free.remove(&p);
            start = p;
            len += pl;
        }
        inner.free.insert(start, len);
    }

    pub(crate) fn destroy(&self, d: &Arc<DomainInner>) {
        let sh = &*self.shared;
        sh.ranges.write().remove(&d.base);
        let mut inner = sh.inner.lock();
        let mut keep_range = false;
        if let Some(s) = d.slot.get() {
            if sh.slots[s].try_claim(d.id.0) {
                d.slot.set(None);
                sh.slots[s].set_owner(FREE);
                inner.bound[s] = None;
                inner.policy.unbind(s);
            } else {
                // A view of this domain was leaked (mem::forget): its pin can never be
                // released, so the key stays with the dead domain for good, and so does the
                // address range (a thread may still hold rights to the key).
                keep_range = true;
                fault::log_line(&format!(
                    "mpkvirt: domain {} destroyed while pinned by a leaked view; key {} retired\n",
                    d.id, sh.keys[s]
                ));
            }
        }
        inner.stats.domains -= 1;
        match sh
            .backend
            .discard(d.base, d.len, d.mapped_files.load(Ordering::Relaxed))
        {
            Ok(()) if !keep_range => Self::release_range(&mut inner, d.base, d.len),
            Ok(()) => {}
            Err(e) => fault::log_line(&format!(
                "mpkvirt: cannot discard domain {}: {e}; its range is retired\n",
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
        sh.backend.discard(
            d.inner.base,
            d.inner.len,
            d.inner.mapped_files.swap(false, Ordering::Relaxed),
        )?;
        // Mapping over the range reset its key to 0: apply the binding again.
        if let Some(s) = d.inner.slot.get() {
            sh.backend.tag(
                d.inner.base,
                d.inner.len,
                *d.inner.prot.lock(),
                Some(sh.keys[s]),
            )?;
        }
        Ok(())
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
        // The new mapping has key 0 and no access: apply the domain's binding to it.
        if let Some(s) = d.inner.slot.get() {
            sh.backend
                .tag(addr, len, *d.inner.prot.lock(), Some(sh.keys[s]))?;
        }
        Ok(())
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

    fn enter_token(&self, view: &[(&Domain<B>, Rights)]) -> Result<Token> {
        let sh = &*self.shared;
        self.validate(view)?;
        let mut pinned: u16 = 0;
        let mut bits = sh.base_bits;
        let mut missing: u16 = 0;
        for (i, (d, r)) in view.iter().enumerate() {
            match d.inner.slot.get() {
                Some(s) if sh.slots[s].try_pin(d.inner.id.0) => {
                    pinned |= 1 << s;
                    bits = bits.with(sh.keys[s], r.access_rights());
                }
                _ => missing |= 1 << i,
            }
        }
        if missing != 0
            && let Err(e) = self.slow_enter(view, missing, &mut pinned, &mut bits)
        {
            self.unpin(pinned);
            return Err(e);
        }
        let id = self.with_cx(|cx| {
            cx.next_id += 1;
            let id = cx.next_id;
            cx.stack.push(Entry { id, bits, pinned });
            cx.stats.enters += 1;
            if missing == 0 {
                cx.stats.fast_enters += 1;
            } else {
                cx.stats.slow_paths += 1;
            }
            self.apply(cx, bits);
            id
        });
        match id {
            Some(id) => Ok(Token {
                id,
                pinned,
                _not_send: PhantomData,
            }),
            None => {
                self.unpin(pinned);
                Err(Error::Unsupported(
                    "entering a view while the thread is exiting",
                ))
            }
        }
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

    fn validate(&self, view: &[(&Domain<B>, Rights)]) -> Result<()> {
        let n = self.shared.keys.len();
        if view.len() > n {
            return Err(Error::ViewTooLarge {
                domains: view.len(),
                keys: n,
            });
        }
        for (i, (d, _)) in view.iter().enumerate() {
            if !Arc::ptr_eq(&d.mgr.shared, &self.shared) {
                return Err(Error::ForeignDomain(d.id()));
            }
            if view[..i].iter().any(|(e, _)| e.id() == d.id()) {
                return Err(Error::DuplicateDomain(d.id()));
            }
        }
        Ok(())
    }

    /// Writes the thread's PKRU for the view bits `bits`, unless it already holds them.
    #[inline]
    fn apply(&self, cx: &mut ThreadCx, bits: Pkru) {
        let sh = &*self.shared;
        let cur = sh.backend.read_pkru(&cx.regs);
        let new = cur.merge(bits, sh.our_mask);
        if new == cur {
            cx.stats.pkru_writes_skipped += 1;
        } else {
            sh.backend.write_pkru(&mut cx.regs, new);
            cx.stats.pkru_writes += 1;
        }
    }

    fn unpin(&self, pinned: u16) {
        let sh = &*self.shared;
        let mut freed = false;
        for s in SlotIter(pinned) {
            freed |= sh.slots[s].unpin();
        }
        // SeqCst load after the SeqCst unpin: either a waiter registered before it saw our
        // pin, or we see it here and wake it. Taking the lock orders the wake-up after its
        // wait began (it holds the lock from its scan until it waits).
        if freed && sh.waiters.load(Ordering::SeqCst) > 0 {
            drop(sh.inner.lock());
            sh.unpinned.notify_all();
        }
    }

    fn leave(&self, id: u64, pinned: u16) {
        let sh = &*self.shared;
        let revoked = self
            .with_cx(|cx| {
                let pos = cx.stack.iter().rposition(|e| e.id == id);
                if let Some(pos) = pos {
                    cx.stack.remove(pos);
                }
                let top = cx.stack.last().map_or(sh.base_bits, |e| e.bits);
                self.apply(cx, top);
                pos.is_some()
            })
            .unwrap_or_else(|| {
                // The thread's state is gone (thread exit). Real PKRU can still be reset;
                // without it the rights cannot be revoked, so the pins are kept (leaked).
                if sh.backend.kind() == BackendKind::Hardware {
                    let mut regs = ThreadRegs::default();
                    let cur = sh.backend.read_pkru(&regs);
                    sh.backend
                        .write_pkru(&mut regs, cur.merge(sh.base_bits, sh.our_mask));
                    true
                } else {
                    false
                }
            });
        if revoked {
            self.unpin(pinned);
        }
    }

    /// Ends the views the calling thread entered after its view stack had `depth` entries
    /// (abandoned by a faulting guarded call).
    fn unwind_views(&self, depth: usize) {
        let sh = &*self.shared;
        let pinned = self.with_cx(|cx| {
            let mut pinned = Vec::new();
            while cx.stack.len() > depth {
                pinned.push(cx.stack.pop().expect("entry").pinned);
            }
            let top = cx.stack.last().map_or(sh.base_bits, |e| e.bits);
            self.apply(cx, top);
            pinned
        });
        for p in pinned.unwrap_or_default() {
            self.unpin(p);
        }
    }

    // ---- the slow path ----------------------------------------------------------------------

    fn slow_enter(
        &self,
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
                if let Some(s) = d.inner.slot.get() {
                    // Bound meanwhile (by another thread); owners change only under the lock.
                    sh.slots[s].pin_locked();
                    break s;
                }
                sh.waiters.fetch_add(1, Ordering::SeqCst);
                let bound = self.bind(&mut inner, &d.inner, *pinned, |_| true);
                if let Some(result) = bound {
                    sh.waiters.fetch_sub(1, Ordering::SeqCst);
                    let s = result?;
                    sh.slots[s].pin_locked();
                    break s;
                }
                let until = *deadline.get_or_insert_with(|| Instant::now() + sh.config.pin_wait);
                let timed_out = sh.unpinned.wait_until(&mut inner, until).timed_out();
                sh.waiters.fetch_sub(1, Ordering::SeqCst);
                if timed_out && d.inner.slot.get().is_none() {
                    return Err(Error::KeysBusy {
                        keys: sh.keys.len(),
                        waited: sh.config.pin_wait,
                    });
                }
            };
            *pinned |= 1 << s;
            *bits = bits.with(sh.keys[s], r.access_rights());
        }
        Ok(())
    }

    /// Feeds the policy the uses of each key since the last sweep (hits do not touch the
    /// policy; their pins count uses in the slot).
    fn sweep_uses(&self, inner: &mut Inner) {
        for (s, slot) in self.shared.slots.iter().enumerate() {
            let uses = slot.uses();
            if inner.bound[s].is_some() && uses != inner.seen_uses[s] {
                inner.seen_uses[s] = uses;
                inner.policy.touch(s);
            }
        }
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
                        .filter(|&s| tried & (1 << s) == 0 && sh.slots[s].pin_count() == 0)
                        .filter(|&s| inner.bound[s].as_ref().is_some_and(|v| evictable(v.id.0)))
                        .collect();
                    if candidates.is_empty() {
                        return None;
                    }
                    let v = inner.policy.victim(&candidates);
                    tried |= 1 << v;
                    let victim = inner.bound[v].clone().expect("candidates are bound");
                    if !sh.slots[v].try_claim(victim.id.0) {
                        continue; // pinned since the scan
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
        inner.seen_uses[slot] = sh.slots[slot].uses();
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
    /// instead of killing the process, and ends the views `f` entered.
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
        let depth = self.with_cx(|cx| cx.stack.len()).unwrap_or(0);
        match fault::run_guarded(f) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(payload)) => std::panic::resume_unwind(payload),
            Err((raw, kind)) => {
                self.unwind_views(depth);
                Err(Error::Fault(self.report(raw, kind)))
            }
        }
    }
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
    fn drop(&mut self) {
        self.mgr.leave(self.token.id, self.token.pinned);
    }
}

impl<B: Backend> Drop for OwnedViewGuard<B> {
    fn drop(&mut self) {
        self.mgr.leave(self.token.id, self.token.pinned);
    }
}
