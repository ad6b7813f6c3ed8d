//! The region: from the head call through the end of the `if labels is not None:`
//! statement. Find where the logits come from, check every statement in between (lowered
//! transforms, side-effect-free bindings, nothing else that touches the logits), and check
//! what the forward does with the logits and the region's names afterwards.

use std::collections::HashMap;

use ruff_python_ast::comparable::ComparableExpr;
use ruff_python_ast::{Expr, ExprName, Operator, Stmt, StmtFunctionDef};
use ruff_text_size::Ranged;

use crate::audit::Transform;
use crate::parse::ParsedSource;
use crate::reason::Reason;
use crate::syntax::{
    callee_last_name, calls_in_stmt, expr_mentions, is_not_none_test, names_in_expr, names_in_stmt,
    walk_statements,
};

use super::Refusal;
use super::site::{LossSite, LossStyle};
use super::transforms::{Operand, Step, decompose, reduce};

/// What the matcher found; everything emission needs.
pub struct Region<'a> {
    /// Byte range in the parsed text: the head statement's start to the labels branch's end.
    pub start: usize,
    pub end: usize,
    pub logits: String,
    pub head: String,
    /// The head call's argument (the hidden states fed to the fused op), as text.
    pub hidden_text: String,
    pub transforms: Vec<Transform>,
    /// `vocab_size=` text, with names bound inside the region substituted.
    pub vocab_size: String,
    /// Explicit loss keywords and their texts.
    pub explicit: Vec<(&'static str, String)>,
    /// Names splatted with `**` into the loss call.
    pub splats: Vec<String>,
    /// Expressions whose text is pasted into the fused branch (checked for multi-line strings).
    pub pasted: Vec<&'a Expr>,
    /// The test of a `pretraining_tp` branch around the head: the fused branch runs only
    /// when it is false (the else branch makes the plain head call).
    pub condition: Option<String>,
    /// For the classic style: the statements after the loss that the fused branch repeats;
    /// None for the `self.loss_function` style.
    pub epilogue: Option<Vec<&'a Stmt>>,
}

/// A name bound by a statement the fused branch skips, with its value and its text.
struct Binding<'a> {
    value: &'a Expr,
    text: String,
}

struct Matcher<'a> {
    src: &'a ParsedSource,
    logits: String,
    bindings: HashMap<String, Binding<'a>>,
    /// Expressions pasted into the fused branch (substituted bindings are added when used).
    pasted: std::cell::RefCell<Vec<&'a Expr>>,
    /// Names bound by skipped statements that never run with labels (must not be read later).
    dead_names: Vec<String>,
}

impl<'a> Matcher<'a> {
    /// The text of an expression evaluated in the fused branch: names bound by skipped
    /// statements of the region are replaced by their (parenthesised) values.
    fn text(&self, expr: &'a Expr) -> String {
        let range = expr.range().to_std_range();
        let mut text = self.src.text[range.clone()].to_string();
        let mut names: Vec<&ExprName> = names_in_expr(expr)
            .into_iter()
            .filter(|n| self.bindings.contains_key(n.id.as_str()))
            .collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.range.start()));
        for name in names {
            let r = name.range.to_std_range();
            let binding = &self.bindings[name.id.as_str()];
            self.pasted.borrow_mut().push(binding.value);
            text.replace_range(r.start - range.start..r.end - range.start, &binding.text);
        }
        text
    }

    fn mentions_logits(&self, expr: &Expr) -> bool {
        expr_mentions(expr, &self.logits)
    }

    fn decompose_logits(
        &mut self,
        value: &'a Expr,
        steps: &mut Vec<Step<'a>>,
    ) -> Result<(), String> {
        let logits = self.logits.clone();
        let is_leaf = |e: &Expr| matches!(e, Expr::Name(n) if n.id.as_str() == logits);
        let contains = |e: &Expr| expr_mentions(e, &logits);
        let this: &Matcher<'a> = self;
        let text = |e: &'a Expr| this.text(e);
        decompose(value, &is_leaf, &contains, &text, steps).map(|_| ())?;
        Ok(())
    }
}

fn first_line(src: &ParsedSource, node: &impl Ranged) -> String {
    src.slice(node.range())
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The root name of an attribute / subscript / call chain (`logits` in `logits[0].x`).
fn root_name(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Name(n) => Some(n.id.as_str()),
        Expr::Attribute(a) => root_name(&a.value),
        Expr::Subscript(s) => root_name(&s.value),
        Expr::Call(c) => root_name(&c.func),
        _ => None,
    }
}

