//! Validating a tenant's shared object before it is loaded.
//!
//! Everything here reads the file's bytes; nothing of it is mapped or run. A file passes
//! only if
//!
//! - it is a 64-bit little-endian x86-64 ELF shared object (`ET_DYN`) that parses;
//! - no loadable segment is both writable and executable, the stack is not executable
//!   (`PT_GNU_STACK`), and it has no text relocations (W^X holds from the first instruction);
//! - no code of its own runs when it is loaded or unloaded: no `DT_INIT`/`DT_FINI` or their
//!   arrays (constructors, destructors, the C runtime's start files) and no IFUNC resolver
//!   (an `STT_GNU_IFUNC` symbol or an `R_X86_64_IRELATIVE` relocation) — they would run with
//!   the loading thread's rights, which are the host's;
//! - no executable segment contains, at any byte offset, an instruction that changes PKRU
//!   or the thread pointer ([`mpkvirt::scan`]: WRPKRU, XRSTOR, WRFSBASE, WRGSBASE) — a jump
//!   into the middle of an instruction reaches those bytes too;
//! - it defines `mpkvirt_fn_entry` (a function) and `mpkvirt_fn_abi_version` (a 4-byte
//!   object) whose value is [`ABI_VERSION`];
//! - every symbol it imports is on [`ALLOWED_IMPORTS`]: the C library's functions that
//!   neither allocate nor take a lock, plus what compilers add to every object. A tenant that
//!   imports `mprotect`, `syscall` or `pkey_alloc` is refused here, before system-call
//!   interposition would have to catch it. The allocator (`malloc` and friends) and what may
//!   call it (`qsort`, the `printf`/`scanf` families, `strtod`) are left out: the runtime may
//!   preempt or abandon a tenant anywhere, and one stopped inside glibc's allocator would
//!   leave its arena locked for the worker thread it shares. Tenants allocate with the host
//!   table's `alloc`, or with `malloc`, `calloc`, `realloc` and `free` ([`REBOUND_IMPORTS`]):
//!   validation lists every word the dynamic linker fills with them, and the loader points
//!   those at an allocator in the tenant's own instance (`runtime::tenant_heap`). Only whole
//!   addresses are accepted (no addend, no other relocation type). `abort` and
//!   `__stack_chk_fail` are bound to the runtime's too;
//! - it has no thread-local variables (`PT_TLS`).
//!
//! Once linked, the loader makes the object's writable segments read-only: they are key-0
//! memory, which every instance of the application shares (and, where sandboxes keep key 0
//! writable, every tenant), so none may write them; a tenant's state lives in its instance,
//! on its stack and its heap.
//!
//! Each failure is a [`ImageError`] that names the offending part.

use std::fmt;

use mpkvirt::scan::{Gadget, gadgets};
use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, FileKind, Object, ObjectSection, ObjectSymbol, ObjectSymbolTable};

/// `MPKVIRT_FN_ABI_VERSION` of `include/mpkvirt_fn.h`.
pub const ABI_VERSION: u32 = 1;
/// The entry point a tenant defines.
pub const ENTRY: &str = "mpkvirt_fn_entry";
/// The version symbol a tenant defines.
pub const VERSION_SYMBOL: &str = "mpkvirt_fn_abi_version";

/// Functions a tenant may import.
#[rustfmt::skip]
pub const ALLOWED_IMPORTS: &[&str] = &[
    // Memory and strings.
    "memcpy", "memmove", "memset", "memcmp", "memchr", "strlen", "strnlen", "strcmp",
    "strncmp", "strchr", "strrchr", "strstr", "strcpy", "strncpy", "strcat", "strncat",
    "strspn", "strcspn", "strtol", "strtoul", "strtoll", "strtoull", "atoi", "atol",
    "toupper", "tolower", "isalpha", "isdigit", "isspace", "isalnum", "isxdigit", "isupper",
    "islower", "isprint", "ispunct", "__ctype_b_loc", "__ctype_toupper_loc",
    "__ctype_tolower_loc", "abs", "labs", "bsearch",
    // Mathematics.
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "exp",
    "exp2", "log", "log2", "log10", "pow", "sqrt", "cbrt", "floor", "ceil", "fabs", "fmod",
    "round", "trunc", "lround", "fmin", "fmax", "hypot", "sinf", "cosf", "expf", "logf",
    "powf", "sqrtf", "floorf", "ceilf", "fabsf",
    // Added by compilers.
    "__cxa_finalize", "__gmon_start__", "_ITM_registerTMCloneTable",
    "_ITM_deregisterTMCloneTable",
];

