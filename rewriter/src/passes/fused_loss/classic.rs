//! The classic loss style: the labels branch transformers wrote before `self.loss_function`
//! (4.45 and earlier) and most remote code still writes.
//!
//! ```python
//! if labels is not None:
//!     labels = labels.to(logits.device)             # optional device moves, upcasts
//!     logits = logits.float()
//!     shift_logits = logits[..., :-1, :].contiguous()
//!     shift_labels = labels[..., 1:].contiguous()
//!     loss_fct = CrossEntropyLoss()                   # or F.cross_entropy(...) inline
//!     shift_logits = shift_logits.view(-1, self.config.vocab_size)
//!     shift_labels = shift_labels.view(-1)
//!     shift_labels = shift_labels.to(shift_logits.device)
//!     loss = loss_fct(shift_logits, shift_labels)
//!     loss = loss.to(hidden_states.dtype)             # optional scalar epilogue
//! ```
//!
//! Every statement of the branch is interpreted over a small abstract domain: what each name
//! holds (the logits or the labels, aligned, shifted or rolled, flattened or not; a loss
//! function with its options; shape dimensions; the loss). A statement outside the domain is a
//! refusal with the code of what it does. The branch matches when the loss is the mean
//! cross-entropy of the logits shifted left against the labels shifted right (or, MPT's form,
//! unshifted logits against `torch.roll(labels, -1)` with the last column set to
//! `ignore_index`): exactly `ForCausalLMLoss` without `num_items_in_batch` (the original never
//! divides by it), with the loss function's `ignore_index` and `label_smoothing`.

use std::collections::HashMap;

use ruff_python_ast::{Expr, ExprCall, Operator, Stmt, StmtFunctionDef, StmtIf};
use ruff_text_size::Ranged;

use crate::reason::Reason;
use crate::syntax::{
    calls_in_stmt, dotted_name, int_literal, is_not_none_test, names_in_expr, statement_path,
    walk_statements,
};

use super::Refusal;
use super::site::{LossSite, LossStyle, check_labels_parameter, classify_without_loss_call};
use crate::candidate::{rolls_labels, shifts_labels};

/// What the fused branch needs from a classic labels branch.
pub struct CrossEntropyArgs<'a> {
    /// The vocabulary size the flattening names (`self.config.vocab_size`), or None when it is
    /// the logits' own last dimension (`shift_logits.size(-1)`): then the head's `out_features`.
    pub vocab: Option<&'a Expr>,
    pub ignore_index: Option<&'a Expr>,
    pub label_smoothing: Option<&'a Expr>,
    /// Statements after the loss that only transform the loss (`loss = loss.to(dtype)`),
    /// repeated in the fused branch.
    pub epilogue: Vec<&'a Stmt>,
}

const CROSS_ENTROPY_CLASSES: [&str; 3] = [
    "CrossEntropyLoss",
    "nn.CrossEntropyLoss",
    "torch.nn.CrossEntropyLoss",
];
const CROSS_ENTROPY_FUNCTIONS: [&str; 4] = [
    "F.cross_entropy",
    "nn.functional.cross_entropy",
    "torch.nn.functional.cross_entropy",
    "functional.cross_entropy",
];

fn is_cross_entropy_class(call: &ExprCall) -> bool {
    dotted_name(&call.func).is_some_and(|n| CROSS_ENTROPY_CLASSES.contains(&n.as_str()))
}

fn is_cross_entropy_function(call: &ExprCall) -> bool {
    dotted_name(&call.func).is_some_and(|n| CROSS_ENTROPY_FUNCTIONS.contains(&n.as_str()))
}

/// How a tensor is aligned with the token positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shift {
    /// As the model produced it.
    Aligned,
    /// `logits[..., :-1, :]` / `labels[..., 1:]`.
    Shifted,
    /// `torch.roll(labels, shifts=-1)`: the last column holds another row's first label.
    Rolled,
    /// A rolled copy whose last column was set to this value.
    RolledPadded(i64),
}

/// Where the vocabulary size of a flattened logits view comes from.
#[derive(Clone, Copy, Debug)]
enum Vocab<'a> {
    /// The logits' own last dimension.
    Own,
    /// An expression that does not read the tensors (`self.config.vocab_size`).
    Given(&'a Expr),
}

/// What an expression of the labels branch holds.
#[derive(Clone, Debug)]
enum Value<'a> {
    Logits {
        shift: Shift,
        flat: Option<Vocab<'a>>,
    },
    Labels {
        shift: Shift,
        flat: bool,
    },
    /// `x.shape` / `x.size()` of the (shifted) logits, not yet unpacked.
    Shape,
    /// One of the unpacked dimensions of the logits: 0 batch, 1 tokens, 2 vocabulary.
    Dim(usize),
    /// `x.size(-1)` of the logits.
    VocabOfLogits,
    /// `x.device` of a tensor.
    Device,
    LossFn(LossOptions<'a>),
    Loss,
    /// A name the branch does not bind and that is not `labels` (the logits, once a logits
    /// operation is applied to it, or something untracked such as `self`).
    Free(String),
    /// Anything else that does not read the tensors (`self.config.vocab_size`, `-1`).
    Untracked,
}

