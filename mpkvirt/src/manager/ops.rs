//! The manager's ops, inside the library: their plain-data inputs, validation of the names
//! they carry, and dispatch to binding, views and lifecycle.
//!
//! # Safety
//!
//! Managers live in the metadata region as raw allocations named by registry slots; this file
//! turns a validated registry entry back into a reference (`shared`), allocates and frees the
//! per-thread contexts (`ThreadCx`) that thread records point to, and hands `serve` the
//! caller's argument block. Each reference is used only while the object is known to live:
//! a manager is freed only after every thread's op on it has finished (`active_mgr`), a cx
//! only by its own thread after unlisting it under the manager's lock.
#![allow(
    unsafe_code,
    reason = "managers and thread contexts as raw metadata allocations"
)]

use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mpkvirt_sys::Pkey;
use mpkvirt_sys::mman::Prot;

use crate::backend::RawFault;
use crate::backend::sealed::{LiveOps, Spec};
use crate::backend::{Backend, BackendKind, Emulated, Hardware, Machine, Simulated};
use crate::config::{Config, Mode};
use crate::domain::DomainId;
use crate::error::{Error, Result};
use crate::gate::{NO_MGR, ThreadRecord};
use crate::meta::{MAX_MANAGERS, MBox, MVec, Meta, lock, read_rw, root};
use crate::ops::{Args, Pod, STATUS_BAD_CALL};
use crate::policy::{Policy, PolicyKind};

use super::Rights;
use super::binding::{self, Bound};
use super::global;
use super::lifecycle::{self, DomInfo};
use super::shared::{DomRef, MgrRef, Shared, ThreadCx};
use super::views::{self, ViewItem};

pub(crate) const M_CREATE: u64 = 1;
pub(crate) const M_RELEASE: u64 = 2;
pub(crate) const M_STATS: u64 = 3;
pub(crate) const M_THREAD_STATS: u64 = 4;
pub(crate) const M_PKRU: u64 = 5;
pub(crate) const D_CREATE: u64 = 10;
pub(crate) const D_DESTROY: u64 = 11;
pub(crate) const D_ALLOC: u64 = 12;
pub(crate) const D_ALLOC_PAGES: u64 = 13;
pub(crate) const D_FREE: u64 = 14;
pub(crate) const D_IN_USE: u64 = 15;
pub(crate) const D_PROTECT: u64 = 16;
pub(crate) const D_RESET: u64 = 17;
pub(crate) const D_MAP_FD: u64 = 18;
pub(crate) const D_INFO: u64 = 19;
pub(crate) const D_AT: u64 = 20;
pub(crate) const D_PROCESS_WIDE: u64 = 21;
pub(crate) const V_ENTER: u64 = 30;
pub(crate) const V_LEAVE: u64 = 31;
pub(crate) const V_HINT: u64 = 32;
pub(crate) const V_PREFETCH: u64 = 33;
pub(crate) const ACCESS: u64 = 34;
pub(crate) const S_RUN: u64 = 40;

/// The op code of `op` for managers of type `B`.
pub(crate) fn code<B: Backend>(op: u64) -> u64 {
    op | (u64::from(B::TAG) << 16)
}

// SAFETY: integers only.
unsafe impl Pod for MgrRef {}
// SAFETY: integers only.
unsafe impl Pod for DomRef {}

/// A backend specification as plain data.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct SpecPod {
    /// `BackendKind::tag` (for `Machine`: of the variant).
    pub(crate) kind: u32,
    pub(crate) keys: u32,
}
// SAFETY: integers only.
unsafe impl Pod for SpecPod {}

/// A `Config` as plain data.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct ConfigPod {
    pub(crate) mode: u32,
    pub(crate) policy: u32,
    pub(crate) max_keys: u64,
    pub(crate) arena_chunk: u64,
    pub(crate) default_reserve: u64,
    pub(crate) pin_wait_secs: u64,
    pub(crate) pin_wait_nanos: u32,
    pub(crate) _pad: u32,
}
// SAFETY: integers only.
unsafe impl Pod for ConfigPod {}

impl ConfigPod {
    pub(crate) fn of(c: &Config) -> ConfigPod {
        ConfigPod {
            mode: match c.mode {
                Mode::Auto => 0,
                Mode::Hardware => 1,
                Mode::Emulated => 2,
            },
            policy: match c.policy {
                PolicyKind::Lru => 0,
                PolicyKind::Hinted => 1,
                PolicyKind::Opt => 2,
            },
            max_keys: c.max_keys as u64,
            arena_chunk: c.arena_chunk as u64,
            default_reserve: c.default_reserve as u64,
            pin_wait_secs: c.pin_wait.as_secs(),
            pin_wait_nanos: c.pin_wait.subsec_nanos(),
            _pad: 0,
        }
    }

