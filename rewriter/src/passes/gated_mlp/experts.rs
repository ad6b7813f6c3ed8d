//! MoE experts: the gate of transformers' `@use_experts_implementation` classes.
//!
//! Such a class keeps its experts' weights as 3-D tensors; the decorator dispatches its
//! forward to the configured experts implementation (`grouped_mm`, the default wherever it can
//! run, or `batched_mm`), which computes every routed token's `gate_up` projection at once and
//! then calls `self._apply_gate(gate_up)`. A class that defines no `_apply_gate` gets
//! transformers' `integrations.moe._default_apply_gate`, whose body is the packed gated
//! product (`gate, up = gate_up_out.chunk(2, dim=-1)`; `return self.act_fn(gate) * up`). The
//! site puts a guarded `_apply_gate` on the class that lowers it to
//! `forward_rewrite.gated_mlp_act_packed`, its stock fallback being [`DEFAULT_GATE`]'s body.
//!
//! The default lives in another module, so its binding is checked where it runs: the
//! installer replaces the class's `_apply_gate` only when it is transformers'
//! `_default_apply_gate` and its running source matches [`DEFAULT_GATE`]'s form
//! (`_native.rewrite_gate_function_ok`, the same abstract interpretation as the packed MLP
//! form); anything else stays stock. The `eager` experts implementation (a Python loop with the
//! product inline) is left stock.
//!
//! A class that defines its own `_apply_gate` in the module (DeepSeek-V4, GLM-5-Next, HY-V4: the
//! clamped SwiGLU, `gate.clamp(max=self.<limit>)` and `up.clamp(min=-self.<limit>,
//! max=self.<limit>)` before `act(gate) * up`, the activation `self.<act>` or torch's functional
//! SiLU) is patched when `packed.rs` reads its body as the default's product, plain or with
//! those clamps: the patch's fallback is the class's own body, and the installer binds it by
//! its hash (`original_sha256`) like an MLP's forward. The site's `lowered` names the
//! activation as written (`act`: `self.act_fn`, `F.silu`), the limit attribute (`limit`) and
//! where the gate is clamped (`clamp`: `gate before act` or `activation output`), which the
//! `experts-forward` site carries to the installer for `fusion_guard.register_experts`.
//! GPT-OSS's and MiniMax-M3's gates (`swiglu_oai`: `glu = gate * torch.sigmoid(gate *
//! self.<alpha>)`, `(up + 1) * glu`, with the clamps) are read the same way, their `lowered`
//! naming `alpha` too; GPT-OSS's reads gate_up's interleaved pairs (`gate_up[..., ::2]`,
//! `gate_up[..., 1::2]`), which its decorator declares (`is_concatenated=False`: refused
//! `experts-options` for any gate that does not read them so), lowered with
//! `interleaved=True` (`layout`: `interleaved`).
//!
//! Each experts class whose gate site is patched gets a second site, `experts-forward` (not
//! for an interleaved gate: the op takes the halves), the
//! `grouped_mm` experts implementation itself (`integrations.moe.grouped_mm_experts_forward`)
//! replaced, for that class, by `forward_rewrite.moe_experts`, whose backward keeps only
//! `gate_up` of the routed rows (the stock autograd keeps the gathered input and the down
//! projection's output too). No source of the model's module changes: the installer puts a
//! dispatcher in transformers' experts interface under `grouped_mm` that runs the op for the
//! classes it installed this site for, when `fusion_guard.moe_experts` passes, and the stock
//! function otherwise. The stock function lives in transformers, so its binding is checked
//! where it runs: the running `grouped_mm_experts_forward` and the two helpers it computes
//! with must equal [`EXPERTS_FUNCTIONS`] statement for statement (comments, docstrings,
//! annotations and formatting aside; `_native.rewrite_experts_function_ok`).

use ruff_python_ast::comparable::{ComparableExpr, ComparableStmt};
use ruff_python_ast::{Expr, ParameterWithDefault, Stmt, StmtClassDef, StmtFunctionDef};

use super::{Act, packed};
use crate::parse::ParsedSource;
use crate::passes::fusion_common::{
    ModuleDefs, Site, body_without_docstring, emit_guarded, function_sha256, plain_parameters,
};

/// The decorator that marks an experts class.
pub const DECORATOR: &str = "use_experts_implementation";

