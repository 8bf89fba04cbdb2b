//! The manager: domains, the key cache, and per-thread views.
//!
//! A [`Manager`] is a handle to state that lives inside the library (see `ARCHITECTURE.md`,
//! "Library state"): every method is an *op* (`crate::ops`) that runs library code behind
//! the call gate, on plain-data arguments, and returns plain results. The handle itself holds
//! only names — the manager's registry slot and uid — and copies of immutable facts (keys,
//! configuration) for the accessors.
//!
//! # Hit path and slow path
//!
//! Entering a view pins each domain's key slot in the calling thread's own pin cell
//! (`keycache.rs`); when every domain of the view holds a key this is the whole cost: per
//! domain a store to the thread's cell and a load of the slot's owner (with `membarrier`
//! available, not even a barrier instruction), then the thread's PKRU is recomputed. On PKU
//! hardware and the simulated backend that is no system call, no lock and no shared cache
//! line written (after the thread's first use of the manager); the emulated backend's PKRU
//! write is an `mprotect` whenever the union of the threads' rights changes.
//!
//! Only a *miss* takes the manager's lock: it binds a free key, or evicts a victim the
//! policy chooses among unpinned keys — one `membarrier` to see every registered thread's
//! pins, one system call to park the victim's pages *before* the key is re-bound, one more to
//! tag the new domain's pages. When every key is pinned, threads wait in FIFO order
//! (`views.rs`).
//!
//! # Views
//!
//! A thread's rights are those of the most recently entered view that is still alive (a view
//! *replaces* the rights of the views around it; it does not add to them). Views nest; each
//! keeps its keys pinned until it is dropped, in any order. Bits of keys the manager does not
//! own are left as they are.
//!
//! # Safety
//!
//! The only `unsafe` here is [`Manager::guarded`], whose contract forwards to the fault
//! module's guarded call.

#![allow(unsafe_code, reason = "Manager::guarded forwards an unsafe contract")]

pub(crate) mod binding;
pub(crate) mod global;
pub(crate) mod lifecycle;
pub(crate) mod ops;
pub(crate) mod shared;
pub(crate) mod views;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use mpkvirt_sys::{Pkey, Pkru};

use crate::backend::{Backend, BackendKind, Machine, Simulated};
use crate::config::{Config, Selection};
use crate::domain::{Domain, DomainId, DomainOptions};
use crate::error::{Error, Result};
use crate::fault::{self, FaultKind, FaultReport};
use crate::ops::call;

pub(crate) use ops::cx_ref;
pub(crate) use shared::ThreadCx;
use shared::{DomRef, MgrRef};

/// What a view grants a domain.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Rights {
    /// Reads and writes (as far as the domain's page protection allows).
    ReadWrite,
    /// Reads only.
    ReadOnly,
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
    /// Threads whose pins a miss looks at now: threads in views, and those recently in one
    /// (idle threads are dropped by the next misses, exited ones at once).
    pub watched_threads: u64,
    /// Domains the eviction policy keeps a history of (the hinted policy; forgotten when a
    /// domain is destroyed).
    pub policy_entries: u64,
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
    /// Changes of the thread's rights for the manager's keys (on PKU hardware: PKRU values
    /// the gate installs; the protected call gate itself writes PKRU twice per call).
    pub pkru_writes: u64,
    /// Rights changes skipped because the value was already in place.
    pub pkru_writes_skipped: u64,
}

/// The immutable facts of a manager, kept in the program's memory for the accessors (never
/// trusted by the library).
#[derive(Debug)]
struct Handle<B: Backend> {
    m: MgrRef,
    /// Where the manager's state lives (the direct path of cooperative mode).
    shared: usize,
    keys: Vec<Pkey>,
    kind: BackendKind,
    config: Config,
    selection: Option<Selection>,
    _b: PhantomData<fn() -> B>,
}

impl<B: Backend> Drop for Handle<B> {
    fn drop(&mut self) {
        // The last handle: tear the manager down (its domains are gone: each holds a handle).
        let _ = call::<MgrRef, ()>(ops::code::<B>(ops::M_RELEASE), self.m);
    }
}

