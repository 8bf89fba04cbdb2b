//! Views on the live manager: nesting, ending in any order, restoring on unwind, and the
//! scheduler's hints (`hint`, `prefetch`) steering eviction.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use mpkvirt::{Config, DomainOptions, Error, Manager, PolicyKind, Rights, Simulated};

fn mgr(keys: usize, policy: PolicyKind) -> Manager<Simulated> {
    Manager::simulated(
        keys,
        Config {
            max_keys: keys,
            policy,
            pin_wait: Duration::ZERO,
            ..Config::default()
        },
    )
    .unwrap()
}

fn readable(m: &Manager<Simulated>, d: &mpkvirt::Domain<Simulated>) -> bool {
    m.read_byte(d.base().as_ptr() as usize).is_ok()
}

#[test]
fn nested_views_replace_rights_and_end_in_any_order() {
    let m = mgr(4, PolicyKind::Lru);
    let (a, b) = (
        m.create_domain(DomainOptions::default()).unwrap(),
        m.create_domain(DomainOptions::default()).unwrap(),
    );
    let outer = m.enter(&[(&a, Rights::ReadWrite)]).unwrap();
    assert!(readable(&m, &a) && !readable(&m, &b));
    let inner = m.enter(&[(&b, Rights::ReadOnly)]).unwrap();
    assert!(
        !readable(&m, &a),
        "a nested view replaces the rights around it"
    );
    assert!(readable(&m, &b));
    assert!(
        m.write_byte(b.base().as_ptr() as usize, 1).is_err(),
        "read-only"
    );
    drop(outer); // out of order: the inner view stays in force
    assert!(readable(&m, &b) && !readable(&m, &a));
    drop(inner);
    assert!(!readable(&m, &a) && !readable(&m, &b));
}

#[test]
fn a_panic_inside_a_view_restores_the_previous_rights() {
    let m = mgr(4, PolicyKind::Lru);
    let (a, b) = (
        m.create_domain(DomainOptions::default()).unwrap(),
        m.create_domain(DomainOptions::default()).unwrap(),
    );
    let _outer = m.enter(&[(&a, Rights::ReadWrite)]).unwrap();
    let before = m.current_pkru();
    let r = catch_unwind(AssertUnwindSafe(|| {
        m.with_view(&[(&b, Rights::ReadWrite)], || {
            assert!(readable(&m, &b));
            panic!("inside the view");
        })
    }));
    assert!(r.is_err());
    assert_eq!(m.current_pkru(), before);
    assert!(readable(&m, &a) && !readable(&m, &b));
}

#[test]
fn hints_make_the_policy_keep_the_domains_needed_next() {
    // Two keys: a and b resident, a used least recently. Told that a is needed next and
    // b is not, the hinted policy evicts b for c where LRU would evict a.
    for (policy, evicted) in [(PolicyKind::Lru, "a"), (PolicyKind::Hinted, "b")] {
        let m = mgr(2, policy);
        let [a, b, c] = [(); 3].map(|()| m.create_domain(DomainOptions::default()).unwrap());
        drop(m.enter(&[(&a, Rights::ReadWrite)]).unwrap());
        drop(m.enter(&[(&b, Rights::ReadWrite)]).unwrap());
        m.hint(&[&c, &a]);
        drop(m.enter(&[(&c, Rights::ReadWrite)]).unwrap());
        let gone = if !a.is_resident() { "a" } else { "b" };
        assert_eq!(gone, evicted, "{policy:?}");
        assert!(c.is_resident());
    }
}

#[test]
fn prefetch_binds_ahead_and_never_evicts_what_is_coming() {
    let m = mgr(3, PolicyKind::Hinted);
    let d: Vec<_> = (0..5)
        .map(|_| m.create_domain(DomainOptions::default()).unwrap())
        .collect();
    for x in &d[..3] {
        drop(m.enter(&[(x, Rights::ReadWrite)]).unwrap());
    }
    // The run queue: d3, d0, d4. Room for three: d3 and d4 come in, d0 stays, d1 and d2 go.
    assert_eq!(m.prefetch(&[&d[3], &d[0], &d[4]]).unwrap(), 2);
    assert!(d[3].is_resident() && d[0].is_resident() && d[4].is_resident());
    assert!(!d[1].is_resident() && !d[2].is_resident());
    // Entering them now is the fast path.
    let before = m.thread_stats();
    for x in [&d[3], &d[0], &d[4]] {
        drop(m.enter(&[(x, Rights::ReadWrite)]).unwrap());
    }
    assert_eq!(m.thread_stats().slow_paths, before.slow_paths);
    assert_eq!(m.stats().prefetched, 2);
    // With every key pinned, prefetch binds nothing and says so.
    let _pins = m
        .enter(&[
            (&d[3], Rights::ReadOnly),
            (&d[0], Rights::ReadOnly),
            (&d[4], Rights::ReadOnly),
        ])
        .unwrap();
    assert_eq!(m.prefetch(&[&d[1]]).unwrap(), 0);
    // The thread's own view holds every key: waiting cannot help, and the error says so.
    assert!(matches!(
        m.enter(&[(&d[1], Rights::ReadOnly)]),
        Err(Error::ViewsExceedKeys {
            needed: 1,
            held: 3,
            keys: 3
        })
    ));
}

#[test]
fn malformed_views_are_refused_and_change_nothing() {
    let m = mgr(2, PolicyKind::Lru);
    let other = mgr(2, PolicyKind::Lru);
    let [a, b, c] = [(); 3].map(|()| m.create_domain(DomainOptions::default()).unwrap());
    let foreign = other.create_domain(DomainOptions::default()).unwrap();
    let before = m.current_pkru();
    assert!(matches!(
        m.enter(&[(&a, Rights::ReadWrite), (&a, Rights::ReadOnly)]),
        Err(Error::DuplicateDomain(_))
    ));
    assert!(matches!(
        m.enter(&[(&foreign, Rights::ReadWrite)]),
        Err(Error::ForeignDomain(_))
    ));
    assert!(matches!(
        m.enter(&[
            (&a, Rights::ReadWrite),
            (&b, Rights::ReadWrite),
            (&c, Rights::ReadWrite)
        ]),
        Err(Error::ViewTooLarge {
            domains: 3,
            keys: 2
        })
    ));
    assert_eq!(m.current_pkru(), before);
    // No pin leaked: both keys can still be used.
    let _v = m
        .enter(&[(&b, Rights::ReadWrite), (&c, Rights::ReadWrite)])
        .unwrap();
}
