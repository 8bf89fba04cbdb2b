//! The reference model of virtual domains and a differential driver (feature `testing`).
//!
//! The model has *unlimited* keys: a domain is accessible to a thread iff the thread's
//! current view (its most recently entered live view) grants it with rights that allow the
//! access, and the domain's page protection allows it too (invariant 1 in `ARCHITECTURE.md`). For the
//! emulated backend the documented weaker rule applies: iff *some* thread's current view
//! grants it ([`Semantics::Union`]).
//!
//! [`decode`] turns arbitrary bytes into a program of [`Op`]s (so proptest, libFuzzer and
//! fixed seeds all drive the same generator), and [`run`] executes the program against a
//! [`Manager`] on real threads — one OS thread per logical thread, because PKRU is per
//! thread — comparing every outcome with the model.
//!
//! [`concurrent`] runs programs whose threads really overlap and checks the recorded
//! history for linearizability against the same model ([`linearize`]).

pub mod concurrent;
pub mod linearize;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::mpsc;

use mpkvirt_sys::mman::{self, Prot};

use crate::backend::Backend;
use crate::domain::{Domain, DomainOptions};
use crate::error::Error;
use crate::manager::{Manager, OwnedViewGuard, Rights};
use crate::{Access, FaultKind};

/// Logical threads of a program.
pub const THREADS: usize = 3;

/// One step of a domain program. Domain operands are indices into the live domains in
/// creation order (taken modulo their number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create a domain reserving `pages` pages.
    Create {
        /// Pages reserved.
        pages: usize,
    },
    /// `thread` enters a view.
    Enter {
        /// Logical thread.
        thread: usize,
        /// Domains and rights (duplicates are dropped).
        view: Vec<(usize, Rights)>,
    },
    /// `thread` ends one of its live views (any, not only the latest).
    Leave {
        /// Logical thread.
        thread: usize,
        /// Which live view (modulo their number).
        which: usize,
    },
    /// `thread` reads or writes one byte of a domain.
    Access {
        /// Logical thread.
        thread: usize,
        /// Domain operand.
        domain: usize,
        /// Byte offset (modulo the reservation).
        offset: usize,
        /// `Some(v)` writes `v`, `None` reads.
        write: Option<u8>,
    },
    /// Change a domain's page protection process-wide.
    Protect {
        /// Domain operand.
        domain: usize,
        /// New protection.
        prot: Prot,
    },
    /// Destroy a domain (skipped while a view uses it).
    Destroy {
        /// Domain operand.
        domain: usize,
    },
    /// Discard a domain's contents (a remap: keys must be re-applied).
    Reset {
        /// Domain operand.
        domain: usize,
    },
}

/// Decodes a program: 4 bytes per operation.
pub fn decode(bytes: &[u8]) -> Vec<Op> {
    bytes
        .chunks_exact(4)
        .map(|c| {
            let (a, b, x) = (usize::from(c[1]), usize::from(c[2]), usize::from(c[3]));
            let rights = |bit: usize| {
                if b & (1 << bit) != 0 {
                    Rights::ReadOnly
                } else {
                    Rights::ReadWrite
                }
            };
            match c[0] % 10 {
                0 => Op::Create { pages: 1 + a % 4 },
                1 | 2 => {
                    let n = 1 + (b >> 4) % 3;
                    let step = 1 + (b >> 6);
                    Op::Enter {
                        thread: a % THREADS,
                        view: (0..n).map(|k| (x + k * step, rights(k))).collect(),
                    }
                }
                3 => Op::Leave {
                    thread: a % THREADS,
                    which: b,
                },
                4..=6 => Op::Access {
                    thread: a % THREADS,
                    domain: b,
                    offset: x * 61 + (a >> 2) * 4096,
                    write: (c[0] % 10 == 6).then_some(c[3] ^ c[1]),
                },
                7 => Op::Protect {
                    domain: b,
                    prot: [Prot::READ_WRITE, Prot::READ, Prot::NONE, Prot::READ_WRITE][a % 4],
                },
                8 => Op::Destroy { domain: b },
                _ => Op::Reset { domain: b },
            }
        })
        .collect()
}

/// Which accessibility rule the backend promises.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Semantics {
    /// Per thread (hardware and simulated backends).
    PerThread,
    /// The union over all threads' current views (emulated backend).
    Union,
}