/// The root name of a callee made of attributes and subscripts only (`self` in
/// `self.lm_head` or `self.heads[i]`, nothing for `self.lm_head(x).float`).
fn callee_root(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Name(n) => Some(n.id.as_str()),
        Expr::Attribute(a) => callee_root(&a.value),
        Expr::Subscript(s) => callee_root(&s.value),
        _ => None,
    }
}

/// A call of a module of the model: `self.lm_head(...)`, `self.heads[i](...)`.
fn is_self_rooted_call(expr: &Expr) -> bool {
    matches!(expr, Expr::Call(call) if callee_root(&call.func) == Some("self"))
}

fn contains_self_call(expr: &Expr) -> bool {
    crate::syntax::calls_in_expr(expr)
        .iter()
        .any(|c| callee_root(&c.func) == Some("self"))
}

/// Side-effect-free expressions a skipped binding may hold.
pub(super) fn is_pure(expr: &Expr) -> bool {
    match expr {
        Expr::Name(_)
        | Expr::NumberLiteral(_)
        | Expr::StringLiteral(_)
        | Expr::BooleanLiteral(_)
        | Expr::NoneLiteral(_)
        | Expr::EllipsisLiteral(_) => true,
        Expr::Attribute(a) => is_pure(&a.value),
        Expr::Subscript(s) => is_pure(&s.value) && is_pure(&s.slice),
        Expr::Slice(s) => [&s.lower, &s.upper, &s.step]
            .iter()
            .all(|p| p.as_deref().is_none_or(is_pure)),
        Expr::Tuple(t) => t.elts.iter().all(is_pure),
        Expr::BinOp(b) => is_pure(&b.left) && is_pure(&b.right),
        Expr::UnaryOp(u) => is_pure(&u.operand),
        Expr::BoolOp(b) => b.values.iter().all(is_pure),
        Expr::Compare(c) => is_pure(&c.left) && c.comparators.iter().all(is_pure),
        Expr::If(i) => is_pure(&i.test) && is_pure(&i.body) && is_pure(&i.orelse),
        Expr::Call(call) => {
            let args_pure = call.arguments.args.iter().all(is_pure)
                && call.arguments.keywords.iter().all(|k| is_pure(&k.value));
            let callee_ok = match call.func.as_ref() {
                Expr::Name(n) => matches!(n.id.as_str(), "getattr" | "isinstance" | "hasattr"),
                Expr::Attribute(a) => {
                    matches!(a.attr.as_str(), "get_text_config" | "get_decoder")
                        && is_pure(&a.value)
                }
                _ => false,
            };
            args_pure && callee_ok
        }
        _ => false,
    }
}

fn value_needs_parens(expr: &Expr) -> bool {
    !matches!(
        expr,
        Expr::Name(_)
            | Expr::Attribute(_)
            | Expr::Call(_)
            | Expr::Subscript(_)
            | Expr::NumberLiteral(_)
            | Expr::StringLiteral(_)
            | Expr::BooleanLiteral(_)
            | Expr::NoneLiteral(_)
    )
}

/// The worst thing a statement does to the logits: rebinding, mutating, aliasing, reading.
fn touch(stmt: &Stmt, logits: &str) -> Option<(Reason, &'static str)> {
    let mut statements = Vec::new();
    walk_statements(std::slice::from_ref(stmt), &mut statements);
    let mut worst: Option<(Reason, &'static str)> = None;
    let rank = |r: Reason| match r {
        Reason::LogitsRebound => 4,
        Reason::LogitsMutated => 3,
        Reason::LogitsAliased => 2,
        _ => 1,
    };
    let mut note = |r: Reason, what: &'static str| {
        if worst.is_none_or(|(w, _)| rank(r) > rank(w)) {
            worst = Some((r, what));
        }
    };
    for s in statements {
        for name in names_in_stmt(s) {
            if name.id.as_str() == logits && !name.ctx.is_load() {
                note(Reason::LogitsRebound, "rebinds the logits");
            }
        }
        match s {
            Stmt::AugAssign(a) if root_name(&a.target) == Some(logits) => {
                note(Reason::LogitsMutated, "updates the logits in place")
            }
            Stmt::Assign(a) => {
                for t in &a.targets {
                    if matches!(t, Expr::Subscript(_) | Expr::Attribute(_))
                        && root_name(t) == Some(logits)
                    {
                        note(Reason::LogitsMutated, "assigns into the logits");
                    }
                }
                if matches!(&*a.value, Expr::Name(n) if n.id.as_str() == logits) {
                    note(Reason::LogitsAliased, "binds the logits to another name");
                }
            }
            _ => {}
        }
        for call in calls_in_stmt(s) {
            if let Expr::Attribute(attr) = call.func.as_ref()
                && attr.attr.as_str().ends_with('_')
                && !attr.attr.as_str().starts_with('_')
                && root_name(&attr.value) == Some(logits)
            {
                note(
                    Reason::LogitsMutated,
                    "calls an in-place method on the logits",
                );
            }
        }
        if crate::syntax::stmt_mentions(s, logits) {
            note(Reason::LogitsReadBeforeLoss, "reads the logits");
        }
    }
    worst
}

