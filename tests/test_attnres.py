"""forward_rewrite.attnres: Block Attention Residuals retrofitted to real transformers classes.

Tiny random models built from each class's own config (no downloads), compared with the stock
forward: retrofit exactness at w = 0, an independent Block AttnRes reference with non-zero
queries (retrofit and paper), the additive mode at alpha = 0, gradients, gradient
checkpointing, torch.compile, save/load, errors, and nothing half-patched after one.
"""

import copy
import math

import forward_rewrite
import pytest
import torch
import transformers
from forward_rewrite import attnres
from forward_rewrite.verify import DECODER, batch

LAYERS = 3


def _build(cls_name, cfg_name, **extra):
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(
        **{**DECODER, "num_hidden_layers": LAYERS, **extra}
    )
    cfg._attn_implementation = "eager"
    return getattr(transformers, cls_name)(cfg)


CASES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {}),
    "gpt_neox_parallel": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {"use_parallel_residual": True},
    ),
    "gpt_neox_serial": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {"use_parallel_residual": False},
    ),
    "cohere": ("CohereForCausalLM", "CohereConfig", {}),
    # Layers under `self.h` (`for h in self.h:`), the stream parameter named `x`.
    "ctrl": ("CTRLLMHeadModel", "CTRLConfig", {"dff": 64, "n_positions": 64}),
}
#: residual adds per layer
SLOTS = {"gpt_neox_parallel": 1, "cohere": 1}


def _inputs():
    b = batch()
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def _logits(model, **kw):
    with torch.no_grad():
        return model(**_inputs(), **kw).logits


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _randomize_queries(model, seed=3, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attnres." in name:
                noise = torch.randn(p.shape, generator=g) * scale
                p.add_(noise.to(p.dtype))


def _attnres_modules(model):
    return [n for n, _ in model.named_modules() if n.endswith("attnres")]


# ---------------------------------------------------------------------------------------
# Retrofit exactness, stock untouched


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("train", [False, True])
def test_retrofit_reproduces_stock(case, train):
    cls, cfg, extra = CASES[case]
    model = _build(cls, cfg, **extra)
    model.train(train)
    # The same seed for each run: CTRL's dropouts draw the same masks in train mode.
    torch.manual_seed(0)
    ref = _logits(model)
    attnres.apply(model, block_size=2)
    assert model._attnres_applied["sublayers"] == LAYERS * SLOTS.get(case, 2)
    assert model._attnres_applied["layers"] == ("h" if case == "ctrl" else "layers")
    torch.manual_seed(0)
    out = _logits(model)
    assert out.dtype == ref.dtype
    assert _rel(out, ref) < 1e-6
    attnres.remove(model)
    torch.manual_seed(0)
    assert torch.equal(_logits(model), ref)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, None, 100])
def test_retrofit_any_block_size(block_size):
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    ref = _logits(model)
    attnres.apply(model, block_size=block_size)
    assert _rel(_logits(model), ref) < 1e-6


def test_retrofit_with_fused_loss_patch():
    model = _build("LlamaForCausalLM", "LlamaConfig").train()
    b = batch()
    stock = copy.deepcopy(model)
    forward_rewrite.patch_model(model)
    attnres.apply(model, block_size=2)
    out = model(**b)
    ref = stock(**b)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-6 * abs(ref.loss.item())


def test_not_applied_is_bit_identical():
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    other = copy.deepcopy(model)
    ref = _logits(other)
    attnres.apply(model, block_size=2)
    _randomize_queries(model)
    _logits(model)
    # Another instance of the same classes is untouched while one is applied.
    assert torch.equal(_logits(other), ref)
    assert (
        type(other.model.layers[0])
        is transformers.models.llama.modeling_llama.LlamaDecoderLayer
    )
    attnres.remove(model)
    assert torch.equal(_logits(model), ref)
    assert not _attnres_modules(model)
    assert not hasattr(model.config, "attnres")
    assert set(model.state_dict()) == set(other.state_dict())


# ---------------------------------------------------------------------------------------
# An independent Block AttnRes reference (Llama, float64 mix) with non-zero queries


