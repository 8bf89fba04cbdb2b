//! Revocations of process-wide rights that race with each other (`manager/global.rs`).
//!
//! The attack: while a revocation of a domain's process-wide rights still waits for some
//! thread to drop them, a second revocation of the same domain (or its destruction, which
//! revokes first) sees the process-wide field already revoked. If it returned at once and
//! dropped the domain's global pin, the key could go to another domain while the slow thread
//! still holds the old rights — and the first revocation's taint, when it finally timed out,
//! would land on the new owner's slot.
//!
//! The defence: a revocation in progress is recorded per key slot (`Inner::revoking`); while
//! it is, the slot keeps its global pin (only the last revocation to end may drop it), and a
//! later revocation or destruction of the domain *joins* it — waits until it ends, then
//! answers what it found. A failed revocation taints the key under the same lock that drops
//! the pin, while the key still belongs to the domain; a revocation of a tainted key reports
//! `ThreadsNotSynced` (some thread may still hold the rights).
//!
//! # Safety
//!
//! Raw PKRU reads and mpkvirt's probe (a read mpkvirt's SIGSEGV handler recovers); blocking
//! and unblocking the sync signal touch only the calling thread's mask.
#![allow(unsafe_code, reason = "probe, signal mask")]

mod common;

use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use common::config;
use mpkvirt::{Domain, DomainOptions, Error, Hardware, Manager, Rights};
use mpkvirt_sys::{Pkey, Pkru, Pku, require_pku};

const SECRET: u8 = 77;

/// `Slow`'s command: unblock the sync signal (any other value: probe that address, 0: none).
const UNBLOCK: usize = usize::MAX;

fn write_in_view(mgr: &Manager<Hardware>, d: &Domain<Hardware>, v: u8) {
    let _view = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
    mgr.write_byte(d.base().as_ptr() as usize, v).unwrap();
}

/// Blocks (`how`: `SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) mpkvirt's sync signal on the
/// calling thread: a thread that is slow to take a revocation, deterministically.
fn mask_sync(how: libc::c_int) {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: initialises the set we own.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised above.
    let mut set = unsafe { set.assume_init() };
    // SAFETY: writes only our set.
    unsafe { libc::sigaddset(&mut set, libc::SIGRTMIN() + 7) };
    // SAFETY: changes only this thread's mask; the set is valid.
    let r = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    assert_eq!(r, 0);
}

/// A thread that never calls mpkvirt and blocks the sync signal until told otherwise: answers
/// its PKRU and probes addresses on request.
struct Slow {
    tx: Sender<usize>,
    rx: Receiver<(u32, u64)>,
}

