//! The `gated-mlp` pass: gated MLP classes rewritten so that `act(gate) * up` is one fused
//! op (`forward_rewrite.gated_mlp_act`, which recomputes the activation in backward).
//!
//! Sites: the classes named `*MLP` that the model class reaches in its module. A site is
//! patched when its `forward(self, x)` is exactly `self.<down>(self.<act>(self.<gate>(x)) *
//! self.<up>(x))` (either factor order; returned directly or through one name), or the
//! packed form of Phi-3 (`gate, up = self.<gate_up>(x).chunk(2, dim=-1)`, lowered to
//! `forward_rewrite.gated_mlp_act_packed`; see `packed.rs`), or, in any other forward, when
//! the product `self.<act>(self.<gate>(x)) * self.<up>(x)` occurs once in the forward's first
//! statement (an assignment or a return, binding nothing inside: `x` there is the input), with
//! whatever follows (dropout, a scale, the down projection later): that product alone is
//! replaced, in place, by a guarded conditional expression (`fused if guard else product`),
//! and the rest of the forward is left as it is. The activation is torch's functional SiLU
//! called in place (`F.silu(...)`, LFM2's form: the alias checked against the module's
//! imports, guarded by `fusion_guard.gated_function`), or `self.<act>`, and its
//! `__init__` assigns `self.<act>` a SiLU or tanh-GELU: statically (`ACT2FN["silu"]`,
//! `nn.SiLU()`, ...) or `ACT2FN[config.hidden_act]`, which the run-time guard resolves on
//! the module object on every call (`fusion_guard.gated_act`: anything else runs stock).
//! The emitted call passes the projections' outputs as call expressions, temporaries that
//! nothing else reads, so it also passes `overwrite_inputs=True` (the backward writes the
//! gradients over them: one activation-sized allocation less at the MLP's backward peak).
//!
//! The clamped SwiGLU (DeepSeek-V4, GLM-5-Next, HY-V4: `gate.clamp(max=self.<limit>)`, then
//! `act(gate) * up.clamp(min=-self.<limit>, max=self.<limit>)`; Step-3.7: the activation's
//! output clamped instead of the gate) is read by `packed.rs`'s interpreter in either layout,
//! whatever the statements' order, and lowered with `limit=` (and
//! `clamp_after_activation=True`): the limit is one `self` attribute, read on every call by
//! `fusion_guard.swiglu_limit` (a real number > 0, inf allowed, else stock) in front of the
//! activation guard. A clamp on one side only, two attributes, a literal or another bound is
//! refused with the reason the form would have without it.
//!
//! GPT-OSS's and MiniMax-M3's SwiGLU (`swiglu_oai`: `glu = gate * torch.sigmoid(gate *
//! self.<alpha>)`, `(up + 1) * glu`, with the clamps above) is read by the same interpreter, on
//! two projections, the halves of a packed one, or its interleaved pairs (`x[..., ::2]`,
//! `x[..., 1::2]`, lowered with `interleaved=True`), `torch` bound by `import torch` alone. It
//! has no activation module: the fused call passes `activation="swiglu_oai", alpha=_fr_alpha`,
//! the alpha read on every call by `fusion_guard.swiglu_alpha` (a finite real number, else
//! stock) inside `fusion_guard.gated_oai`, which checks the input and the module's train mode
//! and counts the fused path, after the limit guard.
//!
//! MoE experts classes (`@use_experts_implementation`) the model reaches are sites too: their
//! gate (`_apply_gate`: transformers' default, or the class's own when it is the default's
//! product, the clamped SwiGLU or `swiglu_oai`) becomes the packed fused product under the
//! `grouped_mm` / `batched_mm` experts implementations; see `experts.rs`.

use ruff_python_ast::{Expr, ExprCall, Operator, Stmt, StmtClassDef};

use crate::audit::PassReport;
use crate::passes::fusion_common::{
    self, ModuleDefs, Site, body_without_docstring, emit_guarded, function_sha256,
    is_already_patched, plain_parameters,
};
use crate::passes::{Pass, PassInput};
use crate::syntax::self_attribute;

pub const PASS: Pass = Pass {
    name: "gated-mlp",
    summary: "gated MLP classes the model reaches -> forward_rewrite.gated_mlp_act (guarded)",
    reasons: REASONS,
    analyze,
};

