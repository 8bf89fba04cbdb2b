//! `membarrier(2)`: a memory barrier on every running thread of the process.
//!
//! # Safety
//!
//! The system call takes two integer arguments and touches no user memory.
#![allow(unsafe_code, reason = "raw membarrier system call")]

use crate::error::{Error, Op, Result};

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: i32 = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: i32 = 1 << 4;

fn membarrier(cmd: i32) -> Result<()> {
    // SAFETY: membarrier takes (cmd, flags) integers and touches no user memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            libc::c_long::from(cmd),
            0 as libc::c_long,
        )
    };
    if ret < 0 {
        Err(Error::last(Op::Membarrier))
    } else {
        Ok(())
    }
}

/// Registers the process for [`private_expedited`] (once per process; idempotent).
///
/// # Errors
///
/// `EINVAL`/`ENOSYS` on kernels without it (before Linux 4.14, or built without
/// `CONFIG_MEMBARRIER`).
pub fn register_private_expedited() -> Result<()> {
    membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
}

/// Makes every thread of the process that is running right now execute a full memory
/// barrier before this returns (threads not running pass one when they are scheduled).
///
/// This is the heavy half of an asymmetric fence: code on a fast path orders a store and a
/// later load with only a compiler fence, and a rare slow path calls this between its own
/// store and load. Either the slow path sees the fast path's store, or the fast path's load
/// sees the slow path's store.
///
/// # Errors
///
/// `EPERM` without a prior [`register_private_expedited`].
///
/// # References
///
/// membarrier(2)
pub fn private_expedited() -> Result<()> {
    membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
}
