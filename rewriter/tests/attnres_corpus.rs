//! The attnres pass over the pinned transformers 5.23.0 corpus (`corpus/fetch.sh`): the
//! per-class audit of the pass and diffs of the emitted base-model and layer forwards
//! (insta snapshots under `snapshots/`).

mod common;

use std::path::PathBuf;

use common::snapshot_settings as settings;
use forward_rewrite::audit::{AuditDocument, render_pass_compact};
use forward_rewrite::parse::ParsedSource;
use forward_rewrite::passes::attnres::{self, resolve::RECURRENT};
use forward_rewrite::scan::{ScanOptions, scan};
use ruff_python_ast::Stmt;

fn corpus() -> PathBuf {
    common::corpus("5.23.0")
}

fn audit() -> AuditDocument {
    let options = ScanOptions {
        passes: vec![&attnres::PASS],
        ..ScanOptions::default()
    };
    scan(&[corpus()], &options).unwrap().document
}

#[test]
fn attnres_audit_snapshot() {
    let doc = audit();
    let text = render_pass_compact(&doc.classes, "attnres");
    let patched = doc
        .classes
        .iter()
        .filter(|c| c.passes["attnres"].verdict == "patched")
        .count();
    let failed = doc
        .classes
        .iter()
        .filter(|c| c.passes["attnres"].verdict == "failed")
        .count();
    assert_eq!(failed, 0);
    assert!(patched >= 100, "{patched} patched");
    for (name, verdict, reason) in [
        ("LlamaForCausalLM", "patched", None),
        ("Qwen3ForCausalLM", "patched", None),
        ("Gemma2ForCausalLM", "patched", None),
        ("Gemma3ForCausalLM", "patched", None),
        ("GPTNeoXForCausalLM", "patched", None),
        ("CohereForCausalLM", "patched", None),
        ("JambaForCausalLM", "refused", Some("hybrid-layers")),
        ("ZambaForCausalLM", "refused", Some("hybrid-layers")),
        ("Qwen3NextForCausalLM", "refused", Some("recurrent-layer")),
        ("MambaForCausalLM", "refused", Some("recurrent-layer")),
        (
            "BartForConditionalGeneration",
            "refused",
            Some("encoder-decoder"),
        ),
        ("BartForCausalLM", "refused", Some("cross-attention")),
        // Layers under `self.h`.
        ("CTRLLMHeadModel", "patched", None),
        ("GPT2LMHeadModel", "refused", Some("cross-attention")),
        ("GPTJForCausalLM", "refused", Some("layer-return")),
        ("GPTNeoForCausalLM", "refused", Some("layer-return")),
        ("CodeGenForCausalLM", "refused", Some("layer-return")),
        ("FalconForCausalLM", "refused", Some("residual-not-seen")),
        ("BloomForCausalLM", "refused", Some("residual-not-seen")),
        ("xLSTMForCausalLM", "refused", Some("recurrent-layer")),
    ] {
        let class = doc
            .classes
            .iter()
            .find(|c| c.qualname == name)
            .unwrap_or_else(|| panic!("{name} not scanned"));
        let report = &class.passes["attnres"];
        assert_eq!(
            (report.verdict.as_str(), report.reason.as_deref()),
            (verdict, reason),
            "{name}: {}",
            report.detail
        );
    }
    settings().bind(|| insta::assert_snapshot!("attnres_audit_5.23.0", text));
}

fn forward_of(module: &ParsedSource, class: &str) -> String {
    for stmt in module.suite() {
        if let Stmt::ClassDef(c) = stmt
            && c.name.as_str() == class
        {
            for s in &c.body {
                if let Stmt::FunctionDef(f) = s
                    && f.name.as_str() == "forward"
                {
                    let start = module.line_start(f.range.start().to_usize());
                    return module.text[start..f.range.end().to_usize()].to_string();
                }
            }
        }
    }
    panic!("{class}.forward not found")
}

fn diff(original: &str, emitted: &str, name: &str) -> String {
    let original = forward_rewrite::hash::dedent(original);
    similar::TextDiff::from_lines(original.as_str(), emitted)
        .unified_diff()
        .context_radius(2)
        .header(&format!("{name} (original)"), &format!("{name} (attnres)"))
        .to_string()
}

#[test]
fn attnres_diff_snapshots() {
    for (file, base, layer, layers) in [
        (
            "llama/modeling_llama.py",
            "LlamaModel",
            "LlamaDecoderLayer",
            "layers",
        ),
        (
            "gemma3/modeling_gemma3.py",
            "Gemma3TextModel",
            "Gemma3DecoderLayer",
            "layers",
        ),
        (
            "gpt_neox/modeling_gpt_neox.py",
            "GPTNeoXModel",
            "GPTNeoXLayer",
            "layers",
        ),
        (
            "cohere/modeling_cohere.py",
            "CohereModel",
            "CohereDecoderLayer",
            "layers",
        ),
        ("ctrl/modeling_ctrl.py", "CTRLModel", "EncoderLayer", "h"),
    ] {
        let text = std::fs::read_to_string(corpus().join("models").join(file)).unwrap();
        let module = ParsedSource::parse(text).unwrap();
        let model_src = forward_of(&module, base);
        let layer_src = forward_of(&module, layer);
        let emitted = attnres::emit(&model_src, &layer_src, layers)
            .unwrap_or_else(|e| panic!("{file}: {e:?}"));
        let text = format!(
            "{}\n{}\nslots: {}\n",
            diff(&model_src, &emitted.model_forward, base),
            diff(&layer_src, &emitted.layer_forward, layer),
            serde_json::to_string(&emitted.slots).unwrap()
        );
        settings().bind(|| insta::assert_snapshot!(format!("attnres_diff_5.23.0_{base}"), text));
    }
}

#[test]
fn recurrent_fragments_are_class_name_parts() {
    assert!(
        RECURRENT
            .iter()
            .all(|r| r.chars().next().is_some_and(char::is_uppercase))
    );
}
