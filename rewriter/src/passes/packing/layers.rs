//! The loop level and below: what the decoder-layer calls pass (`**kwargs`, the mask, no
//! `encoder_hidden_states`), where the positions come from, whether a layer mixes tokens
//! outside attention, and whether its attention takes the varlen metadata (`**kwargs` down
//! to a function of `ALL_ATTENTION_FUNCTIONS`).

use ruff_python_ast::{CmpOp, Expr, ExprCall, Stmt};
use ruff_text_size::Ranged;

use crate::syncs::extract::Submodule;
use crate::syntax::{
    callee_last_name, dotted_name, names_in_expr, self_attribute, walk_statements,
};

use super::flow::{self, Function, Origin, passes_var_kw, under_none_default};
use super::program::{Class, Found, Program};
use super::roles::{LayerCall, builds_of, classes_of, is_attention};
use super::{Analysis, Code, Level, mask};

/// Class-name parts of token mixers that carry state across positions outside attention.
const MIXERS: [&str; 15] = [
    "Mamba",
    "SSM",
    "Ssm",
    "LinearAttention",
    "LinearAttn",
    "GatedDeltaNet",
    "DeltaNet",
    "ShortConv",
    "Conv1d",
    "RWKV",
    "Rwkv",
    "Recurrent",
    "Compressor",
    "xLSTM",
    "Lightning",
];

/// Kernels of such mixers, named in a module that uses them.
const MIXER_KERNELS: [&str; 7] = [
    "causal_conv1d",
    "causal-conv1d",
    "selective_scan",
    "mamba_ssm",
    "chunk_gated_delta_rule",
    "fused_recurrent",
    "fla.ops",
];

/// Parts of layer-type values of such mixers (`"linear_attention"`, `"mamba"`, `"conv"`).
const MIXER_LAYER_TYPES: [&str; 11] = [
    "linear",
    "conv",
    "mamba",
    "ssm",
    "recurren",
    "rwkv",
    "delta",
    "lightning",
    "hybrid",
    "lstm",
    "compress",
];

