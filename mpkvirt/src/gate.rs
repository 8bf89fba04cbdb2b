//! How application code calls library code: thread records, registration and the three
//! calling paths of [`MetadataMode`].
//!
//! Every library operation that reads or changes library state is an *op*: a code and a
//! plain argument block in the caller's memory, run by [`mpkvirt_dispatch`].
//!
//! - **Protected**: through `mpkvirt_gate_call` (`asm/x86_64/callgate.S`): PKRU raised to the
//!   library's value, the thread identified by its record (`%gs`), a switch to its library
//!   stack, the dispatcher, and PKRU lowered to the record's value — the thread's legitimate
//!   view, which the op just computed.
//! - **GateOnly**: the same path without the PKRU writes (`mpkvirt_gate_call_nopku`).
//! - **Cooperative**: the dispatcher is called directly on the caller's stack; on PKU
//!   hardware the lowering gate (`mpkvirt_gate_sync`) installs the record's PKRU afterwards.
//!
//! # Thread records
//!
//! Each thread that uses the library has a [`ThreadRecord`] in the metadata region; its GS
//! base points at it (`arch_prctl(ARCH_SET_GS)`), so both the assembly and Rust find it as
//! `%gs:0` without trusting any application memory. The record names its owner by FS base
//! (the thread pointer): a thread created by `clone` inherits its creator's GS base, and the
//! gate, seeing a foreign owner, registers the new thread with a record of its own. A thread's
//! exit (a thread-local destructor) ends its views and marks the record dead; the record is
//! reused once `tgkill(tid, 0)` says the thread is gone and no thread is inside it.
//!
//! The FS base alone is not an identity: glibc hands an ended thread's stack and TCB (so its
//! FS base) to the next thread it creates, which may have inherited a GS base still pointing
//! at the ended thread's record. So a record is also bound to its thread's id. The fast path
//! compares the FS base only; a record whose thread's exit hook ran, or was never armed (a
//! thread registered by the sync signal), is checked by id in the dispatcher
//! ([`confirm_owner`]), and a thread on an ended thread's TCB adopts that record ([`adopt`]):
//! the ended thread's leftovers end, and the record is re-issued bound to the new id — never
//! shared by two live threads.
//!
//! # Safety
//!
//! This file calls the assembly gates, reads the record through `%gs`, sets the GS base, and
//! turns the record's address back into a reference. Each record is used only by the thread
//! that owns it (the gate checks ownership before the dispatcher runs, and the dispatcher is
//! not re-entered: the record's `busy` word); records are never freed, only reused after
//! their thread is gone.
#![allow(
    unsafe_code,
    reason = "the call gates, %gs-relative record access and the GS base"
)]

use std::arch::asm;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::claim::Claim;
use mpkvirt_asm::{GATE_BUSY, GATE_UNREGISTERED, GateRecord};
use mpkvirt_sys::thread::{FsGsBase, gettid, set_gs_base, tgkill};
use mpkvirt_sys::{Pkru, Pku};

use crate::error::{Error, Result};
use crate::manager::ThreadCx;
use crate::meta::{self, MBox, MVec, Meta, MetadataMode, lock, root};

/// Usable size of a thread's library stack (touched on demand).
const LIB_STACK: usize = 1 << 20;

/// Bytes of the alternate signal stack a record gives its thread.
const ALTSTACK_SIZE: usize = 64 << 10;

/// `SS_AUTODISARM` (Linux 4.7; not in the `libc` crate): the alternate stack is disarmed
/// while a handler runs.
const SS_AUTODISARM: libc::c_int = 1 << 31;

/// `active_mgr` when no op is running.
pub(crate) const NO_MGR: u32 = u32::MAX;

/// A thread's record: the gate's fields first (`%gs` points here), then the library's
/// per-thread state.
#[repr(C)]
pub(crate) struct ThreadRecord {
    pub(crate) gate: GateRecord,
    /// Kernel thread id of the owner.
    tid: i32,
    /// Whether the owner ended (its views are gone); reused once the thread is gone.
    dead: bool,
    /// The PKRU the thread had when it entered the current op (0 without PKU).
    pub(crate) entry_pkru: Pkru,
    /// Whether the op was called from a signal handler's context (see `note_context`).
    pub(crate) interrupted: bool,
    /// Signal-handler levels on the thread (see `note_context`): `floors[i]` is the thread's
    /// view sequence number when level `i + 1` began. Level 0 is the normal context; the
    /// views up to the floor of the current level belong to the contexts it interrupted and
    /// are sealed.
    pub(crate) levels: Levels,
    /// The registry slot of the manager the current op works on (`NO_MGR`: none). A manager
    /// is not torn down while some thread's op is on it.
    pub(crate) active_mgr: AtomicU32,
    /// Views entered so far by the thread, with any manager (each view records its number:
    /// a faulting guarded call ends the views entered after it started).
    pub(crate) view_seq: u64,
    /// The last process-wide rights epoch the thread took (see `manager::global`).
    pub(crate) synced: std::sync::atomic::AtomicU64,
    /// The PKRU fields of keys to which the thread's last sync, or a view change since, took
    /// process-wide rights (a revocation of those signals it; see `manager::global`).
    pub(crate) holds: AtomicU32,
    /// Whether the thread is computing its rights right now.
    pub(crate) resyncing: std::sync::atomic::AtomicBool,
    /// Whether the thread's exit hook is armed for this record.
    hooked: bool,
    /// Whether the thread's exit hook ran (its calls fail from then on).
    exited: bool,
    /// Whether the thread was registered by the current op (its PKRU until now was inherited,
    /// not set by the library).
    pub(crate) fresh: bool,
    /// Whether the thread's normal context may still run with the PKRU it inherited from its
    /// creator: set at registration, cleared when a sync finds the thread in its normal
    /// context (`OP_SYNC`). Until then a sync cannot tell the normal context by the value the
    /// library set (the registering op may have run in a signal handler, whose frame restores
    /// the inherited value later), so the thread acknowledges only when the interrupted
    /// context looks normal ([`looks_normal`]), and every revocation signals it (`holds`).
    pub(crate) inherited: bool,
    /// An alternate signal stack for the thread, made with the record and reused with it.
    altstack: usize,
    /// Whether the library installed `altstack` as this thread's (since it was issued).
    altstack_live: bool,
    /// Whether a sandbox run checked (with the kernel) that `altstack` is the thread's: a
    /// thread registered by a signal before its runtime set up its own alternate stack had
    /// the library's replaced.
    pub(crate) altstack_checked: bool,
    /// Whether the thread gave up the C library's rseq area (see `sandbox::serve_run`).
    pub(crate) rseq_dropped: bool,
    /// Set by an op that ends a signal handler: the handler's `ucontext_t`, which the
    /// dispatcher returns to with `rt_sigreturn` instead of returning to the handler
    /// ([`finish_signal`]).
    pub(crate) sigreturn_ctx: usize,
    /// Whether the thread is creating threads without its views' rights (between
    /// `OP_SPAWN_PREPARE` and `OP_SPAWN_DONE`).
    pub(crate) spawning: bool,
    /// Per manager registry slot: the thread's state for that manager.
    pub(crate) cxs: MVec<Option<NonNull<ThreadCx>>>,
    /// The C API's per-thread state.
    pub(crate) capi: crate::capi::ThreadBegun,
    /// Whether the thread is confined (see [`Confinement`]); a plain word, so that
    /// application code (`leave_orphaned_record`) can read it without a reference.
    pub(crate) confined: u32,
    /// The domains a confined thread may name.
    pub(crate) confinement: Confinement,
    /// The thread's sandbox, if it runs one (`crate::sandbox`).
    pub(crate) sandbox: crate::sandbox::State,
}

/// The domains a confined thread may name, by uid (uids are unique in the process and never
/// reused), sorted. A thread is confined by `OP_CONFINE` (`thread::confine`, `mpk_confine`)
/// for the rest of its life: the set only ever shrinks (a later confinement intersects it),
/// except by the domains the thread creates itself. A thread a confined thread creates
/// inherits the set when it registers (through the GS base `clone` copies), and a confined
/// record is never re-issued to another thread, so the set cannot be shed by ending the
/// thread, by reusing its TCB, or by a child registering late.
pub(crate) struct Confinement {
    uids: MVec<u64>,
}

impl Confinement {
    fn new() -> Confinement {
        Confinement {
            uids: MVec::new_in(Meta),
        }
    }

    /// Whether the set holds `uid`.
    fn holds(&self, uid: u64) -> bool {
        self.uids.binary_search(&uid).is_ok()
    }
}

impl ThreadRecord {
    /// Refuses a name (a domain uid) the thread may not use: [`Error::Confined`] when the
    /// thread is confined and the domain is outside its set.
    pub(crate) fn may_name(&self, uid: u64) -> Result<()> {
        if self.confined != 0 && !self.confinement.holds(uid) {
            return Err(Error::Confined("the domain is outside its confinement"));
        }
        Ok(())
    }

    /// Whether a name can be used (as [`Self::may_name`], as a `bool`).
    pub(crate) fn names(&self, uid: u64) -> bool {
        self.may_name(uid).is_ok()
    }

    /// Refuses what confined threads may not do at all (`what`: for the error).
    pub(crate) fn unconfined(&self, what: &'static str) -> Result<()> {
        if self.confined != 0 {
            return Err(Error::Confined(what));
        }
        Ok(())
    }

