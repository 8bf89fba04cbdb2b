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
//!
//! The free page runs ([`FreeRanges`], a [`Treap`]) and the size classes' free lists live in
//! the allocator `A` the heap is given ([`Global`] by default). Not yet:
//!
//! - the record of live allocations is still a `std` `HashMap` on the global allocator
//!   (moving it needs a map that takes an allocator, such as `hashbrown`'s with its
//!   `allocator-api2` feature);
//! - a failure to allocate metadata in `A` ends the program as with the `std` collections
//!   (free lists grow with `push`/`extend`, freed runs go back with
//!   [`FreeRanges::give_back`]); reporting it needs `try_reserve` before those and
//!   [`FreeRanges::try_give_back`].

use allocator_api2::alloc::{Allocator, Global};
use allocator_api2::collections::TryReserveError;
use allocator_api2::vec::Vec;

use crate::treap::Treap;
#[cfg(test)]
use crate::treap::alloc_failed;

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

/// Names one reservation (one `mmap`) among those whose free space a [`FreeRanges`] holds.
pub(crate) type ArenaId = u32;

/// The one arena of a domain heap's page runs.
const HEAP_ARENA: ArenaId = 0;

/// Free ranges of an address space, `start -> (length, arena)`: first fit out, merged with
/// their neighbours back in, but only with neighbours of the same arena. Ranges of two
/// arenas stay apart even when they touch (two reservations the kernel placed side by
/// side), so a range taken out always lies in one reservation. Used for the page runs of a
/// domain's heap (all in one arena) and for the manager's parked address space (an arena
/// per reservation).
///
/// A [`Treap`] by start, whose nodes know the longest range below them: first fit, give
/// back and remove are O(log n) expected, and all memory comes from `A`. Only giving back a
/// range that merges with nothing allocates (one node, or none when a slot is free);
/// taking never does.
#[derive(Debug)]
pub(crate) struct FreeRanges<A: Allocator + Clone = Global>(Treap<ArenaId, A>);

impl Default for FreeRanges {
    fn default() -> FreeRanges {
        FreeRanges::new_in(Global)
    }
}

impl<A: Allocator + Clone> FreeRanges<A> {
    /// No free range; its nodes will live in `alloc`.
    pub(crate) fn new_in(alloc: A) -> FreeRanges<A> {
        FreeRanges(Treap::new_in(alloc))
    }

    /// Takes `len` bytes from the lowest-addressed range long enough; returns their start
    /// and arena. Never allocates: the rest of the range takes the taken one's node.
    pub(crate) fn take_first_fit(&mut self, len: usize) -> Option<(usize, ArenaId)> {
        let (start, avail, arena) = self.0.first_fit(len)?;
        self.0.remove(start);
        if avail > len {
            self.0.insert(start + len, avail - len, arena);
        }
        Some((start, arena))
    }

    /// Gives `[start, start + len)` of `arena` back, merged with the adjacent free ranges
    /// of the same arena; returns the merged range. Ends the program on a failure to
    /// allocate, like the `std` collections; see [`FreeRanges::try_give_back`].
    #[cfg(test)]
    pub(crate) fn give_back(&mut self, start: usize, len: usize, arena: ArenaId) -> (usize, usize) {
        self.try_give_back(start, len, arena)
            .unwrap_or_else(|e| alloc_failed(e))
    }

    /// [`FreeRanges::give_back`], reporting a failure to allocate the node for a range that
    /// merges with nothing; nothing changes then.
    pub(crate) fn try_give_back(
        &mut self,
        start: usize,
        len: usize,
        arena: ArenaId,
    ) -> Result<(usize, usize), TryReserveError> {
        let end = start + len;
        debug_assert!(
            self.0.ceiling(start).is_none_or(|(s, _, _)| s >= end)
                && start
                    .checked_sub(1)
                    .and_then(|k| self.0.floor(k))
                    .is_none_or(|(s, l, _)| s + l <= start),
            "{start:#x}+{len:#x} overlaps a free range"
        );
        let next = self.0.get(end).filter(|&(_, a)| a == arena).map(|(l, _)| l);
        let prev = start
            .checked_sub(1)
            .and_then(|k| self.0.floor(k))
            .filter(|&(s, l, a)| a == arena && s + l == start);
        Ok(match (prev, next) {
            (Some((p, prev_len, _)), next) => {
                let mut merged = prev_len + len;
                if let Some(next_len) = next {
                    self.0.remove(end);
                    merged += next_len;
                }
                self.0.set_len(p, merged);
                (p, merged)
            }
            (None, Some(next_len)) => {
                // Takes the node of the range after: no allocation.
                self.0.remove(end);
                self.0.insert(start, len + next_len, arena);
                (start, len + next_len)
            }
            (None, None) => {
                self.0.try_insert(start, len, arena)?;
                (start, len)
            }
        })
    }

