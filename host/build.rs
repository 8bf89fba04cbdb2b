//! Builds the example tenants (`tenants/c/*.c`) into shared objects in `$OUT_DIR/tenants`,
//! so that the tests load them from there — also inside the PKU guest, which has no C
//! compiler (`scripts/pku-vm` copies them in).

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
}
