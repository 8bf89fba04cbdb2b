//! Miss rate with idle threads (issue 8, item 8): one thread cycles through 16 domains on 15
//! keys (every enter is a miss that evicts), alone, then with IDLE threads that each entered
//! a view once and now sleep on a barrier, then after those threads exited. Prints misses
//! per second and the number of threads the misses still look at.
//!
//! ```text
//! cargo run --release -p mpkvirt --example idle_threads [-- IDLE SECONDS [simulated|emulated]]
//! ```

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use mpkvirt::{Backend, Config, DomainOptions, Emulated, Manager, Rights};

/// Misses per second of the calling thread over `secs`, and the longest single miss.
fn misses<B: Backend>(mgr: &Manager<B>, doms: &[mpkvirt::Domain<B>], secs: f64) -> (f64, Duration) {
    let before = mgr.stats().misses;
    let t = Instant::now();
    let mut longest = Duration::ZERO;
    let mut i = 0;
    while t.elapsed().as_secs_f64() < secs {
        let t1 = Instant::now();
        drop(
            mgr.enter(&[(&doms[i % doms.len()], Rights::ReadWrite)])
                .unwrap(),
        );
        longest = longest.max(t1.elapsed());
        i += 1;
    }
    let n = mgr.stats().misses - before;
    (n as f64 / t.elapsed().as_secs_f64(), longest)
}

fn report(what: &str, (rate, longest): (f64, Duration), watched: u64) {
    println!(
        "| {what} | {:.0} | {:.1} µs | {watched} |",
        rate,
        longest.as_secs_f64() * 1e6
    );
}

fn run<B: Backend>(mgr: Manager<B>, idle: usize, secs: f64) {
    let doms: Vec<_> = (0..17)
        .map(|_| mgr.create_domain(DomainOptions::default()).unwrap())
        .collect();
    let (shared, cycle) = doms.split_first().unwrap();
    // Warm up.
    misses(&mgr, cycle, 0.1);
    report(
        "no other thread",
        misses(&mgr, cycle, secs),
        mgr.stats().watched_threads,
    );
    let entered = Barrier::new(idle + 1);
    let release = Barrier::new(idle + 1);
    thread::scope(|s| {
        let handles: Vec<_> = (0..idle)
            .map(|_| {
                let (mgr, shared, entered, release) = (&mgr, shared, &entered, &release);
                thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn_scoped(s, move || {
                        drop(mgr.enter(&[(shared, Rights::ReadOnly)]).unwrap());
                        entered.wait();
                        release.wait();
                    })
                    .unwrap()
            })
            .collect();
        entered.wait();
        let watched = mgr.stats().watched_threads;
        report(
            &format!("{idle} idle threads (watched before: {watched})"),
            misses(&mgr, cycle, secs),
            mgr.stats().watched_threads,
        );
        release.wait();
        for h in handles {
            h.join().unwrap();
        }
    });
    report(
        &format!("after the {idle} threads exited"),
        misses(&mgr, cycle, secs),
        mgr.stats().watched_threads,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let idle: usize = args.next().map_or(2000, |s| s.parse().expect("threads"));
    let secs: f64 = args.next().map_or(1.0, |s| s.parse().expect("seconds"));
    let backend = args.next().unwrap_or_else(|| "simulated".into());
    let config = Config {
        max_keys: 15,
        ..Config::default()
    };
    println!("{backend} backend, 15 keys, 16 domains in turn: every enter misses and evicts");
    println!("| threads besides the missing one | misses/s | longest miss | watched after |");
    println!("|---|---:|---:|---:|");
    match backend.as_str() {
        "simulated" => run(Manager::simulated(15, config).unwrap(), idle, secs),
        "emulated" => run(
            Manager::with_backend(Emulated::new(15).unwrap(), config).unwrap(),
            idle,
            secs,
        ),
        other => panic!("unknown backend {other}"),
    }
}