/// Why a shared object is refused.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ImageError {
    /// Not an ELF file (another format, or too short).
    NotElf,
    /// An ELF file for another machine or class.
    WrongArchitecture(String),
    /// An ELF file of another type than a shared object.
    NotSharedObject,
    /// The ELF structures are inconsistent (what the parser said).
    Malformed(String),
    /// A loadable segment at this address is writable and executable.
    WritableAndExecutable {
        /// The segment's virtual address.
        vaddr: u64,
    },
    /// The object asks for an executable stack.
    ExecutableStack,
    /// The object has text relocations (its code is written while it is relocated).
    TextRelocations,
    /// Code that changes PKRU or the thread pointer.
    ForbiddenInstruction {
        /// Which instruction.
        kind: Gadget,
        /// Its virtual address in the object.
        vaddr: u64,
    },
    /// A required symbol is missing or of the wrong kind.
    MissingSymbol(&'static str),
    /// The object was built for another version of the ABI.
    AbiVersion {
        /// The version it declares.
        found: u32,
    },
    /// It imports a function tenants may not call.
    ForbiddenImport(String),
    /// It needs a shared library other than the C library's.
    ForbiddenLibrary(String),
    /// A dynamic relocation writes outside the object's writable segments (into its code,
    /// or past its mappings).
    RelocationOutsideData {
        /// Where it writes.
        vaddr: u64,
    },
    /// The entry symbol does not lie in an executable segment.
    EntryNotInCode,
    /// The object runs code of its own when it is loaded or unloaded (`DT_INIT`,
    /// `DT_INIT_ARRAY`, `DT_PREINIT_ARRAY`, `DT_FINI`, `DT_FINI_ARRAY`: constructors and
    /// destructors, which would run with the loading thread's rights; build with
    /// `-nostartfiles`), or while its symbols are bound (an IFUNC resolver of its own).
    RunsCodeAtLoad(&'static str),
    /// The object has thread-local variables (`PT_TLS`): they would live in the worker
    /// thread's storage, shared by every tenant that thread runs.
    ThreadLocalStorage,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::NotElf => write!(f, "not an ELF file"),
            ImageError::WrongArchitecture(what) => {
                write!(f, "built for {what}; the host runs x86-64 ELF64 objects")
            }
            ImageError::NotSharedObject => write!(f, "not a shared object (ET_DYN)"),
            ImageError::Malformed(why) => write!(f, "malformed ELF: {why}"),
            ImageError::WritableAndExecutable { vaddr } => {
                write!(f, "segment at {vaddr:#x} is writable and executable")
            }
            ImageError::ExecutableStack => write!(f, "asks for an executable stack"),
            ImageError::TextRelocations => write!(f, "has text relocations"),
            ImageError::RunsCodeAtLoad(what) => write!(
                f,
                "runs code of its own when loaded or unloaded ({what}; build with \
                 -nostartfiles, without constructors, destructors or IFUNCs)"
            ),
            ImageError::ForbiddenInstruction { kind, vaddr } => write!(
                f,
                "code at {vaddr:#x} contains {kind:?}, which changes PKRU or the thread pointer"
            ),
            ImageError::MissingSymbol(name) => write!(f, "does not define {name}"),
            ImageError::AbiVersion { found } => write!(
                f,
                "built for ABI version {found}; this host runs version {ABI_VERSION}"
            ),
            ImageError::ForbiddenImport(name) => {
                write!(f, "imports {name}, which tenant code may not call")
            }
            ImageError::ForbiddenLibrary(name) => {
                write!(f, "needs {name}; tenants may link the C library only")
            }
            ImageError::RelocationOutsideData { vaddr } => write!(
                f,
                "a relocation writes at {vaddr:#x}, outside the object's writable segments"
            ),
            ImageError::EntryNotInCode => write!(f, "{ENTRY} does not lie in executable code"),
            ImageError::ThreadLocalStorage => write!(
                f,
                "has thread-local variables, which tenants may not have (they would be the \
                 worker thread's, shared by every tenant it runs)"
            ),
        }
    }
}

