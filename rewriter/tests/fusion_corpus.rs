//! The decoder-fusion passes (`rms-norm`, `residual-norm`, `rotary`, `gated-mlp`) over the
//! pinned corpus:
//! per class and pass the verdict, reason and sites (insta snapshots under `snapshots/`),
//! the emitted code of representative sites, and that every emitted site re-parses.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use common::{corpus, snapshot_settings as settings};
use forward_rewrite::audit::AuditDocument;
use forward_rewrite::passes::PASSES;
use forward_rewrite::scan::{ScanOptions, scan};

const VERSIONS: [&str; 2] = ["4.57.6", "5.23.0"];
const FUSIONS: [&str; 4] = ["rms-norm", "residual-norm", "rotary", "gated-mlp"];

fn audit(version: &str) -> AuditDocument {
    let passes = FUSIONS
        .iter()
        .map(|n| forward_rewrite::passes::find(n).unwrap())
        .collect();
    scan(
        &[corpus(version)],
        &ScanOptions {
            class: None,
            passes,
        },
    )
    .unwrap()
    .document
}

/// One line per class and pass: verdict, reason, class, then each site as
/// `name:patched[form]` or `name:reason`.
fn render(doc: &AuditDocument, pass: &str) -> String {
    let mut out = String::new();
    let mut sites_patched: BTreeMap<String, usize> = BTreeMap::new();
    for class in &doc.classes {
        let Some(report) = class.passes.get(pass) else {
            continue;
        };
        let sites: Vec<String> = report.extra["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let name = match s["kind"].as_str() {
                    // The second site of an experts class: its `grouped_mm` implementation.
                    Some("experts-forward") => {
                        format!("{}(grouped_mm)", s["name"].as_str().unwrap())
                    }
                    _ => s["name"].as_str().unwrap().to_string(),
                };
                match s["reason"].as_str() {
                    None => {
                        let lowered = s["lowered"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .filter(|(k, _)| {
                                        *k == "form" || *k == "activation" || *k == "norms"
                                    })
                                    .map(|(_, v)| v.as_str().unwrap().to_string())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        *sites_patched
                            .entry(format!("{}.{name}", class.module))
                            .or_default() += 1;
                        format!("{name}:patched[{lowered}]")
                    }
                    Some(reason) => format!("{name}:{reason}"),
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<8} {:<26} {}.{} {}",
            report.verdict,
            report.reason.as_deref().unwrap_or("-"),
            class.module,
            class.qualname,
            sites.join(" ")
        );
    }
    let summary = &doc.summary.passes[pass];
    let _ = writeln!(
        out,
        "\n{pass}: {:?}; distinct sites patched: {}\n{:#?}",
        summary.verdicts,
        sites_patched.len(),
        summary.reasons
    );
    out
}

#[test]
fn fusion_pass_snapshots_and_emitted_sites() {
    assert_eq!(
        PASSES
            .iter()
            .map(|p| p.name)
            .filter(|n| FUSIONS.contains(n))
            .count(),
        FUSIONS.len()
    );
    for version in VERSIONS {
        let doc = audit(version);
        for pass in FUSIONS {
            let text = render(&doc, pass);
            settings().bind(|| insta::assert_snapshot!(format!("fusion_{version}_{pass}"), text));
        }
        // Every emitted site re-parses as one function calling forward_rewrite, with its
        // stock body kept.
        let mut emitted = 0;
        for class in &doc.classes {
            for report in class.passes.values() {
                for site in report.extra["sites"].as_array().unwrap() {
                    if let Some(patch) = site["patch"].as_str() {
                        let parsed = forward_rewrite::parse::ParsedSource::parse(patch).unwrap();
                        assert_eq!(parsed.suite().len(), 1);
                        assert!(patch.contains("forward_rewrite.fusion_guard."));
                        emitted += 1;
                    }
                }
            }
        }
        assert!(emitted > 100, "{version}: only {emitted} sites emitted");
    }
}