def _ref_mix(sources, w, g, eps, scale):
    vs = [v.double() for v in sources]
    keys = [
        v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g.double() for v in vs
    ]
    p = torch.softmax(torch.stack([k @ w.double() for k in keys], -1), -1)
    return scale * sum(p[..., i, None] * vs[i] for i in range(len(vs)))


def _reference_llama(model, mode, block_size):
    from transformers.masking_utils import create_causal_mask

    base = model.model
    ids = _inputs()["input_ids"]
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = create_causal_mask(
        config=base.config,
        inputs_embeds=h,
        attention_mask=None,
        past_key_values=None,
        position_ids=pos,
    )
    pe = base.rotary_emb(h, pos)
    eps = base.config.rms_norm_eps
    blocks, partial, g = [h.double()], None, 0

    def sources():
        return blocks + ([partial] if partial is not None else [])

    def mix(module, row):
        s = sources()
        scale = len(s) if mode == "retrofit" else 1.0
        return _ref_mix(s, module.query[row], module.key_norm[row], eps, scale).float()

    for layer in base.layers:
        subs = [
            lambda x, layer=layer: layer.self_attn(
                hidden_states=layer.input_layernorm(x),
                attention_mask=mask,
                position_embeddings=pe,
            )[0],
            lambda x, layer=layer: layer.mlp(layer.post_attention_layernorm(x)),
        ]
        for slot, f in enumerate(subs):
            out = f(mix(layer.attnres, slot)).double()
            partial = out if partial is None else partial + out
            g += 1
            if g % block_size == 0:
                blocks.append(partial)
                partial = None
    h = mix(base.attnres, 0)
    return model.lm_head(base.norm(h))


@pytest.mark.parametrize("mode", ["retrofit", "paper"])
@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_matches_independent_reference(mode, block_size):
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    attnres.apply(model, block_size=block_size, mode=mode)
    _randomize_queries(model)
    with torch.no_grad():
        out = model(input_ids=_inputs()["input_ids"]).logits
        ref = _reference_llama(model, mode, block_size)
    assert _rel(out, ref) < 1e-5


def test_paper_mode_is_not_stock_and_mixes_uniformly_at_zero():
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    ref = _logits(model)
    attnres.apply(model, block_size=2, mode="paper")
    assert _rel(_logits(model), ref) > 1e-3


# ---------------------------------------------------------------------------------------
# Additive mode


def test_additive_alpha_zero_is_identical():
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    ref = _logits(model)
    attnres.apply(model, block_size=2, mode="additive", alpha=0.0)
    assert not _attnres_modules(model)
    assert torch.equal(_logits(model), ref)


def test_additive_alpha_changes_output():
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    ref = _logits(model)
    attnres.apply(model, block_size=2, mode="additive", alpha=0.5)
    assert _rel(_logits(model), ref) > 1e-4


# ---------------------------------------------------------------------------------------
# Training


def _checkpointing(model, kwargs=None):
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _grads(model, b):
    model.zero_grad(set_to_none=True)
    loss = model(**b).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_queries_get_gradients_and_training_lowers_loss():
    model = _build("LlamaForCausalLM", "LlamaConfig").train()
    attnres.apply(model, block_size=2)
    b = batch()
    _, grads = _grads(model, b)
    q = [n for n in grads if n.endswith("attnres.query")]
    assert len(q) == LAYERS + 1
    assert all(grads[n].abs().sum() > 0 for n in q)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert model(**b).loss.item() < first