    /// The configuration, validated (inside the library).
    fn config(self) -> Result<Config> {
        let policy = match self.policy {
            0 => PolicyKind::Lru,
            1 => PolicyKind::Hinted,
            2 => PolicyKind::Opt,
            _ => return Err(Error::InvalidConfig("policy")),
        };
        let mode = match self.mode {
            0 => Mode::Auto,
            1 => Mode::Hardware,
            2 => Mode::Emulated,
            _ => return Err(Error::InvalidConfig("mode")),
        };
        if !(1..=15).contains(&self.max_keys) {
            return Err(Error::InvalidConfig("max_keys must be 1 to 15"));
        }
        if self.arena_chunk == 0 || self.arena_chunk > 1 << 46 {
            return Err(Error::InvalidConfig("arena_chunk must be 1 byte to 64 TiB"));
        }
        if self.default_reserve == 0 || self.default_reserve > 1 << 46 {
            return Err(Error::InvalidConfig(
                "default_reserve must be 1 byte to 64 TiB",
            ));
        }
        if self.pin_wait_nanos >= 1_000_000_000 {
            return Err(Error::InvalidConfig("pin_wait"));
        }
        Ok(Config {
            mode,
            max_keys: self.max_keys as usize,
            policy,
            arena_chunk: self.arena_chunk as usize,
            default_reserve: self.default_reserve as usize,
            pin_wait: Duration::new(self.pin_wait_secs, self.pin_wait_nanos),
        })
    }
}

/// What a new manager is, for its handle.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MgrInfo {
    pub(crate) m: MgrRef,
    /// Where the manager's state lives (for the direct path of cooperative mode only).
    pub(crate) ptr: usize,
    pub(crate) keys: [Pkey; 16],
    pub(crate) nkeys: usize,
    pub(crate) kind: BackendKind,
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct CreateIn {
    pub(crate) spec: SpecPod,
    pub(crate) config: ConfigPod,
}
// SAFETY: integers only.
unsafe impl Pod for CreateIn {}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct DomIn {
    pub(crate) m: MgrRef,
    pub(crate) d: DomRef,
    pub(crate) a: u64,
    pub(crate) b: u64,
    pub(crate) c: u64,
}
// SAFETY: integers only.
unsafe impl Pod for DomIn {}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct MgrIn {
    pub(crate) m: MgrRef,
    pub(crate) a: u64,
    pub(crate) b: u64,
}
// SAFETY: integers only.
unsafe impl Pod for MgrIn {}

/// A view as plain data: `n` (up to 16) domains at `doms` in the caller's memory (read one
/// element at a time, like hint lists), bit k of `ro` for read-only.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct EnterIn {
    pub(crate) m: MgrRef,
    pub(crate) n: u32,
    pub(crate) ro: u32,
    pub(crate) doms: u64,
}
// SAFETY: integers only.
unsafe impl Pod for EnterIn {}

/// A list of domains in the caller's memory (hints): address and length, read one element at
/// a time.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct ListIn {
    pub(crate) m: MgrRef,
    pub(crate) ptr: u64,
    pub(crate) len: u64,
}
// SAFETY: integers only.
unsafe impl Pod for ListIn {}

/// The state of the manager `m`, if `m` names a live manager of type `B`.
fn shared<'a, B: Backend>(m: MgrRef) -> Option<&'a Shared<B>> {
    let p = root().lookup(m.idx, m.uid, B::TAG)?;
    // SAFETY: the registry maps a live (slot, uid) of tag `B::TAG` to the `Shared<B>` made by
    // `create`; it is freed only after the slot is cleared and every thread's op on it ended
    // (`release`), and the calling thread announced its op (`active_mgr`) before this lookup.
    let sh = unsafe { &*p.as_ptr().cast::<Shared<B>>() };
    (!sh.dying.load(Ordering::Acquire)).then_some(sh)
}

/// A cx pointer from a thread record or a manager's list, as a reference.
pub(crate) fn cx_ref<'a>(p: *const ThreadCx) -> &'a ThreadCx {
    // SAFETY: cx pointers are made by `cx_of` from `MBox::into_raw` and freed only by their
    // own thread after it unlisted them under the manager's lock (which the callers of this
    // hold, or they are that thread).
    unsafe { &*p }
}

/// The calling thread's cx for `sh` (made on first use).
fn cx_of<'a, B: Backend>(sh: &Shared<B>, rec: &mut ThreadRecord) -> Result<&'a mut ThreadCx> {
    let idx = sh.slot_idx as usize;
    if rec.cxs.len() <= idx {
        rec.cxs
            .try_reserve(idx + 1 - rec.cxs.len())
            .map_err(|_| Error::Unsupported("a thread context (metadata exhausted)"))?;
        rec.cxs.resize(idx + 1, None);
    }
    if let Some(p) = rec.cxs[idx] {
        // SAFETY: the thread's own cx (see `cx_ref`); the record is the thread's.
        let cx = unsafe { &mut *p.as_ptr() };
        if cx.mgr_uid == sh.uid {
            return Ok(cx);
        }
        // A cx of a manager that is gone (its slot reused): it is listed nowhere any more —
        // unless that manager's release is still in progress (see `thread_exit`): then the
        // cx stays allocated.
        rec.cxs[idx] = None;
        if root().releasing.load(Ordering::SeqCst) == 0 {
            // SAFETY: made by `MBox::into_raw` below, unlisted (its manager is gone and no
            // release that could still read it is in progress), ours.
            drop(unsafe { MBox::from_raw_in(p.as_ptr(), Meta) });
        }
    }
    let cx = MBox::into_raw(MBox::new_in(ThreadCx::new(sh.uid), Meta));
    {
        // Registered with evictors from the start (pruned again once idle), so the thread's
        // first views take the hit path.
        let mut inner = lock(&sh.inner);
        if inner.threads.try_reserve(1).is_ok() {
            inner.threads.push(cx);
            // SAFETY: just made; not yet shared with any other thread.
            unsafe { &*cx }.registered.set();
        }
    }
    rec.cxs[idx] = NonNull::new(cx);
    // SAFETY: just made; the thread's own.
    Ok(unsafe { &mut *cx })
}

