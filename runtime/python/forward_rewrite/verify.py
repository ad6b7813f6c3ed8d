"""Differential verification of patched forwards: a class's tiny random model, built from its
own config class (no downloads), runs its stock forward and then the patched one on the same
weights and batch; the loss and every parameter's gradient must agree (float32: loss within
1e-5, gradients within 1e-4 of stock), and the patched forward must take the fused path.

    python -m forward_rewrite.verify --cache DIR [--device cpu|cuda] [--out FILE]

checks every entry of ``DIR/allowlist.json`` (``forward-rewrite build --out DIR``) with the
patch from that cache, the patch ``install(cache_dir=DIR)`` would run, and writes one result
per entry as JSON. ``check_class(cls)`` checks one class (with the in-process rewrite, or
``cache_dir=DIR``); ``tiny_model(cls)`` builds its tiny model.

A config is shrunk generically: each field named in ``SHRINK`` that the config's
``__init__`` takes, and whose default is a number, gets the small value; sub-configs
(``text_config``, ``vision_config``, ...) are shrunk the same way; a ``layer_types`` list is
cut to its shortest prefix that still holds every kind of layer (hybrid models keep an
attention layer); multimodal RoPE sections are rescaled to the small head. Configs the
generic shrink cannot fit (validators that tie fields together, sizes under other names,
fields a checkpoint carries but the config class does not declare) get hand-made values
from ``OVERRIDES``, and the few forwards that need more than token ids (speech models, a
talker fed by embeddings) get their inputs from ``INPUTS``. When the hand-made model does
not build (an override written for another transformers release), the generic shrink alone
and then wider heads are tried (``ATTEMPTS``). A class whose tiny model cannot be built or
run stock (a config validator, a shape the shrink broke, a missing optional package) is
*skipped* with the error; a class that runs stock and differs patched is a *mismatch*.

``check_class`` uninstalls every patch first and afterwards (it patches the classes it
checks), so run it where nothing else relies on ``install()``.
"""

import argparse
import contextlib
import copy
import importlib
import importlib.util
import inspect
import json
import pkgutil
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

from . import _installer, _native, fusion_guard
from ._installer import audit, patch_model, uninstall

__all__ = [
    "ATTEMPTS",
    "BATCH",
    "DECODER",
    "GRAD_FLOOR",
    "GRAD_TOL",
    "INPUTS",
    "LOSS_TOL",
    "OVERRIDES",
    "SEQ",
    "SHRINK",
    "VOCAB",
    "UsageError",
    "batch",
    "check_class",
    "grad_error",
    "import_all_modeling_modules",
    "loss_and_grads",
    "main",
    "patched_classes",
    "read_allowlist",
    "rel_err",
    "sweep_targets",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
    "verify_cache",
]

# ------------------------------------------------------------------ sizes and batch

VOCAB = 160
BATCH, SEQ = 2, 24

#: The tiny decoder sizes every model starts from (and tests/model_cases.py's cases).
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def batch(*, seed=1, num_items_in_batch=None):
    """input_ids, attention_mask (right padding in row 1) and labels with ignored tokens:
    the prompt of row 0 and the padding of row 1."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB - 4, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -5:] = 0
    input_ids[1, -5:] = 0
    labels = input_ids.clone()
    labels[0, :7] = -100
    labels[attention_mask == 0] = -100
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if num_items_in_batch is not None:
        out["num_items_in_batch"] = num_items_in_batch
    return out


def loss_and_grads(model, inputs):
    """The loss, the logits the forward returned, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    return out.loss.detach(), out.logits, grads


