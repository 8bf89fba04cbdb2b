//! The same-API twin for targets without x86-64 PKU (and `--cfg mpkvirt_no_hw`).
//!
//! Every operation that would touch protection keys or PKRU reports
//! [`Error::Unsupported`](crate::Error::Unsupported); the [`cpu::Pku`] token is uninhabited,
//! so code holding one is visibly unreachable. Signal decoding still works, minus the key.
//!
//! # Safety
//!
//! The twin declares the same `unsafe fn`s as the real implementation so that callers need
//! no `#[cfg]`; none of them does anything unsafe.
#![allow(
    unsafe_code,
    reason = "declares the same unsafe fns as the real implementation; they do nothing"
)]

pub(crate) mod cpu {
    use crate::cpu::CpuFeatures;
    use crate::pkru::Pkru;

    /// No CPUID here: no PKU.
    pub fn cpu_features() -> CpuFeatures {
        CpuFeatures::default()
    }

    /// Proof that PKU is enabled; cannot exist on this target.
    #[derive(Clone, Copy, Debug)]
    pub enum Pku {}

    impl Pku {
        /// Always `None` on this target.
        pub fn new() -> Option<Pku> {
            None
        }

        /// Unreachable: no token exists.
        pub fn rdpkru(self) -> Pkru {
            match self {}
        }

        /// Unreachable: no token exists.
        ///
        /// # Safety
        ///
        /// Trivially satisfied: this cannot be called.
        pub unsafe fn wrpkru(self, _value: Pkru) {
            match self {}
        }
    }
}

pub(crate) mod membarrier {
    use crate::error::{Error, Op, Result};

    /// Unsupported on this target.
    pub fn register_private_expedited() -> Result<()> {
        Err(Error::Unsupported { op: Op::Membarrier })
    }

    /// Unsupported on this target.
    pub fn private_expedited() -> Result<()> {
        Err(Error::Unsupported { op: Op::Membarrier })
    }
}

pub(crate) mod pkey {
    use crate::error::{Error, Op, Result};
    use crate::mman::Prot;
    use crate::pkey::Pkey;
    use crate::pkru::AccessRights;

    /// Unsupported on this target.
    pub fn pkey_alloc(_init: AccessRights) -> Result<Pkey> {
        Err(Error::Unsupported { op: Op::PkeyAlloc })
    }

    /// Unsupported on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn pkey_free(_key: Pkey) -> Result<()> {
        Err(Error::Unsupported { op: Op::PkeyFree })
    }

    /// Unsupported on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn pkey_mprotect(
        _addr: *mut u8,
        _len: usize,
        _prot: Prot,
        _key: Pkey,
    ) -> Result<()> {
        Err(Error::Unsupported {
            op: Op::PkeyMprotect,
        })
    }
}

pub(crate) mod signal {
    use crate::error::{Error, Op, Result};
    use crate::signal::{Access, SegvCode, SegvInfo};

    /// A `SA_SIGINFO` signal handler.
    pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

    /// Decodes code and address; no key on this target.
    pub fn decode_segv(info: &libc::siginfo_t) -> SegvInfo {
        SegvInfo {
            addr: 0,
            code: SegvCode::from_raw(info.si_code),
            pkey: None,
        }
    }

    /// The access kind is not decoded on this target.
    pub fn fault_access(_ctx: &libc::ucontext_t) -> Option<Access> {
        None
    }

    /// Not decoded on this target.
    pub fn ip(_ctx: &libc::ucontext_t) -> usize {
        0
    }

    /// Not decoded on this target.
    pub fn sp(_ctx: &libc::ucontext_t) -> usize {
        0
    }

    /// No PKU on this target: no frame to probe.
    pub fn frames_written_with_keys_open(_pku: crate::Pku) -> bool {
        false
    }

    /// No PKRU in signal frames on this target.
    pub fn frame_pkru_extent() -> usize {
        0
    }

    /// Unsupported on this target: no frame holds PKRU.
    pub fn frame_pkru(_ctx: &libc::ucontext_t) -> Option<u32> {
        None
    }

