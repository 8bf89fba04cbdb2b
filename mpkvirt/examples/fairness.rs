//! Fairness with more threads than keys (issue 8, item 2): N threads, each with a domain of
//! its own, enter and leave one-domain views in a loop on 15 keys for a fixed time. Inside
//! each view a thread writes a byte and yields, or sleeps HOLD_MS. Prints, per thread
//! count, the views per thread (min / median / max), the longest wait of one enter, and how
//! many enters failed with `KeysBusy` (`pin_wait` = 5 s).
//!
//! ```text
//! cargo run --release -p mpkvirt --example fairness [-- SECONDS [simulated|emulated|hardware [HOLD_MS]]]
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mpkvirt::{Backend, Config, DomainOptions, Emulated, Error, Hardware, Manager, Rights};

struct Row {
    threads: usize,
    views: Vec<u64>,
    max_wait: Duration,
    busy: u64,
}

fn run<B: Backend>(mgr: &Manager<B>, threads: usize, secs: f64, hold: Option<Duration>) -> Row {
    let doms: Vec<_> = (0..threads)
        .map(|_| mgr.create_domain(DomainOptions::reserve(4096)).unwrap())
        .collect();
    let stop = AtomicBool::new(false);
    let per_thread: Vec<(u64, Duration, u64)> = thread::scope(|s| {
        let handles: Vec<_> = doms
            .iter()
            .map(|d| {
                let stop = &stop;
                s.spawn(move || {
                    let addr = d.base().as_ptr() as usize;
                    let (mut views, mut max_wait, mut busy) = (0u64, Duration::ZERO, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match mgr.enter(&[(d, Rights::ReadWrite)]) {
                            Ok(g) => {
                                max_wait = max_wait.max(t.elapsed());
                                mgr.write_byte(addr, views as u8).unwrap();
                                match hold {
                                    Some(t) => thread::sleep(t),
                                    None => thread::yield_now(),
                                }
                                drop(g);
                                views += 1;
                            }
                            Err(Error::KeysBusy { .. }) => {
                                max_wait = max_wait.max(t.elapsed());
                                busy += 1;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    (views, max_wait, busy)
                })
            })
            .collect();
        thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut views: Vec<u64> = per_thread.iter().map(|r| r.0).collect();
    views.sort_unstable();
    Row {
        threads,
        views,
        max_wait: per_thread.iter().map(|r| r.1).max().unwrap_or_default(),
        busy: per_thread.iter().map(|r| r.2).sum(),
    }
}

fn config() -> Config {
    Config {
        max_keys: 15,
        pin_wait: Duration::from_secs(5),
        ..Config::default()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().map_or(2.0, |s| s.parse().expect("seconds"));
    let backend = args.next().unwrap_or_else(|| "simulated".into());
    let hold = args
        .next()
        .map(|ms| Duration::from_millis(ms.parse().expect("milliseconds")));
    println!(
        "{backend} backend, 15 keys, pin_wait 5 s, {secs} s per row; one-domain views (each thread its own domain), held {}",
        hold.map_or("for a yield".to_string(), |h| format!("{h:?}"))
    );
    println!("| threads | views (all) | min | median | max | longest enter | KeysBusy |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for threads in [16, 32] {
        let row = match backend.as_str() {
            "simulated" => run(
                &Manager::simulated(15, config()).unwrap(),
                threads,
                secs,
                hold,
            ),
            "emulated" => run(
                &Manager::with_backend(Emulated::new(15).unwrap(), config()).unwrap(),
                threads,
                secs,
                hold,
            ),
            "hardware" => run(
                &Manager::with_backend(Hardware::new(15).unwrap(), config()).unwrap(),
                threads,
                secs,
                hold,
            ),
            other => panic!("unknown backend {other}"),
        };
        let v = &row.views;
        println!(
            "| {} | {} | {} | {} | {} | {:.1} ms | {} |",
            row.threads,
            v.iter().sum::<u64>(),
            v[0],
            v[v.len() / 2],
            v[v.len() - 1],
            row.max_wait.as_secs_f64() * 1e3,
            row.busy
        );
    }
}