    /// Adds a domain the thread just created to its set (confined threads only).
    pub(crate) fn admit(&mut self, uid: u64) -> Result<()> {
        if self.confined == 0 {
            return Ok(());
        }
        // (See `ops::confine`: a registering child may be reading the set.)
        let _records = lock(&root().records);
        let at = match self.confinement.uids.binary_search(&uid) {
            Ok(_) => return Ok(()),
            Err(at) => at,
        };
        self.confinement
            .uids
            .try_reserve(1)
            .map_err(|_| Error::Unsupported("library metadata beyond its reserve"))?;
        self.confinement.uids.insert(at, uid);
        Ok(())
    }

    /// Confines the thread to `uids` (intersected with its set if it is confined already).
    pub(crate) fn confine(&mut self, uids: &[u64]) -> Result<()> {
        let mut set = MVec::new_in(Meta);
        set.try_reserve(uids.len())
            .map_err(|_| Error::Unsupported("library metadata beyond its reserve"))?;
        set.extend(
            uids.iter()
                .copied()
                .filter(|&u| self.confined == 0 || self.confinement.holds(u)),
        );
        set.sort_unstable();
        set.dedup();
        self.confinement.uids = set;
        self.confined = 1;
        Ok(())
    }

    /// No confinement (a thread created by one without a record).
    fn inherit_nothing(&mut self) {
        self.confined = 0;
        self.confinement.uids = MVec::new_in(Meta);
    }

    /// Takes the confinement of `parent` (the record of the thread that created this one).
    fn inherit(&mut self, parent: &ThreadRecord) -> Result<()> {
        if parent.confined == 0 {
            self.inherit_nothing();
            return Ok(());
        }
        let mut set = MVec::new_in(Meta);
        set.try_reserve(parent.confinement.uids.len())
            .map_err(|_| Error::Unsupported("library metadata beyond its reserve"))?;
        set.extend(parent.confinement.uids.iter().copied());
        self.confinement.uids = set;
        self.confined = 1;
        Ok(())
    }
}

fn fsgs() -> FsGsBase {
    static TOKEN: OnceLock<Option<FsGsBase>> = OnceLock::new();
    TOKEN
        .get_or_init(FsGsBase::new)
        .expect("meta::init checked FSGSBASE")
}

impl ThreadRecord {
    /// The calling thread's record, if it has one (its GS base points at a record it owns).
    pub(crate) fn current() -> Option<&'static mut ThreadRecord> {
        // SAFETY: the record belongs to this thread (`current_ptr` checked the owner) and is
        // only ever used by its owner, one op at a time (the `busy` word); records are never
        // freed.
        Self::current_ptr().map(|p| unsafe { &mut *p })
    }

    /// The record the calling thread's GS base points at, if it names the thread's FS base.
    fn current_ptr() -> Option<*mut ThreadRecord> {
        let t = fsgs();
        let gs = t.gs_base();
        if gs == 0 {
            return None;
        }
        let owner: u64;
        // SAFETY: a non-zero GS base is only ever set by `register` to a record in the
        // metadata region (mpkvirt owns the thread's GS base), which stays mapped forever;
        // the owner field is a plain u64 at offset 32.
        unsafe {
            asm!("mov {}, gs:[32]", out(reg) owner, options(nostack, readonly, preserves_flags))
        };
        if owner != t.fs_base() as u64 {
            return None;
        }
        Some(gs as *mut ThreadRecord)
    }

    /// The calling thread's record inside an op (the gate identified the thread).
    ///
    /// # Safety
    ///
    /// Only inside the dispatcher (or registration), where the gate — or the cooperative
    /// path — has checked that `%gs` points at the calling thread's own record, and only one
    /// reference to it may be live.
    pub(crate) unsafe fn current_unchecked() -> &'static mut ThreadRecord {
        let rec: usize;
        // SAFETY: per the contract the GS base points at a record, whose first word is its own
        // address.
        unsafe {
            asm!("mov {}, gs:[0]", out(reg) rec, options(nostack, readonly, preserves_flags))
        };
        // SAFETY: per the contract this is the calling thread's record, used by it alone.
        unsafe { &mut *(rec as *mut ThreadRecord) }
    }
}

/// Registers the calling thread: a record (a dead one whose thread is gone, or a new one)
/// with a library stack, and the GS base pointing at it. Called by the gate on the boot stack
/// (one thread at a time), or directly in cooperative mode. Returns 1, or 0 on failure.
#[unsafe(no_mangle)]
pub(crate) extern "sysv64" fn mpkvirt_register_thread(entry_pkru: u32) -> u64 {
    let ok = match std::panic::catch_unwind(|| register(Pkru::from_bits(entry_pkru))) {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(payload) => {
            // Freeing the payload would call the program's allocator from library code.
            std::mem::forget(payload);
            false
        }
    };
    if !ok {
        // No record: the gate's deny value for a thread without one keeps key 0 writable
        // (`callgate.S`, `.L_deny`), and a GS base inherited from the creator would say
        // otherwise.
        // SAFETY: 0 is "no record" for every `%gs` reader of the library; the thread has
        // none it could use.
        let _ = unsafe { set_gs_base(0) };
    }
    u64::from(ok)
}

fn register(entry: Pkru) -> Result<()> {
    let r = root();
    let t = fsgs();
    let tid = gettid();
    let mut records = lock(&r.records);
    let reusable = records.iter().copied().find(|&addr| {
        // SAFETY: every entry is a record made below; reading a record's `dead`, `tid` and
        // state under the records lock is safe once its thread is gone (checked first), and
        // `dead`/`tid` change only under this lock.
        let rec = unsafe { &*(addr as *const ThreadRecord) };
        // A dead record, or one whose thread never left state behind (registered by the
        // sync signal, no exit hook): reusable once its thread is gone, unless some thread is
        // inside it (its library stack is in use).
        // Never a confined one: a thread its thread created may still register through it
        // (and must inherit its confinement).
        // Claimed last, as the gates claim it (`callgate.S`): a thread on the TCB of the
        // record's dead thread that passed the gate's owner check either holds the word
        // now (the record is not taken) or sees the new owner once it holds it.
        (rec.dead || !rec.holds_state())
            && rec.confined == 0
            && tgkill(rec.tid, 0).is_err()
            && crate::claim::claim_for_reissue(busy_word(addr as *mut ThreadRecord))
    });
    // The record of the thread that created this one, if it had one (`clone` copied its GS
    // base): a confined creator's set passes on.
    let parent = t.gs_base();
    let parent = (parent != 0 && records.contains(&parent)).then_some(parent);
    let addr = match reusable {
        Some(addr) => addr,
        None => {
            let (_, top) = meta::alloc_stack(LIB_STACK)?;
            let rec = MBox::new_in(
                ThreadRecord {
                    gate: GateRecord {
                        self_addr: 0,
                        pkru: 0,
                        busy: 0,
                        saved_rsp: 0,
                        stack_top: top as u64,
                        owner_fs: 0,
                        // (Until the first op sets it: no key but 0.)
                        normal_pkru: Pkru::LINUX_INIT.bits(),
                        _pad: 0,
                    },
                    tid: 0,
                    dead: true,
                    entry_pkru: Pkru::ALLOW_ALL,
                    interrupted: false,
                    levels: Levels::NORMAL,
                    active_mgr: AtomicU32::new(NO_MGR),
                    view_seq: 0,
                    synced: std::sync::atomic::AtomicU64::new(0),
                    holds: AtomicU32::new(0),
                    resyncing: std::sync::atomic::AtomicBool::new(false),
                    hooked: false,
                    exited: false,
                    fresh: false,
                    inherited: false,
                    altstack: 0,
                    altstack_live: false,
                    altstack_checked: false,
                    rseq_dropped: false,
                    sigreturn_ctx: 0,
                    spawning: false,
                    cxs: MVec::new_in(Meta),
                    capi: crate::capi::ThreadBegun::default(),
                    confined: 0,
                    confinement: Confinement::new(),
                    sandbox: crate::sandbox::State::default(),
                },
                Meta,
            );
            let addr = MBox::into_raw(rec) as usize;
            records.push(addr);
            addr
        }
    };
    // SAFETY: `addr` is a record that no live thread uses (new, or dead with its thread gone,
    // and no thread inside it); it becomes this thread's alone.
    let rec = unsafe { &mut *(addr as *mut ThreadRecord) };
    debug_assert!(!rec.holds_state(), "dead records hold no state");
    let inherited = match parent {
        // SAFETY: a record of the list (records live forever); its confinement is written
        // only by its own thread inside an op, and read here under the records lock, which
        // `OP_CONFINE` holds while it writes.
        Some(p) if p != addr => rec.inherit(unsafe { &*(p as *const ThreadRecord) }),
        _ => {
            rec.inherit_nothing();
            Ok(())
        }
    };
    if let Err(e) = inherited {
        // The record stays unissued, and free for the next registration.
        crate::claim::release(busy_word(addr as *mut ThreadRecord));
        return Err(e);
    }
    rec.gate.self_addr = addr as u64;
    rec.tid = tid;
    rec.dead = false;
    rec.gate.owner_fs = t.fs_base() as u64;
    drop(records);
    rec.issue(entry);
    // Free for its new owner (a reused record was claimed above; a new one never was).
    crate::claim::release(busy_word(addr as *mut ThreadRecord));
    // SAFETY: mpkvirt owns the thread's GS base; the record is laid out as the gates and
    // `ThreadRecord::current` expect and lives forever.
    unsafe { set_gs_base(addr) }.map_err(|_| Error::Unsupported("setting the GS base"))
}

