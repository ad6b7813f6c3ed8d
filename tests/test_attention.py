"""forward_rewrite.attention: canonical names, computed capabilities, and the table checked
against the installed transformers (issue 9, item 1)."""

import dataclasses
import json
from importlib import resources

import pytest
import torch
import transformers
from forward_rewrite import attention
from transformers import masking_utils, modeling_flash_attention_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TABLE = json.loads(
    resources.files("forward_rewrite")
    .joinpath("attention_backends.json")
    .read_text(encoding="utf-8")
)
CANONICAL = list(TABLE["backends"])


@pytest.fixture(autouse=True)
def no_registrations():
    yield
    for name in list(attention._registered):
        attention.unregister(name)


# ------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", CANONICAL)
def test_canonical_names_pass(name):
    assert attention.canonical(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "kernels-community/flash-attn3",
        "kernels-community/vllm-flash-attn3@v1",
        "me/my-kernel:attend",
        "me/my-kernel@main:attend",
    ],
)
def test_hub_kernels_pass_through(name):
    assert attention.canonical(name) == name


@pytest.mark.parametrize("short, canonical", sorted(TABLE["aliases"].items()))
def test_short_forms_are_rejected_naming_the_canonical_name(short, canonical):
    with pytest.raises(ValueError, match=f"use '{canonical}'"):
        attention.canonical(short)


def test_the_short_forms_of_the_issue_are_rejected():
    for short in ("flash", "fa2", "fa3", "sdp", "flex"):
        with pytest.raises(ValueError, match="use '"):
            attention.canonical(short)


def test_a_legacy_switch_is_not_a_backend():
    with pytest.raises(ValueError, match="legacy switch.*'flash_attention_2'"):
        attention.canonical("use_flash_attention_2")


def test_unknown_names_raise_listing_the_valid_ones():
    with pytest.raises(ValueError) as info:
        attention.canonical("flash_attention_9")
    for name in CANONICAL:
        assert name in str(info.value)
    with pytest.raises(TypeError):
        attention.canonical(None)
    with pytest.raises(ValueError, match="paged\\|eager"):
        attention.canonical("paged|me/kernel")


# ------------------------------------------------------------------ capabilities


@pytest.mark.parametrize("name", CANONICAL)
def test_capabilities_are_computed_from_the_table(name):
    caps = attention.capabilities(name)
    entry = TABLE["backends"][name]
    assert {k: getattr(caps, k) for k in entry} == entry
    assert (caps.name, caps.origin) == (name, "table")


def test_capabilities_are_frozen():
    caps = attention.capabilities("sdpa")
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.supports_packing = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.packing_path = "varlen"
    assert attention.capabilities("sdpa") == caps
    assert not hasattr(attention, "set_capabilities")


def test_the_packing_path_follows_from_the_capabilities():
    expect = {
        "eager": "mask",
        "sdpa": "mask",
        "flex_attention": "mask",
        "flash_attention_2": "varlen",
        "flash_attention_3": "varlen",
        "flash_attention_4": "varlen",
        "paged|eager": None,
    }
    assert {n: attention.capabilities(n).packing_path for n in CANONICAL} == expect


def test_unknown_hub_kernels_get_the_conservative_answers():
    caps = attention.capabilities("me/my-kernel@v2")
    assert caps.origin == "hub_kernel"
    assert not caps.supports_packing and caps.packing_path is None
    assert caps.needs_dtype_cast
    assert {k: getattr(caps, k) for k in TABLE["hub_kernel"]} == TABLE["hub_kernel"]


