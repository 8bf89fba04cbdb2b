//! Eviction policies for the key cache: which resident domain gives up its hardware key.
//!
//! Pure code (no system calls, no clocks, no threads), so it is tested exhaustively, driven
//! by property tests and fuzzers, and replayed on traces ([`simulate`]).
//!
//! The cache has `capacity` slots (hardware keys). Each slot holds at most one domain,
//! identified by an opaque `u64`. The manager tells the policy when a slot is bound, used and
//! unbound, and asks it for a victim among the slots that are not pinned.
//!
//! - [`Lru`]: evict the least recently used domain. The baseline (libmpk uses it).
//! - [`Hinted`]: the caller announces the domains it will need next, in order (a scheduler's
//!   run queue is exactly that); evict a domain that is not announced — the one whose next
//!   use, predicted from its last reuse gap, is furthest — else the one whose announced use
//!   is furthest. With a complete future this is Belady's optimal policy; with a window of
//!   the next few uses it approaches it.
//! - [`simulate`] with [`PolicyKind::Opt`]: Belady's offline optimum (MIN), the lower bound
//!   on misses for a trace, used to judge the others.

use std::collections::HashMap;

use allocator_api2::alloc::{Allocator, Global};
use allocator_api2::vec::Vec as AVec;

/// Which policy a cache uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum PolicyKind {
    /// Least recently used.
    #[default]
    Lru,
    /// Furthest announced next use (the caller passes hints), LRU otherwise.
    Hinted,
    /// Belady's offline optimum; only meaningful in [`simulate`], where the whole trace is
    /// known.
    Opt,
}

impl PolicyKind {
    /// Parses `lru`, `hinted` or `opt`.
    pub fn parse(s: &str) -> Option<PolicyKind> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Some(PolicyKind::Lru),
            "hinted" => Some(PolicyKind::Hinted),
            "opt" => Some(PolicyKind::Opt),
            _ => None,
        }
    }
}

/// An eviction policy over `capacity` slots.
pub trait Policy: Send + std::fmt::Debug {
    /// `domain` now holds `slot`.
    fn bind(&mut self, slot: usize, domain: u64);
    /// `slot` was used (a hit, or the access that followed a bind).
    fn touch(&mut self, slot: usize);
    /// `slot` is free again.
    fn unbind(&mut self, slot: usize);
    /// Announces upcoming uses, soonest first; replaces earlier hints. Policies that do not
    /// look ahead ignore it.
    fn hint(&mut self, _future: &[u64]) {}
    /// `domain` is gone for good: forget what is known about it.
    fn forget(&mut self, _domain: u64) {}
    /// Picks the victim among `candidates` (bound, unpinned slots; never empty).
    fn victim(&mut self, candidates: &[usize]) -> usize;
}

/// The live policy of a manager: one of the policies, in the allocator `A` (the manager keeps
/// it in its metadata; replays use the global allocator).
#[derive(Debug, Clone)]
pub enum LivePolicy<A: Allocator + Clone = Global> {
    /// [`Lru`].
    Lru(Lru<A>),
    /// [`Hinted`].
    Hinted(Hinted<A>),
}

impl<A: Allocator + Clone + Send + std::fmt::Debug> Policy for LivePolicy<A> {
    fn bind(&mut self, slot: usize, domain: u64) {
        match self {
            LivePolicy::Lru(p) => p.bind(slot, domain),
            LivePolicy::Hinted(p) => p.bind(slot, domain),
        }
    }
    fn touch(&mut self, slot: usize) {
        match self {
            LivePolicy::Lru(p) => p.touch(slot),
            LivePolicy::Hinted(p) => p.touch(slot),
        }
    }
    fn unbind(&mut self, slot: usize) {
        match self {
            LivePolicy::Lru(p) => p.unbind(slot),
            LivePolicy::Hinted(p) => p.unbind(slot),
        }
    }
    fn hint(&mut self, future: &[u64]) {
        match self {
            LivePolicy::Lru(p) => p.hint(future),
            LivePolicy::Hinted(p) => p.hint(future),
        }
    }
    fn forget(&mut self, domain: u64) {
        match self {
            LivePolicy::Lru(p) => p.forget(domain),
            LivePolicy::Hinted(p) => p.forget(domain),
        }
    }
    fn victim(&mut self, candidates: &[usize]) -> usize {
        match self {
            LivePolicy::Lru(p) => p.victim(candidates),
            LivePolicy::Hinted(p) => p.victim(candidates),
        }
    }
}