    /// No PKRU in signal frames on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn set_frame_pkru(_ctx: &mut libc::ucontext_t, _pkru: u32) -> bool {
        false
    }

    /// Does nothing on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn redirect(_ctx: &mut libc::ucontext_t, _ip: usize, _sp: usize, _rax: u64) {}

    /// Unsupported on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn install(
        _sig: libc::c_int,
        _handler: Handler,
        _flags: libc::c_int,
    ) -> Result<libc::sigaction> {
        Err(Error::Unsupported { op: Op::Sigaction })
    }

    /// Unsupported on this target.
    ///
    /// # Errors
    ///
    /// Always `Unsupported`.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn install_blocking_async(
        _sig: libc::c_int,
        _handler: Handler,
        _flags: libc::c_int,
    ) -> Result<libc::sigaction> {
        Err(Error::Unsupported { op: Op::Sigaction })
    }

    /// Does nothing on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn chain(
        _prev: &libc::sigaction,
        _sig: libc::c_int,
        _info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
    }
}

pub(crate) mod thread {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use crate::error::{Error, Op, Result};

    /// No kernel thread ids on this target: 0.
    pub fn gettid() -> i32 {
        0
    }

    /// No rseq area on this target.
    pub fn glibc_rseq_offset() -> Option<isize> {
        None
    }

    /// Unsupported on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn rseq_unregister(_area: usize) -> Result<()> {
        Err(Error::Unsupported { op: Op::Rseq })
    }

    /// Unsupported on this target.
    pub fn tgkill(_tid: i32, _sig: i32) -> Result<()> {
        Err(Error::Unsupported { op: Op::Tgkill })
    }

    /// Proof that RDFSBASE/RDGSBASE are usable; cannot exist on this target.
    #[derive(Clone, Copy, Debug)]
    pub enum FsGsBase {}

    impl FsGsBase {
        /// Always `None` on this target.
        pub fn new() -> Option<FsGsBase> {
            None
        }

        /// Unreachable: the token cannot exist.
        pub fn fs_base(self) -> usize {
            match self {}
        }

        /// Unreachable: the token cannot exist.
        pub fn gs_base(self) -> usize {
            match self {}
        }
    }

    /// Unsupported on this target.
    ///
    /// # Safety
    ///
    /// Trivially satisfied: nothing happens.
    pub unsafe fn set_gs_base(_addr: usize) -> Result<()> {
        Err(Error::Unsupported { op: Op::ArchPrctl })
    }

    /// Unsupported on this target.
    pub fn futex_wait(
        _word: &AtomicU32,
        _expected: u32,
        _timeout: Option<Duration>,
    ) -> Result<bool> {
        Err(Error::Unsupported { op: Op::Futex })
    }

    /// Does nothing on this target.
    pub fn futex_wake(_word: &AtomicU32, _n: i32) {}

    /// Unsupported on this target.
    pub fn for_each_thread(_f: impl FnMut(i32)) -> Result<()> {
        Err(Error::Unsupported {
            op: Op::ListThreads,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{AccessRights, Error, Op, Pkey, Pku, Unavailable, detect, mman, pkey};

    #[test]
    fn the_twin_reports_unsupported_everywhere() {
        assert!(Pku::new().is_none());
        assert_eq!(detect::pku().unwrap_err(), Unavailable::UnsupportedTarget);
        assert_eq!(
            pkey::pkey_alloc(AccessRights::NONE),
            Err(Error::Unsupported { op: Op::PkeyAlloc })
        );
        assert_eq!(
            // SAFETY: the twin does nothing.
            unsafe { pkey::pkey_free(Pkey::DEFAULT) },
            Err(Error::Unsupported { op: Op::PkeyFree })
        );
        let page = mman::reserve(mman::page_size(), mman::Prot::NONE).expect("mmap is portable");
        // SAFETY: the twin's pkey_mprotect does nothing; the page is ours.
        let r = unsafe {
            pkey::pkey_mprotect(page, mman::page_size(), mman::Prot::NONE, Pkey::DEFAULT)
        };
        assert_eq!(
            r,
            Err(Error::Unsupported {
                op: Op::PkeyMprotect
            })
        );
    }
}
