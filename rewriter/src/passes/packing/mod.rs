//! The packing pass (issue 9): for each class the fused-loss pass patched, whether packed
//! sequences (one row holding several sequences, `position_ids` restarting at 0, no
//! attention mask) are guaranteed to stay apart in every layer under forward-rewrite's run
//! time (`runtime/python/forward_rewrite/packing.py`), or why not. The run time builds
//! block-causal masks through transformers' masking utilities and passes varlen metadata in
//! `**kwargs`; it works only when the model's source has the shapes checked here.
//!
//! Verdicts: `guaranteed` (every fact holds; `paths` says which run-time paths: `mask` for
//! eager / sdpa / flex, `varlen` for flash-style backends; `["mask"]` with a reason when only
//! the varlen facts fail), `dynamic` (the base model's class is decided by the configuration
//! at run time, and nothing seen statically refuses: the run-time `mask-not-built` check
//! stands guard), `refused` (a fact fails: the first failing code in the order of
//! [`REASONS`], the others named in the detail), `not-applicable` (the fused-loss pass did not
//! patch the class: the run time wraps only patched classes).
//!
//! The roles (`roles.rs`): `C` the class, `B` the base model whose call feeds the head call
//! (through wrappers: a base model without a layer loop that calls an inner model), its
//! decoder layers `D` (the calls in the layer loop) and their attention modules `A`, found
//! through `__init__` assignments; an `AutoModel.from_config(config.<sub>)` is followed to the
//! model class of the sub-configuration's default model type when the caller has the other
//! modules (`program.rs`): a refusal there refuses, otherwise the verdict is `dynamic`. The
//! checks: `forward.rs` (what `C` and each wrapper pass down), `mask.rs` (where the masks
//! the layers see come from), `layers.rs` (what the layers and their attention do).

mod flow;
mod forward;
mod layers;
mod mask;
mod program;
mod roles;
#[cfg(test)]
mod tests;

use serde_json::Value;

use crate::audit::{PassReport, Verdict};

use super::{Pass, PassInput};
use flow::Function;
use program::{Class, Program};
use roles::Built;

/// The registered pass.
pub const PASS: Pass = Pass {
    name: "packing",
    summary: "whether packed sequences (position_ids restarting at 0, no mask) stay apart in \
              every layer under the run time's packing guarantee",
    reasons: REASONS,
    analyze,
};

/// Every reason code, in the order the checks rank them (the first failing one is the
/// reason), with the fact that must hold. The README's "Packing verdicts" table mirrors it.
pub const REASONS: &[(&str, &str)] = &[
    (
        "packing-no-position-ids",
        "the class's forward takes `position_ids` and passes it unchanged to the base model \
         (and each wrapper to its inner model)",
    ),
    (
        "packing-kwargs-not-forwarded",
        "the class's forward takes `**kwargs` and passes them to the base-model call (varlen \
         path only)",
    ),
    (
        "packing-base-model-dynamic",
        "the base model's class is known statically (`AutoModel.from_config(...)` is decided \
         by the configuration at run time: `dynamic`)",
    ),
    (
        "packing-mask-not-from-masking-utils",
        "every mask the decoder layers receive is built by `create_causal_mask`, \
         `create_sliding_window_causal_mask`, `create_chunked_causal_mask` or \
         `create_masks_for_generate` (or a dict of them, or the forward's own dict of masks)",
    ),
    (
        "packing-mask-without-position-ids",
        "every such mask call passes the forward's `position_ids`",
    ),
    (
        "packing-default-mask",
        "no forward on the way replaces a missing `attention_mask` by a tensor",
    ),
    (
        "packing-mask-modified",
        "the built masks reach the layers unchanged, and no `block_sequence_ids` overlay \
         (applied after the packing restriction) is passed to a mask call",
    ),
    (
        "packing-kwargs-not-to-attention",
        "`**kwargs` reach every decoder-layer call, its attention call and the attention \
         function (varlen path only)",
    ),
    (
        "packing-attention-not-dispatched",
        "the attention takes its function from `ALL_ATTENTION_FUNCTIONS` by \
         `config._attn_implementation` (varlen path only)",
    ),
    (
        "packing-recurrent-layers",
        "no decoder layer mixes tokens outside attention (Mamba / SSM / linear attention / \
         gated delta net / short convolution / RWKV / compressor mixers, recurrent layer types, \
         their kernels in the module)",
    ),
    (
        "packing-positions-not-from-position-ids",
        "the base model's positions come from `position_ids` (rotary or learned position \
         embeddings), not from `cache_position`, an `arange` or the mask (ALiBi)",
    ),
    (
        "packing-multimodal-positions",
        "no 3D / multimodal RoPE (`get_rope_index`, `rope_deltas`, mRoPE sections): the run \
         time detects packing on 2D `position_ids` only",
    ),
    (
        "packing-cross-attention",
        "no encoder states reach the decoder layers other than the forward's own \
         `encoder_hidden_states` / `cross_attention_states` parameter, passed down as given \
         (None in a decoder-only call; the run time refuses a packed call that passes \
         them), and no layer class is a cross-attention layer: the packed mask is for \
         self-attention",
    ),
];