#[derive(Clone, Copy, Debug, Default)]
struct LossOptions<'a> {
    ignore_index: Option<&'a Expr>,
    label_smoothing: Option<&'a Expr>,
}

struct Interpreter<'a> {
    env: HashMap<String, Value<'a>>,
    /// The name the logits come in (found by the first logits operation applied to a free name).
    logits: Option<String>,
    labels_rebinders: Vec<&'a Stmt>,
    /// Names bound by the branch, in order.
    bound: Vec<String>,
    /// Set by the loss call.
    loss_vocab: Option<Vocab<'a>>,
    loss_options: Option<LossOptions<'a>>,
}

fn refuse(reason: Reason, detail: impl Into<String>) -> Refusal {
    Refusal::new(reason, detail)
}

fn is_full_slice(expr: &Expr) -> bool {
    matches!(expr, Expr::Slice(s) if s.lower.is_none() && s.upper.is_none() && s.step.is_none())
}

/// `:-1` (`upper` -1) or `1:` (`lower` 1).
fn is_slice(expr: &Expr, lower: Option<i64>, upper: Option<i64>) -> bool {
    let Expr::Slice(s) = expr else { return false };
    s.step.is_none()
        && s.lower.as_deref().map(int_literal) == lower.map(Some)
        && s.upper.as_deref().map(int_literal) == upper.map(Some)
}

/// The index of `x[...]` as a list of its elements.
fn index_elements(slice: &Expr) -> Vec<&Expr> {
    match slice {
        Expr::Tuple(t) => t.elts.iter().collect(),
        other => vec![other],
    }
}

/// `[..., :-1, :]`, `[:, :-1, :]`, `[:, :-1]`: the logits shifted left along the tokens.
fn is_logits_shift(slice: &Expr) -> bool {
    match index_elements(slice).as_slice() {
        [first, seq, vocab] => {
            (first.is_ellipsis_literal_expr() || is_full_slice(first))
                && is_slice(seq, None, Some(-1))
                && is_full_slice(vocab)
        }
        [first, seq] => is_full_slice(first) && is_slice(seq, None, Some(-1)),
        _ => false,
    }
}

/// `[..., 1:]`, `[:, 1:]`: the labels shifted right along the tokens.
fn is_labels_shift(slice: &Expr) -> bool {
    match index_elements(slice).as_slice() {
        [first, seq] => {
            (first.is_ellipsis_literal_expr() || is_full_slice(first))
                && is_slice(seq, Some(1), None)
        }
        _ => false,
    }
}

/// `[:, -1]` / `[..., -1]`: the last column.
fn is_last_column(slice: &Expr) -> bool {
    match index_elements(slice).as_slice() {
        [first, last] => {
            (first.is_ellipsis_literal_expr() || is_full_slice(first))
                && int_literal(last) == Some(-1)
        }
        _ => false,
    }
}

