//! Unit tests of the rms-norm pass: every known form, every reason code.

use crate::passes::fusion_common::testing::{run, site_patch, site_reason, sites};

const LLAMA: &str = "class ToyRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        \"\"\"Docstring.\"\"\"
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)
";

const GEMMA: &str = "class ToyRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        # Llama does x.to(float16) * w whilst Gemma3 is (x * w).to(float16)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)
";

const GEMMA4: &str = "class ToyRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if self.with_scale:
            self.weight = nn.Parameter(torch.ones(dim), requires_grad=True)

    def _norm(self, hidden_states: torch.Tensor):
        mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
        # Use torch.pow() (over torch.sqrt() or torch.rsqrt()) to address compiler differences
        return hidden_states * torch.pow(mean_squared, -0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed_output = self._norm(hidden_states.float())
        if self.with_scale:
            normed_output = normed_output * self.weight.float()
        return normed_output.type_as(hidden_states)
";

fn report(extra: &str) -> crate::audit::PassReport {
    run(&super::PASS, extra)
}

#[test]
fn llama_form_is_patched_with_the_guard_first() {
    let r = report(LLAMA);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNorm");
    insta::assert_snapshot!(patch);
    assert!(patch.starts_with("def forward(self, hidden_states"));
    assert!(patch.contains("cast_before_weight=True"));
}

#[test]
fn gemma_form_lowers_the_unit_offset() {
    let r = report(GEMMA);
    let patch = site_patch(&r, "ToyRMSNorm");
    assert!(patch.contains("forward_rewrite.rms_norm(x, self.weight, self.eps, offset=1.0, cast_before_weight=False)"), "{patch}");
}

/// NanoChat's norm: no weight at all.
const UNWEIGHTED: &str = "class ToyRMSNorm(torch.nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x)
";

#[test]
fn unweighted_form_is_patched_with_no_weight() {
    let r = report(UNWEIGHTED);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNorm");
    insta::assert_snapshot!(patch);
    assert!(
        patch.contains(
            "forward_rewrite.rms_norm(x, None, self.eps, offset=0.0, cast_before_weight=True)"
        ),
        "{patch}"
    );
}

/// DeepSeek-V4's (GLM-5-Next's, Inkling-2's) `UnweightedRMSNorm`: no weight, the scale
/// rounded to x's dtype before the product.
const SCALE_FIRST: &str = "class ToyRMSNorm(nn.Module):
    def __init__(self, eps: float = 1.0e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)
";

#[test]
fn scale_first_form_is_patched_with_no_weight() {
    let r = report(SCALE_FIRST);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNorm");
    insta::assert_snapshot!(patch);
    assert!(
        patch.contains("if forward_rewrite.fusion_guard.rms_norm(self, x, None, self.eps):"),
        "{patch}"
    );
    assert!(
        patch.contains("return forward_rewrite.rms_norm(x, None, self.eps, scale_first=True)"),
        "{patch}"
    );
    let site = &sites(&r)[0];
    assert_eq!(site["lowered"]["form"], "scale-first");
    assert_eq!(site["lowered"]["weight"], "none");
    assert_eq!(site["lowered"]["scale_first"], "true");
    // The product rounded once after it instead (the cast outside): another arrangement.
    let after = SCALE_FIRST.replace(
        "return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)",
        "return (x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)",
    );
    assert_eq!(
        site_reason(&report(&after), "ToyRMSNorm").as_deref(),
        Some("norm-no-weight")
    );
}

#[test]
fn olmo2_and_helium_forms_cast_after_the_weight() {
    for last in [
        "return (self.weight * hidden_states).to(input_dtype)",
        "return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)",
    ] {
        let text = LLAMA.replace("return self.weight * hidden_states.to(input_dtype)", last);
        let patch = site_patch(&report(&text), "ToyRMSNorm");
        assert!(
            patch.contains("offset=0.0, cast_before_weight=False"),
            "{patch}"
        );
    }
}

#[test]
fn weight_offset_in_the_weight_dtype_is_refused() {
    // (1.0 + w).float() adds in the weight's dtype: not what the op computes.
    let text = GEMMA.replace("(1.0 + self.weight.float())", "(1.0 + self.weight).float()");
    let r = report(&text);
    assert_eq!(r.verdict, "refused");
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-form-unknown")
    );
}