pub(super) fn check<'a>(
    a: &mut Analysis<'a>,
    levels: &[Level<'a>],
    builds: &[(Class<'a>, String, Submodule)],
    calls: &[LayerCall<'a>],
) {
    let program = a.program;
    let level = levels.last().expect("a level");
    let forward = &level.forward;
    let mut layers: Vec<Class<'a>> = Vec::new();
    let mut attrs: Vec<&str> = Vec::new();
    for call in calls {
        if !attrs.contains(&call.attr) {
            attrs.push(call.attr);
        }
    }
    for attr in &attrs {
        let classes = classes_of(&program, builds, attr);
        if classes.is_empty() {
            a.dynamic(format!(
                "the layers self.{attr} of {} are not built in a readable __init__",
                level.class.name()
            ));
        }
        for (name, found) in classes {
            match found {
                Found::Class(class) => layers.push(class),
                Found::Unseen(module) => a.dynamic(format!(
                    "the layer class {name} is in {module}, which the caller did not give"
                )),
                Found::Missing => a.dynamic(format!(
                    "the layer class {name} is not a class of a modeling module"
                )),
            }
        }
    }
    a.seen.extend(layers.iter().map(|l| l.name().to_string()));
    let layer_forward = layers.iter().find_map(|l| l.method(&program, "forward"));

    let kwargs = forward.var_kw();
    for call in calls {
        if !kwargs.is_some_and(|k| passes_var_kw(call.call, k)) {
            a.refuse(
                Code::KwargsNotToAttention,
                format!(
                    "{} calls a layer of self.{} without **{}: {}",
                    forward.name(),
                    call.attr,
                    kwargs.unwrap_or("kwargs"),
                    forward.text(call.call)
                ),
            );
        }
        match call.argument(layer_forward.as_ref(), "attention_mask") {
            Some(value) => mask::check_layer_mask(a, levels, value),
            None => a.refuse(
                Code::MaskNotFromMaskingUtils,
                format!(
                    "{} passes no attention_mask to a layer of self.{}",
                    forward.name(),
                    call.attr
                ),
            ),
        }
        for name in ["encoder_hidden_states", "cross_attention_states"] {
            // The forward's own parameter (or None), passed down as given: a decoder-only
            // call passes None and the layers skip cross-attention; the run time refuses a
            // packed call that passes encoder states (`packing.py`).
            let as_given = |value: &Expr| {
                flow::origins(forward, value, &|_| false).iter().all(|o| {
                    matches!(o, Origin::Param(p) if p == name) || matches!(o, Origin::NoneLiteral)
                })
            };
            if let Some(value) = call.argument(layer_forward.as_ref(), name)
                && !value.is_none_literal_expr()
                && !as_given(value)
            {
                a.refuse(
                    Code::CrossAttention,
                    format!(
                        "{} passes {name}={} to its layers",
                        forward.name(),
                        forward.text(value)
                    ),
                );
            }
        }
    }
    for layer in &layers {
        if layer.name().contains("CrossAttention") {
            a.refuse(
                Code::CrossAttention,
                format!("{} is a cross-attention layer", layer.name()),
            );
        }
    }
    positions(a, level, builds, calls, layer_forward.as_ref());
    recurrent(a, &program, &level.class, forward, &layers);
    for layer in &layers {
        attention(a, &program, layer);
    }
}

/// The positions the base model gives its layers come from `position_ids`.
fn positions<'a>(
    a: &mut Analysis<'a>,
    level: &Level<'a>,
    builds: &[(Class<'a>, String, Submodule)],
    calls: &[LayerCall<'a>],
    layer_forward: Option<&Function<'a>>,
) {
    let program = a.program;
    let forward = &level.forward;
    let positional = |attr: &str| {
        let attr = attr.to_ascii_lowercase();
        ["rotary", "rope", "pos", "wpe"]
            .iter()
            .any(|p| attr.contains(p))
    };
    let built = |attr: &str| builds.iter().any(|(_, a, _)| a == attr);
    let mut found = false;
    // `self.pos_encoding[position_ids, :]`: a table of positions read by position_ids (not
    // `self.rotary_embs[kind](...)`, a module looked up and called).
    let forward_calls = forward.calls();
    let called: Vec<ruff_text_size::TextRange> =
        forward_calls.iter().map(|c| c.func.range()).collect();
    let mut statements = Vec::new();
    walk_statements(forward.body(), &mut statements);
    for stmt in statements {
        crate::syntax::for_each_subscript(stmt, &mut |sub| {
            if let Some(attr) = self_attribute(&sub.value)
                && positional(attr)
                && !called.contains(&sub.range())
                && !under_none_default(forward, sub.range(), "position_ids")
            {
                found = true;
                if !names_in_expr(&sub.slice)
                    .iter()
                    .any(|n| n.id.as_str() == "position_ids")
                {
                    a.refuse(
                        Code::PositionsNotFromPositionIds,
                        format!(
                            "{} reads positions without position_ids: {}",
                            forward.name(),
                            forward.text(sub)
                        ),
                    );
                }
            }
        });
    }
    for call in forward_calls {
        let module = match call.func.as_ref() {
            Expr::Subscript(sub) => sub.value.as_ref(),
            other => other,
        };
        let Some(attr) = self_attribute(module) else {
            continue;
        };
        if !positional(attr) || !built(attr) {
            continue;
        }
        found = true;
        if !mentions_arg(call, "position_ids") {
            a.refuse(
                Code::PositionsNotFromPositionIds,
                format!(
                    "{} computes positions without position_ids: {}",
                    forward.name(),
                    forward.text(call)
                ),
            );
        }
    }
    if !found {
        for call in calls {
            let passes = call
                .argument(layer_forward, "position_ids")
                .is_some_and(|v| matches!(v, Expr::Name(n) if n.id.as_str() == "position_ids"));
            if !passes {
                a.refuse(
                    Code::PositionsNotFromPositionIds,
                    format!(
                        "{} neither embeds positions from position_ids nor passes them to its \
                         layers",
                        forward.name()
                    ),
                );
            }
        }
    }
    for call in forward.calls() {
        let name = callee_last_name(&call.func).unwrap_or_default();
        let alibi = name.contains("alibi");
        let cumsum_of_mask =
            name == "cumsum" && (call_mentions(call, "mask") || receiver_mentions(call, "mask"));
        if (alibi || cumsum_of_mask) && !under_none_default(forward, call.range(), "position_ids") {
            a.refuse(
                Code::PositionsNotFromPositionIds,
                format!(
                    "{} derives positions from the mask or the row: {}",
                    forward.name(),
                    forward.text(call)
                ),
            );
        }
    }
    // mRoPE: a rotary embedding with sections over (temporal, height, width) positions.
    for (owner, attr, submodule) in builds {
        if !positional(attr) {
            continue;
        }
        if let Found::Class(rotary) = program.class(&owner.module, &submodule.class) {
            let text = rotary.module.source.slice(rotary.def);
            if text.contains("mrope") {
                a.refuse(
                    Code::MultimodalPositions,
                    format!(
                        "{}.{attr} is {}, a multimodal (mRoPE) rotary embedding",
                        level.class.name(),
                        rotary.name()
                    ),
                );
            }
        }
    }
}

fn mentions_arg(call: &ExprCall, name: &str) -> bool {
    call.arguments
        .args
        .iter()
        .chain(call.arguments.keywords.iter().map(|k| &k.value))
        .any(|e| names_in_expr(e).iter().any(|n| n.id.as_str() == name))
}

fn call_mentions(call: &ExprCall, part: &str) -> bool {
    call.arguments
        .args
        .iter()
        .chain(call.arguments.keywords.iter().map(|k| &k.value))
        .any(|e| {
            names_in_expr(e)
                .iter()
                .any(|n| n.id.as_str().contains(part))
        })
}

fn receiver_mentions(call: &ExprCall, part: &str) -> bool {
    match call.func.as_ref() {
        Expr::Attribute(attr) => names_in_expr(&attr.value)
            .iter()
            .any(|n| n.id.as_str().contains(part)),
        _ => false,
    }
}

/// No token mixer outside attention: the names of the base model, its layers and what they
/// build (three levels), the module's kernels, recurrent layer-type values.
fn recurrent<'a>(
    a: &mut Analysis<'a>,
    program: &Program<'a>,
    base: &Class<'a>,
    base_forward: &Function<'a>,
    layers: &[Class<'a>],
) {
    let mut names: Vec<(String, String)> = vec![(base.name().to_string(), "the base model".into())];
    let mut frontier: Vec<Class<'a>> = Vec::new();
    for layer in layers {
        names.push((layer.name().to_string(), "a decoder layer".into()));
        frontier.push(layer.clone());
    }
    for depth in 0..3 {
        let mut next = Vec::new();
        for class in &frontier {
            let builds = builds_of(program, class);
            let attrs: Vec<String> = builds.iter().map(|(_, a, _)| a.clone()).collect();
            for attr in attrs {
                for (name, found) in classes_of(program, &builds, &attr) {
                    names.push((name, format!("{}.{attr}", class.name())));
                    if let Found::Class(c) = found
                        && depth < 2
                    {
                        next.push(c);
                    }
                }
            }
        }
        frontier = next;
    }
    for (name, role) in &names {
        let last = name.rsplit('.').next().unwrap_or(name);
        if let Some(marker) = MIXERS.iter().find(|m| last.contains(*m)) {
            a.refuse(
                Code::RecurrentLayers,
                format!("{role} is {last} (a {marker} token mixer)"),
            );
            return;
        }
    }
    let mut modules: Vec<&Class<'a>> = vec![base];
    modules.extend(layers);
    for class in modules {
        if let Some(kernel) = module_kernel(class) {
            a.refuse(
                Code::RecurrentLayers,
                format!("{} uses the recurrent kernel {kernel}", class.module.name),
            );
            return;
        }
    }
    let mut functions: Vec<Function<'a>> = vec![*base_forward];
    for layer in layers {
        functions.extend(layer.method(program, "__init__"));
        functions.extend(layer.method(program, "forward"));
    }
    for function in &functions {
        if let Some(value) = recurrent_layer_type(function) {
            a.refuse(
                Code::RecurrentLayers,
                format!("{} handles the layer type {value:?}", function.name()),
            );
            return;
        }
    }
}

/// A recurrent kernel the module of `class` names in code (not in a docstring): a function
/// it defines, a name it imports or binds, a string passed to a decorator or a call at module
/// level (`@use_kernel_func_from_hub_with_fallback("causal_conv1d_fn", "causal_conv1d")`).
fn module_kernel(class: &Class<'_>) -> Option<&'static str> {
    let mut words: Vec<String> = Vec::new();
    let strings_of = |call: &ExprCall, words: &mut Vec<String>| {
        for arg in call
            .arguments
            .args
            .iter()
            .chain(call.arguments.keywords.iter().map(|k| &k.value))
        {
            if let Expr::StringLiteral(s) = arg {
                words.push(s.value.to_str().to_string());
            }
        }
    };
    for stmt in super::program::top_level(class.module.source.suite()) {
        match stmt {
            Stmt::FunctionDef(def) => {
                words.push(def.name.to_string());
                for decorator in &def.decorator_list {
                    if let Expr::Call(call) = &decorator.expression {
                        strings_of(call, &mut words);
                    }
                }
            }
            Stmt::ImportFrom(import) => {
                words.extend(import.module.as_ref().map(|m| m.to_string()));
                words.extend(import.names.iter().map(|a| a.name.to_string()));
            }
            Stmt::Import(import) => words.extend(import.names.iter().map(|a| a.name.to_string())),
            Stmt::Assign(assign) => {
                for target in &assign.targets {
                    words.extend(names_in_expr(target).iter().map(|n| n.id.to_string()));
                }
                for call in crate::syntax::calls_in_expr(&assign.value) {
                    strings_of(call, &mut words);
                }
            }
            Stmt::Expr(e) => {
                for call in crate::syntax::calls_in_expr(&e.value) {
                    strings_of(call, &mut words);
                }
            }
            _ => {}
        }
    }
    MIXER_KERNELS
        .iter()
        .copied()
        .find(|k| words.iter().any(|w| w.contains(k)))
}

/// A string compared with a layer type (`layer_type == "linear_attention"`) naming a mixer
/// outside attention.
fn recurrent_layer_type(function: &Function<'_>) -> Option<String> {
    let mut statements = Vec::new();
    walk_statements(function.body(), &mut statements);
    let layer_type = |e: &Expr| {
        let text = function.source.slice(e);
        ["layer_type", "block_type", "mixer_type"]
            .iter()
            .any(|p| text.contains(p))
    };
    let mut found = None;
    for stmt in statements {
        if !crate::syntax::child_blocks(stmt).is_empty() && !matches!(stmt, Stmt::If(_)) {
            continue;
        }
        let exprs: Vec<&Expr> = match stmt {
            Stmt::If(s) => std::iter::once(s.test.as_ref())
                .chain(s.elif_else_clauses.iter().filter_map(|c| c.test.as_ref()))
                .collect(),
            Stmt::Assign(s) => vec![s.value.as_ref()],
            Stmt::Expr(s) => vec![s.value.as_ref()],
            Stmt::Return(s) => s.value.as_deref().into_iter().collect(),
            _ => Vec::new(),
        };
        for expr in exprs {
            compares(expr, &mut |left, op, right| {
                if found.is_some()
                    || !matches!(op, CmpOp::Eq | CmpOp::NotEq | CmpOp::In | CmpOp::NotIn)
                {
                    return;
                }
                for (side, other) in [(left, right), (right, left)] {
                    if !layer_type(side) {
                        continue;
                    }
                    for value in strings(other) {
                        let lower = value.to_ascii_lowercase();
                        if MIXER_LAYER_TYPES.iter().any(|p| lower.contains(p)) {
                            found = Some(value);
                        }
                    }
                }
            });
        }
    }
    found
}

fn compares<'e>(expr: &'e Expr, f: &mut dyn FnMut(&'e Expr, CmpOp, &'e Expr)) {
    match expr {
        Expr::Compare(c) => {
            let mut left = c.left.as_ref();
            for (op, right) in c.ops.iter().zip(c.comparators.iter()) {
                f(left, *op, right);
                left = right;
            }
        }
        Expr::BoolOp(b) => b.values.iter().for_each(|v| compares(v, f)),
        Expr::UnaryOp(u) => compares(&u.operand, f),
        Expr::If(e) => {
            compares(&e.test, f);
            compares(&e.body, f);
            compares(&e.orelse, f);
        }
        _ => {}
    }
}

fn strings(expr: &Expr) -> Vec<String> {
    match expr {
        Expr::StringLiteral(s) => vec![s.value.to_str().to_string()],
        Expr::Tuple(t) => t.elts.iter().flat_map(strings).collect(),
        Expr::List(l) => l.elts.iter().flat_map(strings).collect(),
        Expr::Set(s) => s.elts.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// A layer passes `**kwargs` to its attention, whose forward passes them to a function of
/// `ALL_ATTENTION_FUNCTIONS` chosen by `config._attn_implementation`.
fn attention<'a>(a: &mut Analysis<'a>, program: &Program<'a>, layer: &Class<'a>) {
    let Some(forward) = layer.method(program, "forward") else {
        a.refuse(
            Code::KwargsNotToAttention,
            format!("{} has no readable forward", layer.name()),
        );
        return;
    };
    let builds = builds_of(program, layer);
    let attrs: Vec<String> = builds
        .iter()
        .filter(|(_, attr, s)| is_attention(attr, &s.class))
        .map(|(_, attr, _)| attr.clone())
        .fold(Vec::new(), |mut v, attr| {
            if !v.contains(&attr) {
                v.push(attr);
            }
            v
        });
    if attrs.is_empty() {
        a.refuse(
            Code::AttentionNotDispatched,
            format!("{} builds no attention module", layer.name()),
        );
        return;
    }
    let kwargs = forward.var_kw();
    let calls = forward.calls();
    for attr in &attrs {
        let attr_calls: Vec<&ExprCall> = calls
            .iter()
            .copied()
            .filter(|c| attention_call(c) == Some(attr.as_str()))
            .collect();
        for call in &attr_calls {
            if !kwargs.is_some_and(|k| passes_var_kw(call, k)) {
                a.refuse(
                    Code::KwargsNotToAttention,
                    format!(
                        "{} calls self.{attr} without **{}",
                        forward.name(),
                        kwargs.unwrap_or("kwargs")
                    ),
                );
            }
        }
        if attr_calls.is_empty() {
            continue;
        }
        for (name, found) in classes_of(program, &builds, attr) {
            match found {
                Found::Class(class) => {
                    if !a.seen.iter().any(|s| s == class.name()) {
                        a.seen.push(class.name().to_string());
                    }
                    dispatch(a, program, &class, 0);
                }
                _ => a.refuse(
                    Code::AttentionNotDispatched,
                    format!(
                        "the attention class {name} of {} is not readable",
                        layer.name()
                    ),
                ),
            }
        }
    }
}

/// `self.<attr>(...)` or `self.<attr>.forward(...)`.
fn attention_call(call: &ExprCall) -> Option<&str> {
    if let Some(attr) = self_attribute(&call.func) {
        return Some(attr);
    }
    match call.func.as_ref() {
        Expr::Attribute(a) if a.attr.as_str() == "forward" => self_attribute(&a.value),
        _ => None,
    }
}

/// An attention forward passes `**kwargs` to a function of `ALL_ATTENTION_FUNCTIONS`
/// chosen by `config._attn_implementation` (or delegates to an inner attention module that
/// does).
fn dispatch<'a>(a: &mut Analysis<'a>, program: &Program<'a>, class: &Class<'a>, depth: usize) {
    let Some(forward) = class.method(program, "forward") else {
        a.refuse(
            Code::AttentionNotDispatched,
            format!("{} has no readable forward", class.name()),
        );
        return;
    };
    let mut bound: Vec<String> = Vec::new();
    let mut statements = Vec::new();
    walk_statements(forward.body(), &mut statements);
    for stmt in statements {
        let (target, value) = match stmt {
            Stmt::Assign(s) if s.targets.len() == 1 => (&s.targets[0], s.value.as_ref()),
            Stmt::AnnAssign(s) => match &s.value {
                Some(v) => (s.target.as_ref(), v.as_ref()),
                None => continue,
            },
            _ => continue,
        };
        if let Expr::Name(name) = target
            && is_table_lookup(value)
        {
            bound.push(name.id.to_string());
        }
    }
    let calls = forward.calls();
    let dispatched: Vec<&ExprCall> = calls
        .iter()
        .copied()
        .filter(|c| match c.func.as_ref() {
            Expr::Name(n) => bound.iter().any(|b| b == n.id.as_str()),
            other => is_table_lookup(other),
        })
        .collect();
    if dispatched.is_empty() {
        // An attention wrapper: its inner attention module may dispatch.
        if depth < 2 {
            let builds = builds_of(program, class);
            let inner: Vec<&(Class<'a>, String, Submodule)> = builds
                .iter()
                .filter(|(_, attr, s)| {
                    is_attention(attr, &s.class)
                        && calls
                            .iter()
                            .any(|c| attention_call(c) == Some(attr.as_str()))
                })
                .collect();
            if !inner.is_empty() {
                let kwargs = forward.var_kw();
                for (_, attr, _) in &inner {
                    for call in calls
                        .iter()
                        .filter(|c| attention_call(c) == Some(attr.as_str()))
                    {
                        if !kwargs.is_some_and(|k| passes_var_kw(call, k)) {
                            a.refuse(
                                Code::KwargsNotToAttention,
                                format!("{} calls self.{attr} without **kwargs", forward.name()),
                            );
                        }
                    }
                    for (_, found) in classes_of(program, &builds, attr) {
                        if let Found::Class(c) = found {
                            dispatch(a, program, &c, depth + 1);
                        }
                    }
                }
                return;
            }
        }
        a.refuse(
            Code::AttentionNotDispatched,
            format!(
                "{} does not take its attention function from ALL_ATTENTION_FUNCTIONS",
                forward.name()
            ),
        );
        return;
    }
    let kwargs = forward.var_kw();
    for call in dispatched {
        if !kwargs.is_some_and(|k| passes_var_kw(call, k)) {
            a.refuse(
                Code::KwargsNotToAttention,
                format!(
                    "{} calls its attention function without **{}: {}",
                    forward.name(),
                    kwargs.unwrap_or("kwargs"),
                    forward.text(call)
                ),
            );
        }
    }
}

/// `ALL_ATTENTION_FUNCTIONS[<...>._attn_implementation]`, `.get_interface(...)`, `.get(...)`.
fn is_table_lookup(value: &Expr) -> bool {
    let table = |e: &Expr| dotted_name(e).is_some_and(|d| d.ends_with("ALL_ATTENTION_FUNCTIONS"));
    let keyed = |e: &Expr| mentions_attribute(e, "_attn_implementation");
    match value {
        Expr::Subscript(sub) => table(&sub.value) && keyed(&sub.slice),
        Expr::Call(call) => match call.func.as_ref() {
            Expr::Attribute(attr)
                if matches!(attr.attr.as_str(), "get_interface" | "get") && table(&attr.value) =>
            {
                call.arguments.args.first().is_some_and(keyed)
            }
            _ => false,
        },
        _ => false,
    }
}

/// Whether an expression reads the attribute `name` somewhere (`self.config.<name>`).
fn mentions_attribute(expr: &Expr, name: &str) -> bool {
    use ruff_python_ast::visitor::{self, Visitor};
    struct Finder<'n> {
        name: &'n str,
        found: bool,
    }
    impl<'a> Visitor<'a> for Finder<'_> {
        fn visit_expr(&mut self, expr: &'a Expr) {
            if let Expr::Attribute(a) = expr
                && a.attr.as_str() == self.name
            {
                self.found = true;
            }
            visitor::walk_expr(self, expr);
        }
    }
    let mut finder = Finder { name, found: false };
    finder.visit_expr(expr);
    finder.found
}
