//! Unit tests of the residual-norm pass: the runs it fuses, every reason code.

use crate::passes::fusion_common::testing::{run_module, site_patch, site_reason, sites};

const NORM: &str = "class ToyRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)
";

const LLAMA_LAYER: &str = "class ToyDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = ToyAttention(config)
        self.mlp = ToyMLP(config)
        self.input_layernorm = ToyRMSNorm(config.hidden_size)
        self.post_attention_layernorm = ToyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, **kwargs):
        \"\"\"Docstring.\"\"\"
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        # Self Attention
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        # Fully Connected
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states
";

/// A module with `norm` and `layer` definitions and a model that builds the layer.
fn module(norm: &str, layer: &str) -> String {
    format!(
        "import torch
from torch import nn


{norm}

{layer}

class ToyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([ToyDecoderLayer(config) for _ in range(2)])


class ToyForCausalLM(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids)
        logits = self.lm_head(hidden_states)
        return logits
"
    )
}

fn report(norm: &str, layer: &str) -> crate::audit::PassReport {
    run_module(&super::PASS, &module(norm, layer))
}

#[test]
fn llama_layer_fuses_the_add_before_the_post_attention_norm() {
    let r = report(NORM, LLAMA_LAYER);
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "ToyDecoderLayer");
    insta::assert_snapshot!(patch);
    assert_eq!(
        sites(&r)[0]["lowered"]["norms"],
        "post_attention_layernorm (ToyRMSNorm)"
    );
    // the layer's last add is followed by no norm: left as it is
    assert!(
        patch.ends_with("    hidden_states = residual + hidden_states\n    return hidden_states\n")
    );
}

#[test]
fn sandwich_norms_and_either_order_of_the_sum() {
    // Gemma 2: a norm after the attention, the add, then the pre-feedforward norm; the sum
    // written the other way round.
    let layer = LLAMA_LAYER
        .replace(
            "        hidden_states = residual + hidden_states\n\n        # Fully",
            "        hidden_states = self.post_attention_layernorm(hidden_states)\n        hidden_states = hidden_states + residual\n\n        # Fully",
        )
        .replace(
            "        hidden_states = self.post_attention_layernorm(hidden_states)\n        hidden_states = self.mlp",
            "        hidden_states = self.pre_feedforward_layernorm(hidden_states)\n        hidden_states = self.mlp",
        )
        .replace(
            "        self.post_attention_layernorm = ToyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)",
            "        self.post_attention_layernorm = ToyRMSNorm(config.hidden_size)\n        self.pre_feedforward_layernorm = ToyRMSNorm(config.hidden_size)",
        );
    let r = report(NORM, &layer);
    let patch = site_patch(&r, "ToyDecoderLayer");
    assert!(patch.contains(
        "    if (_fr_norm := forward_rewrite.fusion_guard.residual_norm(self.pre_feedforward_layernorm, residual, hidden_states)) is not None:\n"
    ), "{patch}");
    assert!(
        patch.contains("    else:\n        hidden_states = hidden_states + residual\n"),
        "{patch}"
    );
}

#[test]
fn other_names_are_kept() {
    let layer = LLAMA_LAYER
        .replace("hidden_states", "x")
        .replace("residual", "res");
    let patch = site_patch(&report(NORM, &layer), "ToyDecoderLayer");
    assert!(
        patch.contains("        x, res = forward_rewrite.add_rms_norm(res, x, **_fr_norm)\n"),
        "{patch}"
    );
}

#[test]
fn a_norm_rms_norm_refuses_is_refused_with_its_reason() {
    let norm = NORM.replace(
        "torch.rsqrt(variance + self.variance_epsilon)",
        "(variance + self.variance_epsilon) ** -0.5",
    );
    let r = report(&norm, LLAMA_LAYER);
    assert_eq!(r.verdict, "refused");
    assert_eq!(r.reason.as_deref(), Some("residual-norm-norm-refused"));
    assert!(r.detail.contains("norm-not-rsqrt"), "{}", r.detail);
}

#[test]
fn an_unweighted_norm_is_refused() {
    // NanoChat's norm: rms-norm patches it with no weight, which add_rms_norm would read.
    let norm = "class ToyRMSNorm(nn.Module):
    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x)
";
    let r = report(norm, LLAMA_LAYER);
    assert_eq!(r.reason.as_deref(), Some("residual-norm-norm-refused"));
    assert!(r.detail.contains("unweighted"), "{}", r.detail);
}

#[test]
fn a_norm_not_built_from_one_module_class_is_unresolved() {
    for init in [
        "self.post_attention_layernorm = ToyRMSNorm(config.hidden_size) if config.norm else nn.Identity()",
        "self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size)",
        "self.post_attention_layernorm = make_norm(config)",
    ] {
        let layer = LLAMA_LAYER.replace(
            "self.post_attention_layernorm = ToyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)",
            init,
        );
        let r = report(NORM, &layer);
        assert_eq!(
            site_reason(&r, "ToyDecoderLayer").as_deref(),
            Some("residual-norm-unresolved"),
            "{init}: {r:?}"
        );
    }
    // two assignments of the same class (branches of an `if`) are one class
    let layer = LLAMA_LAYER.replace(
        "        self.post_attention_layernorm = ToyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)",
        "        if config.big:\n            self.post_attention_layernorm = ToyRMSNorm(config.hidden_size, eps=1e-5)\n        else:\n            self.post_attention_layernorm = ToyRMSNorm(config.hidden_size)",
    );
    assert_eq!(report(NORM, &layer).verdict, "patched");
}

