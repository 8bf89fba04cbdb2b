//! Eviction policies on arbitrary traces: accounting, OPT as a lower bound.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpkvirt_fuzz::policy_trace(data));
