//! The library's own memory: the root page, the metadata region and its allocator.
//!
//! Everything that decides rights — the key table, domain records, per-thread records and
//! saved views, allocator metadata, the C API's vkey table — lives here, never in the
//! program's heap. With [`MetadataMode::Protected`] the root page and the whole region carry
//! the *library key*: application code gets it read-only (every gate exit installs that), and
//! only library code running behind the call gate (`callgate.S`), with the library key
//! writable, changes it. A stray write from application code — or a deliberate one — faults.
//!
//! # Layout
//!
//! - **Root** ([`root`]): a page-aligned static (`mpkvirt_gate_root`) whose first bytes are
//!   the [`GateRoot`] the assembly reads rip-relative; then the allocator state, the registry
//!   of managers, the list of thread records and the pool of hardware keys. Found through a
//!   rip-relative address, so no pointer in writable memory leads to it.
//! - **Region**: one large reservation (inaccessible until committed), committed in 2 MiB
//!   steps by a bump pointer and tagged with the library key as it is committed. It holds
//!   the heap, the boot stack and the threads' library stacks (each with a guard page).
//! - **Heap** ([`Meta`], an `allocator_api2` allocator): power-of-two size classes from 16
//!   bytes to 1 GiB, each with an intrusive free list (the links live in the freed blocks,
//!   inside the region). Blocks of 64 KiB or more are given back to the kernel
//!   (`MADV_DONTNEED`) when freed. Containers of library state are `allocator_api2` vectors,
//!   `hashbrown` maps and the crate's treap, all parameterised with [`Meta`].
//!
//! # Rules for code that runs behind the gate
//!
//! Library code runs with the library key writable, so anything it writes through a pointer
//! found in application memory is a write gadget. It therefore never uses the global
//! allocator (the C library's heap keeps its links in application memory), the standard
//! streams, or any state reached through application memory (what it trusts — the region's
//! bounds, the arena map — hangs off the root); it reads and writes caller memory only where
//! the calling thread could itself (`ops::caller_may_access`), copies its arguments out once
//! and validates them against its own tables. Values it returns may be plain data written
//! into the caller's argument block.
//!
//! # Safety
//!
//! This file reserves and protects the region, hands out raw blocks from it, and reads and
//! writes the free-list links stored in freed blocks. Blocks are handed out only once until
//! freed; a freed block's memory is owned by the allocator. The root is a static with
//! interior mutability, written under its locks or, for the gate fields, once during
//! initialisation (before any gate can run) and by the assembly under the boot lock.
#![allow(
    unsafe_code,
    reason = "the metadata region, its allocator and the root static"
)]

use std::cell::UnsafeCell;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

use allocator_api2::alloc::{AllocError, Allocator, Layout};
use mpkvirt_asm::GateRoot;
use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::pkey::{pkey_alloc, pkey_mprotect};
use mpkvirt_sys::{AccessRights, Pkey, Pkru};

use crate::error::{Error, Result};

/// How library metadata is protected in this process (chosen once, at first use).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MetadataMode {
    /// Metadata carries the library key; library code runs behind the call gate with it
    /// writable, everything else sees it read-only. Needs PKU.
    Protected,
    /// The call gate's path (thread identification, library stacks, dispatch) without PKRU
    /// writes: protects nothing. For testing and measuring the gate natively.
    GateOnly,
    /// Library code runs on the caller's stack; metadata is ordinary memory. Protects against
    /// nothing but is the cheapest.
    Cooperative,
}

impl MetadataMode {
    /// Parses `protected`, `gate` or `cooperative`.
    pub fn parse(s: &str) -> Option<MetadataMode> {
        match s.to_ascii_lowercase().as_str() {
            "protected" => Some(MetadataMode::Protected),
            "gate" | "gate-only" => Some(MetadataMode::GateOnly),
            "cooperative" => Some(MetadataMode::Cooperative),
            _ => None,
        }
    }
}

/// Managers that can be alive at once in a process.
pub(crate) const MAX_MANAGERS: usize = 1024;

/// Address space reserved for the metadata region.
const REGION_LEN: usize = 256 << 30;
/// Commit granule of the region.
const COMMIT: usize = 2 << 20;
/// Size of the shared registration stack.
const BOOT_STACK: usize = 256 << 10;
/// Smallest and largest size classes (log2).
const MIN_CLASS: u32 = 4;
const MAX_CLASS: u32 = 30;
const CLASSES: usize = (MAX_CLASS - MIN_CLASS + 1) as usize;
/// Blocks below this size are carved from shared slabs of this size.
const SLAB: usize = 64 << 10;

