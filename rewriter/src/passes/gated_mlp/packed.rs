//! The gated product read statement by statement: the packed form of a gated MLP (one
//! projection holds gate and up, split with `chunk`: Phi-3, GLM, GLM-4, Phi-4-multimodal, Dia,
//! the Granite MoE shared MLPs), MoE experts gates (`_apply_gate(self, gate_up)`), and the
//! clamped SwiGLU forms (DeepSeek-V4, GLM-5-Next, HY-V4, Step-3.7) in either layout:
//!
//! ```python
//! up_states = self.gate_up_proj(hidden_states)
//! gate, up_states = up_states.chunk(2, dim=-1)
//! up_states = up_states * self.activation_fn(gate)
//! return self.down_proj(up_states)
//! ```
//!
//! ```python
//! gate = self.gate_proj(x)
//! up = self.up_proj(x)
//! gate = gate.clamp(min=None, max=self.swiglu_limit)
//! up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
//! return self.down_proj(self.act_fn(gate) * up)
//! ```
//!
//! The body is interpreted statement by statement over a small abstract domain (what each
//! name holds in terms of the input), so renamings, rebindings, `torch.chunk(v, 2, -1)`,
//! tuple unpacking, `halves[0]` / `halves[1]`, or a clamp written on its own line or inline,
//! all reach the same verdict. The lowerings compute `act(gate) * up` with gate the first half
//! (or the gate projection), and, with a limit `L` (one `self.<limit>` attribute), exactly
//! `act(gate.clamp(max=L)) * up.clamp(min=-L, max=L)`, or with the clamp after the activation
//! `act(gate).clamp(max=L) * up.clamp(min=-L, max=L)` (Step-3.7). A body that activates the
//! second half (Moonshine), clamps one factor only, with two attributes, a literal or another
//! bound, or does anything else on the way (dropout, an adapter added to the projection, ...),
//! does not match and is refused.
//!
//! GPT-OSS's and MiniMax-M3's SwiGLU (`swiglu_oai`) is read too, on the halves or on
//! GPT-OSS's interleaved pairs (`gate, up = x[..., ::2], x[..., 1::2]`):
//!
//! ```python
//! gate = gate.clamp(min=None, max=self.limit)
//! up = up.clamp(min=-self.limit, max=self.limit)
//! glu = gate * torch.sigmoid(gate * self.alpha)
//! return (up + 1) * glu
//! ```
//!
//! with its clamps required (one `self.<limit>`, as above), `alpha` one `self` attribute, the
//! same clamped gate on both sides of `glu`, and the arithmetic exact: operands may swap only
//! in the products and the sum whose rounding does not depend on their order (`gate * s` /
//! `s * gate`, `gate * self.alpha` / `self.alpha * gate`, `(up + 1) * glu` / `glu * (up +
//! 1)`, `up + 1` / `1 + up`, with `1` or `1.0`); `(up + 1) * gate * sigmoid(...)` rounds
//! otherwise and is refused. `torch.sigmoid` is read by name; whether `torch` is torch is the
//! caller's to check (the module's imports).

use std::collections::HashMap;

use ruff_python_ast::{Expr, ExprCall, Number, Operator, Stmt, UnaryOp};

use super::Act;
use crate::syntax::{dotted_name, self_attribute};

