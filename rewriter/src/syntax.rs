//! Small queries over ruff's AST shared by the index and the passes.

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ExprContext, ExprName, Stmt, StmtFunctionDef};
use ruff_text_size::{Ranged, TextRange};

/// The nodes `pick` selects among every expression below a statement or an expression
/// (itself included), in source order: the one visitor behind the `*_in_*` queries.
struct Collect<'a, T, F> {
    pick: F,
    found: Vec<&'a T>,
}

impl<'a, T, F: FnMut(&'a Expr) -> Option<&'a T>> Visitor<'a> for Collect<'a, T, F> {
    fn visit_expr(&mut self, expr: &'a Expr) {
        if let Some(node) = (self.pick)(expr) {
            self.found.push(node);
        }
        visitor::walk_expr(self, expr);
    }
}

/// Where a query starts: a statement or an expression.
enum Root<'a> {
    Stmt(&'a Stmt),
    Expr(&'a Expr),
}

impl<'a> From<&'a Stmt> for Root<'a> {
    fn from(stmt: &'a Stmt) -> Self {
        Root::Stmt(stmt)
    }
}

impl<'a> From<&'a Expr> for Root<'a> {
    fn from(expr: &'a Expr) -> Self {
        Root::Expr(expr)
    }
}

fn collect<'a, T>(
    root: impl Into<Root<'a>>,
    pick: impl FnMut(&'a Expr) -> Option<&'a T>,
) -> Vec<&'a T> {
    let mut c = Collect {
        pick,
        found: Vec::new(),
    };
    match root.into() {
        Root::Stmt(stmt) => c.visit_stmt(stmt),
        Root::Expr(expr) => c.visit_expr(expr),
    }
    c.found
}

/// Every `Name` node inside an expression or statement (loads and stores), in source order.
pub fn names_in_expr(expr: &Expr) -> Vec<&ExprName> {
    collect(expr, Expr::as_name_expr)
}

pub fn names_in_stmt(stmt: &Stmt) -> Vec<&ExprName> {
    collect(stmt, Expr::as_name_expr)
}

/// Whether `expr` mentions the name `name` anywhere.
pub fn expr_mentions(expr: &Expr, name: &str) -> bool {
    names_in_expr(expr).iter().any(|n| n.id.as_str() == name)
}

pub fn stmt_mentions(stmt: &Stmt, name: &str) -> bool {
    names_in_stmt(stmt).iter().any(|n| n.id.as_str() == name)
}

/// Names a statement binds (assignment targets, walrus targets, loop targets, imports,
/// nested defs) - `Store` and `Del` contexts, anywhere inside it.
pub fn stores_in_stmt(stmt: &Stmt) -> Vec<&ExprName> {
    names_in_stmt(stmt)
        .into_iter()
        .filter(|n| n.ctx != ExprContext::Load)
        .collect()
}

/// An integer literal, negated or not (`2`, `-1`), as i64.
pub fn int_literal(expr: &Expr) -> Option<i64> {
    match expr {
        Expr::NumberLiteral(n) => match &n.value {
            ruff_python_ast::Number::Int(i) => i.as_i64(),
            _ => None,
        },
        Expr::UnaryOp(u) if u.op == ruff_python_ast::UnaryOp::USub => {
            int_literal(&u.operand).map(|v| -v)
        }
        _ => None,
    }
}

/// `self.<attr>` → `attr`.
pub fn self_attribute(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Attribute(attr) => match attr.value.as_ref() {
            Expr::Name(name) if name.id.as_str() == "self" => Some(attr.attr.as_str()),
            _ => None,
        },
        _ => None,
    }
}

/// The dotted name of a `Name` / `Attribute` chain (`torch.nn.Linear`), or None.
pub fn dotted_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Name(name) => Some(name.id.to_string()),
        Expr::Attribute(attr) => Some(format!(
            "{}.{}",
            dotted_name(&attr.value)?,
            attr.attr.as_str()
        )),
        _ => None,
    }
}

/// The last segment of a `Name` / `Attribute` callee, looking through a call
/// (`@auto_docstring`, `@auto_docstring(...)`, `@utils.auto_docstring`).
pub fn callee_last_name(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Name(name) => Some(name.id.as_str()),
        Expr::Attribute(attr) => Some(attr.attr.as_str()),
        Expr::Call(call) => callee_last_name(&call.func),
        _ => None,
    }
}

/// Decorator names that only touch docstrings. Every patch drops them: the runtime executes
/// a patched function outside its class, where `@auto_docstring` takes a method for a class
/// (its qualname has no dot) and fails reading the model's folder off the patch's file
/// name; the installer gives the patch the original's docstring instead.
pub const DOCSTRING_DECORATORS: [&str; 6] = [
    "auto_docstring",
    "add_start_docstrings_to_model_forward",
    "add_start_docstrings",
    "replace_return_docstrings",
    "add_code_sample_docstrings",
    "add_end_docstrings",
];

