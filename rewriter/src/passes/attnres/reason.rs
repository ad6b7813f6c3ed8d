//! The attnres pass's reason codes: the one documented place (the README table mirrors it,
//! a test checks; the runtime reads them through `_native`).

/// Why the pass refuses a class: a stable kebab-case code and what the pass saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub detail: String,
}

impl Refusal {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Refusal {
        debug_assert!(
            REASONS.iter().any(|(c, _)| *c == code),
            "undocumented code {code}"
        );
        Refusal {
            code,
            detail: detail.into(),
        }
    }
}

/// Every reason code of the pass, with its meaning.
pub const REASONS: &[(&str, &str)] = &[
    (
        "encoder-decoder",
        "the model is an encoder-decoder (its decoder reads an encoder through cross-attention)",
    ),
    (
        "no-base-model",
        "the class builds no model class of its module that holds a layer list: `self.layers`, or the one ModuleList its forward loops over (`self.h`, ...); a decoder built by `AutoModel`, or none",
    ),
    (
        "no-layer-loop",
        "no single `for` loop over the layer list (`self.layers`, `self.h`, ...) calling each layer as `H = layer(H, kw=...)` in the base model's forward",
    ),
    (
        "hybrid-layers",
        "the decoder stacks layers of more than one class, or picks them from a table (hybrid attention / recurrent stacks)",
    ),
    (
        "recurrent-layer",
        "a layer holds a recurrent or state-space mixer (Mamba, RWKV, linear attention): its state is not a residual sum",
    ),
    (
        "cross-attention",
        "the layer takes encoder states (cross-attention)",
    ),
    (
        "layer-signature",
        "the layer forward takes `*args`, keyword-only or positional-only parameters, so the state cannot be passed positionally",
    ),
    (
        "no-residual",
        "no residual add `T = stream + branch` was found in the layer forward",
    ),
    (
        "residual-not-seen",
        "the stream is used in a way the pass does not follow (in-place add, add inside a loop, `with` or `try`, a name read that holds the stream on some branches of an `if` only)",
    ),
    (
        "stale-residual",
        "a stream value is read after a residual add replaced it",
    ),
    (
        "dynamic-sublayers",
        "the branches of an `if` run different numbers of residual adds and the test is not a static `self.` attribute",
    ),
    (
        "layer-return",
        "the layer does not return the stream as a single name",
    ),
    (
        "uses-super",
        "the forward calls `super()`, which an emitted forward cannot",
    ),
    (
        "name-conflict",
        "(run time) a layer or the base model already has an attribute named `attnres`",
    ),
];
