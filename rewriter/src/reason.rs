//! The reason codes: the single documented place.
//!
//! Every refusal (and every `failed` verdict) carries exactly one of these codes. They are
//! stable: serialised in kebab-case into the audit document, the allowlist and the Python
//! `audit()`; the README's reason-code table lists every one of them (a test checks it).

use serde::{Deserialize, Serialize};

/// Why a class was not patched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The forward already calls `forward_rewrite` (the output of this tool, or a hand-written fused forward).
    AlreadyPatched,
    /// No class of the chain defines `forward` (it is inherited from transformers' base classes or unknown source).
    NoForward,
    /// The chain defines or assigns `loss_function` / `_loss_function`: the loss is not transformers' own.
    LossFunctionOverridden,
    /// The class's `loss_type` resolves (LOSS_MAPPING or a `self.loss_type = ...` in `__init__`) to a non-causal loss.
    LossNotCausal,
    /// The class's `loss_type` cannot be resolved statically (e.g. `self.loss_type` set to a computed value).
    LossUnresolved,
    /// The labels branch computes `CrossEntropyLoss` on aligned (unshifted) labels: a seq2seq / token-aligned loss.
    Seq2seqLoss,
    /// The loss is computed in a form neither matched shape knows (another loss function, several loss calls, a loss call inside an expression, a shift of the logits without the matching shift of the labels).
    CustomLoss,
    /// The forward computes no loss: no `self.loss_function(...)` and no cross-entropy under `if labels is not None:`.
    NoLossCall,
    /// The logits passed to the loss do not come from a `self.<head>(...)` call in the same block (e.g. `outputs[0]`).
    NoHeadCall,
    /// The head call has another shape: several or keyword arguments, an indexed head, a module applied to its output.
    HeadCallUnsupported,
    /// The head is not a plain `nn.Linear` assigned in an `__init__` of the chain (`self.cls`, `nn.Sequential`, custom or conditional modules).
    NonLinearHead,
    /// A statement between the head call and the loss rebinds the logits to something that is not a lowered transform.
    LogitsRebound,
    /// The logits are mutated in place (in-place method, item assignment, augmented assignment other than `*=`/`/=` by a scale).
    LogitsMutated,
    /// The logits are bound to a second name (an alias) before the loss.
    LogitsAliased,
    /// The logits are read (passed to a call, inspected in a condition, ...) between the head call and the loss.
    LogitsReadBeforeLoss,
    /// The logits are read after the loss other than to be returned.
    LogitsReadAfterLoss,
    /// A mask is applied to the logits before the loss (`logits[mask]`, `masked_fill`): tokens are dropped or changed in a way the fused op does not express.
    LogitsMasked,
    /// A chain of multiply / divide / tanh on the logits that is not one of the lowered transform forms.
    TransformUnsupported,
    /// Lowered transforms appear in an order the fused op cannot express (it applies multiply, divide, soft-cap, each at most once).
    TransformOrder,
    /// The `labels` given to the loss are not the forward's plain `labels` parameter (None, another tensor, or rebound before the loss).
    LabelsNotPlain,
    /// The `if labels is not None:` statement has an `else` / `elif` branch.
    ElseBranch,
    /// The labels branch holds statements besides the single loss assignment (CSM's second loss, z-loss terms, ...).
    LabelsBranchExtra,
    /// The loss call passes a keyword that `ForCausalLMLoss` does not read, or a cross-entropy argument the fused op does not lower (`weight`, `size_average`, positional arguments).
    LossKwargUnsupported,
    /// The cross-entropy reduces otherwise than by the mean over non-ignored tokens (`reduction="sum"` / `"none"`, per-sample losses).
    LossReductionUnsupported,
    /// The loss call has another shape (missing logits / labels / vocab_size, `*args`, arguments that read the logits).
    LossCallUnsupported,
    /// A statement between the head call and the loss that the fused branch would skip is not a plain, side-effect-free binding, or a name it binds is used later.
    RegionStatementUnsupported,
    /// The region to rewrite cannot be re-indented safely (shares a line with other code, mixed tabs and spaces).
    ReindentUnsafe,
    /// The class, the forward or a module-level name already binds `forward_rewrite` in another meaning.
    NameConflict,
    /// A class source of the chain does not parse (verdict `failed`).
    ParseError,
    /// The emitted forward does not re-parse or does not re-analyse as `already-patched` (verdict `failed`; a bug in this tool).
    EmitInvalid,
}

