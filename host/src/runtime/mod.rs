//! The runtime: applications, workers, and invocations that run sandboxed in instances.
//!
//! A [`Host`] owns an mpkvirt manager, a pool of instance slots (`instance::pool`), worker
//! threads and a watchdog. [`Host::invoke`] (or [`Host::submit`]) queues a request for an
//! application; a worker takes it, lends the application an instance slot, and runs the
//! function *inside the slot's sandbox* (`mpkvirt::sandbox`): on a stack in the slot's
//! domain, with a view of that domain only, which the tenant can leave only by yielding back
//! to the worker. Everything the tenant asks of the host — memory, the log, the clock, random
//! bytes, another function — is a yield of a request the worker validates against the
//! instance's domain and serves in its own view (`tenant.rs` has the tenant side).
//! [`Host::invoke_here`] runs an invocation on the calling thread instead.
//!
//! Each worker keeps its invocations as tasks in a run queue (`sched::policy`: FIFO, shortest
//! expected, least attained service). The watchdog preempts a native function that ran a
//! whole quantum (`sandbox::signal`: it yields, and continues where it was when run again);
//! the worker then runs what the order says next. Built-in functions are the host's own code
//! and run to their end.
//!
//! An invocation ends with the function's response or an [`InvokeError`]: the entry's
//! failure code, a fault (any of SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT raised
//! inside a native function's sandbox: the handler resumes the context at a stub that
//! yields, and the worker never runs it again), the deadline (checked when the watchdog
//! preempts it and after each host call), a spent memory quota (the allocation returns NULL;
//! what the tenant does next is its business), a host call with a pointer outside the
//! instance, or a panic in a built-in function. The slot of an invocation that ended badly
//! is reset before it is lent again, by the watchdog, which keeps a stock of clean slots
//! (`HostConfig::clean_slots`) off the invocations' path.
//!
//! The host's heap and its threads' stacks are in the host domain (`crate::heap`,
//! `sched::green::spawn_on_host_stack`), which native functions' sandboxes do not reach;
//! built-in functions run in shared sandboxes (`Manager::sandbox_run_shared`), which do, and
//! are neither preempted nor abandoned. A native function's `malloc` family is an allocator
//! in its instance (`tenant_heap.rs`).
//!
//! Without PKU (the emulated backend) a domain's rights are process-wide: two tenants running
//! at once on two workers would see each other's instances. The runtime then runs **one
//! worker** — tenant code is serialized, `invoke_here` included — and says so
//! ([`Host::arrangement`], and a line on stderr at start).
//!
//! Not yet here (issue 9): the rest of the host's state out of key 0 — statics, thread-local
//! storage, the stacks of threads the host does not start, signal frames on the 6.1 kernel
//! (ARCHITECTURE.md, *The host runtime*, lists each).

pub(crate) mod tenant;
pub(crate) mod tenant_heap;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use mpkvirt::{BackendKind, Domain, Machine, Manager, Rights};

use crate::app::native::NativeFunction;
use crate::instance::pool::{Pool, Release, Slot};
use crate::sched::green::{Exited, spawn_on_host_stack};
use crate::sched::policy::{self, AppId, AppStats, Order, RunQueue};
use tenant::monotonic_ns;

/// A built-in function: request bytes in, response bytes (or an error message) out. It runs
/// inside the instance's sandbox like a native tenant, so it may use only its argument, the
/// global allocator and pure code.
pub type Builtin = tenant::BuiltinFn;

/// An application's code.
#[derive(Clone)]
pub enum Code {
    /// A Rust function registered with the host.
    Builtin(Arc<Builtin>),
    /// A validated, linked shared object (`app::native`).
    Native(Arc<NativeFunction>),
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Builtin(_) => f.write_str("Builtin"),
            Code::Native(n) => f.debug_tuple("Native").field(n).finish(),
        }
    }
}

/// An application's limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall-clock time an invocation may run before it is ended.
    pub timeout: Duration,
    /// Bytes the tenant may hold from `alloc` at once (at most the slot's size).
    pub memory: usize,
    /// Invocations that may run at once; more are refused ([`InvokeError::Overloaded`]).
    pub concurrency: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            timeout: Duration::from_secs(1),
            memory: 256 << 10,
            concurrency: 64,
        }
    }
}

/// An application: a name, its code, its limits.
#[derive(Clone, Debug)]
pub struct App {
    /// The name invocations use.
    pub name: String,
    /// Its code.
    pub code: Code,
    /// Its limits.
    pub limits: Limits,
}

/// How a host is set up.
#[derive(Clone, Copy, Debug)]
pub struct HostConfig {
    /// Worker threads (default: the number of CPUs; always 1 on the emulated backend).
    pub workers: Option<usize>,
    /// Bytes of each instance slot (its stack, request, heap).
    pub slot_size: usize,
    /// Most slots at once.
    pub slots: usize,
    /// Bytes of each invocation's stack (inside its slot).
    pub stack_size: usize,
    /// How long a function runs before a worker with other work preempts it (`None`: it
    /// runs to its end or its deadline).
    pub quantum: Option<Duration>,
    /// The order in which a worker runs what it has (`sched::policy`).
    pub order: Order,
    /// The longest a task waits behind others that the order prefers.
    pub max_wait: Duration,
    /// The key cache's eviction policy. `Hinted` (the default): each worker names the
    /// domains of the tasks it runs next, and an eviction takes the domain used furthest
    /// ahead (or not named) instead of the least recently used one.
    pub policy: mpkvirt::PolicyKind,
    /// Whether the workers name the domains of the tasks they run next to the key cache
    /// (off: only for measuring what the hints are worth).
    pub hints: bool,
    /// Clean instance slots the host keeps ready: the watchdog thread makes them (below the
    /// pool's limit) or resets released and, at the limit, idle ones in the background, so
    /// that a new instance finds one without a mapping or a reset on its invocation's path.
    pub clean_slots: usize,
    /// **Measurement only, never for serving**: on the emulated backend, run the workers in
    /// parallel although rights are process-wide there (tenants are not isolated from each
    /// other; the host says so at start). For measuring scheduling without PKU.
    pub measure_without_isolation: bool,
    /// **Measurement only, never for serving**: every instance is open to every thread
    /// (process-wide rights, which keep a key each: for a few instances only), so views
    /// change no protection. On the emulated backend this takes the `mprotect`s out of the
    /// invocation path and leaves what PKU hardware pays in their place: the gate calls
    /// (and the switches, copies and bookkeeping). The host says so at start.
    pub measure_views_unprotected: bool,
}

