//! `forward-rewrite lint`: find legacy attention switches and non-canonical attention names
//! in any Python code (training scripts, frameworks). The driver walks the paths, parses the
//! files in parallel, runs the rules (`rules/`, one module each) through the checker, and
//! renders the findings as text or as a versioned JSON document. Every backend name, short
//! form and switch comes from the shared table (`crate::backends`).

mod checker;
mod context;
pub mod rules;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;

pub use rules::Rule;

use crate::parse::{ParseFailure, ParsedSource};
use crate::scan::InputError;

/// The JSON document's schema version (README, "Lint document").
pub const LINT_SCHEMA: u32 = 1;

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub path: String,
    /// 1-based line and column (in characters) of the start of the flagged code.
    pub line: u32,
    pub column: u32,
    /// The stable rule code (`FR-A001`) and its name (`legacy-flag-keyword`).
    pub code: &'static str,
    pub rule: &'static str,
    pub message: String,
    /// The canonical code to write instead (a name, a keyword, or a capability test).
    pub replacement: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailedFile {
    pub path: String,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LintSummary {
    /// Python files read.
    pub files: usize,
    /// Files that could not be checked (syntax error, not UTF-8).
    pub failed_files: usize,
    pub findings: usize,
    /// Files with at least one finding.
    pub files_with_findings: usize,
    /// Findings per rule code (codes without findings omitted).
    pub rules: BTreeMap<&'static str, usize>,
}

/// The lint document (`--json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LintDocument {
    pub schema: u32,
    pub tool_version: String,
    pub summary: LintSummary,
    pub failed: Vec<FailedFile>,
    pub findings: Vec<Finding>,
}

/// Lint one source text; `path` is what findings report.
pub fn lint_source(text: &str, path: &str) -> Result<Vec<Finding>, ParseFailure> {
    let source = ParsedSource::parse(text)?;
    Ok(checker::Checker::new(&source)
        .run()
        .into_iter()
        .map(|raw| {
            let start = raw.range.start().to_usize();
            let line_start = source.line_start(start);
            Finding {
                path: path.to_string(),
                line: source.line_of(start),
                column: source.text[line_start..start].chars().count() as u32 + 1,
                code: raw.rule.code(),
                rule: raw.rule.name(),
                message: raw.message,
                replacement: raw.replacement,
            }
        })
        .collect())
}

/// The Python files under `paths`: files as given, directories walked (sorted) for `*.py`,
/// skipping hidden directories and `__pycache__`.
fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, InputError> {
    let mut files = Vec::new();
    for path in paths {
        let metadata = std::fs::metadata(path)
            .map_err(|e| InputError(format!("cannot read {}: {e}", path.display())))?;
        if metadata.is_file() {
            files.push(path.clone());
            continue;
        }
        let walk = walkdir::WalkDir::new(path)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                e.depth() == 0
                    || !e.file_type().is_dir()
                    || !e
                        .file_name()
                        .to_str()
                        .is_some_and(|n| n.starts_with('.') || n == "__pycache__")
            });
        for entry in walk {
            let entry =
                entry.map_err(|e| InputError(format!("cannot walk {}: {e}", path.display())))?;
            let is_python = entry.path().extension().is_some_and(|x| x == "py");
            if entry.file_type().is_file() && is_python {
                files.push(entry.into_path());
            }
        }
    }
    Ok(files)
}

/// Lint `paths` (directories or files). Unreadable paths are an [`InputError`]; files that
/// do not parse are listed in `failed` and the lint goes on.
pub fn lint_paths(paths: &[PathBuf]) -> Result<LintDocument, InputError> {
    if paths.is_empty() {
        return Err(InputError("no PATH given".to_string()));
    }
    let files = collect_files(paths)?;
    let results: Vec<Result<Vec<Finding>, FailedFile>> = files
        .par_iter()
        .map(|file| {
            let shown = file.display().to_string();
            let failed = |error: String| FailedFile {
                path: shown.clone(),
                error,
            };
            let bytes = std::fs::read(file).map_err(|e| failed(format!("cannot read: {e}")))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                failed(format!(
                    "not UTF-8: invalid byte at offset {}",
                    e.utf8_error().valid_up_to()
                ))
            })?;
            lint_source(&text, &shown).map_err(|e| failed(format!("syntax error at {e}")))
        })
        .collect();
    let mut findings = Vec::new();
    let mut failed = Vec::new();
    let mut files_with_findings = 0;
    for result in results {
        match result {
            Ok(found) => {
                files_with_findings += usize::from(!found.is_empty());
                findings.extend(found);
            }
            Err(file) => failed.push(file),
        }
    }
    let mut rules = BTreeMap::new();
    for finding in &findings {
        *rules.entry(finding.code).or_insert(0) += 1;
    }
    Ok(LintDocument {
        schema: LINT_SCHEMA,
        tool_version: crate::version().to_string(),
        summary: LintSummary {
            files: files.len(),
            failed_files: failed.len(),
            findings: findings.len(),
            files_with_findings,
            rules,
        },
        failed,
        findings,
    })
}

/// One line per finding, the failed files, and the summary.
pub fn render_text(document: &LintDocument) -> String {
    let mut out = String::new();
    for f in &document.findings {
        let _ = writeln!(
            out,
            "{}:{}:{}: {} {} [use: {}]",
            f.path, f.line, f.column, f.code, f.message, f.replacement
        );
    }
    for failed in &document.failed {
        let _ = writeln!(out, "{}: not checked: {}", failed.path, failed.error);
    }
    let _ = writeln!(out, "{}", render_summary(&document.summary));
    out
}

pub fn render_summary(summary: &LintSummary) -> String {
    let mut line = format!(
        "{} finding{} in {} of {} files",
        summary.findings,
        if summary.findings == 1 { "" } else { "s" },
        summary.files_with_findings,
        summary.files
    );
    if summary.failed_files > 0 {
        let _ = write!(line, " ({} not checked)", summary.failed_files);
    }
    if !summary.rules.is_empty() {
        let per_rule: Vec<String> = summary
            .rules
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        let _ = write!(line, ": {}", per_rule.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_code_has_no_findings() {
        let src = "import forward_rewrite\n\ncaps = forward_rewrite.attention.capabilities(cfg.attn_implementation)\nif caps.supports_packing:\n    pass\nmodel = load(attn_implementation=\"flash_attention_2\")\n";
        assert!(lint_source(src, "ok.py").unwrap().is_empty());
    }

    #[test]
    fn findings_have_positions_codes_and_replacements() {
        let src = "x = 1\nm = load(p,  use_flash_attention_2=True)\n";
        let found = lint_source(src, "a.py").unwrap();
        assert_eq!(found.len(), 1);
        let f = &found[0];
        assert_eq!(
            (f.line, f.column, f.code, f.rule),
            (2, 14, "FR-A001", "legacy-flag-keyword")
        );
        assert_eq!(f.replacement, "attn_implementation=\"flash_attention_2\"");
    }

    #[test]
    fn every_rule_is_listed_once_with_a_unique_code() {
        let mut codes: Vec<&str> = Rule::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Rule::ALL.len());
    }
}
