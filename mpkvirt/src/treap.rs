//! An ordered map of address ranges, `start -> (len, value)`, that keeps all its memory in
//! one vector of a caller-chosen allocator: a treap augmented with the longest range of
//! each subtree, for first-fit allocation and address lookups in O(log n).
//!
//! # Structure
//!
//! - Nodes live in one `allocator_api2::vec::Vec<Node<V>, A>` and name each other by `u32`
//!   index ([`NIL`] for none): left child, right child, parent. A removed node goes on a
//!   free list threaded through its `right` field and is reused by the next insertion, so
//!   the vector only grows to the most entries ever held at once, and there is no
//!   allocation per node and nothing allocated outside the vector: with `A` a region
//!   allocator, every byte of the map lives in that region.
//! - The tree is a binary search tree by `start` and a max-heap by priority. A node's
//!   priority is a hash of its key (the splitmix64 finaliser, a bijection of `u64`, so
//!   distinct keys never tie): the tree's shape is a function of the key set alone, as
//!   balanced as a treap with random priorities (expected depth O(log n)) for keys not
//!   chosen against the hash (ours are addresses the library picks). No random number
//!   generator and no state.
//! - Each node also stores `max`, the largest `len` in its subtree, which [`Treap::first_fit`]
//!   follows down to the lowest-addressed range that is long enough.
//!
//! # Complexity
//!
//! Every operation walks one root-to-leaf path down, and perhaps back up through parent
//! links, so costs O(depth), O(log n) expected: `insert`, `remove`, `get`, `set_len`,
//! `floor`, `ceiling`, `first_fit`. Nothing recurses. Iteration follows parent links, O(1)
//! amortised per entry and no allocation.
//!
//! - Insert attaches a leaf, rotates it up while its priority beats its parent's, then
//!   refreshes `max` upwards (stopping at the first ancestor whose `max` is unchanged: the
//!   ones above depend only on it).
//! - Remove rotates the node down, each time below its child of higher priority, until it
//!   has at most one child, splices it out and refreshes `max` upwards the same way.
//!
//! # Allocation failure
//!
//! Only inserting a new key while the free list is empty can grow the vector.
//! [`Treap::try_insert`] reports a failure as a [`TryReserveError`] and leaves the map as it
//! was; [`Treap::insert`] aborts on it like the `std` collections. [`Treap::try_reserve`]
//! makes room in advance. At most `u32::MAX` entries fit (indices are `u32`).

use std::cmp::Ordering;
use std::fmt;

use allocator_api2::alloc::{Allocator, Global, handle_alloc_error};
use allocator_api2::collections::{TryReserveError, TryReserveErrorKind};
use allocator_api2::vec::Vec;

/// No node.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node<V> {
    start: usize,
    len: usize,
    /// The largest `len` in this node's subtree.
    max: usize,
    left: u32,
    /// For a free slot: the next free slot.
    right: u32,
    parent: u32,
    value: V,
}

