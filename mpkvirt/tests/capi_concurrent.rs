//! The C API under concurrency, called from Rust threads (its own test binary: `mpk_init`
//! makes one process-wide state). `mpk_init` picks the backend as C programs get it: PKU
//! hardware where it exists (the PKU guest), the emulation otherwise.
//!
//! A failed `mpk_mmap`/`mpk_malloc` must change nothing — in particular it must not take a
//! domain away from threads that allocated from it meanwhile. One thread makes calls that
//! fail (a file opened write-only cannot be mapped; 1 GiB does not fit a domain) on fresh
//! vkeys while two others `mpk_malloc` and `mpk_free` small blocks on the same vkeys: every
//! `mpk_free` of a live allocation must succeed, and no address may be handed out twice
//! while live. The test loops until a deadline (`MPKVIRT_STRESS_SECS`, default 3 s), which
//! bounds how long it looks; nothing is timed.
//!
//! # Safety
//!
//! One `unsafe` block reads the backend's name, a static C string the library returns.

use std::collections::HashMap;
use std::ffi::c_int;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use mpkvirt::capi::{mpk_free, mpk_init, mpk_malloc, mpk_mmap, mpk_munmap, mpkvirt_backend};

fn stress_time() -> Duration {
    let secs = std::env::var("MPKVIRT_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[test]
fn failed_calls_never_take_a_domain_from_threads_using_it() {
    assert_eq!(mpk_init(-1), 0, "mpk_init: errno {}", errno());
    let backend = mpkvirt_backend();
    assert!(!backend.is_null());
    // SAFETY: after a successful mpk_init, mpkvirt_backend returns one of the library's
    // static, NUL-terminated strings.
    let backend = unsafe { std::ffi::CStr::from_ptr(backend) };
    eprintln!("backend: {backend:?}");

    let dir = std::env::temp_dir().join(format!("mpkvirt-capi-concurrent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("write-only");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let write_only = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let fd: c_int = write_only.as_raw_fd();

    const ALLOCATORS: usize = 2;
    let rounds_barrier = Barrier::new(1 + ALLOCATORS);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let fail = |what: String| {
        failure.lock().unwrap().get_or_insert(what);
        stop.store(true, Ordering::SeqCst);
    };
    // Address -> (allocating thread, vkey), for every allocation handed out and not freed.
    let live: Mutex<HashMap<usize, (usize, c_int)>> = Mutex::new(HashMap::new());
    let started = Instant::now();
    let deadline = started + stress_time();
    let mut rounds = 0u64;
    let mut failed_calls = 0u64;
    std::thread::scope(|s| {
        for a in 0..ALLOCATORS {
            let (barrier, stop, live, fail) = (&rounds_barrier, &stop, &live, &fail);
            s.spawn(move || {
                let mut round: c_int = 0;
                loop {
                    barrier.wait(); // round starts (or the test ends)
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    round += 1;
                    let vkey = 1000 + round;
                    // Two blocks, the second a moment later: either may land in the window
                    // where the failing call's domain is visible.
                    let mut mine = Vec::new();
                    for _ in 0..2 {
                        let p = mpk_malloc(vkey, 64) as usize;
                        if p == 0 {
                            fail(format!("allocator {a}: mpk_malloc({vkey}, 64) failed: errno {}", errno()));
                            break;
                        }
                        if let Some(owner) = live.lock().unwrap().insert(p, (a, vkey)) {
                            fail(format!(
                                "allocator {a}: mpk_malloc({vkey}, 64) returned {p:#x}, which is still live (handed to allocator {} for vkey {})",
                                owner.0, owner.1
                            ));
                        }
                        mine.push(p);
                        std::thread::yield_now();
                    }
                    barrier.wait(); // the failing call has returned
                    for p in mine {
                        live.lock().unwrap().remove(&p);
                        if mpk_free(p as *mut _) != 0 {
                            fail(format!(
                                "allocator {a}: mpk_free({p:#x}) of a live allocation (vkey {vkey}) failed: errno {} — a failed call on vkey {vkey} forgot the domain it was allocated in",
                                errno()
                            ));
                        }
                    }
                    barrier.wait(); // everything freed
                }
            });
        }
        let mut round: c_int = 0;
        loop {
            let done = stop.load(Ordering::SeqCst) || Instant::now() >= deadline;
            if done {
                stop.store(true, Ordering::SeqCst);
            }
            rounds_barrier.wait();
            if done {
                break;
            }
            round += 1;
            let vkey = 1000 + round;
            if round % 2 == 0 {
                let p = mpk_mmap(
                    vkey,
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    fd,
                    0,
                );
                if p != libc::MAP_FAILED {
                    fail(format!("mpk_mmap of a write-only file succeeded: {p:?}"));
                }
            } else if !mpk_malloc(vkey, 1 << 30).is_null() {
                fail("mpk_malloc of 1 GiB succeeded".into());
            }
            failed_calls += 1;
            rounds_barrier.wait();
            rounds_barrier.wait();
            // Everything is freed: let the domain go (EINVAL when there is none).
            let _ = mpk_munmap(vkey);
            rounds += 1;
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(what) = failure.into_inner().unwrap() {
        panic!(
            "{what}\n(round {rounds}, {failed_calls} failed calls, {:.0?} into the run)",
            started.elapsed()
        );
    }
    eprintln!("{rounds} rounds, {failed_calls} failed calls");
}
