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

#[test]
fn reason_mlp_packed() {
    let r = report(&LLAMA.replace(
        "        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n        return down_proj\n",
        "        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)\n        return self.down_proj(up * self.act_fn(gate))\n",
    ));
    assert_eq!(site_reason(&r, "ToyMLP").as_deref(), Some("mlp-packed"));
}

#[test]
fn reason_mlp_form_unknown() {
    for body in [
        // Not gated.
        "        return self.down_proj(self.act_fn(self.up_proj(x)))\n",
        // Dropout after the product.
        "        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))\n",
        // The up projection of another input.
        "        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x + 1))\n",
        // An extra statement.
        "        y = x\n        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n",
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
