//! The concurrent differential driver: threads that really overlap, and a linearizability
//! check of what they saw.
//!
//! [`super::run`] sends one operation at a time to its worker threads and waits for each
//! answer, so its threads never overlap and it cannot see races. Here every logical thread
//! runs its own operation list back to back, all threads released together by a barrier, and
//! every operation is recorded as an [`Event`]: thread, operation, the domain ids it acted on,
//! its result, and two stamps from one global counter taken at invocation and at response.
//! [`super::linearize::check`] then accepts the history iff some total order of the events
//! that respects real time (`a` before `b` when `a.end < b.start`) makes the reference model
//! (unlimited keys) produce every recorded result.
//!
//! # Operations
//!
//! Domains live in a shared slot table (`Mutex<Vec<Option<Arc<Domain>>>>`); domain operands
//! pick among the occupied slots, modulo their number. [`ConcurrentOp::Destroy`] takes a
//! domain out of the table and drops that handle: the real destroy runs when the *last*
//! handle drops, which may be in any operation of any thread (views hold handles through
//! [`Manager::enter_owned`], operations hold one while they run), and the event that dropped
//! it lists the id in [`Event::destroyed`]. [`ConcurrentOp::Forget`] enters a *borrowed*
//! view and `mem::forget`s its guard, so its pins last until the OS thread exits;
//! [`ConcurrentOp::Exit`] ends the thread's views and its OS thread, and the logical thread
//! goes on in a fresh one.
//!
//! *Heap* domains have [`HEAP_PAGES`] pages for the allocator below their access pages; the
//! allocator operations ([`ConcurrentOp::AllocWrite`], [`ConcurrentOp::CheckAll`],
//! [`ConcurrentOp::Free`]) use them, each inside a view of its own that lasts for the
//! operation, and write and read back a distinct marker at the first and last byte of each
//! allocation. [`ConcurrentOp::Access`] only touches the access pages, and heap domains are
//! never protected or reset (their allocations must stay valid), so marker bytes are only
//! ever written by the allocation that owns them: a read-back that finds anything else is a
//! divergence.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use mpkvirt_sys::mman::{self, Prot};
use parking_lot::Mutex;

use super::Semantics;
use super::linearize::{self, History};
use crate::backend::Backend;
use crate::domain::{Domain, DomainOptions};
use crate::error::Error;
use crate::manager::{Manager, OwnedViewGuard, Rights};
use crate::{Access, FaultKind};

pub use super::THREADS;

/// Capacity of the shared slot table.
pub const TABLE: usize = 24;
/// Pages below the access pages of a heap domain, for its allocator. Large enough that the
/// allocations of a whole program never reach the access pages: at most
/// `THREADS * MAX_OPS` allocations of at most three pages each, plus the pages the size
/// classes carve.
pub const HEAP_PAGES: usize = 1024;
/// Operations per logical thread that [`decode_concurrent`] keeps.
pub const MAX_OPS: usize = 64;
/// Live allocations a logical thread keeps at most ([`ConcurrentOp::AllocWrite`] is skipped
/// beyond).
pub const MAX_LIVE_ALLOCS: usize = 4;
/// Node budget of the linearizability check in [`run_concurrent`]: typical histories of
/// this generator need one node per event; exhausting it takes under two seconds.
pub const CHECK_BUDGET: usize = 500_000;

/// Allocation sizes [`decode_concurrent`] chooses from: small blocks of the size classes,
/// the largest class, and page runs (exact pages and not).
pub const ALLOC_SIZES: [usize; 10] = [1, 16, 100, 2048, 2049, 3000, 4096, 4097, 8192, 12288];

