//! Unit tests of the gated-mlp pass: the matched shapes, the activation resolution, every
//! reason code.

use crate::passes::fusion_common::testing::{run, site_patch, site_reason};

const LLAMA: &str = "class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj
";

fn report(extra: &str) -> crate::audit::PassReport {
    run(&super::PASS, extra)
}

fn lowered(r: &crate::audit::PassReport) -> String {
    crate::passes::fusion_common::testing::sites(r)[0]["lowered"]["activation"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn llama_form_is_patched_with_a_run_time_activation() {
    let r = report(LLAMA);
    assert_eq!(r.verdict, "patched", "{r:?}");
    insta::assert_snapshot!(site_patch(&r, "ToyMLP"));
    assert_eq!(lowered(&r), "run-time (self.act_fn)");
}

#[test]
fn direct_return_swapped_factors_and_static_activations() {
    let text = LLAMA
        .replace(
            "        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return down_proj\n",
            "        return self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))\n",
        )
        .replace("ACT2FN[config.hidden_act]", "nn.SiLU()");
    let r = report(&text);
    assert!(
        site_patch(&r, "ToyMLP")
            .contains("forward_rewrite.gated_mlp_act(self.gate_proj(x), self.up_proj(x)")
    );
    assert_eq!(lowered(&r), "silu");
    let r = report(&LLAMA.replace("ACT2FN[config.hidden_act]", "ACT2FN[\"gelu_pytorch_tanh\"]"));
    assert_eq!(lowered(&r), "gelu_tanh");
    let r = report(&LLAMA.replace("ACT2FN[config.hidden_act]", "nn.GELU(approximate=\"tanh\")"));
    assert_eq!(lowered(&r), "gelu_tanh");
}

#[test]
fn reason_no_mlp_class() {
    let r = report("class ToyRMSNorm(nn.Module):\n    pass\n");
    assert_eq!(r.reason.as_deref(), Some("no-mlp-class"));
}

#[test]
fn reason_mlp_forward_elsewhere() {
    let r = report("class ToyMLP(LlamaMLP):\n    pass\n");
    assert_eq!(
        site_reason(&r, "ToyMLP").as_deref(),
        Some("mlp-forward-elsewhere")
    );
}

#[test]
fn reason_mlp_already_patched() {
    let r = report(&LLAMA.replace(
        "        down_proj = self",
        "        forward_rewrite.x\n        down_proj = self",
    ));
    assert_eq!(
        site_reason(&r, "ToyMLP").as_deref(),
        Some("mlp-already-patched")
    );
}

#[test]
fn reason_mlp_signature() {
    let r = report(&LLAMA.replace("def forward(self, x):", "def forward(self, x, scale=1.0):"));
    assert_eq!(site_reason(&r, "ToyMLP").as_deref(), Some("mlp-signature"));
}

const PHI3: &str = "class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        up_states = self.gate_up_proj(hidden_states)

        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)

        return self.down_proj(up_states)
";

const PHI3_BODY: &str = "        up_states = self.gate_up_proj(hidden_states)

        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)

        return self.down_proj(up_states)
";

#[test]
fn packed_phi3_form_is_patched() {
    let r = report(PHI3);
    assert_eq!(r.verdict, "patched", "{r:?}");
    insta::assert_snapshot!(site_patch(&r, "ToyMLP"));
    assert_eq!(lowered(&r), "run-time (self.activation_fn)");
}

#[test]
fn packed_forms_that_mean_the_same_are_patched() {
    for body in [
        // Granite MoE's shared MLP: the input rebound, the halves indexed.
        "        hidden_states = self.gate_up_proj(hidden_states)\n        chunked = hidden_states.chunk(2, dim=-1)\n        hidden_states = self.activation_fn(chunked[0]) * chunked[1]\n        hidden_states = self.down_proj(hidden_states)\n        return hidden_states\n",
        // One expression, torch.chunk, positional dim.
        "        gate, up = torch.chunk(self.gate_up_proj(hidden_states), 2, -1)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
        // Keyword chunks.
        "        gate, up = self.gate_up_proj(hidden_states).chunk(chunks=2, dim=-1)\n        return self.down_proj(up * self.activation_fn(gate))\n",
    ] {
        let r = report(&PHI3.replace(PHI3_BODY, body));
        assert_eq!(r.verdict, "patched", "{body}\n{r:?}");
        assert!(
            site_patch(&r, "ToyMLP").contains(
                "forward_rewrite.gated_mlp_act_packed(self.gate_up_proj(hidden_states), activation=_fr_act, overwrite_inputs=True)"
            ),
            "{body}"
        );
    }
}

#[test]
fn reason_mlp_packed() {
    for body in [
        // Moonshine: the activation on the second half.
        "        hidden_states = self.gate_up_proj(hidden_states)\n        hidden_states, gate = hidden_states.chunk(2, dim=-1)\n        hidden_states = self.activation_fn(gate) * hidden_states\n        return self.down_proj(hidden_states)\n",
        // ModernBERT: dropout after the product.
        "        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)\n        return self.down_proj(self.drop(self.activation_fn(gate) * up))\n",
        // Zamba2: an adapter added to the packed projection.
        "        gate_up = self.gate_up_proj(hidden_states)\n        gate_up = gate_up + self.adapter(hidden_states)\n        gate, up = gate_up.chunk(2, dim=-1)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
        // Another split: three chunks, the first dimension, unequal halves.
        "        gate, up = self.gate_up_proj(hidden_states).chunk(3, dim=-1)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
        "        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=0)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
        "        gate, up = self.gate_up_proj(hidden_states).chunk(2)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
        // The same half twice, and halves of two different projections.
        "        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)\n        return self.down_proj(self.activation_fn(gate) * gate)\n",
        "        gate, _ = self.gate_up_proj(hidden_states).chunk(2, dim=-1)\n        _, up = self.other(hidden_states).chunk(2, dim=-1)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
        // A clamp on the way (MiniMax-M3).
        "        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)\n        gate = gate.clamp(max=7.0)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
    ] {
        let r = report(&PHI3.replace(PHI3_BODY, body));
        assert_eq!(
            site_reason(&r, "ToyMLP").as_deref(),
            Some("mlp-packed"),
            "{body}"
        );
    }
}

const LLAMA_BODY: &str = "        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return down_proj\n";

