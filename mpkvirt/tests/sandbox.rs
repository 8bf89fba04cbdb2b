//! Sandboxes: the seal that keeps sandboxed code inside its one domain.
//!
//! **Attack** (attacker class 2, arbitrary code in a thread). Code run inside a plain view can
//! call every op through the gate: `leave` ends its view and hands it the view below (the
//! runner's), `enter` opens any domain whose uid it guesses, a nested run or a confinement
//! changes the thread's state under the runner.
//!
//! **Defence** (`mpkvirt::sandbox`, the record's sandbox state in library memory). While a
//! thread runs sandboxed code, the library refuses every op but the yield, the query and the
//! sync handler's; the yield always returns to the runner's `sandbox_run`, with the runner's
//! view, which the sandbox's code could not end.
//!
//! Natively (emulated backend) the refusals and the switching are checked; in the PKU guest
//! the `pku_*` test also checks that the sandbox's rights are its domain's alone: a read of
//! the runner's domain kills a forked child with SIGSEGV.
//!
//! # Safety
//!
//! Sandbox contexts prepared in domain memory, a copy of the runner's view guard handed to the
//! sandboxed code (the attack), and `fork`.
#![allow(unsafe_code, reason = "sandbox contexts, fork")]

mod common;

use common::config;
use mpkvirt::sandbox::{self, Context, Yielded};
use mpkvirt::{
    Backend, Domain, DomainOptions, Emulated, Error, Hardware, Manager, Rights, ViewGuard, thread,
};
use mpkvirt_sys::require_pku;

/// What the sandboxed code tried, for the runner to check.
struct Probe<'a, B: Backend> {
    mgr: &'a Manager<B>,
    own: &'a Domain<B>,
    other: &'a Domain<B>,
    /// The runner's view (a copy: ending it is the attack).
    runner_view: *const ViewGuard<'a, B>,
    refused: Vec<(&'static str, bool)>,
}

const DONE: u64 = 0xD0;

