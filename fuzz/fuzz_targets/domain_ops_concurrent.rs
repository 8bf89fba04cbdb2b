//! Concurrent domain programs on the simulated backend, checked for linearizability against
//! the reference model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpkvirt_fuzz::domain_ops_concurrent(data));
