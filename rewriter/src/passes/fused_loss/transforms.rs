//! Logit transforms: decompose an expression over the logits into primitive steps
//! (multiply, divide, tanh; `.float()` / `.contiguous()` are no-ops for a float32 kernel),
//! then reduce the steps to the transforms the fused op applies, in its fixed order.

use ruff_python_ast::comparable::ComparableExpr;
use ruff_python_ast::{Expr, Operator};

use crate::audit::{Transform, TransformKind};
use crate::reason::Reason;
use crate::syntax::dotted_name;

use super::Refusal;

/// One primitive step applied to the logits.
#[derive(Clone, Debug)]
pub enum Step<'a> {
    Mul(Operand<'a>),
    Div(Operand<'a>),
    Tanh,
    /// A transform already recognised as a whole (a conditional form).
    Lowered(TransformKind, String),
}

/// The scale operand of a step: its AST (for comparisons) and the text to emit.
#[derive(Clone, Debug)]
pub struct Operand<'a> {
    pub expr: &'a Expr,
    pub text: String,
}

const TANH_FUNCTIONS: [&str; 5] = [
    "torch.tanh",
    "nn.functional.tanh",
    "torch.nn.functional.tanh",
    "F.tanh",
    "torch.nn.functional.tanh",
];

/// Decompose `expr` into steps applied to a leaf (`is_leaf`): the head call or the logits
/// name. Returns the leaf. `contains_leaf` says whether a subexpression holds the leaf.
/// `operand_text` renders a scale operand (substituting names bound by skipped statements).
pub fn decompose<'a>(
    expr: &'a Expr,
    is_leaf: &dyn Fn(&Expr) -> bool,
    contains_leaf: &dyn Fn(&Expr) -> bool,
    operand_text: &dyn Fn(&'a Expr) -> String,
    steps: &mut Vec<Step<'a>>,
) -> Result<&'a Expr, String> {
    if is_leaf(expr) {
        return Ok(expr);
    }
    match expr {
        Expr::Call(call) => {
            let no_args = call.arguments.args.is_empty() && call.arguments.keywords.is_empty();
            if let Expr::Attribute(attr) = call.func.as_ref() {
                let method = attr.attr.as_str();
                if (no_args && matches!(method, "float" | "contiguous")) || is_float32_cast(call) {
                    return decompose(&attr.value, is_leaf, contains_leaf, operand_text, steps);
                }
                if no_args && method == "tanh" {
                    let leaf = decompose(&attr.value, is_leaf, contains_leaf, operand_text, steps)?;
                    steps.push(Step::Tanh);
                    return Ok(leaf);
                }
            }
            if let Some(callee) = dotted_name(&call.func)
                && TANH_FUNCTIONS.contains(&callee.as_str())
                && call.arguments.args.len() == 1
                && call.arguments.keywords.is_empty()
                && !call.arguments.args[0].is_starred_expr()
            {
                let leaf = decompose(
                    &call.arguments.args[0],
                    is_leaf,
                    contains_leaf,
                    operand_text,
                    steps,
                )?;
                steps.push(Step::Tanh);
                return Ok(leaf);
            }
            Err("a call that is not a lowered transform".to_string())
        }
        Expr::BinOp(binop) if binop.op == Operator::Mult => {
            let (left, right) = (contains_leaf(&binop.left), contains_leaf(&binop.right));
            let (inner, scale) = match (left, right) {
                (true, false) => (&binop.left, &binop.right),
                (false, true) => (&binop.right, &binop.left),
                _ => return Err("a product that is not logits times a scale".to_string()),
            };
            let leaf = decompose(inner, is_leaf, contains_leaf, operand_text, steps)?;
            steps.push(Step::Mul(Operand {
                expr: scale,
                text: operand_text(scale),
            }));
            Ok(leaf)
        }
        Expr::BinOp(binop) if binop.op == Operator::Div => {
            if !contains_leaf(&binop.left) || contains_leaf(&binop.right) {
                return Err("a division that is not logits divided by a scale".to_string());
            }
            let leaf = decompose(&binop.left, is_leaf, contains_leaf, operand_text, steps)?;
            steps.push(Step::Div(Operand {
                expr: &binop.right,
                text: operand_text(&binop.right),
            }));
            Ok(leaf)
        }
        Expr::BinOp(binop) => Err(format!("operator `{}` on the logits", binop.op.as_str())),
        Expr::Subscript(_) => Err("a slice or index of the logits".to_string()),
        _ => Err("an expression that is not a lowered transform".to_string()),
    }
}

/// `.to(torch.float32)` / `.to(torch.float)` / `.to(dtype=...)`: an upcast, a no-op for the
/// float32 kernel (the original's loss upcasts too).
fn is_float32_cast(call: &ruff_python_ast::ExprCall) -> bool {
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return false;
    };
    let float32 = |e: &Expr| {
        matches!(
            dotted_name(e).as_deref(),
            Some("torch.float32" | "torch.float")
        )
    };
    attr.attr.as_str() == "to"
        && match (
            call.arguments.args.as_ref(),
            call.arguments.keywords.as_ref(),
        ) {
            ([only], []) => float32(only),
            ([], [k]) => k.arg.as_ref().is_some_and(|a| a.as_str() == "dtype") && float32(&k.value),
            _ => false,
        }
}

