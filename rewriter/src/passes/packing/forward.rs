//! What the class's forward and each wrapper pass down: `position_ids` unchanged, `**kwargs`
//! (the varlen metadata travels there), and no multimodal positions on the way.

use ruff_python_ast::{Expr, ExprCall, Stmt};
use ruff_text_size::Ranged;

use crate::syntax::{callee_last_name, walk_statements};

use super::flow::{Function, passes_var_kw, under_none_default};
use super::{Analysis, Code, Level};

/// `C.forward` and its base-model call (`self.<attr>(...)`).
pub(super) fn check_class_forward(
    a: &mut Analysis<'_>,
    forward: &Function<'_>,
    call: &ExprCall,
    attr: &str,
) {
    let name = forward.name();
    if !forward.has_param("position_ids") {
        a.refuse(
            Code::NoPositionIds,
            format!("{name} has no position_ids parameter"),
        );
    } else if !passes_name(call, "position_ids") {
        a.refuse(
            Code::NoPositionIds,
            format!("{name} does not pass position_ids=position_ids to self.{attr}(...)"),
        );
    } else if let Some(stmt) = rebinding(forward, "position_ids") {
        a.refuse(
            Code::NoPositionIds,
            format!("{name} changes position_ids: {}", forward.text(stmt)),
        );
    }
    match forward.var_kw() {
        None => a.refuse(
            Code::KwargsNotForwarded,
            format!("{name} takes no **kwargs"),
        ),
        Some(kwargs) if !passes_var_kw(call, kwargs) => a.refuse(
            Code::KwargsNotForwarded,
            format!("{name} does not pass **{kwargs} to self.{attr}(...)"),
        ),
        Some(_) => {}
    }
    multimodal(a, forward);
}

/// Facts of a base model or wrapper's own forward.
pub(super) fn check_level(a: &mut Analysis<'_>, level: &Level<'_>) {
    multimodal(a, &level.forward);
}

/// A wrapper's call of its inner model (`self.<attr>(...)`): `position_ids` (as its own
/// parameter, or inside `**kwargs`) and `**kwargs` go down.
pub(super) fn check_pass_down(
    a: &mut Analysis<'_>,
    forward: &Function<'_>,
    call: &ExprCall,
    attr: &str,
) {
    let name = forward.name();
    let kwargs = forward.var_kw();
    let passes_kwargs = kwargs.is_some_and(|k| passes_var_kw(call, k));
    if forward.has_param("position_ids") {
        if !passes_name(call, "position_ids") {
            a.refuse(
                Code::NoPositionIds,
                format!("{name} does not pass position_ids=position_ids to self.{attr}(...)"),
            );
        } else if let Some(stmt) = rebinding(forward, "position_ids") {
            a.refuse(
                Code::NoPositionIds,
                format!("{name} changes position_ids: {}", forward.text(stmt)),
            );
        }
    } else if !passes_kwargs {
        a.refuse(
            Code::NoPositionIds,
            format!("{name} takes no position_ids and passes no **kwargs to self.{attr}(...)"),
        );
    }
    if !passes_kwargs {
        a.refuse(
            Code::KwargsNotToAttention,
            match kwargs {
                Some(k) => format!("{name} does not pass **{k} to self.{attr}(...)"),
                None => format!("{name} takes no **kwargs"),
            },
        );
    }
}

/// `name=name` among a call's keywords.
fn passes_name(call: &ExprCall, name: &str) -> bool {
    call.arguments
        .find_keyword(name)
        .is_some_and(|k| matches!(&k.value, Expr::Name(n) if n.id.as_str() == name))
}

/// A statement that binds `name` other than a default for a missing value
/// (`if name is None: name = ...`).
fn rebinding<'a>(forward: &Function<'a>, name: &str) -> Option<&'a Stmt> {
    let mut statements = Vec::new();
    walk_statements(forward.body(), &mut statements);
    statements.into_iter().find(|stmt| {
        let binds = match stmt {
            Stmt::Assign(s) => s.targets.iter().any(|t| target_binds(t, name)),
            Stmt::AnnAssign(s) => target_binds(&s.target, name),
            Stmt::AugAssign(s) => target_binds(&s.target, name),
            _ => false,
        };
        binds && !under_none_default(forward, stmt.range(), name)
    })
}

fn target_binds(target: &Expr, name: &str) -> bool {
    match target {
        Expr::Name(n) => n.id.as_str() == name,
        Expr::Tuple(t) => t.elts.iter().any(|e| target_binds(e, name)),
        Expr::List(l) => l.elts.iter().any(|e| target_binds(e, name)),
        Expr::Starred(s) => target_binds(&s.value, name),
        _ => false,
    }
}

/// `rope_deltas`, `get_rope_index(...)`, `compute_3d_position_ids(...)` in a forward.
fn multimodal(a: &mut Analysis<'_>, forward: &Function<'_>) {
    let call = forward.calls().into_iter().find(|c| {
        matches!(
            callee_last_name(&c.func),
            Some("get_rope_index" | "compute_3d_position_ids")
        )
    });
    if let Some(call) = call {
        a.refuse(
            Code::MultimodalPositions,
            format!(
                "{} computes 3D positions: {}",
                forward.name(),
                forward.text(call)
            ),
        );
    } else if forward.mentions("rope_deltas") {
        a.refuse(
            Code::MultimodalPositions,
            format!("{} reads rope_deltas (multimodal RoPE)", forward.name()),
        );
    }
}