/// What a program run did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Outcome {
    /// Operations executed (skipped ones not counted).
    pub ops: usize,
    /// Accesses checked against the model.
    pub accesses: usize,
    /// Of those, faults (all predicted by the model).
    pub faults: usize,
    /// Views entered.
    pub enters: usize,
    /// Enters refused because every key was pinned (predicted by the model).
    pub busy: usize,
    /// Bindings that evicted another domain.
    pub evictions: u64,
}

/// A disagreement between the backend and the model.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// Index of the operation in the program.
    pub at: usize,
    /// The operation.
    pub op: Op,
    /// What went wrong.
    pub what: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op #{} {:?}: {}", self.at, self.op, self.what)
    }
}

struct ModelDomain {
    id: u64,
    prot: Prot,
    bytes: HashMap<usize, u8>,
}

/// The reference model: unlimited keys.
struct Model {
    domains: Vec<ModelDomain>,
    /// Per thread: live views in entry order, each a list of (domain id, rights).
    views: Vec<Vec<Vec<(u64, Rights)>>>,
    keys: usize,
    semantics: Semantics,
}

impl Model {
    fn grant(view: Option<&Vec<(u64, Rights)>>, id: u64) -> Option<Rights> {
        view?.iter().find(|(d, _)| *d == id).map(|(_, r)| *r)
    }

    fn allowed(&self, thread: usize, d: usize, write: bool) -> bool {
        let dom = &self.domains[d];
        let prot_ok = if write {
            dom.prot.contains(Prot::WRITE)
        } else {
            dom.prot.contains(Prot::READ)
        };
        let rights_ok = |r: Option<Rights>| match r {
            Some(Rights::ReadWrite) => true,
            Some(Rights::ReadOnly) => !write,
            None => false,
        };
        let granted = match self.semantics {
            Semantics::PerThread => rights_ok(Self::grant(self.views[thread].last(), dom.id)),
            Semantics::Union => self
                .views
                .iter()
                .any(|v| rights_ok(Self::grant(v.last(), dom.id))),
        };
        prot_ok && granted
    }

    /// Domains pinned by `thread`'s live views.
    fn pinned_by(&self, thread: usize) -> HashSet<u64> {
        self.views[thread]
            .iter()
            .flatten()
            .map(|(d, _)| *d)
            .collect()
    }

    fn pinned(&self) -> HashSet<u64> {
        self.views
            .iter()
            .flatten()
            .flatten()
            .map(|(d, _)| *d)
            .collect()
    }
}

type Job<B> = Box<dyn FnOnce(&mut Vec<OwnedViewGuard<B>>) + Send>;
type Call<B> = Box<dyn FnOnce(&mut Vec<OwnedViewGuard<B>>) -> Result<u8, Error> + Send>;

