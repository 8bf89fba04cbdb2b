//! deflate_rs: DEFLATE (RFC 1951) compression and decompression of the request body.
//!
//! Request: one byte, `c` (compress) or `d` (decompress), then the data. Compression writes
//! one final block with the fixed Huffman codes, after greedy LZ77 matching over an 8 KiB
//! window (hash chains); decompression reads any valid stream (stored, fixed and dynamic
//! blocks). Answers: the output; code 1 for a bad request or a corrupt stream, 2 when the
//! instance's memory quota is spent.
#![no_std]

#[path = "abi.rs"]
#[allow(dead_code, reason = "the ABI module is shared by every Rust tenant")]
mod abi;

use abi::Buf;

#[unsafe(no_mangle)]
pub static mpkvirt_fn_abi_version: u32 = abi::ABI_VERSION;

/// Why a stream could not be decoded or produced.
enum Error {
    Corrupt,
    Memory,
}

/// Base lengths of length symbols 257..=285, and their extra bits.
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
    131, 163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Base distances of distance symbols 0..=29, and their extra bits.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order in which a dynamic block lists the code-length code's lengths.
const CLEN_ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

// ----- decompression -----

/// The input, read least significant bit first.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u64,
    count: u32,
}

impl Bits<'_> {
    /// The next `n` (≤ 16) bits.
    fn get(&mut self, n: u32) -> Result<u32, Error> {
        while self.count < n {
            let &b = self.data.get(self.pos).ok_or(Error::Corrupt)?;
            self.pos += 1;
            self.buf |= u64::from(b) << self.count;
            self.count += 8;
        }
        let v = (self.buf & ((1u64 << n) - 1)) as u32;
        self.buf >>= n;
        self.count -= n;
        Ok(v)
    }

    /// Drops the bits left of the current byte.
    fn align(&mut self) {
        let drop = self.count % 8;
        self.buf >>= drop;
        self.count -= drop;
    }
}

/// A canonical Huffman code: how many codes have each length, and the symbols in code order.
struct Code {
    counts: [u16; 16],
    symbols: [u16; 320],
}

impl Code {
    fn new(lengths: &[u8]) -> Result<Code, Error> {
        let mut c = Code {
            counts: [0; 16],
            symbols: [0; 320],
        };
        for &l in lengths {
            c.counts[usize::from(l)] += 1;
        }
        // No length may have more codes than the shorter ones leave room for.
        let mut room: i32 = 1;
        for len in 1..16 {
            room = (room << 1) - i32::from(c.counts[len]);
            if room < 0 {
                return Err(Error::Corrupt);
            }
        }
        let mut next = [0u16; 16];
        for len in 1..15 {
            next[len + 1] = next[len] + c.counts[len];
        }
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                c.symbols[usize::from(next[usize::from(l)])] = sym as u16;
                next[usize::from(l)] += 1;
            }
        }
        Ok(c)
    }

    /// The next symbol: the code's bits arrive most significant first, one at a time; the
    /// codes of each length are consecutive numbers after those of the shorter lengths.
    fn decode(&self, bits: &mut Bits<'_>) -> Result<u16, Error> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.get(1)? as i32;
            let count = i32::from(self.counts[len]);
            if code - first < count {
                return Ok(self.symbols[(index + code - first) as usize]);
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err(Error::Corrupt)
    }
}

fn fixed_codes() -> Result<(Code, Code), Error> {
    let mut lengths = [0u8; 288];
    for (i, l) in lengths.iter_mut().enumerate() {
        *l = match i {
            0..=143 => 8,
            144..=255 => 9,
            256..=279 => 7,
            _ => 8,
        };
    }
    Ok((Code::new(&lengths)?, Code::new(&[5; 30])?))
}

fn dynamic_codes(bits: &mut Bits<'_>) -> Result<(Code, Code), Error> {
    let nlit = bits.get(5)? as usize + 257;
    let ndist = bits.get(5)? as usize + 1;
    let nclen = bits.get(4)? as usize + 4;
    if nlit > 286 || ndist > 30 {
        return Err(Error::Corrupt);
    }
    let mut clen = [0u8; 19];
    for &i in &CLEN_ORDER[..nclen] {
        clen[i] = bits.get(3)? as u8;
    }
    let clcode = Code::new(&clen)?;
    let mut lengths = [0u8; 316];
    let mut i = 0;
    while i < nlit + ndist {
        let sym = clcode.decode(bits)?;
        let (value, repeat) = match sym {
            0..=15 => (sym as u8, 1),
            16 => {
                let &prev = lengths[..i].last().ok_or(Error::Corrupt)?;
                (prev, 3 + bits.get(2)? as usize)
            }
            17 => (0, 3 + bits.get(3)? as usize),
            18 => (0, 11 + bits.get(7)? as usize),
            _ => return Err(Error::Corrupt),
        };
        if i + repeat > nlit + ndist {
            return Err(Error::Corrupt);
        }
        lengths[i..i + repeat].fill(value);
        i += repeat;
    }
    // A block needs its end code.
    if lengths[256] == 0 {
        return Err(Error::Corrupt);
    }
    Ok((
        Code::new(&lengths[..nlit])?,
        Code::new(&lengths[nlit..nlit + ndist])?,
    ))
}