impl<A: Allocator + Clone> LivePolicy<A> {
    /// Domains whose history the policy keeps (0 for LRU).
    pub fn remembered(&self) -> usize {
        match self {
            LivePolicy::Lru(_) => 0,
            LivePolicy::Hinted(p) => p.remembered(),
        }
    }
}

/// Creates the live policy for `kind` (`Opt` needs the whole trace and falls back to
/// [`Hinted`], which is optimal when the hints are complete).
pub fn new_policy(kind: PolicyKind, capacity: usize) -> LivePolicy {
    new_policy_in(kind, capacity, Global)
}

/// [`new_policy`] with its state in `alloc`.
pub fn new_policy_in<A: Allocator + Clone>(
    kind: PolicyKind,
    capacity: usize,
    alloc: A,
) -> LivePolicy<A> {
    match kind {
        PolicyKind::Lru => LivePolicy::Lru(Lru::new_in(capacity, alloc)),
        PolicyKind::Hinted | PolicyKind::Opt => LivePolicy::Hinted(Hinted::new_in(capacity, alloc)),
    }
}

/// Least recently used: a logical clock stamped on every use.
#[derive(Debug, Clone)]
pub struct Lru<A: Allocator + Clone = Global> {
    clock: u64,
    last_use: AVec<u64, A>,
}

impl Lru {
    /// A policy for `capacity` slots.
    pub fn new(capacity: usize) -> Lru {
        Lru::new_in(capacity, Global)
    }
}

impl<A: Allocator + Clone> Lru<A> {
    /// A policy for `capacity` slots, its state in `alloc`.
    pub fn new_in(capacity: usize, alloc: A) -> Lru<A> {
        let mut last_use = AVec::with_capacity_in(capacity, alloc);
        last_use.resize(capacity, 0);
        Lru { clock: 0, last_use }
    }

    fn stamp(&mut self, slot: usize) {
        self.clock += 1;
        self.last_use[slot] = self.clock;
    }

    /// The least recently used of `candidates` (lowest slot on ties).
    fn oldest(&self, candidates: impl Iterator<Item = usize>) -> Option<usize> {
        candidates.min_by_key(|&s| (self.last_use[s], s))
    }
}

impl<A: Allocator + Clone + Send + std::fmt::Debug> Policy for Lru<A> {
    fn bind(&mut self, slot: usize, _domain: u64) {
        self.stamp(slot);
    }
    fn touch(&mut self, slot: usize) {
        self.stamp(slot);
    }
    fn unbind(&mut self, slot: usize) {
        self.last_use[slot] = 0;
    }
    fn victim(&mut self, candidates: &[usize]) -> usize {
        self.oldest(candidates.iter().copied()).expect("candidates")
    }
}

/// Uses closer together than this many accesses are one reference to the hinted policy's
/// reuse prediction (LRU-K's "correlated reference period").
pub const CORRELATED_PERIOD: u64 = 16;

type Map<K, V, A> = hashbrown::HashMap<K, V, hashbrown::DefaultHashBuilder, A>;

/// Furthest announced next use; for domains that are not announced, the furthest
/// *predicted* next use.
///
/// A domain's next use is predicted from its last inter-reference gap (`last + (last -
/// previous)`), the estimate LRU-2 (O'Neil et al., SIGMOD 1993) ranks by; a domain used only
/// once is predicted never to return and goes first. Announced uses are certain and come
/// before any prediction (an unannounced domain is not needed within the window), so they
/// are evicted last. The history of a domain is kept after it is evicted, as LRU-K does,
/// until the domain is destroyed ([`Policy::forget`]).
#[derive(Debug, Clone)]
pub struct Hinted<A: Allocator + Clone = Global> {
    lru: Lru<A>,
    clock: u64,
    /// Per domain: its last two use times.
    history: Map<u64, [u64; 2], A>,
    domains: AVec<Option<u64>, A>,
    /// Positions of each domain's announced uses in the current hint, *latest first* (a use
    /// of the domain pops the soonest from the back).
    next_use: Map<u64, AVec<usize, A>, A>,
    alloc: A,
}

impl Hinted {
    /// A policy for `capacity` slots.
    pub fn new(capacity: usize) -> Hinted {
        Hinted::new_in(capacity, Global)
    }
}

