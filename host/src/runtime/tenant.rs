//! The tenant side of an invocation: the code that runs inside an instance's sandbox, and the
//! signal handlers that preempt or end a sandboxed invocation.
//!
//! Everything here but the handlers runs with the *tenant's* rights, on the instance's
//! stack: the first function of a sandbox context ([`sandbox_main`]) and the host-call table
//! a native tenant gets ([`HOST_API`]: each function writes a request on the tenant's stack
//! and yields its address to the worker, which validates and serves it). None of it is
//! trusted: the tenant can call any of it with any arguments, or yield any value itself; the
//! worker checks every request against the instance's domain (`runtime::Worker::serve`).
//!
//! The handlers (faults, the watchdog's preemption signal) run on the thread's alternate
//! stack with the kernel's initial rights, each with the others blocked. They hand the
//! interrupted context to `mpkvirt::sandbox::signal`, which acts only when the thread's
//! normal context is sandboxed (library state, which a tenant cannot forge): a fault aborts
//! the invocation (the context yields `FAULT + signal` for good, from the top of its stack),
//! the preemption signal preempts it. Any other fault goes to the handler installed before
//! (mpkvirt's, then the default action).
//!
//! # Safety
//!
//! The handlers read and rewrite the kernel's `ucontext_t`; the frame the worker gives a new
//! context lives in the instance and is read with the tenant's rights (a tenant that corrupts
//! it only misleads its own invocation); the host-call functions pass pointers the tenant
//! chose, unread, to the worker.
#![allow(
    unsafe_code,
    reason = "sandbox entry, host calls by yield, signal handlers"
)]

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use mpkvirt::sandbox;

use crate::app::native::HostApi;

/// Yielded values below this are statuses; anything else is the address of a [`HostCall`].
pub(crate) const STATUS_LIMIT: u64 = 4096;
/// The entry returned; the frame holds its result.
pub(crate) const DONE: u64 = 1;
/// A built-in function panicked.
pub(crate) const PANICKED: u64 = 2;
/// `FAULT + signal`: a handler ended the invocation (the signal, or [`DEADLINE_SIG`]).
pub(crate) const FAULT: u64 = 256;

/// What a tenant asks of the host: written on its stack, its address yielded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HostCall {
    pub(crate) op: u64,
    pub(crate) a: [u64; 6],
}

pub(crate) const CALL_ALLOC: u64 = 1;
pub(crate) const CALL_FREE: u64 = 2;
pub(crate) const CALL_LOG: u64 = 3;
pub(crate) const CALL_TIME: u64 = 4;
pub(crate) const CALL_RANDOM: u64 = 5;
pub(crate) const CALL_INVOKE: u64 = 6;

/// A built-in function as the sandbox calls it: request in, response out.
pub(crate) type BuiltinFn = dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync;

/// The frame the worker writes into the instance for a new context (its argument).
#[repr(C)]
pub(crate) struct Frame {
    /// `ENTRY_NATIVE` or `ENTRY_BUILTIN`.
    pub(crate) kind: u64,
    /// The native entry, or the address of an `Arc<BuiltinFn>`.
    pub(crate) code: [usize; 2],
    pub(crate) request: *const u8,
    pub(crate) request_len: usize,
    /// The response's address and length: a native entry's `struct mpkvirt_response`, or a
    /// built-in's leaked boxed slice.
    pub(crate) response: [usize; 2],
    /// The entry's return code.
    pub(crate) rc: i64,
}

pub(crate) const ENTRY_NATIVE: u64 = 1;
pub(crate) const ENTRY_BUILTIN: u64 = 2;

/// The gate-side yield (the value goes to the worker; the result is its answer).
pub(crate) fn host_call(op: u64, a: [u64; 6]) -> u64 {
    let call = HostCall { op, a };
    // The address of a request on this (the instance's) stack; the worker reads it from
    // there after validating it.
    sandbox::yield_now(&raw const call as u64)
}

unsafe extern "C" fn api_alloc(len: usize) -> *mut c_void {
    host_call(CALL_ALLOC, [len as u64, 0, 0, 0, 0, 0]) as *mut c_void
}

unsafe extern "C" fn api_free(p: *mut c_void) {
    host_call(CALL_FREE, [p as u64, 0, 0, 0, 0, 0]);
}

