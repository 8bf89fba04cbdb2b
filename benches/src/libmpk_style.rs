//! A libmpk-style key cache, written from the paper's description (Park et al., "libmpk:
//! Software Abstraction for Intel Memory Protection Keys", USENIX ATC 2019) and the
//! structure of its released code (`sslab-gatech/libmpk`, `lib/mpt.cc`) — no code of
//! libmpk's is used:
//!
//! - one process-wide mutex around all metadata (libmpk's `std::mutex`);
//! - a hash map from virtual key to its region and hardware key;
//! - a doubly linked LRU list of hardware keys, moved to the front on every use;
//! - a hit is lock + lookup + list move + RDPKRU/WRPKRU of that key's two bits;
//! - a miss evicts the list's tail and re-tags twice: the victim's pages to key 0 with no
//!   access, then the new region to the freed key.
//!
//! PKRU is the real register when a [`mpkvirt_sys::Pku`] token is given, else a per-thread
//! variable (the same cost model as mpkvirt's simulated backend). Page tagging uses the same
//! system calls as mpkvirt's backends, or none in the simulated configuration.
//!
//! # Safety
//!
//! WRPKRU is executed only with a `Pku` token (OSPKE set) and changes only the bits of the
//! cache's own keys, as libmpk's `pkey_set` does.
#![allow(
    unsafe_code,
    reason = "WRPKRU for the hardware configuration of the baseline"
)]

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;

use mpkvirt_sys::mman::Prot;
use mpkvirt_sys::{AccessRights, Pkey, Pkru, Pku};

thread_local! {
    static SOFT_PKRU: Cell<Pkru> = const { Cell::new(Pkru::LINUX_INIT) };
}

/// How pages are re-tagged on a miss.
pub type Retag = Box<dyn Fn(usize, usize, Prot, Option<Pkey>) + Send + Sync>;

struct Region {
    addr: usize,
    len: usize,
    slot: Option<usize>,
}

struct Meta {
    regions: HashMap<u32, Region>,
    /// Slot -> virtual key bound to it.
    bound: Vec<Option<u32>>,
    /// LRU list over slots: `prev`/`next` links, `head` is the most recently used.
    prev: Vec<Option<usize>>,
    next: Vec<Option<usize>>,
    head: Option<usize>,
    tail: Option<usize>,
}

impl Meta {
    fn unlink(&mut self, s: usize) {
        match self.prev[s] {
            Some(p) => self.next[p] = self.next[s],
            None if self.head == Some(s) => self.head = self.next[s],
            None => {}
        }
        match self.next[s] {
            Some(n) => self.prev[n] = self.prev[s],
            None if self.tail == Some(s) => self.tail = self.prev[s],
            None => {}
        }
        self.prev[s] = None;
        self.next[s] = None;
    }

    fn push_front(&mut self, s: usize) {
        self.next[s] = self.head;
        self.prev[s] = None;
        if let Some(h) = self.head {
            self.prev[h] = Some(s);
        }
        self.head = Some(s);
        if self.tail.is_none() {
            self.tail = Some(s);
        }
    }
}

/// The libmpk-style cache.
pub struct LibmpkStyle {
    keys: Vec<Pkey>,
    meta: Mutex<Meta>,
    retag: Retag,
    pku: Option<Pku>,
}

impl std::fmt::Debug for LibmpkStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibmpkStyle")
            .field("keys", &self.keys)
            .finish()
    }
}

impl LibmpkStyle {
    /// A cache over `keys`, re-tagging with `retag`, writing the real PKRU if `pku` is given.
    pub fn new(keys: Vec<Pkey>, retag: Retag, pku: Option<Pku>) -> LibmpkStyle {
        let n = keys.len();
        LibmpkStyle {
            keys,
            meta: Mutex::new(Meta {
                regions: HashMap::new(),
                bound: vec![None; n],
                prev: vec![None; n],
                next: vec![None; n],
                head: None,
                tail: None,
            }),
            retag,
            pku,
        }
    }

    /// `mpk_mmap`: registers region `[addr, addr + len)` under virtual key `vkey`.
    pub fn register(&self, vkey: u32, addr: usize, len: usize) {
        self.meta.lock().unwrap().regions.insert(
            vkey,
            Region {
                addr,
                len,
                slot: None,
            },
        );
    }

    fn set_rights(&self, key: Pkey, rights: AccessRights) {
        match self.pku {
            Some(pku) => {
                let v = pku.rdpkru().with(key, rights);
                // SAFETY: the benchmark owns this thread's PKRU; only the key's two bits
                // change and key 0 stays accessible.
                unsafe { pku.wrpkru(v) }
            }
            None => SOFT_PKRU.set(SOFT_PKRU.get().with(key, rights)),
        }
    }

    /// `mpk_begin(vkey, prot)`: makes the region accessible to the calling thread.
    pub fn begin(&self, vkey: u32, rights: AccessRights) {
        let mut m = self.meta.lock().unwrap();
        let slot = match m.regions.get(&vkey).and_then(|r| r.slot) {
            Some(s) => {
                m.unlink(s);
                s
            }
            None => self.miss(&mut m, vkey),
        };
        m.push_front(slot);
        self.set_rights(self.keys[slot], rights);
    }

    /// `mpk_end(vkey)`: makes the region inaccessible to the calling thread again.
    pub fn end(&self, vkey: u32) {
        let m = self.meta.lock().unwrap();
        if let Some(s) = m.regions.get(&vkey).and_then(|r| r.slot) {
            self.set_rights(self.keys[s], AccessRights::DISABLE_ACCESS);
        }
    }

    fn miss(&self, m: &mut Meta, vkey: u32) -> usize {
        let slot = match m.bound.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                let victim = m.tail.expect("all slots bound");
                m.unlink(victim);
                let old = m.bound[victim].take().expect("bound");
                let r = m.regions.get_mut(&old).expect("region");
                r.slot = None;
                (self.retag)(r.addr, r.len, Prot::NONE, None);
                victim
            }
        };
        let r = m.regions.get_mut(&vkey).expect("registered region");
        r.slot = Some(slot);
        (self.retag)(r.addr, r.len, Prot::READ_WRITE, Some(self.keys[slot]));
        m.bound[slot] = Some(vkey);
        slot
    }
}
