//! Which base model a class builds and which decoder layer that model stacks, read from the
//! module that defines the class (the scan's side; the runtime reads them off the instance).

use std::collections::{BTreeMap, BTreeSet};

use ruff_python_ast::{Expr, Stmt, StmtClassDef};

use super::reason::Refusal;
use crate::parse::ParsedSource;
use crate::passes::PassInput;
use crate::syntax::{callee_last_name, calls_in_expr, calls_in_stmt, method, self_attribute};

/// Class-name fragments of recurrent or state-space mixers.
pub const RECURRENT: [&str; 13] = [
    "Mamba",
    "SSM",
    "Rwkv",
    "RWKV",
    "Recurrent",
    "LinearAttention",
    "Delta",
    "Lightning",
    "ShortConv",
    "LSTM",
    "Lstm",
    "Retention",
    "Hyena",
];

pub struct Resolved {
    pub base: String,
    pub layer: String,
    /// The attribute the base model holds its layers under (`layers`, GPT-2's `h`).
    pub layers: String,
    pub model_forward: String,
    pub layer_forward: String,
}

fn init_statements(class: &StmtClassDef) -> Vec<&Stmt> {
    let mut out = Vec::new();
    if let Some(init) = method(&class.body, "__init__") {
        crate::syntax::walk_statements(&init.body, &mut out);
    }
    out
}

/// `self.<attr> = value` assignments of `__init__`.
fn self_assignments(class: &StmtClassDef) -> Vec<(&str, &Expr)> {
    init_statements(class)
        .into_iter()
        .filter_map(|s| match s {
            Stmt::Assign(a) => match a.targets.as_slice() {
                [t] => self_attribute(t).map(|n| (n, &*a.value)),
                _ => None,
            },
            Stmt::AnnAssign(a) => self_attribute(&a.target).zip(a.value.as_deref()),
            _ => None,
        })
        .collect()
}

/// Classes of the module that `__init__` calls.
fn builds<'m>(class: &StmtClassDef, classes: &BTreeMap<&'m str, &'m StmtClassDef>) -> Vec<&'m str> {
    let mut out = Vec::new();
    for stmt in init_statements(class) {
        for call in calls_in_stmt(stmt) {
            if let Some(name) = callee_last_name(&call.func)
                && let Some((key, _)) = classes.get_key_value(name)
                && !out.contains(key)
            {
                out.push(*key);
            }
        }
    }
    out
}

/// A vision encoder's class (`HunYuanVLVisionTransformer`, `SiglipVisionModel`), not a
/// language decoder that happens to serve a vision-language model.
fn is_vision_tower(name: &str) -> bool {
    name.contains("Vision") && !name.contains("Text")
}

fn is_module_list(value: &Expr) -> bool {
    matches!(value, Expr::Call(c) if callee_last_name(&c.func) == Some("ModuleList"))
}

