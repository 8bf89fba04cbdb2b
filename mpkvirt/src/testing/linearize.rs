//! The linearizability check of a concurrent history against the reference model.
//!
//! # The question
//!
//! Is there a total order of the recorded events that (a) keeps each thread's events in
//! program order, (b) respects real time — `a` comes before `b` whenever `a` ended before
//! `b` started (`a.end < b.start`, stamps of one global counter) — and (c) makes the
//! reference model, applying the events one at a time, produce every recorded result?
//!
//! # The model
//!
//! The sequential model of [`super`] with unlimited keys, extended to what the concurrent
//! driver does: per thread a stack of live views (owned and forgotten ones); a domain is
//! accessible to a thread iff the thread's most recent live view grants it with enough
//! rights and its page protection allows the access ([`Semantics::Union`]: iff some thread's
//! most recent view grants it). A read returns the latest write to that byte of that domain
//! id, 0 if none (domains start zeroed, a reset zeroes them). A fault must name the domain.
//! Allocations of a domain never overlap while live, and their markers read back.
//!
//! `ViewsExceedKeys` is predicted exactly, when the domains of the thread's own live views and
//! the new view are more than the keys (waiting cannot help). Otherwise `KeysBusy` is
//! *predicted* when the domains pinned by all live views of all threads —
//! forgotten views and destroyed domains included — together with the new view are more
//! than the keys. Because concurrent enters and leaves hold transient pins (a hit-path
//! attempt on a stale binding, the allocator operations' short views, guards dropped one by
//! one), `KeysBusy` is also *admitted* whenever an event of another thread that enters or
//! leaves views overlaps in real time. Three more admissions cover what the library does
//! not promise to be atomic:
//!
//! - a reset parks the range before it re-applies the key: an access that overlaps a reset
//!   of the same domain may fault;
//! - with [`Semantics::Union`] the emulated backend changes the protection of the keys of a
//!   view one `mprotect` at a time, so an access may see a view change by another thread
//!   half done: while another thread's event that changes whether it grants a domain
//!   overlaps, an access to that domain may fault or succeed (a successful read must still
//!   return the model's value);
//! - an `enter` refused while another thread's pins are in flux (above).
//!
//! # The search
//!
//! Wing & Gong's depth-first search over the *frontier* (the next event of each thread): an
//! event may go next iff no other thread's next event ended before it started; it is applied
//! to the model, and the search backtracks when the model refuses. Lowe's memoisation prunes
//! it: a node is the pair (per-thread progress, model state), and a node seen before is not
//! explored again — the model state is compared by a 64-bit SipHash fingerprint (a
//! collision, odds about `nodes² / 2⁶⁴`, could only make the check accept a history).
//! Candidates are tried earliest invocation first, which follows the real order when the
//! threads do not overlap, so typical histories are accepted in one pass.
//!
//! # Cost
//!
//! Nodes are distinct (progress, state) pairs, so the search expands at most
//! `Π_t (n_t + 1)` progress vectors times the distinct model states each can be reached
//! with; each expansion costs one model step and one fingerprint, linear in the model state.
//! Real-time order keeps the reachable progress vectors to those whose pending events all
//! overlap, so with threads running back to back the frontier stays narrow and the node
//! count stays close to the number of events (measured on 300 random programs of 3 threads
//! × 30 operations, about 85 events each, test profile: median 86 nodes and 0.2 ms per
//! check, at most 155 nodes and 1.1 ms; 3 × 64 operations: median 166 nodes, 0.4 ms). The
//! worst case — every event overlapping every other, and their orders leaving different
//! model states — is exponential (linearizability checking is NP-complete); the search
//! therefore stops after a node budget and reports [`CheckStats::exhausted`] instead of an
//! answer. Memory is one memo entry per node, plus the model states on the current path
//! (one per event). A search that runs out of a budget of 2,000,000 nodes took 6.7 s and
//! 200 MB here (test profile, 3 × 42 mutually overlapping writes);
//! [`super::concurrent::run_concurrent`] allows [`super::concurrent::CHECK_BUDGET`] nodes,
//! about 2,000 times what typical histories need.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use mpkvirt_sys::mman::Prot;

use super::Semantics;
use super::concurrent::{
    AccessResult, ConcurrentOp, Divergence, EnterResult, Event, MarkerRead, OpResult, Outcome,
};
use crate::manager::Rights;
use crate::{Access, FaultKind};

/// What [`super::concurrent::record_concurrent`] recorded.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Domains in the table at the start: id, heap domain.
    pub initial: Vec<(u64, bool)>,
    /// Per logical thread, its events in program order.
    pub threads: Vec<Vec<Event>>,
    /// Operations skipped (nothing to act on), not recorded.
    pub skipped: usize,
}