impl HostConfig {
    /// The watchdog's period: the quantum, or (without preemption) the granularity of
    /// deadlines.
    fn tick(&self) -> Duration {
        self.quantum.unwrap_or(Duration::from_millis(1))
    }
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            workers: None,
            slot_size: 1 << 20,
            slots: 1024,
            stack_size: 128 << 10,
            quantum: Some(Duration::from_millis(1)),
            order: Order::Fifo,
            max_wait: Duration::from_millis(50),
            policy: mpkvirt::PolicyKind::Hinted,
            hints: true,
            clean_slots: 8,
            measure_without_isolation: false,
            measure_views_unprotected: false,
        }
    }
}

/// Why an invocation produced no response.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum InvokeError {
    /// No application has this name.
    UnknownFunction(String),
    /// The application runs as many invocations as its limit allows.
    Overloaded {
        /// The limit.
        limit: usize,
    },
    /// The function returned a failure code (and, for a built-in, its message).
    Failed {
        /// The entry's code.
        code: i64,
        /// A built-in's message.
        message: String,
    },
    /// The response was not memory of the instance.
    BadResponse,
    /// The tenant raised this signal (a fault, `abort()`, ...).
    Fault {
        /// The signal's number.
        signal: i32,
    },
    /// It ran past its time limit.
    Deadline,
    /// A built-in function panicked.
    Panicked,
    /// A host call the host refused (a pointer outside the instance, a free of memory it did
    /// not allocate, ...).
    BadHostCall(&'static str),
    /// No instance slot (the pool is exhausted) or mpkvirt refused the instance.
    Instance(String),
    /// The host is shutting down.
    ShuttingDown,
}

impl fmt::Display for InvokeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvokeError::UnknownFunction(n) => write!(f, "no function named {n:?}"),
            InvokeError::Overloaded { limit } => {
                write!(
                    f,
                    "the function runs {limit} invocations already (its limit)"
                )
            }
            InvokeError::Failed { code, message } => {
                write!(f, "the function failed with code {code}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            InvokeError::BadResponse => f.write_str("the function's response is not its memory"),
            InvokeError::Fault { signal } => {
                write!(f, "the function crashed (signal {signal})")
            }
            InvokeError::Deadline => f.write_str("the function ran past its time limit"),
            InvokeError::Panicked => f.write_str("the function panicked"),
            InvokeError::BadHostCall(why) => write!(f, "refused host call: {why}"),
            InvokeError::Instance(e) => write!(f, "no instance: {e}"),
            InvokeError::ShuttingDown => f.write_str("the host is shutting down"),
        }
    }
}

impl std::error::Error for InvokeError {}

/// Why a host could not start.
#[derive(Debug)]
pub struct StartError(String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot start the host: {}", self.0)
    }
}

impl std::error::Error for StartError {}

/// How tenant code is placed on workers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Arrangement {
    /// PKU: rights are per thread, so each worker runs its own tenant.
    Parallel {
        /// Worker threads.
        workers: usize,
    },
    /// No PKU: rights are process-wide, so one worker runs tenant code, one invocation at a
    /// time.
    Serialized,
    /// `HostConfig::measure_without_isolation`: parallel workers, tenants not isolated.
    Unisolated {
        /// Worker threads.
        workers: usize,
    },
}

impl Arrangement {
    /// Worker threads.
    pub fn workers(self) -> usize {
        match self {
            Arrangement::Parallel { workers } | Arrangement::Unisolated { workers } => workers,
            Arrangement::Serialized => 1,
        }
    }
}

impl fmt::Display for Arrangement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arrangement::Parallel { workers } => {
                write!(f, "{workers} workers, each running its own tenant (PKU: rights per thread)")
            }
            Arrangement::Serialized => f.write_str(
                "one worker, one tenant at a time (no PKU: the emulated backend's rights are process-wide)",
            ),
            Arrangement::Unisolated { workers } => write!(
                f,
                "{workers} workers, tenants NOT isolated (a measurement mode, never for serving)"
            ),
        }
    }
}

struct AppEntry {
    id: AppId,
    app: App,
    running: AtomicUsize,
}

impl AppEntry {
    /// The read-only segments of its code (none for a built-in).
    fn image(&self) -> &[(usize, usize)] {
        match &self.app.code {
            Code::Native(n) => n.read_only(),
            Code::Builtin(_) => &[],
        }
    }
}

/// Where an invocation's outcome goes: what the worker calls with it when it ends.
type Reply = Box<dyn FnOnce(Result<Vec<u8>, InvokeError>) + Send>;

struct Job {
    app: Admitted,
    request: Vec<u8>,
    reply: Reply,
}

/// An invocation counted against its application's concurrency limit until dropped.
struct Admitted(Arc<AppEntry>);