impl Slow {
    fn new() -> Slow {
        let (tx, cmds) = channel::<usize>();
        let (answers, rx) = channel();
        std::thread::spawn(move || {
            mask_sync(libc::SIG_BLOCK);
            while let Ok(addr) = cmds.recv() {
                if addr == UNBLOCK {
                    // The pending sync signal is delivered here, in the normal context.
                    mask_sync(libc::SIG_UNBLOCK);
                }
                let pkru = Pku::new().map_or(0, |p| p.rdpkru().bits());
                let read = if addr == 0 || addr == UNBLOCK {
                    0
                } else {
                    // SAFETY: a live domain's address; mpkvirt's SIGSEGV handler recovers the
                    // probe when the read faults (`u64::MAX`).
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

    fn rights(&self, key: Pkey) -> mpkvirt_sys::AccessRights {
        Pkru::from_bits(self.ask(0).0).rights(key)
    }
}

/// One key; `d` written, granted read-write to every thread; a slow thread created after the
/// grant (it inherited it).
fn setup() -> (Manager<Hardware>, Domain<Hardware>, Pkey, Slow) {
    let mgr = Manager::with_backend(Hardware::new(1).unwrap(), config(1)).unwrap();
    let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    write_in_view(&mgr, &d, 1);
    d.set_process_wide(Some(Rights::ReadWrite)).unwrap();
    let key = d.key().unwrap();
    let slow = Slow::new();
    assert!(slow.rights(key).can_write(), "setup: inherited the grant");
    (mgr, d, key, slow)
}

/// A second revocation while the first waits for a thread that never drops the rights: it
/// joins the first and reports the same failure — never `Ok` while the thread holds the key.
#[test]
fn pku_a_second_revocation_joins_the_one_in_progress() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let (_mgr, d, key, slow) = setup();
    std::thread::scope(|s| {
        let d = &d;
        // The first revocation: waits for `slow` (SYNC_WAIT, 2 s) and then taints the key.
        let first = s.spawn(move || d.set_process_wide(None));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !first.is_finished(),
            "setup: the first revocation is still waiting"
        );
        let second = d.set_process_wide(None);
        let still = slow.rights(key);
        let first = first.join().unwrap();
        assert!(still.can_read(), "setup: the slow thread kept the rights");
        assert!(
            matches!(first, Err(Error::ThreadsNotSynced { .. })),
            "the first revocation: {first:?}"
        );
        assert!(
            matches!(second, Err(Error::ThreadsNotSynced { .. })),
            "a revocation said {second:?} while a thread still has key {key} ({still:?})"
        );
    });
}

/// The same, then another domain wants the one key: the key stays with `d` (tainted), so the
/// other domain's view gets no key the slow thread can use, and its secret stays unread —
/// also after `d` is destroyed.
#[test]
fn pku_a_key_whose_revocation_is_in_progress_goes_to_no_other_domain() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let (mgr, d, key, slow) = setup();
    let e = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let try_e = |when: &str| match mgr.enter(&[(&e, Rights::ReadWrite)]) {
        Ok(view) => {
            mgr.write_byte(e.base().as_ptr() as usize, SECRET).unwrap();
            drop(view);
            let (pkru, read) = slow.ask(e.base().as_ptr() as usize);
            assert!(
                read == u64::MAX,
                "isolation break {when}: a thread that never entered a view of `e` read its \
                 secret {read} (key {key}: {:?}, e's key {:?})",
                Pkru::from_bits(pkru).rights(key),
                e.key()
            );
        }
        // The one key is kept from `e`: the safe answer.
        Err(Error::ViewsExceedKeys { .. } | Error::KeysBusy { .. }) => {}
        Err(other) => panic!("entering `e` {when}: {other:?}"),
    };
    std::thread::scope(|s| {
        let dr = &d;
        let first = s.spawn(move || dr.set_process_wide(None));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !first.is_finished(),
            "setup: the first revocation is still waiting"
        );
        let second = d.set_process_wide(None);
        assert!(
            matches!(second, Err(Error::ThreadsNotSynced { .. })),
            "second revocation: {second:?}"
        );
        try_e("after the second revocation");
        let first = first.join().unwrap();
        assert!(
            matches!(first, Err(Error::ThreadsNotSynced { .. })),
            "first revocation: {first:?}"
        );
    });
    try_e("after both revocations");
    // Destroying `d` (it revokes first) leaves the key dead, never free.
    drop(d);
    try_e("after `d` was destroyed");
    assert!(
        slow.rights(key).can_read(),
        "the slow thread kept the rights"
    );
}

/// A second revocation while the first waits for a thread that is slow but does drop the
/// rights: the second returns only once the first has heard from every thread, and then the
/// key may go on — to a domain the slow thread cannot read.
#[test]
fn pku_a_second_revocation_returns_only_when_the_first_lands() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let (mgr, d, key, slow) = setup();
    std::thread::scope(|s| {
        let d = &d;
        let first = s.spawn(move || d.set_process_wide(None));
        std::thread::sleep(Duration::from_millis(300));
        let second = s.spawn(move || d.set_process_wide(None));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !first.is_finished(),
            "setup: the first revocation is still waiting"
        );
        assert!(
            !second.is_finished(),
            "the second revocation returned while the first still waited for a thread"
        );
        // The slow thread takes the signal now, in its normal context.
        slow.ask(UNBLOCK);
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
    });
    assert!(!slow.rights(key).can_read(), "the revocations returned Ok");
    // The key is free for views again: `e` takes it, and the slow thread cannot read it.
    let e = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    write_in_view(&mgr, &e, SECRET);
    assert_eq!(e.key(), Some(key), "one key: the revoked key went to `e`");
    let (_, read) = slow.ask(e.base().as_ptr() as usize);
    assert_eq!(read, u64::MAX, "the slow thread read `e`'s secret");
}