/// Confirms that the calling thread is the record's thread, by thread id (a system call:
/// only for records whose thread's exit hook ran or was never armed, see `run_op_unguarded`).
/// A caller with the owner's FS base but another id is on the TCB of the record's thread,
/// which has ended: it adopts the record ([`adopt`]). `Err` carries the status of an op that
/// must not run on this record.
fn confirm_owner(rec: &mut ThreadRecord, entry: Pkru) -> std::result::Result<(), u64> {
    let me = gettid();
    if me == rec.tid {
        return Ok(());
    }
    adopt(rec, me, entry)
}

/// Re-issues the record the gate found for the calling thread, `me`, whose FS base is the
/// record's owner's but whose id is not: glibc handed it the stack and TCB (so the thread
/// pointer) of the record's thread, and it inherited, through `clone`, the GS base of a thread
/// that still pointed at the record. glibc reuses a TCB only after the kernel cleared its
/// thread id (`CLONE_CHILD_CLEARTID`), i.e. after the record's thread ran its last user
/// instruction: nobody else can be inside the record (the gate's FS check lets only the TCB's
/// current thread in), and what that thread left behind (views of a thread whose exit hook
/// never ran) is ended here as its exit hook would have ended it. The record is then bound to
/// `me` under the records lock (from now on `tgkill(me, 0)` keeps `register` from handing it
/// to anyone else) and starts afresh.
fn adopt(rec: &mut ThreadRecord, me: i32, entry: Pkru) -> std::result::Result<(), u64> {
    {
        let _records = lock(&root().records);
        if rec.gate.owner_fs != fsgs().fs_base() as u64 {
            // `register` re-issued the record (its thread was gone) to another thread between
            // the gate's FS check and now: the caller registers on its next attempt.
            return Err(crate::ops::STATUS_RETRY);
        }
        rec.tid = me;
        rec.dead = false;
    }
    rec.active_mgr
        .store(NO_MGR, std::sync::atomic::Ordering::SeqCst);
    if rec.holds_state() {
        crate::manager::ops::thread_exit(rec);
        crate::capi::thread_exit(rec);
    }
    rec.issue(entry);
    Ok(())
}

impl ThreadRecord {
    /// Starts the record afresh for the thread it was just bound to (`tid`, `owner_fs`, `dead`
    /// set under the records lock): no view, no hook, the base PKRU for `entry`, and the
    /// process-wide rights in force.
    fn issue(&mut self, entry: Pkru) {
        self.gate.pkru = root().base_pkru(entry).bits();
        self.fresh = true;
        self.inherited = true;
        self.interrupted = false;
        self.sandbox = crate::sandbox::State::default();
        self.levels = Levels::NORMAL;
        self.hooked = false;
        self.exited = false;
        self.spawning = false;
        // The process-wide rights in force — taken, not acknowledged: the context this op
        // runs in may be a signal handler's, and the one it interrupted keeps the inherited
        // PKRU (the op acknowledges when it ends in a context it takes for the normal one;
        // `OP_SYNC` only when the context looks normal).
        self.synced.store(0, std::sync::atomic::Ordering::Relaxed);
        crate::manager::global::resync(self, None);
        self.altstack_live = false;
        self.altstack_checked = false;
        self.rseq_dropped = false;
        self.sigreturn_ctx = 0;
        self.gate.normal_pkru = Pkru::LINUX_INIT.bits();
        self.ensure_altstack(false);
    }

    /// The thread's kernel id.
    pub(crate) fn tid(&self) -> i32 {
        self.tid
    }

    /// Whether the record holds library state of its thread (views, C API state).
    fn holds_state(&self) -> bool {
        self.cxs.iter().any(Option::is_some) || self.capi.holds_state()
    }

    /// Whether the library installed its alternate signal stack for the thread (where
    /// mpkvirt's handlers, and a sandbox runner's, put their argument blocks). The record's
    /// own mapping, not what `sigaltstack` says now: code that can make system calls could
    /// point that anywhere.
    pub(crate) fn has_altstack(&self) -> bool {
        self.altstack != 0 && self.altstack_live
    }

    /// Whether the kernel says a handler delivered on the record's alternate stack is
    /// running now: the stack is installed with `SS_AUTODISARM`, so it is disarmed exactly
    /// while such a handler is live (sandboxed code of the thread cannot run then).
    pub(crate) fn handler_live(&self) -> bool {
        let mut old = std::mem::MaybeUninit::<libc::stack_t>::zeroed();
        // SAFETY: querying (null new stack) only writes `old`.
        if unsafe { libc::sigaltstack(std::ptr::null(), old.as_mut_ptr()) } != 0 {
            return false;
        }
        // SAFETY: sigaltstack succeeded and filled `old`.
        let old = unsafe { old.assume_init() };
        self.altstack_live && old.ss_flags & libc::SS_DISABLE != 0
    }

    /// Whether `[addr, addr + len)` lies in the record's alternate signal stack (see
    /// [`ThreadRecord::has_altstack`]).
    pub(crate) fn on_altstack(&self, addr: usize, len: usize) -> bool {
        self.altstack != 0
            && addr >= self.altstack
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.altstack + ALTSTACK_SIZE)
    }

    /// Gives the thread an alternate signal stack if it has none, or a smaller one (signal
    /// handlers of mpkvirt run on it: the interrupted stack may be in a domain the handler's
    /// initial PKRU cannot write, or be the library's) — or, with `ours`, unless it is the
    /// library's already. Nothing is changed while the thread runs on its alternate stack
    /// (a handler registered it). The stack belongs to the record and is reused with it.
    pub(crate) fn ensure_altstack(&mut self, ours: bool) {
        const SIZE: usize = ALTSTACK_SIZE;
        let mut old = std::mem::MaybeUninit::<libc::stack_t>::zeroed();
        // SAFETY: querying (null new stack) only writes `old`.
        if unsafe { libc::sigaltstack(std::ptr::null(), old.as_mut_ptr()) } != 0 {
            return;
        }
        // SAFETY: sigaltstack succeeded and filled `old`.
        let old = unsafe { old.assume_init() };
        if self.altstack != 0
            && old.ss_sp as usize == self.altstack
            && old.ss_flags & libc::SS_DISABLE == 0
        {
            self.altstack_live = true;
            return;
        }
        // Kept when large enough, or in use right now (a handler runs on it). Rust's own
        // (a few pages) is too small for mpkvirt's handlers, which call into the library.
        if old.ss_flags & libc::SS_ONSTACK != 0
            || (!ours && old.ss_flags & libc::SS_DISABLE == 0 && old.ss_size >= SIZE)
        {
            return;
        }
        if self.altstack == 0 {
            match mpkvirt_sys::mman::reserve(SIZE, mpkvirt_sys::mman::Prot::READ_WRITE) {
                Ok(p) => self.altstack = p as usize,
                Err(_) => return,
            }
        }
        // Disarmed while a handler runs on it (the kernel keeps it in the handler's frame and
        // re-arms it at `sigreturn`): a stack pointer inside it is then never taken for a
        // handler's, so sandboxed code that points its stack there before faulting gets a
        // frame at the top, not an overflow the kernel would answer with a fatal SIGSEGV.
        let new = libc::stack_t {
            ss_sp: self.altstack as *mut libc::c_void,
            ss_flags: SS_AUTODISARM,
            ss_size: SIZE,
        };
        // SAFETY: the stack is a private mapping owned by this record, which only this thread
        // uses until it is gone (records are reused only after their thread ended).
        self.altstack_live = unsafe { libc::sigaltstack(&new, std::ptr::null_mut()) } == 0;
    }
}

/// What a sync initiator needs to know of a live thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncState {
    tid: i32,
    pub(crate) holds: u32,
    pub(crate) resyncing: bool,
}

/// Every live record's sync state, sorted by thread id (`None`: out of metadata).
pub(crate) fn sync_snapshot() -> Option<MVec<SyncState>> {
    let records = lock(&root().records);
    let mut v = MVec::new_in(Meta);
    v.try_reserve(records.len()).ok()?;
    for &addr in records.iter() {
        // SAFETY: see `register`: `dead`, `tid` and the atomics of any record may be read
        // under the records lock.
        let rec = unsafe { &*(addr as *const ThreadRecord) };
        if !rec.dead {
            v.push(SyncState {
                tid: rec.tid,
                holds: rec.holds.load(std::sync::atomic::Ordering::SeqCst),
                resyncing: rec.resyncing.load(std::sync::atomic::Ordering::SeqCst),
            });
        }
    }
    drop(records);
    v.sort_unstable_by_key(|s| s.tid);
    Some(v)
}

/// The state of `tid` in a snapshot: with several records of one id (an earlier thread's
/// lingering), the union of what they may hold.
pub(crate) fn find(snapshot: &[SyncState], tid: i32) -> Option<SyncState> {
    let start = snapshot.partition_point(|s| s.tid < tid);
    snapshot[start..]
        .iter()
        .take_while(|s| s.tid == tid)
        .copied()
        .reduce(|a, b| SyncState {
            tid,
            holds: a.holds | b.holds,
            resyncing: a.resyncing || b.resyncing,
        })
}