def rel_err(got, want):
    """max |got - want| / max |want| (0 when both are 0)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------- the shrink

SHRINK = {
    # decoders
    **DECODER,
    "rotary_dim": 8,
    # mixtures of experts, latent attention
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # linear attention (Gated DeltaNet: Qwen3-Next, Qwen3.5, ...)
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    # per-layer input embeddings (Gemma 3n, Gemma 4)
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    # other spellings of the same sizes (GPT-2 style, encoders, vision towers)
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 32,
    "num_layers": 2,
    "layers": 2,
    "attention_heads": 4,
    "ffn_dim": 64,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "depth": 1,
    "embed_dim": 32,
    "num_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
    "out_hidden_size": 32,
    "vision_output_dim": 32,
    "text_hidden_size": 32,
}


def _without_timm(**fields):
    """An override: the timm vision tower (timm and Pillow are not test dependencies)
    replaced by a tiny CLIP one of the same width carrying the ``fields`` the model reads
    from its vision config; a text-only batch never runs the tower."""

    def fix(kw, config):
        vision = transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            **fields,
        )
        return {**kw, "vision_config": vision}

    return fix


def _mrope(sections, **fields):
    """An override: the default RoPE parameters with these multimodal sections (and
    ``fields``)."""

    def fix(kw, config):
        rope = {**(config.rope_parameters or {}), "mrope_section": list(sections)}
        return {**kw, **fields, "rope_parameters": rope}

    return fix


#: Hand-made values for configs the generic shrink cannot fit, keyed by config class name
#: (applied wherever that config is shrunk, sub-configs included) or by model class name
#: (applied to that class's top config). A dict is merged over the shrunk keyword
#: arguments; a callable takes (keyword arguments, default config) and returns them.
OVERRIDES = {
    # Blt: hash embeddings of 500k rows and the global width under their own names; its
    # cache cannot be built from its config (no cache, as in training)
    # Bamba: the generic shrink leaves mamba_n_heads not dividing mamba_expand * hidden; one
    # attention layer of two, so the Mamba mixer (and its gated norm) runs too
    "BambaConfig": {
        "mamba_n_heads": 4,
        "mamba_d_state": 16,
        "mamba_chunk_size": 8,
        "mamba_d_head": "auto",
        "attn_layer_indices": [1],
    },
    "BltConfig": {"encoder_hash_byte_group_vocab": 64, "use_cache": False},
    "BltLocalEncoderConfig": {"hidden_size_global": 32},
    "BltLocalDecoderConfig": {"hidden_size_global": 32},
    # Cohere Compass: the default has no RoPE parameters for its one layer type
    "CohereCompassTextConfig": {
        "rope_parameters": {
            "full_attention": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
            }
        }
    },
    # DBRX: the attention reads an undeclared rope_theta and clamps by clip_qkv (None
    # fails); layers, heads and expert widths under their own names
    "DbrxAttentionConfig": {"rope_theta": 10000.0, "clip_qkv": 8.0},
    "DbrxFFNConfig": {"ffn_hidden_size": 64},
    "DbrxConfig": {"n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    # DeepSeek-OCR 2: no dense / sparse kinds by default, which the model indexes
    "DeepseekOcr2TextConfig": {"mlp_layer_types": ["dense", "sparse"]},
    # dots3: sliding-window layers get their own attention sizes (swa_* arguments, 64
    # heads of 256 by default), the others' are per-layer fields the shrink cannot read;
    # experts per layer from a hard-coded list of 42 vision layers; adapter widths must
    # match their encoders'
    "Dots3NoteTextConfig": {
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "head_dim": 16,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "swa_q_lora_rank": 16,
        "swa_kv_lora_rank": 16,
        "swa_head_dim": 16,
        "swa_qk_nope_head_dim": 8,
        "swa_v_head_dim": 8,
        "index_topk": 8,
        "index_head_dim": 8,
        "index_n_heads": 2,
        "shared_experts_intermediate_size": 16,
        "sliding_window": 8,
    },
    "Dots3NoteVisionConfig": {
        "pyramid_num_routed": [-1, 4],
        "adapter_in_dim": 32,
        "adapter_out_dim": 32,
    },
    "Dots3NoteAudioConfig": {
        "downsample_hidden_size": 16,
        "adapter_input_size": 32,
        "adapter_out_dim": 32,
    },
    # Emu3: the model requires a vocabulary map (checkpoints carry it); the VQ-VAE's
    # channels (256 x 4) under their own names, group norms of 32 groups
    "Emu3Config": {
        "vocabulary_map": {
            "<image>": VOCAB - 1,
            "<|extra_200|>": VOCAB - 2,
            "<|visual token 000000|>": VOCAB - 3,
        }
    },
    "Emu3VQVAEConfig": {
        "codebook_size": 32,
        "base_channels": 32,
        "channel_multiplier": [1, 1],
        "num_res_blocks": 1,
    },
    # ERNIE 4.5 VL: RoPE in sections of a head of 128 (height + width, then time);
    # expert widths as a per-kind list
    "Ernie4_5_VLMoeTextConfig": _mrope(
        [1, 1, 2],
        moe_intermediate_size=[16, 16],
        moe_num_experts=4,
        moe_k=2,
        moe_num_shared_experts=1,
    ),
    # Falcon-H1: the SSM's width, heads and state under their own names (slow at the
    # defaults)
    "FalconH1Config": {
        "mamba_d_ssm": 64,
        "mamba_n_heads": 4,
        "mamba_d_state": 16,
        "mamba_chunk_size": 8,
    },
    # FastVLM, PerceptionLM: timm vision towers (see _without_timm). Gemma 3n's config
    # accepts only its timm MobileNet: Gemma3nForConditionalGeneration stays skipped.
    "FastVlmConfig": _without_timm(),
    "PerceptionLMConfig": _without_timm(model_args={"embed_dim": 32}),
    # Florence-2: per-stage widths, heads and depths of the DaViT vision tower
    "Florence2VisionConfig": {
        "depths": [1, 1, 1, 1],
        "embed_dim": [8, 16, 16, 32],
        "num_heads": [1, 2, 2, 4],
        "num_groups": [1, 2, 2, 4],
        "window_size": 2,
    },
    # Gemma 3n: the last 15 layers reuse the KV cache of earlier ones (keep 2 of 4, each
    # kind produced before it is reused); intermediate_size is a per-layer list by
    # default; soft-cap 3 so that it matters
    "Gemma3nTextConfig": {
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_hidden_layers": 4,
        "num_kv_shared_layers": 2,
        "intermediate_size": 64,
        "laurel_rank": 8,
        "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
        "final_logit_softcapping": 3.0,
    },
    # GLM-5 Next: validator: the sparse-attention layers have no RoPE part; indexer
    # sizes under their own names
    "Glm5NextTextConfig": {
        "qk_rope_head_dim": 0,
        "index_topk": 8,
        "index_kpool": 2,
        "index_head_dim": 8,
        "index_n_heads": 2,
        "layer_types": ["linear_attention", "indexed_attention"],
        "num_hidden_layers": 2,
        "mlp_layer_types": ["dense", "sparse"],
    },
    # GLM-Image: RoPE sections for a head of 64 in the model's default; the head is
    # vision_vocab_size wide while the loss reshapes by vocab_size (unequal: stock fails)
    "GlmImageTextConfig": _mrope([2, 1, 1], vision_vocab_size=VOCAB),
    # GPT-Neo: the attention kinds are a repeated pattern that must cover num_layers
    "GPTNeoConfig": {"attention_types": [[["global", "local"], 1]], "window_size": 8},
    # Granite 4 Vision: no deepstack map and no downsample rate by default (the model
    # needs both); the Q-Former has one head per 64 vision channels: a tower 64 wide
    "Granite4VisionConfig": lambda kw, config: {
        **kw,
        "deepstack_layer_map": [[0, 0]],
        "spatial_target_layers": [0, 1, 0, 1],
        "downsample_rate": "1/2",
        "vision_config": type(kw["vision_config"])(
            **{**kw["vision_config"].to_dict(), "hidden_size": 64}
        ),
    },
    # Granite MoE Hybrid: validator: mamba_n_heads divides mamba_expand * hidden_size;
    # all-Mamba by default (one mixer and one attention layer here, named as transformers
    # 4.x or 5.x names them); logits scaling 4 so that it matters
    "GraniteMoeHybridConfig": {
        "mamba_n_heads": 4,
        "mamba_d_state": 16,
        "mamba_chunk_size": 8,
        "shared_intermediate_size": 32,
        "layer_types": (
            ["mamba", "attention"]
            if transformers.__version__.startswith("4.")
            else ["linear_attention", "full_attention"]
        ),
        "logits_scaling": 4.0,
    },
    # HunYuanVL: the default has no RoPE sections, which the forward needs
    "HunYuanVLTextConfig": _mrope([1, 1, 1, 1]),
    # Jamba: attention every 8th layer from the 5th (none among 2)
    "JambaConfig": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    # Janus: the image VQ-VAE's channels (128 x 4) and token counts under their own
    # names, group norms of 32 groups
    "JanusVQVAEConfig": {
        "base_channels": 32,
        "channel_multiplier": [1, 1],
        "latent_channels": 8,
        "num_embeddings": 32,
        "num_res_blocks": 1,
        "projection_dim": 32,
        "image_token_embed_dim": 32,
    },
    "JanusVisionConfig": {"num_image_tokens": 16},
    # Kyutai STT: the audio padding id must lie in the text + codebooks embedding; its
    # Mimi codec's transposed convolution has one group per channel of 512
    "KyutaiSpeechToTextConfig": {
        "codebook_vocab_size": 16,
        "num_codebooks": 2,
        "audio_pad_token_id": VOCAB + 2 * 16,
    },
    "MimiConfig": {
        "num_filters": 8,
        "upsample_groups": 32,
        "codebook_size": 16,
        "codebook_dim": 8,
        "vector_quantization_hidden_dimension": 8,
        "sliding_window": 16,
    },
    # LFM2-MoE: no layer kinds by default (the model indexes them); MoE from the 3rd
    "Lfm2MoeConfig": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # LongCat-Flash: expert and dense widths under their own names; 256 zero experts
    "LongcatFlashConfig": {
        "ffn_hidden_size": 64,
        "expert_ffn_hidden_size": 16,
        "zero_expert_num": 2,
        "moe_topk": 2,
    },
    # Mamba2: validator: hidden_size * expand == num_heads * head_dim; a 128-wide state
    "Mamba2Config": {"head_dim": 16, "state_size": 16, "n_groups": 2, "chunk_size": 8},
    # Molmo2: vision_feature_layer indexes the 25 layers of the default vision tower
    "Molmo2AdapterConfig": {"vision_feature_layer": [-1, -2], "text_hidden_size": 32},
    # Muse Glimmer / Spark: projector and expert widths under their own names; the
    # audio encoder has one patch size, width and depth per stage, four hard-coded
    "MuseGlimmerConfig": {"projector_hidden_size": 32},
    "MuseSparkConfig": {"projector_hidden_size": 32},
    "MuseSparkTextConfig": {"moe_hidden_size": 16},
    "MuseSparkAudioConfig": {
        "num_hidden_layers": 2,
        "patch_sizes": [4, 2],
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
    },
    # Nemotron-H (and Nemotron 3.5 Transcribe's text model): Mamba heads of 128 x 64 and
    # a 128-wide state under their own names; the diarization head's input width must
    # match its encoder; the word-timestamp blank is the last of 23863 classes
    "NemotronHConfig": {
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "n_groups": 2,
        "chunk_size": 8,
        "moe_shared_expert_intermediate_size": 16,
    },
    "Nemotron3DiarizationHeadConfig": {"audio_hidden_size": 32, "hidden_size": 16},
    "Nemotron3_5TranscribeWordTimestampConfig": {"blank_token_id": VOCAB - 1},
    # PaddleOCR-VL: RoPE sections for a head of 128 in the model's default
    "PaddleOCRTextConfig": _mrope([2, 1, 1]),
    # Qwen2.5-Omni / Qwen3-Omni: the forwards read fields the configs do not declare
    # (checkpoints carry them; the talker's loss reads vocab_size); RoPE sections for a
    # head of 128 in the model's default; audio encoder widths under their own names
    "Qwen2_5OmniThinkerConfig": {"vision_start_token_id": 151652},
    "Qwen2_5OmniTextConfig": _mrope([2, 1, 1]),
    "Qwen2_5OmniAudioEncoderConfig": {"output_dim": 32},
    "Qwen3OmniMoeThinkerConfig": {"vision_start_token_id": 151652},
    "Qwen3OmniMoeAudioEncoderConfig": {"downsample_hidden_size": 16, "output_dim": 32},
    "Qwen3OmniMoeTalkerConfig": {"spatial_merge_size": 2, "vocab_size": VOCAB},
    "Qwen3OmniMoeTalkerTextConfig": {"shared_expert_intermediate_size": 16},
    # Qwen4-Exp: the QSA indexer has no sizes by default, which its sparse-attention
    # layers need; n-gram vocabulary (20M) and hyper-connection rank under own names
    "Qwen4ExpTextConfig": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
        "ngram_vocab_size_base": 64,
        "hc_lowrank": 8,
    },
    # RecurrentGemma: attention every 3rd block (none among 2); soft-cap 3 so that it
    # matters
    "RecurrentGemmaConfig": {
        "block_types": ["recurrent", "attention"],
        "attention_window_size": 16,
        "logits_soft_cap": 3.0,
    },
    # Step3p7: the model always builds a sliding-window mask, which needs a window
    "Step3p7TextConfig": {
        "sliding_window": 16,
        "layer_types": ["full_attention", "sliding_attention"],
        "mlp_layer_types": ["dense", "sparse"],
    },
    # VibeVoice: the audio tokenizers' widths double per stage over six hard-coded ones
    **{
        name: {
            "num_filters": 4,
            "downsampling_ratios": [2, 2],
            "depths": [1, 1, 1],
            "ffn_expansion": 2,
        }
        for name in (
            "VibeVoiceAcousticTokenizerConfig",
            "VibeVoiceAcousticTokenizerEncoderConfig",
            "VibeVoiceAcousticTokenizerDecoderConfig",
        )
    },
    # Zamba: the hybrid layers' shared transformer is tied across them: two are needed
    "ZambaConfig": {
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
        "num_hidden_layers": 3,
    },
    # Zamba2: SSM state, chunk and adapter rank under their own names (slow at defaults)
    "Zamba2Config": {"mamba_d_state": 16, "chunk_size": 8, "adapter_rank": 8},
    # Zaya: validator: top-1 routing only
    "ZayaConfig": {"num_experts_per_tok": 1, "router_hidden_size": 16},
}


def _kyutai_inputs(model, inputs):
    """Each position holds a text token and one token per audio codebook."""
    config = model.config
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(
        0,
        config.codebook_vocab_size - 1,
        (BATCH, SEQ, config.num_codebooks),
        generator=g,
    )
    ids = inputs["input_ids"]
    return {
        **inputs,
        "input_ids": torch.cat([ids[..., None], codes.to(ids.device)], -1),
    }


def _randn(inputs, length, width):
    """Seeded normal features (BATCH, length, width), on the device of ``inputs``."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, length, width, generator=g)
    return x.to(inputs["input_ids"].device)


