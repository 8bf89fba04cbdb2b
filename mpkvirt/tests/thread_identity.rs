//! Thread identity against TCB reuse.
//!
//! **Attack.** The gate identifies a thread's record by the FS base (`callgate.S`: `cmp
//! %gs:REC_OWNER_FS, rdfsbase`; `ThreadRecord::current`), but glibc hands an exited thread's
//! stack and TCB — so its FS base — to the next thread it creates. A thread created by a thread
//! that still carries the dead thread's GS base (inherited through `clone`, here H, which
//! never calls mpkvirt) then looks like the dead thread:
//!
//! - if the dead thread's exit hook ran, every call of the new thread failed for good
//!   ("library calls while the thread is exiting");
//! - if it never ran (a thread registered only by the sync signal), the new thread adopted the
//!   record silently, with the dead thread's id: `register` handed the same record to the next
//!   registering thread too (two live threads, one busy word, one library stack: in protected
//!   mode the process died, `thread_identity_overlap.rs`), and every process-wide sync waited
//!   the full timeout for the adopter (its acknowledgements were filed under the dead id).
//!
//! **Defence.** A record is bound to its thread's id. The fast path still compares the FS base
//! only; a record whose thread's exit hook ran, or was never armed, is checked by thread id in
//! the dispatcher (`gate::confirm_owner`, a system call on that rare path only). A thread with
//! the owner's FS base but another id is on the dead owner's TCB (glibc reuses a TCB only
//! after the kernel cleared its thread id): it adopts the record — the dead thread's leftovers
//! end as its exit hook would have ended them, the record is bound to the new id under the
//! records lock and starts afresh — so `register` never hands it to anyone else while the
//! adopter lives.
//!
//! The tests in this file take one lock: a process-wide sync of one test would register the
//! helper thread H of another (it answers the sync signal) and change the GS base its
//! children inherit.
//!
//! # Safety
//!
//! One test creates a pthread key with a plain destructor and sets it on its own thread;
//! another forks a child that only reads its record and `_exit`s.
#![allow(
    unsafe_code,
    reason = "a pthread key whose destructor runs after mpkvirt's exit hook; a fork child"
)]

use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, MutexGuard};

use mpkvirt_sys::thread::FsGsBase;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn bases() -> (usize, usize) {
    let t = FsGsBase::new().expect("FSGSBASE (mpkvirt needs it)");
    (t.fs_base(), t.gs_base())
}

/// T1 (after `t1_setup`), H (created by T1, inherits its GS base, never calls mpkvirt) and T5
/// (created by H after T1 ended, on T1's stack and TCB).
struct Reuse {
    t1: (usize, usize),
    t5: (usize, usize),
    /// T5's first call.
    t5_call: Result<(), String>,
    /// Runs closures on T5 (which stays alive).
    t5_cmd: Sender<Box<dyn FnOnce() + Send>>,
}

/// The stack size of T1 and T5 (see `reuse`): libtest's threads take the default 2 MiB.
const REUSE_STACK: usize = 9 << 20;