/// Runs manager op `code` for managers of type `B`.
pub(crate) fn run<B: Backend>(code: u64, args: Args, rec: &mut ThreadRecord) -> u64 {
    match code {
        M_CREATE => args.serve(rec, |rec, i: CreateIn| {
            rec.unconfined("creating a manager")?;
            create::<B>(i)
        }),
        M_RELEASE => args.serve(rec, |rec, m: MgrRef| {
            rec.unconfined("dropping a manager ends every domain of it")?;
            release::<B>(rec, m)
        }),
        _ => {
            // Every other op names a manager first: announce it (the manager is not torn down
            // while an op is on it), then look it up.
            let status = on_manager::<B>(code, args, rec);
            rec.active_mgr.store(NO_MGR, Ordering::Release);
            status
        }
    }
}

fn with_mgr<'a, B: Backend>(rec: &mut ThreadRecord, m: MgrRef) -> Result<&'a Shared<B>> {
    // Dekker with `release`: announce, fence, look up; `release` unpublishes, fences (the
    // heavy half), then looks at the announcements.
    rec.active_mgr.store(m.idx, Ordering::Relaxed);
    crate::keycache::light_fence(binding::process_fence());
    shared::<B>(m).ok_or(Error::Unsupported("a manager that no longer exists"))
}