/// The codes, in the order of [`REASONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Code {
    NoPositionIds,
    KwargsNotForwarded,
    BaseModelDynamic,
    MaskNotFromMaskingUtils,
    MaskWithoutPositionIds,
    DefaultMask,
    MaskModified,
    KwargsNotToAttention,
    AttentionNotDispatched,
    RecurrentLayers,
    PositionsNotFromPositionIds,
    MultimodalPositions,
    CrossAttention,
}

impl Code {
    #[cfg(test)]
    pub const ALL: [Code; 13] = [
        Code::NoPositionIds,
        Code::KwargsNotForwarded,
        Code::BaseModelDynamic,
        Code::MaskNotFromMaskingUtils,
        Code::MaskWithoutPositionIds,
        Code::DefaultMask,
        Code::MaskModified,
        Code::KwargsNotToAttention,
        Code::AttentionNotDispatched,
        Code::RecurrentLayers,
        Code::PositionsNotFromPositionIds,
        Code::MultimodalPositions,
        Code::CrossAttention,
    ];

    pub fn code(self) -> &'static str {
        REASONS[self as usize].0
    }

    /// Facts only the varlen path needs: failing them leaves `paths: ["mask"]`. The spec
    /// marks the last two; `**kwargs` not reaching the base model is the same fact one call
    /// higher (what travels there is the varlen metadata: the mask path adds nothing to
    /// `**kwargs`), so it is varlen-only too.
    fn varlen_only(self) -> bool {
        matches!(
            self,
            Code::KwargsNotForwarded | Code::KwargsNotToAttention | Code::AttentionNotDispatched
        )
    }
}

/// One failing fact.
#[derive(Clone, Debug)]
struct Finding {
    code: Code,
    detail: String,
    /// Decided by the configuration at run time (`dynamic`), not a refusal.
    dynamic: bool,
}

/// The state of one class's analysis: what was found, and where the checks stand.
struct Analysis<'a> {
    program: Program<'a>,
    findings: Vec<Finding>,
    /// Prefixed to findings while the checks read a configuration's default model
    /// (`the default text_config model Lfm3Model (lfm3): `).
    context: String,
    /// What was analysed, for the detail of a `guaranteed` verdict.
    seen: Vec<String>,
}

impl<'a> Analysis<'a> {
    fn refuse(&mut self, code: Code, detail: impl Into<String>) {
        let detail = format!("{}{}", self.context, detail.into());
        if !self
            .findings
            .iter()
            .any(|f| f.code == code && f.detail == detail)
        {
            self.findings.push(Finding {
                code,
                detail,
                dynamic: false,
            });
        }
    }

    fn dynamic(&mut self, detail: impl Into<String>) {
        let detail = format!("{}{}", self.context, detail.into());
        self.findings.push(Finding {
            code: Code::BaseModelDynamic,
            detail,
            dynamic: true,
        });
    }

