//! The audit document (DESIGN.md, schema 1): serde types, the summary, and the table renderer.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::reason::Reason;

/// The verdict on one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A patched forward was emitted, re-parsed and re-analysed.
    Patched,
    /// Deliberately not patched; `reason` says why.
    Refused,
    /// Could not be analysed (class source does not parse) or emission failed its own checks.
    Failed,
}

/// A logit transform lowered into a keyword of `fused_lm_head_loss`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transform {
    /// `softcap`, `scale_multiply` or `scale_divide`.
    pub kind: TransformKind,
    /// The Python expression passed as the keyword's value (evaluated in the patched forward).
    pub expr: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformKind {
    ScaleMultiply,
    ScaleDivide,
    Softcap,
}

impl TransformKind {
    /// The keyword of `forward_rewrite.fused_lm_head_loss` that carries it.
    pub fn keyword(self) -> &'static str {
        match self {
            TransformKind::ScaleMultiply => "logit_scale_multiply",
            TransformKind::ScaleDivide => "logit_scale_divide",
            TransformKind::Softcap => "logit_softcapping",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TransformKind::ScaleMultiply => "scale_multiply",
            TransformKind::ScaleDivide => "scale_divide",
            TransformKind::Softcap => "softcap",
        }
    }
}

/// The two loss shapes the fused-loss pass lowers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossStyleKind {
    LossFunction,
    CrossEntropy,
}

/// The result of `analyze_class` (contract 1): one `classes[]` entry of the audit document,
/// plus the patched forward when the verdict is `patched`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassReport {
    pub qualname: String,
    pub module: String,
    pub path: String,
    /// 1-based line of the class statement (its first decorator) in `path`.
    pub line: u32,
    pub verdict: Verdict,
    /// Null exactly when the verdict is `patched`.
    pub reason: Option<Reason>,
    /// A human sentence saying what was seen (empty when patched).
    pub detail: String,
    /// Contract 2 hash of the forward the class runs (null when no forward was found).
    pub forward_sha256: Option<String>,
    /// The class of the chain that defines that forward (differs from `qualname` when inherited).
    pub forward_owner: Option<String>,
    /// The module that defines that forward: a patch must be executed in its namespace.
    pub forward_module: Option<String>,
    /// The file of that module (as reported, like `path`).
    pub forward_path: Option<String>,
    /// 1-based line of the forward's first decorator (or `def`) in the owner's file.
    pub forward_line: Option<u32>,
    /// The head attribute called on the hidden states (`lm_head`), when found.
    pub head: Option<String>,
    /// Whether the head's `nn.Linear` has a bias (null: not known or depends on the config).
    pub head_bias: Option<bool>,
    /// Lowered logit transforms, in the order the op applies them.
    pub transforms: Vec<Transform>,
    /// Which shape computes the loss: `loss_function` (`self.loss_function(...)`) or
    /// `cross_entropy` (the classic shift + `CrossEntropyLoss`); null when no loss site
    /// was matched.
    #[serde(default)]
    pub loss_style: Option<LossStyleKind>,
    /// Whether `forward-rewrite build --verify` checked this patch against the stock forward
    /// (a tiny model, loss and every gradient): true / false, null when not checked.
    #[serde(default)]
    pub verified: Option<bool>,
    /// What the check found (why it was skipped or what differed); absent when not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
    /// The verdicts of the other passes run on this class (`passes/mod.rs`), by pass name;
    /// the fused-loss pass's verdict is the report's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub passes: BTreeMap<String, PassReport>,
    /// The complete patched `def forward`, dedented to column 0; present only when patched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patched_forward: Option<String>,
}

/// What a pass beyond the fused loss says about one class: a verdict from the pass's own
/// vocabulary (documented with the pass: `guaranteed` / `dynamic` / `refused` for packing),
/// the pass's stable reason code (null when nothing is refused), what was seen, and fields of
/// the pass's own (`paths` for packing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassReport {
    pub verdict: String,
    pub reason: Option<String>,
    #[serde(default)]
    pub detail: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl PassReport {
    pub fn new(verdict: &str, reason: Option<&str>, detail: impl Into<String>) -> PassReport {
        PassReport {
            verdict: verdict.to_string(),
            reason: reason.map(str::to_string),
            detail: detail.into(),
            extra: BTreeMap::new(),
        }
    }
}