    /// Removes the free range that starts at `start`.
    fn remove(&mut self, start: usize) {
        self.0.remove(start);
    }

    /// The free ranges `(start, len, arena)` in address order.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (usize, usize, ArenaId)> {
        self.0.iter()
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

/// A domain's heap over `[0, capacity)` bytes, its metadata in `A`.
#[derive(Debug)]
pub(crate) struct DomainHeap<A: Allocator + Clone = Global> {
    capacity: usize,
    page: usize,
    /// Top of the used part; everything above is untouched.
    bump: usize,
    /// Free page runs below `bump` (all of arena [`HEAP_ARENA`]).
    free_runs: FreeRanges<A>,
    /// Free blocks per size class.
    free_blocks: [Vec<usize, A>; CLASSES],
    /// Live allocations by offset.
    live: hashbrown::HashMap<usize, Live, hashbrown::DefaultHashBuilder, A>,
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

#[cfg(test)]
impl DomainHeap {
    /// A heap over `capacity` bytes with `page`-sized pages (`page` a power of two).
    pub(crate) fn new(capacity: usize, page: usize) -> DomainHeap {
        DomainHeap::new_in(capacity, page, Global)
    }
}

impl<A: Allocator + Clone> DomainHeap<A> {
    /// [`DomainHeap::new`], with the free runs and free lists in `alloc`.
    pub(crate) fn new_in(capacity: usize, page: usize, alloc: A) -> DomainHeap<A> {
        assert!(page.is_power_of_two());
        DomainHeap {
            capacity,
            page,
            bump: 0,
            free_runs: FreeRanges::new_in(alloc.clone()),
            free_blocks: std::array::from_fn(|_| Vec::new_in(alloc.clone())),
            live: hashbrown::HashMap::with_hasher_in(Default::default(), alloc.clone()),
            in_use: 0,
        }
    }

    /// Bytes currently allocated (after rounding).
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Allocates `size` bytes whose address is aligned to `align`, the heap's memory starting
    /// at address `base` (page-aligned); returns the offset.
    pub(crate) fn alloc(
        &mut self,
        size: usize,
        align: usize,
        base: usize,
    ) -> Result<usize, AllocError> {
        if !align.is_power_of_two() {
            return Err(AllocError::BadAlignment(align));
        }
        let rounded = size.max(1).max(align);
        self.live
            .try_reserve(1)
            .map_err(|_| AllocError::OutOfMemory { requested: size })?;
        if rounded <= MAX_SMALL {
            let class = class_of(rounded);
            let off = self.small(class)?;
            self.live.insert(off, Live::Small { class: class as u8 });
            self.in_use += class_size(class);
            return Ok(off);
        }
        let (start, len, off) = self.pages_aligned(size.max(1), align, base)?;
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
        self.live
            .try_reserve(1)
            .map_err(|_| AllocError::OutOfMemory { requested: len })?;
        let start = self.run(len)?;
        self.live.insert(start, Live::Pages { start, len });
        self.in_use += len;
        Ok(start)
    }

    /// Frees the allocation that starts at `off`.
    #[cfg(test)]
    pub(crate) fn free(&mut self, off: usize) -> Result<Freed, AllocError> {
        let freed = self.free_begin(off)?;
        if let Some((start, len)) = freed.run {
            self.release_run(start, len);
        }
        Ok(freed)
    }