/// A manager's entry in the registry: which manager a handle `(index, uid)` names.
#[derive(Debug)]
pub(crate) struct MgrSlot {
    /// The manager's uid, 0 when the slot is free (or the manager is being dropped).
    pub(crate) uid: AtomicU64,
    /// Which backend type the manager is (`BackendKind` tag).
    pub(crate) kind: AtomicU32,
    /// The manager's state (`Shared<B>` for that kind), in the region.
    pub(crate) ptr: AtomicPtr<()>,
    /// The PKRU fields of the manager's keys (all of them access-disabled).
    pub(crate) mask: AtomicU32,
    /// The process-wide rights of the manager's keys, as PKRU fields (`mask` when none): every
    /// thread's rights are its view's and these (see `manager::global`).
    pub(crate) global: AtomicU32,
    /// Whether the manager's keys are hardware keys (threads' PKRU must follow `global`).
    pub(crate) hardware: AtomicBool,
}

/// Hardware keys mpkvirt allocated from the kernel, by number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum KeyUse {
    /// Not allocated by mpkvirt.
    Unowned,
    /// Allocated, not in use: handed to the next hardware backend.
    Free,
    /// Used by a live hardware backend.
    InUse,
    /// A thread may still hold rights to it (a forgotten view when its manager was dropped):
    /// never handed out again.
    Retired,
    /// The library key.
    Library,
}

#[derive(Debug)]
struct Heap {
    /// Next uncommitted-or-unused address of the region, and the end of the committed part.
    bump: usize,
    committed: usize,
    end: usize,
    /// Free lists per size class (0: empty).
    free: [usize; CLASSES],
}

/// The root: a page-aligned static, first bytes read by the assembly.
#[repr(C, align(4096))]
pub(crate) struct Root {
    gate: UnsafeCell<GateRoot>,
    mode: AtomicU32,
    /// The library key (0: none).
    klib: AtomicU32,
    /// PKRU fields of every key the library uses (its own and all managers' hardware keys).
    pub(crate) managed_mask: AtomicU32,
    heap: Mutex<Heap>,
    keys: Mutex<[KeyUse; Pkey::COUNT]>,
    pub(crate) managers: [MgrSlot; MAX_MANAGERS],
    /// Hint for the next free registry slot.
    next_slot: AtomicUsize,
    /// Uids of managers and domains: unique for the life of the process.
    next_uid: AtomicU64,
    /// Bumped whenever process-wide rights change; each thread acknowledges it (see
    /// `manager::global`).
    pub(crate) sync_epoch: AtomicU64,
    /// Bumped by every acknowledgement (a futex word initiators wait on), and the number of
    /// initiators waiting.
    pub(crate) sync_acks: AtomicU32,
    pub(crate) sync_waiters: AtomicU32,
    /// Manager releases between clearing their registry slot and freeing their state: while
    /// one is, a thread that finds its manager's slot cleared cannot tell whether the release
    /// still reads the thread's cx (see `manager::ops::thread_exit`).
    pub(crate) releasing: AtomicU32,
    /// One past the highest registry slot ever claimed (scans stop there).
    pub(crate) slots_high: AtomicUsize,
    /// The C API's state (`capi::CState`), in the region.
    pub(crate) capi: AtomicPtr<()>,
    /// Every thread record ever made (`gate::ThreadRecord`, in the region); dead ones are
    /// reused once their thread is gone.
    pub(crate) records: Mutex<MVec<usize>>,
    /// The metadata region's bounds `[start, end)` (written once by [`init`]; `(0, 0)`
    /// before). What library code checks argument addresses against (`APP_REGION` is only
    /// application code's copy).
    region: [AtomicUsize; 2],
    /// The arena map library code reads and writes (`backend/arena.rs`), in the region.
    pub(crate) arena_map: AtomicPtr<AtomicU64>,
    /// The fault handler's copy of the arena map (application memory: the handler runs with
    /// the kernel's initial PKRU and cannot read the region). Library code only writes it,
    /// through this pointer, never through one found in application memory.
    pub(crate) arena_shadow: AtomicPtr<AtomicU64>,
    /// The process's fence mode (`manager::binding::process_fence`: 0 not chosen yet, 1
    /// asymmetric, 2 symmetric). Here rather than in a static: library code decides with it
    /// how much of the pin/evict protocol it fences.
    pub(crate) fence_mode: std::sync::atomic::AtomicU8,
    /// The pthread key of the exit hook plus one (`gate::exit_key`; 0: none yet). Here rather
    /// than in a static: library code hands it to `pthread_setspecific`.
    pub(crate) exit_key: AtomicU64,
    /// The sync signal's number once its handler is installed (0: not installed). Here
    /// rather than in a static: library code sends it to every thread, and a number the
    /// program could change would let a stray write make a revocation send, say, `SIGKILL`.
    pub(crate) sync_sig: AtomicI32,
    /// The region of guarded-call stacks kept for reuse (`fault.rs`; 0: none), reserved at
    /// start. Here rather than in a static: the stacks are found from it, and a base the
    /// program could change would let a stray write aim the library's `madvise` anywhere.
    pub(crate) guard_pool: AtomicUsize,
    /// Whether sandboxes may run with key 0 write-disabled: the kernel writes signal frames
    /// with every key open (probed at start, `frames_written_with_keys_open`), so one that
    /// interrupts such a sandbox can still be written to the alternate stack (key 0). Here
    /// rather than in a static, where a sandbox of a kernel without it could set it and have
    /// its next signal kill the process.
    pub(crate) seal_key0: AtomicBool,
    /// Where glibc keeps each thread's rseq area, as an offset from the thread pointer
    /// (`i64::MIN`: none registered). Looked up at start (a `dlsym`, which library code may
    /// not call later), for sealed sandboxes: the kernel writes the area with the thread's
    /// PKRU, so a thread that runs one gives up its registration first.
    pub(crate) rseq_offset: AtomicI64,
}