/// What the patched `_apply_gate` falls back to: transformers' `_default_apply_gate`, as this
/// pass reads it (the installer checks the running one has this form).
pub const DEFAULT_GATE: &str = "def _apply_gate(self, gate_up_out):
    gate, up = gate_up_out.chunk(2, dim=-1)
    return self.act_fn(gate) * up
";

/// transformers' `grouped_mm` experts implementation and the helpers it computes with, as
/// `forward_rewrite.moe_experts` reproduces them (transformers 5.x, read from 5.23.0): the
/// installer's `experts-forward` sites run only when the running functions equal these.
pub const EXPERTS_FUNCTIONS: &[&str] = &[
    "def grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_hidden_states_g = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ('cpu', 'mps') else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    sentinel_mask = None
    if self._is_expert_parallel:
        sentinel_mask = (expert_ids_g >= self.num_experts).unsqueeze(-1)
        expert_ids_g.clamp_(max=self.num_experts - 1)
    if self.has_gate:
        selected_weights = self.gate_up_proj
        selected_biases = self.gate_up_proj_bias[expert_ids_g] if self.has_bias else None
    else:
        selected_weights = self.up_proj
        selected_biases = self.up_proj_bias[expert_ids_g] if self.has_bias else None
    if sentinel_mask is not None:
        selected_hidden_states_g.masked_fill_(sentinel_mask, 0.0)
    proj_out = _grouped_linear(selected_hidden_states_g, selected_weights, offsets, bias=selected_biases, is_transposed=self.is_transposed)
    if sentinel_mask is not None:
        proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
    if self.has_gate:
        proj_out = self._apply_gate(proj_out)
    else:
        proj_out = self.act_fn(proj_out)
    selected_weights = self.down_proj
    selected_biases = self.down_proj_bias[expert_ids_g] if self.has_bias else None
    proj_out = _grouped_linear(proj_out, selected_weights, offsets, bias=selected_biases, is_transposed=self.is_transposed)
    if sentinel_mask is not None:
        proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
    if self.has_post_expert_norm:
        proj_out = self.post_expert_norm(proj_out)
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted_out = weighted_out[inv_perm]
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)
",
    "def _grouped_linear(input, weight, offs, bias=None, is_transposed=False):
    if is_transposed:
        out = _grouped_mm(input, weight, offs=offs)
    else:
        out = _grouped_mm(input, weight.transpose(-2, -1), offs=offs)
    if bias is not None:
        out.add_(bias)
    return out
",
    "def _grouped_mm(input, weight, offs):
    if _can_use_grouped_mm(input, weight, offs):
        if hasattr(torch.nn.functional, 'grouped_mm'):
            return torch.nn.functional.grouped_mm(input.to(weight.dtype), weight, offs=offs)
        elif hasattr(torch, '_grouped_mm'):
            return torch._grouped_mm(input.to(weight.dtype), weight, offs=offs)
    return torch.ops.transformers.grouped_mm_fallback(input.to(weight.dtype), weight, offs=offs)
",
];

/// [`EXPERTS_FUNCTIONS`], parsed once.
fn experts_templates() -> &'static [ParsedSource] {
    static T: std::sync::OnceLock<Vec<ParsedSource>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        EXPERTS_FUNCTIONS
            .iter()
            .map(|t| crate::passes::fusion_common::template(t))
            .collect()
    })
}

/// Whether a running function's source (as `inspect.getsource` gives it) is the one of
/// [`EXPERTS_FUNCTIONS`] of its name: the same parameters and defaults, no decorators, and the
/// same statements past the docstring. `Err` says what differs.
pub fn experts_function_ok(text: &str) -> Result<(), String> {
    let parsed = ParsedSource::parse(crate::hash::dedent(text))
        .map_err(|e| format!("the source does not parse: {e}"))?;
    let [Stmt::FunctionDef(def)] = &parsed.suite()[..] else {
        return Err("the source is not one function".to_string());
    };
    let name = def.name.as_str();
    let expected = experts_templates()
        .iter()
        .find_map(|t| match t.suite().first() {
            Some(Stmt::FunctionDef(f)) if f.name.as_str() == name => Some(f),
            _ => None,
        })
        .ok_or_else(|| format!("{name} is not a function this check knows"))?;
    if !def.decorator_list.is_empty() || !same_parameters(def, expected) {
        return Err(format!("{name}'s signature differs from the one read"));
    }
    let body = body_without_docstring(def);
    let expected = body_without_docstring(expected);
    match body
        .iter()
        .zip(expected)
        .position(|(a, b)| ComparableStmt::from(a) != ComparableStmt::from(b))
    {
        None if body.len() == expected.len() => Ok(()),
        None => Err(format!(
            "{name} has {} statements, the one read {}",
            body.len(),
            expected.len()
        )),
        Some(i) => Err(format!(
            "{name}'s statement {} differs from the one read",
            i + 1
        )),
    }
}