/// The heap priority of `key`: the splitmix64 finaliser, a bijection (no ties).
fn priority(key: usize) -> u64 {
    let mut x = key as u64;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Ends the program on a failure to allocate, as the infallible `std` collections do:
/// [`handle_alloc_error`] for the allocator's failure, a panic for a capacity overflow.
pub(crate) fn alloc_failed(e: TryReserveError) -> ! {
    match e.kind() {
        TryReserveErrorKind::AllocError { layout, .. } => handle_alloc_error(layout),
        TryReserveErrorKind::CapacityOverflow => panic!("capacity overflow"),
    }
}

/// An ordered map from range starts to `(len, value)`, with first fit by length. See the
/// module docs.
pub(crate) struct Treap<V: Copy, A: Allocator + Clone = Global> {
    /// Live nodes and free slots.
    nodes: Vec<Node<V>, A>,
    root: u32,
    /// Head of the free-slot list.
    free: u32,
    /// Live nodes.
    count: usize,
}

impl<V: Copy> Treap<V> {
    /// An empty map on the global allocator.
    pub(crate) fn new() -> Treap<V> {
        Treap::new_in(Global)
    }
}

impl<V: Copy> Default for Treap<V> {
    fn default() -> Treap<V> {
        Treap::new()
    }
}

impl<V: Copy, A: Allocator + Clone> Treap<V, A> {
    /// An empty map whose nodes will live in `alloc`. Allocates nothing yet.
    pub(crate) fn new_in(alloc: A) -> Treap<V, A> {
        Treap {
            nodes: Vec::new_in(alloc),
            root: NIL,
            free: NIL,
            count: 0,
        }
    }

    /// Entries in the map.
    #[allow(
        dead_code,
        reason = "part of the map's interface; only tests use it so far"
    )]
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Whether the map has no entry.
    #[allow(
        dead_code,
        reason = "part of the map's interface; only tests use it so far"
    )]
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Makes room for `additional` more entries, so that inserting them cannot allocate.
    pub(crate) fn try_reserve(&mut self, additional: usize) -> Result<(), TryReserveError> {
        let spare = self.nodes.len() - self.count;
        let grow = additional.saturating_sub(spare);
        if grow == 0 {
            return Ok(());
        }
        // Indices are `u32` and `NIL` is not one.
        if self
            .nodes
            .len()
            .checked_add(grow)
            .is_none_or(|n| n > NIL as usize)
        {
            return Err(TryReserveErrorKind::CapacityOverflow.into());
        }
        self.nodes.try_reserve(grow)
    }

    /// Inserts `start -> (len, value)`; returns the old `(len, value)` of `start`, if any.
    /// Ends the program like the `std` collections ([`alloc_failed`]) when there is no
    /// memory for the node.
    pub(crate) fn insert(&mut self, start: usize, len: usize, value: V) -> Option<(usize, V)> {
        self.try_insert(start, len, value)
            .unwrap_or_else(|e| alloc_failed(e))
    }

    /// [`Treap::insert`], reporting a failure to allocate the node instead of aborting; the
    /// map is unchanged then. Replacing the entry of an existing key never allocates.
    pub(crate) fn try_insert(
        &mut self,
        start: usize,
        len: usize,
        value: V,
    ) -> Result<Option<(usize, V)>, TryReserveError> {
        match self.locate(start) {
            Ok(i) => Ok(Some(self.overwrite(i, len, value))),
            Err(slot) => {
                self.try_reserve(1)?;
                self.attach(slot, start, len, value);
                Ok(None)
            }
        }
    }

    /// Removes the entry of `start`; returns its `(len, value)`. Frees a slot for the next
    /// insertion (never memory).
    pub(crate) fn remove(&mut self, start: usize) -> Option<(usize, V)> {
        let z = self.find(start);
        if z == NIL {
            return None;
        }
        // Rotate `z` down until it has at most one child.
        let child = loop {
            let n = self.n(z);
            match (n.left, n.right) {
                (NIL, c) | (c, NIL) => break c,
                (l, r) => {
                    let up = if priority(self.n(l).start) > priority(self.n(r).start) {
                        l
                    } else {
                        r
                    };
                    self.rotate_up(up);
                }
            }
        };
        let Node {
            len, value, parent, ..
        } = *self.n(z);
        self.replace_child(parent, z, child);
        if child != NIL {
            self.n_mut(child).parent = parent;
        }
        self.refresh_from(parent);
        let next_free = self.free;
        let slot = self.n_mut(z);
        slot.left = NIL;
        slot.parent = NIL;
        slot.right = next_free;
        self.free = z;
        self.count -= 1;
        Some((len, value))
    }

    /// The `(len, value)` of `start`.
    pub(crate) fn get(&self, start: usize) -> Option<(usize, V)> {
        let i = self.find(start);
        (i != NIL).then(|| (self.n(i).len, self.n(i).value))
    }

    /// Sets the length of the entry of `start`, keeping its value; returns the old length,
    /// or `None` (and changes nothing) when there is no such entry.
    pub(crate) fn set_len(&mut self, start: usize, len: usize) -> Option<usize> {
        let i = self.find(start);
        if i == NIL {
            return None;
        }
        let value = self.n(i).value;
        Some(self.overwrite(i, len, value).0)
    }

    /// The entry `(start, len, value)` with the greatest `start <= key`.
    pub(crate) fn floor(&self, key: usize) -> Option<(usize, usize, V)> {
        let (mut cur, mut best) = (self.root, NIL);
        while cur != NIL {
            let n = self.n(cur);
            if n.start <= key {
                best = cur;
                cur = n.right;
            } else {
                cur = n.left;
            }
        }
        self.entry(best)
    }

    /// The entry `(start, len, value)` with the least `start >= key`.
    pub(crate) fn ceiling(&self, key: usize) -> Option<(usize, usize, V)> {
        let (mut cur, mut best) = (self.root, NIL);
        while cur != NIL {
            let n = self.n(cur);
            if n.start >= key {
                best = cur;
                cur = n.left;
            } else {
                cur = n.right;
            }
        }
        self.entry(best)
    }

    /// The entry `(start, len, value)` with the lowest `start` among those with
    /// `len >= want`.
    ///
    /// One descent: the root's `max` says whether any entry fits; at each node, go left if
    /// the left subtree's `max` fits (everything there has a lower start), else take the node
    /// if it fits, else go right, where the fit must then be.
    pub(crate) fn first_fit(&self, want: usize) -> Option<(usize, usize, V)> {
        if self.root == NIL || self.max_of(self.root) < want {
            return None;
        }
        let mut cur = self.root;
        loop {
            let n = self.n(cur);
            if n.left != NIL && self.max_of(n.left) >= want {
                cur = n.left;
            } else if n.len >= want {
                return self.entry(cur);
            } else {
                debug_assert!(self.max_of(n.right) >= want, "stale max at {:#x}", n.start);
                cur = n.right;
            }
        }
    }

    /// The entries `(start, len, value)` in order of `start`.
    pub(crate) fn iter(&self) -> Iter<'_, V, A> {
        Iter {
            treap: self,
            next: self.leftmost(self.root),
            remaining: self.count,
        }
    }

    // ---- internals ------------------------------------------------------------------------

    fn n(&self, i: u32) -> &Node<V> {
        &self.nodes[i as usize]
    }

    fn n_mut(&mut self, i: u32) -> &mut Node<V> {
        &mut self.nodes[i as usize]
    }

    fn entry(&self, i: u32) -> Option<(usize, usize, V)> {
        (i != NIL).then(|| {
            let n = self.n(i);
            (n.start, n.len, n.value)
        })
    }

    fn max_of(&self, i: u32) -> usize {
        if i == NIL { 0 } else { self.n(i).max }
    }

    /// The node of `key`, or `NIL`.
    fn find(&self, key: usize) -> u32 {
        match self.locate(key) {
            Ok(i) => i,
            Err(_) => NIL,
        }
    }

    /// The node of `key`, or where it would be attached: `(parent, as its left child)`.
    fn locate(&self, key: usize) -> Result<u32, (u32, bool)> {
        let (mut cur, mut slot) = (self.root, (NIL, false));
        while cur != NIL {
            let n = self.n(cur);
            cur = match key.cmp(&n.start) {
                Ordering::Less => {
                    slot = (cur, true);
                    n.left
                }
                Ordering::Greater => {
                    slot = (cur, false);
                    n.right
                }
                Ordering::Equal => return Ok(cur),
            };
        }
        Err(slot)
    }

    /// Replaces the length and value of node `i`; returns the old ones.
    fn overwrite(&mut self, i: u32, len: usize, value: V) -> (usize, V) {
        let n = self.n_mut(i);
        let old = (n.len, n.value);
        n.len = len;
        n.value = value;
        self.refresh_from(i);
        old
    }

    /// Links a new node in at `slot` (from [`Self::locate`]) and restores the heap order.
    /// There must be a free slot or spare capacity.
    fn attach(&mut self, (parent, left): (u32, bool), start: usize, len: usize, value: V) {
        let node = Node {
            start,
            len,
            max: len,
            left: NIL,
            right: NIL,
            parent,
            value,
        };
        let x = if self.free != NIL {
            let x = self.free;
            self.free = self.n(x).right;
            *self.n_mut(x) = node;
            x
        } else {
            debug_assert!(
                self.nodes.len() < self.nodes.capacity() && self.nodes.len() < NIL as usize
            );
            // Below `NIL` (checked by the callers' reservation).
            let x = self.nodes.len() as u32;
            self.nodes.push(node);
            x
        };
        if parent == NIL {
            self.root = x;
        } else if left {
            self.n_mut(parent).left = x;
        } else {
            self.n_mut(parent).right = x;
        }
        self.count += 1;
        let p = priority(start);
        loop {
            let parent = self.n(x).parent;
            if parent == NIL || priority(self.n(parent).start) > p {
                break;
            }
            self.rotate_up(x);
        }
        self.refresh_from(self.n(x).parent);
    }

    /// Rotates `x` above its parent, keeping the key order, and recomputes both `max`es (the
    /// subtree they head together holds the same entries as before, so ancestors keep theirs).
    fn rotate_up(&mut self, x: u32) {
        let p = self.n(x).parent;
        let g = self.n(p).parent;
        let inner = if self.n(p).left == x {
            let b = self.n(x).right;
            self.n_mut(p).left = b;
            self.n_mut(x).right = p;
            b
        } else {
            let b = self.n(x).left;
            self.n_mut(p).right = b;
            self.n_mut(x).left = p;
            b
        };
        if inner != NIL {
            self.n_mut(inner).parent = p;
        }
        self.n_mut(p).parent = x;
        self.n_mut(x).parent = g;
        self.replace_child(g, p, x);
        self.pull(p);
        self.pull(x);
    }

    /// Makes `new` the child of `parent` that `old` was (the root when `parent` is `NIL`).
    fn replace_child(&mut self, parent: u32, old: u32, new: u32) {
        if parent == NIL {
            self.root = new;
        } else if self.n(parent).left == old {
            self.n_mut(parent).left = new;
        } else {
            self.n_mut(parent).right = new;
        }
    }

    /// Recomputes `max` of node `i` from its children; returns whether it changed.
    fn pull(&mut self, i: u32) -> bool {
        let n = *self.n(i);
        let max = n.len.max(self.max_of(n.left)).max(self.max_of(n.right));
        self.n_mut(i).max = max;
        max != n.max
    }

    /// Recomputes `max` from `i` up, while it changes (an ancestor of a node whose `max`
    /// did not change keeps its own).
    fn refresh_from(&mut self, mut i: u32) {
        while i != NIL && self.pull(i) {
            i = self.n(i).parent;
        }
    }

    fn leftmost(&self, mut i: u32) -> u32 {
        if i == NIL {
            return NIL;
        }
        while self.n(i).left != NIL {
            i = self.n(i).left;
        }
        i
    }

    /// The node after `i` in key order, or `NIL`.
    fn successor(&self, i: u32) -> u32 {
        let right = self.n(i).right;
        if right != NIL {
            return self.leftmost(right);
        }
        let (mut child, mut parent) = (i, self.n(i).parent);
        while parent != NIL && self.n(parent).right == child {
            child = parent;
            parent = self.n(parent).parent;
        }
        parent
    }
}

