//! Time the eviction policies take per access when replaying traces (the decision cost; the
//! miss counts are in `src/bin/policy_report.rs`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mpkvirt::policy::{PolicyKind, simulate, trace};

fn benches(c: &mut Criterion) {
    let len = 100_000;
    let traces = [
        ("zipf-1000", trace::zipf(1000, len, 0.99, 1)),
        (
            "serverless-1000",
            trace::serverless(250, 3, len, 0.99, 4.0, 1),
        ),
    ];
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(len as u64));
    for (name, t) in &traces {
        for (kind, label) in [
            (PolicyKind::Lru, "lru"),
            (PolicyKind::Hinted, "hinted-64"),
            (PolicyKind::Opt, "opt"),
        ] {
            g.bench_with_input(BenchmarkId::new(label, name), t, |b, t| {
                b.iter(|| simulate(black_box(t), 15, kind, 64))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = policy;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).sample_size(20);
    targets = benches
}
criterion_main!(policy);