def _embeds_inputs(width):
    """Inputs embeddings instead of token ids, of the width ``width(config)``."""

    def adapt(model, inputs):
        out = {k: v for k, v in inputs.items() if k != "input_ids"}
        return {**out, "inputs_embeds": _randn(inputs, SEQ, width(model.config))}

    return adapt


#: Inputs for classes whose forward needs more than token ids, keyed by model class name:
#: a function (model, the batch) -> the inputs.
INPUTS = {
    # a speech model: text and audio codebook tokens at every position
    "KyutaiSpeechToTextForConditionalGeneration": _kyutai_inputs,
    # the talker reads the thinker's hidden states, never token ids
    "Qwen3OmniMoeTalkerForConditionalGeneration": _embeds_inputs(
        lambda config: config.text_config.hidden_size
    ),
    # a streaming speech model: one audio frame (after the encoder) per token
    "VoxtralRealtimeForConditionalGeneration": lambda model, inputs: {
        **inputs,
        "encoder_inputs_embeds": _randn(
            inputs,
            SEQ * model.config.downsample_factor,
            model.config.audio_config.hidden_size,
        ),
    },
    # training needs the multimodal token types (all text here)
    "Molmo2ForConditionalGeneration": lambda model, inputs: {
        **inputs,
        "mm_token_type_ids": torch.zeros_like(inputs["input_ids"]),
    },
}