pub fn match_region<'a>(
    src: &'a ParsedSource,
    def: &'a StmtFunctionDef,
    site: &LossSite<'a>,
) -> Result<Region<'a>, Refusal> {
    let logits = site.logits.clone();
    let block = site.block;

    // 1. The origin: the last statement before the labels branch that assigns the logits
    //    from something else than a lowered transform of themselves (a head call may take
    //    them as its input: `logits = self.lm_head(logits)`), or a `pretraining_tp` branch
    //    whose else branch makes the head call.
    let origin_index = (0..site.if_index)
        .rev()
        .find(|&i| origin_value(&block[i], &logits).is_some());
    let Some(origin_index) = origin_index else {
        return Err(Refusal::new(
            Reason::NoHeadCall,
            format!("`{logits}` is not assigned in the block of the labels branch"),
        ));
    };
    let origin = &block[origin_index];
    let (value, condition) = origin_value(origin, &logits).expect("found above");
    let mut skipped_names: Vec<String> = site.branch_names.clone();
    if let Some(test) = condition {
        split_branch(src, origin, test, &logits, &mut skipped_names)?;
    }
    if !contains_self_call(value) {
        return Err(Refusal::new(
            Reason::NoHeadCall,
            format!(
                "the logits come from `{}`, not from a head call",
                first_line(src, value)
            ),
        ));
    }
    let mut matcher = Matcher {
        src,
        logits: logits.clone(),
        bindings: HashMap::new(),
        pasted: Default::default(),
        dead_names: Vec::new(),
    };
    let mut steps: Vec<Step<'a>> = Vec::new();
    let head_call = {
        let is_leaf = |e: &Expr| is_self_rooted_call(e);
        let contains = |e: &Expr| contains_self_call(e);
        let text = |e: &'a Expr| src.slice(e).to_string();
        decompose(value, &is_leaf, &contains, &text, &mut steps).map_err(|why| {
            Refusal::new(
                Reason::HeadCallUnsupported,
                format!(
                    "the head output goes through {why}: `{}`",
                    first_line(src, value)
                ),
            )
        })?
    };
    let Expr::Call(call) = head_call else {
        unreachable!()
    };
    let Some(head) = crate::syntax::self_attribute(&call.func) else {
        return Err(Refusal::new(
            Reason::HeadCallUnsupported,
            format!(
                "the head is not a plain attribute: `{}`",
                first_line(src, &*call.func)
            ),
        ));
    };
    if call.arguments.args.len() != 1
        || !call.arguments.keywords.is_empty()
        || call.arguments.args[0].is_starred_expr()
    {
        return Err(Refusal::new(
            Reason::HeadCallUnsupported,
            format!("self.{head}(...) takes other arguments than the hidden states"),
        ));
    }
    let hidden = &call.arguments.args[0];
    matcher.pasted.borrow_mut().push(hidden);
    // Scale operands of the head statement are evaluated in the fused branch.
    for step in &steps {
        if let Step::Mul(Operand { expr, .. }) | Step::Div(Operand { expr, .. }) = step {
            matcher.pasted.borrow_mut().push(expr);
        }
    }

    // 2. The statements between the head call and the labels branch.
    for stmt in &block[origin_index + 1..site.if_index] {
        between(&mut matcher, stmt, &mut steps)?;
    }
    let transforms = reduce(&steps)?;

    // 3. The loss's other arguments are evaluated in the fused branch.
    let (loss_exprs, splat_exprs): (Vec<(&'static str, &'a Expr)>, &[&'a Expr]) = match &site.style
    {
        LossStyle::LossFunction(args) => {
            let mut exprs = vec![("vocab_size", args.vocab_size)];
            exprs.extend(args.explicit.iter().copied());
            (exprs, &args.splats)
        }
        LossStyle::CrossEntropy(ce) => {
            let mut exprs = Vec::new();
            exprs.extend(ce.vocab.map(|v| ("vocab_size", v)));
            exprs.extend(ce.ignore_index.map(|v| ("ignore_index", v)));
            exprs.extend(ce.label_smoothing.map(|v| ("label_smoothing", v)));
            (exprs, &[])
        }
    };
    for (name, expr) in &loss_exprs {
        if matcher.mentions_logits(expr) {
            return Err(Refusal::new(
                Reason::LossCallUnsupported,
                format!("`{name}=` of the loss call reads the logits"),
            ));
        }
        matcher.pasted.borrow_mut().push(expr);
    }
    let mut keywords: Vec<(&'static str, String)> = loss_exprs
        .iter()
        .map(|(k, e)| (*k, matcher.text(e)))
        .collect();
    let vocab_size = match keywords.first() {
        Some(("vocab_size", _)) => keywords.remove(0).1,
        _ => format!("self.{head}.out_features"),
    };
    let explicit = keywords;
    let splats = splat_exprs
        .iter()
        .map(|e| src.slice(*e).to_string())
        .collect();
    let epilogue = match &site.style {
        LossStyle::LossFunction(_) => None,
        LossStyle::CrossEntropy(ce) => {
            for stmt in &ce.epilogue {
                if let Some(name) = names_in_stmt(stmt)
                    .iter()
                    .find(|n| n.id != site.target && matcher.bindings.contains_key(n.id.as_str()))
                {
                    return Err(Refusal::new(
                        Reason::RegionStatementUnsupported,
                        format!(
                            "`{}` is bound between the head call and the loss and read after the loss",
                            name.id
                        ),
                    ));
                }
            }
            Some(ce.epilogue.clone())
        }
    };

    let start = origin.start().to_usize();
    let end = site.labels_if.end().to_usize();

    // 4. After the region.
    skipped_names.extend(matcher.bindings.keys().cloned());
    skipped_names.extend(matcher.dead_names.iter().cloned());
    check_after(
        src,
        def,
        end,
        &logits,
        &site.target,
        &skipped_names,
        !site.labels_rebinders.is_empty(),
    )?;

    Ok(Region {
        start,
        end,
        logits,
        head: head.to_string(),
        hidden_text: src.slice(hidden).to_string(),
        transforms,
        vocab_size,
        explicit,
        splats,
        pasted: matcher.pasted.into_inner(),
        condition: condition.map(|test| src.slice(test).to_string()),
        epilogue,
    })
}

/// Classify one statement between the head call and the labels branch.
fn between<'a>(
    m: &mut Matcher<'a>,
    stmt: &'a Stmt,
    steps: &mut Vec<Step<'a>>,
) -> Result<(), Refusal> {
    let logits = m.logits.clone();
    if !crate::syntax::stmt_mentions(stmt, &logits) {
        return skipped_binding(m, stmt);
    }
    match stmt {
        Stmt::Assign(a)
            if a.targets.len() == 1
                && matches!(&a.targets[0], Expr::Name(n) if n.id.as_str() == logits) =>
        {
            m.decompose_logits(&a.value, steps).map_err(|why| {
                Refusal::new(
                    Reason::LogitsRebound,
                    format!("`{}`: {why}", first_line(m.src, stmt)),
                )
            })
        }
        Stmt::AugAssign(a) if matches!(&*a.target, Expr::Name(n) if n.id.as_str() == logits) => {
            if matches!(a.op, Operator::Mult | Operator::Div) && !expr_mentions(&a.value, &logits) {
                let operand = Operand {
                    expr: &a.value,
                    text: m.text(&a.value),
                };
                m.pasted.borrow_mut().push(&a.value);
                steps.push(if a.op == Operator::Mult {
                    Step::Mul(operand)
                } else {
                    Step::Div(operand)
                });
                Ok(())
            } else {
                Err(Refusal::new(
                    Reason::LogitsMutated,
                    format!("`{}`", first_line(m.src, stmt)),
                ))
            }
        }
        Stmt::If(s) => conditional_transform(m, s, stmt, steps),
        _ => {
            let (reason, what) =
                touch(stmt, &logits).unwrap_or((Reason::LogitsReadBeforeLoss, "reads the logits"));
            Err(Refusal::new(
                reason,
                format!("`{}` {what} before the loss", first_line(m.src, stmt)),
            ))
        }
    }
}

/// A statement that does not touch the logits: the fused branch skips it, so it must be a
/// plain binding of a side-effect-free value (its name may be used by the lowered
/// transforms and the loss arguments, which get its value substituted).
fn skipped_binding<'a>(m: &mut Matcher<'a>, stmt: &'a Stmt) -> Result<(), Refusal> {
    let (target, value) = match stmt {
        Stmt::Pass(_) => return Ok(()),
        // `if labels is None ...: logger.warning_once(...)`: never runs in the fused branch.
        Stmt::If(_) if dead_when_labels_given(stmt) => {
            for name in crate::syntax::stores_in_stmt(stmt) {
                m.dead_names.push(name.id.to_string());
            }
            return Ok(());
        }
        Stmt::Assign(a) if a.targets.len() == 1 => (&a.targets[0], Some(&*a.value)),
        Stmt::AnnAssign(a) => (&*a.target, a.value.as_deref()),
        _ => {
            return Err(Refusal::new(
                Reason::RegionStatementUnsupported,
                format!(
                    "`{}` between the head call and the loss is not a plain binding",
                    first_line(m.src, stmt)
                ),
            ));
        }
    };
    let (Expr::Name(name), Some(value)) = (target, value) else {
        return Err(Refusal::new(
            Reason::RegionStatementUnsupported,
            format!(
                "`{}` between the head call and the loss is not a plain binding",
                first_line(m.src, stmt)
            ),
        ));
    };
    if !is_pure(value) {
        return Err(Refusal::new(
            Reason::RegionStatementUnsupported,
            format!(
                "`{}` between the head call and the loss may have side effects",
                first_line(m.src, stmt)
            ),
        ));
    }
    bind(m, name.id.as_str(), value)
}