fn reuse(t1_setup: impl FnOnce() + Send + 'static) -> Reuse {
    let (h_cmd_tx, h_cmd_rx) = channel::<()>();
    let (t1_tx, t1_rx) = channel();
    // T1 and T5 take a stack size no other thread of the test process uses, and more than
    // four times the default: glibc's stack cache gives a new thread a cached stack at least
    // as large as asked and at most four times as large, so T5 gets T1's stack (and TCB) and
    // no other thread (libtest's, created or ended meanwhile) takes it or gives T5 its own.
    let t1 = std::thread::Builder::new()
        .stack_size(REUSE_STACK)
        .spawn(move || {
            t1_setup();
            let mine = bases();
            let (t5_tx, t5_rx) = channel();
            std::thread::spawn(move || {
                h_cmd_rx.recv().unwrap();
                let (cmd_tx, cmd_rx) = channel::<Box<dyn FnOnce() + Send>>();
                std::thread::Builder::new()
                    .stack_size(REUSE_STACK)
                    .spawn(move || {
                        let b = bases();
                        let r = mpkvirt::thread::without_rights(|| ()).map_err(|e| e.to_string());
                        t5_tx.send((b, r, cmd_tx)).unwrap();
                        while let Ok(f) = cmd_rx.recv() {
                            f();
                        }
                    })
                    .expect("spawn T5");
                std::thread::park();
            });
            t1_tx.send((mine, t5_rx)).unwrap();
        })
        .expect("spawn T1");
    let (t1_bases, t5_rx) = t1_rx.recv().unwrap();
    t1.join().unwrap(); // T1 is gone; its stack goes to glibc's cache
    h_cmd_tx.send(()).unwrap();
    let (t5_bases, t5_call, t5_cmd) = t5_rx.recv().unwrap();
    assert_eq!(
        t5_bases, t1_bases,
        "setup: glibc gave T5 T1's TCB and T5 inherited T1's record (through H)"
    );
    Reuse {
        t1: t1_bases,
        t5: t5_bases,
        t5_call,
        t5_cmd,
    }
}

fn on<R: Send + 'static>(r: &Reuse, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = channel();
    r.t5_cmd
        .send(Box::new(move || tx.send(f()).unwrap()))
        .unwrap();
    rx.recv().unwrap()
}

/// A thread registered by the sync signal only (no exit hook): `t1_setup` for such a T1.
fn sync_registered() -> (impl FnOnce() + Send + 'static, std::thread::JoinHandle<()>) {
    let (ready_tx, ready_rx) = channel::<()>();
    let (synced_tx, synced_rx) = channel::<()>();
    let syncer = std::thread::spawn(move || {
        ready_rx.recv().unwrap();
        mpkvirt::thread::sync_process_wide().unwrap();
        synced_tx.send(()).unwrap();
    });
    let setup = move || {
        ready_tx.send(()).unwrap();
        synced_rx.recv().unwrap();
        assert_ne!(bases().1, 0, "setup: the sync signal registered T1");
    };
    (setup, syncer)
}

/// T1 used the library, so its exit hook ran when it ended: T5, on T1's TCB, adopts the
/// record and works (it used to be refused for good as "exiting").
#[test]
fn a_thread_on_an_exited_threads_tcb_adopts_its_record() {
    let _serial = serial();
    mpkvirt::thread::without_rights(|| ()).unwrap();
    let r = reuse(|| mpkvirt::thread::without_rights(|| ()).unwrap());
    assert!(
        r.t5_call.is_ok(),
        "a new thread is taken for the dead thread whose TCB glibc gave it (FS {:#x}, record \
         {:#x}): {:?}",
        r.t5.0,
        r.t5.1,
        r.t5_call
    );
    // And keeps working on its record.
    let again = on(&r, || {
        (
            mpkvirt::thread::without_rights(|| ()).map_err(|e| e.to_string()),
            bases(),
        )
    });
    assert_eq!(again, (Ok(()), r.t1));
}

/// T1 was registered by the sync signal only (no exit hook): T5 adopts T1's record, bound to
/// its own id, and no thread registering later is handed the same record while T5 lives.
#[test]
fn an_adopted_record_is_never_handed_to_a_second_live_thread() {
    let _serial = serial();
    mpkvirt::thread::without_rights(|| ()).unwrap();
    let (setup, syncer) = sync_registered();
    let r = reuse(setup);
    syncer.join().unwrap();
    let t5_gs = r.t5.1;
    assert!(r.t5_call.is_ok(), "{:?}", r.t5_call);
    // Other threads register now and stay alive: they take the reusable records.
    let (tx, rx) = channel();
    for _ in 0..64 {
        let tx = tx.clone();
        std::thread::spawn(move || {
            mpkvirt::thread::without_rights(|| ()).unwrap();
            tx.send(bases().1).unwrap();
            std::thread::park();
        });
    }
    let others: Vec<usize> = (0..64).map(|_| rx.recv().unwrap()).collect();
    // T5 is alive and still on its record.
    let t5_now = on(&r, || {
        (
            mpkvirt::thread::without_rights(|| ()).map_err(|e| e.to_string()),
            bases(),
        )
    });
    assert_eq!(t5_now, (Ok(()), r.t5), "T5 keeps its record");
    assert!(
        !others.contains(&t5_gs),
        "two live threads own the record at {t5_gs:#x} (one busy word, one library stack, one \
         set of views)"
    );
}

