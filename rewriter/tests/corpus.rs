//! Tests over the pinned transformers corpus (fetched by `corpus/fetch.sh`; `scripts/test`
//! runs it before `cargo test`): the audit of each version (4.45.2, 4.57.6, 5.23.0), the diffs of representative
//! rewritten forwards and refusals (insta snapshots under `snapshots/`), idempotence, and
//! the forward hash against CPython's `inspect` + `textwrap`.

mod common;

use std::sync::OnceLock;

use common::{corpus, snapshot_settings as settings};
use forward_rewrite::audit::{AuditDocument, ClassReport, Verdict, render_compact};
use forward_rewrite::index::FileIndex;
use forward_rewrite::parse::ParsedSource;
use forward_rewrite::scan::{ScanOptions, scan};
use forward_rewrite::{ClassSource, LossResolution, Reason, analyze_class, forward_source};

/// The pinned releases: 4.45.2 is the last before `self.loss_function` (every model in the
/// classic style), 4.57.6 the last 4.x, 5.23.0 the newest.
const VERSIONS: [&str; 3] = ["4.45.2", "4.57.6", "5.23.0"];

fn audit(version: &str) -> &'static AuditDocument {
    static AUDITS: [OnceLock<AuditDocument>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = VERSIONS.iter().position(|v| *v == version).unwrap();
    AUDITS[slot].get_or_init(|| {
        scan(&[corpus(version)], &ScanOptions::default())
            .unwrap()
            .document
    })
}

fn class<'a>(doc: &'a AuditDocument, qualname: &str) -> &'a ClassReport {
    doc.classes
        .iter()
        .find(|c| c.qualname == qualname)
        .unwrap_or_else(|| panic!("{qualname} not in the audit"))
}

/// The owner class of a report's forward, as a one-class chain read from the corpus file.
fn owner_source(version: &str, report: &ClassReport) -> ClassSource {
    let path = report.forward_path.as_ref().unwrap();
    let module = report.forward_module.as_ref().unwrap();
    let text = std::fs::read_to_string(corpus(version).join(path)).unwrap();
    let index = FileIndex::build(&ParsedSource::parse(text).unwrap(), module);
    let entry = index.class(report.forward_owner.as_ref().unwrap()).unwrap();
    ClassSource {
        qualname: entry.name.clone(),
        module: module.clone(),
        path: path.clone(),
        line: entry.line,
        source: entry.source.clone(),
    }
}

#[test]
fn every_version_scans_without_failures() {
    for (version, files, mapping) in [
        ("4.45.2", 275, "builtin"),
        ("4.57.6", 390, "tree"),
        ("5.23.0", 530, "tree"),
    ] {
        let doc = audit(version);
        assert_eq!(doc.transformers_version.as_deref(), Some(version));
        // 4.45 has no loss_utils.py: its classic forwards never call self.loss_function.
        assert_eq!(doc.loss_mapping, mapping);
        assert_eq!(doc.summary.files, files);
        assert_eq!(
            doc.summary.failed_files,
            0,
            "{:?}",
            doc.files
                .iter()
                .filter(|f| f.error.is_some())
                .collect::<Vec<_>>()
        );
        assert_eq!(doc.summary.failed, 0);
        assert_eq!(
            doc.summary.patched + doc.summary.refused,
            doc.summary.classes
        );
    }
}

#[test]
fn audit_snapshots() {
    for version in VERSIONS {
        let doc = audit(version);
        let mut text = render_compact(&doc.classes);
        text.push('\n');
        text.push_str(&forward_rewrite::audit::render_summary(doc));
        settings().bind(|| insta::assert_snapshot!(format!("audit_{version}"), text));
    }
}

fn unified_diff(original: &str, patched: &str, name: &str) -> String {
    similar::TextDiff::from_lines(original, patched)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{name} (original)"), &format!("{name} (patched)"))
        .to_string()
}

#[test]
fn diff_snapshots_of_rewritten_forwards() {
    let cases = [
        ("5.23.0", "LlamaForCausalLM"),
        ("5.23.0", "Qwen3ForCausalLM"),
        ("5.23.0", "MistralForCausalLM"),
        ("5.23.0", "Gemma2ForCausalLM"),
        ("5.23.0", "Gemma3ForCausalLM"),
        ("5.23.0", "CohereForCausalLM"),
        ("5.23.0", "GraniteForCausalLM"),
        ("5.23.0", "LlavaForConditionalGeneration"),
        ("5.23.0", "PaliGemmaForConditionalGeneration"),
        ("5.23.0", "GPT2LMHeadModel"),
        ("5.23.0", "ClvpForCausalLM"),
        ("4.57.6", "LlamaForCausalLM"),
        ("4.57.6", "BloomForCausalLM"),
        // The classic style: shift + CrossEntropyLoss.
        ("4.45.2", "LlamaForCausalLM"),
        ("4.45.2", "GPT2LMHeadModel"),
        ("4.45.2", "GPTJForCausalLM"),
        ("4.45.2", "BloomForCausalLM"),
        ("4.45.2", "MixtralForCausalLM"),
        ("4.45.2", "Qwen2ForCausalLM"),
    ];
    for (version, name) in cases {
        let report = class(audit(version), name);
        assert_eq!(
            report.verdict,
            Verdict::Patched,
            "{version} {name}: {:?} {}",
            report.reason,
            report.detail
        );
        let original = forward_source(&[owner_source(version, report)]).unwrap();
        assert_eq!(
            forward_rewrite::hash::forward_sha256(&original),
            *report.forward_sha256.as_ref().unwrap()
        );
        let unpatched =
            forward_rewrite::original_forward(&[owner_source(version, report)]).unwrap();
        let diff = unified_diff(&unpatched, report.patched_forward.as_ref().unwrap(), name);
        settings().bind(|| insta::assert_snapshot!(format!("diff_{version}_{name}"), diff));
    }
}