impl History {
    /// Every event, thread by thread.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.threads.iter().flatten()
    }

    /// Counts of what the history contains (the checker's fields left at zero).
    pub fn outcome(&self) -> Outcome {
        let mut o = Outcome {
            events: self.events().count(),
            skipped: self.skipped,
            ..Outcome::default()
        };
        let all: Vec<&Event> = self.events().collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                if a.thread != b.thread && a.start < b.end && b.start < a.end {
                    o.overlapping_pairs += 1;
                }
            }
        }
        let access = |o: &mut Outcome, r: &AccessResult| {
            o.accesses += 1;
            if matches!(r, AccessResult::Fault { .. }) {
                o.faults += 1;
            }
        };
        let enter = |o: &mut Outcome, r: &EnterResult| match r {
            EnterResult::Ok => o.enters += 1,
            EnterResult::KeysBusy | EnterResult::OwnViews => o.busy += 1,
            _ => {}
        };
        for t in &self.threads {
            for (i, e) in t.iter().enumerate() {
                o.destroyed += e.destroyed.len();
                let read = |o: &mut Outcome, r: &MarkerRead| {
                    enter(o, &r.view);
                    for a in r.reads.iter().flatten() {
                        access(o, a);
                    }
                };
                match &e.result {
                    OpResult::Entered { result, .. } => enter(&mut o, result),
                    OpResult::Forgot { result, .. } => {
                        enter(&mut o, result);
                        if *result == EnterResult::Ok {
                            o.forgotten += 1;
                        }
                    }
                    OpResult::Accessed { result, .. } => access(&mut o, result),
                    OpResult::Allocated { view, writes, .. } => {
                        enter(&mut o, view);
                        if let Some(w) = writes {
                            o.allocs += 1;
                            w.iter().for_each(|a| access(&mut o, a));
                        }
                    }
                    OpResult::Checked { reads } => reads.iter().for_each(|r| read(&mut o, r)),
                    OpResult::Freed { read: r, .. } => read(&mut o, r),
                    OpResult::Exited if i + 1 < t.len() => o.exits += 1,
                    _ => {}
                }
            }
        }
        o
    }
}