#: A tiny model larger than this was not shrunk (fields under other names): skipped.
MAX_PARAMS = 8_000_000
#: Address space one class may add. A shrink that misses a size field can leave a huge
#: buffer (transformers 4.57's FalconH1 asked for 17 GB at once in its naive Mamba path):
#: under the cap the allocation fails with a Python error and the class is skipped.
MEMORY_CAP_BYTES = 8 << 30
#: The seed before each forward: dropout and router noise draw the same in both runs.
FORWARD_SEED = 5
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
#: Gradient errors are relative to max(the parameter's largest entry, this share of the
#: largest entry of any parameter). Some gradients are zero in exact arithmetic (attention
#: key biases, router weights behind a top-k) and float32 noise of 1e-11 in both runs; the
#: error of noise relative to itself means nothing, relative to the model's scale it is 0.
GRAD_FLOOR = 1e-3
#: The float64 arbiter (``_float64_arbiter``): how much farther from float64 than stock's
#: float32 run a fused patch's float32 loss and gradients may be.
ARBITER_SLACK = 2.0

#: (sizes over SHRINK, hand-made) tried in turn until the tiny model builds and runs stock:
#: the hand-made values (OVERRIDES, multimodal RoPE sections fitted to the small head), then
#: the generic shrink alone (an override written for one transformers release may not fit
#: another's config), then wider heads, for rotary layouts written for real head sizes.
ATTEMPTS = (
    ({}, True),
    ({}, False),
    ({"hidden_size": 256, "head_dim": 64}, False),
    ({"hidden_size": 512, "head_dim": 128}, False),
)

_UNREADABLE = object()


def _read(config, field):
    """``config.field``, None when unset. Per-layer fields of some configs (Gemma 4)
    refuse a global read: those are _UNREADABLE, and left alone."""
    try:
        return getattr(config, field, None)
    except Exception:  # noqa: BLE001
        return _UNREADABLE


def _takes(config, field, value):
    """The config's default for ``field`` is a plain number (or unset), so ``value`` fits."""
    default = _read(config, field)
    if default is None:
        return True
    return (
        not isinstance(default, bool)
        and isinstance(default, (int, float))
        and isinstance(value, (int, float))
    )