pub const REASONS: &[(&str, &str)] = &[
    (
        "no-mlp-class",
        "The model class reaches no `*MLP` class nor `@use_experts_implementation` experts class in its module (or the module is not known).",
    ),
    (
        "experts-options",
        "The experts class's `@use_experts_implementation(...)` sets `has_gate=False`, `is_concatenated=False` (gate and up interleaved) while the class's own `_apply_gate` does not read them as interleaved pairs (`gate_up[..., ::2]`, `gate_up[..., 1::2]`, GPT-OSS's) in a form this pass knows, another experts interface, or a non-literal option.",
    ),
    (
        "experts-gate-custom",
        "The experts class's own `_apply_gate` (or one it inherits from a base class of the module) is neither the default gate's product, nor the clamped SwiGLU (`gate.clamp(max=self.<limit>)` before the activation, or on its output, with `up.clamp(min=-self.<limit>, max=self.<limit>)`, one attribute), nor GPT-OSS's / MiniMax-M3's `(up + 1) * glu` with `glu = gate * torch.sigmoid(gate * self.<alpha>)` and those clamps, on the halves or the interleaved pairs: a float32 upcast, a two-argument activation, a clamp on one side only, `up + 2`, a literal alpha, the gate taken from the odd columns, ...; or it takes other parameters or is decorated.",
    ),
    (
        "experts-forward-gate",
        "An `experts-forward` site (the experts' `grouped_mm` implementation replaced by `forward_rewrite.moe_experts`) whose experts class's gate site is refused: the op computes the gate's fused product, so it goes only where that product is patched.",
    ),
    (
        "experts-forward-options",
        "The experts class's `@use_experts_implementation(...)` sets `has_bias=True` or `has_post_expert_norm=True`, or its gate reads gate_up as interleaved pairs, which `forward_rewrite.moe_experts` does not compute (its gate site may still be patched).",
    ),
    (
        "mlp-forward-elsewhere",
        "The MLP class's `forward` is not defined in the module.",
    ),
    (
        "mlp-already-patched",
        "The MLP's `forward` already calls `forward_rewrite`.",
    ),
    (
        "mlp-signature",
        "The `forward` takes other than exactly one input besides `self`.",
    ),
    (
        "mlp-packed",
        "The gate and up projections are one packed projection split with `chunk` (or into interleaved pairs, `[..., ::2]` and `[..., 1::2]`), but the forward is not `down(act(gate) * up)` with `gate, up = gate_up(x).chunk(2, dim=-1)`, plain or with the SwiGLU clamps, nor MiniMax-M3's clamped `down((up + 1) * glu)` with `glu = gate * torch.sigmoid(gate * self.<alpha>)` (the gate the second half, dropout, other clamps, `up + 2`, a literal alpha, an adapter added, ...).",
    ),
    (
        "mlp-form-unknown",
        "The `forward` is not `down(act(gate(x)) * up(x))`, plain or with the SwiGLU clamps (`gate.clamp(max=self.<limit>)` before the activation, or on its output, with `up.clamp(min=-self.<limit>, max=self.<limit>)`, one attribute), and its first statement does not hold that product once (no gate, the product after a statement that may rebind `x`, a clamp on one side only or with two attributes or a literal, a non-`self` module, ...): matched in part, never approximated.",
    ),
    (
        "mlp-activation-unsupported",
        "`__init__` assigns the activation statically to something other than SiLU or tanh-GELU (`ACT2FN[\"gelu\"]`, `nn.GELU()`, ...).",
    ),
    (
        "mlp-activation-unknown",
        "`__init__` assigns the activation in a form neither resolved statically nor guardable (`ACT2FN[...]`) or not at all, or the forward calls a `.silu` not known to be torch.nn.functional.silu (its alias not imported as such, or bound otherwise too), or reads `torch.sigmoid` (GPT-OSS's / MiniMax-M3's SwiGLU) with `torch` not bound by `import torch` alone.",
    ),
    (
        "mlp-emit-invalid",
        "The emitted forward does not re-parse as one patched function (a bug in this tool).",
    ),
];

fn analyze(input: &PassInput<'_, '_>) -> PassReport {
    let none = |detail| fusion_common::report(vec![], "no-mlp-class", detail);
    let Some(module) = input.module else {
        return none("the module is not known");
    };
    let defs = ModuleDefs::of(module);
    let Some(start) = fusion_common::start(input, &defs) else {
        return none("the class is not defined in the module");
    };
    let sites = defs
        .reachable(start.name.as_str())
        .into_iter()
        .flat_map(|c| {
            if experts::is_experts_class(c) {
                let gate = experts::experts_site(&defs, c);
                let forward = experts::forward_site(c, &gate);
                vec![gate, forward]
            } else if c.name.as_str().to_ascii_lowercase().ends_with("mlp") {
                vec![mlp_site(&defs, c)]
            } else {
                vec![]
            }
        })
        .collect();
    fusion_common::report(
        sites,
        "no-mlp-class",
        "the model reaches no *MLP class nor MoE experts class in its module",
    )
}

