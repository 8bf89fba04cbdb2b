//! Runs the built-in echo through `Host::invoke_here` in a loop (for profiling the path).
use std::sync::Arc;

use mpkvirt_host::runtime::{App, Code, Host, HostConfig, Limits};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let host = Host::start(HostConfig {
        measure_views_unprotected: std::env::var_os("UNPROTECTED").is_some(),
        ..HostConfig::default()
    })
    .expect("a host");
    host.register(App {
        name: "echo".into(),
        code: Code::Builtin(Arc::new(|r: &[u8]| Ok(r.to_vec()))),
        limits: Limits::default(),
    });
    let t = std::time::Instant::now();
    for _ in 0..n {
        host.invoke_here("echo", b"0123456789").expect("echo");
    }
    println!("{:?} per invocation", t.elapsed() / n as u32);
}