def _half_head(kw, config):
    """Half the head size the shrunk config will have (None when unknown)."""
    head_dim = kw.get("head_dim")
    if head_dim is None:
        hidden = kw.get("hidden_size", _read(config, "hidden_size"))
        heads = kw.get("num_attention_heads", _read(config, "num_attention_heads"))
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            head_dim = hidden // heads
    return head_dim // 2 if isinstance(head_dim, int) else None


def _fit_mrope(rope, half):
    """``rope_parameters`` (per layer type too) with each multimodal RoPE section list
    rescaled to sum to ``half`` the head size, as the real ones do for the real head."""
    out = {}
    for key, value in rope.items():
        if isinstance(value, dict):
            value = _fit_mrope(value, half)
        elif (
            key == "mrope_section"
            and half
            and isinstance(value, (list, tuple))
            and 0 < len(value) <= half
            and all(isinstance(v, int) and v > 0 for v in value)
            and sum(value) != half
        ):
            total = sum(value)
            value = [max(1, v * half // total) for v in value]
            while sum(value) > half:
                value[value.index(max(value))] -= 1
            while sum(value) < half:
                value[value.index(min(value))] += 1
        out[key] = copy.deepcopy(value)
    return out


def _override(kw, config, key):
    fix = OVERRIDES.get(key)
    if fix is None:
        return kw
    if callable(fix):
        return fix(kw, config)
    return {**kw, **fix}


def tiny_config(config, wider=None, model_name=None, hand_made=True):
    """A new config of the same class, shrunk (see the module docstring); ``wider``
    overrides entries of SHRINK; ``hand_made``: with OVERRIDES (``model_name`` picks the
    model class's own entry) and the RoPE sections fitted."""
    cls = type(config)
    params = inspect.signature(cls.__init__).parameters
    shrink = {**SHRINK, **(wider or {})}
    kw = {k: v for k, v in shrink.items() if k in params and _takes(config, k, v)}
    if "kv_lora_rank" in kw:  # latent attention has as many key/value heads as queries
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    types = _read(config, "layer_types")
    # some configs keep the list under another name (Zamba: ``layers_block_type``)
    field = getattr(cls, "attribute_map", {}).get("layer_types", "layer_types")
    if field in params and isinstance(types, (list, tuple)) and types:
        every = set(types)
        n = max(2, next(i for i in range(1, len(types) + 1) if set(types[:i]) == every))
        kw[field] = list(types[:n])
        for k in ("num_hidden_layers", "num_layers"):
            if k in params:
                kw[k] = n
    rope = _read(config, "rope_parameters")
    if hand_made and "rope_parameters" in params and isinstance(rope, dict):
        fitted = _fit_mrope(rope, _half_head(kw, config))
        if fitted != rope:
            kw["rope_parameters"] = fitted
    for name in params:
        sub = _read(config, name)
        if isinstance(sub, transformers.PretrainedConfig):
            kw[name] = tiny_config(sub, wider, hand_made=hand_made)
    if hand_made:
        kw = _override(kw, config, cls.__name__)
        if model_name is not None:
            kw = _override(kw, config, model_name)
    return cls(**kw)


def _count_params(cls, config):
    """Parameters of the model, counted on the meta device (no memory, no init), so an
    unshrunk model of a billion parameters is never built; 0 when meta cannot build it
    (the real build then decides)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in cls(config).parameters())
    except Exception:  # noqa: BLE001
        return 0


@contextlib.contextmanager
def _nan_for_uninitialized():
    """While a model is built, memory torch leaves uninitialized (``torch.empty``) is NaN
    (torch's deterministic mode), so a parameter the model's own init never sets is found
    instead of holding whatever the allocator had (run-to-run garbage, at times inf)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _init_uninitialized(model):
    """Seeded normal values (std 0.02) for the parameters the model's init left unset
    (NaN under _nan_for_uninitialized); returns their names."""
    g = torch.Generator().manual_seed(2)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
                names.append(name)
    return names


class _Skip(Exception):
    """The class's tiny model cannot be built or run stock; args[0] says why."""


def _one_line(exc):
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:140]}"


def _run(model, inputs):
    torch.manual_seed(FORWARD_SEED)
    return loss_and_grads(model, copy.copy(inputs))


def _build_and_run_stock(cls, inputs, device, info):
    """The first tiny model of ``cls`` that builds and runs stock, with its inputs (INPUTS)
    and the stock loss and gradients; ``info`` gets ``params``. Raises _Skip with the
    first failure."""
    first_failure = None  # what the report shows when no attempt builds
    for wider, hand_made in ATTEMPTS:
        info.pop("uninitialized", None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = tiny_config(
                    cls.config_class(), wider, cls.__name__, hand_made=hand_made
                )
                info["params"] = _count_params(cls, config)
                if info["params"] > MAX_PARAMS:  # wider attempts would only be larger
                    raise _Skip(
                        first_failure or f"not shrunk ({info['params']} parameters)"
                    )
                torch.manual_seed(0)
                with _nan_for_uninitialized():
                    model = cls(config).float()
                uninitialized = _init_uninitialized(model)
                if uninitialized:
                    info["uninitialized"] = uninitialized
                model = model.to(device).train()
                adapt = INPUTS.get(cls.__name__)
                run_inputs = inputs if adapt is None else adapt(model, inputs)
                stock_loss, _, stock_grads = _run(model, run_inputs)
            return model, run_inputs, stock_loss, stock_grads
        except _Skip:
            raise
        except Exception as exc:  # noqa: BLE001  (any failure of the stock model is a skip)
            first_failure = first_failure or _one_line(exc)
    raise _Skip(first_failure)


def tiny_model(cls, device="cpu"):
    """A tiny random model of ``cls`` (float32, train mode, on ``device``) whose stock
    forward runs on ``tiny_inputs(model)``. Raises RuntimeError saying why when there is
    none."""
    inputs = {k: v.to(device) for k, v in batch().items()}
    try:
        model, _, _, _ = _build_and_run_stock(cls, inputs, device, {})
    except _Skip as skip:
        raise RuntimeError(f"{cls.__qualname__}: {skip.args[0]}") from None
    model.zero_grad(set_to_none=True)
    return model


def tiny_inputs(model):
    """The batch ``check_class`` runs ``model`` on (``batch()``, adapted by INPUTS), on
    the model's device."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch().items()}
    adapt = INPUTS.get(type(model).__name__)
    return adapt(model, inputs) if adapt is not None else inputs


# ---------------------------------------------------------------- the comparison


def grad_error(grads, stock):
    """(worst error, its parameter) with the GRAD_FLOOR scale."""
    top = max((g.abs().max().item() for g in stock.values()), default=0.0)
    worst, name = 0.0, None
    for k, want in stock.items():
        if k not in grads:
            continue
        diff = (grads[k].double() - want.double()).abs().max().item()
        err = diff / max(want.abs().max().item(), GRAD_FLOOR * top, 1e-30)
        if err > worst:
            worst, name = err, k
    return worst, name


@contextlib.contextmanager
def memory_cap(extra_bytes):
    """Caps the process's address space at its present size plus ``extra_bytes`` (Linux;
    elsewhere no cap), restoring the limit afterwards."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        vm_kb = int(
            next(
                line for line in status.splitlines() if line.startswith("VmSize:")
            ).split()[1]
        )
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration):
        yield
        return
    cap = vm_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _resolve(target):
    """A class, or (module, qualname) of one (the module is imported)."""
    if isinstance(target, type):
        return target
    module, qualname = target
    value = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def check_class(target, device="cpu", *, cache_dir=None):
    """Stock vs patched for one class (a class, or ``(module, qualname)``), on ``device``
    (float32). The patch is the in-process rewrite (``cache_dir=None``: what ``install()``
    runs without a cache) or the one from the compiled cache ``cache_dir`` (what
    ``install(cache_dir=...)`` runs; a class that cache has no patch for is skipped).

    Returns a dict: ``module``, ``qualname``, ``status`` ("verified", "mismatch" or
    "skipped"), ``reason`` (why skipped / what differs; "" when verified), ``params``,
    ``seconds``, once both forwards ran ``loss_err``, ``grad_err`` and ``worst_param``,
    and ``uninitialized``: the parameters the model's own init left unset (a checkpoint
    fills them), given seeded values here. A patch the installer would not put in place is skipped when it
    refuses it (``needs-class-body``, ...) and a mismatch when it fails
    (``emit-invalid``: the patch does not compile)."""
    if isinstance(target, type):
        out = {"module": target.__module__, "qualname": target.__qualname__}
    else:
        out = {"module": target[0], "qualname": target[1]}
    try:
        cls = _resolve(target)
    except Exception as exc:  # noqa: BLE001  (a missing optional dependency)
        return {**out, "status": "skipped", "reason": _one_line(exc)}
    # CUDA reserves its address space up front: no cap there (the GPU's memory bounds)
    on_cpu = torch.device(device).type == "cpu"
    saved_cache = _installer._state.cache
    start = time.perf_counter()
    try:
        with memory_cap(MEMORY_CAP_BYTES) if on_cpu else contextlib.nullcontext():
            out.update(_check_class(cls, device, cache_dir))
        out["seconds"] = round(time.perf_counter() - start, 2)
        return out
    finally:
        uninstall()
        _installer._state.cache = saved_cache