    /// Frees the allocation that starts at `off`, except that a page run is not yet given
    /// back: the caller empties it first (it must read as zero when reused), then calls
    /// [`DomainHeap::release_run`] — while holding the heap, so that no other allocation can
    /// receive the run before it is empty. A run that cannot be emptied is simply never
    /// released.
    pub(crate) fn free_begin(&mut self, off: usize) -> Result<Freed, AllocError> {
        let live = *self.live.get(&off).ok_or(AllocError::NotAllocated(off))?;
        let freed = match live {
            Live::Small { class } => {
                let class = class as usize;
                self.free_blocks[class]
                    .try_reserve(1)
                    .map_err(|_| AllocError::OutOfMemory { requested: 0 })?;
                self.free_blocks[class].push(off);
                self.in_use -= class_size(class);
                Freed {
                    size: class_size(class),
                    run: None,
                }
            }
            Live::Pages { start, len } => {
                self.in_use -= len;
                Freed {
                    size: len,
                    run: Some((start, len)),
                }
            }
        };
        self.live.remove(&off);
        Ok(freed)
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
        self.free_blocks[class]
            .try_reserve(self.page / size)
            .map_err(|_| AllocError::OutOfMemory { requested: size })?;
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
        base: usize,
    ) -> Result<(usize, usize, usize), AllocError> {
        let len = size
            .div_ceil(self.page)
            .checked_mul(self.page)
            .ok_or(AllocError::OutOfMemory { requested: size })?;
        if align <= self.page {
            let start = self.run(len)?;
            return Ok((start, len, start));
        }
        let total = len
            .checked_add(align - self.page)
            .ok_or(AllocError::OutOfMemory { requested: size })?;
        let start = self.run(total)?;
        // Aligned as an address: the heap's base is only page-aligned.
        let addr = base.wrapping_add(start);
        let off = start + (addr.next_multiple_of(align) - addr);
        Ok((start, total, off))
    }

    /// A run of `len` bytes (multiple of the page size): first fit, else bump.
    fn run(&mut self, len: usize) -> Result<usize, AllocError> {
        if let Some((start, _)) = self.free_runs.take_first_fit(len) {
            return Ok(start);
        }
        let end = self.bump.checked_add(len).filter(|&e| e <= self.capacity);
        let end = end.ok_or(AllocError::OutOfMemory { requested: len })?;
        let start = self.bump;
        self.bump = end;
        Ok(start)
    }

    /// Gives a freed page run back (see [`DomainHeap::free_begin`]).
    pub(crate) fn release_run(&mut self, start: usize, len: usize) {
        // Without room for the free run's record the run is lost to this heap, nothing else.
        let Ok((start, len)) = self.free_runs.try_give_back(start, len, HEAP_ARENA) else {
            return;
        };
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
        let a = h.alloc(24, 8, 0).unwrap();
        let b = h.alloc(24, 8, 0).unwrap();
        assert_eq!(a % 32, 0);
        assert_eq!(b, a + 32);
        assert_eq!(h.free(a).map(|f| f.size), Ok(32));
        assert_eq!(h.alloc(20, 4, 0), Ok(a));
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
        let a = h.alloc(3 * PAGE, 16, 0).unwrap();
        let b = h.alloc(PAGE + 1, 16, 0).unwrap();
        let c = h.alloc_pages(1).unwrap();
        assert_eq!((a, b, c), (0, 3 * PAGE, 5 * PAGE));
        h.free(a).unwrap();
        h.free(b).unwrap();
        assert_eq!(h.alloc(5 * PAGE, 8, 0), Ok(0), "runs a and b coalesced");
        assert_eq!(
            h.alloc(big_align(), big_align(), 0).unwrap() % big_align(),
            0
        );
        // Aligned as an address when the heap's base is only page-aligned.
        let base = 7 * PAGE;
        let off = h.alloc(PAGE, big_align(), base).unwrap();
        assert_eq!((base + off) % big_align(), 0);
    }

    fn big_align() -> usize {
        4 * PAGE
    }

    #[test]
    fn heap_metadata_lives_in_its_allocator() {
        let budget = crate::test_alloc::Budget::new(usize::MAX);
        let mut h = DomainHeap::new_in(64 * PAGE, PAGE, budget.clone());
        let small = h.alloc(24, 8, 0).unwrap();
        let runs: std::vec::Vec<usize> = (0..4).map(|_| h.alloc_pages(1).unwrap()).collect();
        h.free(runs[0]).unwrap();
        h.free(runs[2]).unwrap(); // two runs apart: two free ranges
        h.free(small).unwrap();
        assert!(budget.held() > 0, "free runs and free lists in the budget");
        drop(h);
        assert_eq!(budget.held(), 0);
    }

