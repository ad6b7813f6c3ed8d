//! Inside one function: its parameters, the arguments a call passes (by keyword, by position
//! against the callee's signature, or in a `**dict`), and where a value comes from
//! (reaching definitions of a name at a point, followed through assignments, dict literals,
//! subscripts and conditionals to the calls, parameters and literals that produce it).
//!
//! The reaching definitions are a small flow-sensitive approximation: walking back from the
//! use through the statements before it (innermost block first), a plain assignment at a
//! block level kills what came before; assignments inside earlier compound statements are
//! possible (conditional) definitions; a loop around the use adds every assignment in its
//! body (the back edge). Nested functions and lambdas are not followed.

use std::collections::HashSet;

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ExprCall, Stmt, StmtFunctionDef};
use ruff_text_size::{Ranged, TextRange};

use crate::parse::ParsedSource;
use crate::syntax::{callee_last_name, child_blocks, statement_path};

/// A function (a method, usually) with the source it was parsed from.
#[derive(Clone, Copy)]
pub(super) struct Function<'a> {
    pub def: &'a StmtFunctionDef,
    pub source: &'a ParsedSource,
    /// The class that defines it, for messages.
    pub owner: &'a str,
}

impl<'a> Function<'a> {
    /// `Class.method`, for messages.
    pub fn name(&self) -> String {
        format!("{}.{}", self.owner, self.def.name)
    }

    /// The text of a node on one line, shortened, for messages.
    pub fn text(&self, node: impl Ranged) -> String {
        short(self.source.slice(node))
    }

    pub fn body(&self) -> &'a [Stmt] {
        &self.def.body
    }

    pub fn has_param(&self, name: &str) -> bool {
        let p = &self.def.parameters;
        p.posonlyargs
            .iter()
            .chain(&p.args)
            .chain(&p.kwonlyargs)
            .any(|a| a.parameter.name.as_str() == name)
    }

    /// The parameters a positional argument binds, in order, without `self`.
    pub fn positional(&self) -> Vec<&'a str> {
        let p = &self.def.parameters;
        p.posonlyargs
            .iter()
            .chain(&p.args)
            .skip(1)
            .map(|a| a.parameter.name.as_str())
            .collect()
    }

    /// The name of the `**kwargs` parameter.
    pub fn var_kw(&self) -> Option<&'a str> {
        self.def.parameters.kwarg.as_ref().map(|k| k.name.as_str())
    }

    /// Every call in the body (lambdas included, not nested functions), in source order.
    pub fn calls(&self) -> Vec<&'a ExprCall> {
        let mut calls = Calls::default();
        calls.visit_body(&self.def.body);
        calls.calls
    }

    /// Whether the body mentions `name` as a name or an attribute.
    pub fn mentions(&self, name: &str) -> bool {
        let mut finder = Mentions { name, found: false };
        finder.visit_body(&self.def.body);
        finder.found
    }
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

#[derive(Default)]
struct Calls<'a> {
    calls: Vec<&'a ExprCall>,
}

impl<'a> Visitor<'a> for Calls<'a> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        if !matches!(stmt, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
            visitor::walk_stmt(self, stmt);
        }
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        if let Expr::Call(call) = expr {
            self.calls.push(call);
        }
        visitor::walk_expr(self, expr);
    }
}

struct Mentions<'n> {
    name: &'n str,
    found: bool,
}

impl<'a> Visitor<'a> for Mentions<'_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        if !matches!(stmt, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
            visitor::walk_stmt(self, stmt);
        }
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            Expr::Name(n) if n.id.as_str() == self.name => self.found = true,
            Expr::Attribute(a) if a.attr.as_str() == self.name => self.found = true,
            _ => {}
        }
        visitor::walk_expr(self, expr);
    }
}