/// Where a factor of the product comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source<'a> {
    /// `self.<proj>(input)`: a projection of its own (gate or up of the split layout; `""`:
    /// the input itself, a gate function's packed `gate_up`).
    Proj(&'a str),
    /// Half 0 (the gate) or 1 (up) of `self.<gate_up>(input).chunk(2, dim=-1)`.
    Half(&'a str, u8),
    /// The even (0: `[..., ::2]`, the gate) or odd (1: `[..., 1::2]`, up) columns of
    /// `self.<gate_up>(input)`: GPT-OSS's interleaved pairs.
    Pair(&'a str, u8),
}

/// A clamp written on a factor, by its limit attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clamp<'a> {
    /// `.clamp(max=self.<limit>)` or `.clamp(min=None, max=self.<limit>)`.
    Max(&'a str),
    /// `.clamp(min=-self.<limit>, max=self.<limit>)`.
    Both(&'a str),
}

/// The clamped SwiGLU: the limit attribute (`self.<limit>`), and whether the gate is clamped
/// after the activation (Step-3.7) rather than before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Clamped<'a> {
    pub limit: &'a str,
    pub after_activation: bool,
}

/// `act(gate) * up`, either factor order, with the clamps if any.
#[derive(Clone, Copy)]
pub(super) struct Gated<'a> {
    pub act: Act<'a>,
    pub gate: Source<'a>,
    pub up: Source<'a>,
    pub clamp: Option<Clamped<'a>>,
}

impl Gated<'_> {
    /// The packed projection both factors are halves (gate the first) or interleaved pairs
    /// (gate the even columns) of, or None (split).
    pub fn packed(&self) -> Option<&str> {
        match (self.gate, self.up) {
            (Source::Half(g, 0), Source::Half(u, 1)) | (Source::Pair(g, 0), Source::Pair(u, 1))
                if g == u =>
            {
                Some(g)
            }
            _ => None,
        }
    }

    /// Whether the packed projection holds gate and up as interleaved pairs (GPT-OSS).
    pub fn interleaved(&self) -> bool {
        self.packed().is_some() && matches!(self.gate, Source::Pair(..))
    }

    /// The gate and up projections of the split layout, or None (packed).
    pub fn split(&self) -> Option<(&str, &str)> {
        match (self.gate, self.up) {
            (Source::Proj(g), Source::Proj(u)) if !g.is_empty() && !u.is_empty() => Some((g, u)),
            _ => None,
        }
    }
}

/// What `self.<down>(act(gate) * up)` was built from.
#[derive(Clone, Copy)]
pub(super) struct Out<'a> {
    pub down: &'a str,
    pub gated: Gated<'a>,
}

/// A projection or a half, and its clamp if any.
type Factor<'a> = (Source<'a>, Option<Clamp<'a>>);

/// What a name or expression holds, in terms of the forward's input.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// The forward's input.
    Input,
    /// A projection or a half, clamped or not.
    Factor(Source<'a>, Option<Clamp<'a>>),
    /// `Packed(gate_up).chunk(2, dim=-1)`: the pair of halves.
    Halves(&'a str),
    /// The activation of a factor (clamped or not: `before`), its output clamped or not
    /// (`after`).
    Activated {
        act: Act<'a>,
        gate: Source<'a>,
        before: Option<Clamp<'a>>,
        after: Option<Clamp<'a>>,
    },
    /// `self.<name>`, read (not called): the `swiglu_oai` form's alpha.
    Attr(&'a str),
    /// `Factor * self.<alpha>` (either order).
    Scaled(Factor<'a>, &'a str),
    /// `torch.sigmoid(Scaled)`.
    Sigmoid(Factor<'a>, &'a str),
    /// `Factor * Sigmoid` of that same factor (either order): `swiglu_oai`'s `glu`.
    Glu(Factor<'a>, &'a str),
    /// `Factor + 1` (`1` or `1.0`, either order): `swiglu_oai`'s `up + 1`.
    PlusOne(Factor<'a>),
    /// `Activated * Factor` (or `PlusOne * Glu`) whose clamps and sources are one of the
    /// lowered forms.
    Gated(Gated<'a>),
    /// `self.<down>(Gated)`.
    Out(Out<'a>),
}

/// Matches the forward's body (docstring removed): `self.<down>(act(gate) * up)` of the input
/// `param`, in either layout, clamped or not.
pub(super) fn match_body<'a>(body: &'a [Stmt], param: &str) -> Option<Out<'a>> {
    match interpret(body, param, Value::Input)? {
        Value::Out(out) => Some(out),
        _ => None,
    }
}

/// Matches a gate function's body (`_apply_gate(self, gate_up)` of transformers' MoE experts,
/// its default or a class's own) whose input `param` is the packed tensor itself: `gate, up =
/// param.chunk(2, dim=-1)`, then `return act(gate) * up`, clamped or not.
pub(super) fn match_gate<'a>(body: &'a [Stmt], param: &str) -> Option<Gated<'a>> {
    match interpret(body, param, Value::Factor(Source::Proj(""), None))? {
        Value::Gated(gated) if gated.packed() == Some("") => Some(gated),
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
        match (target, &*assign.value) {
            (Expr::Name(name), value) => {
                let value = eval(value, &names, &input)?;
                names.insert(name.id.as_str(), value);
            }
            // `a, b = x, y` (GPT-OSS's `gate, up = gate_up[..., ::2], gate_up[..., 1::2]`):
            // every value read before any name is bound.
            (Expr::Tuple(tuple), Expr::Tuple(values)) => {
                let [Expr::Name(first), Expr::Name(second)] = &tuple.elts[..] else {
                    return None;
                };
                let [a, b] = &values.elts[..] else {
                    return None;
                };
                if first.id == second.id {
                    return None;
                }
                let (a, b) = (eval(a, &names, &input)?, eval(b, &names, &input)?);
                names.insert(first.id.as_str(), a);
                names.insert(second.id.as_str(), b);
            }
            (Expr::Tuple(tuple), value) => {
                let Value::Halves(gate_up) = eval(value, &names, &input)? else {
                    return None;
                };
                let [Expr::Name(first), Expr::Name(second)] = &tuple.elts[..] else {
                    return None;
                };
                if first.id == second.id {
                    return None;
                }
                names.insert(first.id.as_str(), half(gate_up, 0));
                names.insert(second.id.as_str(), half(gate_up, 1));
            }
            _ => return None,
        }
    }
    let Stmt::Return(ret) = last else {
        return None;
    };
    eval(ret.value.as_deref()?, &names, &input)
}