// SAFETY: every field is an atomic or a mutex except `gate`, which is written only during
// initialisation (single-threaded by the `INIT` protocol, before any gate can run) and by
// the assembly while it holds the boot lock; readers use `read_volatile`.
unsafe impl Sync for Root {}

const UNINIT: u32 = 0;
const INITIALISING: u32 = 1;
const READY: u32 = 2;
const FAILED: u32 = 3;

#[unsafe(no_mangle)]
#[used]
static mpkvirt_gate_root: Root = Root {
    gate: UnsafeCell::new(GateRoot {
        lib_pkru: 0,
        deny_pkru: 0,
        boot_lock: 0,
        _pad: 0,
        boot_saved_rsp: 0,
        boot_stack_top: 0,
    }),
    mode: AtomicU32::new(0),
    klib: AtomicU32::new(0),
    managed_mask: AtomicU32::new(0),
    heap: Mutex::new(Heap {
        bump: 0,
        committed: 0,
        end: 0,
        free: [0; CLASSES],
    }),
    keys: Mutex::new([KeyUse::Unowned; Pkey::COUNT]),
    managers: [const {
        MgrSlot {
            uid: AtomicU64::new(0),
            kind: AtomicU32::new(0),
            ptr: AtomicPtr::new(std::ptr::null_mut()),
            mask: AtomicU32::new(0),
            global: AtomicU32::new(0),
            hardware: AtomicBool::new(false),
        }
    }; MAX_MANAGERS],
    next_slot: AtomicUsize::new(0),
    next_uid: AtomicU64::new(1),
    sync_epoch: AtomicU64::new(0),
    sync_acks: AtomicU32::new(0),
    sync_waiters: AtomicU32::new(0),
    releasing: AtomicU32::new(0),
    slots_high: AtomicUsize::new(0),
    capi: AtomicPtr::new(std::ptr::null_mut()),
    records: Mutex::new(MVec::new_in(Meta)),
    region: [AtomicUsize::new(0), AtomicUsize::new(0)],
    arena_map: AtomicPtr::new(std::ptr::null_mut()),
    arena_shadow: AtomicPtr::new(std::ptr::null_mut()),
    fence_mode: std::sync::atomic::AtomicU8::new(0),
    exit_key: AtomicU64::new(0),
    sync_sig: AtomicI32::new(0),
    guard_pool: AtomicUsize::new(0),
    seal_key0: AtomicBool::new(false),
    rseq_offset: AtomicI64::new(i64::MIN),
};

/// The root (initialised: callers go through [`init`] first).
#[inline]
pub(crate) fn root() -> &'static Root {
    &mpkvirt_gate_root
}

impl Root {
    /// The library key, when metadata is protected.
    pub(crate) fn library_key(&self) -> Option<Pkey> {
        // 0: none (key 0 is never the library key).
        u8::try_from(self.klib.load(Ordering::Relaxed))
            .ok()
            .filter(|&k| k != 0)
            .and_then(Pkey::new)
    }

    /// Base bits for a thread outside every view: the library key read-only (when there is
    /// one), every other managed key access-disabled; `entry` supplies the bits of keys the
    /// library does not manage.
    pub(crate) fn base_pkru(&self, entry: Pkru) -> Pkru {
        let managed = self.managed_mask.load(Ordering::Relaxed);
        let mut v = Pkru::from_bits((entry.bits() & !managed) | (0x5555_5555 & managed));
        if let Some(k) = self.library_key() {
            v = v.with(k, AccessRights::READ_ONLY);
        }
        v
    }