fn inflate_block(
    bits: &mut Bits<'_>,
    out: &mut Buf<'_>,
    lit: &Code,
    dist: &Code,
) -> Result<(), Error> {
    loop {
        let sym = lit.decode(bits)?;
        match sym {
            0..=255 => out.push(sym as u8).ok_or(Error::Memory)?,
            256 => return Ok(()),
            _ => {
                let s = usize::from(sym - 257);
                let (&base, &extra) = LEN_BASE.get(s).zip(LEN_EXTRA.get(s)).ok_or(Error::Corrupt)?;
                let len = usize::from(base) + bits.get(u32::from(extra))? as usize;
                let d = usize::from(dist.decode(bits)?);
                let (&base, &extra) =
                    DIST_BASE.get(d).zip(DIST_EXTRA.get(d)).ok_or(Error::Corrupt)?;
                let back = usize::from(base) + bits.get(u32::from(extra))? as usize;
                let have = out.as_slice().len();
                if back > have {
                    return Err(Error::Corrupt);
                }
                // Byte by byte: a match may overlap what it writes.
                for k in 0..len {
                    let b = out.as_slice()[have - back + k];
                    out.push(b).ok_or(Error::Memory)?;
                }
            }
        }
    }
}

fn inflate(data: &[u8], out: &mut Buf<'_>) -> Result<(), Error> {
    let mut bits = Bits {
        data,
        pos: 0,
        buf: 0,
        count: 0,
    };
    loop {
        let last = bits.get(1)? == 1;
        match bits.get(2)? {
            0 => {
                bits.align();
                let len = bits.get(16)?;
                if len != !bits.get(16)? & 0xffff {
                    return Err(Error::Corrupt);
                }
                for _ in 0..len {
                    out.push(bits.get(8)? as u8).ok_or(Error::Memory)?;
                }
            }
            1 => {
                let (lit, dist) = fixed_codes()?;
                inflate_block(&mut bits, out, &lit, &dist)?;
            }
            2 => {
                let (lit, dist) = dynamic_codes(&mut bits)?;
                inflate_block(&mut bits, out, &lit, &dist)?;
            }
            _ => return Err(Error::Corrupt),
        }
        if last {
            return Ok(());
        }
    }
}

// ----- compression -----

/// The output, written least significant bit first.
struct Writer<'h> {
    out: Buf<'h>,
    buf: u64,
    count: u32,
}

impl Writer<'_> {
    fn put(&mut self, bits: u32, n: u32) -> Result<(), Error> {
        self.buf |= u64::from(bits) << self.count;
        self.count += n;
        while self.count >= 8 {
            self.out.push(self.buf as u8).ok_or(Error::Memory)?;
            self.buf >>= 8;
            self.count -= 8;
        }
        Ok(())
    }

    /// A Huffman code (its bits go out most significant first).
    fn code(&mut self, code: u32, len: u32) -> Result<(), Error> {
        self.put(code.reverse_bits() >> (32 - len), len)
    }

    /// A literal/length symbol in the fixed code.
    fn symbol(&mut self, v: u32) -> Result<(), Error> {
        match v {
            0..=143 => self.code(0x30 + v, 8),
            144..=255 => self.code(0x190 + v - 144, 9),
            256..=279 => self.code(v - 256, 7),
            _ => self.code(0xc0 + v - 280, 8),
        }
    }

    fn matched(&mut self, len: usize, back: usize) -> Result<(), Error> {
        let s = LEN_BASE.iter().rposition(|&b| usize::from(b) <= len).unwrap_or(0);
        self.symbol(257 + s as u32)?;
        self.put((len - usize::from(LEN_BASE[s])) as u32, u32::from(LEN_EXTRA[s]))?;
        let d = DIST_BASE.iter().rposition(|&b| usize::from(b) <= back).unwrap_or(0);
        self.code(d as u32, 5)?;
        self.put((back - usize::from(DIST_BASE[d])) as u32, u32::from(DIST_EXTRA[d]))
    }
}