@pytest.mark.parametrize("case", ["llama", "gemma2", "gpt_neox_serial"])
def test_gradient_checkpointing_same_gradients(case):
    cls, cfg, extra = CASES[case]
    model = _build(cls, cfg, **extra).train()
    attnres.apply(model, block_size=2)
    _randomize_queries(model)
    b = batch()
    loss0, g0 = _grads(model, b)
    _checkpointing(model)
    assert model.base_model.layers[0].gradient_checkpointing
    loss1, g1 = _grads(model, b)
    assert torch.equal(loss0, loss1)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gradient_checkpointing_reentrant():
    model = _build("LlamaForCausalLM", "LlamaConfig").train()
    attnres.apply(model, block_size=2)
    _randomize_queries(model)
    b = batch()
    loss0, g0 = _grads(model, b)
    _checkpointing(model, {"use_reentrant": True})
    model.enable_input_require_grads()
    loss1, g1 = _grads(model, b)
    assert torch.equal(loss0, loss1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_torch_compile_same_loss():
    model = _build("LlamaForCausalLM", "LlamaConfig").train()
    attnres.apply(model, block_size=2)
    _randomize_queries(model)
    b = batch()
    ref = model(**b).loss
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out = compiled(**b).loss
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_output_hidden_states_are_the_stream():
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    with torch.no_grad():
        ref = model(**_inputs(), output_hidden_states=True).hidden_states
    attnres.apply(model, block_size=2)
    with torch.no_grad():
        out = model(**_inputs(), output_hidden_states=True).hidden_states
    assert len(out) == len(ref)
    for a, r in zip(out, ref):
        assert _rel(a, r) < 1e-6


# ---------------------------------------------------------------------------------------
# dtypes, devices


def test_bfloat16_keeps_dtype():
    model = _build("LlamaForCausalLM", "LlamaConfig").to(torch.bfloat16).eval()
    ref = _logits(model)
    attnres.apply(model, block_size=2)
    assert model.model.layers[0].attnres.query.dtype == torch.bfloat16
    out = _logits(model)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 2e-2


def test_mix_output_keeps_like_dtype_and_query_device():
    q = torch.zeros(8)
    g = torch.ones(8)
    srcs = [
        torch.randn(2, 3, 8, dtype=torch.float64),
        torch.randn(2, 3, 8, dtype=torch.bfloat16),
    ]
    like = torch.empty(0, dtype=torch.float16)
    out = attnres.mix_reference(srcs, q, g, eps=1e-6, scale=2.0, like=like)
    assert out.dtype == torch.float16 and out.device == q.device
    torch.testing.assert_close(
        out.double(), (srcs[0] + srcs[1].double()).half().double(), rtol=1e-3, atol=1e-2
    )


# ---------------------------------------------------------------------------------------
# save / load


def test_save_pretrained_round_trip(tmp_path):
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    attnres.apply(model, block_size=2)
    _randomize_queries(model)
    ref = _logits(model)
    sd = model.state_dict()
    assert "model.layers.0.attnres.query" in sd and "model.attnres.key_norm" in sd
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert loaded.config.attnres == {"block_size": 2, "mode": "retrofit", "alpha": 0.0}
    attnres.apply(loaded)
    assert loaded._attnres_applied["block_size"] == 2
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# errors, and nothing half-patched


def _assert_stock(model, ref):
    assert getattr(model, "_attnres_applied", None) is None
    assert not _attnres_modules(model)
    assert not hasattr(model.config, "attnres")
    for m in model.modules():
        assert not hasattr(type(m), "_attnres_stock")
        assert "_attnres_ctx" not in m.__dict__
    assert torch.equal(_logits(model), ref)


def test_apply_twice_and_remove_unapplied():
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    with pytest.raises(attnres.AttnResError, match="not applied"):
        attnres.remove(model)
    attnres.apply(model, block_size=2)
    with pytest.raises(attnres.AttnResError, match="already applied"):
        attnres.apply(model, block_size=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": -2}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"block_size": 2.0}, "block_size"),
        ({"mode": "full"}, "mode"),
        ({"mode": "additive", "alpha": math.nan}, "alpha"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    ref = _logits(model)
    with pytest.raises(attnres.AttnResError, match=match):
        attnres.apply(model, **kwargs)
    _assert_stock(model, ref)


def _jamba():
    torch.manual_seed(0)
    cfg = transformers.JambaConfig(
        vocab_size=160,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=2,
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=2,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    )
    return transformers.JambaForCausalLM(cfg)


def _bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=160,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    return transformers.BartForConditionalGeneration(cfg)


def _mamba():
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=160, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2
    )
    return transformers.MambaForCausalLM(cfg)


def _tiny(cls_name, cfg_name, **kw):
    def build():
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_name)(vocab_size=160, **kw)
        cfg._attn_implementation = "eager"
        return getattr(transformers, cls_name)(cfg)

    build.__name__ = cls_name
    return build


# Decoders holding their layers under `self.h`: the layer list is found, and each is refused
# for what its block does.
_H_REFUSED = [
    # The block takes `encoder_hidden_states` (its cross-attention branch).
    (
        _tiny(
            "GPT2LMHeadModel",
            "GPT2Config",
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
        ),
        "cross-attention",
        "GPT2LMHeadModel",
    ),
    # The blocks return `(hidden_states, attn_weights)`.
    (
        _tiny(
            "GPTJForCausalLM",
            "GPTJConfig",
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=64,
        ),
        "layer-return",
        "GPTJForCausalLM",
    ),
    (
        _tiny(
            "GPTNeoForCausalLM",
            "GPTNeoConfig",
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64,
        ),
        "layer-return",
        "GPTNeoForCausalLM",
    ),
    (
        _tiny(
            "CodeGenForCausalLM",
            "CodeGenConfig",
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=64,
        ),
        "layer-return",
        "CodeGenForCausalLM",
    ),
    # The residual adds are `dropout_add(...)` calls, `residual` the stream on one branch.
    (
        _tiny(
            "FalconForCausalLM",
            "FalconConfig",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        "residual-not-seen",
        "FalconForCausalLM",
    ),
    # `residual` is the stream or the normed stream (`apply_residual_connection_post_layernorm`)
    # and the adds happen inside the attention and the MLP.
    (
        _tiny("BloomForCausalLM", "BloomConfig", hidden_size=32, n_layer=2, n_head=4),
        "residual-not-seen",
        "BloomForCausalLM",
    ),
]


@pytest.mark.parametrize(
    "build, code, name",
    [
        (_jamba, "hybrid-layers", "JambaForCausalLM"),
        (_bart, "encoder-decoder", "BartForConditionalGeneration"),
        (_mamba, "recurrent-layer", "MambaForCausalLM"),
        *_H_REFUSED,
    ],
)
def test_refused_classes(build, code, name):
    model = build().eval()
    with torch.no_grad():
        kw = (
            {"decoder_input_ids": _inputs()["input_ids"]}
            if name.startswith("Bart")
            else {}
        )
        ref = model(input_ids=_inputs()["input_ids"], **kw).logits
    with pytest.raises(attnres.AttnResRefused) as info:
        attnres.apply(model, block_size=2)
    assert info.value.code == code
    assert name in str(info.value) and code in str(info.value)
    assert getattr(model, "_attnres_applied", None) is None
    assert not _attnres_modules(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=_inputs()["input_ids"], **kw).logits, ref)


def test_failure_midway_leaves_nothing(monkeypatch):
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    ref = _logits(model)
    real = attnres.AttnResQueries
    made = []

    def flaky(*a, **k):
        made.append(1)
        if len(made) == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(attnres, "AttnResQueries", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        attnres.apply(model, block_size=2)
    _assert_stock(model, ref)
    monkeypatch.setattr(attnres, "AttnResQueries", real)
    attnres.apply(model, block_size=2)
    assert _rel(_logits(model), ref) < 1e-6


def test_name_conflict_refused():
    model = _build("LlamaForCausalLM", "LlamaConfig").eval()
    ref = _logits(model)
    model.model.layers[1].attnres = torch.nn.Identity()
    with pytest.raises(attnres.AttnResRefused) as info:
        attnres.apply(model)
    assert info.value.code == "name-conflict"
    del model.model.layers[1].attnres
    _assert_stock(model, ref)


# ---------------------------------------------------------------------------------------
# Any decoder-shaped nn.Module, and the pass's refusals reaching apply


class _ToyConfig:
    hidden_size = 16
    rms_norm_eps = 1e-6


class _ToyLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(16)
        self.attn = torch.nn.Linear(16, 16)
        self.norm2 = torch.nn.LayerNorm(16)
        self.mlp = torch.nn.Linear(16, 16)

    def forward(self, hidden_states, scale=1.0):
        residual = hidden_states
        hidden_states = self.attn(self.norm1(hidden_states)) * scale
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = residual + self.mlp(self.norm2(hidden_states))
        return hidden_states


class _InPlaceLayer(_ToyLayer):
    def forward(self, hidden_states, scale=1.0):
        residual = hidden_states
        hidden_states = self.attn(self.norm1(hidden_states)) * scale
        hidden_states += residual
        return hidden_states


class _TupleLayer(_ToyLayer):
    def forward(self, hidden_states, scale=1.0):
        residual = hidden_states
        hidden_states = residual + self.attn(self.norm1(hidden_states))
        return hidden_states, None


class _Toy(torch.nn.Module):
    def __init__(self, layer_cls, n=3):
        super().__init__()
        self.config = _ToyConfig()
        self.layers = torch.nn.ModuleList([layer_cls() for _ in range(n)])
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        hidden_states = x
        for layer in self.layers:
            hidden_states = layer(hidden_states, scale=0.5)
        return self.norm(hidden_states)


class _ToyH(torch.nn.Module):
    """GPT-2's naming: the layers under `self.h`, looped with `enumerate`; a second
    ModuleList the forward does not loop over."""

    def __init__(self, layer_cls, n=3):
        super().__init__()
        self.config = _ToyConfig()
        self.h = torch.nn.ModuleList([layer_cls() for _ in range(n)])
        self.heads = torch.nn.ModuleList([torch.nn.Linear(16, 16)])
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        hidden_states = x
        for i, block in enumerate(self.h):
            hidden_states = block(hidden_states, scale=0.5)
        return self.heads[0](self.norm(hidden_states))


class _ToyTwoLoops(_ToyH):
    def forward(self, x):
        hidden_states = x
        for block in self.h:
            hidden_states = block(hidden_states, scale=0.5)
        for head in self.heads:
            hidden_states = head(hidden_states)
        return self.norm(hidden_states)


def test_layers_under_another_name():
    torch.manual_seed(0)
    model = _ToyH(_ToyLayer)
    x = torch.randn(2, 5, 16)
    ref = model(x)
    for block_size in (1, 3):
        attnres.apply(model, block_size=block_size)
        assert attnres.applied(model)["layers"] == "h"
        assert model._attnres_applied["sublayers"] == 6
        assert [type(b).__name__ for b in model.h] == ["_ToyLayer"] * 3
        assert all(hasattr(b, "attnres") for b in model.h)
        assert not hasattr(model.heads[0], "attnres")
        assert _rel(model(x), ref) < 1e-6
        attnres.remove(model)
        assert type(model) is _ToyH and all(type(b) is _ToyLayer for b in model.h)
        assert not _attnres_modules(model)
        assert torch.equal(model(x), ref)


def test_layers_under_another_name_ambiguous_is_refused():
    model = _ToyTwoLoops(_ToyLayer)
    with pytest.raises(attnres.AttnResRefused) as info:
        attnres.apply(model)
    assert info.value.code == "no-layer-loop"
    assert "h, heads" in info.value.detail
    assert not _attnres_modules(model)
    assert type(model) is _ToyTwoLoops


def test_any_decoder_shaped_module():
    torch.manual_seed(0)
    model = _Toy(_ToyLayer)
    x = torch.randn(2, 5, 16)
    ref = model(x)
    attnres.apply(model, block_size=3)
    assert model._attnres_applied["sublayers"] == 6
    assert _rel(model(x), ref) < 1e-6
    attnres.remove(model)
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize(
    "layer_cls, code",
    [(_InPlaceLayer, "residual-not-seen"), (_TupleLayer, "layer-return")],
)
def test_pass_refusals_reach_apply(layer_cls, code):
    torch.manual_seed(0)
    model = _Toy(layer_cls)
    with pytest.raises(attnres.AttnResRefused) as info:
        attnres.apply(model)
    assert info.value.code == code
    assert "_Toy" in str(info.value) and layer_cls.__name__ in str(info.value)
    assert not _attnres_modules(model)
    assert getattr(model, "_attnres_applied", None) is None
    assert type(model) is _Toy and all(type(m) is layer_cls for m in model.layers)
