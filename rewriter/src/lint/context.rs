//! What the rules need to know about an expression beyond its own node: whether it is
//! truth-tested, called, or used as a namespace, which names are imported modules, and small
//! questions about names and literals. Built once per file by a pre-pass.

use std::collections::HashSet;

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{CmpOp, Expr, Stmt, UnaryOp};
use ruff_text_size::{Ranged, TextRange};

/// Per-file facts about expression positions, keyed by the expression's range.
#[derive(Default)]
pub struct Context {
    /// Expressions whose truth value is taken (`if x`, `while x`, `assert x`, `x if c else`,
    /// comprehension conditions, operands of `and` / `or` / `not` there).
    truth_tested: HashSet<TextRange>,
    /// Expressions compared to `True` / `False` / `None` (`x is True`, `x == False`).
    constant_compared: HashSet<TextRange>,
    /// Assignment targets given an evidently boolean value (`cfg.flash_attention = True`).
    bool_assigned: HashSet<TextRange>,
    /// Callees of calls (`f` in `f(...)`, `a.b` in `a.b(...)`).
    callees: HashSet<TextRange>,
    /// Receivers of an attribute access (`a.b` in `a.b.c`): used as namespaces.
    receivers: HashSet<TextRange>,
    /// Local names bound by `import x` / `import x.y` / `import x as y`: module objects.
    modules: HashSet<String>,
}

impl Context {
    pub fn build(body: &[Stmt]) -> Context {
        let mut builder = Builder::default();
        builder.visit_body(body);
        builder.context
    }

    /// Whether the expression is inspected as a switch: truth-tested or compared to a
    /// bool / None constant.
    pub fn is_switch_tested(&self, expr: &impl Ranged) -> bool {
        let range = expr.range();
        self.truth_tested.contains(&range) || self.constant_compared.contains(&range)
    }

    pub fn is_bool_assigned(&self, expr: &Expr) -> bool {
        self.bool_assigned.contains(&expr.range())
    }

    pub fn is_callee(&self, expr: &Expr) -> bool {
        self.callees.contains(&expr.range())
    }

    pub fn is_receiver(&self, expr: &Expr) -> bool {
        self.receivers.contains(&expr.range())
    }

    /// Whether the leftmost name of a dotted expression is an imported module
    /// (`torch.nn.attention.flex_attention`, `transformers.integrations.flash_attention`).
    pub fn is_module_path(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Name(name) => self.modules.contains(name.id.as_str()),
            Expr::Attribute(attr) => self.is_module_path(&attr.value),
            _ => false,
        }
    }
}

#[derive(Default)]
struct Builder {
    context: Context,
}

impl Builder {
    fn truth_test(&mut self, expr: &Expr) {
        self.context.truth_tested.insert(expr.range());
        match expr {
            Expr::BoolOp(op) => {
                for value in &op.values {
                    self.truth_test(value);
                }
            }
            Expr::UnaryOp(op) if op.op == UnaryOp::Not => self.truth_test(&op.operand),
            _ => {}
        }
    }
}

impl<'a> Visitor<'a> for Builder {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        match stmt {
            Stmt::If(s) => {
                self.truth_test(&s.test);
                for clause in &s.elif_else_clauses {
                    if let Some(test) = &clause.test {
                        self.truth_test(test);
                    }
                }
            }
            Stmt::While(s) => self.truth_test(&s.test),
            Stmt::Assign(s) if is_boolish(&s.value) => {
                for target in &s.targets {
                    self.context.bool_assigned.insert(target.range());
                }
            }
            Stmt::AnnAssign(s) if s.value.as_deref().is_some_and(is_boolish) => {
                self.context.bool_assigned.insert(s.target.range());
            }
            Stmt::Assert(s) => self.truth_test(&s.test),
            Stmt::Import(import) => {
                for alias in &import.names {
                    let local = match &alias.asname {
                        Some(asname) => asname.as_str(),
                        None => alias.name.as_str().split('.').next().unwrap_or_default(),
                    };
                    self.context.modules.insert(local.to_string());
                }
            }
            _ => {}
        }
        visitor::walk_stmt(self, stmt);
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            Expr::If(e) => self.truth_test(&e.test),
            // `a and b` outside a condition still truth-tests every operand but the last.
            Expr::BoolOp(op) => {
                for value in &op.values[..op.values.len().saturating_sub(1)] {
                    self.truth_test(value);
                }
            }
            Expr::UnaryOp(op) if op.op == UnaryOp::Not => self.truth_test(&op.operand),
            Expr::Compare(compare) => {
                let operands: Vec<&Expr> = std::iter::once(compare.left.as_ref())
                    .chain(compare.comparators.iter())
                    .collect();
                let constant = |e: &Expr| e.is_boolean_literal_expr() || e.is_none_literal_expr();
                for (i, op) in compare.ops.iter().enumerate() {
                    if !matches!(op, CmpOp::Is | CmpOp::IsNot | CmpOp::Eq | CmpOp::NotEq) {
                        continue;
                    }
                    let (left, right) = (operands[i], operands[i + 1]);
                    if constant(right) {
                        self.context.constant_compared.insert(left.range());
                    }
                    if constant(left) {
                        self.context.constant_compared.insert(right.range());
                    }
                }
            }
            Expr::Call(call) => {
                self.context.callees.insert(call.func.range());
            }
            Expr::Attribute(attr) => {
                self.context.receivers.insert(attr.value.range());
            }
            _ => {}
        }
        visitor::walk_expr(self, expr);
    }

    fn visit_comprehension(&mut self, comprehension: &'a ruff_python_ast::Comprehension) {
        for condition in &comprehension.ifs {
            self.truth_test(condition);
        }
        visitor::walk_comprehension(self, comprehension);
    }
}

