//! The `rms-norm` pass: RMSNorm classes rewritten to `forward_rewrite.rms_norm`.
//!
//! Sites: the classes named `*RMSNorm*` that the model class reaches in its module
//! (`fusion_common::ModuleDefs::reachable`: the decoder's input / post-attention norms, the
//! final norm, Qwen3's per-head q/k norms, OLMo's post-norms are all uses of such classes).
//! A site is patched only when its `forward` (and the `_norm` helper it calls) is, statement
//! for statement, one of the forms in [`FORMS`]: the float32 upcast, the mean of squares,
//! `rsqrt(var + eps)`, then the weight applied after the cast back (Llama) or before it
//! (OLMo-2, Gemma's `1 + weight`; Gemma 4's `with_scale` branch, whose instances without a
//! weight keep the stock body; Qwen4Exp's text norm, Gemma's with its `_norm` reshaping into
//! groups when `self.group_size` is set, fused only on the instances without groups).
//! Everything else is refused with a reason of [`REASONS`].
//!
//! Gated norms (`forward(self, hidden_states, gate)`, the gate optionally defaulting to
//! `None`) are matched the same way against the gated forms: the Llama-prefix norm, its
//! weight, then `* ACT2FN[self.activation](gate.to(torch.float32))` (Qwen3-Next's, the weight
//! applied after the cast back; Kimi-Linear's, the float32 weight before it), lowered to
//! `forward_rewrite.gated_rms_norm` behind `fusion_guard.gated_rms_norm`, which returns the
//! activation (or None: run stock) into `_fr_act` as the gated-mlp guard does. The module must
//! bind `ACT2FN` by one `from ...activations import ACT2FN`. The Mamba-style gated norm (Mamba
//! 2, Bamba, GraniteMoeHybrid, NemotronH, Zamba2: `x * nn.functional.silu(gate)` in float32
//! under `if gate is not None:`, then the norm over groups of `self.group_size`, the weight
//! after the cast back) is the `mamba` form, lowered with `gate_first=True,
//! group_size=self.group_size` behind `gate is not None and` the guard (calls without a gate
//! run stock), the module binding `nn` by `from torch import nn` alone. FalconH1's gated norm
//! (`norm_before_gate`, `n_groups`) is refused; transformers 4.57's Mamba-2 norm, without
//! groups, is the `mamba-ungrouped` form.

use std::sync::OnceLock;

use ruff_python_ast::{Expr, Stmt, StmtClassDef, StmtFunctionDef};

use crate::audit::PassReport;
use crate::parse::ParsedSource;
use crate::passes::fusion_common::{
    self, ImportBinding, ModuleDefs, Site, body_without_docstring, emit_guarded, function_sha256,
    is_already_patched, plain_parameters, same_statements,
};
use crate::passes::{Pass, PassInput};

pub const PASS: Pass = Pass {
    name: "rms-norm",
    summary: "RMSNorm classes the model reaches -> forward_rewrite.rms_norm (guarded)",
    reasons: REASONS,
    analyze,
};

