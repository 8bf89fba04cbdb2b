//! Density: many idle instances resident in one process (issue 9's density measurement).
//!
//! Makes N instance slots in the pool (`instance/pool.rs`), lends each to an application of
//! its own, has it write one byte (a touched page: an instance that ran once), and releases
//! it warm — N idle, warm instances. Prints the process's resident memory and address-space
//! mappings before and after, per instance. mpkvirt's emulated backend, natively (real
//! memory; on PKU hardware the layout is the same, with `pkey_mprotect` for `mprotect`).
//!
//! ```text
//! cargo run --release -p mpkvirt-host --example density [-- N [SLOT_KIB]]
//! ```

use mpkvirt::{Config, Emulated, Manager, Rights};
use mpkvirt_host::instance::pool::{Pool, Release};

/// `(resident KiB, mappings)` of this process.
fn usage() -> (usize, usize) {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count();
    (pages * mpkvirt_sys::mman::page_size() / 1024, maps)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(10_000, |a| a.parse().expect("N"));
    let slot_kib: usize = args.next().map_or(64, |a| a.parse().expect("SLOT_KIB"));
    let mgr = Manager::with_backend(Emulated::new(15).unwrap(), Config::default()).unwrap();
    let (rss0, maps0) = usage();
    let mut pool = Pool::new(mgr.clone(), slot_kib << 10, 0, n).unwrap();
    for app in 0..n {
        let s = pool.acquire(app as u32).unwrap();
        let d = s.domain();
        let at = d.base().as_ptr() as usize;
        mgr.with_view(&[(d, Rights::ReadWrite)], || mgr.write_byte(at, 1).unwrap())
            .unwrap();
        pool.release(s, Release::Warm).unwrap();
    }
    let (rss1, maps1) = usage();
    println!(
        "{n} idle warm instances of {slot_kib} KiB (one page touched each): resident {rss0} -> {rss1} KiB \
         ({:.1} KiB per instance, of which 4 KiB is its touched page), mappings {maps0} -> {maps1}",
        (rss1 - rss0) as f64 / n as f64
    );
    let st = mgr.stats();
    println!(
        "mpkvirt: {} domains alive, {} evictions",
        st.domains, st.evictions
    );
}