fn body<B: Backend>(arg: u64, first: u64) {
    // SAFETY: the runner passes a `Probe<B>` it keeps alive (and does not touch) while the
    // context runs; key-0 memory, which the sandbox's view may write.
    let p = unsafe { &mut *(arg as *mut Probe<'_, B>) };
    // Values round-trip: the runner resumes with what it got, times ten.
    let v = sandbox::yield_now(first + 1);
    let v = sandbox::yield_now(v + 1);
    let mut tried = |what, r: mpkvirt::Result<()>| p.refused.push((what, r.is_err()));
    tried(
        "enter a view of another domain",
        p.mgr.enter(&[(p.other, Rights::ReadWrite)]).map(drop),
    );
    tried(
        "enter a view of its own domain",
        p.mgr.enter(&[(p.own, Rights::ReadOnly)]).map(drop),
    );
    tried("allocate in another domain", p.other.alloc(16, 8).map(drop));
    tried("reset another domain", p.other.reset());
    tried(
        "process-wide rights",
        p.other.set_process_wide(Some(Rights::ReadWrite)),
    );
    tried("confine", thread::confine::<B>(&[]));
    tried("prefetch", p.mgr.prefetch(&[p.other]).map(drop));
    // SAFETY: the attack: a bitwise copy of the runner's guard, ended here (the runner's own
    // guard is dropped later, as usual, when the copy's end was refused).
    let stolen = unsafe { std::ptr::read(p.runner_view) };
    tried("end the runner's view", stolen.end());
    // SAFETY: a run needs a prepared context; it is refused before that matters.
    let nested = unsafe { p.mgr.sandbox_run(p.other, 0, 0, 0) };
    tried("run a sandbox inside the sandbox", nested.map(drop));
    sandbox::yield_now(v + 1);
    loop {
        sandbox::yield_now(DONE);
    }
}

extern "C" fn body_emulated(arg: u64, first: u64) {
    body::<Emulated>(arg, first);
}

extern "C" fn body_hardware(arg: u64, first: u64) {
    body::<Hardware>(arg, first);
}

fn top<B: Backend>(d: &Domain<B>) -> usize {
    d.base().as_ptr() as usize + d.len()
}

fn sandbox_seal<B: Backend>(mgr: &Manager<B>, f: extern "C" fn(u64, u64)) {
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let other = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let host = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let runner_view = mgr
        .enter(&[(&host, Rights::ReadWrite), (&own, Rights::ReadWrite)])
        .unwrap();
    let host_byte = host.base().as_ptr();
    // SAFETY: the host domain's first byte, inside the runner's view.
    unsafe { host_byte.write(42) };
    let pkru = mgr.current_pkru();
    let mut probe = Probe {
        mgr,
        own: &own,
        other: &other,
        runner_view: &raw const runner_view,
        refused: Vec::with_capacity(16),
    };
    // SAFETY: the top of `own`, writable in the runner's view and used by nothing else.
    let ctx = unsafe { Context::new(top(&own), f, (&raw mut probe) as u64) };
    let mut sp = ctx.sp;
    let mut value = 1;
    let mut seen = Vec::new();
    loop {
        // SAFETY: `sp` is the prepared context, then each time the one its yield returned.
        let y: Yielded = unsafe { mgr.sandbox_run(&own, sp, top(&own), value) }.unwrap();
        // Back in the runner's view after every yield.
        assert_eq!(
            mgr.current_pkru(),
            pkru,
            "the runner's rights after a yield"
        );
        // SAFETY: as above.
        assert_eq!(unsafe { host_byte.read() }, 42);
        if y.value == DONE {
            break;
        }
        seen.push(y.value);
        sp = y.sp;
        value = y.value * 10;
    }
    assert_eq!(seen, [2, 21, 211], "the values passed both ways");
    for (what, refused) in &probe.refused {
        assert!(refused, "sandboxed code could {what}");
    }
    assert_eq!(probe.refused.len(), 9);
    // The runner's view is intact and ends normally.
    runner_view.end().unwrap();
    // Outside a sandbox a yield is refused at once.
    assert_ne!(sandbox::yield_now(5) & (1 << 63), 0);
    // Stacks outside the domain are refused.
    // SAFETY: refused before anything runs.
    let r = unsafe { mgr.sandbox_run(&own, top(&other) - 128, top(&own), 0) };
    assert!(matches!(r, Err(Error::InvalidConfig(_))), "{r:?}");
}

#[test]
fn a_sandbox_can_only_yield() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap();
    sandbox_seal(&mgr, body_emulated);
}

#[test]
fn pku_a_sandbox_can_only_yield() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    sandbox_seal(&mgr, body_hardware);
}

/// Reads the byte at `arg` and yields it.
extern "C" fn read_and_yield(arg: u64, _first: u64) {
    // SAFETY: the attack: any address, read with the sandbox's rights.
    let b = unsafe { (arg as *const u8).read_volatile() };
    loop {
        sandbox::yield_now(u64::from(b));
    }
}

/// In a forked child: runs a sandbox on `own` that reads `target`; exits 0 when the byte
/// read was 42.
fn child_reads(
    mgr: &Manager<Hardware>,
    own: &Domain<Hardware>,
    host: &Domain<Hardware>,
    target: usize,
) -> i32 {
    let _v = mgr
        .enter(&[(host, Rights::ReadWrite), (own, Rights::ReadWrite)])
        .unwrap();
    // SAFETY: the top of `own`, writable in this view.
    let ctx = unsafe { Context::new(top(own), read_and_yield, target as u64) };
    // SAFETY: a prepared context.
    let y = unsafe { mgr.sandbox_run(own, ctx.sp, top(own), 0) }.unwrap();
    i32::from(y.value != 42)
}