/// One operation of a logical thread. Domain operands (`slot`) pick among the occupied
/// slots of the table (modulo their number; heap or plain ones only where noted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConcurrentOp {
    /// Create a domain of `pages` access pages (heap domains have [`HEAP_PAGES`] more
    /// below) and put it in a free slot (dropped again when the table is full).
    Create {
        /// Access pages.
        pages: usize,
        /// Whether the domain is for the allocator operations.
        heap: bool,
    },
    /// Take a domain out of the table and drop that handle.
    Destroy {
        /// Domain operand.
        slot: usize,
    },
    /// Enter an owned view ([`Manager::enter_owned`]); its guard goes on the thread's stack.
    Enter {
        /// Domain operands and rights (duplicates dropped).
        view: Vec<(usize, Rights)>,
    },
    /// Drop one of the thread's view guards (any, not only the latest).
    Leave {
        /// Which guard (modulo their number).
        which: usize,
    },
    /// Enter a borrowed view of one domain and `mem::forget` its guard: it stays live (and
    /// pins its key) until the OS thread exits, even after the domain is destroyed.
    Forget {
        /// Domain operand.
        slot: usize,
        /// Rights.
        rights: Rights,
    },
    /// Read or write one byte of a domain's access pages with
    /// [`Manager::read_byte`]/[`Manager::write_byte`].
    Access {
        /// Domain operand.
        slot: usize,
        /// Byte offset (modulo the access pages).
        offset: usize,
        /// `Some(v)` writes `v`, `None` reads.
        write: Option<u8>,
    },
    /// Change a plain domain's page protection.
    Protect {
        /// Plain-domain operand.
        slot: usize,
        /// New protection.
        prot: Prot,
    },
    /// Discard a plain domain's contents.
    Reset {
        /// Plain-domain operand.
        slot: usize,
    },
    /// Allocate `size` bytes in a heap domain and, inside a view `{domain: ReadWrite}`, write
    /// the allocation's marker at its first and last byte. When that view is refused
    /// (`KeysBusy`) the allocation is freed again.
    AllocWrite {
        /// Heap-domain operand.
        slot: usize,
        /// Bytes.
        size: usize,
    },
    /// Read back the markers of every live allocation of the thread, each inside a view
    /// `{domain: ReadOnly}`.
    CheckAll,
    /// Read back one live allocation's markers, then free it.
    Free {
        /// Which allocation (modulo their number).
        which: usize,
    },
    /// Drop every view guard of the thread, oldest first (also the first half of
    /// [`ConcurrentOp::Exit`]).
    LeaveAll,
    /// Drop every guard ([`ConcurrentOp::LeaveAll`]), then end the OS thread — which ends
    /// its forgotten views — and go on in a new one. Recorded as a `LeaveAll` event and an
    /// `Exit` event whose end stamp is taken after the join.
    Exit,
}

/// A domain the program starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitialDomain {
    /// Access pages.
    pub pages: usize,
    /// Heap domain (see [`ConcurrentOp::AllocWrite`]).
    pub heap: bool,
}

/// A concurrent program: initial domains and one operation list per logical thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConcurrentProgram {
    /// Domains in the table before the threads start (slots 0, 1, ...).
    pub initial: Vec<InitialDomain>,
    /// One list per logical thread ([`THREADS`] of them).
    pub threads: Vec<Vec<ConcurrentOp>>,
}

impl ConcurrentProgram {
    /// Operations in all threads.
    pub fn len(&self) -> usize {
        self.threads.iter().map(Vec::len).sum()
    }