    /// `C` and everything below it.
    fn run(&mut self, input: &PassInput<'a, '_>) {
        let fused = input.fused;
        let Some(owner) = input
            .chain
            .iter()
            .find(|c| Some(&c.source.qualname) == fused.forward_owner.as_ref())
        else {
            self.refuse(
                Code::BaseModelDynamic,
                "the patched forward's class is not in the chain",
            );
            return;
        };
        let Some(def) = crate::syntax::method(&owner.class_def().body, "forward") else {
            self.refuse(
                Code::BaseModelDynamic,
                "the patched forward is not a method",
            );
            return;
        };
        let c_forward = Function {
            def,
            source: &owner.parsed,
            owner: owner.source.qualname.as_str(),
        };
        let head = fused.head.as_deref().unwrap_or("lm_head");
        let is_submodule =
            |attr: &str| roles::chain_value(input.chain, attr).is_some() && attr != "loss_function";
        let Some((call, path)) = roles::base_call(&c_forward, head, &is_submodule) else {
            self.refuse(
                Code::BaseModelDynamic,
                format!(
                    "no submodule call in {} feeds self.{head}: the base model is not known",
                    c_forward.name()
                ),
            );
            return;
        };
        let attr = path.join(".");
        forward::check_class_forward(self, &c_forward, call, &attr);
        let Some((holder, init, value)) = roles::chain_value(input.chain, &path[0]) else {
            self.dynamic(format!(
                "self.{} is not assigned in an __init__ of the class chain",
                path[0]
            ));
            return;
        };
        let module = self.program.module(&holder.source.module);
        let mut built = roles::built(
            &self.program,
            module.as_ref(),
            Some(init),
            &path[0],
            value,
            &|e| short(holder.parsed.slice(e)),
        );
        // `self.model.decoder(...)`: the submodule of a submodule.
        for (i, part) in path.iter().enumerate().skip(1) {
            let Built::Class(class) = &built else { break };
            let values = class.init_values(&self.program, part);
            let Some((holder, init, value)) = values.into_iter().next() else {
                built = Built::Dynamic(format!(
                    "self.{} is not assigned in a readable __init__",
                    path[..=i].join(".")
                ));
                break;
            };
            let source = holder.module.source;
            built = roles::built(
                &self.program,
                Some(&holder.module),
                Some(init),
                part,
                value,
                &|e| short(source.slice(e)),
            );
        }
        self.levels(built, c_forward, call, &attr);
    }

    /// The base model and the wrappers down to the loop level.
    fn levels(
        &mut self,
        mut built: Built<'a>,
        c_forward: Function<'a>,
        call: &'a ruff_python_ast::ExprCall,
        attr: &str,
    ) {
        let mut levels: Vec<Level<'a>> = Vec::new();
        let mut entry = (c_forward, call);
        let mut attr = attr.to_string();
        for _ in 0..6 {
            let class = match built {
                Built::Class(class) => class,
                Built::Default {
                    class,
                    call,
                    sub,
                    model_type,
                } => {
                    self.dynamic(format!(
                        "self.{attr} = {call}: the class is decided by the configuration at \
                         run time (by default {model_type}: {}, whose facts were checked)",
                        class.name()
                    ));
                    self.context = format!(
                        "{}the default {sub} model {} ({model_type}): ",
                        self.context,
                        class.name()
                    );
                    class
                }
                Built::Dynamic(why) => {
                    self.dynamic(why);
                    return;
                }
            };
            let Some(forward) = class.method(&self.program, "forward") else {
                self.refuse(
                    Code::MaskNotFromMaskingUtils,
                    format!("{} has no forward the pass can read", class.name()),
                );
                return;
            };
            self.seen.push(class.name().to_string());
            let level = Level {
                class: class.clone(),
                forward,
                outer: entry.0,
                entry: entry.1,
            };
            levels.push(level);
            let level = levels.last().expect("pushed");
            mask::check_level(self, level);
            forward::check_level(self, level);
            let builds = roles::builds_of(&self.program, &class);
            let layer_calls = roles::layer_calls(&level.forward, &builds);
            if !layer_calls.is_empty() {
                layers::check(self, &levels, &builds, &layer_calls);
                return;
            }
            let program = self.program;
            let is_submodule = |attr: &str| !class.init_values(&program, attr).is_empty();
            let Some((inner, inner_attr)) = roles::inner_call(&level.forward, &is_submodule) else {
                self.refuse(
                    Code::MaskNotFromMaskingUtils,
                    format!(
                        "{} neither loops over decoder layers nor calls an inner model",
                        level.forward.name()
                    ),
                );
                return;
            };
            forward::check_pass_down(self, &level.forward, inner, &inner_attr);
            let values = class.init_values(&self.program, &inner_attr);
            let Some((holder, init, value)) = values.into_iter().next() else {
                self.dynamic(format!(
                    "self.{inner_attr} of {} is not assigned in a readable __init__",
                    class.name()
                ));
                return;
            };
            let source = holder.module.source;
            built = roles::built(
                &self.program,
                Some(&holder.module),
                Some(init),
                &inner_attr,
                value,
                &|e| short(source.slice(e)),
            );
            entry = (level.forward, inner);
            attr = inner_attr;
        }
        self.refuse(
            Code::MaskNotFromMaskingUtils,
            "no decoder-layer loop within six nested models",
        );
    }

