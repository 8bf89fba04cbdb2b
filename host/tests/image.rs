//! Tenant shared objects the host must refuse, and one it must accept (`app::image`).
//!
//! Each object is compiled from C by the system's compiler (`cc`) into a temporary
//! directory, or made by patching a valid one; the test asserts the exact reason for each
//! refusal, and that no mutation of a valid object's bytes makes validation panic.

use std::path::PathBuf;
use std::process::Command;

use mpkvirt::scan::Gadget;
use mpkvirt_host::app::image::{ABI_VERSION, ImageError, validate};

/// A valid tenant: echoes its request.
const ECHO: &str = r#"
#include <string.h>
#include "mpkvirt_fn.h"
const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;
int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *req, size_t len,
                     struct mpkvirt_response *resp) {
    uint8_t *out = host->alloc(len);
    if (out == NULL && len != 0) return 1;
    memcpy(out, req, len);
    resp->data = out;
    resp->len = len;
    return 0;
}
"#;

fn include_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include")
}

/// Compiles `src` with `args` (after the defaults) and returns the output file's bytes.
fn build(name: &str, src: &str, args: &[&str]) -> Vec<u8> {
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mpkvirt-image-{}-{n}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{name}.c"));
    let out = dir.join(format!("{name}.so"));
    std::fs::write(&c, src).unwrap();
    let status = Command::new("cc")
        .args(["-O2", "-fPIC", "-shared", "-nostartfiles", "-o"])
        .arg(&out)
        .arg(&c)
        .arg("-I")
        .arg(include_dir())
        .args(args)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "cc failed for {name}");
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn echo() -> Vec<u8> {
    build("echo", ECHO, &[])
}

/// The offset of the first program header of type `p_type` whose flags contain `with`.
fn phdr(bytes: &[u8], p_type: u32, with: u32) -> usize {
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (size, n) = (u16_at(0x36), u16_at(0x38));
    (0..n)
        .map(|i| phoff + i * size)
        .find(|&p| u32_at(p) == p_type && u32_at(p + 4) & with == with)
        .expect("such a program header")
}

#[test]
fn a_valid_tenant_passes() {
    let info = validate(&echo()).unwrap();
    assert!(info.code_bytes > 0);
    assert!(
        info.imports.iter().any(|i| i == "memcpy"),
        "{:?}",
        info.imports
    );
}

#[test]
fn not_an_elf_file() {
    for bytes in [
        &b""[..],
        b"\x7fEL",
        b"hello, world",
        b"#!/bin/sh\necho hi\n",
    ] {
        assert_eq!(
            validate(bytes).unwrap_err(),
            ImageError::NotElf,
            "{bytes:?}"
        );
    }
}

#[test]
fn truncated_and_corrupt_headers_are_malformed() {
    let good = echo();
    let cut = &good[..100];
    assert!(
        matches!(validate(cut), Err(ImageError::Malformed(_))),
        "{:?}",
        validate(cut)
    );
    // The program headers said to lie far outside the file.
    let mut bad = good.clone();
    bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(
        matches!(validate(&bad), Err(ImageError::Malformed(_))),
        "{:?}",
        validate(&bad)
    );
}

#[test]
fn other_architectures_are_refused() {
    let good = echo();
    let mut elf32 = good.clone();
    elf32[4] = 1; // EI_CLASS: ELFCLASS32
    assert_eq!(
        validate(&elf32).unwrap_err(),
        ImageError::WrongArchitecture("ELF32".into())
    );
    let mut arm = good.clone();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    assert!(matches!(
        validate(&arm),
        Err(ImageError::WrongArchitecture(_))
    ));
}

#[test]
fn an_executable_is_not_a_shared_object() {
    let exe = build(
        "exe",
        "int main(void) { return 0; }",
        &["-fno-pic", "-no-pie", "-nostartfiles", "-e", "main"],
    );
    // (cc built it with -shared first in the argument list; a later -no-pie wins for the
    // output type on GNU ld, and ET_EXEC is what matters here.)
    let e_type = u16::from_le_bytes([exe[16], exe[17]]);
    if e_type == 3 {
        // The toolchain made a shared object anyway: patch the type instead.
        let mut patched = exe.clone();
        patched[16..18].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(validate(&patched).unwrap_err(), ImageError::NotSharedObject);
    } else {
        assert_eq!(validate(&exe).unwrap_err(), ImageError::NotSharedObject);
    }
}

