//! A tight loop of resident enter/leave pairs on the simulated backend, for profilers
//! (`valgrind --tool=callgrind target/release/examples/hit_loop N`) and for checking how
//! the hit path scales (`hit_loop N 2` runs it on two threads, each with its own domain).

use std::time::Instant;

use mpkvirt::{Config, DomainOptions, Manager, Rights};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let mgr = Manager::simulated(15, Config::default()).unwrap();
    let doms: Vec<_> = (0..threads)
        .map(|_| mgr.create_domain(DomainOptions::reserve(4096)).unwrap())
        .collect();
    for d in &doms {
        drop(mgr.enter(&[(d, Rights::ReadWrite)]).unwrap());
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for d in &doms {
            let mgr = &mgr;
            s.spawn(move || {
                for _ in 0..n {
                    drop(std::hint::black_box(
                        mgr.enter(&[(d, Rights::ReadWrite)]).unwrap(),
                    ));
                }
            });
        }
    });
    let t = start.elapsed();
    println!(
        "{threads} thread(s) x {n} pairs: {:.2} ns per pair per thread",
        t.as_nanos() as f64 / n as f64
    );
}
