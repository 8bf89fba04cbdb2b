//! Issue 7, "an attacker inside the process": application code that can execute arbitrary
//! instructions and write arbitrary memory (but has no WRPKRU, XRSTOR or WRGSBASE of its own,
//! which binary scanning keeps out) must not raise its PKRU rights through the library.
//!
//! 1. **Gate gadgets.** The attacker jumps to every byte of every gate (`mpkvirt_gate_call`,
//!    `mpkvirt_gate_call_nopku`, `mpkvirt_gate_sync`) with forged registers (EAX = 0, "open
//!    every key" and PKRU_LIB; EAX = the thread's value with the library and victim keys
//!    opened; R8, the call gate's entry PKRU, forged too; RDI/RSI pointing at attacker memory
//!    holding zeros, or naming a real op with zeros for arguments; garbage) on a forged stack
//!    whose every word is the address of an attacker stub. Each attempt runs in a forked
//!    child; the stub records RDPKRU and reports it through a pipe. An attempt passes when
//!    the child dies without reaching the stub, or the stub saw no right beyond the thread's
//!    legitimate PKRU (its record's). Two deliberately weak gates (a bare `wrpkru; ret`, and
//!    an ERIM-shaped gate that re-checks against memory the caller names) show the harness
//!    flags an escalation.
//! 2. **Binary scan.** Every byte offset of every executable section of the shipped
//!    `libmpkvirt.so` and of this test binary is checked for WRPKRU, XRSTOR (XRSTORS is
//!    privileged: it faults in user mode, so it is no gadget) and
//!    WRFSBASE/WRGSBASE encodings (unaligned ones inside other instructions included, as ERIM
//!    points out); each occurrence must lie inside a gate symbol (or, in this binary, inside
//!    one of the test's own deliberate attackers).
//! 3. **Metadata corruption.** With protected metadata, one application write into the
//!    root, the thread's record, its library stack, a domain record or a saved view faults
//!    with `SEGV_PKUERR` on the library key and changes nothing, while the same store into
//!    application memory happens; the same writes are made in a process started with
//!    `MPKVIRT_METADATA=cooperative`, where they must succeed (and the saved view's bits then
//!    hand the thread a victim domain's key).
//!
//! Tests that need PKU are named `pku_*` and run in the PKU guest
//! (`scripts/pku-vm test --filter pku_gate`). Some of them fail today: each failing test's
//! documentation says what the attacker gets.
//!
//! # Safety
//!
//! The tests fork the (multi-threaded) test process and, in the child only, jump into the
//! gates' middle with forged registers and a forged stack (`gates_test_launch`, which never
//! returns: the child ends in the attacker stub with `exit_group`, or dies). In the parent
//! they map and unmap private anonymous memory they own, wait for and kill their own
//! children, and read and write pipes they created. The metadata tests install a SIGSEGV
//! handler in forked children (never in the test process) that only records `siginfo` and
//! resumes the test's own store instruction at its `ret`. The attacker code is in
//! `global_asm!` below; every symbol it defines starts with `gates_test_`.
#![allow(
    unsafe_code,
    reason = "fork, jumps into the gates' middle with forged registers, raw stores into library memory"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};
use mpkvirt::scan::{Gadget, gadgets};
use mpkvirt::{Config, DomainOptions, Manager, MetadataMode, Rights};
use mpkvirt_sys::require_pku;
use mpkvirt_sys::signal::SegvCode;
use mpkvirt_sys::thread::FsGsBase;

// ---- the attacker's code ----------------------------------------------------------------------

std::arch::global_asm!(
    r#"
    .text

    /* gates_test_launch(regs: *const AttackRegs) -> !
     * Loads the forged registers and stack and jumps to regs.target. */
    .globl  gates_test_launch
    .type   gates_test_launch, @function
    .p2align 4
gates_test_launch:
    mov     0(%rdi), %r11
    mov     8(%rdi), %rax
    mov     16(%rdi), %rcx
    mov     24(%rdi), %rdx
    mov     32(%rdi), %rsi
    mov     40(%rdi), %r8
    mov     48(%rdi), %rsp
    mov     64(%rdi), %r14
    mov     56(%rdi), %rdi
    jmp     *%r11
    .size   gates_test_launch, .-gates_test_launch

    /* The attacker stub every forged return address points to (PKU machines): records the
     * PKRU attacker code runs with, then opens every key itself (attacker code may; the
     * report needs its own memory) and reports. */
    .globl  gates_test_stub_pku
    .type   gates_test_stub_pku, @function
    .p2align 4
gates_test_stub_pku:
    xor     %ecx, %ecx
    rdpkru
    mov     %eax, %r12d
    xor     %ecx, %ecx
    xor     %edx, %edx
    xor     %eax, %eax
    wrpkru
    mov     $1, %r13d
    xor     %ebx, %ebx
    jmp     gates_test_report
    .size   gates_test_stub_pku, .-gates_test_stub_pku

    /* The same, and reads the byte at %r14 (which no gate touches) with the PKRU attacker
     * code was left with, before opening every key: a fault kills the child. */
    .globl  gates_test_stub_read
    .type   gates_test_stub_read, @function
    .p2align 4
gates_test_stub_read:
    xor     %ecx, %ecx
    rdpkru
    mov     %eax, %r12d
    movzbl  (%r14), %ebx
    or      $0x100, %ebx
    xor     %ecx, %ecx
    xor     %edx, %edx
    xor     %eax, %eax
    wrpkru
    mov     $1, %r13d
    jmp     gates_test_report
    .size   gates_test_stub_read, .-gates_test_stub_read

    /* The same without PKU: reports that it was reached. */
    .globl  gates_test_stub_nopku
    .type   gates_test_stub_nopku, @function
    .p2align 4
gates_test_stub_nopku:
    xor     %r12d, %r12d
    xor     %r13d, %r13d
    xor     %ebx, %ebx
    jmp     gates_test_report
    .size   gates_test_stub_nopku, .-gates_test_stub_nopku

    /* Writes (magic, pkru, has_pku, record pkru, read) to fd 200 and exits with 42. */
    .type   gates_test_report, @function
    .p2align 4
gates_test_report:
    lea     gates_test_msg(%rip), %rsi
    movl    $0x47415445, 0(%rsi)
    movl    %r12d, 4(%rsi)
    movl    %r13d, 8(%rsi)
    xor     %ecx, %ecx
    rdgsbase %rax
    test    %rax, %rax
    jz      1f
    mov     8(%rax), %ecx
1:  movl    %ecx, 12(%rsi)
    movl    %ebx, 16(%rsi)
    mov     $200, %edi
    mov     $20, %edx
    mov     $1, %eax
    syscall
    mov     $42, %edi
    mov     $231, %eax
    syscall
    ud2
    .size   gates_test_report, .-gates_test_report

    /* Deliberately weak gate 1: WRPKRU with the caller's EAX. */
    .globl  gates_test_weak_raw
    .type   gates_test_weak_raw, @function
    .p2align 4
gates_test_weak_raw:
    xor     %ecx, %ecx
    xor     %edx, %edx
    wrpkru
    ret
    .size   gates_test_weak_raw, .-gates_test_weak_raw

    /* Deliberately weak gate 2: ERIM's shape (write, re-read, loop), but the value comes from
     * memory the caller names (%rdi) instead of the thread's record (%gs). */
    .globl  gates_test_weak_rdi
    .type   gates_test_weak_rdi, @function
    .p2align 4
gates_test_weak_rdi:
1:  xor     %ecx, %ecx
    xor     %edx, %edx
    mov     (%rdi), %eax
    wrpkru
    cmp     (%rdi), %eax
    jne     1b
    ret
    .size   gates_test_weak_rdi, .-gates_test_weak_rdi

    /* gates_test_store32(addr, value) / gates_test_store64(addr, value) -> 0, or 1 when a
     * SIGSEGV handler skipped the store (resuming at gates_test_store_done). */
    .globl  gates_test_store32
    .type   gates_test_store32, @function
    .p2align 4
gates_test_store32:
    xor     %eax, %eax
    .globl  gates_test_store32_insn
gates_test_store32_insn:
    movl    %esi, (%rdi)
    .globl  gates_test_store_done
gates_test_store_done:
    ret
    .size   gates_test_store32, .-gates_test_store32

    .globl  gates_test_store64
    .type   gates_test_store64, @function
    .p2align 4
gates_test_store64:
    xor     %eax, %eax
    .globl  gates_test_store64_insn
gates_test_store64_insn:
    movq    %rsi, (%rdi)
    ret
    .size   gates_test_store64, .-gates_test_store64

    .pushsection .bss.gates_test_msg, "aw", @nobits
    .p2align 4
gates_test_msg:
    .zero   20
    .popsection
"#,
    options(att_syntax)
);