unsafe extern "C" fn api_log(msg: *const c_char, len: usize) {
    host_call(CALL_LOG, [msg as u64, len as u64, 0, 0, 0, 0]);
}

unsafe extern "C" fn api_time_ns() -> u64 {
    host_call(CALL_TIME, [0; 6])
}

unsafe extern "C" fn api_random(buf: *mut c_void, len: usize) -> c_int {
    host_call(CALL_RANDOM, [buf as u64, len as u64, 0, 0, 0, 0]) as c_int
}

unsafe extern "C" fn api_invoke(
    name: *const c_char,
    name_len: usize,
    request: *const u8,
    request_len: usize,
    response: *mut *mut u8,
    response_len: *mut usize,
) -> c_int {
    host_call(
        CALL_INVOKE,
        [
            name as u64,
            name_len as u64,
            request as u64,
            request_len as u64,
            response as u64,
            response_len as u64,
        ],
    ) as c_int
}

/// `abort` and `__stack_chk_fail` of a native tenant (`image::REBOUND_IMPORTS`): the
/// invocation ends with `SIGABRT`, as the C library's `abort` would end it, without writing
/// the C library's state (its lock and stage counter are key-0 memory, read-only to a sealed
/// sandbox). Outside a sandbox (a tenant called directly, as in tests), the C library's.
unsafe extern "C" fn tenant_abort() -> ! {
    if matches!(sandbox::query(None), sandbox::Query::Sandboxed { .. }) {
        loop {
            sandbox::yield_now(FAULT + libc::SIGABRT as u64);
        }
    }
    // SAFETY: not sandboxed: the caller's own thread ends as `abort(3)` says.
    unsafe { libc::abort() }
}

// Fortification's checked copies (`image::REBOUND_IMPORTS`): the check, then the C library's
// plain function (pure: no state of its own), or the invocation ends as `abort` ends it.

unsafe extern "C" fn tenant_memcpy_chk(
    d: *mut c_void,
    s: *const c_void,
    n: usize,
    room: usize,
) -> *mut c_void {
    if n > room {
        // SAFETY: no precondition (it never returns).
        unsafe { tenant_abort() }
    }
    // SAFETY: the tenant's arguments, checked against the room the compiler knew; the
    // tenant's code runs with its own rights, which bound what the copy touches.
    unsafe { libc::memcpy(d, s, n) }
}

unsafe extern "C" fn tenant_memmove_chk(
    d: *mut c_void,
    s: *const c_void,
    n: usize,
    room: usize,
) -> *mut c_void {
    if n > room {
        // SAFETY: as above.
        unsafe { tenant_abort() }
    }
    // SAFETY: as in `tenant_memcpy_chk`.
    unsafe { libc::memmove(d, s, n) }
}

unsafe extern "C" fn tenant_memset_chk(
    d: *mut c_void,
    c: c_int,
    n: usize,
    room: usize,
) -> *mut c_void {
    if n > room {
        // SAFETY: as above.
        unsafe { tenant_abort() }
    }
    // SAFETY: as in `tenant_memcpy_chk`.
    unsafe { libc::memset(d, c, n) }
}

unsafe extern "C" fn tenant_strcpy_chk(
    d: *mut c_char,
    s: *const c_char,
    room: usize,
) -> *mut c_char {
    // SAFETY: the tenant's string, read with its rights.
    if unsafe { libc::strlen(s) } >= room {
        // SAFETY: as above.
        unsafe { tenant_abort() }
    }
    // SAFETY: as in `tenant_memcpy_chk`.
    unsafe { libc::strcpy(d, s) }
}

unsafe extern "C" fn tenant_strcat_chk(
    d: *mut c_char,
    s: *const c_char,
    room: usize,
) -> *mut c_char {
    // SAFETY: the tenant's string, read with its rights.
    let have = unsafe { libc::strlen(d) };
    // SAFETY: as above.
    let add = unsafe { libc::strlen(s) };
    if have.saturating_add(add) >= room {
        // SAFETY: as above.
        unsafe { tenant_abort() }
    }
    // SAFETY: as in `tenant_memcpy_chk`.
    unsafe { libc::strcat(d, s) }
}

unsafe extern "C" fn tenant_strncpy_chk(
    d: *mut c_char,
    s: *const c_char,
    n: usize,
    room: usize,
) -> *mut c_char {
    if n > room {
        // SAFETY: as above.
        unsafe { tenant_abort() }
    }
    // SAFETY: as in `tenant_memcpy_chk`.
    unsafe { libc::strncpy(d, s, n) }
}