#[test]
fn reason_no_norm_class() {
    let r = report("class ToyMLP(nn.Module):\n    pass\n");
    assert_eq!(r.reason.as_deref(), Some("no-norm-class"));
}

#[test]
fn reason_norm_forward_elsewhere() {
    let r = report("class ToyRMSNorm(LlamaRMSNorm):\n    pass\n");
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-forward-elsewhere")
    );
}

#[test]
fn reason_norm_already_patched() {
    let r = report(&LLAMA.replace(
        "        input_dtype = hidden_states.dtype\n",
        "        forward_rewrite.rms_norm(hidden_states)\n        input_dtype = hidden_states.dtype\n",
    ));
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-already-patched")
    );
}

#[test]
fn reason_norm_signature() {
    let r = report(&LLAMA.replace(
        "def forward(self, hidden_states: torch.Tensor)",
        "def forward(self, hidden_states: torch.Tensor, residual=None, scale=1.0)",
    ));
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-signature")
    );
}

#[test]
fn a_second_input_that_is_no_known_gate_is_refused() {
    // Two inputs, the second defaulting to None: read as a gated norm, and no gated form.
    let r = report(&LLAMA.replace(
        "def forward(self, hidden_states: torch.Tensor)",
        "def forward(self, hidden_states: torch.Tensor, residual=None)",
    ));
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-form-unknown")
    );
}

#[test]
fn gemma4_form_fuses_only_the_weighted_instances() {
    let r = report(GEMMA4);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNorm");
    insta::assert_snapshot!(patch);
    // `self.weight` exists only with `with_scale`: the guard is not evaluated without it,
    // and those instances run the stock body below.
    assert!(patch.contains("if self.with_scale and forward_rewrite.fusion_guard.rms_norm(self, hidden_states, self.weight, self.eps):"), "{patch}");
    assert!(
        patch.contains("offset=0.0, cast_before_weight=False)"),
        "{patch}"
    );
}

#[test]
fn gemma4_form_needs_its_helper_and_its_branch_exactly() {
    for (from, to) in [
        // another exponent
        (
            "torch.pow(mean_squared, -0.5)",
            "torch.pow(mean_squared, -0.25)",
        ),
        // another condition
        (
            "        if self.with_scale:\n",
            "        if self.training:\n",
        ),
        // work in the branch's else
        (
            "            normed_output = normed_output * self.weight.float()\n",
            "            normed_output = normed_output * self.weight.float()\n        else:\n            normed_output = -normed_output\n",
        ),
    ] {
        let source = GEMMA4.replace(from, to);
        assert_ne!(source, GEMMA4, "{from}");
        let r = report(&source);
        assert_eq!(r.verdict, "refused", "{to}: {r:?}");
    }
}

#[test]
fn reason_norm_control_flow() {
    let r = report(&GEMMA.replace(
        "        output = output * (1.0 + self.weight.float())\n",
        "        if self.with_scale:\n            output = output * (1.0 + self.weight.float())\n",
    ));
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-control-flow")
    );
}

#[test]
fn reason_norm_no_weight() {
    let r = report(&GEMMA.replace(
        "        output = output * (1.0 + self.weight.float())\n",
        "",
    ));
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-no-weight")
    );
}

#[test]
fn reason_norm_not_rsqrt() {
    let r = report(&GEMMA.replace(
        "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)",
        "x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)",
    ));
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-not-rsqrt")
    );
}

#[test]
fn reason_norm_form_unknown() {
    // Mean over the wrong axis: matched in part only.
    let r = report(&LLAMA.replace("mean(-1, keepdim=True)", "mean(0, keepdim=True)"));
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-form-unknown")
    );
}

#[test]
fn reason_norm_emit_invalid_is_documented() {
    // Emission failure needs a body on the signature's line, which no form has: the code is
    // produced by `emit_guarded`'s refusal, checked here directly.
    let src = crate::parse::ParsedSource::parse("def f(x): return x\n").unwrap();
    let ruff_python_ast::Stmt::FunctionDef(f) = &src.suite()[0] else {
        unreachable!()
    };
    assert!(crate::passes::fusion_common::emit_guarded(&src, f, &["pass".into()]).is_err());
    assert!(
        super::REASONS
            .iter()
            .any(|(c, _)| *c == "norm-emit-invalid")
    );
}

