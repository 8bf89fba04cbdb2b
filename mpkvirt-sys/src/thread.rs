//! Thread identity and waiting: kernel thread ids, `tgkill`, the FS/GS base registers (the
//! thread pointer, and the register mpkvirt keeps its per-thread record in), futexes, and the
//! list of the process's threads; the C library's restartable-sequences area.
//!
//! The FS/GS base instructions need `HWCAP2_FSGSBASE` (Linux 5.9 or later on a CPU with
//! FSGSBASE, which every CPU with PKU has); [`FsGsBase`] is the proof.
//!
//! # References
//!
//! gettid(2), tgkill(2), arch_prctl(2), futex(2), rseq(2); Intel SDM Vol. 2 RDFSBASE/RDGSBASE.

pub use crate::imp::thread::{
    FsGsBase, for_each_thread, futex_wait, futex_wake, gettid, glibc_rseq_offset, rseq_unregister,
    set_gs_base, tgkill,
};