impl std::error::Error for ImageError {}

/// What validation learned about an object that passed.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// Bytes of executable segments scanned.
    pub code_bytes: usize,
    /// The functions it imports (all allowed).
    pub imports: Vec<String>,
    /// Its read-only segments (code, constants) as `(vaddr, memsz)`: what host calls may
    /// read besides the instance (a string literal passed to `log`).
    pub read_only: Vec<(u64, u64)>,
    /// The words the dynamic linker fills with the address of one of [`REBOUND_IMPORTS`]
    /// (`(vaddr, symbol)`): the loader points them at the host's allocator in the instance
    /// instead.
    pub rebinds: Vec<(u64, &'static str)>,
    /// The range the dynamic linker makes read-only after relocating (`PT_GNU_RELRO`), as
    /// `(vaddr, memsz)`.
    pub relro: Option<(u64, u64)>,
    /// Its writable segments (data, BSS) as `(vaddr, memsz)`: the loader makes them
    /// read-only once the object is linked.
    pub writable: Vec<(u64, u64)>,
}

/// C library functions a tenant may import whose calls the loader binds to the runtime's own
/// (`runtime::tenant::rebound`), never to the C library's: the allocator, to one in the
/// tenant's own instance (`runtime::tenant_heap`); `abort` and `__stack_chk_fail` (a smashed
/// stack), to one that ends the invocation with `SIGABRT` — the C library's write its own
/// state first, a lock and a stage counter, which a tenant may not write; and the checked
/// copies fortification adds, to ones that end the same way when the check fails (the C
/// library's would print, map a page and abort with its own state).
pub const REBOUND_IMPORTS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "free",
    "abort",
    "__stack_chk_fail",
    "__memcpy_chk",
    "__memmove_chk",
    "__memset_chk",
    "__strcpy_chk",
    "__strcat_chk",
    "__strncpy_chk",
];