    fn free_list<A: Allocator + Clone>(
        f: &FreeRanges<A>,
    ) -> std::vec::Vec<(usize, usize, ArenaId)> {
        f.iter().collect()
    }

    /// Two reservations the kernel placed side by side, both free: a request longer than
    /// either is not served across the boundary (the backend cannot act on such a range).
    #[test]
    fn neighbouring_arenas_never_merge() {
        let mut f = FreeRanges::default();
        // Arena 1 is [0, 4 pages), arena 2 is [4, 8 pages), freed in pieces.
        f.give_back(0, 2 * PAGE, 1);
        f.give_back(6 * PAGE, 2 * PAGE, 2);
        assert_eq!(f.give_back(4 * PAGE, 2 * PAGE, 2), (4 * PAGE, 4 * PAGE));
        assert_eq!(f.give_back(2 * PAGE, 2 * PAGE, 1), (0, 4 * PAGE));
        assert_eq!(free_list(&f), [(0, 4 * PAGE, 1), (4 * PAGE, 4 * PAGE, 2)]);
        assert_eq!(f.take_first_fit(6 * PAGE), None, "would span both arenas");
        assert_eq!(f.take_first_fit(5 * PAGE), None);
        assert_eq!(f.take_first_fit(4 * PAGE), Some((0, 1)));
        assert_eq!(f.take_first_fit(4 * PAGE), Some((4 * PAGE, 2)));
        assert_eq!(f.take_first_fit(1), None);
        // Each side of the boundary given back next to the other side's free range.
        assert_eq!(f.give_back(4 * PAGE, PAGE, 2), (4 * PAGE, PAGE));
        assert_eq!(f.give_back(3 * PAGE, PAGE, 1), (3 * PAGE, PAGE));
        assert_eq!(f.give_back(5 * PAGE, 3 * PAGE, 2), (4 * PAGE, 4 * PAGE));
        assert_eq!(f.give_back(0, 3 * PAGE, 1), (0, 4 * PAGE));
        assert_eq!(free_list(&f), [(0, 4 * PAGE, 1), (4 * PAGE, 4 * PAGE, 2)]);
        assert_eq!(f.take_first_fit(5 * PAGE), None);
    }

    /// 30,000 holes too small for the requests, below a range that fits: each request is
    /// served from that range and given back, then the holes' neighbours come back and
    /// everything merges into one range.
    #[test]
    fn thirty_thousand_holes() {
        const HOLES: usize = 30_000;
        let mut f = FreeRanges::default();
        for i in 0..HOLES {
            f.give_back(2 * i * PAGE, PAGE, 7);
        }
        let big = 2 * HOLES * PAGE;
        f.give_back(big, 10 * PAGE, 7);
        f.0.assert_invariants();
        assert_eq!(f.0.len(), HOLES + 1);
        for n in 2..=10 {
            assert_eq!(f.take_first_fit(n * PAGE), Some((big, 7)));
            assert_eq!(f.give_back(big, n * PAGE, 7), (big, 10 * PAGE));
        }
        assert_eq!(f.take_first_fit(11 * PAGE), None);
        assert_eq!(f.take_first_fit(PAGE), Some((0, 7)), "the lowest hole");
        f.give_back(0, PAGE, 7);
        for i in 0..HOLES {
            f.give_back((2 * i + 1) * PAGE, PAGE, 7);
        }
        assert_eq!(free_list(&f), [(0, big + 10 * PAGE, 7)]);
        f.0.assert_invariants();
        assert!(f.0.slots() <= HOLES + 1);
    }

