//! The run queue's order: which waiting invocation runs next.
//!
//! Three orders, one interface ([`RunQueue`]):
//!
//! - [`Order::Fifo`] — arrival order, the baseline;
//! - [`Order::ShortestExpected`] — the invocation whose application ran shortest recently
//!   first (an exponentially weighted mean of its run times, [`AppStats`]): short functions
//!   do not wait behind long ones (the shortest-job-first idea, with the job's length
//!   predicted from its application's history);
//! - [`Order::LeastAttained`] — the invocation that has run least so far first (least
//!   attained service): new arrivals before ones preempted after a long run, with no
//!   prediction at all.
//!
//! The two non-FIFO orders starve long invocations under a steady stream of short ones, so
//! every order is bounded by age: an invocation that has waited `max_wait` or longer runs
//! before anything younger, oldest first. Time is a number of nanoseconds passed in by the
//! caller; nothing here reads a clock.
//!
//! The queue also says which applications come next ([`RunQueue::upcoming`]): the scheduler
//! hands them to mpkvirt's key cache (hint and prefetch) so their keys are bound before they
//! run.

use std::collections::{BTreeMap, HashMap};

/// An application, as the host numbers them.
pub type AppId = u32;

/// Which order a [`RunQueue`] keeps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    /// Arrival order.
    Fifo,
    /// Shortest expected run time (of the application, recently) first.
    ShortestExpected,
    /// Least run time attained so far first.
    LeastAttained,
}

/// What the scheduler learned of each application's run times.
#[derive(Clone, Debug, Default)]
pub struct AppStats {
    mean_ns: HashMap<AppId, u64>,
}

impl AppStats {
    /// The weight of the newest run in the mean, as a shift: 1/8.
    const SHIFT: u32 = 3;

    /// Records that an invocation of `app` ran `ns` nanoseconds (in total, when it ended).
    pub fn record(&mut self, app: AppId, ns: u64) {
        let mean = self.mean_ns.entry(app).or_insert(ns);
        // mean += (ns - mean) / 8, in integers without overflow.
        *mean = if ns >= *mean {
            *mean + ((ns - *mean) >> Self::SHIFT)
        } else {
            *mean - ((*mean - ns) >> Self::SHIFT)
        };
    }

    /// The expected run time of `app` (0 for one never seen: new applications go first).
    pub fn expected(&self, app: AppId) -> u64 {
        self.mean_ns.get(&app).copied().unwrap_or(0)
    }

    /// Forgets `app` (it was unloaded).
    pub fn forget(&mut self, app: AppId) {
        self.mean_ns.remove(&app);
    }
}

/// A waiting invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task<T> {
    /// Its application.
    pub app: AppId,
    /// When it (last) joined the queue, in the caller's nanoseconds.
    pub queued_at: u64,
    /// How long it has run so far (preempted invocations come back with more).
    pub attained_ns: u64,
    /// What the scheduler runs.
    pub payload: T,
}

/// A run queue in one [`Order`], bounded by age.
#[derive(Debug)]
pub struct RunQueue<T> {
    order: Order,
    max_wait: u64,
    next_seq: u64,
    /// Every task by arrival (sequence number).
    by_arrival: BTreeMap<u64, Task<T>>,
    /// `(key, seq)` of every task, in the order's sense (empty for FIFO).
    by_key: BTreeMap<(u64, u64), ()>,
    /// The key each task was filed under (to remove it from `by_key`).
    keys: HashMap<u64, u64>,
}

impl<T> RunQueue<T> {
    /// An empty queue in `order`, where no task waits much longer than `max_wait_ns` while
    /// younger ones run.
    pub fn new(order: Order, max_wait_ns: u64) -> RunQueue<T> {
        RunQueue {
            order,
            max_wait: max_wait_ns,
            next_seq: 0,
            by_arrival: BTreeMap::new(),
            by_key: BTreeMap::new(),
            keys: HashMap::new(),
        }
    }

    /// The queue's order.
    pub fn order(&self) -> Order {
        self.order
    }

    /// Tasks waiting.
    pub fn len(&self) -> usize {
        self.by_arrival.len()
    }

    /// Whether no task waits.
    pub fn is_empty(&self) -> bool {
        self.by_arrival.is_empty()
    }