fn first_line(expr: &impl Ranged, text: &str) -> String {
    text[expr.range().to_std_range()]
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

impl<'a> Interpreter<'a> {
    fn new() -> Self {
        Interpreter {
            env: HashMap::new(),
            logits: None,
            labels_rebinders: Vec::new(),
            bound: Vec::new(),
            loss_vocab: None,
            loss_options: None,
        }
    }

    /// Whether an expression reads a tensor the branch tracks.
    fn reads_tensors(&self, expr: &Expr) -> bool {
        names_in_expr(expr).iter().any(|n| {
            let id = n.id.as_str();
            id == "labels" || self.env.contains_key(id) || self.logits.as_deref() == Some(id)
        })
    }

    fn claim_logits(&mut self, name: &str) -> Result<(), Refusal> {
        match &self.logits {
            None => {
                self.logits = Some(name.to_string());
                Ok(())
            }
            Some(existing) if existing == name => Ok(()),
            Some(existing) => Err(refuse(
                Reason::CustomLoss,
                format!(
                    "two tensors are used as logits in the labels branch: `{existing}` and `{name}`"
                ),
            )),
        }
    }

    /// The logits value of a receiver, claiming a free name as the logits.
    fn as_logits(
        &mut self,
        value: Value<'a>,
    ) -> Result<Option<(Shift, Option<Vocab<'a>>)>, Refusal> {
        match value {
            Value::Logits { shift, flat } => Ok(Some((shift, flat))),
            Value::Free(name) => {
                self.claim_logits(&name)?;
                Ok(Some((Shift::Aligned, None)))
            }
            _ => Ok(None),
        }
    }

    fn eval(&mut self, expr: &'a Expr, text: &str) -> Result<Value<'a>, Refusal> {
        let unsupported = |this: &Self, expr: &Expr| -> Refusal {
            if this
                .logits
                .as_deref()
                .is_some_and(|l| crate::syntax::expr_mentions(expr, l))
                || names_in_expr(expr)
                    .iter()
                    .any(|n| matches!(this.env.get(n.id.as_str()), Some(Value::Logits { .. })))
            {
                refuse(
                    Reason::LogitsReadBeforeLoss,
                    format!(
                        "`{}` reads the logits in the labels branch in a way the classic matcher does not know",
                        first_line(expr, text)
                    ),
                )
            } else {
                refuse(
                    Reason::CustomLoss,
                    format!(
                        "`{}` in the labels branch is not part of a shifted cross-entropy",
                        first_line(expr, text)
                    ),
                )
            }
        };
        match expr {
            Expr::Name(n) => {
                let id = n.id.as_str();
                if let Some(v) = self.env.get(id) {
                    return Ok(v.clone());
                }
                if id == "labels" {
                    return Ok(Value::Labels {
                        shift: Shift::Aligned,
                        flat: false,
                    });
                }
                if self.logits.as_deref() == Some(id) {
                    return Ok(Value::Logits {
                        shift: Shift::Aligned,
                        flat: None,
                    });
                }
                Ok(Value::Free(id.to_string()))
            }
            Expr::Attribute(a) => {
                let receiver = self.eval(&a.value, text)?;
                let tensor = matches!(
                    receiver,
                    Value::Logits { .. } | Value::Labels { .. } | Value::Free(_)
                );
                match a.attr.as_str() {
                    "device" if tensor => Ok(Value::Device),
                    "shape" => match self.as_logits(receiver)? {
                        Some((_, None)) => Ok(Value::Shape),
                        _ => Err(unsupported(self, expr)),
                    },
                    _ if self.reads_tensors(expr) => Err(unsupported(self, expr)),
                    _ => Ok(Value::Untracked),
                }
            }
            Expr::Subscript(s) => {
                let receiver = self.eval(&s.value, text)?;
                match receiver {
                    Value::Labels {
                        shift: Shift::Aligned,
                        flat: false,
                    } if is_labels_shift(&s.slice) => Ok(Value::Labels {
                        shift: Shift::Shifted,
                        flat: false,
                    }),
                    Value::Shape if int_literal(&s.slice) == Some(-1) => Ok(Value::VocabOfLogits),
                    Value::Logits { .. } | Value::Free(_) if is_logits_shift(&s.slice) => {
                        match self.as_logits(receiver)? {
                            Some((Shift::Aligned, None)) => Ok(Value::Logits {
                                shift: Shift::Shifted,
                                flat: None,
                            }),
                            _ => Err(unsupported(self, expr)),
                        }
                    }
                    Value::Logits { .. } => Err(refuse(
                        Reason::LogitsMasked,
                        format!(
                            "`{}` selects or masks logits before the loss",
                            first_line(expr, text)
                        ),
                    )),
                    _ if self.reads_tensors(expr) => Err(unsupported(self, expr)),
                    _ => Ok(Value::Untracked),
                }
            }
            Expr::Call(call) => self.eval_call(expr, call, text, &unsupported),
            Expr::BinOp(b) if b.op == Operator::Mult => {
                let (left, right) = (self.eval(&b.left, text)?, self.eval(&b.right, text)?);
                match (left, right) {
                    (Value::Dim(0), Value::Dim(1)) | (Value::Dim(1), Value::Dim(0)) => {
                        Ok(Value::Dim(usize::MAX))
                    }
                    _ if self.reads_tensors(expr) => Err(unsupported(self, expr)),
                    _ => Ok(Value::Untracked),
                }
            }
            _ if self.reads_tensors(expr) => Err(unsupported(self, expr)),
            _ => Ok(Value::Untracked),
        }
    }

    /// Whether a view argument is the number of tokens: `-1` or `batch * seq` of the logits.
    fn is_token_count(&mut self, expr: &'a Expr, text: &str) -> Result<bool, Refusal> {
        if int_literal(expr) == Some(-1) {
            return Ok(true);
        }
        Ok(matches!(self.eval(expr, text)?, Value::Dim(usize::MAX)))
    }

    fn eval_call(
        &mut self,
        expr: &'a Expr,
        call: &'a ExprCall,
        text: &str,
        unsupported: &dyn Fn(&Self, &Expr) -> Refusal,
    ) -> Result<Value<'a>, Refusal> {
        let args = &call.arguments.args;
        let keywords = &call.arguments.keywords;
        if is_cross_entropy_class(call) {
            return Ok(Value::LossFn(loss_options(call, text, true)?));
        }
        if is_cross_entropy_function(call) {
            let options = loss_options(call, text, false)?;
            return self.apply_loss(expr, options, args.iter().take(2), text);
        }
        if let Expr::Name(callee) = call.func.as_ref()
            && let Some(Value::LossFn(options)) = self.env.get(callee.id.as_str()).cloned()
        {
            if !keywords.is_empty() || args.len() != 2 {
                return Err(refuse(
                    Reason::LossCallUnsupported,
                    format!(
                        "`{}`: the loss function takes input and target only",
                        first_line(expr, text)
                    ),
                ));
            }
            return self.apply_loss(expr, options, args.iter(), text);
        }
        if dotted_name(&call.func).as_deref() == Some("torch.roll") {
            let Some(first) = args.first() else {
                return Err(unsupported(self, expr));
            };
            let receiver = self.eval(first, text)?;
            return self.roll(expr, receiver, &args[1..], keywords, text, unsupported);
        }
        let Expr::Attribute(method) = call.func.as_ref() else {
            return if self.reads_tensors(expr) {
                Err(unsupported(self, expr))
            } else {
                Ok(Value::Untracked)
            };
        };
        let receiver = self.eval(&method.value, text)?;
        let name = method.attr.as_str();
        let no_args = args.is_empty() && keywords.is_empty();
        match (&receiver, name) {
            (Value::Labels { .. } | Value::Logits { .. }, "contiguous") if no_args => {
                return Ok(receiver);
            }
            (Value::Labels { .. } | Value::Logits { .. } | Value::Free(_), "to")
                if keywords.is_empty() && args.len() == 1 =>
            {
                let arg = &args[0];
                let upcast = matches!(
                    dotted_name(arg).as_deref(),
                    Some("torch.float32" | "torch.float")
                );
                if upcast {
                    return match self.as_logits(receiver)? {
                        Some((shift, flat)) => Ok(Value::Logits { shift, flat }),
                        None => Err(unsupported(self, expr)),
                    };
                }
                let device = matches!(self.eval(arg, text)?, Value::Device)
                    || matches!(arg, Expr::Name(n) if n.id.as_str().contains("device"));
                return if device {
                    Ok(receiver)
                } else {
                    Err(unsupported(self, expr))
                };
            }
            (Value::Logits { .. } | Value::Free(_), "float") if no_args => {
                return match self.as_logits(receiver)? {
                    Some((shift, flat)) => Ok(Value::Logits { shift, flat }),
                    None => Err(unsupported(self, expr)),
                };
            }
            (Value::Logits { .. } | Value::Free(_), "size")
                if keywords.is_empty() && args.len() <= 1 =>
            {
                let Some((_, None)) = self.as_logits(receiver)? else {
                    return Err(unsupported(self, expr));
                };
                return match args.first() {
                    None => Ok(Value::Shape),
                    Some(a) if int_literal(a) == Some(-1) => Ok(Value::VocabOfLogits),
                    Some(_) => Err(unsupported(self, expr)),
                };
            }
            (Value::Logits { .. } | Value::Free(_), "view" | "reshape")
                if keywords.is_empty() && args.len() == 2 =>
            {
                let Some((shift, None)) = self.as_logits(receiver)? else {
                    return Err(unsupported(self, expr));
                };
                if !self.is_token_count(&args[0], text)? {
                    return Err(unsupported(self, expr));
                }
                let vocab = match self.eval(&args[1], text)? {
                    Value::VocabOfLogits | Value::Dim(2) => Vocab::Own,
                    Value::Untracked if !self.reads_tensors(&args[1]) => Vocab::Given(&args[1]),
                    _ => return Err(unsupported(self, expr)),
                };
                return Ok(Value::Logits {
                    shift,
                    flat: Some(vocab),
                });
            }
            (Value::Labels { shift, flat: false }, "view" | "reshape")
                if keywords.is_empty() && args.len() == 1 =>
            {
                let shift = *shift;
                if !self.is_token_count(&args[0], text)? {
                    return Err(unsupported(self, expr));
                }
                return Ok(Value::Labels { shift, flat: true });
            }
            (Value::Labels { shift, flat: false }, "flatten") if no_args => {
                return Ok(Value::Labels {
                    shift: *shift,
                    flat: true,
                });
            }
            (Value::Labels { .. }, "roll") => {
                return self.roll(expr, receiver, args, keywords, text, unsupported);
            }
            (Value::Logits { .. }, "masked_fill" | "masked_select" | "where") => {
                return Err(refuse(
                    Reason::LogitsMasked,
                    format!(
                        "`{}` masks the logits before the loss",
                        first_line(expr, text)
                    ),
                ));
            }
            _ => {}
        }
        if self.reads_tensors(expr) {
            Err(unsupported(self, expr))
        } else {
            Ok(Value::Untracked)
        }
    }

    /// `torch.roll(labels, shifts=-1[, dims=-1 | 1])` / `labels.roll(-1[, -1])`.
    fn roll(
        &mut self,
        expr: &'a Expr,
        receiver: Value<'a>,
        args: &'a [Expr],
        keywords: &'a [ruff_python_ast::Keyword],
        _text: &str,
        unsupported: &dyn Fn(&Self, &Expr) -> Refusal,
    ) -> Result<Value<'a>, Refusal> {
        let Value::Labels {
            shift: Shift::Aligned,
            flat: false,
        } = receiver
        else {
            return Err(unsupported(self, expr));
        };
        let mut shifts = args.first();
        let mut dims = args.get(1);
        for k in keywords {
            match k.arg.as_ref().map(|a| a.as_str()) {
                Some("shifts") => shifts = Some(&k.value),
                Some("dims") => dims = Some(&k.value),
                _ => return Err(unsupported(self, expr)),
            }
        }
        let shifts_ok = shifts.and_then(int_literal) == Some(-1);
        // Without `dims` torch rolls the flattened tensor: each row's last column gets the
        // next row's first label, which the padding statement overwrites like the per-row roll.
        let dims_ok = dims.is_none_or(|d| matches!(int_literal(d), Some(-1 | 1)));
        if shifts_ok && dims_ok && args.len() <= 2 {
            Ok(Value::Labels {
                shift: Shift::Rolled,
                flat: false,
            })
        } else {
            Err(unsupported(self, expr))
        }
    }

    /// The loss call: the input must be the flattened logits and the target the flattened
    /// labels, shifted against each other.
    fn apply_loss(
        &mut self,
        expr: &'a Expr,
        options: LossOptions<'a>,
        mut args: impl Iterator<Item = &'a Expr>,
        text: &str,
    ) -> Result<Value<'a>, Refusal> {
        let (Some(input), Some(target)) = (args.next(), args.next()) else {
            return Err(refuse(
                Reason::LossCallUnsupported,
                format!(
                    "`{}`: the cross-entropy lacks its input or target",
                    first_line(expr, text)
                ),
            ));
        };
        let input = self.eval(input, text)?;
        let target = self.eval(target, text)?;
        let (
            Value::Logits {
                shift: logits_shift,
                flat: Some(vocab),
            },
            Value::Labels {
                shift: labels_shift,
                flat: true,
            },
        ) = (&input, &target)
        else {
            return Err(refuse(
                Reason::CustomLoss,
                format!(
                    "`{}`: the cross-entropy is not taken on the flattened logits and labels",
                    first_line(expr, text)
                ),
            ));
        };
        let ignore_index = options.ignore_index.map_or(Some(-100), int_literal);
        match (logits_shift, labels_shift) {
            (Shift::Shifted, Shift::Shifted) => {}
            (Shift::Aligned, Shift::RolledPadded(fill)) if Some(*fill) == ignore_index => {}
            (Shift::Aligned, Shift::Aligned) => {
                return Err(refuse(
                    Reason::Seq2seqLoss,
                    "CrossEntropyLoss on aligned (unshifted) logits and labels",
                ));
            }
            (Shift::Aligned, Shift::Rolled | Shift::RolledPadded(_)) => {
                return Err(refuse(
                    Reason::CustomLoss,
                    "the labels are rolled left but their last column is not set to the ignore_index",
                ));
            }
            (l, r) => {
                return Err(refuse(
                    Reason::CustomLoss,
                    format!(
                        "the logits ({l:?}) and the labels ({r:?}) are not shifted against each other"
                    ),
                ));
            }
        }
        self.loss_vocab = Some(*vocab);
        self.loss_options = Some(options);
        Ok(Value::Loss)
    }
}

