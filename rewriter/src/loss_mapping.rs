//! `LOSS_MAPPING` and the class → loss resolution, exactly as transformers computes it in
//! `PreTrainedModel.__init__` and the `loss_function` property:
//!
//! 1. the class name itself if it is a key;
//! 2. else `re.findall("(" + "|".join(LOSS_MAPPING) + ")", name)[0]`: the leftmost match,
//!    and at that position the first key in dict order;
//! 3. else None, which `loss_function` turns into `"ForCausalLM"`.
//!
//! The mapping is read from the scanned tree's `loss/loss_utils.py`; when the scanned paths
//! hold none (single files), a built-in copy of transformers 5.23.0's mapping is used and
//! the audit says so (`loss_mapping: "builtin"`). A `self.loss_type = "..."` in an
//! `__init__` of the chain overrides this (see the fused-loss pass).

use ruff_python_ast::{Expr, Stmt};

use crate::analyze::LossResolution;
use crate::parse::ParsedSource;

/// The loss function transformers' causal LM loss is called.
const CAUSAL_LOSS: &str = "ForCausalLMLoss";

/// `LOSS_MAPPING`: keys in dict order, each with the name of the function it maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossMapping {
    pub entries: Vec<(String, String)>,
    /// `tree` or `builtin`.
    pub origin: &'static str,
}

/// transformers 5.23.0's `LOSS_MAPPING` (keys in order, function names).
const BUILTIN_5_23: &[(&str, &str)] = &[
    ("ForSemanticSegmentation", "ForSemanticSegmentationLoss"),
    ("ForCausalLM", "ForCausalLMLoss"),
    ("ForMaskedLM", "ForMaskedLMLoss"),
    ("ForQuestionAnswering", "ForQuestionAnsweringLoss"),
    ("ForSequenceClassification", "ForSequenceClassificationLoss"),
    ("ForImageClassification", "ForSequenceClassificationLoss"),
    ("ForVideoClassification", "ForSequenceClassificationLoss"),
    ("ForAudioClassification", "ForSequenceClassificationLoss"),
    ("ForTokenClassification", "ForTokenClassification"),
    ("ForSegmentation", "ForSegmentationLoss"),
    ("ForObjectDetection", "ForObjectDetectionLoss"),
    ("ForCTC", "ForCTCLoss"),
    ("ForConditionalGeneration", "ForCausalLMLoss"),
    (
        "DeformableDetrForObjectDetection",
        "DeformableDetrForObjectDetectionLoss",
    ),
    (
        "ConditionalDetrForObjectDetection",
        "DeformableDetrForObjectDetectionLoss",
    ),
    (
        "DabDetrForObjectDetection",
        "DeformableDetrForObjectDetectionLoss",
    ),
    (
        "GroundingDinoForObjectDetection",
        "GroundingDinoForObjectDetectionLoss",
    ),
    (
        "MMGroundingDinoForObjectDetection",
        "GroundingDinoForObjectDetectionLoss",
    ),
    (
        "ConditionalDetrForSegmentation",
        "DeformableDetrForSegmentationLoss",
    ),
    ("RTDetrForObjectDetection", "RTDetrForObjectDetectionLoss"),
    ("RTDetrV2ForObjectDetection", "RTDetrForObjectDetectionLoss"),
    ("DFineForObjectDetection", "DFineForObjectDetectionLoss"),
    ("Deimv2ForObjectDetection", "Deimv2ForObjectDetectionLoss"),
    ("CsmForConditionalGeneration", "ForCausalLMLoss"),
    ("LwDetrForObjectDetection", "LwDetrForObjectDetectionLoss"),
    (
        "PocketTTSForConditionalGeneration",
        "PocketTTSForConditionalGenerationLoss",
    ),
    (
        "GradiumPhononTTSForConditionalGeneration",
        "PocketTTSForConditionalGenerationLoss",
    ),
    ("ParakeetForRNNT", "ParakeetForRNNTLoss"),
    ("ParakeetForTDT", "ParakeetForTDTLoss"),
    ("RfDetrForObjectDetection", "LwDetrForObjectDetectionLoss"),
    ("RfDetrForInstanceSegmentation", "RfDetrForSegmentationLoss"),
];