impl<A: Allocator + Clone> Hinted<A> {
    /// A policy for `capacity` slots, its state in `alloc`.
    pub fn new_in(capacity: usize, alloc: A) -> Hinted<A> {
        let mut domains = AVec::with_capacity_in(capacity, alloc.clone());
        domains.resize(capacity, None);
        Hinted {
            lru: Lru::new_in(capacity, alloc.clone()),
            clock: 0,
            history: Map::with_hasher_in(Default::default(), alloc.clone()),
            domains,
            next_use: Map::with_hasher_in(Default::default(), alloc.clone()),
            alloc,
        }
    }

    /// Domains whose history is kept (resident or not, not yet forgotten).
    pub fn remembered(&self) -> usize {
        self.history.len()
    }

    /// Records a use of `domain`. Uses closer than [`CORRELATED_PERIOD`] to the previous
    /// one extend it (a burst counts as one reference), so the gap measures how long the
    /// domain stays away between bursts.
    fn record(&mut self, domain: u64) {
        self.clock += 1;
        let h = self.history.entry(domain).or_insert([0, 0]);
        *h = if h[0] > 0 && self.clock - h[0] < CORRELATED_PERIOD {
            [self.clock, h[1]]
        } else {
            [self.clock, h[0]]
        };
    }

    /// Predicted next use of the domain in `slot` (`u64::MAX`: used once, not expected back).
    fn predicted_use_of(&self, slot: usize) -> u64 {
        match self.domains[slot].and_then(|d| self.history.get(&d)) {
            Some(&[last, prev]) if prev > 0 => last + (last - prev),
            _ => u64::MAX,
        }
    }

    /// The first announced use of the domain in `slot`, `None` if it is not announced.
    fn next_use_of(&self, slot: usize) -> Option<usize> {
        self.domains[slot].and_then(|d| self.next_use.get(&d).and_then(|q| q.last().copied()))
    }

    /// A use of `domain` happened: its soonest announced use is consumed.
    fn consume(&mut self, domain: u64) {
        if let Some(q) = self.next_use.get_mut(&domain) {
            q.pop();
            if q.is_empty() {
                self.next_use.remove(&domain);
            }
        }
    }
}

impl<A: Allocator + Clone + Send + std::fmt::Debug> Policy for Hinted<A> {
    fn bind(&mut self, slot: usize, domain: u64) {
        self.domains[slot] = Some(domain);
        self.lru.bind(slot, domain);
        self.record(domain);
        self.consume(domain);
    }
    fn touch(&mut self, slot: usize) {
        self.lru.touch(slot);
        if let Some(d) = self.domains[slot] {
            self.record(d);
            self.consume(d);
        }
    }
    fn unbind(&mut self, slot: usize) {
        self.domains[slot] = None;
        self.lru.unbind(slot);
    }
    fn hint(&mut self, future: &[u64]) {
        self.next_use.clear();
        for (i, &d) in future.iter().enumerate().rev() {
            let alloc = self.alloc.clone();
            self.next_use
                .entry(d)
                .or_insert_with(|| AVec::new_in(alloc))
                .push(i);
        }
    }
    fn forget(&mut self, domain: u64) {
        self.history.remove(&domain);
        self.next_use.remove(&domain);
    }
    fn victim(&mut self, candidates: &[usize]) -> usize {
        // Not announced: the furthest predicted use of those (LRU among equals). Else: the
        // furthest announced. No allocation: this runs inside the library.
        let unannounced = || {
            candidates
                .iter()
                .copied()
                .filter(|&s| self.next_use_of(s).is_none())
        };
        if let Some(furthest) = unannounced().map(|s| self.predicted_use_of(s)).max() {
            return self
                .lru
                .oldest(unannounced().filter(|&s| self.predicted_use_of(s) == furthest))
                .expect("a tied candidate");
        }
        *candidates
            .iter()
            .max_by_key(|&&s| (self.next_use_of(s), std::cmp::Reverse(s)))
            .expect("candidates")
    }
}

/// Outcome of replaying a trace.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Stats {
    /// Accesses whose domain was resident.
    pub hits: u64,
    /// Accesses that had to bind a key (including cold misses).
    pub misses: u64,
    /// Misses that evicted another domain.
    pub evictions: u64,
}

impl Stats {
    /// Misses per access.
    pub fn miss_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.misses as f64 / total as f64
        }
    }
}