#[test]
fn pku_a_sandbox_reads_its_domain_and_nothing_of_the_runner() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let host = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    mgr.with_view(
        &[(&host, Rights::ReadWrite), (&own, Rights::ReadWrite)],
        || {
            // SAFETY: the first byte of `host`, inside the view.
            unsafe { host.base().as_ptr().write(42) };
            // SAFETY: the first byte of `own`, inside the view.
            unsafe { own.base().as_ptr().write(42) };
        },
    )
    .unwrap();
    for (target, expect_signal) in [
        (own.base().as_ptr() as usize, None),
        (host.base().as_ptr() as usize, Some(libc::SIGSEGV)),
    ] {
        // SAFETY: the child runs only the sandbox and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = child_reads(&mgr, &own, &host, target);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        match expect_signal {
            None => assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "reading its own domain: status {status:#x}"
            ),
            Some(sig) => assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == sig,
                "reading the runner's domain: status {status:#x}"
            ),
        }
    }
}

/// A forked child's exit status: the signal that ended it, or its exit code.
fn in_child(f: impl FnOnce() -> i32) -> Result<i32, i32> {
    // SAFETY: the child runs only `f` and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}

/// A host keeps its own state in a domain every thread may reach (process-wide rights) and
/// in views of other managers; a sandbox reaches neither, and the runner has both again after
/// the yield.
#[test]
fn pku_a_sandbox_takes_no_process_wide_rights_and_no_other_managers_keys() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    let other_mgr = Manager::with_backend(Hardware::new(2).unwrap(), config(2)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let global = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
    let other = other_mgr
        .create_domain(DomainOptions::reserve(4096))
        .unwrap();
    global.set_process_wide(Some(Rights::ReadWrite)).unwrap();
    let at = |d: &Domain<Hardware>| d.base().as_ptr() as usize;
    // SAFETY: the first byte of `global`, which every thread may write now.
    unsafe { global.base().as_ptr().write(42) };
    other_mgr
        .with_view(&[(&other, Rights::ReadWrite)], || {
            // SAFETY: the first byte of `other`, inside the view.
            unsafe { other.base().as_ptr().write(42) }
        })
        .unwrap();
    mgr.with_view(&[(&own, Rights::ReadWrite)], || {
        // SAFETY: the first byte of `own`, inside the view.
        unsafe { own.base().as_ptr().write(42) }
    })
    .unwrap();
    // (`shared`: `sandbox_run_shared`, which keeps both.)
    for (target, shared, expect) in [
        (at(&own), false, Ok(0)),
        (at(&global), false, Err(libc::SIGSEGV)),
        (at(&other), false, Err(libc::SIGSEGV)),
        (at(&global), true, Ok(0)),
        (at(&other), true, Ok(0)),
    ] {
        // (In a new thread of the child, which takes a key no manager owns, read-write,
        // before its first library call: the sandbox denies that key too, and the runner has
        // it again after the yield.)
        let status = in_child(|| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let raw = mpkvirt_sys::pkey::pkey_alloc(mpkvirt_sys::AccessRights::READ_WRITE)
                        .unwrap();
                    let _outer = other_mgr.enter(&[(&other, Rights::ReadWrite)]).unwrap();
                    let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
                    // SAFETY: the top of `own`, writable in this view.
                    let ctx = unsafe { Context::new(top(&own), read_and_yield, target as u64) };
                    let y = if shared {
                        // SAFETY: a prepared context.
                        unsafe { mgr.sandbox_run_shared(&own, ctx.sp, top(&own), 0) }
                    } else {
                        // SAFETY: a prepared context.
                        unsafe { mgr.sandbox_run(&own, ctx.sp, top(&own), 0) }
                    };
                    if y.unwrap().value != 42 {
                        return 1;
                    }
                    // The runner's rights are back, in its PKRU (not merely taken again at a fault):
                    // the grant and the other manager's view.
                    let pkru = mpkvirt_sys::Pku::new().unwrap().rdpkru();
                    let back =
                        |d: &Domain<Hardware>| d.key().is_some_and(|k| pkru.rights(k).can_write());
                    if !back(&global) || !back(&other) {
                        return 3;
                    }
                    if !pkru.rights(raw).can_write() {
                        return 4;
                    }
                    // SAFETY: the first byte of `global`, granted to every thread.
                    let g = unsafe { global.base().as_ptr().read() };
                    // SAFETY: the first byte of `other`, inside the outer view.
                    let o = unsafe { other.base().as_ptr().read() };
                    if (g, o) == (42, 42) { 0 } else { 2 }
                })
                .join()
                .unwrap()
            })
        });
        assert_eq!(
            status, expect,
            "reading {target:#x} from the sandbox (shared: {shared})"
        );
    }
}

