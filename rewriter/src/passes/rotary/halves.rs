//! GPT-OSS's helper `_apply_rotary_emb(x, cos, sin)`, read statement by statement: the
//! whole rotary product on the two halves of the head, with tables of half its width.
//!
//! ```python
//! first_half, second_half = torch.chunk(x, 2, dim=-1)
//! first_ = first_half * cos - second_half * sin
//! second_ = second_half * cos + first_half * sin
//! return torch.cat((first_, second_), dim=-1)
//! ```
//!
//! It is Llama's `x * cos + rotate_half(x) * sin` with the tables `torch.cat((cos, cos),
//! dim=-1)` and `torch.cat((sin, sin), dim=-1)` when those are as wide as x, product for
//! product: the first half `x1 * c + (-x2) * s` is `x1 * c - x2 * s` exactly (a negation is
//! exact), the second `x2 * c + x1 * s`. The body is interpreted over a small domain (what
//! each name holds in terms of the parameters), so the names (the parameters' too) are free;
//! the split (into 2 along `dim=-1`: `torch.chunk(x, 2, dim=-1)` or `x.chunk(2, dim=-1)`,
//! `dim` positional or keyword), each product's operand order, the signs and the order of the
//! concatenation along `dim=-1` must be exactly these. Assignments and one final `return`
//! only. Whether `torch` is torch is the caller's to check (the module's imports).

use std::collections::HashMap;

use ruff_python_ast::{Expr, ExprCall, Operator, Stmt, StmtFunctionDef};

use crate::passes::fusion_common::{body_without_docstring, plain_parameters};
use crate::syntax::dotted_name;

/// What a name of the helper holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    /// The parameter at this position: 0 the tensor, 1 cos, 2 sin.
    Param(u8),
    /// `x.chunk(2, dim=-1)`: the pair of halves of the tensor.
    Halves,
    /// The first (0) or second (1) half of the tensor.
    Half(u8),
    /// `a * b`, `a + b` or `a - b`, operands in the order written.
    Bin(Operator, Box<Value>, Box<Value>),
    /// `torch.cat((a, b), dim=-1)`.
    Cat(Box<Value>, Box<Value>),
}

fn bin(op: Operator, left: Value, right: Value) -> Value {
    Value::Bin(op, Box::new(left), Box::new(right))
}

/// What the helper must return: `cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)`.
fn expected() -> Value {
    let (x1, x2) = (Value::Half(0), Value::Half(1));
    let (cos, sin) = (Value::Param(1), Value::Param(2));
    let mul = |a: &Value, b: &Value| bin(Operator::Mult, a.clone(), b.clone());
    Value::Cat(
        Box::new(bin(Operator::Sub, mul(&x1, &cos), mul(&x2, &sin))),
        Box::new(bin(Operator::Add, mul(&x2, &cos), mul(&x1, &sin))),
    )
}

/// Whether `def` is GPT-OSS's product on halves: three plain parameters (the tensor, cos,
/// sin; no defaults), no decorators, not async, and a body computing exactly [`expected`].
pub(super) fn is_halves_product(def: &StmtFunctionDef) -> bool {
    let Some(params) = plain_parameters(def, false) else {
        return false;
    };
    let [(x, false), (cos, false), (sin, false)] = &params[..] else {
        return false;
    };
    if !def.decorator_list.is_empty() || def.is_async {
        return false;
    }
    let params = [x.as_str(), cos.as_str(), sin.as_str()];
    interpret(body_without_docstring(def), &params) == Some(expected())
}

