//! `mpkvirt-host info` tells the truth about the machine.

use mpkvirt::{BackendKind, Mode};
use mpkvirt_host::info::Report;
use mpkvirt_sys::require_pku;

/// Probing counts keys by allocating them all: one probe at a time.
static PROBE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn probe(mode: Mode) -> Report {
    let _one = PROBE.lock().unwrap_or_else(|e| e.into_inner());
    Report::probe(mode)
}

#[test]
fn auto_mode_matches_detection() {
    let report = probe(Mode::Auto);
    match mpkvirt_sys::detect::pku() {
        Ok(_) => {
            assert!(report.pku.is_ok());
            assert_eq!(report.backend.as_ref().ok(), Some(&BackendKind::Hardware));
        }
        Err(why) => {
            assert_eq!(report.pku, Err(why));
            assert_eq!(report.backend.as_ref().ok(), Some(&BackendKind::Emulated));
            assert!(
                report.reason.contains(&why.to_string()),
                "{}",
                report.reason
            );
            assert_eq!(report.free_keys, None);
        }
    }
    let text = report.to_string();
    assert!(text.contains("backend:"), "{text}");
    // How tenant code is placed: never parallel where rights are process-wide.
    let serialized = text.contains("runtime:       one worker, one tenant at a time");
    assert_eq!(
        serialized,
        report.backend.as_ref().ok() != Some(&BackendKind::Hardware),
        "{text}"
    );
}

#[test]
fn hardware_mode_without_pku_is_an_error_not_a_downgrade() {
    let report = probe(Mode::Hardware);
    assert_eq!(
        report.backend.is_ok(),
        mpkvirt_sys::detect::pku().is_ok(),
        "{report}"
    );
    if report.backend.is_err() {
        assert!(
            report.to_string().contains("backend:       none"),
            "{report}"
        );
    }
}

#[test]
fn pku_info_reports_hardware_keys() {
    let _pku = require_pku!();
    let report = probe(Mode::Auto);
    assert_eq!(report.backend.as_ref().ok(), Some(&BackendKind::Hardware));
    let keys = report.free_keys.expect("keys counted");
    assert!((1..=15).contains(&keys));
    // With protected metadata one key is the library's own.
    assert_eq!(
        report.metadata,
        Some(mpkvirt::MetadataMode::Protected),
        "{report}"
    );
    assert_eq!(report.manager_keys, Some(keys - 1), "{report}");
    assert!(
        report.to_string().contains("metadata:      protected"),
        "{report}"
    );
    assert!(
        report
            .to_string()
            .contains(&format!("free keys:     {keys}"))
    );
    // What tenants may write of key 0, as the library decided it for this kernel.
    let key0 = if mpkvirt::sandbox::seals_key0() {
        "key 0:         key 0 read-only to tenants"
    } else {
        "key 0:         key 0 WRITABLE by tenants"
    };
    assert!(report.to_string().contains(key0), "{report}");
}
