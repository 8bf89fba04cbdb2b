//! The example tenants (`host/tenants/c/`): each builds with the system's C compiler, passes
//! validation, links, and answers correctly, including refusals of bad requests.
//!
//! The calls here run the tenants' code directly on the test's thread with a host table
//! backed by `malloc`; the runtime runs the same entry points inside instances.
//!
//! # Safety
//!
//! The host table's functions (plain C ABI over `malloc`/`free`), and calls into the
//! example tenants, whose code is the project's own.
#![allow(unsafe_code, reason = "a C host table and calls into tenant code")]

use std::ffi::{c_char, c_int, c_void};

mod common;

use mpkvirt_host::app::native::{CallError, HostApi, LoadError, NativeFunction};

unsafe extern "C" fn alloc(len: usize) -> *mut c_void {
    // SAFETY: malloc of any size (NULL when it cannot).
    unsafe { libc::malloc(len.max(1)) }
}
unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: memory from `alloc` (the ABI), or null.
    unsafe { libc::free(p) }
}
unsafe extern "C" fn log(_msg: *const c_char, _len: usize) {}
unsafe extern "C" fn time_ns() -> u64 {
    0
}
unsafe extern "C" fn random(_buf: *mut c_void, _len: usize) -> c_int {
    -1
}
unsafe extern "C" fn invoke(
    _name: *const c_char,
    _name_len: usize,
    _request: *const u8,
    _request_len: usize,
    _response: *mut *mut u8,
    _response_len: *mut usize,
) -> c_int {
    -1
}

const HOST: HostApi = HostApi {
    version: 1,
    alloc,
    free,
    log,
    time_ns,
    random,
    invoke,
};

