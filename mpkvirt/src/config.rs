//! Configuration: which machine to run on and the key cache's knobs.
//!
//! Three kinds of "off" are kept apart (wasmtime's lesson): whether the target has the
//! instructions at all (compile time, `mpkvirt-sys`), whether this machine has PKU (run time,
//! [`mpkvirt_sys::detect`]), and what the user asked for ([`Mode`]). `Mode::Hardware` on a
//! machine without PKU is an error, never a silent downgrade; `Mode::Auto` falls back to the
//! emulated backend and says why.

use std::time::Duration;

use crate::backend::{BackendKind, Emulated, Hardware, Machine};
use crate::error::{Error, Result};
use crate::policy::PolicyKind;

/// Which real machine to use.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Mode {
    /// Hardware when PKU is usable, emulated otherwise.
    #[default]
    Auto,
    /// Hardware, or fail.
    Hardware,
    /// Emulated, even where PKU exists (the mprotect baseline).
    Emulated,
}

impl Mode {
    /// Parses `auto`, `hardware` (or `hw`) or `emulated` (or `emu`).
    pub fn parse(s: &str) -> Option<Mode> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(Mode::Auto),
            "hardware" | "hw" => Some(Mode::Hardware),
            "emulated" | "emu" => Some(Mode::Emulated),
            _ => None,
        }
    }
}

/// Settings of a [`crate::Manager`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Which machine (for `Manager<Machine>`).
    pub mode: Mode,
    /// Hardware keys to use, 1 to 15 (fewer when other code holds keys).
    pub max_keys: usize,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Address space reserved at a time for domains.
    pub arena_chunk: usize,
    /// Default reservation of a domain.
    pub default_reserve: usize,
    /// How long `enter` waits for a key when every key is pinned (zero: fail at once).
    pub pin_wait: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mode: Mode::Auto,
            max_keys: 15,
            policy: PolicyKind::Lru,
            arena_chunk: 64 << 30,
            default_reserve: 1 << 20,
            pin_wait: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// The defaults, overridden by `MPKVIRT_MODE` (`auto`/`hardware`/`emulated`),
    /// `MPKVIRT_MAX_KEYS` (1–15), `MPKVIRT_POLICY` (`lru`/`hinted`) and
    /// `MPKVIRT_PIN_WAIT_MS` ([`Config::pin_wait`] in milliseconds, 0 to fail at once).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the variable that does not parse.
    pub fn from_env() -> Result<Config> {
        let mut c = Config::default();
        if let Ok(v) = std::env::var("MPKVIRT_MODE") {
            c.mode = Mode::parse(&v).ok_or_else(|| {
                Error::Config(format!(
                    "MPKVIRT_MODE={v}: expected auto, hardware or emulated"
                ))
            })?;
        }
        if let Ok(v) = std::env::var("MPKVIRT_MAX_KEYS") {
            c.max_keys = v
                .parse()
                .ok()
                .filter(|n| (1..=15).contains(n))
                .ok_or_else(|| Error::Config(format!("MPKVIRT_MAX_KEYS={v}: expected 1 to 15")))?;
        }
        if let Ok(v) = std::env::var("MPKVIRT_POLICY") {
            c.policy = PolicyKind::parse(&v)
                .filter(|p| *p != PolicyKind::Opt)
                .ok_or_else(|| {
                    Error::Config(format!("MPKVIRT_POLICY={v}: expected lru or hinted"))
                })?;
        }
        if let Ok(v) = std::env::var("MPKVIRT_PIN_WAIT_MS") {
            c.pin_wait = v.parse().map(Duration::from_millis).map_err(|_| {
                Error::Config(format!(
                    "MPKVIRT_PIN_WAIT_MS={v}: expected a number of milliseconds"
                ))
            })?;
        }
        Ok(c)
    }
}

/// The outcome of choosing a machine: which backend, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The backend chosen.
    pub backend: BackendKind,
    /// A sentence for logs and `mpkvirt-host info`.
    pub reason: String,
}

/// Decides which backend `mode` gives on this machine, without building it.
///
/// # Errors
///
/// [`Error::HardwareRequired`] for [`Mode::Hardware`] without PKU.
pub fn select(mode: Mode) -> Result<Selection> {
    let pku = mpkvirt_sys::detect::pku();
    match (mode, pku) {
        (Mode::Emulated, _) => Ok(Selection {
            backend: BackendKind::Emulated,
            reason: "emulated backend requested".into(),
        }),
        (Mode::Hardware | Mode::Auto, Ok(_)) => Ok(Selection {
            backend: BackendKind::Hardware,
            reason: "PKU is available".into(),
        }),
        (Mode::Hardware, Err(why)) => Err(Error::HardwareRequired(why)),
        (Mode::Auto, Err(why)) => Ok(Selection {
            backend: BackendKind::Emulated,
            reason: format!("no PKU ({why}); falling back to the emulated (mprotect) backend"),
        }),
    }
}

impl Machine {
    /// Builds the machine `config.mode` selects.
    ///
    /// # Errors
    ///
    /// As [`select`], plus failures to allocate keys or install the fault handler.
    pub fn new(config: &Config) -> Result<(Machine, Selection)> {
        let selection = select(config.mode)?;
        let machine = match selection.backend {
            BackendKind::Hardware => Machine::Hardware(Hardware::new(config.max_keys)?),
            _ => Machine::Emulated(Emulated::new(config.max_keys)?),
        };
        Ok((machine, selection))
    }
}