/// What `on_tick` asks of the library (0: preempt; otherwise abort with that value).
static TICK_ACTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn on_tick(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let action = match TICK_ACTION.load(std::sync::atomic::Ordering::Relaxed) {
        0 => sandbox::Action::Preempt,
        v => sandbox::Action::Abort(v),
    };
    sandbox::signal(ctx.cast(), action);
}

/// Integer and floating-point work with many live values (general and vector registers):
/// a register the preemption lost would change the result.
fn work(rounds: u64) -> u64 {
    let (mut a, mut b, mut c, mut d) = (1u64, 2u64, 3u64, 4u64);
    let (mut x, mut y) = (0.5f64, 1.5f64);
    for i in 0..rounds {
        a = a.wrapping_mul(6364136223846793005).wrapping_add(i);
        b ^= a.rotate_left(17);
        c = c.wrapping_add(b >> 3);
        d = d.wrapping_sub(c).rotate_right(5);
        x = x.mul_add(1.000001, y * 1e-9);
        y = (y + x * 1e-12).sqrt() + 1.0;
    }
    a ^ b ^ c ^ d ^ x.to_bits() ^ y.to_bits()
}

extern "C" fn busy(rounds: u64, _first: u64) {
    let r = work(rounds);
    loop {
        sandbox::yield_now(r | 1 << 62);
    }
}

/// Runs `busy` under a 100 µs timer whose handler takes `action`; returns the final value
/// and how many times the context yielded `PREEMPTED` before it.
fn run_ticking<B: Backend>(mgr: &Manager<B>, action: u64, rounds: u64) -> (u64, u32) {
    let sig = install_tick(action);
    // SAFETY: all-zero is a valid `sigevent`.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_THREAD_ID;
    sev.sigev_signo = sig;
    sev.sigev_notify_thread_id = mpkvirt_sys::thread::gettid();
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: valid pointers; a timer for this thread.
    let made = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) };
    assert_eq!(made, 0);
    let every = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000,
    };
    let spec = libc::itimerspec {
        it_interval: every,
        it_value: every,
    };
    // SAFETY: the timer just made.
    let armed = unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) };
    assert_eq!(armed, 0);
    let out = run_counting_preemptions(mgr, busy, rounds);
    // SAFETY: the timer made above, deleted once; the signal stays handled (a late tick
    // finds no sandbox and does nothing).
    unsafe { libc::timer_delete(timer) };
    out
}

/// Installs `on_tick` (taking `action`) for the tick signal, and returns the signal.
fn install_tick(action: u64) -> libc::c_int {
    TICK_ACTION.store(action, std::sync::atomic::Ordering::Relaxed);
    let sig = libc::SIGRTMIN() + 9;
    // SAFETY: `on_tick` makes one library call, which is async-signal-safe.
    unsafe {
        mpkvirt_sys::signal::install(sig, on_tick, libc::SA_ONSTACK | libc::SA_SIGINFO).unwrap()
    };
    sig
}

/// Runs `f(arg)` in a sandbox of a new domain until it yields something other than
/// `PREEMPTED`; returns that value and how many preemptions came before it.
fn run_counting_preemptions<B: Backend>(
    mgr: &Manager<B>,
    f: extern "C" fn(u64, u64),
    arg: u64,
) -> (u64, u32) {
    run_counting_preemptions_in(mgr, f, arg, false)
}