/// The same parameter names, kinds and defaults (annotations aside).
fn same_parameters(a: &StmtFunctionDef, b: &StmtFunctionDef) -> bool {
    fn plain(ps: &[ParameterWithDefault]) -> Vec<(&str, Option<ComparableExpr<'_>>)> {
        ps.iter()
            .map(|q| {
                (
                    q.parameter.name.as_str(),
                    q.default.as_deref().map(ComparableExpr::from),
                )
            })
            .collect()
    }
    let (p, q) = (&a.parameters, &b.parameters);
    let name = |v: &Option<Box<ruff_python_ast::Parameter>>| v.as_ref().map(|v| v.name.to_string());
    plain(&p.posonlyargs) == plain(&q.posonlyargs)
        && plain(&p.args) == plain(&q.args)
        && plain(&p.kwonlyargs) == plain(&q.kwonlyargs)
        && name(&p.vararg) == name(&q.vararg)
        && name(&p.kwarg) == name(&q.kwarg)
}

/// The `@use_experts_implementation` decorator of the class: `Some(None)` bare, `Some(Some(call))`
/// with arguments, `None` when the class is not an experts class.
fn decorator(class: &StmtClassDef) -> Option<Option<&ruff_python_ast::ExprCall>> {
    class
        .decorator_list
        .iter()
        .find_map(|d| match &d.expression {
            Expr::Call(c) => {
                (crate::syntax::callee_last_name(&c.func) == Some(DECORATOR)).then_some(Some(c))
            }
            e => (crate::syntax::callee_last_name(e) == Some(DECORATOR)).then_some(None),
        })
}

pub fn is_experts_class(class: &StmtClassDef) -> bool {
    decorator(class).is_some()
}

/// What the decorator's arguments say of the gate: Ok(whether gate and up are declared
/// interleaved, `is_concatenated=False`: only a class's own gate reading them so is a site), or
/// Err(why it is out of reach): no gate (`has_gate=False`), another experts interface, or
/// anything not a literal.
fn options(call: Option<&ruff_python_ast::ExprCall>) -> Result<bool, String> {
    let Some(call) = call else {
        return Ok(false);
    };
    if !call.arguments.args.is_empty() {
        return Err("the decorator takes positional arguments".to_string());
    }
    let mut interleaved = false;
    for keyword in &call.arguments.keywords {
        let name = keyword.arg.as_ref().map(|a| a.as_str()).unwrap_or("**");
        let value = match &keyword.value {
            Expr::BooleanLiteral(b) => b.value,
            _ => return Err(format!("{name}= is not a literal")),
        };
        match (name, value) {
            ("is_transposed" | "has_bias" | "has_post_expert_norm", _) => {}
            ("has_gate" | "is_concatenated", true) => {}
            ("has_gate", false) => return Err("has_gate=False: no gated product".into()),
            ("is_concatenated", false) => interleaved = true,
            _ => return Err(format!("{name}= is not an option this pass knows")),
        }
    }
    Ok(interleaved)
}

/// Whether the class's own `_apply_gate` (defined on it in the module) reads gate_up as
/// interleaved pairs, the layout `is_concatenated=False` declares.
fn own_gate_interleaved(defs: &ModuleDefs<'_>, class: &StmtClassDef) -> bool {
    let Some((owner, gate)) = defs.method_owner(class, "_apply_gate") else {
        return false;
    };
    let param = match plain_parameters(gate, true).as_deref() {
        Some([(p, false)]) => p.clone(),
        _ => return false,
    };
    owner.name == class.name
        && packed::match_gate(body_without_docstring(gate), &param).is_some_and(|g| g.interleaved())
}