/// The function the loader binds `name` (one of `image::REBOUND_IMPORTS`) to.
pub(crate) fn rebound(name: &str) -> Option<usize> {
    use super::tenant_heap::{tenant_calloc, tenant_free, tenant_malloc, tenant_realloc};
    Some(match name {
        "malloc" => tenant_malloc as *const () as usize,
        "calloc" => tenant_calloc as *const () as usize,
        "realloc" => tenant_realloc as *const () as usize,
        "free" => tenant_free as *const () as usize,
        "abort" | "__stack_chk_fail" => tenant_abort as *const () as usize,
        "__memcpy_chk" => tenant_memcpy_chk as *const () as usize,
        "__memmove_chk" => tenant_memmove_chk as *const () as usize,
        "__memset_chk" => tenant_memset_chk as *const () as usize,
        "__strcpy_chk" => tenant_strcpy_chk as *const () as usize,
        "__strcat_chk" => tenant_strcat_chk as *const () as usize,
        "__strncpy_chk" => tenant_strncpy_chk as *const () as usize,
        _ => return None,
    })
}

/// The host-call table every native tenant gets (host memory, read-only).
pub(crate) static HOST_API: HostApi = HostApi {
    version: crate::app::image::ABI_VERSION,
    alloc: api_alloc,
    free: api_free,
    log: api_log,
    time_ns: api_time_ns,
    random: api_random,
    invoke: api_invoke,
};

/// The first function of every invocation's context: runs the entry the frame names, then
/// yields [`DONE`] (or [`PANICKED`]) for good.
pub(crate) extern "C" fn sandbox_main(frame: u64, _first: u64) {
    let f = frame as *mut Frame;
    // SAFETY: the worker wrote the frame in the instance before the first run (8-byte
    // aligned); only this context can have changed it since. Plain data: any bits are valid.
    let fr = unsafe { f.read_volatile() };
    let (status, rc, response) = match fr.kind {
        ENTRY_NATIVE => {
            // SAFETY: the worker stored a validated object's entry, whose type the ABI fixes.
            let entry =
                unsafe { std::mem::transmute::<usize, crate::app::native::Entry>(fr.code[0]) };
            let mut resp = crate::app::native::Response {
                data: std::ptr::null_mut(),
                len: 0,
            };
            // SAFETY: the tenant's entry, called as the ABI says, with the request the worker
            // copied into the instance and a response slot on this stack.
            let rc = unsafe { entry(&HOST_API, fr.request, fr.request_len, &raw mut resp) };
            (DONE, i64::from(rc), [resp.data as usize, resp.len])
        }
        ENTRY_BUILTIN => {
            // SAFETY: the worker stored the address of the application's `Arc<BuiltinFn>`,
            // which it keeps alive for the invocation.
            let func = unsafe { &*(fr.code[0] as *const std::sync::Arc<BuiltinFn>) };
            // SAFETY: the request the worker copied into the instance, `request_len` bytes.
            let req = unsafe { std::slice::from_raw_parts(fr.request, fr.request_len) };
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| func(req))) {
                Ok(out) => {
                    let (rc, bytes) = match out {
                        Ok(v) => (0, v),
                        Err(msg) => (1, msg.into_bytes()),
                    };
                    // Taken back by the worker (`Frame::into_builtin_response`).
                    let bytes = std::mem::ManuallyDrop::new(bytes.into_boxed_slice());
                    (DONE, rc, [bytes.as_ptr() as usize, bytes.len()])
                }
                Err(payload) => {
                    // Dropping the payload runs arbitrary destructors; it is small, keep it.
                    std::mem::forget(payload);
                    (PANICKED, 0, [0, 0])
                }
            }
        }
        _ => (FAULT + libc::SIGABRT as u64, 0, [0, 0]),
    };
    // SAFETY: the frame, as above: the worker reads the result from it.
    unsafe {
        f.write_volatile(Frame { rc, response, ..fr });
    }
    loop {
        sandbox::yield_now(status);
    }
}

