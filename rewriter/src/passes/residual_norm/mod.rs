//! The `residual-norm` pass: a decoder layer's residual add fused into the RMSNorm after it.
//!
//! Decoder layers end their attention block with `h = r + h`, keep the sum as the next
//! residual (`r = h`), and normalise it (`h = self.<norm>(h)`: Llama's
//! `post_attention_layernorm`, Gemma 2's `pre_feedforward_layernorm`). One kernel can read
//! `r` and `h` once, write the sum and the normalised sum, and in backward add the gradient
//! that reaches the sum through the next residual to the norm's input gradient, instead of
//! three kernels and an accumulation (`forward_rewrite.add_rms_norm`).
//!
//! Sites: the classes the model class reaches in its module whose own `forward` has, among
//! its top-level statements, the three in a row (`h = r + h` or `h = h + r`, `r = h`,
//! `h = self.<norm>(h)`, any names; a norm by its class's name, or its attribute's when the
//! class is not resolved), where `__init__` builds `self.<norm>` from one module class that the
//! `rms-norm` pass patches (Gemma 4's form, which applies its weight under `self.with_scale`,
//! included: the guard tests the attribute per instance), or from one `*RMSNorm` class
//! imported by name from another modeling module (its own module's site decides, at run
//! time). Each run becomes
//! `if (_fr_norm := fusion_guard.residual_norm(self.<norm>, r, h)) is not None: h, r =
//! forward_rewrite.add_rms_norm(r, h, **_fr_norm)` with the three statements, byte for byte,
//! under `else:`. The guard fuses only when the norm module is of a class whose fused
//! `rms-norm` forward is in place (it returns that form's weight, eps, offset and order), the
//! module has no hooks (the fused path does not call it) and both tensors pass the norm's
//! own checks; anything else runs the stock statements.

use ruff_python_ast::{Expr, Operator, Stmt, StmtClassDef, StmtFunctionDef};
use ruff_text_size::{Ranged, TextRange};

use crate::audit::PassReport;
use crate::passes::fusion_common::{
    self, Branch, ModuleDefs, Site, body_without_docstring, emit_branched, function_sha256,
    is_already_patched,
};
use crate::passes::{Pass, PassInput};
use crate::syntax::self_attribute;

pub const PASS: Pass = Pass {
    name: "residual-norm",
    summary: "residual adds before an RMSNorm -> forward_rewrite.add_rms_norm (guarded)",
    reasons: REASONS,
    analyze,
};

pub const REASONS: &[(&str, &str)] = &[
    (
        "no-residual-norm",
        "No class the model reaches in its module has, in its own `forward`, a residual add whose sum is kept and normalised next (`h = r + h`, `r = h`, `h = self.<norm>(h)`), or the module is not known.",
    ),
    (
        "residual-norm-already-patched",
        "The layer's `forward` already calls `forward_rewrite`.",
    ),
    (
        "residual-norm-unresolved",
        "`__init__` does not build `self.<norm>` from one class defined in the module or one `*RMSNorm` class imported by name from another modeling module (several classes, a conditional module, a class from elsewhere).",
    ),
    (
        "residual-norm-norm-refused",
        "The norm's class is not one the `rms-norm` pass patches as a single-input norm (refused there, its reason in the detail, or a gated norm, which `add_rms_norm` does not compute, or an unweighted one, whose weight it would read).",
    ),
    (
        "residual-norm-emit-invalid",
        "The emitted forward does not re-parse as one patched function (a bug in this tool).",
    ),
];

fn analyze(input: &PassInput<'_, '_>) -> PassReport {
    let none = |detail| fusion_common::report(vec![], "no-residual-norm", detail);
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
        .filter_map(|c| layer_site(&defs, c))
        .collect();
    fusion_common::report(
        sites,
        "no-residual-norm",
        "the model reaches no class whose forward adds a residual and normalises the sum",
    )
}

/// One `h = r + h; r = h; h = self.<norm>(h)` run of a forward's top-level statements.
struct Run<'a> {
    hidden: &'a str,
    residual: &'a str,
    norm: &'a str,
    range: TextRange,
}

