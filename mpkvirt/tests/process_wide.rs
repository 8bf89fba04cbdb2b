//! Process-wide rights (`Domain::set_process_wide`, libmpk's `mpk_mprotect` mode): every
//! thread of the process gets them — threads that never called mpkvirt, threads blocked in
//! a system call, threads spinning in user code, threads created later (on hardware at its
//! first access: a fault the library resolves) — and loses them on revocation; a domain holding them keeps its key; a thread that blocks the sync signal
//! makes the call fail with `ThreadsNotSynced` and never sees the key handed on.
//!
//! # Safety
//!
//! Bystander threads read domain memory with raw volatile loads (never Rust references), at
//! addresses of live domains the test keeps alive; a wrong answer from mpkvirt is a SIGSEGV,
//! which fails the test binary. Blocking a signal with `pthread_sigmask` touches only the
//! calling thread's mask.
#![allow(
    unsafe_code,
    reason = "raw reads of domain memory from bystander threads"
)]

mod common;

use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;

use common::config;
use mpkvirt::{Backend, DomainOptions, Error, Manager, Rights};
use mpkvirt_sys::{AccessRights, Pkey, Pkru, Pku, require_pku};

enum Cmd {
    Read(usize),
    Write(usize, u8),
    Pkru,
}

/// A thread that never calls mpkvirt: it reads memory and reports its PKRU on request,
/// either blocked in a channel receive (a futex) or spinning in user code between requests.
struct Bystander {
    tx: Option<Sender<Cmd>>,
    rx: Receiver<u64>,
    handle: Option<JoinHandle<()>>,
}

impl Bystander {
    fn new(spin: bool, block_sync_signal: bool) -> Bystander {
        let (tx, cmds) = channel::<Cmd>();
        let (answers, rx) = channel();
        let handle = std::thread::spawn(move || {
            if block_sync_signal {
                block_sync();
            }
            answers.send(0).unwrap();
            loop {
                let cmd = if spin {
                    match cmds.try_recv() {
                        Ok(c) => c,
                        Err(TryRecvError::Empty) => {
                            std::thread::yield_now();
                            continue;
                        }
                        Err(TryRecvError::Disconnected) => return,
                    }
                } else {
                    match cmds.recv() {
                        Ok(c) => c,
                        Err(_) => return,
                    }
                };
                let answer = match cmd {
                    // SAFETY: see the module docs: a live domain's address, raw access.
                    Cmd::Read(addr) => u64::from(unsafe { (addr as *const u8).read_volatile() }),
                    Cmd::Write(addr, v) => {
                        // SAFETY: as for reads.
                        unsafe { (addr as *mut u8).write_volatile(v) };
                        0
                    }
                    Cmd::Pkru => Pku::new().map_or(u64::MAX, |p| u64::from(p.rdpkru().bits())),
                };
                answers.send(answer).unwrap();
            }
        });
        rx.recv().unwrap(); // ready (with its signal mask)
        Bystander {
            tx: Some(tx),
            rx,
            handle: Some(handle),
        }
    }

    fn ask(&self, cmd: Cmd) -> u64 {
        self.tx.as_ref().unwrap().send(cmd).unwrap();
        self.rx.recv().expect("the bystander died (a fault?)")
    }

    fn read(&self, addr: usize) -> u8 {
        self.ask(Cmd::Read(addr)) as u8
    }