impl Admitted {
    fn new(app: Arc<AppEntry>) -> Result<Admitted, InvokeError> {
        let limit = app.app.limits.concurrency;
        if app.running.fetch_add(1, Ordering::AcqRel) >= limit {
            app.running.fetch_sub(1, Ordering::AcqRel);
            return Err(InvokeError::Overloaded { limit });
        }
        Ok(Admitted(app))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Inner {
    mgr: Manager<Machine>,
    config: HostConfig,
    apps: RwLock<HashMap<String, Arc<AppEntry>>>,
    pool: Mutex<Pool<Machine>>,
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    stop: AtomicBool,
    /// Set once the workers have ended: the watchdog ends too.
    watch_stop: AtomicBool,
    log: Mutex<VecDeque<String>>,
    /// Held while tenant code runs, when tenants must run one at a time (no PKU).
    serial: Option<Mutex<()>>,
    /// The next application id.
    next_app: std::sync::atomic::AtomicU32,
    /// The threads that run tenant code, for the watchdog.
    watch: Arc<Watch>,
    /// The host's part of each instance, kept while the slot stays warm.
    layouts: Mutex<HashMap<mpkvirt::DomainId, Layout>>,
    /// Slots opened to every thread (`HostConfig::measure_views_unprotected`).
    opened: Mutex<std::collections::HashSet<mpkvirt::DomainId>>,
}

/// Lines of tenant log kept (oldest dropped first).
const LOG_LINES: usize = 1000;
/// Nested invocations (`invoke` from a function) deeper than this are refused.
const MAX_DEPTH: usize = 4;

/// A running host.
pub struct Host {
    inner: Arc<Inner>,
    arrangement: Arrangement,
    workers: Vec<Arc<Exited>>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("arrangement", &self.arrangement)
            .finish_non_exhaustive()
    }
}

/// What tenants may write of the process's common (key-0) memory: statics, the stacks and
/// thread-local storage of threads, signal frames (`mpkvirt::sandbox::seals_key0`).
pub fn key0_line(backend: BackendKind) -> &'static str {
    match backend {
        BackendKind::Hardware if mpkvirt::sandbox::seals_key0() => {
            "key 0 read-only to tenants (the kernel writes signal frames with every key open)"
        }
        BackendKind::Hardware => {
            "key 0 WRITABLE by tenants (this kernel writes signal frames with the interrupted \
             PKRU: Linux before 6.12)"
        }
        _ => "key 0 writable by the one running tenant (no PKU)",
    }
}

