//! The decoder layer's forward: the residual stream and its adds.
//!
//! The stream is the layer's first parameter, the names that alias it (`residual =
//! hidden_states`) and the target of each residual add. A residual add is an assignment
//! `T = a + b [+ c]` to one name in which exactly one operand is a name holding the current
//! stream: the others are the sublayer's output (the branch). It becomes
//! `T, attnres_sources = forward_rewrite.attnres.add(self, SLOT, stream, branch, attnres_sources)`;
//! the signature gets `*attnres_sources` after the stream parameter, the body a first
//! statement `H, attnres_sources = forward_rewrite.attnres.enter(self, H, attnres_sources)`,
//! and every `return H` becomes `return forward_rewrite.attnres.leave(self, H, attnres_sources)`.

use std::collections::BTreeSet;

use ruff_python_ast::{Expr, ExprContext, Operator, Stmt, StmtFunctionDef};
use serde::{Deserialize, Serialize};

use super::reason::Refusal;
use super::splice::Splicer;
use super::{STATE, check_super, drop_doc_decorators};
use crate::syntax::names_in_stmt;

/// How many residual adds a layer runs: adds in order, and `if`s whose branches differ in
/// adds under a static `self.` test (evaluated on the layer instance at run time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotNode {
    Add(u32),
    If {
        /// `None` when both branches run the same number of adds.
        test: Option<String>,
        then: Vec<SlotNode>,
        orelse: Vec<SlotNode>,
    },
}

/// The total adds of a slot tree when it does not depend on a test.
pub fn static_count(tree: &[SlotNode]) -> Option<u32> {
    let mut n = 0;
    for node in tree {
        match node {
            SlotNode::Add(_) => n += 1,
            SlotNode::If {
                test: None, then, ..
            } => n += static_count(then)?,
            SlotNode::If { .. } => return None,
        }
    }
    Some(n)
}

/// A one-line summary of the adds (`2`, or `if self.use_parallel_residual: 1 else 2`).
pub fn describe(tree: &[SlotNode]) -> String {
    if let Some(n) = static_count(tree) {
        return n.to_string();
    }
    let mut fixed = 0;
    for node in tree {
        match node {
            SlotNode::Add(_) => fixed += 1,
            SlotNode::If {
                test: None, then, ..
            } => fixed += static_count(then).unwrap_or(0),
            SlotNode::If {
                test: Some(test),
                then,
                orelse,
            } => {
                let a = fixed + static_count(then).unwrap_or(0);
                let b = fixed + static_count(orelse).unwrap_or(0);
                return format!("if {test}: {a} else {b}");
            }
        }
    }
    fixed.to_string()
}

struct Walker<'s, 't> {
    sp: &'s mut Splicer<'t>,
    current: BTreeSet<String>,
    stale: BTreeSet<String>,
    /// Names that hold the stream on some branches of an `if` and not on others (also in
    /// `stale`, so that every use is refused; reads are reported as `residual-not-seen`).
    maybe: BTreeSet<String>,
    adds: u32,
    diverged: bool,
}

fn flatten_add(expr: &Expr) -> Option<Vec<&Expr>> {
    match expr {
        Expr::BinOp(b) if b.op == Operator::Add => {
            let mut out = flatten_add(&b.left).unwrap_or_else(|| vec![&*b.left]);
            out.extend(flatten_add(&b.right).unwrap_or_else(|| vec![&*b.right]));
            Some(out)
        }
        _ => None,
    }
}

/// `self.a.b`, constants, `not`, `and`/`or` and comparisons of those.
fn is_static_test(expr: &Expr) -> bool {
    match expr {
        Expr::Attribute(a) => {
            let mut base = &*a.value;
            while let Expr::Attribute(inner) = base {
                base = &inner.value;
            }
            matches!(base, Expr::Name(n) if n.id.as_str() == "self")
        }
        Expr::NoneLiteral(_)
        | Expr::BooleanLiteral(_)
        | Expr::NumberLiteral(_)
        | Expr::StringLiteral(_) => true,
        Expr::UnaryOp(u) => u.op == ruff_python_ast::UnaryOp::Not && is_static_test(&u.operand),
        Expr::BoolOp(b) => b.values.iter().all(is_static_test),
        Expr::Compare(c) => is_static_test(&c.left) && c.comparators.iter().all(is_static_test),
        _ => false,
    }
}

fn loads(stmt: &Stmt) -> BTreeSet<String> {
    names_in_stmt(stmt)
        .into_iter()
        .filter(|n| n.ctx == ExprContext::Load)
        .map(|n| n.id.to_string())
        .collect()
}

