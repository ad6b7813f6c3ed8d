//! The head check: the attribute called on the hidden states must be a plain `nn.Linear`
//! built in an `__init__` of the chain. The most-derived `__init__` that assigns it wins;
//! within it the last assignment wins, and it must not be conditional.

use ruff_python_ast::{Expr, Stmt};
use ruff_text_size::Ranged;

use crate::analyze::ParsedClass;
use crate::reason::Reason;
use crate::syntax::{dotted_name, method, self_attribute, walk_statements};

use super::Refusal;

const LINEAR: [&str; 2] = ["nn.Linear", "torch.nn.Linear"];

/// Whether the head has a bias: `Some(bool)` when the source says so (absent means True),
/// None when it depends on a runtime value.
pub fn check_head(chain: &[ParsedClass<'_>], head: &str) -> Result<Option<bool>, Refusal> {
    for class in chain {
        let Some(init) = method(&class.class_def().body, "__init__") else {
            continue;
        };
        let mut statements = Vec::new();
        walk_statements(&init.body, &mut statements);
        let assigns: Vec<(&Stmt, &Expr)> = statements
            .iter()
            .filter_map(|stmt| match stmt {
                Stmt::Assign(a) if a.targets.iter().any(|t| self_attribute(t) == Some(head)) => {
                    Some((*stmt, &*a.value))
                }
                Stmt::AnnAssign(a) if self_attribute(&a.target) == Some(head) => {
                    a.value.as_deref().map(|v| (*stmt, v))
                }
                _ => None,
            })
            .collect();
        let Some(&(last_stmt, value)) = assigns.last() else {
            continue;
        };
        let owner = &class.source.qualname;
        if assigns
            .iter()
            .any(|(stmt, _)| !init.body.iter().any(|top| top.range() == stmt.range()))
        {
            return Err(Refusal::new(
                Reason::NonLinearHead,
                format!(
                    "self.{head} is assigned conditionally (inside a block) in {owner}.__init__"
                ),
            ));
        }
        if let Stmt::Assign(a) = last_stmt
            && a.targets.len() != 1
        {
            return Err(Refusal::new(
                Reason::NonLinearHead,
                format!("self.{head} is assigned together with other names in {owner}.__init__"),
            ));
        }
        let text = class
            .parsed
            .slice(value)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let Expr::Call(call) = value else {
            return Err(Refusal::new(
                Reason::NonLinearHead,
                format!("self.{head} = {text} in {owner}.__init__ is not an nn.Linear"),
            ));
        };
        let callee = dotted_name(&call.func).unwrap_or_default();
        if !LINEAR.contains(&callee.as_str()) {
            return Err(Refusal::new(
                Reason::NonLinearHead,
                format!("self.{head} = {callee}(...) in {owner}.__init__ is not a plain nn.Linear"),
            ));
        }
        let bias = call
            .arguments
            .keywords
            .iter()
            .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == "bias"))
            .map(|k| &k.value)
            .or_else(|| call.arguments.args.get(2));
        return Ok(match bias {
            None => Some(true),
            Some(Expr::BooleanLiteral(b)) => Some(b.value),
            Some(_) => None,
        });
    }
    Err(Refusal::new(
        Reason::NonLinearHead,
        format!("self.{head} is not assigned in an __init__ of the class chain (built elsewhere)"),
    ))
}