impl Host {
    /// Starts a host: an mpkvirt manager on the machine's backend, the handlers that end
    /// faulting or overdue invocations, and the workers.
    ///
    /// # Errors
    ///
    /// When mpkvirt, the handlers or a worker cannot be set up.
    pub fn start(config: HostConfig) -> Result<Host, StartError> {
        // The host's state from here on is allocated in the host domain.
        crate::heap::init().map_err(|e| StartError(e.to_string()))?;
        let mgr = Manager::new(mpkvirt::Config {
            policy: config.policy,
            ..mpkvirt::Config::default()
        })
        .map_err(|e| StartError(e.to_string()))?;
        tenant::install_handlers().map_err(|e| StartError(e.to_string()))?;
        tenant::quiet_panics_in_sandboxes();
        let workers = config
            .workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            })
            .max(1);
        if config.measure_views_unprotected {
            eprintln!(
                "mpkvirt-host: MEASUREMENT MODE: instances open to every thread, tenants NOT isolated"
            );
        }
        let arrangement = if config.measure_without_isolation {
            Arrangement::Unisolated { workers }
        } else if mgr.backend_kind() == BackendKind::Hardware {
            Arrangement::Parallel { workers }
        } else {
            Arrangement::Serialized
        };
        eprintln!(
            "mpkvirt-host: {} backend; {arrangement}; {}",
            mgr.backend_kind(),
            key0_line(mgr.backend_kind())
        );
        let pool = Pool::new(mgr.clone(), config.slot_size, 0, config.slots)
            .map_err(|e| StartError(e.to_string()))?;
        let inner = Arc::new(Inner {
            mgr,
            config,
            apps: RwLock::new(HashMap::new()),
            pool: Mutex::new(pool),
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
            watch_stop: AtomicBool::new(false),
            log: Mutex::new(VecDeque::new()),
            serial: (arrangement == Arrangement::Serialized).then(|| Mutex::new(())),
            opened: Mutex::new(std::collections::HashSet::new()),
            layouts: Mutex::new(HashMap::new()),
            watch: Arc::new(Watch::default()),
            next_app: std::sync::atomic::AtomicU32::new(0),
        });
        let n = arrangement.workers();
        // The host's threads run on stacks in the host domain (see `spawn_on_host_stack`).
        let mut host = Host {
            inner,
            arrangement,
            workers: Vec::with_capacity(n + 1),
        };
        let spawn = |name: String, f: fn(&Inner), inner: Arc<Inner>| {
            spawn_on_host_stack(name, HOST_STACK, &tenant::FAULT_SIGNALS, move || f(&inner))
                .map_err(|e| StartError(e.to_string()))
        };
        host.workers
            .push(spawn("watchdog".into(), watchdog, host.inner.clone())?);
        for i in 0..n {
            host.workers.push(spawn(
                format!("worker-{i}"),
                worker_main,
                host.inner.clone(),
            )?);
        }
        Ok(host)
    }

    /// The mpkvirt backend the host runs on.
    pub fn backend_kind(&self) -> BackendKind {
        self.inner.mgr.backend_kind()
    }

    /// How tenant code is placed on workers.
    pub fn arrangement(&self) -> Arrangement {
        self.arrangement
    }

    /// Registers an application (replacing one of the same name for later invocations).
    pub fn register(&self, app: App) {
        let mut apps = self.inner.apps.write().unwrap_or_else(|e| e.into_inner());
        // A fresh id even for a name registered before: warm slots go by id, and the new
        // code must not get the old one's instances.
        let id = self.inner.next_app.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(AppEntry {
            id,
            app,
            running: AtomicUsize::new(0),
        });
        apps.insert(entry.app.name.clone(), entry);
    }

    /// Runs application `name` with `request` and returns its response.
    ///
    /// # Errors
    ///
    /// [`InvokeError`].
    pub fn invoke(&self, name: &str, request: &[u8]) -> Result<Vec<u8>, InvokeError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(name, request.to_vec(), move |out| {
            let _ = tx.send(out);
        })?;
        rx.recv().unwrap_or(Err(InvokeError::ShuttingDown))
    }

    /// Queues an invocation of application `name` and returns at once; `done` is called
    /// with its outcome, on the worker that ran it, when it ends (so it must be quick).
    ///
    /// # Errors
    ///
    /// [`InvokeError::UnknownFunction`], [`InvokeError::Overloaded`] and
    /// [`InvokeError::ShuttingDown`] at once (and `done` is not called).
    pub fn submit(
        &self,
        name: &str,
        request: Vec<u8>,
        done: impl FnOnce(Result<Vec<u8>, InvokeError>) + Send + 'static,
    ) -> Result<(), InvokeError> {
        let app = Admitted::new(lookup(&self.inner, name)?)?;
        {
            let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            if self.inner.stop.load(Ordering::Acquire) {
                return Err(InvokeError::ShuttingDown);
            }
            q.push_back(Job {
                app,
                request,
                reply: Box::new(done),
            });
        }
        self.inner.ready.notify_one();
        Ok(())
    }

    /// Runs application `name` with `request` on the calling thread, which acts as a worker
    /// for this one invocation (the watchdog preempts it only to check the deadline): no
    /// queue, no handoff between threads, no system call of the host's. For front ends that own their threads, and for
    /// measuring the invocation path. On the emulated backend it takes the same lock as the
    /// workers (one tenant at a time).
    ///
    /// # Errors
    ///
    /// [`InvokeError`].
    pub fn invoke_here(&self, name: &str, request: &[u8]) -> Result<Vec<u8>, InvokeError> {
        let app = Admitted::new(lookup(&self.inner, name)?)?;
        let runner = self.local_runner();
        let w = Worker {
            inner: &self.inner,
            runner: &runner,
        };
        w.invoke_nested(app, request, 0)
    }

    /// The calling thread's entry in the watchdog's list (made on its first `invoke_here`).
    fn local_runner(&self) -> Arc<Runner> {
        LOCAL_RUNNER.with(|r| {
            let mut r = r.borrow_mut();
            // Entries of hosts that are gone go too.
            r.retain(|run| run.host.strong_count() > 0);
            let me = Arc::downgrade(&self.inner.watch);
            if let Some(run) = r.iter().find(|run| run.host.ptr_eq(&me)) {
                return run.runner.clone();
            }
            let runner = self.inner.watch.register();
            r.push(LocalRunner {
                host: me,
                runner: runner.clone(),
            });
            runner
        })
    }

    /// Invocations of application `name` admitted and not yet finished.
    pub fn in_flight(&self, name: &str) -> usize {
        lookup(&self.inner, name).map_or(0, |a| a.running.load(Ordering::Acquire))
    }

    /// The last lines tenants logged (`app: message`), oldest first.
    pub fn logs(&self) -> Vec<String> {
        let log = self.inner.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    /// Resets released (or, at the pool's limit, idle) slots now, or makes new ones below
    /// the limit, until the host has its stock of clean ones (what the watchdog does a few
    /// at a time each tick); returns how many it reset or made.
    pub fn clean_slots(&self) -> usize {
        clean_slots(&self.inner, usize::MAX)
    }

    /// The key cache's counters (misses, evictions) of the host's mpkvirt manager.
    pub fn key_stats(&self) -> mpkvirt::Stats {
        self.inner.mgr.stats()
    }

    /// The instance pool's counters.
    pub fn pool_stats(&self) -> crate::instance::pool::PoolStats {
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        {
            let _q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.stop.store(true, Ordering::Release);
        }
        self.inner.ready.notify_all();
        // The workers first (they finish what is queued, preempted and held to deadlines by
        // the watchdog meanwhile), then the watchdog.
        let mut threads = self.workers.drain(..);
        let watchdog = threads.next();
        for w in threads {
            w.wait();
        }
        self.inner.watch_stop.store(true, Ordering::Release);
        if let Some(w) = watchdog {
            w.wait();
        }
    }
}

/// The stack of each host thread's loop (host code only: tenants run on their instances'
/// stacks).
const HOST_STACK: usize = 1 << 20;

fn lookup(inner: &Inner, name: &str) -> Result<Arc<AppEntry>, InvokeError> {
    let apps = inner.apps.read().unwrap_or_else(|e| e.into_inner());
    apps.get(name)
        .cloned()
        .ok_or_else(|| InvokeError::UnknownFunction(name.to_string()))
}

