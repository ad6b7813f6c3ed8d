//! The base model's forward: the one loop over `self.layers`.
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

use ruff_python_ast::{Expr, Stmt, StmtFunctionDef};

use super::reason::Refusal;
use super::splice::Splicer;
use super::{STATE, check_super, drop_doc_decorators};
use crate::syntax::{calls_in_stmt, walk_statements};

fn is_self_layers(mut expr: &Expr) -> bool {
    while let Expr::Subscript(s) = expr {
        expr = &s.value;
    }
    crate::syntax::self_attribute(expr) == Some("layers")
}

/// The loop variable of a loop over `self.layers`.
fn layer_var(stmt: &Stmt) -> Option<&str> {
    let Stmt::For(f) = stmt else { return None };
    match (&*f.iter, &*f.target) {
        (iter, Expr::Name(n)) if is_self_layers(iter) => Some(n.id.as_str()),
        (Expr::Call(c), Expr::Tuple(t))
            if crate::syntax::dotted_name(&c.func).as_deref() == Some("enumerate")
                && c.arguments.args.first().is_some_and(is_self_layers)
                && t.elts.len() == 2 =>
        {
            match &t.elts[1] {
                Expr::Name(n) => Some(n.id.as_str()),
                _ => None,
            }
        }
        _ => None,
    }
}

pub fn emit(text: &str, func: &StmtFunctionDef) -> Result<String, Refusal> {
    check_super(text, func)?;
    let mut sp = Splicer::new(text);
    let mut statements = Vec::new();
    walk_statements(&func.body, &mut statements);
    let loops: Vec<(&Stmt, &str)> = statements
        .iter()
        .filter_map(|s| layer_var(s).map(|v| (*s, v)))
        .collect();
    let [(stmt, var)] = loops.as_slice() else {
        return Err(Refusal::new(
            "no-layer-loop",
            format!("{} loops over `self.layers` in the forward", loops.len()),
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