fn load(name: &str) -> NativeFunction {
    // SAFETY: the project's own example tenants (no constructors of their own).
    unsafe { NativeFunction::load(&common::build_c(name)) }
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn call(f: &NativeFunction, req: &[u8]) -> Result<Vec<u8>, CallError> {
    // SAFETY: the project's own example tenants, with a table over malloc/free.
    unsafe { f.call(&HOST, req) }
}

#[test]
fn echo_returns_the_request() {
    let f = load("echo");
    for req in [&b""[..], b"x", &[0u8; 70_000]] {
        assert_eq!(call(&f, req).unwrap(), req);
    }
}

#[test]
fn sha256_matches_the_standard_vectors() {
    let f = load("sha256");
    let a_million = vec![b'a'; 1_000_000];
    for (req, digest) in [
        (
            &b""[..],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
        (
            b"abc",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ),
        (
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        ),
        (
            &a_million,
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
        ),
    ] {
        assert_eq!(String::from_utf8(call(&f, req).unwrap()).unwrap(), digest);
    }
}

#[test]
fn matmul_multiplies_and_refuses_bad_sizes() {
    let f = load("matmul");
    let n = 5u32;
    let a: Vec<f64> = (0..25).map(|i| f64::from(i) * 0.5 - 3.0).collect();
    let b: Vec<f64> = (0..25).map(|i| f64::from(i * i % 7) + 1.0).collect();
    let mut req = n.to_le_bytes().to_vec();
    for v in a.iter().chain(&b) {
        req.extend_from_slice(&v.to_le_bytes());
    }
    let out = call(&f, &req).unwrap();
    let got: Vec<f64> = out
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for i in 0..5 {
        for j in 0..5 {
            let want: f64 = (0..5).map(|k| a[i * 5 + k] * b[k * 5 + j]).sum();
            assert!((got[i * 5 + j] - want).abs() < 1e-9, "({i},{j})");
        }
    }
    // Wrong sizes: no n, n = 0, n too large, one byte short.
    for bad in [
        &[][..],
        &0u32.to_le_bytes(),
        &65u32.to_le_bytes(),
        &req[..req.len() - 1],
    ] {
        assert_eq!(call(&f, bad), Err(CallError::Failed(2)));
    }
}

#[test]
fn template_renders_and_escapes() {
    let f = load("template");
    let out = call(&f, b"title=Q&A <1>\nname=\"Bob\" & 'Al'").unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "<!doctype html>\n<html><head><title>Q&amp;A &lt;1&gt;</title></head>\n\
         <body><h1>Q&amp;A &lt;1&gt;</h1><p>Hello, &quot;Bob&quot; &amp; &#39;Al&#39;!</p></body></html>\n"
    );
    let missing = String::from_utf8(call(&f, b"").unwrap()).unwrap();
    assert!(missing.contains("<p>Hello, !</p>"), "{missing}");
    assert_eq!(call(&f, b"no equals sign"), Err(CallError::Failed(2)));
}

#[test]
fn json_transform_upper_cases_strings_and_refuses_bad_json() {
    let f = load("json_transform");
    let out = call(
        &f,
        br#" { "a": "hello", "n": -1.5e3, "t": true, "z": null, "e": "x\ny" } "#,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"a":"HELLO","n":-1.5e3,"t":true,"z":null,"e":"X\nY","fields":5}"#
    );
    assert_eq!(
        String::from_utf8(call(&f, b"{}").unwrap()).unwrap(),
        r#"{"fields":0}"#
    );
    for bad in [
        &b""[..],
        b"[]",
        b"{",
        b"{\"a\":}",
        b"{\"a\":{\"b\":1}}",
        b"{\"a\":1,}",
        b"{\"a\":1} x",
        b"{\"a\":\"unterminated}",
    ] {
        assert_eq!(
            call(&f, bad),
            Err(CallError::Failed(2)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn words_counts_with_the_c_allocator() {
    // (Called directly, outside a sandbox: its malloc is the C library's here.)
    let f = load("words");
    assert_eq!(
        String::from_utf8(call(&f, b"b a b, c B a!").unwrap()).unwrap(),
        "b 3\na 2\nc 1\n"
    );
    assert_eq!(call(&f, b"").unwrap(), b"");
    // Enough distinct words to grow its table several times.
    let text: String = (0..3000)
        .map(|i| format!("w{} ", (i * 7919) % 1000))
        .collect();
    let text = text.replace(|c: char| c.is_ascii_digit(), "x");
    let out = String::from_utf8(call(&f, text.as_bytes()).unwrap()).unwrap();
    let total: usize = out
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<usize>().unwrap())
        .sum();
    assert_eq!(total, 3000);
}

#[test]
fn echo_rs_returns_the_request() {
    let f = load("echo_rs");
    for req in [&b""[..], b"x", &[7u8; 70_000]] {
        assert_eq!(call(&f, req).unwrap(), req);
    }
}

/// Inputs for the DEFLATE tenant: empty, tiny, repetitive text, incompressible bytes, and a
/// mix with matches far apart.
fn deflate_inputs() -> Vec<Vec<u8>> {
    let text: Vec<u8> = (0..4000)
        .flat_map(|i| format!("line {} of the quick brown fox; ", i % 37).into_bytes())
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<u8> = (0..50_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut mixed = noise[..5000].to_vec();
    mixed.extend_from_slice(&text[..20_000]);
    mixed.extend_from_slice(&noise[..5000]);
    vec![
        Vec::new(),
        b"a".to_vec(),
        b"abcabcabcabcabc".to_vec(),
        text,
        noise,
        mixed,
    ]
}

#[test]
fn deflate_rs_round_trips_and_speaks_standard_deflate() {
    let f = load("deflate_rs");
    let with = |op: u8, data: &[u8]| {
        let mut r = vec![op];
        r.extend_from_slice(data);
        r
    };
    for data in deflate_inputs() {
        let packed = call(&f, &with(b'c', &data)).unwrap();
        // Another implementation reads what the tenant wrote...
        assert_eq!(
            miniz_oxide::inflate::decompress_to_vec(&packed).unwrap(),
            data,
            "{} bytes, compressed by the tenant",
            data.len()
        );
        assert_eq!(call(&f, &with(b'd', &packed)).unwrap(), data);
        // ...and the tenant reads what it writes: dynamic Huffman blocks (level 9) and stored
        // ones (level 0).
        for level in [0, 9] {
            let theirs = miniz_oxide::deflate::compress_to_vec(&data, level);
            assert_eq!(
                call(&f, &with(b'd', &theirs)).unwrap(),
                data,
                "{} bytes, level {level}",
                data.len()
            );
        }
    }
    // It compresses: repetitive text to a small fraction.
    let text = &deflate_inputs()[3];
    let packed = call(&f, &with(b'c', text)).unwrap();
    assert!(
        packed.len() * 10 < text.len(),
        "{} of {}",
        packed.len(),
        text.len()
    );
}

#[test]
fn deflate_rs_refuses_corrupt_streams_and_bad_requests() {
    let f = load("deflate_rs");
    let good = miniz_oxide::deflate::compress_to_vec(b"hello hello hello hello", 6);
    let mut bad: Vec<Vec<u8>> = vec![
        // Truncated.
        good[..good.len() / 2].to_vec(),
        // Block type 3.
        vec![0b111],
        // A stored block whose length and complement disagree.
        vec![0b001, 5, 0, 5, 0, b'x'],
        // A fixed block whose first code is a match 1 byte back with nothing written yet:
        // length symbol 257 (7 bits 0000001), distance symbol 0 (5 bits 00000).
        vec![0b0000_0011, 0b0000_0010, 0x00],
    ];
    // Every byte of a good stream flipped in turn: an error or some output, never a crash.
    for i in 0..good.len() {
        let mut g = good.clone();
        g[i] ^= 0xff;
        bad.push(g);
    }
    for (i, b) in bad.iter().enumerate() {
        let mut req = vec![b'd'];
        req.extend_from_slice(b);
        let r = call(&f, &req);
        if i < 4 {
            assert_eq!(r, Err(CallError::Failed(1)), "stream {i}: {b:?}");
        } else {
            assert!(matches!(r, Ok(_) | Err(CallError::Failed(1))), "{r:?}");
        }
    }
    for req in [&b""[..], b"x", b"zdata"] {
        assert_eq!(call(&f, req), Err(CallError::Failed(1)));
    }
}

#[test]
fn a_file_that_is_not_an_object_is_a_load_error() {
    let dir = std::env::temp_dir().join(format!("mpkvirt-tenant-{}-junk", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.so");
    std::fs::write(&junk, b"not an object").unwrap();
    // SAFETY: the file is not linked (refused before `dlopen`).
    let junk = unsafe { NativeFunction::load(&junk) };
    // SAFETY: as above (it does not exist).
    let missing = unsafe { NativeFunction::load(&dir.join("missing.so")) };
    assert!(matches!(junk, Err(LoadError::Invalid(_))));
    assert!(matches!(missing, Err(LoadError::Read(_))));
}

/// A path loaded before whose file was replaced since: the dynamic linker returns the old
/// mapping for the same path, which is not the file validated now. The loader refuses it
/// (it would apply the new file's tables — which words to rebind, which pages to protect —
/// to the old mapping).
#[test]
fn a_replaced_file_at_a_loaded_path_is_refused() {
    let dir = std::env::temp_dir().join(format!("mpkvirt-replaced-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("libreplaced.so");
    std::fs::copy(common::build_c("echo"), &path).unwrap();
    // SAFETY: a validated example tenant; its code is not called here.
    let first = unsafe { NativeFunction::load(&path) };
    assert!(first.is_ok(), "{first:?}");
    // Replaced by another object (a new file, renamed over the path).
    let other = dir.join("other.so");
    std::fs::copy(common::build_c("hostile"), &other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    // SAFETY: as above.
    let second = unsafe { NativeFunction::load(&path) };
    assert!(
        matches!(second, Err(LoadError::Link(ref why)) if why.contains("not the file validated")),
        "{second:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