unsafe extern "sysv64" {
    fn gates_test_launch(regs: *const AttackRegs) -> !;
    fn gates_test_stub_pku();
    fn gates_test_stub_nopku();
    fn gates_test_stub_read();
    fn gates_test_weak_raw();
    fn gates_test_weak_rdi();
    fn gates_test_store32(addr: usize, value: u32) -> u64;
    fn gates_test_store64(addr: usize, value: u64) -> u64;
    fn gates_test_store32_insn();
    fn gates_test_store64_insn();
    fn gates_test_store_done();
}

/// Symbols of this file's attacker code that contain WRPKRU on purpose.
const DELIBERATE: [&str; 4] = [
    "gates_test_stub_pku",
    "gates_test_stub_read",
    "gates_test_weak_raw",
    "gates_test_weak_rdi",
];

/// The gates: the only symbols of mpkvirt allowed to contain PKRU or FS/GS base writes
/// (`asm/x86_64/callgate.S`, `asm/x86_64/gate.S`; `probe.S` and `stack.S` contain none).
const GATES: [&str; 5] = [
    "mpkvirt_gate_call",
    "mpkvirt_gate_call_nopku",
    "mpkvirt_gate_sync",
    // The sandbox's preemption stubs restore the extended state with an XRSTOR, followed on
    // every path by an XCR0 check and the sync gate's sequence, inline (a WRPKRU of the
    // record's normal-context value, re-checked: `asm/x86_64/sandbox.S`):
    // `pku_gate_gadgets_in_the_preemption_stubs_raise_nothing`.
    "mpkvirt_sandbox_preempted_pku",
    "mpkvirt_sandbox_preempted_nopku",
];

/// The fd the stub reports on (the child dups its pipe there).
const REPORT_FD: i32 = 200;
/// What the stub writes first.
const MAGIC: u32 = 0x4741_5445;
/// The stub's exit status.
const STUB_EXIT: i32 = 42;
/// The secret the tests' victims hold.
const SECRET: u8 = 0x5a;

fn addr_of(f: unsafe extern "sysv64" fn()) -> usize {
    f as usize
}

// ---- a tiny ELF64 reader ----------------------------------------------------------------------

/// Sections and symbols of an x86-64 ELF64 file.
struct Elf {
    data: Vec<u8>,
    sections: Vec<Section>,
    /// Symbols with a non-zero address, from `.symtab` and `.dynsym`.
    symbols: Vec<Symbol>,
}

#[derive(Clone, Debug)]
struct Section {
    name: String,
    kind: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Symbol {
    value: u64,
    size: u64,
    name: String,
    func: bool,
}

const SHT_SYMTAB: u32 = 2;
const SHT_NOBITS: u32 = 8;
const SHT_DYNSYM: u32 = 11;
const SHF_EXECINSTR: u64 = 4;
const STT_FUNC: u8 = 2;

fn u16_at(d: &[u8], at: usize) -> Result<u16, String> {
    d.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| format!("truncated at {at:#x}"))
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, String> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("truncated at {at:#x}"))
}

fn u64_at(d: &[u8], at: usize) -> Result<u64, String> {
    d.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("truncated at {at:#x}"))
}

fn c_str(d: &[u8], at: usize) -> Result<String, String> {
    let rest = d.get(at..).ok_or_else(|| format!("string at {at:#x}"))?;
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn us(v: u64) -> usize {
    usize::try_from(v).expect("fits in usize")
}

impl Elf {
    fn read(path: &Path) -> Result<Elf, String> {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Elf::parse(data).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(data: Vec<u8>) -> Result<Elf, String> {
        if data.get(..4) != Some(b"\x7fELF".as_slice()) || data.get(4) != Some(&2) {
            return Err("not an ELF64 file".into());
        }
        if data.get(5) != Some(&1) || u16_at(&data, 0x12)? != 62 {
            return Err("not little-endian x86-64".into());
        }
        let shoff = us(u64_at(&data, 0x28)?);
        let shentsize = usize::from(u16_at(&data, 0x3a)?);
        let shnum = usize::from(u16_at(&data, 0x3c)?);
        let shstrndx = usize::from(u16_at(&data, 0x3e)?);
        let mut raw = Vec::new();
        for i in 0..shnum {
            let h = shoff + i * shentsize;
            raw.push((
                u32_at(&data, h)?,
                Section {
                    name: String::new(),
                    kind: u32_at(&data, h + 4)?,
                    flags: u64_at(&data, h + 8)?,
                    addr: u64_at(&data, h + 16)?,
                    offset: u64_at(&data, h + 24)?,
                    size: u64_at(&data, h + 32)?,
                    link: u32_at(&data, h + 40)?,
                },
            ));
        }
        let strtab_off = raw
            .get(shstrndx)
            .map(|(_, s)| us(s.offset))
            .ok_or("no section name table")?;
        let mut sections = Vec::new();
        for (name, mut s) in raw {
            s.name = c_str(&data, strtab_off + name as usize)?;
            sections.push(s);
        }
        let mut symbols = Vec::new();
        for s in sections
            .iter()
            .filter(|s| s.kind == SHT_SYMTAB || s.kind == SHT_DYNSYM)
        {
            let names = sections
                .get(s.link as usize)
                .ok_or("bad symbol table link")?;
            for j in 0..us(s.size) / 24 {
                let e = us(s.offset) + j * 24;
                let value = u64_at(&data, e + 8)?;
                if value == 0 {
                    continue;
                }
                let info = *data.get(e + 4).ok_or("truncated symbol")?;
                symbols.push(Symbol {
                    value,
                    size: u64_at(&data, e + 16)?,
                    name: c_str(&data, us(names.offset) + u32_at(&data, e)? as usize)?,
                    func: info & 0xf == STT_FUNC,
                });
            }
        }
        symbols.sort();
        symbols.dedup();
        Ok(Elf {
            data,
            sections,
            symbols,
        })
    }

    /// The executable sections with their bytes.
    fn code(&self) -> impl Iterator<Item = (&Section, &[u8])> {
        self.sections
            .iter()
            .filter(|s| s.flags & SHF_EXECINSTR != 0 && s.kind != SHT_NOBITS)
            .map(|s| (s, &self.data[us(s.offset)..us(s.offset + s.size)]))
    }

    /// The sized symbol containing `addr` (functions first), or the nearest one below it.
    fn symbol_at(&self, addr: u64) -> String {
        let containing = |func: bool| {
            self.symbols
                .iter()
                .find(|s| s.func == func && s.value <= addr && addr < s.value + s.size)
        };
        if let Some(s) = containing(true).or_else(|| containing(false)) {
            return s.name.clone();
        }
        match self.symbols.iter().rev().find(|s| s.value <= addr) {
            Some(s) => format!(
                "(no sized symbol; after {} + {:#x})",
                s.name,
                addr - s.value
            ),
            None => "(no symbol)".into(),
        }
    }

    fn symbol(&self, name: &str) -> Option<&Symbol> {
        self.symbols.iter().find(|s| s.name == name && s.size > 0)
    }
}

// ---- the gadget scanner -----------------------------------------------------------------------

/// One occurrence in a file.
#[derive(Clone, Debug)]
struct Hit {
    kind: Gadget,
    addr: u64,
    section: String,
    symbol: String,
    bytes: String,
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} at {:#x} ({}) in {} [{}]",
            self.kind, self.addr, self.section, self.symbol, self.bytes
        )
    }
}

fn scan_file(elf: &Elf) -> Vec<Hit> {
    let mut hits = Vec::new();
    for (s, code) in elf.code() {
        for (at, kind) in gadgets(code) {
            let addr = s.addr + at as u64;
            let bytes = code[at..(at + 6).min(code.len())]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ");
            hits.push(Hit {
                kind,
                addr,
                section: s.name.clone(),
                symbol: elf.symbol_at(addr),
                bytes,
            });
        }
    }
    hits
}

/// The build directory of this test binary (`target/<profile>`: the binary is in `deps/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("the test binary's directory");
    assert_eq!(
        deps.file_name().and_then(|n| n.to_str()),
        Some("deps"),
        "test binaries live in target/<profile>/deps: {}",
        exe.display()
    );
    deps.parent().expect("target/<profile>").to_path_buf()
}

/// Checks every occurrence in `elf` lies in `allowed`; returns them all.
fn check_scan(what: &str, elf: &Elf, allowed: &[&str]) -> Vec<Hit> {
    let hits = scan_file(elf);
    println!("{what}: {} occurrence(s)", hits.len());
    for h in &hits {
        println!("  {h}");
    }
    let stray: Vec<String> = hits
        .iter()
        .filter(|h| !allowed.contains(&h.symbol.as_str()))
        .map(ToString::to_string)
        .collect();
    assert!(
        stray.is_empty(),
        "{what}: PKRU / FS-GS base writes outside the gates:\n{}",
        stray.join("\n")
    );
    hits
}