def _cache_miss(cls, cache_dir):
    """Why the compiled cache in ``cache_dir`` has no patch for the forward ``cls`` runs
    (None when it has one)."""
    cache = _installer._CompiledCache.load(Path(cache_dir))
    if cache.root is None:
        return f"{cache_dir} is not a compiled cache this runtime uses"
    _, forward = _installer._forward_owner(cls)
    sha = _native.rewrite_forward_sha256(inspect.getsource(inspect.unwrap(forward)))
    if cache.lookup(sha, cls) is None:
        return f"the cache has no patch for the running forward (sha256 {sha})"
    return None


def _check_class(cls, device, cache_dir):
    out = {}
    uninstall()
    if cache_dir is not None:
        miss = _cache_miss(cls, cache_dir)
        if miss is not None:
            return {"status": "skipped", "reason": miss}
    inputs = {k: v.to(device) for k, v in batch().items()}
    try:
        model, inputs, stock_loss, stock_grads = _build_and_run_stock(
            cls, inputs, device, out
        )
    except _Skip as skip:
        return {**out, "status": "skipped", "reason": skip.args[0]}
    if cache_dir is None:
        # the in-process rewrite, never a cache found in the environment
        _installer._state.cache = _installer._CompiledCache()
        patch_model(model)
    else:
        patch_model(model, cache_dir=cache_dir)
    record = next(
        (
            c
            for c in audit()["classes"]
            if (c["module"], c["qualname"]) == (cls.__module__, cls.__qualname__)
        ),
        None,
    )
    fusions = _installed_sites(record)
    if (
        record is not None
        and fusions
        and not record["installed"]
        and record["verdict"] != "failed"
        and cache_dir is None
    ):
        # the fused loss is refused, the decoder fusions are in place: compare those
        fused_loss = False
    elif record is None or not record["installed"]:
        why = "not a class the installer patches"
        if record is not None:
            why = f"{record['verdict']} ({record['reason']}): {record['detail']}"
        # a patch the installer refuses never runs; one that fails is a bug
        failed = record is not None and record["verdict"] == "failed"
        status = "mismatch" if failed else "skipped"
        return {
            **out,
            "status": status,
            "reason": f"the patch was not installed: {why}",
        }
    else:
        fused_loss = True
    if fused_loss and cache_dir is not None and record["origin"] != "cache":
        return {**out, "status": "skipped", "reason": "the cache's patch was not used"}
    out["fusion_sites"] = fusions
    taken = dict(fusion_guard.taken)
    try:
        loss, logits, grads = _run(model, inputs)
    except Exception as exc:  # noqa: BLE001  (the stock model ran: this is ours)
        return {**out, "status": "mismatch", "reason": f"patched raised {exc!r}"}
    out["fusions_taken"] = {
        name: fusion_guard.taken[name] - taken.get(name, 0)
        for name in fusion_guard.taken
    }
    out["loss_err"] = rel_err(loss, stock_loss)
    out["grad_err"], out["worst_param"] = grad_error(grads, stock_grads)
    problems = []
    if fused_loss and logits is not None:
        problems.append("the fused path was not taken")
    if set(grads) != set(stock_grads):
        problems.append(
            f"gradients differ in kind: {sorted(set(grads) ^ set(stock_grads))}"
        )
    tolerance = []
    if not out["loss_err"] <= LOSS_TOL:
        tolerance.append(f"loss error {out['loss_err']:.1e}")
    if not out["grad_err"] <= GRAD_TOL:
        tolerance.append(f"gradient error {out['grad_err']:.1e} ({out['worst_param']})")
    if tolerance and not problems and fusions:
        arbiter = _float64_arbiter(
            model, inputs, (loss, grads), (stock_loss, stock_grads)
        )
        out["arbiter"] = arbiter
        if arbiter["patched_closer"]:
            tolerance = []
    problems += tolerance
    return {
        **out,
        "status": "mismatch" if problems else "verified",
        "reason": "; ".join(problems),
    }


