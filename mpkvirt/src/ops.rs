//! Ops: the calls from application code into library code.
//!
//! An op is a code and an argument block `Call<I, O>` in the caller's memory: the input `I`
//! is plain data (integers only, [`Pod`]), which the library copies out once and validates
//! against its own tables; the output is a `Result<O>` the library writes back. The input is
//! application memory that another thread may change at any moment, so it is read exactly
//! once, and any bit pattern is a valid value of it.
//!
//! Op codes: bits 0..16 name the op, bits 16..24 the backend type of the manager it works on
//! (`Spec::TAG`; 0 for ops that need no manager).
//!
//! # Safety
//!
//! The dispatcher turns the argument pointer into reads of `I` and a write of the output.
//! Library code runs with every key open, so an unchecked pointer would be a read and write
//! gadget for any caller (attacker class 2 calls the gate with forged arguments): it checks
//! the pointer for null and alignment, and the block — and every list an op reads — with
//! [`caller_may_access`] against the calling thread's legitimate rights, so it reads and
//! writes only memory the thread could access itself: never library memory, never a domain
//! outside its view. An unmapped address still faults in the library, which is a crash, not
//! an escalation (the fault handler gives the thread the deny PKRU). `Pod` may only be
//! implemented for types without invalid bit patterns.
#![allow(
    unsafe_code,
    reason = "reading argument blocks from application memory"
)]

use std::mem::MaybeUninit;

use crate::backend::sealed::Spec;
use crate::backend::{Emulated, Hardware, Machine, Simulated};
use crate::error::{Error, Result};
use crate::gate::{self, ThreadRecord};

/// The op ran; its output is written.
pub(crate) const STATUS_OK: u64 = 0;
/// The argument block was unusable (null, misaligned, or memory the caller may not access
/// itself) or the op code unknown.
pub(crate) const STATUS_BAD_CALL: u64 = 0x8000_0000_0000_0010;
/// Library code panicked (a bug); nothing is written.
pub(crate) const STATUS_PANIC: u64 = 0x8000_0000_0000_0011;
/// The thread's exit hook ran already; nothing was done.
pub(crate) const STATUS_EXITING: u64 = 0x8000_0000_0000_0012;
/// The record the gate found for the thread was re-issued to another thread before the op
/// could adopt it (`gate::adopt`); nothing was done, and the next attempt registers.
pub(crate) const STATUS_RETRY: u64 = 0x8000_0000_0000_0013;

/// Ends the calling thread's views and retires its record.
pub(crate) const OP_THREAD_EXIT: u64 = 1;
/// Does nothing (the gate's exit re-installs the thread's legitimate PKRU).
pub(crate) const OP_NOP: u64 = 2;
/// Ends every view entered since a mark (a faulting guarded call).
pub(crate) const OP_END_VIEWS_SINCE: u64 = 3;
/// The thread's current view mark.
pub(crate) const OP_VIEW_MARK: u64 = 4;
/// Lowers the thread to no view for a moment (thread creation) / restores it.
pub(crate) const OP_SPAWN_PREPARE: u64 = 5;
pub(crate) const OP_SPAWN_DONE: u64 = 6;
/// Takes new process-wide rights from the sync signal's handler (`crate::sync`): input the
/// interrupted context's PKRU, output the PKRU it must resume with (or `sync::NOT_NOW`).
pub(crate) const OP_SYNC: u64 = 7;
/// Makes every thread take the current process-wide rights (`thread::sync_process_wide`).
pub(crate) const OP_SYNC_ALL: u64 = 8;
/// A revocation's round of signals for the keys in the input's PKRU fields, without changing
/// any right (`testing::revocation_round`, for benchmarks).
#[cfg(feature = "testing")]
pub(crate) const OP_SYNC_HOLDERS: u64 = 9;
/// Does nothing but register the calling thread (its first call through a gate, with its
/// signals blocked: `gate::call`); the thread stays *fresh* for its next op, which decides
/// what the rights it inherited become.
pub(crate) const OP_REGISTER: u64 = 10;

/// Run in a `fork()` child by the thread that forked (an atfork handler, `gate::forked`): its
/// record takes the child's thread id (liveness checks go by thread id). Nothing else.
pub(crate) const OP_FORKED: u64 = 11;