    /// Whether no thread has an operation.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decodes a concurrent program from arbitrary bytes (the same generator for proptest,
/// libFuzzer and fixed seeds): the first byte chooses the initial domains, then every 4 bytes
/// are one operation, for thread `byte0 % THREADS`; at most [`MAX_OPS`] per thread.
pub fn decode_concurrent(bytes: &[u8]) -> ConcurrentProgram {
    let (head, rest) = match bytes.split_first() {
        Some((&h, r)) => (usize::from(h), r),
        None => (0, &[][..]),
    };
    let plain = 1 + head % 4;
    let heap = 1 + (head >> 2) % 2;
    let mut initial: Vec<InitialDomain> = (0..plain)
        .map(|i| InitialDomain {
            pages: 1 + ((head >> 3) + i) % 4,
            heap: false,
        })
        .collect();
    initial.extend((0..heap).map(|_| InitialDomain {
        pages: 1,
        heap: true,
    }));
    let mut threads = vec![Vec::new(); THREADS];
    for c in rest.chunks_exact(4) {
        let t = usize::from(c[0]) % THREADS;
        if threads[t].len() >= MAX_OPS {
            continue;
        }
        let (a, b, x) = (usize::from(c[1]), usize::from(c[2]), usize::from(c[3]));
        let rights = |bit: usize| {
            if b & (1 << bit) != 0 {
                Rights::ReadOnly
            } else {
                Rights::ReadWrite
            }
        };
        let op = match (usize::from(c[0]) / THREADS) % 32 {
            0 | 1 => ConcurrentOp::Create {
                pages: 1 + a % 4,
                heap: b % 4 == 0,
            },
            2 | 3 => ConcurrentOp::Destroy { slot: a },
            4..=8 => {
                let n = 1 + (b >> 4) % 3;
                let step = 1 + (b >> 6);
                ConcurrentOp::Enter {
                    view: (0..n).map(|k| (x + k * step, rights(k))).collect(),
                }
            }
            9..=11 => ConcurrentOp::Leave { which: a },
            12 => ConcurrentOp::Forget {
                slot: a,
                rights: rights(0),
            },
            13..=16 | 31 => ConcurrentOp::Access {
                slot: b,
                offset: x * 61 + (a >> 2) * 4096,
                write: None,
            },
            17..=19 => ConcurrentOp::Access {
                slot: b,
                offset: x * 61 + (a >> 2) * 4096,
                write: Some(c[3] ^ c[1]),
            },
            20 => ConcurrentOp::Protect {
                slot: b,
                prot: [Prot::READ_WRITE, Prot::READ, Prot::NONE, Prot::READ_WRITE][a % 4],
            },
            21 => ConcurrentOp::Reset { slot: b },
            22..=24 => ConcurrentOp::AllocWrite {
                slot: a,
                size: ALLOC_SIZES[b % ALLOC_SIZES.len()],
            },
            25 | 26 => ConcurrentOp::CheckAll,
            27 | 28 => ConcurrentOp::Free { which: a },
            29 => ConcurrentOp::Exit,
            _ => ConcurrentOp::LeaveAll,
        };
        threads[t].push(op);
    }
    ConcurrentProgram { initial, threads }
}

/// How an `enter` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnterResult {
    /// The view is live.
    Ok,
    /// [`Error::KeysBusy`].
    KeysBusy,
    /// [`Error::ViewTooLarge`].
    TooLarge,
    /// [`Error::ViewsExceedKeys`]: the thread's own views leave too few keys.
    OwnViews,
    /// Any other error.
    Failed(String),
}

impl EnterResult {
    fn of<T>(r: &Result<T, Error>) -> EnterResult {
        match r {
            Ok(_) => EnterResult::Ok,
            Err(Error::KeysBusy { .. }) => EnterResult::KeysBusy,
            Err(Error::ViewTooLarge { .. }) => EnterResult::TooLarge,
            Err(Error::ViewsExceedKeys { .. }) => EnterResult::OwnViews,
            Err(e) => EnterResult::Failed(e.to_string()),
        }
    }
}

/// How a one-byte access ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessResult {
    /// A read returned this value.
    Read(u8),
    /// A write went through.
    Wrote,
    /// The access faulted; what the report said.
    Fault {
        /// [`crate::FaultReport::domain`], as a number.
        domain: Option<u64>,
        /// [`crate::FaultReport::kind`].
        kind: FaultKind,
        /// [`crate::FaultReport::access`].
        access: Option<Access>,
    },
    /// Any other error.
    Failed(String),
}

impl AccessResult {
    fn of(r: Result<Option<u8>, Error>) -> AccessResult {
        match r {
            Ok(Some(v)) => AccessResult::Read(v),
            Ok(None) => AccessResult::Wrote,
            Err(Error::Fault(r)) => AccessResult::Fault {
                domain: r.domain.map(|d| d.get()),
                kind: r.kind,
                access: r.access,
            },
            Err(e) => AccessResult::Failed(e.to_string()),
        }
    }
}

/// An allocation made by [`ConcurrentOp::AllocWrite`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocRecord {
    /// Domain id.
    pub id: u64,
    /// Offset of the allocation in the domain.
    pub offset: usize,
    /// Bytes requested.
    pub size: usize,
    /// The marker written at its first and last byte.
    pub marker: u8,
}

/// A marker read-back: the view entered for it and the first and last byte read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkerRead {
    /// The allocation.
    pub alloc: AllocRecord,
    /// The view `{domain: ReadOnly}`.
    pub view: EnterResult,
    /// First and last byte, when the view was entered.
    pub reads: Option<[AccessResult; 2]>,
}

