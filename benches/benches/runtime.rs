//! A warm invocation through the runtime (`host/src/runtime`), against calling the function
//! directly, natively.
//!
//! - `direct`: the built-in echo function called as a Rust closure (no isolation);
//! - `invoke_here`: `Host::invoke_here` on the bench thread: admission, a warm instance slot
//!   from the pool, the request copied into the instance, the function run in the slot's
//!   sandbox (a stack in its domain, a sealed view), the response copied out, the slot back
//!   warm, the thread's timer armed and disarmed;
//! - `invoke`: `Host::invoke`, the same through the queue and a worker thread (a handoff
//!   between threads each way);
//! - `invoke_here, new instance`: three applications over two slots, so that every
//!   invocation takes a slot another application left warm: the pool resets it and the
//!   instance is laid out anew.
//!
//! Natively the backend is the emulated one: views are `mprotect`s (process-wide), and the
//! host runs one worker. The `-views-unprotected` group runs the same with
//! `HostConfig::measure_views_unprotected` (instances open to every thread, so views change
//! no protection): what is left is what PKU hardware pays too, minus its WRPKRUs. ARCHITECTURE.md counts the gate calls of an invocation, which is
//! what PKU hardware pays instead (two WRPKRUs each); `benches/run-on-pku-hardware.sh` runs
//! this bench there.
//!
//! `cargo bench -p mpkvirt-benches --bench runtime`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mpkvirt_host::runtime::{App, Builtin, Code, Host, HostConfig, Limits};

/// A host with `slots` instance slots and the built-in echo under each of `names`; the
/// criterion group its benchmarks go in (named by backend and mode); the echo itself.
fn echo_host<'c>(
    c: &'c mut Criterion,
    slots: usize,
    clean_slots: usize,
    names: &[String],
    views_unprotected: bool,
) -> (
    Host,
    criterion::BenchmarkGroup<'c, criterion::measurement::WallTime>,
    Arc<Builtin>,
) {
    let host = Host::start(HostConfig {
        slots,
        slot_size: 1 << 20,
        stack_size: 64 << 10,
        clean_slots,
        measure_views_unprotected: views_unprotected,
        ..HostConfig::default()
    })
    .expect("a host");
    let echo: Arc<Builtin> = Arc::new(|req: &[u8]| Ok(req.to_vec()));
    for n in names {
        host.register(App {
            name: n.clone(),
            code: Code::Builtin(echo.clone()),
            limits: Limits::default(),
        });
    }
    let mode = if views_unprotected {
        "-views-unprotected"
    } else {
        ""
    };
    let mut g = c.benchmark_group(format!("runtime/{}{mode}", host.backend_kind()));
    g.measurement_time(Duration::from_secs(3));
    (host, g, echo)
}

fn bench_host(c: &mut Criterion, views_unprotected: bool) {
    let (host, mut g, echo) = echo_host(c, 16, 0, &["echo".into()], views_unprotected);
    let req = vec![7u8; 64];
    // Warm the slot.
    host.invoke_here("echo", &req).unwrap();
    g.bench_function("direct", |b| b.iter(|| echo(black_box(&req)).unwrap()));
    g.bench_function("invoke_here", |b| {
        b.iter(|| host.invoke_here("echo", black_box(&req)).unwrap())
    });
    g.bench_function("invoke", |b| {
        b.iter(|| host.invoke("echo", black_box(&req)).unwrap())
    });
    g.finish();
}

/// Each invocation is a new instance from a pooled slot: the runtime lays it out anew (stack,
/// frame, request buffer). Three applications over two slots: without a clean stock
/// (`clean_slots: 0`) every invocation takes a slot another application left warm and resets
/// it on its path; with one, the slot was reset beforehand (the watchdog's background work,
/// done here between iterations, untimed) and the invocation takes it as it is.
fn bench_new_instance(c: &mut Criterion, views_unprotected: bool) {
    let names: Vec<String> = (0..3).map(|i| format!("echo-{i}")).collect();
    let req = vec![7u8; 64];
    {
        let (host, mut g, _) = echo_host(c, 2, 0, &names, views_unprotected);
        let mut k = 0;
        g.bench_function("invoke_here, new instance (slot reset)", |b| {
            b.iter(|| {
                k = (k + 1) % names.len();
                host.invoke_here(&names[k], black_box(&req)).unwrap()
            })
        });
        g.finish();
    }
    let (host, mut g, _) = echo_host(c, 2, 1, &names, views_unprotected);
    let mut k = 0;
    g.bench_function("invoke_here, new instance (clean slot)", |b| {
        b.iter_batched(
            || {
                host.clean_slots();
                k = (k + 1) % names.len();
                k
            },
            |k| host.invoke_here(&names[k], black_box(&req)).unwrap(),
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_host(c, false);
    bench_host(c, true);
    bench_new_instance(c, false);
    bench_new_instance(c, true);
}

criterion_group!(runtime, benches);
criterion_main!(runtime);
