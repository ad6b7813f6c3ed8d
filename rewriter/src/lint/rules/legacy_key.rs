//! FR-A003 `legacy-flag-key`: a legacy switch used as a string key: subscripts
//! (`kwargs["use_flash_attention_2"]`), `.get` / `.pop` / `.setdefault`, `getattr` /
//! `hasattr` / `setattr` / `delattr`, dict literal keys (`{"use_flash_attention_2": True}`)
//! and membership tests (`"use_flash_attention_2" in kwargs`).
//!
//! A switch whose name is also a backend name or a short form is reported only with
//! evidence: the container looks like a configuration (`cfg`, `config`, `kwargs`, ...), or
//! the value stored or defaulted is a bool. `ALL_ATTENTION_FUNCTIONS["flex_attention"]` is a
//! registry lookup by canonical name and is left alone.

use ruff_python_ast::{CmpOp, Expr, ExprCall, ExprCompare, ExprContext, ExprDict, ExprSubscript};
use ruff_text_size::Ranged;

use crate::lint::checker::{Checker, capability_for, implementation_field};
use crate::lint::context::{is_boolish, is_config_like, string_literal};
use crate::lint::rules::Rule;

/// The switch a string names, and its canonical backend; None when the string is not a
/// switch, or is an ambiguous one without `evidence`.
fn switch<'c>(checker: &'c Checker<'_>, key: &'c str, evidence: bool) -> Option<&'c str> {
    let canonical = checker.table.legacy_flag(key)?;
    if checker.table.flag_is_ambiguous(key) && !evidence {
        return None;
    }
    Some(canonical)
}

pub(crate) fn check_subscript(checker: &mut Checker<'_>, sub: &ExprSubscript, expr: &Expr) {
    let Some(key) = string_literal(&sub.slice) else {
        return;
    };
    let evidence = is_config_like(&sub.value)
        || checker.context.is_switch_tested(expr)
        || checker.context.is_bool_assigned(expr);
    let Some(canonical) = switch(checker, key, evidence) else {
        return;
    };
    let owner = checker.text(sub.value.as_ref());
    let field = implementation_field(key);
    let replacement = if sub.ctx == ExprContext::Load {
        capability_for(checker, canonical, &format!("{owner}[\"{field}\"]"))
    } else {
        format!("{owner}[\"{field}\"] = \"{canonical}\"")
    };
    checker.report(
        Rule::LegacyFlagKey,
        sub.range,
        format!("uses the legacy switch \"{key}\" ({canonical}) as a key"),
        replacement,
    );
}

pub(crate) fn check_call(checker: &mut Checker<'_>, call: &ExprCall) {
    let args = &call.arguments.args;
    match call.func.as_ref() {
        Expr::Attribute(attr) if matches!(attr.attr.as_str(), "get" | "pop" | "setdefault") => {
            let Some(key) = args.first().and_then(string_literal) else {
                return;
            };
            let evidence = is_config_like(&attr.value)
                || checker.context.is_switch_tested(call)
                || args.get(1).is_some_and(Expr::is_boolean_literal_expr);
            let Some(canonical) = switch(checker, key, evidence) else {
                return;
            };
            let owner = checker.text(attr.value.as_ref());
            let field = implementation_field(key);
            let replacement = if attr.attr.as_str() == "setdefault" {
                format!("{owner}.setdefault(\"{field}\", \"{canonical}\")")
            } else {
                capability_for(checker, canonical, &format!("{owner}.get(\"{field}\")"))
            };
            checker.report(
                Rule::LegacyFlagKey,
                call.range(),
                format!(
                    "looks up the legacy switch \"{key}\" ({canonical}) with .{}()",
                    attr.attr
                ),
                replacement,
            );
        }
        Expr::Name(name)
            if matches!(
                name.id.as_str(),
                "getattr" | "hasattr" | "setattr" | "delattr"
            ) =>
        {
            let (Some(owner), Some(key)) = (args.first(), args.get(1).and_then(string_literal))
            else {
                return;
            };
            let evidence = is_config_like(owner)
                || checker.context.is_switch_tested(call)
                || args.get(2).is_some_and(is_boolish);
            let Some(canonical) = switch(checker, key, evidence) else {
                return;
            };
            let owner = checker.text(owner);
            let field = implementation_field(key);
            let replacement = if name.id.as_str() == "setattr" {
                format!("setattr({owner}, \"{field}\", \"{canonical}\")")
            } else {
                capability_for(
                    checker,
                    canonical,
                    &format!("getattr({owner}, \"{field}\", None)"),
                )
            };
            checker.report(
                Rule::LegacyFlagKey,
                call.range(),
                format!(
                    "uses the legacy switch \"{key}\" ({canonical}) with {}()",
                    name.id
                ),
                replacement,
            );
        }
        _ => {}
    }
}