const WINDOW: usize = 8192;
const HASH: usize = 4096;
const CHAIN: usize = 32;
const MAX_MATCH: usize = 258;

fn hash(b: &[u8]) -> usize {
    let v = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
    (v.wrapping_mul(2_654_435_761) >> 20) as usize % HASH
}

/// Table of `n` `u32`s in instance memory, zeroed.
struct Table<'h> {
    host: &'h abi::HostApi,
    ptr: *mut u32,
    n: usize,
}

impl<'h> Table<'h> {
    fn new(host: &'h abi::HostApi, n: usize) -> Result<Table<'h>, Error> {
        // SAFETY: the host's allocator.
        let ptr = unsafe { (host.alloc)(n * 4) }.cast::<u32>();
        if ptr.is_null() {
            return Err(Error::Memory);
        }
        // SAFETY: the block just allocated, `n` u32s (the host aligns to 16).
        unsafe { core::ptr::write_bytes(ptr, 0, n) };
        Ok(Table { host, ptr, n })
    }
    fn slice(&mut self) -> &mut [u32] {
        // SAFETY: the block of `n` initialized u32s.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.n) }
    }
}

impl Drop for Table<'_> {
    fn drop(&mut self) {
        // SAFETY: the block from the host's `alloc`.
        unsafe { (self.host.free)(self.ptr.cast()) };
    }
}

fn deflate<'h>(host: &'h abi::HostApi, data: &[u8]) -> Result<Buf<'h>, Error> {
    let mut w = Writer {
        out: Buf::with_capacity(host, data.len() / 2 + 64).ok_or(Error::Memory)?,
        buf: 0,
        count: 0,
    };
    let mut head_t = Table::new(host, HASH)?;
    let mut prev_t = Table::new(host, WINDOW)?;
    let (head, prev) = (head_t.slice(), prev_t.slice());
    // Entries are positions + 1 (0: none).
    let insert = |i: usize, head: &mut [u32], prev: &mut [u32]| {
        if i + 3 <= data.len() {
            let h = hash(&data[i..]);
            prev[i % WINDOW] = head[h];
            head[h] = i as u32 + 1;
        }
    };
    w.put(1, 1)?; // the final block
    w.put(1, 2)?; // fixed codes
    let mut i = 0;
    while i < data.len() {
        let (mut best, mut best_back) = (0, 0);
        if i + 3 <= data.len() {
            let mut cand = head[hash(&data[i..])] as usize;
            let mut depth = 0;
            while cand != 0 && depth < CHAIN {
                let c = cand - 1;
                if i - c > WINDOW - 1 {
                    break;
                }
                let max = (data.len() - i).min(MAX_MATCH);
                let len = data[c..].iter().zip(&data[i..i + max]).take_while(|(a, b)| a == b).count();
                if len > best {
                    (best, best_back) = (len, i - c);
                    if len == max {
                        break;
                    }
                }
                let next = prev[c % WINDOW] as usize;
                // (A stale entry from beyond the window points forward: stop.)
                if next == 0 || next - 1 >= c {
                    break;
                }
                cand = next;
                depth += 1;
            }
        }
        if best >= 3 {
            w.matched(best, best_back)?;
            for k in i..i + best {
                insert(k, head, prev);
            }
            i += best;
        } else {
            w.symbol(u32::from(data[i]))?;
            insert(i, head, prev);
            i += 1;
        }
    }
    w.symbol(256)?;
    if w.count > 0 {
        w.put(0, 8 - w.count)?;
    }
    Ok(w.out)
}

/// # Safety
///
/// Called by the host as `include/mpkvirt_fn.h` says.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mpkvirt_fn_entry(
    host: *const abi::HostApi,
    request: *const u8,
    request_len: usize,
    response: *mut abi::Response,
) -> i32 {
    // SAFETY: the host's arguments.
    let (host, request, response) = unsafe { abi::args(host, request, request_len, response) };
    let result = match request.split_first() {
        Some((b'c', data)) => deflate(host, data),
        Some((b'd', data)) => Buf::with_capacity(host, data.len() * 3 + 64)
            .ok_or(Error::Memory)
            .and_then(|mut out| inflate(data, &mut out).map(|()| out)),
        _ => Err(Error::Corrupt),
    };
    match result {
        Ok(out) => {
            out.respond(response);
            0
        }
        Err(Error::Corrupt) => 1,
        Err(Error::Memory) => 2,
    }
}
