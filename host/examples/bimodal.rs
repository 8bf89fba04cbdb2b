//! The bimodal load of the scheduling question: 99.5 % short functions (≈ 5 µs of work) and
//! 0.5 % long ones (≈ 10 ms), arriving open-loop (Poisson) at a fixed utilization. Reports
//! the latency of the short functions (arrival to completion) for:
//!
//! - `runtime, preempted`: the host's workers, a quantum of `--quantum-us`, FIFO order;
//! - `runtime, least attained`: the same with the least-attained-service order;
//! - `runtime, FIFO`: the host's workers without preemption (each function runs to its end);
//! - `OS, thread per invocation`: a new OS thread per request runs it (`Host::invoke_here`);
//! - `OS, pool of N`: a fixed pool of OS threads runs requests from a shared queue.
//!
//! Every variant runs the same built-in functions through the same invocation path (an
//! instance slot, its sandbox, the response copied out). On a machine without PKU the host
//! serializes tenant code, which would hide every difference, so the experiment runs in the
//! measurement mode (`HostConfig::measure_without_isolation`: parallel workers, tenants NOT
//! isolated); on PKU hardware pass `--isolated` to keep isolation.
//!
//! The function (`host/tenants/c/spin.c`) spins for a number of rounds calibrated at start,
//! so that its own work is 5 µs or 10 ms; what the runtime adds per invocation comes on top
//! (the load parameter counts the functions' own work).
//!
//! `cargo run --release -p mpkvirt-host --example bimodal -- [--seconds S] [--load L]
//!   [--workers W] [--quantum-us Q] [--pool P] [--isolated]`
#![allow(clippy::cast_precision_loss, reason = "latency statistics")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use mpkvirt_host::app::native::NativeFunction;
use mpkvirt_host::runtime::{App, Code, Host, HostConfig, Limits};
use mpkvirt_host::sched::policy::Order;

/// The function: `host/tenants/c/spin.c` (spins for the nanoseconds its request names),
/// built by the crate's build script. A native function, so that the runtime may preempt it
/// (built-in functions run to their end).
fn spin_code() -> Code {
    let path = std::path::Path::new(env!("OUT_DIR")).join("tenants/libspin.so");
    // SAFETY: the project's own tenant, validated on load; it has no constructors.
    #[allow(unsafe_code, reason = "loading the project's own tenant")]
    let f = unsafe { NativeFunction::load(&path) }.expect("tenants/libspin.so");
    Code::Native(Arc::new(f))
}

/// Rounds of `spin` per nanosecond, measured once (`calibrate`).
static ROUNDS_PER_NS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// The request for a short or a long run.
fn request(long: bool) -> Vec<u8> {
    let ns = if long { LONG_NS } else { SHORT_NS };
    let rounds = (ns as f64 * ROUNDS_PER_NS.get().copied().unwrap_or(1.0)) as u64;
    rounds.to_le_bytes().to_vec()
}

/// Measures `spin`'s speed through the runtime (the median of 9 runs of ~20 ms).
fn calibrate(host: &Host) {
    let rounds: u64 = 50_000_000;
    let mut ns = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        host.invoke_here("spin", &rounds.to_le_bytes())
            .expect("spin");
        ns.push(t.elapsed().as_nanos() as f64);
    }
    ns.sort_by(f64::total_cmp);
    let _ = ROUNDS_PER_NS.set(rounds as f64 / ns[4]);
}

const SHORT_NS: u64 = 5_000;
const LONG_NS: u64 = 10_000_000;
const LONG_SHARE: f64 = 0.005;

