//! The cost of a miss against the domain's size: one key, two domains entered in turn, so
//! every enter parks one domain and binds the other. One iteration is two misses.
//! Reserved sizes from one page to 1 GiB, with several amounts of memory touched.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mpkvirt::{Backend, Config, DomainOptions, Emulated, Hardware, Manager, Rights};

const PAGE: usize = 4096;

fn bench_sizes<B: Backend>(c: &mut Criterion, name: &str, mgr: &Manager<B>) {
    let mut g = c.benchmark_group(format!("miss/{name}"));
    for (reserved, touched) in [
        (PAGE, 1),
        (2 << 20, 1),
        (2 << 20, 512),
        (64 << 20, 1),
        (64 << 20, 4096),
        (1 << 30, 1),
        (1 << 30, 4096),
    ] {
        let a = mgr.create_domain(DomainOptions::reserve(reserved)).unwrap();
        let b = mgr.create_domain(DomainOptions::reserve(PAGE)).unwrap();
        {
            let _v = mgr.enter(&[(&a, Rights::ReadWrite)]).unwrap();
            for p in 0..touched {
                mgr.write_byte(a.base().as_ptr() as usize + p * PAGE, 1)
                    .unwrap();
            }
        }
        let id = BenchmarkId::from_parameter(format!(
            "{}KiB-reserved/{}-pages-touched",
            reserved / 1024,
            touched
        ));
        g.bench_function(id, |bn| {
            bn.iter(|| {
                drop(mgr.enter(&[(&a, Rights::ReadWrite)]).unwrap());
                drop(mgr.enter(&[(&b, Rights::ReadWrite)]).unwrap());
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let cfg = Config {
        max_keys: 1,
        arena_chunk: 4 << 30,
        ..Config::default()
    };
    bench_sizes(
        c,
        "emulated",
        &Manager::with_backend(Emulated::new(1).unwrap(), cfg.clone()).unwrap(),
    );
    match Hardware::new(1) {
        Ok(hw) => bench_sizes(c, "hardware", &Manager::with_backend(hw, cfg).unwrap()),
        Err(why) => eprintln!("miss/hardware: skipped: {why}"),
    }
}

criterion_group! {
    name = miss;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(30);
    targets = benches
}
criterion_main!(miss);