    /// Adds `keys` to the managed mask (a hardware backend took them).
    pub(crate) fn manage_keys(&self, keys: &[Pkey]) {
        let mask = keys.iter().fold(0, |m, &k| m | Pkru::key_mask(k));
        self.managed_mask.fetch_or(mask, Ordering::Relaxed);
    }

    /// Takes up to `n` hardware keys for a backend: mpkvirt's free keys first, then new ones
    /// from the kernel. Never fewer than one unless none can be had.
    pub(crate) fn take_keys(&self, n: usize) -> Result<MVec<Pkey>> {
        let mut keys = MVec::new_in(Meta);
        let mut uses = lock(&self.keys);
        for k in Pkey::all().skip(1) {
            if keys.len() >= n {
                break;
            }
            if uses[usize::from(k.index())] == KeyUse::Free {
                uses[usize::from(k.index())] = KeyUse::InUse;
                keys.push(k);
            }
        }
        while keys.len() < n {
            match pkey_alloc(AccessRights::DISABLE_ACCESS) {
                Ok(k) => {
                    uses[usize::from(k.index())] = KeyUse::InUse;
                    keys.push(k);
                }
                Err(mpkvirt_sys::Error::KeysExhausted) if !keys.is_empty() => break,
                Err(source) => {
                    for &k in &keys {
                        uses[usize::from(k.index())] = KeyUse::Free;
                    }
                    return Err(Error::AllocKeys(source));
                }
            }
        }
        drop(uses);
        self.manage_keys(&keys);
        Ok(keys)
    }

    /// Gives a backend's keys back: to the pool, or retired for good when a thread may still
    /// hold rights to them. Keys are never returned to the kernel: a thread that kept rights
    /// by accident must not see pages that other code tags with the same number.
    pub(crate) fn return_keys(&self, keys: &[Pkey], retired: bool) {
        let mut uses = lock(&self.keys);
        for &k in keys {
            uses[usize::from(k.index())] = if retired {
                KeyUse::Retired
            } else {
                KeyUse::Free
            };
        }
    }

    /// A fresh uid for a manager or domain (never reused in the process; below 2^63, so
    /// that owner words can carry the DRAINING bit).
    pub(crate) fn next_uid(&self) -> u64 {
        self.next_uid.fetch_add(1, Ordering::Relaxed)
    }

    /// A free registry slot for a new manager; `None` when all are taken.
    pub(crate) fn claim_slot(
        &self,
        uid: u64,
        kind: u32,
        ptr: *mut (),
        mask: u32,
        hardware: bool,
    ) -> Option<usize> {
        let start = self.next_slot.load(Ordering::Relaxed);
        for i in 0..MAX_MANAGERS {
            let idx = (start + i) % MAX_MANAGERS;
            let slot = &self.managers[idx];
            if slot
                .uid
                .compare_exchange(0, uid, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.kind.store(kind, Ordering::Relaxed);
                slot.mask.store(mask, Ordering::Relaxed);
                slot.global.store(mask, Ordering::Relaxed);
                slot.hardware.store(hardware, Ordering::Relaxed);
                slot.ptr.store(ptr, Ordering::Release);
                self.next_slot.store(idx + 1, Ordering::Relaxed);
                self.slots_high.fetch_max(idx + 1, Ordering::Release);
                return Some(idx);
            }
        }
        None
    }

    /// The state of the manager `(idx, uid)` of backend `kind`, if it is alive.
    #[inline]
    pub(crate) fn lookup(&self, idx: u32, uid: u64, kind: u32) -> Option<NonNull<()>> {
        let slot = self.managers.get(idx as usize)?;
        if uid == 0 || slot.uid.load(Ordering::Acquire) != uid {
            return None;
        }
        if slot.kind.load(Ordering::Relaxed) != kind {
            return None;
        }
        NonNull::new(slot.ptr.load(Ordering::Acquire))
    }

    /// Frees registry slot `idx` (its manager is gone).
    pub(crate) fn release_slot(&self, idx: usize) {
        let slot = &self.managers[idx];
        slot.hardware.store(false, Ordering::Release);
        slot.ptr.store(std::ptr::null_mut(), Ordering::Relaxed);
        slot.uid.store(0, Ordering::Release);
    }
}

/// Locks `m`, ignoring poisoning (library state stays consistent under its own rules; a
/// panic in library code is a bug reported separately).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Read-locks `l`, ignoring poisoning (see [`lock`]).
pub(crate) fn read_rw<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Write-locks `l`, ignoring poisoning (see [`lock`]).
pub(crate) fn lock_rw<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What application code may know of the library's memory without reading it (with
/// protection on, the root and the region are unreadable to a thread until its first gate
/// exit, and always to signal handlers): the mode once initialised (0 before), and the
/// region's bounds. Facts only, never trusted by library code.
static APP_MODE: AtomicU32 = AtomicU32::new(0);

