//! Baselines and helpers for mpkvirt's benchmarks.
//!
//! The benchmarks themselves are in `benches/`; `src/bin/policy_report.rs` replays traces
//! through the eviction policies and writes the miss table `docs/benchmarks.md` quotes.

#![deny(unsafe_code)]

pub mod libmpk_style;
pub mod mprotect_switch;