/// The adopted record carries the adopter's id: its acknowledgements count
/// (`gate::unacknowledged` matches records by id), so a process-wide sync succeeds at once
/// instead of waiting for a thread it takes for silent and failing with `ThreadsNotSynced`.
#[test]
fn an_adopted_record_acknowledges_syncs_under_its_own_id() {
    let _serial = serial();
    mpkvirt::thread::without_rights(|| ()).unwrap();
    let (setup, syncer) = sync_registered();
    let r = reuse(setup);
    syncer.join().unwrap();
    let t0 = std::time::Instant::now();
    let sync = mpkvirt::thread::sync_process_wide();
    assert!(
        sync.is_ok(),
        "a live thread that answers the sync signal is reported as not synced after {:?}: \
         {sync:?}",
        t0.elapsed()
    );
    drop(r);
}

/// The exiting thread itself is still refused after its exit hook ran (its views ended; a
/// later call would leave state nobody cleans up): the id check tells it apart from a thread
/// on its TCB. A pthread key created after mpkvirt's first use has its destructor run after
/// mpkvirt's exit hook, in the same round.
#[test]
fn the_exiting_thread_itself_is_still_refused() {
    let _serial = serial();
    mpkvirt::thread::without_rights(|| ()).unwrap(); // mpkvirt's exit key exists
    static LATE: Mutex<Option<Sender<Result<(), String>>>> = Mutex::new(None);
    extern "C" fn late(_: *mut libc::c_void) {
        let r = mpkvirt::thread::without_rights(|| ()).map_err(|e| e.to_string());
        if let Some(tx) = LATE.lock().unwrap().take() {
            let _ = tx.send(r);
        }
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is ours to write; `late` is a plain function that lives for the process.
    assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(late)) }, 0);
    let (tx, rx) = channel();
    *LATE.lock().unwrap() = Some(tx);
    std::thread::spawn(move || {
        mpkvirt::thread::without_rights(|| ()).unwrap(); // arms the exit hook
        // SAFETY: a key made above; the value is a non-null marker never dereferenced.
        let set = unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<u8>().cast()) };
        assert_eq!(set, 0);
    })
    .join()
    .unwrap();
    let r = rx.recv().unwrap();
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("while the thread is exiting")),
        "a call after the exit hook: {r:?}"
    );
    // SAFETY: the key made above; no thread uses it any more.
    unsafe { libc::pthread_key_delete(key) };
}

/// After `fork()`, the forking thread's record is bound to its id in the child: liveness
/// checks go by thread id (a manager dropped by a second thread in the child waits for the
/// forking thread's ops; the wait queue keeps it), and with the parent's id it would look
/// dead there.
#[test]
fn the_forking_threads_record_takes_its_id_in_the_child() {
    let _serial = serial();
    mpkvirt::thread::without_rights(|| ()).unwrap();
    let me = mpkvirt_sys::thread::gettid();
    assert_eq!(mpkvirt::testing::record_tid(), Some(me), "setup");
    // SAFETY: the child only reads its record, asks for its id and `_exit`s (no allocation,
    // no lock a parent thread could have held, beyond mpkvirt's own fork handler).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let child = mpkvirt_sys::thread::gettid();
        let ok = child != me && mpkvirt::testing::record_tid() == Some(child);
        // SAFETY: ends the child at once, running nothing of the parent's.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: reaps our own child; `status` is ours to write.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "in the fork child the forking thread's record keeps the parent's thread id ({status:#x})"
    );
}