/// Confines the calling thread to a set of domains (`thread::confine`): input the address
/// and length of a list of domain uids (`u64`).
pub(crate) const OP_CONFINE: u64 = 12;

/// The calling thread's exit hook (protected and gate modes: the hook is armed by the thread
/// itself, with its own rights, never by library code — see `gate::arm_from_app`). Input 0:
/// output the hook's pthread key + 1 (0: none); input 1: the thread armed it.
pub(crate) const OP_HOOK: u64 = 13;

/// Yields from a sandbox (`sandbox::yield_now`): the argument word is the value, not a block.
pub(crate) const OP_SANDBOX_YIELD: u64 = 14;
/// Whether the thread is sandboxed (`sandbox::query`): the argument word is the interrupted
/// context's PKRU, not a block.
pub(crate) const OP_SANDBOX_QUERY: u64 = 15;
/// Preempts or abandons the sandboxed context a signal interrupted (`sandbox::signal`).
pub(crate) const OP_SANDBOX_SIGNAL: u64 = 16;
// `asm/x86_64/sandbox.S` makes the yield op by number (`gate.h`).
const _: () = assert!(OP_SANDBOX_YIELD == 14);

/// Plain data: every bit pattern is a valid value, so it can be copied out of memory another
/// thread may be writing.
///
/// # Safety
///
/// Only for `#[repr(C)]` types made of integers (and arrays and `Pod` structs of them),
/// without padding that matters.
pub(crate) unsafe trait Pod: Copy {}

// SAFETY: integers and arrays of them accept every bit pattern.
unsafe impl Pod for () {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for i32 {}
// SAFETY: as above.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

/// The argument block of an op.
#[repr(C)]
pub(crate) struct Call<I, O> {
    pub(crate) input: I,
    pub(crate) output: MaybeUninit<Result<O>>,
}

/// Runs op `code` with `input` (application side) and returns its output.
///
/// # Errors
///
/// The op's own error, [`Error::Reentrant`] from a signal handler that interrupted the
/// library, or [`Error::Unsupported`] when the library failed (a bug, reported as such).
pub(crate) fn call<I: Pod, O>(code: u64, input: I) -> Result<O> {
    let mut c = Call {
        input,
        output: MaybeUninit::<Result<O>>::uninit(),
    };
    match gate::call(code, (&raw mut c).cast())? {
        // SAFETY: STATUS_OK means the dispatcher wrote the output (`finish`).
        STATUS_OK => unsafe { c.output.assume_init() },
        STATUS_PANIC => Err(Error::Unsupported(
            "an internal error of mpkvirt (a panic inside the library)",
        )),
        _ => Err(Error::Unsupported("an unknown library call")),
    }
}

/// Runs op `op` with the caller-made argument block at `args` through this process's calling
/// path — what a forged call of the gate does — and returns the status word (feature
/// `testing`: tests of the argument checks in any metadata mode, without PKU too).
///
/// # Errors
///
/// As [`gate::call`].
///
/// # Safety
///
/// `args` may be anything: the library reads and writes only memory the calling thread may
/// access itself, but that may be memory the caller's Rust code owns (the output overwrites
/// it), and an unmapped address faults.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub unsafe fn raw_call(op: u64, args: *mut u8) -> Result<u64> {
    gate::call(op, args)
}

/// The argument block of the op being served (library side).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Args(*mut u8);

impl Args {
    /// The block at `p`.
    ///
    /// # Safety
    ///
    /// `p` must be null or point to memory the calling thread may read and write as the
    /// `Call<I, O>` of the op being served (checked for null, alignment and the thread's
    /// rights in `serve`; a hostile caller's unmapped pointer faults inside the library, see
    /// the module docs).
    pub(crate) unsafe fn new(p: *mut u8) -> Args {
        Args(p)
    }

    /// The argument word itself, for ops that take a value instead of a block.
    pub(crate) fn raw(self) -> u64 {
        self.0 as u64
    }