/// `<callee>(<arg>)` with exactly one positional, unstarred argument: (callee, arg).
fn one_arg_call(expr: &Expr) -> Option<(&Expr, &Expr)> {
    let Expr::Call(ExprCall {
        func, arguments, ..
    }) = expr
    else {
        return None;
    };
    match (&arguments.args[..], arguments.keywords.is_empty()) {
        ([arg], true) if !matches!(arg, Expr::Starred(_)) => Some((&**func, arg)),
        _ => None,
    }
}

/// `self.<name>(<arg>)` with one positional argument: (name, arg).
fn self_call(expr: &Expr) -> Option<(&str, &Expr)> {
    let (func, arg) = one_arg_call(expr)?;
    Some((self_attribute(func)?, arg))
}

fn is_name(expr: &Expr, name: &str) -> bool {
    matches!(expr, Expr::Name(n) if n.id.as_str() == name)
}

/// The forms lowered: the whole forward with separate gate and up projections, or read by
/// `packed.rs` (one packed projection, or either layout with the SwiGLU clamps), or the
/// product alone inside the forward's first statement.
enum Lowering<'a> {
    Split(Matched<'a>),
    Read(packed::Out<'a>),
    Inline(&'a Expr, Product<'a>),
}

/// The attributes of `self.<down>(self.<act>(self.<gate>(x)) * self.<up>(x))`.
struct Matched<'a> {
    down: &'a str,
    product: Product<'a>,
}

/// The attributes of `act(self.<gate>(x)) * self.<up>(x)` (either factor order).
struct Product<'a> {
    act: Act<'a>,
    gate: &'a str,
    up: &'a str,
}

