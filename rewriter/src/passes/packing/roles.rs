//! The roles the facts are about, found through `__init__` assignments and calls: the base
//! model `B` (the submodule whose call feeds the head call in `C.forward`), the wrappers it
//! may be (a forward without a layer loop that calls an inner model: `self.language_model`,
//! `self.encoder`), the loop level (the forward that loops over a `nn.ModuleList` of
//! decoder layers `D`), and the attention modules `A` a layer builds.

use std::collections::HashSet;

use ruff_python_ast::{Expr, ExprCall, Stmt, StmtFunctionDef};

use crate::analyze::ParsedClass;
use crate::syncs::extract::{Submodule, loop_over_submodules};
use crate::syntax::{dotted_name, method, names_in_expr, self_attribute, walk_statements};

use super::flow::{Function, argument};
use super::program::{Class, Found, Module, Program, class_table};

/// The submodule call in `C.forward` whose result feeds the head call: the call and the
/// attribute path (`self.model(...)`: `["model"]`; `self.model.decoder(...)`:
/// `["model", "decoder"]`).
pub(super) fn base_call<'a>(
    forward: &Function<'a>,
    head: &str,
    is_submodule: &dyn Fn(&str) -> bool,
) -> Option<(&'a ExprCall, Vec<String>)> {
    let calls = forward.calls();
    let head_calls: Vec<&ExprCall> = calls
        .iter()
        .copied()
        .filter(|c| self_attribute(&c.func) == Some(head))
        .collect();
    let mut wanted: HashSet<String> = HashSet::new();
    for call in &head_calls {
        for arg in &call.arguments.args {
            wanted.extend(names_in_expr(arg).iter().map(|n| n.id.to_string()));
        }
    }
    // Backward slice over the assignments of the forward, by name.
    let mut statements = Vec::new();
    walk_statements(forward.body(), &mut statements);
    let assignments: Vec<(Vec<String>, &Expr)> = statements
        .iter()
        .filter_map(|stmt| match stmt {
            Stmt::Assign(a) => Some((
                a.targets
                    .iter()
                    .flat_map(|t| names_in_expr(t).into_iter().map(|n| n.id.to_string()))
                    .collect(),
                a.value.as_ref(),
            )),
            Stmt::AnnAssign(a) => a.value.as_deref().map(|v| {
                (
                    names_in_expr(&a.target)
                        .into_iter()
                        .map(|n| n.id.to_string())
                        .collect(),
                    v,
                )
            }),
            _ => None,
        })
        .collect();
    let mut sources: Vec<&Expr> = Vec::new();
    loop {
        let before = wanted.len();
        for (targets, value) in &assignments {
            if targets.iter().any(|t| wanted.contains(t)) {
                if !sources.iter().any(|s| std::ptr::eq(*s, *value)) {
                    sources.push(value);
                }
                wanted.extend(names_in_expr(value).iter().map(|n| n.id.to_string()));
            }
        }
        if wanted.len() == before {
            break;
        }
    }
    let in_sources = |call: &ExprCall| {
        sources.iter().any(|s| {
            crate::syntax::calls_in_expr(s)
                .iter()
                .any(|c| std::ptr::eq(*c, call))
        })
    };
    let candidates: Vec<(&'a ExprCall, Vec<String>)> = calls
        .iter()
        .copied()
        .filter(|c| in_sources(c))
        .filter_map(|c| {
            let path = self_path(&c.func)?;
            let first = path.first()?.as_str();
            (first != head && is_submodule(first)).then_some((c, path))
        })
        .collect();
    let takes_inputs = |c: &ExprCall| {
        [
            "input_ids",
            "inputs_embeds",
            "position_ids",
            "attention_mask",
        ]
        .iter()
        .any(|k| c.arguments.find_keyword(k).is_some())
    };
    candidates
        .iter()
        .find(|(c, _)| takes_inputs(c))
        .or(candidates.first())
        .cloned()
}

/// `self.a.b` → `["a", "b"]`.
fn self_path(expr: &Expr) -> Option<Vec<String>> {
    match expr {
        Expr::Attribute(attr) => match attr.value.as_ref() {
            Expr::Name(n) if n.id.as_str() == "self" => Some(vec![attr.attr.to_string()]),
            inner => {
                let mut path = self_path(inner)?;
                path.push(attr.attr.to_string());
                Some(path)
            }
        },
        _ => None,
    }
}

/// What a `self.<attr> = value` builds.
pub(super) enum Built<'a> {
    /// A class of a readable module.
    Class(Class<'a>),
    /// `AutoX.from_config(config.<sub>)`, resolved to the default model type's class.
    Default {
        class: Class<'a>,
        /// `AutoModel.from_config(config.text_config)`, for messages.
        call: String,
        sub: String,
        model_type: String,
    },
    /// Not known statically: why.
    Dynamic(String),
}

/// The class a submodule value builds, seen from `module` (`init`: the `__init__` holding it).
pub(super) fn built<'a>(
    program: &Program<'a>,
    module: Option<&Module<'a>>,
    init: Option<&'a StmtFunctionDef>,
    attr: &str,
    value: &'a Expr,
    text: &dyn Fn(&Expr) -> String,
) -> Built<'a> {
    // `model = AutoModel.from_config(...)` then `self.model = model`.
    let value = match (value, init) {
        (Expr::Name(name), Some(init)) => {
            local_value(&init.body, name.id.as_str()).unwrap_or(value)
        }
        _ => value,
    };
    let Expr::Call(call) = value else {
        return Built::Dynamic(format!("self.{attr} = {} is not a class call", text(value)));
    };
    let Some(callee) = dotted_name(&call.func) else {
        return Built::Dynamic(format!("self.{attr} = {} is not a class call", text(value)));
    };
    let class = ["._from_config", ".from_config", ".from_pretrained"]
        .iter()
        .find_map(|s| callee.strip_suffix(s))
        .unwrap_or(&callee);
    let last = class.rsplit('.').next().unwrap_or(class);
    let Some(module) = module else {
        return Built::Dynamic(format!(
            "self.{attr} = {}: the module's source was not given",
            text(value)
        ));
    };
    if last.starts_with("Auto") {
        return match program.auto_default(module, init, last, call) {
            Ok((class, sub, model_type)) => Built::Default {
                class,
                call: text(value),
                sub,
                model_type,
            },
            Err(why) => Built::Dynamic(format!(
                "self.{attr} = {}: the class is decided by the configuration at run time ({why})",
                text(value)
            )),
        };
    }
    match program.class(module, class) {
        Found::Class(class) => Built::Class(class),
        Found::Unseen(name) => Built::Dynamic(format!(
            "self.{attr} = {}: {name} is in a module the caller did not give",
            text(value)
        )),
        Found::Missing => Built::Dynamic(format!(
            "self.{attr} = {}: {class} is not a class of a modeling module",
            text(value)
        )),
    }
}

