//! FR-A201 `implementation-comparison`: an attention implementation compared against names
//! (`config._attn_implementation == "flash_attention_2"`, `impl in ["sdpa", "eager"]`,
//! `"flash" in attn_impl`, `impl.startswith("flash")`) to decide a behaviour. Such a test
//! misses the backends added later (flash_attention_3 / 4, hub kernels) and disagrees with
//! the table; ask `forward_rewrite.attention.capabilities(name)` instead. The replacement is
//! the capability test computed from the table: the one that holds for exactly the compared
//! backends, else the narrowest one that holds for all of them (the message names the other
//! backends it also holds for).
//!
//! Reported when the compared names include a canonical backend (for substring / prefix
//! tests: a backend the literal matches) and either the subject is an attention value
//! (`attn`, `attention` in its name; for substring tests `impl` too, so that
//! `"sdpa" in ALL_ATTENTION_FUNCTIONS` is left alone) or a compared name is distinctive
//! (`"flash_attention_2"`, not `"eager"`: `mode == "eager"` is torch.compile's business).
//! Names outside the table (`"xformers"`, `"sage"`) are a framework's own backends: they are
//! named in the message but do not make a finding on their own.

use ruff_python_ast::{CmpOp, Expr, ExprCall, ExprCompare};
use ruff_text_size::{Ranged, TextRange};

use crate::lint::checker::Checker;
use crate::lint::context::{
    is_attention_value, is_implementation_value, string_elements, string_literal,
};
use crate::lint::rules::Rule;
use crate::lint::rules::short_name_comparison::{LiteralTest, literal_tests};

pub(crate) fn check_compare(checker: &mut Checker<'_>, compare: &ExprCompare) {
    for LiteralTest {
        subject,
        values,
        negated,
    } in literal_tests(compare)
    {
        if string_literal(subject).is_some() {
            continue;
        }
        let names: Vec<&str> = values.iter().map(|(v, _)| *v).collect();
        let canonical: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| checker.table.is_canonical(n))
            .collect();
        if canonical.is_empty() {
            continue;
        }
        let distinctive = canonical.iter().any(|n| !checker.table.is_ambiguous(n));
        if !is_attention_value(subject) && !distinctive {
            continue;
        }
        let unknown: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !checker.table.is_canonical(n) && checker.table.alias(n).is_none())
            .collect();
        report(
            checker,
            compare.range,
            subject,
            &canonical,
            &unknown,
            negated,
            "compares",
        );
    }
    // `"flash" in attn_impl`: a substring test on the implementation's name.
    let operands: Vec<&Expr> = std::iter::once(compare.left.as_ref())
        .chain(compare.comparators.iter())
        .collect();
    for (i, op) in compare.ops.iter().enumerate() {
        if !matches!(op, CmpOp::In | CmpOp::NotIn) {
            continue;
        }
        let (left, right) = (operands[i], operands[i + 1]);
        let Some(needle) = string_literal(left) else {
            continue;
        };
        if !is_implementation_value(right) {
            continue;
        }
        let matched: Vec<&str> = checker
            .table
            .names()
            .filter(|n| n.contains(needle))
            .collect();
        if matched.is_empty() {
            continue;
        }
        report(
            checker,
            compare.range,
            right,
            &matched,
            &[],
            *op == CmpOp::NotIn,
            "tests a substring of",
        );
    }
}

/// `impl.startswith("flash")` / `.endswith(...)`, with a string or a tuple of strings.
pub(crate) fn check_call(checker: &mut Checker<'_>, call: &ExprCall) {
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return;
    };
    let prefix = match attr.attr.as_str() {
        "startswith" => true,
        "endswith" => false,
        _ => return,
    };
    if !is_attention_value(&attr.value) {
        return;
    }
    let Some(values) = call.arguments.args.first().and_then(string_elements) else {
        return;
    };
    let matched: Vec<&str> = checker
        .table
        .names()
        .filter(|n| {
            values.iter().any(|(v, _)| {
                if prefix {
                    n.starts_with(v)
                } else {
                    n.ends_with(v)
                }
            })
        })
        .collect();
    if matched.is_empty() {
        return;
    }
    let what = if prefix {
        "tests a prefix of"
    } else {
        "tests a suffix of"
    };
    report(
        checker,
        call.range(),
        &attr.value,
        &matched,
        &[],
        false,
        what,
    );
}