pub const REASONS: &[(&str, &str)] = &[
    (
        "no-norm-class",
        "The model class reaches no `*RMSNorm*` class in its module (or the module is not known).",
    ),
    (
        "norm-forward-elsewhere",
        "The norm class's `forward` is not defined in the module (inherited from another module or from torch).",
    ),
    (
        "norm-already-patched",
        "The norm's `forward` already calls `forward_rewrite`.",
    ),
    (
        "norm-signature",
        "The `forward` takes neither exactly one input nor an input and a gate besides `self` (a second plain parameter, or one defaulting to `None`): more inputs, other defaults, `*args` or keyword-only parameters.",
    ),
    (
        "norm-control-flow",
        "The `forward` (or its `_norm` helper) branches, loops or uses `with` / `try` and is not one of the known forms that branch: Gemma 4's `if self.with_scale:`, Qwen4Exp's `_norm` grouped under `if self.group_size is not None:`, the Mamba-style gated norm's `if gate is not None:` before the norm (over groups of `self.group_size`, or over the whole row as in transformers 4.57). Refused: Idefics' dtype test; FalconH1's gated norm, its `norm_before_gate` and shape tests over `self.n_groups`.",
    ),
    (
        "norm-no-weight",
        "The norm applies no `self.weight` and is not one of the unweighted forms fused (NanoChat's `self._norm(x.float()).type_as(x)`; DeepSeek-V4's, GLM-5-Next's and Inkling-2's `x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)`, the scale rounded before the product): other arrangements are not matched.",
    ),
    (
        "norm-not-rsqrt",
        "The normaliser is not `rsqrt(mean(x**2) + eps)` (nor `torch.pow(mean(x**2) + eps, -0.5)`, which torch computes with rsqrt).",
    ),
    (
        "norm-form-unknown",
        "The statements are not one of the known forms for the signature (the weight's offset added in the weight's dtype, a reshape into groups other than Qwen4Exp's and Mamba's, a gate applied before the norm otherwise than Mamba's or activated otherwise than `ACT2FN[self.activation](gate.to(torch.float32))`, ...): matched in part, never approximated.",
    ),
    (
        "norm-activation-unknown",
        "The name a gated form's activation reads is not bound at the module's top level by exactly one expected import and by nothing else: `ACT2FN` by `from <...>activations import ACT2FN` (transformers' activation table), `F` by `import torch.nn.functional as F`, `nn` by `from torch import nn` (or `import torch.nn as nn`).",
    ),
    (
        "norm-emit-invalid",
        "The emitted forward does not re-parse as one patched function (a bug in this tool).",
    ),
];

/// A known RMSNorm form: the forward's statements (its input named `param`, its gate `gate`
/// for the gated forms; the Llama forms' shared first statements, [`LLAMA_PREFIX`], are put
/// in front when `llama_prefix`), the `_norm` helper's when the forward calls one (its input
/// named `helper_param`), how the op is called, and the condition under which the fused path
/// may run, when the form branches on one (tested first in the guard line, so the guard is not
/// evaluated otherwise and the stock body runs: Gemma 4's `self.with_scale`, its weight's
/// existence; Qwen4Exp's `self.group_size is None`; Mamba's `gate is not None`).
struct Form {
    name: &'static str,
    param: &'static str,
    llama_prefix: bool,
    forward: &'static str,
    norm_helper: Option<NormHelper>,
    eps: &'static str,
    /// The weight's offset (`forward_rewrite.rms_norm`'s; the gated op takes none).
    offset: &'static str,
    cast_before_weight: bool,
    condition: Option<&'static str>,
    gate: Option<Gate>,
    /// Whether the form applies `self.weight` (NanoChat's norm has none: the op gets `None`).
    weighted: bool,
    /// DeepSeek-V4's unweighted norm: the scale rounded to x's dtype before the product
    /// (`rms_norm(..., scale_first=True)`; no offset or weight order to pass).
    scale_first: bool,
}

/// A gated form's second input and the activation the body applies to it in float32: the
/// expression (evaluated again in the guard line, which gets the module or function it
/// yields) and the module-level name it reads, with the import that must bind it.
#[derive(Clone, Copy)]
struct Gate {
    param: &'static str,
    activation: &'static str,
    binding: GateBinding,
    /// The gate applied before the norm (Mamba's `x * act(gate)` normalised), else after.
    first: bool,
    /// The attribute holding the size of the groups normalised apart, when the form groups.
    group_size: Option<&'static str>,
}

#[derive(Clone, Copy)]
enum GateBinding {
    /// `ACT2FN`, transformers' activation table: `from <...>activations import ACT2FN`.
    Act2fn,
    /// `F`, torch's functional module (`F.silu`: transformers 4.57's Qwen3-Next).
    TorchFunctional,
    /// `nn`, torch's `torch.nn` (`nn.functional.silu`: the Mamba-style gated norms).
    TorchNn,
}

impl GateBinding {
    fn name(self) -> &'static str {
        match self {
            GateBinding::Act2fn => "ACT2FN",
            GateBinding::TorchFunctional => "F",
            GateBinding::TorchNn => "nn",
        }
    }

    /// Whether the module binds the name as the form reads it: exactly once, at its top
    /// level (or under a top-level `if` / `try`), by the expected import, and by nothing else.
    fn holds(self, defs: &ModuleDefs<'_>) -> bool {
        fusion_common::bound_only_by(defs, self.name(), |b| match self {
            GateBinding::Act2fn => matches!(
                b,
                ImportBinding::From { module: Some(m), name: "ACT2FN", .. }
                    if m.rsplit('.').next() == Some("activations")
            ),
            GateBinding::TorchFunctional => fusion_common::is_torch_functional(b),
            GateBinding::TorchNn => fusion_common::is_torch_nn(b),
        })
    }

    fn expected(self) -> &'static str {
        match self {
            GateBinding::Act2fn => "`from ...activations import ACT2FN`",
            GateBinding::TorchFunctional => "`import torch.nn.functional as F`",
            GateBinding::TorchNn => "`from torch import nn` (or `import torch.nn as nn`)",
        }
    }
}

