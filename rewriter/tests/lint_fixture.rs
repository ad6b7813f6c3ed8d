//! `lint` on a fixture script holding one instance of every rule and the look-alikes it must
//! leave alone: the text output as an insta snapshot under `snapshots/`.

mod common;

use forward_rewrite::lint::{Rule, lint_source};

#[test]
fn every_rule_on_a_training_script() {
    let text = include_str!("fixtures/lint_train.py");
    let findings = lint_source(text, "lint_train.py").unwrap();
    let mut out = String::new();
    for f in &findings {
        out.push_str(&format!(
            "{}:{}:{}: {} {} [use: {}]\n",
            f.path, f.line, f.column, f.code, f.message, f.replacement
        ));
    }
    let settings = common::snapshot_settings();
    settings.bind(|| insta::assert_snapshot!("lint_fixture_train", out));
    // Every rule fires, and nothing fires in `fine` (from line 31 on).
    for rule in Rule::ALL {
        assert!(
            findings.iter().any(|f| f.code == rule.code()),
            "{}",
            rule.code()
        );
    }
    assert!(findings.iter().all(|f| f.line < 31), "{out}");
}