/// The expression a call passes for the callee's parameter `name`: by keyword, or by
/// position when the callee's signature is known (`positional`: its parameters after
/// `self`). A positional argument after a `*args` is not mapped.
pub(super) fn argument<'e>(
    call: &'e ExprCall,
    positional: Option<&[&str]>,
    name: &str,
) -> Option<&'e Expr> {
    if let Some(keyword) = call.arguments.find_keyword(name) {
        return Some(&keyword.value);
    }
    let index = positional?.iter().position(|p| *p == name)?;
    let args = &call.arguments.args;
    if args[..index.min(args.len())]
        .iter()
        .any(|a| matches!(a, Expr::Starred(_)))
    {
        return None;
    }
    args.get(index)
}

/// Whether a call passes `**name`.
pub(super) fn passes_var_kw(call: &ExprCall, name: &str) -> bool {
    call.arguments
        .keywords
        .iter()
        .any(|k| k.arg.is_none() && matches!(&k.value, Expr::Name(n) if n.id.as_str() == name))
}

/// One definition of a name that may reach a use.
#[derive(Clone, Copy)]
pub(super) enum Def<'a> {
    /// `name = value` (or annotated).
    Assign(&'a Expr),
    /// `(name := value)`; `dict_guard` when it is the first argument of
    /// `isinstance(..., dict)` (`if not isinstance(mapping := attention_mask, dict):`).
    Walrus { value: &'a Expr, dict_guard: bool },
    /// Anything else that binds it (tuple unpacking, `for`, `+=`, `with ... as`): the
    /// statement.
    Other(&'a Stmt),
}

/// The definitions of `name` that may reach the point `at` of `function`, and whether the
/// function's entry (its parameter, or a global) may reach it too.
pub(super) fn reaching<'a>(
    function: &Function<'a>,
    name: &str,
    at: TextRange,
) -> (Vec<Def<'a>>, bool) {
    let path = statement_path(function.body(), at);
    let mut defs = Vec::new();
    // A loop around the use: every binding in its body may come back around.
    for (block, index) in &path {
        let stmt = &block[*index];
        if matches!(stmt, Stmt::For(_) | Stmt::While(_)) {
            for child in child_blocks(stmt) {
                for s in child {
                    collect(s, name, &mut defs);
                }
            }
        }
    }
    for (block, index) in path.iter().rev() {
        // The statement holding the use: a test's walrus runs before its body.
        if let Stmt::If(s) = &block[*index]
            && !s.test.range().contains_range(at)
            && let Some(def) = walrus_in(&s.test, name)
        {
            defs.push(def);
            return (defs, false);
        }
        for stmt in block[..*index].iter().rev() {
            match stmt {
                Stmt::Assign(a)
                    if a.targets.len() == 1
                        && matches!(&a.targets[0], Expr::Name(n) if n.id.as_str() == name) =>
                {
                    defs.push(Def::Assign(&a.value));
                    return (defs, false);
                }
                Stmt::AnnAssign(a) if matches!(a.target.as_ref(), Expr::Name(n) if n.id.as_str() == name) => {
                    if let Some(value) = &a.value {
                        defs.push(Def::Assign(value));
                        return (defs, false);
                    }
                }
                Stmt::If(s) => {
                    for child in child_blocks(stmt) {
                        for inner in child {
                            collect(inner, name, &mut defs);
                        }
                    }
                    if let Some(def) = walrus_in(&s.test, name) {
                        defs.push(def);
                        return (defs, false);
                    }
                    // `if c: name = a` / `else: name = b`: every way through binds it.
                    let has_else = s.elif_else_clauses.last().is_some_and(|c| c.test.is_none());
                    let binds_at_top = |block: &[Stmt]| {
                        block.iter().any(|b| match b {
                            Stmt::Assign(a) => a.targets.iter().any(|t| binds(t, name)),
                            Stmt::AnnAssign(a) => binds(&a.target, name) && a.value.is_some(),
                            _ => false,
                        })
                    };
                    if has_else
                        && binds_at_top(&s.body)
                        && s.elif_else_clauses.iter().all(|c| binds_at_top(&c.body))
                    {
                        return (defs, false);
                    }
                }
                other => collect(other, name, &mut defs),
            }
        }
    }
    (defs, true)
}

/// Every binding of `name` anywhere in a statement (conditional definitions).
fn collect<'a>(stmt: &'a Stmt, name: &str, out: &mut Vec<Def<'a>>) {
    let is_name = |e: &Expr| matches!(e, Expr::Name(n) if n.id.as_str() == name);
    match stmt {
        Stmt::FunctionDef(_) | Stmt::ClassDef(_) => return,
        Stmt::Assign(a) => {
            for target in &a.targets {
                if is_name(target) {
                    out.push(Def::Assign(&a.value));
                } else if binds(target, name) {
                    out.push(Def::Other(stmt));
                }
            }
        }
        Stmt::AnnAssign(a) => {
            if is_name(&a.target)
                && let Some(value) = &a.value
            {
                out.push(Def::Assign(value));
            }
        }
        Stmt::AugAssign(a) if binds(&a.target, name) => out.push(Def::Other(stmt)),
        Stmt::For(f) if binds(&f.target, name) => out.push(Def::Other(stmt)),
        Stmt::With(w)
            if w.items
                .iter()
                .any(|i| i.optional_vars.as_deref().is_some_and(|v| binds(v, name))) =>
        {
            out.push(Def::Other(stmt));
        }
        _ => {}
    }
    // Walrus bindings in the statement's own expressions.
    let mut walrus = Walruses {
        name,
        found: Vec::new(),
        guard: 0,
    };
    walrus.visit_stmt_shallow(stmt);
    out.extend(walrus.found);
    for child in child_blocks(stmt) {
        for s in child {
            collect(s, name, out);
        }
    }
}