    /// Copies the input out of the block (checked as in [`Self::serve`]) and returns it with
    /// the address of the block's output slot, for an op that writes its output later
    /// ([`Self::write`]); `None` for a block the thread may not access.
    pub(crate) fn read<I: Pod, O>(
        self,
        rec: &mut ThreadRecord,
    ) -> Option<(I, *mut MaybeUninit<Result<O>>)> {
        let call = self.0.cast::<Call<I, O>>();
        if call.is_null()
            || !call.is_aligned()
            || !caller_may_access(rec, call as usize, size_of::<Call<I, O>>(), true)
        {
            return None;
        }
        let output = call
            .cast::<u8>()
            .wrapping_add(std::mem::offset_of!(Call<I, O>, output))
            .cast::<MaybeUninit<Result<O>>>();
        // SAFETY: as in `serve`: non-null, aligned, memory the thread may read itself; read
        // once, and any bits are an `I`.
        let input = unsafe { std::ptr::read_volatile(call.cast::<I>()) };
        Some((input, output))
    }

    /// Writes an op's output into the slot [`Self::read`] returned, checked again with the
    /// thread's rights as they are now: `STATUS_OK`, or `STATUS_BAD_CALL` (output dropped).
    pub(crate) fn write<O>(
        rec: &mut ThreadRecord,
        output: *mut MaybeUninit<Result<O>>,
        out: Result<O>,
    ) -> u64 {
        if output.is_null()
            || !output.is_aligned()
            || !caller_may_access(rec, output as usize, size_of::<Result<O>>(), true)
        {
            return STATUS_BAD_CALL;
        }
        // SAFETY: aligned, and memory the calling thread may write itself as it is now
        // (checked above); an uninitialised output slot (nothing to drop).
        unsafe { output.write(MaybeUninit::new(out)) };
        STATUS_OK
    }

    /// Copies the input out of the block, runs `f`, writes its output — each only after
    /// checking that the calling thread may itself access the block ([`caller_may_access`]):
    /// the whole block before `f` runs, the output again before it is written (`f` may have
    /// changed the thread's rights). A block it may not access is `STATUS_BAD_CALL`: nothing
    /// read or run, or — when `f` itself took the rights away — its output dropped.
    pub(crate) fn serve<I: Pod, O>(
        self,
        rec: &mut ThreadRecord,
        f: impl FnOnce(&mut ThreadRecord, I) -> Result<O>,
    ) -> u64 {
        let call = self.0.cast::<Call<I, O>>();
        if call.is_null() || !call.is_aligned() {
            return STATUS_BAD_CALL;
        }
        if !caller_may_access(rec, call as usize, size_of::<Call<I, O>>(), true) {
            return STATUS_BAD_CALL;
        }
        // `input` is the first field of the `#[repr(C)]` block; `output` is at its offset.
        let input = call.cast::<I>();
        let output = call
            .cast::<u8>()
            .wrapping_add(std::mem::offset_of!(Call<I, O>, output))
            .cast::<MaybeUninit<Result<O>>>();
        // SAFETY: non-null and aligned (checked, and the field is aligned within the block);
        // memory the calling thread may read and write itself (checked above), so reading it
        // reaches neither library memory nor a domain outside the thread's view. A volatile
        // copy: the input is read exactly once, and `I: Pod` accepts any bits.
        let input = unsafe { std::ptr::read_volatile(input) };
        let out = f(rec, input);
        if !caller_may_access(rec, output as usize, size_of::<Result<O>>(), true) {
            return STATUS_BAD_CALL;
        }
        // SAFETY: as above, and checked again for writing with the thread's rights as the op
        // left them; the output slot is uninitialised memory of the caller's block (nothing to
        // drop).
        unsafe { output.write(MaybeUninit::new(out)) };
        STATUS_OK
    }
}

