//! `scan --syncs` on the pinned transformers 5.23.0 (fetched by `corpus/fetch.sh`): the
//! sync report of representative classes as insta snapshots under `snapshots/`, and the
//! facts the packing work relies on (the flash path's per-layer metadata syncs, which the
//! declared patch moves to the forward). Skipped, with a message, when the corpus is absent.

mod common;

use std::path::PathBuf;

use forward_rewrite::audit::Verdict;
use forward_rewrite::backends::table;
use forward_rewrite::scan::{ScanOptions, scan};
use forward_rewrite::syncs::{ClassSyncs, analyze, render_class};

const CLASSES: [&str; 4] = [
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "MixtralForCausalLM",
];

fn corpus() -> Option<PathBuf> {
    let root = common::corpus_if_fetched("5.23.0");
    if root.is_none() {
        eprintln!("skipped: transformers 5.23.0 is not fetched; run corpus/fetch.sh");
    }
    root
}

fn per_layer(syncs: &ClassSyncs, backend: &str, patched: bool) -> Vec<String> {
    syncs
        .sites
        .iter()
        .filter(|r| {
            let reached = if patched { &r.patched } else { &r.stock };
            reached.per_layer.iter().any(|b| b == backend)
        })
        .map(|r| format!("{} {}", r.site.kind.name(), r.site.function))
        .collect()
}

fn per_forward(syncs: &ClassSyncs, backend: &str, patched: bool) -> Vec<String> {
    syncs
        .sites
        .iter()
        .filter(|r| {
            let reached = if patched { &r.patched } else { &r.stock };
            reached.per_forward.iter().any(|b| b == backend)
        })
        .map(|r| format!("{} {}", r.site.kind.name(), r.site.function))
        .collect()
}

#[test]
fn sync_reports_of_representative_classes() {
    let Some(root) = corpus() else { return };
    let paths = [root];
    let mut document = scan(&paths, &ScanOptions::default()).unwrap().document;
    document
        .classes
        .retain(|c| CLASSES.contains(&c.qualname.as_str()));
    assert_eq!(document.classes.len(), CLASSES.len());
    let reports = analyze(&paths, &document).unwrap();
    let settings = common::snapshot_settings();
    for class in &document.classes {
        assert_eq!(class.verdict, Verdict::Patched, "{}", class.qualname);
        let syncs = &reports[&(class.module.clone(), class.qualname.clone())];
        let header = format!("{}  {}:{}  patched", class.qualname, class.path, class.line);
        let text = render_class(&header, syncs, table());
        settings.bind(|| insta::assert_snapshot!(format!("syncs_5.23.0_{}", class.qualname), text));

        // Every class reaches its decoder layer and the shared flash path.
        assert_eq!(
            syncs.layers.len(),
            1,
            "{}: {:?}",
            class.qualname,
            syncs.layers
        );
        assert!(syncs.layers[0].ends_with("DecoderLayer"));
        assert_eq!(syncs.patches, ["packing-varlen-metadata"]);
        let stock = per_layer(syncs, "flash_attention_2", false);
        for site in [
            "condition _flash_attention_forward",
            "nonzero prepare_fa_kwargs_from_position_ids",
            "nonzero _get_unpad_data",
            "item _get_unpad_data",
        ] {
            assert!(
                stock.contains(&site.to_string()),
                "{}: {stock:?}",
                class.qualname
            );
        }
        // Patched: the packed-sequence check is gone and the metadata is computed once per
        // forward; the padded path (`_get_unpad_data`) stays per layer.
        let patched = per_layer(syncs, "flash_attention_2", true);
        assert!(!patched.contains(&"condition _flash_attention_forward".to_string()));
        assert!(!patched.contains(&"nonzero prepare_fa_kwargs_from_position_ids".to_string()));
        assert!(patched.contains(&"nonzero _get_unpad_data".to_string()));
        assert!(
            per_forward(syncs, "flash_attention_2", true)
                .contains(&"nonzero prepare_fa_kwargs_from_position_ids".to_string())
        );
        // sdpa does not take varlen kwargs: unchanged.
        assert_eq!(
            per_layer(syncs, "sdpa", true),
            per_layer(syncs, "sdpa", false)
        );
    }
}