/// The gates' own WRPKRUs: four in the call gate (raise, lower, a busy record's lower, deny),
/// one in the sync gate and one in each preemption stub. Their presence shows the scan saw the code it claims to have scanned.
fn assert_gate_wrpkrus(what: &str, hits: &[Hit]) {
    let count = |sym: &str| {
        hits.iter()
            .filter(|h| h.kind == Gadget::Wrpkru && h.symbol == sym)
            .count()
    };
    assert_eq!(count("mpkvirt_gate_call"), 4, "{what}");
    assert_eq!(count("mpkvirt_gate_sync"), 1, "{what}");
    assert_eq!(count("mpkvirt_gate_call_nopku"), 0, "{what}");
    assert_eq!(count("mpkvirt_sandbox_preempted_pku"), 1, "{what}");
    assert_eq!(count("mpkvirt_sandbox_preempted_nopku"), 1, "{what}");
}

#[test]
fn shipped_libmpkvirt_writes_pkru_and_bases_only_in_its_gates() {
    let dir = profile_dir();
    // `deps/libmpkvirt.so` is built with the tests (the same crate, with its `testing`
    // feature); `libmpkvirt.so` is what `cargo build -p mpkvirt` ships, when it was built.
    let candidates = [dir.join("libmpkvirt.so"), dir.join("deps/libmpkvirt.so")];
    let present: Vec<&PathBuf> = candidates.iter().filter(|p| p.exists()).collect();
    assert!(
        !present.is_empty(),
        "no libmpkvirt.so in {} (run `cargo build -p mpkvirt`)",
        dir.display()
    );
    for path in present {
        let elf = Elf::read(path).unwrap();
        let what = path.display().to_string();
        let hits = check_scan(&what, &elf, &GATES);
        assert_gate_wrpkrus(&what, &hits);
    }
}

#[test]
fn this_test_binary_writes_pkru_and_bases_only_in_gates_and_its_own_attackers() {
    let exe = std::env::current_exe().unwrap();
    let elf = Elf::read(&exe).unwrap();
    let allowed: Vec<&str> = GATES.iter().chain(DELIBERATE.iter()).copied().collect();
    let hits = check_scan(&exe.display().to_string(), &elf, &allowed);
    assert_gate_wrpkrus("test binary", &hits);
    // The scanner finds a stray WRPKRU when there is one: the test's weak gates are exactly
    // that, and would fail the check if they were not allowed by name.
    for sym in DELIBERATE {
        assert!(
            hits.iter()
                .any(|h| h.kind == Gadget::Wrpkru && h.symbol == sym),
            "the deliberate WRPKRU in {sym} was not found"
        );
    }
}

// ---- the gadget harness -----------------------------------------------------------------------

/// The registers `gates_test_launch` loads (layout fixed by its assembly).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttackRegs {
    target: u64,
    rax: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    r8: u64,
    rsp: u64,
    rdi: u64,
    r14: u64,
}

/// What happened to one attempt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// Attacker code ran: the PKRU it saw (`None` without PKU), the record's PKRU then, and
    /// (`gates_test_stub_read`) the byte it read with that PKRU.
    Reached {
        pkru: Option<u32>,
        record: u32,
        read: Option<u8>,
    },
    /// The child died of a signal without reaching the stub.
    Signaled(i32),
    /// The child exited some other way (status).
    Exited(i32),
    /// The child ran past the time limit and was killed.
    Hung,
}

/// Private anonymous memory of the attacker: a stack full of the stub's address and a page
/// of zeros.
struct Arena {
    stack: usize,
    zeros: usize,
}

const STACK_LEN: usize = 64 << 10;

fn map_anon(len: usize) -> usize {
    // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice; no Rust
    // object is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p as usize
}

impl Arena {
    fn new(stub: usize) -> Arena {
        let stack = map_anon(STACK_LEN);
        let words = STACK_LEN / 8;
        // SAFETY: the mapping is ours, `STACK_LEN` bytes, page-aligned, and referenced by no
        // other Rust object; the slice lives only for this loop.
        let s = unsafe { std::slice::from_raw_parts_mut(stack as *mut u64, words) };
        s.fill(stub as u64);
        Arena {
            stack,
            zeros: map_anon(4096),
        }
    }

    /// The forged stack pointer: the middle of the stack, so pops and pushes both find the
    /// stub's address.
    fn rsp(&self) -> u64 {
        (self.stack + STACK_LEN / 2) as u64
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: both mappings were made by `Arena::new` and nothing refers to them any more.
        unsafe { libc::munmap(self.stack as *mut libc::c_void, STACK_LEN) };
        // SAFETY: as above.
        unsafe { libc::munmap(self.zeros as *mut libc::c_void, 4096) };
    }
}

/// How long one child may run (TCG is slow; a hang is unexpected and reported).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(30);

/// A forked child: its pid, the read end of its pipe.
struct Child {
    pid: libc::pid_t,
    rd: i32,
}

/// Forks; the child runs `body` with the pipe's write end dup'ed to `REPORT_FD`, then exits
/// with status 0 (unless `body` ended it).
fn fork_child(body: impl FnOnce()) -> Child {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(r, 0, "pipe2");
    // SAFETY: fork has no memory preconditions; the child only runs `body`, which ends in
    // `_exit`/`exit_group` or dies, and never returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: `fds[1]` is this process's pipe end; REPORT_FD is unused by the child.
        unsafe { libc::dup2(fds[1], REPORT_FD) };
        body();
        // SAFETY: ends the child without running the parent's exit handlers or destructors.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: the write end is the child's now; closing ours lets reads see its exit.
    unsafe { libc::close(fds[1]) };
    Child { pid, rd: fds[0] }
}