    /// The bystander's rights for `key` (hardware only).
    fn rights(&self, key: Pkey) -> AccessRights {
        Pkru::from_bits(self.ask(Cmd::Pkru) as u32).rights(key)
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Blocks mpkvirt's sync signal on the calling thread.
fn block_sync() {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set we own.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised just above.
    let mut set = unsafe { set.assume_init() };
    // SAFETY: sigaddset writes only the set we own.
    unsafe { libc::sigaddset(&mut set, libc::SIGRTMIN() + 7) };
    // SAFETY: changes only this thread's signal mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

fn write_in_view<B: Backend>(mgr: &Manager<B>, d: &mpkvirt::Domain<B>, v: u8) {
    let _view = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
    mgr.write_byte(d.base().as_ptr() as usize, v).unwrap();
}

/// The scenario of a libmpk program in `mpk_mprotect` mode, on any real backend. `pku`:
/// check the bystanders' PKRU too (hardware).
fn reaches_every_thread<B: Backend>(mgr: &Manager<B>, pku: bool) {
    let d = mgr.create_domain(DomainOptions::default()).unwrap();
    let addr = d.base().as_ptr() as usize;
    write_in_view(mgr, &d, 42);
    // Created before the grant, with no rights: two blocked, two spinning.
    let bystanders: Vec<_> = (0..4).map(|i| Bystander::new(i % 2 == 1, false)).collect();
    if pku {
        let key = d.key().expect("bound by the view");
        for b in &bystanders {
            assert!(!b.rights(key).can_read(), "before the grant");
        }
    }
    d.set_process_wide(Some(Rights::ReadOnly)).unwrap();
    let key = d
        .key()
        .expect("a domain with process-wide rights holds its key");
    for b in &bystanders {
        // (On hardware the first access takes the grant: a fault the handler resolves.)
        assert_eq!(b.read(addr), 42);
        if pku {
            assert_eq!(b.rights(key), AccessRights::READ_ONLY);
        }
    }
    // Threads created later inherit them; the caller has them without a view.
    let late = Bystander::new(false, false);
    assert_eq!(late.read(addr), 42);
    assert_eq!(mgr.read_byte(addr).unwrap(), 42);
    // Read-only: writes need a view.
    assert!(matches!(mgr.write_byte(addr, 1), Err(Error::Fault(_))));
    write_in_view(mgr, &d, 43);
    assert_eq!(bystanders[0].read(addr), 43);
    // Read-write for everyone, then nothing.
    d.set_process_wide(Some(Rights::ReadWrite)).unwrap();
    mgr.write_byte(addr, 44).unwrap();
    for (i, b) in bystanders.iter().enumerate() {
        assert_eq!(b.read(addr), 44 + i as u8);
        b.ask(Cmd::Write(addr, 45 + i as u8));
        if pku {
            assert_eq!(b.rights(key), AccessRights::READ_WRITE);
        }
    }
    d.set_process_wide(None).unwrap();
    if pku {
        for b in bystanders.iter().chain([&late]) {
            assert_ne!(b.rights(key), AccessRights::READ_WRITE);
            assert!(!b.rights(key).can_read(), "revoked");
        }
    }
    assert!(matches!(mgr.read_byte(addr), Err(Error::Fault(_))));
    // Views keep their thread-local meaning.
    let _view = mgr.enter(&[(&d, Rights::ReadOnly)]).unwrap();
    assert_eq!(mgr.read_byte(addr).unwrap(), 48);
}

#[test]
fn emulated_process_wide_rights_reach_every_thread() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(mpkvirt::Emulated::new(4).unwrap(), config(4)).unwrap();
    reaches_every_thread(&mgr, false);
}

#[test]
fn pku_process_wide_rights_reach_every_thread() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(mpkvirt::Hardware::new(4).unwrap(), config(4)).unwrap();
    reaches_every_thread(&mgr, true);
}

#[test]
fn simulated_process_wide_rights_reach_threads_without_views() {
    let mgr = Manager::simulated(2, config(2)).unwrap();
    let d = mgr.create_domain(DomainOptions::default()).unwrap();
    let addr = d.base().as_ptr() as usize;
    write_in_view(&mgr, &d, 7);
    std::thread::scope(|s| {
        s.spawn(|| assert!(matches!(mgr.read_byte(addr), Err(Error::Fault(_)))));
    });
    d.set_process_wide(Some(Rights::ReadOnly)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(mgr.read_byte(addr).unwrap(), 7);
            assert!(matches!(mgr.write_byte(addr, 1), Err(Error::Fault(_))));
        });
    });
    d.set_process_wide(None).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| assert!(matches!(mgr.read_byte(addr), Err(Error::Fault(_)))));
    });
}

/// A domain with process-wide rights keeps its key through any number of misses, and the
/// keys left for views shrink accordingly. `raw`: the backend has real memory.
fn keeps_its_key<B: Backend>(mgr: &Manager<B>, raw: bool) {
    let d = mgr.create_domain(DomainOptions::default()).unwrap();
    let others: Vec<_> = (0..6)
        .map(|_| mgr.create_domain(DomainOptions::default()).unwrap())
        .collect();
    write_in_view(mgr, &d, 9);
    d.set_process_wide(Some(Rights::ReadOnly)).unwrap();
    let key = d.key().unwrap();
    let reader = Bystander::new(false, false);
    for round in 0..4 {
        for o in &others {
            write_in_view(mgr, o, round);
            assert_eq!(d.key(), Some(key), "evicted by a miss");
        }
    }
    let addr = d.base().as_ptr() as usize;
    if raw {
        assert_eq!(reader.read(addr), 9);
    } else {
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(mgr.read_byte(addr).unwrap(), 9));
        });
    }
    // Two keys, one held process-wide: a view of two other domains cannot fit.
    assert!(matches!(
        mgr.enter(&[
            (&others[0], Rights::ReadWrite),
            (&others[1], Rights::ReadWrite)
        ]),
        Err(Error::ViewsExceedKeys { .. })
    ));
    // With the domain itself it can.
    let v = mgr
        .enter(&[(&d, Rights::ReadWrite), (&others[0], Rights::ReadWrite)])
        .unwrap();
    drop(v);
    d.set_process_wide(None).unwrap();
    let _v = mgr
        .enter(&[
            (&others[0], Rights::ReadWrite),
            (&others[1], Rights::ReadWrite),
        ])
        .expect("the key is free for views again");
}