const QWEN3_NEXT_GATED: &str = "class ToyRMSNormGated(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.activation = \"silu\"

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        # Norm before gate
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = self.weight * hidden_states.to(input_dtype)
        hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))

        return hidden_states.to(input_dtype)


class ToyRMSNorm(ToyRMSNormGated):
    pass


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = ToyRMSNormGated(config.hidden_size)
";

const KIMI_GATED: &str = "class ToyRMSNormGated(nn.Module):
    def __init__(self, hidden_size, eps=1e-6, **kwargs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.activation = \"sigmoid\"

    def forward(self, hidden_states, gate=None) -> torch.Tensor:
        input_dtype = hidden_states.dtype

        # Strict FP32 norm (do not downcast on the weights)
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = self.weight.to(torch.float32) * hidden_states

        # Apply gating
        hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))

        return hidden_states.to(input_dtype)


class ToyRMSNorm(ToyRMSNormGated):
    pass


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = ToyRMSNormGated(config.hidden_size)
";

/// Mamba 2's gated norm (transformers 5): the gate applied before a grouped norm, under a test.
const MAMBA_GATED: &str = "class ToyRMSNormGated(torch.nn.Module):
    def __init__(self, hidden_size, group_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states, gate=None):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))
        *prefix_dims, last_dim = hidden_states.shape
        group_count = last_dim // self.group_size
        hidden_states_group = hidden_states.view(*prefix_dims, group_count, self.group_size)
        variance = hidden_states_group.pow(2).mean(-1, keepdim=True)
        hidden_states_group = hidden_states_group * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = hidden_states_group.view(*prefix_dims, group_count * self.group_size)
        return self.weight * hidden_states.to(input_dtype)


class ToyRMSNorm(ToyRMSNormGated):
    pass


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = ToyRMSNormGated(config.hidden_size, 64)
";

/// The site of `name` in the report.
#[track_caller]
fn site(r: &crate::audit::PassReport, name: &str) -> serde_json::Value {
    crate::passes::fusion_common::testing::sites(r)
        .into_iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no site {name}: {r:?}"))
}

#[test]
fn qwen3_next_gated_form_is_patched() {
    let r = report(QWEN3_NEXT_GATED);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNormGated");
    insta::assert_snapshot!(patch);
    assert!(patch.contains("if (_fr_act := forward_rewrite.fusion_guard.gated_rms_norm(self, hidden_states, gate, self.weight, self.variance_epsilon, ACT2FN[self.activation])) is not None:"), "{patch}");
    assert!(patch.contains("return forward_rewrite.gated_rms_norm(hidden_states, gate, self.weight, self.variance_epsilon, activation=_fr_act, cast_before_weight=True)"), "{patch}");
    let lowered = &site(&r, "ToyRMSNormGated")["lowered"];
    assert_eq!(
        lowered,
        &serde_json::json!({
            "form": "qwen3-next",
            "eps": "self.variance_epsilon",
            "cast_before_weight": "true",
            "gate activation": "ACT2FN[self.activation]",
            "gate": "gate",
        })
    );
    // The subclass runs the gated forward: not a site of its own.
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-forward-elsewhere")
    );
}

#[test]
fn kimi_gated_form_is_patched_with_the_gate_defaulting_to_none() {
    let r = report(KIMI_GATED);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNormGated");
    insta::assert_snapshot!(patch);
    assert!(patch.starts_with("def forward(self, hidden_states, gate=None)"));
    assert!(
        patch.contains("activation=_fr_act, cast_before_weight=False)"),
        "{patch}"
    );
    let lowered = &site(&r, "ToyRMSNormGated")["lowered"];
    assert_eq!(lowered["form"], "kimi");
    assert_eq!(lowered["cast_before_weight"], "false");
    assert!(lowered.get("offset").is_none(), "{lowered}");
}

