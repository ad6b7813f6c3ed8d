//! FR-A002 `legacy-flag-attribute`: a legacy switch read or set as an attribute:
//! `config._flash_attn_2_enabled = True`, `if self.cfg.flash_attention:`.
//!
//! Not reported: an attribute that is called (`self.flash_attention(q, k, v)`: a method) or
//! used as a namespace (`integrations.flex_attention.make_block_mask`), and a dotted path from
//! an imported module (`torch.nn.attention.flex_attention`). A switch whose name is also a
//! backend name or a short form (`flash_attention`, `flex_attention`, `sdp_attention`) is
//! reported only with evidence that it is a switch: it is truth-tested or compared to
//! True / False / None, it is assigned a bool, or its owner looks like a configuration
//! (`cfg`, `config`, `args`, `*_args`, `kwargs`, `options`, ...). So
//! `self.flash_attention = FlashAttention2(config)` (a submodule) is left alone.

use ruff_python_ast::{Expr, ExprAttribute, ExprContext};

use crate::lint::checker::{Checker, capability_for, implementation_field};
use crate::lint::context::is_config_like;
use crate::lint::rules::Rule;

pub(crate) fn check(checker: &mut Checker<'_>, attr: &ExprAttribute, expr: &Expr) {
    let flag = attr.attr.as_str();
    let Some(canonical) = checker.table.legacy_flag(flag) else {
        return;
    };
    let context = &checker.context;
    if context.is_callee(expr) || context.is_receiver(expr) || context.is_module_path(&attr.value) {
        return;
    }
    let store = attr.ctx != ExprContext::Load;
    if checker.table.flag_is_ambiguous(flag) {
        let evidence = context.is_switch_tested(expr)
            || context.is_bool_assigned(expr)
            || is_config_like(&attr.value);
        if !evidence {
            return;
        }
    }
    let owner = checker.text(attr.value.as_ref());
    let field = format!("{owner}.{}", implementation_field(flag));
    let (message, replacement) = if store {
        (
            format!(
                "sets the legacy switch `{owner}.{flag}` ({canonical}); set the implementation by its canonical name"
            ),
            format!("{field} = \"{canonical}\""),
        )
    } else {
        (
            format!(
                "reads the legacy switch `{owner}.{flag}` ({canonical}); ask the configured implementation for the capability you need"
            ),
            capability_for(checker, canonical, &field),
        )
    };
    checker.report(Rule::LegacyFlagAttribute, attr.range, message, replacement);
}

#[cfg(test)]
mod tests {
    use crate::lint::rules::test_support::{codes, of};

    #[test]
    fn reports_distinctive_switches_anywhere() {
        let src = "config._flash_attn_2_enabled = True\nif model.config._use_sdpa:\n    pass\nx = self.use_flash_attention_2\n";
        let found = of(src, "FR-A002");
        assert_eq!(found.len(), 3);
        assert_eq!(
            found[0],
            (
                "1:1".into(),
                "config._attn_implementation = \"flash_attention_2\"".into()
            )
        );
        assert_eq!(
            found[1].1,
            "forward_rewrite.attention.capabilities(model.config._attn_implementation).mask == \"dense\""
        );
        assert_eq!(
            found[2].1,
            "forward_rewrite.attention.capabilities(self.attn_implementation).takes_varlen_kwargs"
        );
    }

    #[test]
    fn reports_config_switches_with_evidence() {
        let src = "if self.cfg.flash_attention and not cfg.sample_packing:\n    pass\n";
        assert_eq!(codes(src), ["FR-A002"]);
        assert_eq!(codes("x = cfg.flex_attention\n"), ["FR-A002"]);
        assert_eq!(codes("state.flash_attention = True\n"), ["FR-A002"]);
        assert_eq!(
            codes("if state.sdp_attention is True:\n    pass\n"),
            ["FR-A002"]
        );
    }

    #[test]
    fn leaves_functions_modules_and_submodules() {
        assert!(codes("out = self.flash_attention(q, k, v)\n").is_empty());
        assert!(codes("self.flash_attention = FlashAttention2(config)\n").is_empty());
        assert!(codes("import torch\nfn = torch.nn.attention.flex_attention\n").is_empty());
        assert!(codes("m = integrations.flex_attention.make_flex_block_causal_mask\n").is_empty());
        assert!(codes("fn = module.flex_attention\n").is_empty());
        // A local variable that merely has the name is not an attribute.
        assert!(
            codes("flash_attention = is_flash_attn_available()\nif flash_attention:\n    pass\n")
                .is_empty()
        );
    }
}