fn worker_main(inner: &Inner) {
    let runner = inner.watch.register();
    let w = Worker {
        inner,
        runner: &runner,
    };
    let mut ready: RunQueue<Task> =
        RunQueue::new(inner.config.order, inner.config.max_wait.as_nanos() as u64);
    let mut stats = AppStats::default();
    loop {
        // New invocations: wait for one when there is nothing to run, else take what is
        // queued (up to the worker's share).
        while ready.len() < LOCAL_TASKS {
            let job = {
                let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(job) = q.pop_front() {
                        break Some(job);
                    }
                    if inner.stop.load(Ordering::Acquire) && ready.is_empty() {
                        return;
                    }
                    if !ready.is_empty() {
                        break None;
                    }
                    q = inner.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some(job) = job else { break };
            let app = job.app.0.id;
            match w.start(job.app, &job.request, Some(job.reply)) {
                Ok(task) => ready.push(
                    policy::Task {
                        app,
                        queued_at: monotonic_ns(),
                        attained_ns: 0,
                        payload: task,
                    },
                    &stats,
                ),
                Err((reply, e)) => {
                    if let Some(r) = reply {
                        r(Err(e));
                    }
                }
            }
        }
        let Some(mut next) = ready.pop(monotonic_ns()) else {
            continue;
        };
        if inner.config.hints && !ready.is_empty() {
            // The key cache keeps what runs next (`PolicyKind::Hinted`: an eviction takes
            // the domain used furthest ahead, or not named).
            let upcoming: Vec<&Domain<Machine>> = std::iter::once(&next)
                .chain(ready.peek(HINTED - 1))
                .map(|t| t.payload.slot.domain())
                .collect();
            inner.mgr.hint(&upcoming);
        }
        loop {
            let began = monotonic_ns();
            let step = w.step(&mut next.payload, 0);
            next.attained_ns += monotonic_ns() - began;
            match step {
                // Without preemption the task keeps the worker until it ends (or is overdue).
                Step::Preempted if inner.config.quantum.is_none() => {}
                Step::Preempted => {
                    next.queued_at = monotonic_ns();
                    ready.push(next, &stats);
                    break;
                }
                Step::Finished(outcome) => {
                    stats.record(next.app, next.attained_ns);
                    let mut task = next.payload;
                    let reply = task.reply.take();
                    let out = w.finish(task, outcome);
                    if let Some(r) = reply {
                        r(out);
                    }
                    break;
                }
            }
        }
    }
}

/// Tasks a worker takes on at once (more wait in the shared queue).
const LOCAL_TASKS: usize = 64;

/// Tasks a worker names to the key cache as the next to run (the running one included).
const HINTED: usize = 16;

struct Worker<'a> {
    inner: &'a Inner,
    runner: &'a Runner,
}

/// A thread that runs tenant code, as the watchdog sees it.
#[derive(Debug)]
struct Runner {
    tid: i32,
    /// When its current step began (`monotonic_ns`), 0 while it runs no tenant code.
    since: std::sync::atomic::AtomicU64,
}

/// The watchdog's list of runners (`Weak`: a thread's entry goes when the thread does).
#[derive(Debug, Default)]
struct Watch {
    runners: Mutex<Vec<std::sync::Weak<Runner>>>,
}

impl Watch {
    /// An entry for the calling thread.
    fn register(&self) -> Arc<Runner> {
        let r = Arc::new(Runner {
            tid: mpkvirt_sys::thread::gettid(),
            since: std::sync::atomic::AtomicU64::new(0),
        });
        let mut list = self.runners.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&r));
        r
    }

    /// Preempts every runner whose step has lasted `tick` or longer.
    fn sweep(&self, tick: Duration) {
        let now = monotonic_ns();
        let list = self.runners.lock().unwrap_or_else(|e| e.into_inner());
        for r in list.iter().filter_map(std::sync::Weak::upgrade) {
            let since = r.since.load(Ordering::Acquire);
            if since != 0 && now.saturating_sub(since) >= tick.as_nanos() as u64 {
                tenant::preempt(r.tid);
            }
        }
    }
}

/// A thread's entry for one host (`Host::invoke_here`).
struct LocalRunner {
    host: std::sync::Weak<Watch>,
    runner: Arc<Runner>,
}

thread_local! {
    /// The entries of a thread that runs invocations itself, one per host.
    static LOCAL_RUNNER: std::cell::RefCell<Vec<LocalRunner>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The watchdog: every tick, preempts the tenants that ran a whole tick (Go's `sysmon` does
/// the same for goroutines). Nothing on the invocation path makes a system call for it.
fn watchdog(inner: &Inner) {
    let tick = inner.config.tick();
    while !inner.watch_stop.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        inner.watch.sweep(tick);
        // A few resets a tick, so that preemption stays on time.
        clean_slots(inner, 4);
    }
}

/// Resets up to `max` released (or, at the pool's limit, idle) slots outside the pool's
/// lock, or makes new ones below the limit, until the host has its stock of clean ones
/// (`HostConfig::clean_slots`); returns how many it reset or made.
fn clean_slots(inner: &Inner, max: usize) -> usize {
    let pool = || inner.pool.lock().unwrap_or_else(|e| e.into_inner());
    let want = inner.config.clean_slots;
    let out = pool().to_clean(want, max);
    let n = out.len();
    // Below the pool's limit, new slots (made here, not on an invocation's path) keep the
    // stock; warm slots stay warm.
    let made = match pool().prefill(want, max.saturating_sub(n)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mpkvirt-host: making an instance slot: {e}");
            0
        }
    };
    for d in out {
        let reset = d.reset();
        if let Err(e) = pool().cleaned(d, reset) {
            eprintln!("mpkvirt-host: an instance slot was dropped: {e}");
        }
    }
    n + made
}

/// The memory an invocation holds in its instance.
struct Held {
    /// Allocations from the tenant's `alloc`, with their sizes.
    tenant: HashMap<u64, usize>,
    tenant_bytes: usize,
    quota: usize,
}