    /// Adds `task`; `stats` gives the expected run times.
    pub fn push(&mut self, task: Task<T>, stats: &AppStats) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(key) = self.key(&task, stats) {
            self.by_key.insert((key, seq), ());
            self.keys.insert(seq, key);
        }
        self.by_arrival.insert(seq, task);
    }

    /// Takes the task to run next at time `now`: the oldest if it has waited `max_wait` or
    /// longer, else the first in the queue's order (ties: the oldest).
    pub fn pop(&mut self, now: u64) -> Option<Task<T>> {
        let (&oldest, first) = self.by_arrival.iter().next()?;
        let seq = if now.saturating_sub(first.queued_at) >= self.max_wait {
            oldest
        } else {
            match self.by_key.keys().next() {
                Some(&(_, seq)) => seq,
                None => oldest,
            }
        };
        self.remove(seq)
    }

    /// Up to `n` tasks, in the order they would run if nothing changed (ignoring the age
    /// bound): whose domains the key cache should keep, or bind, next.
    pub fn peek(&self, n: usize) -> Vec<&Task<T>> {
        match self.order {
            Order::Fifo => self.by_arrival.values().take(n).collect(),
            _ => self
                .by_key
                .keys()
                .take(n)
                .map(|(_, seq)| &self.by_arrival[seq])
                .collect(),
        }
    }

    /// The applications of [`RunQueue::peek`]'s tasks.
    pub fn upcoming(&self, n: usize) -> Vec<AppId> {
        self.peek(n).into_iter().map(|t| t.app).collect()
    }

    fn key(&self, task: &Task<T>, stats: &AppStats) -> Option<u64> {
        match self.order {
            Order::Fifo => None,
            Order::ShortestExpected => Some(stats.expected(task.app)),
            Order::LeastAttained => Some(task.attained_ns),
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Task<T>> {
        if let Some(key) = self.keys.remove(&seq) {
            self.by_key.remove(&(key, seq));
        }
        self.by_arrival.remove(&seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A script: per step, push a task of `app` with `attained` (Some) or pop (None), and
    /// the clock advance before the step.
    fn script() -> impl Strategy<Value = Vec<(Option<(AppId, u64)>, u64)>> {
        proptest::collection::vec(
            (proptest::option::of((0u32..6, 0u64..1_000)), 0u64..300),
            0..200,
        )
    }

    fn orders() -> impl Strategy<Value = Order> {
        prop_oneof![
            Just(Order::Fifo),
            Just(Order::ShortestExpected),
            Just(Order::LeastAttained)
        ]
    }

    fn stats() -> AppStats {
        let mut s = AppStats::default();
        for app in 0..6 {
            s.record(app, u64::from(app) * 100);
        }
        s
    }

    proptest! {
        /// Every task pushed is popped exactly once, whatever the order; pops of an empty
        /// queue give nothing.
        #[test]
        fn nothing_is_lost_or_duplicated(order in orders(), steps in script(), max_wait in 0u64..2_000) {
            let stats = stats();
            let mut q = RunQueue::new(order, max_wait);
            let (mut now, mut pushed, mut popped) = (0u64, 0u64, Vec::new());
            for (step, dt) in steps {
                now += dt;
                match step {
                    Some((app, attained)) => {
                        q.push(Task { app, queued_at: now, attained_ns: attained, payload: pushed }, &stats);
                        pushed += 1;
                    }
                    None => {
                        let empty = q.is_empty();
                        let t = q.pop(now);
                        prop_assert_eq!(t.is_none(), empty);
                        popped.extend(t.map(|t| t.payload));
                    }
                }
            }
            while let Some(t) = q.pop(now) {
                popped.push(t.payload);
            }
            popped.sort_unstable();
            prop_assert_eq!(popped, (0..pushed).collect::<Vec<_>>());
        }

        /// Which task a pop takes: the oldest when it has waited `max_wait`; otherwise FIFO's
        /// oldest, or the smallest key (expected time, attained time) with the oldest first
        /// among equals.
        #[test]
        fn pop_takes_what_the_order_says(order in orders(), steps in script(), max_wait in 0u64..2_000) {
            let stats = stats();
            let mut q = RunQueue::new(order, max_wait);
            let mut model: Vec<(u64, Task<u64>)> = Vec::new(); // (seq, task) in arrival order
            let (mut now, mut seq) = (0u64, 0u64);
            for (step, dt) in steps {
                now += dt;
                match step {
                    Some((app, attained)) => {
                        let t = Task { app, queued_at: now, attained_ns: attained, payload: seq };
                        q.push(t.clone(), &stats);
                        model.push((seq, t));
                        seq += 1;
                    }
                    None => {
                        let got = q.pop(now);
                        let want = if model.is_empty() {
                            None
                        } else {
                            let i = if now - model[0].1.queued_at >= max_wait {
                                0
                            } else {
                                let key = |t: &Task<u64>| match order {
                                    Order::Fifo => 0,
                                    Order::ShortestExpected => stats.expected(t.app),
                                    Order::LeastAttained => t.attained_ns,
                                };
                                (0..model.len()).min_by_key(|&i| (key(&model[i].1), model[i].0)).unwrap()
                            };
                            Some(model.remove(i).1)
                        };
                        prop_assert_eq!(got, want);
                    }
                }
            }
        }
    }

    #[test]
    fn the_mean_follows_recent_runs() {
        let mut s = AppStats::default();
        assert_eq!(s.expected(1), 0, "an application never seen goes first");
        s.record(1, 800);
        assert_eq!(s.expected(1), 800);
        for _ in 0..100 {
            s.record(1, 80);
        }
        assert!(s.expected(1) < 100, "{}", s.expected(1));
        s.record(1, u64::MAX);
        assert!(s.expected(1) > 80, "no overflow");
        s.forget(1);
        assert_eq!(s.expected(1), 0);
    }

    #[test]
    fn upcoming_lists_the_next_applications_in_order() {
        let stats = stats();
        let mut q = RunQueue::new(Order::ShortestExpected, u64::MAX);
        for (i, app) in [5, 3, 4, 1].into_iter().enumerate() {
            q.push(
                Task {
                    app,
                    queued_at: 0,
                    attained_ns: 0,
                    payload: i,
                },
                &stats,
            );
        }
        assert_eq!(q.upcoming(3), [1, 3, 4]);
        let mut f = RunQueue::new(Order::Fifo, 0);
        for (i, app) in [5, 3, 4].into_iter().enumerate() {
            f.push(
                Task {
                    app,
                    queued_at: 0,
                    attained_ns: 0,
                    payload: i,
                },
                &stats,
            );
        }
        assert_eq!(f.upcoming(10), [5, 3, 4]);
    }
}