#[test]
fn product_in_the_first_statement_is_replaced_in_place() {
    // Inkling: a scale after the down projection (the snapshot).
    let inkling = LLAMA.replace(
        LLAMA_BODY,
        "        x = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return x * self.global_scale\n",
    );
    let r = report(&inkling);
    assert_eq!(site_reason(&r, "ToyMLP"), None, "{r:?}");
    insta::assert_snapshot!(site_patch(&r, "ToyMLP"));
    for body in [
        // T5Gemma: dropout between the product and the down projection.
        "        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)\n        h = self.dropout(h)\n        return self.down_proj(h)\n",
        // Seed-OSS: dropout after the down projection, inside the return.
        "        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))\n",
        // BitNet: a norm between the product and the down projection; swapped factors.
        "        return self.down_proj(self.sub_norm(self.up_proj(x) * self.act_fn(self.gate_proj(x))))\n",
    ] {
        let r = report(&LLAMA.replace(LLAMA_BODY, body));
        let patch = site_patch(&r, "ToyMLP");
        assert!(
            patch.contains(
                "(forward_rewrite.gated_mlp_act(self.gate_proj(x), self.up_proj(x), activation=_fr_act, overwrite_inputs=True) if (_fr_act := forward_rewrite.fusion_guard.gated_act(self.act_fn, x)) is not None else "
            ),
            "{body}\n{patch}"
        );
        // the rest of the forward is kept word for word
        let kept = body.lines().skip(1).map(str::trim).collect::<Vec<_>>();
        assert!(
            kept.iter().all(|line| patch.contains(line)),
            "{body}\n{patch}"
        );
    }
}

#[test]
fn reason_mlp_form_unknown() {
    for body in [
        // Not gated.
        "        return self.down_proj(self.act_fn(self.up_proj(x)))\n",
        // The up projection of another input.
        "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x + 1))\n",
        // The product after another statement (x may be rebound there).
        "        y = x\n        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
        "        x = self.norm(x)\n        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
        // Twice in the first statement.
        "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) + self.act_fn(self.gate_proj(x)) * self.up_proj(x)\n",
        // A comprehension's own x, a walrus, a lambda in the first statement.
        "        return [self.act_fn(self.gate_proj(x)) * self.up_proj(x) for x in self.chunks]\n",
        "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) + (y := 1)\n",
        "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) + (lambda: x)()\n",
        // A compound first statement.
        "        if self.training:\n            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return x\n",
        // Only the activation's input from the gate projection.
        "        g = self.gate_proj(x)\n        return self.down_proj(self.act_fn(g) * self.up_proj(x))\n",
    ] {
        let r = report(&LLAMA.replace(
            "        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return down_proj\n",
            body,
        ));
        assert_eq!(
            site_reason(&r, "ToyMLP").as_deref(),
            Some("mlp-form-unknown"),
            "{body}"
        );
    }
}

#[test]
fn reason_mlp_activation_unsupported() {
    for act in [
        "ACT2FN[\"gelu\"]",
        "nn.GELU()",
        "ACT2FN[\"gelu_new\"]",
        "nn.ReLU()",
    ] {
        let r = report(&LLAMA.replace("ACT2FN[config.hidden_act]", act));
        assert_eq!(
            site_reason(&r, "ToyMLP").as_deref(),
            Some("mlp-activation-unsupported"),
            "{act}"
        );
    }
}

const LFM2: &str = "class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
";

#[test]
fn functional_silu_of_torch_is_patched_with_the_module_guard() {
    for import in [
        "import torch.nn.functional as F\n",
        "from torch.nn import functional as F\n",
    ] {
        let r = report(&format!("{import}\n{LFM2}"));
        assert_eq!(site_reason(&r, "ToyMLP"), None, "{import}{r:?}");
        assert_eq!(lowered(&r), "silu");
        let patch = site_patch(&r, "ToyMLP");
        assert!(
            patch.contains("if (_fr_act := forward_rewrite.fusion_guard.gated_function(self, F.silu, x)) is not None:")
                && patch.contains("forward_rewrite.gated_mlp_act(self.w1(x), self.w3(x), activation=_fr_act, overwrite_inputs=True)"),
            "{patch}"
        );
    }
    let spelled = LFM2.replace("F.silu(", "torch.nn.functional.silu(");
    assert_eq!(site_reason(&report(&spelled), "ToyMLP"), None);
    // in place, inside a first statement
    let inline = LFM2.replace(
        "        return self.w2(F.silu(self.w1(x)) * self.w3(x))\n",
        "        h = self.w2(F.silu(self.w1(x)) * self.w3(x))\n        return self.dropout(h)\n",
    );
    let patch = site_patch(
        &report(&format!("import torch.nn.functional as F\n\n{inline}")),
        "ToyMLP",
    );
    assert!(patch.contains("if (_fr_act := forward_rewrite.fusion_guard.gated_function(self, F.silu, x)) is not None else F.silu(self.w1(x)) * self.w3(x))"), "{patch}");
}

#[test]
fn functional_silu_not_known_to_be_torchs_is_refused() {
    for module in [
        // no import of F at all
        LFM2.to_string(),
        // F is something else
        format!("from .utils import functional as F\n\n{LFM2}"),
        format!("import torch.nn.functional as F\nF = MyFunctions()\n\n{LFM2}"),
        format!("import torch.nn.functional as F\n\n\ndef F():\n    pass\n\n{LFM2}"),
        // another module's silu
        LFM2.replace("F.silu(", "my.ops.silu("),
    ] {
        let r = report(&module);
        assert_eq!(
            site_reason(&r, "ToyMLP").as_deref(),
            Some("mlp-activation-unknown"),
            "{module}"
        );
    }
    // silu with keywords (inplace=...) is not the form
    let r = report(&format!(
        "import torch.nn.functional as F\n\n{}",
        LFM2.replace("F.silu(self.w1(x))", "F.silu(self.w1(x), inplace=False)")
    ));
    assert_eq!(
        site_reason(&r, "ToyMLP").as_deref(),
        Some("mlp-form-unknown")
    );
}

#[test]
fn functional_silu_held_as_the_activation_attribute() {
    let import = "import torch.nn.functional as F\n\n";
    // LFM2-MoE's experts: `self.act_fn = F.silu`, the identity checked at run time
    let experts = EXPERTS.replace("ACT2FN[config.hidden_act]", "F.silu");
    let r = report(&format!("{import}{experts}"));
    let patch = site_patch(&r, "ToyExperts");
    assert!(
        patch.contains("if (_fr_act := forward_rewrite.fusion_guard.gated_function(self, self.act_fn, gate_up_out)) is not None:"),
        "{patch}"
    );
    let sites = crate::passes::fusion_common::testing::sites(&r);
    let site = sites.iter().find(|s| s["name"] == "ToyExperts").unwrap();
    assert_eq!(
        site["lowered"]["activation"],
        "silu (self.act_fn = torch.nn.functional.silu)"
    );
    assert_eq!(
        site_reason(&report(&experts), "ToyExperts").as_deref(),
        Some("mlp-activation-unknown"),
        "F not imported"
    );
    // an MLP alike
    let mlp = LLAMA.replace("ACT2FN[config.hidden_act]", "F.silu");
    let patch = site_patch(&report(&format!("{import}{mlp}")), "ToyMLP");
    assert!(
        patch.contains("gated_function(self, self.act_fn, x)) is not None:"),
        "{patch}"
    );
    // a function in one branch and a module in another need two guards: refused
    let mixed = LLAMA.replace(
        "        self.act_fn = ACT2FN[config.hidden_act]\n",
        "        if config.fast:\n            self.act_fn = F.silu\n        else:\n            self.act_fn = nn.SiLU()\n",
    );
    assert_eq!(
        site_reason(&report(&format!("{import}{mixed}")), "ToyMLP").as_deref(),
        Some("mlp-activation-unknown")
    );
}

