//! The packing pass over the pinned transformers trees (fetched by `corpus/fetch.sh`):
//! checked against the run-time sweep of 5.23.0 (`bench/packing_sweep.py` of the packing
//! run time: every patched class built tiny, packed input, eager and sdpa, `use_cache` at its
//! default; a copy in `fixtures/packing_sweep_5.23.0.json`), and snapshotted per version.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::corpus;
use forward_rewrite::audit::{AuditDocument, Verdict, render_pass_compact};
use forward_rewrite::passes::packing::PASS;
use forward_rewrite::scan::{ScanOptions, scan};

fn audit(version: &str) -> AuditDocument {
    let options = ScanOptions {
        passes: vec![&PASS],
        ..ScanOptions::default()
    };
    scan(&[corpus(version)], &options).unwrap().document
}

/// The sweep's statuses per class (`isolated`, `LEAK`, `refused (mask-not-built)`,
/// `skipped`), over its backends.
fn sweep() -> BTreeMap<String, BTreeSet<String>> {
    let text = include_str!("fixtures/packing_sweep_5.23.0.json");
    let rows: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in rows {
        let status = row["status"].as_str().unwrap();
        let status = match status {
            "refused" => format!("refused ({})", row["reason"].as_str().unwrap()),
            other => other.to_string(),
        };
        out.entry(row["class"].as_str().unwrap().to_string())
            .or_default()
            .insert(status);
    }
    out
}

/// The classes the sweep found isolated (on every backend that ran) that the pass refuses,
/// with the reason: false refusals, which cost speed only. Each group is explained in the
/// README ("Packing verdicts").
const ISOLATED_BUT_REFUSED: [(&str, &str); 10] = [
    // 3D positions (mRoPE): the sweep packs 2D position_ids, training packs 3D ones, which
    // the run time does not detect.
    (
        "Cosmos3OmniForConditionalGeneration",
        "packing-mask-without-position-ids",
    ),
    (
        "Qwen3OmniMoeThinkerForConditionalGeneration",
        "packing-mask-without-position-ids",
    ),
    (
        "Qwen3VLForConditionalGeneration",
        "packing-mask-without-position-ids",
    ),
    (
        "Qwen3VLMoeForConditionalGeneration",
        "packing-mask-without-position-ids",
    ),
    // Cross-attention reachable from the layers (unused by the sweep's text-only input).
    ("MllamaForCausalLM", "packing-cross-attention"),
    ("MllamaForConditionalGeneration", "packing-cross-attention"),
    // A block overlay from token_type_ids (the sweep passes none).
    ("HrmTextForCausalLM", "packing-mask-modified"),
    // Short convolutions by layer type (the tiny config of the sweep keeps attention layers
    // only); their mask comes from create_recurrent_attention_mask.
    ("Lfm2ForCausalLM", "packing-mask-not-from-masking-utils"),
    (
        "Lfm2VlForConditionalGeneration",
        "packing-mask-not-from-masking-utils",
    ),
    // A mask function of the module's own (create_reference_sliding_window_causal_mask).
    (
        "UnlimitedOcrForConditionalGeneration",
        "packing-mask-not-from-masking-utils",
    ),
];

#[test]
fn packing_verdicts_agree_with_the_run_time_sweep_of_5_23_0() {
    let doc = audit("5.23.0");
    let sweep = sweep();
    let mut leaks = 0;
    let mut isolated = 0;
    let mut refused_isolated: Vec<(String, String)> = Vec::new();
    for (name, statuses) in &sweep {
        let class = doc
            .classes
            .iter()
            .find(|c| &c.qualname == name)
            .unwrap_or_else(|| panic!("{name} of the sweep is not in the audit"));
        assert_eq!(class.verdict, Verdict::Patched, "{name} is not patched");
        let packing = &class.passes["packing"];
        let bad = statuses
            .iter()
            .any(|s| s == "LEAK" || s.starts_with("refused"));
        if bad {
            // A class that leaked or that the run time caught must be refused statically:
            // never `guaranteed`, nor `dynamic` (the installer would wrap it).
            leaks += 1;
            assert_eq!(
                packing.verdict, "refused",
                "{name} ({statuses:?}) is {} ({:?}): {}",
                packing.verdict, packing.reason, packing.detail
            );
        } else if statuses.contains("isolated") {
            isolated += 1;
            if packing.verdict == "refused" {
                refused_isolated.push((name.clone(), packing.reason.clone().unwrap()));
            }
        }
    }
    assert_eq!((leaks, isolated), (36, 134));
    let expected: Vec<(String, String)> = ISOLATED_BUT_REFUSED
        .iter()
        .map(|(c, r)| (c.to_string(), r.to_string()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(refused_isolated, expected);
}

#[test]
fn packing_snapshots() {
    for version in ["5.23.0", "4.57.6"] {
        let doc = audit(version);
        let mut text = render_pass_compact(&doc.classes, PASS.name);
        let summary = &doc.summary.passes[PASS.name];
        text.push('\n');
        for (verdict, count) in &summary.verdicts {
            text.push_str(&format!("{verdict}: {count}\n"));
        }
        for (reason, count) in &summary.reasons {
            text.push_str(&format!("  {reason}: {count}\n"));
        }
        let settings = common::snapshot_settings();
        settings.bind(|| insta::assert_snapshot!(format!("audit_packing_{version}"), text));
    }
}
