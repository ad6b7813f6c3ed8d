//! The base model's forward: the one loop over its layer list (`self.layers`, or the
//! attribute the base model holds its layers under: GPT-2's `self.h`, `self.layer`, ...).
//!
//! `for L in self.layers[...]:` (or `for i, L in enumerate(self.layers[...])`) whose body
//! calls `L` once, as `H = L(H, kw=...)` with only the stream positional, becomes
//!
//! ```python
//! attnres_sources = forward_rewrite.attnres.begin(self, H)
//! for L in self.layers[...]:
//!     H, *attnres_sources = L(H, *attnres_sources, kw=...)
//! H = forward_rewrite.attnres.finish(self, H, attnres_sources)
//! ```

use std::collections::BTreeSet;

use ruff_python_ast::{Expr, Stmt, StmtFunctionDef};

use super::reason::Refusal;
use super::splice::Splicer;
use super::{STATE, check_super, drop_doc_decorators};
use crate::syntax::{calls_in_stmt, walk_statements};

/// `self.<attr>`, possibly sliced (`self.layers[: n]`): the attribute.
fn self_list(mut expr: &Expr) -> Option<&str> {
    while let Expr::Subscript(s) = expr {
        expr = &s.value;
    }
    crate::syntax::self_attribute(expr)
}

/// The attribute and the loop variable of `for L in self.<attr>[...]` or
/// `for i, L in enumerate(self.<attr>[...])`.
fn list_loop(stmt: &Stmt) -> Option<(&str, &str)> {
    let Stmt::For(f) = stmt else { return None };
    match (&*f.iter, &*f.target) {
        (iter, Expr::Name(n)) => self_list(iter).map(|a| (a, n.id.as_str())),
        (Expr::Call(c), Expr::Tuple(t))
            if crate::syntax::dotted_name(&c.func).as_deref() == Some("enumerate")
                && t.elts.len() == 2 =>
        {
            let attr = c.arguments.args.first().and_then(self_list)?;
            match &t.elts[1] {
                Expr::Name(n) => Some((attr, n.id.as_str())),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The attributes `self.<attr>` that a forward loops over with `for` (in the shapes
/// [`emit`] reads): where a base model may hold its layers.
pub fn loop_attributes(func: &StmtFunctionDef) -> BTreeSet<String> {
    let mut statements = Vec::new();
    walk_statements(&func.body, &mut statements);
    statements
        .iter()
        .filter_map(|s| list_loop(s).map(|(a, _)| a.to_string()))
        .collect()
}

/// Rewrite the base model's forward around its one loop over `self.<layers>`.
pub fn emit(text: &str, func: &StmtFunctionDef, layers: &str) -> Result<String, Refusal> {
    check_super(text, func)?;
    let mut sp = Splicer::new(text);
    let mut statements = Vec::new();
    walk_statements(&func.body, &mut statements);
    let loops: Vec<(&Stmt, &str)> = statements
        .iter()
        .filter_map(|s| match list_loop(s) {
            Some((attr, var)) if attr == layers => Some((*s, var)),
            _ => None,
        })
        .collect();
    let [(stmt, var)] = loops.as_slice() else {
        return Err(Refusal::new(
            "no-layer-loop",
            format!("{} loops over `self.{layers}` in the forward", loops.len()),
        ));
    };
    let Stmt::For(lp) = stmt else { unreachable!() };
    let line = |at: usize| text[..at].matches('\n').count() + 1;
    let calls: usize = lp
        .body
        .iter()
        .map(|s| {
            calls_in_stmt(s)
                .iter()
                .filter(|c| matches!(&*c.func, Expr::Name(n) if n.id.as_str() == *var))
                .count()
        })
        .sum();
    let site = lp.body.iter().find_map(|s| match s {
        Stmt::Assign(a) => match (a.targets.as_slice(), &*a.value) {
            ([Expr::Name(t)], Expr::Call(c))
                if matches!(&*c.func, Expr::Name(n) if n.id.as_str() == *var) =>
            {
                Some((a, t, c))
            }
            _ => None,
        },
        _ => None,
    });
    let Some((_, target, call)) = site.filter(|_| calls == 1) else {
        return Err(Refusal::new(
            "no-layer-loop",
            format!(
                "line {}: the layer is not called once as `H = {var}(H, ...)`",
                line(Splicer::start(*stmt))
            ),
        ));
    };
    let h = target.id.as_str();
    match call.arguments.args.as_ref() {
        [Expr::Name(a)] if a.id.as_str() == h => {}
        _ => {
            return Err(Refusal::new(
                "no-layer-loop",
                format!(
                    "line {}: the layer call passes more than the stream `{h}` positionally",
                    line(Splicer::start(call))
                ),
            ));
        }
    }
    drop_doc_decorators(&mut sp, func);
    let at = Splicer::start(*stmt);
    let indent = " ".repeat(sp.column(at));
    sp.insert(
        at,
        format!("{STATE} = forward_rewrite.attnres.begin(self, {h})\n{indent}"),
    );
    sp.replace(
        Splicer::start(target),
        Splicer::end(target),
        format!("{h}, *{STATE}"),
    );
    sp.insert(Splicer::end(&call.arguments.args[0]), format!(", *{STATE}"));
    sp.insert(
        Splicer::end(*stmt),
        format!("\n{indent}{h} = forward_rewrite.attnres.finish(self, {h}, {STATE})"),
    );
    Ok(sp.finish())
}