#[test]
fn emitted_code_of_representative_sites() {
    let doc = audit("5.23.0");
    for (class, pass, site) in [
        ("LlamaForCausalLM", "rms-norm", "LlamaRMSNorm"),
        ("LlamaForCausalLM", "rotary", "apply_rotary_pos_emb"),
        ("LlamaForCausalLM", "gated-mlp", "LlamaMLP"),
        ("LlamaForCausalLM", "residual-norm", "LlamaDecoderLayer"),
        ("Gemma2ForCausalLM", "residual-norm", "Gemma2DecoderLayer"),
        ("Gemma3ForCausalLM", "rms-norm", "Gemma3RMSNorm"),
        ("Gemma3ForCausalLM", "gated-mlp", "Gemma3MLP"),
        ("Olmo2ForCausalLM", "rms-norm", "Olmo2RMSNorm"),
        ("GPTNeoXForCausalLM", "rotary", "apply_rotary_pos_emb"),
        ("CohereForCausalLM", "rotary", "apply_rotary_pos_emb"),
        ("Phi3ForCausalLM", "rotary", "apply_rotary_pos_emb"),
        ("Phi3ForCausalLM", "gated-mlp", "Phi3MLP"),
        ("GlmForCausalLM", "rotary", "apply_rotary_pos_emb"),
        (
            "GraniteMoeSharedForCausalLM",
            "gated-mlp",
            "GraniteMoeSharedMLP",
        ),
        ("DeepseekV4ForCausalLM", "gated-mlp", "DeepseekV4MLP"),
        ("DeepseekV4ForCausalLM", "gated-mlp", "DeepseekV4Experts"),
        ("Step3p7ForConditionalGeneration", "gated-mlp", "Step3p7MLP"),
        ("GptOssForCausalLM", "gated-mlp", "GptOssExperts"),
        ("MiniMaxM3VLForCausalLM", "gated-mlp", "MiniMaxM3VLDenseMLP"),
        ("MiniMaxM3VLForCausalLM", "gated-mlp", "MiniMaxM3VLExperts"),
    ] {
        let report = doc
            .classes
            .iter()
            .find(|c| c.qualname == class)
            .unwrap_or_else(|| panic!("{class} not in the audit"));
        let sites = report.passes[pass].extra["sites"].as_array().unwrap();
        let found = sites
            .iter()
            .find(|s| s["name"] == site)
            .unwrap_or_else(|| panic!("{class}: no {pass} site {site}: {sites:?}"));
        let patch = found["patch"]
            .as_str()
            .unwrap_or_else(|| panic!("{class}: {site} not patched: {found}"));
        settings()
            .bind(|| insta::assert_snapshot!(format!("fusion_site_5.23.0_{class}_{site}"), patch));
    }
}

/// The `experts-forward` sites' binding: the pinned 5.x transformers' `grouped_mm` experts
/// implementation is, function by function, the one `forward_rewrite.moe_experts` reproduces.
#[test]
fn pinned_grouped_mm_experts_functions_are_the_ones_read() {
    use forward_rewrite::passes::gated_mlp::experts::{EXPERTS_FUNCTIONS, experts_function_ok};
    use ruff_python_ast::Stmt;
    use ruff_text_size::Ranged;
    let path = corpus("5.23.0").join("integrations/moe.py");
    let text = std::fs::read_to_string(&path).unwrap();
    let parsed = forward_rewrite::parse::ParsedSource::parse(text.clone()).unwrap();
    let mut checked = 0;
    for stmt in parsed.suite() {
        if let Stmt::FunctionDef(def) = stmt {
            let wanted = EXPERTS_FUNCTIONS
                .iter()
                .any(|t| t.starts_with(&format!("def {}(", def.name)));
            if wanted {
                let source = &text[def.range().start().to_usize()..def.range().end().to_usize()];
                assert_eq!(experts_function_ok(source), Ok(()), "{}", def.name);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, EXPERTS_FUNCTIONS.len());
}