/// Whether a decorator is one of [`DOCSTRING_DECORATORS`] (called or not, dotted or not).
pub fn is_docstring_decorator(expr: &Expr) -> bool {
    callee_last_name(expr).is_some_and(|name| DOCSTRING_DECORATORS.contains(&name))
}

/// `NAME is not None` → `NAME`'s expression; also `(n := E) is not None`.
pub fn is_not_none_test(expr: &Expr) -> Option<&Expr> {
    let Expr::Compare(compare) = expr else {
        return None;
    };
    if compare.ops.len() != 1 || compare.ops[0] != ruff_python_ast::CmpOp::IsNot {
        return None;
    }
    if !compare.comparators[0].is_none_literal_expr() {
        return None;
    }
    Some(&compare.left)
}

/// The `def` statements directly in a class body, by name.
pub fn method<'a>(body: &'a [Stmt], name: &str) -> Option<&'a StmtFunctionDef> {
    body.iter().rev().find_map(|stmt| match stmt {
        Stmt::FunctionDef(def) if def.name.as_str() == name => Some(def),
        _ => None,
    })
}

/// The child statement blocks of a compound statement (not descending into nested scopes).
pub fn child_blocks(stmt: &Stmt) -> Vec<&[Stmt]> {
    match stmt {
        Stmt::If(s) => {
            let mut blocks = vec![&s.body[..]];
            blocks.extend(s.elif_else_clauses.iter().map(|c| &c.body[..]));
            blocks
        }
        Stmt::For(s) => vec![&s.body[..], &s.orelse[..]],
        Stmt::While(s) => vec![&s.body[..], &s.orelse[..]],
        Stmt::With(s) => vec![&s.body[..]],
        Stmt::Try(s) => {
            let mut blocks = vec![&s.body[..]];
            for handler in &s.handlers {
                let ruff_python_ast::ExceptHandler::ExceptHandler(h) = handler;
                blocks.push(&h.body[..]);
            }
            blocks.push(&s.orelse[..]);
            blocks.push(&s.finalbody[..]);
            blocks
        }
        Stmt::Match(s) => s.cases.iter().map(|c| &c.body[..]).collect(),
        _ => Vec::new(),
    }
}

/// The chain of (block, index) from `body` down to the innermost statement containing
/// `target`, not descending into nested functions or classes.
pub fn statement_path(body: &[Stmt], target: TextRange) -> Vec<(&[Stmt], usize)> {
    let mut path = Vec::new();
    let mut block = body;
    'descend: loop {
        for (index, stmt) in block.iter().enumerate() {
            if stmt.range().contains_range(target) {
                path.push((block, index));
                if matches!(stmt, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
                    return path;
                }
                for child in child_blocks(stmt) {
                    if child.iter().any(|s| s.range().contains_range(target)) {
                        block = child;
                        continue 'descend;
                    }
                }
                return path;
            }
        }
        return path;
    }
}

/// Every simple statement (and compound statement header) in a body, recursively, in
/// source order, not descending into nested scopes. Compound statements are yielded too.
pub fn walk_statements<'a>(body: &'a [Stmt], out: &mut Vec<&'a Stmt>) {
    for stmt in body {
        out.push(stmt);
        if !matches!(stmt, Stmt::FunctionDef(_) | Stmt::ClassDef(_)) {
            for child in child_blocks(stmt) {
                walk_statements(child, out);
            }
        }
    }
}

/// All calls in an expression/statement, for finding `self.loss_function(...)` and friends.
pub fn calls_in_stmt(stmt: &Stmt) -> Vec<&ruff_python_ast::ExprCall> {
    collect(stmt, Expr::as_call_expr)
}

/// All attribute accesses in a statement.
pub fn attributes_in_stmt(stmt: &Stmt) -> Vec<&ruff_python_ast::ExprAttribute> {
    collect(stmt, Expr::as_attribute_expr)
}

/// Call `f` on every subscript expression in a statement.
pub fn for_each_subscript<'a>(
    stmt: &'a Stmt,
    f: &mut dyn FnMut(&'a ruff_python_ast::ExprSubscript),
) {
    collect(stmt, Expr::as_subscript_expr)
        .into_iter()
        .for_each(f);
}

/// Every expression below a statement (itself included), in source order.
pub fn exprs_in_stmt(stmt: &Stmt) -> Vec<&Expr> {
    collect(stmt, Some)
}

/// Whether an expression inside the statement binds a name or opens a scope of its own
/// (a walrus, a lambda, a comprehension): where a name read there may not be the one bound
/// outside the statement.
pub fn binds_or_scopes_inside(stmt: &Stmt) -> bool {
    exprs_in_stmt(stmt).iter().any(|e| {
        matches!(
            e,
            Expr::Named(_)
                | Expr::Lambda(_)
                | Expr::ListComp(_)
                | Expr::SetComp(_)
                | Expr::DictComp(_)
                | Expr::Generator(_)
        )
    })
}

/// All calls inside an expression.
pub fn calls_in_expr(expr: &Expr) -> Vec<&ruff_python_ast::ExprCall> {
    collect(expr, Expr::as_call_expr)
}
