//! Is PKU usable here, and if not, why not.
//!
//! Three things must hold: the target is x86-64 Linux, CPUID reports OSPKE (the CPU has PKU
//! *and* the OS enabled it; a CPU flag without OSPKE is what made wasmtime's AMD CI hit
//! SIGILL), and the kernel hands out keys (`pkey_alloc` succeeds). The kernel probe allocates
//! one key with access disabled and frees it again, so it leaves no rights behind in the
//! calling thread's PKRU.
//!
//! The errno of a failed probe is interpreted as follows: `ENOSYS` means a kernel built
//! without pkeys; `EINVAL` a kernel that does not enable them (x86 kernels before 2026 return
//! `EINVAL` on the first `pkey_alloc` without OSPKE); `ENOSPC` with OSPKE set means the keys
//! are all taken by other code.
//!
//! # Safety
//!
//! The probes free the keys they allocate (`pkey_free` is `unsafe`: a freed number can come
//! back to other code). Those keys were allocated by the probe itself a moment before,
//! access-disabled, and tagged no page, so freeing them hands nothing on.
#![allow(unsafe_code, reason = "the probes free the keys they allocated")]

use std::fmt;
use std::io::Write;
use std::sync::OnceLock;

use crate::cpu::{CpuFeatures, Pku, cpu_features};
use crate::error::{Errno, Error};
use crate::pkey::{pkey_alloc, pkey_free};
use crate::pkru::AccessRights;

/// Why PKU cannot be used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unavailable {
    /// Not x86-64 Linux (or built with `--cfg mpkvirt_no_hw`).
    UnsupportedTarget,
    /// The CPU does not implement PKU.
    CpuLacksPku,
    /// The CPU implements PKU but the OS has not enabled it (no OSPKE).
    OsDisabled,
    /// The kernel refused `pkey_alloc` for a reason other than exhaustion.
    KernelWithoutPkeys(Errno),
    /// The kernel supports pkeys but every key is already allocated.
    KeysExhausted,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::UnsupportedTarget => {
                write!(
                    f,
                    "this target is not x86-64 Linux (or was built with --cfg mpkvirt_no_hw)"
                )
            }
            Unavailable::CpuLacksPku => {
                write!(
                    f,
                    "the CPU lacks PKU (CPUID.(EAX=7,ECX=0):ECX bit 3 is clear)"
                )
            }
            Unavailable::OsDisabled => write!(
                f,
                "the CPU has PKU but the OS has not enabled it (CPUID OSPKE, ECX bit 4, is clear)"
            ),
            Unavailable::KernelWithoutPkeys(errno) => {
                write!(f, "the kernel refuses pkey_alloc ({errno})")
            }
            Unavailable::KeysExhausted => {
                write!(
                    f,
                    "every protection key is already allocated (pkey_alloc: ENOSPC)"
                )
            }
        }
    }
}

impl std::error::Error for Unavailable {}

/// Checks the CPU bits, then asks the kernel for a key.
fn probe() -> Result<(), Unavailable> {
    if !cfg!(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(mpkvirt_no_hw)
    )) {
        return Err(Unavailable::UnsupportedTarget);
    }
    let cpu = cpu_features();
    if !cpu.pku {
        return Err(Unavailable::CpuLacksPku);
    }
    if !cpu.ospke {
        return Err(Unavailable::OsDisabled);
    }
    match pkey_alloc(AccessRights::DISABLE_ACCESS) {
        Ok(key) => {
            // A failure to free leaks one key; the probe's answer stands.
            // SAFETY: the key was allocated just now and tagged no page; no thread uses it.
            let _ = unsafe { pkey_free(key) };
            Ok(())
        }
        Err(Error::KeysExhausted) => Err(Unavailable::KeysExhausted),
        Err(e) => Err(Unavailable::KernelWithoutPkeys(e.errno())),
    }
}

/// The [`Pku`] token if PKU is fully usable (CPU, OS and kernel), else the reason.
///
/// The probe runs once per process and its answer is cached, so call this before other code
/// allocates every key.
pub fn pku() -> Result<Pku, Unavailable> {
    static ANSWER: OnceLock<Result<(), Unavailable>> = OnceLock::new();
    (*ANSWER.get_or_init(probe))?;
    Pku::new().ok_or(Unavailable::OsDisabled)
}

/// A full report for humans (`mpkvirt-host info`).
#[derive(Clone, Debug)]
pub struct Support {
    /// The CPUID bits.
    pub cpu: CpuFeatures,
    /// `Ok(())` when PKU is usable, else why not.
    pub status: Result<(), Unavailable>,
    /// How many keys `pkey_alloc` handed out before `ENOSPC` when they were counted
    /// (each was freed again), `None` when PKU is unusable.
    pub free_keys: Option<usize>,
}

impl Support {
    /// Probes the machine and counts the free keys by allocating them all and freeing them
    /// again. Other threads allocating keys at the same time change the count.
    pub fn probe() -> Support {
        let status = pku().map(drop);
        let free_keys = status.is_ok().then(count_free_keys).and_then(Result::ok);
        Support {
            cpu: cpu_features(),
            status,
            free_keys,
        }
    }
}

/// Allocates keys until the kernel runs out, frees them all, and returns how many there were.
///
/// # Errors
///
/// Any `pkey_alloc` failure other than exhaustion.
pub fn count_free_keys() -> Result<usize, Error> {
    let mut keys = Vec::new();
    let result = loop {
        match pkey_alloc(AccessRights::DISABLE_ACCESS) {
            Ok(key) => keys.push(key),
            Err(Error::KeysExhausted) => break Ok(keys.len()),
            Err(e) => break Err(e),
        }
    };
    for key in keys {
        // SAFETY: allocated by this count, tagged no page, granted to no thread beyond the
        // allocation's access-disabled default.
        let _ = unsafe { pkey_free(key) };
    }
    result
}

/// Whether hardware tests must not skip (`MPKVIRT_REQUIRE_PKU=1`, set inside the PKU guest).
pub fn pku_required() -> bool {
    std::env::var_os("MPKVIRT_REQUIRE_PKU").is_some_and(|v| v == "1")
}

/// Reports a hardware test that cannot run: prints `skipped: no PKU (<reason>)` on stderr
/// (past the test harness's output capture), or panics when [`pku_required`].
///
/// Used by [`crate::require_pku!`].
pub fn report_skip(reason: &Unavailable) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    assert!(
        !pku_required(),
        "{name}: PKU is required here (MPKVIRT_REQUIRE_PKU=1) but unavailable: {reason}"
    );
    // One write, so the line is not interleaved with the harness's own output.
    let line = format!("mpkvirt-test: {name}: skipped: no PKU ({reason})\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}