impl LossMapping {
    pub fn builtin() -> LossMapping {
        LossMapping {
            entries: BUILTIN_5_23
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            origin: "builtin",
        }
    }

    /// Read the top-level `LOSS_MAPPING = {...}` of a `loss_utils.py`.
    pub fn from_source(source: &ParsedSource) -> Option<LossMapping> {
        for stmt in source.suite() {
            let Stmt::Assign(assign) = stmt else { continue };
            let is_mapping = assign
                .targets
                .iter()
                .any(|t| matches!(t, Expr::Name(n) if n.id.as_str() == "LOSS_MAPPING"));
            let Expr::Dict(dict) = &*assign.value else {
                continue;
            };
            if !is_mapping {
                continue;
            }
            let mut entries = Vec::new();
            for item in &dict.items {
                let (Some(Expr::StringLiteral(key)), value) = (&item.key, &item.value) else {
                    return None;
                };
                let value = crate::syntax::dotted_name(value)
                    .unwrap_or_else(|| source.slice(value).to_string());
                entries.push((key.value.to_str().to_string(), value));
            }
            return Some(LossMapping {
                entries,
                origin: "tree",
            });
        }
        None
    }

    /// The `loss_type` transformers computes for a class name (None when nothing matches).
    pub fn loss_type(&self, class_name: &str) -> Option<&str> {
        if let Some((key, _)) = self.entries.iter().find(|(k, _)| k == class_name) {
            return Some(key);
        }
        // re.findall of the alternation: the leftmost position where some key matches, and
        // there the first key in dict order (keys are identifiers: no regex metacharacters).
        for (position, _) in class_name.char_indices() {
            let rest = &class_name[position..];
            if let Some((key, _)) = self
                .entries
                .iter()
                .find(|(k, _)| !k.is_empty() && rest.starts_with(k.as_str()))
            {
                return Some(key);
            }
        }
        None
    }

    /// What `self.loss_function` of an instance of `class_name` is.
    pub fn resolve(&self, class_name: &str) -> LossResolution {
        let key = self.loss_type(class_name).unwrap_or("ForCausalLM");
        match self.entries.iter().find(|(k, _)| k == key) {
            Some((_, function)) if function == CAUSAL_LOSS => LossResolution::Causal,
            Some((key, _)) => LossResolution::Other(key.clone()),
            None => LossResolution::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_transformers() {
        let m = LossMapping::builtin();
        assert_eq!(m.resolve("LlamaForCausalLM"), LossResolution::Causal);
        assert_eq!(
            m.resolve("LlavaForConditionalGeneration"),
            LossResolution::Causal
        );
        assert_eq!(
            m.resolve("CsmForConditionalGeneration"),
            LossResolution::Causal
        );
        assert_eq!(
            m.resolve("PocketTTSForConditionalGeneration"),
            LossResolution::Other("PocketTTSForConditionalGeneration".into())
        );
        assert_eq!(
            m.resolve("BertForMaskedLM"),
            LossResolution::Other("ForMaskedLM".into())
        );
        // No key matches: loss_type None, and loss_function falls back to ForCausalLM.
        assert_eq!(m.loss_type("SomethingElse"), None);
        assert_eq!(m.resolve("SomethingElse"), LossResolution::Causal);
        // Leftmost match wins over dict order.
        assert_eq!(m.loss_type("FooForCTCForCausalLM"), Some("ForCTC"));
    }

    #[test]
    fn reads_the_mapping_from_source() {
        let src = ParsedSource::parse(
            "LOSS_MAPPING = {\n    \"ForMaskedLM\": ForMaskedLMLoss,\n    \"ForCausalLM\": ForCausalLMLoss,\n}\n",
        )
        .unwrap();
        let m = LossMapping::from_source(&src).unwrap();
        assert_eq!(m.origin, "tree");
        assert_eq!(m.entries.len(), 2);
        assert_eq!(m.resolve("XForCausalLM"), LossResolution::Causal);
        // Leftmost position first: "ForMaskedLM" at 1 beats "ForCausalLM" at 12.
        assert_eq!(
            m.resolve("XForMaskedLMForCausalLM"),
            LossResolution::Other("ForMaskedLM".into())
        );
    }
}