fn half(gate_up: &str, i: u8) -> Value<'_> {
    Value::Factor(Source::Half(gate_up, i), None)
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
        Expr::Subscript(sub) => match (eval(&sub.value, names, input)?, &*sub.slice) {
            (Value::Halves(gate_up), i) => match index(i)? {
                i @ (0 | 1) => Some(half(gate_up, i)),
                _ => None,
            },
            (Value::Factor(Source::Proj(gate_up), None), slice) => Some(Value::Factor(
                Source::Pair(gate_up, every_two(slice)?),
                None,
            )),
            _ => None,
        },
        Expr::Attribute(_) => self_attribute(expr).map(Value::Attr),
        Expr::BinOp(bin) if bin.op == Operator::Add => {
            // `up + 1` / `1 + up`: a sum rounded the same in either order.
            let factor = match (one(&bin.left), one(&bin.right)) {
                (false, true) => eval(&bin.left, names, input)?,
                (true, false) => eval(&bin.right, names, input)?,
                _ => return None,
            };
            match factor {
                Value::Factor(source, clamp) => Some(Value::PlusOne((source, clamp))),
                _ => None,
            }
        }
        Expr::BinOp(bin) if bin.op == Operator::Mult => {
            let left = eval(&bin.left, names, input)?;
            let right = eval(&bin.right, names, input)?;
            // The products of `swiglu_oai`, each of two operands whose order does not change
            // its rounding.
            match (left, right) {
                (Value::Factor(source, clamp), Value::Attr(alpha))
                | (Value::Attr(alpha), Value::Factor(source, clamp)) => {
                    return Some(Value::Scaled((source, clamp), alpha));
                }
                (Value::Factor(source, clamp), Value::Sigmoid(gate, alpha))
                | (Value::Sigmoid(gate, alpha), Value::Factor(source, clamp)) => {
                    return ((source, clamp) == gate).then_some(Value::Glu(gate, alpha));
                }
                (Value::PlusOne(up), Value::Glu(gate, alpha))
                | (Value::Glu(gate, alpha), Value::PlusOne(up)) => {
                    return oai_product(alpha, gate, up).map(Value::Gated);
                }
                _ => {}
            }
            match (left, right) {
                (
                    Value::Activated {
                        act,
                        gate,
                        before,
                        after,
                    },
                    Value::Factor(up, up_clamp),
                )
                | (
                    Value::Factor(up, up_clamp),
                    Value::Activated {
                        act,
                        gate,
                        before,
                        after,
                    },
                ) => product(act, gate, before, after, up, up_clamp).map(Value::Gated),
                _ => None,
            }
        }
        Expr::Call(call) => eval_call(call, names, input),
        _ => None,
    }
}