/// The options of `CrossEntropyLoss(...)` (`class_form`) or `F.cross_entropy(input, target, ...)`.
fn loss_options<'a>(
    call: &'a ExprCall,
    text: &str,
    class_form: bool,
) -> Result<LossOptions<'a>, Refusal> {
    let positional = if class_form { 0 } else { 2 };
    if call.arguments.args.len() > positional {
        return Err(refuse(
            Reason::LossKwargUnsupported,
            format!(
                "`{}`: positional arguments of the cross-entropy (weight, ...) are not lowered",
                first_line(call, text)
            ),
        ));
    }
    let mut options = LossOptions::default();
    for keyword in &call.arguments.keywords {
        let Some(name) = &keyword.arg else {
            return Err(refuse(
                Reason::LossKwargUnsupported,
                format!(
                    "`{}`: `**` arguments of the cross-entropy",
                    first_line(call, text)
                ),
            ));
        };
        match name.as_str() {
            "ignore_index" => options.ignore_index = Some(&keyword.value),
            "label_smoothing" => options.label_smoothing = Some(&keyword.value),
            "reduction" => match &keyword.value {
                Expr::StringLiteral(s) if s.value.to_str() == "mean" => {}
                other => {
                    return Err(refuse(
                        Reason::LossReductionUnsupported,
                        format!(
                            "reduction={} (the fused op lowers the mean over non-ignored tokens)",
                            first_line(other, text)
                        ),
                    ));
                }
            },
            other => {
                return Err(refuse(
                    Reason::LossKwargUnsupported,
                    format!("cross-entropy argument `{other}` is not lowered"),
                ));
            }
        }
    }
    for value in [options.ignore_index, options.label_smoothing]
        .into_iter()
        .flatten()
    {
        if !super::region::is_pure(value) {
            return Err(refuse(
                Reason::LossCallUnsupported,
                format!(
                    "`{}` is not a side-effect-free value",
                    first_line(value, text)
                ),
            ));
        }
    }
    Ok(options)
}