/// The activation of a matched product: a module attribute, `self.<act>(...)`, resolved from
/// `__init__` and checked at run time; or torch's functional SiLU called directly
/// (`F.silu(...)`, LFM2's form), given as the callee's dotted name and checked against the
/// module's imports; or GPT-OSS's / MiniMax-M3's `swiglu_oai` written out (`(up + 1) * gate *
/// torch.sigmoid(gate * self.<alpha>)`, read by `packed.rs`), by its alpha attribute.
#[derive(Clone, Copy)]
enum Act<'a> {
    Module(&'a str),
    Function(&'a Expr),
    Oai(&'a str),
}

/// The run-time guard of a product's activation, and what it binds for the fused call.
struct ActGuard {
    /// The guard call (None: stock): the activation's name, or for `swiglu_oai` its alpha.
    call: String,
    /// `swiglu_oai`'s alpha attribute, or None (the guard binds the activation).
    alpha: Option<String>,
    /// What the audit reports as lowered (`activation`).
    lowered: String,
    /// The activation as the source writes it (`act`: `self.act_fn`, `F.silu`, `swiglu_oai`).
    act: String,
}

impl ActGuard {
    /// The condition binding `_fr_act` (or `_fr_alpha`), true when the fused path may run.
    fn test(&self) -> String {
        let name = if self.alpha.is_some() {
            "_fr_alpha"
        } else {
            "_fr_act"
        };
        format!("({name} := {}) is not None", self.call)
    }

    /// The fused op's activation arguments.
    fn arguments(&self) -> &'static str {
        if self.alpha.is_some() {
            "activation=\"swiglu_oai\", alpha=_fr_alpha"
        } else {
            "activation=_fr_act"
        }
    }

    /// What the audit reports beyond the activation: `alpha` (`self.<alpha>`).
    fn lowered_alpha(&self) -> Option<(String, String)> {
        self.alpha
            .as_ref()
            .map(|a| ("alpha".to_string(), format!("self.{a}")))
    }
}

/// The guard of `act` applied to `x` in a method of `class` (whose `__init__` assigns a
/// module activation), or Err(reason) refused: a `.silu` or a `torch.sigmoid` whose module
/// name is not known to be torch's. `swiglu_oai`'s guard reads the alpha attribute through
/// `fusion_guard.swiglu_alpha` before `fusion_guard.gated_oai` (which counts the fused paths it
/// lets through) sees the module and `x`.
fn act_guard(
    defs: &ModuleDefs<'_>,
    class: &StmtClassDef,
    act: Act<'_>,
    x: &str,
) -> Result<ActGuard, (&'static str, String)> {
    match act {
        Act::Module(name) => {
            let resolved = activation(defs, class, name)?;
            Ok(ActGuard {
                call: resolved.guard_call(name, x),
                alpha: None,
                lowered: resolved.lowered(name),
                act: format!("self.{name}"),
            })
        }
        Act::Function(callee) if is_torch_silu(defs, callee) => {
            let text = defs.source.slice(callee);
            Ok(ActGuard {
                call: function_guard(text, x),
                alpha: None,
                lowered: "silu".to_string(),
                act: text.to_string(),
            })
        }
        Act::Function(callee) => Err((
            "mlp-activation-unknown",
            format!(
                "{} is not known to be torch.nn.functional.silu (the module binds its name otherwise or more than once)",
                defs.source.slice(callee)
            ),
        )),
        Act::Oai(alpha) if torch_bound(defs) => Ok(ActGuard {
            call: format!(
                "forward_rewrite.fusion_guard.gated_oai(self, {x}, forward_rewrite.fusion_guard.swiglu_alpha(self.{alpha}))"
            ),
            alpha: Some(alpha.to_string()),
            lowered: "swiglu_oai".to_string(),
            act: "swiglu_oai".to_string(),
        }),
        Act::Oai(_) => Err((
            "mlp-activation-unknown",
            "the gate reads torch.sigmoid, but the module's torch is not bound by `import torch` alone"
                .to_string(),
        )),
    }
}

/// Whether the module's `torch` is torch: bound by one `import torch` and nothing else.
fn torch_bound(defs: &ModuleDefs<'_>) -> bool {
    fusion_common::bound_only_by(defs, "torch", |b| {
        matches!(
            b,
            fusion_common::ImportBinding::Import {
                module: "torch",
                aliased: false
            }
        )
    })
}

/// `<callee>(<arg>)` with one positional argument, the callee a dotted name ending in `.silu`.
fn silu_call(expr: &Expr) -> Option<(&Expr, &Expr)> {
    let (func, arg) = one_arg_call(expr)?;
    crate::syntax::dotted_name(func)
        .is_some_and(|n| n.ends_with(".silu"))
        .then_some((func, arg))
}

/// The guard for torch's functional SiLU given as `function` (source text), applied to `x`.
fn function_guard(function: &str, x: &str) -> String {
    format!("forward_rewrite.fusion_guard.gated_function(self, {function}, {x})")
}

/// Whether the dotted callee `F.silu` (any alias) or `torch.nn.functional.silu` is torch's:
/// the alias bound at the module's top level only by `import torch.nn.functional as F` or
/// `from torch.nn import functional as F`, and by nothing else there.
fn is_torch_silu(defs: &ModuleDefs<'_>, callee: &Expr) -> bool {
    let Some(name) = crate::syntax::dotted_name(callee) else {
        return false;
    };
    let Some(alias) = name.strip_suffix(".silu") else {
        return false;
    };
    if alias == "torch.nn.functional" {
        return true;
    }
    if alias.contains('.') {
        return false;
    }
    fusion_common::bound_only_by(defs, alias, fusion_common::is_torch_functional)
}

fn match_product<'a>(expr: &'a Expr, param: &str) -> Option<Matched<'a>> {
    let (down, product) = self_call(expr)?;
    Some(Matched {
        down,
        product: match_gated(product, param)?,
    })
}

/// The one gated product in the forward's first statement, when that statement is an
/// assignment or a return that binds no name inside and opens no scope (so `x` at the
/// product is the forward's input, the value the guard inspects): (the product, its parts).
fn match_inline<'a>(body: &'a [Stmt], param: &str) -> Option<(&'a Expr, Product<'a>)> {
    let first = body.first()?;
    let simple = matches!(
        first,
        Stmt::Assign(_) | Stmt::AnnAssign(_) | Stmt::Return(_)
    );
    if !simple || crate::syntax::binds_or_scopes_inside(first) {
        return None;
    }
    let mut found = crate::syntax::exprs_in_stmt(first)
        .into_iter()
        .filter_map(|e| Some((e, match_gated(e, param)?)));
    let one = found.next()?;
    found.next().is_none().then_some(one)
}

fn match_gated<'a>(product: &'a Expr, param: &str) -> Option<Product<'a>> {
    let Expr::BinOp(bin) = product else {
        return None;
    };
    if bin.op != Operator::Mult {
        return None;
    }
    let gated = |e: &'a Expr| -> Option<(Act<'a>, &'a str)> {
        let (act, inner) = match self_call(e) {
            Some((act, inner)) => (Act::Module(act), inner),
            None => {
                let (callee, inner) = silu_call(e)?;
                (Act::Function(callee), inner)
            }
        };
        let (gate, x) = self_call(inner)?;
        is_name(x, param).then_some((act, gate))
    };
    let plain = |e: &'a Expr| -> Option<&'a str> {
        let (up, x) = self_call(e)?;
        is_name(x, param).then_some(up)
    };
    let ((act, gate), up) = match (gated(&bin.left), plain(&bin.right)) {
        (Some(g), Some(u)) => (g, u),
        _ => (gated(&bin.right)?, plain(&bin.left)?),
    };
    Some(Product { act, gate, up })
}