fn on_manager<B: Backend>(code: u64, args: Args, rec: &mut ThreadRecord) -> u64 {
    {
        match code {
            M_STATS => args.serve(rec, |rec, m: MgrRef| {
                let sh = with_mgr::<B>(rec, m)?;
                let inner = lock(&sh.inner);
                let mut stats = inner.stats;
                stats.watched_threads = inner.threads.len() as u64;
                stats.policy_entries = inner.policy.remembered() as u64;
                Ok(stats)
            }),
            M_THREAD_STATS => args.serve(rec, |rec, m: MgrRef| {
                let sh = with_mgr::<B>(rec, m)?;
                Ok(cx_of(sh, rec)?.stats)
            }),
            M_PKRU => args.serve(rec, |rec, m: MgrRef| {
                let sh = with_mgr::<B>(rec, m)?;
                let cx = cx_of(sh, rec)?;
                let regs = sh.regs(cx, &mut rec.gate.pkru);
                Ok(sh.live.read_pkru(&regs))
            }),
            D_CREATE => args.serve(rec, |rec, i: DomIn| -> Result<DomInfo> {
                let sh = with_mgr::<B>(rec, i.m)?;
                let reserve = (i.a != 0).then(|| usize::try_from(i.b).unwrap_or(usize::MAX));
                let prot = Prot::from_bits(i.c as i32).ok_or(Error::InvalidConfig("prot"))?;
                let info = lifecycle::create(sh, reserve, prot)?;
                // A confined thread may name what it creates.
                if let Err(e) = rec.admit(info.d.uid) {
                    lifecycle::destroy(sh, info.d);
                    return Err(e);
                }
                Ok(info)
            }),
            D_DESTROY => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                // Process-wide rights go first (every thread drops them); the key could not be
                // handed on otherwise.
                let cx = cx_of(sh, rec)?;
                let _ = global::set(sh, rec, cx, i.d, None);
                lifecycle::destroy(sh, i.d);
                Ok(())
            }),
            D_PROCESS_WIDE => args.serve(rec, |rec, i: DomIn| {
                rec.unconfined("process-wide rights act on every thread")?;
                let sh = with_mgr::<B>(rec, i.m)?;
                let rights = match i.a {
                    0 => None,
                    1 => Some(Rights::ReadOnly),
                    2 => Some(Rights::ReadWrite),
                    _ => return Err(Error::InvalidConfig("rights")),
                };
                let cx = cx_of(sh, rec)?;
                global::set(sh, rec, cx, i.d, rights)
            }),
            D_ALLOC => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                lifecycle::alloc(sh, i.d, i.a as usize, i.b as usize)
            }),
            D_ALLOC_PAGES => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                lifecycle::alloc_pages(sh, i.d, i.a as usize)
            }),
            D_FREE => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                lifecycle::free(sh, i.d, i.a as usize)
            }),
            D_IN_USE => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                lifecycle::in_use(sh, i.d)
            }),
            D_PROTECT => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                let prot = Prot::from_bits(i.a as i32).ok_or(Error::InvalidConfig("prot"))?;
                lifecycle::protect(sh, i.d, prot)
            }),
            D_RESET => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                lifecycle::reset(sh, i.d)
            }),
            D_MAP_FD => args.serve(rec, |rec, i: DomIn| {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                lifecycle::map_fd(sh, i.d, i.a as i32, i.b, i.c as usize)
            }),
            D_INFO => args.serve(rec, |rec, i: DomIn| -> Result<(Option<Pkey>, Prot)> {
                rec.may_name(i.d.uid)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                let r = sh
                    .domain(i.d)
                    .ok_or(Error::ForeignDomain(DomainId(i.d.uid)))?;
                Ok((r.slot.get().map(|s| sh.key(s)), r.prot()))
            }),
            D_AT => args.serve(rec, |rec, i: MgrIn| {
                let sh = with_mgr::<B>(rec, i.m)?;
                // A confined thread learns nothing of domains outside its set.
                Ok(lifecycle::domain_at(sh, i.a as usize).filter(|d| rec.names(d.get())))
            }),
            V_ENTER => args.serve(rec, |rec, i: EnterIn| -> Result<u64> {
                // The list is checked and read before the manager is announced: checking a
                // range in domain memory announces other managers in turn
                // (`caller_domain_grants`).
                let n = (i.n as usize).min(16);
                let base = i.doms as *const DomRef;
                if n > 0
                    && (base.is_null()
                        || !base.is_aligned()
                        || !crate::ops::caller_may_access(
                            rec,
                            base as usize,
                            n * size_of::<DomRef>(),
                            false,
                        ))
                {
                    return Err(Error::InvalidConfig("view address"));
                }
                let mut view = [ViewItem {
                    d: DomRef::default(),
                    read_only: false,
                }; 16];
                for (k, v) in view[..n].iter_mut().enumerate() {
                    // SAFETY: the caller passes `n` DomRefs at `base`: checked for null,
                    // alignment and that the thread may read them itself (`caller_may_access`:
                    // not library memory, no domain outside its view; an unmapped address
                    // faults in the library, see `ops`); each is read once, and any bits are
                    // a valid DomRef.
                    let d = unsafe { std::ptr::read_volatile(base.wrapping_add(k)) };
                    *v = ViewItem {
                        d,
                        read_only: i.ro & (1 << k) != 0,
                    };
                }
                let sh = with_mgr::<B>(rec, i.m)?;
                if i.n as usize > sh.nkeys {
                    return Err(Error::ViewTooLarge {
                        domains: i.n as usize,
                        keys: sh.nkeys,
                    });
                }
                let cx = cx_of(sh, rec)?;
                views::enter(sh, rec, cx, &view[..n]).map(|t| t.id)
            }),
            V_LEAVE => args.serve(rec, |rec, i: MgrIn| {
                let sh = with_mgr::<B>(rec, i.m)?;
                let cx = cx_of(sh, rec)?;
                views::leave(sh, rec, cx, i.a)
            }),
            V_HINT => args.serve(rec, |rec, i: ListIn| {
                rec.unconfined("hints steer the key cache of every thread")?;
                // Checked before the manager is announced (see V_ENTER).
                let list = list_of(rec, i)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                let uids = read_list(sh, list)?;
                lock(&sh.inner).policy.hint(&uids);
                Ok(())
            }),
            V_PREFETCH => args.serve(rec, |rec, i: ListIn| {
                rec.unconfined("hints steer the key cache of every thread")?;
                // Checked before the manager is announced (see V_ENTER).
                let list = list_of(rec, i)?;
                let sh = with_mgr::<B>(rec, i.m)?;
                let me: *const ThreadCx = cx_of(sh, rec)?;
                prefetch(sh, me, list)
            }),
            ACCESS => args.serve(rec, |rec, i: MgrIn| -> Result<Access> {
                let sh = with_mgr::<B>(rec, i.m)?;
                let addr = i.a as usize;
                // (A confined thread learns nothing of domains outside its set.)
                let at = lifecycle::domain_at(sh, addr).filter(|d| rec.names(d.get()));
                // Only live domains' memory: a destroyed domain's range is parked (or reused).
                if !sh.live.owns(addr, 1) || lifecycle::domain_at(sh, addr).is_none() {
                    return Ok(Access::NotOwned(at));
                }
                let write = (i.b >> 8 != 0).then_some(i.b as u8);
                let cx = cx_of(sh, rec)?;
                let pkru = {
                    let regs = sh.regs(cx, &mut rec.gate.pkru);
                    sh.live.read_pkru(&regs)
                };
                // The model's threads have the process-wide rights too.
                let pkru = global::with_globals(sh, pkru);
                Ok(match sh.live.model_access(pkru, addr, write) {
                    Some(Ok(v)) => Access::Done(v),
                    Some(Err(f)) => Access::Faulted(f, at),
                    None => Access::Probe,
                })
            }),
            // The block is read before the manager is announced (see V_ENTER).
            S_RUN => crate::sandbox::serve_run(args, rec, |rec, i| {
                let sh = with_mgr::<B>(rec, i.m)?;
                let r = sh
                    .domain(i.d)
                    .ok_or(Error::ForeignDomain(DomainId(i.d.uid)))?;
                let (base, end) = (r.base() as u64, (r.base() + r.len()) as u64);
                // The first frame (9 words) and the exit stack (the abort stub's frames and a
                // gate call, with room to spare) lie inside the domain.
                if i.sp < base
                    || i.sp.saturating_add(72) > end
                    || i.exit_sp < base + 1024
                    || i.exit_sp > end
                {
                    return Err(Error::InvalidConfig("a sandbox stack outside its domain"));
                }
                let cx = cx_of(sh, rec)?;
                let mark = rec.view_seq;
                views::enter(
                    sh,
                    rec,
                    cx,
                    &[ViewItem {
                        d: i.d,
                        read_only: false,
                    }],
                )?;
                if sh.hardware && i.shared == 0 {
                    // The view's bits cover this manager's keys only, merged with the rights
                    // the thread had (other managers' views, process-wide grants — a host's
                    // own domain among them). A sandbox gets none of those: every key but key
                    // 0, the library's and the domain's denies. (The pinned view keeps the
                    // slot; the yield recomputes the thread's rights: `sandbox::yield_op`.)
                    let own = r.slot.get().map(|s| sh.key(s));
                    rec.gate.pkru = crate::sandbox::sealed_pkru(rec.gate.pkru, own);
                }
                Ok((mark, base, end))
            }),
            _ => STATUS_BAD_CALL,
        }
    }
}