#[test]
fn simulated_a_domain_with_process_wide_rights_keeps_its_key() {
    keeps_its_key(&Manager::simulated(2, config(2)).unwrap(), false);
}

#[test]
fn emulated_a_domain_with_process_wide_rights_keeps_its_key() {
    let _g = common::real_backend();
    keeps_its_key(
        &Manager::with_backend(mpkvirt::Emulated::new(2).unwrap(), config(2)).unwrap(),
        true,
    );
}

#[test]
fn pku_a_domain_with_process_wide_rights_keeps_its_key() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    keeps_its_key(
        &Manager::with_backend(mpkvirt::Hardware::new(2).unwrap(), config(2)).unwrap(),
        true,
    );
}

/// Destroying a domain with process-wide rights takes them from every thread before its key
/// goes to another domain.
#[test]
fn pku_destroying_a_domain_revokes_its_process_wide_rights_first() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(mpkvirt::Hardware::new(1).unwrap(), config(1)).unwrap();
    let d = mgr.create_domain(DomainOptions::default()).unwrap();
    write_in_view(&mgr, &d, 1);
    d.set_process_wide(Some(Rights::ReadWrite)).unwrap();
    let key = d.key().unwrap();
    let b = Bystander::new(true, false);
    assert_eq!(b.rights(key), AccessRights::READ_WRITE);
    drop(d);
    assert!(!b.rights(key).can_read(), "rights outlived the domain");
    // The one key goes to the next domain, which the bystander cannot reach.
    let e = mgr.create_domain(DomainOptions::default()).unwrap();
    write_in_view(&mgr, &e, 2);
    assert_eq!(e.key(), Some(key));
    assert!(!b.rights(key).can_read());
}

/// A thread that blocks the sync signal: the call reports it, and a key whose revocation it
/// missed is never handed to another domain.
#[test]
fn pku_a_thread_that_misses_a_revocation_taints_the_key() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(mpkvirt::Hardware::new(2).unwrap(), config(2)).unwrap();
    let d = mgr.create_domain(DomainOptions::default()).unwrap();
    write_in_view(&mgr, &d, 1);
    // Granted while every thread takes signals.
    d.set_process_wide(Some(Rights::ReadWrite)).unwrap();
    let key = d.key().unwrap();
    let deaf = Bystander::new(false, true);
    // (Created after the grant: it inherited the rights.)
    assert_eq!(deaf.rights(key), AccessRights::READ_WRITE);
    match d.set_process_wide(None) {
        Err(Error::ThreadsNotSynced { threads: 1, .. }) => {}
        other => panic!("expected ThreadsNotSynced for one thread, got {other:?}"),
    }
    assert_eq!(
        deaf.rights(key),
        AccessRights::READ_WRITE,
        "it missed the revocation"
    );
    drop(d);
    // The tainted key is never bound again, however many domains want one.
    for i in 0..8 {
        let e = mgr.create_domain(DomainOptions::default()).unwrap();
        write_in_view(&mgr, &e, i);
        assert_ne!(e.key(), Some(key), "a tainted key was handed on");
    }
}

/// The mechanism itself, on every machine: with bystanders blocked, spinning and signal-deaf.
#[test]
fn sync_reaches_every_thread_and_reports_the_deaf_ones() {
    let _g = common::real_backend();
    let bystanders: Vec<_> = (0..4).map(|i| Bystander::new(i % 2 == 1, false)).collect();
    mpkvirt::thread::sync_process_wide().unwrap();
    for b in &bystanders {
        // Still alive and answering after the signal.
        let _ = b.ask(Cmd::Pkru);
    }
    let deaf = Bystander::new(false, true);
    match mpkvirt::thread::sync_process_wide() {
        Err(Error::ThreadsNotSynced { threads: 1, .. }) => {}
        other => panic!("expected ThreadsNotSynced for one thread, got {other:?}"),
    }
    drop(deaf);
    mpkvirt::thread::sync_process_wide().unwrap();
}