pub(crate) fn check_dict(checker: &mut Checker<'_>, dict: &ExprDict) {
    for item in &dict.items {
        let Some(key_expr) = &item.key else { continue };
        let Some(key) = string_literal(key_expr) else {
            continue;
        };
        let Some(canonical) = switch(checker, key, is_boolish(&item.value)) else {
            continue;
        };
        checker.report(
            Rule::LegacyFlagKey,
            key_expr.range(),
            format!("a dict sets the legacy switch \"{key}\" ({canonical})"),
            format!("\"{}\": \"{canonical}\"", implementation_field(key)),
        );
    }
}

pub(crate) fn check_compare(checker: &mut Checker<'_>, compare: &ExprCompare) {
    let operands: Vec<&Expr> = std::iter::once(compare.left.as_ref())
        .chain(compare.comparators.iter())
        .collect();
    for (i, op) in compare.ops.iter().enumerate() {
        if !matches!(op, CmpOp::In | CmpOp::NotIn) {
            continue;
        }
        let (left, right) = (operands[i], operands[i + 1]);
        let Some(key) = string_literal(left) else {
            continue;
        };
        let Some(canonical) = switch(checker, key, is_config_like(right)) else {
            continue;
        };
        let owner = checker.text(right);
        checker.report(
            Rule::LegacyFlagKey,
            left.range(),
            format!("tests for the legacy switch \"{key}\" ({canonical})"),
            format!("\"{}\" in {owner}", implementation_field(key)),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::lint::rules::test_support::{codes, of};

    #[test]
    fn reports_keys_of_switches() {
        let src = r#"kwargs["use_flash_attention_2"] = True
if kwargs.pop("use_flash_attention_2", False):
    pass
enabled = getattr(config, "_flash_attn_2_enabled", False)
setattr(config, "_use_sdpa", True)
model_kwargs = {"use_flash_attention_2": True}
if "use_flash_attention_2" in kwargs:
    pass
"#;
        assert_eq!(codes(src), ["FR-A003"; 6]);
        let found = of(src, "FR-A003");
        assert_eq!(
            found[0].1,
            "kwargs[\"attn_implementation\"] = \"flash_attention_2\""
        );
        assert_eq!(
            found[3].1,
            "setattr(config, \"_attn_implementation\", \"sdpa\")"
        );
        assert_eq!(found[4].1, "\"attn_implementation\": \"flash_attention_2\"");
    }

    #[test]
    fn ambiguous_switches_need_a_config_or_a_bool() {
        assert_eq!(
            codes("x = getattr(self.cfg, \"flash_attention\", None)\n"),
            ["FR-A003"]
        );
        assert_eq!(codes("d = {\"flash_attention\": True}\n"), ["FR-A003"]);
        assert_eq!(codes("x = cfg[\"flex_attention\"]\n"), ["FR-A003"]);
        assert_eq!(
            codes("if not data.get(\"flash_attention\"):\n    pass\n"),
            ["FR-A003"]
        );
        assert_eq!(
            codes("ok = data.get(\"flex_attention\") is not None\n"),
            ["FR-A003"]
        );
    }

    #[test]
    fn leaves_registry_lookups_by_canonical_name() {
        assert!(codes("fn = ALL_ATTENTION_FUNCTIONS[\"flex_attention\"]\n").is_empty());
        assert!(codes("fn = ALL_ATTENTION_FUNCTIONS.get(\"flex_attention\")\n").is_empty());
        assert!(codes("MAP = {\"flash_attention\": flash_fn, \"sdpa\": sdpa_fn}\n").is_empty());
        assert!(codes("if \"flex_attention\" in ALL_ATTENTION_FUNCTIONS:\n    pass\n").is_empty());
        assert!(codes("x = kwargs.get(\"attn_implementation\")\n").is_empty());
    }
}