    #[test]
    fn give_back_reports_allocation_failure_and_changes_nothing() {
        let budget = crate::test_alloc::Budget::new(usize::MAX);
        let mut f = FreeRanges::new_in(budget.clone());
        // Holes two pages apart until the node vector is full, which it may not outgrow.
        f.give_back(0, PAGE, 0);
        budget.set_limit(budget.held());
        let mut i = 1;
        while f.try_give_back(2 * i * PAGE, PAGE, 0).is_ok() {
            i += 1;
        }
        let before = free_list(&f);
        assert!(f.try_give_back(2 * i * PAGE, PAGE, 0).is_err());
        assert_eq!(free_list(&f), before, "unchanged");
        // A range that merges needs no node, and neither does taking.
        let last = 2 * (i - 1) * PAGE;
        assert_eq!(f.try_give_back(last + PAGE, PAGE, 0), Ok((last, 2 * PAGE)));
        assert_eq!(
            f.try_give_back(last + 2 * PAGE, PAGE, 0),
            Ok((last, 3 * PAGE))
        );
        assert_eq!(f.try_give_back(PAGE, PAGE, 0), Ok((0, 3 * PAGE)));
        assert_eq!(f.take_first_fit(PAGE), Some((0, 0)));
        assert_eq!(f.take_first_fit(3 * PAGE), Some((last, 0)));
        f.0.assert_invariants();
    }

    /// A free-range allocator's state as one arena id (or none) per page: what must be free,
    /// and as which maximal runs.
    #[derive(Debug)]
    struct PageModel(std::vec::Vec<Option<ArenaId>>);

    impl PageModel {
        /// Maximal runs of free pages of one arena, in address order.
        fn runs(&self) -> std::vec::Vec<(usize, usize, ArenaId)> {
            let mut runs: std::vec::Vec<(usize, usize, ArenaId)> = std::vec::Vec::new();
            for (p, a) in self.0.iter().enumerate() {
                let Some(a) = *a else { continue };
                match runs.last_mut() {
                    Some((s, l, ra)) if *ra == a && *s + *l == p * PAGE => *l += PAGE,
                    _ => runs.push((p * PAGE, PAGE, a)),
                }
            }
            runs
        }
    }