/// Runs `program` on `mgr` (which must have been built with `pin_wait` zero) and checks
/// every outcome against the model.
///
/// # Errors
///
/// The first [`Divergence`].
pub fn run<B: Backend>(
    mgr: &Manager<B>,
    program: &[Op],
    semantics: Semantics,
) -> Result<Outcome, Divergence> {
    assert!(
        mgr.config().pin_wait.is_zero(),
        "the model needs enter to fail at once when keys are busy"
    );
    let page = mman::page_size();
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        let mut handles = Vec::new();
        for t in 0..THREADS {
            let (tx, rx) = mpsc::channel::<Job<B>>();
            let handle = std::thread::Builder::new()
                .name(format!("model-thread-{t}"))
                .spawn_scoped(scope, move || {
                    let mut guards = Vec::new();
                    for job in rx {
                        job(&mut guards);
                    }
                })
                .expect("spawn a model thread");
            workers.push(tx);
            handles.push(handle);
        }
        let on = |t: usize, job: Job<B>| workers[t].send(job).expect("model thread alive");
        let call = |t: usize, f: Call<B>| {
            let (rtx, rrx) = mpsc::channel();
            on(t, Box::new(move |g| rtx.send(f(g)).expect("driver alive")));
            rrx.recv().expect("model thread answered")
        };

        let mut model = Model {
            domains: Vec::new(),
            views: vec![Vec::new(); THREADS],
            keys: mgr.keys().len(),
            semantics,
        };
        let mut live: Vec<Arc<Domain<B>>> = Vec::new();
        let mut out = Outcome::default();
        for (at, op) in program.iter().enumerate() {
            let fail = |what: String| Divergence {
                at,
                op: op.clone(),
                what,
            };
            if live.is_empty() && !matches!(op, Op::Create { .. }) {
                continue;
            }
            let n = live.len().max(1);
            match op {
                Op::Create { pages } => {
                    if live.len() >= 64 {
                        continue;
                    }
                    let d = mgr
                        .create_domain(DomainOptions::reserve(pages * page))
                        .map_err(|e| fail(format!("create failed: {e}")))?;
                    model.domains.push(ModelDomain {
                        id: d.id().get(),
                        prot: Prot::READ_WRITE,
                        bytes: HashMap::new(),
                    });
                    live.push(Arc::new(d));
                }
                Op::Enter { thread, view } => {
                    let mut seen = HashSet::new();
                    let view: Vec<(usize, Rights)> = view
                        .iter()
                        .map(|&(d, r)| (d % n, r))
                        .filter(|(d, _)| seen.insert(*d))
                        .collect();
                    let ids: Vec<(u64, Rights)> = view
                        .iter()
                        .map(|&(d, r)| (model.domains[d].id, r))
                        .collect();
                    let mut pinned = model.pinned();
                    pinned.extend(ids.iter().map(|(d, _)| *d));
                    let mut own = model.pinned_by(*thread);
                    own.extend(ids.iter().map(|(d, _)| *d));
                    let expect = if view.len() > model.keys {
                        "ViewTooLarge"
                    } else if own.len() > model.keys {
                        // The thread's own views keep the keys: waiting cannot help.
                        "ViewsExceedKeys"
                    } else if pinned.len() > model.keys {
                        "KeysBusy"
                    } else {
                        "success"
                    };
                    let owned: Vec<(Arc<Domain<B>>, Rights)> = view
                        .iter()
                        .map(|&(d, r)| (Arc::clone(&live[d]), r))
                        .collect();
                    let m = mgr.clone();
                    let result = call(
                        *thread,
                        Box::new(move |g| {
                            m.enter_owned(&owned).map(|guard| {
                                g.push(guard);
                                0
                            })
                        }),
                    );
                    match (result, expect) {
                        (Ok(_), "success") => {
                            model.views[*thread].push(ids);
                            out.enters += 1;
                        }
                        (Err(Error::KeysBusy { .. }), "KeysBusy") => out.busy += 1,
                        (Err(Error::ViewsExceedKeys { .. }), "ViewsExceedKeys") => out.busy += 1,
                        (Err(Error::ViewTooLarge { .. }), "ViewTooLarge") => {}
                        (r, expect) => {
                            return Err(fail(format!("enter gave {r:?}, model expected {expect}")));
                        }
                    }
                }
                Op::Leave { thread, which } => {
                    let views = &mut model.views[*thread];
                    if views.is_empty() {
                        continue;
                    }
                    let i = which % views.len();
                    views.remove(i);
                    call(
                        *thread,
                        Box::new(move |g| {
                            drop(g.remove(i));
                            Ok(0)
                        }),
                    )
                    .map_err(|e| fail(format!("leave: {e}")))?;
                }
                Op::Access {
                    thread,
                    domain,
                    offset,
                    write,
                } => {
                    let d = domain % n;
                    let dom = &live[d];
                    let off = offset % dom.len();
                    let addr = dom.base().as_ptr() as usize + off;
                    let expect_ok = model.allowed(*thread, d, write.is_some());
                    let m = mgr.clone();
                    let w = *write;
                    let result = call(
                        *thread,
                        Box::new(move |_| match w {
                            Some(v) => m.write_byte(addr, v).map(|()| 0),
                            None => m.read_byte(addr),
                        }),
                    );
                    out.accesses += 1;
                    let md = &mut model.domains[d];
                    match (result, expect_ok) {
                        (Ok(v), true) => match write {
                            Some(w) => {
                                md.bytes.insert(off, *w);
                            }
                            None => {
                                let expected = md.bytes.get(&off).copied().unwrap_or(0);
                                if v != expected {
                                    return Err(fail(format!("read {v}, model holds {expected}")));
                                }
                            }
                        },
                        (Err(Error::Fault(r)), false) => {
                            out.faults += 1;
                            let kind = if write.is_some() {
                                Access::Write
                            } else {
                                Access::Read
                            };
                            if r.domain != Some(dom.id())
                                || r.kind != FaultKind::Violation
                                || r.access.is_some_and(|a| a != kind)
                            {
                                return Err(fail(format!(
                                    "fault report {r:?} does not name {} / {kind:?}",
                                    dom.id()
                                )));
                            }
                        }
                        (r, ok) => {
                            return Err(fail(format!(
                                "access gave {r:?}, model expected {} (thread views: {:?})",
                                if ok { "success" } else { "a fault" },
                                model.views
                            )));
                        }
                    }
                }
                Op::Protect { domain, prot } => {
                    let d = domain % n;
                    live[d]
                        .protect(*prot)
                        .map_err(|e| fail(format!("protect: {e}")))?;
                    model.domains[d].prot = *prot;
                }
                Op::Destroy { domain } => {
                    let d = domain % n;
                    if model.pinned().contains(&model.domains[d].id) {
                        continue;
                    }
                    let dom = live.remove(d);
                    if Arc::strong_count(&dom) != 1 {
                        return Err(fail(
                            "a domain outside every view is still referenced".into(),
                        ));
                    }
                    drop(dom);
                    model.domains.remove(d);
                }
                Op::Reset { domain } => {
                    let d = domain % n;
                    live[d].reset().map_err(|e| fail(format!("reset: {e}")))?;
                    model.domains[d].bytes.clear();
                }
            }
            out.ops += 1;
        }
        // End every view on its own thread, then let the workers go.
        for t in 0..THREADS {
            call(
                t,
                Box::new(|g| {
                    g.clear();
                    Ok(0)
                }),
            )
            .map_err(|e| Divergence {
                at: program.len(),
                op: Op::Leave {
                    thread: t,
                    which: 0,
                },
                what: e.to_string(),
            })?;
        }
        drop(workers);
        // Join explicitly: the scope alone waits for the closures, not for the threads to
        // exit (their thread-local destructors would still be running).
        for h in handles {
            h.join().expect("model thread");
        }
        out.evictions = mgr.stats().evictions;
        Ok(out)
    })
}

