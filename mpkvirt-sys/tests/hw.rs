//! Hardware tests: real protection keys and PKRU. They need PKU and skip (printing why)
//! without it; inside the PKU guest (`scripts/pku-vm test`) `MPKVIRT_REQUIRE_PKU=1` turns a
//! skip into a failure. Every test name starts with `pku_`.
#![allow(
    unsafe_code,
    reason = "tests drive raw pkeys, PKRU and signal handlers"
)]

use std::cell::Cell;
use std::sync::{Barrier, Mutex, MutexGuard, Once, OnceLock};

use mpkvirt_asm::{PROBE_FAULTED, addr, mpkvirt_probe_read8, mpkvirt_probe_write8};
use mpkvirt_sys::mman::{self, Prot};
use mpkvirt_sys::pkey::{pkey_alloc, pkey_free, pkey_mprotect};
use mpkvirt_sys::signal::{self, Access, SegvCode, SegvInfo};
use mpkvirt_sys::{AccessRights, Error, Pkey, Pkru, Pku, require_pku};

/// Tests that allocate keys or write PKRU take this lock: key exhaustion and the
/// per-thread checks must not see each other's keys.
static KEYS: Mutex<()> = Mutex::new(());

fn lock_keys() -> MutexGuard<'static, ()> {
    KEYS.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- fault catching through the probes -------------------------------------------------

struct PrevAction(libc::sigaction);
// SAFETY: the saved action is written once before the handler can run and only read after;
// it is plain data (addresses, flags, a signal mask).
unsafe impl Sync for PrevAction {}
// SAFETY: as above; it is moved into the OnceLock once and never mutated.
unsafe impl Send for PrevAction {}

static PREV_SEGV: OnceLock<PrevAction> = OnceLock::new();

thread_local! {
    static LAST_FAULT: Cell<Option<(SegvInfo, Option<Access>)>> = const { Cell::new(None) };
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers, owned by this
    // handler invocation.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let ip = signal::ip(uc);
    if ip == addr::probe_read8_insn() || ip == addr::probe_write8_insn() {
        // SAFETY: `info` is the siginfo_t the kernel passed to this handler.
        let decoded = signal::decode_segv(unsafe { &*info });
        LAST_FAULT.set(Some((decoded, signal::fault_access(uc))));
        // SAFETY: the thread was interrupted at a probe's single access; the probe pushed
        // nothing, so resuming at `mpkvirt_probe_fault_ret` with the same %rsp returns
        // PROBE_FAULTED to the probe's caller.
        unsafe {
            signal::redirect(uc, addr::probe_fault_ret(), signal::sp(uc), PROBE_FAULTED);
        }
        return;
    }
    if let Some(prev) = PREV_SEGV.get() {
        // SAFETY: called from the SIGSEGV handler with the kernel's arguments and the action
        // that `install` returned for SIGSEGV.
        unsafe { signal::chain(&prev.0, sig, info, ctx) };
    }
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handler only touches a const-initialised thread-local Cell and the
        // interrupted context, and chains every fault that is not at a probe.
        let prev = unsafe { signal::install(libc::SIGSEGV, on_segv, libc::SA_ONSTACK) }
            .expect("sigaction");
        let _ = PREV_SEGV.set(PrevAction(prev));
    });
}

type Fault = (SegvInfo, Option<Access>);

fn probe_read(addr: *const u8) -> Result<u8, Fault> {
    install_handler();
    LAST_FAULT.set(None);
    // SAFETY: the SIGSEGV handler above recovers faults at the probe; the addresses used by
    // these tests are pages the test mapped itself.
    let v = unsafe { mpkvirt_probe_read8(addr) };
    if v == PROBE_FAULTED {
        Err(LAST_FAULT
            .get()
            .expect("probe faulted without a recorded fault"))
    } else {
        Ok(u8::try_from(v).expect("byte"))
    }
}