/// The name a value is read under: `x` → `x`, `a.b` → `b`, `a["k"]` → `k`,
/// `a.get("k", ...)` / `a.pop("k")` → `k`, `getattr(a, "k", ...)` → `k`.
pub fn value_name(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Name(name) => Some(name.id.as_str()),
        Expr::Attribute(attr) => Some(attr.attr.as_str()),
        Expr::Subscript(sub) => string_literal(&sub.slice),
        Expr::Call(call) => {
            let first = call.arguments.args.first();
            match call.func.as_ref() {
                Expr::Attribute(attr) if matches!(attr.attr.as_str(), "get" | "pop") => {
                    first.and_then(string_literal)
                }
                Expr::Name(name) if name.id.as_str() == "getattr" => {
                    call.arguments.args.get(1).and_then(string_literal)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A name that holds something about attention (`attn_impl`, `attention_backend`, `cfg.attn`).
pub fn is_attention_named(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.contains("attn") || lower.contains("attention")
}

/// A name that holds an attention implementation's name (`attn_implementation`,
/// `_attn_implementation`, `attn_impl`, `attention_impl`).
pub fn is_implementation_named(name: &str) -> bool {
    is_attention_named(name) && name.to_ascii_lowercase().contains("impl")
}

/// An expression whose value is an attention implementation name.
pub fn is_implementation_value(expr: &Expr) -> bool {
    value_name(expr).is_some_and(is_implementation_named)
}

pub fn is_attention_value(expr: &Expr) -> bool {
    value_name(expr).is_some_and(is_attention_named)
}

/// A plain string literal's value (implicit concatenation joined; not f-strings).
pub fn string_literal(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::StringLiteral(s) => Some(s.value.to_str()),
        _ => None,
    }
}

/// The string literals of a literal or a tuple / list / set of literals, with their ranges.
/// None when the expression is anything else or holds a non-string element.
pub fn string_elements(expr: &Expr) -> Option<Vec<(&str, TextRange)>> {
    let elements: &[Expr] = match expr {
        Expr::StringLiteral(s) => return Some(vec![(s.value.to_str(), s.range)]),
        Expr::Tuple(t) => &t.elts,
        Expr::List(l) => &l.elts,
        Expr::Set(s) => &s.elts,
        _ => return None,
    };
    elements
        .iter()
        .map(|e| string_literal(e).map(|s| (s, e.range())))
        .collect()
}

/// Whether an expression evidently holds a bool: a bool literal, a comparison, `not x`,
/// `bool(...)`, or `and` / `or` of those.
pub fn is_boolish(expr: &Expr) -> bool {
    match expr {
        Expr::BooleanLiteral(_) | Expr::Compare(_) => true,
        Expr::UnaryOp(op) => op.op == UnaryOp::Not,
        Expr::BoolOp(op) => op.values.iter().all(is_boolish),
        Expr::Call(call) => {
            matches!(call.func.as_ref(), Expr::Name(n) if n.id.as_str() == "bool")
        }
        _ => false,
    }
}

/// A receiver that looks like a configuration object or its arguments: `cfg`, `self.cfg`,
/// `config`, `model.config`, `args`, `training_args`, `kwargs`, `options`, `hparams`.
pub fn is_config_like(expr: &Expr) -> bool {
    let Some(name) = value_name(expr) else {
        return false;
    };
    let lower = name.to_ascii_lowercase();
    [
        "cfg", "config", "conf", "args", "kwargs", "options", "opts", "hparams", "settings",
    ]
    .iter()
    .any(|suffix| lower == *suffix || lower.ends_with(&format!("_{suffix}")))
        || lower.ends_with("cfg")
        || lower.ends_with("config")
}

/// The string literals an expression may evaluate to: a literal, either branch of
/// `a if c else b`, any operand of `x or "flash"`.
pub fn value_strings(expr: &Expr) -> Vec<(&str, TextRange)> {
    match expr {
        Expr::StringLiteral(s) => vec![(s.value.to_str(), s.range)],
        Expr::If(e) => {
            let mut out = value_strings(&e.body);
            out.extend(value_strings(&e.orelse));
            out
        }
        Expr::BoolOp(op) => op.values.iter().flat_map(value_strings).collect(),
        _ => Vec::new(),
    }
}