/// Owns a backend, its keys and the domains created through it. Cheap to clone (a handle).
pub struct Manager<B: Backend = Machine> {
    h: Arc<Handle<B>>,
}

impl<B: Backend> Clone for Manager<B> {
    fn clone(&self) -> Self {
        Manager {
            h: Arc::clone(&self.h),
        }
    }
}

impl<B: Backend> fmt::Debug for Manager<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("backend", &self.h.kind)
            .field("keys", &self.h.keys)
            .finish()
    }
}

impl Manager<Machine> {
    /// A manager on the machine `config.mode` selects (hardware PKU or the emulation).
    ///
    /// # Errors
    ///
    /// [`Error::HardwareRequired`] for `Mode::Hardware` without PKU; key allocation and
    /// handler installation failures; [`Error::InvalidConfig`].
    pub fn new(config: Config) -> Result<Manager<Machine>> {
        let (machine, selection) = Machine::new(&config)?;
        Manager::build(machine, config, Some(selection))
    }
}

impl Manager<Simulated> {
    /// A manager on the simulated backend with `keys` keys (no memory behind it).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for `keys` or `config` out of range; metadata failures.
    pub fn simulated(keys: usize, config: Config) -> Result<Manager<Simulated>> {
        Manager::with_backend(Simulated::new(keys)?, config)
    }
}

impl<B: Backend> Manager<B> {
    /// A manager on an explicitly chosen backend.
    ///
    /// # Errors
    ///
    /// Key allocation and metadata failures; [`Error::InvalidConfig`].
    pub fn with_backend(backend: B, config: Config) -> Result<Manager<B>> {
        Manager::build(backend, config, None)
    }

    fn build(backend: B, config: Config, selection: Option<Selection>) -> Result<Manager<B>> {
        let info: ops::MgrInfo = call(
            ops::code::<B>(ops::M_CREATE),
            ops::CreateIn {
                spec: backend.to_pod(),
                config: ops::ConfigPod::of(&config),
            },
        )?;
        Ok(Manager {
            h: Arc::new(Handle {
                m: info.m,
                shared: info.ptr,
                keys: info.keys[..info.nkeys].to_vec(),
                kind: info.kind,
                config,
                selection,
                _b: PhantomData,
            }),
        })
    }

    pub(crate) fn mref(&self) -> MgrRef {
        self.h.m
    }

    /// Which backend this manager runs on.
    pub fn backend_kind(&self) -> BackendKind {
        self.h.kind
    }

    /// Why this backend was chosen (managers built with [`Manager::new`]).
    pub fn selection(&self) -> Option<&Selection> {
        self.h.selection.as_ref()
    }

    /// The hardware (or virtual) keys domains are bound to.
    pub fn keys(&self) -> &[Pkey] {
        &self.h.keys
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.h.config
    }

    /// How library metadata is protected in this process (see [`crate::MetadataMode`]).
    pub fn metadata_mode(&self) -> crate::MetadataMode {
        crate::meta::app_mode().unwrap_or(crate::MetadataMode::Cooperative)
    }

    /// Counters for all threads.
    pub fn stats(&self) -> Stats {
        call(ops::code::<B>(ops::M_STATS), self.h.m).unwrap_or_default()
    }

    /// Counters for the calling thread.
    pub fn thread_stats(&self) -> ThreadStats {
        call(ops::code::<B>(ops::M_THREAD_STATS), self.h.m).unwrap_or_default()
    }

    /// The calling thread's rights as the backend sees them: on hardware the real register,
    /// otherwise the thread's virtual PKRU for this manager.
    pub fn current_pkru(&self) -> Pkru {
        if self.h.kind == BackendKind::Hardware
            && let Some(pku) = mpkvirt_sys::Pku::new()
        {
            return pku.rdpkru();
        }
        call(ops::code::<B>(ops::M_PKRU), self.h.m).unwrap_or(Pkru::LINUX_INIT)
    }

    // ---- domains ------------------------------------------------------------------------