#[test]
fn gated_forms_take_the_gate_by_its_own_name_and_a_none_default_only() {
    // Another name for the gate than the form's: its statements name `gate`, so not a form.
    let renamed = QWEN3_NEXT_GATED.replace(
        "gate: torch.Tensor) -> torch.Tensor:",
        "z: torch.Tensor) -> torch.Tensor:",
    );
    assert_eq!(
        site_reason(&report(&renamed), "ToyRMSNormGated").as_deref(),
        Some("norm-form-unknown")
    );
    // The default None accepted on the Qwen3-Next form too; another default is not.
    let none = QWEN3_NEXT_GATED.replace("gate: torch.Tensor)", "gate: torch.Tensor | None = None)");
    assert_eq!(report(&none).verdict, "patched");
    let other = QWEN3_NEXT_GATED.replace("gate: torch.Tensor)", "gate: float = 1.0)");
    assert_eq!(
        site_reason(&report(&other), "ToyRMSNormGated").as_deref(),
        Some("norm-signature")
    );
}

#[test]
fn gate_applied_before_the_norm_is_refused() {
    let text = QWEN3_NEXT_GATED.replace(
        "        hidden_states = hidden_states.to(torch.float32)\n",
        "        hidden_states = hidden_states.to(torch.float32)\n        hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))\n",
    ).replace(
        "        hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))\n\n",
        "\n",
    );
    assert_ne!(text, QWEN3_NEXT_GATED);
    let r = report(&text);
    assert_eq!(r.verdict, "refused", "{r:?}");
    let s = site(&r, "ToyRMSNormGated");
    assert_eq!(s["reason"], "norm-form-unknown");
    assert!(
        s["detail"]
            .as_str()
            .unwrap()
            .contains("known gated RMSNorm forms"),
        "{s}"
    );
}

#[test]
fn gate_activated_otherwise_is_refused() {
    for activated in [
        // torch's functional SiLU on the gate not cast to float32 (4.57's form casts it)
        "F.silu(gate)",
        // no float32 cast of the gate
        "ACT2FN[self.activation](gate)",
        // another activation attribute
        "ACT2FN[self.act](gate.to(torch.float32))",
    ] {
        let text =
            QWEN3_NEXT_GATED.replace("ACT2FN[self.activation](gate.to(torch.float32))", activated);
        let r = report(&text);
        assert_eq!(
            site_reason(&r, "ToyRMSNormGated").as_deref(),
            Some("norm-form-unknown"),
            "{activated}"
        );
    }
}

#[test]
fn transformers_4_57_qwen3_next_form_with_functional_silu_is_patched() {
    let text = QWEN3_NEXT_GATED.replace(
        "ACT2FN[self.activation](gate.to(torch.float32))",
        "F.silu(gate.to(torch.float32))",
    );
    let module = |imports: &str| {
        crate::passes::fusion_common::testing::module(&text)
            .replace("from ...activations import ACT2FN\n", imports)
    };
    let run = |text: &str| crate::passes::fusion_common::testing::run_module(&super::PASS, text);
    for ok in [
        "import torch.nn.functional as F\n",
        "from torch.nn import functional as F\n",
    ] {
        let r = run(&module(ok));
        let patch = site_patch(&r, "ToyRMSNormGated");
        assert!(
            patch.contains("self.weight, self.variance_epsilon, F.silu)) is not None:"),
            "{patch}"
        );
        assert!(
            patch.contains("fused gated RMSNorm (qwen3-next-silu form)"),
            "{patch}"
        );
    }
    // F not bound, or bound twice / to something else: the guard would call an unknown F
    for bad in [
        "",
        "import torch.nn.functional as F\nF = None\n",
        "import numpy as F\n",
    ] {
        assert_eq!(
            site_reason(&run(&module(bad)), "ToyRMSNormGated").as_deref(),
            Some("norm-activation-unknown"),
            "{bad}"
        );
    }
}