#[test]
fn refusal_snapshots() {
    for (version, name, reason) in [
        ("5.23.0", "BigBirdForCausalLM", Reason::NonLinearHead),
        (
            "5.23.0",
            "BartForConditionalGeneration",
            Reason::Seq2seqLoss,
        ),
        ("5.23.0", "InklingForCausalLM", Reason::LogitsRebound),
        (
            "5.23.0",
            "ChameleonForConditionalGeneration",
            Reason::LogitsMutated,
        ),
        (
            "5.23.0",
            "CsmForConditionalGeneration",
            Reason::LabelsNotPlain,
        ),
        ("5.23.0", "GitForCausalLM", Reason::LabelsNotPlain),
        ("5.23.0", "xLSTMForCausalLM", Reason::LogitsRebound),
        (
            "4.45.2",
            "LlavaForConditionalGeneration",
            Reason::LogitsMasked,
        ),
        ("4.45.2", "XGLMForCausalLM", Reason::CustomLoss),
        ("4.45.2", "TrOCRForCausalLM", Reason::Seq2seqLoss),
    ] {
        let report = class(audit(version), name);
        assert_eq!(report.reason, Some(reason), "{name}: {}", report.detail);
        let json = serde_json::to_string_pretty(report).unwrap();
        settings().bind(|| insta::assert_snapshot!(format!("refusal_{version}_{name}"), json));
    }
}

/// Rewriting is idempotent: the patched forward, put back in its class, is `already-patched`.
#[test]
fn every_patched_forward_reanalyses_as_already_patched() {
    for version in VERSIONS {
        let mut checked = 0;
        for report in audit(version)
            .classes
            .iter()
            .filter(|c| c.verdict == Verdict::Patched)
        {
            let owner = owner_source(version, report);
            let original = forward_source(std::slice::from_ref(&owner)).unwrap();
            // Replace the forward's lines in the class block by the patched forward, indented
            // like the original.
            let lines: Vec<&str> = owner.source.split_inclusive('\n').collect();
            let first = (report.forward_line.unwrap() - owner.line) as usize;
            let count = original.lines().count();
            let indent: String = lines[first].chars().take_while(|c| *c == ' ').collect();
            let patched: String = report
                .patched_forward
                .as_ref()
                .unwrap()
                .lines()
                .map(|l| {
                    if l.is_empty() {
                        "\n".to_string()
                    } else {
                        format!("{indent}{l}\n")
                    }
                })
                .collect();
            let before: String = lines[..first].concat();
            let after: String = lines[first + count..].concat();
            let replaced = ClassSource {
                source: format!("{before}{patched}{after}"),
                ..owner.clone()
            };
            let again = analyze_class(&[replaced], &LossResolution::Causal);
            assert_eq!(
                again.reason,
                Some(Reason::AlreadyPatched),
                "{version} {}: {}",
                report.qualname,
                again.detail
            );
            checked += 1;
        }
        assert!(checked > 40, "{version}: only {checked} patched classes");
    }
}

/// Contract 2: the Rust hash equals sha256 of `textwrap.dedent(inspect.getblock(...))` in
/// CPython, on every forward of every pinned version.
#[test]
fn forward_hash_matches_python_inspect() {
    let mut items = Vec::new();
    for version in VERSIONS {
        for report in &audit(version).classes {
            if let (Some(path), Some(line), Some(sha)) = (
                &report.forward_path,
                report.forward_line,
                &report.forward_sha256,
            ) {
                items.push(serde_json::json!([corpus(version).join(path), line, sha]));
            }
        }
    }
    assert!(items.len() > 400);
    let list = std::env::temp_dir().join(format!(
        "forward-rewrite-hashes-{}.json",
        std::process::id()
    ));
    std::fs::write(&list, serde_json::to_string(&items).unwrap()).unwrap();
    let script = r#"
import hashlib, inspect, json, sys, textwrap
items = json.load(open(sys.argv[1]))
cache, bad = {}, []
for path, line, sha in items:
    if path not in cache:
        with open(path, encoding="utf-8") as f:  # universal newlines, as linecache reads
            cache[path] = f.read().splitlines(keepends=True)
    text = "".join(inspect.getblock(cache[path][line - 1:]))
    text = textwrap.dedent(text).rstrip("\n") + "\n"
    if hashlib.sha256(text.encode()).hexdigest() != sha:
        bad.append((path, line))
print(len(items), "checked,", len(bad), "differ", bad[:5])
sys.exit(1 if bad else 0)
"#;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let output = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&list)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (needed to check contract 2): {e}"));
    let _ = std::fs::remove_file(&list);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