/// The resident set of a cache being replayed.
struct Replay {
    slot_of: HashMap<u64, usize>,
    domain_in: Vec<Option<u64>>,
    stats: Stats,
}

/// What one access did to a [`Replay`].
enum Outcome {
    Hit(usize),
    /// Bound to the slot; `evicted` when another domain had to leave it.
    Miss {
        slot: usize,
        evicted: bool,
    },
}

impl Replay {
    fn new(capacity: usize) -> Replay {
        Replay {
            slot_of: HashMap::new(),
            domain_in: vec![None; capacity],
            stats: Stats::default(),
        }
    }

    /// Accesses `d`: a hit, or a miss bound to a free slot or to the one `victim` picks.
    fn access(&mut self, d: u64, victim: impl FnOnce() -> usize) -> Outcome {
        if let Some(&s) = self.slot_of.get(&d) {
            self.stats.hits += 1;
            return Outcome::Hit(s);
        }
        self.stats.misses += 1;
        let (slot, evicted) = match self.domain_in.iter().position(Option::is_none) {
            Some(free) => (free, false),
            None => {
                self.stats.evictions += 1;
                let s = victim();
                self.slot_of
                    .remove(&self.domain_in[s].take().expect("bound"));
                (s, true)
            }
        };
        self.domain_in[slot] = Some(d);
        self.slot_of.insert(d, slot);
        Outcome::Miss { slot, evicted }
    }
}

/// Replays `trace` (domain ids, one access each) through a cache of `capacity` keys.
///
/// For [`PolicyKind::Hinted`], before each access the policy is told the next `lookahead`
/// accesses (what a run queue of that length reveals). [`PolicyKind::Opt`] sees the whole
/// future (Belady's MIN).
pub fn simulate(trace: &[u64], capacity: usize, kind: PolicyKind, lookahead: usize) -> Stats {
    assert!(capacity > 0, "a cache needs at least one key");
    let mut replay = Replay::new(capacity);
    if kind == PolicyKind::Opt {
        // next[i]: index of the next access to trace[i]'s domain after i.
        let mut next = vec![usize::MAX; trace.len()];
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for i in (0..trace.len()).rev() {
            next[i] = seen.insert(trace[i], i).unwrap_or(usize::MAX);
        }
        let mut next_of_slot = vec![usize::MAX; capacity];
        for (i, &d) in trace.iter().enumerate() {
            let furthest = || {
                (0..capacity)
                    .max_by_key(|&s| (next_of_slot[s], s))
                    .expect("slot")
            };
            let (Outcome::Hit(s) | Outcome::Miss { slot: s, .. }) = replay.access(d, furthest);
            next_of_slot[s] = next[i];
        }
    } else {
        let mut policy = new_policy(kind, capacity);
        let all: Vec<usize> = (0..capacity).collect();
        for (i, &d) in trace.iter().enumerate() {
            if kind == PolicyKind::Hinted {
                let end = (i + 1 + lookahead).min(trace.len());
                policy.hint(&trace[i + 1..end]);
            }
            match replay.access(d, || policy.victim(&all)) {
                Outcome::Hit(s) => policy.touch(s),
                Outcome::Miss { slot, evicted } => {
                    if evicted {
                        policy.unbind(slot);
                    }
                    policy.bind(slot, d);
                }
            }
        }
    }
    replay.stats
}

/// Trace generators for policy comparisons (deterministic for a seed).
pub mod trace {
    /// SplitMix64: a small, well-mixed deterministic generator; enough for traces.
    #[derive(Clone, Debug)]
    pub struct SplitMix(u64);

    impl SplitMix {
        /// A generator seeded with `seed`.
        pub fn new(seed: u64) -> SplitMix {
            SplitMix(seed)
        }
        /// The next 64 random bits.
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        /// Uniform in `0..n` (n > 0).
        pub fn below(&mut self, n: u64) -> u64 {
            ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
        }
        /// Uniform in `[0, 1)`.
        pub fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Samples ranks `0..n` with probability proportional to `1 / (rank + 1)^s`.
    #[derive(Clone, Debug)]
    pub struct Zipf {
        cdf: Vec<f64>,
    }