/// `(up + 1) * (gate * torch.sigmoid(gate * self.<alpha>))`, when the clamps are the SwiGLU
/// ones (required: the gate at `max=L`, up at `min=-L, max=L`, one attribute `L`) and the
/// factors two projections or the halves or pairs of one packed projection, gate the first.
fn oai_product<'a>(alpha: &'a str, gate: Factor<'a>, up: Factor<'a>) -> Option<Gated<'a>> {
    let (gate, Some(Clamp::Max(limit))) = gate else {
        return None;
    };
    let (up, Some(Clamp::Both(up_limit))) = up else {
        return None;
    };
    let gated = Gated {
        act: Act::Oai(alpha),
        gate,
        up,
        clamp: Some(Clamped {
            limit,
            after_activation: false,
        }),
    };
    (limit == up_limit && (gated.split().is_some() || gated.packed().is_some())).then_some(gated)
}

/// `act(gate) * up` with the clamps written on the way, when they are one of the lowered
/// forms: none at all, or the gate clamped at `max=L` only (before or after the activation,
/// not both) and up at `min=-L, max=L`, one attribute `L`; and the factors two projections
/// or the two halves of one packed projection, gate the first.
fn product<'a>(
    act: Act<'a>,
    gate: Source<'a>,
    before: Option<Clamp<'a>>,
    after: Option<Clamp<'a>>,
    up: Source<'a>,
    up_clamp: Option<Clamp<'a>>,
) -> Option<Gated<'a>> {
    let gate_clamp = match (before, after) {
        (None, None) => None,
        (Some(Clamp::Max(limit)), None) => Some((limit, false)),
        (None, Some(Clamp::Max(limit))) => Some((limit, true)),
        _ => return None,
    };
    let clamp = match (gate_clamp, up_clamp) {
        (None, None) => None,
        (Some((limit, after_activation)), Some(Clamp::Both(up_limit))) if limit == up_limit => {
            Some(Clamped {
                limit,
                after_activation,
            })
        }
        _ => return None,
    };
    let gated = Gated {
        act,
        gate,
        up,
        clamp,
    };
    (gated.split().is_some() || gated.packed().is_some()).then_some(gated)
}