impl Child {
    /// Waits (up to `ATTEMPT_LIMIT`, then kills it); returns its wait status, or `None` when
    /// it had to be killed, and what it wrote.
    fn finish(self) -> (Option<i32>, Vec<u8>) {
        // SAFETY: pidfd_open on our own child's pid; returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) } as i32;
        assert!(pidfd >= 0, "pidfd_open (Linux >= 5.3)");
        let mut pfd = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(ATTEMPT_LIMIT.as_millis()).unwrap();
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        let mut killed = false;
        if ready == 0 {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            killed = true;
        }
        let mut status = 0;
        // SAFETY: reaps our own child; `status` is ours to write.
        let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(r, self.pid, "waitpid");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes; the fd is our non-blocking read end.
            let n = unsafe { libc::read(self.rd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        // SAFETY: both fds are ours and closed once.
        unsafe { libc::close(self.rd) };
        // SAFETY: as above.
        unsafe { libc::close(pidfd) };
        ((!killed).then_some(status), out)
    }
}

/// Runs one attempt: a child jumps to `regs.target` with `regs` on the arena's stack.
fn attempt(arena: &Arena, regs: AttackRegs) -> Outcome {
    let regs = AttackRegs {
        rsp: arena.rsp(),
        ..regs
    };
    let child = fork_child(|| {
        // SAFETY: in the child only: the registers and stack are forged on purpose; the
        // launch never returns (the child exits in the stub or dies).
        unsafe { gates_test_launch(&regs) }
    });
    let (status, out) = child.finish();
    let Some(status) = status else {
        return Outcome::Hung;
    };
    if libc::WIFSIGNALED(status) {
        return Outcome::Signaled(libc::WTERMSIG(status));
    }
    let code = libc::WEXITSTATUS(status);
    if code == STUB_EXIT {
        assert_eq!(
            out.len(),
            20,
            "the stub exited without a full report: {out:02x?}"
        );
        let word = |i: usize| u32::from_le_bytes(out[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), MAGIC, "stub report {out:02x?}");
        return Outcome::Reached {
            pkru: (word(2) != 0).then(|| word(1)),
            record: word(3),
            read: (word(4) & 0x100 != 0).then(|| word(4) as u8),
        };
    }
    Outcome::Exited(code)
}

/// A register set an attacker chooses.
#[derive(Clone, Copy, Debug)]
struct Forged {
    name: &'static str,
    rax: u64,
    r8: u64,
    rcx: u64,
    rdx: u64,
    rdi: u64,
    rsi: u64,
}

/// The forged register sets: EAX = 0 opens every key (and is PKRU_LIB); `escalate` is the
/// thread's legitimate value with the library and victim keys opened; R8 (the entry PKRU the
/// call gate read, for a jump past its RDPKRU) the same; RDI/RSI point at attacker zeros, or
/// name a real op (OP_NOP = 2, OP_SPAWN_PREPARE = 5) with zeros for its argument block, or
/// are garbage.
fn forged_sets(arena: &Arena, escalate: u32) -> [Forged; 4] {
    let zeros = arena.zeros as u64;
    [
        Forged {
            name: "eax=r8=0 rdi=rsi=&zeros",
            rax: 0,
            r8: 0,
            rcx: 0,
            rdx: 0,
            rdi: zeros,
            rsi: zeros,
        },
        Forged {
            name: "eax=r8=escalate rdi=OP_NOP rsi=&zeros",
            rax: u64::from(escalate),
            r8: u64::from(escalate),
            rcx: 0,
            rdx: 0,
            rdi: 2,
            rsi: zeros,
        },
        Forged {
            name: "eax=r8=0 ecx=edx=garbage rdi=-1 rsi=0",
            rax: 0,
            r8: 0,
            rcx: 0xdead_beef,
            rdx: 0x1234,
            rdi: u64::MAX,
            rsi: 0,
        },
        Forged {
            name: "eax=r8=0 rdi=OP_SPAWN_PREPARE rsi=&zeros",
            rax: 0,
            r8: 0,
            rcx: 0,
            rdx: 0,
            rdi: 5,
            rsi: zeros,
        },
    ]
}

/// Rights of key `k` in `pkru`: (read, write).
fn rights(pkru: u32, k: u32) -> (bool, bool) {
    let f = (pkru >> (2 * k)) & 3;
    let read = f & 1 == 0;
    (read, read && f & 2 == 0)
}

/// Why `observed` (the PKRU attacker code ran with) is an escalation over `legit` (the
/// thread's legitimate value), if it is: it grants the library key write access, or grants
/// any key a right `legit` does not.
fn escalation(observed: u32, legit: u32, library_key: Option<u32>) -> Option<String> {
    let mut why = Vec::new();
    if let Some(k) = library_key
        && rights(observed, k).1
    {
        why.push(format!("library key {k} writable"));
    }
    let spell = |(r, w): (bool, bool)| match (r, w) {
        (true, true) => "rw",
        (true, false) => "r-",
        _ => "--",
    };
    let mut beyond = Vec::new();
    for k in 0..16 {
        let (o, l) = (rights(observed, k), rights(legit, k));
        if (o.0 && !l.0) || (o.1 && !l.1) {
            beyond.push(format!("{k}:{}>{}", spell(o), spell(l)));
        }
    }
    if !beyond.is_empty() {
        why.push(format!(
            "keys beyond the thread's (seen>legit) {}",
            beyond.join(" ")
        ));
    }
    (!why.is_empty()).then(|| {
        format!(
            "PKRU {observed:#010x} over legitimate {legit:#010x}: {}",
            why.join(", ")
        )
    })
}

#[test]
fn the_escalation_criterion_flags_only_rights_beyond_the_threads() {
    // Key 2 (the library key) read-only, key 3 no access, the others as Linux starts them.
    let legit = (0x5555_5554 & !(3 << 4)) | (2 << 4);
    let klib = 2;
    assert_eq!(legit, 0x5555_5564);
    assert_eq!(rights(legit, klib), (true, false));
    assert_eq!(escalation(legit, legit, Some(klib)), None);
    assert_eq!(escalation(0x5555_5554, legit, Some(klib)), None, "deny");
    assert_eq!(
        escalation(0x5555_5555 | 0xaaaa_aaaa, legit, Some(klib)),
        None
    );
    assert!(escalation(0, legit, Some(klib)).is_some(), "open every key");
    assert!(
        escalation(legit & !(2 << 4), legit, Some(klib))
            .unwrap()
            .contains("library key 2 writable")
    );
    assert!(
        escalation(legit & !(3 << 6), legit, Some(klib))
            .unwrap()
            .contains("3:rw>--")
    );
    // Handler-context spelling (11) of a no-access key is no escalation over 01.
    assert_eq!(escalation(legit | (2 << 6), legit, Some(klib)), None);
}

/// Whether `i` transfers control through a far pointer on the stack or in memory: far RET,
/// IRET, far CALL (far JMP reads its pointer with an ordinary load and is not one).
fn is_far_transfer(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Retf | Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq
    ) || i.is_call_far()
        || i.is_call_far_indirect()
}

/// The offsets below `len` of `window` (code loaded at `ip`, the attacked symbol first and
/// some bytes after it) from which execution may reach a far transfer before it rejoins the
/// instruction stream that starts at offset 0.
///
/// QEMU's TCG (7.2, the PKU guest's) performs the stack reads of a far RET or IRET and the
/// pushes of a far CALL executed in user mode as supervisor accesses: with SMAP on they fault
/// as "supervisor read access in user mode", which the guest kernel treats as an oops and
/// panics (`oops=panic`), taking every later test with it. On hardware the same attempt
/// faults in user mode (#GP on the garbage CS) and the child dies like any other. The sweep
/// therefore leaves these offsets out unless `MPKVIRT_GADGET_FAR_TRANSFERS=attempt`, and says
/// how many it left out; the walk follows fall-through and direct branches inside `window`,
/// and stops at invalid encodings, indirect branches, returns and interrupts.
fn far_transfer_offsets(window: &[u8], ip: u64, len: usize) -> BTreeSet<usize> {
    let decode_at = |p: usize| {
        let mut d = Decoder::with_ip(64, &window[p..], ip + p as u64, DecoderOptions::NONE);
        d.decode()
    };
    let mut stream = BTreeSet::new();
    let mut p = 0;
    while p < window.len() {
        let i = decode_at(p);
        if i.is_invalid() {
            break;
        }
        assert!(
            p >= len || !is_far_transfer(&i),
            "the gate itself has a far transfer at +{p:#x}"
        );
        stream.insert(p);
        p += i.len();
    }
    let within = |t: u64| {
        t.checked_sub(ip)
            .map(|o| o as usize)
            .filter(|&o| o < window.len())
    };
    let mut far = BTreeSet::new();
    for off in 0..len {
        let mut todo = vec![off];
        let mut seen = BTreeSet::new();
        while let Some(p) = todo.pop() {
            if (p != off && stream.contains(&p)) || !seen.insert(p) || seen.len() > 512 {
                continue;
            }
            let i = decode_at(p);
            if i.is_invalid() {
                continue;
            }
            if is_far_transfer(&i) {
                far.insert(off);
                break;
            }
            let next = p + i.len();
            match i.flow_control() {
                FlowControl::Next | FlowControl::XbeginXabortXend => todo.push(next),
                FlowControl::ConditionalBranch => {
                    todo.push(next);
                    todo.extend(within(i.near_branch_target()));
                }
                FlowControl::UnconditionalBranch | FlowControl::Call => {
                    todo.extend(within(i.near_branch_target()));
                }
                FlowControl::IndirectBranch
                | FlowControl::IndirectCall
                | FlowControl::Return
                | FlowControl::Interrupt
                | FlowControl::Exception => {}
            }
        }
    }
    far
}

#[test]
fn far_transfer_offsets_find_far_returns_inside_other_instructions() {
    // mov 0x6a9ca(%rip), %rsp; ret: from +3 the bytes read `lret $0x6a9`.
    let code = [0x48, 0x8b, 0x25, 0xca, 0xa9, 0x06, 0x00, 0xc3];
    assert_eq!(
        far_transfer_offsets(&code, 0x1000, code.len()),
        BTreeSet::from([3])
    );
    // The same load of 0x6a9c9: no far transfer anywhere.
    let code = [0x48, 0x8b, 0x25, 0xc9, 0xa9, 0x06, 0x00, 0xc3];
    assert!(far_transfer_offsets(&code, 0x1000, code.len()).is_empty());
    // A short jump from +1 (`eb 03`) over two bytes to `48 cf` (iretq); from +0 the bytes
    // are `b0 eb`, `03 ...`: the stream jumps nowhere near it.
    let code = [0xb0, 0xeb, 0x03, 0x90, 0x90, 0x48, 0xcf, 0xc3];
    let far = far_transfer_offsets(&code[..], 0x1000, 5);
    assert!(far.contains(&1), "{far:?}");
    assert!(!far.contains(&0), "{far:?}");
}

/// The offsets of symbol `name` (`len` bytes) that the sweep leaves out: see
/// [`far_transfer_offsets`].
fn skipped_offsets(name: &str, len: usize) -> BTreeSet<usize> {
    if std::env::var("MPKVIRT_GADGET_FAR_TRANSFERS").as_deref() == Ok("attempt") {
        return BTreeSet::new();
    }
    let elf = Elf::read(&std::env::current_exe().unwrap()).unwrap();
    let s = elf.symbol(name).expect("symbol").clone();
    let (sec, code) = elf
        .code()
        .find(|(sec, _)| sec.addr <= s.value && s.value < sec.addr + sec.size)
        .expect("section");
    let at = us(s.value - sec.addr);
    let end = (at + len + 64).min(code.len());
    far_transfer_offsets(&code[at..end], s.value, len)
}

/// Attempts at every byte of `gate` (`len` bytes) with every forged set; returns the
/// outcomes by (offset, set). Offsets from which a far transfer is reachable are left out
/// (see [`far_transfer_offsets`]) and have no outcome.
fn attack_gate(
    name: &str,
    gate: usize,
    len: usize,
    arena: &Arena,
    sets: &[Forged],
) -> BTreeMap<(usize, usize), Outcome> {
    let mut out = BTreeMap::new();
    let skipped = skipped_offsets(name, len);
    for off in 0..len {
        if skipped.contains(&off) {
            continue;
        }
        for (i, s) in sets.iter().enumerate() {
            let o = attempt(
                arena,
                AttackRegs {
                    target: (gate + off) as u64,
                    rax: s.rax,
                    rcx: s.rcx,
                    rdx: s.rdx,
                    rsi: s.rsi,
                    r8: s.r8,
                    rsp: 0,
                    rdi: s.rdi,
                    r14: 0,
                },
            );
            out.insert((off, i), o);
        }
    }
    let mut summary: BTreeMap<String, usize> = BTreeMap::new();
    for o in out.values() {
        let k = match o {
            Outcome::Reached { .. } => "reached the stub".to_string(),
            Outcome::Signaled(s) => format!("died of signal {s}"),
            Outcome::Exited(c) => format!("exited {c}"),
            Outcome::Hung => "hung (killed)".to_string(),
        };
        *summary.entry(k).or_default() += 1;
    }
    println!(
        "{name}: {len} offsets ({} left out: a far transfer is reachable, {skipped:#x?}) x {} \
         register sets = {} attempts: {summary:?}",
        skipped.len(),
        sets.len(),
        out.len()
    );
    out
}

/// The escalations among `outcomes`.
fn escalations(
    outcomes: &BTreeMap<(usize, usize), Outcome>,
    sets: &[Forged],
    legit: u32,
    library_key: Option<u32>,
) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|(&(off, i), o)| match *o {
            Outcome::Reached {
                pkru: Some(p),
                record,
                ..
            } => escalation(p, legit, library_key).map(|why| {
                format!(
                    "offset {off:#x}, {}: {why} (record then {record:#010x})",
                    sets[i].name
                )
            }),
            _ => None,
        })
        .collect()
}

