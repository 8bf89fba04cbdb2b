//! Green threads: stackful contexts switched at user level (`asm/x86_64/green.S`).
//!
//! A [`Fiber`] runs a closure on a stack of its own. [`Fiber::resume`] switches to it from the
//! caller (a worker's scheduler loop); inside, [`Suspend::suspend`] switches back, and the
//! next `resume` continues after it. A switch saves and restores only what the ABI says a
//! call preserves, on the stacks themselves: a few nanoseconds, no system call
//! (`benches/benches/green.rs` measures it against a handoff between OS threads).
//!
//! Rights are not part of the switch. The worker installs the view of the instance it is
//! about to resume through mpkvirt's call gate (whose WRPKRU cannot be used as a gadget), so
//! no byte of the switch can change PKRU however a tenant reaches it.
//!
//! A fiber's closure must not unwind out of it: panics are caught on the fiber's stack and
//! handed to the resumer. A fiber dropped while suspended mid-run never runs the destructors
//! of the frames on its stack, so its stack is leaked, not unmapped: something may still
//! borrow from those frames (a scoped thread started inside the closure). The runtime ends
//! tenant invocations without dropping suspended fibers.
//!
//! # Safety
//!
//! Stacks are mappings made here, with a guard page below. Switching relies on
//! `mpkvirt_green_switch`'s contract: each saved stack pointer is resumed at most once, into
//! a stack that is still mapped; the fiber's record lives in a `Box` whose address does not
//! change while the fiber exists.
#![allow(unsafe_code, reason = "stack switching")]

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use mpkvirt_sys::mman::{self, Prot};

/// A fiber's stack: `[guard page][usable]`; in the host domain once the host heap is active
/// (`crate::heap`), a mapping of its own before.
#[derive(Debug)]
struct Stack {
    base: usize,
    len: usize,
    /// Allocated from the host heap (with this layout), rather than mapped.
    heap: Option<std::alloc::Layout>,
}

impl Stack {
    fn new(usable: usize) -> std::io::Result<Stack> {
        let page = mman::page_size();
        let usable = usable.max(page).div_ceil(page) * page;
        let len = usable + page;
        let io = |e: mpkvirt_sys::Error| std::io::Error::other(e.to_string());
        if crate::heap::is_active() {
            let layout = std::alloc::Layout::from_size_align(len, page)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // SAFETY: a non-zero size.
            let base = unsafe { std::alloc::alloc(layout) } as usize;
            if base == 0 {
                return Err(std::io::ErrorKind::OutOfMemory.into());
            }
            // SAFETY: the lowest page of the block just allocated (page-aligned), which
            // nothing else refers to; `Drop` makes it readable and writable again before the
            // block goes back to the heap. (`mprotect` keeps the pages' protection key.)
            if let Err(e) = unsafe { mman::mprotect(base as *mut u8, page, Prot::NONE) } {
                // SAFETY: the block just allocated, with its layout.
                unsafe { std::alloc::dealloc(base as *mut u8, layout) };
                return Err(io(e));
            }
            return Ok(Stack {
                base,
                len,
                heap: Some(layout),
            });
        }
        let base = mman::reserve(len, Prot::NONE).map_err(io)? as usize;
        let stack = Stack {
            base,
            len,
            heap: None,
        };
        // SAFETY: inside the reservation just made, which nothing else refers to; the lowest
        // page stays inaccessible (the guard).
        unsafe { mman::mprotect((base + page) as *mut u8, usable, Prot::READ_WRITE) }
            .map_err(io)?;
        Ok(stack)
    }

    fn top(&self) -> usize {
        self.base + self.len
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        match self.heap {
            Some(layout) => {
                // SAFETY: the guard page of the block allocated in `new`, back to read-write
                // before the block returns to the heap; its fiber no longer runs.
                if unsafe {
                    mman::mprotect(self.base as *mut u8, mman::page_size(), Prot::READ_WRITE)
                }
                .is_ok()
                {
                    // SAFETY: the block allocated in `new`, with its layout.
                    unsafe { std::alloc::dealloc(self.base as *mut u8, layout) };
                }
                // (A guard page that stays inaccessible is never handed out again: the block
                // is leaked.)
            }
            // SAFETY: the mapping made in `new`; its fiber no longer runs (see the module docs).
            None => drop(unsafe { mman::munmap(self.base as *mut u8, self.len) }),
        }
    }
}