/// The single `if labels is not None:` statement of the forward whose branch computes a
/// cross-entropy, interpreted; or the refusal saying what the forward does instead.
pub fn find_site<'a>(def: &'a StmtFunctionDef, text: &str) -> Result<LossSite<'a>, Refusal> {
    let mut statements = Vec::new();
    walk_statements(&def.body, &mut statements);
    let computes_cross_entropy = |stmt: &Stmt| {
        calls_in_stmt(stmt)
            .iter()
            .any(|c| is_cross_entropy_class(c) || is_cross_entropy_function(c))
    };
    let sites: Vec<&StmtIf> = statements
        .iter()
        .filter_map(|s| match s {
            Stmt::If(i) if labels_test(&i.test).is_some() && computes_cross_entropy(s) => Some(i),
            _ => None,
        })
        .collect();
    // A forward that never shifts nor rolls its logits or labels computes an aligned loss,
    // whatever else its branch does.
    if !sites.is_empty() && !shifts_labels(def) && !rolls_labels(def) {
        return Err(refuse(
            Reason::Seq2seqLoss,
            "CrossEntropyLoss on aligned (unshifted) labels instead of a causal shift",
        ));
    }
    let labels_if = match sites.as_slice() {
        [] => return Err(classify_without_loss_call(def)),
        [one] => *one,
        // Nested labels tests: the innermost one holds the loss.
        more => *more.last().expect("not empty"),
    };
    if !matches!(labels_test(&labels_if.test), Some(true)) {
        return Err(refuse(
            Reason::CustomLoss,
            "the cross-entropy is under a condition other than `labels is not None`",
        ));
    }
    let path = statement_path(&def.body, labels_if.range());
    let Some(&(block, if_index)) = path.last() else {
        return Err(refuse(
            Reason::CustomLoss,
            "the labels branch is not a statement of the forward",
        ));
    };
    for &(ancestor_block, ancestor_index) in &path[..path.len() - 1] {
        match &ancestor_block[ancestor_index] {
            Stmt::For(_) | Stmt::While(_) => {
                return Err(refuse(
                    Reason::CustomLoss,
                    "the loss is computed inside a loop",
                ));
            }
            Stmt::If(outer) if labels_test(&outer.test).is_some() => {
                return Err(refuse(Reason::CustomLoss, "nested tests of `labels`"));
            }
            _ => {}
        }
    }
    if !labels_if.elif_else_clauses.is_empty() {
        return Err(refuse(
            Reason::ElseBranch,
            "`if labels is not None:` has an else/elif branch",
        ));
    }
    let (interpreter, loss_index, target) = interpret(&labels_if.body, text)?;
    let logits = interpreter.logits.clone().ok_or_else(|| {
        refuse(
            Reason::CustomLoss,
            "no tensor of the labels branch is used as the logits",
        )
    })?;
    let epilogue = epilogue(
        &labels_if.body[loss_index + 1..],
        &interpreter,
        &logits,
        &target,
        text,
    )?;
    check_labels_parameter(def, &interpreter.labels_rebinders)?;
    let options = interpreter.loss_options.expect("set with the loss");
    let vocab = match interpreter.loss_vocab.expect("set with the loss") {
        Vocab::Own => None,
        Vocab::Given(expr) => Some(expr),
    };
    let branch_names = interpreter
        .bound
        .iter()
        .filter(|n| **n != target && **n != logits && *n != "labels")
        .cloned()
        .collect();
    Ok(LossSite {
        block,
        if_index,
        labels_if,
        target,
        logits,
        style: LossStyle::CrossEntropy(CrossEntropyArgs {
            vocab,
            ignore_index: options.ignore_index,
            label_smoothing: options.label_smoothing,
            epilogue: epilogue
                .into_iter()
                .filter(|s| !is_logits_cast(s, &interpreter))
                .collect(),
        }),
        labels_rebinders: interpreter.labels_rebinders,
        branch_names,
    })
}