/// The value of the one plain assignment `name = value` in a body (None when there are
/// several, or none).
fn local_value<'a>(body: &'a [Stmt], name: &str) -> Option<&'a Expr> {
    let mut statements = Vec::new();
    walk_statements(body, &mut statements);
    let values: Vec<&Expr> = statements
        .iter()
        .filter_map(|stmt| match stmt {
            Stmt::Assign(a)
                if matches!(&a.targets[..], [Expr::Name(n)] if n.id.as_str() == name) =>
            {
                Some(a.value.as_ref())
            }
            _ => None,
        })
        .collect();
    match values[..] {
        [value] => Some(value),
        _ => None,
    }
}

/// The value of `self.<attr> = ...` in the `__init__`s of the class chain (most-derived
/// first), with the chain class holding it.
pub(super) fn chain_value<'a, 's>(
    chain: &'a [ParsedClass<'s>],
    attr: &str,
) -> Option<(&'a ParsedClass<'s>, &'a StmtFunctionDef, &'a Expr)> {
    chain.iter().find_map(|class| {
        let init = method(&class.class_def().body, "__init__")?;
        let value = super::program::init_values(&init.body, attr)
            .into_iter()
            .next()?;
        Some((class, init, value))
    })
}

/// A call of a decoder layer: `layer(...)` in `for layer in self.layers`, `self.layers[i](...)`,
/// or `self._gradient_checkpointing_func(layer.__call__, ...)` (`shift` 1: the layer is the
/// first argument).
#[derive(Clone, Copy)]
pub(super) struct LayerCall<'a> {
    pub call: &'a ExprCall,
    pub attr: &'a str,
    pub shift: usize,
}