/// How the search went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Nodes expanded.
    pub states: usize,
    /// The budget ran out before an order was found or all were refused.
    pub exhausted: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct MDomain {
    prot: Prot,
    heap: bool,
    bytes: BTreeMap<usize, u8>,
    /// Live allocations: offset -> size.
    allocs: BTreeMap<usize, usize>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct MView {
    ids: Vec<(u64, Rights)>,
    forgotten: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    /// Every domain created so far (destroyed ones too: an event that held a handle may be
    /// ordered after the one that dropped the last).
    domains: BTreeMap<u64, Arc<MDomain>>,
    views: Vec<Vec<MView>>,
}

fn show_view(v: &[(u64, Rights)]) -> String {
    let parts: Vec<String> = v
        .iter()
        .map(|(d, r)| {
            let r = match r {
                Rights::ReadWrite => "rw",
                Rights::ReadOnly => "ro",
            };
            format!("d{d}:{r}")
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

impl State {
    fn fingerprint(&self) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    fn domain(&self, id: u64) -> Result<&MDomain, String> {
        self.domains
            .get(&id)
            .map(|d| &**d)
            .ok_or_else(|| format!("d{id} does not exist yet"))
    }

    fn domain_mut(&mut self, id: u64) -> Result<&mut MDomain, String> {
        self.domains
            .get_mut(&id)
            .map(Arc::make_mut)
            .ok_or_else(|| format!("d{id} does not exist yet"))
    }

    fn top(&self, t: usize) -> Option<&[(u64, Rights)]> {
        self.views[t].last().map(|v| v.ids.as_slice())
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for (t, views) in self.views.iter().enumerate() {
            let vs: Vec<String> = views
                .iter()
                .map(|v| {
                    format!(
                        "{}{}",
                        if v.forgotten { "forgotten " } else { "" },
                        show_view(&v.ids)
                    )
                })
                .collect();
            s.push_str(&format!(
                "  t{t} views (oldest first): [{}]\n",
                vs.join(", ")
            ));
        }
        s
    }

    /// Domains pinned by thread `t`'s live views.
    fn pinned_by(&self, t: usize) -> BTreeSet<u64> {
        self.views[t]
            .iter()
            .flat_map(|v| v.ids.iter().map(|(d, _)| *d))
            .collect()
    }

    fn pinned(&self) -> BTreeSet<u64> {
        self.views
            .iter()
            .flatten()
            .flat_map(|v| v.ids.iter().map(|(d, _)| *d))
            .collect()
    }

    /// Whether thread `t` may access `id` (for a write if `write`); `top` replaces the
    /// thread's current view (the allocator operations' short views).
    fn allowed(
        &self,
        t: usize,
        id: u64,
        write: bool,
        top: Option<&[(u64, Rights)]>,
        semantics: Semantics,
    ) -> Result<bool, String> {
        let dom = self.domain(id)?;
        let prot_ok = dom
            .prot
            .contains(if write { Prot::WRITE } else { Prot::READ });
        let grants = |view: Option<&[(u64, Rights)]>| {
            view.and_then(|v| v.iter().find(|(d, _)| *d == id))
                .is_some_and(|(_, r)| *r == Rights::ReadWrite || !write)
        };
        let mine = grants(top.or_else(|| self.top(t)));
        let granted = match semantics {
            Semantics::PerThread => mine,
            Semantics::Union => {
                mine || (0..self.views.len())
                    .filter(|&u| u != t)
                    .any(|u| grants(self.top(u)))
            }
        };
        Ok(prot_ok && granted)
    }
}

/// Per event: what the other threads' overlapping events make acceptable.
#[derive(Clone, Debug, Default)]
struct Info {
    /// Another thread enters or leaves views meanwhile: `KeysBusy` is acceptable.
    busy_ok: bool,
    /// Domains another thread resets meanwhile: accesses to them may fault.
    resets: Vec<u64>,
    /// Domains whose grant by another thread changes meanwhile (for [`Semantics::Union`]).
    flux: Vec<u64>,
}

fn view_ids(v: &[(u64, Rights)]) -> impl Iterator<Item = u64> + '_ {
    v.iter().map(|(d, _)| *d)
}

/// Per event of one thread: the domains whose grant by this thread may change during it.
fn own_flux(events: &[Event]) -> Vec<Vec<u64>> {
    let mut views: Vec<MView> = Vec::new();
    let top = |views: &[MView]| views.last().map(|v| v.ids.clone()).unwrap_or_default();
    events
        .iter()
        .map(|e| {
            let before = top(&views);
            let mut flux: Vec<u64> = Vec::new();
            let mut transient = |ids: &mut dyn Iterator<Item = u64>| {
                flux.extend(view_ids(&before));
                flux.extend(ids);
            };
            match &e.result {
                OpResult::Entered {
                    view,
                    result: EnterResult::Ok,
                } => {
                    transient(&mut view_ids(view));
                    views.push(MView {
                        ids: view.clone(),
                        forgotten: false,
                    });
                }
                OpResult::Forgot {
                    id,
                    rights,
                    result: EnterResult::Ok,
                } => {
                    transient(&mut std::iter::once(*id));
                    views.push(MView {
                        ids: vec![(*id, *rights)],
                        forgotten: true,
                    });
                }
                OpResult::Left { index, .. } => {
                    if let Some(pos) = views
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| !v.forgotten)
                        .nth(*index)
                        .map(|(i, _)| i)
                    {
                        views.remove(pos);
                    }
                    let after = top(&views);
                    transient(&mut view_ids(&after));
                }
                OpResult::LeftAll { .. } | OpResult::Exited => {
                    let all: Vec<u64> = views.iter().flat_map(|v| view_ids(&v.ids)).collect();
                    transient(&mut all.into_iter());
                    if matches!(e.result, OpResult::Exited) {
                        views.clear();
                    } else {
                        views.retain(|v| v.forgotten);
                    }
                }
                OpResult::Allocated { id, .. } => transient(&mut std::iter::once(*id)),
                OpResult::Checked { reads } => transient(&mut reads.iter().map(|r| r.alloc.id)),
                OpResult::Freed { read, .. } => transient(&mut std::iter::once(read.alloc.id)),
                _ => {}
            }
            flux
        })
        .collect()
}

fn pins_change(op: &ConcurrentOp) -> bool {
    !matches!(
        op,
        ConcurrentOp::Create { .. }
            | ConcurrentOp::Destroy { .. }
            | ConcurrentOp::Access { .. }
            | ConcurrentOp::Protect { .. }
            | ConcurrentOp::Reset { .. }
    )
}

fn infos(h: &History) -> Vec<Vec<Info>> {
    let flux: Vec<Vec<Vec<u64>>> = h.threads.iter().map(|t| own_flux(t)).collect();
    h.threads
        .iter()
        .map(|events| {
            events
                .iter()
                .map(|e| {
                    let mut info = Info::default();
                    for (u, other) in h.threads.iter().enumerate() {
                        if u == e.thread {
                            continue;
                        }
                        for (j, f) in other.iter().enumerate() {
                            if !(f.start < e.end && e.start < f.end) {
                                continue;
                            }
                            info.busy_ok |= pins_change(&f.op);
                            if let OpResult::Reset { id, .. } = f.result {
                                info.resets.push(id);
                            }
                            info.flux.extend(&flux[u][j]);
                        }
                    }
                    info.flux.sort_unstable();
                    info.flux.dedup();
                    info
                })
                .collect()
        })
        .collect()
}

struct Best {
    depth: usize,
    progress: Vec<usize>,
    rejected: Vec<(usize, usize, String)>,
    state: String,
}

enum Flow {
    Found,
    Dead,
    Exhausted,
}

struct Search<'h> {
    h: &'h History,
    keys: usize,
    semantics: Semantics,
    infos: Vec<Vec<Info>>,
    /// Nodes seen: progress packed 16 bits per thread, model fingerprint.
    memo: HashSet<(u128, u64)>,
    nodes: usize,
    budget: usize,
    best: Option<Best>,
    /// Per event (thread, index): the distinct reasons the model refused it anywhere in the
    /// search (a few). The deepest point is not always where the culprit shows: an event
    /// refused early on the right path may be refused for another reason on a longer one.
    refusals: HashMap<(usize, usize), Vec<String>>,
}

impl Search<'_> {
    /// Whether `ids` may be entered: `Ok(true)` when the view is live afterwards,
    /// `Ok(false)` when it was (acceptably) refused.
    fn enter(
        &self,
        s: &State,
        t: usize,
        ids: &[u64],
        result: &EnterResult,
        info: &Info,
    ) -> Result<bool, String> {
        let mut pinned = s.pinned();
        pinned.extend(ids.iter().copied());
        let mut own = s.pinned_by(t);
        own.extend(ids.iter().copied());
        let (n, keys) = (pinned.len(), self.keys);
        // The thread's own views alone leave too few keys: the library says so at once (no
        // other thread can change that, so this one is predicted exactly).
        let own_too_many = own.len() > keys && ids.len() <= keys;
        match result {
            EnterResult::OwnViews if own_too_many => return Ok(false),
            EnterResult::OwnViews => {
                return Err(format!(
                    "t{t}: ViewsExceedKeys for {ids:?}, but its own views and this one pin only {} domains ({keys} keys)",
                    own.len()
                ));
            }
            r if own_too_many => {
                return Err(format!(
                    "t{t}: its own views and {ids:?} pin {} domains with {keys} keys: must be ViewsExceedKeys, got {r:?}",
                    own.len()
                ));
            }
            _ => {}
        }
        match result {
            EnterResult::TooLarge if ids.len() > keys => Ok(false),
            r if ids.len() > keys => Err(format!(
                "t{t}: a view of {} domains with {keys} keys must be ViewTooLarge, got {r:?}",
                ids.len()
            )),
            EnterResult::TooLarge => Err(format!(
                "t{t}: ViewTooLarge for {} domains with {keys} keys",
                ids.len()
            )),
            EnterResult::Ok if n > keys => Err(format!(
                "t{t} entered a view of {ids:?} although that pins {n} distinct domains with {keys} keys"
            )),
            EnterResult::Ok => Ok(true),
            EnterResult::KeysBusy if n > keys || info.busy_ok => Ok(false),
            EnterResult::KeysBusy => Err(format!(
                "t{t}: KeysBusy for {ids:?}, but with it only {n} distinct domains are pinned ({keys} keys) and no other thread enters or leaves meanwhile"
            )),
            EnterResult::Failed(m) => Err(format!("t{t}: enter {ids:?} failed: {m}")),
            EnterResult::OwnViews => unreachable!("handled above"),
        }
    }

    /// Checks one access against the model (and performs a write on it).
    #[expect(clippy::too_many_arguments, reason = "an access has that many parts")]
    fn access(
        &self,
        s: &mut State,
        t: usize,
        id: u64,
        off: usize,
        write: Option<u8>,
        result: &AccessResult,
        top: Option<&[(u64, Rights)]>,
        info: &Info,
    ) -> Result<(), String> {
        let allowed = s.allowed(t, id, write.is_some(), top, self.semantics)?;
        let flux = self.semantics == Semantics::Union && info.flux.contains(&id);
        let what = if write.is_some() { "write" } else { "read" };
        let view = || {
            let v = top.or_else(|| s.top(t)).map_or("none".into(), show_view);
            format!(
                "t{t}'s view is {v}, d{id} has protection {:?}",
                s.domains.get(&id).map(|d| d.prot)
            )
        };
        match (result, write) {
            (AccessResult::Read(v), None) => {
                if !allowed && !flux {
                    return Err(format!(
                        "t{t} read d{id}+{off:#x} (got {v}) where the model faults: {}",
                        view()
                    ));
                }
                let expected = s.domain(id)?.bytes.get(&off).copied().unwrap_or(0);
                if *v != expected {
                    return Err(format!(
                        "t{t} read {v} at d{id}+{off:#x}, the model holds {expected}"
                    ));
                }
                Ok(())
            }
            (AccessResult::Wrote, Some(v)) => {
                if !allowed && !flux {
                    return Err(format!(
                        "t{t} wrote d{id}+{off:#x} where the model faults: {}",
                        view()
                    ));
                }
                s.domain_mut(id)?.bytes.insert(off, v);
                Ok(())
            }
            (
                AccessResult::Fault {
                    domain,
                    kind,
                    access,
                },
                _,
            ) => {
                if allowed && !flux && !info.resets.contains(&id) {
                    return Err(format!(
                        "t{t}'s {what} of d{id}+{off:#x} faulted (report names {domain:?}) where the model allows it: {}",
                        view()
                    ));
                }
                let expected = if write.is_some() {
                    Access::Write
                } else {
                    Access::Read
                };
                if *domain != Some(id)
                    || *kind != FaultKind::Violation
                    || access.is_some_and(|a| a != expected)
                {
                    return Err(format!(
                        "t{t}'s {what} of d{id}+{off:#x}: the fault report ({domain:?}, {kind:?}, {access:?}) does not name d{id} / {expected:?}"
                    ));
                }
                Ok(())
            }
            (AccessResult::Failed(m), _) => Err(format!("t{t}'s {what} of d{id} failed: {m}")),
            (r, w) => Err(format!("driver: {r:?} for write {w:?}")),
        }
    }

    fn marker_read(
        &self,
        s: &mut State,
        t: usize,
        r: &MarkerRead,
        info: &Info,
    ) -> Result<(), String> {
        let a = r.alloc;
        if s.domain(a.id)?.allocs.get(&a.offset) != Some(&a.size) {
            return Err(format!(
                "t{t} reads back {a:?}, which the model does not hold"
            ));
        }
        if self.enter(s, t, &[a.id], &r.view, info)? {
            let reads = r.reads.as_ref().ok_or("driver: entered, nothing read")?;
            let top = [(a.id, Rights::ReadOnly)];
            for (off, read) in [(a.offset, &reads[0]), (a.offset + a.size - 1, &reads[1])] {
                self.access(s, t, a.id, off, None, read, Some(&top), info)
                    .map_err(|e| format!("marker {} of {a:?}: {e}", a.marker))?;
            }
        }
        Ok(())
    }

    /// The model after `e`, or why `e` cannot come next.
    fn step(&self, s: &State, e: &Event, info: &Info) -> Result<State, String> {
        let mut n = s.clone();
        let t = e.thread;
        match &e.result {
            OpResult::Created { id, heap, .. } => {
                if n.domains.contains_key(id) {
                    return Err(format!("d{id} created twice"));
                }
                n.domains.insert(
                    *id,
                    Arc::new(MDomain {
                        prot: Prot::READ_WRITE,
                        heap: *heap,
                        bytes: BTreeMap::new(),
                        allocs: BTreeMap::new(),
                    }),
                );
            }
            OpResult::CreateFailed(m) => return Err(format!("t{t}: create failed: {m}")),
            OpResult::Destroyed { id } => {
                n.domain(*id)?;
            }
            OpResult::Entered { view, result } => {
                for (id, _) in view {
                    n.domain(*id)?;
                }
                let ids: Vec<u64> = view_ids(view).collect();
                if self.enter(&n, t, &ids, result, info)? {
                    n.views[t].push(MView {
                        ids: view.clone(),
                        forgotten: false,
                    });
                }
            }
            OpResult::Forgot { id, rights, result } => {
                n.domain(*id)?;
                if self.enter(&n, t, &[*id], result, info)? {
                    n.views[t].push(MView {
                        ids: vec![(*id, *rights)],
                        forgotten: true,
                    });
                }
            }
            OpResult::Left { index, view } => {
                let pos = n.views[t]
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| !v.forgotten)
                    .nth(*index)
                    .map(|(i, _)| i)
                    .ok_or_else(|| format!("driver: t{t} has no guard #{index}"))?;
                if n.views[t][pos].ids != *view {
                    return Err(format!("driver: t{t}'s guard #{index} is not {view:?}"));
                }
                n.views[t].remove(pos);
            }
            OpResult::LeftAll { views } => {
                let owned = n.views[t].iter().filter(|v| !v.forgotten).count();
                if owned != *views {
                    return Err(format!("driver: t{t} dropped {views} guards of {owned}"));
                }
                n.views[t].retain(|v| v.forgotten);
            }
            OpResult::Exited => n.views[t].clear(),
            OpResult::Accessed {
                id,
                offset,
                write,
                result,
            } => self.access(&mut n, t, *id, *offset, *write, result, None, info)?,
            OpResult::Protected { id, prot, result } => {
                result
                    .as_ref()
                    .map_err(|m| format!("t{t}: protect d{id}: {m}"))?;
                n.domain_mut(*id)?.prot = *prot;
            }
            OpResult::Reset { id, result } => {
                result
                    .as_ref()
                    .map_err(|m| format!("t{t}: reset d{id}: {m}"))?;
                n.domain_mut(*id)?.bytes.clear();
            }
            OpResult::Allocated {
                id,
                size,
                alloc,
                view,
                writes,
                undone,
            } => {
                let a = alloc
                    .as_ref()
                    .map_err(|m| format!("t{t}: allocating {size} bytes in d{id} failed: {m}"))?;
                let dom = n.domain(*id)?;
                if let Some((o, s)) = dom
                    .allocs
                    .iter()
                    .find(|&(&o, &s)| o < a.offset + a.size && a.offset < o + s)
                {
                    return Err(format!(
                        "t{t} was given [{:#x}, +{}) in d{id}, overlapping the live allocation [{o:#x}, +{s})",
                        a.offset, a.size
                    ));
                }
                if self.enter(&n, t, &[*id], view, info)? {
                    let w = writes.as_ref().ok_or("driver: entered, nothing written")?;
                    let top = [(*id, Rights::ReadWrite)];
                    for (off, r) in [(a.offset, &w[0]), (a.offset + a.size - 1, &w[1])] {
                        self.access(&mut n, t, *id, off, Some(a.marker), r, Some(&top), info)
                            .map_err(|e| format!("marker {} of {a:?}: {e}", a.marker))?;
                    }
                    n.domain_mut(*id)?.allocs.insert(a.offset, a.size);
                } else if !matches!(undone, Some(Ok(_))) {
                    return Err(format!(
                        "t{t}: freeing {a:?} after its view was refused: {undone:?}"
                    ));
                }
            }
            OpResult::Checked { reads } => {
                for r in reads {
                    self.marker_read(&mut n, t, r, info)?;
                }
            }
            OpResult::Freed { read, free } => {
                self.marker_read(&mut n, t, read, info)?;
                let a = read.alloc;
                free.as_ref()
                    .map_err(|m| format!("t{t}: freeing the live allocation {a:?} failed: {m}"))?;
                n.domain_mut(a.id)?.allocs.remove(&a.offset);
            }
        }
        Ok(n)
    }

    fn dfs(&mut self, progress: &mut Vec<usize>, state: &State) -> Flow {
        let h = self.h;
        let depth: usize = progress.iter().sum();
        if (0..h.threads.len()).all(|t| progress[t] == h.threads[t].len()) {
            return Flow::Found;
        }
        let packed = progress
            .iter()
            .fold(0u128, |acc, &p| (acc << 16) | p as u128);
        let key = (packed, state.fingerprint());
        if !self.memo.insert(key) {
            return Flow::Dead;
        }
        self.nodes += 1;
        if self.nodes > self.budget {
            return Flow::Exhausted;
        }
        let next = |u: usize| h.threads[u].get(progress[u]);
        let mut candidates: Vec<usize> = (0..h.threads.len())
            .filter(|&t| {
                next(t).is_some_and(|e| {
                    (0..h.threads.len())
                        .filter(|&u| u != t)
                        .all(|u| next(u).is_none_or(|f| f.end > e.start))
                })
            })
            .collect();
        candidates.sort_by_key(|&t| h.threads[t][progress[t]].start);
        let mut rejected = Vec::new();
        for t in candidates {
            let e = &h.threads[t][progress[t]];
            match self.step(state, e, &self.infos[t][progress[t]]) {
                Ok(after) => {
                    progress[t] += 1;
                    let flow = self.dfs(progress, &after);
                    progress[t] -= 1;
                    if !matches!(flow, Flow::Dead) {
                        return flow;
                    }
                }
                Err(why) => {
                    let seen = self.refusals.entry((t, progress[t])).or_default();
                    if seen.len() < 3 && !seen.contains(&why) {
                        seen.push(why.clone());
                    }
                    rejected.push((t, progress[t], why));
                }
            }
        }
        if self.best.as_ref().is_none_or(|b| depth > b.depth) {
            self.best = Some(Best {
                depth,
                progress: progress.clone(),
                rejected,
                state: state.describe(),
            });
        }
        Flow::Dead
    }
}

