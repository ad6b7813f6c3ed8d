//! The packed form of a gated MLP: one projection holds gate and up, split with `chunk`
//! (Phi-3, GLM, GLM-4, Phi-4-multimodal, Dia, the Granite MoE shared MLPs):
//!
//! ```python
//! up_states = self.gate_up_proj(hidden_states)
//! gate, up_states = up_states.chunk(2, dim=-1)
//! up_states = up_states * self.activation_fn(gate)
//! return self.down_proj(up_states)
//! ```
//!
//! The body is interpreted statement by statement over a small abstract domain (what each
//! name holds in terms of the input), so renamings, rebindings, `torch.chunk(v, 2, -1)`,
//! tuple unpacking or `halves[0]` / `halves[1]` all reach the same verdict. The lowering,
//! `gated_mlp_act_packed(gate_up)`, computes `act(first half) * second half`: a body that
//! activates the second half (Moonshine), or does anything else on the way (dropout,
//! clamps, an adapter added to the projection), does not match and is refused.

use std::collections::HashMap;

use ruff_python_ast::{Expr, ExprCall, Number, Operator, Stmt, UnaryOp};

use crate::syntax::{dotted_name, self_attribute};

/// What `self.<down>(self.<act>(gate) * up)` was built from, with `gate, up =
/// self.<gate_up>(x).chunk(2, dim=-1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PackedMatch<'a> {
    pub down: &'a str,
    pub act: &'a str,
    pub gate_up: &'a str,
}

/// What a name or expression holds, in terms of the forward's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value<'a> {
    /// The forward's input.
    Input,
    /// `self.<gate_up>(input)` (`""`: the input itself, for a gate function).
    Packed(&'a str),
    /// `Packed(gate_up).chunk(2, dim=-1)`: the pair of halves.
    Halves(&'a str),
    /// One half: 0 the first (the gate), 1 the second (up).
    Half(&'a str, u8),
    /// `self.<act>(Half(gate_up, 0))`.
    Activated(&'a str, &'a str),
    /// `Activated(act, gate_up) * Half(gate_up, 1)`, either factor order.
    Gated(&'a str, &'a str),
    /// `self.<down>(Gated(act, gate_up))`.
    Out(PackedMatch<'a>),
}

/// Matches the forward's body (docstring removed) against the packed form; `param` is the
/// forward's one input.
pub(super) fn match_packed<'a>(body: &'a [Stmt], param: &str) -> Option<PackedMatch<'a>> {
    match interpret(body, param, Value::Input)? {
        Value::Out(matched) => Some(matched),
        _ => None,
    }
}

/// Matches a gate function's body (`_default_apply_gate(self, gate_up_out)` of transformers'
/// MoE experts) whose input `param` is the packed tensor itself: `gate, up =
/// param.chunk(2, dim=-1)`, then `return self.<act>(gate) * up`. The activation's attribute.
pub(super) fn match_gate<'a>(body: &'a [Stmt], param: &str) -> Option<&'a str> {
    match interpret(body, param, Value::Packed(""))? {
        Value::Gated(act, "") => Some(act),
        _ => None,
    }
}

/// The value the body returns, its input `param` holding `start`: assignments only, then
/// one `return`.
fn interpret<'a>(body: &'a [Stmt], param: &str, start: Value<'a>) -> Option<Value<'a>> {
    let mut names: HashMap<&'a str, Value<'a>> = HashMap::new();
    let input = |name: &str| (name == param).then_some(start);
    let (last, rest) = body.split_last()?;
    for stmt in rest {
        let Stmt::Assign(assign) = stmt else {
            return None;
        };
        let [target] = &assign.targets[..] else {
            return None;
        };
        let value = eval(&assign.value, &names, &input)?;
        match target {
            Expr::Name(name) => {
                names.insert(name.id.as_str(), value);
            }
            Expr::Tuple(tuple) => {
                let Value::Halves(gate_up) = value else {
                    return None;
                };
                let [Expr::Name(first), Expr::Name(second)] = &tuple.elts[..] else {
                    return None;
                };
                if first.id == second.id {
                    return None;
                }
                names.insert(first.id.as_str(), Value::Half(gate_up, 0));
                names.insert(second.id.as_str(), Value::Half(gate_up, 1));
            }
            _ => return None,
        }
    }
    let Stmt::Return(ret) = last else {
        return None;
    };
    eval(ret.value.as_deref()?, &names, &input)
}

