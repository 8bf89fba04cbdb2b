//! Compiles the hand-written assembly in `asm/` into `libmpkvirt_asm.a` (psm's recipe).
//!
//! The target is read from `CARGO_CFG_TARGET_*` (a build script runs on the host, so
//! `cfg!(target_arch)` would describe the wrong machine). On a target without assembly the
//! script warns and emits no `has_asm` cfg; `asm/lib.rs` then declares nothing. `mpkvirt-sys`
//! still builds there (as its unsupported twin); `mpkvirt` itself needs x86-64 Linux.

use std::env;

/// The assembly sources for a target, or `None` when mpkvirt has none for it.
fn find_asm(arch: &str, os: &str) -> Option<&'static [&'static str]> {
    match (arch, os) {
        ("x86_64", "linux") => Some(&[
            "asm/x86_64/callgate.S",
            "asm/x86_64/gate.S",
            "asm/x86_64/green.S",
            "asm/x86_64/probe.S",
            "asm/x86_64/sandbox.S",
            "asm/x86_64/stack.S",
        ]),
        _ => None,
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=asm/include");
    println!("cargo:rustc-check-cfg=cfg(has_asm)");

    // Miri cannot link foreign assembly.
    if env::var_os("CARGO_CFG_MIRI").is_some() {
        return;
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let Some(files) = find_asm(&arch, &os) else {
        println!(
            "cargo:warning=mpkvirt-asm: no assembly for {arch}-{os}; gates and guarded calls are unavailable"
        );
        return;
    };
    let mut build = cc::Build::new();
    build
        .include("asm/include")
        .define("CFG_TARGET_OS_linux", None);
    for file in files {
        println!("cargo:rerun-if-changed={file}");
        build.file(file);
    }
    build.compile("mpkvirt_asm");
    println!("cargo:rustc-cfg=has_asm");
}
