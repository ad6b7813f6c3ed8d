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

use ruff_python_ast::{Expr, Stmt, StmtClassDef};

use super::packed;
use crate::parse::ParsedSource;
use crate::passes::fusion_common::{
    ModuleDefs, Site, body_without_docstring, emit_guarded, plain_parameters,
};

/// The decorator that marks an experts class.
pub const DECORATOR: &str = "use_experts_implementation";

/// What the patched `_apply_gate` falls back to: transformers' `_default_apply_gate`, as this
/// pass reads it (the installer checks the running one has this form).
pub const DEFAULT_GATE: &str = "def _apply_gate(self, gate_up_out):
    gate, up = gate_up_out.chunk(2, dim=-1)
    return self.act_fn(gate) * up
";

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

/// Why the decorator's arguments put the gate out of reach: another layout of gate_up
/// (`is_concatenated=False`: interleaved), no gate (`has_gate=False`), another experts
/// interface, or anything not a literal.
fn options_refusal(call: Option<&ruff_python_ast::ExprCall>) -> Option<String> {
    let call = call?;
    if !call.arguments.args.is_empty() {
        return Some("the decorator takes positional arguments".to_string());
    }
    for keyword in &call.arguments.keywords {
        let name = keyword.arg.as_ref().map(|a| a.as_str()).unwrap_or("**");
        let value = match &keyword.value {
            Expr::BooleanLiteral(b) => b.value,
            _ => return Some(format!("{name}= is not a literal")),
        };
        match (name, value) {
            ("is_transposed" | "has_bias" | "has_post_expert_norm", _) => {}
            ("has_gate" | "is_concatenated", true) => {}
            ("has_gate", false) => return Some("has_gate=False: no gated product".into()),
            ("is_concatenated", false) => {
                return Some("is_concatenated=False: gate and up interleaved".into());
            }
            _ => return Some(format!("{name}= is not an option this pass knows")),
        }
    }
    None
}

/// The verdict on one experts class.
pub(super) fn experts_site(defs: &ModuleDefs<'_>, class: &StmtClassDef) -> Site {
    let name = class.name.as_str();
    let line = defs.line(class);
    let refuse = |reason, detail: String| Site::refused("experts-gate", name, line, reason, detail);
    if let Some(detail) = options_refusal(decorator(class).flatten()) {
        return refuse("experts-options", format!("{name}: {detail}"));
    }
    if let Some((owner, _)) = defs.method_owner(class, "_apply_gate") {
        return refuse(
            "experts-gate-custom",
            format!(
                "{}._apply_gate replaces transformers' default gate",
                owner.name.as_str()
            ),
        );
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
            resolved.guard("act_fn", "gate_up_out")
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
        && packed::match_gate(body_without_docstring(def), x) == Some("act_fn")
}