/// Whether an assignment target binds `name` (inside a tuple, a starred target...).
fn binds(target: &Expr, name: &str) -> bool {
    match target {
        Expr::Name(n) => n.id.as_str() == name,
        Expr::Tuple(t) => t.elts.iter().any(|e| binds(e, name)),
        Expr::List(l) => l.elts.iter().any(|e| binds(e, name)),
        Expr::Starred(s) => binds(&s.value, name),
        _ => false,
    }
}

/// The walrus binding of `name` in an expression (the first).
fn walrus_in<'a>(expr: &'a Expr, name: &str) -> Option<Def<'a>> {
    let mut walrus = Walruses {
        name,
        found: Vec::new(),
        guard: 0,
    };
    walrus.visit_expr(expr);
    walrus.found.into_iter().next()
}

struct Walruses<'n, 'a> {
    name: &'n str,
    found: Vec<Def<'a>>,
    /// Depth inside `isinstance(<here>, dict)`.
    guard: usize,
}

impl<'a> Walruses<'_, 'a> {
    /// The expressions of a statement itself, not of its child blocks.
    fn visit_stmt_shallow(&mut self, stmt: &'a Stmt) {
        match stmt {
            Stmt::Expr(e) => self.visit_expr(&e.value),
            Stmt::Assign(a) => self.visit_expr(&a.value),
            Stmt::AnnAssign(a) => {
                if let Some(v) = &a.value {
                    self.visit_expr(v);
                }
            }
            Stmt::AugAssign(a) => self.visit_expr(&a.value),
            Stmt::Return(r) => {
                if let Some(v) = &r.value {
                    self.visit_expr(v);
                }
            }
            Stmt::If(s) => {
                self.visit_expr(&s.test);
                for clause in &s.elif_else_clauses {
                    if let Some(test) = &clause.test {
                        self.visit_expr(test);
                    }
                }
            }
            Stmt::While(s) => self.visit_expr(&s.test),
            Stmt::For(s) => self.visit_expr(&s.iter),
            _ => {}
        }
    }
}