#[test]
fn writable_and_executable_segments_are_refused() {
    let mut wx = echo();
    let p = phdr(&wx, 1, 1); // PT_LOAD with PF_X
    let flags = u32::from_le_bytes(wx[p + 4..p + 8].try_into().unwrap()) | 2; // + PF_W
    wx[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
    assert!(matches!(
        validate(&wx),
        Err(ImageError::WritableAndExecutable { .. })
    ));
}

#[test]
fn an_executable_stack_is_refused() {
    let so = build("execstack", ECHO, &["-Wl,-z,execstack"]);
    assert_eq!(validate(&so).unwrap_err(), ImageError::ExecutableStack);
}

#[test]
fn text_relocations_are_refused() {
    // An absolute address of a data symbol inside the code: the dynamic linker writes it.
    let src = format!(
        "{ECHO}\nint counter;\n__asm__(\".text\\n.globl table\\ntable: .quad counter\\n\");\n"
    );
    let so = build("textrel", &src, &["-Wl,-z,notext"]);
    assert_eq!(validate(&so).unwrap_err(), ImageError::TextRelocations);
}

#[test]
fn pkru_and_thread_pointer_writes_are_refused_at_any_offset() {
    // An aligned WRPKRU, and one hidden in an immediate (a jump to its second byte runs it).
    for (name, asm, kind) in [
        ("wrpkru", ".byte 0x0f, 0x01, 0xef", Gadget::Wrpkru),
        ("hidden", "movl $0x90ef010f, %%eax", Gadget::Wrpkru),
        ("xrstor", "xrstor (%%rdi)", Gadget::Xrstor),
        ("wrfsbase", "wrfsbase %%rax", Gadget::Wrfsbase),
        ("wrgsbase", "wrgsbase %%rdi", Gadget::Wrgsbase),
    ] {
        let src = format!(
            "{ECHO}\nvoid sneaky(void) {{ __asm__ volatile(\"{asm}\" ::: \"rax\", \"memory\"); }}\n"
        );
        let so = build(name, &src, &[]);
        match validate(&so) {
            Err(ImageError::ForbiddenInstruction { kind: k, .. }) => assert_eq!(k, kind, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn missing_or_mismatched_abi_symbols_are_refused() {
    let no_entry = build(
        "noentry",
        "#include <stdint.h>\nconst uint32_t mpkvirt_fn_abi_version = 1;\nint other(void) { return 0; }\n",
        &[],
    );
    assert_eq!(
        validate(&no_entry).unwrap_err(),
        ImageError::MissingSymbol("mpkvirt_fn_entry")
    );
    let no_version = build(
        "noversion",
        &ECHO.replace(
            "const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;",
            "",
        ),
        &[],
    );
    assert_eq!(
        validate(&no_version).unwrap_err(),
        ImageError::MissingSymbol("mpkvirt_fn_abi_version")
    );
    let v2 = build("v2", &ECHO.replace("= MPKVIRT_FN_ABI_VERSION", "= 2"), &[]);
    assert_eq!(
        validate(&v2).unwrap_err(),
        ImageError::AbiVersion { found: 2 }
    );
    assert_ne!(ABI_VERSION, 2);
}

#[test]
fn imports_outside_the_allowed_list_are_refused() {
    let src = format!(
        "{ECHO}\n#include <sys/mman.h>\nint open_up(void *p) {{ return mprotect(p, 4096, 7); }}\n"
    );
    let so = build("mprotect", &src, &[]);
    assert_eq!(
        validate(&so).unwrap_err(),
        ImageError::ForbiddenImport("mprotect".into())
    );
}

/// The C library's allocator may be imported: every word the dynamic linker fills with it
/// (a PLT slot, a GOT entry, a pointer in data) is listed for the loader to rebind, lazily
/// or eagerly bound, with or without RELRO.
#[test]
fn the_c_allocator_is_imported_for_rebinding() {
    let src = format!(
        "{ECHO}\n#include <stdlib.h>\n\
         void *(*keep)(size_t) = malloc;\n\
         void *grab(size_t n) {{ void *p = calloc(1, n); p = realloc(p, 2 * n); free(p); return malloc(n); }}\n"
    );
    for flags in [
        &[][..],
        &["-Wl,-z,now", "-Wl,-z,relro"],
        &["-Wl,-z,lazy", "-Wl,-z,norelro"],
    ] {
        let info = validate(&build("alloc", &src, flags)).unwrap();
        for name in ["malloc", "calloc", "realloc", "free"] {
            assert!(
                info.rebinds.iter().any(|&(_, n)| n == name),
                "{name} with {flags:?}: {:?}",
                info.rebinds
            );
        }
        // `keep` holds malloc's address: its word is rebound too.
        assert!(
            info.rebinds.iter().filter(|&&(_, n)| n == "malloc").count() >= 2,
            "{flags:?}: {:?}",
            info.rebinds
        );
    }
}

/// Code of the object's own that would run when it is loaded or unloaded — with the loading
/// thread's rights — is refused: the C runtime's start files (`_init`, `_fini`, their
/// arrays), a constructor or a destructor, an IFUNC resolver.
#[test]
fn code_that_runs_at_load_or_unload_is_refused() {
    let with_start_files = {
        let dir = std::env::temp_dir().join(format!("mpkvirt-image-crt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("e.c"), ECHO).unwrap();
        let out = dir.join("e.so");
        assert!(
            Command::new("cc")
                .args(["-O2", "-fPIC", "-shared", "-o"])
                .arg(&out)
                .arg(dir.join("e.c"))
                .arg("-I")
                .arg(include_dir())
                .status()
                .unwrap()
                .success()
        );
        let b = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        b
    };
    assert!(matches!(
        validate(&with_start_files),
        Err(ImageError::RunsCodeAtLoad(_))
    ));
    for (name, extra) in [
        (
            "ctor",
            "__attribute__((constructor)) static void at_load(void) { mpkvirt_fn_abi_version_copy = 2; }\n",
        ),
        (
            "dtor",
            "__attribute__((destructor)) static void at_unload(void) { mpkvirt_fn_abi_version_copy = 3; }\n",
        ),
        (
            "ifunc",
            "static int impl(void) { return 1; }\n\
             static int (*resolve(void))(void) { mpkvirt_fn_abi_version_copy = 4; return impl; }\n\
             int picked(void) __attribute__((ifunc(\"resolve\")));\n",
        ),
    ] {
        let src = format!("{ECHO}\nint mpkvirt_fn_abi_version_copy;\n{extra}");
        let err = validate(&build(name, &src, &[])).unwrap_err();
        assert!(
            matches!(err, ImageError::RunsCodeAtLoad(_)),
            "{name}: {err}"
        );
    }
}

/// Thread-local variables would be the worker thread's, shared by every tenant it runs
/// (and key-0 memory): an object with any is refused; the same object without is not.
#[test]
fn thread_local_variables_are_refused() {
    let with =
        format!("{ECHO}\n__thread int per_thread;\nint *where_(void) {{ return &per_thread; }}\n");
    assert_eq!(
        validate(&build("tls", &with, &[])).unwrap_err(),
        ImageError::ThreadLocalStorage
    );
    let without =
        format!("{ECHO}\nint not_per_thread;\nint *where_(void) {{ return &not_per_thread; }}\n");
    validate(&build("no-tls", &without, &[])).unwrap();
}

/// No byte of a valid object, changed to any value, makes validation panic (it returns an
/// error or, for bytes it does not look at, success).
#[test]
fn every_single_byte_mutation_is_handled() {
    let good = echo();
    let mut bytes = good.clone();
    // Every header and program-header byte with several values, and a stride through the rest.
    let phoff = u64::from_le_bytes(good[0x20..0x28].try_into().unwrap()) as usize;
    let head = (phoff + 64 * 14).min(good.len());
    let positions = (0..head).chain((head..good.len()).step_by(7));
    for i in positions {
        for v in [0u8, 1, 0x7f, 0x80, 0xff, good[i] ^ 0x55] {
            bytes[i] = v;
            let _ = validate(&bytes);
        }
        bytes[i] = good[i];
    }
}

// ---- found by review: what the dynamic linker does that the first checks did not see -------

/// `(file offset, file size, flags)` of every loadable segment.
fn loads(bytes: &[u8]) -> Vec<(usize, usize, u32)> {
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    let phoff = u64_at(0x20);
    let (size, n) = (
        u16::from_le_bytes([bytes[0x36], bytes[0x37]]) as usize,
        u16::from_le_bytes([bytes[0x38], bytes[0x39]]) as usize,
    );
    (0..n)
        .map(|i| phoff + i * size)
        .filter(|&p| u32_at(p) == 1)
        .map(|p| (u64_at(p + 8), u64_at(p + 32), u32_at(p + 4)))
        .collect()
}

/// The dynamic linker maps the code segment's whole pages: a gadget in the file bytes after
/// the code's end, in its last page, is executable too.
#[test]
fn a_gadget_in_the_code_segments_page_padding_is_refused() {
    let mut so = echo();
    let (off, size, _) = *loads(&so).iter().find(|l| l.2 & 1 != 0).unwrap();
    let end = off + size;
    assert!(
        end % 4096 != 0 && end % 4096 <= 4093,
        "setup: code ends inside a page"
    );
    so[end..end + 3].copy_from_slice(&[0x0f, 0x01, 0xef]);
    assert!(matches!(
        validate(&so),
        Err(ImageError::ForbiddenInstruction {
            kind: Gadget::Wrpkru,
            ..
        })
    ));
}

/// Without `PT_GNU_STACK`, glibc makes every thread's stack executable at load.
#[test]
fn a_missing_gnu_stack_header_is_an_executable_stack() {
    let mut so = echo();
    let p = phdr(&so, 0x6474_e551, 0);
    so[p..p + 4].copy_from_slice(&0u32.to_le_bytes()); // PT_NULL
    assert_eq!(validate(&so).unwrap_err(), ImageError::ExecutableStack);
}

/// A needed library other than the C library's would be loaded without validation.
#[test]
fn needed_libraries_other_than_libc_are_refused() {
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mpkvirt-image-needed-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libother.so");
    std::fs::write(dir.join("other.c"), "int other(void) { return 1; }\n").unwrap();
    assert!(
        Command::new("cc")
            .args(["-fPIC", "-shared", "-o"])
            .arg(&lib)
            .arg(dir.join("other.c"))
            .status()
            .unwrap()
            .success()
    );
    let dir_arg = format!("-L{}", dir.display());
    let so = build("needs", ECHO, &["-Wl,--no-as-needed", &dir_arg, "-lother"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        validate(&so).unwrap_err(),
        ImageError::ForbiddenLibrary("libother.so".into())
    );
}

/// A relocation aimed at the code (no DT_TEXTREL): the dynamic linker would write there (a
/// crash inside `dlopen`, or a write past the object).
#[test]
fn relocations_outside_writable_segments_are_refused() {
    let mut so = build(
        "reloc",
        &format!("{ECHO}\nstatic int x;\nint *p = &x;\n"),
        &[],
    );
    let code_vaddr = {
        let f = object::read::elf::ElfFile64::<object::Endianness>::parse(&so[..]).unwrap();
        let e = f.endian();
        use object::read::elf::ProgramHeader;
        f.elf_program_headers()
            .iter()
            .find(|p| p.p_type(e) == object::elf::PT_LOAD && p.p_flags(e).0 & 1 != 0)
            .unwrap()
            .p_vaddr(e)
    };
    let (start, len) = {
        use object::{Object, ObjectSection};
        let f = object::File::parse(&so[..]).unwrap();
        let s = f.section_by_name(".rela.dyn").unwrap();
        let (o, l) = s.file_range().unwrap();
        (o as usize, l as usize)
    };
    let r = (start..start + len)
        .step_by(24)
        .find(|&r| u64::from_le_bytes(so[r + 8..r + 16].try_into().unwrap()) & 0xffff_ffff == 8)
        .expect("setup: an R_X86_64_RELATIVE relocation");
    so[r..r + 8].copy_from_slice(&code_vaddr.to_le_bytes());
    assert_eq!(
        validate(&so).unwrap_err(),
        ImageError::RelocationOutsideData { vaddr: code_vaddr }
    );
}

/// The entry symbol must lie in code, not (say) in `.data`.
#[test]
fn an_entry_outside_the_code_is_refused() {
    let so = build(
        "entrydata",
        "#include \"mpkvirt_fn.h\"\nconst uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;\n\
         __asm__(\".data\\n.globl mpkvirt_fn_entry\\n.type mpkvirt_fn_entry,@function\\n\"\n\
         \"mpkvirt_fn_entry: xor %eax,%eax\\n ret\\n.size mpkvirt_fn_entry,3\\n.text\\n\");\n",
        &[],
    );
    assert_eq!(validate(&so).unwrap_err(), ImageError::EntryNotInCode);
}

/// Addresses near the end of the address space make no arithmetic overflow.
#[test]
fn huge_segment_addresses_do_not_overflow() {
    let mut so = echo();
    let p = phdr(&so, 1, 1);
    so[p + 16..p + 24].copy_from_slice(&(u64::MAX - 0xf).to_le_bytes()); // p_vaddr
    let (off, size, _) = *loads(&so).iter().find(|l| l.2 & 1 != 0).unwrap();
    so[off + size / 2..off + size / 2 + 3].copy_from_slice(&[0x0f, 0x01, 0xef]);
    assert!(validate(&so).is_err());
}