/// How many of the threads `tids` (still alive) have not taken the process-wide rights of
/// `epoch`; calls `each` with each of them. A thread without a record has not: its PKRU is
/// inherited from its creator and may predate the change (its handler registers it). A
/// record of an earlier thread with the same id may linger: any record acknowledging is the
/// live thread's.
pub(crate) fn unacknowledged(tids: &[i32], epoch: u64, mut each: impl FnMut(i32)) -> usize {
    let mut acked: MVec<i32> = MVec::new_in(Meta);
    {
        let records = lock(&root().records);
        if acked.try_reserve(records.len()).is_err() {
            return tids.len();
        }
        for &addr in records.iter() {
            // SAFETY: see `register`: `dead`, `tid` and the atomic `synced` of any record
            // may be read under the records lock.
            let rec = unsafe { &*(addr as *const ThreadRecord) };
            // (Dead records count too: a thread whose exit hook ran still takes revocations
            // until it is gone; records of earlier threads carry older epochs.)
            if rec.synced.load(std::sync::atomic::Ordering::SeqCst) >= epoch {
                acked.push(rec.tid);
            }
        }
    }
    acked.sort_unstable();
    let mut pending = 0;
    for &tid in tids {
        if acked.binary_search(&tid).is_err() && tgkill(tid, 0).is_ok() {
            pending += 1;
            each(tid);
        }
    }
    pending
}

/// Marks the calling thread's record dead (its thread is ending; its views are already
/// gone). Inside an op.
pub(crate) fn retire_record(rec: &mut ThreadRecord) {
    // The owner stays: later calls of the exiting thread still find the record, and fail
    // (`confirm_owner`: same thread id); a thread glibc gives its TCB to adopts it.
    rec.exited = true;
    rec.dead = true;
}

/// Whether a live thread other than the one of record `me` is inside an op on the manager in
/// registry slot `idx`. A record whose thread is gone is passed over: a thread that ended
/// inside an op keeps its `active_mgr` for good.
pub(crate) fn op_in_flight(idx: u32, me: usize) -> bool {
    let records = lock(&root().records);
    records.iter().any(|&addr| {
        // SAFETY: see `register`: `dead`, `tid` and the atomics of any record may be read
        // under the records lock.
        let rec = unsafe { &*(addr as *const ThreadRecord) };
        addr != me
            && !rec.dead
            && rec.active_mgr.load(std::sync::atomic::Ordering::SeqCst) == idx
            && tgkill(rec.tid, 0).is_ok()
    })
}

/// The dispatcher the gate calls, on the thread's library stack, after identifying the
/// thread. Returns the op's status word.
#[unsafe(no_mangle)]
pub(crate) extern "sysv64" fn mpkvirt_dispatch(op: u64, args: *mut u8, entry_pkru: u32) -> u64 {
    // SAFETY: the gate (or `call` in cooperative mode) checked that %gs points at this
    // thread's record and that no other op of the thread is running.
    let rec = unsafe { ThreadRecord::current_unchecked() };
    // SAFETY: `args` is what the caller passed with `op` through the gate: the block of that
    // op in its memory (`Args::new`'s contract is the caller's, and a hostile caller only
    // makes the library fault).
    let args = unsafe { crate::ops::Args::new(args) };
    let status =
        run_op(rec, op, entry_pkru, |rec| crate::ops::run(op, args, rec)).unwrap_or_else(|s| s);
    let ctx = std::mem::take(&mut rec.sigreturn_ctx);
    if ctx != 0 {
        finish_signal(rec, ctx);
    }
    status
}

/// Ends the signal handler whose op set `ctx` (its `ucontext_t`, on the thread's alternate
/// stack, checked by the op): the thread goes back to the level the handler interrupted, the
/// record's PKRU is that level's, the record is released, and `rt_sigreturn` runs from the
/// library's stack — the kernel restores the interrupted context, its PKRU included, from
/// the frame. Nothing returns to the handler, and no gate exit installs a value for it.
fn finish_signal(rec: &mut ThreadRecord, ctx: usize) -> ! {
    let level = rec.levels.entry;
    pop_levels(rec, level);
    rec.interrupted = level > 0;
    rec.levels.spell = level;
    mark_context(rec);
    // The gate's own release, which this path skips.
    crate::claim::release(busy_word(rec));
    // SAFETY: `ctx` is a signal frame's `ucontext_t` on this thread's alternate stack
    // (checked by the op that set it), whose handler is the caller of this op; the record is
    // released and holds the interrupted level's rights, and no Rust frame of this op is
    // used again (the library stack is rewound by the next gate entry).
    unsafe { mpkvirt_asm::mpkvirt_sigreturn(ctx) }
}

/// Runs op `op` for the calling thread (its record, the PKRU it called with): the
/// bookkeeping every op shares around `body`. `Err` carries the status of an op that did
/// not run (the thread is exiting, or library code panicked).
fn run_op<R>(
    rec: &mut ThreadRecord,
    op: u64,
    entry_pkru: u32,
    body: impl FnOnce(&mut ThreadRecord) -> R,
) -> std::result::Result<R, u64> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_op_unguarded(rec, op, entry_pkru, body)
    })) {
        Ok(out) => out,
        Err(payload) => {
            // Freeing the payload would call the program's allocator from library code.
            std::mem::forget(payload);
            Err(crate::ops::STATUS_PANIC)
        }
    }
}

/// [`run_op`] without catching panics (the direct path: no assembly frame to unwind).
#[inline(always)]
fn run_op_unguarded<R>(
    rec: &mut ThreadRecord,
    op: u64,
    entry_pkru: u32,
    body: impl FnOnce(&mut ThreadRecord) -> R,
) -> std::result::Result<R, u64> {
    rec.entry_pkru = Pkru::from_bits(entry_pkru);
    // The gate told the thread by its FS base, which glibc hands on with the TCB of an ended
    // thread. A record whose thread armed its exit hook and has not run it is its thread's
    // (the hook runs when it ends); any other is checked by thread id (`confirm_owner`).
    if op == crate::ops::OP_FORKED {
        // The forking thread in a `fork()` child: the same thread for the program, with a new
        // id, and the only thread there: no lock (one another thread held at the fork stays
        // held in the child).
        rec.tid = gettid();
    }
    if rec.exited || !rec.hooked {
        confirm_owner(rec, Pkru::from_bits(entry_pkru))?;
    }
    if rec.exited && op != crate::ops::OP_SYNC {
        // The thread's exit hook ran: a call now would leave state nobody cleans up. (Taking
        // new process-wide rights leaves none, and a revocation waits for it.)
        return Err(crate::ops::STATUS_EXITING);
    }
    // (Not from the exit hook itself, nor from the sync signal's handler, which must not
    // allocate.) Only in cooperative mode: elsewhere library code runs with every key open,
    // and the thread arms the hook itself (`arm_from_app`).
    if op != crate::ops::OP_THREAD_EXIT
        && op != crate::ops::OP_SYNC
        && meta::app_mode() == Some(MetadataMode::Cooperative)
    {
        arm_exit_hook(rec);
    }
    if !note_context(rec, op, entry_pkru) {
        // A handler nested too deeply: nothing runs.
        mark_context(rec);
        return Err(GATE_BUSY);
    }
    let out = body(rec);
    if rec.spawning {
        // Views entered or left while creating threads change no right until it is done.
        crate::manager::global::resync(rec, None);
    }
    // Process-wide rights that changed during the op (the thread may have been signalled
    // while it ran). Not in a signal handler's context: the context it interrupted would
    // keep its old PKRU.
    if !rec.interrupted && op != crate::ops::OP_REGISTER {
        // The library sets the PKRU of the context it takes for the normal one (a thread's
        // first op is taken for the normal context's: see `note_context`). Registration
        // itself (`OP_REGISTER`, which may run inside a handler) leaves that to the op that
        // follows it.
        rec.inherited = false;
        crate::manager::global::acknowledge(rec, None);
    }
    if op != crate::ops::OP_REGISTER {
        rec.fresh = false;
    }
    mark_context(rec);
    Ok(out)
}

/// Clears a record's busy word when dropped (also when a panic unwinds through it).
struct Unbusy(*mut ThreadRecord);

impl Drop for Unbusy {
    fn drop(&mut self) {
        crate::claim::release(busy_word(self.0));
    }
}

/// A record's busy word, for atomic access. Every access to it is atomic: the gates claim
/// it with XCHG, [`claim`] with a swap, `register` with a compare-exchange (`claim.rs`).
fn busy_word<'a>(rec: *mut ThreadRecord) -> &'a AtomicU32 {
    let word = rec
        .wrapping_byte_add(std::mem::offset_of!(ThreadRecord, gate.busy))
        .cast::<u32>();
    // SAFETY: `rec` is a record (records are never freed), so the field is valid for the
    // program's lifetime; it is a `u32` of a `repr(C)` struct, so aligned for an
    // `AtomicU32`; and nothing accesses it non-atomically (see above).
    unsafe { AtomicU32::from_ptr(word) }
}

