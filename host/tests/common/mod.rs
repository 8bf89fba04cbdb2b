//! Helpers shared by the host's integration tests.
#![allow(dead_code, reason = "each test binary uses part of this module")]

use std::path::PathBuf;

/// The example tenant `host/tenants/c/{name}.c`, built by the crate's build script.
pub(crate) fn build_c(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("OUT_DIR")).join(format!("tenants/lib{name}.so"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}