struct Args {
    seconds: f64,
    load: f64,
    workers: usize,
    quantum: Duration,
    pool: usize,
    isolated: bool,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 3.0,
        load: 0.6,
        workers: 1,
        quantum: Duration::from_micros(500),
        pool: 8,
        isolated: false,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = |i: usize| v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--seconds" => a.seconds = next(i).parse().expect("--seconds S"),
            "--load" => a.load = next(i).parse().expect("--load L (0..1)"),
            "--workers" => a.workers = next(i).parse().expect("--workers W"),
            "--quantum-us" => {
                a.quantum = Duration::from_micros(next(i).parse().expect("--quantum-us Q"))
            }
            "--pool" => a.pool = next(i).parse().expect("--pool P"),
            "--isolated" => {
                a.isolated = true;
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// A tiny deterministic generator (xorshift) for arrivals and kinds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One request: when it should arrive, and whether it is long.
#[derive(Clone, Copy)]
struct Arrival {
    at: Duration,
    long: bool,
}

fn schedule(a: &Args) -> Vec<Arrival> {
    let mean_service = (1.0 - LONG_SHARE) * SHORT_NS as f64 + LONG_SHARE * LONG_NS as f64;
    let rate = a.load * a.workers as f64 / mean_service; // per ns
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut t = 0.0;
    let mut out = Vec::new();
    while t < a.seconds * 1e9 {
        t += -(1.0 - rng.next()).ln() / rate;
        out.push(Arrival {
            at: Duration::from_nanos(t as u64),
            long: rng.next() < LONG_SHARE,
        });
    }
    out
}

/// Latencies (ns) of short and long requests.
#[derive(Default)]
struct Results {
    short: Vec<u64>,
    long: Vec<u64>,
    failed: usize,
}

fn host(a: &Args, quantum: Option<Duration>, order: Order) -> Host {
    let host = Host::start(HostConfig {
        workers: Some(a.workers),
        slots: 4096,
        slot_size: 256 << 10,
        stack_size: 64 << 10,
        quantum,
        order,
        measure_without_isolation: !a.isolated,
        ..HostConfig::default()
    })
    .expect("a host");
    let limits = Limits {
        timeout: Duration::from_secs(5),
        memory: 64 << 10,
        concurrency: 1 << 20,
    };
    host.register(App {
        name: "spin".into(),
        code: spin_code(),
        limits,
    });
    host
}

/// Drives `arrivals` open-loop through `submit(long, done)`, where `done` records the
/// completion; returns the latencies.
fn drive(arrivals: &[Arrival], submit: &dyn Fn(bool, Box<dyn FnOnce(bool) + Send>)) -> Results {
    let results = Arc::new(Mutex::new(Results::default()));
    let pending = Arc::new(AtomicUsize::new(arrivals.len()));
    let start = Instant::now();
    for arr in arrivals {
        while start.elapsed() < arr.at {
            std::hint::spin_loop();
        }
        let due = start + arr.at;
        let (results, pending, long) = (results.clone(), pending.clone(), arr.long);
        submit(
            long,
            Box::new(move |ok| {
                let ns = due.elapsed().as_nanos() as u64;
                let mut r = results.lock().unwrap();
                if !ok {
                    r.failed += 1;
                } else if long {
                    r.long.push(ns);
                } else {
                    r.short.push(ns);
                }
                pending.fetch_sub(1, Ordering::AcqRel);
            }),
        );
    }
    while pending.load(Ordering::Acquire) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    Arc::try_unwrap(results)
        .ok()
        .expect("every completion reported")
        .into_inner()
        .unwrap()
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

fn report(name: &str, mut r: Results) {
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} |",
        r.short.len(),
        percentile(&mut r.short, 0.5),
        percentile(&mut r.short, 0.99),
        percentile(&mut r.short, 0.999),
        percentile(&mut r.long, 0.5),
        percentile(&mut r.long, 0.99),
        r.failed
    );
}

fn runtime_variant(
    a: &Args,
    arrivals: &[Arrival],
    name: &str,
    quantum: Option<Duration>,
    order: Order,
) {
    let host = host(a, quantum, order);
    let r = drive(arrivals, &|long, done| {
        let submitted = host.submit("spin", request(long), move |out| {
            if let Err(e) = &out {
                eprintln!("{e}");
            }
            done(out.is_ok());
        });
        if let Err(e) = submitted {
            eprintln!("refused: {e}");
        }
    });
    report(name, r);
}

fn main() {
    let a = args();
    calibrate(&host(&a, None, Order::Fifo));
    let arrivals = schedule(&a);
    let longs = arrivals.iter().filter(|x| x.long).count();
    println!(
        "{} requests in {:.1} s ({} long), load {:.2} on {} worker(s), quantum {:?}, {}",
        arrivals.len(),
        a.seconds,
        longs,
        a.load,
        a.workers,
        a.quantum,
        if a.isolated {
            "isolated"
        } else {
            "measurement mode (tenants not isolated)"
        }
    );
    println!();
    println!(
        "| variant | short requests | short p50 µs | short p99 µs | short p99.9 µs | long p50 µs | long p99 µs | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    runtime_variant(
        &a,
        &arrivals,
        "runtime, preempted (FIFO)",
        Some(a.quantum),
        Order::Fifo,
    );
    runtime_variant(
        &a,
        &arrivals,
        "runtime, preempted (least attained)",
        Some(a.quantum),
        Order::LeastAttained,
    );
    runtime_variant(
        &a,
        &arrivals,
        "runtime, FIFO, no preemption",
        None,
        Order::Fifo,
    );

    // OS threads: one per request. (The host's own worker stays idle; its watchdog's tick
    // of 1 s only enforces deadlines.)
    {
        let host = Arc::new(host(&a, Some(Duration::from_secs(1)), Order::Fifo));
        let r = drive(&arrivals, &|long, done| {
            let host = host.clone();
            // (A thread that cannot be made counts as a failed request.)
            let done = Arc::new(Mutex::new(Some(done)));
            let again = done.clone();
            let spawned = std::thread::Builder::new().spawn(move || {
                let ok = host.invoke_here("spin", &request(long)).is_ok();
                if let Some(d) = again.lock().unwrap().take() {
                    d(ok);
                }
            });
            if spawned.is_err()
                && let Some(d) = done.lock().unwrap().take()
            {
                d(false);
            }
        });
        report("OS, thread per invocation", r);
    }
    // OS threads: a fixed pool.
    {
        let host = Arc::new(host(&a, Some(Duration::from_secs(1)), Order::Fifo));
        type Work = (bool, Box<dyn FnOnce(bool) + Send>);
        let (tx, rx) = mpsc::channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        let threads: Vec<_> = (0..a.pool)
            .map(|_| {
                let (host, rx) = (host.clone(), rx.clone());
                std::thread::spawn(move || {
                    loop {
                        let job = rx.lock().unwrap().recv();
                        let Ok((long, done)) = job else { break };
                        done(host.invoke_here("spin", &request(long)).is_ok());
                    }
                })
            })
            .collect();
        let r = drive(&arrivals, &|long, done| {
            tx.send((long, done)).unwrap();
        });
        drop(tx);
        for t in threads {
            t.join().unwrap();
        }
        report(&format!("OS, pool of {} threads", a.pool), r);
    }
}
