//! Find the loss site: the single `T = self.loss_function(...)` that is the only statement
//! of an `if labels is not None:` without `else`, and parse its arguments the way
//! `ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
//! shift_labels, **kwargs)` binds them. Forwards without it are classified here
//! (seq2seq `CrossEntropyLoss`, hand-made losses, no loss at all).

use ruff_python_ast::{Expr, ExprCall, ExprName, Stmt, StmtFunctionDef, StmtIf};
use ruff_text_size::Ranged;

use crate::reason::Reason;
use crate::syntax::{
    calls_in_stmt, dotted_name, is_not_none_test, names_in_stmt, self_attribute, statement_path,
};

use super::Refusal;
use super::classic::{self, CrossEntropyArgs};

/// The keywords of `ForCausalLMLoss` that the fused op forwards when given explicitly.
pub const LOSS_KEYWORDS: [&str; 3] = ["num_items_in_batch", "ignore_index", "shift_labels"];
/// `ForCausalLMLoss`'s positional order.
const POSITIONAL: [&str; 6] = [
    "logits",
    "labels",
    "vocab_size",
    "num_items_in_batch",
    "ignore_index",
    "shift_labels",
];

pub struct LossSite<'a> {
    /// The block holding the `if labels is not None:` statement, and its index there.
    pub block: &'a [Stmt],
    pub if_index: usize,
    pub labels_if: &'a StmtIf,
    /// `loss` in `loss = self.loss_function(...)`.
    pub target: String,
    /// The name of the logits the loss reads.
    pub logits: String,
    /// Which of the two matched shapes computes the loss, with its arguments.
    pub style: LossStyle<'a>,
    /// Statements of the labels branch that rebind `labels` (a device move, a classic shift):
    /// the fused branch skips them, so `labels` must not be read after the region.
    pub labels_rebinders: Vec<&'a Stmt>,
    /// Names the labels branch binds besides the loss (`shift_logits`, `loss_fct`, ...): the
    /// fused branch does not bind them, so they must not be read after the region.
    pub branch_names: Vec<String>,
}

/// The two shapes of a causal-LM loss the pass lowers.
pub enum LossStyle<'a> {
    /// `loss = self.loss_function(logits, labels, vocab_size, ...)`: transformers' `ForCausalLMLoss`.
    LossFunction(LossArgs<'a>),
    /// The classic hand-written shift + `CrossEntropyLoss` (`classic.rs`).
    CrossEntropy(CrossEntropyArgs<'a>),
}

/// Statements the 4.57-era labels branches put before the loss call that do not change
/// the loss: moving the labels to the logits' device (`ForCausalLMLoss` moves them again)
/// and upcasting the logits (`ForCausalLMLoss` upcasts them again).
enum Prelude {
    MovesLabels,
    Upcast,
}

fn benign_prelude(stmt: &Stmt, logits: &str) -> Option<Prelude> {
    let Stmt::Assign(assign) = stmt else {
        return None;
    };
    let [Expr::Name(target)] = assign.targets.as_slice() else {
        return None;
    };
    let Expr::Call(call) = &*assign.value else {
        return None;
    };
    let Expr::Attribute(method) = &*call.func else {
        return None;
    };
    let receiver_is = |name: &str| matches!(&*method.value, Expr::Name(n) if n.id.as_str() == name);
    let no_keywords = call.arguments.keywords.is_empty();
    match (target.id.as_str(), method.attr.as_str()) {
        ("labels", "to")
            if receiver_is("labels") && no_keywords && call.arguments.args.len() == 1 =>
        {
            match &call.arguments.args[0] {
                Expr::Attribute(device)
                    if device.attr.as_str() == "device" && dotted_name(&device.value).is_some() =>
                {
                    Some(Prelude::MovesLabels)
                }
                _ => None,
            }
        }
        (name, "float")
            if name == logits
                && receiver_is(logits)
                && no_keywords
                && call.arguments.args.is_empty() =>
        {
            Some(Prelude::Upcast)
        }
        _ => None,
    }
}

pub struct LossArgs<'a> {
    pub vocab_size: &'a Expr,
    /// Explicit `num_items_in_batch` / `ignore_index` / `shift_labels`, in that order.
    pub explicit: Vec<(&'static str, &'a Expr)>,
    /// `**name` splats.
    pub splats: Vec<&'a Expr>,
}

fn is_loss_call(call: &ExprCall) -> bool {
    self_attribute(&call.func) == Some("loss_function")
}