#[cfg(test)]
impl<V: Copy, A: Allocator + Clone> Treap<V, A> {
    /// Panics unless the structure is sound: parent links, key order, heap order of the
    /// priorities, `max` of every node, the entry count, and every slot either reachable
    /// from the root or on the free list, exactly once.
    pub(crate) fn assert_invariants(&self) {
        let mut seen = vec![false; self.nodes.len()];
        let mut live = 0;
        if self.root != NIL {
            assert_eq!(self.n(self.root).parent, NIL, "root has a parent");
        }
        // (node, exclusive lower bound, exclusive upper bound of its keys)
        let mut stack = vec![(self.root, None::<usize>, None::<usize>)];
        while let Some((i, lo, hi)) = stack.pop() {
            if i == NIL {
                continue;
            }
            assert!(!seen[i as usize], "node {i} reached twice");
            seen[i as usize] = true;
            live += 1;
            let n = self.n(i);
            assert!(
                lo.is_none_or(|lo| n.start > lo),
                "key order at {:#x}",
                n.start
            );
            assert!(
                hi.is_none_or(|hi| n.start < hi),
                "key order at {:#x}",
                n.start
            );
            for c in [n.left, n.right] {
                if c != NIL {
                    assert_eq!(self.n(c).parent, i, "parent link of {c}");
                    assert!(
                        priority(self.n(c).start) < priority(n.start),
                        "heap order at {:#x}",
                        n.start
                    );
                }
            }
            let max = n.len.max(self.max_of(n.left)).max(self.max_of(n.right));
            assert_eq!(n.max, max, "max at {:#x}", n.start);
            stack.push((n.left, lo, Some(n.start)));
            stack.push((n.right, Some(n.start), hi));
        }
        assert_eq!(live, self.count, "entry count");
        let mut f = self.free;
        while f != NIL {
            assert!(!seen[f as usize], "free slot {f} is live or listed twice");
            seen[f as usize] = true;
            f = self.n(f).right;
        }
        assert!(seen.iter().all(|&s| s), "a slot is neither live nor free");
    }