/// The value the body returns: assignments only (one target: a name, or two distinct names
/// unpacking the halves), then one `return`.
fn interpret(body: &[Stmt], params: &[&str; 3]) -> Option<Value> {
    let mut names: HashMap<&str, Value> = params
        .iter()
        .zip(0u8..)
        .map(|(p, i)| (*p, Value::Param(i)))
        .collect();
    let (last, rest) = body.split_last()?;
    for stmt in rest {
        let Stmt::Assign(assign) = stmt else {
            return None;
        };
        let [target] = &assign.targets[..] else {
            return None;
        };
        let value = eval(&assign.value, &names)?;
        match target {
            Expr::Name(name) => {
                names.insert(name.id.as_str(), value);
            }
            Expr::Tuple(ruff_python_ast::ExprTuple { elts, .. })
            | Expr::List(ruff_python_ast::ExprList { elts, .. }) => {
                let (Value::Halves, [Expr::Name(first), Expr::Name(second)]) = (value, &elts[..])
                else {
                    return None;
                };
                if first.id == second.id {
                    return None;
                }
                names.insert(first.id.as_str(), Value::Half(0));
                names.insert(second.id.as_str(), Value::Half(1));
            }
            _ => return None,
        }
    }
    let Stmt::Return(ret) = last else {
        return None;
    };
    eval(ret.value.as_deref()?, &names)
}

fn eval(expr: &Expr, names: &HashMap<&str, Value>) -> Option<Value> {
    match expr {
        Expr::Name(name) => names.get(name.id.as_str()).cloned(),
        Expr::BinOp(b) if matches!(b.op, Operator::Mult | Operator::Add | Operator::Sub) => {
            Some(bin(b.op, eval(&b.left, names)?, eval(&b.right, names)?))
        }
        Expr::Call(call) => eval_call(call, names),
        _ => None,
    }
}

/// `torch.chunk(x, 2, dim=-1)` / `x.chunk(2, dim=-1)` of the tensor parameter, or
/// `torch.cat((a, b), dim=-1)` (a tuple or a list).
fn eval_call(call: &ExprCall, names: &HashMap<&str, Value>) -> Option<Value> {
    let args = &call.arguments.args[..];
    if args.iter().any(|a| matches!(a, Expr::Starred(_))) {
        return None;
    }
    match dotted_name(&call.func).as_deref() {
        Some("torch.chunk") => {
            let (tensor, rest) = args.split_first()?;
            chunk_of(eval(tensor, names)?, rest, call)
        }
        Some("torch.cat") => {
            let (tensors, dim) = bind(args, call, &["tensors", "dim"])?;
            if !is_minus_one(dim?) {
                return None;
            }
            let (Expr::Tuple(ruff_python_ast::ExprTuple { elts, .. })
            | Expr::List(ruff_python_ast::ExprList { elts, .. })) = tensors?
            else {
                return None;
            };
            let [a, b] = &elts[..] else {
                return None;
            };
            Some(Value::Cat(
                Box::new(eval(a, names)?),
                Box::new(eval(b, names)?),
            ))
        }
        _ => {
            let Expr::Attribute(attr) = &*call.func else {
                return None;
            };
            if attr.attr.as_str() != "chunk" {
                return None;
            }
            chunk_of(eval(&attr.value, names)?, args, call)
        }
    }
}

/// The halves when `tensor` is the tensor parameter and the remaining positional `args` with
/// the call's keywords are `chunks=2, dim=-1`.
fn chunk_of(tensor: Value, args: &[Expr], call: &ExprCall) -> Option<Value> {
    if tensor != Value::Param(0) {
        return None;
    }
    let (chunks, dim) = bind(args, call, &["chunks", "dim"])?;
    (int(chunks?) == Some(2) && is_minus_one(dim?)).then_some(Value::Halves)
}

/// Positional `args` and the call's keywords bound to `names` in order, each None when not
/// given; None when an argument is unknown or given twice (or `**` unpacked).
fn bind<'c>(
    args: &'c [Expr],
    call: &'c ExprCall,
    names: &[&str; 2],
) -> Option<(Option<&'c Expr>, Option<&'c Expr>)> {
    if args.len() > 2 {
        return None;
    }
    let mut bound: [Option<&Expr>; 2] = [args.first(), args.get(1)];
    for keyword in &call.arguments.keywords {
        let i = names
            .iter()
            .position(|n| keyword.arg.as_ref().is_some_and(|a| a.as_str() == *n))?;
        if bound[i].replace(&keyword.value).is_some() {
            return None;
        }
    }
    Some((bound[0], bound[1]))
}

fn int(expr: &Expr) -> Option<i64> {
    crate::syntax::int_literal(expr)
}

fn is_minus_one(expr: &Expr) -> bool {
    int(expr) == Some(-1)
}