fn bind<'a>(m: &mut Matcher<'a>, name: &str, value: &'a Expr) -> Result<(), Refusal> {
    if m.bindings.contains_key(name) {
        return Err(Refusal::new(
            Reason::RegionStatementUnsupported,
            format!("`{name}` is bound twice in the region"),
        ));
    }
    let mut text = m.text(value);
    if value_needs_parens(value) {
        text = format!("({text})");
    }
    m.bindings.insert(name.to_string(), Binding { value, text });
    Ok(())
}

/// `if X is not None:` whose body is one lowered transform by X (Gemma's soft-cap).
fn conditional_transform<'a>(
    m: &mut Matcher<'a>,
    s: &'a ruff_python_ast::StmtIf,
    stmt: &'a Stmt,
    steps: &mut Vec<Step<'a>>,
) -> Result<(), Refusal> {
    let logits = m.logits.clone();
    let fail = |m: &Matcher<'a>| {
        let (reason, what) =
            touch(stmt, &logits).unwrap_or((Reason::LogitsReadBeforeLoss, "reads the logits"));
        Refusal::new(
            reason,
            format!("`{}` {what} before the loss", first_line(m.src, stmt)),
        )
    };
    if expr_mentions(&s.test, &logits) {
        return Err(fail(m));
    }
    let Some(subject) = is_not_none_test(&s.test) else {
        return Err(body_or(
            m,
            s,
            stmt,
            Reason::TransformUnsupported,
            "a transform under a condition other than `X is not None`",
        ));
    };
    if !s.elif_else_clauses.is_empty() {
        return Err(body_or(
            m,
            s,
            stmt,
            Reason::TransformUnsupported,
            "a conditional transform with an else branch",
        ));
    }
    // The walrus form binds the name the body uses.
    let subject: &'a Expr = match subject {
        Expr::Named(named) => {
            let Expr::Name(target) = &*named.target else {
                return Err(fail(m));
            };
            bind(m, target.id.as_str(), &named.value)?;
            &named.target
        }
        other => {
            if !is_pure(other) {
                return Err(fail(m));
            }
            other
        }
    };
    let mut inner: Vec<Step<'a>> = Vec::new();
    for body_stmt in &s.body {
        match body_stmt {
            Stmt::Assign(a)
                if a.targets.len() == 1
                    && matches!(&a.targets[0], Expr::Name(n) if n.id.as_str() == logits) =>
            {
                if m.decompose_logits(&a.value, &mut inner).is_err() {
                    return Err(fail(m));
                }
            }
            Stmt::AugAssign(a)
                if matches!(&*a.target, Expr::Name(n) if n.id.as_str() == logits)
                    && matches!(a.op, Operator::Mult | Operator::Div)
                    && !expr_mentions(&a.value, &logits) =>
            {
                let operand = Operand {
                    expr: &a.value,
                    text: m.text(&a.value),
                };
                inner.push(if a.op == Operator::Mult {
                    Step::Mul(operand)
                } else {
                    Step::Div(operand)
                });
            }
            _ => return Err(fail(m)),
        }
    }
    let reduced = reduce(&inner)?;
    let [transform] = reduced.as_slice() else {
        return Err(Refusal::new(
            Reason::TransformUnsupported,
            format!(
                "`{}` applies {} transforms under one condition",
                first_line(m.src, stmt),
                reduced.len()
            ),
        ));
    };
    // The operand must be the tested value, so that None means "off" in both.
    let operand = inner.iter().find_map(|step| match step {
        Step::Mul(o) | Step::Div(o) => Some(o.expr),
        _ => None,
    });
    let same = operand.is_some_and(|o| ComparableExpr::from(o) == ComparableExpr::from(subject));
    if !same || inner.iter().any(|step| matches!(step, Step::Mul(o) | Step::Div(o) if ComparableExpr::from(o.expr) != ComparableExpr::from(subject))) {
        return Err(Refusal::new(
            Reason::TransformUnsupported,
            format!("`{}`: the transform's scale is not the tested value", first_line(m.src, stmt)),
        ));
    }
    m.pasted.borrow_mut().push(subject);
    steps.push(Step::Lowered(transform.kind, m.text(subject)));
    Ok(())
}