/// Where a class holds its layers: `self.layers` (whatever builds it), else the one attribute
/// that `__init__` assigns once, a `ModuleList(...)`, and that the class's forward loops over
/// with `for` (GPT-2's `self.h`, `self.layer`, `self.blocks`). The name and its value.
fn layer_list(class: &StmtClassDef) -> Option<(&str, &Expr)> {
    let assigns = self_assignments(class);
    if let Some(&(name, value)) = assigns.iter().find(|(n, _)| *n == "layers") {
        return Some((name, value));
    }
    let looped = super::model::loop_attributes(method(&class.body, "forward")?);
    let once = |name: &str| assigns.iter().filter(|(n, _)| *n == name).count() == 1;
    let lists: Vec<(&str, &Expr)> = assigns
        .iter()
        .copied()
        .filter(|(n, v)| is_module_list(v) && looped.contains(*n) && once(n))
        .collect();
    match lists.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

fn forward_text(module: &ParsedSource, class: &StmtClassDef) -> Option<String> {
    let def = method(&class.body, "forward")?;
    let start = module.line_start(def.range.start().to_usize());
    Some(module.text[start..def.range.end().to_usize()].to_string())
}

pub fn resolve(input: &PassInput<'_, '_>) -> Result<Resolved, Refusal> {
    let Some(module) = input.module else {
        return Err(Refusal::new(
            "no-base-model",
            "the module that defines the class was not given",
        ));
    };
    let classes: BTreeMap<&str, &StmtClassDef> = module
        .suite()
        .iter()
        .filter_map(|s| match s {
            Stmt::ClassDef(c) => Some((c.name.as_str(), c)),
            _ => None,
        })
        .collect();
    let top_name = input.fused.qualname.as_str();
    if !classes.contains_key(top_name) {
        return Err(Refusal::new(
            "no-base-model",
            format!("{top_name} is not a top-level class of its module"),
        ));
    }
    // Breadth-first over what the class builds, three levels deep.
    let mut seen: BTreeSet<&str> = BTreeSet::from([top_name]);
    let mut frontier = vec![top_name];
    // The classes holding a layer list, and whether it is `self.layers`.
    let mut found: Vec<(&str, bool)> = Vec::new();
    for _ in 0..3 {
        let mut next = Vec::new();
        for name in frontier {
            let class = classes[name];
            let attrs: BTreeSet<&str> = self_assignments(class).iter().map(|(n, _)| *n).collect();
            if attrs.contains("encoder") && attrs.contains("decoder") {
                return Err(Refusal::new(
                    "encoder-decoder",
                    format!("{name} builds `self.encoder` and `self.decoder`"),
                ));
            }
            if let Some((attr, _)) = layer_list(class)
                && name != top_name
            {
                found.push((name, attr == "layers"));
            }
            for b in builds(class, &classes) {
                if seen.insert(b) {
                    next.push(b);
                }
            }
        }
        frontier = next;
    }
    // A vision tower is never the decoder a language-model head reads (HunYuanVL builds its
    // text model where this search does not see it: its vision transformer is no answer).
    found.retain(|(n, _)| !is_vision_tower(n));
    // Classes with `self.layers` first (what the pass always followed); a list under another
    // name counts only where there is none.
    let mut found: Vec<&str> = if found.iter().any(|(_, layers)| *layers) {
        found.iter().filter(|(_, l)| *l).map(|(n, _)| *n).collect()
    } else {
        found.iter().map(|(n, _)| *n).collect()
    };
    if found.len() > 1 {
        found.retain(|n| !n.contains("Encoder"));
    }
    let [base_name] = found.as_slice() else {
        return Err(Refusal::new(
            "no-base-model",
            if found.is_empty() {
                format!(
                    "{top_name} builds no class of its module with a layer list (`self.layers`, or a ModuleList its forward loops over)"
                )
            } else {
                format!("{top_name} builds several: {}", found.join(", "))
            },
        ));
    };
    let base = classes[base_name];
    let (layers, value) = layer_list(base).expect("found by layer_list");
    let mut calls = calls_in_expr(value);
    // `self.layers = nn.ModuleList(layers)`: the calls of the statements that build `layers`.
    let built_from: Vec<&str> = match value {
        Expr::Name(n) => vec![n.id.as_str()],
        Expr::Call(c) => match c.arguments.args.as_ref() {
            [Expr::Name(n)] => vec![n.id.as_str()],
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    if !built_from.is_empty() {
        for stmt in init_statements(base) {
            if matches!(stmt, Stmt::Assign(_) | Stmt::Expr(_) | Stmt::AugAssign(_))
                && built_from
                    .iter()
                    .any(|n| crate::syntax::stmt_mentions(stmt, n))
            {
                calls.extend(calls_in_stmt(stmt));
            }
        }
    }
    let local_callee = |c: &&ruff_python_ast::ExprCall| match &*c.func {
        Expr::Subscript(_) => true,
        Expr::Name(n) => {
            let n = n.id.as_str();
            !classes.contains_key(n)
                && n.chars().next().is_some_and(char::is_lowercase)
                && ![
                    "range",
                    "enumerate",
                    "list",
                    "len",
                    "int",
                    "zip",
                    "getattr",
                    "isinstance",
                ]
                .contains(&n)
        }
        _ => false,
    };
    // A layer class the module defines out of reach (under `if is_xlstm_available():`) but
    // whose name says it is recurrent (xLSTM's `xLSTMBlock`).
    if let Some(n) = calls
        .iter()
        .filter(|c| local_callee(c))
        .filter_map(|c| callee_last_name(&c.func))
        .find(|n| RECURRENT.iter().any(|r| n.contains(r)) && !n.contains("Norm"))
    {
        return Err(Refusal::new(
            "recurrent-layer",
            format!("{base_name}.{layers} holds a {n}"),
        ));
    }
    if calls.iter().any(local_callee) {
        return Err(Refusal::new(
            "hybrid-layers",
            format!(
                "{base_name}.{layers} picks its layer classes at run time (a table or a variable)"
            ),
        ));
    }
    let layer_names: BTreeSet<&str> = calls
        .iter()
        .filter_map(|c| callee_last_name(&c.func))
        .filter(|n| classes.contains_key(n))
        .collect();
    let layer_name = match layer_names.len() {
        1 => *layer_names.iter().next().expect("one"),
        0 => {
            return Err(Refusal::new(
                "no-base-model",
                format!("{base_name}.{layers} is built from no class of the module"),
            ));
        }
        _ => {
            return Err(Refusal::new(
                "hybrid-layers",
                format!(
                    "{base_name}.{layers} holds {}",
                    layer_names.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    };
    let layer = classes[layer_name];
    for stmt in init_statements(layer) {
        for call in calls_in_stmt(stmt) {
            if let Some(n) = callee_last_name(&call.func)
                && RECURRENT.iter().any(|r| n.contains(r))
                && !n.contains("Norm")
            {
                return Err(Refusal::new(
                    "recurrent-layer",
                    format!("{layer_name} builds a {n}"),
                ));
            }
        }
    }
    let Some(model_forward) = forward_text(module, base) else {
        return Err(Refusal::new(
            "no-layer-loop",
            format!("{base_name} defines no forward in its module"),
        ));
    };
    let Some(layer_forward) = forward_text(module, layer) else {
        return Err(Refusal::new(
            "no-residual",
            format!("{layer_name} defines no forward in its module"),
        ));
    };
    Ok(Resolved {
        base: base_name.to_string(),
        layer: layer_name.to_string(),
        layers: layers.to_string(),
        model_forward,
        layer_forward,
    })
}