/// Makes the process's panic hook silent inside sandboxes (once per process): a built-in
/// function's panic ends its invocation with `InvokeError::Panicked`, which is its report;
/// printing it inside the sandbox would take the standard error and backtrace locks, and
/// symbolizing a backtrace there (reading the executable's debug information) is slow
/// enough to outlast a deadline. Elsewhere the hook installed before runs as it did.
pub(crate) fn quiet_panics_in_sandboxes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !matches!(sandbox::query(None), sandbox::Query::Sandboxed { .. }) {
                previous(info);
            }
        }));
    });
}

/// The real-time signal the watchdog preempts tenants with: fixed when the handlers are
/// installed and read from the sealed page after (the C library computes `SIGRTMIN` from a
/// variable in its writable data, which tenants can reach: rewritten, the watchdog's tick
/// would become a `SIGKILL`).
pub(crate) fn preempt_signal() -> c_int {
    HANDLERS
        .0
        .get()
        .map_or_else(|| libc::SIGRTMIN() + 8, |h| h.preempt)
}

/// The signals that end a sandboxed invocation instead of the process.
pub(crate) const FAULT_SIGNALS: [c_int; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGABRT,
];

/// What the host's handlers read: the preemption signal and the handlers installed before
/// theirs (to chain to). Not heap memory (a handler runs with the kernel's initial PKRU,
/// which denies the host domain), and not writable once set: it sits alone on a page made
/// read-only after the handlers are installed, so a tenant cannot plant a handler to chain
/// to or change the signal.
struct Handlers {
    preempt: c_int,
    previous: [Option<(c_int, libc::sigaction)>; 8],
}

/// [`Handlers`], alone on its page.
#[repr(C, align(4096))]
struct SealedPage(OnceLock<Handlers>);

static HANDLERS: SealedPage = SealedPage(OnceLock::new());

const _: () = assert!(size_of::<SealedPage>() == 4096);