fn body_or(
    m: &Matcher<'_>,
    _s: &ruff_python_ast::StmtIf,
    stmt: &Stmt,
    reason: Reason,
    what: &str,
) -> Refusal {
    match touch(stmt, &m.logits) {
        Some((r @ (Reason::LogitsRebound | Reason::LogitsMutated | Reason::LogitsAliased), w))
            if !only_transform_statements(stmt, &m.logits) =>
        {
            Refusal::new(
                r,
                format!("`{}` {w} before the loss", first_line(m.src, stmt)),
            )
        }
        _ => Refusal::new(reason, format!("`{}`: {what}", first_line(m.src, stmt))),
    }
}

/// Whether every statement inside a compound statement is a `logits = f(logits)` made of
/// multiply / divide / tanh steps (so the problem is the condition, not the body).
fn only_transform_statements(stmt: &Stmt, logits: &str) -> bool {
    let mut statements = Vec::new();
    walk_statements(std::slice::from_ref(stmt), &mut statements);
    statements.iter().skip(1).all(|s| match s {
        Stmt::Assign(a) => {
            a.targets.len() == 1
                && matches!(&a.targets[0], Expr::Name(n) if n.id.as_str() == logits)
                && {
                    let mut steps = Vec::new();
                    let is_leaf = |e: &Expr| matches!(e, Expr::Name(n) if n.id.as_str() == logits);
                    let contains = |e: &Expr| expr_mentions(e, logits);
                    let text = |_: &Expr| String::new();
                    decompose(&a.value, &is_leaf, &contains, &text, &mut steps).is_ok()
                }
        }
        Stmt::AugAssign(a) => {
            matches!(&*a.target, Expr::Name(n) if n.id.as_str() == logits)
                && matches!(a.op, Operator::Mult | Operator::Div)
        }
        _ => false,
    })
}