/// What an operation did (domain operands resolved to ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// [`ConcurrentOp::Create`].
    Created {
        /// The new domain.
        id: u64,
        /// Heap domain.
        heap: bool,
        /// Its slot (`None`: the table was full and the domain was dropped again).
        slot: Option<usize>,
    },
    /// [`ConcurrentOp::Create`] failed.
    CreateFailed(String),
    /// [`ConcurrentOp::Destroy`] took `id` out of the table.
    Destroyed {
        /// The domain.
        id: u64,
    },
    /// [`ConcurrentOp::Enter`].
    Entered {
        /// The view.
        view: Vec<(u64, Rights)>,
        /// How it went.
        result: EnterResult,
    },
    /// [`ConcurrentOp::Leave`].
    Left {
        /// Which of the thread's guards (in entry order).
        index: usize,
        /// Its view.
        view: Vec<(u64, Rights)>,
    },
    /// [`ConcurrentOp::Forget`].
    Forgot {
        /// The domain.
        id: u64,
        /// Rights.
        rights: Rights,
        /// How the enter went (only a live view was forgotten).
        result: EnterResult,
    },
    /// [`ConcurrentOp::Access`].
    Accessed {
        /// The domain.
        id: u64,
        /// Byte offset in the domain.
        offset: usize,
        /// Value written, if a write.
        write: Option<u8>,
        /// How it went.
        result: AccessResult,
    },
    /// [`ConcurrentOp::Protect`].
    Protected {
        /// The domain.
        id: u64,
        /// New protection.
        prot: Prot,
        /// How it went.
        result: Result<(), String>,
    },
    /// [`ConcurrentOp::Reset`].
    Reset {
        /// The domain.
        id: u64,
        /// How it went.
        result: Result<(), String>,
    },
    /// [`ConcurrentOp::AllocWrite`].
    Allocated {
        /// The domain.
        id: u64,
        /// Bytes requested.
        size: usize,
        /// The allocation, or why it failed.
        alloc: Result<AllocRecord, String>,
        /// The view `{domain: ReadWrite}`.
        view: EnterResult,
        /// The marker writes (first, last byte) when the view was entered.
        writes: Option<[AccessResult; 2]>,
        /// When the view was refused, freeing the allocation again.
        undone: Option<Result<usize, String>>,
    },
    /// [`ConcurrentOp::CheckAll`].
    Checked {
        /// One read-back per live allocation of the thread.
        reads: Vec<MarkerRead>,
    },
    /// [`ConcurrentOp::Free`].
    Freed {
        /// The read-back before freeing.
        read: MarkerRead,
        /// `Domain::free`'s answer.
        free: Result<usize, String>,
    },
    /// [`ConcurrentOp::LeaveAll`].
    LeftAll {
        /// Guards dropped.
        views: usize,
    },
    /// The OS thread exited ([`ConcurrentOp::Exit`]).
    Exited,
}

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Logical thread.
    pub thread: usize,
    /// Position in the thread's history.
    pub seq: usize,
    /// The operation.
    pub op: ConcurrentOp,
    /// Stamp at invocation.
    pub start: u64,
    /// Stamp at response.
    pub end: u64,
    /// What it did.
    pub result: OpResult,
    /// Domains whose last handle this operation dropped (destroyed inside it).
    pub destroyed: Vec<u64>,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "t{}#{:<3} [{:>5}..{:>5}] {:?} -> {:?}",
            self.thread, self.seq, self.start, self.end, self.op, self.result
        )?;
        if !self.destroyed.is_empty() {
            write!(f, " (destroyed {:?})", self.destroyed)?;
        }
        Ok(())
    }
}

/// What a concurrent run did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Outcome {
    /// Events recorded (operations not skipped, plus the `LeaveAll`/`Exit` halves and the
    /// final frees and exits of each thread).
    pub events: usize,
    /// Operations skipped (no domain of the kind, no guard, no allocation...).
    pub skipped: usize,
    /// Pairs of events of different threads that overlapped in real time.
    pub overlapping_pairs: usize,
    /// Accesses checked (including marker reads and writes).
    pub accesses: usize,
    /// Of those, faults.
    pub faults: usize,
    /// Views entered (owned, forgotten and the allocator operations' views).
    pub enters: usize,
    /// Enters refused with `KeysBusy`.
    pub busy: usize,
    /// Views forgotten.
    pub forgotten: usize,
    /// Allocations kept.
    pub allocs: usize,
    /// Domains destroyed.
    pub destroyed: usize,
    /// OS threads that exited and were replaced.
    pub exits: usize,
    /// Bindings that evicted another domain.
    pub evictions: u64,
    /// Nodes the linearizability check explored.
    pub states: usize,
    /// The check ran out of its budget: the history was neither accepted nor refused.
    pub exhausted: bool,
}