def _float64_arbiter(model, inputs, patched, stock):
    """When a patch with decoder fusions differs from stock by more than the tolerance, the
    stock forward in float64 decides: rounding noise that a tiny model amplifies (both
    float32 runs are then about as far from float64) is not a wrong patch. The patch passes
    when its loss and every gradient are at most ``ARBITER_SLACK`` times as far from float64
    as stock's float32 run is (or within the tolerance of it), parameter by parameter."""
    uninstall()
    try:
        reference = copy.deepcopy(model).double()
        inputs64 = {
            k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()
        }
        loss64, _, grads64 = _run(reference, inputs64)
    except Exception as exc:  # noqa: BLE001  (no float64 reference: keep the mismatch)
        return {"patched_closer": False, "reason": _one_line(exc)}
    (loss, grads), (stock_loss, stock_grads) = patched, stock
    worst = 0.0
    closer = rel_err(loss, loss64) <= max(
        LOSS_TOL, ARBITER_SLACK * rel_err(stock_loss, loss64)
    )
    top = max((g.abs().max().item() for g in grads64.values()), default=0.0)
    for name, want in grads64.items():
        if name not in grads or name not in stock_grads:
            continue
        scale = max(want.abs().max().item(), GRAD_FLOOR * top, 1e-30)
        mine = (grads[name].double() - want).abs().max().item() / scale
        theirs = (stock_grads[name].double() - want).abs().max().item() / scale
        worst = max(worst, mine / max(theirs, 1e-30))
        closer = closer and mine <= max(GRAD_TOL, ARBITER_SLACK * theirs)
    return {"patched_closer": closer, "worst_ratio": round(worst, 3)}


def _installed_sites(record):
    """``pass:site`` of every decoder-fusion site the installer put in place for a class."""
    if record is None:
        return []
    return [
        f"{name}:{site['name']}"
        for name, report in (record.get("passes") or {}).items()
        for site in report.get("sites", [])
        if site.get("installed")
    ]


# ---------------------------------------------------------- the installed transformers


def import_all_modeling_modules():
    """Imports every module the installer targets (its own module pattern); returns those
    that failed (optional dependencies)."""
    root = Path(transformers.__file__).parent
    failed = []
    for model in pkgutil.iter_modules(transformers.models.__path__):
        for info in pkgutil.iter_modules([str(root / "models" / model.name)]):
            name = f"transformers.models.{model.name}.{info.name}"
            if not _installer._MODELING_MODULE.match(name):
                continue
            try:
                importlib.import_module(name)
            except ImportError as exc:
                failed.append(f"{name}: {exc}")
    return failed


def patched_classes():
    """(module, qualname) of every class ``install()`` patches in the installed
    transformers (its fused loss, or only decoder-fusion sites it reaches), in audit
    order."""
    targets = sweep_targets()
    return targets["fused_loss"] + targets["fusion_only"]