    /// Creates a domain. It holds no key until a view uses it, and costs no system call
    /// unless the manager needs more address space.
    ///
    /// # Errors
    ///
    /// [`Error::Reserve`] when address space runs out (or the size cannot be a reservation,
    /// such as `usize::MAX`).
    pub fn create_domain(&self, opts: DomainOptions) -> Result<Domain<B>> {
        let info: lifecycle::DomInfo = call(
            ops::code::<B>(ops::D_CREATE),
            ops::DomIn {
                m: self.h.m,
                d: DomRef::default(),
                a: u64::from(opts.reserve.is_some()),
                b: opts.reserve.unwrap_or(0) as u64,
                c: opts.prot.bits() as u64,
            },
        )?;
        Ok(Domain::from_parts(
            self.clone(),
            info.d,
            info.base,
            info.len,
        ))
    }

    pub(crate) fn dom_op<O>(&self, op: u64, d: DomRef, a: u64, b: u64, c: u64) -> Result<O> {
        call(
            ops::code::<B>(op),
            ops::DomIn {
                m: self.h.m,
                d,
                a,
                b,
                c,
            },
        )
    }

    /// The live domain whose reservation contains `addr`.
    pub fn domain_at(&self, addr: usize) -> Option<DomainId> {
        call(
            ops::code::<B>(ops::D_AT),
            ops::MgrIn {
                m: self.h.m,
                a: addr as u64,
                b: 0,
            },
        )
        .ok()
        .flatten()
    }

    // ---- views ------------------------------------------------------------------------------