/// What the `ACCESS` op found.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Access {
    /// Not memory of this manager (the domain that has the address, if any, for the report).
    NotOwned(Option<DomainId>),
    /// The model's answer (simulated backend).
    Done(u8),
    /// The model's fault, and the domain it hit.
    Faulted(RawFault, Option<DomainId>),
    /// Real memory: the caller makes the access itself.
    Probe,
}

/// The list of `i` (at most 2^20 elements are read): its address and the number of elements,
/// checked for null, alignment and that the calling thread may read it itself
/// (`ops::caller_may_access`).
fn list_of(rec: &mut ThreadRecord, i: ListIn) -> Result<(*const DomRef, usize)> {
    let len = usize::try_from(i.len).map_err(|_| Error::InvalidConfig("list length"))?;
    let len = len.min(1 << 20);
    let base = i.ptr as *const DomRef;
    if len > 0
        && (base.is_null()
            || !base.is_aligned()
            || !crate::ops::caller_may_access(rec, base as usize, len * size_of::<DomRef>(), false))
    {
        return Err(Error::InvalidConfig("list address"));
    }
    Ok((base, len))
}

/// Reads a list of domains from the caller's memory (checked by [`list_of`]), one element at
/// a time, keeping those of this manager (their uids).
fn read_list<B: Backend>(sh: &Shared<B>, (base, len): (*const DomRef, usize)) -> Result<MVec<u64>> {
    let mut uids = MVec::new_in(Meta);
    uids.try_reserve(len)
        .map_err(|_| Error::Unsupported("a hint list (metadata exhausted)"))?;
    for k in 0..len {
        // SAFETY: the caller passes an array of `len` DomRefs, checked by `list_of` (null,
        // alignment, readable by the thread itself); each element is read once, and any bits
        // are a valid DomRef.
        let d = unsafe { std::ptr::read_volatile(base.wrapping_add(k)) };
        if sh.domain(d).is_some() {
            uids.push(d.uid);
        }
    }
    Ok(uids)
}

/// The slow half of `ops::caller_may_access`: `[addr, end)` touches an arena granule. Whether
/// it lies entirely in one live domain of a real backend, bound to a key for which the
/// calling thread's legitimate rights allow the access. Every registered manager is asked in
/// turn (announced like an op on it, so it is not torn down meanwhile); the thread's own
/// announcement is restored afterwards. Call it only while the thread holds no reference to a
/// manager (before an op looked its manager up, or after it finished): for that moment the
/// op's own manager is not announced.
pub(crate) fn caller_domain_grants(
    rec: &mut ThreadRecord,
    addr: usize,
    end: usize,
    write: bool,
) -> bool {
    let saved = rec.active_mgr.load(Ordering::Relaxed);
    let high = root().slots_high.load(Ordering::Acquire).min(MAX_MANAGERS);
    let mut verdict = None;
    for idx in 0..high {
        let slot = &root().managers[idx];
        let uid = slot.uid.load(Ordering::Acquire);
        if uid == 0 {
            continue;
        }
        let m = MgrRef {
            idx: idx as u32,
            uid,
        };
        verdict = match slot.kind.load(Ordering::Relaxed) {
            // Simulated managers own no real memory: their addresses are a model's.
            Emulated::TAG => grants_in::<Emulated>(rec, m, addr, end, write),
            Hardware::TAG => grants_in::<Hardware>(rec, m, addr, end, write),
            Machine::TAG => grants_in::<Machine>(rec, m, addr, end, write),
            _ => None,
        };
        if verdict.is_some() {
            break;
        }
    }
    rec.active_mgr.store(saved, Ordering::Release);
    verdict.unwrap_or(false)
}

/// [`caller_domain_grants`] for manager `m`: `None` when no live domain of it holds `addr`.
fn grants_in<B: Backend>(
    rec: &mut ThreadRecord,
    m: MgrRef,
    addr: usize,
    end: usize,
    write: bool,
) -> Option<bool> {
    let sh = with_mgr::<B>(rec, m).ok()?;
    let (start, len, uid) = read_rw(&sh.ranges).floor(addr)?;
    if addr - start >= len {
        return None;
    }
    if end - start > len {
        return Some(false); // runs past the domain
    }
    // The key the domain's pages carry. Stable while the thread's rights grant it: a key is
    // re-bound only when no thread's PKRU grants it (invariant 2), and this thread's own op
    // does not run meanwhile.
    let slot = {
        let inner = lock(&sh.inner);
        (0..sh.nkeys).find(|&s| inner.bound[s].is_some_and(|d| d.uid == uid))
    };
    let Some(slot) = slot else {
        return Some(false); // parked: no access at all
    };
    // The thread's rights for this manager's keys, from library state only: the record's
    // PKRU (hardware keys) or its view of the manager (emulated), and process-wide rights.
    let own = match rec.cxs.get(m.idx as usize).copied().flatten() {
        Some(p) if cx_ref(p.as_ptr()).mgr_uid == m.uid => {
            // SAFETY: the thread's own cx (see `cx_ref`), used by this thread alone.
            let cx = unsafe { &mut *p.as_ptr() };
            let regs = sh.regs(cx, &mut rec.gate.pkru);
            sh.live.read_pkru(&regs)
        }
        _ if sh.hardware => mpkvirt_sys::Pkru::from_bits(rec.gate.pkru),
        _ => mpkvirt_sys::Pkru::DENY_ALL,
    };
    let rights = global::with_globals(sh, own).rights(sh.key(slot));
    Some(if write {
        rights.can_write()
    } else {
        rights.can_read()
    })
}