    /// The number of nodes on the longest root-to-leaf path.
    pub(crate) fn height(&self) -> usize {
        let mut stack = vec![(self.root, 0)];
        let mut height = 0;
        while let Some((i, depth)) = stack.pop() {
            if i == NIL {
                height = height.max(depth);
                continue;
            }
            stack.push((self.n(i).left, depth + 1));
            stack.push((self.n(i).right, depth + 1));
        }
        height
    }

    /// Slots in the node vector (live or free).
    pub(crate) fn slots(&self) -> usize {
        self.nodes.len()
    }
}

impl<V: Copy + fmt::Debug, A: Allocator + Clone> fmt::Debug for Treap<V, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(s, l, v)| (s, (l, v))))
            .finish()
    }
}

/// The entries of a [`Treap`] in key order: `(start, len, value)`.
pub(crate) struct Iter<'a, V: Copy, A: Allocator + Clone> {
    treap: &'a Treap<V, A>,
    next: u32,
    remaining: usize,
}

impl<V: Copy, A: Allocator + Clone> Iterator for Iter<'_, V, A> {
    type Item = (usize, usize, V);

    fn next(&mut self) -> Option<(usize, usize, V)> {
        let entry = self.treap.entry(self.next)?;
        self.next = self.treap.successor(self.next);
        self.remaining -= 1;
        Some(entry)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<V: Copy, A: Allocator + Clone> ExactSizeIterator for Iter<'_, V, A> {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::test_alloc::Budget;
    use proptest::prelude::*;

    const PAGE: usize = 4096;

    fn entries<V: Copy, A: Allocator + Clone>(t: &Treap<V, A>) -> std::vec::Vec<(usize, usize, V)> {
        t.iter().collect()
    }

    #[test]
    fn empty_map_finds_nothing() {
        let t = Treap::<u8>::new();
        t.assert_invariants();
        assert!(t.is_empty());
        assert_eq!(t.len(), 0);
        assert_eq!(t.get(0), None);
        assert_eq!(t.floor(usize::MAX), None);
        assert_eq!(t.ceiling(0), None);
        assert_eq!(t.first_fit(0), None);
        assert_eq!(t.iter().next(), None);
        assert_eq!(t.slots(), 0, "nothing allocated");
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut t = Treap::new();
        assert_eq!(t.insert(10, 5, 'a'), None);
        assert_eq!(t.insert(30, 1, 'b'), None);
        assert_eq!(t.insert(20, 7, 'c'), None);
        t.assert_invariants();
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(20), Some((7, 'c')));
        assert_eq!(t.get(21), None);
        assert_eq!(t.insert(20, 2, 'd'), Some((7, 'c')), "replaces");
        assert_eq!(t.len(), 3);
        assert_eq!(t.set_len(30, 9), Some(1));
        assert_eq!(t.set_len(31, 9), None);
        t.assert_invariants();
        assert_eq!(entries(&t), [(10, 5, 'a'), (20, 2, 'd'), (30, 9, 'b')]);
        assert_eq!(t.remove(20), Some((2, 'd')));
        assert_eq!(t.remove(20), None);
        t.assert_invariants();
        assert_eq!(entries(&t), [(10, 5, 'a'), (30, 9, 'b')]);
        assert_eq!(format!("{t:?}"), "{10: (5, 'a'), 30: (9, 'b')}");
    }

    #[test]
    fn floor_and_ceiling_at_the_edges() {
        let mut t = Treap::new();
        for k in [0, 100, 200, usize::MAX] {
            t.insert(k, 1, ());
        }
        assert_eq!(t.floor(0), Some((0, 1, ())));
        assert_eq!(t.floor(99).map(|e| e.0), Some(0));
        assert_eq!(t.floor(100).map(|e| e.0), Some(100));
        assert_eq!(t.floor(usize::MAX - 1).map(|e| e.0), Some(200));
        assert_eq!(t.floor(usize::MAX).map(|e| e.0), Some(usize::MAX));
        assert_eq!(t.ceiling(1).map(|e| e.0), Some(100));
        assert_eq!(t.ceiling(200).map(|e| e.0), Some(200));
        assert_eq!(t.ceiling(201).map(|e| e.0), Some(usize::MAX));
        t.remove(0);
        t.remove(usize::MAX);
        assert_eq!(t.floor(99), None);
        assert_eq!(t.ceiling(201), None);
    }

    #[test]
    fn first_fit_takes_the_lowest_start_not_the_best_fit() {
        let mut t = Treap::new();
        for (start, len) in [(0, 1), (10, 8), (20, 3), (30, 4), (40, 100)] {
            t.insert(start, len, ());
        }
        assert_eq!(t.first_fit(0).map(|e| e.0), Some(0));
        assert_eq!(t.first_fit(2).map(|e| e.0), Some(10));
        assert_eq!(t.first_fit(8).map(|e| e.0), Some(10));
        assert_eq!(t.first_fit(9).map(|e| e.0), Some(40));
        assert_eq!(t.first_fit(101), None);
        t.set_len(10, 2);
        assert_eq!(t.first_fit(3).map(|e| e.0), Some(20));
        t.remove(40);
        assert_eq!(t.first_fit(9), None);
        t.assert_invariants();
    }

    #[test]
    fn removed_slots_are_reused() {
        let mut t = Treap::new();
        for k in 0..100 {
            t.insert(k * PAGE, PAGE, k);
        }
        for k in 0..100 {
            assert_eq!(t.remove(k * PAGE), Some((PAGE, k)));
            t.insert(k * PAGE + 1, 1, k);
        }
        t.assert_invariants();
        assert_eq!(
            t.slots(),
            100,
            "no growth past the most entries held at once"
        );
    }

    /// 30,000 page-aligned ranges (the manager's and heaps' kind of key) make a shallow
    /// tree, however they arrive. Deterministic: the priorities are a function of the keys.
    #[test]
    fn page_aligned_keys_make_a_shallow_tree() {
        const N: usize = 30_000;
        let base = 0x7f00_0000_0000;
        let orders: [&dyn Fn(usize) -> usize; 3] = [
            &|i| i,
            &|i| N - 1 - i,
            &|i| (i * 7919) % N, // 7919 is prime, so this is a permutation
        ];
        for order in orders {
            let mut t = Treap::new();
            for i in 0..N {
                let k = order(i);
                t.insert(base + 2 * k * PAGE, PAGE * (k % 17 + 1), ());
            }
            t.assert_invariants();
            let h = t.height();
            // With random priorities the average depth would be about 2 ln n ~ 21 and the
            // height about 40; these keys give 39 (the same in every order).
            assert!(h <= 48, "height {h}");
            // Every hole of 17 pages, then 16...: first fit finds the lowest one.
            for want in 1..=17 {
                let k = (0..N).find(|k| k % 17 + 1 >= want).unwrap();
                assert_eq!(
                    t.first_fit(want * PAGE).map(|e| e.0),
                    Some(base + 2 * k * PAGE)
                );
            }
            for i in 0..N {
                let k = order(i);
                assert!(t.remove(base + 2 * k * PAGE).is_some());
            }
            assert!(t.is_empty());
            t.assert_invariants();
        }
    }

    #[test]
    fn nodes_live_in_the_given_allocator() {
        let budget = Budget::new(usize::MAX);
        let mut t = Treap::new_in(budget.clone());
        assert_eq!(budget.held(), 0);
        for k in 0..1000 {
            t.insert(k, 1, 0u32);
        }
        assert!(budget.held() >= 1000 * size_of::<Node<u32>>());
        drop(t);
        assert_eq!(budget.held(), 0, "everything given back");
    }

    #[test]
    fn try_insert_reports_allocation_failure_and_changes_nothing() {
        let budget = Budget::new(usize::MAX);
        let mut t = Treap::new_in(budget.clone());
        let mut k = 0;
        // Fill exactly the vector's current capacity.
        t.insert(k, 1, ());
        while t.slots() < t.nodes.capacity() {
            k += 1;
            assert_eq!(t.try_insert(k, 1, ()), Ok(None));
        }
        budget.set_limit(budget.held());
        let before = entries(&t);
        let err = t.try_insert(k + 1, 1, ()).unwrap_err();
        assert!(matches!(err.kind(), TryReserveErrorKind::AllocError { .. }));
        t.assert_invariants();
        assert_eq!(entries(&t), before, "unchanged");
        assert_eq!(t.try_reserve(1), Err(err));
        // Replacing needs no memory; neither does an insertion into a freed slot.
        assert_eq!(t.try_insert(0, 5, ()), Ok(Some((1, ()))));
        assert_eq!(t.remove(0), Some((5, ())));
        assert_eq!(t.try_insert(k + 1, 1, ()), Ok(None));
        t.assert_invariants();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(usize, usize, u8),
        TryInsert(usize, usize, u8),
        Remove(usize),
        SetLen(usize, usize),
        Get(usize),
        Floor(usize),
        Ceiling(usize),
        FirstFit(usize),
    }

    fn key() -> impl Strategy<Value = usize> {
        prop_oneof![
            8 => 0usize..64,
            1 => Just(usize::MAX),
            1 => any::<usize>(),
        ]
    }

    fn len() -> impl Strategy<Value = usize> {
        prop_oneof![8 => 0usize..40, 1 => Just(usize::MAX)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (key(), len(), any::<u8>()).prop_map(|(k, l, v)| Op::Insert(k, l, v)),
            1 => (key(), len(), any::<u8>()).prop_map(|(k, l, v)| Op::TryInsert(k, l, v)),
            3 => key().prop_map(Op::Remove),
            1 => (key(), len()).prop_map(|(k, l)| Op::SetLen(k, l)),
            1 => key().prop_map(Op::Get),
            1 => key().prop_map(Op::Floor),
            1 => key().prop_map(Op::Ceiling),
            2 => len().prop_map(Op::FirstFit),
        ]
    }

    type Model = BTreeMap<usize, (usize, u8)>;

    fn flat((&k, &(l, v)): (&usize, &(usize, u8))) -> (usize, usize, u8) {
        (k, l, v)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec(op(), 1..300)) {
            let mut t = Treap::new();
            let mut m = Model::new();
            let mut peak = 0;
            for op in ops {
                match op {
                    Op::Insert(k, l, v) => prop_assert_eq!(t.insert(k, l, v), m.insert(k, (l, v))),
                    Op::TryInsert(k, l, v) => {
                        prop_assert_eq!(t.try_insert(k, l, v), Ok(m.insert(k, (l, v))));
                    }
                    Op::Remove(k) => prop_assert_eq!(t.remove(k), m.remove(&k)),
                    Op::SetLen(k, l) => prop_assert_eq!(
                        t.set_len(k, l),
                        m.get_mut(&k).map(|e| std::mem::replace(&mut e.0, l))
                    ),
                    Op::Get(k) => prop_assert_eq!(t.get(k), m.get(&k).copied()),
                    Op::Floor(k) => prop_assert_eq!(t.floor(k), m.range(..=k).next_back().map(flat)),
                    Op::Ceiling(k) => prop_assert_eq!(t.ceiling(k), m.range(k..).next().map(flat)),
                    Op::FirstFit(l) => prop_assert_eq!(
                        t.first_fit(l),
                        m.iter().find(|(_, e)| e.0 >= l).map(flat)
                    ),
                }
                t.assert_invariants();
                prop_assert_eq!(t.len(), m.len());
                prop_assert_eq!(t.is_empty(), m.is_empty());
                prop_assert!(t.iter().eq(m.iter().map(flat)));
                // Slots are reused: the vector holds as many as there ever were entries.
                peak = peak.max(m.len());
                prop_assert_eq!(t.slots(), peak);
            }
        }
    }
}
