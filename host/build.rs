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
    for (src, name) in sources("tenants/c", "c") {
        let status = compiler
            .to_command()
            .args([
                "-O2",
                "-fPIC",
                "-shared",
                // No start files: no constructors or destructors of the C runtime's (the
                // loader refuses code that runs at load or unload).
                "-nostartfiles",
                // Canaries, as a tenant's own build would often have them: a smashed one
                // calls `__stack_chk_fail`, which the loader binds to the runtime's.
                "-fstack-protector-strong",
                // And checked copies (`__memcpy_chk`...), bound to the runtime's too.
                "-D_FORTIFY_SOURCE=2",
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
    // (`abi.rs` is the module every Rust tenant includes, not a tenant.)
    for (src, name) in sources("tenants/rust", "rs")
        .into_iter()
        .filter(|(_, n)| n != "abi")
    {
        let status = std::process::Command::new(&rustc)
            .args([
                "--edition",
                "2024",
                "--crate-type",
                "cdylib",
                "--crate-name",
                &name,
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

/// The files of `dir` ending in `.ext`, sorted, with their names without it.
fn sources(dir: &str, ext: &str) -> Vec<(std::path::PathBuf, String)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_owned();
            Some((p, name))
        })
        .collect();
    out.sort();
    out
}