    fn report(self) -> PassReport {
        let mut findings = self.findings;
        findings.sort_by_key(|f| f.code);
        let refusals: Vec<&Finding> = findings
            .iter()
            .filter(|f| !f.dynamic && !f.code.varlen_only())
            .collect();
        let varlen: Vec<&Finding> = findings.iter().filter(|f| f.code.varlen_only()).collect();
        let dynamic = findings.iter().find(|f| f.dynamic);
        let (verdict, reason, detail, paths): (&str, Option<Code>, String, &[&str]) =
            if let Some(first) = refusals.first() {
                (
                    "refused",
                    Some(first.code),
                    with_others(first, &findings),
                    &[],
                )
            } else {
                let paths: &[&str] = if varlen.is_empty() {
                    &["mask", "varlen"]
                } else {
                    &["mask"]
                };
                match (dynamic, varlen.first()) {
                    (Some(d), _) => ("dynamic", Some(d.code), with_others(d, &findings), paths),
                    (None, Some(v)) => {
                        ("guaranteed", Some(v.code), with_others(v, &findings), paths)
                    }
                    (None, None) => ("guaranteed", None, self.seen.join(" > "), paths),
                }
            };
        let mut report = PassReport::new(verdict, reason.map(Code::code), detail);
        report.extra.insert(
            "paths".to_string(),
            Value::Array(paths.iter().map(|p| Value::String(p.to_string())).collect()),
        );
        report
    }
}

/// A finding's detail, naming the other failing codes.
fn with_others(first: &Finding, all: &[Finding]) -> String {
    let mut others: Vec<&str> = Vec::new();
    for f in all {
        if f.code != first.code && !others.contains(&f.code.code()) {
            others.push(f.code.code());
        }
    }
    if others.is_empty() {
        first.detail.clone()
    } else {
        format!("{} (also: {})", first.detail, others.join(", "))
    }
}

/// A base model or wrapper on the way from `C` to the layers: its forward, and the call
/// (in the forward above it) that runs it.
struct Level<'a> {
    class: Class<'a>,
    forward: Function<'a>,
    outer: Function<'a>,
    entry: &'a ruff_python_ast::ExprCall,
}

fn short(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 90 {
        let cut: String = one_line.chars().take(87).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

fn analyze(input: &PassInput<'_, '_>) -> PassReport {
    if input.fused.verdict != Verdict::Patched {
        let mut report = PassReport::new(
            "not-applicable",
            None,
            "the fused-loss pass did not patch this class; the run time wraps patched classes only",
        );
        report
            .extra
            .insert("paths".to_string(), Value::Array(Vec::new()));
        return report;
    }
    let local = input
        .module
        .zip(input.chain.first())
        .map(|(source, class)| (class.source.module.as_str(), source));
    let mut analysis = Analysis {
        program: Program::new(local, input.modules),
        findings: Vec::new(),
        context: String::new(),
        seen: Vec::new(),
    };
    analysis.run(input);
    analysis.report()
}