/// Counts of one pass over the scan: classes per verdict and per reason code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassSummary {
    pub verdicts: BTreeMap<String, usize>,
    pub reasons: BTreeMap<String, usize>,
}

/// One scanned file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    /// `ok` or `failed`.
    pub status: FileStatus,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Ok,
    Failed,
}

/// Counts over the whole scan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub files: usize,
    pub failed_files: usize,
    pub classes: usize,
    pub patched: usize,
    pub refused: usize,
    pub failed: usize,
    /// Refusals and failures per reason code.
    pub reasons: BTreeMap<Reason, usize>,
    /// Per pass beyond the fused loss: verdict and reason counts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub passes: BTreeMap<String, PassSummary>,
}

/// The audit document, schema 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditDocument {
    pub schema: u32,
    pub tool_version: String,
    pub transformers_version: Option<String>,
    /// Where `LOSS_MAPPING` came from: `tree` (the scanned `loss/loss_utils.py`) or
    /// `builtin` (a copy of transformers 5.23.0's, when the scanned paths hold none).
    pub loss_mapping: String,
    pub summary: Summary,
    pub files: Vec<FileEntry>,
    pub classes: Vec<ClassReport>,
}

impl Summary {
    pub fn compute(files: &[FileEntry], classes: &[ClassReport]) -> Summary {
        let mut summary = Summary {
            files: files.len(),
            failed_files: files
                .iter()
                .filter(|f| f.status == FileStatus::Failed)
                .count(),
            classes: classes.len(),
            ..Summary::default()
        };
        for class in classes {
            match class.verdict {
                Verdict::Patched => summary.patched += 1,
                Verdict::Refused => summary.refused += 1,
                Verdict::Failed => summary.failed += 1,
            }
            if let Some(reason) = class.reason {
                *summary.reasons.entry(reason).or_default() += 1;
            }
            for (name, pass) in &class.passes {
                let counts = summary.passes.entry(name.clone()).or_default();
                *counts.verdicts.entry(pass.verdict.clone()).or_default() += 1;
                if let Some(reason) = &pass.reason {
                    *counts.reasons.entry(reason.clone()).or_default() += 1;
                }
            }
        }
        summary
    }
}