/// Claims the busy word of `rec`, found by `current_ptr`, and checks the owner again (the
/// cooperative paths' version of the gate's claim; see `claim.rs`).
fn claim(rec: *mut ThreadRecord) -> Claim {
    let owner = || {
        let field = rec
            .cast_const()
            .wrapping_byte_add(std::mem::offset_of!(ThreadRecord, gate.owner_fs))
            .cast::<u64>();
        // SAFETY: an aligned `u64` field of a record (never freed); read with the busy word
        // held, so `register`, which claims the word before it writes the owner, is not
        // writing it.
        unsafe { field.read() }
    };
    crate::claim::claim(busy_word(rec), owner, fsgs().fs_base() as u64)
}

/// In cooperative mode, runs op `op` as a direct call of `body` on the calling thread's
/// record — no argument block, no dispatcher — with the same bookkeeping as every op; `None`
/// in the other modes (the caller goes through [`call`]). The hot ops (entering and leaving
/// views) use this: cooperative mode trusts the program, so nothing needs marshalling.
pub(crate) fn direct<R>(
    op: u64,
    body: impl FnOnce(&mut ThreadRecord) -> Result<R>,
) -> Option<Result<R>> {
    if meta::app_mode() != Some(MetadataMode::Cooperative) {
        return None;
    }
    let pku = Pku::new();
    let entry = pku.map_or(Pkru::ALLOW_ALL, |p| p.rdpkru());
    let mut rec = ThreadRecord::current().map(|r| r as *mut ThreadRecord);
    if rec.is_none() {
        if register_masked(entry.bits()) == 0 {
            return Some(Err(Error::Unsupported("registering the calling thread")));
        }
        rec = ThreadRecord::current().map(|r| r as *mut ThreadRecord);
    }
    let Some(rec) = rec else {
        return Some(Err(Error::Unsupported("registering the calling thread")));
    };
    // SAFETY: the thread's own record (found through its GS base); one plain read of a flag
    // only the thread's own ops write.
    if unsafe { (*rec).sandbox.active } {
        // A sandbox's seal covers the direct path too (`crate::sandbox`).
        return Some(Err(Error::Confined(
            "a sandboxed thread makes no library calls",
        )));
    }
    // Claimed with no reference yet: an op of this thread that a signal handler interrupted
    // may hold one. The op counts as under way from before the claim: a handler that
    // interrupts between the two must not take the claim for a momentary one and wait for
    // it (`leave_orphaned_record`).
    let in_op = InOp::new();
    let claimed = claim(rec);
    if claimed != Claim::Held {
        drop(in_op);
    }
    match claimed {
        Claim::Held => {}
        // The thread lets go of a record busy for good (or taken) and registers afresh.
        Claim::Busy if leave_orphaned_record() => return direct(op, body),
        Claim::Lost => {
            REGISTERED.set(false);
            if register_masked(entry.bits()) == 0 {
                return Some(Err(Error::Unsupported("registering the calling thread")));
            }
            return direct(op, body);
        }
        Claim::Busy => return Some(Err(Error::Reentrant)),
    }
    // SAFETY: the calling thread's own record (the owner checked with the busy word held),
    // used by this thread alone; the busy word keeps a signal handler's call out meanwhile.
    let rec = unsafe { &mut *rec };
    let unbusy = Unbusy(rec);
    // Panics propagate to the caller (cooperative mode trusts the program; the busy word is
    // cleared on the way).
    let out = run_op_unguarded(rec, op, entry.bits(), body);
    drop(unbusy);
    rec.gate.normal_pkru = rec.gate.pkru;
    if let Some(_pku) = pku
        && rec.gate.pkru != entry.bits()
    {
        // SAFETY: OSPKE is set (token); the GS base points at this thread's record, whose
        // value the op computed and which keeps key 0 accessible.
        unsafe { mpkvirt_asm::mpkvirt_gate_sync() };
    }
    Some(match out {
        Ok(r) => r,
        Err(crate::ops::STATUS_EXITING) => Err(Error::Unsupported(
            "library calls while the thread is exiting",
        )),
        Err(crate::ops::STATUS_RETRY) => Err(Error::Unsupported(
            "identifying the calling thread (its record was re-issued meanwhile)",
        )),
        Err(GATE_BUSY) => Err(Error::Reentrant),
        Err(_) => Err(Error::Unsupported(
            "an internal error of mpkvirt (a panic inside the library)",
        )),
    })
}

/// How deep signal-handler levels may nest. A level is added only when a handler's first
/// call finds the current level holding views of its own (see [`note_context`]); a handler
/// that would need a level beyond this gets [`Error::Reentrant`] for its calls.
pub(crate) const MAX_LEVELS: usize = 64;

/// The signal-handler levels of a thread (see [`note_context`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Levels {
    /// `floors[i]`: the thread's view sequence number when level `i + 1` began.
    floors: [u64; MAX_LEVELS],
    /// The current level (0: the normal context).
    depth: usize,
    /// The level the gate's exit spells into the PKRU it installs.
    spell: usize,
    /// The level when the current op began (the context a handler's op interrupted).
    entry: usize,
    /// The op was refused (too deep): the gate's exit installs the library key with no
    /// access, so that the caller's next call is taken for a new handler's again.
    refused: bool,
}

impl Levels {
    pub(crate) const NORMAL: Levels = Levels {
        floors: [0; MAX_LEVELS],
        depth: 0,
        spell: 0,
        entry: 0,
        refused: false,
    };

    /// The seal: views with a sequence number up to it belong to contexts the current level
    /// interrupted and cannot be ended by it (`None` in the normal context).
    pub(crate) fn seal(&self) -> Option<u64> {
        self.depth.checked_sub(1).map(|i| self.floors[i])
    }
}

/// A guarded call's mark: the thread's view sequence number and the level it runs at (the
/// level its recovery op returns to; see [`resume_level`]).
pub(crate) fn guard_mark(rec: &ThreadRecord) -> u64 {
    rec.view_seq | ((rec.levels.depth as u64) << MARK_LEVEL_SHIFT)
}

/// The view sequence number and the level of a guarded call's mark.
pub(crate) fn split_mark(mark: u64) -> (u64, usize) {
    (
        mark & ((1 << MARK_LEVEL_SHIFT) - 1),
        (mark >> MARK_LEVEL_SHIFT) as usize,
    )
}

/// Where a mark keeps its level (view sequence numbers stay far below 2^56).
const MARK_LEVEL_SHIFT: u32 = 56;

/// Which context an op comes from, and the seal that follows from it (see
/// `manager/views.rs`, *Signal handlers*). Returns `false` when the op must be refused
/// (a handler nested deeper than [`MAX_LEVELS`] levels that hold views).
///
/// **Levels.** The thread's normal context is level 0. A signal handler's first call starts
/// a new level on top of the current one, whose floor is the thread's view sequence number
/// then: the views up to the floor belong to the contexts it interrupted (every lower level)
/// and are sealed — ending one fails with `InterruptedView`, in the C API with EDEADLK. When
/// the current level holds no views of its own, the new handler shares it instead (it can
/// end nothing the level below could not, and repeated handlers do not pile up levels).
/// A call from a lower level means every handler above it has returned (handlers nest like
/// calls): their levels end, and so do the views they left behind.
///
/// **Telling contexts apart.** The kernel starts every handler with its initial PKRU, which
/// denies the library key, and `rt_sigreturn` restores the interrupted context's value; so
/// a handler's first call is told apart by the library key's field (read-only in every
/// value a gate installs). A context's later calls arrive with what the gate installed last
/// in it, so the level is spelled into that value: a key with no access has two spellings
/// with the same meaning, `01` (access-disabled) and `11` (access- and write-disabled), and
/// the no-access keys but key 0 and the library key, in key order, carry the level's bits
/// in their write-disable bits (level 0: all `01`). With `m` such keys, levels up to
/// `2^m - 2` are exact and the all-ones value means "at least `2^m - 1`"; such a call, and
/// one whose value grants every key (nothing spelled), stays at the current level — the
/// safe direction: a context taken for a deeper one than it is can end fewer views, never
/// more. A spelled level above the current one starts a new level (no library exit
/// installed it; a forged or foreign value). (Without a library key — cooperative mode —
/// only a handler's first call is recognised: the entry PKRU differs from the value the
/// library last set.)
///
/// Recovery ops of a guarded call run at the level the guarded call started at (its mark;
/// see [`resume_level`]): a fault abandons every frame on the guarded stack, handlers that
/// ran there included, and the thread resumes in the guarded call's caller. mpkvirt's own
/// handlers (`OP_SYNC`) run no application code and change no level.
fn note_context(rec: &mut ThreadRecord, op: u64, entry: u32) -> bool {
    rec.levels.entry = rec.levels.depth;
    if std::mem::take(&mut rec.levels.refused)
        && let Some(k) = root().library_key()
    {
        // The refused call's exit denied the library key (see `mark_context`).
        rec.gate.pkru = Pkru::from_bits(rec.gate.pkru)
            .with(k, mpkvirt_sys::AccessRights::READ_ONLY)
            .bits();
    }
    let depth = rec.levels.depth;
    if op == crate::ops::OP_SYNC {
        // mpkvirt's own handlers (the sync signal, a fault taking a grant): they run no
        // application code and leave the levels as they are. The op itself decides whether
        // the context it interrupted is the normal one, and acknowledges only then. The value
        // the gate installs for them is spelled one level up, so that a handler chained after
        // them (a program's SIGSEGV handler) is not taken for the context they interrupted.
        rec.interrupted = true;
        rec.levels.spell = if rec.fresh { depth } else { depth + 1 };
        return true;
    }
    let recovery = op == crate::ops::OP_END_VIEWS_SINCE || op == crate::capi::C_GUARD_END;
    enum Cx {
        At(usize),
        New,
    }
    let cx = if Pku::new().is_none() || rec.fresh {
        Cx::At(0)
    } else if recovery {
        // The op's mark decides (`resume_level`, in the op).
        Cx::At(depth)
    } else {
        match root().library_key() {
            Some(k) if Pkru::from_bits(entry).rights(k) != mpkvirt_sys::AccessRights::READ_ONLY => {
                Cx::New
            }
            Some(k) => match spelled_level(entry, marker_mask(k)) {
                None => Cx::At(depth),
                Some((v, _)) if v > depth => Cx::New,
                Some((_, true)) => Cx::At(depth),
                Some((v, false)) => Cx::At(v),
            },
            None => {
                let managed = root()
                    .managed_mask
                    .load(std::sync::atomic::Ordering::Relaxed);
                if (entry ^ rec.gate.pkru) & managed != 0 {
                    Cx::New
                } else {
                    Cx::At(0)
                }
            }
        }
    };
    match cx {
        Cx::At(level) => pop_levels(rec, level),
        Cx::New => {
            let shares = depth > 0
                && !crate::manager::ops::views_above(rec, rec.levels.floors[depth - 1])
                && !crate::capi::level_holds_state(rec);
            if !shares {
                if depth == MAX_LEVELS {
                    rec.levels.refused = true;
                    rec.interrupted = true;
                    rec.levels.spell = depth;
                    return false;
                }
                rec.levels.floors[depth] = rec.view_seq;
                rec.levels.depth = depth + 1;
                crate::capi::enter_handler_level(rec, depth + 1);
            }
        }
    }
    rec.interrupted = rec.levels.depth > 0;
    rec.levels.spell = rec.levels.depth;
    true
}