const ACT2FN_GATE: Gate = Gate {
    param: "gate",
    activation: "ACT2FN[self.activation]",
    binding: GateBinding::Act2fn,
    first: false,
    group_size: None,
};

/// transformers 4.57's Qwen3-Next: SiLU written out.
const SILU_GATE: Gate = Gate {
    param: "gate",
    activation: "F.silu",
    binding: GateBinding::TorchFunctional,
    first: false,
    group_size: None,
};

/// The Mamba-style gated norm: SiLU on the float32 gate, applied before the norm over
/// groups of `self.group_size`.
const MAMBA_GATE: Gate = Gate {
    param: "gate",
    activation: "nn.functional.silu",
    binding: GateBinding::TorchNn,
    first: true,
    group_size: Some("self.group_size"),
};

/// transformers 4.57's Mamba-2 / Bamba / GraniteMoeHybrid gated norm: the same gate, the
/// norm over the whole row.
const MAMBA_UNGROUPED_GATE: Gate = Gate {
    group_size: None,
    ..MAMBA_GATE
};

const LLAMA_PREFIX: &str = "input_dtype = hidden_states.dtype
hidden_states = hidden_states.to(torch.float32)
variance = hidden_states.pow(2).mean(-1, keepdim=True)
hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
";

/// A form's `_norm(self, <param>)` helper: its input's name and its statements.
#[derive(Clone, Copy)]
struct NormHelper {
    param: &'static str,
    body: &'static str,
}

/// Gemma's forward (`(1 + weight)` in float32, then the cast back), shared by Qwen4Exp's norm.
const GEMMA_FORWARD: &str = "output = self._norm(x.float())
output = output * (1.0 + self.weight.float())
return output.type_as(x)
";

const GEMMA_NORM: NormHelper = NormHelper {
    param: "x",
    body: "return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)\n",
};

/// Qwen4Exp's text norm: Gemma's, reshaped into groups of `self.group_size` when that is not
/// None. With `self.group_size is None` (the form's condition) both tests fail and the
/// statements are exactly [`GEMMA_NORM`]'s `out = x * torch.rsqrt(...)`, `return out`.
const GROUPED_GEMMA_NORM: NormHelper = NormHelper {
    param: "x",
    body: "if self.group_size is not None:
    x = x.reshape(*x.shape[:-1], -1, self.group_size)
out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
return out.flatten(-2) if self.group_size is not None else out
",
};

/// Gemma 4's: `torch.pow(v, -0.5)` is computed by torch with `rsqrt` (the scalar-exponent
/// fast path), the value the other forms' `torch.rsqrt(v)` gives.
const GEMMA4_NORM: NormHelper = NormHelper {
    param: "hidden_states",
    body: "mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
return hidden_states * torch.pow(mean_squared, -0.5)
",
};