impl<'a> LayerCall<'a> {
    /// The argument passed for the layer's parameter `name`.
    pub fn argument(&self, layer: Option<&Function<'_>>, name: &str) -> Option<&'a Expr> {
        let positional = layer.map(|f| f.positional());
        if self.shift == 0 {
            return argument(self.call, positional.as_deref(), name);
        }
        if let Some(k) = self.call.arguments.find_keyword(name) {
            return Some(&k.value);
        }
        let index = positional?.iter().position(|p| *p == name)?;
        self.call.arguments.args.get(index + self.shift)
    }
}

/// The decoder-layer calls of a forward: calls of the elements of a `nn.ModuleList` the
/// class builds of its own classes (not a list of `nn.Linear`).
pub(super) fn layer_calls<'a>(
    forward: &Function<'a>,
    builds: &[(Class<'a>, String, Submodule)],
) -> Vec<LayerCall<'a>> {
    let is_layers = |attr: &str| {
        let classes: Vec<&str> = builds
            .iter()
            .filter(|(_, a, _)| a == attr)
            .map(|(_, _, s)| s.class.as_str())
            .collect();
        classes.is_empty()
            || classes
                .iter()
                .any(|c| !c.starts_with("nn.") && !c.starts_with("torch."))
    };
    let mut calls = all_layer_calls(forward);
    calls.retain(|c| is_layers(c.attr));
    calls
}

fn all_layer_calls<'a>(forward: &Function<'a>) -> Vec<LayerCall<'a>> {
    let mut out = Vec::new();
    let mut statements = Vec::new();
    walk_statements(forward.body(), &mut statements);
    for stmt in &statements {
        let Stmt::For(for_stmt) = stmt else { continue };
        let Some((var, attr)) = loop_over_submodules(&for_stmt.target, &for_stmt.iter) else {
            continue;
        };
        let attr: &'a str = match self_attr_of_iter(&for_stmt.iter) {
            Some(a) if a == attr => a,
            _ => continue,
        };
        let mut inner = Vec::new();
        walk_statements(&for_stmt.body, &mut inner);
        for inner_stmt in inner {
            for call in crate::syntax::calls_in_stmt(inner_stmt) {
                match call.func.as_ref() {
                    Expr::Name(n) if n.id.as_str() == var => out.push(LayerCall {
                        call,
                        attr,
                        shift: 0,
                    }),
                    Expr::Attribute(a)
                        if a.attr.as_str().contains("gradient_checkpointing")
                            && call.arguments.args.first().is_some_and(|first| {
                                names_in_expr(first).iter().any(|n| n.id.as_str() == var)
                            }) =>
                    {
                        out.push(LayerCall {
                            call,
                            attr,
                            shift: 1,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
    // `self.layers[i](...)`.
    for call in forward.calls() {
        if let Expr::Subscript(sub) = call.func.as_ref()
            && let Some(attr) = self_attribute(&sub.value)
        {
            out.push(LayerCall {
                call,
                attr,
                shift: 0,
            });
        }
    }
    out
}

/// The `self.<attr>` a loop iterates over (through `enumerate`, `zip` and slices), as a
/// borrowed name.
fn self_attr_of_iter(iter: &Expr) -> Option<&str> {
    fn strip(e: &Expr) -> Option<&str> {
        let e = match e {
            Expr::Subscript(sub) => sub.value.as_ref(),
            other => other,
        };
        self_attribute(e)
    }
    if let Some(attr) = strip(iter) {
        return Some(attr);
    }
    let Expr::Call(call) = iter else { return None };
    call.arguments.args.iter().find_map(|a| strip(a))
}

/// The call of an inner model in a forward without a layer loop: the last `self.<attr>(...)`
/// of a submodule the class builds that takes `attention_mask=` and the inputs (else
/// `attention_mask=`, else `inputs_embeds=`).
pub(super) fn inner_call<'a>(
    forward: &Function<'a>,
    built: &dyn Fn(&str) -> bool,
) -> Option<(&'a ExprCall, String)> {
    let calls: Vec<(&'a ExprCall, &str)> = forward
        .calls()
        .into_iter()
        .filter_map(|c| Some((c, self_attribute(&c.func)?)))
        .filter(|(_, attr)| built(attr))
        .collect();
    let has = |c: &ExprCall, key: &str| c.arguments.find_keyword(key).is_some();
    let preferences: [&dyn Fn(&ExprCall) -> bool; 3] = [
        &|c| has(c, "attention_mask") && (has(c, "inputs_embeds") || has(c, "input_ids")),
        &|c| has(c, "attention_mask"),
        &|c| has(c, "inputs_embeds"),
    ];
    preferences.iter().find_map(|prefer| {
        calls
            .iter()
            .rev()
            .find(|(c, _)| prefer(c))
            .map(|(c, a)| (*c, a.to_string()))
    })
}

/// The classes built for `self.<attr>` (a layer list, a submodule), each resolved: tables
/// (`TABLE[kind](...)`) give every value of the module-level dict.
pub(super) fn classes_of<'a>(
    program: &Program<'a>,
    builds: &[(Class<'a>, String, Submodule)],
    attr: &str,
) -> Vec<(String, Found<'a>)> {
    let mut out = Vec::new();
    for (owner, a, submodule) in builds {
        if a != attr {
            continue;
        }
        let names = match submodule.class.strip_suffix("[]") {
            Some(table) => class_table(&owner.module, table).unwrap_or_default(),
            None => vec![submodule.class.clone()],
        };
        for name in names {
            if out.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let found = program.class(&owner.module, &name);
            out.push((name, found));
        }
    }
    out
}

/// The submodules a class's `__init__`s build, with the class whose `__init__` builds each.
pub(super) fn builds_of<'a>(
    program: &Program<'a>,
    class: &Class<'a>,
) -> Vec<(Class<'a>, String, Submodule)> {
    let mut out = Vec::new();
    for c in class.mro(program) {
        if let Some(init) = method(&c.def.body, "__init__") {
            for (attr, submodule) in crate::syncs::extract::submodules(&init.body) {
                out.push((c.clone(), attr, submodule));
            }
        }
    }
    out
}

/// Whether a submodule is an attention module of a layer (not a cross-attention).
pub(super) fn is_attention(attr: &str, class: &str) -> bool {
    let last = class.rsplit('.').next().unwrap_or(class);
    let cross = attr.contains("cross") || last.contains("Cross");
    !cross
        && (last.contains("Attention")
            || last.contains("Attn")
            || matches!(attr, "self_attn" | "attn" | "attention" | "self_attention"))
}