/// Back at `level` (below the current one, or the current one): the levels above it ended
/// (their handlers returned, or were abandoned by a faulting guarded call), and with them
/// the views and C API state they left behind.
fn pop_levels(rec: &mut ThreadRecord, level: usize) {
    if level >= rec.levels.depth {
        return;
    }
    let floor = rec.levels.floors[level];
    rec.levels.depth = level;
    crate::manager::ops::end_views_since(rec, floor);
    crate::capi::leave_handler_level(rec, level);
}

/// A guarded call's recovery op (its mark, see [`guard_mark`]): the thread resumed in the
/// guarded call's caller, at the level the call started at; levels begun since (handlers
/// that ran on the abandoned stack, or returned before the fault) have ended. A mark's level
/// above the current one (a forged mark) changes nothing.
pub(crate) fn resume_level(rec: &mut ThreadRecord, mark: u64) {
    let (_, level) = split_mark(mark);
    pop_levels(rec, level);
    rec.interrupted = rec.levels.depth > 0;
    rec.levels.spell = rec.levels.depth;
}

/// The level spelled in `pkru` by its no-access keys among `marker` (see [`note_context`]):
/// `None` when it has none, else the value and whether it is the largest the keys can
/// spell (then the level is at least that).
fn spelled_level(pkru: u32, marker: u32) -> Option<(usize, bool)> {
    let mut none = pkru & marker & 0x5555_5555;
    if none == 0 {
        return None;
    }
    let m = none.count_ones();
    let mut v = 0usize;
    let mut i = 0;
    while none != 0 {
        let pos = none.trailing_zeros();
        if (pkru >> (pos + 1)) & 1 != 0 {
            v |= 1 << i;
        }
        i += 1;
        none &= none - 1;
    }
    Some((v, v == (1usize << m) - 1))
}

/// The keys whose no-access fields carry the context: every key but key 0 and the library
/// key (no-access has two spellings with the same meaning, `01` and `11`, whoever owns the
/// key), so that only a value granting every key says nothing.
fn marker_mask(klib: mpkvirt_sys::Pkey) -> u32 {
    !0b11 & !Pkru::key_mask(klib)
}

/// Spells the context into the PKRU the gate exit installs (see [`note_context`]).
fn mark_context(rec: &mut ThreadRecord) {
    if let Some(k) = root().library_key() {
        rec.gate.pkru = respell(
            sealed_fields(rec, rec.gate.pkru),
            marker_mask(k),
            rec.levels.spell,
        );
        rec.gate.normal_pkru = normal_pkru(rec);
        if rec.levels.refused {
            rec.gate.pkru = Pkru::from_bits(rec.gate.pkru)
                .with(k, mpkvirt_sys::AccessRights::NONE)
                .bits();
        }
    }
}

/// `pkru` with level `level` spelled in its no-access keys among `marker` (saturated at
/// the largest value they can spell).
fn respell(pkru: u32, marker: u32, level: usize) -> u32 {
    let mut none = pkru & marker & 0x5555_5555;
    let v = level.min((1usize << none.count_ones()) - 1);
    let mut out = pkru;
    let mut i = 0;
    while none != 0 {
        let wd = 1u32 << (none.trailing_zeros() + 1);
        if (v >> i) & 1 != 0 {
            out |= wd;
        } else {
            out &= !wd;
        }
        i += 1;
        none &= none - 1;
    }
    out
}

/// `OP_SYNC`'s argument bit: the interrupted context blocks some signal.
pub(crate) const SYNC_MASKED: u64 = 1 << 32;

/// Whether a context of a thread whose normal PKRU may be inherited ([`ThreadRecord`]'s
/// `inherited`) is its normal one, from the PKRU in its signal frame and whether it blocks
/// signals. A signal handler starts with the kernel's initial PKRU, which denies the library
/// key, and (unless installed with `SA_NODEFER` and an empty mask) with its own signal
/// blocked. So the context is taken for a normal one when the library key is read-only in
/// its PKRU (a value the gate installed, inherited from a registered creator) or when it
/// blocks no signal. Anything else may be a handler's: the thread then takes the rights for
/// the interrupted context but does not acknowledge (the initiator reports it, and taints the
/// key, if it never does in time).
pub(crate) fn looks_normal(frame: u32, masked: bool) -> bool {
    let library_ro = root()
        .library_key()
        .is_some_and(|k| Pkru::from_bits(frame).rights(k) == mpkvirt_sys::AccessRights::READ_ONLY);
    library_ro || !masked
}

/// The thread's rights spelled for a signal handler's context that the library did not see
/// start: no-access keys `11`, and the library key access-disabled, as in the kernel's
/// initial PKRU (see [`looks_normal`], [`note_context`]).
pub(crate) fn handler_pkru(rec: &ThreadRecord) -> u32 {
    match root().library_key() {
        Some(k) => Pkru::from_bits(respell(
            sealed_fields(rec, rec.gate.pkru),
            marker_mask(k),
            rec.levels.depth + 1,
        ))
        .with(k, mpkvirt_sys::AccessRights::DISABLE_ACCESS)
        .bits(),
        None => rec.gate.pkru,
    }
}

/// The PKRU of the thread's normal context (the value spelled for it).
pub(crate) fn normal_pkru(rec: &ThreadRecord) -> u32 {
    match root().library_key() {
        Some(k) => respell(sealed_fields(rec, rec.gate.pkru), marker_mask(k), 0),
        None => rec.gate.pkru,
    }
}

/// `pkru` with key 0's field for a thread whose normal context runs a sealed sandbox
/// (`sandbox::sealed_pkru`): write-disabled at every level. A signal handler that
/// interrupted the sandbox gets no more than the sandboxed code (its op ends the handler:
/// [`finish_signal`]), so no value the gate installs, and none left in the record, is worth
/// forging a handler's entry for. Unchanged for every other thread.
fn sealed_fields(rec: &ThreadRecord, pkru: u32) -> u32 {
    if crate::sandbox::sealed(rec) {
        (pkru & !0b11) | mpkvirt_sys::AccessRights::DISABLE_WRITE.bits()
    } else {
        pkru
    }
}

/// The pthread key whose destructor ends a thread's views when it exits.
///
/// A pthread key rather than a Rust thread-local destructor: glibc runs the pthread keys'
/// destructors after the thread-local ones, and again in the next round for a key set
/// during a round, so a thread whose first call comes from another key's destructor (or
/// from a Rust thread-local's) is still cleaned up. The dispatcher sets the key (inside the
/// library, once per record) so the call path touches no thread-local storage. The key is
/// kept in the root (library memory), not in a static: library code passes it to glibc.
fn exit_key() -> Option<libc::pthread_key_t> {
    use std::sync::atomic::Ordering;
    let slot = &root().exit_key;
    let known = slot.load(Ordering::Acquire);
    if known != 0 {
        return libc::pthread_key_t::try_from(known - 1).ok();
    }
    let mut key = 0;
    // SAFETY: `key` is ours to write; the destructor is a plain `extern "C"` function that
    // lives for the whole process.
    if unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) } != 0 {
        return None;
    }
    match slot.compare_exchange(0, u64::from(key) + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(winner) => {
            // Another thread made the key first: ours was never set anywhere.
            // SAFETY: `key` was created just now by this call and is used nowhere.
            unsafe { libc::pthread_key_delete(key) };
            libc::pthread_key_t::try_from(winner - 1).ok()
        }
    }
}