#[test]
fn a_norm_imported_from_another_modeling_module_is_fused_under_the_guard() {
    // transformers 4.57's Qwen2-VL builds its norms from qwen2's class.
    let layer = LLAMA_LAYER.replace(
        "self.post_attention_layernorm = ToyRMSNorm(",
        "self.post_attention_layernorm = Qwen2RMSNorm(",
    );
    let imported = "from ..qwen2.modeling_qwen2 import Qwen2RMSNorm\n";
    let r = report(&format!("{imported}\n{NORM}"), &layer);
    assert_eq!(r.verdict, "patched", "{r:?}");
    assert_eq!(
        sites(&r)[0]["lowered"]["norms"],
        "post_attention_layernorm (Qwen2RMSNorm from ..qwen2.modeling_qwen2, fused where its own module's rms-norm site is installed)"
    );
    // Not from a modeling module, renamed, bound twice, or not an RMSNorm: unresolved.
    for (imports, class) in [
        ("from .norms import Qwen2RMSNorm\n", "Qwen2RMSNorm"),
        (
            "from ..qwen2.modeling_qwen2 import LlamaRMSNorm as Qwen2RMSNorm\n",
            "Qwen2RMSNorm",
        ),
        (
            "from ..qwen2.modeling_qwen2 import Qwen2RMSNorm\nfrom ..llama.modeling_llama import Qwen2RMSNorm\n",
            "Qwen2RMSNorm",
        ),
        (
            "from ..qwen2.modeling_qwen2 import Qwen2Norm\n",
            "Qwen2Norm",
        ),
    ] {
        let layer = LLAMA_LAYER.replace(
            "self.post_attention_layernorm = ToyRMSNorm(",
            &format!("self.post_attention_layernorm = {class}("),
        );
        let r = report(&format!("{imports}\n{NORM}"), &layer);
        assert_eq!(
            site_reason(&r, "ToyDecoderLayer").as_deref(),
            Some("residual-norm-unresolved"),
            "{imports}: {r:?}"
        );
    }
}

#[test]
fn a_conditional_norm_form_is_fused_under_the_guard() {
    let norm = "class ToyRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if self.with_scale:
            self.weight = nn.Parameter(torch.ones(dim), requires_grad=True)

    def _norm(self, hidden_states: torch.Tensor):
        mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
        return hidden_states * torch.pow(mean_squared, -0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed_output = self._norm(hidden_states.float())
        if self.with_scale:
            normed_output = normed_output * self.weight.float()
        return normed_output.type_as(hidden_states)
";
    // Gemma 4's form applies its weight under `self.with_scale`: the layer is patched, and
    // the installer registers the condition for the guard to test on each instance.
    let r = report(norm, LLAMA_LAYER);
    assert_eq!(r.verdict, "patched", "{r:?}");
    assert_eq!(
        sites(&r)[0]["lowered"]["norms"],
        "post_attention_layernorm (ToyRMSNorm, fused only when self.with_scale)"
    );
    assert!(site_patch(&r, "ToyDecoderLayer").contains("forward_rewrite.add_rms_norm("));
}

#[test]
fn a_norm_fused_only_when_its_groups_are_none_is_refused() {
    // Qwen4Exp's text norm: rms-norm fuses the instances with `self.group_size is None`; the
    // residual guard tests a `self.<attribute>` only, so the layer stays stock, saying why.
    let norm = "class ToyRMSNorm(nn.Module):
    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.group_size = group_size

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            x = x.reshape(*x.shape[:-1], -1, self.group_size)
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.flatten(-2) if self.group_size is not None else out

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)
";
    let r = report(norm, LLAMA_LAYER);
    assert_eq!(r.verdict, "refused", "{r:?}");
    assert_eq!(
        r.reason.as_deref(),
        Some("residual-norm-norm-refused"),
        "{r:?}"
    );
    assert!(
        format!("{r:?}").contains("only when self.group_size is None"),
        "{r:?}"
    );
}

#[test]
fn what_is_not_the_three_statements_is_no_site() {
    for (from, to) in [
        // dropout on the branch (Phi-3)
        (
            "hidden_states = residual + hidden_states\n\n",
            "hidden_states = residual + self.dropout(hidden_states)\n\n",
        ),
        // the sum not kept as the next residual
        (
            "        residual = hidden_states\n        hidden_states = self.post",
            "        hidden_states = self.post",
        ),
        // a scaled residual
        (
            "hidden_states = residual + hidden_states\n\n",
            "hidden_states = residual * 2 + hidden_states\n\n",
        ),
        // the norm with an extra argument
        (
            "self.post_attention_layernorm(hidden_states)",
            "self.post_attention_layernorm(hidden_states, 1)",
        ),
        // the norm of another tensor
        (
            "self.post_attention_layernorm(hidden_states)",
            "self.post_attention_layernorm(residual)",
        ),
    ] {
        assert!(LLAMA_LAYER.contains(from), "{from}");
        let r = report(NORM, &LLAMA_LAYER.replace(from, to));
        assert_eq!(r.reason.as_deref(), Some("no-residual-norm"), "{to}: {r:?}");
    }
}

#[test]
fn an_already_patched_forward_is_refused() {
    let layer = LLAMA_LAYER.replace(
        "        residual = hidden_states\n        hidden_states = self.input_layernorm",
        "        forward_rewrite.note()\n        residual = hidden_states\n        hidden_states = self.input_layernorm",
    );
    let r = report(NORM, &layer);
    assert_eq!(
        site_reason(&r, "ToyDecoderLayer").as_deref(),
        Some("residual-norm-already-patched")
    );
}
