"""Tiny random models of real transformers classes, built from their own config classes (no
downloads), and the stock-versus-patched comparison the equivalence tests and
``bench/equivalence.py`` share.

Each case is small (2 layers, hidden 32) but keeps what matters for the loss: a vocabulary
of a few hundred, the class's own logit transforms with values large enough to matter
(soft-cap 3, logit scale 0.25, logits scaling 4), and, for the vision-language class, the
whole multimodal wrapper run on text only. The sizes, the batch and the comparison's
helpers are ``forward_rewrite.verify``'s, which checks every patched class the same way.
"""

import copy

import forward_rewrite
import torch
import transformers
from forward_rewrite.verify import DECODER, VOCAB, batch, loss_and_grads, rel_err

_MOE = {
    "num_experts_per_tok": 2,
    "output_router_logits": True,
    "router_aux_loss_coef": 0.01,
}


def _text_config(name, **extra):
    return getattr(transformers, name)(**{**DECODER, **extra})


def _llava():
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    return transformers.LlavaConfig(
        vision_config=vision,
        text_config=_text_config("LlamaConfig"),
        image_token_id=VOCAB - 1,
        projector_hidden_act="gelu",
    )


def _gemma3_vlm():
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return transformers.Gemma3Config(
        vision_config=vision,
        text_config=_text_config("Gemma3TextConfig", final_logit_softcapping=3.0),
        mm_tokens_per_image=4,
        image_token_id=VOCAB - 1,
        boi_token_id=VOCAB - 2,
        eoi_token_id=VOCAB - 3,
    )


#: name -> (model class name, config factory, transforms the audit must report)
CASES = {
    "llama": ("LlamaForCausalLM", lambda: _text_config("LlamaConfig"), []),
    "qwen3": ("Qwen3ForCausalLM", lambda: _text_config("Qwen3Config"), []),
    "mistral": ("MistralForCausalLM", lambda: _text_config("MistralConfig"), []),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        lambda: _text_config(
            "Qwen3MoeConfig", num_experts=4, moe_intermediate_size=16, **_MOE
        ),
        [],
    ),
    "mixtral": (
        "MixtralForCausalLM",
        lambda: _text_config("MixtralConfig", num_local_experts=4, **_MOE),
        [],
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        lambda: _text_config("Gemma2Config", final_logit_softcapping=3.0),
        ["softcap"],
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        lambda: _text_config("Gemma3TextConfig", final_logit_softcapping=3.0),
        ["softcap"],
    ),
    "gemma4": (
        "Gemma4ForCausalLM",
        lambda: _text_config(
            "Gemma4TextConfig",
            final_logit_softcapping=3.0,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        ["softcap"],
    ),
    "cohere": (
        "CohereForCausalLM",
        lambda: _text_config("CohereConfig", logit_scale=0.25),
        ["scale_multiply"],
    ),
    "granite": (
        "GraniteForCausalLM",
        lambda: _text_config("GraniteConfig", logits_scaling=4.0),
        ["scale_divide"],
    ),
    "llava": ("LlavaForConditionalGeneration", _llava, []),
    "gemma3_vlm": ("Gemma3ForConditionalGeneration", _gemma3_vlm, []),
}


def build(case, *, tie=False, seed=0):
    """A tiny random model of the case's class in train mode (dropout is 0 everywhere)."""
    class_name, make_config, _ = CASES[case]
    config = make_config()
    text = config.get_text_config()
    text.tie_word_embeddings = tie
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).float().train()
    return model


def compare(case, *, tie=False, num_items_in_batch=None):
    """Stock forward, then the patched one, on the same weights and batch.

    Returns a dict: ``loss_err``, ``grad_err`` (the worst parameter), ``worst_param``,
    ``grads`` (parameters with a gradient), ``stock_loss``, ``fused`` (the patched forward
    took the fused path: its logits are None) and ``missing`` (parameters whose gradient
    exists on one side only)."""
    model = build(case, tie=tie)
    inputs = batch(num_items_in_batch=num_items_in_batch)
    forward_rewrite.uninstall()
    stock_loss, stock_logits, stock_grads = loss_and_grads(model, copy.copy(inputs))
    assert stock_logits is not None
    forward_rewrite.patch_model(model)
    try:
        loss, logits, grads = loss_and_grads(model, copy.copy(inputs))
    finally:
        forward_rewrite.uninstall()
    errs = {
        name: rel_err(grads[name], g)
        for name, g in stock_grads.items()
        if name in grads
    }
    worst = max(errs, key=errs.get)
    return {
        "loss_err": rel_err(loss, stock_loss),
        "grad_err": errs[worst],
        "worst_param": worst,
        "grads": len(errs),
        "stock_loss": stock_loss.item(),
        "fused": logits is None,
        "missing": sorted(set(stock_grads) ^ set(grads)),
    }