    impl Zipf {
        /// A Zipf distribution over `n > 0` items with exponent `s`.
        pub fn new(n: usize, s: f64) -> Zipf {
            let mut acc = 0.0;
            let mut cdf = Vec::with_capacity(n);
            for rank in 0..n {
                acc += 1.0 / ((rank + 1) as f64).powf(s);
                cdf.push(acc);
            }
            for c in &mut cdf {
                *c /= acc;
            }
            Zipf { cdf }
        }
        /// A rank.
        pub fn sample(&self, rng: &mut SplitMix) -> u64 {
            let u = rng.unit();
            self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64
        }
    }

    /// `len` accesses, each to a uniformly chosen domain of `domains`.
    pub fn uniform(domains: usize, len: usize, seed: u64) -> Vec<u64> {
        let mut rng = SplitMix::new(seed);
        (0..len).map(|_| rng.below(domains as u64)).collect()
    }

    /// `len` accesses with Zipf(`s`) popularity over `domains` (popular ids scattered).
    pub fn zipf(domains: usize, len: usize, s: f64, seed: u64) -> Vec<u64> {
        let mut rng = SplitMix::new(seed);
        let z = Zipf::new(domains, s);
        (0..len)
            .map(|_| scatter(z.sample(&mut rng), domains as u64))
            .collect()
    }

    /// A cyclic scan over `domains` domains, `len` accesses long.
    pub fn scan(domains: usize, len: usize) -> Vec<u64> {
        (0..len).map(|i| (i % domains) as u64).collect()
    }

    /// A serverless-like trace: `apps` applications with Zipf(`s`) popularity arrive in
    /// bursts (geometric, mean `burst` requests). A request of app `a` touches the app's
    /// shared read-only image domain, then one of its `instances` instance domains.
    /// Domain ids: image of app `a` = `2a·K`, instance `i` = `2a·K + 1 + i` with
    /// `K = instances + 1`.
    pub fn serverless(
        apps: usize,
        instances: usize,
        len: usize,
        s: f64,
        burst: f64,
        seed: u64,
    ) -> Vec<u64> {
        let mut rng = SplitMix::new(seed);
        let z = Zipf::new(apps, s);
        let k = (instances + 1) as u64;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let app = scatter(z.sample(&mut rng), apps as u64);
            let base = 2 * app * k;
            loop {
                out.push(base);
                out.push(base + 1 + rng.below(instances as u64));
                if out.len() >= len || rng.unit() < 1.0 / burst {
                    break;
                }
            }
        }
        out.truncate(len);
        out
    }