/// A history no order of which the model accepts.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// What the model refused, at the deepest point the search reached.
    pub what: String,
    /// The events around that point (pending ones marked `*`).
    pub snippet: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{}", self.what, self.snippet)
    }
}

impl std::error::Error for Divergence {}

struct TableEntry<B: Backend> {
    dom: Arc<Domain<B>>,
    heap: bool,
}

#[derive(Clone, Copy)]
enum Pick {
    Any,
    Heap,
    Plain,
}

struct Driver<'m, B: Backend> {
    mgr: &'m Manager<B>,
    table: Mutex<Vec<Option<TableEntry<B>>>>,
    clock: AtomicU64,
    page: usize,
}

impl<B: Backend> Driver<'_, B> {
    fn stamp(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// The domain at occupied slot number `operand` (modulo) of the kind asked for.
    fn pick(&self, operand: usize, pick: Pick) -> Option<(Arc<Domain<B>>, bool)> {
        let table = self.table.lock();
        let slots: Vec<&TableEntry<B>> = table
            .iter()
            .flatten()
            .filter(|e| match pick {
                Pick::Any => true,
                Pick::Heap => e.heap,
                Pick::Plain => !e.heap,
            })
            .collect();
        if slots.is_empty() {
            return None;
        }
        let e = slots[operand % slots.len()];
        Some((Arc::clone(&e.dom), e.heap))
    }

    fn take(&self, operand: usize) -> Option<Arc<Domain<B>>> {
        let mut table = self.table.lock();
        let occupied: Vec<usize> = (0..table.len()).filter(|&i| table[i].is_some()).collect();
        if occupied.is_empty() {
            return None;
        }
        table[occupied[operand % occupied.len()]]
            .take()
            .map(|e| e.dom)
    }

    /// The first byte and length of a domain's access pages.
    fn access_area(&self, d: &Domain<B>, heap: bool) -> (usize, usize) {
        let base = if heap { HEAP_PAGES * self.page } else { 0 };
        (base, d.len() - base)
    }

    fn access(&self, addr: usize, write: Option<u8>) -> AccessResult {
        AccessResult::of(match write {
            Some(v) => self.mgr.write_byte(addr, v).map(|()| None),
            None => self.mgr.read_byte(addr).map(Some),
        })
    }
}

struct LiveAlloc<B: Backend> {
    dom: Arc<Domain<B>>,
    rec: AllocRecord,
    addr: usize,
}

/// A logical thread's state that outlives its OS threads.
struct Logical<B: Backend> {
    thread: usize,
    allocs: Vec<LiveAlloc<B>>,
    events: Vec<Event>,
    markers: usize,
    skipped: usize,
}

struct GuardEntry<B: Backend> {
    guard: OwnedViewGuard<B>,
    doms: Vec<Arc<Domain<B>>>,
    view: Vec<(u64, Rights)>,
}

/// One OS thread of a logical thread.
struct Worker<'d, 'm, B: Backend> {
    drv: &'d Driver<'m, B>,
    lg: Logical<B>,
    guards: Vec<GuardEntry<B>>,
}

impl<B: Backend> Worker<'_, '_, B> {
    fn exec(&mut self, op: &ConcurrentOp) {
        let start = self.drv.stamp();
        let mut held = Vec::new();
        let result = self.perform(op, &mut held);
        // Drop the handles this operation held; the last one destroys the domain here.
        let destroyed: Vec<u64> = held
            .into_iter()
            .filter_map(|d| {
                let id = d.id().get();
                Arc::into_inner(d).map(|d| {
                    drop(d);
                    id
                })
            })
            .collect();
        let end = self.drv.stamp();
        match result {
            Some(result) => self.lg.events.push(Event {
                thread: self.lg.thread,
                seq: self.lg.events.len(),
                op: op.clone(),
                start,
                end,
                result,
                destroyed,
            }),
            None => {
                assert!(destroyed.is_empty(), "a skipped operation held no domain");
                self.lg.skipped += 1;
            }
        }
    }

    fn marker(&mut self) -> u8 {
        self.lg.markers += 1;
        // Nonzero, and distinct between threads and between a thread's recent allocations.
        1 + ((self.lg.thread + THREADS * self.lg.markers) % 255) as u8
    }