impl<'a> Visitor<'a> for Walruses<'_, 'a> {
    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            Expr::Lambda(_) => {}
            Expr::Named(named) => {
                if matches!(named.target.as_ref(), Expr::Name(n) if n.id.as_str() == self.name) {
                    self.found.push(Def::Walrus {
                        value: &named.value,
                        dict_guard: self.guard > 0,
                    });
                }
                visitor::walk_expr(self, expr);
            }
            Expr::Call(call)
                if matches!(call.func.as_ref(), Expr::Name(n) if n.id.as_str() == "isinstance")
                    && call.arguments.args.len() == 2
                    && matches!(&call.arguments.args[1], Expr::Name(n) if n.id.as_str() == "dict") =>
            {
                self.guard += 1;
                self.visit_expr(&call.arguments.args[0]);
                self.guard -= 1;
            }
            _ => visitor::walk_expr(self, expr),
        }
    }
}

/// Where a value comes from, as far as one function shows.
#[derive(Clone, Debug)]
pub(super) enum Origin {
    /// A call the caller recognises (a mask builder, say).
    Call,
    /// A parameter of the function, as the caller passed it.
    Param(String),
    /// The parameter `attention_mask` already a dict (`isinstance(x := attention_mask, dict)`).
    GivenDict,
    /// The literal `None`.
    NoneLiteral,
    /// A recognised value changed on the way (a binary operation or call over it): the
    /// text of the change.
    Changed(String),
    /// Anything else: its text.
    Other(String),
}

/// The origins of `expr` in `function`. `recognised` says which calls are origins of
/// interest (they are not looked into); other calls over a recognised value are `Changed`.
pub(super) fn origins<'a>(
    function: &Function<'a>,
    expr: &'a Expr,
    recognised: &dyn Fn(&ExprCall) -> bool,
) -> Vec<Origin> {
    let mut tracer = Tracer {
        function,
        recognised,
        seen: HashSet::new(),
    };
    let mut out = Vec::new();
    tracer.trace(expr, &mut out, 0);
    out
}

struct Tracer<'f, 'a> {
    function: &'f Function<'a>,
    recognised: &'f dyn Fn(&ExprCall) -> bool,
    seen: HashSet<(String, TextRange)>,
}

