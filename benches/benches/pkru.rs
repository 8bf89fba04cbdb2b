//! Raw RDPKRU/WRPKRU. Only where PKU exists; elsewhere this prints why it skipped, so the
//! same command is ready for the first machine with PKU. The gates (a whole library call) are
//! measured by the `switch` benchmarks, with metadata protection on and off.
#![allow(unsafe_code, reason = "times the raw instructions and gates")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mpkvirt_sys::{AccessRights, Pkey, Pkru};

fn benches(c: &mut Criterion) {
    let pku = match mpkvirt_sys::detect::pku() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("pkru/*: skipped: no PKU ({why})");
            return;
        }
    };
    let base = pku.rdpkru();
    let other = base.with(Pkey::new(1).unwrap(), AccessRights::READ_WRITE);
    // The values below differ from the thread's own only in key 1's bits and keep key 0
    // open; the benchmark owns this thread's PKRU and restores it at the end.
    let write = |v: Pkru| {
        // SAFETY: see above: only key 1's bits change, key 0 stays open.
        unsafe { pku.wrpkru(v) }
    };
    let mut g = c.benchmark_group("pkru");
    g.bench_function("rdpkru", |b| b.iter(|| black_box(pku.rdpkru())));
    g.bench_function("wrpkru-same-value", |b| b.iter(|| write(black_box(base))));
    g.bench_function("wrpkru-alternating", |b| {
        b.iter(|| {
            write(black_box(other));
            write(black_box(base));
        })
    });
    g.finish();
    write(base);
}

criterion_group!(pkru, benches);
criterion_main!(pkru);