/// `Some(true)` for `labels is not None`, `Some(false)` for another test that reads `labels`.
fn labels_test(test: &Expr) -> Option<bool> {
    if matches!(is_not_none_test(test), Some(Expr::Name(n)) if n.id.as_str() == "labels") {
        return Some(true);
    }
    names_in_expr(test)
        .iter()
        .any(|n| n.id.as_str() == "labels")
        .then_some(false)
}

/// Interpret the branch up to the loss statement. Returns the interpreter, the index of the
/// loss statement and the loss's name.
fn interpret<'a>(
    body: &'a [Stmt],
    text: &str,
) -> Result<(Interpreter<'a>, usize, String), Refusal> {
    let mut it = Interpreter::new();
    for (index, stmt) in body.iter().enumerate() {
        let extra = |what: &str| {
            refuse(
                Reason::LabelsBranchExtra,
                format!("`{}` in the labels branch {what}", first_line(stmt, text)),
            )
        };
        match stmt {
            Stmt::Assign(a) if a.targets.len() == 1 => match &a.targets[0] {
                Expr::Name(target) => {
                    let value = it.eval(&a.value, text)?;
                    let name = target.id.as_str();
                    match value {
                        Value::Loss => return Ok((it, index, name.to_string())),
                        Value::Free(ref source) if source == name => {}
                        Value::Free(_) | Value::Untracked | Value::Shape | Value::Device => {
                            return Err(extra("binds a value the classic matcher does not track"));
                        }
                        Value::Labels { .. } if name == "labels" => {
                            it.labels_rebinders.push(stmt);
                            it.env.insert(name.to_string(), value);
                        }
                        Value::Logits { .. } if it.logits.as_deref() == Some(name) => {
                            // `logits = logits.float()`: still the logits.
                            it.env.insert(name.to_string(), value);
                        }
                        _ => {
                            if name == "labels" || it.logits.as_deref() == Some(name) {
                                return Err(extra("rebinds the labels or the logits"));
                            }
                            it.bound.push(name.to_string());
                            it.env.insert(name.to_string(), value);
                        }
                    }
                }
                Expr::Tuple(tuple) => {
                    if !matches!(it.eval(&a.value, text)?, Value::Shape) || tuple.elts.len() != 3 {
                        return Err(extra("unpacks something else than the logits' shape"));
                    }
                    for (i, element) in tuple.elts.iter().enumerate() {
                        let Expr::Name(n) = element else {
                            return Err(extra("unpacks into something else than names"));
                        };
                        it.bound.push(n.id.to_string());
                        it.env.insert(n.id.to_string(), Value::Dim(i));
                    }
                }
                Expr::Subscript(sub) => {
                    let Expr::Name(n) = sub.value.as_ref() else {
                        return Err(extra("assigns into an expression"));
                    };
                    let fill = int_literal(&a.value);
                    match it.env.get(n.id.as_str()) {
                        Some(Value::Labels {
                            shift: Shift::Rolled,
                            flat: false,
                        }) if is_last_column(&sub.slice)
                            && fill.is_some()
                            && n.id.as_str() != "labels" =>
                        {
                            let value = Value::Labels {
                                shift: Shift::RolledPadded(fill.expect("checked")),
                                flat: false,
                            };
                            it.env.insert(n.id.to_string(), value);
                        }
                        Some(Value::Logits { .. }) => {
                            return Err(refuse(
                                Reason::LogitsMutated,
                                format!("`{}` assigns into the logits", first_line(stmt, text)),
                            ));
                        }
                        _ if it.logits.as_deref() == Some(n.id.as_str()) => {
                            return Err(refuse(
                                Reason::LogitsMutated,
                                format!("`{}` assigns into the logits", first_line(stmt, text)),
                            ));
                        }
                        _ => return Err(extra("assigns into a tensor")),
                    }
                }
                _ => return Err(extra("assigns to something else than a name")),
            },
            Stmt::Expr(e) if e.value.is_string_literal_expr() => {}
            Stmt::Pass(_) => {}
            _ => {
                // Say what the statement does to the logits when it touches them.
                if masks_logits(stmt, &|name| {
                    it.logits.as_deref() == Some(name)
                        || matches!(it.env.get(name), Some(Value::Logits { .. }))
                }) {
                    return Err(refuse(
                        Reason::LogitsMasked,
                        format!(
                            "`{}` selects or masks logits before the loss",
                            first_line(stmt, text)
                        ),
                    ));
                }
                if let Some(logits) = it.logits.as_deref()
                    && crate::syntax::stmt_mentions(stmt, logits)
                {
                    return Err(refuse(
                        Reason::LogitsReadBeforeLoss,
                        format!(
                            "`{}` reads the logits in the labels branch",
                            first_line(stmt, text)
                        ),
                    ));
                }
                return Err(extra("is not part of a shifted cross-entropy"));
            }
        }
    }
    Err(refuse(
        Reason::CustomLoss,
        "the labels branch builds a cross-entropy but never assigns its result",
    ))
}