/// The library key's number (0: none), in application memory: only for application code
/// that wants to know whether its PKRU lets it read library memory right now
/// ([`library_readable`]). A wrong value harms only the thread that wrote it.
static LIB_KEY_HINT: AtomicU32 = AtomicU32::new(0);

/// Whether the calling thread may read library memory with its current PKRU (application
/// code: a signal handler runs with the kernel's initial PKRU, which denies the library key).
pub(crate) fn library_readable() -> bool {
    let k = LIB_KEY_HINT.load(Ordering::Acquire);
    if k == 0 {
        return true;
    }
    match (mpkvirt_sys::Pku::new(), mpkvirt_sys::Pkey::new(k as u8)) {
        (Some(p), Some(key)) => p.rdpkru().rights(key).can_read(),
        _ => true,
    }
}
static APP_REGION: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// The bits the call gate's deny value adds (`callgate.S`): key 0 write-disabled where
/// sandboxes run so (`Root::seal_key0`), 0 elsewhere. Alone on a page, made read-only once
/// set at start: sandboxed code that jumps into the deny path keeps key 0 read-only, and
/// nothing may turn the bits off later.
#[repr(C, align(4096))]
pub(crate) struct DenyKey0(AtomicU32);

#[unsafe(no_mangle)]
#[used]
static mpkvirt_deny_key0: DenyKey0 = DenyKey0(AtomicU32::new(0));

const _: () = assert!(size_of::<DenyKey0>() == 4096);

/// `Root::seal_key0`, in application memory, for reporting ([`crate::sandbox::seals_key0`]);
/// the library reads the root's.
pub(crate) static SEAL_KEY0_HINT: AtomicBool = AtomicBool::new(false);

fn mode_code(m: MetadataMode) -> u32 {
    match m {
        MetadataMode::Protected => 1,
        MetadataMode::GateOnly => 2,
        MetadataMode::Cooperative => 3,
    }
}

/// The mode, as application code may read it (after [`init`]).
pub(crate) fn app_mode() -> Option<MetadataMode> {
    match APP_MODE.load(Ordering::Acquire) {
        1 => Some(MetadataMode::Protected),
        2 => Some(MetadataMode::GateOnly),
        3 => Some(MetadataMode::Cooperative),
        _ => None,
    }
}