fn forms() -> &'static [(Form, ParsedSource, Option<ParsedSource>)] {
    static FORMS: OnceLock<Vec<(Form, ParsedSource, Option<ParsedSource>)>> = OnceLock::new();
    FORMS.get_or_init(|| {
        let list = [
            Form {
                name: "llama",
                param: "hidden_states",
                llama_prefix: true,
                forward: "return self.weight * hidden_states.to(input_dtype)\n",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: true,
                condition: None,
                gate: None,
                weighted: true,
                scale_first: false,
            },
            Form {
                name: "olmo2",
                param: "hidden_states",
                llama_prefix: true,
                forward: "return (self.weight * hidden_states).to(input_dtype)\n",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: false,
                condition: None,
                gate: None,
                weighted: true,
                scale_first: false,
            },
            Form {
                name: "helium",
                param: "hidden_states",
                llama_prefix: true,
                forward: "return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)\n",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: false,
                condition: None,
                gate: None,
                weighted: true,
                scale_first: false,
            },
            Form {
                name: "gemma",
                param: "x",
                llama_prefix: false,
                forward: GEMMA_FORWARD,
                norm_helper: Some(GEMMA_NORM),
                eps: "self.eps",
                offset: "1.0",
                cast_before_weight: false,
                condition: None,
                gate: None,
                weighted: true,
                scale_first: false,
            },
            // Qwen4Exp's text norm: Gemma's, with groups when `self.group_size` is set; the
            // instances without groups run Gemma's statements exactly, the others stay stock.
            Form {
                name: "qwen4-exp",
                param: "x",
                llama_prefix: false,
                forward: GEMMA_FORWARD,
                norm_helper: Some(GROUPED_GEMMA_NORM),
                eps: "self.eps",
                offset: "1.0",
                cast_before_weight: false,
                condition: Some("self.group_size is None"),
                gate: None,
                weighted: true,
                scale_first: false,
            },
            Form {
                name: "moshi",
                param: "x",
                llama_prefix: false,
                forward: "output = self._norm(x.float())
output = output * self.weight.float()
return output.type_as(x)
",
                norm_helper: Some(GEMMA_NORM),
                eps: "self.eps",
                offset: "0.0",
                cast_before_weight: false,
                condition: None,
                gate: None,
                weighted: true,
                scale_first: false,
            },
            Form {
                name: "llama4",
                param: "x",
                llama_prefix: false,
                forward: "output = self._norm(x.float()).type_as(x)
return output * self.weight
",
                norm_helper: Some(GEMMA_NORM),
                eps: "self.eps",
                offset: "0.0",
                cast_before_weight: true,
                condition: None,
                gate: None,
                weighted: true,
                scale_first: false,
            },
            Form {
                name: "gemma4",
                param: "hidden_states",
                llama_prefix: false,
                forward: "normed_output = self._norm(hidden_states.float())
if self.with_scale:
    normed_output = normed_output * self.weight.float()
return normed_output.type_as(hidden_states)
",
                norm_helper: Some(GEMMA4_NORM),
                eps: "self.eps",
                offset: "0.0",
                cast_before_weight: false,
                condition: Some("self.with_scale"),
                gate: None,
                weighted: true,
                scale_first: false,
            },
            // No weight at all (NanoChat, HRM-Text): the op's unit weight, `rms_norm(x, None, eps)`.
            Form {
                name: "unweighted",
                param: "x",
                llama_prefix: false,
                forward: "return self._norm(x.float()).type_as(x)\n",
                norm_helper: Some(GEMMA_NORM),
                eps: "self.eps",
                offset: "0.0",
                cast_before_weight: true,
                condition: None,
                gate: None,
                weighted: false,
                scale_first: false,
            },
            // DeepSeek-V4's, GLM-5-Next's and Inkling-2's `UnweightedRMSNorm`: no weight, the
            // scale `rsqrt(...)` rounded to x's dtype and then multiplied by x in x's dtype.
            Form {
                name: "scale-first",
                param: "x",
                llama_prefix: false,
                forward: "return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)\n",
                norm_helper: None,
                eps: "self.eps",
                offset: "0.0",
                cast_before_weight: false,
                condition: None,
                gate: None,
                weighted: false,
                scale_first: true,
            },
            // The gated forms: the gate activated in float32 after the weighted norm.
            Form {
                name: "qwen3-next",
                param: "hidden_states",
                llama_prefix: true,
                forward: "hidden_states = self.weight * hidden_states.to(input_dtype)
hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))
return hidden_states.to(input_dtype)
",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: true,
                condition: None,
                gate: Some(ACT2FN_GATE),
                weighted: true,
                scale_first: false,
            },
            Form {
                // transformers 4.57's Qwen3-Next: SiLU written out with torch's functional.
                name: "qwen3-next-silu",
                param: "hidden_states",
                llama_prefix: true,
                forward: "hidden_states = self.weight * hidden_states.to(input_dtype)
hidden_states = hidden_states * F.silu(gate.to(torch.float32))
return hidden_states.to(input_dtype)
",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: true,
                condition: None,
                gate: Some(SILU_GATE),
                weighted: true,
                scale_first: false,
            },
            Form {
                name: "kimi",
                param: "hidden_states",
                llama_prefix: true,
                forward: "hidden_states = self.weight.to(torch.float32) * hidden_states
hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))
return hidden_states.to(input_dtype)
",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: false,
                condition: None,
                gate: Some(ACT2FN_GATE),
                weighted: true,
                scale_first: false,
            },
            // The Mamba-style gated norm (Mamba 2, Bamba, GraniteMoeHybrid, NemotronH, Zamba2):
            // the float32 input times SiLU of the float32 gate when a gate is given, normalised
            // per group of `self.group_size`, the weight applied after the cast back. Calls
            // without a gate run the stock body.
            Form {
                name: "mamba",
                param: "hidden_states",
                llama_prefix: false,
                forward: "input_dtype = hidden_states.dtype
hidden_states = hidden_states.to(torch.float32)
if gate is not None:
    hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))