/// Statements after the loss: casts of the logits (dropped by the fused branch, where the
/// logits are None) and simple statements that transform the loss without reading the
/// tensors of the branch (repeated by the fused branch).
fn epilogue<'a>(
    tail: &'a [Stmt],
    it: &Interpreter<'a>,
    logits: &str,
    target: &str,
    text: &str,
) -> Result<Vec<&'a Stmt>, Refusal> {
    let mut kept = Vec::new();
    for stmt in tail {
        if is_logits_cast(stmt, it) {
            kept.push(stmt);
            continue;
        }
        let simple = matches!(
            stmt,
            Stmt::Assign(_) | Stmt::AugAssign(_) | Stmt::AnnAssign(_)
        );
        let names = crate::syntax::names_in_stmt(stmt);
        let reads_branch = names.iter().any(|n| {
            let id = n.id.as_str();
            id == logits
                || (id != target && it.env.contains_key(id))
                || (id == "labels" && !it.labels_rebinders.is_empty())
        });
        let binds_other = crate::syntax::stores_in_stmt(stmt)
            .iter()
            .any(|n| n.id.as_str() != target);
        if !simple || reads_branch || binds_other {
            let reason = if names.iter().any(|n| n.id.as_str() == logits) {
                Reason::LogitsReadAfterLoss
            } else {
                Reason::LabelsBranchExtra
            };
            return Err(refuse(
                reason,
                format!(
                    "`{}` after the loss in the labels branch is not a transform of the loss",
                    first_line(stmt, text)
                ),
            ));
        }
        kept.push(stmt);
    }
    Ok(kept)
}

