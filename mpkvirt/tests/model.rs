//! Invariant 1 (accessible iff granted): random domain programs on several threads, every
//! access checked against the reference model with unlimited keys, on all three backends.
//!
//! The simulated backend runs many proptest cases; the emulated backend replays programs
//! against the model of its documented (union) semantics with real `mprotect` faults; the
//! hardware backend replays fixed-seed programs with real keys (inside the PKU guest).

mod common;

use common::config;

use mpkvirt::testing::{self, Outcome, Semantics};
use mpkvirt::{Emulated, Hardware, Manager};
use mpkvirt_sys::require_pku;
use proptest::prelude::*;

fn run_simulated(bytes: &[u8], keys: usize) -> Outcome {
    let mgr = Manager::simulated(keys, config(keys)).unwrap();
    testing::run(&mgr, &testing::decode(bytes), Semantics::PerThread)
        .unwrap_or_else(|d| panic!("{d}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn simulated_programs_agree_with_the_model(bytes in proptest::collection::vec(any::<u8>(), 0..1200), keys in 1usize..6) {
        run_simulated(&bytes, keys);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn emulated_programs_agree_with_the_union_model(bytes in proptest::collection::vec(any::<u8>(), 0..800), keys in 1usize..5) {
        let _g = common::real_backend();
        let mgr = Manager::with_backend(Emulated::new(keys).expect("emulated backend"), config(keys)).unwrap();
        testing::run(&mgr, &testing::decode(&bytes), Semantics::Union).unwrap_or_else(|d| panic!("{d}"));
    }
}

#[test]
fn fixed_programs_evict_and_fault_on_the_simulated_backend() {
    // The generator must produce programs that exercise evictions and predicted faults,
    // or the property tests above would prove little.
    let mut total = Outcome::default();
    for seed in 0..64 {
        let o = run_simulated(&testing::program_bytes(seed, 300), 3);
        total.faults += o.faults;
        total.busy += o.busy;
        total.evictions += o.evictions;
        total.accesses += o.accesses;
    }
    assert!(total.evictions > 100, "{total:?}");
    assert!(
        total.faults > 100 && total.faults < total.accesses,
        "{total:?}"
    );
    assert!(total.busy > 0, "{total:?}");
}

#[test]
fn pku_hardware_programs_agree_with_the_model() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mut total = Outcome::default();
    for seed in 0..24 {
        let keys = 1 + (seed as usize % 4);
        let mgr =
            Manager::with_backend(Hardware::new(keys).expect("hardware backend"), config(keys))
                .unwrap();
        let o = testing::run(
            &mgr,
            &testing::decode(&testing::program_bytes(seed, 250)),
            Semantics::PerThread,
        )
        .unwrap_or_else(|d| panic!("seed {seed}: {d}"));
        total.faults += o.faults;
        total.evictions += o.evictions;
        total.accesses += o.accesses;
    }
    assert!(total.evictions > 50 && total.faults > 50, "{total:?}");
}

#[test]
fn pku_hardware_with_every_key_and_more_than_15_domains() {
    let _pku = require_pku!();
    let _g = common::real_backend();
    let mgr =
        Manager::with_backend(Hardware::new(15).expect("hardware backend"), config(15)).unwrap();
    assert!(mgr.keys().len() >= 14, "keys: {:?}", mgr.keys());
    // 40 domains first, then a long program over them: well over 15 in use, so keys cycle.
    let mut bytes: Vec<u8> = (0..40u8).flat_map(|i| [0, i, 0, 0]).collect();
    bytes.extend(testing::program_bytes(99, 1500));
    let o = testing::run(&mgr, &testing::decode(&bytes), Semantics::PerThread)
        .unwrap_or_else(|d| panic!("{d}"));
    assert!(o.evictions > 20, "{o:?}");
}