/// Installs the fault and preemption handlers (once per process; after mpkvirt's fault handler,
/// which becomes the next in the chain), then seals what they read.
pub(crate) fn install_handlers() -> std::io::Result<()> {
    let mut err = None;
    let mut fresh = false;
    HANDLERS.0.get_or_init(|| {
        fresh = true;
        let preempt = libc::SIGRTMIN() + 8;
        let mut previous = [None; 8];
        let ours: Vec<c_int> = FAULT_SIGNALS.into_iter().chain([preempt]).collect();
        for (i, &sig) in ours.iter().enumerate() {
            // SAFETY: `on_signal` is async-signal-safe: one gate call (no allocation, no
            // lock), reads and writes of the frame it was given, and the chained handler.
            match unsafe { install_blocking(sig) } {
                Ok(old) => previous[i] = Some((sig, old)),
                Err(e) => err = Some(e),
            }
        }
        Handlers { preempt, previous }
    });
    if fresh {
        // SAFETY: the page of `HANDLERS` alone (page-aligned and page-sized), complete: the
        // `OnceLock` is set and never written again (reads only load its state).
        unsafe {
            mpkvirt_sys::mman::mprotect(
                (&raw const HANDLERS).cast_mut().cast(),
                4096,
                mpkvirt_sys::mman::Prot::READ,
            )
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    err.map_or(Ok(()), Err)
}

/// Installs `on_signal` for `sig` on the alternate stack, with every signal blocked while it
/// runs: a preemption or fault signal delivered during one of our handlers would find the
/// thread's *normal* context sandboxed and take the handler's context for it, and any signal
/// arriving while the handler runs library code would land on the library's stack (the
/// alternate stack is disarmed while a handler runs on it), where its handler cannot write.
///
/// # Safety
///
/// Replaces the process's action for `sig` (the previous one is returned, for chaining).
unsafe fn install_blocking(sig: c_int) -> std::io::Result<libc::sigaction> {
    // SAFETY: all-zero is a valid `sigaction` (integers, an empty mask, a null restorer).
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_signal as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: sigfillset writes only the mask of the struct we own.
    unsafe { libc::sigfillset(&mut new.sa_mask) };
    // SAFETY: all-zero is a valid `sigaction` for the kernel to overwrite.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid structs for the kernel to read and write; the handler's contract is
    // stated on `on_signal`.
    if unsafe { libc::sigaction(sig, &new, &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(old)
}

extern "C" fn on_signal(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // The preemption signal (the watchdog's; a tenant that sends it to itself only
    // preempts itself).
    let preempt = sig == preempt_signal();
    let action = if preempt {
        sandbox::Action::Preempt
    } else {
        sandbox::Action::Abort(FAULT + sig as u64)
    };
    match sandbox::signal(ctx.cast(), action) {
        sandbox::Signalled::Preempted | sandbox::Signalled::Aborted => {}
        // A tick that found no sandbox (or the gate itself): the next one comes.
        _ if preempt => {}
        _ => chain(sig, info, ctx),
    }
}

fn chain(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let prev = HANDLERS.0.get().and_then(|h| {
        h.previous
            .iter()
            .flatten()
            .find(|(s, _)| *s == sig)
            .map(|(_, a)| a)
    });
    match prev {
        // SAFETY: the handler that was installed before ours, with the kernel's arguments.
        Some(prev) => unsafe { mpkvirt_sys::signal::chain(prev, sig, info, ctx) },
        None => {
            // SAFETY: restores the default action (async-signal-safe).
            unsafe { libc::signal(sig, libc::SIG_DFL) };
            // SAFETY: re-raised: pending until this handler returns, then the default action.
            unsafe { libc::raise(sig) };
        }
    }
}

/// Sends the preemption signal to thread `tid` of this process (the watchdog).
pub(crate) fn preempt(tid: i32) {
    // A thread that ended meanwhile (its id unused or reused by a thread of this process
    // running no tenant) gets nothing or a signal it ignores.
    let _ = mpkvirt_sys::thread::tgkill(tid, preempt_signal());
}

/// An instance's memory as the worker sees it while it serves the instance (inside its view):
/// every access is checked to lie in the instance's domain, so a pointer or length a tenant
/// made up reaches nothing else.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InstanceMem {
    base: usize,
    len: usize,
}

impl InstanceMem {
    pub(crate) fn new<B: mpkvirt::Backend>(d: &mpkvirt::Domain<B>) -> InstanceMem {
        InstanceMem {
            base: d.base().as_ptr() as usize,
            len: d.len(),
        }
    }

    /// Whether `[ptr, ptr + len)` lies in the instance.
    pub(crate) fn holds(&self, ptr: u64, len: u64) -> bool {
        let (Ok(ptr), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
            return false;
        };
        ptr >= self.base
            && ptr
                .checked_add(len)
                .is_some_and(|e| e <= self.base + self.len)
    }

    /// A copy of `len` bytes at `ptr`, if they lie in the instance.
    pub(crate) fn read(&self, ptr: u64, len: u64) -> Option<Vec<u8>> {
        if !self.holds(ptr, len) {
            return None;
        }
        let mut out = vec![0; len as usize];
        // SAFETY: inside the instance's domain (checked), which the worker's view opens; the
        // tenant does not run while the worker serves it, and the bytes are copied, not
        // referenced.
        unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, out.as_mut_ptr(), out.len()) };
        Some(out)
    }

    /// A copy of `len` bytes at `ptr`, if they lie in the instance or in one of `image`'s
    /// ranges (the application's read-only segments, `(start, end)`).
    pub(crate) fn read_or_image(
        &self,
        image: &[(usize, usize)],
        ptr: u64,
        len: u64,
    ) -> Option<Vec<u8>> {
        if let Some(v) = self.read(ptr, len) {
            return Some(v);
        }
        let (p, n) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
        let end = p.checked_add(n)?;
        if !image.iter().any(|&(s, e)| p >= s && end <= e) {
            return None;
        }
        let mut out = vec![0; n];
        // SAFETY: inside a read-only segment of the application's object (checked), mapped
        // while the application exists (it holds the object); copied, not referenced.
        unsafe { std::ptr::copy_nonoverlapping(p as *const u8, out.as_mut_ptr(), n) };
        Some(out)
    }

    /// Writes `bytes` at `ptr`, if they fit in the instance.
    pub(crate) fn write(&self, ptr: u64, bytes: &[u8]) -> bool {
        if !self.holds(ptr, bytes.len() as u64) {
            return false;
        }
        // SAFETY: as in `read`; instance memory no Rust reference points to.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr as *mut u8, bytes.len()) };
        true
    }

    /// Writes a frame for a new invocation at `at` (which the worker allocated in the
    /// instance).
    pub(crate) fn write_frame(&self, at: u64, frame: Frame) -> bool {
        if !self.holds(at, size_of::<Frame>() as u64) || !at.is_multiple_of(8) {
            return false;
        }
        // SAFETY: inside the instance (checked) and aligned; memory the worker allocated for
        // the frame.
        unsafe { (at as *mut Frame).write(frame) };
        true
    }

    /// The frame at `at` as the context left it.
    pub(crate) fn read_frame(&self, at: u64) -> Option<Frame> {
        if !self.holds(at, size_of::<Frame>() as u64) || !at.is_multiple_of(8) {
            return None;
        }
        // SAFETY: as in `write_frame`; every field is plain data (any bits are valid).
        Some(unsafe { (at as *const Frame).read_volatile() })
    }

    /// Prepares a new context for the invocation whose frame is at `frame`, on a stack that
    /// ends at `top`.
    pub(crate) fn context(&self, top: u64, frame: u64) -> Option<Runnable> {
        if top < 128 || !self.holds(top - 128, 128) {
            return None;
        }
        // SAFETY: the 72 bytes below `top` lie in the instance (checked), on the stack the
        // worker allocated for this invocation, which nothing else uses.
        let ctx = unsafe { sandbox::Context::new(top as usize, sandbox_main, frame) };
        Some(Runnable { sp: ctx.sp })
    }
}

impl Frame {
    /// The response a built-in function left (a boxed slice `sandbox_main` leaked), taken
    /// back; consumes the frame, so it is taken once.
    pub(crate) fn into_builtin_response(self) -> Vec<u8> {
        let [ptr, len] = self.response;
        if ptr == 0 {
            return Vec::new();
        }
        // SAFETY: for a built-in, only `sandbox_main` (trusted code: the built-in runs in an
        // instance no native tenant shares) writes the response words, from a boxed slice it
        // leaked; the frame is fresh for each invocation and consumed here.
        unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr as *mut u8, len)) }.into_vec()
    }
}