/// `logits = logits.to(x)` / `.float()` / `.type(x)` after the loss: the original returns the
/// cast logits; the fused branch returns None.
fn is_logits_cast(stmt: &Stmt, it: &Interpreter<'_>) -> bool {
    let Some(logits) = it.logits.as_deref() else {
        return false;
    };
    let Stmt::Assign(a) = stmt else { return false };
    let [Expr::Name(target)] = a.targets.as_slice() else {
        return false;
    };
    let Expr::Call(call) = a.value.as_ref() else {
        return false;
    };
    let Expr::Attribute(method) = call.func.as_ref() else {
        return false;
    };
    target.id.as_str() == logits
        && matches!(method.value.as_ref(), Expr::Name(n) if n.id.as_str() == logits)
        && matches!(
            method.attr.as_str(),
            "to" | "float" | "type" | "half" | "bfloat16"
        )
        && call
            .arguments
            .args
            .iter()
            .chain(call.arguments.keywords.iter().map(|k| &k.value))
            .all(|e| !crate::syntax::expr_mentions(e, logits))
}

/// An index that only slices (`[..., :-1, :]`, `[:, -1]`), as opposed to a mask or gather.
fn is_plain_index(slice: &Expr) -> bool {
    index_elements(slice)
        .iter()
        .all(|e| matches!(e, Expr::Slice(_) | Expr::EllipsisLiteral(_)) || int_literal(e).is_some())
}

/// Whether a statement selects logits with a mask (`logits[..., :-1, :][mask != 0]`,
/// `logits[mask]`) or calls a masking method on them.
fn masks_logits(stmt: &Stmt, is_logits_name: &dyn Fn(&str) -> bool) -> bool {
    let is_logits = |e: &Expr| match e {
        Expr::Name(n) => is_logits_name(n.id.as_str()),
        Expr::Subscript(inner) => is_logits_shift(&inner.slice),
        _ => false,
    };
    let mut found = false;
    crate::syntax::for_each_subscript(stmt, &mut |sub| {
        if is_logits(&sub.value) && !is_plain_index(&sub.slice) {
            found = true;
        }
    });
    found
        || calls_in_stmt(stmt).iter().any(|c| {
            matches!(c.func.as_ref(), Expr::Attribute(a)
                if matches!(a.attr.as_str(), "masked_fill" | "masked_fill_" | "masked_select")
                    && is_logits(&a.value))
        })
}