fn loads_expr(expr: &Expr) -> BTreeSet<String> {
    crate::syntax::names_in_expr(expr)
        .into_iter()
        .filter(|n| n.ctx == ExprContext::Load)
        .map(|n| n.id.to_string())
        .collect()
}

impl Walker<'_, '_> {
    fn line(&self, offset: usize) -> usize {
        self.sp.text[..offset].matches('\n').count() + 1
    }

    fn check_reads(&self, reads: &BTreeSet<String>, at: usize) -> Result<(), Refusal> {
        if let Some(name) = reads.intersection(&self.maybe).next() {
            return Err(Refusal::new(
                "residual-not-seen",
                format!(
                    "line {}: `{name}` holds the stream on some branches of an `if` only",
                    self.line(at)
                ),
            ));
        }
        if let Some(name) = reads.intersection(&self.stale).next() {
            return Err(Refusal::new(
                "stale-residual",
                format!(
                    "line {}: `{name}` is read after a residual add replaced it",
                    self.line(at)
                ),
            ));
        }
        Ok(())
    }

    fn walk(&mut self, stmts: &[Stmt], mut slot: u32) -> Result<(u32, Vec<SlotNode>), Refusal> {
        let mut tree = Vec::new();
        for stmt in stmts {
            let at = Splicer::start(stmt);
            match stmt {
                Stmt::If(s) => {
                    let mut branches: Vec<(Option<&Expr>, &[Stmt])> =
                        vec![(Some(&*s.test), &s.body)];
                    let mut has_else = false;
                    for clause in &s.elif_else_clauses {
                        has_else |= clause.test.is_none();
                        branches.push((clause.test.as_ref(), &clause.body));
                    }
                    for (test, _) in &branches {
                        if let Some(test) = test {
                            self.check_reads(&loads_expr(test), at)?;
                        }
                    }
                    let saved = (self.current.clone(), self.stale.clone(), self.maybe.clone());
                    let mut results = Vec::new();
                    for (_, body) in &branches {
                        self.current = saved.0.clone();
                        self.stale = saved.1.clone();
                        self.maybe = saved.2.clone();
                        let (after, t) = self.walk(body, slot)?;
                        results.push((
                            after,
                            t,
                            self.current.clone(),
                            self.stale.clone(),
                            self.maybe.clone(),
                        ));
                    }
                    if !has_else {
                        results.push((
                            slot,
                            Vec::new(),
                            saved.0.clone(),
                            saved.1.clone(),
                            saved.2.clone(),
                        ));
                    }
                    let mut current = results[0].2.clone();
                    let mut union = BTreeSet::new();
                    let mut stale = BTreeSet::new();
                    let mut maybe = BTreeSet::new();
                    for r in &results {
                        current = current.intersection(&r.2).cloned().collect();
                        union.extend(r.2.iter().cloned());
                        stale.extend(r.3.iter().cloned());
                        maybe.extend(r.4.iter().cloned());
                    }
                    // The stream on some branches only, and stale on none: not replaced by
                    // an add, just not followed.
                    maybe.extend(
                        union
                            .difference(&current)
                            .filter(|n| !stale.contains(*n))
                            .cloned(),
                    );
                    stale.extend(union.difference(&current).cloned());
                    self.current = current;
                    self.stale = stale;
                    self.maybe = maybe;
                    let counts: BTreeSet<u32> = results.iter().map(|r| r.0).collect();
                    let diverges = counts.len() > 1;
                    if diverges && !(results.len() == 2 && is_static_test(&s.test)) {
                        return Err(Refusal::new(
                            "dynamic-sublayers",
                            format!(
                                "line {}: the branches of `if {}` run {} residual adds",
                                self.line(at),
                                self.sp.slice(&*s.test),
                                counts
                                    .iter()
                                    .map(|c| (c - slot).to_string())
                                    .collect::<Vec<_>>()
                                    .join(" / ")
                            ),
                        ));
                    }
                    // `elif`s nest as `else: if`.
                    let mut nested = results.last().map(|r| r.1.clone()).unwrap_or_default();
                    for i in (0..results.len() - 1).rev() {
                        nested = vec![SlotNode::If {
                            test: diverges.then(|| self.sp.slice(&*s.test).to_string()),
                            then: results[i].1.clone(),
                            orelse: nested,
                        }];
                    }
                    if results.iter().any(|r| !r.1.is_empty()) {
                        tree.extend(nested);
                    }
                    if diverges {
                        self.diverged = true;
                        slot = *counts.iter().max().unwrap_or(&slot);
                    } else {
                        slot = results[0].0;
                    }
                }
                Stmt::For(_)
                | Stmt::While(_)
                | Stmt::With(_)
                | Stmt::Try(_)
                | Stmt::Match(_)
                | Stmt::FunctionDef(_)
                | Stmt::ClassDef(_) => {
                    let names = names_in_stmt(stmt);
                    if let Some(n) = names.iter().find(|n| {
                        self.current.contains(n.id.as_str()) || self.stale.contains(n.id.as_str())
                    }) {
                        return Err(Refusal::new(
                            "residual-not-seen",
                            format!(
                                "line {}: the stream `{}` is used inside a compound statement",
                                self.line(at),
                                n.id
                            ),
                        ));
                    }
                }
                Stmt::AugAssign(s) => {
                    // `stream += x` or `x += stream`: an in-place residual add.
                    let adds_stream = s.op == Operator::Add
                        && loads_expr(&s.value)
                            .iter()
                            .any(|n| self.current.contains(n));
                    if adds_stream {
                        return Err(Refusal::new(
                            "residual-not-seen",
                            format!("line {}: in-place add of the stream", self.line(at)),
                        ));
                    }
                    if let Expr::Name(n) = &*s.target
                        && (self.current.contains(n.id.as_str())
                            || self.stale.contains(n.id.as_str()))
                    {
                        return Err(Refusal::new(
                            "residual-not-seen",
                            format!(
                                "line {}: in-place update of the stream `{}`",
                                self.line(at),
                                n.id
                            ),
                        ));
                    }
                    self.check_reads(&loads(stmt), at)?;
                }
                Stmt::Assign(_) | Stmt::AnnAssign(_) => {
                    let (targets, value): (Vec<&Expr>, Option<&Expr>) = match stmt {
                        Stmt::Assign(s) => (s.targets.iter().collect(), Some(&*s.value)),
                        Stmt::AnnAssign(s) => (vec![&*s.target], s.value.as_deref()),
                        _ => unreachable!(),
                    };
                    let Some(value) = value else { continue };
                    let single = match targets.as_slice() {
                        [Expr::Name(n)] => Some(n.id.to_string()),
                        _ => None,
                    };
                    if let (Some(target), Some(operands)) = (&single, flatten_add(value)) {
                        let streams: Vec<&Expr> = operands
                            .iter()
                            .copied()
                            .filter(|o| matches!(o, Expr::Name(n) if self.current.contains(n.id.as_str())))
                            .collect();
                        if streams.len() == 1 {
                            if self.diverged {
                                return Err(Refusal::new(
                                    "dynamic-sublayers",
                                    format!(
                                        "line {}: a residual add after an `if` whose branches differ in adds",
                                        self.line(at)
                                    ),
                                ));
                            }
                            let stream = streams[0];
                            let branches: Vec<&Expr> = operands
                                .iter()
                                .copied()
                                .filter(|o| !std::ptr::eq(*o, stream))
                                .collect();
                            for b in &branches {
                                self.check_reads(&loads_expr(b), at)?;
                            }
                            self.emit_add(stmt, value, target, stream, &branches, slot);
                            tree.push(SlotNode::Add(slot));
                            slot += 1;
                            self.adds += 1;
                            continue;
                        }
                    }
                    self.check_reads(&loads_expr(value), at)?;
                    let alias = match (&single, value) {
                        (Some(_), Expr::Name(v)) => self.current.contains(v.id.as_str()),
                        _ => false,
                    };
                    if alias {
                        let t = single.clone().unwrap_or_default();
                        self.stale.remove(&t);
                        self.maybe.remove(&t);
                        self.current.insert(t);
                    } else {
                        for t in &targets {
                            for n in crate::syntax::names_in_expr(t) {
                                if n.ctx == ExprContext::Store {
                                    self.current.remove(n.id.as_str());
                                    self.stale.remove(n.id.as_str());
                                    self.maybe.remove(n.id.as_str());
                                }
                            }
                        }
                    }
                }
                _ => self.check_reads(&loads(stmt), at)?,
            }
        }
        Ok((slot, tree))
    }

