//! A pool of instance slots.
//!
//! A slot is an mpkvirt domain of a fixed size. [`Pool::acquire`] gives an application a
//! slot: one it used before and left warm (its contents as it left them: warm state within
//! its own instance), else a clean one, else a new one while the pool is below its limit,
//! else the least recently released warm slot of another application, reset first. A slot
//! never passes from one application to another without [`Domain::reset`]: its pages are
//! given back to the system and read as zero after, and its heap is empty. Nothing is
//! mapped or unmapped on `acquire` and `release` once the slots exist (reset is an
//! `madvise`).
//!
//! [`Pool::reclaim`] resets idle warm slots beyond a number the host keeps, oldest first —
//! what the host does under memory pressure.
//!
//! Resets are kept off the invocation's path where they can be: a slot released for reset
//! waits in a dirty list, and [`Pool::to_clean`] hands dirty slots (then the warm slots
//! released longest ago) to a cleaner that resets them outside the pool's lock
//! ([`Pool::cleaned`] takes them back clean). `acquire` resets a slot itself only when no
//! clean one is left.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use mpkvirt::{Backend, Domain, DomainOptions, Manager};

use crate::sched::policy::AppId;

/// A slot lent to an invocation.
pub struct Slot<B: Backend> {
    domain: Domain<B>,
    app: AppId,
    warm: bool,
}

impl<B: Backend> Slot<B> {
    /// The slot's domain (the instance's memory).
    pub fn domain(&self) -> &Domain<B> {
        &self.domain
    }

    /// The application it serves.
    pub fn app(&self) -> AppId {
        self.app
    }

    /// Whether it comes warm from the same application (its memory as that application's
    /// last invocation left it); otherwise it is new or reset (empty heap, pages reading 0).
    pub fn is_warm(&self) -> bool {
        self.warm
    }
}

impl<B: Backend> fmt::Debug for Slot<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("domain", &self.domain.id())
            .field("app", &self.app)
            .finish()
    }
}

/// What a released slot keeps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Release {
    /// Its contents, for the same application's next invocation.
    Warm,
    /// Nothing: it is reset now.
    Reset,
}

/// Why no slot could be had.
#[derive(Debug)]
pub enum PoolError {
    /// Every slot is in use and the pool is at its limit.
    Exhausted {
        /// The limit.
        slots: usize,
    },
    /// mpkvirt refused (creating or resetting a domain).
    Domain(mpkvirt::Error),
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Exhausted { slots } => write!(f, "all {slots} instance slots are in use"),
            PoolError::Domain(e) => write!(f, "instance slot: {e}"),
        }
    }
}

impl std::error::Error for PoolError {}

/// Counters of a pool.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PoolStats {
    /// Slots made.
    pub created: usize,
    /// Acquisitions served by a warm slot of the same application.
    pub warm_hits: u64,
    /// Slots reset (on release, when taken from another application, or reclaimed).
    pub resets: u64,
}

/// A pool of instance slots of one size.
pub struct Pool<B: Backend> {
    mgr: Manager<B>,
    slot_size: usize,
    limit: usize,
    /// Warm slots by application, each list oldest first.
    warm: HashMap<AppId, VecDeque<(u64, Domain<B>)>>,
    /// Clean slots.
    clean: Vec<Domain<B>>,
    /// Slots released for reset, not reset yet (never lent as they are).
    dirty: Vec<Domain<B>>,
    /// Slots out with a cleaner.
    cleaning: usize,
    /// Release counter (the order in which warm slots were released).
    clock: u64,
    in_use: usize,
    stats: PoolStats,
}