/// Where an instance keeps the host's part of an invocation (inside its domain).
#[derive(Clone, Copy, Debug)]
struct Layout {
    stack: u64,
    frame: u64,
    request: u64,
    request_cap: usize,
}

/// An invocation in progress.
struct Task {
    app: Admitted,
    reply: Option<Reply>,
    slot: Slot<Machine>,
    held: Held,
    mem: tenant::InstanceMem,
    frame_at: u64,
    top: u64,
    /// The context to run next (`None` once it ended).
    ctx: Option<tenant::Runnable>,
    /// What its pending yield returns.
    resume: u64,
    deadline: Instant,
    /// The request, until the first step writes it into the instance.
    pending: Option<Vec<u8>>,
    /// The response, read by the step in which the function returned.
    response: Option<Result<Vec<u8>, InvokeError>>,
}

/// Marks the runner as running tenant code while it lives.
/// (A nested step leaves its caller's mark in place when it ends.)
struct Running<'a>(&'a Runner, u64);

impl<'a> Running<'a> {
    /// Marks tenant code (`tenant`: a native function's step, which the watchdog may
    /// preempt) or the host's own (a built-in's step, nested in a native one's or not: never
    /// preempted, since it may hold the heap's lock or any other of the host's).
    fn new(r: &'a Runner, tenant: bool) -> Running<'a> {
        let mark = if tenant { monotonic_ns().max(1) } else { 0 };
        let before = r.since.swap(mark, Ordering::AcqRel);
        Running(r, before)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.since.store(self.1, Ordering::Release);
    }
}

/// How a step of a task ended.
enum Step {
    /// The watchdog preempted it; it can run again.
    Preempted,
    /// It ended (its context never runs again).
    Finished(Result<(), InvokeError>),
}

impl Worker<'_> {
    /// Runs `app` with `request` to its end on this worker (nested invocations).
    fn invoke_nested(
        &self,
        app: Admitted,
        request: &[u8],
        depth: usize,
    ) -> Result<Vec<u8>, InvokeError> {
        let mut task = self.start(app, request, None).map_err(|(_, e)| e)?;
        loop {
            if let Step::Finished(outcome) = self.step(&mut task, depth) {
                return self.finish(task, outcome);
            }
        }
    }

