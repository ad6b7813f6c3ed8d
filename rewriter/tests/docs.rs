//! The README is the documented place of the reason codes: its table must list every code
//! of `reason.rs`, and `Reason::ALL` must hold every variant.

use forward_rewrite::Reason;

#[test]
fn readme_lists_every_reason_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for reason in Reason::ALL {
        let row = format!("| `{}` |", reason.code());
        assert!(
            readme.contains(&row),
            "README.md lacks a table row starting with {row}"
        );
    }
}

#[test]
fn all_holds_every_variant() {
    let source = include_str!("../src/reason.rs");
    let body = &source[source.find("pub enum Reason {").unwrap()..];
    let body = &body[..body.find("\n}").unwrap()];
    let variants = body
        .lines()
        .filter(|l| {
            l.starts_with("    ")
                && l.trim_end().ends_with(',')
                && !l.trim_start().starts_with("///")
        })
        .count();
    assert_eq!(variants, Reason::ALL.len());
}

#[test]
fn every_reason_code_has_a_unit_test() {
    let tests = [
        include_str!("../src/passes/fused_loss/tests.rs"),
        include_str!("../src/passes/fused_loss/tests_classic.rs"),
    ];
    for reason in Reason::ALL {
        let name = format!("Reason::{reason:?}");
        assert!(
            tests.iter().any(|t| t.contains(&name)),
            "passes/fused_loss/tests*.rs never mention {name}"
        );
    }
}

#[test]
fn readme_lists_every_lint_rule() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for rule in forward_rewrite::lint::Rule::ALL {
        let row = format!("| `{}` | `{}` |", rule.code(), rule.name());
        assert!(
            readme.contains(&row),
            "README.md lacks a table row starting with {row}"
        );
    }
}

#[test]
fn readme_lists_every_sync_kind() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for kind in forward_rewrite::syncs::SyncKind::ALL {
        let row = format!("| `{}` |", kind.name());
        assert!(
            readme.contains(&row),
            "README.md lacks a table row starting with {row}"
        );
    }
}

#[test]
fn readme_lists_every_packing_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = &readme[readme
        .find("### Packing verdicts")
        .expect("a Packing verdicts section")..];
    for (code, _) in forward_rewrite::passes::packing::PASS.reasons {
        let row = format!("| `{code}` |");
        assert!(
            section.contains(&row),
            "README.md's Packing verdicts lack a table row starting with {row}"
        );
    }
}

#[test]
fn every_packing_code_has_a_unit_test() {
    let tests = include_str!("../src/passes/packing/tests.rs");
    for (code, _) in forward_rewrite::passes::packing::PASS.reasons {
        // `packing-no-position-ids` -> `Code::NoPositionIds`
        let variant: String = code
            .trim_start_matches("packing-")
            .split('-')
            .map(|w| {
                let mut chars = w.chars();
                chars.next().map_or(String::new(), |c| {
                    c.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect();
        let name = format!("Code::{variant}");
        assert!(
            tests.contains(&name),
            "passes/packing/tests.rs never mentions {name}"
        );
    }
}

#[test]
fn readme_lists_every_attnres_reason_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for (code, _) in forward_rewrite::passes::attnres::reason::REASONS {
        let row = format!("| `{code}` |");
        assert!(
            readme.contains(&row),
            "README.md lacks a table row starting with {row}"
        );
    }
}

#[test]
fn readme_lists_every_pass_reason_code_with_its_meaning() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    // The decoder-fusion passes' tables: `| code | meaning |`.
    for name in ["rms-norm", "rotary", "gated-mlp"] {
        let pass = forward_rewrite::passes::find(name).unwrap();
        for (code, meaning) in pass.reasons {
            let row = format!("| `{code}` | {meaning} |");
            assert!(
                readme.contains(&row),
                "README.md lacks the {} row {row}",
                pass.name
            );
        }
    }
}

#[test]
fn every_fusion_reason_code_has_a_unit_test() {
    use forward_rewrite::passes::{gated_mlp, rms_norm, rotary};
    for (reasons, tests) in [
        (
            rms_norm::REASONS,
            include_str!("../src/passes/rms_norm/tests.rs"),
        ),
        (
            rotary::REASONS,
            include_str!("../src/passes/rotary/tests.rs"),
        ),
        (
            gated_mlp::REASONS,
            include_str!("../src/passes/gated_mlp/tests.rs"),
        ),
    ] {
        for (code, _) in reasons {
            assert!(
                tests.contains(&format!("\"{code}\"")),
                "no unit test mentions the reason {code}"
            );
        }
    }
}
