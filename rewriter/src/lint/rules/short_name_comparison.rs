//! FR-A102 `short-name-comparison`: a value compared for equality or membership against a
//! short form: `x == "flash"`, `impl in ("fa2", "sdp")`. Once names are canonical no value
//! equals a short form, so the branch is dead (or was reached by a name transformers
//! rejects).
//!
//! Short forms that are also ordinary words (`ambiguous_names` in the table: `default`,
//! `math`, `native`, `fa`, `flex`, ...) are reported only when the other side is an
//! attention value (its name contains `attn` / `attention`): `mode == "default"` is left
//! alone. Prefix and substring tests (`.startswith("flash")`, `"flash" in impl`) match
//! canonical names too; they are FR-A201's.

use ruff_python_ast::{CmpOp, Expr, ExprCompare};
use ruff_text_size::{Ranged, TextRange};

use crate::lint::checker::Checker;
use crate::lint::context::{is_attention_value, string_elements, string_literal};
use crate::lint::rules::Rule;

/// One equality or membership test of a comparison against string literals.
pub(crate) struct LiteralTest<'e> {
    /// The other side: the value being tested.
    pub subject: &'e Expr,
    /// The literals and their ranges.
    pub values: Vec<(&'e str, TextRange)>,
    /// `!=` / `not in`.
    pub negated: bool,
}

/// The adjacent pairs of a comparison that test equality with a string literal, or
/// membership in a literal collection of strings.
pub(crate) fn literal_tests(compare: &ExprCompare) -> Vec<LiteralTest<'_>> {
    let operands: Vec<&Expr> = std::iter::once(compare.left.as_ref())
        .chain(compare.comparators.iter())
        .collect();
    let mut tests = Vec::new();
    for (i, op) in compare.ops.iter().enumerate() {
        let (left, right) = (operands[i], operands[i + 1]);
        match op {
            CmpOp::Eq | CmpOp::NotEq => {
                let negated = *op == CmpOp::NotEq;
                if let Some(value) = string_literal(right) {
                    tests.push(LiteralTest {
                        subject: left,
                        values: vec![(value, right.range())],
                        negated,
                    });
                } else if let Some(value) = string_literal(left) {
                    tests.push(LiteralTest {
                        subject: right,
                        values: vec![(value, left.range())],
                        negated,
                    });
                }
            }
            // `x in ("a", "b")`; a plain string on the right is a substring test.
            CmpOp::In | CmpOp::NotIn if string_literal(right).is_none() => {
                if let Some(values) = string_elements(right) {
                    tests.push(LiteralTest {
                        subject: left,
                        values,
                        negated: *op == CmpOp::NotIn,
                    });
                }
            }
            _ => {}
        }
    }
    tests
}

pub(crate) fn check(checker: &mut Checker<'_>, compare: &ExprCompare) {
    for LiteralTest {
        subject, values, ..
    } in literal_tests(compare)
    {
        if string_literal(subject).is_some() {
            continue;
        }
        for (value, range) in values {
            let Some(canonical) = checker.table.alias(value) else {
                continue;
            };
            if checker.table.is_ambiguous(value) && !is_attention_value(subject) {
                continue;
            }
            let subject_text = checker.text(subject);
            checker.report(
                Rule::ShortNameComparison,
                range,
                format!(
                    "`{subject_text}` is compared against the short form \"{value}\", which no canonical configuration holds; the canonical name is \"{canonical}\""
                ),
                format!("\"{canonical}\""),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::lint::rules::test_support::{codes, of};

    #[test]
    fn reports_short_forms_in_comparisons() {
        let src = "if x == \"flash\":\n    pass\nok = backend in (\"fa2\", \"sdp\")\nif \"fa3\" != attn:\n    pass\n";
        let found = of(src, "FR-A102");
        assert_eq!(
            found,
            [
                ("1:9".into(), "\"flash_attention_2\"".into()),
                ("3:18".into(), "\"flash_attention_2\"".into()),
                ("3:25".into(), "\"sdpa\"".into()),
                ("4:4".into(), "\"flash_attention_3\"".into()),
            ]
        );
        assert_eq!(
            codes("if cfg.attention == \"default\":\n    pass\n"),
            ["FR-A102"]
        );
    }

    #[test]
    fn leaves_ordinary_words_and_prefix_tests() {
        assert!(codes("if mode == \"default\":\n    pass\n").is_empty());
        assert!(codes("if lang in (\"fa\", \"en\"):\n    pass\n").is_empty());
        assert!(codes("if precision == \"math\":\n    pass\n").is_empty());
        // Substring and prefix tests belong to FR-A201.
        assert!(!codes("ok = \"flash\" in attn_impl\n").contains(&"FR-A102"));
        assert!(!codes("ok = attn_impl.startswith(\"flash\")\n").contains(&"FR-A102"));
        assert!(codes("if optimizer == \"flash_adamw\":\n    pass\n").is_empty());
    }
}
