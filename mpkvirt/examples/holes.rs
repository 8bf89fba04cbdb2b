//! Creating a domain among many holes (issue 8, item 7): 2 × HOLES one-page domains, every
//! other one dropped, leave HOLES one-page holes in the manager's free ranges. Prints the
//! mean time of a create that fits no hole (two pages: a first-fit scan would visit every
//! hole) and of a one-page create (it fills the lowest hole when there is one), against a
//! manager without holes.
//!
//! ```text
//! cargo run --release -p mpkvirt --example holes [-- HOLES [simulated|emulated]]
//! ```

use std::time::Instant;

use mpkvirt::{Backend, Config, Domain, DomainOptions, Emulated, Manager};

const PAGE: usize = 4096;
const SAMPLES: usize = 10_000;

/// Mean nanoseconds per create of `pages`-page domains (kept alive, so each is a new one).
fn creates<B: Backend>(mgr: &Manager<B>, pages: usize, n: usize) -> f64 {
    let t = Instant::now();
    let kept: Vec<Domain<B>> = (0..n)
        .map(|_| {
            mgr.create_domain(DomainOptions::reserve(pages * PAGE))
                .unwrap()
        })
        .collect();
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    drop(kept);
    ns
}

fn row<B: Backend>(mgr: Manager<B>, holes: usize) {
    let mut doms: Vec<Option<Domain<B>>> = (0..2 * holes)
        .map(|_| Some(mgr.create_domain(DomainOptions::reserve(PAGE)).unwrap()))
        .collect();
    for d in doms.iter_mut().step_by(2) {
        drop(d.take());
    }
    // Two-page creates first (they fit no hole and leave the holes as they are), then
    // one-page creates (each fills the lowest hole).
    let no_fit = creates(&mgr, 2, SAMPLES);
    let fit = creates(&mgr, 1, SAMPLES);
    println!("| {holes} | {:.2} µs | {:.2} µs |", no_fit / 1e3, fit / 1e3);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let holes: usize = args.next().map_or(30_000, |s| s.parse().expect("holes"));
    let backend = args.next().unwrap_or_else(|| "simulated".into());
    let config = Config {
        max_keys: 4,
        arena_chunk: 4 << 30,
        ..Config::default()
    };
    println!("{backend} backend; mean of {SAMPLES} creates of each size");
    println!("| holes | create, 2 pages (fits no hole) | create, 1 page (fills a hole if any) |");
    println!("|---:|---:|---:|");
    for h in [0, holes] {
        match backend.as_str() {
            "simulated" => row(Manager::simulated(4, config.clone()).unwrap(), h),
            "emulated" => row(
                Manager::with_backend(Emulated::new(4).unwrap(), config.clone()).unwrap(),
                h,
            ),
            other => panic!("unknown backend {other}"),
        }
    }
}