fn probe_write(addr: *mut u8, value: u8) -> Result<(), Fault> {
    install_handler();
    LAST_FAULT.set(None);
    // SAFETY: as for `probe_read`; the pages are the test's own and hold no Rust values.
    let v = unsafe { mpkvirt_probe_write8(addr, value) };
    if v == PROBE_FAULTED {
        Err(LAST_FAULT
            .get()
            .expect("probe faulted without a recorded fault"))
    } else {
        Ok(())
    }
}

// ---- helpers -----------------------------------------------------------------------------

/// One read-write page, unmapped on drop.
struct Page(*mut u8);

impl Page {
    fn new() -> Page {
        Page(mman::reserve(mman::page_size(), Prot::READ_WRITE).expect("mmap"))
    }
    fn tag(&self, prot: Prot, key: Pkey) {
        // SAFETY: the page is this test's own mapping and no Rust reference points into it.
        unsafe { pkey_mprotect(self.0, mman::page_size(), prot, key) }.expect("pkey_mprotect");
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `Page::new` and nothing refers to it any more.
        let _ = unsafe { mman::munmap(self.0, mman::page_size()) };
    }
}

/// Writes PKRU (raw WRPKRU); tests restore the previous value before returning.
fn set_pkru(pku: Pku, value: Pkru) {
    // SAFETY: these tests own the thread's PKRU; every value they write keeps key 0
    // (stack, heap, code data) accessible.
    unsafe { pku.wrpkru(value) }
}

/// Allocates a key, maps a read-write page tagged with it, runs `f(key, page, saved)` and
/// cleans up: PKRU back to `saved` (the thread's value on entry), page unmapped, key freed.
fn with_tagged_page<R>(pku: Pku, f: impl FnOnce(Pkey, *mut u8, Pkru) -> R) -> R {
    let key = pkey_alloc(AccessRights::DISABLE_ACCESS).expect("alloc");
    let page = Page::new();
    page.tag(Prot::READ_WRITE, key);
    let saved = pku.rdpkru();
    let r = f(key, page.0, saved);
    set_pkru(pku, saved);
    drop(page);
    // SAFETY: the page carrying the key was unmapped above and PKRU restored.
    unsafe { pkey_free(key) }.expect("free");
    r
}

/// The protection key smaps shows for `addr`.
fn smaps_pkey(addr: *const u8) -> Option<u8> {
    mman::smaps_protection_key(addr as usize)
        .expect("read smaps")
        .map(Pkey::index)
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn pku_detection_reports_cpu_and_kernel_support() {
    let _pku = require_pku!();
    let cpu = mpkvirt_sys::cpu::cpu_features();
    assert!(cpu.pku && cpu.ospke, "{cpu:?}");
    let _guard = lock_keys();
    let n = mpkvirt_sys::detect::count_free_keys().expect("count keys");
    assert!((1..=15).contains(&n), "{n} free keys");
}

#[test]
fn pku_allocating_every_key_ends_in_the_typed_exhausted_error() {
    let _pku = require_pku!();
    let _guard = lock_keys();
    let mut keys = Vec::new();
    let err = loop {
        match pkey_alloc(AccessRights::DISABLE_ACCESS) {
            Ok(k) => keys.push(k),
            Err(e) => break e,
        }
        assert!(keys.len() <= 15, "more than 15 keys handed out");
    };
    assert_eq!(err, Error::KeysExhausted);
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k.index() != 0),
        "key 0 handed out: {keys:?}"
    );
    // A freed key can be allocated again, then the pool is exhausted once more.
    let last = keys.pop().expect("a key");
    // SAFETY: allocated by this test, tagged no page.
    unsafe { pkey_free(last) }.expect("pkey_free");
    keys.push(pkey_alloc(AccessRights::DISABLE_ACCESS).expect("re-allocate"));
    assert_eq!(
        pkey_alloc(AccessRights::DISABLE_ACCESS),
        Err(Error::KeysExhausted)
    );
    for k in keys {
        // SAFETY: allocated by this test, tagged no page.
        unsafe { pkey_free(k) }.expect("pkey_free");
    }
}

