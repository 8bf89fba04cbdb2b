//! Helpers shared by the host's integration tests.
#![allow(dead_code, reason = "each test binary uses part of this module")]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `host/tenants/c/{name}.c` into a fresh directory and returns the object's path.
pub(crate) fn build_c(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("mpkvirt-tenant-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("lib{name}.so"));
    let status = Command::new("cc")
        .args(["-O2", "-fPIC", "-shared", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(root.join(format!("tenants/c/{name}.c")))
        .arg("-I")
        .arg(root.join("../include"))
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "cc failed for {name}");
    out
}
