//! Replays traces through the eviction policies and prints the miss table (markdown) that
//! `docs/benchmarks.md` quotes; with `--csv PATH` also writes the raw numbers for plotting.
//!
//! Capacity is 15 keys (all hardware keys). The hinted policy sees the next `--lookahead N`
//! accesses (default 64: a run queue of 32 requests touching two domains each), OPT sees
//! the whole future.

use std::fmt::Write as _;

use mpkvirt::policy::{PolicyKind, Stats, simulate, trace};

const KEYS: usize = 15;
const LEN: usize = 200_000;

struct Row {
    trace: &'static str,
    domains: usize,
    lru: Stats,
    hinted: Stats,
    opt: Stats,
}

fn run(trace: &'static str, domains: usize, t: &[u64], lookahead: usize) -> Row {
    Row {
        trace,
        domains,
        lru: simulate(t, KEYS, PolicyKind::Lru, 0),
        hinted: simulate(t, KEYS, PolicyKind::Hinted, lookahead),
        opt: simulate(t, KEYS, PolicyKind::Opt, 0),
    }
}

fn main() {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let csv_path = arg("--csv");
    let lookahead: usize = arg("--lookahead").map_or(64, |v| v.parse().expect("--lookahead N"));
    let mut rows = Vec::new();
    for &n in &[16usize, 100, 1_000, 10_000, 100_000] {
        rows.push(run("uniform", n, &trace::uniform(n, LEN, 1), lookahead));
        rows.push(run(
            "zipf-0.99",
            n,
            &trace::zipf(n, LEN, 0.99, 2),
            lookahead,
        ));
        // A request touches its app's image domain and one of 3 instance domains.
        let apps = (n / 4).max(1);
        rows.push(run(
            "serverless",
            apps * 4,
            &trace::serverless(apps, 3, LEN, 0.99, 4.0, 3),
            lookahead,
        ));
    }
    for &n in &[16usize, 20, 24, 30, 64, 1_000] {
        rows.push(run("loop", n, &trace::scan(n, LEN), lookahead));
    }

    let mut md = String::new();
    writeln!(md, "| trace | domains | LRU misses | hinted (next {lookahead}) misses | OPT misses | hinted / OPT | LRU / hinted |").unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|").unwrap();
    let mut csv = String::from("trace,domains,accesses,lru_misses,hinted_misses,opt_misses\n");
    for r in &rows {
        let ratio = |a: u64, b: u64| {
            if b == 0 {
                "-".to_string()
            } else {
                format!("{:.2}", a as f64 / b as f64)
            }
        };
        writeln!(
            md,
            "| {} | {} | {} ({:.1} %) | {} ({:.1} %) | {} ({:.1} %) | {} | {} |",
            r.trace,
            r.domains,
            r.lru.misses,
            100.0 * r.lru.miss_ratio(),
            r.hinted.misses,
            100.0 * r.hinted.miss_ratio(),
            r.opt.misses,
            100.0 * r.opt.miss_ratio(),
            ratio(r.hinted.misses, r.opt.misses),
            ratio(r.lru.misses, r.hinted.misses),
        )
        .unwrap();
        writeln!(
            csv,
            "{},{},{},{},{},{}",
            r.trace, r.domains, LEN, r.lru.misses, r.hinted.misses, r.opt.misses
        )
        .unwrap();
    }
    print!("{md}");
    if let Some(path) = csv_path {
        std::fs::write(&path, csv).unwrap_or_else(|e| panic!("write {path}: {e}"));
        eprintln!("wrote {path}");
    }
}