*prefix_dims, last_dim = hidden_states.shape
group_count = last_dim // self.group_size
hidden_states_group = hidden_states.view(*prefix_dims, group_count, self.group_size)
variance = hidden_states_group.pow(2).mean(-1, keepdim=True)
hidden_states_group = hidden_states_group * torch.rsqrt(variance + self.variance_epsilon)
hidden_states = hidden_states_group.view(*prefix_dims, group_count * self.group_size)
return self.weight * hidden_states.to(input_dtype)
",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: true,
                condition: Some("gate is not None"),
                gate: Some(MAMBA_GATE),
                weighted: true,
                scale_first: false,
            },
            // transformers 4.57's form of it, without groups.
            Form {
                name: "mamba-ungrouped",
                param: "hidden_states",
                llama_prefix: false,
                forward: "input_dtype = hidden_states.dtype
hidden_states = hidden_states.to(torch.float32)
if gate is not None:
    hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))
variance = hidden_states.pow(2).mean(-1, keepdim=True)
hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
return self.weight * hidden_states.to(input_dtype)
",
                norm_helper: None,
                eps: "self.variance_epsilon",
                offset: "0.0",
                cast_before_weight: true,
                condition: Some("gate is not None"),
                gate: Some(MAMBA_UNGROUPED_GATE),
                weighted: true,
                scale_first: false,
            },
        ];
        list.into_iter()
            .map(|form| {
                let forward = if form.llama_prefix {
                    format!("{LLAMA_PREFIX}{}", form.forward)
                } else {
                    form.forward.to_string()
                };
                let forward = fusion_common::template(&forward);
                let helper = form.norm_helper.map(|h| fusion_common::template(h.body));
                (form, forward, helper)
            })
            .collect()
    })
}

fn analyze(input: &PassInput<'_, '_>) -> PassReport {
    let Some(module) = input.module else {
        return fusion_common::report(vec![], "no-norm-class", "the module is not known");
    };
    let defs = ModuleDefs::of(module);
    let Some(start) = fusion_common::start(input, &defs) else {
        return fusion_common::report(
            vec![],
            "no-norm-class",
            "the class is not defined in the module",
        );
    };
    let sites = defs
        .reachable(start.name.as_str())
        .into_iter()
        .filter(|c| c.name.as_str().to_ascii_lowercase().contains("rmsnorm"))
        .map(|c| norm_site(&defs, c))
        .collect();
    fusion_common::report(
        sites,
        "no-norm-class",
        "the model reaches no *RMSNorm* class in its module",
    )
}

fn is_control_flow(stmt: &Stmt) -> bool {
    matches!(
        stmt,
        Stmt::If(_) | Stmt::For(_) | Stmt::While(_) | Stmt::With(_) | Stmt::Try(_) | Stmt::Match(_)
    )
}