fn assigned_name(stmt: &Stmt) -> Option<(&str, &Expr)> {
    let Stmt::Assign(a) = stmt else { return None };
    match &a.targets[..] {
        [Expr::Name(n)] => Some((n.id.as_str(), &a.value)),
        _ => None,
    }
}

fn is_name(expr: &Expr, name: &str) -> bool {
    matches!(expr, Expr::Name(n) if n.id.as_str() == name)
}

/// The run starting at `stmts[0]`, if the three statements are one.
fn match_run(stmts: &[Stmt]) -> Option<Run<'_>> {
    let [add, keep, norm, ..] = stmts else {
        return None;
    };
    let (hidden, sum) = assigned_name(add)?;
    let Expr::BinOp(op) = sum else { return None };
    if op.op != Operator::Add {
        return None;
    }
    let residual = match (&*op.left, &*op.right) {
        (Expr::Name(l), r) if is_name(r, hidden) => l.id.as_str(),
        (l, Expr::Name(r)) if is_name(l, hidden) => r.id.as_str(),
        _ => return None,
    };
    if residual == hidden || residual == "self" {
        return None;
    }
    let (kept, value) = assigned_name(keep)?;
    if kept != residual || !is_name(value, hidden) {
        return None;
    }
    let (normed, call) = assigned_name(norm)?;
    let Expr::Call(call) = call else { return None };
    let attr = self_attribute(&call.func)?;
    let [arg] = &call.arguments.args[..] else {
        return None;
    };
    if normed != hidden || !is_name(arg, hidden) || !call.arguments.keywords.is_empty() {
        return None;
    }
    Some(Run {
        hidden,
        residual,
        norm: attr,
        range: TextRange::new(add.start(), norm.end()),
    })
}

fn runs(forward: &StmtFunctionDef) -> Vec<Run<'_>> {
    let body = body_without_docstring(forward);
    (0..body.len())
        .filter_map(|i| match_run(&body[i..]))
        .collect()
}

/// The class a layer builds its norm from.
enum Built<'m> {
    /// Defined in the module: the rms-norm pass's verdict on it is read here.
    Local(&'m StmtClassDef),
    /// An `*RMSNorm` class imported by name from another modeling module (transformers 4.x's
    /// Qwen2-VL: `from ..qwen2.modeling_qwen2 import Qwen2RMSNorm`): its own module's
    /// rms-norm site decides, at run time (the guard fuses only for a class whose fused form
    /// the installer registered).
    Imported { name: &'m str, module: String },
}

impl Built<'_> {
    fn name(&self) -> &str {
        match self {
            Built::Local(class) => class.name.as_str(),
            Built::Imported { name, .. } => name,
        }
    }
}

/// The modeling module a top-level `from <module> import <name>` of the module binds `name`
/// from (`..qwen2.modeling_qwen2`, as written), when it is one.
fn modeling_import(defs: &ModuleDefs<'_>, name: &str) -> Option<String> {
    let mut statements = Vec::new();
    crate::syntax::walk_statements(defs.source.suite(), &mut statements);
    let mut found = None;
    for stmt in statements {
        let Stmt::ImportFrom(import) = stmt else {
            continue;
        };
        for alias in &import.names {
            if alias.asname.as_ref().unwrap_or(&alias.name).as_str() != name {
                continue;
            }
            let module = import.module.as_ref().map_or("", |m| m.as_str());
            let last = module.rsplit('.').next().unwrap_or_default();
            if found.is_some() || !last.starts_with("modeling_") || alias.name.as_str() != name {
                return None; // bound twice, renamed, or not from a modeling module
            }
            found = Some(format!("{}{module}", ".".repeat(import.level as usize)));
        }
    }
    found
}