/// The verdict on one experts class.
pub(super) fn experts_site(defs: &ModuleDefs<'_>, class: &StmtClassDef) -> Site {
    let name = class.name.as_str();
    let line = defs.line(class);
    let refuse = |reason, detail: String| Site::refused("experts-gate", name, line, reason, detail);
    match options(decorator(class).flatten()) {
        Err(detail) => return refuse("experts-options", format!("{name}: {detail}")),
        // GPT-OSS: the pairs interleaved, read so by the class's own gate.
        Ok(true) if !own_gate_interleaved(defs, class) => {
            return refuse(
                "experts-options",
                format!(
                    "{name}: is_concatenated=False: gate and up interleaved, and the class's own _apply_gate does not read them as gate_up[..., ::2], gate_up[..., 1::2] in a form this pass knows"
                ),
            );
        }
        Ok(_) => {}
    }
    if let Some((owner, gate)) = defs.method_owner(class, "_apply_gate") {
        return own_gate_site(defs, class, owner, gate);
    }
    let resolved = match super::activation(defs, class, "act_fn") {
        Ok(r) => r,
        Err((reason, detail)) => return refuse(reason, detail),
    };
    let template = ParsedSource::parse(DEFAULT_GATE).expect("the default gate parses");
    let Some(Stmt::FunctionDef(def)) = template.suite().first() else {
        unreachable!("DEFAULT_GATE is one function")
    };
    let lines = [
        format!(
            "if (_fr_act := {}) is not None:",
            resolved.guard_call("act_fn", "gate_up_out")
        ),
        "    # forward-rewrite: the experts' fused act(gate) * up on the packed gate_up, recomputed in backward"
            .to_string(),
        "    return forward_rewrite.gated_mlp_act_packed(gate_up_out, activation=_fr_act)"
            .to_string(),
    ];
    match emit_guarded(&template, def, &lines) {
        Ok(patch) => Site {
            kind: "experts-gate",
            name: name.to_string(),
            line,
            verdict: "patched",
            reason: None,
            detail: String::new(),
            // Bound where it runs (the default is another module's): see the module docs.
            original_sha256: None,
            patch: Some(patch),
            lowered: [
                ("activation".to_string(), resolved.lowered("act_fn")),
                ("act".to_string(), "self.act_fn".to_string()),
                (
                    "gate".to_string(),
                    "transformers.integrations.moe._default_apply_gate (checked at install)"
                        .to_string(),
                ),
            ]
            .into(),
        },
        Err(e) => refuse("mlp-emit-invalid", e),
    }
}

/// The verdict on an experts class defining its own `_apply_gate(self, gate_up)` in the
/// module: patched when the body is the default gate's product, plain or with the SwiGLU clamps
/// (`gate, up = gate_up.chunk(2, dim=-1)`; the gate clamped at `max=self.<limit>` before the
/// activation, or its output after it; `up.clamp(min=-self.<limit>, max=self.<limit>)`;
/// `return act(gate) * up`, the activation `self.<act>` or torch's functional SiLU), its own
/// body the fallback, bound by its hash like an MLP's forward.
fn own_gate_site(
    defs: &ModuleDefs<'_>,
    class: &StmtClassDef,
    owner: &StmtClassDef,
    gate: &StmtFunctionDef,
) -> Site {
    let name = class.name.as_str();
    let line = defs.line(class);
    let refuse = |reason, detail: String| Site::refused("experts-gate", name, line, reason, detail);
    let owner_name = owner.name.as_str();
    if owner_name != name {
        return refuse(
            "experts-gate-custom",
            format!("{name} inherits {owner_name}._apply_gate, which is not on the class itself"),
        );
    }
    let param = match plain_parameters(gate, true).as_deref() {
        Some([(p, false)]) if gate.decorator_list.is_empty() => p.clone(),
        _ => {
            return refuse(
                "experts-gate-custom",
                format!("{name}._apply_gate does not take exactly one input, or is decorated"),
            );
        }
    };
    let Some(gated) = packed::match_gate(body_without_docstring(gate), &param) else {
        return refuse(
            "experts-gate-custom",
            format!(
                "{name}._apply_gate is not act(gate) * up of gate_up's halves, plain or with the SwiGLU clamps (the gate at max=self.<limit> only, before or after the activation, up at min=-self.<limit>, max=self.<limit>, one attribute)"
            ),
        );
    };
    let guard = match super::act_guard(defs, class, gated.act, &param) {
        Ok(g) => g,
        Err((reason, detail)) => return refuse(reason, detail),
    };
    let lines = [
        format!("if {}{}:", super::limit_guard(gated.clamp), guard.test()),
        format!(
            "    # forward-rewrite: the experts' fused {} on the packed gate_up{}, recomputed in backward",
            super::read_what(&gated),
            if gated.interleaved() {
                " (gate and up its interleaved columns)"
            } else {
                ""
            }
        ),
        format!(
            "    return forward_rewrite.gated_mlp_act_packed({param}, {}{}{})",
            guard.arguments(),
            super::clamp_arguments(gated.clamp),
            super::layout_argument(&gated)
        ),
    ];
    match emit_guarded(defs.source, gate, &lines) {
        Ok(patch) => {
            let mut lowered: std::collections::BTreeMap<String, String> = [
                ("activation".to_string(), guard.lowered.clone()),
                ("act".to_string(), guard.act.clone()),
                (
                    "gate".to_string(),
                    format!("{name}._apply_gate (the class's own)"),
                ),
            ]
            .into();
            lowered.extend(guard.lowered_alpha());
            lowered.extend(super::clamp_lowered(gated.clamp));
            lowered.extend(super::layout_lowered(&gated));
            Site {
                kind: "experts-gate",
                name: name.to_string(),
                line,
                verdict: "patched",
                reason: None,
                detail: String::new(),
                original_sha256: Some(function_sha256(defs.source, gate)),
                patch: Some(patch),
                lowered,
            }
        }
        Err(e) => refuse("mlp-emit-invalid", e),
    }
}