/// Binds keys for the listed domains ahead of use (see `Manager::prefetch`).
fn prefetch<B: Backend>(
    sh: &Shared<B>,
    me: *const ThreadCx,
    (base, len): (*const DomRef, usize),
) -> Result<usize> {
    let uids = read_list(sh, (base, len))?;
    let mut inner = lock(&sh.inner);
    binding::sweep_uses(sh, &mut inner);
    inner.policy.hint(&uids);
    let mut bound = 0;
    for k in 0..len {
        // SAFETY: as in `read_list` (the caller checked the list with `list_of`).
        let d = unsafe { std::ptr::read_volatile(base.wrapping_add(k)) };
        let Some(r) = sh.domain(d) else {
            continue;
        };
        if r.slot.get().is_some() {
            continue;
        }
        match binding::bind(sh, &mut inner, me, d, r, 0, |uid| !uids.contains(&uid))? {
            Bound::Slot(_) => {
                bound += 1;
                inner.stats.prefetched += 1;
            }
            Bound::Busy => break,
        }
    }
    Ok(bound)
}

/// Builds a manager from a specification (inside the library) and registers it.
fn create<B: Backend>(i: CreateIn) -> Result<MgrInfo> {
    let config = i.config.config()?;
    let spec = B::from_pod(i.spec)?;
    let uid = root().next_uid();
    let sh = Shared::<B>::build(spec, config, uid)?;
    let kind = sh.live.kind();
    let (mask, hardware) = (sh.our_mask, sh.hardware);
    let mut keys = [Pkey::DEFAULT; 16];
    keys[..sh.nkeys].copy_from_slice(sh.keys());
    let nkeys = sh.nkeys;
    let ptr = MBox::into_raw(MBox::new_in(sh, Meta));
    let Some(idx) = root().claim_slot(uid, B::TAG, ptr.cast(), mask, hardware) else {
        // SAFETY: just made, never published.
        let sh = unsafe { MBox::from_raw_in(ptr, Meta) };
        sh.live.release(false);
        drop(sh);
        return Err(Error::Unsupported(
            "more managers alive than the registry holds",
        ));
    };
    // SAFETY: published just now; no op can name it before its handle exists (returned
    // below), and `slot_idx` is written once here.
    unsafe { (*ptr).slot_idx = idx as u32 };
    Ok(MgrInfo {
        ptr: ptr as usize,
        m: MgrRef {
            idx: idx as u32,
            uid,
        },
        keys,
        nkeys,
        kind,
    })
}

/// How much longer than `pin_wait` dropping a manager waits for other threads' ops on it.
const RELEASE_MARGIN: Duration = Duration::from_secs(2);

/// The longest `pin_wait` a manager's drop honours while a thread stays inside an op on it.
const MAX_RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Ends a release's count in `Root::releasing` when the release returns, however it returns.
struct ReleaseInProgress;