/// The class `__init__` builds `self.<attr>` from: every assignment to it a call of that one
/// class, defined in the module or imported from another modeling module.
fn built_class<'m>(
    defs: &ModuleDefs<'m>,
    class: &'m StmtClassDef,
    attr: &str,
) -> Result<Built<'m>, String> {
    let Some((_, init)) = defs.method_owner(class, "__init__") else {
        return Err(format!("no __init__ in the module builds self.{attr}"));
    };
    let mut statements = Vec::new();
    crate::syntax::walk_statements(&init.body, &mut statements);
    let mut found: Option<&str> = None;
    for stmt in statements {
        let targets: Vec<&Expr> = match stmt {
            Stmt::Assign(a) => a.targets.iter().collect(),
            Stmt::AnnAssign(a) => vec![&*a.target],
            Stmt::AugAssign(a) => vec![&*a.target],
            _ => continue,
        };
        if !targets.iter().any(|t| self_attribute(t) == Some(attr)) {
            continue;
        }
        let value = match stmt {
            Stmt::Assign(a) => Some(&*a.value),
            Stmt::AnnAssign(a) => a.value.as_deref(),
            _ => None,
        };
        let callee = match value {
            Some(Expr::Call(c)) => match &*c.func {
                Expr::Name(n) => Some(n.id.as_str()),
                _ => None,
            },
            _ => None,
        };
        match (callee, found) {
            (Some(c), None) => found = Some(c),
            (Some(c), Some(f)) if c == f => {}
            _ => {
                let text = defs.source.slice(stmt);
                let first = text.lines().next().unwrap_or_default().trim();
                return Err(format!(
                    "`{first}` is not a call of the one class built for self.{attr}"
                ));
            }
        }
    }
    let name = found.ok_or_else(|| format!("__init__ does not assign self.{attr}"))?;
    if let Some(local) = defs.classes.get(name) {
        return Ok(Built::Local(local));
    }
    match modeling_import(defs, name) {
        Some(module) if name.contains("RMSNorm") => Ok(Built::Imported { name, module }),
        _ => Err(format!(
            "self.{attr} is a {name}, neither a class of the module nor an *RMSNorm imported from a modeling module"
        )),
    }
}

/// The verdict on one class with a run, or None when its own forward has none.
fn layer_site(defs: &ModuleDefs<'_>, class: &StmtClassDef) -> Option<Site> {
    let name = class.name.as_str();
    let forward = crate::syntax::method(&class.body, "forward")?;
    // Each run with the class its norm is built from (resolved once), norms only.
    let found: Vec<_> = runs(forward)
        .into_iter()
        .map(|run| {
            let built = built_class(defs, class, run.norm);
            (run, built)
        })
        .filter(|(run, built)| is_norm_run(run, built))
        .collect();
    if found.is_empty() {
        return None;
    }
    let line = defs.line(class);
    let refuse = |reason, detail: String| Site::refused("class", name, line, reason, detail);
    if is_already_patched(forward) {
        return Some(refuse(
            "residual-norm-already-patched",
            format!("{name}.forward calls forward_rewrite"),
        ));
    }
    let mut branches = Vec::new();
    let mut norms = Vec::new();
    let mut first_refusal = None;
    for (run, built) in &found {
        match norm_class(defs, run.norm, built) {
            Ok(norm) => {
                branches.push(Branch {
                    range: run.range,
                    fused: fused_lines(run, &norm),
                });
                norms.push(format!("{} ({norm})", run.norm));
            }
            Err(refusal) => {
                first_refusal.get_or_insert(refusal);
            }
        }
    }
    if branches.is_empty() {
        let (reason, detail) = first_refusal.expect("a run was found");
        return Some(refuse(reason, detail));
    }
    Some(match emit_branched(defs.source, forward, &branches) {
        Ok(patch) => {
            let mut site = refuse("residual-norm-emit-invalid", String::new());
            site.verdict = "patched";
            site.reason = None;
            if let Some((_, detail)) = first_refusal {
                site.detail = format!(
                    "{} of {} runs left stock: {detail}",
                    found.len() - branches.len(),
                    found.len()
                );
            }
            site.original_sha256 = Some(function_sha256(defs.source, forward));
            site.patch = Some(patch);
            site.lowered.insert("norms".into(), norms.join(", "));
            site
        }
        Err(e) => refuse("residual-norm-emit-invalid", e),
    })
}