def test_the_hub_kernels_transformers_loads_for_flash_backends_are_known():
    """transformers replaces flash_attention_N by a hub kernel when flash_attn is not
    installed (FLASH_ATTN_KERNEL_FALLBACK); such a model must not lose packing."""
    for (
        backend,
        kernel,
    ) in modeling_flash_attention_utils.FLASH_ATTN_KERNEL_FALLBACK.items():
        assert TABLE["known_hub_kernels"].get(kernel) is not None, kernel
        caps = attention.capabilities(kernel + "@v1")
        assert caps.origin == "known_hub_kernel" and caps.packing_path == "varlen"
        if backend.startswith("flash_attention_"):
            assert caps.takes_varlen_kwargs
    # a kernel's own function is another contract: conservative
    assert not attention.capabilities(
        "kernels-community/flash-attn2:other"
    ).supports_packing


# ------------------------------------------------ the table against transformers 5.x


def test_every_canonical_name_is_one_transformers_dispatches():
    for name in CANONICAL:
        if name == "eager":  # each model's own eager_attention_forward
            continue
        assert name in ALL_ATTENTION_FUNCTIONS._global_mapping, name


def test_mask_kinds_match_transformers_mask_functions():
    masks = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    expect = {
        "dense": {masking_utils.sdpa_mask, masking_utils.eager_mask},
        "block": {masking_utils.flex_attention_mask},
        "varlen": {masking_utils.flash_attention_mask},
    }
    for name in CANONICAL:
        kind = TABLE["backends"][name]["mask"]
        if kind in expect:
            assert masks[name] in expect[kind], name
        else:
            assert name not in masks, name


def test_sdpa_has_no_softcap_as_transformers_says():
    q = torch.zeros(1, 1, 2, 4)
    module = torch.nn.Module()
    module.is_causal = True
    with pytest.raises(ValueError, match="softcap"):
        sdpa_attention_forward(module, q, q, q, None, softcap=1.0)
    assert not attention.capabilities("sdpa").softcap


def test_the_paged_prefix_is_only_paged_eager():
    """transformers 5 strips (with a FutureWarning) every paged| prefix but paged|eager."""
    paged = [
        n for n in ALL_ATTENTION_FUNCTIONS._global_mapping if n.startswith("paged|")
    ]
    assert paged == ["paged|eager"]
    assert [n for n in CANONICAL if n.startswith("paged|")] == paged


def test_the_table_is_shipped_in_the_package():
    assert (
        resources.files("forward_rewrite").joinpath("attention_backends.json").is_file()
    )


# ------------------------------------------------------------- register, of_model


def test_register_declares_a_backend_of_ones_own():
    caps = attention.register(
        "my_varlen", like="flash_attention_2", needs_dtype_cast=False
    )
    assert attention.canonical("my_varlen") == "my_varlen"
    assert attention.capabilities("my_varlen") is caps
    assert (caps.origin, caps.packing_path, caps.needs_dtype_cast) == (
        "registered",
        "varlen",
        False,
    )
    attention.unregister("my_varlen")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.capabilities("my_varlen")


def test_register_cannot_redefine_the_table_or_set_unknown_keys():
    with pytest.raises(ValueError, match="canonical"):
        attention.register("sdpa", supports_packing=False)
    with pytest.raises(ValueError, match="short form"):
        attention.register("fa2", like="flash_attention_2")
    with pytest.raises(TypeError, match="unknown capabilities"):
        attention.register("mine", packs=True)
    with pytest.raises(ValueError, match="supports_packing needs"):
        attention.register("mine", supports_packing=True)  # no varlen, no mask


def tiny_llama(**kw):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return transformers.LlamaForCausalLM._from_config(config, **kw)


def test_of_model_reads_the_resolved_backend():
    assert attention.of_model(tiny_llama(attn_implementation="eager")) == "eager"
    model = tiny_llama(attn_implementation="sdpa")
    assert attention.of_model(model) == "sdpa"
    assert attention.of_model(model.config) == "sdpa"


def test_of_model_reads_the_text_config_of_a_composite_model():
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(num_hidden_layers=1),
        vision_config=transformers.CLIPVisionConfig(num_hidden_layers=1),
    )
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "sdpa"
    assert attention.of_model(config) == "eager"