impl<'a> Tracer<'_, 'a> {
    fn trace(&mut self, expr: &'a Expr, out: &mut Vec<Origin>, depth: usize) {
        if depth > 24 {
            out.push(Origin::Other(self.function.text(expr)));
            return;
        }
        match expr {
            Expr::Name(name) => {
                let id = name.id.as_str();
                if !self.seen.insert((id.to_string(), name.range())) {
                    return;
                }
                let (defs, entry) = reaching(self.function, id, name.range());
                for def in defs {
                    match def {
                        Def::Assign(value) if self.given_dict(value) => {
                            out.push(Origin::GivenDict);
                        }
                        Def::Assign(value) => self.trace(value, out, depth + 1),
                        Def::Walrus { value, dict_guard } => {
                            let param = matches!(value, Expr::Name(n) if self.function.has_param(n.id.as_str()));
                            if dict_guard && param {
                                out.push(Origin::GivenDict);
                            } else {
                                self.trace(value, out, depth + 1);
                            }
                        }
                        Def::Other(stmt) => self.other_binding(stmt, out, depth),
                    }
                }
                if entry {
                    if self.function.has_param(id) {
                        out.push(Origin::Param(id.to_string()));
                    } else {
                        out.push(Origin::Other(id.to_string()));
                    }
                }
            }
            Expr::Call(call) if (self.recognised)(call) => out.push(Origin::Call),
            // `table[key]()` of a dict of lambdas that each make a recognised call.
            Expr::Call(call) if call.arguments.is_empty() && self.lambda_table(&call.func) => {
                out.push(Origin::Call);
            }
            // `mapping.get(key)`: a lookup, like a subscript.
            Expr::Call(call)
                if callee_last_name(&call.func) == Some("get")
                    && receiver(call).is_some_and(|r| matches!(r, Expr::Name(_))) =>
            {
                if let Some(mapping) = receiver(call) {
                    self.trace(mapping, out, depth + 1);
                }
            }
            Expr::Call(call) => {
                let over_recognised = call
                    .arguments
                    .args
                    .iter()
                    .chain(call.arguments.keywords.iter().map(|k| &k.value))
                    .chain(receiver(call))
                    .any(|arg| self.carries(arg, depth));
                let text = self.function.text(expr);
                out.push(if over_recognised {
                    Origin::Changed(text)
                } else {
                    Origin::Other(text)
                });
            }
            Expr::BinOp(op) => {
                if self.carries(&op.left, depth) || self.carries(&op.right, depth) {
                    out.push(Origin::Changed(self.function.text(expr)));
                } else {
                    out.push(Origin::Other(self.function.text(expr)));
                }
            }
            Expr::Subscript(sub) => self.trace(&sub.value, out, depth + 1),
            Expr::Dict(dict) => {
                for item in &dict.items {
                    self.trace(&item.value, out, depth + 1);
                }
            }
            Expr::DictComp(comp) => self.trace(&comp.value, out, depth + 1),
            Expr::If(e) => {
                self.trace(&e.body, out, depth + 1);
                self.trace(&e.orelse, out, depth + 1);
            }
            Expr::Named(named) => self.trace(&named.value, out, depth + 1),
            Expr::NoneLiteral(_) => out.push(Origin::NoneLiteral),
            _ => out.push(Origin::Other(self.function.text(expr))),
        }
    }

    /// `table[key]` / `table` bound to a dict of lambdas whose bodies are recognised calls.
    fn lambda_table(&self, func: &Expr) -> bool {
        let name = match func {
            Expr::Subscript(sub) => sub.value.as_ref(),
            other => other,
        };
        let Expr::Name(name) = name else { return false };
        let (defs, _) = reaching(self.function, name.id.as_str(), name.range());
        !defs.is_empty()
            && defs.iter().all(|def| match def {
                Def::Assign(Expr::Dict(dict)) => dict.items.iter().all(|item| {
                    matches!(&item.value, Expr::Lambda(l)
                        if matches!(l.body.as_ref(), Expr::Call(c) if (self.recognised)(c)))
                }),
                _ => false,
            })
    }

    /// A value computed from a parameter inside `if isinstance(<parameter>, dict):` (the
    /// masks a caller prepared: `generate`'s `create_masks_for_generate`).
    fn given_dict(&self, value: &Expr) -> bool {
        let path = statement_path(self.function.body(), value.range());
        path.iter().any(|(block, index)| match &block[*index] {
            Stmt::If(s)
                if s.body
                    .iter()
                    .any(|b| b.range().contains_range(value.range())) =>
            {
                isinstance_dict(&s.test).is_some_and(|param| {
                    self.function.has_param(param) && crate::syntax::expr_mentions(value, param)
                })
            }
            _ => false,
        })
    }

    /// A tuple unpacking (or another binding statement): what its value is made of.
    fn other_binding(&mut self, stmt: &'a Stmt, out: &mut Vec<Origin>, depth: usize) {
        let value = match stmt {
            Stmt::Assign(a) => Some(a.value.as_ref()),
            Stmt::AugAssign(a) => Some(a.value.as_ref()),
            _ => None,
        };
        let first_line = self
            .function
            .text(stmt)
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        match value {
            Some(value) if self.carries(value, depth) || matches!(stmt, Stmt::AugAssign(_)) => {
                out.push(Origin::Changed(first_line));
            }
            _ => out.push(Origin::Other(first_line)),
        }
    }

    /// Whether an expression's value is made from a recognised call (through names).
    fn carries(&mut self, expr: &'a Expr, depth: usize) -> bool {
        let mut inner = Vec::new();
        let mut tracer = Tracer {
            function: self.function,
            recognised: self.recognised,
            seen: self.seen.clone(),
        };
        match expr {
            Expr::Call(call) if !(self.recognised)(call) => {
                return call
                    .arguments
                    .args
                    .iter()
                    .chain(call.arguments.keywords.iter().map(|k| &k.value))
                    .chain(receiver(call))
                    .any(|arg| self.carries(arg, depth + 1));
            }
            Expr::Attribute(attr) => return self.carries(&attr.value, depth + 1),
            _ => tracer.trace(expr, &mut inner, depth + 1),
        }
        inner
            .iter()
            .any(|o| matches!(o, Origin::Call | Origin::Changed(_) | Origin::GivenDict))
    }
}