/// The `experts-forward` site of an experts class whose gate site is `gate`: patched when the
/// gate is (the op computes the gate's fused product) and the decorator leaves out the bias
/// and the post-expert norm that `forward_rewrite.moe_experts` does not compute.
pub(super) fn forward_site(class: &StmtClassDef, gate: &Site) -> Site {
    let name = class.name.as_str();
    let refuse =
        |reason, detail: String| Site::refused("experts-forward", name, gate.line, reason, detail);
    if gate.verdict != "patched" {
        return refuse(
            "experts-forward-gate",
            format!(
                "{name}: the gate site is refused ({})",
                gate.reason.unwrap_or_default()
            ),
        );
    }
    let call = decorator(class).flatten();
    for option in ["has_bias", "has_post_expert_norm"] {
        let set = call.is_some_and(|c| {
            c.arguments.keywords.iter().any(|k| {
                k.arg.as_ref().is_some_and(|a| a.as_str() == option)
                    && matches!(&k.value, Expr::BooleanLiteral(b) if b.value)
            })
        });
        if set {
            return refuse(
                "experts-forward-options",
                format!(
                    "{name}: {option}=True, which forward_rewrite.moe_experts does not compute"
                ),
            );
        }
    }
    if gate.lowered.get("layout").map(String::as_str) == Some("interleaved") {
        return refuse(
            "experts-forward-options",
            format!(
                "{name}: the gate reads gate_up as interleaved pairs, which forward_rewrite.moe_experts does not compute (it takes the halves)"
            ),
        );
    }
    let mut lowered = gate.lowered.clone();
    lowered.insert(
        "experts".to_string(),
        "transformers.integrations.moe.grouped_mm_experts_forward (checked at install) -> forward_rewrite.moe_experts".to_string(),
    );
    Site {
        kind: "experts-forward",
        name: name.to_string(),
        line: gate.line,
        verdict: "patched",
        reason: None,
        detail: String::new(),
        original_sha256: None,
        patch: None,
        lowered,
    }
}

/// Whether a gate function's source (as `inspect.getsource` gives it) is the form
/// [`DEFAULT_GATE`] stands for: `(self, x)`, `gate, up = x.chunk(2, dim=-1)`, `return
/// self.act_fn(gate) * up`, whatever the names.
pub fn gate_function_ok(text: &str) -> bool {
    let Ok(parsed) = ParsedSource::parse(crate::hash::dedent(text)) else {
        return false;
    };
    let [Stmt::FunctionDef(def)] = &parsed.suite()[..] else {
        return false;
    };
    let Some(params) = plain_parameters(def, false) else {
        return false;
    };
    let [(this, false), (x, false)] = params.as_slice() else {
        return false;
    };
    this == "self"
        && def.decorator_list.is_empty()
        && packed::match_gate(body_without_docstring(def), x).is_some_and(|g| {
            g.clamp.is_none()
                && !g.interleaved()
                && matches!(g.act, Act::Module(a) if a == "act_fn")
        })
}
