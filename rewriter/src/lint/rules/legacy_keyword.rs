//! FR-A001 `legacy-flag-keyword`: a legacy switch passed as a keyword argument,
//! `from_pretrained(..., use_flash_attention_2=True)`.
//!
//! Switches whose name is also a backend name or a short form (`flash_attention`,
//! `flex_attention`, `sdp_attention`) also name functions and modules, so for them the value
//! must show it is a switch: a bool (literal, comparison, `not`, `bool(...)`) or another
//! switch passed through (`flash_attention=cfg.flash_attention`). `flex_attention=my_fn` is
//! left alone.

use ruff_python_ast::ExprCall;
use ruff_text_size::Ranged;

use crate::lint::checker::Checker;
use crate::lint::context::{is_boolish, value_name};
use crate::lint::rules::Rule;

pub(crate) fn check_call(checker: &mut Checker<'_>, call: &ExprCall) {
    for keyword in &call.arguments.keywords {
        let Some(arg) = &keyword.arg else { continue };
        let flag = arg.as_str();
        let Some(canonical) = checker.table.legacy_flag(flag) else {
            continue;
        };
        if checker.table.flag_is_ambiguous(flag) {
            let passed_through = value_name(&keyword.value)
                .is_some_and(|name| checker.table.legacy_flag(name).is_some());
            if !is_boolish(&keyword.value) && !passed_through {
                continue;
            }
        }
        checker.report(
            Rule::LegacyFlagKeyword,
            keyword.range(),
            format!(
                "`{flag}=` is a legacy switch for {canonical}; select the backend by its canonical name"
            ),
            format!("attn_implementation=\"{canonical}\""),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::lint::rules::test_support::{codes, of};

    #[test]
    fn reports_legacy_keywords() {
        let src =
            "model = AutoModelForCausalLM.from_pretrained(path, use_flash_attention_2=True)\n";
        assert_eq!(
            of(src, "FR-A001"),
            [(
                "1:52".into(),
                "attn_implementation=\"flash_attention_2\"".into()
            )]
        );
        let src = "build(cfg, flash_attention=cfg.flash_attention, use_sdpa=x)\n";
        let found = of(src, "FR-A001");
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].1, "attn_implementation=\"sdpa\"");
        assert_eq!(codes("f(flex_attention=not eager)\n"), ["FR-A001"]);
    }

    #[test]
    fn leaves_functions_passed_under_a_backend_name() {
        assert!(codes("AttentionInterface.register(flex_attention=my_flex)\n").is_empty());
        assert!(codes("f(flash_attention=FlashAttention(config))\n").is_empty());
        assert!(codes("f(attn_implementation=\"sdpa\", use_cache=True)\n").is_empty());
    }
}