    /// Lends the application an instance and prepares its context.
    #[allow(
        clippy::result_large_err,
        reason = "the reply goes back with the error"
    )]
    fn start(
        &self,
        app: Admitted,
        request: &[u8],
        reply: Option<Reply>,
    ) -> Result<Task, (Option<Reply>, InvokeError)> {
        let slot = match self
            .inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acquire(app.0.id)
        {
            Ok(s) => s,
            Err(e) => return Err((reply, InvokeError::Instance(e.to_string()))),
        };
        let d = slot.domain();
        if self.inner.config.measure_views_unprotected
            && self
                .inner
                .opened
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(d.id())
        {
            let _ = d.set_process_wide(Some(Rights::ReadWrite));
        }
        let mem = tenant::InstanceMem::new(d);
        let held = Held {
            tenant: HashMap::new(),
            tenant_bytes: 0,
            quota: app.0.app.limits.memory.min(d.len()),
        };
        // The instance is prepared in its first step, inside the step's view.
        Ok(Task {
            deadline: Instant::now() + app.0.app.limits.timeout,
            app,
            reply,
            slot,
            held,
            mem,
            frame_at: 0,
            top: 0,
            ctx: None,
            resume: 0,
            pending: Some(request.to_vec()),
            response: None,
        })
    }

    fn host_alloc(&self, d: &Domain<Machine>, len: usize) -> Result<u64, InvokeError> {
        Ok(d.alloc(len.max(1), 16)
            .map_err(|e| InvokeError::Instance(e.to_string()))?
            .as_ptr() as u64)
    }

    /// The instance's stack, frame and request buffer: kept from its last invocation when
    /// the slot is warm (no allocation, no page touched anew), made when it is new or reset.
    fn layout(
        &self,
        d: &Domain<Machine>,
        warm: bool,
        request_len: usize,
    ) -> Result<Layout, InvokeError> {
        let mut layouts = self.inner.layouts.lock().unwrap_or_else(|e| e.into_inner());
        let kept = if warm {
            layouts.get(&d.id()).copied()
        } else {
            None
        };
        let mut l = match kept {
            Some(l) => l,
            None => {
                // (The tenant heap's header lies just above the stack's top.)
                let stack =
                    self.host_alloc(d, self.inner.config.stack_size + tenant_heap::HEADER)?;
                Layout {
                    stack,
                    frame: self.host_alloc(d, size_of::<tenant::Frame>())?,
                    request: self.host_alloc(d, 4096)?,
                    request_cap: 4096,
                }
            }
        };
        if request_len > l.request_cap {
            if let Some(p) = std::ptr::NonNull::new(l.request as *mut u8) {
                let _ = d.free(p);
            }
            l.request = self.host_alloc(d, request_len)?;
            l.request_cap = request_len;
        }
        layouts.insert(d.id(), l);
        Ok(l)
    }

    fn prepare(
        &self,
        d: &Domain<Machine>,
        mem: tenant::InstanceMem,
        app: &AppEntry,
        request: &[u8],
        warm: bool,
    ) -> Result<(u64, u64, tenant::Runnable), InvokeError> {
        let l = self.layout(d, warm, request.len())?;
        let top = (l.stack + self.inner.config.stack_size as u64) & !15;
        // A new tenant heap for each invocation (the last one's chunks went back to the
        // host when it ended).
        mem.write(top, &0u64.to_le_bytes());
        let req = l.request;
        mem.write(req, request);
        let frame_at = l.frame;
        let (kind, code) = match &app.app.code {
            Code::Native(n) => (tenant::ENTRY_NATIVE, [n.entry_addr(), 0]),
            // The application's `Arc` (alive while the invocation holds its entry).
            Code::Builtin(f) => (tenant::ENTRY_BUILTIN, [std::ptr::from_ref(f) as usize, 0]),
        };
        let frame = tenant::Frame {
            kind,
            code,
            request: req as *const u8,
            request_len: request.len(),
            response: [0, 0],
            rc: 0,
        };
        if !mem.write_frame(frame_at, frame) {
            return Err(InvokeError::Instance("the frame does not fit".into()));
        }
        let ctx = mem
            .context(top, frame_at)
            .ok_or_else(|| InvokeError::Instance("the stack does not fit".into()))?;
        Ok((frame_at, top, ctx))
    }

    /// Runs the task until it ends or the watchdog preempts it, serving its host calls. An
    /// overdue task ends at its next preemption.
    fn step(&self, task: &mut Task, depth: usize) -> Step {
        let d = task.slot.domain();
        // The worker's view of the instance for the whole step: it serves host calls in it,
        // and the sandbox's view goes on top (the same rights: no change of protection).
        let _view = match self.inner.mgr.enter(&[(d, Rights::ReadWrite)]) {
            Ok(v) => v,
            Err(e) => return Step::Finished(Err(InvokeError::Instance(e.to_string()))),
        };
        // (A nested invocation runs inside its caller's step, which holds the lock.)
        let _serial = self
            .inner
            .serial
            .as_ref()
            .filter(|_| depth == 0)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
        // Built-in functions are the host's own code, run to their end: preempted or
        // abandoned inside the global allocator (or any lock of the host's), they would leave
        // it to the worker in the middle of an update.
        let _running = Running::new(self.runner, matches!(task.app.0.app.code, Code::Native(_)));
        if let Some(request) = task.pending.take() {
            let warm = task.slot.is_warm();
            match self.prepare(d, task.mem, &task.app.0, &request, warm) {
                Ok((frame_at, top, ctx)) => {
                    task.frame_at = frame_at;
                    task.top = top;
                    task.ctx = Some(ctx);
                }
                Err(e) => return Step::Finished(Err(e)),
            }
        }
        loop {
            let Some(ctx) = task.ctx.take() else {
                return Step::Finished(Err(InvokeError::Instance("the context ended".into())));
            };
            // Built-in functions are the host's own code: their sandbox keeps the host
            // domain (their closures and allocations live in the host's heap).
            let trusted = matches!(task.app.0.app.code, Code::Builtin(_));
            let (next, yielded) =
                match ctx.run(&self.inner.mgr, d, task.top as usize, task.resume, trusted) {
                    Ok(r) => r,
                    Err(e) => return Step::Finished(Err(InvokeError::Instance(e.to_string()))),
                };
            match yielded {
                tenant::DONE => {
                    // Read while the worker's view is open.
                    task.response = Some(self.response(task));
                    return Step::Finished(Ok(()));
                }
                tenant::PANICKED => return Step::Finished(Err(InvokeError::Panicked)),
                mpkvirt::sandbox::PREEMPTED => {
                    task.ctx = Some(next);
                    task.resume = 0;
                    if Instant::now() >= task.deadline {
                        task.ctx = None;
                        return Step::Finished(Err(InvokeError::Deadline));
                    }
                    return Step::Preempted;
                }
                v if (tenant::FAULT..tenant::FAULT + 128).contains(&v) => {
                    let signal = (v - tenant::FAULT) as i32;
                    return Step::Finished(Err(InvokeError::Fault { signal }));
                }
                v if v < tenant::STATUS_LIMIT => {
                    return Step::Finished(Err(InvokeError::BadHostCall("an unknown status")));
                }
                call => {
                    let app = task.app.0.clone();
                    let served = self.serve(d, task.mem, &app, call, depth, &mut task.held);
                    match served {
                        // (A host call may take long, a nested invocation above all: the
                        // deadline is checked after each as well as at preemptions.)
                        Ok(_) if Instant::now() >= task.deadline => {
                            return Step::Finished(Err(InvokeError::Deadline));
                        }
                        Ok(v) => {
                            task.ctx = Some(next);
                            task.resume = v;
                        }
                        Err(e) => return Step::Finished(Err(e)),
                    }
                }
            }
        }
    }

    /// Ends a task: its response (or error), its memory given back, its slot released.
    fn finish(&self, task: Task, outcome: Result<(), InvokeError>) -> Result<Vec<u8>, InvokeError> {
        let mut task = task;
        let out = outcome.and_then(|()| {
            task.response
                .take()
                .unwrap_or(Err(InvokeError::BadResponse))
        });
        let clean = matches!(out, Ok(_) | Err(InvokeError::Failed { .. }));
        self.release(task.slot, &task.held, clean);
        out
    }

    fn response(&self, task: &Task) -> Result<Vec<u8>, InvokeError> {
        let f = task
            .mem
            .read_frame(task.frame_at)
            .ok_or(InvokeError::BadResponse)?;
        match &task.app.0.app.code {
            Code::Builtin(_) => {
                let rc = f.rc;
                let bytes = f.into_builtin_response();
                if rc != 0 {
                    return Err(InvokeError::Failed {
                        code: rc,
                        message: String::from_utf8_lossy(&bytes).into_owned(),
                    });
                }
                Ok(bytes)
            }
            Code::Native(_) => {
                if f.rc != 0 {
                    return Err(InvokeError::Failed {
                        code: f.rc,
                        message: String::new(),
                    });
                }
                let [ptr, len] = f.response;
                if ptr == 0 && len == 0 {
                    return Ok(Vec::new());
                }
                task.mem
                    .read(ptr as u64, len as u64)
                    .ok_or(InvokeError::BadResponse)
            }
        }
    }

    /// Gives the invocation's memory back and the slot to the pool: warm after a clean end
    /// (same application next), reset after anything else.
    fn release(&self, slot: Slot<Machine>, held: &Held, clean: bool) {
        let d = slot.domain();
        let id = d.id();
        if clean {
            for p in held.tenant.keys() {
                if let Some(p) = std::ptr::NonNull::new(*p as *mut u8) {
                    let _ = d.free(p);
                }
            }
        }
        let how = if clean {
            Release::Warm
        } else {
            // Reset: its heap, and so the layout in it, is gone.
            self.inner
                .layouts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&d.id());
            Release::Reset
        };
        let released = self
            .inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(slot, how);
        if let Err(e) = released {
            // The slot is gone (its domain destroyed), and its layout with it.
            self.inner
                .layouts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            eprintln!("mpkvirt-host: an instance slot was dropped: {e}");
        }
    }

    /// Serves the host call whose request is at `at` in the instance.
    fn serve(
        &self,
        d: &Domain<Machine>,
        mem: tenant::InstanceMem,
        app: &AppEntry,
        at: u64,
        depth: usize,
        held: &mut Held,
    ) -> Result<u64, InvokeError> {
        let bad = InvokeError::BadHostCall;
        let raw = mem
            .read(at, size_of::<tenant::HostCall>() as u64)
            .ok_or(bad("a request outside the instance"))?;
        let word =
            |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let (op, a) = (
            word(0),
            [word(1), word(2), word(3), word(4), word(5), word(6)],
        );
        match op {
            tenant::CALL_ALLOC => {
                let len = usize::try_from(a[0]).unwrap_or(usize::MAX).max(1);
                if held.tenant_bytes.saturating_add(len) > held.quota {
                    return Ok(0);
                }
                match d.alloc(len, 16) {
                    Ok(p) => {
                        let p = p.as_ptr() as u64;
                        held.tenant.insert(p, len);
                        held.tenant_bytes += len;
                        Ok(p)
                    }
                    Err(_) => Ok(0),
                }
            }
            tenant::CALL_FREE => {
                if a[0] == 0 {
                    return Ok(0);
                }
                let len = held
                    .tenant
                    .remove(&a[0])
                    .ok_or(bad("free of memory the host did not allocate"))?;
                held.tenant_bytes -= len;
                if let Some(p) = std::ptr::NonNull::new(a[0] as *mut u8) {
                    let _ = d.free(p);
                }
                Ok(0)
            }
            tenant::CALL_LOG => {
                let len = a[1].min(4096);
                let msg = mem
                    .read_or_image(app.image(), a[0], len)
                    .ok_or(bad("a log line outside the instance"))?;
                let line = format!("{}: {}", app.app.name, String::from_utf8_lossy(&msg));
                let mut log = self.inner.log.lock().unwrap_or_else(|e| e.into_inner());
                if log.len() == LOG_LINES {
                    log.pop_front();
                }
                log.push_back(line);
                Ok(0)
            }
            tenant::CALL_TIME => Ok(monotonic_ns()),
            tenant::CALL_RANDOM => {
                if a[1] > 1 << 20 || !mem.holds(a[0], a[1]) {
                    return Err(bad("a random buffer outside the instance"));
                }
                let mut buf = vec![0u8; a[1] as usize];
                tenant::fill_random(&mut buf);
                mem.write(a[0], &buf);
                Ok(0)
            }
            tenant::CALL_INVOKE => self.serve_invoke(d, mem, app, a, depth, held),
            _ => Err(bad("an unknown host call")),
        }
    }

    #[allow(clippy::too_many_arguments, reason = "one host call's context")]
    fn serve_invoke(
        &self,
        d: &Domain<Machine>,
        mem: tenant::InstanceMem,
        app: &AppEntry,
        a: [u64; 6],
        depth: usize,
        held: &mut Held,
    ) -> Result<u64, InvokeError> {
        let bad = InvokeError::BadHostCall;
        let name = mem
            .read_or_image(app.image(), a[0], a[1].min(256))
            .ok_or(bad("a function name outside the instance"))?;
        let req = mem
            .read_or_image(app.image(), a[2], a[3].min(16 << 20))
            .ok_or(bad("a request outside the instance"))?;
        if !mem.holds(a[4], 8) || !mem.holds(a[5], 8) {
            return Err(bad("response pointers outside the instance"));
        }
        const FAILED: u64 = u32::MAX as u64; // -1 as the C int the tenant sees
        if depth + 1 >= MAX_DEPTH {
            return Ok(FAILED);
        }
        let Ok(target) = lookup(self.inner, &String::from_utf8_lossy(&name)) else {
            return Ok(FAILED);
        };
        let Ok(target) = Admitted::new(target) else {
            return Ok(FAILED);
        };
        let Ok(resp) = self.invoke_nested(target, &req, depth + 1) else {
            return Ok(FAILED);
        };
        // The response goes into the caller's instance, counted against its quota.
        let len = resp.len().max(1);
        if held.tenant_bytes.saturating_add(len) > held.quota {
            return Ok(FAILED);
        }
        let Ok(p) = d.alloc(len, 16) else {
            return Ok(FAILED);
        };
        let p = p.as_ptr() as u64;
        held.tenant.insert(p, len);
        held.tenant_bytes += len;
        mem.write(p, &resp);
        mem.write(a[4], &p.to_ne_bytes());
        mem.write(a[5], &(resp.len() as u64).to_ne_bytes());
        Ok(0)
    }
}