#[test]
fn pku_freeing_an_unallocated_key_is_einval() {
    let _pku = require_pku!();
    let _guard = lock_keys();
    let key = pkey_alloc(AccessRights::DISABLE_ACCESS).expect("alloc");
    // SAFETY: allocated just now, tagged no page; freeing twice is what is tested (the
    // second call only fails).
    unsafe { pkey_free(key) }.expect("free");
    // SAFETY: as above.
    let err = unsafe { pkey_free(key) }.expect_err("double free must fail");
    assert_eq!(err.errno().0, libc::EINVAL, "{err}");
}

#[test]
fn pku_access_disabled_read_faults_with_pkuerr_and_the_key() {
    let pku = require_pku!();
    let _guard = lock_keys();
    let (key, read, write) = with_tagged_page(pku, |key, page, saved| {
        set_pkru(pku, saved.with(key, AccessRights::READ_WRITE));
        assert_eq!(probe_write(page, 42), Ok(()));
        assert_eq!(probe_read(page), Ok(42));
        set_pkru(pku, saved.with(key, AccessRights::DISABLE_ACCESS));
        (key, probe_read(page), probe_write(page, 7))
    });
    let (info, access) = read.expect_err("read through a disabled key must fault");
    assert_eq!(info.code, SegvCode::PkuErr);
    assert_eq!(info.pkey, Some(key));
    assert_eq!(access, Some(Access::Read));
    let (info, access) = write.expect_err("write through a disabled key must fault");
    assert_eq!(
        (info.code, info.pkey, access),
        (SegvCode::PkuErr, Some(key), Some(Access::Write))
    );
}

#[test]
fn pku_write_disabled_allows_reads_and_faults_writes() {
    let pku = require_pku!();
    let _guard = lock_keys();
    let (key, read, write) = with_tagged_page(pku, |key, page, saved| {
        set_pkru(pku, saved.with(key, AccessRights::READ_WRITE));
        probe_write(page, 9).expect("write with rights");
        set_pkru(pku, saved.with(key, AccessRights::DISABLE_WRITE));
        (key, probe_read(page), probe_write(page, 1))
    });
    assert_eq!(read, Ok(9));
    let (info, access) = write.expect_err("write through a write-disabled key must fault");
    assert_eq!(
        (info.code, info.pkey, access),
        (SegvCode::PkuErr, Some(key), Some(Access::Write))
    );
}

#[test]
fn pku_pkru_is_per_thread_and_inherited_at_creation() {
    let pku = require_pku!();
    let _guard = lock_keys();
    let saved = pku.rdpkru();
    let k5 = Pkey::new(5).expect("key");
    let k6 = Pkey::new(6).expect("key");
    let parent_value = Pkru::LINUX_INIT.with(k5, AccessRights::READ_ONLY);
    let child_value = Pkru::LINUX_INIT.with(k6, AccessRights::READ_WRITE);
    let parent_later = Pkru::LINUX_INIT.with(k6, AccessRights::READ_ONLY);
    set_pkru(pku, parent_value);

    let barrier = Barrier::new(2);
    let (inherited, child_after_parent_write) = std::thread::scope(|s| {
        let child = s.spawn(|| {
            let inherited = pku.rdpkru();
            set_pkru(pku, child_value);
            barrier.wait(); // child has written
            barrier.wait(); // parent has written
            (inherited, pku.rdpkru())
        });
        barrier.wait();
        let parent_after_child_write = pku.rdpkru();
        set_pkru(pku, parent_later);
        barrier.wait();
        assert_eq!(
            parent_after_child_write, parent_value,
            "child's write leaked into parent"
        );
        child.join().expect("child")
    });
    let parent_final = pku.rdpkru();
    set_pkru(pku, saved);

    assert_eq!(
        inherited, parent_value,
        "a new thread inherits its creator's PKRU"
    );
    assert_eq!(
        child_after_parent_write, child_value,
        "parent's write leaked into child"
    );
    assert_eq!(parent_final, parent_later);
}