/// Checks `bytes`, a tenant's shared object (see the module docs).
///
/// # Errors
///
/// The first rule the object breaks, as an [`ImageError`].
pub fn validate(bytes: &[u8]) -> Result<ImageInfo, ImageError> {
    match FileKind::parse(bytes) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => return Err(ImageError::WrongArchitecture("ELF32".into())),
        _ => return Err(ImageError::NotElf),
    }
    let file =
        ElfFile64::<Endianness>::parse(bytes).map_err(|e| ImageError::Malformed(e.to_string()))?;
    let endian = file.endian();
    let header = file.elf_header();
    if !file.is_little_endian() {
        return Err(ImageError::WrongArchitecture("big-endian ELF".into()));
    }
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(ImageError::WrongArchitecture(format!(
            "machine {machine:?}"
        )));
    }
    if header.e_type(endian) != elf::ET_DYN {
        return Err(ImageError::NotSharedObject);
    }
    let mut code_bytes = 0;
    let mut gnu_stack = false;
    let mut read_only = Vec::new();
    let mut rebinds = Vec::new();
    let mut relro = None;
    let mut writable = Vec::new();
    let phs = file.elf_program_headers();
    // (First: such an object also needs the dynamic linker's `__tls_get_addr`, which is
    // refused below with a less helpful message.)
    if phs.iter().any(|ph| ph.p_type(endian) == elf::PT_TLS) {
        return Err(ImageError::ThreadLocalStorage);
    }
    for ph in phs {
        let flags = ph.p_flags(endian).0;
        let (x, w) = (flags & elf::PF_X.0 != 0, flags & elf::PF_W.0 != 0);
        let vaddr = ph.p_vaddr(endian);
        match ph.p_type(endian) {
            elf::PT_LOAD => {
                if w {
                    writable.push((vaddr, ph.p_memsz(endian)));
                } else {
                    read_only.push((vaddr, ph.p_memsz(endian)));
                }
                if x && w {
                    return Err(ImageError::WritableAndExecutable { vaddr });
                }
                if x {
                    // The dynamic linker maps whole pages: the file's bytes around the
                    // segment in its first and last page become executable too.
                    let (offset, filesz) = (ph.p_offset(endian), ph.p_filesz(endian));
                    let start = offset & !(PAGE - 1);
                    let end = offset
                        .checked_add(filesz)
                        .and_then(|e| e.checked_next_multiple_of(PAGE))
                        .ok_or_else(|| ImageError::Malformed("segment size".into()))?;
                    let end = usize::try_from(end).unwrap_or(usize::MAX).min(bytes.len());
                    let start = usize::try_from(start).unwrap_or(usize::MAX);
                    if start > end || offset.saturating_add(filesz) > bytes.len() as u64 {
                        return Err(ImageError::Malformed("segment outside the file".into()));
                    }
                    let code = &bytes[start..end];
                    if let Some(&(at, kind)) = gadgets(code).first() {
                        let delta = (start + at) as u64;
                        return Err(ImageError::ForbiddenInstruction {
                            kind,
                            vaddr: vaddr.wrapping_sub(offset).wrapping_add(delta),
                        });
                    }
                    code_bytes += code.len();
                }
            }
            elf::PT_GNU_RELRO => relro = Some((vaddr, ph.p_memsz(endian))),
            elf::PT_GNU_STACK if x => return Err(ImageError::ExecutableStack),
            elf::PT_GNU_STACK => gnu_stack = true,
            elf::PT_DYNAMIC => {
                let entries = ph
                    .dynamic(endian, bytes)
                    .map_err(|e| ImageError::Malformed(e.to_string()))?
                    .unwrap_or(&[]);
                rebinds = check_dynamic(&file, bytes, entries)?;
            }
            _ => {}
        }
    }
    // Without PT_GNU_STACK, glibc makes every thread's stack executable when it loads the
    // object.
    if !gnu_stack {
        return Err(ImageError::ExecutableStack);
    }
    let mut entry = false;
    let mut version = None;
    let mut imports = Vec::new();
    for sym in file.dynamic_symbols() {
        let name = sym
            .name()
            .map_err(|e| ImageError::Malformed(e.to_string()))?;
        if name.is_empty() {
            continue;
        }
        if !sym.is_undefined()
            && matches!(sym.flags(), object::SymbolFlags::Elf { st_info, .. }
                if st_info.0 & 0xf == elf::STT_GNU_IFUNC.0)
        {
            return Err(ImageError::RunsCodeAtLoad("an IFUNC resolver"));
        }
        if sym.is_undefined() {
            if !ALLOWED_IMPORTS.contains(&name) && !REBOUND_IMPORTS.contains(&name) {
                return Err(ImageError::ForbiddenImport(name.to_owned()));
            }
            imports.push(name.to_owned());
            continue;
        }
        match name {
            ENTRY if sym.kind() == object::SymbolKind::Text => {
                if !in_segment(&file, sym.address(), 1, elf::PF_X.0) {
                    return Err(ImageError::EntryNotInCode);
                }
                entry = true;
            }
            VERSION_SYMBOL if sym.size() == 4 => {
                version = Some(read_u32_at(&file, bytes, sym.address())?);
            }
            _ => {}
        }
    }
    if !entry {
        return Err(ImageError::MissingSymbol(ENTRY));
    }
    match version {
        None => return Err(ImageError::MissingSymbol(VERSION_SYMBOL)),
        Some(v) if v != ABI_VERSION => return Err(ImageError::AbiVersion { found: v }),
        Some(_) => {}
    }
    Ok(ImageInfo {
        code_bytes,
        imports,
        read_only,
        rebinds,
        relro,
        writable,
    })
}

/// The page size the dynamic linker maps with (x86-64).
const PAGE: u64 = 4096;

/// Libraries a tenant may need.
const ALLOWED_LIBRARIES: &[&str] = &["libc.so.6", "libm.so.6"];