/// How `__init__` assigns `self.<act>`.
#[derive(Clone, Copy)]
pub(super) enum Resolution {
    /// An activation module known statically (`ACT2FN["silu"]`, `nn.SiLU()`, ...).
    Static(&'static str),
    /// `ACT2FN[config.hidden_act]`: the guard resolves the module on every call.
    Guarded,
    /// torch's functional SiLU held as an attribute (`self.act_fn = F.silu`, LFM2-MoE's
    /// experts): the guard checks its identity on every call.
    Function,
}

impl Resolution {
    /// The guard expression for `self.<act>` applied to `x`, binding nothing: the
    /// activation's name, or None (stock).
    pub(super) fn guard_call(self, act: &str, x: &str) -> String {
        match self {
            Resolution::Function => function_guard(&format!("self.{act}"), x),
            Resolution::Static(_) | Resolution::Guarded => {
                format!("forward_rewrite.fusion_guard.gated_act(self.{act}, {x})")
            }
        }
    }

    /// What the audit reports as lowered.
    pub(super) fn lowered(self, act: &str) -> String {
        match self {
            Resolution::Static(name) => name.to_string(),
            Resolution::Guarded => format!("run-time (self.{act})"),
            Resolution::Function => format!("silu (self.{act} = torch.nn.functional.silu)"),
        }
    }
}

/// How `__init__` assigns `self.<act>`, or Err(reason) refused.
pub(super) fn activation(
    defs: &ModuleDefs<'_>,
    class: &StmtClassDef,
    act: &str,
) -> Result<Resolution, (&'static str, String)> {
    let Some((_, init)) = defs.method_owner(class, "__init__") else {
        return Err((
            "mlp-activation-unknown",
            "no __init__ in the module assigns the activation".to_string(),
        ));
    };
    let mut statements = Vec::new();
    crate::syntax::walk_statements(&init.body, &mut statements);
    let mut values = Vec::new();
    for stmt in statements {
        if let Stmt::Assign(assign) = stmt
            && assign
                .targets
                .iter()
                .any(|t| self_attribute(t) == Some(act))
        {
            values.push(&*assign.value);
        }
    }
    if values.is_empty() {
        return Err((
            "mlp-activation-unknown",
            format!("__init__ does not assign self.{act}"),
        ));
    }
    let mut statics = Vec::new();
    let mut functions = 0;
    for value in values.iter().copied() {
        let text = defs.source.slice(value);
        match classify(value) {
            Kind::Static(name) => statics.push(name),
            Kind::Guarded => {}
            Kind::Function if is_torch_silu(defs, value) => functions += 1,
            Kind::Unsupported => {
                return Err((
                    "mlp-activation-unsupported",
                    format!("self.{act} = {text} is neither SiLU nor tanh-GELU"),
                ));
            }
            Kind::Function | Kind::Unknown => {
                return Err((
                    "mlp-activation-unknown",
                    format!("self.{act} = {text} is not resolved"),
                ));
            }
        }
    }
    if functions > 0 {
        // A function and a module in different branches need different guards.
        return if functions == values.len() {
            Ok(Resolution::Function)
        } else {
            Err((
                "mlp-activation-unknown",
                format!("self.{act} is assigned both torch.nn.functional.silu and a module"),
            ))
        };
    }
    Ok(match statics.as_slice() {
        [one] => Resolution::Static(one),
        _ => Resolution::Guarded,
    })
}

enum Kind {
    Static(&'static str),
    Guarded,
    /// `<alias>.silu` (not called): a functional SiLU, if the alias is torch's.
    Function,
    Unsupported,
    Unknown,
}

fn classify(value: &Expr) -> Kind {
    match value {
        Expr::Subscript(sub) if is_name(&sub.value, "ACT2FN") => match &*sub.slice {
            Expr::StringLiteral(s) => match s.value.to_str() {
                "silu" | "swish" => Kind::Static("silu"),
                "gelu_pytorch_tanh" => Kind::Static("gelu_tanh"),
                _ => Kind::Unsupported,
            },
            _ => Kind::Guarded,
        },
        Expr::Call(call) => {
            let name = crate::syntax::dotted_name(&call.func).unwrap_or_default();
            match name.as_str() {
                "nn.SiLU" | "torch.nn.SiLU" if call.arguments.is_empty() => Kind::Static("silu"),
                "nn.GELU" | "torch.nn.GELU" => {
                    let tanh = call.arguments.args.is_empty()
                        && call.arguments.keywords.len() == 1
                        && call.arguments.keywords[0]
                            .arg
                            .as_ref()
                            .is_some_and(|a| a.as_str() == "approximate")
                        && matches!(&call.arguments.keywords[0].value,
                            Expr::StringLiteral(s) if s.value.to_str() == "tanh");
                    if tanh {
                        Kind::Static("gelu_tanh")
                    } else {
                        Kind::Unsupported
                    }
                }
                "nn.ReLU" | "nn.Tanh" | "nn.Sigmoid" | "torch.nn.ReLU" => Kind::Unsupported,
                _ => Kind::Unknown,
            }
        }
        Expr::Attribute(_)
            if crate::syntax::dotted_name(value).is_some_and(|n| n.ends_with(".silu")) =>
        {
            Kind::Function
        }
        _ => Kind::Unknown,
    }
}

/// The verdict on one MLP class.
pub(crate) fn mlp_site(defs: &ModuleDefs<'_>, class: &StmtClassDef) -> Site {
    let name = class.name.as_str();
    let line = defs.line(class);
    let refuse = |reason, detail: String| Site::refused("class", name, line, reason, detail);
    let Some((owner, forward)) = defs.method_owner(class, "forward") else {
        return refuse(
            "mlp-forward-elsewhere",
            format!("{name} defines no forward in this module"),
        );
    };
    if owner.name.as_str() != name {
        return refuse(
            "mlp-forward-elsewhere",
            format!("{name} runs {}.forward", owner.name),
        );
    }
    if is_already_patched(forward) {
        return refuse(
            "mlp-already-patched",
            format!("{name}.forward calls forward_rewrite"),
        );
    }
    let param = match plain_parameters(forward, true).as_deref() {
        Some([(p, false)]) => p.clone(),
        _ => {
            return refuse(
                "mlp-signature",
                format!("{name}.forward does not take exactly one input"),
            );
        }
    };
    let body = body_without_docstring(forward);
    let returned = match body {
        [Stmt::Return(ret)] => ret.value.as_deref(),
        [Stmt::Assign(assign), Stmt::Return(ret)] => {
            match (&assign.targets[..], ret.value.as_deref()) {
                ([Expr::Name(target)], Some(Expr::Name(back))) if target.id == back.id => {
                    Some(&*assign.value)
                }
                _ => None,
            }
        }
        _ => None,
    };
    // The interpreter's reading, where it goes beyond the templates: the packed layout, or
    // the clamps (the unclamped split layout stays the templates' and the inline form's).
    let read = packed::match_body(body, &param)
        .filter(|out| out.gated.packed().is_some() || out.gated.clamp.is_some());
    let source = defs.source.slice(forward);
    let clamps = if source.contains(".clamp(") {
        ", and its clamps are not the SwiGLU ones (the gate at max=self.<limit> only, before or after the activation, up at min=-self.<limit>, max=self.<limit>, one attribute)"
    } else {
        ""
    };
    let lowering = match returned.and_then(|e| match_product(e, &param)) {
        Some(m) => Lowering::Split(m),
        None => match read {
            Some(out) => Lowering::Read(out),
            None if let Some((expr, product)) = match_inline(body, &param) => {
                Lowering::Inline(expr, product)
            }
            None if source.contains("chunk(") || source.contains("::2]") => {
                return refuse(
                    "mlp-packed",
                    format!(
                        "{name}.forward splits a packed gate_up projection, but not as down(act(gate) * up) with gate, up = gate_up(x).chunk(2, dim=-1) (or gate_up(x)[..., ::2], gate_up(x)[..., 1::2]){clamps}"
                    ),
                );
            }
            None => {
                return refuse(
                    "mlp-form-unknown",
                    format!(
                        "{name}.forward is not down(act(gate(x)) * up(x)), nor does its first statement hold act(gate(x)) * up(x) once{clamps}"
                    ),
                );
            }
        },
    };
    let act = match &lowering {
        Lowering::Split(m) => m.product.act,
        Lowering::Read(out) => out.gated.act,
        Lowering::Inline(_, p) => p.act,
    };
    // The guard binding `_fr_act` (the activation, or None: run stock; `_fr_alpha` for
    // `swiglu_oai`), and what the audit reports as lowered.
    let act_guard = match act_guard(defs, owner, act, &param) {
        Ok(g) => g,
        Err((reason, detail)) => return refuse(reason, detail),
    };
    let clamp = match &lowering {
        Lowering::Read(out) => out.gated.clamp,
        _ => None,
    };
    let guard = format!("if {}{}:", limit_guard(clamp), act_guard.test());
    let emitted = match &lowering {
        Lowering::Inline(expr, product) => {
            emit_inline(defs, forward, expr, product, &param, &act_guard.call)
        }
        Lowering::Split(Matched { down, product }) => emit_guarded(
            defs.source,
            forward,
            &[
                guard,
                "    # forward-rewrite: fused act(gate) * up, the activation recomputed in backward; the projections' outputs are temporaries, so backward writes their gradients over them"
                    .to_string(),
                format!(
                    "    return self.{down}({})",
                    fused_call(product, &param)
                ),
            ],
        ),
        Lowering::Read(out) => emit_guarded(
            defs.source,
            forward,
            &[
                guard,
                format!("    {}", read_comment(&out.gated)),
                format!(
                    "    return self.{}({})",
                    out.down,
                    read_call(&out.gated, &param, &act_guard)
                ),
            ],
        ),
    };
    match emitted {
        Ok(patch) => {
            let mut site = refuse("mlp-emit-invalid", String::new());
            site.verdict = "patched";
            site.reason = None;
            site.original_sha256 = Some(function_sha256(defs.source, forward));
            site.patch = Some(patch);
            site.lowered
                .insert("activation".into(), act_guard.lowered.clone());
            site.lowered.extend(act_guard.lowered_alpha());
            site.lowered.extend(clamp_lowered(clamp));
            if let Lowering::Read(out) = &lowering {
                site.lowered.extend(layout_lowered(&out.gated));
            }
            site
        }
        Err(e) => refuse("mlp-emit-invalid", e),
    }
}

/// The limit guard in front of the activation guard (which counts the fused paths it lets
/// through, so it runs last): `(_fr_limit := swiglu_limit(self.<limit>)) is not None and `, or
/// nothing without clamps.
fn limit_guard(clamp: Option<packed::Clamped<'_>>) -> String {
    clamp.map_or_else(String::new, |c| {
        format!(
            "(_fr_limit := forward_rewrite.fusion_guard.swiglu_limit(self.{})) is not None and ",
            c.limit
        )
    })
}

/// The fused op's clamp arguments: `, limit=_fr_limit` (and `, clamp_after_activation=True`).
fn clamp_arguments(clamp: Option<packed::Clamped<'_>>) -> &'static str {
    match clamp {
        None => "",
        Some(c) if c.after_activation => ", limit=_fr_limit, clamp_after_activation=True",
        Some(_) => ", limit=_fr_limit",
    }
}

/// `, interleaved=True` for a packed projection holding gate and up as interleaved pairs.
fn layout_argument(gated: &packed::Gated<'_>) -> &'static str {
    if gated.interleaved() {
        ", interleaved=True"
    } else {
        ""
    }
}

/// What the audit reports of the packed layout: `layout` `interleaved` (GPT-OSS's pairs; the
/// experts op computes halves only, so the `experts-forward` site is refused), else nothing.
fn layout_lowered(gated: &packed::Gated<'_>) -> Option<(String, String)> {
    gated
        .interleaved()
        .then(|| ("layout".to_string(), "interleaved".to_string()))
}

/// What the audit reports of the clamps (the installer reads them for the experts op):
/// `limit` (`self.<limit>`) and `clamp` (`gate before act` or `activation output`).
fn clamp_lowered(clamp: Option<packed::Clamped<'_>>) -> Vec<(String, String)> {
    clamp.map_or_else(Vec::new, |c| {
        vec![
            ("limit".to_string(), format!("self.{}", c.limit)),
            (
                "clamp".to_string(),
                if c.after_activation {
                    "activation output"
                } else {
                    "gate before act"
                }
                .to_string(),
            ),
        ]
    })
}

/// What a gated product read by `packed.rs` computes, for the emitted comments.
fn read_what(gated: &packed::Gated<'_>) -> String {
    match (gated.act, gated.clamp) {
        (_, None) => "act(gate) * up".to_string(),
        (Act::Oai(alpha), Some(c)) => format!(
            "(up.clamp(min=-self.{0}, max=self.{0}) + 1) * g * sigmoid(g * self.{alpha}), g = gate.clamp(max=self.{0})",
            c.limit
        ),
        (_, Some(c)) if c.after_activation => format!(
            "act(gate).clamp(max=self.{0}) * up.clamp(min=-self.{0}, max=self.{0})",
            c.limit
        ),
        (_, Some(c)) => format!(
            "act(gate.clamp(max=self.{0})) * up.clamp(min=-self.{0}, max=self.{0})",
            c.limit
        ),
    }
}

/// Where a packed projection holds gate and up, for the emitted comments.
fn packed_layout(gated: &packed::Gated<'_>) -> &'static str {
    if gated.interleaved() {
        "(gate and up its interleaved columns)"
    } else {
        "(gate its first half)"
    }
}

/// The comment line of a forward read by `packed.rs`.
fn read_comment(gated: &packed::Gated<'_>) -> String {
    if gated.clamp.is_none() {
        return format!(
            "# forward-rewrite: fused act(gate) * up on the packed projection {}, the activation recomputed in backward over the projection's output (a temporary)",
            packed_layout(gated)
        );
    }
    let what = read_what(gated);
    let layout = if gated.packed().is_some() {
        format!("on the packed projection {}", packed_layout(gated))
    } else {
        "of the two projections".to_string()
    };
    format!(
        "# forward-rewrite: fused {what} {layout}, the activation recomputed in backward; the projections' outputs are temporaries, so backward writes their gradients over them"
    )
}

/// The fused call of a forward read by `packed.rs`, with the activation the guard bound to
/// `_fr_act` (or `swiglu_oai`'s alpha to `_fr_alpha`; the limit to `_fr_limit`).
fn read_call(gated: &packed::Gated<'_>, param: &str, guard: &ActGuard) -> String {
    let act = guard.arguments();
    let clamp = clamp_arguments(gated.clamp);
    let layout = layout_argument(gated);
    match (gated.packed(), gated.split()) {
        (Some(gate_up), _) => format!(
            "forward_rewrite.gated_mlp_act_packed(self.{gate_up}({param}), {act}{clamp}{layout}, overwrite_inputs=True)"
        ),
        (None, Some((gate, up))) => format!(
            "forward_rewrite.gated_mlp_act(self.{gate}({param}), self.{up}({param}), {act}{clamp}, overwrite_inputs=True)"
        ),
        (None, None) => unreachable!("packed.rs reads only the two layouts"),
    }
}

/// The fused product of a matched `self.<act>(self.<gate>(x)) * self.<up>(x)`, with the
/// activation the guard bound to `_fr_act`. Its inputs are the projections' outputs, call
/// temporaries nothing else reads, so the backward may write their gradients over them.
fn fused_call(product: &Product<'_>, param: &str) -> String {
    let Product { gate, up, .. } = product;
    format!(
        "forward_rewrite.gated_mlp_act(self.{gate}({param}), self.{up}({param}), activation=_fr_act, overwrite_inputs=True)"
    )
}

/// The forward with its one product (in the first statement) replaced by `(fused if guard
/// else product)`: the guard reads `self.<act>` and the input before either branch runs, the
/// original product is the fallback word for word, and nothing else in the forward changes.
/// Spliced into the module's text and re-parsed, then emitted like the guarded forms (with a
/// comment line in front of the body) so the patch is the function alone, dedented.
fn emit_inline(
    defs: &ModuleDefs<'_>,
    forward: &ruff_python_ast::StmtFunctionDef,
    product_expr: &Expr,
    product: &Product<'_>,
    param: &str,
    guard_call: &str,
) -> Result<String, String> {
    use ruff_text_size::Ranged;
    let text = &defs.source.text;
    let range = product_expr.range();
    let (start, end) = (range.start().to_usize(), range.end().to_usize());
    let conditional = format!(
        "({} if (_fr_act := {guard_call}) is not None else {})",
        fused_call(product, param),
        &text[start..end],
    );
    let spliced = format!("{}{conditional}{}", &text[..start], &text[end..]);
    let module = crate::parse::ParsedSource::parse(spliced).map_err(|e| e.message)?;
    // The forward starts where it did (the splice is inside it): a method of a class of the
    // module's top level.
    let patched = module
        .suite()
        .iter()
        .filter_map(|s| s.as_class_def_stmt())
        .flat_map(|class| class.body.iter())
        .filter_map(|s| s.as_function_def_stmt())
        .find(|f| f.start() == forward.start())
        .ok_or("the spliced forward is not found at its place")?;
    emit_guarded(
        &module,
        patched,
        &["# forward-rewrite: act(gate(x)) * up(x) below is fused when the guard allows (the activation recomputed in backward, the gradients written over the projections' outputs), else runs as written".to_string()],
    )
}

pub mod experts;
mod packed;
#[cfg(test)]
mod tests;