/// Initialises the root and the region (once per process); returns the mode.
///
/// Runs in application mode on the first use of the library. The mode comes from
/// `MPKVIRT_METADATA` (`protected`, `gate`, `cooperative`, or `auto`, the default: protected
/// when PKU is usable, cooperative otherwise).
///
/// # Errors
///
/// [`Error::Config`] for an unknown `MPKVIRT_METADATA`; [`Error::HardwareRequired`] for
/// `protected` without PKU; [`Error::Unsupported`] without FSGSBASE (Linux 5.9 or later);
/// reservation and key failures.
pub(crate) fn init() -> Result<MetadataMode> {
    if let Some(m) = app_mode() {
        return Ok(m);
    }
    // The protocol runs on application memory: once the root is tagged, a thread that has not
    // been through a gate yet cannot even read it.
    loop {
        match INIT.load(Ordering::Acquire) {
            READY => return app_mode().ok_or(Error::Unsupported("metadata mode unknown")),
            FAILED => return Err(Error::Unsupported("metadata initialisation failed earlier")),
            UNINIT => {
                if INIT
                    .compare_exchange(UNINIT, INITIALISING, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
            }
            _ => std::thread::yield_now(),
        }
    }
    match init_once(root()) {
        Ok(mode) => {
            APP_MODE.store(mode_code(mode), Ordering::Release);
            LIB_KEY_HINT.store(
                root().library_key().map_or(0, |k| u32::from(k.index())),
                Ordering::Release,
            );
            INIT.store(READY, Ordering::Release);
            Ok(mode)
        }
        Err(e) => {
            // A configuration error can be fixed and retried; anything else stays failed.
            let next = if matches!(e, Error::Config(_)) {
                UNINIT
            } else {
                FAILED
            };
            INIT.store(next, Ordering::Release);
            Err(e)
        }
    }
}

/// The state of [`init`] (application memory, see there).
static INIT: AtomicU32 = AtomicU32::new(UNINIT);

fn chosen_mode() -> Result<MetadataMode> {
    let requested = match std::env::var("MPKVIRT_METADATA") {
        Ok(v) if v.eq_ignore_ascii_case("auto") => None,
        Ok(v) => Some(MetadataMode::parse(&v).ok_or_else(|| {
            Error::Config(format!(
                "MPKVIRT_METADATA={v}: expected auto, protected, gate or cooperative"
            ))
        })?),
        Err(_) => None,
    };
    let pku = mpkvirt_sys::detect::pku();
    match (requested, pku) {
        (Some(MetadataMode::Protected), Err(why)) => Err(Error::HardwareRequired(why)),
        // The no-PKU gate writes no PKRU: on PKU hardware views would never take effect.
        (Some(MetadataMode::GateOnly), Ok(_)) => Err(Error::Config(
            "MPKVIRT_METADATA=gate is for machines without PKU (it writes no PKRU); use protected or cooperative"
                .into(),
        )),
        (Some(m), _) => Ok(m),
        (None, Ok(_)) => Ok(MetadataMode::Protected),
        (None, Err(_)) => Ok(MetadataMode::Cooperative),
    }
}

fn init_once(r: &Root) -> Result<MetadataMode> {
    let mode = chosen_mode()?;
    if std::env::var_os("MPKVIRT_DEBUG_FAULTS").is_some() {
        crate::fault::install_handler()?;
    }
    // The sync signal's handler, installed here, outside the library (a failure is reported
    // when process-wide rights first need the signal).
    if let Ok(sig) = crate::sync::install_handler() {
        r.sync_sig.store(sig, Ordering::Relaxed);
    }
    // Address space for the guarded-call stacks kept for reuse (made usable slot by slot).
    if let Ok(pool) = mman::reserve(
        crate::fault::POOL_SLOTS * crate::fault::POOL_SPAN,
        Prot::NONE,
    ) {
        r.guard_pool.store(pool as usize, Ordering::Release);
    }
    if mpkvirt_sys::thread::FsGsBase::new().is_none() {
        return Err(Error::Unsupported(
            "mpkvirt without FSGSBASE (it needs Linux 5.9 or later on a CPU with RDFSBASE)",
        ));
    }
    let base = mman::reserve(REGION_LEN, Prot::NONE).map_err(|source| Error::Reserve {
        len: REGION_LEN,
        source,
    })? as usize;
    let klib = if mode == MetadataMode::Protected {
        // The calling thread gets the key read-write: it finishes initialisation, and its
        // first gate exit lowers it to read-only.
        let k = pkey_alloc(AccessRights::READ_WRITE).map_err(Error::AllocKeys)?;
        lock(&r.keys)[usize::from(k.index())] = KeyUse::Library;
        r.klib.store(u32::from(k.index()), Ordering::Relaxed);
        r.managed_mask
            .fetch_or(Pkru::key_mask(k), Ordering::Relaxed);
        Some(k)
    } else {
        None
    };
    r.mode.store(
        match mode {
            MetadataMode::Protected => 0,
            MetadataMode::GateOnly => 1,
            MetadataMode::Cooperative => 2,
        },
        Ordering::Relaxed,
    );
    {
        let mut heap = lock(&r.heap);
        heap.bump = base;
        heap.committed = base;
        heap.end = base + REGION_LEN;
    }
    r.region[0].store(base, Ordering::Relaxed);
    r.region[1].store(base + REGION_LEN, Ordering::Relaxed);
    APP_REGION[0].store(base, Ordering::Relaxed);
    APP_REGION[1].store(base + REGION_LEN, Ordering::Relaxed);
    if mode == MetadataMode::Protected
        && let Some(pku) = mpkvirt_sys::Pku::new()
    {
        let open = mpkvirt_sys::signal::frames_written_with_keys_open(pku);
        r.seal_key0.store(open, Ordering::Relaxed);
        if open {
            mpkvirt_deny_key0
                .0
                .store(AccessRights::DISABLE_WRITE.bits(), Ordering::Relaxed);
        }
        let page = (&raw const mpkvirt_deny_key0).cast_mut().cast::<u8>();
        // SAFETY: the page of `mpkvirt_deny_key0` alone (page-aligned and page-sized), set
        // above and never written again; only the gate reads it.
        unsafe { mman::mprotect(page, size_of::<DenyKey0>(), Prot::READ) }.map_err(|source| {
            Error::Retag {
                addr: page as usize,
                len: size_of::<DenyKey0>(),
                prot: Prot::READ,
                key: Pkey::DEFAULT,
                source,
            }
        })?;
        if let Some(off) = mpkvirt_sys::thread::glibc_rseq_offset() {
            r.rseq_offset.store(off as i64, Ordering::Relaxed);
        }
        SEAL_KEY0_HINT.store(open, Ordering::Relaxed);
    }
    let (_, boot_top) = alloc_stack(BOOT_STACK)?;
    // SAFETY: initialisation is single-threaded (`INIT` is INITIALISING and every other
    // thread waits for READY), and no gate runs before READY, so nothing reads these fields
    // concurrently.
    unsafe {
        let g = &mut *r.gate.get();
        g.lib_pkru = Pkru::ALLOW_ALL.bits();
        g.deny_pkru = Pkru::LINUX_INIT.bits();
        g.boot_stack_top = boot_top as u64;
    }
    if let Some(k) = klib {
        let start = (&raw const mpkvirt_gate_root) as *mut u8;
        // SAFETY: the root is a page-aligned static whose size is a multiple of the page size
        // (align(4096) and Rust's size rounding), so these pages hold nothing else; they stay
        // readable and writable, now under the library key.
        unsafe { pkey_mprotect(start, size_of::<Root>(), Prot::READ_WRITE, k) }.map_err(
            |source| Error::Retag {
                addr: start as usize,
                len: size_of::<Root>(),
                prot: Prot::READ_WRITE,
                key: k,
                source,
            },
        )?;
    }
    Ok(mode)
}

/// Commits the region up to `upto` (rounded to the commit granule). Called with the heap
/// lock held.
fn commit(heap: &mut Heap, upto: usize) -> Result<()> {
    if upto <= heap.committed {
        return Ok(());
    }
    let new_end = upto.next_multiple_of(COMMIT).min(heap.end);
    if new_end < upto {
        return Err(Error::Reserve {
            len: upto - heap.committed,
            source: mpkvirt_sys::Error::Sys {
                op: mpkvirt_sys::Op::Mmap,
                errno: mpkvirt_sys::Errno(libc::ENOMEM),
            },
        });
    }
    let (start, len) = (heap.committed, new_end - heap.committed);
    let key = root().library_key().unwrap_or(Pkey::DEFAULT);
    // SAFETY: `[start, start + len)` is the next uncommitted part of the region this module
    // reserved; nothing refers to it yet. It becomes readable and writable under the library
    // key (or key 0 without protection).
    unsafe { pkey_or_mprotect(start as *mut u8, len, Prot::READ_WRITE, key) }.map_err(
        |source| Error::Retag {
            addr: start,
            len,
            prot: Prot::READ_WRITE,
            key,
            source,
        },
    )?;
    heap.committed = new_end;
    Ok(())
}

/// `pkey_mprotect`, or plain `mprotect` for key 0 (which works without PKU).
///
/// # Safety
///
/// As for `pkey_mprotect`: the caller owns the range.
unsafe fn pkey_or_mprotect(
    addr: *mut u8,
    len: usize,
    prot: Prot,
    key: Pkey,
) -> mpkvirt_sys::Result<()> {
    if key == Pkey::DEFAULT {
        // SAFETY: forwarded from this function's contract.
        unsafe { mman::mprotect(addr, len, prot) }
    } else {
        // SAFETY: forwarded from this function's contract.
        unsafe { pkey_mprotect(addr, len, prot, key) }
    }
}

/// Bump-allocates `len` bytes aligned to `align` from the region (committing as needed).
fn grab(heap: &mut Heap, len: usize, align: usize) -> Result<usize> {
    let start = heap.bump.next_multiple_of(align);
    let end = start
        .checked_add(len)
        .filter(|&e| e <= heap.end)
        .ok_or(Error::Unsupported("the metadata region is exhausted"))?;
    commit(heap, end)?;
    heap.bump = end;
    Ok(start)
}

/// A stack in the region: `len` usable bytes above one inaccessible guard page. Returns
/// `(guard page start, top)`; the top is 16-byte aligned.
pub(crate) fn alloc_stack(len: usize) -> Result<(usize, usize)> {
    let page = mman::page_size();
    let len = mman::page_round_up(len);
    let mut heap = lock(&root().heap);
    let guard = grab(&mut heap, len + page, page)?;
    let key = root().library_key().unwrap_or(Pkey::DEFAULT);
    // SAFETY: the guard page was just carved from the committed region and nothing refers
    // to it; it becomes inaccessible (a stack overflow then faults instead of running into
    // other metadata).
    unsafe { pkey_or_mprotect(guard as *mut u8, page, Prot::NONE, key) }.map_err(|source| {
        Error::Retag {
            addr: guard,
            len: page,
            prot: Prot::NONE,
            key,
            source,
        }
    })?;
    Ok((guard, guard + page + len))
}

/// Whether `addr` lies in the library's memory: its root or its metadata region (for checks
/// and tests).
pub fn is_metadata(addr: usize) -> bool {
    let root_start = (&raw const mpkvirt_gate_root) as usize;
    (root_start..root_start + size_of::<Root>()).contains(&addr)
        || (APP_REGION[0].load(Ordering::Relaxed)..APP_REGION[1].load(Ordering::Relaxed))
            .contains(&addr)
}

/// Whether `[start, end)` overlaps the library's memory: the root static or the metadata
/// region (library code; bounds from library memory only). Four compares.
#[inline]
pub(crate) fn overlaps_library(start: usize, end: usize) -> bool {
    let r = root();
    let root_start = (&raw const mpkvirt_gate_root) as usize;
    let root_end = root_start + size_of::<Root>();
    let (lo, hi) = (
        r.region[0].load(Ordering::Relaxed),
        r.region[1].load(Ordering::Relaxed),
    );
    (start < root_end && root_start < end) || (start < hi && lo < end)
}

/// The root static's address and size, the region's bounds (`(0, 0)` before [`init`]) and
/// the library key (feature `testing`: for tests that attack library memory). Reads only;
/// the key is read from the root, so the calling thread must have used the library.
#[cfg(feature = "testing")]
pub(crate) fn layout_for_tests() -> ((usize, usize), (usize, usize), Option<Pkey>) {
    let root_start = (&raw const mpkvirt_gate_root) as usize;
    (
        (root_start, size_of::<Root>()),
        (
            APP_REGION[0].load(Ordering::Relaxed),
            APP_REGION[1].load(Ordering::Relaxed),
        ),
        root().library_key(),
    )
}

/// Size class of a layout: log2 of the block size.
fn class_of(layout: Layout) -> Option<u32> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS);
    let class = size.checked_next_power_of_two()?.trailing_zeros();
    (class <= MAX_CLASS).then_some(class)
}

