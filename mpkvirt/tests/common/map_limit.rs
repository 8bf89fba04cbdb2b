//! Using up the process's mappings (`vm.max_map_count`), for tests of what mpkvirt does at
//! the limit. Run them in a child process: every mapping the process makes meanwhile fails.
//!
//! # Safety
//!
//! The filler maps an anonymous region of its own, changes the protection of its pages
//! only, and unmaps it when dropped; nothing else refers to it.
#![allow(
    unsafe_code,
    reason = "a region of the test's own, to use up the mappings"
)]

use super::mappings;

const PAGE: usize = 4096;

/// A region split into as many mappings as the kernel allows (every other page
/// inaccessible); unmapped when dropped.
pub(crate) struct MapFiller {
    base: *mut libc::c_void,
    len: usize,
}

impl MapFiller {
    /// Uses up the mappings.
    ///
    /// # Panics
    ///
    /// When the limit cannot be read, or is not reached.
    pub(crate) fn new() -> MapFiller {
        let max: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let pages = 2 * (max - mappings() + 16);
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping the kernel places; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let mut splits = 0;
        for i in (0..pages).step_by(2) {
            let page = base as usize + i * PAGE;
            // SAFETY: a page inside the region mapped above, which only this loop touches.
            if unsafe { libc::mprotect(page as *mut libc::c_void, PAGE, libc::PROT_NONE) } != 0 {
                break;
            }
            splits += 1;
        }
        assert!(
            splits < pages / 2,
            "setup: the mapping limit was not reached"
        );
        MapFiller { base, len }
    }
}

impl Drop for MapFiller {
    fn drop(&mut self) {
        // SAFETY: the region `new` mapped, which nothing else uses.
        assert_eq!(unsafe { libc::munmap(self.base, self.len) }, 0);
    }
}