/// Whether the calling thread could access `[addr, addr + len)` itself (`write`: for writing)
/// with its *legitimate* rights — the record's PKRU and views in library memory, never the
/// PKRU it entered with (a caller that jumps past the gate's RDPKRU chooses that). Library
/// code checks every range of caller memory it reads or writes on the caller's behalf with
/// this before touching it (it runs with every key open): argument blocks (`Args::serve`)
/// and lists (`manager::ops`).
///
/// - The range must not wrap, must end in the user address space, and must not overlap the
///   library's memory (`meta::overlaps_library`: bounds kept in the root).
/// - A range that touches no arena granule (the library's own arena map) is application
///   memory outside every domain: allowed. This is the common case — a block on the caller's
///   stack — and costs a few compares and one load of the map.
/// - Otherwise it must lie entirely in one live domain of a real backend that is bound to a
///   key the thread's rights grant for the access (`manager::ops::caller_domain_grants`);
///   anything else (free arena ranges, parked domains, ranges straddling domains) is refused.
///
/// Memory tagged with keys mpkvirt does not manage is not distinguished from key 0: the
/// library does not know those pages (stated in ARCHITECTURE.md's threat model). The slow
/// path announces other managers in turn: call this only while the op holds no reference to
/// its manager (before looking it up, or after it finished).
#[inline]
pub(crate) fn caller_may_access(
    rec: &mut ThreadRecord,
    addr: usize,
    len: usize,
    write: bool,
) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    if len == 0 {
        return true;
    }
    if addr == 0 || end > crate::backend::USER_END || crate::meta::overlaps_library(addr, end) {
        return false;
    }
    if !crate::backend::arena_map_touches(addr, end) {
        return true;
    }
    crate::manager::ops::caller_domain_grants(rec, addr, end, write)
}

/// The dispatcher's router (inside the library).
pub(crate) fn run(op: u64, args: Args, rec: &mut ThreadRecord) -> u64 {
    // A sandboxed thread's seal (`crate::sandbox`): no manager op, and no global op but the
    // sandbox's own and the sync handler's.
    if rec.sandbox.active && (op >> 16 != 0 || !crate::sandbox::allowed(rec, op, args.0 as usize)) {
        return STATUS_BAD_CALL;
    }
    let tag = ((op >> 16) & 0xff) as u32;
    let code = op & 0xffff;
    match tag {
        0 => run_global(code, args, rec),
        Simulated::TAG => crate::manager::ops::run::<Simulated>(code, args, rec),
        Emulated::TAG => crate::manager::ops::run::<Emulated>(code, args, rec),
        Hardware::TAG => crate::manager::ops::run::<Hardware>(code, args, rec),
        Machine::TAG => crate::manager::ops::run::<Machine>(code, args, rec),
        _ => STATUS_BAD_CALL,
    }
}