    fn read_marker(&self, a: &LiveAlloc<B>) -> MarkerRead {
        let entered = self
            .drv
            .mgr
            .enter_owned(&[(Arc::clone(&a.dom), Rights::ReadOnly)]);
        let view = EnterResult::of(&entered);
        let reads = entered.ok().map(|guard| {
            let r = [
                self.drv.access(a.addr, None),
                self.drv.access(a.addr + a.rec.size - 1, None),
            ];
            drop(guard);
            r
        });
        MarkerRead {
            alloc: a.rec,
            view,
            reads,
        }
    }

    fn perform(&mut self, op: &ConcurrentOp, held: &mut Vec<Arc<Domain<B>>>) -> Option<OpResult> {
        let drv = self.drv;
        let mgr = drv.mgr;
        Some(match op {
            ConcurrentOp::Create { pages, heap } => {
                let pages = pages + if *heap { HEAP_PAGES } else { 0 };
                let d = match mgr.create_domain(DomainOptions::reserve(pages * drv.page)) {
                    Ok(d) => Arc::new(d),
                    Err(e) => return Some(OpResult::CreateFailed(e.to_string())),
                };
                let id = d.id().get();
                let slot = {
                    let mut table = drv.table.lock();
                    let free = table.iter().position(Option::is_none);
                    if let Some(i) = free {
                        table[i] = Some(TableEntry {
                            dom: Arc::clone(&d),
                            heap: *heap,
                        });
                    }
                    free
                };
                held.push(d);
                OpResult::Created {
                    id,
                    heap: *heap,
                    slot,
                }
            }
            ConcurrentOp::Destroy { slot } => {
                let d = drv.take(*slot)?;
                let id = d.id().get();
                held.push(d);
                OpResult::Destroyed { id }
            }
            ConcurrentOp::Enter { view } => {
                let mut doms: Vec<(Arc<Domain<B>>, Rights)> = Vec::new();
                for &(operand, r) in view {
                    if let Some((d, _)) = drv.pick(operand, Pick::Any)
                        && !doms.iter().any(|(e, _)| e.id() == d.id())
                    {
                        doms.push((d, r));
                    }
                }
                if doms.is_empty() {
                    return None;
                }
                let ids: Vec<(u64, Rights)> =
                    doms.iter().map(|(d, r)| (d.id().get(), *r)).collect();
                let entered = mgr.enter_owned(&doms);
                let result = EnterResult::of(&entered);
                if let Ok(guard) = entered {
                    self.guards.push(GuardEntry {
                        guard,
                        doms: doms.iter().map(|(d, _)| Arc::clone(d)).collect(),
                        view: ids.clone(),
                    });
                }
                held.extend(doms.into_iter().map(|(d, _)| d));
                OpResult::Entered { view: ids, result }
            }
            ConcurrentOp::Leave { which } => {
                if self.guards.is_empty() {
                    return None;
                }
                let index = which % self.guards.len();
                let entry = self.guards.remove(index);
                drop(entry.guard);
                held.extend(entry.doms);
                OpResult::Left {
                    index,
                    view: entry.view,
                }
            }
            ConcurrentOp::LeaveAll | ConcurrentOp::Exit => {
                let views = self.guards.len();
                // Oldest first: the thread's rights change only when its newest view goes.
                for entry in self.guards.drain(..) {
                    drop(entry.guard);
                    held.extend(entry.doms);
                }
                OpResult::LeftAll { views }
            }
            ConcurrentOp::Forget { slot, rights } => {
                let (d, _) = drv.pick(*slot, Pick::Any)?;
                let result = {
                    let entered = mgr.enter(&[(&*d, *rights)]);
                    let result = EnterResult::of(&entered);
                    if let Ok(guard) = entered {
                        // Its pins last until this OS thread exits.
                        std::mem::forget(guard);
                    }
                    result
                };
                let id = d.id().get();
                held.push(d);
                OpResult::Forgot {
                    id,
                    rights: *rights,
                    result,
                }
            }
            ConcurrentOp::Access {
                slot,
                offset,
                write,
            } => {
                let (d, heap) = drv.pick(*slot, Pick::Any)?;
                let (base, len) = drv.access_area(&d, heap);
                let offset = base + offset % len;
                let result = drv.access(d.base().as_ptr() as usize + offset, *write);
                let id = d.id().get();
                held.push(d);
                OpResult::Accessed {
                    id,
                    offset,
                    write: *write,
                    result,
                }
            }
            ConcurrentOp::Protect { slot, prot } => {
                let (d, _) = drv.pick(*slot, Pick::Plain)?;
                let result = d.protect(*prot).map_err(|e| e.to_string());
                let id = d.id().get();
                held.push(d);
                OpResult::Protected {
                    id,
                    prot: *prot,
                    result,
                }
            }
            ConcurrentOp::Reset { slot } => {
                let (d, _) = drv.pick(*slot, Pick::Plain)?;
                let result = d.reset().map_err(|e| e.to_string());
                let id = d.id().get();
                held.push(d);
                OpResult::Reset { id, result }
            }
            ConcurrentOp::AllocWrite { slot, size } => {
                if self.lg.allocs.len() >= MAX_LIVE_ALLOCS {
                    return None;
                }
                let (d, _) = drv.pick(*slot, Pick::Heap)?;
                let id = d.id().get();
                let size = (*size).max(1);
                let marker = self.marker();
                let base = d.base().as_ptr() as usize;
                let alloc = d.alloc(size, 16).map_err(|e| e.to_string()).and_then(|p| {
                    let offset = p.as_ptr() as usize - base;
                    if offset + size > HEAP_PAGES * drv.page {
                        let _ = d.free(p);
                        Err(format!(
                            "allocation at {offset:#x} reaches the access pages"
                        ))
                    } else {
                        Ok(AllocRecord {
                            id,
                            offset,
                            size,
                            marker,
                        })
                    }
                });
                let (mut view, mut writes, mut undone) = (EnterResult::Ok, None, None);
                if let Ok(rec) = alloc {
                    let addr = base + rec.offset;
                    let entered = mgr.enter_owned(&[(Arc::clone(&d), Rights::ReadWrite)]);
                    view = EnterResult::of(&entered);
                    match entered {
                        Ok(guard) => {
                            writes = Some([
                                drv.access(addr, Some(marker)),
                                drv.access(addr + size - 1, Some(marker)),
                            ]);
                            drop(guard);
                            self.lg.allocs.push(LiveAlloc {
                                dom: Arc::clone(&d),
                                rec,
                                addr,
                            });
                        }
                        Err(_) => {
                            let p = std::ptr::NonNull::new(addr as *mut u8).expect("nonzero");
                            undone = Some(d.free(p).map_err(|e| e.to_string()));
                        }
                    }
                }
                held.push(d);
                OpResult::Allocated {
                    id,
                    size,
                    alloc,
                    view,
                    writes,
                    undone,
                }
            }
            ConcurrentOp::CheckAll => {
                if self.lg.allocs.is_empty() {
                    return None;
                }
                let reads = self.lg.allocs.iter().map(|a| self.read_marker(a)).collect();
                OpResult::Checked { reads }
            }
            ConcurrentOp::Free { which } => {
                if self.lg.allocs.is_empty() {
                    return None;
                }
                let i = which % self.lg.allocs.len();
                let a = self.lg.allocs.remove(i);
                let read = self.read_marker(&a);
                let p = std::ptr::NonNull::new(a.addr as *mut u8).expect("nonzero");
                let free = a.dom.free(p).map_err(|e| e.to_string());
                held.push(a.dom);
                OpResult::Freed { read, free }
            }
        })
    }
}