/// Whether `[vaddr, vaddr + len)` lies in one loadable segment (in memory) with `flags` set.
fn in_segment(file: &ElfFile64<'_, Endianness>, vaddr: u64, len: u64, flags: u32) -> bool {
    let endian = file.endian();
    file.elf_program_headers().iter().any(|ph| {
        let start = ph.p_vaddr(endian);
        ph.p_type(endian) == elf::PT_LOAD
            && ph.p_flags(endian).0 & flags == flags
            && vaddr >= start
            && vaddr
                .checked_add(len)
                .is_some_and(|end| end <= start.saturating_add(ph.p_memsz(endian)))
    })
}

/// The file bytes behind `[vaddr, vaddr + len)` (inside one loadable segment's file part).
fn file_bytes<'a>(
    file: &ElfFile64<'_, Endianness>,
    bytes: &'a [u8],
    vaddr: u64,
    len: u64,
) -> Option<&'a [u8]> {
    let endian = file.endian();
    file.elf_program_headers().iter().find_map(|ph| {
        if ph.p_type(endian) != elf::PT_LOAD {
            return None;
        }
        let off = vaddr.checked_sub(ph.p_vaddr(endian))?;
        if off.checked_add(len)? > ph.p_filesz(endian) {
            return None;
        }
        let at = usize::try_from(ph.p_offset(endian).checked_add(off)?).ok()?;
        bytes.get(at..at.checked_add(usize::try_from(len).ok()?)?)
    })
}

