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

/// What the sandboxed code tried, for the runner to check. It lives in the sandbox's own
/// domain: where the kernel allows it, a sandbox may not write key-0 memory
/// ([`sandbox::seals_key0`]), the runner's stack and the process's heap included.
struct Probe<'a, B: Backend> {
    mgr: &'a Manager<B>,
    own: &'a Domain<B>,
    other: &'a Domain<B>,
    /// The runner's view (a copy: ending it is the attack).
    runner_view: *const ViewGuard<'a, B>,
    refused: [(&'static str, bool); 16],
    tries: usize,
}

const DONE: u64 = 0xD0;

fn body<B: Backend>(arg: u64, first: u64) {
    // SAFETY: the runner passes a `Probe<B>` it keeps alive (and does not touch) while the
    // context runs, in the sandbox's domain.
    let p = unsafe { &mut *(arg as *mut Probe<'_, B>) };
    // Values round-trip: the runner resumes with what it got, times ten.
    let v = sandbox::yield_now(first + 1);
    let v = sandbox::yield_now(v + 1);
    let mut tried = |what, r: mpkvirt::Result<()>| {
        p.refused[p.tries] = (what, r.is_err());
        p.tries += 1;
    };
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
    let probe = own
        .alloc(size_of::<Probe<'_, B>>(), align_of::<Probe<'_, B>>())
        .unwrap()
        .cast::<Probe<'_, B>>();
    // SAFETY: a block of `own` of the probe's size and alignment, inside the runner's view.
    unsafe {
        probe.write(Probe {
            mgr,
            own: &own,
            other: &other,
            runner_view: &raw const runner_view,
            refused: [("", false); 16],
            tries: 0,
        })
    };
    // SAFETY: the top of `own`, writable in the runner's view and used by nothing else.
    let ctx = unsafe { Context::new(top(&own), f, probe.as_ptr() as u64) };
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
    // SAFETY: the probe written above; the context is done with it.
    let probe = unsafe { probe.as_ref() };
    for (what, refused) in &probe.refused[..probe.tries] {
        assert!(refused, "sandboxed code could {what}");
    }
    assert_eq!(probe.tries, 9);
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
    if sandbox::seals_key0() {
        // Where key 0 is read-only to sandboxes, the attack's first library call dies before
        // it reaches the gate: it allocates, and the process's heap is key-0 memory. (The
        // gate's refusals are checked natively and on kernels without the seal.)
        let status = in_child(|| {
            sandbox_seal(&mgr, body_hardware);
            0
        });
        assert_eq!(status, Err(libc::SIGSEGV), "a sealed sandbox's attack");
    } else {
        sandbox_seal(&mgr, body_hardware);
    }
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

/// Key-0 memory a sandbox tries to write (a static: the process's common data).
static KEY0_TARGET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(7);

/// Writes 42 at `arg` and yields 0.
extern "C" fn write_and_yield(arg: u64, _first: u64) {
    // SAFETY: the attack: any address, written with the sandbox's rights.
    unsafe { (arg as *mut u8).write_volatile(42) };
    loop {
        sandbox::yield_now(0);
    }
}

/// The kernel's version as `(major, minor)`, from `uname`.
fn kernel_version() -> (u32, u32) {
    // SAFETY: all-zero is a valid `utsname` for `uname` to fill.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid struct to write.
    assert_eq!(unsafe { libc::uname(&mut u) }, 0);
    // SAFETY: `uname` wrote a NUL-terminated release string.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap();
    (next(), next())
}

/// On a kernel that writes signal frames with every key open (6.12 on), a sandbox's key 0 is
/// read-only: it can write none of the process's common memory (statics, the runner's stack,
/// other threads' thread-local storage and signal frames). Before 6.12 the kernel writes a
/// frame with the interrupted PKRU onto the key-0 alternate stack, so key 0 stays writable
/// there — the probe must tell the two apart, or a signal would kill the process.
#[test]
fn pku_a_sandbox_writes_no_key_0_memory_where_the_kernel_allows_the_seal() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let sealed = sandbox::seals_key0();
    assert_eq!(
        sealed,
        kernel_version() >= (6, 12),
        "the seal on kernel {:?}",
        kernel_version()
    );
    let mut local = 7u8;
    for target in [KEY0_TARGET.as_ptr() as usize, (&raw mut local) as usize] {
        let status = in_child(|| {
            let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
            // SAFETY: the top of `own`, writable in this view.
            let ctx = unsafe { Context::new(top(&own), write_and_yield, target as u64) };
            // SAFETY: a prepared context.
            let y = unsafe { mgr.sandbox_run(&own, ctx.sp, top(&own), 0) }.unwrap();
            // SAFETY: the target, key-0 memory of this (the child's) process.
            let now = unsafe { (target as *const u8).read_volatile() };
            i32::from(y.value != 0 || now != 42)
        });
        if sealed {
            assert_eq!(status, Err(libc::SIGSEGV), "a sealed sandbox wrote key 0");
        } else {
            assert_eq!(status, Ok(0), "an unsealed sandbox writes key 0");
        }
    }
    // The parent's copies are untouched either way.
    assert_eq!(KEY0_TARGET.load(std::sync::atomic::Ordering::Relaxed), 7);
    assert_eq!(local, 7);
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
    // Once outside: `mul_add` without the FMA target feature is compiler-builtins' `fma`,
    // which picks its implementation at its first call and keeps it in a static — key-0
    // memory, read-only to a sealed sandbox.
    std::hint::black_box(work(std::hint::black_box(1)));
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

// ---- no gate lifts a sealed sandbox's key-0 seal ----

/// A hardware manager where sandboxes seal key 0 (`None` before Linux 6.12, where key 0
/// is writable to sandboxes anyway: the probe's answer checked against the kernel's
/// version).
fn sealed_manager() -> Option<Manager<Hardware>> {
    if !sandbox::seals_key0() {
        assert!(kernel_version() < (6, 12));
        return None;
    }
    Some(Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap())
}

/// The key-0 word the attack writes after a jump into the gate.
static SEAL_TARGET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(7);

/// Writes `SEAL_TARGET` (key 0) and exits the process with status 0, on no stack: what
/// sandboxed code would do with key 0 writable.
#[unsafe(naked)]
extern "C" fn seal_landing() {
    core::arch::naked_asm!(
        "mov byte ptr [rip + {t}], 42",
        "xor edi, edi",
        "mov eax, 231", // exit_group
        "syscall",
        "ud2",
        t = sym SEAL_TARGET,
    );
}

/// A key-0 word holding `seal_landing`'s address: the stack a jump into the gate returns
/// on (a sealed sandbox cannot write one, but key 0 is full of return addresses to reuse).
static SEAL_LANDING_SLOT: extern "C" fn() = seal_landing;

/// Jumps to `at` with the stack pointer `sp` (a word holding `seal_landing`'s address), EAX
/// = 0 (every key open), R8 the kernel's initial PKRU (a signal handler's entry, as the
/// dispatcher sees it when the jump skips the gate's RDPKRU), ECX = EDX = 0 and RDI a
/// refused op.
#[unsafe(naked)]
extern "C" fn jump_for_key0(at: usize, sp: usize) {
    core::arch::naked_asm!(
        "mov rax, rdi",
        "mov rsp, rsi",
        "mov r11, rax",
        "mov r8d, 0x55555554",
        "xor eax, eax",
        "xor ecx, ecx",
        "xor edx, edx",
        "mov edi, 0xffff",
        "xor esi, esi",
        "jmp r11",
    );
}

/// Jumps to `at` as `jump_for_key0` does: on a word of its own stack when the first run's
/// value has bit 0 set, else on `SEAL_LANDING_SLOT`; with bit 1, after a signal handler of
/// its thread called the library (it sends itself the tick signal, which preempts it: the
/// jump comes when it runs again, with whatever the handler left in the record).
extern "C" fn jump_body(at: u64, first: u64) {
    let own = [seal_landing as extern "C" fn() as usize; 4];
    let at = at as usize;
    if first & 2 != 0 {
        let _ = mpkvirt_sys::thread::tgkill(mpkvirt_sys::thread::gettid(), libc::SIGRTMIN() + 9);
    }
    let sp = if first & 1 != 0 {
        std::hint::black_box(&own).as_ptr() as usize
    } else {
        (&raw const SEAL_LANDING_SLOT) as usize
    };
    jump_for_key0(at, sp);
    loop {
        sandbox::yield_now(0);
    }
}

/// In a forked child: a SIGSEGV ends it with 10 at `SEAL_TARGET`, 11 elsewhere.
fn exit_on_segv_in_child() {
    // SAFETY: a handler that only exits the (forked) process.
    unsafe {
        mpkvirt_sys::signal::install(
            libc::SIGSEGV,
            exit_on_segv,
            libc::SA_ONSTACK | libc::SA_SIGINFO,
        )
    }
    .unwrap();
}

extern "C" fn exit_on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel's `siginfo_t` for this SIGSEGV (installed with `SA_SIGINFO`).
    let info = unsafe { &*info };
    // SAFETY: a SIGSEGV's `siginfo_t` has its address field set.
    let addr = unsafe { info.si_addr() } as usize;
    let code = if addr == SEAL_TARGET.as_ptr() as usize {
        10
    } else {
        11
    };
    // SAFETY: ends the (forked) process.
    unsafe { libc::_exit(code) };
}

/// Sealed sandboxed code that jumps onto any WRPKRU of the call gates, or just past it —
/// with EAX = 0, R8 forged to a signal handler's entry PKRU, and a stack word (in key 0, or
/// on its own stack) that returns into code writing key 0 — gets no key-0 write, also right
/// after a signal handler of its thread called the library. The deny path keeps key 0
/// read-only where sandboxes run so; a busy record's lower (key 0 read-write, for a handler
/// that interrupted the library) is taken only while the record is busy; and no level's
/// value in the record has key 0 writable (a handler's op on a sealed thread ends the
/// handler instead of returning to it). Each attempt ends with SIGSEGV at the key-0 word
/// (exit 10) — but just past the raise, where PKRU is still the sandbox's and the busy
/// word's write faults, and after the deny path on the sandbox's own stack, which the deny
/// value denies (11). A write that went through exits 0.
#[test]
fn pku_no_gate_lifts_a_sealed_sandboxs_key_0_seal() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let Some(mgr) = sealed_manager() else { return };
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let gate = mpkvirt_asm::mpkvirt_gate_call as *const () as usize;
    let sync = mpkvirt_asm::addr::gate_sync();
    // The call gate's bytes up to the next function of its file (the no-PKU twin).
    let nopku = mpkvirt_asm::mpkvirt_gate_call_nopku as *const () as usize;
    let len = if nopku > gate {
        (nopku - gate).min(1024)
    } else {
        512
    };
    // SAFETY: the gate's own code, mapped readable and executable.
    let code = unsafe { std::slice::from_raw_parts(gate as *const u8, len) };
    let mut targets: Vec<usize> = mpkvirt::scan::gadgets(code)
        .into_iter()
        .filter(|g| g.1 == mpkvirt::scan::Gadget::Wrpkru)
        .map(|g| gate + g.0)
        .collect();
    assert_eq!(targets.len(), 4, "the call gate's WRPKRUs");
    // SAFETY: as above.
    let sync_code = unsafe { std::slice::from_raw_parts(sync as *const u8, 64) };
    targets.extend(
        mpkvirt::scan::gadgets(sync_code)
            .into_iter()
            .take(1)
            .map(|g| sync + g.0),
    );
    let (raise, deny) = (targets[0], targets[3]);
    install_tick(0);
    let attempts = targets
        .iter()
        .flat_map(|&w| [w, w + 3])
        .flat_map(|at| (0..4).map(move |how| (at, how)));
    for (at, how) in attempts {
        let status = in_child(|| {
            exit_on_segv_in_child();
            let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
            // SAFETY: the top of `own`, writable in this view.
            let ctx = unsafe { Context::new(top(&own), jump_body, at as u64) };
            let mut sp = ctx.sp;
            let mut value = how;
            loop {
                // SAFETY: the prepared context, then the one the preemption returned.
                match unsafe { mgr.sandbox_run(&own, sp, top(&own), value) } {
                    Ok(y) if y.value == sandbox::PREEMPTED => (sp, value) = (y.sp, 0),
                    Ok(_) => return 20,
                    Err(_) => return 21,
                }
            }
        });
        // Just past the raise, PKRU is still the sandbox's and the busy word's write faults;
        // the deny value denies the sandbox's own stack, so the return from it faults.
        let want = if at == raise + 3 || (how & 1 != 0 && (at == deny || at == deny + 3)) {
            11
        } else {
            10
        };
        assert_eq!(
            status,
            Ok(want),
            "a jump to gate+{:#x} ({how}): key 0 written (0), a fault elsewhere (11) or back (2x)",
            at.wrapping_sub(gate)
        );
    }
}

// ---- sandboxed code with its stack pointer on the alternate stack ----

/// In a forked child: the tick signal `sig` to the calling thread every 2 ms (from a thread
/// of its own), and an alarm that ends the child after 30 s (a sandbox never stopped).
fn ticking_in_child(sig: libc::c_int) {
    // SAFETY: plain system call; the child's default SIGALRM action ends it.
    unsafe { libc::alarm(30) };
    let tid = mpkvirt_sys::thread::gettid();
    std::thread::spawn(move || {
        loop {
            let _ = mpkvirt_sys::thread::tgkill(tid, sig);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
}

/// The thread's alternate stack, as the kernel has it.
fn altstack_now() -> usize {
    let mut old = std::mem::MaybeUninit::<libc::stack_t>::zeroed();
    // SAFETY: a query (null new stack) only writes `old`.
    let rc = unsafe { libc::sigaltstack(std::ptr::null(), old.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: filled by sigaltstack.
    unsafe { old.assume_init() }.ss_sp as usize
}

/// Moves the stack pointer to `sp` and executes an illegal instruction.
#[unsafe(naked)]
extern "C" fn fault_with_sp(sp: usize) {
    core::arch::naked_asm!("mov rsp, rdi", "ud2");
}

/// Moves the stack pointer to `sp` and spins.
#[unsafe(naked)]
extern "C" fn spin_with_sp(sp: usize) {
    core::arch::naked_asm!("mov rsp, rdi", "2:", "jmp 2b");
}

extern "C" fn fault_on_altstack(_arg: u64, _first: u64) {
    // (Above the red zone the kernel skips, below the room a signal frame needs.)
    fault_with_sp(altstack_now() + 1024);
}

extern "C" fn spin_on_altstack(_arg: u64, _first: u64) {
    spin_with_sp(altstack_now() + 4096);
}

extern "C" fn abort_on_fault(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    sandbox::signal(ctx.cast(), sandbox::Action::Abort(0xAB));
}

/// Sandboxed code that points its stack near the bottom of the thread's alternate stack and
/// faults: the kernel must not take it for a handler's stack (the frame would overflow it,
/// and a signal frame the kernel cannot write is a SIGSEGV that kills the process). The
/// library's alternate stack is disarmed while a handler runs (`SS_AUTODISARM`), so the
/// frame goes to its top and the sandbox is abandoned as for any fault.
fn a_fault_with_the_stack_on_the_altstack<B: Backend>(mgr: &Manager<B>) {
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let status = in_child(|| {
        // SAFETY: a handler that makes one library call (async-signal-safe).
        unsafe {
            mpkvirt_sys::signal::install(
                libc::SIGILL,
                abort_on_fault,
                libc::SA_ONSTACK | libc::SA_SIGINFO,
            )
        }
        .unwrap();
        let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
        // SAFETY: the top of `own`, writable in this view.
        let ctx = unsafe { Context::new(top(&own), fault_on_altstack, 0) };
        // SAFETY: a prepared context.
        match unsafe { mgr.sandbox_run(&own, ctx.sp, top(&own), 0) } {
            Ok(y) if y.value == 0xAB => 0,
            _ => 1,
        }
    });
    assert_eq!(
        status,
        Ok(0),
        "the process survives, the sandbox is abandoned"
    );
}

#[test]
fn a_fault_with_the_stack_on_the_alternate_stack_is_contained() {
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Emulated::new(4).unwrap(), config(4)).unwrap();
    a_fault_with_the_stack_on_the_altstack(&mgr);
}

#[test]
fn pku_a_fault_with_the_stack_on_the_alternate_stack_is_contained() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    a_fault_with_the_stack_on_the_altstack(&mgr);
}

/// Sandboxed code that spins with its stack pointer on the thread's alternate stack is not
/// taken for a signal handler (which a preemption leaves alone): with PKU a handler is told
/// by its frame's PKRU, and the tick ends the sandbox (its stack pointer is outside its
/// domain, so it cannot be preempted). Without the check it would never be stopped: the
/// child's alarm kills it.
#[test]
fn pku_a_spin_with_the_stack_on_the_alternate_stack_is_stopped() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr = Manager::with_backend(Hardware::new(4).unwrap(), config(4)).unwrap();
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let sig = install_tick(0);
    let status = in_child(|| {
        ticking_in_child(sig);
        let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
        // SAFETY: the top of `own`, writable in this view.
        let ctx = unsafe { Context::new(top(&own), spin_on_altstack, 0) };
        let mut sp = ctx.sp;
        loop {
            // SAFETY: the prepared context, then the one a preemption returned.
            match unsafe { mgr.sandbox_run(&own, sp, top(&own), 0) } {
                Ok(y) if y.value == sandbox::PREEMPTED => sp = y.sp,
                // Abandoned (the preemption's value, 0).
                Ok(y) if y.value == 0 => return 0,
                _ => return 1,
            }
        }
    });
    assert_eq!(status, Ok(0), "the spinning sandbox is stopped");
}

// ---- forged handler entries on a sealed thread ----

/// Calls the gate's raise WRPKRU at `at` as a signal handler would enter the gate (R8, the
/// entry PKRU the dispatcher sees, forged to the kernel's initial value: the jump skips the
/// gate's RDPKRU), with op `op` and block `block`; returns the gate's status.
#[unsafe(naked)]
extern "C" fn forged_handler_call(at: usize, op: u64, block: usize) -> u64 {
    core::arch::naked_asm!(
        "push rbx",
        "mov r11, rdi",
        "mov rdi, rsi",
        "mov rsi, rdx",
        "lea rbx, [rip + 2f]",
        "push rbx",
        "mov r8d, 0x55555554",
        "xor eax, eax",
        "xor ecx, ecx",
        "xor edx, edx",
        "jmp r11",
        "2:",
        "pop rbx",
        "ret",
    );
}

/// The call gate's raise WRPKRU (its first).
fn raise_wrpkru() -> usize {
    let gate = mpkvirt_asm::mpkvirt_gate_call as *const () as usize;
    // SAFETY: the gate's own code, mapped readable and executable.
    let code = unsafe { std::slice::from_raw_parts(gate as *const u8, 64) };
    let first = mpkvirt::scan::gadgets(code)
        .into_iter()
        .find(|g| g.1 == mpkvirt::scan::Gadget::Wrpkru)
        .expect("the call gate's first WRPKRU");
    gate + first.0
}

/// Forges a handler's `OP_SANDBOX_SIGNAL` (code 16) with the block at `arg`, through the
/// raise WRPKRU at `first` (found by the runner: the scan allocates).
extern "C" fn forge_signal_op(arg: u64, first: u64) {
    let status = forged_handler_call(first as usize, 16, arg as usize);
    loop {
        sandbox::yield_now(status & 0xff);
    }
}

/// Forges a handler's level with an `OP_NOP` (code 2) through the raise WRPKRU at `arg`,
/// then spins.
extern "C" fn forge_level_and_spin(arg: u64, _first: u64) {
    forged_handler_call(arg as usize, 2, 0);
    spin_with_sp(0);
}

/// Sandboxed code that forges a handler's call of the signal op — its block and a frame
/// planted on the alternate stack (the review's attack plants them through the registers a
/// kernel frame saves; the runner writes them here) — gets no `rt_sigreturn` from the
/// library: the op ends a handler only with the kernel's word that one runs (the alternate
/// stack disarmed). Without that check the library returned "from the signal" into the
/// planted frame, whose missing extended state makes the kernel install its initial PKRU
/// (key 0 writable) at the planted instruction: the key-0 write exits 0. With it the op is
/// refused; the forged level then refuses the code's yields, and a tick preempts it.
#[test]
fn pku_a_forged_handler_gets_no_sigreturn_from_the_library() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let Some(mgr) = sealed_manager() else { return };
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let raise = raise_wrpkru();
    let sig = install_tick(0);
    let status = in_child(|| {
        exit_on_segv_in_child();
        let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
        // A first run installs the library's alternate stack; the planted block and frame go
        // below its top.
        // SAFETY: the top of `own`, writable in this view.
        let warm = unsafe { Context::new(top(&own), jump_body_yield, 0) };
        // SAFETY: a prepared context.
        let _ = unsafe { mgr.sandbox_run(&own, warm.sp, top(&own), 0) };
        let alt = altstack_now();
        let uc = (alt + (16 << 10)) as *mut libc::ucontext_t;
        // SAFETY: all-zero is a valid `ucontext_t` (integers and null pointers).
        let mut fake: libc::ucontext_t = unsafe { std::mem::zeroed() };
        let g = &mut fake.uc_mcontext.gregs;
        g[libc::REG_RIP as usize] = seal_landing as extern "C" fn() as usize as i64;
        g[libc::REG_RSP as usize] = (&raw const SEAL_LANDING_SLOT) as i64;
        g[libc::REG_EFL as usize] = 0x202;
        g[libc::REG_CSGSFS as usize] = 0x33 | (0x2b << 48);
        fake.uc_stack = libc::stack_t {
            ss_sp: alt as *mut libc::c_void,
            ss_flags: 1 << 31,
            ss_size: 64 << 10,
        };
        // SAFETY: the thread's alternate stack (ours, read-write here), not in use.
        unsafe { uc.write(fake) };
        let block = (alt + (8 << 10)) as *mut u64;
        // SAFETY: as above: `SignalIn { ctx, action: sync, value }`.
        unsafe { block.cast::<[u64; 3]>().write([uc as u64, 2, 0]) };
        ticking_in_child(sig);
        // SAFETY: the top of `own`, writable in this view.
        let ctx = unsafe { Context::new(top(&own), forge_signal_op, block as u64) };
        // SAFETY: a prepared context.
        match unsafe { mgr.sandbox_run(&own, ctx.sp, top(&own), raise as u64) } {
            Ok(y) if y.value == sandbox::PREEMPTED => 20,
            Ok(y) => 30 + (y.value & 0xff) as i32,
            Err(_) => 21,
        }
    });
    assert_eq!(
        status,
        Ok(20),
        "the forged op came back refused (0: the library sigreturned)"
    );
}

extern "C" fn jump_body_yield(_arg: u64, _first: u64) {
    loop {
        sandbox::yield_now(7);
    }
}

/// Sandboxed code that forges a handler's level (an `OP_NOP` with a handler's entry PKRU)
/// and spins is still preempted: on a sealed thread a handler's context is told by key 0's
/// field of the frame's PKRU, which the forged level does not change. Without that the
/// ticks took it for a handler and it was never stopped (the child's alarm kills it).
#[test]
fn pku_a_forged_handler_level_does_not_stop_preemption() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let Some(mgr) = sealed_manager() else { return };
    let own = mgr.create_domain(DomainOptions::reserve(64 << 10)).unwrap();
    let sig = install_tick(0);
    let raise = raise_wrpkru();
    let status = in_child(|| {
        ticking_in_child(sig);
        let _v = mgr.enter(&[(&own, Rights::ReadWrite)]).unwrap();
        // SAFETY: the top of `own`, writable in this view.
        let ctx = unsafe { Context::new(top(&own), forge_level_and_spin, raise as u64) };
        let mut sp = ctx.sp;
        for _ in 0..3 {
            // SAFETY: the prepared context, then the one a preemption returned.
            match unsafe { mgr.sandbox_run(&own, sp, top(&own), 0) } {
                Ok(y) if y.value == sandbox::PREEMPTED => sp = y.sp,
                // Abandoned (its stack pointer left its domain): stopped too.
                Ok(y) if y.value == 0 => return 0,
                _ => return 1,
            }
        }
        0
    });
    assert_eq!(status, Ok(0), "the spinning sandbox is stopped");
}