/// [`run_counting_preemptions`], in a shared sandbox (`sandbox_run_shared`) if `shared`.
fn run_counting_preemptions_in<B: Backend>(
    mgr: &Manager<B>,
    f: extern "C" fn(u64, u64),
    arg: u64,
    shared: bool,
) -> (u64, u32) {
    let own = mgr
        .create_domain(DomainOptions::reserve(256 << 10))
        .unwrap();
    let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
    // SAFETY: the top of `own`, writable in this view.
    let ctx = unsafe { Context::new(top(&own), f, arg) };
    let (mut sp, mut preempted) = (ctx.sp, 0);
    loop {
        let y = if shared {
            // SAFETY: the prepared context, then the one each yield returned.
            unsafe { mgr.sandbox_run_shared(&own, sp, top(&own), 0) }
        } else {
            // SAFETY: as above.
            unsafe { mgr.sandbox_run(&own, sp, top(&own), 0) }
        }
        .unwrap();
        if y.value != sandbox::PREEMPTED {
            return (y.value, preempted);
        }
        preempted += 1;
        sp = y.sp;
    }
}

fn preemption<B: Backend>(mgr: &Manager<B>) {
    let rounds = 3_000_000;
    let (out, preempted) = run_ticking(mgr, 0, rounds);
    assert_eq!(
        out,
        work(rounds) | 1 << 62,
        "the preempted computation's result"
    );
    assert!(preempted > 0, "never preempted");
    eprintln!("preempted {preempted} times");
    // Abandoning: the context yields the value for good.
    let (out, _) = run_ticking(mgr, 77, u64::MAX);
    assert_eq!(out, 77);
}

#[test]
fn a_preempted_sandbox_continues_where_it_was() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap();
    preemption(&mgr);
}

#[test]
fn pku_a_preempted_sandbox_continues_where_it_was() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    preemption(&mgr);
}

/// Sends itself the tick signal three times while it is blocked, then unblocks it: the
/// three arrive back to back, before the preemption stub runs.
extern "C" fn three_ticks(sig: u64, _first: u64) {
    let sig = sig as libc::c_int;
    // SAFETY: an empty set, then one signal added: plain writes to a local.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::sigaddset(&mut set, sig) };
    // SAFETY: blocks, then unblocks, one signal of this thread.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    for _ in 0..3 {
        let _ = mpkvirt_sys::thread::tgkill(mpkvirt_sys::thread::gettid(), sig);
    }
    // SAFETY: as above.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    loop {
        sandbox::yield_now(42);
    }
}

/// A shared sandbox runs the runner's trusted code (which may hold its locks): the ticks
/// that preempt a sealed one leave it alone.
fn shared_is_never_preempted<B: Backend>(mgr: &Manager<B>) {
    let sig = install_tick(0);
    let (out, preempted) = run_counting_preemptions_in(mgr, three_ticks, sig as u64, true);
    assert_eq!((out, preempted), (42, 0));
}

#[test]
fn a_shared_sandbox_is_never_preempted() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap();
    shared_is_never_preempted(&mgr);
}

#[test]
fn pku_a_shared_sandbox_is_never_preempted() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    shared_is_never_preempted(&mgr);
}

/// Preemptions that arrive before the stub ran are one preemption (a slow handler under a
/// fast tick would otherwise stack them up forever, 136 bytes each).
fn queued_preemptions<B: Backend>(mgr: &Manager<B>) {
    let sig = install_tick(0);
    let (out, preempted) = run_counting_preemptions(mgr, three_ticks, sig as u64);
    assert_eq!(out, 42);
    assert_eq!(preempted, 1, "three queued preemptions before the stub ran");
}

#[test]
fn queued_preemptions_are_one() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap();
    queued_preemptions(&mgr);
}

#[test]
fn pku_queued_preemptions_are_one() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    queued_preemptions(&mgr);
}