#[test]
fn mamba_gated_form_is_patched_behind_its_gate_test() {
    let r = report(MAMBA_GATED);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNormGated");
    insta::assert_snapshot!(patch);
    // Calls without a gate never reach the guard: the stock body normalises them.
    assert!(patch.contains("    if gate is not None and (_fr_act := forward_rewrite.fusion_guard.gated_rms_norm(self, hidden_states, gate, self.weight, self.variance_epsilon, nn.functional.silu, gate_first=True, group_size=self.group_size)) is not None:\n"), "{patch}");
    assert!(patch.contains("        return forward_rewrite.gated_rms_norm(hidden_states, gate, self.weight, self.variance_epsilon, activation=_fr_act, cast_before_weight=True, gate_first=True, group_size=self.group_size)\n"), "{patch}");
    let lowered = &site(&r, "ToyRMSNormGated")["lowered"];
    assert_eq!(
        lowered,
        &serde_json::json!({
            "form": "mamba",
            "eps": "self.variance_epsilon",
            "cast_before_weight": "true",
            "gate activation": "nn.functional.silu",
            "gate": "gate",
            "gate_first": "true",
            "group_size": "self.group_size",
            "fused only when": "gate is not None",
        })
    );
    assert_eq!(
        site_reason(&r, "ToyRMSNorm").as_deref(),
        Some("norm-forward-elsewhere")
    );
}

#[test]
fn mamba_gated_form_near_misses_are_refused() {
    let gating = "        if gate is not None:\n            hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))\n";
    let regroup = "        hidden_states = hidden_states_group.view(*prefix_dims, group_count * self.group_size)\n";
    let grouped_norm = "        *prefix_dims, last_dim = hidden_states.shape
        group_count = last_dim // self.group_size
        hidden_states_group = hidden_states.view(*prefix_dims, group_count, self.group_size)
        variance = hidden_states_group.pow(2).mean(-1, keepdim=True)
        hidden_states_group = hidden_states_group * torch.rsqrt(variance + self.variance_epsilon)
";
    let moved = format!("{regroup}{gating}");
    let ungrouped = "        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
";
    // transformers 4.57's Mamba 2 / Bamba / GraniteMoeHybrid, no groups: its own form
    let mut text = MAMBA_GATED.to_string();
    for (from, to) in [(grouped_norm, ""), (regroup, ungrouped)] {
        text = text.replacen(from, to, 1);
    }
    let r = report(&text);
    let s = site(&r, "ToyRMSNormGated");
    assert_eq!(s["verdict"], "patched", "{s}");
    assert_eq!(s["lowered"]["form"], "mamba-ungrouped", "{s}");
    let patch = s["patch"].as_str().unwrap();
    assert!(
        patch.contains("gate_first=True)") && !patch.contains("group_size"),
        "{patch}"
    );
    let cases: [&[(&str, &str)]; 4] = [
        // the gate applied after the grouped norm's view back
        &[(gating, ""), (regroup, &moved)],
        // the gate not cast to float32
        &[(
            "nn.functional.silu(gate.to(torch.float32))",
            "nn.functional.silu(gate)",
        )],
        // another activation
        &[("nn.functional.silu(", "nn.functional.gelu(")],
        // another test of the gate
        &[(
            "if gate is not None:",
            "if gate is not None and self.training:",
        )],
    ];
    for edits in cases {
        let mut text = MAMBA_GATED.to_string();
        for (from, to) in edits {
            assert!(text.contains(from), "{from}");
            text = text.replacen(from, to, 1);
        }
        let r = report(&text);
        let s = site(&r, "ToyRMSNormGated");
        assert_eq!(s["reason"], "norm-control-flow", "{edits:?}: {s}");
        assert!(
            s["detail"]
                .as_str()
                .unwrap()
                .contains("is not the mamba gated form"),
            "{s}"
        );
    }
    // The gate never applied: no known form.
    let r = report(&MAMBA_GATED.replace(gating, ""));
    assert_eq!(
        site_reason(&r, "ToyRMSNormGated").as_deref(),
        Some("norm-form-unknown")
    );
}

#[test]
fn mamba_gated_form_needs_nn_bound_to_torch_nn() {
    let module = |imports: &str| {
        crate::passes::fusion_common::testing::module(MAMBA_GATED)
            .replace("from torch import nn\n", imports)
    };
    let run = |text: &str| {
        let r = crate::passes::fusion_common::testing::run_module(&super::PASS, text);
        (
            site_reason(&r, "ToyRMSNormGated"),
            site(&r, "ToyRMSNormGated"),
        )
    };
    for ok in [
        "from torch import nn\n",
        "import torch.nn as nn\n",
        "from torch import nn as nn\n",
    ] {
        assert_eq!(run(&module(ok)).0, None, "{ok}");
    }
    for refused in [
        // not bound
        "",
        // bound to something else
        "from mylib import nn\n",
        "import mylib.nn as nn\n",
        "from torch import functional as nn\n",
        // bound, then rebound
        "from torch import nn\nnn = None\n",
        // bound twice
        "from torch import nn\nimport torch.nn as nn\n",
    ] {
        let (reason, s) = run(&module(refused));
        assert_eq!(
            reason.as_deref(),
            Some("norm-activation-unknown"),
            "{refused}"
        );
        assert!(
            s["detail"]
                .as_str()
                .unwrap()
                .contains("the mamba gated form, but the module does not bind nn"),
            "{s}"
        );
    }
}