fn eval<'a>(
    expr: &'a Expr,
    names: &HashMap<&'a str, Value<'a>>,
    input: &dyn Fn(&str) -> Option<Value<'a>>,
) -> Option<Value<'a>> {
    match expr {
        // A name bound in the body shadows the input.
        Expr::Name(name) => names
            .get(name.id.as_str())
            .copied()
            .or_else(|| input(name.id.as_str())),
        Expr::Subscript(sub) => match (eval(&sub.value, names, input)?, index(&sub.slice)?) {
            (Value::Halves(gate_up), i @ (0 | 1)) => Some(Value::Half(gate_up, i)),
            _ => None,
        },
        Expr::BinOp(bin) if bin.op == Operator::Mult => {
            let left = eval(&bin.left, names, input)?;
            let right = eval(&bin.right, names, input)?;
            match (left, right) {
                (Value::Activated(act, g), Value::Half(u, 1))
                | (Value::Half(u, 1), Value::Activated(act, g))
                    if g == u =>
                {
                    Some(Value::Gated(act, g))
                }
                _ => None,
            }
        }
        Expr::Call(call) => eval_call(call, names, input),
        _ => None,
    }
}

fn eval_call<'a>(
    call: &'a ExprCall,
    names: &HashMap<&'a str, Value<'a>>,
    input: &dyn Fn(&str) -> Option<Value<'a>>,
) -> Option<Value<'a>> {
    // `self.<m>(v)`: a projection of the input, the activation of the gate, or the down
    // projection of the product.
    if let Some(attr) = self_attribute(&call.func) {
        let [arg] = &call.arguments.args[..] else {
            return None;
        };
        if !call.arguments.keywords.is_empty() {
            return None;
        }
        return match eval(arg, names, input)? {
            Value::Input => Some(Value::Packed(attr)),
            Value::Half(gate_up, 0) => Some(Value::Activated(attr, gate_up)),
            Value::Gated(act, gate_up) => Some(Value::Out(PackedMatch {
                down: attr,
                act,
                gate_up,
            })),
            _ => None,
        };
    }
    // `v.chunk(2, dim=-1)` or `torch.chunk(v, 2, dim=-1)` (positional or keyword dim).
    let (tensor, args) = match &*call.func {
        Expr::Attribute(attr) if attr.attr.as_str() == "chunk" => {
            if dotted_name(&call.func).as_deref() == Some("torch.chunk") {
                let (first, rest) = call.arguments.args.split_first()?;
                (first, rest)
            } else {
                (&*attr.value, &call.arguments.args[..])
            }
        }
        _ => return None,
    };
    let Value::Packed(gate_up) = eval(tensor, names, input)? else {
        return None;
    };
    let keyword = |name: &str| {
        call.arguments
            .keywords
            .iter()
            .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == name))
            .map(|k| &k.value)
    };
    if call.arguments.keywords.iter().any(|k| {
        !k.arg
            .as_ref()
            .is_some_and(|a| matches!(a.as_str(), "chunks" | "dim"))
    }) {
        return None;
    }
    let (chunks, dim) = match args {
        [chunks, dim] if keyword("chunks").is_none() && keyword("dim").is_none() => (chunks, dim),
        [chunks] if keyword("chunks").is_none() => (chunks, keyword("dim")?),
        [] => (keyword("chunks")?, keyword("dim")?),
        _ => return None,
    };
    (index(chunks)? == 2 && is_minus_one(dim)).then_some(Value::Halves(gate_up))
}

/// A small non-negative integer literal.
fn index(expr: &Expr) -> Option<u8> {
    match expr {
        Expr::NumberLiteral(n) => match &n.value {
            Number::Int(i) => i.as_u8(),
            _ => None,
        },
        _ => None,
    }
}

fn is_minus_one(expr: &Expr) -> bool {
    matches!(expr, Expr::UnaryOp(u) if u.op == UnaryOp::USub && index(&u.operand) == Some(1))
}