fn report(
    checker: &mut Checker<'_>,
    range: TextRange,
    subject: &Expr,
    names: &[&str],
    unknown: &[&str],
    negated: bool,
    what: &str,
) {
    let subject_text = checker.text(subject);
    let question = checker.table.capability_question(names);
    let listed = names.join(", ");
    let mut message =
        format!("{what} the attention implementation `{subject_text}` against {listed}");
    let replacement = match &question {
        Some(q) => {
            let test = q.render(&subject_text, false);
            let test = test.replace("forward_rewrite.attention.", "");
            if q.exact {
                message.push_str(&format!(
                    "; ask the capability instead ({test} holds for exactly these)"
                ));
            } else {
                message.push_str(&format!(
                    "; ask the capability instead ({test} also holds for {}, which the comparison misses)",
                    q.also.join(", ")
                ));
            }
            q.render(&subject_text, negated)
        }
        None => {
            message.push_str("; no capability of the table separates these backends: add one to attention_backends.json and ask it");
            format!("forward_rewrite.attention.capabilities({subject_text})")
        }
    };
    if !unknown.is_empty() {
        message.push_str(&format!(
            " ({} not a transformers backend: keep that test)",
            unknown
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
                + if unknown.len() == 1 { " is" } else { " are" }
        ));
    }
    checker.report(Rule::ImplementationComparison, range, message, replacement);
}

#[cfg(test)]
mod tests {
    use crate::lint::rules::test_support::{codes, of};

    #[test]
    fn reports_name_comparisons_with_the_capability_to_ask() {
        let src = r#"if self.config._attn_implementation == "flash_attention_2":
    pass
use_mask = cfg.attn_implementation in ("sdpa", "eager")
if attn_impl != "flex_attention":
    pass
packed = "flash" in attn_impl
paged = config._attn_implementation.startswith("paged|")
"#;
        let found = of(src, "FR-A201");
        let replacements: Vec<&str> = found.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(
            replacements,
            [
                "forward_rewrite.attention.capabilities(self.config._attn_implementation).takes_varlen_kwargs",
                "forward_rewrite.attention.capabilities(cfg.attn_implementation).mask == \"dense\"",
                "forward_rewrite.attention.capabilities(attn_impl).mask != \"block\"",
                "forward_rewrite.attention.capabilities(attn_impl).takes_varlen_kwargs",
                "forward_rewrite.attention.capabilities(config._attn_implementation).paged",
            ]
        );
        assert_eq!(found[0].0, "1:4");
        // A distinctive canonical name is enough, whatever the subject is called.
        assert_eq!(
            codes("if backend == \"flash_attention_2\":\n    pass\n"),
            ["FR-A201"]
        );
    }

    #[test]
    fn names_outside_the_table_do_not_make_a_finding() {
        assert!(codes("if cfg.attn_implementation == \"xformers\":\n    pass\n").is_empty());
        assert!(codes("if mode == \"eager\":\n    pass\n").is_empty());
        assert!(codes("if \"sdpa\" in ALL_ATTENTION_FUNCTIONS:\n    pass\n").is_empty());
        assert!(codes("ok = name.startswith(\"flash\")\n").is_empty());
        assert!(
            codes("if cfg.attn_implementation == \"kernels-community/flash-attn3\":\n    pass\n")
                .is_empty()
        );
    }

    #[test]
    fn unknown_names_beside_canonical_ones_are_named() {
        let src = "ok = cfg.attn_implementation in (\"flash_attention_2\", \"xformers\")\n";
        let findings = crate::lint::lint_source(src, "t.py").unwrap();
        assert_eq!(findings.len(), 1);
        assert!(
            findings[0]
                .message
                .contains("\"xformers\" is not a transformers backend")
        );
    }
}