/// The verdict on one norm class.
pub(crate) fn norm_site(defs: &ModuleDefs<'_>, class: &StmtClassDef) -> Site {
    let name = class.name.as_str();
    let line = defs.line(class);
    let refuse = |reason, detail: String| Site::refused("class", name, line, reason, detail);
    let Some((owner, forward)) = defs.method_owner(class, "forward") else {
        return refuse(
            "norm-forward-elsewhere",
            format!("{name} defines no forward in this module"),
        );
    };
    if owner.name.as_str() != name {
        // The owner is a site of its own when reached; patching it covers this class.
        return refuse(
            "norm-forward-elsewhere",
            format!("{name} runs {}.forward", owner.name),
        );
    }
    if is_already_patched(forward) {
        return refuse(
            "norm-already-patched",
            format!("{name}.forward calls forward_rewrite"),
        );
    }
    let Some((param, gate)) = signature(forward) else {
        return refuse(
            "norm-signature",
            format!(
                "{name}.forward takes neither exactly one input nor an input and a gate (a second plain parameter, or one defaulting to None)"
            ),
        );
    };
    let body = body_without_docstring(forward);
    let helper = crate::syntax::method(&owner.body, "_norm");
    let helper_body = helper.map(body_without_docstring).unwrap_or(&[]);
    let calls_helper = body.iter().any(|s| {
        crate::syntax::calls_in_stmt(s)
            .iter()
            .any(|c| crate::syntax::self_attribute(&c.func) == Some("_norm"))
    });
    let matched = forms().iter().find(|(form, fwd, helper_t)| {
        if form.param != param
            || form.gate.map(|g| g.param) != gate.as_deref()
            || !same_statements(body, fwd)
        {
            return false;
        }
        match (helper_t, helper, form.norm_helper) {
            (None, _, _) => !calls_helper,
            (Some(t), Some(h), Some(expected)) => {
                matches!(plain_parameters(h, true).as_deref(), Some([(p, false)]) if p == expected.param)
                    && same_statements(body_without_docstring(h), t)
            }
            _ => false,
        }
    });
    // Matched in full: the forms' own branches are known. Otherwise the most telling reason.
    let Some((form, _, _)) = matched else {
        return refuse_unmatched(defs, name, line, &param, gate.as_deref(), body, helper_body);
    };
    let cast = if form.cast_before_weight {
        "True"
    } else {
        "False"
    };
    let lines = match form.gate {
        None => {
            let condition = form
                .condition
                .map(|c| format!("{c} and "))
                .unwrap_or_default();
            let weight = if form.weighted { "self.weight" } else { "None" };
            vec![
                format!(
                    "if {condition}forward_rewrite.fusion_guard.rms_norm(self, {param}, {weight}, {}):",
                    form.eps
                ),
                format!("    # forward-rewrite: fused RMSNorm ({} form)", form.name),
                if form.scale_first {
                    format!(
                        "    return forward_rewrite.rms_norm({param}, {weight}, {}, scale_first=True)",
                        form.eps,
                    )
                } else {
                    format!(
                        "    return forward_rewrite.rms_norm({param}, {weight}, {}, offset={}, cast_before_weight={cast})",
                        form.eps, form.offset,
                    )
                },
            ]
        }
        Some(g) => {
            if !g.binding.holds(defs) {
                return refuse(
                    "norm-activation-unknown",
                    format!(
                        "{name}.forward is the {} gated form, but the module does not bind {} by exactly one {} and nothing else",
                        form.name,
                        g.binding.name(),
                        g.binding.expected()
                    ),
                );
            }
            let gate = gate.as_deref().unwrap_or(g.param);
            let condition = form
                .condition
                .map(|c| format!("{c} and "))
                .unwrap_or_default();
            // Mamba's options, passed to the guard and the op alike (none for the others).
            let mut options = String::new();
            if g.first {
                options.push_str(", gate_first=True");
            }
            if let Some(size) = g.group_size {
                options.push_str(&format!(", group_size={size}"));
            }
            vec![
                format!(
                    "if {condition}(_fr_act := forward_rewrite.fusion_guard.gated_rms_norm(self, {param}, {gate}, self.weight, {}, {}{options})) is not None:",
                    form.eps, g.activation
                ),
                format!(
                    "    # forward-rewrite: fused gated RMSNorm ({} form)",
                    form.name
                ),
                format!(
                    "    return forward_rewrite.gated_rms_norm({param}, {gate}, self.weight, {}, activation=_fr_act, cast_before_weight={cast}{options})",
                    form.eps
                ),
            ]
        }
    };
    match emit_guarded(defs.source, forward, &lines) {
        Ok(patch) => {
            let mut site = refuse("norm-emit-invalid", String::new());
            site.verdict = "patched";
            site.reason = None;
            site.original_sha256 = Some(function_sha256(defs.source, forward));
            site.patch = Some(patch);
            site.lowered.insert("form".into(), form.name.into());
            site.lowered.insert("eps".into(), form.eps.into());
            site.lowered.insert(
                "cast_before_weight".into(),
                form.cast_before_weight.to_string(),
            );
            match (form.gate, &gate) {
                (Some(g), Some(gate)) => {
                    site.lowered
                        .insert("gate activation".into(), g.activation.into());
                    site.lowered.insert("gate".into(), gate.clone());
                    if g.first {
                        site.lowered.insert("gate_first".into(), "true".into());
                    }
                    if let Some(size) = g.group_size {
                        site.lowered.insert("group_size".into(), size.into());
                    }
                }
                _ => {
                    site.lowered.insert("offset".into(), form.offset.into());
                }
            }
            if let Some(c) = form.condition {
                site.lowered.insert("fused only when".into(), c.into());
            }
            if !form.weighted {
                site.lowered.insert("weight".into(), "none".into());
            }
            if form.scale_first {
                site.lowered.insert("scale_first".into(), "true".into());
            }
            site
        }
        Err(e) => refuse("norm-emit-invalid", e),
    }
}