    proptest! {
        /// Random arenas, touching or not, freed and taken in random order: the free ranges
        /// are exactly the maximal same-arena runs of free pages, and first fit takes the
        /// lowest one long enough.
        #[test]
        fn free_ranges_are_the_maximal_runs_of_each_arena(
            arenas in proptest::collection::vec((1usize..8, any::<bool>()), 1..8),
            ops in proptest::collection::vec((any::<bool>(), 1usize..12, any::<usize>()), 1..200),
        ) {
            // Lay the arenas out, each right after the last or after a one-page gap.
            let mut pages: std::vec::Vec<Option<ArenaId>> = std::vec::Vec::new();
            let mut f = FreeRanges::default();
            for (id, &(len, gap)) in arenas.iter().enumerate() {
                if gap {
                    pages.push(None);
                }
                let id = ArenaId::try_from(id).unwrap();
                f.give_back(pages.len() * PAGE, len * PAGE, id);
                pages.extend(std::iter::repeat_n(Some(id), len));
            }
            let mut model = PageModel(pages);
            let mut taken: std::vec::Vec<(usize, usize, ArenaId)> = std::vec::Vec::new();
            for (take, n, pick) in ops {
                if take || taken.is_empty() {
                    let want = model.runs().into_iter().find(|r| r.1 >= n * PAGE);
                    let got = f.take_first_fit(n * PAGE);
                    prop_assert_eq!(got, want.map(|(s, _, a)| (s, a)));
                    if let Some((s, a)) = got {
                        for p in s / PAGE..s / PAGE + n {
                            prop_assert_eq!(model.0[p].take(), Some(a));
                        }
                        taken.push((s, n * PAGE, a));
                    }
                } else {
                    let (s, l, a) = taken.swap_remove(pick % taken.len());
                    f.give_back(s, l, a);
                    for p in s / PAGE..(s + l) / PAGE {
                        model.0[p] = Some(a);
                    }
                }
                f.0.assert_invariants();
                prop_assert_eq!(free_list(&f), model.runs());
            }
        }
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let mut h = DomainHeap::new(2 * PAGE, PAGE);
        assert!(h.alloc_pages(2).is_ok());
        assert_eq!(
            h.alloc(16, 8, 0),
            Err(AllocError::OutOfMemory { requested: 16 })
        );
        assert_eq!(
            h.alloc_pages(usize::MAX),
            Err(AllocError::OutOfMemory {
                requested: usize::MAX
            })
        );
        assert_eq!(h.alloc(8, 3, 0), Err(AllocError::BadAlignment(3)));
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
                if let Ok(off) = h.alloc(size, align, 0) {
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

/// Model check of the free path of `manager/lifecycle.rs::free`, the order in which a freed
/// page run is emptied and given back: `RUSTFLAGS="--cfg loom" cargo test -p mpkvirt --lib
/// --release loom` (`ci/test.sh loom`).
///
/// Two threads share one heap behind a mutex. One frees a page run and *empties* it (in the
/// library: `MADV_DONTNEED` or a fresh mapping, here stores of zero to loom atomics standing
/// for the run's bytes); the other allocates a run and writes its marker there, outside the
/// lock as a program does. Emptying the run before [`DomainHeap::release_run`], while holding
/// the heap, never loses the new owner's write; emptying it after giving it back and dropping
/// the lock (the order before issue 8's fixes) lets the emptying land on the new owner's data.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use crate::primitive::{AtomicU32, Mutex, Ordering};
    use loom::sync::Arc;
    use loom::thread;

    const PAGE: usize = 4096;
    const PAGES: usize = 2;
    /// What the freed run held before (its previous owner's data).
    const OLD: u32 = 0x11;
    /// What the new owner writes.
    const MARKER: u32 = 0xab;

    /// The domain's memory: one atomic per page stands for the page's bytes.
    struct Memory([AtomicU32; PAGES]);

    impl Memory {
        fn empty(&self, start: usize, len: usize) {
            for page in start / PAGE..(start + len) / PAGE {
                self.0[page].store(0, Ordering::Relaxed);
            }
        }
        fn page(&self, off: usize) -> &AtomicU32 {
            &self.0[off / PAGE]
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Order {
        /// Empty the run, then `release_run`, with the heap held throughout (today's).
        EmptyThenRelease,
        /// `release_run`, drop the heap, then empty the run (the old order).
        ReleaseThenEmpty,
    }

    fn model(order: Order) {
        loom::model(move || {
            // A full heap of two pages: the run freed below is the only one a new allocation
            // can get.
            let mut heap = DomainHeap::new(PAGES * PAGE, PAGE);
            let freed = heap.alloc_pages(1).unwrap();
            let _kept = heap.alloc_pages(1).unwrap();
            let heap = Arc::new(Mutex::new(heap));
            let mem = Arc::new(Memory([AtomicU32::new(0), AtomicU32::new(0)]));
            mem.page(freed).store(OLD, Ordering::Relaxed);

            let freer = {
                let (heap, mem) = (Arc::clone(&heap), Arc::clone(&mem));
                thread::spawn(move || {
                    let mut h = heap.lock().unwrap();
                    let run = h.free_begin(freed).unwrap().run.unwrap();
                    match order {
                        Order::EmptyThenRelease => {
                            mem.empty(run.0, run.1);
                            h.release_run(run.0, run.1);
                            drop(h);
                        }
                        Order::ReleaseThenEmpty => {
                            h.release_run(run.0, run.1);
                            drop(h);
                            mem.empty(run.0, run.1);
                        }
                    }
                })
            };
            let owner = {
                let (heap, mem) = (Arc::clone(&heap), Arc::clone(&mem));
                thread::spawn(move || {
                    let got = heap.lock().unwrap().alloc_pages(1).ok();
                    if let Some(off) = got {
                        if order == Order::EmptyThenRelease {
                            assert_eq!(
                                mem.page(off).load(Ordering::Relaxed),
                                0,
                                "a reused run still holds its old contents"
                            );
                        }
                        mem.page(off).store(MARKER, Ordering::Relaxed);
                    }
                    got
                })
            };
            freer.join().unwrap();
            if let Some(off) = owner.join().unwrap() {
                assert_eq!(off, freed);
                assert_eq!(
                    mem.page(off).load(Ordering::Relaxed),
                    MARKER,
                    "the new owner's write was lost to a late emptying"
                );
            }
        });
    }

    #[test]
    fn loom_emptying_before_release_never_loses_the_new_owners_write() {
        model(Order::EmptyThenRelease);
    }

    #[test]
    #[should_panic(expected = "the new owner's write was lost")]
    fn loom_emptying_after_release_loses_the_new_owners_write() {
        model(Order::ReleaseThenEmpty);
    }
}