    /// Enters a view: until the guard is dropped, the calling thread may access exactly the
    /// listed domains, with the listed rights (and no other domain of this manager).
    ///
    /// # Errors
    ///
    /// [`Error::ViewTooLarge`], [`Error::DuplicateDomain`], [`Error::ForeignDomain`] for a
    /// malformed view; [`Error::ViewsExceedKeys`] when the thread's own other views leave too
    /// few keys; [`Error::KeysBusy`] when other threads' views keep the keys pinned for
    /// [`Config::pin_wait`]; [`Error::Retag`] when binding fails; [`Error::Reentrant`] from a
    /// signal handler that interrupted the library.
    #[inline]
    pub fn enter<'a>(&'a self, view: &[(&'a Domain<B>, Rights)]) -> Result<ViewGuard<'a, B>> {
        let id = self.enter_id(view.iter().map(|(d, r)| (*d, *r)), view.len())?;
        Ok(ViewGuard {
            mgr: self,
            id,
            _borrow: PhantomData,
            _not_send: PhantomData,
        })
    }

    /// Like [`Manager::enter`], for domains shared through `Arc`: the guard keeps them alive
    /// (a domain whose last handle is dropped is destroyed only after the views using it
    /// end).
    ///
    /// # Errors
    ///
    /// As [`Manager::enter`].
    pub fn enter_owned(&self, view: &[(Arc<Domain<B>>, Rights)]) -> Result<OwnedViewGuard<B>> {
        let id = self.enter_id(view.iter().map(|(d, r)| (&**d, *r)), view.len())?;
        Ok(OwnedViewGuard {
            mgr: self.clone(),
            id,
            _domains: view.iter().map(|(d, _)| Arc::clone(d)).collect(),
            _not_send: PhantomData,
        })
    }

    fn enter_id<'a>(
        &self,
        view: impl Iterator<Item = (&'a Domain<B>, Rights)>,
        n: usize,
    ) -> Result<u64> {
        if n > 16 {
            return Err(Error::ViewTooLarge {
                domains: n,
                keys: self.h.keys.len(),
            });
        }
        let mut doms = [DomRef::default(); 16];
        let mut ro = 0;
        for (k, (d, r)) in view.enumerate() {
            if d.manager_ref() != self.h.m {
                return Err(Error::ForeignDomain(d.id()));
            }
            doms[k] = d.dref();
            if r == Rights::ReadOnly {
                ro |= 1 << k;
            }
        }
        let code = ops::code::<B>(ops::V_ENTER);
        let direct = crate::gate::direct(code, |rec| {
            let mut items = [views::ViewItem {
                d: DomRef::default(),
                read_only: false,
            }; 16];
            for (k, item) in items[..n].iter_mut().enumerate() {
                *item = views::ViewItem {
                    d: doms[k],
                    read_only: ro & (1 << k) != 0,
                };
            }
            // SAFETY: `self.h` names a manager of type `B` and keeps it alive for the call.
            unsafe { ops::enter_direct::<B>(rec, self.h.shared, &items[..n]) }
        });
        if let Some(r) = direct {
            return r;
        }
        call(
            ops::code::<B>(ops::V_ENTER),
            ops::EnterIn {
                m: self.h.m,
                n: n as u32,
                ro,
                doms: doms.as_ptr() as u64,
            },
        )
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

    fn leave(&self, id: u64) -> Result<()> {
        let code = ops::code::<B>(ops::V_LEAVE);
        let direct = crate::gate::direct(code, |rec| {
            // SAFETY: `self.h` names a manager of type `B` and keeps it alive for the call.
            unsafe { ops::leave_direct::<B>(rec, self.h.shared, id) }
        });
        if let Some(r) = direct {
            return r;
        }
        call(
            ops::code::<B>(ops::V_LEAVE),
            ops::MgrIn {
                m: self.h.m,
                a: id,
                b: 0,
            },
        )
    }

    /// Tells the eviction policy which domains will be used next, soonest first (for
    /// [`crate::PolicyKind::Hinted`]; the LRU policy ignores it). A scheduler passes its run
    /// queue.
    pub fn hint(&self, upcoming: &[&Domain<B>]) {
        let list: Vec<DomRef> = upcoming.iter().map(|d| d.dref()).collect();
        let _ = call::<_, ()>(
            ops::code::<B>(ops::V_HINT),
            ops::ListIn {
                m: self.h.m,
                ptr: list.as_ptr() as u64,
                len: list.len() as u64,
            },
        );
    }

    /// Binds keys for `upcoming` domains (soonest first) ahead of use, taking free keys or
    /// evicting only domains that are not in `upcoming`. Also hints the policy. Returns how
    /// many domains were bound.
    ///
    /// # Errors
    ///
    /// [`Error::Retag`] when tagging fails.
    pub fn prefetch(&self, upcoming: &[&Domain<B>]) -> Result<usize> {
        let list: Vec<DomRef> = upcoming
            .iter()
            .filter(|d| d.manager_ref() == self.h.m)
            .map(|d| d.dref())
            .collect();
        call(
            ops::code::<B>(ops::V_PREFETCH),
            ops::ListIn {
                m: self.h.m,
                ptr: list.as_ptr() as u64,
                len: list.len() as u64,
            },
        )
    }

    // ---- accesses and faults ------------------------------------------------------------------

    fn checked_access(&self, addr: usize, write: Option<u8>) -> Result<u8> {
        let found: ops::Access = call(
            ops::code::<B>(ops::ACCESS),
            ops::MgrIn {
                m: self.h.m,
                a: addr as u64,
                b: write.map_or(0, |v| 0x100 | u64::from(v)),
            },
        )?;
        match found {
            ops::Access::NotOwned(d) => Err(Error::NotAllocated {
                domain: d.unwrap_or(DomainId(0)),
                addr,
            }),
            ops::Access::Done(v) => Ok(v),
            ops::Access::Faulted(raw, domain) => Err(Error::Fault(FaultReport {
                kind: FaultKind::Violation,
                domain,
                addr: raw.addr,
                access: raw.access,
                hw_key: raw.pkey,
                code: raw.code,
            })),
            ops::Access::Probe => fault::probe(addr, write).map_err(|raw| {
                Error::Fault(FaultReport {
                    kind: FaultKind::Violation,
                    domain: self.domain_at(raw.addr),
                    addr: raw.addr,
                    access: raw.access,
                    hw_key: raw.pkey,
                    code: raw.code,
                })
            }),
        }
    }

    /// Reads the byte at `addr` (domain memory of this manager) as the calling thread, and
    /// returns the fault report instead of crashing when its view does not allow it. On the
    /// simulated backend the answer comes from the model.
    ///
    /// # Errors
    ///
    /// [`Error::Fault`] with the report; [`Error::NotAllocated`] for addresses outside this
    /// manager's live domains (a destroyed domain's address included).
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

    /// Runs `f` on a separate stack; if it faults on domain memory (or overflows that
    /// stack), returns the report instead of killing the process, and ends every view `f`
    /// entered (with any manager) whose guard it had not dropped.
    ///
    /// A faulting `f` is *abandoned*: the frames of the functions it was running never
    /// resume and their destructors never run (locks they hold stay held, values they own
    /// leak). `f` itself — the closure and what it captured — is dropped normally, and the
    /// stack is reused. A panic in `f` propagates. A fault while a panic unwinds through `f`
    /// aborts the process, as a panic in a destructor during unwinding does.
    ///
    /// # Errors
    ///
    /// [`Error::Fault`] with the report; [`Error::Unsupported`] on the simulated backend.
    ///
    /// # Safety
    ///
    /// No thread that `f` starts may outlive `f` while borrowing from it: a scoped thread
    /// (`std::thread::scope`) running when `f` faults would go on using the abandoned frames
    /// and the dropped closure. Threads that own what they use (`std::thread::spawn`) are
    /// fine.
    pub unsafe fn guarded<F, R>(&self, f: F) -> Result<R>
    where
        F: FnMut() -> R,
    {
        if self.h.kind == BackendKind::Simulated {
            return Err(Error::Unsupported(
                "guarded calls (the simulated backend has no memory)",
            ));
        }
        let mark: u64 = call(crate::ops::OP_VIEW_MARK, ())?;
        // SAFETY: forwarded from this function's contract.
        match unsafe { fault::run_guarded(f) } {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(payload)) => std::panic::resume_unwind(payload),
            Err(fault::Failed::NoStack(e)) => Err(e),
            Err(fault::Failed::Fault(raw, kind)) => {
                // The handler left the thread without rights; ending the abandoned views
                // (an op) installs its legitimate PKRU again.
                let _ = call::<u64, ()>(crate::ops::OP_END_VIEWS_SINCE, mark);
                Err(Error::Fault(FaultReport {
                    kind,
                    domain: self.domain_at(raw.addr),
                    addr: raw.addr,
                    access: raw.access,
                    hw_key: raw.pkey,
                    code: raw.code,
                }))
            }
        }
    }
}

/// A live view of the calling thread, borrowing its domains; dropping it ends the view. Not
/// `Send`. Forgetting it (`mem::forget`) keeps its keys pinned until the thread exits.
#[must_use = "the view ends when the guard is dropped"]
pub struct ViewGuard<'a, B: Backend = Machine> {
    mgr: &'a Manager<B>,
    id: u64,
    _borrow: PhantomData<&'a Domain<B>>,
    _not_send: PhantomData<*const ()>,
}

/// A live view of the calling thread that keeps its domains alive; see
/// [`Manager::enter_owned`]. Not `Send`.
#[must_use = "the view ends when the guard is dropped"]
pub struct OwnedViewGuard<B: Backend = Machine> {
    mgr: Manager<B>,
    id: u64,
    _domains: Vec<Arc<Domain<B>>>,
    _not_send: PhantomData<*const ()>,
}

impl<B: Backend> ViewGuard<'_, B> {
    /// Ends the view, reporting what [`Drop`] cannot: [`Error::InterruptedView`] when a
    /// signal handler tries to end a view of the code it interrupted (the view then stays).
    ///
    /// # Errors
    ///
    /// As above, and [`Error::Reentrant`].
    pub fn end(self) -> Result<()> {
        let r = self.mgr.leave(self.id);
        std::mem::forget(self);
        r
    }
}

impl<B: Backend> fmt::Debug for ViewGuard<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewGuard").field("id", &self.id).finish()
    }
}

impl<B: Backend> fmt::Debug for OwnedViewGuard<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedViewGuard")
            .field("id", &self.id)
            .finish()
    }
}

impl<B: Backend> Drop for ViewGuard<'_, B> {
    #[inline]
    fn drop(&mut self) {
        let _ = self.mgr.leave(self.id);
    }
}

impl<B: Backend> Drop for OwnedViewGuard<B> {
    fn drop(&mut self) {
        let _ = self.mgr.leave(self.id);
    }
}
