//! `mpk_munmap(v)` while another thread's `mpk_mprotect(v, PROT_NONE)` still waits for
//! threads to drop the process-wide rights (`capi.rs` `munmap_op` → `global::set(None)` →
//! `lifecycle::destroy` → `binding::release_key`).
//!
//! The attack: the destruction's own revocation sees the field already revoked; if it
//! returned at once and dropped the global pin, `release_key` would find neither a pin nor a
//! taint and free the key, and the next vkey would get it while a thread still holds the old
//! rights.
//!
//! The defence: the destruction's revocation joins the one in progress (`Inner::revoking`)
//! and returns only when it has ended; a failed revocation has tainted the key by then, so
//! `release_key` makes it dead instead of free. (Its own binary: `mpk_init` is process-wide.)
//!
//! # Safety
//!
//! Raw PKRU reads, writes to memory `mpk_malloc` returned inside a begun domain, and
//! mpkvirt's probe; blocking the sync signal touches only the calling thread's mask.
#![allow(unsafe_code, reason = "probe, signal mask, C API memory")]

use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use mpkvirt::capi::{mpk_begin, mpk_end, mpk_init, mpk_malloc, mpk_mprotect, mpk_munmap};
use mpkvirt_sys::{Pkru, Pku, require_pku};

const SECRET: u8 = 77;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn block_sync() {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: initialises the set we own.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised above.
    let mut set = unsafe { set.assume_init() };
    // SAFETY: writes only our set.
    unsafe { libc::sigaddset(&mut set, libc::SIGRTMIN() + 7) };
    // SAFETY: changes only this thread's mask; the set is valid and the old mask is not
    // asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    assert_eq!(r, 0);
}

/// A thread that never calls mpkvirt and is slow to take revocations.
struct Slow {
    tx: Sender<usize>,
    rx: Receiver<(u32, u64)>,
}

impl Slow {
    fn new() -> Slow {
        let (tx, cmds) = channel::<usize>();
        let (answers, rx) = channel();
        std::thread::spawn(move || {
            block_sync();
            while let Ok(addr) = cmds.recv() {
                let pkru = Pku::new().map_or(0, |p| p.rdpkru().bits());
                let read = if addr == 0 {
                    0
                } else {
                    // SAFETY: domain memory; mpkvirt's SIGSEGV handler recovers the probe.
                    unsafe { mpkvirt_asm::mpkvirt_probe_read8(addr as *const u8) }
                };
                answers.send((pkru, read)).unwrap();
            }
        });
        Slow { tx, rx }
    }

    fn ask(&self, addr: usize) -> (u32, u64) {
        self.tx.send(addr).unwrap();
        self.rx.recv().unwrap()
    }
}

/// A thread slow to drop vkey 1's rights; `mpk_munmap(1)` during the waiting revocation; the
/// next vkey must not get a key that thread can still use.
#[test]
fn pku_a_munmap_during_a_waiting_mprotect_revocation_keeps_the_key_from_the_next_vkey() {
    let _pku = require_pku!();
    assert_eq!(mpk_init(-1), 0, "mpk_init: errno {}", errno());
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // vkey 1, readable and writable by every thread.
    let p = mpk_malloc(1, 64) as usize;
    assert_ne!(p, 0);
    assert_eq!(mpk_mprotect(1, rw), 0, "errno {}", errno());
    // SAFETY: mpk_malloc memory, the domain is process-wide read-write now.
    unsafe { (p as *mut u8).write_volatile(1) };
    let slow = Slow::new(); // created after the grant: inherits it
    let (before, read) = slow.ask(p);
    assert_eq!(read, 1, "setup: the slow thread has the grant");
    let started = Instant::now();
    let revoker = std::thread::spawn(move || {
        let r = mpk_mprotect(1, libc::PROT_NONE);
        (r, errno())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !revoker.is_finished(),
        "setup: the revocation waits for the slow thread"
    );
    // Another thread destroys the vkey meanwhile: it joins the revocation in progress.
    assert_eq!(mpk_munmap(1), 0, "munmap: errno {}", errno());
    // (The revocation gives up 2 s after it started.)
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "munmap returned after {:?}, while the revocation of vkey 1 was still waiting",
        started.elapsed()
    );
    // A new vkey takes the lowest free key: the one vkey 1 had.
    let q = mpk_malloc(2, 64) as usize;
    assert_ne!(q, 0);
    assert_eq!(mpk_begin(2, rw), 0, "errno {}", errno());
    // SAFETY: vkey 2 is begun read-write by this thread.
    unsafe { (q as *mut u8).write_volatile(SECRET) };
    assert_eq!(mpk_end(2), 0);
    let (after, read) = slow.ask(q);
    let (r, e) = revoker.join().unwrap();
    assert_eq!(
        (r, e),
        (-1, libc::ETIMEDOUT),
        "mpk_mprotect(PROT_NONE) with a thread that never drops the rights"
    );
    assert_ne!(
        read,
        u64::from(SECRET),
        "isolation break: vkey 2's secret read by a thread that never began it (PKRU {:#x} \
         -> {:#x}); mpk_mprotect(PROT_NONE) returned {r} (errno {e})",
        before,
        Pkru::from_bits(after).bits()
    );
}