/// The size of the symbol `name` in this test binary, checked against its runtime address
/// (`at`) through the load bias of `mpkvirt_gate_sync`.
fn symbol_len(elf: &Elf, name: &str, at: usize) -> usize {
    let bias = mpkvirt_asm::addr::gate_sync() as u64
        - elf
            .symbol("mpkvirt_gate_sync")
            .expect("mpkvirt_gate_sync in the symbol table")
            .value;
    let s = elf
        .symbol(name)
        .unwrap_or_else(|| panic!("{name} in the symbol table"));
    assert_eq!(s.value + bias, at as u64, "{name}'s address");
    us(s.size)
}

/// What every gate-gadget test needs: a hardware manager, the attacker domain A entered
/// read-only, a victim domain V resident (it holds a key) but not granted.
struct Scene {
    mgr: Manager,
    _victim: mpkvirt::Domain,
    legit: u32,
    library_key: Option<u32>,
    escalate: u32,
}

fn record_pkru() -> u32 {
    let gs = FsGsBase::new().expect("FSGSBASE").gs_base();
    assert_ne!(gs, 0, "the thread has a record");
    // SAFETY: the GS base points at the thread's record (mpkvirt registered the thread),
    // readable by application code; its PKRU is the u32 at offset 8.
    unsafe { ((gs + 8) as *const u32).read_volatile() }
}

#[test]
fn gate_gadget_harness_runs_natively_on_the_nopku_gate() {
    let _real = common::real_backend();
    if mpkvirt_sys::detect::pku().is_ok() {
        foreign_key();
    }
    let mgr = Manager::new(Config::default()).unwrap();
    let _d = mgr.create_domain(DomainOptions::default()).unwrap();
    let mode = mgr.metadata_mode();
    let pku = mpkvirt_sys::detect::pku().ok();
    let stub = if pku.is_some() {
        addr_of(gates_test_stub_pku)
    } else {
        addr_of(gates_test_stub_nopku)
    };
    let arena = Arena::new(stub);
    let sets = forged_sets(&arena, 0);
    let elf = Elf::read(&std::env::current_exe().unwrap()).unwrap();
    let gate = mpkvirt_asm::mpkvirt_gate_call_nopku as *const () as usize;
    let len = symbol_len(&elf, "mpkvirt_gate_call_nopku", gate);
    let outcomes = attack_gate("mpkvirt_gate_call_nopku", gate, len, &arena, &sets[..2]);
    let entry = outcomes[&(0, 1)];
    match mode {
        // The gate's first write is the record's busy word, read-only to this thread.
        MetadataMode::Protected => assert_eq!(entry, Outcome::Signaled(libc::SIGSEGV)),
        // The gate runs the op (OP_NOP) and returns to the forged return address.
        _ => assert!(
            matches!(entry, Outcome::Reached { pkru, .. } if pkru.is_some() == pku.is_some()),
            "{mode:?}: {entry:?}"
        ),
    }
    assert!(
        outcomes.values().any(|o| matches!(o, Outcome::Signaled(_))),
        "no attempt died: the harness cannot see crashes"
    );
    // A bare WRPKRU: #UD without PKU; with PKU the forged EAX = 0 reaches the stub.
    let weak = attempt(
        &arena,
        AttackRegs {
            target: addr_of(gates_test_weak_raw) as u64,
            rax: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            r8: 0,
            rsp: 0,
            rdi: 0,
            r14: 0,
        },
    );
    match pku {
        None => assert_eq!(weak, Outcome::Signaled(libc::SIGILL)),
        Some(_) => assert!(
            matches!(weak, Outcome::Reached { pkru: Some(0), .. }),
            "{weak:?}"
        ),
    }
}

/// The scene of the PKU gate-gadget tests (the calling thread inside a view of A).
fn pku_scene() -> (Scene, mpkvirt::Domain) {
    let mgr = Manager::new(Config::default()).unwrap();
    assert_eq!(
        mgr.metadata_mode(),
        MetadataMode::Protected,
        "the PKU guest protects metadata by default"
    );
    let a = mgr.create_domain(DomainOptions::default()).unwrap();
    let victim = mgr.create_domain(DomainOptions::default()).unwrap();
    mgr.with_view(&[(&victim, Rights::ReadWrite)], || ())
        .unwrap();
    let kv = u32::from(victim.key().expect("the victim holds a key").index());
    let library_key = mpkvirt::testing::library_memory()
        .library_key
        .map(|k| u32::from(k.index()));
    let k = library_key.expect("a library key");
    let legit = record_pkru();
    let escalate = legit & !(3 << (2 * k)) & !(3 << (2 * kv));
    (
        Scene {
            mgr,
            _victim: victim,
            legit,
            library_key,
            escalate,
        },
        a,
    )
}

/// Attacks `gate` (a symbol of this binary) from inside a view of A; returns the escalations,
/// the outcomes and the thread's legitimate PKRU.
fn pku_attack(name: &str, gate: usize) -> (Vec<String>, BTreeMap<(usize, usize), Outcome>, u32) {
    let pku = mpkvirt_sys::Pku::new().expect("PKU");
    let (scene, a) = pku_scene();
    let _view = scene.mgr.enter(&[(&a, Rights::ReadOnly)]).unwrap();
    let legit = record_pkru();
    assert_eq!(
        pku.rdpkru().bits(),
        legit,
        "the thread runs with its record's PKRU"
    );
    assert_ne!(legit, scene.legit, "the view changed the thread's PKRU");
    let arena = Arena::new(addr_of(gates_test_stub_pku));
    let sets = forged_sets(&arena, scene.escalate);
    let elf = Elf::read(&std::env::current_exe().unwrap()).unwrap();
    let len = symbol_len(&elf, name, gate);
    let outcomes = attack_gate(name, gate, len, &arena, &sets);
    let found = escalations(&outcomes, &sets, legit, scene.library_key);
    (found, outcomes, legit)
}

/// Whether two PKRU values grant the same rights to every key.
fn same_rights(a: u32, b: u32) -> bool {
    (0..16).all(|k| rights(a, k) == rights(b, k))
}

/// A key this test process allocates for "another component" (not mpkvirt's), before any
/// manager takes keys; access-disabled in every thread's legitimate PKRU.
fn foreign_key() -> mpkvirt::Pkey {
    static KEY: std::sync::OnceLock<mpkvirt::Pkey> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        mpkvirt_sys::pkey::pkey_alloc(mpkvirt_sys::AccessRights::DISABLE_ACCESS)
            .expect("a key for another component")
    })
}

/// Set 1 (`eax=escalate rdi=OP_NOP`) at the entry of a gate that works: the stub is reached
/// with the thread's own PKRU (the harness sees attacker code run after a gate).
fn assert_entry_returns_legit(
    name: &str,
    outcomes: &BTreeMap<(usize, usize), Outcome>,
    legit: u32,
) {
    assert_eq!(
        outcomes[&(0, 1)],
        Outcome::Reached {
            pkru: Some(legit),
            record: legit,
            read: None,
        },
        "{name}: entry"
    );
}

/// The bytes of symbol `name` in this test binary's file.
fn elf_code_of(name: &str) -> Vec<u8> {
    let elf = Elf::read(&std::env::current_exe().unwrap()).unwrap();
    let s = elf.symbol(name).expect("symbol").clone();
    let (sec, code) = elf
        .code()
        .find(|(sec, _)| sec.addr <= s.value && s.value < sec.addr + sec.size)
        .expect("section");
    let at = us(s.value - sec.addr);
    code[at..at + us(s.size)].to_vec()
}