pub fn find_loss_site<'a>(def: &'a StmtFunctionDef, text: &str) -> Result<LossSite<'a>, Refusal> {
    let calls: Vec<&ExprCall> = def
        .body
        .iter()
        .flat_map(calls_in_stmt)
        .filter(|call| is_loss_call(call))
        .collect();
    let call = match calls.as_slice() {
        [] => return classic::find_site(def, text),
        [call] => *call,
        more => {
            return Err(Refusal::new(
                Reason::CustomLoss,
                format!("{} calls of self.loss_function in the forward", more.len()),
            ));
        }
    };
    let path = statement_path(&def.body, call.range());
    let Some(&(block, index)) = path.last() else {
        return Err(Refusal::new(
            Reason::CustomLoss,
            "the loss call is not in a statement of the forward",
        ));
    };
    let stmt = &block[index];
    let target = match stmt {
        Stmt::Assign(assign)
            if assign.value.range() == call.range() && assign.targets.len() == 1 =>
        {
            match &assign.targets[0] {
                Expr::Name(name) => name.id.to_string(),
                _ => {
                    return Err(Refusal::new(
                        Reason::CustomLoss,
                        "the loss is assigned to something else than a name",
                    ));
                }
            }
        }
        _ => {
            return Err(Refusal::new(
                Reason::CustomLoss,
                "self.loss_function(...) is used inside an expression, not assigned on its own",
            ));
        }
    };
    if path.len() < 2 {
        return Err(Refusal::new(
            Reason::CustomLoss,
            "the loss is computed without an `if labels is not None:` guard",
        ));
    }
    let (parent_block, parent_index) = path[path.len() - 2];
    let Stmt::If(labels_if) = &parent_block[parent_index] else {
        return Err(Refusal::new(
            Reason::CustomLoss,
            "the loss call is not directly under an `if labels is not None:`",
        ));
    };
    if !labels_if.body.iter().any(|s| s.range() == stmt.range()) {
        return Err(Refusal::new(
            Reason::CustomLoss,
            "the loss call is in an elif/else branch",
        ));
    }
    match is_not_none_test(&labels_if.test) {
        Some(Expr::Name(name)) if name.id.as_str() == "labels" => {}
        Some(other) => {
            return Err(Refusal::new(
                Reason::LabelsNotPlain,
                format!(
                    "the loss branch tests `{}`, not `labels`",
                    crate::syntax::dotted_name(other).unwrap_or_default()
                ),
            ));
        }
        None => {
            return Err(Refusal::new(
                Reason::CustomLoss,
                "the loss call is under a condition other than `labels is not None`",
            ));
        }
    }
    for &(ancestor_block, ancestor_index) in &path[..path.len() - 2] {
        if matches!(
            ancestor_block[ancestor_index],
            Stmt::For(_) | Stmt::While(_)
        ) {
            return Err(Refusal::new(
                Reason::CustomLoss,
                "the loss is computed inside a loop",
            ));
        }
    }
    if !labels_if.elif_else_clauses.is_empty() {
        return Err(Refusal::new(
            Reason::ElseBranch,
            "`if labels is not None:` has an else/elif branch",
        ));
    }
    let (args, logits) = parse_loss_args(call)?;
    let loss_position = labels_if
        .body
        .iter()
        .position(|s| s.range() == stmt.range())
        .expect("checked above");
    if loss_position + 1 != labels_if.body.len() {
        return Err(Refusal::new(
            Reason::LabelsBranchExtra,
            format!(
                "the labels branch holds {} statements after the loss call",
                labels_if.body.len() - loss_position - 1
            ),
        ));
    }
    let mut labels_rebinders = Vec::new();
    for prelude in &labels_if.body[..loss_position] {
        match benign_prelude(prelude, logits.id.as_str()) {
            Some(Prelude::MovesLabels) => labels_rebinders.push(prelude),
            Some(Prelude::Upcast) => {}
            None => {
                return Err(Refusal::new(
                    Reason::LabelsBranchExtra,
                    format!(
                        "the labels branch holds {} statements besides the loss call",
                        labels_if.body.len() - 1
                    ),
                ));
            }
        }
    }
    check_labels_parameter(def, &labels_rebinders)?;
    Ok(LossSite {
        block: parent_block,
        if_index: parent_index,
        labels_if,
        target,
        logits: logits.id.to_string(),
        style: LossStyle::LossFunction(args),
        labels_rebinders,
        branch_names: Vec::new(),
    })
}

/// `labels` must be a parameter of the forward and never rebound in it (except by the
/// statements of the labels branch that the fused branch skips).
pub(super) fn check_labels_parameter(
    def: &StmtFunctionDef,
    rebinders: &[&Stmt],
) -> Result<(), Refusal> {
    if !def.parameters.iter().any(|p| p.name().as_str() == "labels") {
        return Err(Refusal::new(
            Reason::LabelsNotPlain,
            "the forward has no `labels` parameter",
        ));
    }
    let mut statements = Vec::new();
    crate::syntax::walk_statements(&def.body, &mut statements);
    for stmt in statements {
        if rebinders.iter().any(|p| p.range() == stmt.range()) {
            continue;
        }
        let own_names: Vec<_> = match stmt {
            Stmt::If(_)
            | Stmt::For(_)
            | Stmt::While(_)
            | Stmt::With(_)
            | Stmt::Try(_)
            | Stmt::Match(_) => continue,
            _ => names_in_stmt(stmt),
        };
        if own_names
            .iter()
            .any(|n| n.id.as_str() == "labels" && !n.ctx.is_load())
        {
            return Err(Refusal::new(
                Reason::LabelsNotPlain,
                "`labels` is rebound inside the forward",
            ));
        }
    }
    Ok(())
}

