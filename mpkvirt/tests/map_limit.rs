//! The emulated backend at the process's mapping limit (issue 8, review 8 finding 8).
//!
//! On the emulated backend every change of a key's rights is an `mprotect` of the domain
//! bound to it, which splits mappings. Once the process holds `vm.max_map_count` mappings
//! such an `mprotect` fails with ENOMEM. A grant that failed used to be logged and the
//! enter reported success: the thread's next access to its own view faulted (SIGSEGV on a
//! plain access). Now the enter fails with `Error::Retag` and changes nothing, and once
//! mappings are free again every view works.
//!
//! The scenario runs in a child process (it uses up the process's mappings:
//! `common::map_limit`).

mod common;

use std::process::Command;

use common::map_limit::MapFiller;
use mpkvirt::{Config, DomainOptions, Error, Manager, Mode, Rights};

const PAGE: usize = 4096;

#[test]
#[ignore = "run by emulated_grants_at_the_mapping_limit_fail_cleanly in a child process"]
fn map_limit_child() {
    let mgr = Manager::new(Config {
        mode: Mode::Emulated,
        ..Config::default()
    })
    .unwrap();
    let doms: Vec<_> = (0..40)
        .map(|_| mgr.create_domain(DomainOptions::reserve(3 * PAGE)).unwrap())
        .collect();
    let addr = |k: usize| doms[k].base().as_ptr() as usize;
    for (k, d) in doms.iter().enumerate() {
        let v = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
        mgr.write_byte(addr(k), 1).unwrap();
        drop(v);
    }
    // Use up the mappings.
    let filler = MapFiller::new();
    let (mut entered, mut refused) = (0, 0);
    for r in 0..2000 {
        let k = r % doms.len();
        match mgr.enter(&[(&doms[k], Rights::ReadWrite)]) {
            Ok(v) => {
                entered += 1;
                // The view holds: its domain is writable (this faulted when the grant had
                // failed silently).
                mgr.write_byte(addr(k) + PAGE, r as u8)
                    .unwrap_or_else(|e| panic!("round {r}: inside a view that was entered: {e}"));
                drop(v);
            }
            Err(Error::Retag { .. }) => refused += 1,
            Err(e) => panic!("round {r}: {e}"),
        }
    }
    drop(filler);
    // Nothing was lost: with mappings to spare, every view works and holds its data.
    for (k, d) in doms.iter().enumerate() {
        let v = mgr.enter(&[(d, Rights::ReadWrite)]).unwrap();
        assert_eq!(mgr.read_byte(addr(k)).unwrap(), 1);
        drop(v);
    }
    println!("at the mapping limit: {entered} entered, {refused} refused");
}

#[test]
fn emulated_grants_at_the_mapping_limit_fail_cleanly() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "map_limit_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let refused = stdout.lines().find_map(|l| {
        l.split(", ")
            .nth(1)?
            .strip_suffix(" refused")?
            .parse::<u32>()
            .ok()
    });
    assert!(
        out.status.success() && refused.is_some_and(|n| n > 0),
        "{:?} (the limit must make some enters fail)\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