#[test]
fn reason_mlp_activation_unknown() {
    for act in ["get_activation(config.hidden_act)", "config.act"] {
        let r = report(&LLAMA.replace("ACT2FN[config.hidden_act]", act));
        assert_eq!(
            site_reason(&r, "ToyMLP").as_deref(),
            Some("mlp-activation-unknown"),
            "{act}"
        );
    }
    assert!(super::REASONS.iter().any(|(c, _)| *c == "mlp-emit-invalid"));
}

const EXPERTS: &str = "@use_experts_implementation
class ToyExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(4, 2 * config.moe_intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(4, config.hidden_size, config.moe_intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = ToyExperts(config)

    def forward(self, hidden_states):
        return self.experts(hidden_states, None, None)
";

#[test]
fn experts_default_gate_is_patched_with_the_stock_gate_as_fallback() {
    let r = report(EXPERTS);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyExperts");
    insta::assert_snapshot!(patch);
    // The emitted fallback is the form the installer checks the running default against.
    let fallback = patch
        .lines()
        .filter(|l| !l.contains("_fr_act") && !l.contains("# forward-rewrite"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(super::experts::gate_function_ok(&fallback), "{fallback}");
    let sites = crate::passes::fusion_common::testing::sites(&r);
    let experts = sites.iter().find(|s| s["name"] == "ToyExperts").unwrap();
    assert_eq!(experts["kind"], "experts-gate");
    // The experts implementation itself is the second site of the class, checked at install.
    let forward = sites
        .iter()
        .find(|s| s["name"] == "ToyExperts" && s["kind"] == "experts-forward")
        .unwrap();
    assert_eq!(forward["verdict"], "patched", "{forward}");
    assert!(forward.get("patch").is_none(), "{forward}");
    assert!(
        forward["lowered"]["experts"]
            .as_str()
            .unwrap()
            .contains("forward_rewrite.moe_experts")
    );
    assert_eq!(
        site_reason(&r, "ToyMLP").as_deref(),
        Some("mlp-form-unknown")
    );
    // With arguments that keep the default gate's layout.
    let r = report(&EXPERTS.replace(
        "@use_experts_implementation\n",
        "@use_experts_implementation(is_transposed=True, has_bias=True)\n",
    ));
    assert!(site_patch(&r, "ToyExperts").contains("gated_mlp_act_packed(gate_up_out"));
}

#[test]
fn reason_experts_options() {
    for options in [
        "has_gate=False",
        "is_concatenated=False, is_transposed=True, has_bias=True",
        "experts_interface=MY_INTERFACE",
        "has_bias=config.bias",
    ] {
        let r = report(&EXPERTS.replace(
            "@use_experts_implementation\n",
            &format!("@use_experts_implementation({options})\n"),
        ));
        assert_eq!(
            site_reason(&r, "ToyExperts").as_deref(),
            Some("experts-options"),
            "{options}"
        );
    }
}

#[test]
fn reason_experts_gate_custom_and_activation() {
    let custom = EXPERTS.replace(
        "    def forward(self, hidden_states, top_k_index",
        "    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n        gate = gate.clamp(max=self.limit)\n        return self.act_fn(gate) * up\n\n    def forward(self, hidden_states, top_k_index",
    );
    let r = report(&custom);
    assert_eq!(
        site_reason(&r, "ToyExperts").as_deref(),
        Some("experts-gate-custom")
    );
    let r = report(&EXPERTS.replace("ACT2FN[config.hidden_act]", "ACT2FN[\"relu\"]"));
    assert_eq!(
        site_reason(&r, "ToyExperts").as_deref(),
        Some("mlp-activation-unsupported")
    );
}

#[test]
fn the_installers_check_of_the_running_default_gate() {
    use super::experts::gate_function_ok;
    // transformers 5.23's integrations.moe._default_apply_gate, docstring and all.
    let default = "def _default_apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
    \"\"\"
    Default gating mechanism.
    \"\"\"
    gate, up = gate_up_out.chunk(2, dim=-1)  # (S, intermediate_dim)
    return self.act_fn(gate) * up  # (S, intermediate_dim)
";
    assert!(gate_function_ok(default));
    for wrong in [
        // The halves swapped.
        default.replace("gate, up = gate_up_out", "up, gate = gate_up_out"),
        // Upcast to float32 and back (Beam): another rounding.
        default.replace(
            "return self.act_fn(gate) * up",
            "return (self.act_fn(gate.float()) * up.float()).to(gate.dtype)",
        ),
        // A clamp on the gate.
        default.replace(
            "    return self.act_fn",
            "    gate = gate.clamp(max=7.0)\n    return self.act_fn",
        ),
        // Another activation attribute, an extra parameter, a decorator.
        default.replace("self.act_fn(gate)", "self.other(gate)"),
        default.replace("gate_up_out: torch.Tensor)", "gate_up_out, limit=None)"),
        format!("@torch.compile\n{default}"),
        "not python (".to_string(),
    ] {
        assert!(!gate_function_ok(&wrong), "{wrong}");
    }
}

fn forward_site_reason(r: &crate::audit::PassReport) -> Option<String> {
    crate::passes::fusion_common::testing::sites(r)
        .into_iter()
        .find(|s| s["kind"] == "experts-forward")
        .and_then(|s| s["reason"].as_str().map(str::to_string))
}

#[test]
fn reason_experts_forward_options_and_gate() {
    for options in [
        "has_bias=True",
        "has_post_expert_norm=True, is_transposed=True",
    ] {
        let r = report(&EXPERTS.replace(
            "@use_experts_implementation\n",
            &format!("@use_experts_implementation({options})\n"),
        ));
        // The gate still fuses; the experts implementation stays stock.
        assert_eq!(site_reason(&r, "ToyExperts"), None, "{options}");
        assert_eq!(
            forward_site_reason(&r).as_deref(),
            Some("experts-forward-options"),
            "{options}"
        );
    }
    let r = report(&EXPERTS.replace(
        "@use_experts_implementation\n",
        "@use_experts_implementation(has_bias=False, is_transposed=True)\n",
    ));
    assert_eq!(forward_site_reason(&r), None);
    let r = report(&EXPERTS.replace(
        "@use_experts_implementation\n",
        "@use_experts_implementation(has_gate=False)\n",
    ));
    assert_eq!(
        forward_site_reason(&r).as_deref(),
        Some("experts-forward-gate")
    );
}

#[test]
fn experts_functions_are_checked_statement_by_statement() {
    use super::experts::{EXPERTS_FUNCTIONS, experts_function_ok};
    for text in EXPERTS_FUNCTIONS {
        assert_eq!(experts_function_ok(text), Ok(()), "{text}");
        // Comments, a docstring, annotations and indentation (a method's) change nothing.
        let dressed = text
            .replacen(
                "):\n",
                ") -> 'torch.Tensor':\n    \"\"\"Doc.\"\"\"\n    # why\n",
                1,
            )
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>();
        assert_eq!(experts_function_ok(&dressed), Ok(()), "{dressed}");
    }
    let forward = EXPERTS_FUNCTIONS[0];
    for (from, to) in [
        // Another rounding point, another reduction, another routing product: refused.
        (".sum(dim=1)", ".sum(dim=1, dtype=torch.float32)"),
        (
            "proj_out * sample_weights_g",
            "proj_out.float() * sample_weights_g",
        ),
        (
            "    if self.has_post_expert_norm:\n        proj_out = self.post_expert_norm(proj_out)\n",
            "",
        ),
        ("top_k_weights):", "top_k_weights, scale=1.0):"),
    ] {
        let changed = forward.replace(from, to);
        assert_ne!(changed, forward, "{from}");
        assert!(experts_function_ok(&changed).is_err(), "{to}");
    }
    let linear = EXPERTS_FUNCTIONS[1].replace("is_transposed=False", "is_transposed=True");
    assert!(experts_function_ok(&linear).is_err());
    assert!(experts_function_ok("def other(x):\n    return x\n").is_err());
    assert!(experts_function_ok("def broken(:\n").is_err());
}

const DEEPSEEK_V4: &str = "class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.limit = config.swiglu_limit

    def forward(self, x):
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(self.act_fn(gate) * up)
";

const DEEPSEEK_V4_BODY: &str = "        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(self.act_fn(gate) * up)
";

fn site_lowered(r: &crate::audit::PassReport, kind: &str, key: &str) -> Option<String> {
    crate::passes::fusion_common::testing::sites(r)
        .into_iter()
        .find(|s| s["kind"] == kind)
        .and_then(|s| s["lowered"][key].as_str().map(str::to_string))
}

#[test]
fn clamped_swiglu_before_the_activation_is_patched_with_the_limit() {
    let r = report(DEEPSEEK_V4);
    assert_eq!(site_reason(&r, "ToyMLP"), None, "{r:?}");
    insta::assert_snapshot!(site_patch(&r, "ToyMLP"));
    assert_eq!(lowered(&r), "run-time (self.act_fn)");
    assert_eq!(
        site_lowered(&r, "class", "limit").as_deref(),
        Some("self.limit")
    );
    assert_eq!(
        site_lowered(&r, "class", "clamp").as_deref(),
        Some("gate before act")
    );
    let fused = "return self.down_proj(forward_rewrite.gated_mlp_act(self.gate_proj(x), self.up_proj(x), activation=_fr_act, limit=_fr_limit, overwrite_inputs=True))";
    for body in [
        // GLM-5-Next: the projections first, then the clamps (min=None written out).
        "        gate = self.gate_proj(x)\n        up = self.up_proj(x)\n        # Key difference using clamping\n        gate = gate.clamp(min=None, max=self.limit)\n        up = up.clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        // Inline, factors swapped, keywords in another order.
        "        return self.down_proj(self.up_proj(x).clamp(max=self.limit, min=-self.limit) * self.act_fn(self.gate_proj(x).clamp(max=self.limit)))\n",
        // Through a name returned.
        "        g = self.gate_proj(x).clamp(max=self.limit)\n        h = self.act_fn(g) * self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        h = self.down_proj(h)\n        return h\n",
    ] {
        let r = report(&DEEPSEEK_V4.replace(DEEPSEEK_V4_BODY, body));
        let patch = site_patch(&r, "ToyMLP");
        assert!(patch.contains(fused), "{body}\n{patch}");
        assert!(
            patch.contains("if (_fr_limit := forward_rewrite.fusion_guard.swiglu_limit(self.limit)) is not None and (_fr_act := forward_rewrite.fusion_guard.gated_act(self.act_fn, x)) is not None:"),
            "{patch}"
        );
    }
    // torch's functional SiLU written out.
    let functional = DEEPSEEK_V4.replace("self.act_fn(gate)", "F.silu(gate)");
    let r = report(&format!("import torch.nn.functional as F\n\n{functional}"));
    assert!(site_patch(&r, "ToyMLP").contains(
        "(_fr_act := forward_rewrite.fusion_guard.gated_function(self, F.silu, x)) is not None:"
    ));
    assert_eq!(
        site_reason(&report(&functional), "ToyMLP").as_deref(),
        Some("mlp-activation-unknown")
    );
}

#[test]
fn clamped_swiglu_after_the_activation_is_patched_with_the_limit() {
    // Step-3.7: the activation's output clamped, not the gate.
    let step = DEEPSEEK_V4.replace(
        DEEPSEEK_V4_BODY,
        "        gate = self.act_fn(self.gate_proj(x)).clamp(max=self.limit)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(gate * up)\n",
    );
    let r = report(&step);
    assert_eq!(site_reason(&r, "ToyMLP"), None, "{r:?}");
    insta::assert_snapshot!(site_patch(&r, "ToyMLP"));
    assert_eq!(
        site_lowered(&r, "class", "clamp").as_deref(),
        Some("activation output")
    );
}

#[test]
fn clamped_swiglu_on_a_packed_projection_is_patched() {
    let packed = PHI3.replace(PHI3_BODY, "        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)\n        gate = gate.clamp(max=self.limit)\n        up = up.clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.activation_fn(gate) * up)\n");
    let patch = site_patch(&report(&packed), "ToyMLP");
    assert!(
        patch.contains("return self.down_proj(forward_rewrite.gated_mlp_act_packed(self.gate_up_proj(hidden_states), activation=_fr_act, limit=_fr_limit, overwrite_inputs=True))"),
        "{patch}"
    );
}

#[test]
fn clamps_other_than_the_swiglu_ones_are_refused() {
    for body in [
        // The gate clamped, up not; up clamped, the gate not.
        "        gate = self.gate_proj(x).clamp(max=self.limit)\n        return self.down_proj(self.act_fn(gate) * self.up_proj(x))\n",
        "        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.act_fn(self.gate_proj(x)) * up)\n",
        // Two attributes.
        "        gate = self.gate_proj(x).clamp(max=self.limit)\n        up = self.up_proj(x).clamp(min=-self.up_limit, max=self.up_limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        "        gate = self.gate_proj(x).clamp(max=self.limit)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.up_limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        // Literals, positional bounds, a config read.
        "        gate = self.gate_proj(x).clamp(max=7.0)\n        up = self.up_proj(x).clamp(min=-7.0, max=7.0)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        "        gate = self.gate_proj(x).clamp(None, self.limit)\n        up = self.up_proj(x).clamp(-self.limit, self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        "        gate = self.gate_proj(x).clamp(max=self.config.limit)\n        up = self.up_proj(x).clamp(min=-self.config.limit, max=self.config.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        // The gate clamped on both sides, up on one.
        "        gate = self.gate_proj(x).clamp(min=-self.limit, max=self.limit)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        "        gate = self.gate_proj(x).clamp(max=self.limit)\n        up = self.up_proj(x).clamp(max=self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        // The gate clamped before and after the activation; a clamp twice.
        "        gate = self.act_fn(self.gate_proj(x).clamp(max=self.limit)).clamp(max=self.limit)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(gate * up)\n",
        "        gate = self.gate_proj(x).clamp(max=self.limit).clamp(max=self.limit)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        // The clamp on the input.
        "        x = x.clamp(max=self.limit)\n        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
        // A statement that may rebind the input between the clamps.
        "        gate = self.gate_proj(x).clamp(max=self.limit)\n        x = self.norm(x)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        "        gate = self.gate_proj(x).clamp(max=self.limit)\n        self.scale(gate)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
        // clamp_min / clamp_max spelled otherwise.
        "        gate = self.gate_proj(x).clamp_max(self.limit)\n        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)\n        return self.down_proj(self.act_fn(gate) * up)\n",
    ] {
        let r = report(&DEEPSEEK_V4.replace(DEEPSEEK_V4_BODY, body));
        assert_eq!(
            site_reason(&r, "ToyMLP").as_deref(),
            Some("mlp-form-unknown"),
            "{body}"
        );
    }
    // A clamp on the product is outside it: the product alone is replaced in place.
    let r = report(&DEEPSEEK_V4.replace(
        DEEPSEEK_V4_BODY,
        "        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)).clamp(max=self.limit))\n",
    ));
    let patch = site_patch(&r, "ToyMLP");
    assert!(
        patch.contains(
            "else self.act_fn(self.gate_proj(x)) * self.up_proj(x))).clamp(max=self.limit))"
        ) && !patch.contains("_fr_limit"),
        "{patch}"
    );
    // A clamp other than the SwiGLU ones on a packed projection: the detail says so.
    let packed = PHI3.replace(
        PHI3_BODY,
        "        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)\n        gate = gate.clamp(max=7.0)\n        up = up.clamp(min=-7.0, max=7.0)\n        return self.down_proj(self.activation_fn(gate) * up)\n",
    );
    let r = report(&packed);
    assert_eq!(site_reason(&r, "ToyMLP").as_deref(), Some("mlp-packed"));
    let detail = crate::passes::fusion_common::testing::sites(&r)[0]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("clamps are not the SwiGLU ones"),
        "{detail}"
    );
}

const CLAMPED_GATE: &str = "    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        # Simple swiglu instead of alpha
        return F.silu(gate) * up

";

fn experts_with_gate(gate: &str) -> String {
    format!(
        "import torch.nn.functional as F\n\n{}",
        EXPERTS.replace(
            "    def forward(self, hidden_states, top_k_index",
            &format!("{gate}    def forward(self, hidden_states, top_k_index"),
        )
    )
}

#[test]
fn experts_own_clamped_gate_is_patched_with_its_body_as_fallback() {
    // GLM-5-Next / HY-V4: torch's functional SiLU, the gate clamped before it.
    let r = report(&experts_with_gate(CLAMPED_GATE));
    let patch = site_patch(&r, "ToyExperts");
    insta::assert_snapshot!(patch);
    let sites = crate::passes::fusion_common::testing::sites(&r);
    let gate = sites.iter().find(|s| s["kind"] == "experts-gate").unwrap();
    // Bound by its hash, like an MLP's forward (not the installer's check of the default).
    assert_eq!(
        gate["original_sha256"].as_str().unwrap().len(),
        64,
        "{gate}"
    );
    assert_eq!(gate["lowered"]["act"], "F.silu");
    assert_eq!(gate["lowered"]["limit"], "self.swiglu_limit");
    assert_eq!(gate["lowered"]["clamp"], "gate before act");
    // The experts implementation follows, with what the installer registers.
    let forward = sites
        .iter()
        .find(|s| s["kind"] == "experts-forward")
        .unwrap();
    assert_eq!(forward["verdict"], "patched", "{forward}");
    for key in ["act", "limit", "clamp", "activation"] {
        assert_eq!(forward["lowered"][key], gate["lowered"][key], "{key}");
    }
    // DeepSeek-V4: the activation module, no min=None.
    let deepseek = CLAMPED_GATE
        .replace("min=None, max=self.swiglu_limit", "max=self.swiglu_limit")
        .replace("F.silu(gate)", "self.act_fn(gate)");
    let r = report(&experts_with_gate(&deepseek));
    let patch = site_patch(&r, "ToyExperts");
    assert!(
        patch.contains("if (_fr_limit := forward_rewrite.fusion_guard.swiglu_limit(self.swiglu_limit)) is not None and (_fr_act := forward_rewrite.fusion_guard.gated_act(self.act_fn, gate_up)) is not None:")
            && patch.contains("return forward_rewrite.gated_mlp_act_packed(gate_up, activation=_fr_act, limit=_fr_limit)"),
        "{patch}"
    );
    assert_eq!(
        site_lowered(&r, "experts-forward", "act").as_deref(),
        Some("self.act_fn")
    );
    // Step-3.7's gate (if it were an experts class): the activation's output clamped.
    let step = "    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n        gate = self.act_fn(gate).clamp(max=self.limit)\n        up = up.clamp(min=-self.limit, max=self.limit)\n        return gate * up\n\n";
    let r = report(&experts_with_gate(step));
    assert!(
        site_patch(&r, "ToyExperts").contains(
            "gated_mlp_act_packed(gate_up, activation=_fr_act, limit=_fr_limit, clamp_after_activation=True)"
        )
    );
    assert_eq!(
        site_lowered(&r, "experts-forward", "clamp").as_deref(),
        Some("activation output")
    );
    // An own gate of the default's form: patched, no limit.
    let plain = "    def _apply_gate(self, gate_up_out):\n        gate, up = gate_up_out.chunk(2, dim=-1)\n        return self.act_fn(gate) * up\n\n";
    let r = report(&experts_with_gate(plain));
    assert!(site_patch(&r, "ToyExperts").contains(
        "if (_fr_act := forward_rewrite.fusion_guard.gated_act(self.act_fn, gate_up_out)) is not None:"
    ));
    assert_eq!(site_lowered(&r, "experts-forward", "limit"), None);
}

#[test]
fn experts_own_gates_other_than_the_clamped_swiglu_are_refused() {
    for gate in [
        // Beam: a float32 upcast.
        "    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n        return (self.act_fn(gate.float()) * up.float()).to(gate.dtype)\n\n",
        // Inkling2: a two-argument activation.
        "    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n        return self.act_fn(gate, up)\n\n",
        // One-sided, two attributes.
        "    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n        up = up.clamp(min=-self.limit, max=self.limit)\n        return self.act_fn(gate) * up\n\n",
        "    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n        gate = gate.clamp(max=self.limit)\n        up = up.clamp(min=-self.other, max=self.other)\n        return self.act_fn(gate) * up\n\n",
        // An extra parameter, a decorator.
        "    def _apply_gate(self, gate_up, limit=None):\n        gate, up = gate_up.chunk(2, dim=-1)\n        return self.act_fn(gate) * up\n\n",
        "    @torch.compile\n    def _apply_gate(self, gate_up):\n        gate, up = gate_up.chunk(2, dim=-1)\n        return self.act_fn(gate) * up\n\n",
    ] {
        let r = report(&experts_with_gate(gate));
        assert_eq!(
            site_reason(&r, "ToyExperts").as_deref(),
            Some("experts-gate-custom"),
            "{gate}"
        );
        assert_eq!(
            forward_site_reason(&r).as_deref(),
            Some("experts-forward-gate")
        );
    }
    // F not known to be torch.nn.functional.
    let r = report(&EXPERTS.replace(
        "    def forward(self, hidden_states, top_k_index",
        &format!("{CLAMPED_GATE}    def forward(self, hidden_states, top_k_index"),
    ));
    assert_eq!(
        site_reason(&r, "ToyExperts").as_deref(),
        Some("mlp-activation-unknown")
    );
    // Inherited from a base class of the module: the installer patches the class's own.
    let inherited = experts_with_gate(CLAMPED_GATE)
        .replace(
            "@use_experts_implementation\nclass ToyExperts(nn.Module):",
            "class ToyBase(nn.Module):\n    pass\n\n\n@use_experts_implementation\nclass ToyExperts(ToyBase):",
        )
        .replace(CLAMPED_GATE, "")
        .replace(
            "class ToyBase(nn.Module):\n    pass\n",
            &format!("class ToyBase(nn.Module):\n{CLAMPED_GATE}"),
        );
    let r = report(&inherited);
    assert_eq!(
        site_reason(&r, "ToyExperts").as_deref(),
        Some("experts-gate-custom"),
        "{inherited}"
    );
}

// ------------------------------------------------------------- GPT-OSS's / MiniMax-M3's SwiGLU

const MINIMAX_MLP: &str = "class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu_alpha = config.swiglu_alpha
        self.swiglu_limit = config.swiglu_limit
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        gate_up = self.gate_up_proj(hidden_states)
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        glu = gate * torch.sigmoid(gate * self.swiglu_alpha)
        return self.down_proj((up + 1.0) * glu)
";

const MINIMAX_MLP_BODY: &str = "        gate_up = self.gate_up_proj(hidden_states)
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        glu = gate * torch.sigmoid(gate * self.swiglu_alpha)
        return self.down_proj((up + 1.0) * glu)
";

const OAI_GUARD: &str = "if (_fr_limit := forward_rewrite.fusion_guard.swiglu_limit(self.swiglu_limit)) is not None and (_fr_alpha := forward_rewrite.fusion_guard.gated_oai(self, hidden_states, forward_rewrite.fusion_guard.swiglu_alpha(self.swiglu_alpha))) is not None:";

const OAI_PACKED: &str = "return self.down_proj(forward_rewrite.gated_mlp_act_packed(self.gate_up_proj(hidden_states), activation=\"swiglu_oai\", alpha=_fr_alpha, limit=_fr_limit, overwrite_inputs=True))";

#[test]
fn swiglu_oai_packed_mlp_is_patched_with_alpha_and_limit() {
    // MiniMax-M3's dense MLP.
    let r = report(MINIMAX_MLP);
    assert_eq!(site_reason(&r, "ToyMLP"), None, "{r:?}");
    let patch = site_patch(&r, "ToyMLP");
    insta::assert_snapshot!(patch);
    assert!(
        patch.contains(OAI_GUARD) && patch.contains(OAI_PACKED),
        "{patch}"
    );
    assert_eq!(lowered(&r), "swiglu_oai");
    for (key, want) in [
        ("alpha", "self.swiglu_alpha"),
        ("limit", "self.swiglu_limit"),
        ("clamp", "gate before act"),
    ] {
        assert_eq!(
            site_lowered(&r, "class", key).as_deref(),
            Some(want),
            "{key}"
        );
    }
    assert_eq!(site_lowered(&r, "class", "layout"), None);
    // The same arithmetic written otherwise: the operands of each product and of the sum in
    // either order (the rounding is the same), `1` or `1.0`, the statements reordered,
    // renamed, inline, `torch.chunk`, `min=None`, the clamps' keywords swapped.
    for body in [
        "        gate_up = self.gate_up_proj(hidden_states)\n        gate, up = gate_up.chunk(2, dim=-1)\n        gate = gate.clamp(max=self.swiglu_limit)\n        glu = torch.sigmoid(self.swiglu_alpha * gate) * gate\n        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)\n        return self.down_proj(glu * (1 + up))\n",
        "        g, u = torch.chunk(self.gate_up_proj(hidden_states), 2, dim=-1)\n        g = g.clamp(min=None, max=self.swiglu_limit)\n        return self.down_proj((u.clamp(max=self.swiglu_limit, min=-self.swiglu_limit) + 1) * (g * torch.sigmoid(g * self.swiglu_alpha)))\n",
        "        gate_up = self.gate_up_proj(hidden_states)\n        gate, up = gate_up.chunk(2, dim=-1)\n        gate = gate.clamp(max=self.swiglu_limit)\n        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)\n        glu = gate * torch.sigmoid(gate * self.swiglu_alpha)\n        out = gate * torch.sigmoid(gate * self.swiglu_alpha) * (up + 1.0)\n        out = self.down_proj(out)\n        return out\n",
    ] {
        let r = report(&MINIMAX_MLP.replace(MINIMAX_MLP_BODY, body));
        let patch = site_patch(&r, "ToyMLP");
        assert!(
            patch.contains(OAI_GUARD) && patch.contains(OAI_PACKED),
            "{body}\n{patch}"
        );
    }
    // Two projections: gated_mlp_act with the same arguments.
    let split = MINIMAX_MLP.replace(
        MINIMAX_MLP_BODY,
        "        gate = self.gate_proj(hidden_states).clamp(max=self.swiglu_limit)\n        up = self.up_proj(hidden_states).clamp(min=-self.swiglu_limit, max=self.swiglu_limit)\n        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.swiglu_alpha)))\n",
    );
    let patch = site_patch(&report(&split), "ToyMLP");
    assert!(
        patch.contains("return self.down_proj(forward_rewrite.gated_mlp_act(self.gate_proj(hidden_states), self.up_proj(hidden_states), activation=\"swiglu_oai\", alpha=_fr_alpha, limit=_fr_limit, overwrite_inputs=True))"),
        "{patch}"
    );
    // GPT-OSS's interleaved pairs on a packed projection: interleaved=True.
    let pairs = MINIMAX_MLP.replace(
        "        gate, up = gate_up.chunk(2, dim=-1)\n",
        "        gate, up = gate_up[..., ::2], gate_up[..., 1::2]\n",
    );
    let r = report(&pairs);
    let patch = site_patch(&r, "ToyMLP");
    assert!(
        patch.contains("activation=\"swiglu_oai\", alpha=_fr_alpha, limit=_fr_limit, interleaved=True, overwrite_inputs=True))"),
        "{patch}"
    );
    assert_eq!(
        site_lowered(&r, "class", "layout").as_deref(),
        Some("interleaved")
    );
}

/// Near misses of `swiglu_oai`, as body text replacements of [`MINIMAX_MLP`]: each is refused.
const OAI_NEAR_MISSES: &[(&str, &str)] = &[
    // `up + 2`, `up - 1`, `up + 1` twice.
    ("(up + 1.0) * glu", "(up + 2) * glu"),
    ("(up + 1.0) * glu", "(up - 1.0) * glu"),
    ("(up + 1.0) * glu", "(up + 1.0 + 1.0) * glu"),
    // A literal alpha; alpha not a `self` attribute; scaled by two attributes, or twice.
    ("gate * self.swiglu_alpha", "gate * 1.702"),
    (
        "gate * self.swiglu_alpha",
        "gate * self.config.swiglu_alpha",
    ),
    (
        "gate * self.swiglu_alpha",
        "gate * self.swiglu_alpha * self.swiglu_beta",
    ),
    (
        "gate * self.swiglu_alpha",
        "gate * self.swiglu_alpha * self.swiglu_alpha",
    ),
    // The two uses of the gate differ: up in the sigmoid, the unclamped gate, the other half.
    ("sigmoid(gate * self", "sigmoid(up * self"),
    (
        "glu = gate * torch.sigmoid(gate * self.swiglu_alpha)",
        "glu = gate * torch.sigmoid(gate_up.chunk(2, dim=-1)[0] * self.swiglu_alpha)",
    ),
    // Rounded otherwise: ((up + 1) * gate) * sigmoid(...).
    (
        "        glu = gate * torch.sigmoid(gate * self.swiglu_alpha)\n        return self.down_proj((up + 1.0) * glu)\n",
        "        return self.down_proj((up + 1.0) * gate * torch.sigmoid(gate * self.swiglu_alpha))\n",
    ),
    // Another sigmoid, keyword arguments, a method call.
    ("torch.sigmoid(", "torch.nn.functional.sigmoid("),
    ("torch.sigmoid(", "F.sigmoid("),
    (
        "torch.sigmoid(gate * self.swiglu_alpha)",
        "(gate * self.swiglu_alpha).sigmoid()",
    ),
    (
        "torch.sigmoid(gate * self.swiglu_alpha)",
        "torch.sigmoid(gate * self.swiglu_alpha, out=None)",
    ),
    // The clamps: none, one side only, two attributes, a clamp on the output.
    (
        "        gate = gate.clamp(max=self.swiglu_limit)\n        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)\n",
        "",
    ),
    (
        "        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)\n",
        "",
    ),
    (
        "up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)",
        "up.clamp(min=-self.limit, max=self.limit)",
    ),
    ("glu = gate *", "glu = (gate *"),
    (
        "(up + 1.0) * glu",
        "(up + 1.0) * glu.clamp(max=self.swiglu_limit)",
    ),
    // The gate the second half.
    ("gate, up = gate_up.chunk", "up, gate = gate_up.chunk"),
];

#[test]
fn swiglu_oai_near_misses_are_refused() {
    for (from, to) in OAI_NEAR_MISSES {
        let text = MINIMAX_MLP.replace(from, to);
        assert_ne!(text, MINIMAX_MLP, "{from}");
        // `glu = (gate *` needs its parenthesis closed: `(gate * sigmoid(...))` means the same.
        let text = if *to == "glu = (gate *" {
            text.replace("self.swiglu_alpha)\n", "self.swiglu_alpha))\n")
        } else {
            text
        };
        let r = report(&text);
        let reason = site_reason(&r, "ToyMLP");
        if *to == "glu = (gate *" {
            assert_eq!(reason, None, "{to}");
            continue;
        }
        assert_eq!(reason.as_deref(), Some("mlp-packed"), "{from} -> {to}");
    }
    // On the pairs: the gate the odd columns, or up the even ones too.
    let pairs = MINIMAX_MLP.replace(
        "        gate, up = gate_up.chunk(2, dim=-1)\n",
        "        gate, up = gate_up[..., 1::2], gate_up[..., ::2]\n",
    );
    let r = report(&pairs);
    assert_eq!(site_reason(&r, "ToyMLP").as_deref(), Some("mlp-packed"));
    for slices in [
        "gate_up[..., ::2], gate_up[..., ::2]",
        "gate_up[:, ::2], gate_up[:, 1::2]",
        "gate_up[..., ::2], gate_up[..., 1::3]",
        "gate_up[..., :8:2], gate_up[..., 1::2]",
    ] {
        let text = MINIMAX_MLP.replace(
            "        gate, up = gate_up.chunk(2, dim=-1)\n",
            &format!("        gate, up = {slices}\n"),
        );
        assert_eq!(
            site_reason(&report(&text), "ToyMLP").as_deref(),
            Some("mlp-packed"),
            "{slices}"
        );
    }
    // `torch` not bound by `import torch` alone: torch.sigmoid is not known to be torch's.
    let r = report(&format!("import numpy as torch\n\n{MINIMAX_MLP}"));
    assert_eq!(
        site_reason(&r, "ToyMLP").as_deref(),
        Some("mlp-activation-unknown")
    );
}

const GPT_OSS_EXPERTS: &str = "@use_experts_implementation(is_concatenated=False, is_transposed=True, has_bias=True)
class ToyExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(4, config.hidden_size, 2 * config.intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(4, 2 * config.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty((4, config.intermediate_size, config.hidden_size)))
        self.down_proj_bias = nn.Parameter(torch.empty(4, config.hidden_size))
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        gated_output = (up + 1) * glu
        return gated_output

    def forward(self, hidden_states, router_indices=None, routing_weights=None):
        return hidden_states


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = ToyExperts(config)

    def forward(self, hidden_states):
        return self.experts(hidden_states, None, None)
";

#[test]
fn gpt_oss_experts_gate_is_patched_interleaved_and_its_forward_refused() {
    let r = report(GPT_OSS_EXPERTS);
    assert_eq!(site_reason(&r, "ToyExperts"), None, "{r:?}");
    let patch = site_patch(&r, "ToyExperts");
    insta::assert_snapshot!(patch);
    assert!(
        patch.contains("if (_fr_limit := forward_rewrite.fusion_guard.swiglu_limit(self.limit)) is not None and (_fr_alpha := forward_rewrite.fusion_guard.gated_oai(self, gate_up, forward_rewrite.fusion_guard.swiglu_alpha(self.alpha))) is not None:")
            && patch.contains("return forward_rewrite.gated_mlp_act_packed(gate_up, activation=\"swiglu_oai\", alpha=_fr_alpha, limit=_fr_limit, interleaved=True)"),
        "{patch}"
    );
    let sites = crate::passes::fusion_common::testing::sites(&r);
    let gate = sites.iter().find(|s| s["kind"] == "experts-gate").unwrap();
    assert_eq!(gate["original_sha256"].as_str().unwrap().len(), 64);
    for (key, want) in [
        ("activation", "swiglu_oai"),
        ("act", "swiglu_oai"),
        ("alpha", "self.alpha"),
        ("limit", "self.limit"),
        ("clamp", "gate before act"),
        ("layout", "interleaved"),
    ] {
        assert_eq!(gate["lowered"][key], want, "{key}");
    }
    // has_bias=True: the experts op does not add biases.
    assert_eq!(
        forward_site_reason(&r).as_deref(),
        Some("experts-forward-options")
    );
    // Without the bias, the interleaved gate still keeps the experts op away (it takes halves).
    let no_bias = GPT_OSS_EXPERTS.replace(", has_bias=True)", ")");
    let r = report(&no_bias);
    assert_eq!(site_reason(&r, "ToyExperts"), None);
    assert_eq!(
        forward_site_reason(&r).as_deref(),
        Some("experts-forward-options")
    );
    let detail = crate::passes::fusion_common::testing::sites(&r)
        .into_iter()
        .find(|s| s["kind"] == "experts-forward")
        .unwrap()["detail"]
        .to_string();
    assert!(detail.contains("interleaved"), "{detail}");
    // Declared concatenated, read interleaved: the gate is exact, the op still refused.
    let r = report(&GPT_OSS_EXPERTS.replace("is_concatenated=False, ", ""));
    assert_eq!(site_reason(&r, "ToyExperts"), None);
    assert_eq!(
        forward_site_reason(&r).as_deref(),
        Some("experts-forward-options")
    );
    // The plain product on the pairs: patched interleaved, with the activation module's guard.
    let plain = GPT_OSS_EXPERTS
        .replace(
            "        self.alpha = config.swiglu_alpha\n",
            "        self.act_fn = ACT2FN[config.hidden_act]\n",
        )
        .replace(
            "        gate = gate.clamp(min=None, max=self.limit)\n        up = up.clamp(min=-self.limit, max=self.limit)\n        glu = gate * torch.sigmoid(gate * self.alpha)\n        gated_output = (up + 1) * glu\n",
            "        gated_output = self.act_fn(gate) * up\n",
        );
    let r = report(&plain);
    assert!(
        site_patch(&r, "ToyExperts").contains(
            "return forward_rewrite.gated_mlp_act_packed(gate_up, activation=_fr_act, interleaved=True)"
        ),
        "{r:?}"
    );
}

#[test]
fn interleaved_experts_with_any_other_gate_are_refused() {
    let gate = "        gate, up = gate_up[..., ::2], gate_up[..., 1::2]\n";
    for (from, to, reason) in [
        // The gate the odd columns: not read; is_concatenated=False keeps experts-options.
        (
            gate,
            "        gate, up = gate_up[..., 1::2], gate_up[..., ::2]\n",
            "experts-options",
        ),
        // MiniMax-M3's halves under is_concatenated=False.
        (
            gate,
            "        gate, up = gate_up.chunk(2, dim=-1)\n",
            "experts-options",
        ),
        ("(up + 1) * glu", "(up + 2) * glu", "experts-options"),
        ("gate * self.alpha", "gate * 1.702", "experts-options"),
    ] {
        let text = GPT_OSS_EXPERTS.replace(from, to);
        assert_ne!(text, GPT_OSS_EXPERTS);
        let r = report(&text);
        assert_eq!(
            site_reason(&r, "ToyExperts").as_deref(),
            Some(reason),
            "{to}"
        );
        assert_eq!(
            forward_site_reason(&r).as_deref(),
            Some("experts-forward-gate")
        );
        // Declared concatenated, the same gates are the class's own, refused as such (or, on
        // the halves, MiniMax-M3's: patched).
        let concatenated = text.replace("is_concatenated=False, ", "");
        let want = if to.contains("chunk") {
            None
        } else {
            Some("experts-gate-custom")
        };
        assert_eq!(
            site_reason(&report(&concatenated), "ToyExperts").as_deref(),
            want,
            "{to}"
        );
    }
    // No gate of its own: transformers' default takes the halves.
    let default = GPT_OSS_EXPERTS.replace(
        &GPT_OSS_EXPERTS[GPT_OSS_EXPERTS.find("    def _apply_gate").unwrap()
            ..GPT_OSS_EXPERTS.find("    def forward").unwrap()],
        "",
    );
    assert_eq!(
        site_reason(&report(&default), "ToyExperts").as_deref(),
        Some("experts-options")
    );
    // The transformers default the installer checks is the halves' form, never the pairs'.
    assert!(!super::experts::gate_function_ok(
        "def _default_apply_gate(self, gate_up_out):\n    gate, up = gate_up_out[..., ::2], gate_up_out[..., 1::2]\n    return self.act_fn(gate) * up\n"
    ));
}

const MINIMAX_GATE: &str = "    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        # same as GPT OSS, but the weights are not interleaved
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        glu = gate * torch.sigmoid(gate * self.swiglu_alpha)
        return (up + 1.0) * glu

";

#[test]
fn minimax_experts_gate_and_forward_are_patched_with_alpha() {
    let r = report(&experts_with_gate(MINIMAX_GATE));
    assert_eq!(site_reason(&r, "ToyExperts"), None, "{r:?}");
    let patch = site_patch(&r, "ToyExperts");
    insta::assert_snapshot!(patch);
    assert!(
        patch.contains("return forward_rewrite.gated_mlp_act_packed(gate_up, activation=\"swiglu_oai\", alpha=_fr_alpha, limit=_fr_limit)"),
        "{patch}"
    );
    let sites = crate::passes::fusion_common::testing::sites(&r);
    let gate = sites.iter().find(|s| s["kind"] == "experts-gate").unwrap();
    let forward = sites
        .iter()
        .find(|s| s["kind"] == "experts-forward")
        .unwrap();
    assert_eq!(forward["verdict"], "patched", "{forward}");
    // What the installer registers: the activation, alpha, the limit and the clamp.
    for key in ["act", "activation", "alpha", "limit", "clamp"] {
        assert_eq!(forward["lowered"][key], gate["lowered"][key], "{key}");
    }
    assert_eq!(forward["lowered"]["alpha"], "self.swiglu_alpha");
    assert!(forward["lowered"].get("layout").is_none());
    // Near misses of the gate: the class's own, refused.
    for (from, to) in [
        ("(up + 1.0) * glu", "(up + 2) * glu"),
        ("gate * self.swiglu_alpha", "gate * 2.0"),
        (
            "gate * self.swiglu_alpha",
            "gate * self.swiglu_alpha * self.other_alpha",
        ),
        ("gate, up = gate_up.chunk", "up, gate = gate_up.chunk"),
        (
            "        glu = gate * torch.sigmoid(gate * self.swiglu_alpha)\n        return (up + 1.0) * glu\n",
            "        return (up + 1.0) * gate * torch.sigmoid(gate * self.swiglu_alpha)\n",
        ),
    ] {
        let text = MINIMAX_GATE.replace(from, to);
        assert_ne!(text, MINIMAX_GATE);
        let r = report(&experts_with_gate(&text));
        assert_eq!(
            site_reason(&r, "ToyExperts").as_deref(),
            Some("experts-gate-custom"),
            "{to}"
        );
    }
    // `torch` bound otherwise too.
    let r = report(&format!(
        "torch = None\n\n{}",
        experts_with_gate(MINIMAX_GATE)
    ));
    assert_eq!(
        site_reason(&r, "ToyExperts").as_deref(),
        Some("mlp-activation-unknown")
    );
}
