//! Guarded calls from a thread's last moments give their stacks back (issue 8, reviews).
//!
//! A guarded call runs on a stack that is kept for reuse. The cache used to be per thread:
//! first a Rust thread-local with a destructor, registered when first used — a thread whose
//! first guarded call came from a pthread-key destructor (after the thread-local destructors
//! ran) never ran it; then a cache emptied by mpkvirt's exit hook — a guarded call in glibc's
//! last pthread-key destructor round (which runs no later round) left it full. Each leaked a
//! stack and its two mappings per thread. The cache is process-wide now. The test ends 300
//! threads each way, one after another, and counts the process's mappings.
//!
//! A test binary of its own: the count is process-wide.
//!
//! # Safety
//!
//! A pthread key with a destructor (a plain function) set by each thread, and
//! `Manager::guarded` with a closure that starts no thread.
#![allow(unsafe_code, reason = "a pthread key destructor, and Manager::guarded")]

mod common;

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use common::mappings;
use mpkvirt::{Config, Manager, Mode};

static MGR: OnceLock<Manager> = OnceLock::new();
static KEY: OnceLock<libc::pthread_key_t> = OnceLock::new();
static CALLS: AtomicUsize = AtomicUsize::new(0);
/// In which destructor round (1 to 4) the threads make their guarded call.
static CALL_IN_ROUND: AtomicU32 = AtomicU32::new(1);

thread_local! {
    /// Const-initialised without a destructor: usable in every destructor round.
    static ROUND: Cell<u32> = const { Cell::new(0) };
}

fn set_key() {
    // SAFETY: the key created by the test; a dummy value never dereferenced, non-null so
    // that the destructor runs.
    unsafe { libc::pthread_setspecific(*KEY.get().unwrap(), std::ptr::dangling::<u8>().cast()) };
}

/// The pthread key's destructor: re-arms itself until the chosen round, then makes the
/// thread's first guarded call.
extern "C" fn destructor(_value: *mut libc::c_void) {
    let round = ROUND.get() + 1;
    ROUND.set(round);
    if round < CALL_IN_ROUND.load(Ordering::SeqCst) {
        set_key();
        return;
    }
    let mgr = MGR.get().expect("set before the threads start");
    // SAFETY: the closure starts no thread.
    if unsafe { mgr.guarded(|| 7) }.is_ok_and(|v| v == 7) {
        CALLS.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn guarded_calls_from_pthread_key_destructors_leak_no_stack() {
    const THREADS: usize = 300;
    MGR.get_or_init(|| {
        Manager::new(Config {
            mode: Mode::Auto,
            ..Config::default()
        })
        .unwrap()
    });
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: creates a key whose destructor is the plain function above.
    let made = unsafe { libc::pthread_key_create(&mut key, Some(destructor)) };
    assert_eq!(made, 0);
    KEY.set(key).unwrap();
    // The first round, and glibc's last (PTHREAD_DESTRUCTOR_ITERATIONS is 4).
    for round in [1, 4] {
        CALL_IN_ROUND.store(round, Ordering::SeqCst);
        let calls = CALLS.load(Ordering::SeqCst);
        // A few threads first, so that glibc's stack cache and the library's thread records
        // settle; then the count.
        for _ in 0..5 {
            std::thread::spawn(set_key).join().unwrap();
        }
        let before = mappings();
        for _ in 0..THREADS {
            std::thread::spawn(set_key).join().unwrap();
        }
        let after = mappings();
        assert_eq!(
            CALLS.load(Ordering::SeqCst),
            calls + THREADS + 5,
            "every call ran"
        );
        assert!(
            after < before + THREADS / 10,
            "{THREADS} threads whose first guarded call came from a pthread-key destructor in \
             round {round}: mappings {before} -> {after}"
        );
    }
}