/// Whether the run's module is a norm at all (`h = r + h; r = h; h = self.mlp(h)` is not a
/// site): its class's name, or when that is not resolved the attribute's, says "norm".
fn is_norm_run(run: &Run<'_>, built: &Result<Built<'_>, String>) -> bool {
    let says_norm = |name: &str| name.to_ascii_lowercase().contains("norm");
    match built {
        Ok(norm) => says_norm(norm.name()),
        Err(_) => says_norm(run.norm),
    }
}

/// The norm's class name (and the condition its weight is applied under, if any) when the
/// rms-norm pass patches it or it is imported from another modeling module, or the refusal.
fn norm_class<'m>(
    defs: &ModuleDefs<'m>,
    attr: &str,
    built: &Result<Built<'m>, String>,
) -> Result<String, (&'static str, String)> {
    let norm = match built {
        Ok(Built::Local(norm)) => norm,
        Ok(Built::Imported { name, module }) => {
            return Ok(format!(
                "{name} from {module}, fused where its own module's rms-norm site is installed"
            ));
        }
        Err(d) => return Err(("residual-norm-unresolved", d.clone())),
    };
    let site = crate::passes::rms_norm::norm_site(defs, norm);
    let norm_name = norm.name.as_str();
    if site.verdict != "patched" {
        return Err((
            "residual-norm-norm-refused",
            format!(
                "self.{attr} is a {norm_name}, which rms-norm refuses ({}: {})",
                site.reason.unwrap_or("?"),
                site.detail
            ),
        ));
    }
    // A gated norm (`forward(x, gate)`) is patched to `gated_rms_norm`: not the plain norm
    // `add_rms_norm` computes.
    if let Some(gate) = site.lowered.get("gate") {
        return Err((
            "residual-norm-norm-refused",
            format!(
                "self.{attr} is a {norm_name}, a gated norm (rms-norm's {} form, gate {gate}): not the single-input norm add_rms_norm computes",
                site.lowered.get("form").map_or("?", String::as_str)
            ),
        ));
    }
    // An unweighted norm (NanoChat's) has no weight for `add_rms_norm` to read.
    if site.lowered.get("weight").is_some_and(|w| w == "none") {
        return Err((
            "residual-norm-norm-refused",
            format!(
                "self.{attr} is a {norm_name}, an unweighted norm: add_rms_norm reads the norm's weight"
            ),
        ));
    }
    // A form that applies its weight only under `self.<attr>` (Gemma 4's `with_scale`): the
    // installer registers the attribute with the norm's form, and the guard fuses only on
    // instances where it is true (else the stock statements run, the norm's own `if` too).
    // Other conditions (Qwen4Exp's `self.group_size is None`) the residual guard does not test.
    Ok(match site.lowered.get("fused only when") {
        Some(condition) if is_self_attribute(condition) => {
            format!("{norm_name}, fused only when {condition}")
        }
        Some(condition) => {
            return Err((
                "residual-norm-norm-refused",
                format!(
                    "self.{attr} is a {norm_name}, fused by rms-norm only when {condition}: a condition the residual guard does not test (it takes a `self.<attribute>`)"
                ),
            ));
        }
        None => norm_name.to_string(),
    })
}

/// `self.<name>`, as the installer's `_self_attribute` reads a form's condition.
fn is_self_attribute(text: &str) -> bool {
    text.strip_prefix("self.")
        .is_some_and(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

fn fused_lines(run: &Run<'_>, norm: &str) -> Vec<String> {
    let (h, r, n) = (run.hidden, run.residual, run.norm);
    vec![
        format!(
            "if (_fr_norm := forward_rewrite.fusion_guard.residual_norm(self.{n}, {r}, {h})) is not None:"
        ),
        format!("    # forward-rewrite: the residual add fused into self.{n} ({norm})"),
        format!("    {h}, {r} = forward_rewrite.add_rms_norm({r}, {h}, **_fr_norm)"),
    ]
}

#[cfg(test)]
mod tests;
