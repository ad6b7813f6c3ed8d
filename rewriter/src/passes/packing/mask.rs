//! Where the masks the decoder layers receive come from. The run time sees only masks built
//! through transformers' masking utilities (its hook wraps `_preprocess_mask_arguments`), and
//! only when they are built with the forward's `position_ids` from a missing mask; it then
//! restricts each query to its own sequence, so an overlay OR-ed after that restriction
//! (`block_sequence_ids`) or a change made to the built mask undoes the guarantee.

use ruff_python_ast::{Expr, ExprCall, Stmt};

use crate::syntax::{callee_last_name, calls_in_expr, walk_statements};

use super::flow::{Function, Origin, argument, call_keywords, function_aliases, origins};
use super::{Analysis, Code, Level};

/// The mask builders of `masking_utils` whose masks the run time sees.
pub(super) const BUILDERS: [&str; 4] = [
    "create_causal_mask",
    "create_sliding_window_causal_mask",
    "create_chunked_causal_mask",
    "create_masks_for_generate",
];

/// The mask builders a forward calls: by name, or through a local name bound to them
/// (`mask_function = create_causal_mask if ... else create_sliding_window_causal_mask`).
fn builder_test(function: &Function<'_>) -> impl Fn(&ExprCall) -> bool + use<> {
    let aliases = function_aliases(function, &BUILDERS);
    move |call: &ExprCall| match call.func.as_ref() {
        Expr::Name(n) if aliases.contains(n.id.as_str()) => true,
        func => callee_last_name(func).is_some_and(|n| BUILDERS.contains(&n)),
    }
}

/// The mask calls of a level's forward (each passes `position_ids`, none passes
/// `block_sequence_ids`) and its default mask.
pub(super) fn check_level(a: &mut Analysis<'_>, level: &Level<'_>) {
    let forward = &level.forward;
    let is_builder = builder_test(forward);
    for call in forward.calls() {
        if !is_builder(call) {
            continue;
        }
        let name = callee_last_name(&call.func).unwrap_or_default();
        let keywords = call_keywords(forward, call);
        let positions = keywords.get("position_ids");
        let from_position_ids = !positions.is_empty()
            && positions
                .iter()
                .all(|value| matches!(value, Expr::Name(n) if n.id.as_str() == "position_ids"));
        if !from_position_ids {
            a.refuse(
                Code::MaskWithoutPositionIds,
                if positions.is_empty() {
                    format!("{} calls {name}(...) without position_ids", forward.name())
                } else {
                    format!(
                        "{} calls {name}(...) with position_ids={}",
                        forward.name(),
                        forward.text(positions[0])
                    )
                },
            );
        }
        if let Some(value) = keywords
            .get("block_sequence_ids")
            .into_iter()
            .find(|v| !v.is_none_literal_expr())
        {
            a.refuse(
                Code::MaskModified,
                format!(
                    "{} passes block_sequence_ids={} to {name}(...): the block overlay is \
                     OR-ed after the packing restriction, a block may span sequences",
                    forward.name(),
                    forward.text(value)
                ),
            );
        }
    }
    default_mask(a, forward);
}

/// `attention_mask = torch.ones(...)` (or `.new_ones`, `ones_like`) in a forward.
fn default_mask(a: &mut Analysis<'_>, forward: &Function<'_>) {
    let mut statements = Vec::new();
    walk_statements(forward.body(), &mut statements);
    for stmt in statements {
        let (targets, value): (Vec<&Expr>, &Expr) = match stmt {
            Stmt::Assign(s) => (s.targets.iter().collect(), &s.value),
            Stmt::AnnAssign(s) => match &s.value {
                Some(v) => (vec![s.target.as_ref()], v),
                None => continue,
            },
            _ => continue,
        };
        let is_mask = targets
            .iter()
            .any(|t| matches!(t, Expr::Name(n) if n.id.as_str() == "attention_mask"));
        let ones = calls_in_expr(value).iter().any(|c| {
            matches!(
                callee_last_name(&c.func),
                Some("ones" | "ones_like" | "new_ones")
            )
        });
        if is_mask && ones {
            a.refuse(
                Code::DefaultMask,
                format!(
                    "{} replaces a missing attention_mask: {}",
                    forward.name(),
                    forward.text(stmt)
                ),
            );
        }
    }
}

/// The mask a layer call passes (`value`, in the loop level's forward): traced back through
/// the levels to the calls that build it.
pub(super) fn check_layer_mask<'a>(a: &mut Analysis<'a>, levels: &[Level<'a>], value: &'a Expr) {
    let last = levels.len() - 1;
    trace(a, levels, last, &levels[last].forward, value, 0);
}

fn trace<'a>(
    a: &mut Analysis<'a>,
    levels: &[Level<'a>],
    index: usize,
    function: &Function<'a>,
    value: &'a Expr,
    depth: usize,
) {
    let is_builder = builder_test(function);
    for origin in origins(function, value, &is_builder) {
        match origin {
            Origin::Call | Origin::GivenDict => {}
            Origin::Param(param) => {
                // The level's own parameter: what the level above passes for it.
                let level = &levels[index];
                if depth > 8 {
                    continue;
                }
                if index == 0 {
                    a.refuse(
                        Code::MaskNotFromMaskingUtils,
                        format!(
                            "the layers receive the caller's {param} as passed to {} (not a \
                             mask built by transformers' masking utilities)",
                            function.name()
                        ),
                    );
                    continue;
                }
                let positional = level.forward.positional();
                match argument(level.entry, Some(&positional), &param) {
                    Some(outer_value) => {
                        trace(a, levels, index - 1, &level.outer, outer_value, depth + 1);
                    }
                    None => a.refuse(
                        Code::MaskNotFromMaskingUtils,
                        format!(
                            "{} is not given {param} by {}: the layers receive no mask",
                            level.forward.name(),
                            level.outer.name()
                        ),
                    ),
                }
            }
            Origin::NoneLiteral => a.refuse(
                Code::MaskNotFromMaskingUtils,
                format!(
                    "{} passes no mask (None) to a decoder layer",
                    function.name()
                ),
            ),
            Origin::Changed(text) => a.refuse(
                Code::MaskModified,
                format!("{} changes the built mask: {text}", function.name()),
            ),
            Origin::Other(text) => a.refuse(
                Code::MaskNotFromMaskingUtils,
                format!(
                    "{} passes a mask that comes from {text}, not from transformers' masking \
                     utilities",
                    function.name()
                ),
            ),
        }
    }
}