/// Runs `prog` on `mgr` (built with `pin_wait` zero, so that `enter` fails at once when
/// every key is pinned) and returns what every thread saw, without checking it.
///
/// Each logical thread runs on a supervisor thread that starts OS threads for it, one after
/// the other ([`ConcurrentOp::Exit`]); the first ones meet at a barrier. After its last
/// operation a thread frees its remaining allocations and exits, all recorded.
pub fn record_concurrent<B: Backend>(mgr: &Manager<B>, prog: &ConcurrentProgram) -> History {
    assert!(
        mgr.config().pin_wait.is_zero(),
        "the model needs enter to fail at once when keys are busy"
    );
    let page = mman::page_size();
    let drv = Driver {
        mgr,
        table: Mutex::new((0..TABLE).map(|_| None).collect()),
        clock: AtomicU64::new(0),
        page,
    };
    let mut initial = Vec::new();
    {
        let mut table = drv.table.lock();
        for (i, d) in prog.initial.iter().take(TABLE).enumerate() {
            let pages = d.pages + if d.heap { HEAP_PAGES } else { 0 };
            let dom = mgr
                .create_domain(DomainOptions::reserve(pages * page))
                .expect("create an initial domain");
            initial.push((dom.id().get(), d.heap));
            table[i] = Some(TableEntry {
                dom: Arc::new(dom),
                heap: d.heap,
            });
        }
    }
    let barrier = Barrier::new(THREADS);
    let mut skipped = 0;
    let threads = std::thread::scope(|scope| {
        let supervisors: Vec<_> = (0..THREADS)
            .map(|t| {
                let (drv, barrier) = (&drv, &barrier);
                let ops: &[ConcurrentOp] = prog.threads.get(t).map_or(&[], Vec::as_slice);
                scope.spawn(move || supervise(drv, barrier, t, ops))
            })
            .collect();
        supervisors
            .into_iter()
            .map(|s| s.join().expect("a logical thread panicked"))
            .collect::<Vec<_>>()
    });
    let threads = threads
        .into_iter()
        .map(|lg| {
            skipped += lg.skipped;
            lg.events
        })
        .collect();
    // The table's handles go last: what the threads saw is recorded already.
    drop(drv);
    History {
        initial,
        threads,
        skipped,
    }
}

