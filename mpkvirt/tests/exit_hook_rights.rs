//! The exit hook is armed with the thread's own rights, never by library code.
//!
//! **Attack** (attacker class 2). `pthread_setspecific` finds the slot of a key of 32 or more
//! through a pointer in the thread's TCB — application memory — and allocates it with the
//! program's `malloc` on first use. mpkvirt armed its exit hook with it *inside* an op, where
//! library code runs with every key open: a thread that rewrote that TCB pointer (or the
//! heap's metadata) had library code write the hook's marker where it chose, library memory
//! included. mpkvirt's key is 32 or more whenever the program made 32 keys before it.
//!
//! **Defence** (`gate::arm_from_app`). In protected mode the thread arms the hook itself,
//! from application code, before its op, and tells the record by an op.
//!
//! The test binary interposes `pthread_setspecific` (its definition wins over glibc's for
//! every caller in the executable, mpkvirt included) and records the PKRU of every call that
//! sets mpkvirt's marker (the non-null dangling pointer `1`).
//!
//! # Safety
//!
//! The interposed `pthread_setspecific` forwards to glibc's (`dlsym(RTLD_NEXT)`).
#![allow(unsafe_code, reason = "interposing pthread_setspecific")]

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};

use mpkvirt_sys::require_pku;

/// Calls that set mpkvirt's marker, and how many of them ran with the library key open.
static MARKER_CALLS: AtomicU32 = AtomicU32::new(0);
static WITH_LIBRARY_RIGHTS: AtomicU32 = AtomicU32::new(0);

/// # Safety
///
/// glibc's contract: `key` from `pthread_key_create`; `value` is stored, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_setspecific(
    key: libc::pthread_key_t,
    value: *const c_void,
) -> c_int {
    if value as usize == 1 {
        MARKER_CALLS.fetch_add(1, Ordering::SeqCst);
        // PKRU 0 opens every key: what library code runs with (`PKRU_LIB`).
        if let Some(p) = mpkvirt_sys::Pku::new()
            && p.rdpkru().bits() == 0
        {
            WITH_LIBRARY_RIGHTS.fetch_add(1, Ordering::SeqCst);
        }
    }
    type Real = unsafe extern "C" fn(libc::pthread_key_t, *const c_void) -> c_int;
    // SAFETY: looks up the next definition of a libc function by its NUL-terminated name.
    let real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_setspecific".as_ptr()) };
    assert!(!real.is_null(), "glibc's pthread_setspecific");
    // SAFETY: `real` is glibc's `pthread_setspecific`, of this type.
    let real: Real = unsafe { std::mem::transmute::<*mut c_void, Real>(real) };
    // SAFETY: forwarded as given.
    unsafe { real(key, value) }
}

/// In protected mode: a fresh thread's first calls arm the hook with its own rights.
#[test]
fn pku_the_exit_hook_is_armed_with_the_threads_own_rights() {
    let _pku = require_pku!();
    mpkvirt::thread::without_rights(|| ()).unwrap();
    assert_eq!(
        mpkvirt::MetadataMode::Protected,
        mpkvirt::Manager::<mpkvirt::Hardware>::with_backend(
            mpkvirt::Hardware::new(1).unwrap(),
            mpkvirt::Config {
                max_keys: 1,
                ..mpkvirt::Config::default()
            },
        )
        .unwrap()
        .metadata_mode(),
        "setup: protected mode"
    );
    let before = MARKER_CALLS.load(Ordering::SeqCst);
    std::thread::spawn(|| {
        for _ in 0..3 {
            mpkvirt::thread::without_rights(|| ()).unwrap();
        }
    })
    .join()
    .unwrap();
    // (Rust's runtime may set a marker of 1 in a key of its own too.)
    assert!(
        MARKER_CALLS.load(Ordering::SeqCst) > before,
        "setup: the thread armed its exit hook"
    );
    assert_eq!(
        WITH_LIBRARY_RIGHTS.load(Ordering::SeqCst),
        0,
        "pthread_setspecific ran with every key open (inside the library)"
    );
}
