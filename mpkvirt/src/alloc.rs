//! The per-domain allocator: pure bookkeeping of offsets inside a domain's reservation.
//!
//! All metadata lives here, outside the domain's memory, so code running inside a domain
//! cannot corrupt the allocator by writing its own heap (no in-band free lists or headers).
//!
//! - Small objects (up to [`MAX_SMALL`] bytes) come from power-of-two size classes; each class
//!   carves blocks out of whole pages taken from the page allocator and keeps freed blocks
//!   on its own free list. Blocks are aligned to their size.
//! - Larger objects and [`DomainHeap::alloc_pages`] take page runs: first fit from the
//!   free runs (coalesced on free), else from the bump pointer at the top of the used part.
//!
//! Every live allocation is recorded, so freeing an unknown or already freed offset is an
//! error, never corruption.

use std::collections::{BTreeMap, HashMap};

/// The largest size served from size classes.
pub(crate) const MAX_SMALL: usize = 2048;
const MIN_CLASS_SHIFT: u32 = 4; // 16 bytes
const CLASSES: usize = (MAX_SMALL.trailing_zeros() - MIN_CLASS_SHIFT + 1) as usize;

/// Why an allocation or free failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AllocError {
    /// The reservation has no room for the request.
    OutOfMemory {
        /// Bytes requested.
        requested: usize,
    },
    /// The alignment is not a power of two.
    BadAlignment(usize),
    /// The offset is not the start of a live allocation.
    NotAllocated(usize),
}

/// Free ranges of an address space, `start -> length`, kept coalesced: first fit out,
/// merge with the neighbours back in. Used for the page runs of a domain's heap and for
/// the manager's parked address space.
#[derive(Debug, Default)]
pub(crate) struct FreeRanges(BTreeMap<usize, usize>);

impl FreeRanges {
    /// Takes `len` bytes from the first range long enough; returns their start.
    pub(crate) fn take_first_fit(&mut self, len: usize) -> Option<usize> {
        let (&start, &avail) = self.0.iter().find(|(_, l)| **l >= len)?;
        self.0.remove(&start);
        if avail > len {
            self.0.insert(start + len, avail - len);
        }
        Some(start)
    }

    /// Gives `[start, start + len)` back, merged with adjacent free ranges; returns the
    /// merged range.
    pub(crate) fn give_back(&mut self, mut start: usize, mut len: usize) -> (usize, usize) {
        if let Some(next) = self.0.remove(&(start + len)) {
            len += next;
        }
        if let Some((&prev, &prev_len)) = self.0.range(..start).next_back()
            && prev + prev_len == start
        {
            self.0.remove(&prev);
            start = prev;
            len += prev_len;
        }
        self.0.insert(start, len);
        (start, len)
    }

    /// Removes the free range that starts at `start`.
    fn remove(&mut self, start: usize) {
        self.0.remove(&start);
    }
}

/// What [`DomainHeap::free`] released.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Freed {
    /// Bytes (rounded to the size class or to pages).
    pub(crate) size: usize,
    /// The page run `(offset, len)` given back, for allocations of whole pages.
    pub(crate) run: Option<(usize, usize)>,
}

#[derive(Clone, Copy, Debug)]
enum Live {
    Small { class: u8 },
    Pages { start: usize, len: usize },
}

/// A domain's heap over `[0, capacity)` bytes.
#[derive(Debug)]
pub(crate) struct DomainHeap {
    capacity: usize,
    page: usize,
    /// Top of the used part; everything above is untouched.
    bump: usize,
    /// Free page runs below `bump`.
    free_runs: FreeRanges,
    /// Free blocks per size class.
    free_blocks: [Vec<usize>; CLASSES],
    live: HashMap<usize, Live>,
    /// Bytes handed out and not freed (as requested, rounded to class or pages).
    in_use: usize,
}

fn class_of(size: usize) -> usize {
    let size = size.max(1 << MIN_CLASS_SHIFT).next_power_of_two();
    (size.trailing_zeros() - MIN_CLASS_SHIFT) as usize
}