/// FalconH1's gated norm: the gate before or after the norm by a flag, groups by `n_groups`.
const FALCON_H1_GATED: &str = "class ToyRMSNormGated(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-6, n_groups=1, norm_before_gate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.n_groups = n_groups
        self.norm_before_gate = norm_before_gate

    def forward(self, hidden_states, gate=None):
        input_dtype = hidden_states.dtype

        if not self.norm_before_gate and gate is not None:
            hidden_states = hidden_states * F.silu(gate.to(torch.float32))

        if len(hidden_states.shape) == 3:
            batch_size, seq_len, dim = hidden_states.shape
        else:
            batch_size, dim = hidden_states.shape
            seq_len = 1
        hidden_states = hidden_states.to(torch.float32)

        hidden_states = hidden_states.view(batch_size, seq_len, self.n_groups, int(dim // self.n_groups))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)

        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)

        hidden_states = self.weight.view(self.n_groups, int(dim // self.n_groups)) * hidden_states
        hidden_states = hidden_states.view(batch_size, seq_len, dim)

        if seq_len == 1:
            hidden_states = hidden_states.squeeze(1)

        if self.norm_before_gate and gate is not None:
            hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        return hidden_states.to(input_dtype)


class ToyRMSNorm(ToyRMSNormGated):
    pass


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = ToyRMSNormGated(config.hidden_size)
";

#[test]
fn falcon_h1_gated_norm_stays_refused() {
    let r = report(FALCON_H1_GATED);
    assert_eq!(r.verdict, "refused", "{r:?}");
    let s = site(&r, "ToyRMSNormGated");
    assert_eq!(s["reason"], "norm-control-flow");
    assert_eq!(
        s["detail"],
        "ToyRMSNormGated.forward(hidden_states, gate) branches or loops (first `if not self.norm_before_gate and gate is not None:`) and is not the mamba gated form (`if gate is not None:` applying `nn.functional.silu(gate.to(torch.float32))` before the norm over groups of `self.group_size`, statement for statement); the other gated forms apply the gate after the norm, unconditionally"
    );
}

/// Qwen4Exp's text norm: Gemma's, grouped when `group_size` is set.
const QWEN4_EXP: &str = "class ToyRMSNorm(nn.Module):
    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.group_size = group_size
        if group_size is not None and dim % group_size != 0:
            raise ValueError(f\"hidden_size ({dim}) must be divisible by group_size ({group_size}).\")

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            x = x.reshape(*x.shape[:-1], -1, self.group_size)
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.flatten(-2) if self.group_size is not None else out

    def forward(self, x):
        output = self._norm(x.float())
        # Llama does x.to(float16) * w whilst Qwen4ExpText is (x * w).to(float16)
        # See https://github.com/huggingface/transformers/pull/29402
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)

    def extra_repr(self):
        return f\"{tuple(self.weight.shape)}, eps={self.eps}\"
";

#[test]
fn qwen4_exp_form_fuses_only_the_instances_without_groups() {
    let r = report(QWEN4_EXP);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyRMSNorm");
    insta::assert_snapshot!(patch);
    // Grouped instances never reach the guard: the stock body (and its `_norm`) runs them.
    assert!(patch.contains("    if self.group_size is None and forward_rewrite.fusion_guard.rms_norm(self, x, self.weight, self.eps):\n"), "{patch}");
    // Without groups, `_norm` is Gemma's: the gemma form's lowering.
    assert!(patch.contains("        return forward_rewrite.rms_norm(x, self.weight, self.eps, offset=1.0, cast_before_weight=False)\n"), "{patch}");
    let lowered = &site(&r, "ToyRMSNorm")["lowered"];
    assert_eq!(
        lowered,
        &serde_json::json!({
            "form": "qwen4-exp",
            "eps": "self.eps",
            "cast_before_weight": "false",
            "offset": "1.0",
            "fused only when": "self.group_size is None",
        })
    );
}

#[test]
fn qwen4_exp_form_needs_its_helper_exactly() {
    for (from, to) in [
        // the ungrouped path is not Gemma's
        (
            "        return out.flatten(-2) if self.group_size is not None else out\n",
            "        return out.flatten(-2) if self.group_size is not None else -out\n",
        ),
        (
            "        return out.flatten(-2) if self.group_size is not None else out\n",
            "        return out.flatten(-2) if self.group_size else out\n",
        ),
        // another test
        (
            "        if self.group_size is not None:\n",
            "        if self.group_size:\n",
        ),
        // work in the branch's else
        (
            "            x = x.reshape(*x.shape[:-1], -1, self.group_size)\n",
            "            x = x.reshape(*x.shape[:-1], -1, self.group_size)\n        else:\n            x = x * 2\n",
        ),
        // another normaliser under the same test
        (
            "torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)",
            "torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)",
        ),
    ] {
        let text = QWEN4_EXP.replace(from, to);
        assert_ne!(text, QWEN4_EXP, "{from}");
        let r = report(&text);
        assert_eq!(r.verdict, "refused", "{to}: {r:?}");
        assert_eq!(
            site_reason(&r, "ToyRMSNorm").as_deref(),
            Some("norm-control-flow"),
            "{to}"
        );
    }
}

#[test]
fn reason_norm_activation_unknown() {
    let module = |imports: &str| {
        crate::passes::fusion_common::testing::module(QWEN3_NEXT_GATED)
            .replace("from ...activations import ACT2FN\n", imports)
    };
    let run = |text: &str| {
        let r = crate::passes::fusion_common::testing::run_module(&super::PASS, text);
        site_reason(&r, "ToyRMSNormGated")
    };
    // transformers' own import, relative or absolute, is accepted
    for ok in [
        "from ...activations import ACT2FN\n",
        "from transformers.activations import ACT2FN\n",
    ] {
        assert_eq!(run(&module(ok)), None, "{ok}");
    }
    for refused in [
        // not imported
        "",
        // renamed from elsewhere
        "from .table import MY_TABLE as ACT2FN\n",
        // imported, then rebound
        "from ...activations import ACT2FN\nACT2FN = {}\n",
        // imported twice
        "from ...activations import ACT2FN\nfrom transformers.activations import ACT2FN\n",
    ] {
        assert_eq!(
            run(&module(refused)).as_deref(),
            Some("norm-activation-unknown"),
            "{refused}"
        );
    }
}

#[test]
fn a_gated_norm_after_a_residual_add_is_not_fused_into_it() {
    // Kimi's gate defaults to None, so `self.norm(h)` is a call of it the residual-norm pass
    // sees; the norm is patched here, but as gated_rms_norm: add_rms_norm is not its form.
    let norm = KIMI_GATED
        .split("\n\nclass ToyRMSNorm(")
        .next()
        .unwrap()
        .replace("class ToyRMSNormGated(", "class ToyRMSNorm(");
    let text = format!(
        "import torch
from torch import nn
from ...activations import ACT2FN


{norm}

class ToyDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp = ToyMLP(config)
        self.post_attention_layernorm = ToyRMSNorm(config.hidden_size)

    def forward(self, hidden_states, residual):
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        return self.mlp(hidden_states) + residual


class ToyForCausalLM(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([ToyDecoderLayer(config) for _ in range(2)])
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids=None, labels=None, **kwargs):
        return self.lm_head(self.layers[0](input_ids, input_ids))
"
    );
    let run = |pass| crate::passes::fusion_common::testing::run_module(pass, &text);
    assert_eq!(run(&super::PASS).verdict, "patched");
    let r = run(&crate::passes::residual_norm::PASS);
    assert_eq!(r.verdict, "refused", "{r:?}");
    assert_eq!(r.reason.as_deref(), Some("residual-norm-norm-refused"));
    assert!(
        r.detail.contains("a gated norm (rms-norm's kimi form"),
        "{}",
        r.detail
    );
}