/// Checks what the dynamic linker will do with the object, read from its dynamic segment (as
/// the linker reads it, not from section headers): no text relocations; every relocation
/// writes inside a writable segment; no library but the C library's is needed; the symbol
/// and string tables are the ones the sections describe (which the symbol checks read).
/// Returns the words that receive one of [`REBOUND_IMPORTS`] (only as a whole address: a
/// `GLOB_DAT`, `JUMP_SLOT` or `64` relocation without addend; any other use is refused).
fn check_dynamic(
    file: &ElfFile64<'_, Endianness>,
    bytes: &[u8],
    entries: &[object::elf::Dyn64<Endianness>],
) -> Result<Vec<(u64, &'static str)>, ImageError> {
    let mut rebinds = Vec::new();
    let endian = file.endian();
    let get = |tag: object::elf::DynamicTag| -> Option<u64> {
        entries
            .iter()
            .find(|d| d.tag(endian) == tag)
            .map(|d| d.d_val(endian))
    };
    for d in entries {
        let tag = d.tag(endian);
        let textrel_flag = tag == elf::DT_FLAGS && d.d_val(endian) & elf::DF_TEXTREL.0 != 0;
        if tag == elf::DT_TEXTREL || textrel_flag {
            return Err(ImageError::TextRelocations);
        }
        // Code that the dynamic linker would run with the loading thread's rights.
        let runs = [
            (elf::DT_INIT, "DT_INIT"),
            (elf::DT_FINI, "DT_FINI"),
            (elf::DT_INIT_ARRAYSZ, "DT_INIT_ARRAY"),
            (elf::DT_FINI_ARRAYSZ, "DT_FINI_ARRAY"),
            (elf::DT_PREINIT_ARRAYSZ, "DT_PREINIT_ARRAY"),
        ];
        if let Some(&(t, what)) = runs.iter().find(|&&(t, _)| t == tag)
            && (d.d_val(endian) != 0 || t == elf::DT_INIT || t == elf::DT_FINI)
        {
            return Err(ImageError::RunsCodeAtLoad(what));
        }
        // x86-64 objects use RELA only; REL and packed RELR tables are refused rather than
        // parsed.
        if tag == elf::DT_REL || tag == elf::DT_RELR {
            return Err(ImageError::Malformed("REL or RELR relocations".into()));
        }
    }
    // The tables the section headers name must be the ones the dynamic segment names.
    for (tag, name) in [(elf::DT_SYMTAB, ".dynsym"), (elf::DT_STRTAB, ".dynstr")] {
        let section = file.section_by_name(name).map(|s| s.address());
        if get(tag) != section {
            return Err(ImageError::Malformed(format!(
                "the dynamic segment's {name} is not the section's"
            )));
        }
    }
    // Relocations (DT_RELA and the PLT's DT_JMPREL, both RELA): each writes 8 bytes.
    for (table, size) in [
        (elf::DT_RELA, elf::DT_RELASZ),
        (elf::DT_JMPREL, elf::DT_PLTRELSZ),
    ] {
        let (Some(at), Some(len)) = (get(table), get(size)) else {
            continue;
        };
        let rel = file_bytes(file, bytes, at, len)
            .ok_or_else(|| ImageError::Malformed("relocation table outside the file".into()))?;
        for r in rel.chunks(24) {
            let r_offset = u64::from_le_bytes(
                r.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| ImageError::Malformed("relocation table size".into()))?,
            );
            if !in_segment(file, r_offset, 8, elf::PF_W.0)
                || in_segment(file, r_offset, 8, elf::PF_X.0)
            {
                return Err(ImageError::RelocationOutsideData { vaddr: r_offset });
            }
            let word = |at: usize| {
                r.get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or_else(|| ImageError::Malformed("relocation table size".into()))
            };
            let (info, addend) = (word(8)?, word(16)?);
            let (sym, kind) = ((info >> 32) as usize, info as u32);
            let kind_is = |k: object::elf::RelocationType| k.0 == kind;
            if kind_is(elf::R_X86_64_IRELATIVE) {
                return Err(ImageError::RunsCodeAtLoad("an IFUNC resolver"));
            }
            if sym == 0 {
                continue;
            }
            let name = file
                .dynamic_symbol_table()
                .and_then(|t| t.symbol_by_index(object::SymbolIndex(sym)).ok())
                .and_then(|s| s.name().ok())
                .ok_or_else(|| ImageError::Malformed(format!("relocation symbol {sym}")))?;
            let Some(&rebound) = REBOUND_IMPORTS.iter().find(|&&n| n == name) else {
                continue;
            };
            let whole = kind_is(elf::R_X86_64_GLOB_DAT)
                || kind_is(elf::R_X86_64_JUMP_SLOT)
                || (kind_is(elf::R_X86_64_64) && addend == 0);
            if !whole {
                return Err(ImageError::ForbiddenImport(format!(
                    "{name} (relocation type {kind})"
                )));
            }
            rebinds.push((r_offset, rebound));
        }
    }
    // Libraries it needs.
    let strtab = get(elf::DT_STRTAB).unwrap_or(0);
    let strsz = get(elf::DT_STRSZ).unwrap_or(0);
    let strings = file_bytes(file, bytes, strtab, strsz)
        .ok_or_else(|| ImageError::Malformed("string table outside the file".into()))?;
    for d in entries.iter().filter(|d| d.tag(endian) == elf::DT_NEEDED) {
        let at = usize::try_from(d.d_val(endian)).unwrap_or(usize::MAX);
        let name = strings
            .get(at..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .ok_or_else(|| ImageError::Malformed("library name outside the string table".into()))?;
        let name = String::from_utf8_lossy(name).into_owned();
        if !ALLOWED_LIBRARIES.contains(&name.as_str()) {
            return Err(ImageError::ForbiddenLibrary(name));
        }
    }
    Ok(rebinds)
}

/// The little-endian `u32` the object's file holds at virtual address `vaddr` (inside a
/// loadable segment's file bytes).
fn read_u32_at(
    file: &ElfFile64<'_, Endianness>,
    bytes: &[u8],
    vaddr: u64,
) -> Result<u32, ImageError> {
    let endian = file.endian();
    for ph in file.elf_program_headers() {
        if ph.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let start = ph.p_vaddr(endian);
        let data = ph
            .data(endian, bytes)
            .map_err(|_| ImageError::Malformed("segment outside the file".into()))?;
        let Some(off) = vaddr.checked_sub(start) else {
            continue;
        };
        let Ok(off) = usize::try_from(off) else {
            continue;
        };
        if let Some(b) = data.get(off..off.saturating_add(4)) {
            return Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")));
        }
    }
    Err(ImageError::Malformed(format!(
        "{VERSION_SYMBOL} at {vaddr:#x} has no bytes in the file"
    )))
}