fn class_size(class: usize) -> usize {
    1 << (class as u32 + MIN_CLASS_SHIFT)
}

impl DomainHeap {
    /// A heap over `capacity` bytes with `page`-sized pages (`page` a power of two).
    pub(crate) fn new(capacity: usize, page: usize) -> DomainHeap {
        assert!(page.is_power_of_two());
        DomainHeap {
            capacity,
            page,
            bump: 0,
            free_runs: FreeRanges::default(),
            free_blocks: Default::default(),
            live: HashMap::new(),
            in_use: 0,
        }
    }

    /// Bytes currently allocated (after rounding).
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Allocates `size` bytes aligned to `align`; returns the offset.
    pub(crate) fn alloc(&mut self, size: usize, align: usize) -> Result<usize, AllocError> {
        if !align.is_power_of_two() {
            return Err(AllocError::BadAlignment(align));
        }
        let rounded = size.max(1).max(align);
        if rounded <= MAX_SMALL {
            let class = class_of(rounded);
            let off = self.small(class)?;
            self.live.insert(off, Live::Small { class: class as u8 });
            self.in_use += class_size(class);
            return Ok(off);
        }
        let (start, len, off) = self.pages_aligned(size.max(1), align)?;
        self.live.insert(off, Live::Pages { start, len });
        self.in_use += len;
        Ok(off)
    }

    /// Allocates `n` whole pages; returns the (page-aligned) offset.
    pub(crate) fn alloc_pages(&mut self, n: usize) -> Result<usize, AllocError> {
        let len = n
            .max(1)
            .checked_mul(self.page)
            .ok_or(AllocError::OutOfMemory {
                requested: usize::MAX,
            })?;
        let start = self.run(len)?;
        self.live.insert(start, Live::Pages { start, len });
        self.in_use += len;
        Ok(start)
    }

    /// Frees the allocation that starts at `off`.
    pub(crate) fn free(&mut self, off: usize) -> Result<Freed, AllocError> {
        match self
            .live
            .remove(&off)
            .ok_or(AllocError::NotAllocated(off))?
        {
            Live::Small { class } => {
                let class = class as usize;
                self.free_blocks[class].push(off);
                self.in_use -= class_size(class);
                Ok(Freed {
                    size: class_size(class),
                    run: None,
                })
            }
            Live::Pages { start, len } => {
                self.release_run(start, len);
                self.in_use -= len;
                Ok(Freed {
                    size: len,
                    run: Some((start, len)),
                })
            }
        }
    }

    /// The size (rounded) of the live allocation at `off`.
    #[cfg(test)]
    pub(crate) fn size_of(&self, off: usize) -> Option<usize> {
        self.live.get(&off).map(|l| match *l {
            Live::Small { class } => class_size(class as usize),
            Live::Pages { len, start } => len - (off - start),
        })
    }

    fn small(&mut self, class: usize) -> Result<usize, AllocError> {
        if let Some(off) = self.free_blocks[class].pop() {
            return Ok(off);
        }
        let size = class_size(class);
        let run = self
            .run(self.page)
            .map_err(|_| AllocError::OutOfMemory { requested: size })?;
        // Hand out the first block, keep the rest (highest first so pops go upwards).
        self.free_blocks[class].extend((1..self.page / size).rev().map(|i| run + i * size));
        Ok(run)
    }

    fn pages_aligned(
        &mut self,
        size: usize,
        align: usize,
    ) -> Result<(usize, usize, usize), AllocError> {
        let len = size
            .div_ceil(self.page)
            .checked_mul(self.page)
            .ok_or(AllocError::OutOfMemory { requested: size })?;
        if align <= self.page {
            let start = self.run(len)?;
            return Ok((start, len, start));
        }
        let total = len + align - self.page;
        let start = self.run(total)?;
        let off = start.next_multiple_of(align);
        Ok((start, total, off))
    }