/// The object a method is called on (`mask` of `mask.to(x)`).
fn receiver(call: &ExprCall) -> Option<&Expr> {
    match call.func.as_ref() {
        Expr::Attribute(attr) => Some(&attr.value),
        _ => None,
    }
}

/// The keyword arguments a call passes, with those of its `**dict` arguments when the dict
/// is built in the function: dict literals (and `.copy()` / `dict(...)` of them), then
/// `d["key"] = value` item assignments anywhere in the function. Keys of a `**` argument
/// the function does not show are not listed; `complete` is false then.
pub(super) struct CallKeywords<'a> {
    pub keywords: Vec<(String, &'a Expr)>,
    pub complete: bool,
}

impl<'a> CallKeywords<'a> {
    pub fn get(&self, key: &str) -> Vec<&'a Expr> {
        self.keywords
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .collect()
    }
}

pub(super) fn call_keywords<'a>(function: &Function<'a>, call: &'a ExprCall) -> CallKeywords<'a> {
    let mut out = CallKeywords {
        keywords: Vec::new(),
        complete: true,
    };
    for keyword in &call.arguments.keywords {
        match &keyword.arg {
            Some(arg) => out.keywords.push((arg.to_string(), &keyword.value)),
            None => dict_keys(function, &keyword.value, &mut out, 0),
        }
    }
    out
}

fn dict_keys<'a>(
    function: &Function<'a>,
    expr: &'a Expr,
    out: &mut CallKeywords<'a>,
    depth: usize,
) {
    if depth > 6 {
        out.complete = false;
        return;
    }
    match expr {
        Expr::Dict(dict) => {
            for item in &dict.items {
                match &item.key {
                    Some(Expr::StringLiteral(key)) => {
                        out.keywords
                            .push((key.value.to_str().to_string(), &item.value));
                    }
                    Some(_) => out.complete = false,
                    None => dict_keys(function, &item.value, out, depth + 1),
                }
            }
        }
        Expr::Call(call) => {
            let name = callee_last_name(&call.func);
            if name == Some("copy")
                && let Some(receiver) = receiver(call)
            {
                dict_keys(function, receiver, out, depth + 1);
            } else if matches!(call.func.as_ref(), Expr::Name(n) if n.id.as_str() == "dict") {
                for arg in &call.arguments.args {
                    dict_keys(function, arg, out, depth + 1);
                }
                for keyword in &call.arguments.keywords {
                    match &keyword.arg {
                        Some(arg) => out.keywords.push((arg.to_string(), &keyword.value)),
                        None => dict_keys(function, &keyword.value, out, depth + 1),
                    }
                }
            } else {
                out.complete = false;
            }
        }
        Expr::Name(name) => {
            let (defs, entry) = reaching(function, name.id.as_str(), name.range());
            if entry || defs.is_empty() {
                out.complete = false;
            }
            for def in defs {
                match def {
                    Def::Assign(value) | Def::Walrus { value, .. } => {
                        dict_keys(function, value, out, depth + 1);
                    }
                    Def::Other(_) => out.complete = false,
                }
            }
            item_assignments(function, name.id.as_str(), out);
        }
        _ => out.complete = false,
    }
}