    /// Spreads rank `r` over `0..n` so that popular ids are not adjacent.
    fn scatter(r: u64, n: u64) -> u64 {
        // Multiplying by an odd constant modulo a power of two is a bijection; fold into n.
        let m = n.next_power_of_two();
        let mut x = r;
        loop {
            x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15 | 1) & (m - 1);
            if x < n {
                return x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The invariants every replay must satisfy, whatever the policy.
    fn assert_stats_invariants(trace: &[u64], capacity: usize, s: Stats) {
        let distinct = trace.iter().collect::<std::collections::HashSet<_>>().len() as u64;
        assert_eq!(s.hits + s.misses, trace.len() as u64);
        assert!(s.misses >= distinct, "every domain misses once: {s:?}");
        assert_eq!(
            s.evictions,
            s.misses - distinct.min(capacity as u64).min(s.misses)
        );
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut p = Lru::new(3);
        p.bind(0, 10);
        p.bind(1, 11);
        p.bind(2, 12);
        p.touch(0);
        assert_eq!(p.victim(&[0, 1, 2]), 1);
        p.touch(1);
        assert_eq!(p.victim(&[0, 1, 2]), 2);
        assert_eq!(p.victim(&[0, 1]), 0, "only among candidates");
    }

    #[test]
    fn hinted_predicts_unannounced_reuse_from_the_last_gap() {
        let mut p = Hinted::new(4);
        let advance = |p: &mut Hinted, n: u64| (0..n).for_each(|_| p.touch(3));
        p.bind(3, 99); // a filler domain whose uses move the clock
        p.bind(0, 10);
        advance(&mut p, 30);
        p.touch(0); // 10 returns after ~31: predicted back ~31 later
        p.bind(1, 11);
        advance(&mut p, 60);
        p.touch(1); // 11 returns after ~61: predicted back ~61 later
        p.bind(2, 12); // seen once
        assert_eq!(p.victim(&[0, 1, 2]), 2, "the once-seen domain goes first");
        assert_eq!(p.victim(&[0, 1]), 1, "then the furthest predicted reuse");
        p.hint(&[11]);
        assert_eq!(
            p.victim(&[0, 1]),
            0,
            "an announced use beats any prediction"
        );
    }

    #[test]
    fn hinted_counts_a_burst_as_one_reference() {
        let mut p = Hinted::new(4);
        p.bind(3, 99);
        p.bind(0, 10);
        p.bind(1, 11);
        for _ in 0..5 {
            p.touch(0); // a burst: gaps of 1-2 accesses
            p.touch(1);
        }
        // Both were only ever seen in one burst: no gap between references yet.
        assert_eq!(p.predicted_use_of(0), u64::MAX);
        for _ in 0..40 {
            p.touch(3);
        }
        p.touch(0); // a second burst of 10, 40 accesses later
        assert!(p.predicted_use_of(0) < u64::MAX);
        assert_eq!(p.victim(&[0, 1]), 1, "11 had no second burst");
    }

    #[test]
    fn hinted_evicts_the_furthest_announced_and_prefers_unannounced() {
        let mut p = Hinted::new(3);
        p.bind(0, 10);
        p.bind(1, 11);
        p.bind(2, 12);
        p.hint(&[11, 12, 10]);
        assert_eq!(p.victim(&[0, 1, 2]), 0, "10 is needed last");
        p.hint(&[11, 12]);
        assert_eq!(p.victim(&[0, 1, 2]), 0, "10 is not needed at all");
        p.hint(&[10, 11, 12]);
        assert_eq!(p.victim(&[0, 1]), 1, "only among candidates");
    }

    #[test]
    fn opt_on_a_scan_keeps_most_of_the_loop_resident() {
        // Loop of 20 over 15 keys: LRU misses every access; OPT keeps 14 of the loop.
        let t = trace::scan(20, 2000);
        let lru = simulate(&t, 15, PolicyKind::Lru, 0);
        let opt = simulate(&t, 15, PolicyKind::Opt, 0);
        assert_eq!(lru.misses, 2000);
        assert!(opt.misses < 2000 / 3, "{opt:?}");
        let hinted = simulate(&t, 15, PolicyKind::Hinted, 32);
        assert!(
            hinted.misses <= opt.misses + opt.misses / 10,
            "{hinted:?} vs {opt:?}"
        );
    }

    #[test]
    fn every_policy_fits_a_small_working_set() {
        let t = trace::uniform(10, 1000, 7);
        for kind in [PolicyKind::Lru, PolicyKind::Hinted, PolicyKind::Opt] {
            assert_eq!(simulate(&t, 15, kind, 8).misses, 10, "{kind:?}");
        }
    }

    #[test]
    fn zipf_is_skewed_and_deterministic() {
        let a = trace::zipf(1000, 20_000, 0.99, 1);
        assert_eq!(a, trace::zipf(1000, 20_000, 0.99, 1));
        let mut counts = HashMap::new();
        for d in &a {
            *counts.entry(*d).or_insert(0u32) += 1;
        }
        let mut c: Vec<u32> = counts.into_values().collect();
        c.sort_unstable_by(|x, y| y.cmp(x));
        assert!(
            c[0] > 20 * c[c.len() / 2],
            "top {} vs median {}",
            c[0],
            c[c.len() / 2]
        );
    }

    proptest! {
        #[test]
        fn opt_is_a_lower_bound(trace in proptest::collection::vec(0u64..24, 1..400), cap in 1usize..16) {
            let opt = simulate(&trace, cap, PolicyKind::Opt, 0);
            assert_stats_invariants(&trace, cap, opt);
            for kind in [PolicyKind::Lru, PolicyKind::Hinted] {
                let s = simulate(&trace, cap, kind, 4);
                assert_stats_invariants(&trace, cap, s);
                prop_assert!(s.misses >= opt.misses, "{kind:?} {s:?} beat OPT {opt:?}");
            }
        }

        #[test]
        fn hinted_with_the_whole_future_is_optimal(trace in proptest::collection::vec(0u64..20, 1..300), cap in 1usize..16) {
            let opt = simulate(&trace, cap, PolicyKind::Opt, 0);
            let full = simulate(&trace, cap, PolicyKind::Hinted, trace.len());
            prop_assert_eq!(full.misses, opt.misses);
        }
    }
}
