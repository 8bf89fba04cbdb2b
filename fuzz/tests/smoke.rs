//! The fuzz oracles on fixed seeds, so `cargo test` (stable Rust, no libFuzzer) exercises
//! them on every run. `cargo fuzz` explores further (see the README).

use mpkvirt::policy::trace::SplitMix;

fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn domain_ops_on_fixed_seeds() {
    for seed in 0..200 {
        mpkvirt_fuzz::domain_ops(&seeded(seed, 1 + 4 * 300));
    }
}

#[test]
fn domain_ops_on_degenerate_inputs() {
    for data in [&[][..], &[0], &[5, 0, 0, 0], &[255; 64], &[0; 400]] {
        mpkvirt_fuzz::domain_ops(data);
    }
}

#[test]
fn domain_ops_concurrent_on_fixed_seeds() {
    // Each input runs three real threads; 48 programs of 90 operations take well under a
    // second.
    for seed in 0..48 {
        mpkvirt_fuzz::domain_ops_concurrent(&seeded(seed, 2 + 4 * 90));
    }
}

#[test]
fn domain_ops_concurrent_on_degenerate_inputs() {
    for data in [&[][..], &[0], &[3, 7], &[255; 64], &[0; 400], &[1; 1200]] {
        mpkvirt_fuzz::domain_ops_concurrent(data);
    }
}

#[test]
fn policy_trace_on_fixed_seeds() {
    for seed in 0..300 {
        mpkvirt_fuzz::policy_trace(&seeded(seed, 1 + (seed as usize * 7) % 500));
    }
}