fn transforms_cell(transforms: &[Transform]) -> String {
    if transforms.is_empty() {
        return "-".to_string();
    }
    transforms
        .iter()
        .map(|t| format!("{}({})", t.kind.name(), t.expr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per class: verdict, reason, qualname, head, transforms (the compact audit of the
/// snapshots, also useful with `grep`).
pub fn render_compact(classes: &[ClassReport]) -> String {
    let mut out = String::new();
    for class in classes {
        let reason = class.reason.map_or("-", |r| r.code());
        let head = match (&class.head, class.head_bias) {
            (Some(head), Some(true)) => format!("{head}+bias"),
            (Some(head), None) => format!("{head}+bias?"),
            (Some(head), Some(false)) => head.clone(),
            (None, _) => "-".to_string(),
        };
        let verdict = match class.verdict {
            Verdict::Patched => "patched",
            Verdict::Refused => "refused",
            Verdict::Failed => "failed",
        };
        let loss = match class.loss_style {
            Some(LossStyleKind::LossFunction) => "loss_function",
            Some(LossStyleKind::CrossEntropy) => "cross_entropy",
            None => "-",
        };
        let _ = writeln!(
            out,
            "{verdict:<8} {reason:<28} {}.{} loss={loss} head={head} transforms={}",
            class.module,
            class.qualname,
            transforms_cell(&class.transforms)
        );
    }
    out
}

/// The readable table: one row per class, then the failed files and the summary.
pub fn render_table(doc: &AuditDocument, files: &[&FileEntry], classes: &[&ClassReport]) -> String {
    let mut out = String::new();
    // One column per pass beyond the fused loss that ran: its verdict, and reason if any.
    let passes: std::collections::BTreeSet<&String> =
        classes.iter().flat_map(|c| c.passes.keys()).collect();
    let mut headers: Vec<String> = [
        "VERDICT",
        "REASON",
        "CLASS",
        "PATH:LINE",
        "HEAD",
        "TRANSFORMS",
    ]
    .map(String::from)
    .to_vec();
    headers.extend(passes.iter().map(|p| p.to_uppercase()));
    let rows: Vec<Vec<String>> = classes
        .iter()
        .map(|c| {
            let mut row = vec![
                format!("{:?}", c.verdict).to_lowercase(),
                c.reason.map_or("-".to_string(), |r| r.code().to_string()),
                c.qualname.clone(),
                format!("{}:{}", c.path, c.line),
                c.head.clone().unwrap_or_else(|| "-".to_string()),
                transforms_cell(&c.transforms),
            ];
            for pass in &passes {
                row.push(match c.passes.get(*pass) {
                    Some(PassReport {
                        verdict,
                        reason: Some(reason),
                        ..
                    }) => format!("{verdict} ({reason})"),
                    Some(report) => report.verdict.clone(),
                    None => "-".to_string(),
                });
            }
            row
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(String::len).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                let _ = write!(s, "{:<width$}  ", cell, width = widths[i]);
            }
        }
        s.trim_end().to_string()
    };
    let header_cells: Vec<&str> = headers.iter().map(String::as_str).collect();
    let _ = writeln!(out, "{}", line(&header_cells));
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    let failed: Vec<_> = files
        .iter()
        .filter(|f| f.status == FileStatus::Failed)
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nfailed files:");
        for file in failed {
            let _ = writeln!(
                out,
                "  {}: {}",
                file.path,
                file.error.as_deref().unwrap_or("")
            );
        }
    }
    out.push('\n');
    out.push_str(&render_summary(doc));
    out
}

/// The summary lines printed under the table.
pub fn render_summary(doc: &AuditDocument) -> String {
    let s = &doc.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "transformers {}: {} files ({} failed), {} classes: {} patched, {} refused, {} failed",
        doc.transformers_version
            .as_deref()
            .unwrap_or("(unknown version)"),
        s.files,
        s.failed_files,
        s.classes,
        s.patched,
        s.refused,
        s.failed
    );
    for (reason, count) in &s.reasons {
        let _ = writeln!(out, "  {:<28} {count}", reason.code());
    }
    for (name, pass) in &s.passes {
        let verdicts: Vec<String> = pass
            .verdicts
            .iter()
            .map(|(v, n)| format!("{n} {v}"))
            .collect();
        let _ = writeln!(out, "pass {name}: {}", verdicts.join(", "));
        for (reason, count) in &pass.reasons {
            let _ = writeln!(out, "  {reason:<38} {count}");
        }
    }
    out
}

/// One line per class for a pass beyond the fused loss (its snapshot format): the pass's
/// verdict and reason, `module.Class`, and the pass's own fields.
pub fn render_pass_compact(classes: &[ClassReport], pass: &str) -> String {
    let mut out = String::new();
    for class in classes {
        let Some(report) = class.passes.get(pass) else {
            continue;
        };
        let extra: Vec<String> = report
            .extra
            .iter()
            .map(|(k, v)| match (k.as_str(), v.as_array()) {
                // The decoder-fusion passes' sites (`passes/fusion_common`): one word each,
                // never their patches.
                ("sites", Some(sites)) => {
                    let words: Vec<String> = sites
                        .iter()
                        .map(|s| {
                            let name = s["name"].as_str().unwrap_or("?");
                            let state = s["reason"].as_str().unwrap_or("patched");
                            format!("{name}:{state}")
                        })
                        .collect();
                    format!("sites=[{}]", words.join(","))
                }
                _ => format!("{k}={v}"),
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<10} {:<40} {}.{} {}",
            report.verdict,
            report.reason.as_deref().unwrap_or("-"),
            class.module,
            class.qualname,
            extra.join(" ")
        );
    }
    out
}