    /// A run of `len` bytes (multiple of the page size): first fit, else bump.
    fn run(&mut self, len: usize) -> Result<usize, AllocError> {
        if let Some(start) = self.free_runs.take_first_fit(len) {
            return Ok(start);
        }
        let end = self.bump.checked_add(len).filter(|&e| e <= self.capacity);
        let end = end.ok_or(AllocError::OutOfMemory { requested: len })?;
        let start = self.bump;
        self.bump = end;
        Ok(start)
    }

    fn release_run(&mut self, start: usize, len: usize) {
        let (start, len) = self.free_runs.give_back(start, len);
        // A free run reaching the bump pointer lowers it instead.
        if start + len == self.bump {
            self.free_runs.remove(start);
            self.bump = start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 4096;

    #[test]
    fn small_blocks_are_aligned_to_their_class_and_reused() {
        let mut h = DomainHeap::new(1 << 20, PAGE);
        let a = h.alloc(24, 8).unwrap();
        let b = h.alloc(24, 8).unwrap();
        assert_eq!(a % 32, 0);
        assert_eq!(b, a + 32);
        assert_eq!(h.free(a).map(|f| f.size), Ok(32));
        assert_eq!(h.alloc(20, 4), Ok(a));
        assert_eq!(h.free(a).map(|f| f.size), Ok(32));
        assert_eq!(
            h.free(a).map(|f| f.size),
            Err(AllocError::NotAllocated(a)),
            "double free"
        );
        assert_eq!(
            h.free(a + 1).map(|f| f.size),
            Err(AllocError::NotAllocated(a + 1))
        );
    }

    #[test]
    fn large_objects_take_page_runs_that_coalesce() {
        let mut h = DomainHeap::new(64 * PAGE, PAGE);
        let a = h.alloc(3 * PAGE, 16).unwrap();
        let b = h.alloc(PAGE + 1, 16).unwrap();
        let c = h.alloc_pages(1).unwrap();
        assert_eq!((a, b, c), (0, 3 * PAGE, 5 * PAGE));
        h.free(a).unwrap();
        h.free(b).unwrap();
        assert_eq!(h.alloc(5 * PAGE, 8), Ok(0), "runs a and b coalesced");
        assert_eq!(h.alloc(big_align(), big_align()).unwrap() % big_align(), 0);
    }

    fn big_align() -> usize {
        4 * PAGE
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let mut h = DomainHeap::new(2 * PAGE, PAGE);
        assert!(h.alloc_pages(2).is_ok());
        assert_eq!(
            h.alloc(16, 8),
            Err(AllocError::OutOfMemory { requested: 16 })
        );
        assert_eq!(
            h.alloc_pages(usize::MAX),
            Err(AllocError::OutOfMemory {
                requested: usize::MAX
            })
        );
        assert_eq!(h.alloc(8, 3), Err(AllocError::BadAlignment(3)));
    }

    proptest! {
        #[test]
        fn live_allocations_never_overlap(ops in proptest::collection::vec((0usize..3, 1usize..9000, 0u32..14), 1..200)) {
            let mut h = DomainHeap::new(256 * PAGE, PAGE);
            let mut live: Vec<(usize, usize)> = Vec::new();
            for (kind, size, align_shift) in ops {
                if kind == 0 && !live.is_empty() {
                    let (off, _) = live.swap_remove(size % live.len());
                    h.free(off).unwrap();
                    continue;
                }
                let align = 1usize << align_shift;
                if let Ok(off) = h.alloc(size, align) {
                    prop_assert_eq!(off % align, 0);
                    prop_assert!(off + size <= 256 * PAGE);
                    for &(o, s) in &live {
                        prop_assert!(off + size <= o || o + s <= off, "overlap {off}+{size} with {o}+{s}");
                    }
                    live.push((off, size));
                }
            }
            let expected: usize = live.iter().map(|&(o, _)| h.size_of(o).unwrap()).sum();
            prop_assert!(h.in_use() >= expected);
        }
    }
}