/// A sandboxed context that may be run: prepared by [`InstanceMem::context`], or returned by
/// its last run. Running consumes it, so a context never runs twice from one state.
#[derive(Debug)]
pub(crate) struct Runnable {
    sp: usize,
}

impl Runnable {
    /// Runs the context in `d`'s sandbox until it yields; returns the context to run next and
    /// the value it yielded. `trusted`: the host's own code (a built-in function), whose
    /// sandbox keeps the host domain (`Manager::sandbox_run_shared`); a native tenant's
    /// reaches its instance and key 0 only.
    pub(crate) fn run<B: mpkvirt::Backend>(
        self,
        mgr: &mpkvirt::Manager<B>,
        d: &mpkvirt::Domain<B>,
        exit_sp: usize,
        value: u64,
        trusted: bool,
    ) -> mpkvirt::Result<(Runnable, u64)> {
        let y = if trusted {
            // SAFETY: `self.sp` is a context prepared in `d` or the one its last yield
            // returned, not run since (this value is consumed); it runs `sandbox_main` on a
            // built-in function, the host's own code, which may reach the host domain.
            unsafe { mgr.sandbox_run_shared(d, self.sp, exit_sp, value) }
        } else {
            // SAFETY: as above; a native tenant's code gets its instance and key 0 only.
            unsafe { mgr.sandbox_run(d, self.sp, exit_sp, value) }
        }?;
        Ok((Runnable { sp: y.sp }, y.value))
    }
}

/// Fills `buf` with random bytes from the kernel.
pub(crate) fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the unfilled rest of `buf`, valid for writes.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
}

/// Nanoseconds of the system's monotonic clock (no base kept in memory a tenant could
/// write).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given (vDSO, no system call).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000) + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the handlers read is sealed once they are installed: a write to it (a tenant's,
    /// planting a handler to chain to) faults.
    #[test]
    fn the_handlers_table_is_read_only_once_installed() {
        install_handlers().unwrap();
        let at = (&raw const HANDLERS).cast_mut().cast::<u8>();
        // SAFETY: the child only writes one byte of the sealed page and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // The default action, not the handlers: the child of a process whose other
            // threads may have been inside mpkvirt when it forked must not call into it.
            // SAFETY: restores the default action for SIGSEGV in the child (async-signal-safe).
            unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
            // SAFETY: deliberately a write to the sealed page: the test expects SIGSEGV.
            unsafe { at.write_volatile(0xff) };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
            "status {status:#x}"
        );
        assert_eq!(preempt_signal(), libc::SIGRTMIN() + 8);
    }
}