extern "C" fn on_thread_exit(_value: *mut libc::c_void) {
    // With signals blocked: a thread's destructors run after Rust disabled the alternate
    // signal stack it gave the thread (and a C thread may have none). A handler of a signal
    // delivered while the op runs on the thread's library stack would get its frame there
    // and run with the kernel's initial PKRU, which denies the library key: its first push
    // faults, and the fault cannot be delivered either — the kernel kills the process.
    // (Signals sent meanwhile are delivered when the op has returned.)
    let blocked = Blocked::new();
    let _ = call(crate::ops::OP_THREAD_EXIT, std::ptr::null_mut());
    drop(blocked);
}

/// `OP_HOOK` (see [`arm_from_app`]): stage 0 answers the hook's key + 1 (0: none), stage 1
/// notes that the thread armed it.
pub(crate) fn hook_op(rec: &mut ThreadRecord, stage: u64) -> u64 {
    match stage {
        0 if rec.hooked => 0,
        0 => exit_key().map_or(0, |k| u64::from(k) + 1),
        _ => {
            rec.hooked = exit_key().is_some();
            0
        }
    }
}

/// Arms the calling thread's exit hook from application code, with the thread's own rights
/// (protected and gate modes), if its record says it is not armed. `pthread_setspecific`
/// follows pointers kept in the thread's TCB — application memory — for keys of 32 and up
/// (and allocates with the program's `malloc` on first use): called by library code, which
/// runs with every key open, a thread that rewrote those pointers would have it write where
/// it chose, library memory included. Here it writes only what the thread could write
/// itself. The record learns of it by an op; a thread that lies about it only loses its own
/// exit hook (its leftovers are then ended when its record is adopted or re-issued, as for a
/// thread that ended with `SYS_exit`).
fn arm_from_app() {
    if HOOKED.get() {
        return;
    }
    let Ok(key) = crate::ops::call::<u64, u64>(crate::ops::OP_HOOK, 0) else {
        return;
    };
    let Some(key) = key
        .checked_sub(1)
        .and_then(|k| libc::pthread_key_t::try_from(k).ok())
    else {
        // Armed already (or no key): nothing to do on this record.
        HOOKED.set(true);
        return;
    };
    HOOKED.set(true);
    // SAFETY: `key` is the library's exit key (made by `exit_key` inside an op); the value is
    // a non-null marker that is never dereferenced (the destructor ignores it).
    if unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<u8>().cast()) } == 0 {
        let _ = crate::ops::call::<u64, u64>(crate::ops::OP_HOOK, 1);
    }
}

/// Arms the calling thread's exit hook (inside the library, once per record; cooperative
/// mode only, where library code runs with the thread's own rights).
fn arm_exit_hook(rec: &mut ThreadRecord) {
    if rec.hooked {
        return;
    }
    if let Some(key) = exit_key() {
        // SAFETY: `key` was created by `exit_key`; the value is a non-null marker that is
        // never dereferenced (the destructor ignores it).
        rec.hooked =
            unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<u8>().cast()) } == 0;
    }
}

thread_local! {
    /// Whether the calling thread has been through a gate (it has a record of its own). Only
    /// a hint: a thread that finds it unset blocks signals for its call, which is always safe.
    /// (Const, no destructor: readable from signal handlers and thread-exit destructors.)
    static REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// How many of the calling thread's ops are in progress (more than one: a signal handler
    /// called while an op it interrupted runs). Only a guard for [`leave_orphaned_record`]:
    /// a thread never abandons a record one of its own interrupted ops still runs on.
    static IN_OP: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Whether the thread armed the exit hook of its record (`arm_from_app`).
    static HOOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread has been through a gate (a hint in its thread-local
/// storage: see [`REGISTERED`]).
pub(crate) fn registered() -> bool {
    REGISTERED.get()
}

/// Counts an op of the calling thread in [`IN_OP`] while it lives.
pub(crate) struct InOp;

impl InOp {
    pub(crate) fn new() -> InOp {
        IN_OP.set(IN_OP.get() + 1);
        InOp
    }
}

impl Drop for InOp {
    fn drop(&mut self) {
        IN_OP.set(IN_OP.get() - 1);
    }
}

/// Lets go of the record the calling thread's GS base points at when that record is busy for
/// good: its thread ended inside an op (a signal handler that ended it with `SYS_exit`, or
/// `siglongjmp`ed away and then ended), so the busy word stays set, and the calling thread,
/// which glibc gave the dead thread's TCB (same FS base) and which inherited, through `clone`,
/// a GS base still pointing at the record, would otherwise get [`Error::Reentrant`] for every
/// call. Sound because the record is not the caller's: its thread id is another (glibc
/// reuses a TCB only after its thread ended), and no op of the caller is in progress (so this
/// is no handler that interrupted an op of its own thread, e.g. in a `fork()` child). The
/// caller's GS base is cleared and its next call registers it afresh; the record stays busy,
/// so it is never handed out again (leaked, one per such thread), and what the dead thread
/// held stays held (ARCHITECTURE.md, *Thread records*). Returns whether it let go — or, for
/// the thread's own record, whether a momentary claim by another thread ended (see the
/// body): either way, the caller tries again.
fn leave_orphaned_record() -> bool {
    /// How long the thread waits for a claim of its record by another thread to end (see
    /// below): that thread runs a few instructions with the claim, unless it is preempted.
    const TRANSIENT_BUSY_YIELDS: usize = 10_000;
    // (Application code reading library memory: not in a signal handler's context, whose
    // PKRU denies the library key.)
    if IN_OP.get() != 0 || !meta::library_readable() {
        return false;
    }
    let Some(rec) = ThreadRecord::current_ptr() else {
        return false;
    };
    // Reads of single words, no reference: the record may be in use by an op of this
    // thread that a handler interrupted (then the reads only decide to leave it alone).
    let busy = busy_word(rec).load(Ordering::Acquire);
    let tid = rec
        .cast_const()
        .wrapping_byte_add(std::mem::offset_of!(ThreadRecord, tid))
        .cast::<i32>();
    // SAFETY: `current_ptr` checked that the record is in the metadata region (records live
    // forever, readable to every thread): an aligned word of it.
    let tid = unsafe { tid.read_volatile() };
    let confined = rec
        .cast_const()
        .wrapping_byte_add(std::mem::offset_of!(ThreadRecord, confined))
        .cast::<u32>();
    // SAFETY: as above.
    let confined = unsafe { confined.read_volatile() };
    if busy == 0 || IN_OP.get() != 0 {
        return false;
    }
    if tid == gettid() {
        // The thread's own record, and no op of the thread is under way: the word is held
        // for a moment by a thread on the TCB of the record's previous owner, which passed
        // the gate's first owner check just before the record was re-issued to this thread,
        // and lets go at its second check (`callgate.S`). The caller tries again once it is
        // free.
        for _ in 0..TRANSIENT_BUSY_YIELDS {
            if busy_word(rec).load(Ordering::Acquire) == 0 {
                return true;
            }
            std::thread::yield_now();
        }
        return false;
    }
    // (A confined record is kept: the thread would register afresh without its creator's
    // confinement. It gets `Reentrant` instead, the safe direction.)
    if confined != 0 {
        return false;
    }
    // SAFETY: mpkvirt owns the thread's GS base; zero means "no record" to the gates and to
    // `ThreadRecord::current`, so the next call registers the thread.
    if unsafe { set_gs_base(0) }.is_err() {
        return false;
    }
    REGISTERED.set(false);
    HOOKED.set(false);
    true
}

/// The calling thread's signals blocked while it lives (all but those a fault raises
/// synchronously: blocked, they would kill the process instead of reaching their handlers),
/// restored when dropped.
///
/// Registration takes a process-wide lock (the boot lock, the records mutex) and sets the
/// thread's GS base last: a signal handler that called the library in between would
/// register again and wait for the lock its own interrupted frame holds — the thread, and
/// with it every later registration and process-wide sync, would hang. Pending signals are
/// delivered when the mask is restored, once the thread is registered.
///
/// Waiters for keys block signals the same way while awake (`manager::views`): a handler
/// that ended the thread there could end it holding the manager's lock.
pub(crate) struct Blocked(Option<(libc::sigset_t, libc::sigset_t)>);

impl Blocked {
    pub(crate) fn new() -> Blocked {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `sigfillset` initialises the set it is given (always succeeds for a valid
        // pointer).
        unsafe { libc::sigfillset(set.as_mut_ptr()) };
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
        ] {
            // SAFETY: edits the set initialised above; every number is a valid signal.
            unsafe { libc::sigdelset(set.as_mut_ptr(), sig) };
        }
        // SAFETY: reads the initialised `set` and, when it succeeds, writes the calling
        // thread's previous mask into `old` (async-signal-safe: a handler may be the thread's
        // first caller).
        let ok =
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), old.as_mut_ptr()) } == 0;
        // SAFETY: `sigfillset` initialised `set` above.
        let set = unsafe { set.assume_init() };
        // SAFETY: `pthread_sigmask` succeeded, so it initialised `old`.
        Blocked(ok.then(|| (unsafe { old.assume_init() }, set)))
    }

    /// Runs `f` with the thread's mask as it was before (its signals deliverable), then
    /// blocks them again.
    pub(crate) fn unblocked<R>(&self, f: impl FnOnce() -> R) -> R {
        let Some((old, set)) = &self.0 else {
            return f();
        };
        // SAFETY: sets the calling thread's mask to the one `new` saved (initialised).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
        let r = f();
        // SAFETY: blocks the set `new` built (initialised) for the calling thread again.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) };
        r
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        if let Some((old, _)) = &self.0 {
            // SAFETY: restores the mask `new` saved for this thread (initialised by
            // `pthread_sigmask`).
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
        }
    }
}