/// A thread the library registered early (here: by a first op) whose runtime then installed
/// an alternate stack of its own — what a thread started while a sync signal was in flight
/// goes through — still gets its sandbox preempted: the first run puts the library's back.
fn after_a_replaced_altstack<B: Backend>(mgr: &Manager<B>) {
    std::thread::scope(|s| {
        s.spawn(|| {
            // Registers the thread: the library's alternate stack is installed.
            let d = mgr.create_domain(DomainOptions::reserve(4096)).unwrap();
            drop(d);
            let mut own = vec![0u8; 16 << 10];
            let ss = libc::stack_t {
                ss_sp: own.as_mut_ptr().cast(),
                ss_flags: 0,
                ss_size: own.len(),
            };
            // SAFETY: a stack this thread owns until the scope ends (the library replaces it
            // before the sandbox's signals come).
            assert_eq!(unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) }, 0);
            queued_preemptions(mgr);
        });
    });
}

#[test]
fn a_sandbox_run_puts_the_librarys_alternate_stack_back() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap();
    after_a_replaced_altstack(&mgr);
}

#[test]
fn pku_a_sandbox_run_puts_the_librarys_alternate_stack_back() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    after_a_replaced_altstack(&mgr);
}

// ---- the call gate writes nothing at the caller's stack pointer ----

static SAVED_RSP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static GATE_STATUS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// Where the gate returns to: records its status and goes back to `jump_into_gate`'s caller.
#[unsafe(naked)]
extern "C" fn landing() {
    core::arch::naked_asm!(
        "mov [rip + {status}], rax",
        "mov rsp, [rip + {saved}]",
        "ret",
        status = sym GATE_STATUS,
        saved = sym SAVED_RSP,
    );
}

/// Jumps (not calls) into `gate` with `OP_NOP` and the stack pointer `rsp`, as tenant code
/// may; returns when the gate returns (to `landing`).
#[unsafe(naked)]
extern "C" fn jump_into_gate(gate: usize, rsp: usize) {
    core::arch::naked_asm!(
        "mov [rip + {saved}], rsp",
        "mov rax, rdi",
        "mov rsp, rsi",
        "mov edi, 2",
        "xor esi, esi",
        "jmp rax",
        saved = sym SAVED_RSP,
    );
}

/// The gate's stack pointer on entry is the caller's choice, and everything it writes there
/// it writes with every key open. Here it points at the top of a read-only page (holding
/// only the return address): the gate must run and return without writing below it.
fn gate_leaves_the_callers_stack_alone(gate: usize) {
    // An op first: the thread is registered and its hook armed.
    let mgr = Manager::with_backend(Emulated::new(1).unwrap(), config(1)).unwrap();
    drop(mgr.create_domain(DomainOptions::reserve(4096)).unwrap());
    // SAFETY: a fresh private anonymous page, ours alone.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    let top = page as usize + 4096 - 8;
    // SAFETY: the page's last word; then the page becomes read-only.
    unsafe { (top as *mut usize).write(landing as *const () as usize) };
    // SAFETY: the page mapped above.
    assert_eq!(unsafe { libc::mprotect(page, 4096, libc::PROT_READ) }, 0);
    jump_into_gate(gate, top);
    assert_eq!(
        GATE_STATUS.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "OP_NOP's status"
    );
    // SAFETY: the page mapped above, unmapped once.
    unsafe { libc::munmap(page, 4096) };
}

#[test]
fn the_gate_writes_nothing_at_the_callers_stack_pointer() {
    let _g = common::real_backend();
    gate_leaves_the_callers_stack_alone(mpkvirt_asm::mpkvirt_gate_call_nopku as *const () as usize);
}

#[test]
fn pku_the_gate_writes_nothing_at_the_callers_stack_pointer() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    gate_leaves_the_callers_stack_alone(mpkvirt_asm::mpkvirt_gate_call as *const () as usize);
}