fn eval_call<'a>(
    call: &'a ExprCall,
    names: &HashMap<&'a str, Value<'a>>,
    input: &dyn Fn(&str) -> Option<Value<'a>>,
) -> Option<Value<'a>> {
    // `self.<m>(v)`: a projection of the input, the activation of the gate, or the down
    // projection of the product; `<F>.silu(v)`: torch's functional SiLU, if the module's
    // imports say so (checked by the caller).
    let act = match self_attribute(&call.func) {
        Some(attr) => Some(Act::Module(attr)),
        None => dotted_name(&call.func)
            .is_some_and(|n| n.ends_with(".silu"))
            .then_some(Act::Function(&call.func)),
    };
    if let Some(act) = act {
        let [arg] = &call.arguments.args[..] else {
            return None;
        };
        if !call.arguments.keywords.is_empty() || matches!(arg, Expr::Starred(_)) {
            return None;
        }
        return match (act, eval(arg, names, input)?) {
            (Act::Module(attr), Value::Input) => Some(Value::Factor(Source::Proj(attr), None)),
            (act, Value::Factor(gate, before)) => Some(Value::Activated {
                act,
                gate,
                before,
                after: None,
            }),
            (Act::Module(down), Value::Gated(gated)) => Some(Value::Out(Out { down, gated })),
            _ => None,
        };
    }
    let Expr::Attribute(attr) = &*call.func else {
        return None;
    };
    match attr.attr.as_str() {
        "clamp" => eval_clamp(call, names, input),
        "chunk" => eval_chunk(call, names, input),
        "sigmoid" if dotted_name(&call.func).as_deref() == Some("torch.sigmoid") => {
            let [arg] = &call.arguments.args[..] else {
                return None;
            };
            if !call.arguments.keywords.is_empty() {
                return None;
            }
            match eval(arg, names, input)? {
                Value::Scaled(gate, alpha) => Some(Value::Sigmoid(gate, alpha)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `v.clamp(max=self.<L>)`, `v.clamp(min=None, max=self.<L>)` or `v.clamp(min=-self.<L>,
/// max=self.<L>)` (keywords only) on a factor or an activation's output not clamped yet.
fn eval_clamp<'a>(
    call: &'a ExprCall,
    names: &HashMap<&'a str, Value<'a>>,
    input: &dyn Fn(&str) -> Option<Value<'a>>,
) -> Option<Value<'a>> {
    let Expr::Attribute(attr) = &*call.func else {
        return None;
    };
    if !call.arguments.args.is_empty() {
        return None;
    }
    let mut min = None;
    let mut max = None;
    for keyword in &call.arguments.keywords {
        match keyword.arg.as_ref().map(|a| a.as_str()) {
            Some("min") if min.is_none() => min = Some(&keyword.value),
            Some("max") if max.is_none() => max = Some(&keyword.value),
            _ => return None,
        }
    }
    let limit = self_attribute(max?)?;
    let clamp = match min {
        None | Some(Expr::NoneLiteral(_)) => Clamp::Max(limit),
        Some(Expr::UnaryOp(u))
            if u.op == UnaryOp::USub && self_attribute(&u.operand) == Some(limit) =>
        {
            Clamp::Both(limit)
        }
        Some(_) => return None,
    };
    match eval(&attr.value, names, input)? {
        Value::Factor(source, None) => Some(Value::Factor(source, Some(clamp))),
        Value::Activated {
            act,
            gate,
            before,
            after: None,
        } => Some(Value::Activated {
            act,
            gate,
            before,
            after: Some(clamp),
        }),
        _ => None,
    }
}

/// `v.chunk(2, dim=-1)` or `torch.chunk(v, 2, dim=-1)` (positional or keyword dim) of an
/// unclamped projection.
fn eval_chunk<'a>(
    call: &'a ExprCall,
    names: &HashMap<&'a str, Value<'a>>,
    input: &dyn Fn(&str) -> Option<Value<'a>>,
) -> Option<Value<'a>> {
    let Expr::Attribute(attr) = &*call.func else {
        return None;
    };
    let (tensor, args) = if dotted_name(&call.func).as_deref() == Some("torch.chunk") {
        let (first, rest) = call.arguments.args.split_first()?;
        (first, rest)
    } else {
        (&*attr.value, &call.arguments.args[..])
    };
    let Value::Factor(Source::Proj(gate_up), None) = eval(tensor, names, input)? else {
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
    matches!(expr, Expr::NumberLiteral(_))
        .then(|| crate::syntax::int_literal(expr))
        .flatten()
        .and_then(|v| u8::try_from(v).ok())
}

/// `1` or `1.0`.
fn one(expr: &Expr) -> bool {
    match expr {
        Expr::NumberLiteral(n) => match &n.value {
            Number::Int(i) => i.as_u8() == Some(1),
            Number::Float(f) => *f == 1.0,
            Number::Complex { .. } => false,
        },
        _ => false,
    }
}

/// `[..., ::2]` / `[..., 0::2]` (0: the even columns) or `[..., 1::2]` (1: the odd ones) of
/// the last dimension.
fn every_two(slice: &Expr) -> Option<u8> {
    let Expr::Tuple(tuple) = slice else {
        return None;
    };
    let [Expr::EllipsisLiteral(_), Expr::Slice(s)] = &tuple.elts[..] else {
        return None;
    };
    if s.upper.is_some() || index(s.step.as_deref()?)? != 2 {
        return None;
    }
    match s.lower.as_deref() {
        None => Some(0),
        Some(lower) => match index(lower)? {
            i @ (0 | 1) => Some(i),
            _ => None,
        },
    }
}

fn is_minus_one(expr: &Expr) -> bool {
    crate::syntax::int_literal(expr) == Some(-1)
}