/// Every byte of the call gate, every forged register set.
///
/// Fails today: with R8 forged (a jump past the gate's RDPKRU) and RDI = OP_SPAWN_PREPARE,
/// attacker code comes back with every key mpkvirt does not manage opened; see
/// `pku_gate_gadgets_forged_entry_pkru_opens_no_foreign_key`.
#[test]
fn pku_gate_gadgets_in_the_call_gate_raise_nothing() {
    let _pku = require_pku!();
    let _real = common::real_backend();
    foreign_key();
    let (found, outcomes, legit) = pku_attack(
        "mpkvirt_gate_call",
        mpkvirt_asm::mpkvirt_gate_call as *const () as usize,
    );
    assert_entry_returns_legit("mpkvirt_gate_call", &outcomes, legit);
    // Its four WRPKRUs and the instructions after them, landed on with EAX = 0.
    let code = elf_code_of("mpkvirt_gate_call");
    let w: Vec<usize> = gadgets(&code)
        .into_iter()
        .filter(|g| g.1 == Gadget::Wrpkru)
        .map(|g| g.0)
        .collect();
    let [raise, lower, busy, deny] = w[..] else {
        panic!("four WRPKRUs: {w:?}")
    };
    let reached = |pkru| Outcome::Reached {
        pkru: Some(pkru),
        record: legit,
        read: None,
    };
    // (Key 0 read-only too where sandboxes run so: `mpkvirt_deny_key0`.)
    let deny_pkru = if mpkvirt::sandbox::seals_key0() {
        0x5555_5556
    } else {
        0x5555_5554
    };
    // Landing on the raise WRPKRU skips the RDPKRU: the entry PKRU the dispatcher gets is the
    // forged R8 (0 here), which tells it the call comes from a signal handler (the library
    // key is not read-only in it): it seals the views and spells the record's no-access keys
    // `11`, the same rights.
    match outcomes[&(raise, 0)] {
        Outcome::Reached {
            pkru: Some(p),
            record,
            read: None,
        } if p == record && same_rights(p, legit) => {
            println!("raise WRPKRU, EAX = R8 = 0: {p:#010x} (legitimate {legit:#010x})");
        }
        other => panic!("+{raise:#x}, EAX = R8 = 0: raise WRPKRU: {other:?}"),
    }
    for (at, want, what) in [
        (
            raise + 3,
            Outcome::Signaled(libc::SIGSEGV),
            "after the raise WRPKRU: not raised, the record's busy word is read-only",
        ),
        (
            lower,
            reached(legit),
            "lower WRPKRU: re-checked against the record",
        ),
        (
            lower + 3,
            reached(legit),
            "after the lower WRPKRU: loops back",
        ),
        (
            busy,
            reached(legit),
            "a busy record's WRPKRU with the record idle: sent to the record's value",
        ),
        (
            busy + 3,
            reached(legit),
            "after a busy record's WRPKRU: sent to the record's value",
        ),
        (
            deny,
            reached(deny_pkru),
            "deny WRPKRU: re-checked against the deny value",
        ),
        (
            deny + 3,
            reached(deny_pkru),
            "after the deny WRPKRU: loops back",
        ),
    ] {
        assert_eq!(outcomes[&(at, 0)], want, "+{at:#x}, EAX = 0: {what}");
    }
    assert!(found.is_empty(), "escalations:\n{}", found.join("\n"));
}

#[test]
fn pku_gate_gadgets_in_the_nopku_call_gate_raise_nothing() {
    let _pku = require_pku!();
    let _real = common::real_backend();
    foreign_key();
    let (found, outcomes, _) = pku_attack(
        "mpkvirt_gate_call_nopku",
        mpkvirt_asm::mpkvirt_gate_call_nopku as *const () as usize,
    );
    assert!(found.is_empty(), "escalations:\n{}", found.join("\n"));
    // Without raising PKRU its first write, the record's busy word, faults.
    assert_eq!(outcomes[&(0, 1)], Outcome::Signaled(libc::SIGSEGV));
}

#[test]
fn pku_gate_gadgets_in_the_sync_gate_raise_nothing() {
    let _pku = require_pku!();
    let _real = common::real_backend();
    foreign_key();
    let (found, outcomes, legit) = pku_attack("mpkvirt_gate_sync", mpkvirt_asm::addr::gate_sync());
    assert!(found.is_empty(), "escalations:\n{}", found.join("\n"));
    assert_entry_returns_legit("mpkvirt_gate_sync", &outcomes, legit);
    // Landing on its WRPKRU with EAX = 0 ends with the record's value all the same.
    let at = gadgets(&elf_code_of("mpkvirt_gate_sync"))[0].0;
    assert_eq!(
        outcomes[&(at, 0)],
        Outcome::Reached {
            pkru: Some(legit),
            record: legit,
            read: None,
        },
        "WRPKRU of mpkvirt_gate_sync at +{at:#x} with EAX = 0"
    );
    assert_eq!(
        outcomes[&(at + 3, 0)],
        Outcome::Reached {
            pkru: Some(legit),
            record: legit,
            read: None,
        },
        "after the WRPKRU of mpkvirt_gate_sync, EAX = 0: loops back"
    );
}

/// Every byte of the preemption stub (whose XRSTOR could load PKRU from a forged area with a
/// forged component mask), every forged register set: nothing is raised. (The no-PKU twin
/// differs only in the gate its yield calls; its restore sequence is the same bytes. Attacked
/// in the guest it spends the harness's 30 s limit on many attempts that loop in the no-PKU
/// gate, so only the PKU stub is attacked.)
#[test]
fn pku_gate_gadgets_in_the_preemption_stubs_raise_nothing() {
    let _pku = require_pku!();
    let _real = common::real_backend();
    foreign_key();
    let name = "mpkvirt_sandbox_preempted_pku";
    let (found, outcomes, _) = pku_attack(name, mpkvirt_asm::addr::sandbox_preempted_pku());
    println!("{name}: {} attempts", outcomes.len());
    assert!(
        found.is_empty(),
        "{name}: escalations:\n{}",
        found.join("\n")
    );
}

/// The call gate reads the entry PKRU (RDPKRU) into R8 before it raises PKRU; a jump to the
/// raise sequence skips that read, so the dispatcher takes the attacker's R8 for the entry
/// PKRU. `OP_SPAWN_PREPARE` builds the thread's rights for keys mpkvirt does not manage from
/// it (`Root::base_pkru(entry)`), and the gate's exit installs them: R8 = 0 opens every key
/// of other components.
///
/// Fails today: the attacker stub reads another component's secret. (The same forged R8
/// also makes any op run as if called from a signal handler: the thread's views are sealed
/// and its PKRU respelled, without a change of rights.)
#[test]
fn pku_gate_gadgets_forged_entry_pkru_opens_no_foreign_key() {
    let _pku = require_pku!();
    let _real = common::real_backend();
    let kf = foreign_key();
    // Another component's page under its own key, holding a secret.
    let page = map_anon(4096);
    // SAFETY: the page is ours (just mapped), no Rust reference points into it.
    unsafe { (page as *mut u8).write_volatile(SECRET) };
    // SAFETY: the page is ours; it stays readable and writable, now under key `kf`.
    unsafe {
        mpkvirt_sys::pkey::pkey_mprotect(page as *mut u8, 4096, mpkvirt::Prot::READ_WRITE, kf)
    }
    .unwrap();
    let (scene, a) = pku_scene();
    let _view = scene.mgr.enter(&[(&a, Rights::ReadOnly)]).unwrap();
    let legit = record_pkru();
    let k = u32::from(kf.index());
    assert_eq!(rights(legit, k), (false, false), "{legit:#x}");
    let code = elf_code_of("mpkvirt_gate_call");
    let raise = gadgets(&code)[0].0;
    let arena = Arena::new(addr_of(gates_test_stub_read));
    let at = |op: u64| AttackRegs {
        target: (mpkvirt_asm::mpkvirt_gate_call as *const () as usize + raise) as u64,
        rax: 0,
        rcx: 0,
        rdx: 0,
        rsi: arena.zeros as u64,
        r8: 0,
        rsp: 0,
        rdi: op,
        r14: page as u64,
    };
    // Control: the same jump with OP_NOP; the stub's read of the foreign page faults.
    let control = attempt(&arena, at(2));
    let spawn = attempt(&arena, at(5));
    // SAFETY: the mapping is ours and nothing refers to it.
    unsafe { libc::munmap(page as *mut libc::c_void, 4096) };
    assert_eq!(control, Outcome::Signaled(libc::SIGSEGV), "control");
    let seen = match spawn {
        Outcome::Reached { pkru: Some(p), .. } => escalation(p, legit, scene.library_key),
        _ => None,
    };
    assert!(
        !matches!(spawn, Outcome::Reached { read: Some(_), .. }) && seen.is_none(),
        "a jump to the raise WRPKRU of mpkvirt_gate_call (+{raise:#x}) with EAX = R8 = 0, \
         RDI = OP_SPAWN_PREPARE: attacker code runs with {spawn:x?}; foreign key {k}: {}",
        seen.unwrap_or_default()
    );
}