/// [`mpkvirt_register_thread`] with the thread's signals blocked (cooperative mode; see
/// [`Blocked`]).
fn register_masked(entry_pkru: u32) -> u64 {
    forked_hook();
    let _blocked = Blocked::new();
    mpkvirt_register_thread(entry_pkru)
}

/// Runs op `op` with argument block `args` through the path of this process's mode and
/// returns the op's status word.
///
/// # Errors
///
/// [`Error::Reentrant`] when the thread is already inside the library (a signal handler that
/// interrupted it); [`Error::Unsupported`] when the thread cannot be registered or the
/// metadata cannot be initialised.
pub(crate) fn call(op: u64, args: *mut u8) -> Result<u64> {
    let mode = meta::init()?;
    if mode == MetadataMode::Protected && key0_sealed() {
        // A sealed sandbox (`sandbox::sealed_pkru`): it cannot write the thread-local
        // bookkeeping below. Its thread is registered (it entered the sandbox through an op),
        // and the gate refuses it every op but the sandbox's own.
        return status_result(gate_call(mode, op, args));
    }
    let mut attempts = 0;
    let status = loop {
        if mode != MetadataMode::Cooperative && !REGISTERED.get() {
            // The thread's first call through a gate registers it (on the boot stack, under
            // the boot lock): with its signals blocked, so that no handler's call can wait for
            // the boot lock its own interrupted frame holds. The op itself runs afterwards,
            // unmasked.
            let blocked = Blocked::new();
            let status = gate_call(mode, crate::ops::OP_REGISTER, std::ptr::null_mut());
            drop(blocked);
            match status {
                GATE_UNREGISTERED => {
                    return Err(Error::Unsupported("registering the calling thread"));
                }
                crate::ops::STATUS_EXITING => {
                    return Err(Error::Unsupported(
                        "library calls while the thread is exiting",
                    ));
                }
                _ => REGISTERED.set(true),
            }
            forked_hook();
        }
        // (Not in a signal handler's context either — it runs with the kernel's initial
        // PKRU, which denies the library key: `pthread_setspecific` is no async-signal-safe
        // function; the thread arms the hook at its next call from normal code.)
        if mode != MetadataMode::Cooperative
            && IN_OP.get() == 0
            && !HOOKED.get()
            && meta::library_readable()
            && !matches!(
                op,
                crate::ops::OP_THREAD_EXIT
                    | crate::ops::OP_SYNC
                    | crate::ops::OP_REGISTER
                    | crate::ops::OP_FORKED
                    | crate::ops::OP_HOOK
            )
        {
            arm_from_app();
        }
        let status = {
            let _in_op = InOp::new();
            match mode {
                MetadataMode::Protected | MetadataMode::GateOnly => Ok(gate_call(mode, op, args)),
                MetadataMode::Cooperative => cooperative_call(op, args),
            }?
        };
        // The record the thread was about to adopt went to another thread (see `adopt`), or
        // the record it inherited is busy for good (`leave_orphaned_record`): the thread
        // registers again (masked, as above) on the next attempt.
        attempts += 1;
        let retry =
            status == crate::ops::STATUS_RETRY || (status == GATE_BUSY && leave_orphaned_record());
        if !retry || attempts == 3 {
            break status;
        }
        REGISTERED.set(false);
    };
    status_result(status)
}

/// Whether the calling thread's PKRU write-disables key 0: only a sealed sandbox's does.
fn key0_sealed() -> bool {
    Pku::new().is_some_and(|p| !p.rdpkru().rights(mpkvirt_sys::Pkey::DEFAULT).can_write())
}

/// [`call`]'s result for the gate's status word.
fn status_result(status: u64) -> Result<u64> {
    match status {
        GATE_BUSY => Err(Error::Reentrant),
        crate::ops::STATUS_EXITING => Err(Error::Unsupported(
            "library calls while the thread is exiting",
        )),
        crate::ops::STATUS_RETRY => Err(Error::Unsupported(
            "identifying the calling thread (its record was re-issued meanwhile)",
        )),
        GATE_UNREGISTERED => Err(Error::Unsupported("registering the calling thread")),
        s => Ok(s),
    }
}

/// Op `op` through the call gate of `mode` (not cooperative).
fn gate_call(mode: MetadataMode, op: u64, args: *mut u8) -> u64 {
    if mode == MetadataMode::Protected {
        // SAFETY: `meta::init` set up the root (boot stack, PKRU values) and checked OSPKE and
        // FSGSBASE; mpkvirt owns the GS base; `args` is the block the op expects (the
        // caller's contract; null for `OP_REGISTER`, which reads none).
        unsafe { mpkvirt_asm::mpkvirt_gate_call(op, args) }
    } else {
        // SAFETY: as above, minus OSPKE (this variant executes no PKRU instruction).
        unsafe { mpkvirt_asm::mpkvirt_gate_call_nopku(op, args) }
    }
}

/// Installs (once per process, from a thread's first call, outside any op) the `fork()` child
/// handler that gives the forking thread's record the child's thread id: liveness checks
/// (`op_in_flight`, the wait queue's pruning, record reuse) go by thread id, and without it the
/// thread would look dead in the child — a manager dropped there by a second thread would not
/// wait for its ops.
fn forked_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler with no arguments to run in fork children; it calls
        // only `forked`, which makes one op (no allocation) when the thread has a record.
        let r = unsafe { libc::pthread_atfork(None, None, Some(forked)) };
        if r != 0 {
            crate::fault::log_line(
                "mpkvirt: cannot install the fork handler; after fork() the forking thread's record keeps the parent's thread id\n",
            );
        }
    });
}

/// The `fork()` child handler (see [`forked_hook`]).
extern "C" fn forked() {
    if ThreadRecord::current().is_some() {
        let _ = call(crate::ops::OP_FORKED, std::ptr::null_mut());
    }
}

fn cooperative_call(op: u64, args: *mut u8) -> Result<u64> {
    let pku = Pku::new();
    let entry = pku.map_or(Pkru::ALLOW_ALL, |p| p.rdpkru());
    let mut rec = ThreadRecord::current().map(|r| r as *mut ThreadRecord);
    if rec.is_none() {
        if register_masked(entry.bits()) == 0 {
            return Ok(GATE_UNREGISTERED);
        }
        rec = ThreadRecord::current().map(|r| r as *mut ThreadRecord);
    }
    let rec = rec.ok_or(Error::Unsupported("registering the calling thread"))?;
    match claim(rec) {
        Claim::Held => {}
        Claim::Busy => return Ok(GATE_BUSY),
        // (`call` registers the thread again.)
        Claim::Lost => return Ok(crate::ops::STATUS_RETRY),
    }
    let status = mpkvirt_dispatch(op, args, entry.bits());
    crate::claim::release(busy_word(rec));
    // SAFETY: the calling thread's own record (`current` checked the owner); the
    // dispatcher's reference is gone.
    let gate = unsafe { &mut (*rec).gate };
    gate.normal_pkru = gate.pkru;
    if let Some(_pku) = pku
        && gate.pkru != entry.bits()
    {
        // SAFETY: OSPKE is set (token); the GS base points at this thread's record, whose
        // value the op computed and which keeps key 0 accessible.
        unsafe { mpkvirt_asm::mpkvirt_gate_sync() };
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::{respell, spelled_level};

    /// Every level survives being spelled into a PKRU and read back — exactly while the
    /// no-access keys can hold it, as "at least the largest" beyond — and spelling changes
    /// no right and no field outside the marker keys.
    #[test]
    fn levels_round_trip_through_the_spelling() {
        // Library key 1 (read-only), key 0 open: keys 2..=15 carry the level.
        let marker = !0b11u32 & !(0b11 << 2);
        let base = 0x5555_5554 & !(0b11 << 2) | (0b10 << 2);
        for granted in [0u32, 1 << 2, 0b1011 << 3, 0x3fff << 2, 0x3ffe << 2] {
            // `granted`: keys (by number) the view opens read-write.
            let mut pkru = base;
            for k in 2..16 {
                if granted & (1 << k) != 0 {
                    pkru &= !(0b11 << (2 * k));
                }
            }
            let m = (pkru & marker & 0x5555_5555).count_ones();
            for level in 0..70usize {
                let p = respell(pkru, marker, level);
                assert_eq!(p & 0x5555_5555, pkru & 0x5555_5555, "access bits kept");
                assert_eq!(p & !marker, pkru & !marker, "other keys' fields kept");
                let got = spelled_level(p, marker);
                if m == 0 {
                    assert_eq!(got, None);
                    continue;
                }
                let top = (1usize << m) - 1;
                let want = if level < top {
                    (level, false)
                } else {
                    (top, true)
                };
                assert_eq!(got, Some(want), "level {level}, {m} no-access keys");
            }
            // Level 0 is `01` in every no-access key, whatever the value was spelled as.
            let all_ones = pkru | ((pkru & marker & 0x5555_5555) << 1);
            assert_eq!(respell(all_ones, marker, 0), pkru);
        }
    }
}