/// `name["key"] = value` anywhere in the function (and `name.update(key=value)`).
fn item_assignments<'a>(function: &Function<'a>, name: &str, out: &mut CallKeywords<'a>) {
    let mut statements = Vec::new();
    crate::syntax::walk_statements(function.body(), &mut statements);
    for stmt in statements {
        match stmt {
            Stmt::Assign(a) => {
                for target in &a.targets {
                    if let Expr::Subscript(sub) = target
                        && matches!(sub.value.as_ref(), Expr::Name(n) if n.id.as_str() == name)
                    {
                        match sub.slice.as_ref() {
                            Expr::StringLiteral(key) => {
                                out.keywords
                                    .push((key.value.to_str().to_string(), &a.value));
                            }
                            _ => out.complete = false,
                        }
                    }
                }
            }
            Stmt::Expr(e) => {
                if let Expr::Call(call) = e.value.as_ref()
                    && let Expr::Attribute(attr) = call.func.as_ref()
                    && attr.attr.as_str() == "update"
                    && matches!(attr.value.as_ref(), Expr::Name(n) if n.id.as_str() == name)
                {
                    for keyword in &call.arguments.keywords {
                        match &keyword.arg {
                            Some(arg) => out.keywords.push((arg.to_string(), &keyword.value)),
                            None => out.complete = false,
                        }
                    }
                    if !call.arguments.args.is_empty() {
                        out.complete = false;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether `stmt` lies inside an `if <name> is None:` block of the function (a default for
/// a missing argument).
pub(super) fn under_none_default(function: &Function<'_>, at: TextRange, name: &str) -> bool {
    let path = statement_path(function.body(), at);
    path.iter().any(|(block, index)| match &block[*index] {
        Stmt::If(s) => {
            let in_body = s.body.iter().any(|b| b.range().contains_range(at));
            in_body && is_none_test(&s.test, name)
        }
        _ => false,
    })
}

fn is_none_test(test: &Expr, name: &str) -> bool {
    match test {
        Expr::Compare(c) => {
            c.ops.len() == 1
                && c.ops[0] == ruff_python_ast::CmpOp::Is
                && matches!(c.left.as_ref(), Expr::Name(n) if n.id.as_str() == name)
                && c.comparators[0].is_none_literal_expr()
        }
        Expr::BoolOp(op) => op.values.iter().any(|v| is_none_test(v, name)),
        _ => false,
    }
}

/// `isinstance(<name>, dict)` → the name.
fn isinstance_dict(test: &Expr) -> Option<&str> {
    let Expr::Call(call) = test else { return None };
    if !matches!(call.func.as_ref(), Expr::Name(n) if n.id.as_str() == "isinstance") {
        return None;
    }
    match &call.arguments.args[..] {
        [Expr::Name(value), Expr::Name(kind)] if kind.id.as_str() == "dict" => {
            Some(value.id.as_str())
        }
        _ => None,
    }
}

/// Local names bound only to some of `functions` (`mask_function = create_causal_mask if c
/// else create_sliding_window_causal_mask`).
pub(super) fn function_aliases(function: &Function<'_>, functions: &[&str]) -> HashSet<String> {
    fn names(value: &Expr, functions: &[&str]) -> bool {
        match value {
            Expr::Name(n) => functions.contains(&n.id.as_str()),
            Expr::If(e) => names(&e.body, functions) && names(&e.orelse, functions),
            _ => false,
        }
    }
    let mut statements = Vec::new();
    crate::syntax::walk_statements(function.body(), &mut statements);
    let mut good = HashSet::new();
    let mut bad = HashSet::new();
    for stmt in statements {
        let (target, value) = match stmt {
            Stmt::Assign(a) if a.targets.len() == 1 => (&a.targets[0], a.value.as_ref()),
            Stmt::AnnAssign(a) => match &a.value {
                Some(v) => (a.target.as_ref(), v.as_ref()),
                None => continue,
            },
            _ => continue,
        };
        let Expr::Name(target) = target else { continue };
        if names(value, functions) {
            good.insert(target.id.to_string());
        } else {
            bad.insert(target.id.to_string());
        }
    }
    good.retain(|n| !bad.contains(n));
    good
}
