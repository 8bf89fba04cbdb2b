//! CPUID and the RDPKRU/WRPKRU instructions.
//!
//! # Safety
//!
//! RDPKRU and WRPKRU are executed with inline assembly. Both raise #UD unless CR4.PKE is set,
//! which CPUID reports as OSPKE; they are reachable only through a [`Pku`] token, which is
//! constructed only after OSPKE was observed. Their register preconditions (ECX = 0 for
//! RDPKRU, ECX = EDX = 0 for WRPKRU, else #GP) are set inside the `asm!` blocks, so no caller
//! can get them wrong. WRPKRU is not declared `nomem`: it changes which memory is accessible,
//! so the compiler must not move loads or stores across it.
#![allow(unsafe_code, reason = "RDPKRU/WRPKRU need inline assembly")]

use std::arch::asm;
use std::arch::x86_64::__cpuid_count;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::cpu::CpuFeatures;
use crate::pkru::Pkru;

/// Reads the PKU bits of CPUID leaf 7.
pub fn cpu_features() -> CpuFeatures {
    if __cpuid_count(0, 0).eax < 7 {
        return CpuFeatures::default();
    }
    CpuFeatures::from_leaf7_ecx(__cpuid_count(7, 0).ecx)
}

/// Proof that the OS has enabled PKU on this CPU (OSPKE), so RDPKRU and WRPKRU are legal.
///
/// Obtained from [`Pku::new`]; zero-sized and `Copy`.
#[derive(Clone, Copy, Debug)]
pub struct Pku {
    _private: (),
}

const UNKNOWN: u8 = 0;
const ABSENT: u8 = 1;
const PRESENT: u8 = 2;
static OSPKE: AtomicU8 = AtomicU8::new(UNKNOWN);

impl Pku {
    /// The token, if CPUID reports OSPKE. CPUID runs once per process (it is slow, and
    /// traps to the hypervisor in a VM); the answer is cached.
    pub fn new() -> Option<Pku> {
        let state = match OSPKE.load(Ordering::Relaxed) {
            UNKNOWN => {
                let state = if cpu_features().ospke {
                    PRESENT
                } else {
                    ABSENT
                };
                OSPKE.store(state, Ordering::Relaxed);
                state
            }
            known => known,
        };
        (state == PRESENT).then_some(Pku { _private: () })
    }

    /// RDPKRU: the calling thread's PKRU.
    #[inline]
    pub fn rdpkru(self) -> Pkru {
        let eax: u32;
        // SAFETY: `self` proves OSPKE is set, so RDPKRU does not raise #UD; ECX is 0 as the
        // instruction requires. It only reads the register into EAX and zeroes EDX (declared
        // as clobbered), touches no memory or stack, and leaves the flags alone.
        unsafe {
            asm!("rdpkru", in("ecx") 0, out("eax") eax, out("edx") _,
                 options(nomem, nostack, preserves_flags));
        }
        Pkru::from_bits(eax)
    }

    /// WRPKRU: sets the calling thread's PKRU.
    ///
    /// This is the raw instruction. Checked gates (which re-verify the value after the
    /// write) are in `mpkvirt-asm`.
    ///
    /// # Safety
    ///
    /// The caller must own the thread's PKRU: layers above keep a record of which keys each
    /// thread may use (a key is handed to another domain only when no thread's PKRU grants
    /// it), and a write behind their back can keep a key granted after it was re-bound. The
    /// new value must also keep accessible the memory the thread goes on to use (its stack
    /// and code's data are normally key 0).
    #[inline]
    pub unsafe fn wrpkru(self, value: Pkru) {
        // SAFETY: `self` proves OSPKE is set, so WRPKRU does not raise #UD; ECX = EDX = 0 as
        // the instruction requires (else #GP). Not `nomem`: memory accesses must not move
        // across the write. The effect on which memory is accessible is the caller's
        // obligation, stated above.
        unsafe {
            asm!("wrpkru", in("eax") value.bits(), in("ecx") 0, in("edx") 0,
                 options(nostack, preserves_flags));
        }
    }
}