impl Reason {
    /// Every code, in declaration order (the README table and the tests iterate this).
    pub const ALL: [Reason; 30] = [
        Reason::AlreadyPatched,
        Reason::NoForward,
        Reason::LossFunctionOverridden,
        Reason::LossNotCausal,
        Reason::LossUnresolved,
        Reason::Seq2seqLoss,
        Reason::CustomLoss,
        Reason::NoLossCall,
        Reason::NoHeadCall,
        Reason::HeadCallUnsupported,
        Reason::NonLinearHead,
        Reason::LogitsRebound,
        Reason::LogitsMutated,
        Reason::LogitsAliased,
        Reason::LogitsReadBeforeLoss,
        Reason::LogitsReadAfterLoss,
        Reason::LogitsMasked,
        Reason::TransformUnsupported,
        Reason::TransformOrder,
        Reason::LabelsNotPlain,
        Reason::ElseBranch,
        Reason::LabelsBranchExtra,
        Reason::LossKwargUnsupported,
        Reason::LossReductionUnsupported,
        Reason::LossCallUnsupported,
        Reason::RegionStatementUnsupported,
        Reason::ReindentUnsafe,
        Reason::NameConflict,
        Reason::ParseError,
        Reason::EmitInvalid,
    ];

    /// The stable kebab-case code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::AlreadyPatched => "already-patched",
            Reason::NoForward => "no-forward",
            Reason::LossFunctionOverridden => "loss-function-overridden",
            Reason::LossNotCausal => "loss-not-causal",
            Reason::LossUnresolved => "loss-unresolved",
            Reason::Seq2seqLoss => "seq2seq-loss",
            Reason::CustomLoss => "custom-loss",
            Reason::NoLossCall => "no-loss-call",
            Reason::NoHeadCall => "no-head-call",
            Reason::HeadCallUnsupported => "head-call-unsupported",
            Reason::NonLinearHead => "non-linear-head",
            Reason::LogitsRebound => "logits-rebound",
            Reason::LogitsMutated => "logits-mutated",
            Reason::LogitsAliased => "logits-aliased",
            Reason::LogitsReadBeforeLoss => "logits-read-before-loss",
            Reason::LogitsReadAfterLoss => "logits-read-after-loss",
            Reason::LogitsMasked => "logits-masked",
            Reason::TransformUnsupported => "transform-unsupported",
            Reason::TransformOrder => "transform-order",
            Reason::LabelsNotPlain => "labels-not-plain",
            Reason::ElseBranch => "else-branch",
            Reason::LabelsBranchExtra => "labels-branch-extra",
            Reason::LossKwargUnsupported => "loss-kwarg-unsupported",
            Reason::LossReductionUnsupported => "loss-reduction-unsupported",
            Reason::LossCallUnsupported => "loss-call-unsupported",
            Reason::RegionStatementUnsupported => "region-statement-unsupported",
            Reason::ReindentUnsafe => "reindent-unsafe",
            Reason::NameConflict => "name-conflict",
            Reason::ParseError => "parse-error",
            Reason::EmitInvalid => "emit-invalid",
        }
    }

    /// Whether the code goes with the `failed` verdict (a problem of the input or of this tool)
    /// rather than with `refused` (a decision).
    pub fn is_failure(self) -> bool {
        matches!(self, Reason::ParseError | Reason::EmitInvalid)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_name_is_the_code() {
        for reason in Reason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.code()));
            let back: Reason = serde_json::from_str(&json).unwrap();
            assert_eq!(back, reason);
        }
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
    }
}
