//! Lending an instance slot from the pool (`host/src/instance/pool.rs`), natively.
//!
//! - `warm`: acquire the slot the application left warm and release it warm again;
//! - `reset`: acquire a clean slot and release it reset (`Domain::reset`: its touched page
//!   given back, its heap emptied), the cost of a slot changing hands;
//!
//! each on the simulated backend (no memory: the pool's own bookkeeping and mpkvirt's ops)
//! and on the emulated one (real memory: the reset's `madvise` and re-protection).
//!
//! `cargo bench -p mpkvirt-benches --bench instance`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mpkvirt::{Backend, Config, Emulated, Manager, Rights};
use mpkvirt_host::instance::pool::{Pool, Release};

const SLOT: usize = 256 << 10;

fn bench_pool<B: Backend>(c: &mut Criterion, name: &str, mgr: Manager<B>, touch: bool) {
    let mut g = c.benchmark_group(format!("instance/{name}"));
    let mut pool = Pool::new(mgr.clone(), SLOT, 4, 4).unwrap();
    g.bench_function("warm", |b| {
        b.iter(|| {
            let s = pool.acquire(black_box(1)).unwrap();
            pool.release(s, Release::Warm).unwrap();
        })
    });
    let mut pool = Pool::new(mgr.clone(), SLOT, 4, 4).unwrap();
    g.bench_function("reset", |b| {
        b.iter(|| {
            let s = pool.acquire(black_box(2)).unwrap();
            if touch {
                let d = s.domain();
                let a = d.base().as_ptr() as usize;
                mgr.with_view(&[(d, Rights::ReadWrite)], || mgr.write_byte(a, 1).unwrap())
                    .unwrap();
            }
            pool.release(s, Release::Reset).unwrap();
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_pool(
        c,
        "simulated",
        Manager::simulated(15, Config::default()).unwrap(),
        false,
    );
    bench_pool(
        c,
        "emulated",
        Manager::with_backend(Emulated::new(15).unwrap(), Config::default()).unwrap(),
        true,
    );
}

criterion_group!(instance, benches);
criterion_main!(instance);