def sweep_targets():
    """``patched_classes()`` split: ``fused_loss`` (the class's forward is patched; its
    decoder fusions run too) and ``fusion_only`` (the fused loss is refused, decoder-fusion
    sites it reaches are patched)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_all_modeling_modules()
    _installer.install()
    try:
        classes = audit()["classes"]
        return {
            "fused_loss": [
                (c["module"], c["qualname"])
                for c in classes
                if c["verdict"] == "patched"
            ],
            "fusion_only": [
                (c["module"], c["qualname"])
                for c in classes
                if c["verdict"] != "patched" and _installed_sites(c)
            ],
        }
    finally:
        uninstall()


# ------------------------------------------------------------ the compiled cache's check


class UsageError(Exception):
    """An argument ``verify_cache`` or the command line cannot use (exit status 2)."""


def read_allowlist(cache_dir):
    """``DIR/allowlist.json`` of a compiled cache this runtime uses (schema, tool version);
    raises UsageError saying why not."""
    root = Path(cache_dir)
    path = root / "allowlist.json"
    if not root.is_dir():
        raise UsageError(f"--cache {cache_dir}: not a directory")
    try:
        allowlist = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--cache {cache_dir}: cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"--cache {cache_dir}: {path} is not JSON: {exc}") from None
    if not isinstance(allowlist, dict) or not isinstance(
        allowlist.get("entries"), list
    ):
        raise UsageError(f"--cache {cache_dir}: {path} has no entries list")
    if allowlist.get("schema") != _installer._ALLOWLIST_SCHEMA:
        raise UsageError(
            f"--cache {cache_dir}: allowlist schema {allowlist.get('schema')!r}, "
            f"this runtime reads {_installer._ALLOWLIST_SCHEMA}"
        )
    if allowlist.get("tool_version") != _native.__version__:
        raise UsageError(
            f"--cache {cache_dir}: built by forward-rewrite "
            f"{allowlist.get('tool_version')}, this runtime is {_native.__version__} "
            "(install() would not use it)"
        )
    keys = ("forward_sha256", "qualname", "module", "forward_module", "patch")
    for index, entry in enumerate(allowlist["entries"]):
        if not isinstance(entry, dict) or any(
            not isinstance(entry.get(k), str) for k in keys
        ):
            raise UsageError(
                f"--cache {cache_dir}: entry {index} of {path} lacks one of {keys}"
            )
    return allowlist


def _import_entry(entry):
    """The module of an allowlist entry: imported by name, else (remote code, a loose
    file) from its ``source_path`` when the entry has one."""
    name = entry["module"]
    try:
        return importlib.import_module(name)
    except ImportError:
        path = entry.get("source_path")
        if not path or not Path(path).is_file():
            raise
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _check_entry(entry, cache_dir, device):
    try:
        module = _import_entry(entry)
        cls = module
        for part in entry["qualname"].split("."):
            cls = getattr(cls, part)
    except Exception as exc:  # noqa: BLE001  (a missing optional dependency, a bad entry)
        return {"status": "skipped", "reason": f"cannot import: {_one_line(exc)}"}
    if not isinstance(cls, type):
        return {"status": "skipped", "reason": f"{entry['qualname']} is not a class"}
    return check_class(cls, device, cache_dir=cache_dir)


def verify_cache(cache_dir, device="cpu", progress=None):
    """Checks every entry of the compiled cache in ``cache_dir`` with that cache's patch.

    Returns one dict per allowlist entry, in its order: ``module``, ``qualname``,
    ``forward_sha256`` (the entry's), ``verified`` (status is "verified"), ``status``,
    ``reason``, ``loss_err``, ``grad_err`` (None when the forwards did not both run),
    ``worst_param``, ``seconds``, and ``uninitialized`` when the model's init left
    parameters unset (see check_class). ``progress(index, total, result)`` is called after each.
    Raises UsageError when the cache cannot be used."""
    allowlist = read_allowlist(cache_dir)
    entries = allowlist["entries"]
    results = []
    for index, entry in enumerate(entries, 1):
        start = time.perf_counter()
        r = _check_entry(entry, cache_dir, device)
        result = {
            "module": entry["module"],
            "qualname": entry["qualname"],
            "forward_sha256": entry["forward_sha256"],
            "verified": r["status"] == "verified",
            "status": r["status"],
            "reason": r["reason"],
            "loss_err": r.get("loss_err"),
            "grad_err": r.get("grad_err"),
            "worst_param": r.get("worst_param"),
            "seconds": r.get("seconds", round(time.perf_counter() - start, 2)),
        }
        if r.get("uninitialized"):
            result["uninitialized"] = r["uninitialized"]
        results.append(result)
        if progress is not None:
            progress(index, len(entries), result)
    return results


def _print_progress(index, total, r):
    errs = ""
    if r["loss_err"] is not None:
        errs = f" (loss {r['loss_err']:.1e}, grad {r['grad_err']:.1e})"
    reason = f": {r['reason']}" if r["reason"] else ""
    print(
        f"[{index}/{total}] {r['status']} {r['module']}.{r['qualname']}{errs} "
        f"{r['seconds']:.1f} s{reason}",
        file=sys.stderr,
        flush=True,
    )


def main(argv=None):
    """``python -m forward_rewrite.verify --cache DIR [--device cpu|cuda] [--out FILE]``.
    Exit status 0 when the check ran (mismatches are results), 2 for unusable arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m forward_rewrite.verify",
        description="Check every patch of a compiled cache (forward-rewrite build --out "
        "DIR) against the stock forward on a tiny random model of its class; write one "
        "JSON result per allowlist entry.",
    )
    parser.add_argument(
        "--cache", required=True, metavar="DIR", help="the compiled cache to verify"
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where models run"
    )
    parser.add_argument(
        "--out", metavar="FILE", help="write the JSON results here (default: stdout)"
    )
    args = parser.parse_args(argv)
    try:
        read_allowlist(args.cache)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device")
        if args.out is not None:
            parent = Path(args.out).resolve().parent
            if not parent.is_dir():
                raise UsageError(f"--out {args.out}: no directory {parent}")
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    results = verify_cache(args.cache, args.device, progress=_print_progress)
    text = json.dumps(results, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            parser.exit(2, f"{parser.prog}: error: --out {args.out}: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
