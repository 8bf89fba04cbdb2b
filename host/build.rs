//! Builds the example tenants into shared objects in `$OUT_DIR/tenants` — the C ones
//! (`tenants/c/*.c`) with the system's C compiler, the Rust ones (`tenants/rust/*.rs`, `no_std`
//! `cdylib`s sharing `abi.rs`) with cargo's `rustc` — so that the tests load them from there,
//! also inside the PKU guest, which has no compiler (`scripts/pku-vm` copies them in).

use std::path::Path;

fn main() {
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("tenants");
    std::fs::create_dir_all(&out).expect("creating $OUT_DIR/tenants");
    println!("cargo:rerun-if-changed=tenants/c");
    println!("cargo:rerun-if-changed=../include/mpkvirt_fn.h");
    let compiler = cc::Build::new().get_compiler();
    let mut sources: Vec<_> = std::fs::read_dir("tenants/c")
        .expect("tenants/c")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    for src in sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a file name");
        let status = compiler
            .to_command()
            .args([
                "-O2",
                "-fPIC",
                "-shared",
                // No start files: no constructors or destructors of the C runtime's (the
                // loader refuses code that runs at load or unload).
                "-nostartfiles",
                "-Wall",
                "-Werror",
                "-I",
                "../include",
                "-o",
            ])
            .arg(out.join(format!("lib{name}.so")))
            .arg(&src)
            .status()
            .expect("running the C compiler");
        assert!(status.success(), "building tenant {}", src.display());
    }
    build_rust(&out);
}

fn build_rust(out: &Path) {
    println!("cargo:rerun-if-changed=tenants/rust");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let mut sources: Vec<_> = std::fs::read_dir("tenants/rust")
        .expect("tenants/rust")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs") && !p.ends_with("abi.rs"))
        .collect();
    sources.sort();
    for src in sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a file name");
        let status = std::process::Command::new(&rustc)
            .args([
                "--edition",
                "2024",
                "--crate-type",
                "cdylib",
                "--crate-name",
                name,
                "--target",
                &target,
                "-C",
                "opt-level=2",
                "-C",
                "panic=abort",
                "-C",
                "link-arg=-nostartfiles",
                "-D",
                "warnings",
                "-o",
            ])
            .arg(out.join(format!("lib{name}.so")))
            .arg(&src)
            .status()
            .expect("running rustc");
        assert!(status.success(), "building tenant {}", src.display());
    }
}
