//! forward-rewrite: a source-to-source rewriter for Hugging Face transformers model
//! forwards. See `ARCHITECTURE.md` for the contracts; [`analyze_class`] is the entry point
//! shared by the CLI and the Python installer.

pub mod analyze;
pub mod audit;
pub mod backends;
pub mod cache;
pub mod candidate;
pub mod chain;
pub mod hash;
pub mod index;
pub mod lint;
pub mod loss_mapping;
pub mod parse;
pub mod passes;
pub mod reason;
pub mod scan;
pub mod syncs;
pub mod syntax;
pub mod verify;

pub use analyze::{
    ClassSource, LossResolution, analyze_class, analyze_class_in_module_json, analyze_class_json,
    analyze_class_with, forward_source, is_candidate, module_classes, original_forward,
};
pub use audit::{ClassReport, Transform, TransformKind, Verdict};
pub use reason::Reason;

/// The version of this tool (the crate version), written into every audit and allowlist.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