/// The end of a thread started by [`spawn_on_host_stack`]: set once its body has returned and
/// dropped what it held.
#[derive(Debug, Default)]
pub struct Exited {
    done: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Exited {
    /// Waits until the thread's body has returned.
    pub fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn set(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// Blocks the calling thread's standard signals (1 to 31) but those in `open`: a host thread
/// runs on a stack in the host domain, which a handler — started with the kernel's initial
/// PKRU, which denies it — cannot use, so a handler without `SA_ONSTACK` (an embedding
/// program's SIGINT or SIGTERM handler, say) delivered there would fault. Process-directed
/// signals go to other threads instead. The real-time signals (mpkvirt's sync signal, the
/// runtime's preemption) stay open; their handlers run on the alternate stack.
fn block_standard_signals_but(open: &[libc::c_int]) {
    // SAFETY: an all-zero `sigset_t` is a valid value for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset write only the set we own.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in (1..32).filter(|s| !open.contains(s)) {
        // SAFETY: as above.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: changes this thread's mask only (SIGKILL and SIGSTOP are ignored by the kernel).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Starts a thread that runs `body` on a fiber's stack — in the host domain once the host heap
/// is active — and never returns to its own stack.
///
/// A thread's own stack is key-0 memory, which tenant code can write: a frame the thread
/// returned to could have been rewritten (a return address, saved registers) while tenants
/// ran elsewhere. So the thread switches to the fiber at once and stays there: when `body`
/// returns (or panics, caught), the fiber drops what `body` held, sets [`Exited`], and parks
/// for the rest of the process. A stopped thread costs its parked stacks, nothing else.
///
/// The thread blocks the standard signals but those in `open` (the faults its handlers
/// turn into a tenant's end, say): see `block_standard_signals_but`.
///
/// # Errors
///
/// When the thread or its fiber's stack cannot be made.
pub fn spawn_on_host_stack(
    name: String,
    stack_size: usize,
    open: &'static [libc::c_int],
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::sync::Arc<Exited>> {
    let exited = std::sync::Arc::new(Exited::default());
    let on_exit = std::sync::Arc::clone(&exited);
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(name)
        // Only the switch onto the fiber runs here.
        .stack_size(64 << 10)
        .spawn(move || {
            block_standard_signals_but(open);
            let fiber = Fiber::new(stack_size, move |_| {
                let _ = catch_unwind(AssertUnwindSafe(body));
                on_exit.set();
                drop(on_exit);
                let _ = catch_unwind(|| {
                    loop {
                        std::thread::park();
                    }
                });
                // Never back to the thread's own stack.
                std::process::abort()
            });
            match fiber {
                Ok(mut fiber) => {
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    let r = fiber.resume();
                    unreachable!("a host thread's fiber came back: {r:?}");
                }
                Err(e) => drop(tx.send(Err(e))),
            }
        })?;
    rx.recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended at once")))?;
    Ok(exited)
}

/// What [`Fiber::resume`] found when the fiber switched back.
#[derive(Debug)]
pub enum Resumed {
    /// It suspended itself; resume it again to continue.
    Suspended,
    /// Its closure returned.
    Finished,
    /// Its closure panicked, with this payload.
    Panicked(Box<dyn Any + Send>),
}

/// The messages a switch carries.
const SUSPENDED: u64 = 1;
const FINISHED: u64 = 2;

/// A fiber's closure.
type Body = Box<dyn FnOnce(&Suspend)>;

/// A fiber's record, shared by the two sides of the switch (boxed: its address is stable).
struct Record {
    /// The closure, until it starts.
    body: Option<Body>,
    /// Where the resumer's stack pointer is saved while the fiber runs.
    resumer_sp: usize,
    /// The fiber's saved stack pointer while it does not run.
    fiber_sp: usize,
    panic: Option<Box<dyn Any + Send>>,
}

/// A green thread.
pub struct Fiber {
    record: Box<Record>,
    state: State,
    /// Unmapped when the fiber is dropped, unless it was suspended mid-run (see `Drop`).
    stack: std::mem::ManuallyDrop<Stack>,
}

impl Drop for Fiber {
    fn drop(&mut self) {
        // A fiber suspended mid-run keeps frames on its stack that never run again, and
        // their destructors never run either: something may still borrow from them (a
        // scoped thread started inside the closure relies on the scope's destructor to join
        // it). Its stack stays mapped for good: leaked, never reused.
        let started = self.record.body.is_none();
        if self.state == State::Done || !started {
            // SAFETY: dropped once, here; nothing runs on the stack (finished, or never
            // started) and nothing refers to it.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.stack) };
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Ready,
    Running,
    Done,
}

impl std::fmt::Debug for Fiber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fiber")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The handle a fiber's closure suspends itself with.
#[derive(Debug)]
pub struct Suspend {
    record: *mut Record,
}

impl Suspend {
    /// Switches back to the resumer; returns when the fiber is resumed again.
    pub fn suspend(&self) {
        // Called on the fiber's own stack while it runs (the closure got `self` there); the
        // record is alive while the fiber exists, and `resumer_sp` was saved by the switch
        // that resumed this fiber and has not been resumed since.
        switch_from(self.record, Side::Fiber, SUSPENDED);
    }
}

/// Which side of the switch is running.
#[derive(Clone, Copy)]
enum Side {
    /// The resumer (it switches to the fiber).
    Resumer,
    /// The fiber (it switches back to its resumer).
    Fiber,
}

/// Switches from `side` to the other side of `record`'s fiber with `message`; returns the
/// message of the switch that comes back.
///
/// The caller runs on `side`'s stack and the other side's saved stack pointer has not been
/// resumed since it was saved (`Fiber::resume` checks the fiber's state; a fiber suspends
/// only while running); `record` is alive (owned by the `Fiber`).
fn switch_from(record: *mut Record, side: Side, message: u64) -> u64 {
    let (save, to) = match side {
        Side::Resumer => (
            // SAFETY: a field of the live record (no reference is made).
            unsafe { &raw mut (*record).resumer_sp },
            // SAFETY: as above.
            unsafe { (*record).fiber_sp },
        ),
        Side::Fiber => (
            // SAFETY: as above.
            unsafe { &raw mut (*record).fiber_sp },
            // SAFETY: as above.
            unsafe { (*record).resumer_sp },
        ),
    };
    // SAFETY: `save` is valid for a write; `to` is the other side's saved stack pointer,
    // on a stack still mapped, not resumed since it was saved (see above).
    unsafe { mpkvirt_asm::mpkvirt_green_switch(save, to, message) }
}

/// The first function a fiber runs (from `mpkvirt_green_entry`).
extern "sysv64" fn fiber_main(arg: *mut c_void, _message: u64) -> ! {
    let record = arg.cast::<Record>();
    let suspend = Suspend { record };
    // SAFETY: `arg` is the fiber's boxed record (see `Fiber::new`), alive while it runs.
    let body = unsafe { (*record).body.take() };
    if let Some(body) = body
        && let Err(p) = catch_unwind(AssertUnwindSafe(|| body(&suspend)))
    {
        // SAFETY: as above.
        unsafe { (*record).panic = Some(p) };
    }
    // The fiber's own stack pointer is saved but never resumed (`Done`).
    switch_from(record, Side::Fiber, FINISHED);
    unreachable!("a finished fiber is never resumed")
}

impl Fiber {
    /// A fiber that will run `body` on a stack of `stack_size` usable bytes (rounded up to
    /// pages) when first resumed.
    ///
    /// # Errors
    ///
    /// When the stack cannot be mapped.
    pub fn new(
        stack_size: usize,
        body: impl FnOnce(&Suspend) + Send + 'static,
    ) -> std::io::Result<Fiber> {
        let stack = Stack::new(stack_size)?;
        let mut record = Box::new(Record {
            body: Some(Box::new(body)),
            resumer_sp: 0,
            fiber_sp: 0,
            panic: None,
        });
        // The prepared frame (`green.S`): control word, %r15..%r12, %rbx, %rbp, entry, pad.
        let top = stack.top();
        let sp = top - 80;
        let entry = mpkvirt_asm::mpkvirt_green_entry as *const () as usize;
        let main: extern "sysv64" fn(*mut c_void, u64) -> ! = fiber_main;
        let words: [u64; 10] = [
            0x037f_u64 << 32 | 0x1f80, // MXCSR, x87 control word
            0,                         // %r15
            0,                         // %r14
            (&raw mut *record) as u64, // %r13: the argument
            main as usize as u64,      // %r12: the function
            0,                         // %rbx
            0,                         // %rbp
            entry as u64,              // return address
            0,                         // padding (alignment)
            0,
        ];
        // SAFETY: the top 80 bytes of the stack mapped above (read-write, 16-aligned top),
        // which nothing else uses yet.
        unsafe { std::ptr::copy_nonoverlapping(words.as_ptr(), sp as *mut u64, words.len()) };
        record.fiber_sp = sp;
        Ok(Fiber {
            record,
            state: State::Ready,
            stack: std::mem::ManuallyDrop::new(stack),
        })
    }

    /// Runs the fiber until it suspends itself or finishes.
    ///
    /// # Panics
    ///
    /// When the fiber has finished, or is resumed from inside itself.
    pub fn resume(&mut self) -> Resumed {
        assert!(
            self.state == State::Ready,
            "resuming a fiber that is {:?}",
            self.state
        );
        self.state = State::Running;
        // The fiber is ready: `fiber_sp` is its prepared stack or the pointer its last
        // suspension saved, not resumed since; the record outlives the switch.
        let message = switch_from(&raw mut *self.record, Side::Resumer, 0);
        if message == SUSPENDED {
            self.state = State::Ready;
            return Resumed::Suspended;
        }
        self.state = State::Done;
        match self.record.panic.take() {
            Some(p) => Resumed::Panicked(p),
            None => Resumed::Finished,
        }
    }

    /// Whether the closure has returned (or panicked).
    pub fn is_finished(&self) -> bool {
        self.state == State::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fibers_interleave_and_keep_their_locals() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut fibers: Vec<Fiber> = (0..3)
            .map(|id| {
                let log = Arc::clone(&log);
                Fiber::new(64 << 10, move |s| {
                    let mut local = id * 100;
                    for step in 0..3 {
                        local += 1;
                        log.lock().unwrap().push((id, step, local));
                        s.suspend();
                    }
                })
                .unwrap()
            })
            .collect();
        for _ in 0..3 {
            for f in &mut fibers {
                assert!(matches!(f.resume(), Resumed::Suspended));
            }
        }
        for f in &mut fibers {
            assert!(matches!(f.resume(), Resumed::Finished));
            assert!(f.is_finished());
        }
        let log = log.lock().unwrap();
        let want: Vec<_> = (0..3)
            .flat_map(|step| (0..3).map(move |id| (id, step, id * 100 + step + 1)))
            .collect();
        assert_eq!(*log, want);
    }

    #[test]
    fn a_panic_is_handed_to_the_resumer() {
        let mut f = Fiber::new(64 << 10, |_| panic!("inside")).unwrap();
        match f.resume() {
            Resumed::Panicked(p) => assert_eq!(p.downcast_ref::<&str>(), Some(&"inside")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn callee_saved_state_survives_switches() {
        // Floating point state across switches: MXCSR's rounding mode set inside one fiber
        // does not leak into the resumer.
        let mut f = Fiber::new(64 << 10, |s| {
            // Round toward zero in this fiber.
            let mut m = 0u32;
            // SAFETY: reads and writes this thread's MXCSR (no memory but the local).
            unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &raw mut m) };
            m |= 0x6000;
            // SAFETY: as above.
            unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &raw const m) };
            s.suspend();
        })
        .unwrap();
        let read = || {
            let mut m = 0u32;
            // SAFETY: as above.
            unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &raw mut m) };
            m
        };
        let before = read();
        assert!(matches!(f.resume(), Resumed::Suspended));
        assert_eq!(read(), before, "the fiber's MXCSR leaked into the resumer");
        assert!(matches!(f.resume(), Resumed::Finished));
    }

    #[test]
    fn a_host_thread_runs_in_the_host_domain_and_reports_its_end() {
        crate::heap::init().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let held = Arc::new(());
        let h = Arc::clone(&held);
        let exited = spawn_on_host_stack("host-thread".into(), 64 << 10, &[], move || {
            let local = 0u8;
            let boxed = Box::new(0u8);
            tx.send((&raw const local as usize, &raw const *boxed as usize))
                .unwrap();
            drop(h);
        })
        .unwrap();
        let (stack, heap) = rx.recv().unwrap();
        assert!(crate::heap::contains(stack), "stack at {stack:#x}");
        assert!(crate::heap::contains(heap), "heap at {heap:#x}");
        exited.wait();
        // What the body held is dropped by the time its end is reported.
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[test]
    fn unfinished_fibers_can_be_dropped() {
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let d = Arc::clone(&done);
            let mut f = Fiber::new(16 << 10, move |s| {
                s.suspend();
                d.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            assert!(matches!(f.resume(), Resumed::Suspended));
        }
        assert_eq!(done.load(Ordering::SeqCst), 0);
    }
}