/// The forward's input, and its gate when it takes one: `(self, x)`, or `(self, x, gate)`
/// with the gate optionally defaulting to `None` (annotations allowed). None otherwise.
fn signature(forward: &StmtFunctionDef) -> Option<(String, Option<String>)> {
    match plain_parameters(forward, true)?.as_slice() {
        [(p, false)] => Some((p.clone(), None)),
        [(p, false), (g, has_default)] => {
            let default_is_none = forward.parameters.args[2]
                .default
                .as_deref()
                .is_some_and(Expr::is_none_literal_expr);
            (!has_default || default_is_none).then(|| (p.clone(), Some(g.clone())))
        }
        _ => None,
    }
}

/// The refusal of a norm no form matches: control flow, no weight, another normaliser, or
/// an unknown arrangement of known parts, in that order. `param` and `gate`: the forward's
/// input and, for a gated norm, its gate parameter.
fn refuse_unmatched(
    defs: &ModuleDefs<'_>,
    name: &str,
    line: u32,
    param: &str,
    gate: Option<&str>,
    body: &[Stmt],
    helper_body: &[Stmt],
) -> Site {
    let refuse = |reason, detail: String| Site::refused("class", name, line, reason, detail);
    if let Some(first) = body.iter().chain(helper_body).find(|s| is_control_flow(s)) {
        let head = defs.source.slice(first).lines().next().unwrap_or("").trim();
        let detail = if let Some(gate) = gate {
            format!(
                "{name}.forward({param}, {gate}) branches or loops (first `{head}`) and is not the mamba gated form (`if gate is not None:` applying `nn.functional.silu(gate.to(torch.float32))` before the norm over groups of `self.group_size`, statement for statement); the other gated forms apply the gate after the norm, unconditionally"
            )
        } else {
            format!(
                "{name}.forward or its _norm branches or loops (first `{head}`) and is not a known form with a branch (Gemma 4's `if self.with_scale:`, Qwen4Exp's `_norm` grouped under `if self.group_size is not None:`)"
            )
        };
        return refuse("norm-control-flow", detail);
    }
    let text = |stmts: &[Stmt]| -> String {
        stmts
            .iter()
            .map(|s| defs.source.slice(s).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let all = format!("{}\n{}", text(body), text(helper_body));
    if !all.contains("self.weight") {
        return refuse("norm-no-weight", format!("{name} applies no self.weight"));
    }
    // rsqrt, or Gemma 4's torch.pow(v, -0.5): a known normaliser in an unknown arrangement
    if !all.contains("rsqrt") && !all.contains(", -0.5)") {
        return refuse(
            "norm-not-rsqrt",
            format!("{name} does not normalise with rsqrt(mean(x**2) + eps)"),
        );
    }
    let detail = if let Some(gate) = gate {
        format!(
            "{name}.forward({param}, {gate}) is not one of the known gated RMSNorm forms (qwen3-next, kimi, qwen3-next-silu: the weighted norm, then `* ACT2FN[self.activation](gate.to(torch.float32))` or `* F.silu(gate.to(torch.float32))`; mamba: `* nn.functional.silu(gate.to(torch.float32))` under `if gate is not None:` before the norm over groups of `self.group_size`)"
        )
    } else {
        format!("{name}.forward is not one of the known RMSNorm forms")
    };
    refuse("norm-form-unknown", detail)
}

#[cfg(test)]
mod tests;
