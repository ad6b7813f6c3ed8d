//! FR-A101 `short-name-argument`: a short form given where an attention implementation's
//! name goes: `attn_implementation="fa2"` (keyword or parameter default),
//! `config._attn_implementation = "flash"`, `{"attn_implementation": "sdp"}`,
//! `model.set_attn_implementation("flash")`. transformers raises on these names and
//! `forward_rewrite.attention` rejects them, naming the canonical one.
//!
//! "Where a name goes" is a keyword, parameter, target or key whose name contains `attn` /
//! `attention` and `impl`; the value is any string the expression may evaluate to (either
//! branch of `a if c else b`, operands of `or`). Names that are neither canonical nor short
//! forms (`"xformers"`, hub kernels `org/repo`) are not this rule's business.

use ruff_python_ast::{Expr, ExprCall, ExprDict, Stmt, StmtFunctionDef};
use ruff_text_size::TextRange;

use crate::lint::checker::Checker;
use crate::lint::context::{
    is_implementation_named, is_implementation_value, string_literal, value_name, value_strings,
};
use crate::lint::rules::Rule;

fn report_value(checker: &mut Checker<'_>, value: &Expr) {
    let strings: Vec<(String, TextRange)> = value_strings(value)
        .into_iter()
        .map(|(s, r)| (s.to_string(), r))
        .collect();
    for (name, range) in strings {
        let Some(canonical) = checker.table.alias(&name) else {
            continue;
        };
        checker.report(
            Rule::ShortNameArgument,
            range,
            format!(
                "\"{name}\" given as the attention implementation is a short form; the canonical name is \"{canonical}\""
            ),
            format!("\"{canonical}\""),
        );
    }
}

pub(crate) fn check_call(checker: &mut Checker<'_>, call: &ExprCall) {
    for keyword in &call.arguments.keywords {
        if keyword
            .arg
            .as_ref()
            .is_some_and(|arg| is_implementation_named(arg.as_str()))
        {
            report_value(checker, &keyword.value);
        }
    }
    // `set_attn_implementation("fa2")`: the callee says what its first argument is.
    if value_name(&call.func).is_some_and(is_implementation_named)
        && let Some(first) = call.arguments.args.first()
    {
        report_value(checker, first);
    }
}

pub(crate) fn check_assignment(checker: &mut Checker<'_>, stmt: &Stmt) {
    let (targets, value): (Vec<&Expr>, &Expr) = match stmt {
        Stmt::Assign(a) => (a.targets.iter().collect(), &a.value),
        Stmt::AnnAssign(a) => match &a.value {
            Some(value) => (vec![a.target.as_ref()], value),
            None => return,
        },
        _ => return,
    };
    if targets.into_iter().any(is_implementation_value) {
        report_value(checker, value);
    }
}

pub(crate) fn check_dict(checker: &mut Checker<'_>, dict: &ExprDict) {
    for item in &dict.items {
        if item
            .key
            .as_ref()
            .and_then(string_literal)
            .is_some_and(is_implementation_named)
        {
            report_value(checker, &item.value);
        }
    }
}

pub(crate) fn check_function(checker: &mut Checker<'_>, def: &StmtFunctionDef) {
    let parameters = &def.parameters;
    for parameter in parameters
        .posonlyargs
        .iter()
        .chain(&parameters.args)
        .chain(&parameters.kwonlyargs)
    {
        if is_implementation_named(parameter.parameter.name.as_str())
            && let Some(default) = &parameter.default
        {
            report_value(checker, default);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::lint::rules::test_support::{codes, of};

    #[test]
    fn reports_short_forms_given_as_the_implementation() {
        let src = r#"m = AutoModelForCausalLM.from_pretrained(p, attn_implementation="fa2")
config._attn_implementation = "flash"
kwargs = {"attn_implementation": "sdp" if x else "flash_attention_2"}
model.set_attn_implementation("flex")
def load(attn_implementation: str = "flash_attn"):
    pass
impl = cfg.attn_implementation or "fa3"
"#;
        let found = of(src, "FR-A101");
        let replacements: Vec<&str> = found.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(
            replacements,
            [
                "\"flash_attention_2\"",
                "\"flash_attention_2\"",
                "\"sdpa\"",
                "\"flex_attention\"",
                "\"flash_attention_2\"",
            ]
        );
        assert_eq!(found[0].0, "1:65");
    }

    #[test]
    fn leaves_canonical_and_unknown_names() {
        assert!(codes("f(attn_implementation=\"flash_attention_2\")\n").is_empty());
        assert!(codes("f(attn_implementation=\"kernels-community/flash-attn3\")\n").is_empty());
        assert!(codes("cfg.attn_implementation = \"xformers\"\n").is_empty());
        assert!(codes("mode = \"default\"\nf(mode=\"flash\")\n").is_empty());
    }
}