static HANDLER_PKRU: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

extern "C" fn record_pkru(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    if let Some(pku) = Pku::new() {
        HANDLER_PKRU.store(pku.rdpkru().bits(), std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn pku_signal_handlers_start_with_the_initial_pkru() {
    let pku = require_pku!();
    let _guard = lock_keys();
    // SAFETY: the handler only executes RDPKRU and stores into an atomic.
    let prev = unsafe { signal::install(libc::SIGUSR1, record_pkru, 0) }.expect("sigaction");
    let saved = pku.rdpkru();
    let custom = Pkru::ALLOW_ALL.with(Pkey::new(3).expect("key"), AccessRights::READ_ONLY);
    set_pkru(pku, custom);
    // SAFETY: raise delivers SIGUSR1 to this thread synchronously, to the handler above.
    let rc = unsafe { libc::raise(libc::SIGUSR1) };
    let after = pku.rdpkru();
    set_pkru(pku, saved);
    // SAFETY: restores the action that was in place before this test.
    unsafe { libc::sigaction(libc::SIGUSR1, &prev, std::ptr::null_mut()) };

    assert_eq!(rc, 0);
    let in_handler = Pkru::from_bits(HANDLER_PKRU.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        in_handler,
        Pkru::LINUX_INIT,
        "handler ran with {in_handler}"
    );
    assert_eq!(after, custom, "sigreturn restores the interrupted PKRU");
}

#[test]
fn pku_mmap_over_a_tagged_range_resets_its_key_and_mprotect_keeps_it() {
    let pku = require_pku!();
    let _guard = lock_keys();
    let (key, results) = with_tagged_page(pku, |key, page, saved| {
        set_pkru(pku, saved.with(key, AccessRights::DISABLE_ACCESS));
        let tagged = (probe_read(page), smaps_pkey(page));
        // SAFETY: the page is ours and holds no Rust values.
        unsafe { mman::mprotect(page, mman::page_size(), Prot::READ) }.expect("mprotect");
        let after_mprotect = (probe_read(page), smaps_pkey(page));
        // SAFETY: the page is ours; replacing it discards nothing anyone refers to.
        unsafe { mman::map_fixed_anonymous(page, mman::page_size(), Prot::READ_WRITE) }
            .expect("mmap MAP_FIXED");
        let after_mmap = (probe_read(page), smaps_pkey(page));
        (key, [tagged, after_mprotect, after_mmap])
    });
    let [tagged, after_mprotect, after_mmap] = results;
    assert_eq!(tagged.0.map_err(|f| f.0.pkey), Err(Some(key)));
    assert_eq!(
        after_mprotect.0.map_err(|f| f.0.pkey),
        Err(Some(key)),
        "mprotect keeps the key"
    );
    assert_eq!(
        after_mmap.0,
        Ok(0),
        "mmap(MAP_FIXED) gives fresh key-0 pages"
    );
    assert_eq!(tagged.1, Some(key.index()));
    assert_eq!(after_mprotect.1, Some(key.index()));
    assert_eq!(after_mmap.1, Some(0));
}

#[test]
fn pku_pkey_mprotect_with_an_unallocated_key_is_einval() {
    let _pku = require_pku!();
    let _guard = lock_keys();
    let key = pkey_alloc(AccessRights::DISABLE_ACCESS).expect("alloc");
    // SAFETY: allocated just now, tagged no page.
    unsafe { pkey_free(key) }.expect("free");
    let page = Page::new();
    // SAFETY: the page is ours and holds no Rust values.
    let err = unsafe { pkey_mprotect(page.0, mman::page_size(), Prot::READ_WRITE, key) }
        .expect_err("unallocated key");
    assert_eq!(err.errno().0, libc::EINVAL, "{err}");
}
