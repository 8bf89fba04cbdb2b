//! Thread identity against TCB reuse, in protected mode (PKU guest): one library stack per
//! live thread.
//!
//! **Attack.** A thread T5 that glibc puts on an ended thread's TCB, and that inherited that
//! thread's GS base, used to adopt its record silently (see `thread_identity.rs`). While T5 sat
//! inside an op on the record's library stack, `register` handed the same record to another
//! thread (its recorded thread id was gone): `register` cleared `busy`, rewrote `owner_fs`, and
//! the other thread ran its op from the same stack top with the same `REC_SAVED_RSP` slot. The
//! process died with SIGSEGV (library code writing the library stack with the library key
//! read-only after the other thread's gate exit lowered PKRU).
//!
//! **Defence.** T5 adopts the record bound to its own thread id (`gate::adopt`), so `register`
//! does not reuse it while T5 lives, and `register` never reuses a record some thread is
//! inside (`busy`). T5 comes back from its op, on its record, and no other thread got it.
//! Natively (cooperative mode, no library stacks) the test is skipped. Its own binary: on a
//! regression it kills the process.
//!
//! # Safety
//!
//! Blocks a signal with `pthread_sigmask` (its own thread's mask).
#![allow(unsafe_code, reason = "a signal mask")]

use std::sync::mpsc::channel;

use mpkvirt_sys::require_pku;
use mpkvirt_sys::thread::FsGsBase;

fn bases() -> (usize, usize) {
    let t = FsGsBase::new().expect("FSGSBASE (mpkvirt needs it)");
    (t.fs_base(), t.gs_base())
}

/// `t1_setup` runs on T1 after it started; T1 then spawns H (which inherits T1's GS base and
/// never calls mpkvirt) and exits. H spawns T5, which glibc puts on T1's stack and TCB.
/// Returns T5's bases (T1's), T5's first call's result, and a way to run more on T5.
struct Reuse {
    t5: (usize, usize),
    t5_call: Result<(), String>,
    t5_cmd: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

fn reuse(t1_setup: impl FnOnce() + Send + 'static) -> Reuse {
    let (h_cmd_tx, h_cmd_rx) = channel::<()>();
    let (t1_tx, t1_rx) = channel();
    let t1 = std::thread::spawn(move || {
        t1_setup();
        let mine = bases();
        // H: inherits T1's GS base; never calls mpkvirt.
        let (t5_tx, t5_rx) = channel();
        std::thread::spawn(move || {
            h_cmd_rx.recv().unwrap();
            // T5: on T1's stack and TCB if glibc reuses it (same stack size).
            let (cmd_tx, cmd_rx) = channel::<Box<dyn FnOnce() + Send>>();
            std::thread::spawn(move || {
                let b = bases();
                let r = mpkvirt::thread::without_rights(|| ()).map_err(|e| e.to_string());
                t5_tx.send((b, r, cmd_tx)).unwrap();
                while let Ok(f) = cmd_rx.recv() {
                    f();
                }
            });
            std::thread::park();
        });
        t1_tx.send((mine, t5_rx)).unwrap();
    });
    let (t1_bases, t5_rx) = t1_rx.recv().unwrap();
    t1.join().unwrap(); // T1 is gone; its stack goes to glibc's cache
    h_cmd_tx.send(()).unwrap();
    let (t5_bases, t5_call, t5_cmd) = t5_rx.recv().unwrap();
    assert_eq!(
        t5_bases, t1_bases,
        "setup: glibc gave T5 T1's TCB and T5 inherited T1's record (through H)"
    );
    Reuse {
        t5: t5_bases,
        t5_call,
        t5_cmd,
    }
}

/// T5 sits inside an op on the record it adopted (a process-wide sync waiting 2 s for a thread
/// that blocks the sync signal, on the record's library stack) while 64 other threads
/// register and call: none of them gets T5's record, and T5 comes back on it.
#[test]
fn pku_thread_identity_one_library_stack_per_live_thread() {
    let _pku = require_pku!();
    mpkvirt::thread::without_rights(|| ()).unwrap();
    let (ready_tx, ready_rx) = channel::<()>();
    let (synced_tx, synced_rx) = channel::<()>();
    let syncer = std::thread::spawn(move || {
        ready_rx.recv().unwrap();
        mpkvirt::thread::sync_process_wide().unwrap();
        synced_tx.send(()).unwrap();
    });
    // T1 registered by the sync signal only (no exit hook).
    let r = reuse(move || {
        ready_tx.send(()).unwrap();
        synced_rx.recv().unwrap();
    });
    syncer.join().unwrap();
    assert!(r.t5_call.is_ok(), "{:?}", r.t5_call);
    // A thread that blocks mpkvirt's sync signal: T5's sync waits 2 s for it.
    std::thread::spawn(|| {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: initialises our set.
        unsafe { libc::sigemptyset(set.as_mut_ptr()) };
        // SAFETY: initialised above.
        let mut set = unsafe { set.assume_init() };
        // SAFETY: writes only our set.
        unsafe { libc::sigaddset(&mut set, libc::SIGRTMIN() + 7) };
        // SAFETY: this thread's mask only.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        std::thread::park();
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (done_tx, done_rx) = channel();
    r.t5_cmd
        .send(Box::new(move || {
            let before = bases();
            let res = mpkvirt::thread::sync_process_wide().map_err(|e| e.to_string());
            let after = bases();
            done_tx.send((before, res, after)).unwrap();
        }))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Meanwhile others register and call.
    let (gs_tx, gs_rx) = channel();
    for _ in 0..64 {
        let gs_tx = gs_tx.clone();
        std::thread::spawn(move || {
            for _ in 0..1000 {
                mpkvirt::thread::without_rights(|| ()).unwrap();
            }
            gs_tx.send(bases().1).unwrap();
            std::thread::park();
        });
    }
    let others: Vec<usize> = (0..64).map(|_| gs_rx.recv().unwrap()).collect();
    let (before, res, after) = done_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("T5 never came back from its sync");
    eprintln!("T5 came back: {res:?}");
    assert_eq!(before, r.t5);
    assert_eq!(after, r.t5, "T5 stays on its record");
    assert!(
        !others.contains(&r.t5.1),
        "the record T5 was inside went to another live thread"
    );
}