#[test]
fn pku_gate_gadgets_harness_flags_weak_gates() {
    let _pku = require_pku!();
    let _real = common::real_backend();
    foreign_key();
    for (name, gate) in [
        ("gates_test_weak_raw", addr_of(gates_test_weak_raw)),
        ("gates_test_weak_rdi", addr_of(gates_test_weak_rdi)),
    ] {
        let (found, _, _) = pku_attack(name, gate);
        println!("{name}: {} escalation(s)", found.len());
        for f in &found {
            println!("  {f}");
        }
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("offset 0x0, eax=r8=0 rdi=rsi=&zeros")
                    && f.contains("writable")),
            "{name}: the harness missed the escalation at the entry:\n{}",
            found.join("\n")
        );
    }
}

// ---- metadata corruption ----------------------------------------------------------------------

/// One write an attacker makes into library state.
#[derive(Clone, Copy, Debug)]
struct Target {
    name: &'static str,
    addr: usize,
    /// A 64-bit store (else 32-bit).
    wide: bool,
    value: u64,
}

fn read_word(addr: usize, wide: bool) -> u64 {
    if wide {
        // SAFETY: `addr` is an 8-byte-aligned word of library memory, readable by application
        // code (the library key is read-only to it, or key 0 without protection).
        unsafe { (addr as *const u64).read_volatile() }
    } else {
        // SAFETY: as above, a 4-byte-aligned word.
        u64::from(unsafe { (addr as *const u32).read_volatile() })
    }
}

/// The attacker's store: 0 when it happened, 1 when a handler skipped it.
fn store(t: &Target) -> u64 {
    if t.wide {
        // SAFETY: a deliberate store into library memory, which the tests expect to fault
        // (protected) or to hit a word no Rust reference is reading right now (cooperative,
        // single-threaded, restored at once).
        unsafe { gates_test_store64(t.addr, t.value) }
    } else {
        // SAFETY: as above.
        unsafe { gates_test_store32(t.addr, t.value as u32) }
    }
}

/// The attacker's view of the scene: the library state it attacks, a domain A it may enter,
/// and a victim domain V holding a secret, resident (bound to a key) but not granted.
struct MetaScene {
    mgr: Manager,
    a: mpkvirt::Domain,
    v: mpkvirt::Domain,
    secret: usize,
}

fn metadata_scene() -> MetaScene {
    let mgr = Manager::new(Config::default()).unwrap();
    let a = mgr.create_domain(DomainOptions::default()).unwrap();
    let v = mgr.create_domain(DomainOptions::default()).unwrap();
    let secret = v.alloc(8, 8).unwrap().as_ptr() as usize;
    mgr.with_view(&[(&v, Rights::ReadWrite)], || {
        mgr.write_byte(secret, SECRET)
    })
    .unwrap()
    .unwrap();
    assert!(mgr.read_byte(secret).is_err(), "the secret is closed");
    MetaScene { mgr, a, v, secret }
}

/// What [`targets`] writes.
const TARGET_NAMES: [&str; 7] = [
    "root: boot stack top",
    "root: middle (manager registry)",
    "record: pkru (%gs:8)",
    "record: library stack top (%gs:24)",
    "library stack: top word",
    "domain record: A's slot := V's slot",
    "saved view: outer bits with V's key opened",
];

/// The writes, for a thread inside two views of A (the outer one read-write, the inner one
/// read-only).
fn targets(s: &MetaScene) -> Vec<Target> {
    let lib = mpkvirt::testing::library_memory();
    let gs = FsGsBase::new().expect("FSGSBASE").gs_base();
    assert_ne!(gs, 0, "the thread has a record");
    // SAFETY: the GS base points at the thread's record; `%gs:0` holds its own address.
    assert_eq!(unsafe { (gs as *const usize).read_volatile() }, gs);
    // SAFETY: the record's library-stack top is the u64 at offset 24.
    let stack_top = unsafe { ((gs + 24) as *const usize).read_volatile() };
    let kv = u32::from(s.v.key().expect("V holds a key").index());
    let ka = u32::from(s.a.key().expect("A holds a key").index());
    let slot_a = mpkvirt::testing::domain_slot_word(&s.a).unwrap();
    let slot_v = mpkvirt::testing::domain_slot_word(&s.v).unwrap();
    let (va, vv) = (read_word(slot_a, false), read_word(slot_v, false));
    assert!(va < 16 && vv < 16 && va != vv, "slots {va} and {vv}");
    let outer = mpkvirt::testing::view_bits_word(&s.mgr, 1).unwrap();
    let bits = read_word(outer, false) as u32;
    assert_eq!(rights(bits, ka), (true, true), "the outer view: {bits:#x}");
    assert_eq!(
        rights(bits, kv),
        (false, false),
        "the outer view: {bits:#x}"
    );
    let middle = (lib.root.0 + lib.root.1 / 2) & !7;
    let [n_boot, n_middle, n_pkru, n_top, n_stack, n_slot, n_view] = TARGET_NAMES;
    let t = vec![
        Target {
            name: n_boot,
            addr: lib.root.0 + 24,
            wide: true,
            value: 0x4141_4000,
        },
        Target {
            name: n_middle,
            addr: middle,
            wide: true,
            value: 0,
        },
        Target {
            name: n_pkru,
            addr: gs + 8,
            wide: false,
            value: 0,
        },
        Target {
            name: n_top,
            addr: gs + 24,
            wide: true,
            value: 0x4141_4000,
        },
        Target {
            name: n_stack,
            addr: stack_top - 8,
            wide: true,
            value: 0x4141_4000,
        },
        Target {
            name: n_slot,
            addr: slot_a,
            wide: false,
            value: vv,
        },
        Target {
            name: n_view,
            addr: outer,
            wide: false,
            value: u64::from(bits & !(3 << (2 * kv))),
        },
    ];
    for x in &t {
        assert!(mpkvirt::is_metadata(x.addr), "{} at {:#x}", x.name, x.addr);
    }
    t
}

/// What the victim's secret reads as now: `Some(byte)` when the calling thread can read it.
fn victim_readable(s: &MetaScene) -> Option<u8> {
    s.mgr.read_byte(s.secret).ok()
}

// The handler of the forked metadata children: what the last fault was.
static FAULT_CODE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);
static FAULT_KEY: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);
static FAULT_ADDR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn on_store_fault(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    use std::sync::atomic::Ordering::Relaxed;
    // SAFETY: installed with SA_SIGINFO: the kernel passes a valid siginfo for this call.
    let d = mpkvirt_sys::signal::decode_segv(unsafe { &*info });
    // SAFETY: likewise a valid ucontext, used by this invocation only.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let ip = mpkvirt_sys::signal::ip(uc);
    if ip == addr_of(gates_test_store32_insn) || ip == addr_of(gates_test_store64_insn) {
        FAULT_CODE.store(
            match d.code {
                SegvCode::MapErr => 1,
                SegvCode::AccErr => 2,
                SegvCode::PkuErr => 4,
                SegvCode::Other(c) => i64::from(c),
            },
            Relaxed,
        );
        FAULT_KEY.store(d.pkey.map_or(-1, |k| i64::from(k.index())), Relaxed);
        FAULT_ADDR.store(d.addr, Relaxed);
        let sp = mpkvirt_sys::signal::sp(uc);
        // SAFETY: the thread stopped at one of the test's store instructions, each followed
        // by a `ret` at `gates_test_store_done` with nothing pushed: resuming there with the
        // same stack pointer returns 1 to the store's caller.
        unsafe { mpkvirt_sys::signal::redirect(uc, addr_of(gates_test_store_done), sp, 1) };
        return;
    }
    // Any other fault: the default action (the child dies, the parent sees it).
    // SAFETY: all-zero is SIG_DFL with an empty mask; the fault repeats on return and kills.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a valid sigaction for the kernel to read.
    unsafe { libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut()) };
}

/// What a forked child saw when it made one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Written {
    faulted: bool,
    code: i64,
    key: i64,
    addr: usize,
    before: u64,
    after: u64,
    /// The victim's secret after the scenario that follows the write (`None`: unreadable).
    victim: Option<u8>,
}

/// Makes write `t` in a forked child (protected metadata: it must fault), then runs `then`
/// in the child (the attacker's next step) and reports whether the victim became readable.
fn write_in_child(s: &MetaScene, t: &Target, then: impl FnOnce()) -> Written {
    let child = fork_child(|| {
        // SAFETY: the child's own handler (the test process keeps mpkvirt's): it records the
        // fault of the test's store and resumes after it; any other fault kills the child.
        let prev = unsafe { mpkvirt_sys::signal::install(libc::SIGSEGV, on_store_fault, 0) }
            .expect("sigaction");
        let before = read_word(t.addr, t.wide);
        let faulted = store(t) != 0;
        let after = read_word(t.addr, t.wide);
        // SAFETY: puts mpkvirt's handler back (probes in `then` rely on it).
        unsafe { libc::sigaction(libc::SIGSEGV, &prev, std::ptr::null_mut()) };
        then();
        let victim = victim_readable(s);
        use std::sync::atomic::Ordering::Relaxed;
        let words: [u64; 7] = [
            u64::from(faulted),
            FAULT_CODE.load(Relaxed) as u64,
            FAULT_KEY.load(Relaxed) as u64,
            FAULT_ADDR.load(Relaxed) as u64,
            before,
            after,
            victim.map_or(u64::MAX, u64::from),
        ];
        // SAFETY: `words` is a live local of that many bytes; REPORT_FD is the child's pipe.
        unsafe { libc::write(REPORT_FD, words.as_ptr().cast(), size_of_val(&words)) };
    });
    let (status, out) = child.finish();
    let status = status.unwrap_or_else(|| panic!("{}: the child hung", t.name));
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{}: the child died (status {status:#x}) instead of reporting",
        t.name
    );
    assert_eq!(out.len(), 56, "{}: report {out:02x?}", t.name);
    let w = |i: usize| u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().unwrap());
    Written {
        faulted: w(0) != 0,
        code: w(1) as i64,
        key: w(2) as i64,
        addr: w(3) as usize,
        before: w(4),
        after: w(5),
        victim: (w(6) != u64::MAX).then(|| w(6) as u8),
    }
}