/// After the region: the logits may only be returned (directly, or through a tuple bound to
/// a name that is itself only returned); names bound by skipped statements must not be used.
fn check_after(
    src: &ParsedSource,
    def: &StmtFunctionDef,
    region_end: usize,
    logits: &str,
    loss_target: &str,
    skipped_names: &[String],
    moves_labels: bool,
) -> Result<(), Refusal> {
    let mut statements = Vec::new();
    walk_statements(&def.body, &mut statements);
    let after: Vec<&Stmt> = statements
        .into_iter()
        .filter(|s| s.start().to_usize() >= region_end)
        .collect();
    for (i, stmt) in after.iter().enumerate() {
        let header = header_names(stmt);
        for name in &header {
            if name.ctx.is_load()
                && skipped_names.iter().any(|n| n == name.id.as_str())
                && name.id.as_str() != loss_target
            {
                return Err(Refusal::new(
                    Reason::RegionStatementUnsupported,
                    format!(
                        "`{}` is bound in the region the fused branch skips and used at line {}",
                        name.id,
                        src.line_of(name.start().to_usize())
                    ),
                ));
            }
        }
        if moves_labels && header.iter().any(|n| n.id.as_str() == "labels") {
            return Err(Refusal::new(
                Reason::LabelsNotPlain,
                format!(
                    "`labels` is moved to the logits' device in the labels branch and used again at line {}",
                    src.line_of(stmt.start().to_usize())
                ),
            ));
        }
        let reads_logits = header
            .iter()
            .any(|n| n.ctx.is_load() && n.id.as_str() == logits);
        if !reads_logits {
            continue;
        }
        let line = src.line_of(stmt.start().to_usize());
        match stmt {
            Stmt::Return(r)
                if r.value
                    .as_deref()
                    .is_none_or(|v| returned_plainly(v, logits, true)) => {}
            Stmt::Assign(a)
                if a.targets.len() == 1
                    && matches!(&a.targets[0], Expr::Name(n) if n.id.as_str() != logits)
                    && returned_plainly(&a.value, logits, false) =>
            {
                let Expr::Name(alias) = &a.targets[0] else {
                    unreachable!()
                };
                // The tuple may be re-wrapped (`output = (aux_loss,) + output`) before it is returned.
                let alias_name = alias.id.as_str();
                let only_returned = after[i + 1..].iter().all(|later| {
                    let uses = header_names(later)
                        .into_iter()
                        .any(|n| n.id == alias.id && n.ctx.is_load());
                    !uses
                        || match later {
                            Stmt::Return(r) => r.value.as_deref().is_none_or(|v| {
                                returned_plainly(v, alias_name, true)
                                    || tuple_returned(v, alias_name)
                            }),
                            Stmt::Assign(a) => {
                                matches!(a.targets.as_slice(), [Expr::Name(n)] if n.id == alias.id)
                                    && tuple_returned(&a.value, alias_name)
                            }
                            _ => false,
                        }
                });
                if !only_returned {
                    return Err(Refusal::new(
                        Reason::LogitsReadAfterLoss,
                        format!(
                            "`{}` (line {line}) keeps the logits for something else than returning them",
                            alias.id
                        ),
                    ));
                }
            }
            _ => {
                return Err(Refusal::new(
                    Reason::LogitsReadAfterLoss,
                    format!(
                        "`{}` (line {line}) reads the logits after the loss",
                        first_line(src, *stmt)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Whether a tuple holding the logits is only concatenated with other tuples or handed back.
fn tuple_returned(expr: &Expr, alias: &str) -> bool {
    match expr {
        Expr::Name(_) => true,
        Expr::Tuple(t) => t.elts.iter().all(|e| tuple_returned(e, alias)),
        Expr::BinOp(b) if b.op == Operator::Add => {
            tuple_returned(&b.left, alias) && tuple_returned(&b.right, alias)
        }
        Expr::If(i) => {
            !expr_mentions(&i.test, alias)
                && tuple_returned(&i.body, alias)
                && tuple_returned(&i.orelse, alias)
        }
        other => !expr_mentions(other, alias),
    }
}

/// Whether the logits appear in `expr` only as a value handed back as is: the whole
/// expression (when `direct` is allowed), a tuple element, an argument of a call (the
/// output dataclass), a branch of a conditional expression, or inside a tuple concatenation.
fn returned_plainly(expr: &Expr, logits: &str, direct: bool) -> bool {
    match expr {
        Expr::Name(n) if n.id.as_str() == logits => direct,
        Expr::Tuple(t) => t.elts.iter().all(|e| returned_plainly(e, logits, true)),
        Expr::Call(c) => {
            // An output dataclass: `CausalLMOutputWithPast(loss=loss, logits=logits, ...)`.
            let constructs_class = callee_last_name(&c.func)
                .is_some_and(|n| n.starts_with(|ch: char| ch.is_ascii_uppercase()));
            constructs_class
                && !expr_mentions(&c.func, logits)
                && c.arguments
                    .args
                    .iter()
                    .all(|e| returned_plainly(e, logits, true))
                && c.arguments
                    .keywords
                    .iter()
                    .all(|k| returned_plainly(&k.value, logits, true))
        }
        Expr::BinOp(b) if b.op == Operator::Add => {
            returned_plainly(&b.left, logits, false) && returned_plainly(&b.right, logits, false)
        }
        Expr::If(i) => {
            !expr_mentions(&i.test, logits)
                && returned_plainly(&i.body, logits, direct)
                && returned_plainly(&i.orelse, logits, direct)
        }
        Expr::Starred(s) => returned_plainly(&s.value, logits, false),
        other => !expr_mentions(other, logits),
    }
}

/// The names of a simple statement, or of a compound statement's header only.
fn header_names(stmt: &Stmt) -> Vec<&ExprName> {
    let exprs: Vec<&Expr> = match stmt {
        Stmt::If(s) => {
            let mut v = vec![&*s.test];
            v.extend(s.elif_else_clauses.iter().filter_map(|c| c.test.as_ref()));
            v
        }
        Stmt::For(s) => vec![&*s.target, &*s.iter],
        Stmt::While(s) => vec![&*s.test],
        Stmt::With(s) => s
            .items
            .iter()
            .flat_map(|i| std::iter::once(&i.context_expr).chain(i.optional_vars.as_deref()))
            .collect(),
        Stmt::Match(s) => vec![&*s.subject],
        Stmt::Try(_) => vec![],
        Stmt::FunctionDef(_) | Stmt::ClassDef(_) => return names_in_stmt(stmt),
        _ => return names_in_stmt(stmt),
    };
    exprs.into_iter().flat_map(names_in_expr).collect()
}

/// The value a statement assigns to the logits when it is the origin of the region (and the
/// test of a `pretraining_tp` branch around it), or None when it is not.
fn origin_value<'a>(stmt: &'a Stmt, logits: &str) -> Option<(&'a Expr, Option<&'a Expr>)> {
    let assigned = |stmt: &'a Stmt| -> Option<&'a Expr> {
        match stmt {
            Stmt::Assign(a)
                if a.targets.len() == 1
                    && matches!(&a.targets[0], Expr::Name(n) if n.id.as_str() == logits) =>
            {
                Some(&a.value)
            }
            Stmt::AnnAssign(a) if matches!(&*a.target, Expr::Name(n) if n.id.as_str() == logits) => {
                a.value.as_deref()
            }
            _ => None,
        }
    };
    if let Stmt::If(s) = stmt
        && let [clause] = s.elif_else_clauses.as_slice()
        && clause.test.is_none()
        && let Some(value) = clause.body.last().and_then(assigned)
        && is_origin(value, logits)
        && crate::syntax::stores_in_stmt(stmt)
            .iter()
            .any(|n| n.id.as_str() == logits)
    {
        return Some((value, Some(&s.test)));
    }
    let value = assigned(stmt)?;
    is_origin(value, logits).then_some((value, None))
}

/// A fresh value of the logits: it does not read them, or it is a head call that takes them
/// as (part of) its input.
fn is_origin(value: &Expr, logits: &str) -> bool {
    if !expr_mentions(value, logits) {
        return true;
    }
    let mut steps = Vec::new();
    let is_leaf = |e: &Expr| is_self_rooted_call(e);
    let contains = |e: &Expr| contains_self_call(e);
    let text = |_: &Expr| String::new();
    matches!(
        decompose(value, &is_leaf, &contains, &text, &mut steps),
        Ok(Expr::Call(call)) if call.arguments.args.iter().any(|a| expr_mentions(a, logits))
    )
}

/// A `pretraining_tp` branch around the head call: `if TEST: <logits from weight slices>
/// else: [dead statements] logits = self.head(h)`. The fused branch runs only when TEST is
/// false, so the if body needs no analysis; TEST must be side-effect free (it is evaluated by
/// the fused condition instead), and the names the branch binds must not be read later.
fn split_branch(
    src: &ParsedSource,
    stmt: &Stmt,
    test: &Expr,
    logits: &str,
    skipped: &mut Vec<String>,
) -> Result<(), Refusal> {
    let Stmt::If(s) = stmt else {
        unreachable!("origin_value gives a test only for an if")
    };
    if !is_pure(test) || expr_mentions(test, logits) {
        return Err(Refusal::new(
            Reason::RegionStatementUnsupported,
            format!(
                "`{}` around the head call is not a side-effect-free test",
                first_line(src, test)
            ),
        ));
    }
    let else_body = &s.elif_else_clauses[0].body;
    for dead in &else_body[..else_body.len() - 1] {
        if !dead_when_labels_given(dead) {
            return Err(Refusal::new(
                Reason::RegionStatementUnsupported,
                format!(
                    "`{}` before the head call in the else branch runs with labels too",
                    first_line(src, dead)
                ),
            ));
        }
    }
    for name in crate::syntax::stores_in_stmt(stmt) {
        if name.id.as_str() != logits && !skipped.iter().any(|n| n == name.id.as_str()) {
            skipped.push(name.id.to_string());
        }
    }
    Ok(())
}

/// `if labels is None [and ...]:` - never runs in the fused branch (labels is given there).
fn dead_when_labels_given(stmt: &Stmt) -> bool {
    let Stmt::If(s) = stmt else { return false };
    let is_labels_none = |e: &Expr| {
        matches!(e, Expr::Compare(c)
            if c.ops.as_ref() == [ruff_python_ast::CmpOp::Is]
                && matches!(c.left.as_ref(), Expr::Name(n) if n.id.as_str() == "labels")
                && c.comparators[0].is_none_literal_expr())
    };
    s.elif_else_clauses.is_empty()
        && match s.test.as_ref() {
            // Only a leading test short-circuits before anything else is evaluated.
            Expr::BoolOp(b) if b.op == ruff_python_ast::BoolOp::And => {
                b.values.first().is_some_and(is_labels_none)
            }
            other => is_labels_none(other),
        }
}
