//! Hundreds of threads on 15 keys (issue 8, item 2 at scale): N threads, each with a domain
//! of its own, enter a one-domain view ROUNDS times and hold it 2 ms (a request served
//! inside a view), all starting together, with the default `pin_wait` (1 s). Prints, per
//! thread count, how many enters failed with `KeysBusy` and the longest single enter, as the
//! median of RUNS runs; beside it the same workload on a plain counting semaphore of 15
//! (`Mutex` + `Condvar`, wake one), the baseline a key cache cannot beat by much: it is what
//! handing 15 tokens around costs on this machine.
//!
//! ```text
//! cargo run --release -p mpkvirt --example many_threads [-- RUNS [simulated|emulated]]
//! ```

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mpkvirt::{Backend, Config, DomainOptions, Error, Manager, Mode, Rights};

const HOLD: Duration = Duration::from_millis(2);
const ROUNDS: usize = 4;
const KEYS: usize = 15;

/// Runs `threads` threads of `body` together (64 KiB stacks: a thousand of them).
fn together(threads: usize, body: impl Fn(usize) + Sync) {
    let go = Barrier::new(threads);
    thread::scope(|s| {
        for t in 0..threads {
            let (go, body) = (&go, &body);
            thread::Builder::new()
                .stack_size(64 << 10)
                .spawn_scoped(s, move || {
                    go.wait();
                    body(t);
                })
                .expect("spawn");
        }
    });
}

/// `(KeysBusy failures, longest enter)`.
fn keys<B: Backend>(mgr: &Manager<B>, threads: usize) -> (usize, Duration) {
    let doms: Vec<_> = (0..threads)
        .map(|_| mgr.create_domain(DomainOptions::reserve(4096)).unwrap())
        .collect();
    let busy = AtomicUsize::new(0);
    let longest = AtomicU64::new(0);
    together(threads, |t| {
        for _ in 0..ROUNDS {
            let start = Instant::now();
            let view = mgr.enter(&[(&doms[t], Rights::ReadWrite)]);
            longest.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
            match view {
                Ok(v) => {
                    thread::sleep(HOLD);
                    drop(v);
                }
                Err(Error::KeysBusy { .. }) => {
                    busy.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    (
        busy.into_inner(),
        Duration::from_micros(longest.into_inner()),
    )
}

/// The longest wait for one of `KEYS` tokens.
fn semaphore(threads: usize) -> Duration {
    let free = Mutex::new(KEYS);
    let cv = Condvar::new();
    let longest = AtomicU64::new(0);
    together(threads, |_| {
        for _ in 0..ROUNDS {
            let start = Instant::now();
            let mut n = free.lock().unwrap();
            while *n == 0 {
                n = cv.wait(n).unwrap();
            }
            *n -= 1;
            drop(n);
            longest.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
            thread::sleep(HOLD);
            *free.lock().unwrap() += 1;
            cv.notify_one();
        }
    });
    Duration::from_micros(longest.into_inner())
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map_or(5, |a| a.parse().expect("RUNS"));
    let mode = match args.next().as_deref() {
        None | Some("simulated") => None,
        Some("emulated") => Some(Mode::Emulated),
        Some(other) => panic!("unknown backend {other} (simulated or emulated)"),
    };
    println!(
        "{ROUNDS} views of 2 ms per thread on {KEYS} keys, pin_wait 1 s; median of {runs} runs"
    );
    println!("| threads | KeysBusy (all runs) | longest enter | semaphore: longest wait |");
    println!("|---:|---:|---:|---:|");
    for threads in [100, 400, 1000] {
        let mut busy = 0;
        let mut waits = Vec::new();
        let mut base = Vec::new();
        for _ in 0..runs {
            let (b, w) = match mode {
                None => keys(
                    &Manager::simulated(KEYS, Config::default()).unwrap(),
                    threads,
                ),
                Some(mode) => keys(
                    &Manager::new(Config {
                        mode,
                        ..Config::default()
                    })
                    .unwrap(),
                    threads,
                ),
            };
            busy += b;
            waits.push(w);
            base.push(semaphore(threads));
        }
        println!(
            "| {threads} | {busy} | {:.0?} | {:.0?} |",
            median(waits),
            median(base)
        );
    }
}