/// Runs logical thread `t`: OS threads one after the other until its operations are done.
fn supervise<B: Backend>(
    drv: &Driver<'_, B>,
    barrier: &Barrier,
    t: usize,
    ops: &[ConcurrentOp],
) -> Logical<B> {
    let mut lg = Logical {
        thread: t,
        allocs: Vec::new(),
        events: Vec::new(),
        markers: 0,
        skipped: 0,
    };
    let mut pc = 0;
    let mut first = true;
    loop {
        let wait = first.then_some(barrier);
        first = false;
        let (back, next, done, exit_start) = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(format!("concurrent-t{t}"))
                .spawn_scoped(s, move || {
                    if let Some(b) = wait {
                        b.wait();
                    }
                    let mut w = Worker {
                        drv,
                        lg,
                        guards: Vec::new(),
                    };
                    let mut pc = pc;
                    let done = loop {
                        let Some(op) = ops.get(pc) else {
                            while !w.lg.allocs.is_empty() {
                                w.exec(&ConcurrentOp::Free { which: 0 });
                            }
                            break true;
                        };
                        pc += 1;
                        if *op == ConcurrentOp::Exit {
                            break false;
                        }
                        w.exec(op);
                    };
                    w.exec(&ConcurrentOp::LeaveAll);
                    let exit_start = drv.stamp();
                    (w.lg, pc, done, exit_start)
                })
                .expect("spawn a worker thread")
                // Joined explicitly: the scope waits for the closure, `join` also for the
                // thread's exit, whose thread-local destructors end its forgotten views.
                .join()
                .expect("a worker thread panicked")
        });
        lg = back;
        pc = next;
        let end = drv.stamp();
        lg.events.push(Event {
            thread: t,
            seq: lg.events.len(),
            op: ConcurrentOp::Exit,
            start: exit_start,
            end,
            result: OpResult::Exited,
            destroyed: Vec::new(),
        });
        if done {
            return lg;
        }
    }
}

/// Runs `prog` on `mgr` ([`record_concurrent`]) and checks the history for linearizability
/// against the reference model with `semantics` ([`linearize::check`], with
/// [`CHECK_BUDGET`] nodes).
///
/// # Errors
///
/// The [`Divergence`] when no order of the history satisfies the model.
pub fn run_concurrent<B: Backend>(
    mgr: &Manager<B>,
    prog: &ConcurrentProgram,
    semantics: Semantics,
) -> Result<Outcome, Divergence> {
    let history = record_concurrent(mgr, prog);
    let stats = linearize::check(&history, mgr.keys().len(), semantics, CHECK_BUDGET)?;
    let mut out = history.outcome();
    out.states = stats.states;
    out.exhausted = stats.exhausted;
    out.evictions = mgr.stats().evictions;
    Ok(out)
}

/// Deterministic program bytes for a seed (fixed-seed runs): a head byte and `ops`
/// operations.
pub fn concurrent_program_bytes(seed: u64, ops: usize) -> Vec<u8> {
    super::program_bytes(seed, ops + 1)[..1 + 4 * ops].to_vec()
}