fn run_global(code: u64, args: Args, rec: &mut ThreadRecord) -> u64 {
    match code {
        OP_NOP | OP_REGISTER | OP_FORKED => STATUS_OK,
        OP_THREAD_EXIT => {
            crate::manager::ops::thread_exit(rec);
            crate::capi::thread_exit(rec);
            gate::retire_record(rec);
            STATUS_OK
        }
        OP_VIEW_MARK => args.serve(rec, |rec, (): ()| Ok(gate::guard_mark(rec))),
        // The recovery of a faulting guarded call: back at the level the call started at
        // (`gate::resume_level`), then the views the closure entered end.
        OP_END_VIEWS_SINCE => args.serve(rec, |rec, mark: u64| {
            gate::resume_level(rec, mark);
            crate::manager::ops::end_views_since(rec, gate::split_mark(mark).0);
            Ok(())
        }),
        // While the thread creates threads, its PKRU grants no view (only process-wide
        // rights); afterwards it is computed again from the views it has then (views it ended
        // meanwhile are gone, never restored from a saved value). The entry PKRU is not used:
        // code that jumps into the gate past its RDPKRU chooses it.
        OP_SPAWN_PREPARE => args.serve(rec, |rec, (): ()| {
            rec.spawning = true;
            crate::manager::global::resync(rec, None);
            Ok(())
        }),
        OP_SPAWN_DONE => args.serve(rec, |rec, (): ()| {
            rec.spawning = false;
            crate::manager::global::resync(rec, None);
            Ok(())
        }),
        OP_SYNC => args.serve(rec, |rec, arg: u64| {
            let frame = arg as u32;
            let pku = mpkvirt_sys::Pku::new().is_some();
            // The handler interrupted library code: only the gates run with the library key
            // writable (between a gate's raising WRPKRU and its busy claim, or between its
            // release and its lowering WRPKRU, where this op could start). The frame keeps
            // its PKRU — rewritten, the gate would resume with the application's rights and
            // fault on its own record — and that op takes the rights when it ends.
            if pku
                && crate::meta::root()
                    .library_key()
                    .is_some_and(|k| mpkvirt_sys::Pkru::from_bits(frame).rights(k).can_write())
            {
                return Ok(crate::sync::NOT_NOW);
            }
            // The interrupted context is the thread's normal one when it runs with the value
            // the library set; for a thread whose normal context may still run with its
            // inherited PKRU, when it looks normal (`gate::looks_normal`).
            let normal = !pku
                || if rec.inherited {
                    gate::looks_normal(frame, arg & gate::SYNC_MASKED != 0)
                } else {
                    frame == gate::normal_pkru(rec)
                };
            if !normal {
                if rec.inherited {
                    // Perhaps a signal handler's context: it gets the thread's rights as they
                    // are now, spelled as a handler's (so it never looks normal later), but
                    // the thread does not acknowledge — the context it interrupted may resume
                    // with the inherited rights.
                    crate::manager::global::resync(rec, None);
                    return Ok(u64::from(gate::handler_pkru(rec)));
                }
                return Ok(crate::sync::NOT_NOW);
            }
            rec.inherited = false;
            let epoch = crate::meta::root()
                .sync_epoch
                .load(std::sync::atomic::Ordering::SeqCst);
            crate::manager::global::resync(rec, None);
            rec.synced
                .fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
            crate::manager::global::announce_ack();
            Ok(u64::from(gate::normal_pkru(rec)))
        }),
        OP_CONFINE => args.serve(rec, |rec, list: [u64; 2]| confine(rec, list)),
        OP_SANDBOX_YIELD => crate::sandbox::yield_op(rec, args.raw()),
        OP_SANDBOX_QUERY => crate::sandbox::query_op(rec, args.raw()),
        OP_SANDBOX_SIGNAL => args.serve(rec, crate::sandbox::signal_op),
        OP_HOOK => args.serve(rec, |rec, stage: u64| Ok(gate::hook_op(rec, stage))),
        OP_SYNC_ALL => args.serve(rec, |rec, (): ()| {
            crate::manager::global::broadcast(rec, None, None)
        }),
        #[cfg(feature = "testing")]
        OP_SYNC_HOLDERS => args.serve(rec, |rec, fields: u32| {
            crate::manager::global::broadcast(rec, None, Some(fields))
        }),
        c if c >= crate::capi::OP_BASE => crate::capi::run(c, args, rec),
        _ => STATUS_BAD_CALL,
    }
}

/// `OP_CONFINE`: reads the list of uids (address, length; at most 2^16, checked as every
/// list: [`caller_may_access`]) and confines the thread to them. Only with no view open: a
/// view the thread keeps would outlive the confinement's promise.
fn confine(rec: &mut ThreadRecord, [addr, len]: [u64; 2]) -> Result<()> {
    if crate::manager::ops::views_above(rec, 0) || rec.capi.begun_any() {
        return Err(Error::Confined(
            "a thread confines itself only while no view is open",
        ));
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= 1 << 16)
        .ok_or(Error::InvalidConfig("list length"))?;
    let base = addr as usize as *const u64;
    if len > 0
        && (base.is_null()
            || !base.is_aligned()
            || !caller_may_access(rec, base as usize, len * size_of::<u64>(), false))
    {
        return Err(Error::InvalidConfig("list address"));
    }
    let mut uids = crate::meta::MVec::new_in(crate::meta::Meta);
    uids.try_reserve(len)
        .map_err(|_| Error::Unsupported("library metadata beyond its reserve"))?;
    for k in 0..len {
        // SAFETY: `len` u64s at `base`, checked for null, alignment and that the thread may
        // read them itself (an unmapped address faults in the library, see the module docs);
        // each is read once, and any bits are a valid u64.
        uids.push(unsafe { std::ptr::read_volatile(base.wrapping_add(k)) });
    }
    // Under the records lock: a thread this one created may be registering, and reads the
    // set to inherit it (`gate::register`).
    let _records = crate::meta::lock(&crate::meta::root().records);
    rec.confine(&uids)
}