fn parse_loss_args(call: &ExprCall) -> Result<(LossArgs<'_>, &ExprName), Refusal> {
    let mut slots: [Option<&Expr>; 6] = [None; 6];
    if call.arguments.args.len() > POSITIONAL.len() {
        return Err(Refusal::new(
            Reason::LossCallUnsupported,
            "more positional arguments than ForCausalLMLoss takes",
        ));
    }
    for (slot, arg) in slots.iter_mut().zip(call.arguments.args.iter()) {
        if arg.is_starred_expr() {
            return Err(Refusal::new(
                Reason::LossCallUnsupported,
                "`*args` in the loss call",
            ));
        }
        *slot = Some(arg);
    }
    let mut splats = Vec::new();
    for keyword in &call.arguments.keywords {
        let Some(name) = &keyword.arg else {
            if !matches!(keyword.value, Expr::Name(_)) {
                return Err(Refusal::new(
                    Reason::LossCallUnsupported,
                    "`**` of an expression in the loss call",
                ));
            }
            splats.push(&keyword.value);
            continue;
        };
        let Some(position) = POSITIONAL.iter().position(|p| *p == name.as_str()) else {
            return Err(Refusal::new(
                Reason::LossKwargUnsupported,
                format!(
                    "loss keyword `{}` is not read by ForCausalLMLoss",
                    name.as_str()
                ),
            ));
        };
        if slots[position].replace(&keyword.value).is_some() {
            return Err(Refusal::new(
                Reason::LossCallUnsupported,
                format!("`{}` given twice", name.as_str()),
            ));
        }
    }
    let (Some(logits), Some(labels), Some(vocab_size)) = (slots[0], slots[1], slots[2]) else {
        return Err(Refusal::new(
            Reason::LossCallUnsupported,
            "the loss call lacks logits, labels or vocab_size",
        ));
    };
    match labels {
        Expr::Name(name) if name.id.as_str() == "labels" => {}
        other => {
            let text = dotted_name(other).unwrap_or_else(|| "an expression".to_string());
            return Err(Refusal::new(
                Reason::LabelsNotPlain,
                format!("the loss gets labels={text}"),
            ));
        }
    }
    let Expr::Name(logits) = logits else {
        return Err(Refusal::new(
            Reason::LossCallUnsupported,
            "the logits argument is an expression, not a name",
        ));
    };
    let explicit = LOSS_KEYWORDS
        .iter()
        .zip(&slots[3..])
        .filter_map(|(k, v)| v.map(|v| (*k, v)))
        .collect();
    Ok((
        LossArgs {
            vocab_size,
            explicit,
            splats,
        },
        logits,
    ))
}

/// The forward computes no loss either matched shape knows: say what it does instead.
pub(super) fn classify_without_loss_call(def: &StmtFunctionDef) -> Refusal {
    let calls: Vec<&ExprCall> = def.body.iter().flat_map(calls_in_stmt).collect();
    let cross_entropy = calls.iter().any(|call| {
        dotted_name(&call.func).is_some_and(|name| {
            name.ends_with("CrossEntropyLoss")
                || name.ends_with("cross_entropy")
                || name == "loss_fct"
        })
    });
    if cross_entropy {
        if crate::candidate::shifts_labels(def) {
            return Refusal::new(
                Reason::CustomLoss,
                "a hand-written shifted CrossEntropyLoss instead of self.loss_function",
            );
        }
        return Refusal::new(
            Reason::Seq2seqLoss,
            "CrossEntropyLoss on aligned (unshifted) labels instead of self.loss_function",
        );
    }
    let other_loss = calls.iter().find_map(|call| match call.func.as_ref() {
        Expr::Attribute(attr) if attr.attr.as_str().contains("loss") => dotted_name(&call.func),
        Expr::Name(name) if name.id.as_str().contains("loss") => Some(name.id.to_string()),
        _ => None,
    });
    match other_loss {
        Some(name) => Refusal::new(
            Reason::CustomLoss,
            format!("the loss is computed by {name}(...)"),
        ),
        None => Refusal::new(
            Reason::NoLossCall,
            "the forward computes no loss with self.loss_function",
        ),
    }
}