#[test]
fn pku_gates_metadata_writes_fault_on_the_library_key() {
    let _pku = require_pku!();
    let _real = common::real_backend();
    foreign_key();
    let s = metadata_scene();
    assert_eq!(s.mgr.metadata_mode(), MetadataMode::Protected);
    let klib = mpkvirt::testing::library_memory()
        .library_key
        .expect("a library key");
    let outer = s.mgr.enter(&[(&s.a, Rights::ReadWrite)]).unwrap();
    let mut inner = Some(s.mgr.enter(&[(&s.a, Rights::ReadOnly)]).unwrap());
    // Control: the same store into application memory happens (the child can tell).
    let app = Box::new(0u64);
    let control = Target {
        name: "application memory (control)",
        addr: (&raw const *app) as usize,
        wide: true,
        value: 0x4141_4000,
    };
    let w = write_in_child(&s, &control, || {});
    assert!(!w.faulted && w.after == control.value, "control: {w:?}");
    let targets = targets(&s);
    for t in &targets {
        let w = write_in_child(&s, t, || {
            // The attacker's next step: the enter the slot write aims at, or the leave that
            // installs the saved view's bits again.
            if t.name.starts_with("domain record") {
                let g = s.mgr.enter(&[(&s.a, Rights::ReadWrite)]).unwrap();
                std::mem::forget(g);
            } else if t.name.starts_with("saved view") {
                drop(inner.take());
            }
        });
        println!("{}: {w:x?}", t.name);
        assert!(
            w.faulted,
            "{}: application code wrote library memory",
            t.name
        );
        assert_eq!(
            (w.code, w.key, w.addr),
            (4, i64::from(klib.index()), t.addr),
            "{}: SEGV_PKUERR on the library key at the target",
            t.name
        );
        assert_eq!(w.after, w.before, "{}: the word changed", t.name);
        assert_eq!(w.victim, None, "{}: the victim became readable", t.name);
    }
    drop(inner);
    drop(outer);
    drop(app);
}

/// The writes of the test above in a process whose metadata is unprotected
/// (`MPKVIRT_METADATA=cooperative`, chosen at the library's first use): they succeed, so the
/// faults above are the protection's doing; and the saved-view write hands the thread the
/// victim's key.
///
/// Fails today: on PKU hardware the cooperative process is killed at its first library call.
/// `Root::library_key()` reads `klib == 0` ("no library key") as key 0 (the child prints
/// `library key before the first use: Some(pkey0)`); `base_pkru` then makes key 0 read-only in
/// the thread's record, `mpkvirt_gate_sync` installs it after the call, and the thread's next
/// stack write faults where not even a signal frame can be written.
#[test]
fn pku_gates_metadata_writes_succeed_when_unprotected() {
    let _pku = require_pku!();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "metadata_writes_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MPKVIRT_METADATA", "cooperative")
        .env("MPKVIRT_GATES_CHILD", "metadata")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("cooperative child:\n{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the cooperative child failed: {:?} (signal {:?})\n{stdout}\n{stderr}",
        out.status,
        out.status.signal()
    );
    for name in TARGET_NAMES {
        assert!(
            stdout.contains(&format!("wrote {name}: ok")),
            "{name}: not written without protection\n{stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("saved view: victim reads {SECRET:#x}")),
        "{stdout}"
    );
}

/// The child process of `pku_gates_metadata_writes_succeed_when_unprotected`.
#[test]
#[ignore = "run as a child process by pku_gates_metadata_writes_succeed_when_unprotected"]
fn metadata_writes_child() {
    if std::env::var("MPKVIRT_GATES_CHILD").as_deref() != Ok("metadata") {
        println!("metadata_writes_child: only meaningful as a child process");
        return;
    }
    let _pku = require_pku!();
    // Before the library's first use there is no library key whatever the mode.
    println!(
        "library key before the first use: {:?}",
        mpkvirt::testing::library_memory().library_key
    );
    let s = metadata_scene();
    assert_eq!(s.mgr.metadata_mode(), MetadataMode::Cooperative);
    assert_eq!(mpkvirt::testing::library_memory().library_key, None);
    let outer = s.mgr.enter(&[(&s.a, Rights::ReadWrite)]).unwrap();
    let inner = s.mgr.enter(&[(&s.a, Rights::ReadOnly)]).unwrap();
    let targets = targets(&s);
    for t in &targets {
        let before = read_word(t.addr, t.wide);
        assert_eq!(store(t), 0, "{}: faulted", t.name);
        let after = read_word(t.addr, t.wide);
        assert_eq!(after, t.value, "{}", t.name);
        // Put it back before anything reads it.
        let restore = Target {
            value: before,
            ..*t
        };
        assert_eq!(store(&restore), 0);
        println!("wrote {}: ok ({before:#x} -> {after:#x}, restored)", t.name);
    }
    // The issue's scenario: one 4-byte write of a saved view's bits, and the next leave
    // installs them: the victim's key is granted.
    let view = targets
        .iter()
        .find(|t| t.name.starts_with("saved view"))
        .unwrap();
    store(view);
    drop(inner);
    match victim_readable(&s) {
        Some(b) => println!("saved view: victim reads {b:#x}"),
        None => println!("saved view: victim unreadable"),
    }
    drop(outer);
    // And a domain's slot word set to the victim's slot, before the next enter.
    let slot = targets
        .iter()
        .find(|t| t.name.starts_with("domain record"))
        .unwrap();
    let before = read_word(slot.addr, false);
    store(slot);
    let r = s.mgr.enter(&[(&s.a, Rights::ReadWrite)]).map(|g| {
        let v = victim_readable(&s);
        drop(g);
        v
    });
    println!("domain slot: next enter {r:?} (Some(byte): the victim was readable in it)");
    store(&Target {
        value: before,
        ..*slot
    });
}

// ---- the public API as the attacker's tool --------------------------------------------------

/// `mpkvirt::thread::without_rights(f)` saves the thread's PKRU before `f` and restores it
/// after. A view that ends inside `f` is revoked and unpinned, but the saved value still
/// grants its key, and is installed again when `f` returns: the thread keeps a key it holds
/// no pin on. Another thread's miss then re-binds that key to another domain, whose memory
/// the first thread can read and write without any view. Safe code, no memory corruption.
///
/// Fails today: the thread reads the other domain's secret.
#[test]
fn pku_gates_a_view_ended_inside_without_rights_leaves_no_rights_behind() {
    let pku = require_pku!();
    let _real = common::real_backend();
    foreign_key();
    // One key: B can only be bound by evicting A.
    let mgr = Manager::new(common::config(1)).unwrap();
    let a = mgr.create_domain(DomainOptions::default()).unwrap();
    let b = mgr.create_domain(DomainOptions::default()).unwrap();
    let secret = b.alloc(8, 8).unwrap().as_ptr() as usize;
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|sc| {
        // Another thread of the process, created outside every view: on a signal it enters
        // a view of B (a miss that needs A's key), writes B's secret and leaves.
        let (mgr, b) = (&mgr, &b);
        sc.spawn(move || {
            if go_rx.recv().is_err() {
                return;
            }
            mgr.with_view(&[(b, Rights::ReadWrite)], || mgr.write_byte(secret, SECRET))
                .unwrap()
                .unwrap();
            done_tx.send(b.key()).unwrap();
        });
        let g = mgr.enter(&[(&a, Rights::ReadWrite)]).unwrap();
        let ka = a.key().expect("A holds the key");
        mpkvirt::thread::without_rights(|| drop(g)).unwrap();
        let after = pku.rdpkru();
        go_tx.send(()).unwrap();
        let kb = done_rx.recv().unwrap();
        assert_eq!(kb, Some(ka), "B was bound to A's former key");
        let read = mgr.read_byte(secret);
        assert!(
            read.is_err(),
            "after without_rights(|| drop(view of A)) the thread runs with PKRU {after} \
             (key {ka} {:?}) and no view; key {ka} now holds B, and the thread reads B's \
             secret: {read:?}",
            after.rights(ka)
        );
    });
}