/// The events around `progress` (the last few linearized and the next few pending of each
/// thread, pending ones marked `*`), in invocation order.
fn snippet(h: &History, progress: &[usize]) -> String {
    let mut shown: Vec<(&Event, bool)> = Vec::new();
    for (t, events) in h.threads.iter().enumerate() {
        let p = progress[t];
        for (i, e) in events
            .iter()
            .enumerate()
            .take(p + 4)
            .skip(p.saturating_sub(6))
        {
            shown.push((e, i >= p));
        }
    }
    shown.sort_by_key(|(e, _)| e.start);
    let mut s = String::from("history around it (invocation order; * = not linearized):\n");
    for (e, pending) in shown {
        s.push_str(&format!("{} {e}\n", if pending { "*" } else { " " }));
    }
    s
}

/// Checks `h` for linearizability against the model with `keys` keys and `semantics`,
/// expanding at most `budget` nodes.
///
/// # Errors
///
/// A [`Divergence`] when no order is accepted: the model's objections at the deepest point
/// the search reached, and the history around it.
pub fn check(
    h: &History,
    keys: usize,
    semantics: Semantics,
    budget: usize,
) -> Result<CheckStats, Divergence> {
    assert!(
        h.threads.len() <= 8 && h.threads.iter().all(|t| t.len() < 1 << 16),
        "the search packs each thread's progress in 16 bits, for up to 8 threads"
    );
    let state = State {
        domains: h
            .initial
            .iter()
            .map(|&(id, heap)| {
                (
                    id,
                    Arc::new(MDomain {
                        prot: Prot::READ_WRITE,
                        heap,
                        bytes: BTreeMap::new(),
                        allocs: BTreeMap::new(),
                    }),
                )
            })
            .collect(),
        views: vec![Vec::new(); h.threads.len()],
    };
    let mut search = Search {
        h,
        keys,
        semantics,
        infos: infos(h),
        memo: HashSet::new(),
        nodes: 0,
        budget,
        best: None,
        refusals: HashMap::new(),
    };
    let mut progress = vec![0; h.threads.len()];
    match search.dfs(&mut progress, &state) {
        Flow::Found => Ok(CheckStats {
            states: search.nodes,
            exhausted: false,
        }),
        Flow::Exhausted => Ok(CheckStats {
            states: search.nodes,
            exhausted: true,
        }),
        Flow::Dead => {
            let best = search.best.expect("a dead search has a deepest node");
            let total: usize = h.threads.iter().map(Vec::len).sum();
            let mut what = format!(
                "no order of the {total} events satisfies the model ({semantics:?}, {keys} keys); the deepest search ordered {} of them, and there the model refuses:\n",
                best.depth
            );
            for (t, i, why) in &best.rejected {
                what.push_str(&format!("  t{t}#{i}: {why}\n"));
                for other in search.refusals[&(*t, *i)].iter().filter(|o| *o != why) {
                    what.push_str(&format!("    (elsewhere in the search: {other})\n"));
                }
            }
            for (t, &i) in best.progress.iter().enumerate() {
                let refused_there = best.rejected.iter().any(|&(u, j, _)| (u, j) == (t, i));
                if let Some(reasons) = search.refusals.get(&(t, i))
                    && !refused_there
                {
                    for why in reasons {
                        what.push_str(&format!(
                            "  t{t}#{i} (refused elsewhere in the search): {why}\n"
                        ));
                    }
                }
            }
            what.push_str("model state there:\n");
            what.push_str(&best.state);
            Err(Divergence {
                what,
                snippet: snippet(h, &best.progress),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::concurrent::AllocRecord;

    const A: u64 = 1;
    const B: u64 = 2;
    const H: u64 = 3;

    /// Events of one thread from `(start, end, op, result)`.
    fn thread(t: usize, events: Vec<(u64, u64, ConcurrentOp, OpResult)>) -> Vec<Event> {
        events
            .into_iter()
            .enumerate()
            .map(|(seq, (start, end, op, result))| Event {
                thread: t,
                seq,
                op,
                start,
                end,
                result,
                destroyed: Vec::new(),
            })
            .collect()
    }

    fn history(threads: Vec<Vec<Event>>) -> History {
        History {
            initial: vec![(A, false), (B, false), (H, true)],
            threads,
            skipped: 0,
        }
    }

    fn enter(id: u64, result: EnterResult) -> (ConcurrentOp, OpResult) {
        (
            ConcurrentOp::Enter {
                view: vec![(0, Rights::ReadWrite)],
            },
            OpResult::Entered {
                view: vec![(id, Rights::ReadWrite)],
                result,
            },
        )
    }

    fn access(id: u64, write: Option<u8>, result: AccessResult) -> (ConcurrentOp, OpResult) {
        (
            ConcurrentOp::Access {
                slot: 0,
                offset: 0,
                write,
            },
            OpResult::Accessed {
                id,
                offset: 0,
                write,
                result,
            },
        )
    }

    fn at(
        start: u64,
        end: u64,
        (op, result): (ConcurrentOp, OpResult),
    ) -> (u64, u64, ConcurrentOp, OpResult) {
        (start, end, op, result)
    }

    fn check1(h: &History, keys: usize) -> Result<CheckStats, Divergence> {
        check(h, keys, Semantics::PerThread, 10_000)
    }

    #[test]
    fn a_read_overlapping_a_write_may_see_it() {
        // t0 writes 7 during [1, 4]; t1's read during [2, 3] sees it: write first.
        let h = history(vec![
            thread(
                0,
                vec![
                    at(0, 1, enter(A, EnterResult::Ok)),
                    at(1, 4, access(A, Some(7), AccessResult::Wrote)),
                ],
            ),
            thread(
                1,
                vec![
                    at(0, 1, enter(A, EnterResult::Ok)),
                    at(2, 3, access(A, None, AccessResult::Read(7))),
                ],
            ),
        ]);
        assert!(check1(&h, 2).is_ok());
    }

    #[test]
    fn real_time_order_is_respected() {
        // The read starts after the write ended: it must see 7, and 0 is refused.
        let h = history(vec![
            thread(
                0,
                vec![
                    at(0, 2, enter(A, EnterResult::Ok)),
                    at(3, 4, access(A, Some(7), AccessResult::Wrote)),
                ],
            ),
            thread(
                1,
                vec![
                    at(1, 5, enter(A, EnterResult::Ok)),
                    at(6, 7, access(A, None, AccessResult::Read(0))),
                ],
            ),
        ]);
        let d = check1(&h, 2).unwrap_err();
        assert!(
            d.what.contains("t1 read 0 at d1+0x0, the model holds 7"),
            "{d}"
        );
        assert!(d.snippet.contains("* t1#1"), "{d}");
    }

    #[test]
    fn accesses_outside_the_view_must_fault_and_name_the_domain() {
        let fault = |domain| AccessResult::Fault {
            domain: Some(domain),
            kind: FaultKind::Violation,
            access: Some(Access::Read),
        };
        let ok = history(vec![thread(
            0,
            vec![
                at(0, 1, enter(A, EnterResult::Ok)),
                at(2, 3, access(B, None, fault(B))),
            ],
        )]);
        assert!(check1(&ok, 2).is_ok());
        let wrong = history(vec![thread(
            0,
            vec![
                at(0, 1, enter(A, EnterResult::Ok)),
                at(2, 3, access(B, None, fault(A))),
            ],
        )]);
        assert!(
            check1(&wrong, 2)
                .unwrap_err()
                .what
                .contains("does not name d2")
        );
        let leak = history(vec![thread(
            0,
            vec![
                at(0, 1, enter(A, EnterResult::Ok)),
                at(2, 3, access(B, None, AccessResult::Read(0))),
            ],
        )]);
        assert!(
            check1(&leak, 2)
                .unwrap_err()
                .what
                .contains("where the model faults")
        );
    }

    #[test]
    fn keys_busy_is_predicted_or_admitted_only_when_pins_are_in_flux() {
        // One key, pinned by t0's view of A: t1's enter of B is refused.
        let predicted = history(vec![
            thread(0, vec![at(0, 1, enter(A, EnterResult::Ok))]),
            thread(1, vec![at(2, 3, enter(B, EnterResult::KeysBusy))]),
        ]);
        assert!(check1(&predicted, 1).is_ok());
        // Nothing pinned and nobody entering meanwhile: KeysBusy is a divergence...
        let alone = history(vec![
            thread(0, vec![at(0, 1, enter(A, EnterResult::KeysBusy))]),
            thread(1, vec![at(2, 3, enter(B, EnterResult::Ok))]),
        ]);
        assert!(check1(&alone, 1).unwrap_err().what.contains("KeysBusy"));
        // ...but not while another thread's enter overlaps (its transient pins).
        let overlapping = history(vec![
            thread(0, vec![at(0, 3, enter(A, EnterResult::KeysBusy))]),
            thread(1, vec![at(1, 2, enter(B, EnterResult::Ok))]),
        ]);
        assert!(check1(&overlapping, 1).is_ok());
        // An enter that succeeds although every key is pinned is a divergence.
        let over = history(vec![
            thread(0, vec![at(0, 1, enter(A, EnterResult::Ok))]),
            thread(1, vec![at(2, 3, enter(B, EnterResult::Ok))]),
        ]);
        assert!(
            check1(&over, 1)
                .unwrap_err()
                .what
                .contains("pins 2 distinct domains with 1 keys")
        );
    }

    #[test]
    fn a_marker_wiped_by_a_late_free_is_a_divergence() {
        let rec = |marker| AllocRecord {
            id: H,
            offset: 0,
            size: 4096,
            marker,
        };
        let alloc = |marker| {
            (
                ConcurrentOp::AllocWrite {
                    slot: 0,
                    size: 4096,
                },
                OpResult::Allocated {
                    id: H,
                    size: 4096,
                    alloc: Ok(rec(marker)),
                    view: EnterResult::Ok,
                    writes: Some([AccessResult::Wrote, AccessResult::Wrote]),
                    undone: None,
                },
            )
        };
        let read = |marker, value| MarkerRead {
            alloc: rec(marker),
            view: EnterResult::Ok,
            reads: Some([AccessResult::Read(value), AccessResult::Read(value)]),
        };
        let free = |marker| {
            (
                ConcurrentOp::Free { which: 0 },
                OpResult::Freed {
                    read: read(marker, marker),
                    free: Ok(4096),
                },
            )
        };
        let check_all = |marker, value| {
            (
                ConcurrentOp::CheckAll,
                OpResult::Checked {
                    reads: vec![read(marker, value)],
                },
            )
        };
        // t0 frees the run while t1 is given it and writes its marker; t1 reads it back.
        let h = |value| {
            history(vec![
                thread(0, vec![at(0, 1, alloc(1)), at(2, 6, free(1))]),
                thread(1, vec![at(3, 5, alloc(2)), at(7, 8, check_all(2, value))]),
            ])
        };
        assert!(check1(&h(2), 1).is_ok());
        let d = check1(&h(0), 1).unwrap_err();
        assert!(d.what.contains("marker 2"), "{d}");
        // Allocating over a live allocation is refused as well.
        let double = history(vec![
            thread(0, vec![at(0, 1, alloc(1))]),
            thread(1, vec![at(2, 3, alloc(2))]),
        ]);
        assert!(
            check1(&double, 1)
                .unwrap_err()
                .what
                .contains("overlapping the live allocation")
        );
    }

    #[test]
    fn the_budget_bounds_the_search() {
        // Many mutually overlapping writes of distinct values, read back as a value no order
        // produces: the search must stop at its budget.
        let writes: Vec<Vec<Event>> = (0..3)
            .map(|t| {
                let mut ev = vec![at(0, 1000, enter(A, EnterResult::Ok))];
                ev.extend((0..12).map(|i| {
                    at(
                        1 + i,
                        990 - i,
                        access(A, Some((t * 20 + i + 1) as u8), AccessResult::Wrote),
                    )
                }));
                ev.push(at(995, 996, access(A, None, AccessResult::Read(255))));
                thread(t as usize, ev)
            })
            .collect();
        let h = history(writes);
        let stats = check(&h, 3, Semantics::PerThread, 500).unwrap();
        assert!(stats.exhausted && stats.states > 500, "{stats:?}");
    }
}