impl Drop for ReleaseInProgress {
    fn drop(&mut self) {
        root().releasing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tears manager `m` down (its last handle is gone).
fn release<B: Backend>(rec: &mut ThreadRecord, m: MgrRef) -> Result<()> {
    let Some(p) = root().lookup(m.idx, m.uid, B::TAG) else {
        return Ok(());
    };
    let sh_ptr = p.as_ptr().cast::<Shared<B>>();
    // SAFETY: as in `shared`; this thread is the only one releasing (the slot is cleared
    // below before anything is freed, and later lookups fail).
    let sh = unsafe { &*sh_ptr };
    if sh.dying.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    // Every thread drops the manager's process-wide rights before its keys can go to
    // another manager; a thread that does not leaves them retired.
    let synced = global::revoke_all(sh, rec);
    // Stop new ops, then wait for those in flight on other threads. Counted as a release in
    // progress until the state is freed (or left in place): threads that exit meanwhile keep
    // their cxs, which it may still read (`thread_exit`).
    root().releasing.fetch_add(1, Ordering::SeqCst);
    let _releasing = ReleaseInProgress;
    root().release_slot(m.idx as usize);
    let _ = binding::heavy_fence(sh.fence);
    let me = rec as *const ThreadRecord as usize;
    // A thread that ended inside an op (a signal handler ended it in a wait) keeps
    // `active_mgr` for good: only ops of live threads are waited for, and for no longer than
    // an op can wait for keys, plus a margin.
    // (`pin_wait` may be `Duration::MAX`, "wait for keys forever"; a drop waits no longer
    // than `MAX_RELEASE_WAIT` for a stuck thread.)
    let bound = sh
        .config
        .pin_wait
        .min(MAX_RELEASE_WAIT)
        .saturating_add(RELEASE_MARGIN);
    let mut start = None;
    let mut rounds = 0u32;
    loop {
        if !crate::gate::op_in_flight(m.idx, me) {
            break;
        }
        // (The clock only once some op is in flight: no system call otherwise.)
        if start.get_or_insert_with(std::time::Instant::now).elapsed() >= bound {
            // Freeing state an op may still use is never an option: it stays, unreachable
            // (the registry slot is released), and so do its keys.
            crate::fault::log_line(
                "mpkvirt: manager dropped while a thread is stuck inside an op on it; its state and keys are left in place\n",
            );
            // The stuck op may still read the thread lists: the release stays counted, so
            // threads that exit from now on keep their cxs (see `thread_exit`).
            std::mem::forget(_releasing);
            return Ok(());
        }
        rounds += 1;
        if rounds < 1000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // A view whose guard was forgotten still pins its key, and its thread may still have the
    // rights: such keys must never be handed on.
    let retired = !synced || {
        let inner = lock(&sh.inner);
        inner.tainted != 0
            || inner
                .threads
                .iter()
                .any(|&t| cx_ref(t).pins.pinned_mask() != 0)
    };
    if retired {
        crate::fault::log_line(
            "mpkvirt: manager dropped while views of it are live (forgotten guards); its keys are retired\n",
        );
    }
    // The calling thread's own cx for it goes now; other threads drop theirs lazily.
    if let Some(Some(p)) = rec.cxs.get(m.idx as usize).copied()
        && cx_ref(p.as_ptr()).mgr_uid == m.uid
    {
        rec.cxs[m.idx as usize] = None;
        // SAFETY: this thread's own cx, listed only in the manager being freed.
        drop(unsafe { MBox::from_raw_in(p.as_ptr(), Meta) });
    }
    sh.live.release(retired);
    // SAFETY: made by `create` with `MBox::into_raw`; unpublished above and no op is on it.
    drop(unsafe { MBox::from_raw_in(sh_ptr, Meta) });
    Ok(())
}

/// Thread exit: every manager's views of the thread end (rights revoked, pins released), its
/// cxs are unlisted and freed.
pub(crate) fn thread_exit(rec: &mut ThreadRecord) {
    for idx in 0..rec.cxs.len() {
        let Some(p) = rec.cxs[idx] else {
            continue;
        };
        rec.cxs[idx] = None;
        let uid = cx_ref(p.as_ptr()).mgr_uid;
        let slot = &root().managers[idx];
        let unlisted;
        if slot.uid.load(Ordering::SeqCst) == uid {
            rec.active_mgr.store(idx as u32, Ordering::SeqCst);
            let tag = slot.kind.load(Ordering::Relaxed);
            let m = MgrRef {
                idx: idx as u32,
                uid,
            };
            // SAFETY: the thread's own cx (see `cx_ref`).
            let cx = unsafe { &mut *p.as_ptr() };
            unlisted = match tag {
                Simulated::TAG => end_and_unlist::<Simulated>(rec, m, cx),
                Emulated::TAG => end_and_unlist::<Emulated>(rec, m, cx),
                Hardware::TAG => end_and_unlist::<Hardware>(rec, m, cx),
                Machine::TAG => end_and_unlist::<Machine>(rec, m, cx),
                _ => false,
            };
            rec.active_mgr.store(NO_MGR, Ordering::Release);
        } else {
            // The manager's slot is cleared: its release is over — unless one is still in
            // progress (it may be about to read the cx from its list). The slot was cleared
            // after the release counted itself (SeqCst), so a count of zero read now means
            // that release has ended.
            unlisted = root().releasing.load(Ordering::SeqCst) == 0;
        }
        if unlisted {
            // SAFETY: made by `cx_of`, unlisted above (or its manager is gone), ours.
            drop(unsafe { MBox::from_raw_in(p.as_ptr(), Meta) });
        }
        // Otherwise the cx stays allocated (a few hundred bytes, only when a thread exits
        // while a manager it used is being dropped): freeing it could pull it from under the
        // release.
    }
}

/// Ends the thread's views of manager `m` and takes its cx off the manager's lists; `false`
/// when `m` is gone.
fn end_and_unlist<B: Backend>(rec: &mut ThreadRecord, m: MgrRef, cx: &mut ThreadCx) -> bool {
    // A dying manager too: its release waits for this op (`active_mgr`, announced before the
    // lookup) before it reads the thread lists, and must not find the cx there once freed.
    let Some(p) = root().lookup(m.idx, m.uid, B::TAG) else {
        return false;
    };
    // SAFETY: as in `shared` (a live registry entry of tag `B::TAG`, and this op announced
    // before the lookup), without its `dying` filter: the state is freed only after this op.
    let sh = unsafe { &*p.as_ptr().cast::<Shared<B>>() };
    views::end_views_since(sh, &mut rec.gate.pkru, &rec.holds, cx, 0);
    let me: *const ThreadCx = cx;
    let mut inner = lock(&sh.inner);
    inner.threads.retain(|&t| t != me);
    // (A thread that ended inside a wait, whose record another thread adopts: `gate::adopt`.)
    views::unqueue(sh, &mut inner, |w| w.cx == me);
    true
}

/// Whether the calling thread has a live view entered after `mark`, with any manager.
pub(crate) fn views_above(rec: &ThreadRecord, mark: u64) -> bool {
    rec.cxs.iter().flatten().any(|p| {
        // Views are listed in the order they were entered: the last is the newest.
        cx_ref(p.as_ptr())
            .stack
            .last()
            .is_some_and(|e| e.seq > mark)
    })
}

/// Ends the calling thread's views entered after `mark`, with every manager (never views a
/// signal handler's seal protects).
pub(crate) fn end_views_since(rec: &mut ThreadRecord, mark: u64) {
    let mark = rec.levels.seal().map_or(mark, |f| mark.max(f));
    for idx in 0..rec.cxs.len() {
        let Some(p) = rec.cxs[idx] else {
            continue;
        };
        let uid = cx_ref(p.as_ptr()).mgr_uid;
        let slot = &root().managers[idx];
        if slot.uid.load(Ordering::Acquire) != uid {
            continue;
        }
        rec.active_mgr.store(idx as u32, Ordering::SeqCst);
        let m = MgrRef {
            idx: idx as u32,
            uid,
        };
        // SAFETY: the thread's own cx.
        let cx = unsafe { &mut *p.as_ptr() };
        match slot.kind.load(Ordering::Relaxed) {
            Simulated::TAG => end_since::<Simulated>(rec, m, cx, mark),
            Emulated::TAG => end_since::<Emulated>(rec, m, cx, mark),
            Hardware::TAG => end_since::<Hardware>(rec, m, cx, mark),
            Machine::TAG => end_since::<Machine>(rec, m, cx, mark),
            _ => {}
        }
        rec.active_mgr.store(NO_MGR, Ordering::Release);
    }
}

fn end_since<B: Backend>(rec: &mut ThreadRecord, m: MgrRef, cx: &mut ThreadCx, mark: u64) {
    if let Some(sh) = shared::<B>(m) {
        views::end_views_since(sh, &mut rec.gate.pkru, &rec.holds, cx, mark);
    }
}

/// The state of a manager a live handle names, for the direct path (cooperative mode: the
/// program is trusted, and the handle keeps the manager alive for the whole call, so no
/// lookup or announcement is needed).
///
/// # Safety
///
/// `ptr` must be the `MgrInfo::ptr` of a manager of type `B` whose handle the caller holds
/// for as long as the returned reference is used.
unsafe fn held<'a, B: Backend>(ptr: usize) -> &'a Shared<B> {
    // SAFETY: per the contract, a `Shared<B>` made by `create` and not yet released (its
    // last handle is alive).
    unsafe { &*(ptr as *const Shared<B>) }
}

/// Enters a view directly (cooperative mode, see `gate::direct`).
///
/// # Safety
///
/// As [`held`].
pub(crate) unsafe fn enter_direct<B: Backend>(
    rec: &mut ThreadRecord,
    ptr: usize,
    view: &[ViewItem],
) -> Result<u64> {
    // SAFETY: forwarded to the caller.
    let sh = unsafe { held::<B>(ptr) };
    if view.len() > sh.nkeys {
        return Err(Error::ViewTooLarge {
            domains: view.len(),
            keys: sh.nkeys,
        });
    }
    let cx = cx_of(sh, rec)?;
    views::enter(sh, rec, cx, view).map(|t| t.id)
}

/// Leaves a view directly (cooperative mode, see `gate::direct`).
///
/// # Safety
///
/// As [`held`].
pub(crate) unsafe fn leave_direct<B: Backend>(
    rec: &mut ThreadRecord,
    ptr: usize,
    id: u64,
) -> Result<()> {
    // SAFETY: forwarded to the caller.
    let sh = unsafe { held::<B>(ptr) };
    let cx = cx_of(sh, rec)?;
    views::leave(sh, rec, cx, id)
}

/// [`shared`] for the C API.
pub(crate) fn shared_pub<'a, B: Backend>(m: MgrRef) -> Option<&'a Shared<B>> {
    shared::<B>(m)
}

/// [`create`] for the C API.
pub(crate) fn create_pub<B: Backend>(i: CreateIn) -> Result<MgrInfo> {
    create::<B>(i)
}

/// [`cx_of`] for the C API.
pub(crate) fn cx_pub<'a, B: Backend>(
    sh: &Shared<B>,
    rec: &mut ThreadRecord,
) -> Result<&'a mut ThreadCx> {
    cx_of(sh, rec)
}

/// Addresses of library state for tests that attack it from application code (feature
/// `testing`): the word of `d`'s record that names its key slot. Reads only; the caller
/// holds the domain's handle (so its manager is alive) and runs outside the library.
#[cfg(feature = "testing")]
pub(crate) fn domain_slot_word<B: Backend>(m: MgrRef, d: DomRef) -> Option<usize> {
    let p = root().lookup(m.idx, m.uid, B::TAG)?;
    // SAFETY: the registry maps a live (slot, uid) to the `Shared<B>` made by `create`, which
    // is freed only when its last handle is gone; the caller holds a handle of the manager.
    let sh = unsafe { &*p.as_ptr().cast::<Shared<B>>() };
    let rec = sh.domains.get(d.idx)?;
    (rec.uid() == d.uid).then(|| rec.slot.word() as *const _ as usize)
}

/// As [`domain_slot_word`]: the address of the `bits` of the calling thread's view `depth`
/// below its newest one with manager `m`.
#[cfg(feature = "testing")]
pub(crate) fn view_bits_word(m: MgrRef, depth: usize) -> Option<usize> {
    let rec = ThreadRecord::current()?;
    let p = rec.cxs.get(m.idx as usize).copied().flatten()?;
    let cx = cx_ref(p.as_ptr());
    if cx.mgr_uid != m.uid {
        return None;
    }
    let i = cx.stack.len().checked_sub(depth + 1)?;
    Some((&raw const cx.stack[i].bits) as usize)
}
