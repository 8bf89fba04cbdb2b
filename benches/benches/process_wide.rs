//! Process-wide rights changes (libmpk's `mpk_mprotect` mode) against `mprotect` of the same
//! pages, with 1, 2 and 4 threads in the process — the comparison libmpk makes for its 8.1×.
//! One iteration is a pair: read-only for everyone, then nothing.
//!
//! - `mprotect`: `mprotect(PROT_READ)` + `mprotect(PROT_NONE)` of a range as large as the
//!   domain (4 touched pages and `mpk_mmap`'s headroom).
//! - `mpk_mprotect`: the C API on the default backend (hardware with PKU: a PKRU change
//!   signalled to every thread, no page-table change; emulated without: one `mprotect` per
//!   change plus the library call).
//! - `sync-all`: `mpkvirt::thread::sync_process_wide()` — a signal round trip to every other
//!   thread: what a revocation costs on PKU hardware when every thread touched the domain
//!   since it was granted (without PKU the handler writes no PKRU; the rest is the same).
//! - `revoke-no-holders`: a revocation round when no other thread took the grant (they are
//!   known to mpkvirt and hold nothing): listing the threads and looking at their records.
//!
//! The other threads are either idle (blocked in a futex, like a worker pool between
//! requests) or busy (spinning in user code: `mprotect` then pays TLB shootdowns, the signal
//! path a context switch if they share a CPU).
#![allow(unsafe_code, reason = "mprotect of the baseline's own mapping")]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::thread::JoinHandle;

use criterion::{Criterion, criterion_group, criterion_main};
use mpkvirt::capi;

const PAGES: usize = 4;
const VKEY: i32 = 77;

/// `n` other threads, idle or busy, until dropped.
struct Others {
    stop: Arc<AtomicBool>,
    idle: Vec<Sender<()>>,
    handles: Vec<JoinHandle<()>>,
}

impl Others {
    fn new(n: usize, busy: bool) -> Others {
        let stop = Arc::new(AtomicBool::new(false));
        let mut idle = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n {
            let stop = stop.clone();
            if busy {
                handles.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                }));
            } else {
                let (tx, rx) = channel::<()>();
                idle.push(tx);
                handles.push(std::thread::spawn(move || while rx.recv().is_ok() {}));
            }
        }
        Others {
            stop,
            idle,
            handles,
        }
    }
}

impl Drop for Others {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.idle.clear();
        for h in self.handles.drain(..) {
            h.join().unwrap();
        }
    }
}

fn bench(c: &mut Criterion) {
    let page = mpkvirt_sys::mman::page_size();
    let len = PAGES * page;
    // The baseline's pages, touched once, in a range as large as the domain's (`mpk_mmap`
    // reserves headroom after the mapping, and rights apply to the whole domain).
    let range = len + capi::DOMAIN_HEADROOM;
    let base = mpkvirt_sys::mman::reserve(range, mpkvirt_sys::mman::Prot::READ_WRITE).unwrap();
    for p in 0..PAGES {
        // SAFETY: inside the fresh private mapping above, which nothing else uses.
        unsafe { base.wrapping_add(p * page).write_volatile(1) };
    }
    let mprotect = |prot: i32| {
        // SAFETY: the benchmark's own mapping; no Rust reference points into it.
        let rc = unsafe { libc::mprotect(base.cast(), range, prot) };
        assert_eq!(rc, 0);
    };
    // The domain's pages, touched once from inside a view.
    assert_eq!(capi::mpk_init(-1), 0);
    let dom = capi::mpk_mmap(
        VKEY,
        std::ptr::null_mut(),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    assert_ne!(dom, libc::MAP_FAILED);
    assert_eq!(capi::mpk_begin(VKEY, libc::PROT_READ | libc::PROT_WRITE), 0);
    for p in 0..PAGES {
        // SAFETY: the domain's own pages, inside its view; raw writes only.
        unsafe { dom.cast::<u8>().wrapping_add(p * page).write_volatile(1) };
    }
    assert_eq!(capi::mpk_end(VKEY), 0);
    let backend = {
        // SAFETY: mpkvirt_backend returns a static NUL-terminated string after mpk_init.
        let name = unsafe { std::ffi::CStr::from_ptr(capi::mpkvirt_backend()) };
        name.to_string_lossy().into_owned()
    };

    let mut g = c.benchmark_group("process_wide");
    for (threads, busy) in [(1, false), (2, false), (4, false), (2, true)] {
        let others = Others::new(threads - 1, busy);
        let tag = format!("{threads}-threads{}", if busy { "-busy" } else { "" });
        g.bench_function(format!("mprotect/{tag}"), |b| {
            b.iter(|| {
                mprotect(black_box(libc::PROT_READ));
                mprotect(black_box(libc::PROT_NONE));
            })
        });
        g.bench_function(format!("mpk_mprotect-{backend}/{tag}"), |b| {
            b.iter(|| {
                assert_eq!(capi::mpk_mprotect(VKEY, black_box(libc::PROT_READ)), 0);
                assert_eq!(capi::mpk_mprotect(VKEY, black_box(libc::PROT_NONE)), 0);
            })
        });
        g.bench_function(format!("sync-all/{tag}"), |b| {
            b.iter(|| mpkvirt::thread::sync_process_wide().unwrap())
        });
        g.bench_function(format!("revoke-no-holders/{tag}"), |b| {
            b.iter(|| mpkvirt::testing::revocation_round(0b1100).unwrap())
        });
        drop(others);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
