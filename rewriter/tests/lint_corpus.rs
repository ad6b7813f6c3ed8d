//! `forward-rewrite lint` on real framework source: the axolotl releases pinned in
//! `corpus/lint-pins.txt` (fetched by `corpus/fetch-lint.sh`, which `corpus/fetch.sh` runs),
//! just before and just after its move to `attn_implementation`. The findings of each are
//! insta snapshots under `snapshots/`; the migration shows as fewer legacy-switch findings.
//! Skipped, with a message, when the releases have not been fetched.

mod common;

use std::path::{Path, PathBuf};

use forward_rewrite::lint::{LintDocument, lint_paths, render_summary};

const RELEASES: [&str; 2] = ["axolotl-0.16.1", "axolotl-0.17.0"];

/// The package directory of a fetched release, or None (with a message) when absent.
fn package(release: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus/cache/lint")
        .join(release);
    let package = root.join("src/axolotl");
    if root.join(".verified").is_file() && package.is_dir() {
        Some(package)
    } else {
        eprintln!(
            "skipped: {release} is not in {}; run corpus/fetch-lint.sh (corpus/fetch.sh runs it)",
            root.display()
        );
        None
    }
}

/// The findings as the text output prints them, with paths relative to the package's parent.
fn render(document: &LintDocument, package: &Path) -> String {
    let prefix = format!("{}/", package.parent().unwrap().display());
    let mut text = String::new();
    for f in &document.findings {
        let path = f.path.strip_prefix(&prefix).unwrap_or(&f.path);
        text.push_str(&format!(
            "{path}:{}:{}: {} {} [use: {}]\n",
            f.line, f.column, f.code, f.message, f.replacement
        ));
    }
    for failed in &document.failed {
        let path = failed.path.strip_prefix(&prefix).unwrap_or(&failed.path);
        text.push_str(&format!("{path}: not checked: {}\n", failed.error));
    }
    text.push_str(&render_summary(&document.summary));
    text.push('\n');
    text
}

fn legacy_findings(document: &LintDocument) -> usize {
    document
        .findings
        .iter()
        .filter(|f| f.code.starts_with("FR-A0") || f.code.starts_with("FR-A1"))
        .count()
}

#[test]
fn axolotl_before_and_after_its_attn_implementation_migration() {
    let Some(packages) = RELEASES
        .iter()
        .map(|r| package(r))
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    let mut documents = Vec::new();
    for (release, package) in RELEASES.iter().zip(&packages) {
        let document = lint_paths(std::slice::from_ref(package)).unwrap();
        assert_eq!(document.summary.failed_files, 0, "{:?}", document.failed);
        let settings = common::snapshot_settings();
        settings.bind(|| {
            insta::assert_snapshot!(format!("lint_{release}"), render(&document, package))
        });
        documents.push(document);
    }
    let (before, after) = (&documents[0], &documents[1]);
    // The migration: the legacy switches are gone from everything but the deprecated fields
    // and a few leftovers, and capability questions (name comparisons) took their place.
    assert!(before.summary.findings > after.summary.findings);
    assert!(legacy_findings(before) >= 4 * legacy_findings(after));
    assert!(before.summary.rules.get("FR-A002") > after.summary.rules.get("FR-A002"));
    assert!(after.summary.rules.get("FR-A201") > before.summary.rules.get("FR-A201"));
}