/// Deterministic program bytes for a seed (for fixed-seed smoke runs).
pub fn program_bytes(seed: u64, ops: usize) -> Vec<u8> {
    let mut rng = crate::policy::trace::SplitMix::new(seed);
    (0..ops * 4).map(|_| rng.next_u64() as u8).collect()
}

/// One revocation round of the process-wide rights protocol (`manager/global.rs`) for the
/// keys whose PKRU fields are in `fields`, changing no right: the threads that may hold
/// rights to those keys are signalled and waited for, the others are not. For benchmarks of
/// the mechanism without PKU (where no thread ever holds hardware rights, so this measures
/// what a revocation costs when only threads mpkvirt does not know yet must be reached).
///
/// # Errors
///
/// As [`crate::thread::sync_process_wide`].
pub fn revocation_round(fields: u32) -> crate::Result<()> {
    crate::ops::call::<u32, ()>(crate::ops::OP_SYNC_HOLDERS, fields)
}

#[doc(hidden)]
pub use crate::ops::raw_call;

/// Where library state lives, for tests that attack it from application code (issue 7).
///
/// Addresses and the library key only: nothing here writes library memory. Not part of the
/// API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct LibraryMemory {
    /// The root static (`mpkvirt_gate_root`): start and length in bytes.
    pub root: (usize, usize),
    /// The metadata region's reservation: start and end (`(0, 0)` before the library's first
    /// use).
    pub region: (usize, usize),
    /// The library key, when metadata is protected.
    pub library_key: Option<mpkvirt_sys::Pkey>,
}

/// The [`LibraryMemory`] of this process. The key is read from the root, which with
/// protection on only a thread that has been through the library's gate can read: call it
/// after the calling thread used the library.
#[doc(hidden)]
pub fn library_memory() -> LibraryMemory {
    let (root, region, library_key) = crate::meta::layout_for_tests();
    LibraryMemory {
        root,
        region,
        library_key,
    }
}

/// The address of the 32-bit word in `d`'s record (library memory) that names the key slot
/// the domain holds (`u32::MAX`: none). Reads only.
#[doc(hidden)]
pub fn domain_slot_word<B: Backend>(d: &Domain<B>) -> Option<usize> {
    crate::manager::ops::domain_slot_word::<B>(d.manager_ref(), d.dref())
}

/// The address of the 32-bit PKRU value the library saved for the calling thread's view
/// `depth` below its newest live view with `mgr` (0: the newest), which it installs again
/// when the views above it end. Reads only.
#[doc(hidden)]
pub fn view_bits_word<B: Backend>(mgr: &Manager<B>, depth: usize) -> Option<usize> {
    crate::manager::ops::view_bits_word(mgr.mref(), depth)
}

/// The thread id the calling thread's record is bound to (`None` without a record).
pub fn record_tid() -> Option<i32> {
    crate::gate::ThreadRecord::current().map(|r| r.tid())
}
