//! FR-A004 `legacy-flag-definition`: a legacy switch defined as part of an interface: a
//! function parameter (`def load(model, use_flash_attention_2=False)`) or a field of a
//! configuration class (`flash_attention: bool | None = None` in a dataclass / pydantic
//! model). Its readers and writers are found by the other rules; this one finds where the
//! switch is offered, which is what a migration removes (or keeps deprecated).
//!
//! A switch whose name is also a backend name or a short form is reported only when the
//! definition says it is a bool: an annotation mentioning `bool`, or a `True` / `False`
//! default. A local variable with that name is not an interface and is not reported.

use ruff_python_ast::{Expr, Stmt, StmtClassDef, StmtFunctionDef};
use ruff_text_size::{Ranged, TextRange};

use crate::lint::checker::Checker;
use crate::lint::context::is_boolish;
use crate::lint::rules::Rule;

fn report(
    checker: &mut Checker<'_>,
    name: &str,
    annotation: Option<&Expr>,
    default: Option<&Expr>,
    range: TextRange,
    what: &str,
) {
    let Some(canonical) = checker.table.legacy_flag(name) else {
        return;
    };
    if checker.table.flag_is_ambiguous(name) {
        let says_bool = annotation.is_some_and(|a| checker.text(a).contains("bool"))
            || default.is_some_and(is_boolish);
        if !says_bool {
            return;
        }
    }
    checker.report(
        Rule::LegacyFlagDefinition,
        range,
        format!("{what} `{name}` offers a legacy switch for {canonical}; take the implementation's canonical name instead"),
        format!("attn_implementation: str = \"{canonical}\""),
    );
}

pub(crate) fn check_function(checker: &mut Checker<'_>, def: &StmtFunctionDef) {
    let parameters = &def.parameters;
    for parameter in parameters
        .posonlyargs
        .iter()
        .chain(&parameters.args)
        .chain(&parameters.kwonlyargs)
    {
        report(
            checker,
            parameter.parameter.name.as_str(),
            parameter.parameter.annotation.as_deref(),
            parameter.default.as_deref(),
            parameter.range(),
            "parameter",
        );
    }
}

pub(crate) fn check_class_body(checker: &mut Checker<'_>, class: &StmtClassDef) {
    for stmt in &class.body {
        match stmt {
            Stmt::AnnAssign(a) => {
                if let Expr::Name(name) = a.target.as_ref() {
                    report(
                        checker,
                        name.id.as_str(),
                        Some(&a.annotation),
                        a.value.as_deref(),
                        a.range,
                        "field",
                    );
                }
            }
            Stmt::Assign(a) if a.targets.len() == 1 => {
                if let Expr::Name(name) = &a.targets[0] {
                    report(
                        checker,
                        name.id.as_str(),
                        None,
                        Some(&a.value),
                        a.range,
                        "field",
                    );
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::lint::rules::test_support::{codes, of};

    #[test]
    fn reports_parameters_and_fields() {
        let src = "def load(path, use_flash_attention_2=False, *, flash_attention: bool = False):\n    pass\n";
        assert_eq!(codes(src), ["FR-A004", "FR-A004"]);
        let src = "class Cfg(BaseModel):\n    flash_attention: bool | None = None\n    sdp_attention: Optional[bool] = None\n    _use_sdpa = False\n";
        let found = of(src, "FR-A004");
        assert_eq!(found.len(), 3);
        assert_eq!(found[2].1, "attn_implementation: str = \"sdpa\"");
    }

    #[test]
    fn leaves_non_bool_definitions_of_ambiguous_names() {
        assert!(codes("def flex_attention(query, key, value):\n    pass\n").is_empty());
        assert!(codes("def f(flex_attention=None):\n    pass\n").is_empty());
        assert!(codes("class M(nn.Module):\n    flash_attention = FlashAttention\n").is_empty());
        assert!(codes("def f():\n    use_flash_attn = True\n").is_empty());
    }
}