fn same(a: &Expr, b: &Expr) -> bool {
    ComparableExpr::from(a) == ComparableExpr::from(b)
}

/// Reduce steps to transforms: `/X, tanh, *X` is a soft-cap by X; a lone `*X` / `/X` is a
/// scale. The result must follow the op's order (multiply, divide, soft-cap), each at most once.
pub fn reduce(steps: &[Step<'_>]) -> Result<Vec<Transform>, Refusal> {
    let mut transforms: Vec<Transform> = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        if let (Step::Div(x), Some(Step::Tanh), Some(Step::Mul(y))) =
            (&steps[i], steps.get(i + 1), steps.get(i + 2))
            && same(x.expr, y.expr)
        {
            transforms.push(Transform {
                kind: TransformKind::Softcap,
                expr: x.text.clone(),
            });
            i += 3;
            continue;
        }
        match &steps[i] {
            Step::Mul(x) => transforms.push(Transform {
                kind: TransformKind::ScaleMultiply,
                expr: x.text.clone(),
            }),
            Step::Div(x) => transforms.push(Transform {
                kind: TransformKind::ScaleDivide,
                expr: x.text.clone(),
            }),
            Step::Lowered(kind, text) => transforms.push(Transform {
                kind: *kind,
                expr: text.clone(),
            }),
            Step::Tanh => {
                return Err(Refusal::new(
                    Reason::TransformUnsupported,
                    "tanh of the logits that is not a soft-cap `X * tanh(logits / X)` with the same X",
                ));
            }
        }
        i += 1;
    }
    for pair in transforms.windows(2) {
        if pair[0].kind >= pair[1].kind {
            return Err(Refusal::new(
                Reason::TransformOrder,
                format!(
                    "{} then {}: the fused op applies multiply, divide, soft-cap in that order, each at most once",
                    pair[0].kind.name(),
                    pair[1].kind.name()
                ),
            ));
        }
    }
    Ok(transforms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::ParsedSource;
    use crate::syntax::expr_mentions;
    use ruff_python_ast::Stmt;

    fn steps_of(source: &str) -> Result<Vec<Transform>, String> {
        let parsed = ParsedSource::parse(source).unwrap();
        let mut steps = Vec::new();
        for stmt in parsed.suite() {
            let Stmt::Assign(assign) = stmt else { panic!() };
            let is_leaf = |e: &Expr| matches!(e, Expr::Name(n) if n.id.as_str() == "logits");
            let contains = |e: &Expr| expr_mentions(e, "logits");
            let text = |e: &Expr| parsed.slice(e).to_string();
            decompose(&assign.value, &is_leaf, &contains, &text, &mut steps)?;
        }
        reduce(&steps).map_err(|r| r.reason.code().to_string())
    }

    fn kinds(ts: &[Transform]) -> Vec<(&'static str, &str)> {
        ts.iter()
            .map(|t| (t.kind.name(), t.expr.as_str()))
            .collect()
    }

    #[test]
    fn three_statement_softcap() {
        let t = steps_of(
            "logits = logits / c.cap\nlogits = torch.tanh(logits)\nlogits = logits * c.cap\n",
        )
        .unwrap();
        assert_eq!(kinds(&t), [("softcap", "c.cap")]);
    }

    #[test]
    fn one_line_softcaps() {
        for src in [
            "logits = torch.tanh(logits / cap) * cap\n",
            "logits = cap * torch.tanh(logits / cap)\n",
            "logits = nn.functional.tanh(logits / cap) * cap\n",
            "logits = (logits / cap).tanh() * cap\n",
            "logits = torch.tanh(logits.float() / cap) * cap\n",
        ] {
            assert_eq!(
                kinds(&steps_of(src).unwrap()),
                [("softcap", "cap")],
                "{src}"
            );
        }
    }

    #[test]
    fn scales_and_order() {
        let t = steps_of("logits = logits * s\nlogits = logits / d\n").unwrap();
        assert_eq!(kinds(&t), [("scale_multiply", "s"), ("scale_divide", "d")]);
        let t = steps_of("logits = logits * m\nlogits = logits / c\nlogits = torch.tanh(logits)\nlogits = logits * c\n")
            .unwrap();
        assert_eq!(kinds(&t), [("scale_multiply", "m"), ("softcap", "c")]);
        assert_eq!(
            steps_of("logits = logits / d\nlogits = logits * s\n").unwrap_err(),
            "transform-order"
        );
        assert_eq!(
            steps_of("logits = logits * a\nlogits = logits * b\n").unwrap_err(),
            "transform-order"
        );
        assert_eq!(
            steps_of("logits = torch.tanh(logits / c) * c\nlogits = logits * s\n").unwrap_err(),
            "transform-order"
        );
    }

    #[test]
    fn unsupported_shapes() {
        assert_eq!(
            steps_of("logits = torch.tanh(logits)\n").unwrap_err(),
            "transform-unsupported"
        );
        assert_eq!(
            steps_of("logits = torch.tanh(logits / a) * b\n").unwrap_err(),
            "transform-unsupported"
        );
        assert!(steps_of("logits = logits + b\n").is_err());
        assert!(steps_of("logits = logits[..., :10]\n").is_err());
        assert!(steps_of("logits = logits * logits\n").is_err());
        assert!(steps_of("logits = s / logits\n").is_err());
        assert!(steps_of("logits = soft_cap(logits, c)\n").is_err());
    }
}
