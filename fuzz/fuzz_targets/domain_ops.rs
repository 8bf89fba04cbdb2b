//! Domain programs on the simulated backend, checked against the reference model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpkvirt_fuzz::domain_ops(data));
