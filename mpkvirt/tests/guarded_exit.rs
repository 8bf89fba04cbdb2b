//! Guarded calls from a thread's last moments give their stacks back (issue 8, review 8).
//!
//! A guarded call runs on a stack the thread keeps for reuse. The cache used to be a Rust
//! thread-local with a destructor, registered when first used; a thread whose first guarded
//! call came from a pthread-key destructor (after the thread-local destructors ran) never
//! ran it, and leaked the stack and its two mappings, one per such thread. The test ends
//! 300 threads that way, one after another, and counts the process's mappings.
//!
//! A test binary of its own: the count is process-wide.
//!
//! # Safety
//!
//! A pthread key with a destructor (a plain function) set by each thread, and
//! `Manager::guarded` with a closure that starts no thread.
#![allow(unsafe_code, reason = "a pthread key destructor, and Manager::guarded")]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use mpkvirt::{Config, Manager, Mode};

static MGR: OnceLock<Manager> = OnceLock::new();
static CALLS: AtomicUsize = AtomicUsize::new(0);

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

/// The pthread key's destructor: the thread's first guarded call.
extern "C" fn last_words(_value: *mut libc::c_void) {
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
    let made = unsafe { libc::pthread_key_create(&mut key, Some(last_words)) };
    assert_eq!(made, 0);
    let thread = move || {
        // A non-null value, so that the destructor runs when the thread ends.
        // SAFETY: a key created above; the value is a dummy never dereferenced.
        unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<u8>().cast()) };
    };
    // A few threads first, so that glibc's stack cache and the library's thread records
    // settle; then the count.
    for _ in 0..5 {
        std::thread::spawn(thread).join().unwrap();
    }
    let before = mappings();
    for _ in 0..THREADS {
        std::thread::spawn(thread).join().unwrap();
    }
    let after = mappings();
    assert_eq!(CALLS.load(Ordering::SeqCst), THREADS + 5, "every call ran");
    assert!(
        after < before + THREADS / 10,
        "{THREADS} threads whose first guarded call came from a pthread-key destructor: \
         mappings {before} -> {after}"
    );
}