/// The allocator of library metadata (a handle to the process's one region).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Meta;

// SAFETY: blocks come from the region, are aligned to their power-of-two size class (which
// is at least the layout's size and alignment), stay valid until deallocated, and are handed
// out to one owner at a time (free lists and the bump pointer are changed under one lock).
unsafe impl Allocator for Meta {
    fn allocate(&self, layout: Layout) -> std::result::Result<NonNull<[u8]>, AllocError> {
        let class = class_of(layout).ok_or(AllocError)?;
        let size = 1usize << class;
        let idx = (class - MIN_CLASS) as usize;
        let mut heap = lock(&root().heap);
        if heap.end == 0 {
            return Err(AllocError);
        }
        let block = match heap.free[idx] {
            0 => {
                if size < SLAB {
                    let slab =
                        grab(&mut heap, SLAB, SLAB.min(4096).max(size)).map_err(|_| AllocError)?;
                    // Thread the rest of the slab onto the free list, lowest first.
                    let mut next = 0;
                    for b in (1..SLAB / size).rev() {
                        let p = slab + b * size;
                        // SAFETY: `p` is inside the slab just carved from the committed
                        // region, owned by the allocator, aligned to `size` (>= 16).
                        unsafe { (p as *mut usize).write(next) };
                        next = p;
                    }
                    heap.free[idx] = next;
                    slab
                } else {
                    grab(&mut heap, size, size).map_err(|_| AllocError)?
                }
            }
            head => {
                // SAFETY: `head` is a freed block of this class: its first word holds the
                // next link, written by `deallocate` or the refill above.
                heap.free[idx] = unsafe { (head as *const usize).read() };
                head
            }
        };
        drop(heap);
        let ptr = NonNull::new(block as *mut u8).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(ptr, size))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        let Some(class) = class_of(layout) else {
            return;
        };
        let size = 1usize << class;
        if size >= SLAB {
            // SAFETY: the caller gives the block back: no one refers to its contents, which
            // become zero pages (the block stays committed and in the region).
            let _ = unsafe { mman::madvise_dontneed(ptr.as_ptr(), size) };
        }
        let idx = (class - MIN_CLASS) as usize;
        let mut heap = lock(&root().heap);
        // SAFETY: the caller owned this block (allocated here with the same layout, hence the
        // same class) and gives it back; its first word becomes the free-list link.
        unsafe { ptr.as_ptr().cast::<usize>().write(heap.free[idx]) };
        heap.free[idx] = ptr.as_ptr() as usize;
    }
}

/// A `Vec` of library metadata.
pub(crate) type MVec<T> = allocator_api2::vec::Vec<T, Meta>;
/// A `Box` of library metadata.
pub(crate) type MBox<T> = allocator_api2::boxed::Box<T, Meta>;
/// A hash map of library metadata.
pub(crate) type MMap<K, V> = hashbrown::HashMap<K, V, hashbrown::DefaultHashBuilder, Meta>;

/// An empty metadata map.
pub(crate) fn mmap<K, V>() -> MMap<K, V> {
    hashbrown::HashMap::with_hasher_in(hashbrown::DefaultHashBuilder::default(), Meta)
}