    fn emit_add(
        &mut self,
        stmt: &Stmt,
        value: &Expr,
        target: &str,
        stream: &Expr,
        branches: &[&Expr],
        slot: u32,
    ) {
        let branch = if branches.len() == 1 {
            self.sp.slice(branches[0]).to_string()
        } else {
            branches
                .iter()
                .map(|b| format!("({})", self.sp.slice(*b)))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        let stream_name = self.sp.slice(stream).to_string();
        let call = format!(
            "{target}, {STATE} = forward_rewrite.attnres.add(self, {slot}, {stream_name}, {branch}, {STATE})"
        );
        self.sp
            .replace(Splicer::start(stmt), Splicer::end(value), call);
        let mut stale: BTreeSet<String> = self
            .current
            .iter()
            .filter(|n| *n != target)
            .cloned()
            .collect();
        self.stale.append(&mut stale);
        self.stale.remove(target);
        // What held the stream on some branches is stale now on those (and in `stale`).
        self.maybe.clear();
        self.current = BTreeSet::from([target.to_string()]);
    }
}

/// Emitted layer forward and its slot tree.
pub struct LayerEmit {
    pub source: String,
    pub slots: Vec<SlotNode>,
}

const CROSS: [&str; 3] = [
    "encoder_hidden_states",
    "encoder_outputs",
    "cross_attention_states",
];

pub fn emit(text: &str, func: &StmtFunctionDef) -> Result<LayerEmit, Refusal> {
    check_super(text, func)?;
    let mut sp = Splicer::new(text);
    let params = &func.parameters;
    let all_names = params
        .posonlyargs
        .iter()
        .chain(&params.args)
        .chain(&params.kwonlyargs)
        .map(|p| p.parameter.name.as_str());
    for name in all_names {
        if CROSS.contains(&name) {
            return Err(Refusal::new(
                "cross-attention",
                format!("the layer forward takes `{name}`"),
            ));
        }
    }
    if params.vararg.is_some() || !params.kwonlyargs.is_empty() || !params.posonlyargs.is_empty() {
        return Err(Refusal::new(
            "layer-signature",
            "the layer forward has *args, keyword-only or positional-only parameters",
        ));
    }
    let Some(stream) = params.args.get(1) else {
        return Err(Refusal::new(
            "layer-signature",
            "the layer forward takes no stream argument",
        ));
    };
    let end = Splicer::end(stream).max(stream.default.as_deref().map_or(0, Splicer::end));
    sp.insert(end, format!(", *{STATE}"));
    drop_doc_decorators(&mut sp, func);
    let h = stream.parameter.name.to_string();
    let body = &func.body;
    let first = match body.first() {
        Some(Stmt::Expr(e)) if matches!(&*e.value, Expr::StringLiteral(_)) => 1,
        _ => 0,
    };
    let Some(anchor) = body.get(first) else {
        return Err(Refusal::new("no-residual", "the layer forward has no body"));
    };
    let mut walker = Walker {
        sp: &mut sp,
        current: BTreeSet::from([h.clone()]),
        stale: BTreeSet::new(),
        maybe: BTreeSet::new(),
        adds: 0,
        diverged: false,
    };
    let (_, slots) = walker.walk(&body[first..], 0)?;
    if walker.adds == 0 {
        return Err(Refusal::new(
            "no-residual",
            "no residual add `T = stream + branch` in the layer forward",
        ));
    }
    let current = walker.current.clone();
    let mut statements = Vec::new();
    crate::syntax::walk_statements(body, &mut statements);
    let returns: Vec<_> = statements
        .iter()
        .filter_map(|s| match s {
            Stmt::Return(r) => Some(r),
            _ => None,
        })
        .collect();
    if returns.is_empty() {
        return Err(Refusal::new(
            "layer-return",
            "the layer forward has no return",
        ));
    }
    for r in returns {
        match r.value.as_deref() {
            Some(Expr::Name(n)) if current.contains(n.id.as_str()) => {
                let v = r.value.as_deref().expect("matched");
                sp.replace(
                    Splicer::start(v),
                    Splicer::end(v),
                    format!("forward_rewrite.attnres.leave(self, {}, {STATE})", n.id),
                );
            }
            other => {
                let shown = other.map_or("None".to_string(), |v| sp.slice(v).to_string());
                let line = sp.text[..r.range.start().to_usize()].matches('\n').count() + 1;
                return Err(Refusal::new(
                    "layer-return",
                    format!("line {line}: returns `{shown}`, not the stream"),
                ));
            }
        }
    }
    let at = Splicer::start(anchor);
    let indent = " ".repeat(sp.column(at));
    sp.insert(
        at,
        format!("{h}, {STATE} = forward_rewrite.attnres.enter(self, {h}, {STATE})\n{indent}"),
    );
    Ok(LayerEmit {
        source: sp.finish(),
        slots,
    })
}
