//! `mpkvirt-host info`: a truthful report of the machine's protection-key support.

use std::fmt;

use mpkvirt::{BackendKind, Config, Manager, Mode};
use mpkvirt_sys::cpu::CpuFeatures;
use mpkvirt_sys::detect::{Support, Unavailable};

/// What the machine offers and what mpkvirt would do with it.
#[derive(Clone, Debug)]
pub struct Report {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// CPUID bits.
    pub cpu: CpuFeatures,
    /// `Ok` when PKU is usable, else why not.
    pub pku: Result<(), Unavailable>,
    /// Protection keys `pkey_alloc` hands out right now (allocated and freed to count them).
    pub free_keys: Option<usize>,
    /// The mode asked for.
    pub mode: Mode,
    /// The backend that mode selects here, or why it cannot be had.
    pub backend: Result<BackendKind, mpkvirt::Error>,
    /// Why that backend.
    pub reason: String,
    /// Keys a manager built with this mode actually gets.
    pub manager_keys: Option<usize>,
    /// How the library's own metadata is protected in this process.
    pub metadata: Option<mpkvirt::MetadataMode>,
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

impl Report {
    /// Probes the machine. Counting keys allocates every free key and frees them again;
    /// building the manager allocates up to 15 and frees them when it is dropped.
    pub fn probe(mode: Mode) -> Report {
        let support = Support::probe();
        let selection = mpkvirt::select(mode);
        let (backend, reason) = match &selection {
            Ok(s) => (Ok(s.backend), s.reason.clone()),
            Err(e) => (Err(e.clone()), e.to_string()),
        };
        let manager = selection
            .is_ok()
            .then(|| {
                Manager::new(Config {
                    mode,
                    ..Config::default()
                })
                .ok()
            })
            .flatten();
        let manager_keys = manager.as_ref().map(|m| m.keys().len());
        let metadata = manager.as_ref().map(Manager::metadata_mode);
        Report {
            kernel: kernel_release(),
            cpu: support.cpu,
            pku: support.status,
            free_keys: support.free_keys,
            mode,
            backend,
            reason,
            manager_keys,
            metadata,
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel:        {}", self.kernel)?;
        writeln!(
            f,
            "cpu:           PKU {}, OSPKE {} (CPUID.(EAX=7,ECX=0):ECX bits 3 and 4)",
            yes(self.cpu.pku),
            yes(self.cpu.ospke)
        )?;
        match &self.pku {
            Ok(()) => writeln!(f, "pku:           available")?,
            Err(why) => writeln!(f, "pku:           unavailable: {why}")?,
        }
        match self.free_keys {
            Some(n) => writeln!(f, "free keys:     {n} (pkey_alloc until ENOSPC)")?,
            None => writeln!(f, "free keys:     none (no PKU)")?,
        }
        let mode = match self.mode {
            Mode::Auto => "auto",
            Mode::Hardware => "hardware",
            Mode::Emulated => "emulated",
        };
        match &self.backend {
            Ok(b) => writeln!(f, "backend:       {b} (mode {mode}: {})", self.reason)?,
            Err(e) => writeln!(f, "backend:       none (mode {mode}: {e})")?,
        }
        match (self.manager_keys, &self.backend) {
            (Some(n), Ok(BackendKind::Hardware)) => {
                writeln!(f, "domain keys:   {n} hardware keys for virtual domains")
            }
            (Some(n), Ok(_)) => writeln!(
                f,
                "domain keys:   {n} emulated keys for virtual domains (mprotect)"
            ),
            _ => writeln!(f, "domain keys:   none"),
        }?;
        match self.metadata {
            Some(mpkvirt::MetadataMode::Protected) => writeln!(
                f,
                "metadata:      protected (one more key, the library's own: writable only behind its gates)"
            ),
            Some(mpkvirt::MetadataMode::GateOnly) => writeln!(
                f,
                "metadata:      gate path without PKRU writes (MPKVIRT_METADATA=gate; protects nothing)"
            ),
            Some(mpkvirt::MetadataMode::Cooperative) => writeln!(
                f,
                "metadata:      cooperative (ordinary memory: no PKU, or MPKVIRT_METADATA=cooperative)"
            ),
            None => writeln!(f, "metadata:      not initialised"),
        }?;
        match &self.backend {
            Ok(BackendKind::Hardware) => writeln!(
                f,
                "runtime:       one worker per CPU, each running its own tenant (rights per thread)"
            ),
            Ok(_) => writeln!(
                f,
                "runtime:       one worker, one tenant at a time (rights are process-wide without PKU)"
            ),
            Err(_) => writeln!(f, "runtime:       unavailable (no backend)"),
        }?;
        match &self.backend {
            Ok(b) if self.metadata.is_some() => {
                writeln!(f, "key 0:         {}", crate::runtime::key0_line(*b))
            }
            _ => Ok(()),
        }
    }
}
