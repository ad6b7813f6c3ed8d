//! Rewriting passes. One pass per module; each has its tests beside it.
//!
//! The fused-loss pass is the base pass: its verdict is the class report's own (audit schema
//! 1). Every other pass is registered in [`PASSES`] with one interface: given the class chain,
//! the module that defines the class (parsed once) and the fused-loss report, it returns a
//! [`PassReport`] (a verdict in the pass's vocabulary, a stable reason code of its own, its
//! own fields), stored under `passes.<name>` of the class's audit entry. The CLI selects them
//! with `--pass`; adding a pass touches its folder and this registry.

pub mod attnres;
pub mod fused_loss;
pub mod fusion_common;
pub mod gated_mlp;
pub mod packing;
pub mod residual_norm;
pub mod rms_norm;
pub mod rotary;

use crate::analyze::ParsedClass;
use crate::audit::{ClassReport, PassReport};
use crate::parse::ParsedSource;

/// What a pass sees of one class.
pub struct PassInput<'a, 's> {
    /// The class and its bases in MRO order, each parsed on its own.
    pub(crate) chain: &'a [ParsedClass<'s>],
    /// The module that defines the most-derived class (its other classes: the base model,
    /// its layers, their attention), when the caller has it.
    pub module: Option<&'a ParsedSource>,
    /// The other modules of the program, when the caller has them (the scan does; the
    /// installer's binding gives only `module`): classes imported from another modeling
    /// module, a configuration's defaults, transformers' auto mappings.
    pub modules: Option<&'a dyn Modules>,
    /// The fused-loss pass's report of the class.
    pub fused: &'a ClassReport,
}

/// The modules of a program a pass may read besides the class's own, by dotted name. The
/// scan implements it over its tree (the modeling files it parsed, and the configuration
/// files next to them, parsed on first use); a pass never reads files itself.
pub trait Modules: Sync {
    /// A parsed module (`transformers.models.llama.modeling_llama`,
    /// `transformers.models.llava.configuration_llava`), when the caller has it.
    fn module(&self, name: &str) -> Option<&ParsedSource>;
    /// The modeling module that defines a top-level class of this name (the first in path
    /// order when several do).
    fn class_module(&self, class: &str) -> Option<&str>;
}

/// A registered pass beyond the fused loss.
pub struct Pass {
    /// The key under `passes` in the audit and the value of `--pass`.
    pub name: &'static str,
    /// One line on what the pass decides (`--help`, README).
    pub summary: &'static str,
    /// Every reason code the pass can give, with its meaning: the one documented place
    /// (the README's tables mirror it; a test checks).
    pub reasons: &'static [(&'static str, &'static str)],
    pub analyze: fn(&PassInput<'_, '_>) -> PassReport,
}

/// Every pass beyond the fused loss, in the order they run.
pub const PASSES: &[&Pass] = &[
    &rms_norm::PASS,
    &residual_norm::PASS,
    &rotary::PASS,
    &gated_mlp::PASS,
    &packing::PASS,
    &attnres::PASS,
];

/// The registered pass with this name.
pub fn find(name: &str) -> Option<&'static Pass> {
    PASSES.iter().copied().find(|p| p.name == name)
}

/// The names of the registered passes (for error messages and `--help`).
pub fn names() -> Vec<&'static str> {
    PASSES.iter().map(|p| p.name).collect()
}
