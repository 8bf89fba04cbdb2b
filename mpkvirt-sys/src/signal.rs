//! SIGSEGV decoding and signal-handler plumbing.
//!
//! A protection-key violation raises SIGSEGV with `si_code == SEGV_PKUERR` (4) and the
//! offending key in `si_pkey`; an ordinary protection violation gives `SEGV_ACCERR`. The
//! access kind is not in `siginfo_t`: on x86-64 the page-fault error code saved in the signal
//! context (`REG_ERR`) says whether the access was a write or an instruction fetch.
//!
//! Handlers start with the kernel's initial PKRU (only key 0 accessible, see
//! [`crate::Pkru::LINUX_INIT`]) before Linux 6.12 and still for the handler body after it,
//! so code called from a handler must not touch tagged memory without writing PKRU first.
//! Before 6.12 the kernel writes the frame itself with the interrupted PKRU (a frame it may
//! not write is a fatal SIGSEGV); from 6.12 with every key open, and `sigreturn` reads it
//! back the same way ([`frames_written_with_keys_open`] probes which).
//!
//! # References
//!
//! sigaction(2), pkeys(7), Intel SDM Vol. 3A §4.7 (page-fault error code).

use crate::pkey::Pkey;

pub use crate::imp::signal::{
    Handler, chain, decode_segv, fault_access, frame_pkru, frame_pkru_extent,
    frames_written_with_keys_open, install, install_blocking_async, ip, redirect, set_frame_pkru,
    sp,
};

/// `SEGV_MAPERR`: address not mapped.
pub const SEGV_MAPERR: i32 = 1;
/// `SEGV_ACCERR`: invalid permissions for a mapped object.
pub const SEGV_ACCERR: i32 = 2;
/// `SEGV_PKUERR`: the access was denied by the PKRU rights of the page's key.
pub const SEGV_PKUERR: i32 = 4;

/// Why a SIGSEGV was raised (`si_code`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SegvCode {
    /// `SEGV_MAPERR`: no mapping at the address.
    MapErr,
    /// `SEGV_ACCERR`: the page's protection forbids the access.
    AccErr,
    /// `SEGV_PKUERR`: the page's protection key forbids the access.
    PkuErr,
    /// Any other code (e.g. `SI_USER` for a signal sent with `kill`).
    Other(i32),
}

impl SegvCode {
    /// Decodes `si_code`.
    pub const fn from_raw(code: i32) -> SegvCode {
        match code {
            SEGV_MAPERR => SegvCode::MapErr,
            SEGV_ACCERR => SegvCode::AccErr,
            SEGV_PKUERR => SegvCode::PkuErr,
            other => SegvCode::Other(other),
        }
    }
}

/// The kind of memory access that faulted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

/// A decoded SIGSEGV `siginfo_t`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SegvInfo {
    /// `si_addr`: the faulting data address.
    pub addr: usize,
    /// `si_code`.
    pub code: SegvCode,
    /// `si_pkey`, present when `code` is [`SegvCode::PkuErr`].
    pub pkey: Option<Pkey>,
}

/// Decodes the x86 page-fault error code (`REG_ERR`) into an access kind.
///
/// Bit 1 is set for writes, bit 4 for instruction fetches (Intel SDM Vol. 3A §4.7).
pub const fn access_from_error_code(err: u64) -> Access {
    if err & (1 << 4) != 0 {
        Access::Execute
    } else if err & (1 << 1) != 0 {
        Access::Write
    } else {
        Access::Read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_bits() {
        assert_eq!(access_from_error_code(0b0_0100), Access::Read);
        assert_eq!(access_from_error_code(0b10_0111), Access::Write);
        assert_eq!(access_from_error_code(0b1_0101), Access::Execute);
    }

    #[test]
    fn si_codes() {
        assert_eq!(SegvCode::from_raw(4), SegvCode::PkuErr);
        assert_eq!(SegvCode::from_raw(SEGV_ACCERR), SegvCode::AccErr);
        assert_eq!(SegvCode::from_raw(-6), SegvCode::Other(-6));
    }
}