impl<B: Backend> fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("slot_size", &self.slot_size)
            .field("limit", &self.limit)
            .field("in_use", &self.in_use)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Pool<B> {
    /// A pool of at most `limit` slots of `slot_size` bytes in `mgr`, `prefill` of them made
    /// now.
    ///
    /// # Errors
    ///
    /// When mpkvirt cannot create the prefilled domains.
    pub fn new(
        mgr: Manager<B>,
        slot_size: usize,
        prefill: usize,
        limit: usize,
    ) -> Result<Pool<B>, PoolError> {
        let mut pool = Pool {
            mgr,
            slot_size,
            limit,
            warm: HashMap::new(),
            clean: Vec::new(),
            dirty: Vec::new(),
            cleaning: 0,
            clock: 0,
            in_use: 0,
            stats: PoolStats::default(),
        };
        for _ in 0..prefill.min(limit) {
            let d = pool.make()?;
            pool.clean.push(d);
        }
        Ok(pool)
    }

    fn make(&mut self) -> Result<Domain<B>, PoolError> {
        let d = self
            .mgr
            .create_domain(DomainOptions::reserve(self.slot_size))
            .map_err(PoolError::Domain)?;
        self.stats.created += 1;
        Ok(d)
    }

    /// A slot for `app` (see the module docs for which).
    ///
    /// # Errors
    ///
    /// [`PoolError::Exhausted`] when every slot is in use at the limit; [`PoolError::Domain`]
    /// when mpkvirt refuses to make or reset one.
    pub fn acquire(&mut self, app: AppId) -> Result<Slot<B>, PoolError> {
        if let Some(list) = self.warm.get_mut(&app)
            && let Some((_, d)) = list.pop_back()
        {
            if list.is_empty() {
                self.warm.remove(&app);
            }
            self.stats.warm_hits += 1;
            return Ok(self.lend(d, app, true));
        }
        if let Some(d) = self.clean.pop() {
            return Ok(self.lend(d, app, false));
        }
        if self.stats.created < self.limit {
            let d = self.make()?;
            return Ok(self.lend(d, app, false));
        }
        // A slot released for reset, else the warm slot released longest ago, of another
        // application: reset, then lent.
        let Some(d) = self.dirty.pop().or_else(|| self.take_oldest_warm()) else {
            return Err(PoolError::Exhausted { slots: self.limit });
        };
        let d = self.reset(d)?;
        Ok(self.lend(d, app, false))
    }

    /// The warm slot released longest ago, taken off its application's list.
    fn take_oldest_warm(&mut self) -> Option<Domain<B>> {
        let (_, app) = self
            .warm
            .iter()
            .filter_map(|(a, list)| list.front().map(|(t, _)| (*t, *a)))
            .min()?;
        let list = self.warm.get_mut(&app)?;
        let (_, d) = list.pop_front()?;
        if list.is_empty() {
            self.warm.remove(&app);
        }
        Some(d)
    }

    /// Resets `d` for another application. A slot whose reset fails is dropped (its domain
    /// destroyed), never lent again: it may still hold the previous application's data.
    fn reset(&mut self, d: Domain<B>) -> Result<Domain<B>, PoolError> {
        if let Err(e) = d.reset() {
            self.stats.created -= 1;
            return Err(PoolError::Domain(e));
        }
        self.stats.resets += 1;
        Ok(d)
    }

    fn lend(&mut self, domain: Domain<B>, app: AppId, warm: bool) -> Slot<B> {
        self.in_use += 1;
        Slot { domain, app, warm }
    }

    /// Takes `slot` back, warm for its application or reset.
    ///
    /// # Errors
    ///
    /// When the reset fails; the slot is then dropped (its domain destroyed) rather than
    /// lent again with another invocation's data.
    pub fn release(&mut self, slot: Slot<B>, how: Release) -> Result<(), PoolError> {
        self.in_use -= 1;
        match how {
            Release::Warm => {
                self.clock += 1;
                self.warm
                    .entry(slot.app)
                    .or_default()
                    .push_back((self.clock, slot.domain));
            }
            // (Reset by a cleaner, or by the acquisition that needs it.)
            Release::Reset => self.dirty.push(slot.domain),
        }
        Ok(())
    }

    /// Slots for a cleaner to reset, at most `max`: the dirty ones, then — only once the pool
    /// is at its limit, where an acquisition would otherwise reset one on its path — warm
    /// ones released longest ago, until `want` slots are clean (counting those out for
    /// cleaning). Reset each with `Domain::reset` outside the pool's lock and give it back
    /// with [`Pool::cleaned`]. Below the limit, [`Pool::prefill`] makes clean slots instead,
    /// and warm ones stay warm.
    pub fn to_clean(&mut self, want: usize, max: usize) -> Vec<Domain<B>> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(d) = self.dirty.pop() else { break };
            out.push(d);
        }
        while self.stats.created >= self.limit
            && out.len() < max
            && self.clean.len() + self.cleaning + out.len() < want
        {
            let Some(d) = self.take_oldest_warm() else {
                break;
            };
            out.push(d);
        }
        self.cleaning += out.len();
        out
    }

    /// Makes new slots, at most `max`, while fewer than `want` are clean and the pool is
    /// below its limit (so that an acquisition finds one without mapping it); returns how
    /// many it made.
    ///
    /// # Errors
    ///
    /// When mpkvirt cannot create a domain (those made before stay).
    pub fn prefill(&mut self, want: usize, max: usize) -> Result<usize, PoolError> {
        let mut made = 0;
        while made < max && self.stats.created < self.limit && self.clean.len() < want {
            let d = self.make()?;
            self.clean.push(d);
            made += 1;
        }
        Ok(made)
    }

    /// Takes back a slot from [`Pool::to_clean`], with the result of its reset.
    ///
    /// # Errors
    ///
    /// When the reset failed: the slot is dropped (its domain destroyed), never lent again.
    pub fn cleaned(&mut self, d: Domain<B>, reset: mpkvirt::Result<()>) -> Result<(), PoolError> {
        self.cleaning -= 1;
        if let Err(e) = reset {
            self.stats.created -= 1;
            return Err(PoolError::Domain(e));
        }
        self.stats.resets += 1;
        self.clean.push(d);
        Ok(())
    }

    /// Slots waiting for a reset (released dirty or out with a cleaner).
    pub fn dirty(&self) -> usize {
        self.dirty.len() + self.cleaning
    }

    /// Clean slots ready to lend.
    pub fn clean(&self) -> usize {
        self.clean.len()
    }

    /// Resets idle warm slots, oldest first, until at most `keep` stay warm; returns how
    /// many it reset.
    ///
    /// # Errors
    ///
    /// When a reset fails (that slot is dropped; those reset before stay clean).
    pub fn reclaim(&mut self, keep: usize) -> Result<usize, PoolError> {
        let mut done = 0;
        while let Some(d) = self.dirty.pop() {
            let d = self.reset(d)?;
            self.clean.push(d);
            done += 1;
        }
        let warm: usize = self.warm.values().map(VecDeque::len).sum();
        let before = done;
        while warm - (done - before) > keep {
            let d = self.take_oldest_warm().expect("counted above");
            let d = self.reset(d)?;
            self.clean.push(d);
            done += 1;
        }
        Ok(done)
    }

    /// Slots lent now.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }
}
