//! CPU support for PKU, and the PKRU register.
//!
//! CPUID leaf 7, sub-leaf 0, reports two bits in ECX (Intel SDM Vol. 2, CPUID):
//!
//! - bit 3, `PKU`: the processor implements protection keys for user-mode pages;
//! - bit 4, `OSPKE`: the OS has set CR4.PKE, which makes RDPKRU/WRPKRU legal (without it they
//!   raise #UD).
//!
//! Only `OSPKE` makes the instructions usable. There is no vendor check: AMD Zen 3 and later
//! implement PKU with the same bits. A [`Pku`] token exists only when `OSPKE` is set, so code
//! holding one may execute RDPKRU/WRPKRU.

pub use crate::imp::cpu::{Pku, cpu_features};

/// The PKU-related CPUID bits of this CPU.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CpuFeatures {
    /// CPUID.(EAX=7,ECX=0):ECX[bit 3] — the CPU implements PKU.
    pub pku: bool,
    /// CPUID.(EAX=7,ECX=0):ECX[bit 4] — the OS has enabled PKU (CR4.PKE).
    pub ospke: bool,
}

impl CpuFeatures {
    /// Decodes ECX of CPUID leaf 7, sub-leaf 0.
    pub const fn from_leaf7_ecx(ecx: u32) -> CpuFeatures {
        CpuFeatures {
            pku: ecx & (1 << 3) != 0,
            ospke: ecx & (1 << 4) != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf7_bits() {
        assert_eq!(
            CpuFeatures::from_leaf7_ecx(0),
            CpuFeatures {
                pku: false,
                ospke: false
            }
        );
        assert_eq!(
            CpuFeatures::from_leaf7_ecx(0b1000),
            CpuFeatures {
                pku: true,
                ospke: false
            }
        );
        assert_eq!(
            CpuFeatures::from_leaf7_ecx(0b11000),
            CpuFeatures {
                pku: true,
                ospke: true
            }
        );
    }
}
