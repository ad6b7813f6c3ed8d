"""The decoder-fusion passes (``rms-norm``, ``rotary``, ``gated-mlp``) through the installer:
applied by default, chosen with ``install(passes=...)``, reported per class and pass by
``audit()``, undone by ``uninstall()``; a module whose classes another tool (Liger) replaced
is refused with a reason and still trains like stock; the run-time guards fall back to stock;
and patched tiny models match stock (loss and every gradient, float32)."""

import copy

import forward_rewrite
import pytest
import torch
from forward_rewrite import fusion_guard
from forward_rewrite.verify import GRAD_TOL, LOSS_TOL
from model_cases import batch, build, loss_and_grads, rel_err
from torch import nn
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama

FUSIONS = ("rms-norm", "residual-norm", "rotary", "gated-mlp")


@pytest.fixture(autouse=True)
def stock_afterwards():
    forward_rewrite.uninstall()
    yield
    forward_rewrite.uninstall()


def entry(qualname):
    return next(
        c for c in forward_rewrite.audit()["classes"] if c["qualname"] == qualname
    )


def sites(qualname, pass_name, kind=None):
    """A pass's sites of the class by name (of one ``kind`` when given: an experts class
    has two sites, ``experts-gate`` and ``experts-forward``)."""
    return {
        s["name"]: s
        for s in entry(qualname)["passes"][pass_name]["sites"]
        if s["kind"] != "experts-forward" or kind == "experts-forward"
        if kind is None or s["kind"] == kind
    }


def stock_members():
    return (
        modeling_llama.LlamaRMSNorm.forward,
        modeling_llama.LlamaMLP.forward,
        modeling_llama.apply_rotary_pos_emb,
    )


def test_every_pass_is_applied_by_default_and_uninstall_restores(tmp_path):
    stock = stock_members()
    forward_rewrite.install(cache_dir=tmp_path)
    assert forward_rewrite.audit()["passes"] == ["fused-loss", *FUSIONS, "packing"]
    llama = entry("LlamaForCausalLM")
    assert llama["installed"]
    for name, site in [
        ("rms-norm", "LlamaRMSNorm"),
        ("rotary", "apply_rotary_pos_emb"),
        ("gated-mlp", "LlamaMLP"),
    ]:
        report = llama["passes"][name]
        assert report["verdict"] == "patched", report
        assert sites("LlamaForCausalLM", name)[site]["installed"]
        assert "patch" not in sites("LlamaForCausalLM", name)[site]
    assert "forward_rewrite.rms_norm" in _source(modeling_llama.LlamaRMSNorm.forward)
    assert "forward_rewrite.rotary" in _source(modeling_llama.apply_rotary_pos_emb)
    assert "gated_mlp_act" in _source(modeling_llama.LlamaMLP.forward)
    summary = forward_rewrite.audit()["summary"]["passes"]
    assert set(FUSIONS) <= set(summary)
    assert all(summary[p]["sites_installed"] >= 1 for p in FUSIONS)
    forward_rewrite.uninstall()
    assert stock_members() == stock
    assert "forward_rewrite" not in vars(modeling_llama)


def _source(fn):
    import inspect

    return inspect.getsource(fn)


def test_passes_choose_what_is_installed(tmp_path):
    stock = stock_members()
    forward_rewrite.install(cache_dir=tmp_path, passes=("fused-loss",))
    assert stock_members() == stock
    assert entry("LlamaForCausalLM")["installed"]
    assert not entry("LlamaForCausalLM").get("passes")
    forward_rewrite.uninstall()

    forward_rewrite.install(cache_dir=tmp_path, passes=["rms-norm"])
    llama = entry("LlamaForCausalLM")
    assert not llama["installed"] and llama["reason"] == "pass-off"
    assert set(llama["passes"]) == {"rms-norm"}
    assert modeling_llama.LlamaRMSNorm.forward is not stock[0]
    assert modeling_llama.LlamaMLP.forward is stock[1]
    assert modeling_llama.apply_rotary_pos_emb is stock[2]
    forward_rewrite.uninstall()
    assert stock_members() == stock

    with pytest.raises(
        ValueError, match=r"unknown pass 'rms_norm' \(known: fused-loss, "
    ):
        forward_rewrite.install(cache_dir=tmp_path, passes=("rms_norm",))
    with pytest.raises(TypeError):
        forward_rewrite.install(cache_dir=tmp_path, passes=3)


class _OtherRMSNorm(nn.Module):
    """Stands in for Liger's LigerRMSNorm: another class put into the module."""

    def __init__(self, hidden_size, eps=1e-6, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def _other_rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Stands in for Liger's liger_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (
        q * cos + modeling_llama.rotate_half(q) * sin,
        k * cos + modeling_llama.rotate_half(k) * sin,
    )


def _liger_like(monkeypatch):
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", _OtherRMSNorm)
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _other_rotary)
        return "simulated"
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
        fused_linear_cross_entropy=False,
    )  # fmt: skip
    return "liger"


def test_classes_another_tool_replaced_are_refused_and_train_like_stock(
    tmp_path, monkeypatch
):
    how = _liger_like(monkeypatch)
    torch.manual_seed(0)
    model = build("llama")
    stock_model = copy.deepcopy(model)
    inputs = batch()
    want_loss, _, want_grads = loss_and_grads(stock_model, inputs)
    forward_rewrite.install(cache_dir=tmp_path)
    norm = sites("LlamaForCausalLM", "rms-norm")["LlamaRMSNorm"]
    assert norm["verdict"] == "refused" and norm["reason"] == "site-replaced", norm
    assert not norm["installed"]
    rotary = sites("LlamaForCausalLM", "rotary")["apply_rotary_pos_emb"]
    assert rotary["reason"] == "site-replaced", rotary
    if how == "simulated":
        # The MLP was left in place: still patched.
        assert sites("LlamaForCausalLM", "gated-mlp")["LlamaMLP"]["installed"]
    assert "forward_rewrite" not in _source(modeling_llama.LlamaRMSNorm.forward)
    # the layer's residual add is patched, but never fuses into the other tool's norm
    layer = sites("LlamaForCausalLM", "residual-norm")["LlamaDecoderLayer"]
    assert layer["installed"], layer
    fused_adds = fusion_guard.taken["residual-norm"]
    got_loss, _, got_grads = loss_and_grads(model, inputs)
    assert fusion_guard.taken["residual-norm"] == fused_adds
    assert rel_err(got_loss, want_loss) <= LOSS_TOL
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= GRAD_TOL, name


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma3_text"])
def test_patched_tiny_models_match_stock_and_take_every_fused_path(case, tmp_path):
    if case == "gemma3_text":
        pytest.importorskip("transformers.models.gemma3")
    torch.manual_seed(0)
    model = _model(case)
    stock_model = copy.deepcopy(model)
    inputs = batch()
    want_loss, _, want_grads = loss_and_grads(stock_model, inputs)
    forward_rewrite.install(cache_dir=tmp_path)
    before = dict(fusion_guard.taken)
    got_loss, _, got_grads = loss_and_grads(model, inputs)
    for name in FUSIONS:
        assert fusion_guard.taken[name] > before[name], name
    assert rel_err(got_loss, want_loss) <= LOSS_TOL
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= GRAD_TOL, name
    with fusion_guard.disabled():
        before = dict(fusion_guard.taken)
        loss_and_grads(model, inputs)
        assert fusion_guard.taken == before


def _model(case):
    if case != "gemma3_text":
        return build(case)
    from forward_rewrite.verify import DECODER

    config = modeling_gemma3.Gemma3TextConfig(
        **{
            **DECODER,
            "head_dim": DECODER["hidden_size"] // DECODER["num_attention_heads"],
        }
    )
    return modeling_gemma3.Gemma3ForCausalLM(config).float().train()


def test_guards_fall_back_to_stock():
    x = torch.randn(2, 3, 8)
    w = torch.ones(8)
    norm = modeling_llama.LlamaRMSNorm(8)
    assert fusion_guard.rms_norm(norm, x, w, 1e-6)
    assert not fusion_guard.rms_norm(norm, x.double(), w, 1e-6)
    assert not fusion_guard.rms_norm(norm, x, torch.ones(4), 1e-6)
    assert not fusion_guard.rms_norm(norm, x, w, float("nan"))
    assert not fusion_guard.rms_norm(norm, x.to("meta"), w.to("meta"), 1e-6)

    assert fusion_guard.gated_act(nn.SiLU(), x) == "silu"
    assert fusion_guard.gated_act(nn.GELU(approximate="tanh"), x) == "gelu_tanh"
    from transformers.activations import ACT2FN

    assert fusion_guard.gated_act(ACT2FN["silu"], x) == "silu"
    assert fusion_guard.gated_act(ACT2FN["gelu_pytorch_tanh"], x) == "gelu_tanh"
    for act in (nn.GELU(), ACT2FN["gelu_new"], ACT2FN["gelu"], nn.ReLU()):
        assert fusion_guard.gated_act(act, x) is None, act
    hooked = nn.SiLU()
    hooked.register_forward_hook(lambda *a: None)
    assert fusion_guard.gated_act(hooked, x) is None
    assert fusion_guard.gated_act(nn.SiLU(), x.double()) is None
    # torch's functional SiLU called in the source (LFM2): the MLP module's mode decides
    silu = nn.functional.silu
    mlp = nn.Linear(8, 8).train()
    assert fusion_guard.gated_function(mlp, silu, x) == "silu"
    assert fusion_guard.gated_function(mlp, nn.functional.gelu, x) is None
    assert fusion_guard.gated_function(mlp, lambda t: silu(t), x) is None
    assert fusion_guard.gated_function(mlp, silu, x.double()) is None
    assert fusion_guard.gated_function(mlp.eval(), silu, x) is None
    mlp.train()
    with fusion_guard.disabled():
        assert fusion_guard.gated_function(mlp, silu, x) is None

    q = torch.randn(2, 4, 5, 8, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, requires_grad=True)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert fusion_guard.rotary(q, k, cos, sin, 1)
    # inference is untouched: no autograd, nothing requiring a gradient, eval mode
    assert not fusion_guard.rotary(q.detach(), k.detach(), cos, sin, 1)
    with torch.no_grad():
        assert not fusion_guard.rotary(q, k, cos, sin, 1)
        assert not fusion_guard.rms_norm(norm, x, w, 1e-6)
        assert fusion_guard.gated_act(nn.SiLU(), x) is None
        assert fusion_guard.gated_function(mlp, silu, x) is None
    assert not fusion_guard.rms_norm(norm.eval(), x, w, 1e-6)
    assert fusion_guard.gated_act(nn.SiLU().eval(), x) is None
    assert fusion_guard.rotary(q, k, cos[..., :4], sin[..., :4], 1)  # partial
    assert not fusion_guard.rotary(q, k, cos[..., :3], sin[..., :3], 1)
    assert not fusion_guard.rotary(q[0], k[0], cos, sin, 1)
    assert not fusion_guard.rotary(q, k.double(), cos, sin, 1)
    assert not fusion_guard.rotary(q, k, cos, sin, True)
    assert not fusion_guard.rotary(q, k, torch.randn(3, 5, 8), torch.randn(3, 5, 8), 1)


def test_a_wrong_fused_path_is_a_mismatch_even_with_the_float64_arbiter(monkeypatch):
    """check_class lets float32 noise pass only when the patch is as close to float64 as
    stock is: a fused path off by 0.1% is still reported."""
    from forward_rewrite import verify

    right = forward_rewrite.rms_norm

    def wrong(*args, **kwargs):
        return right(*args, **kwargs) * 1.001

    monkeypatch.setattr(forward_rewrite, "rms_norm", wrong)
    result = verify.check_class(modeling_llama.LlamaForCausalLM)
    assert result["status"] == "mismatch", result
    assert result["arbiter"]["patched_closer"] is False
    monkeypatch.setattr(forward_rewrite, "rms_norm", right)
    assert verify.check_class(modeling_llama.LlamaForCausalLM)["status"] == "verified"


def _moe():
    from transformers.integrations import moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    return moe, modeling_qwen3_moe.Qwen3MoeExperts


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_moe_experts_gate_is_fused_under_grouped_mm_and_matches_stock(
    implementation, tmp_path
):
    moe, experts = _moe()
    torch.manual_seed(0)
    model = build("qwen3_moe")
    model.config._experts_implementation = implementation
    stock_model = copy.deepcopy(model)
    inputs = batch()
    want_loss, _, want_grads = loss_and_grads(stock_model, inputs)
    forward_rewrite.install(cache_dir=tmp_path)
    site = sites("Qwen3MoeForCausalLM", "gated-mlp")["Qwen3MoeExperts"]
    assert site["kind"] == "experts-gate" and site["installed"], site
    assert experts._apply_gate is not moe._default_apply_gate
    forward = sites("Qwen3MoeForCausalLM", "gated-mlp", "experts-forward")
    assert forward["Qwen3MoeExperts"]["installed"], forward
    before = dict(fusion_guard.taken)
    got_loss, _, got_grads = loss_and_grads(model, inputs)
    # The eager implementation computes the product inline: nothing of ours runs there.
    # Under grouped_mm the whole experts forward is the fused op (which fuses the gate).
    for name in ("gated-mlp", "experts-forward"):
        ran = fusion_guard.taken[name] - before[name]
        assert (ran > 0) == (implementation == "grouped_mm"), (name, ran)
    assert rel_err(got_loss, want_loss) <= LOSS_TOL
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= GRAD_TOL, name
    forward_rewrite.uninstall()
    assert experts.__dict__["_apply_gate"] is moe._default_apply_gate
    assert moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"] is moe.grouped_mm_experts_forward
    assert "grouped_mm" not in moe.ALL_EXPERTS_FUNCTIONS._local_mapping


def test_moe_experts_gate_other_than_the_checked_default_is_left_alone(
    monkeypatch, tmp_path
):
    moe, experts = _moe()

    def clamped(self, gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(max=7.0)) * up

    # Another tool (or a later transformers) put its own gate on the class.
    monkeypatch.setattr(experts, "_apply_gate", clamped)
    forward_rewrite.install(cache_dir=tmp_path)
    site = sites("Qwen3MoeForCausalLM", "gated-mlp")["Qwen3MoeExperts"]
    assert site["reason"] == "site-replaced" and not site["installed"], site
    assert experts._apply_gate is clamped
    forward_rewrite.uninstall()
    # transformers' default itself changed: its running source is checked, not its name.
    monkeypatch.setattr(moe, "_default_apply_gate", clamped)
    monkeypatch.setattr(experts, "_apply_gate", clamped)
    forward_rewrite.install(cache_dir=tmp_path)
    site = sites("Qwen3MoeForCausalLM", "gated-mlp")["Qwen3MoeExperts"]
    assert site["reason"] == "site-source-mismatch" and not site["installed"], site
    assert experts._apply_gate is clamped


def test_residual_norm_fuses_only_into_installed_norms(tmp_path):
    x = torch.randn(2, 3, 8)
    r = torch.randn(2, 3, 8)
    norm = modeling_llama.LlamaRMSNorm(8)
    # nothing installed: the norm's class runs its stock forward
    assert fusion_guard.residual_norm(norm, r, x) is None
    forward_rewrite.install(cache_dir=tmp_path)
    form = fusion_guard.residual_norm(norm, r, x)
    assert form == {
        "weight": norm.weight,
        "eps": norm.variance_epsilon,
        "offset": 0.0,
        "cast_before_weight": True,
    }
    gemma = modeling_gemma3.Gemma3RMSNorm(8)
    assert fusion_guard.residual_norm(gemma, r, x)["offset"] == 1.0
    assert not fusion_guard.residual_norm(gemma, r, x)["cast_before_weight"]
    # the stock body wherever the fused op might not be what the statements compute
    assert fusion_guard.residual_norm(norm, r.double(), x) is None
    assert fusion_guard.residual_norm(norm, r[:1], x) is None
    assert fusion_guard.residual_norm(norm, r, x.double()) is None
    assert fusion_guard.residual_norm(norm, r, torch.randn(2, 3, 4)) is None
    assert fusion_guard.residual_norm(norm.eval(), r, x) is None
    norm.train()
    with torch.no_grad():
        assert fusion_guard.residual_norm(norm, r, x) is None
    with fusion_guard.disabled():
        assert fusion_guard.residual_norm(norm, r, x) is None
    hooked = modeling_llama.LlamaRMSNorm(8)
    hooked.register_forward_pre_hook(lambda *a: None)
    assert fusion_guard.residual_norm(hooked, r, x) is None
    backward_hooked = modeling_llama.LlamaRMSNorm(8)
    backward_hooked.register_full_backward_hook(lambda *a: None)
    assert fusion_guard.residual_norm(backward_hooked, r, x) is None
    own = modeling_llama.LlamaRMSNorm(8)
    own.forward = lambda h: h
    assert fusion_guard.residual_norm(own, r, x) is None

    class Sub(modeling_llama.LlamaRMSNorm):
        def forward(self, h):
            return h

    assert fusion_guard.residual_norm(Sub(8), r, x) is None
    # Gemma 4's norm applies its weight only under with_scale: fused per instance where true
    from transformers.models.gemma4 import modeling_gemma4

    scaled = modeling_gemma4.Gemma4RMSNorm(8)
    assert fusion_guard.residual_norm(scaled, r, x)["weight"] is scaled.weight
    assert (
        fusion_guard.residual_norm(
            modeling_gemma4.Gemma4RMSNorm(8, with_scale=False), r, x
        )
        is None
    )
    # a weight present but with_scale off: the stock forward ignores it, so must the fused add
    scaled.with_scale = False
    assert fusion_guard.residual_norm(scaled, r, x) is None
    forward_rewrite.uninstall()
    assert fusion_guard.norm_forms == {}
    assert fusion_guard.residual_norm(norm, r, x) is None
    # without the rms-norm pass the layer's patch is in place but never fuses
    forward_rewrite.install(cache_dir=tmp_path, passes=("residual-norm",))
    assert "add_rms_norm" in _source(modeling_llama.LlamaDecoderLayer.forward)
    assert fusion_guard.residual_norm(norm, r, x) is None


def test_residual_norm_patched_layer_matches_stock_and_attnres_reads_the_stock_forward(
    tmp_path,
):
    from forward_rewrite import attnres

    torch.manual_seed(0)
    model = build("llama")
    stock_model = copy.deepcopy(model)
    inputs = batch()
    want_loss, _, want_grads = loss_and_grads(stock_model, inputs)
    forward_rewrite.install(cache_dir=tmp_path, passes=("rms-norm", "residual-norm"))
    layer = sites("LlamaForCausalLM", "residual-norm")["LlamaDecoderLayer"]
    assert layer["installed"], layer
    assert layer["lowered"]["norms"] == "post_attention_layernorm (LlamaRMSNorm)"
    before = fusion_guard.taken["residual-norm"]
    got_loss, _, got_grads = loss_and_grads(model, inputs)
    layers = model.config.num_hidden_layers
    assert fusion_guard.taken["residual-norm"] - before == layers
    assert rel_err(got_loss, want_loss) <= LOSS_TOL
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= GRAD_TOL, name
    # AttnRes rewrites the layer's stock forward (its adds become mixes), not the patch
    attnres.apply(model)
    import inspect

    patched = inspect.unwrap(type(model.model.layers[0]).__dict__["forward"])
    assert "attnres" in patched.__code__.co_filename
    assert "add_rms_norm" not in patched.__code__.co_names
    loss_and_grads(model, inputs)


def test_a_patched_decoder_layer_still_checkpoints(tmp_path):
    """transformers 5 wraps a GradientCheckpointingLayer's forward at class creation; the
    patched forward gets the same wrapper, so gradient checkpointing still recomputes the
    layer in backward (the fused add runs twice per layer and step) and keeps no more
    activations than stock."""
    import inspect

    from transformers import modeling_layers

    if not hasattr(modeling_layers.GradientCheckpointingLayer, "__init_subclass__"):
        pytest.skip("this transformers checkpoints in __call__")
    layer_cls = modeling_llama.LlamaDecoderLayer
    stock = layer_cls.__dict__["forward"]
    forward_rewrite.install(cache_dir=tmp_path)
    patched = layer_cls.__dict__["forward"]
    assert patched is not stock
    assert patched.__code__.co_name == stock.__code__.co_name
    assert "add_rms_norm" in inspect.unwrap(patched).__code__.co_names
    torch.manual_seed(0)
    model = build("llama")
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    before = fusion_guard.taken["residual-norm"]
    loss_and_grads(model, batch())
    layers = model.config.num_hidden_layers
    assert fusion_guard.taken["residual-norm"] - before == 2 * layers
    forward_rewrite.uninstall()
    assert layer_cls.__dict__["forward"] is stock


def test_every_patched_site_of_the_pinned_release_installs():
    """A site the rewriter patched and the installer could not put in place is a bug in
    one of them (GLM-4V's decoder layer once failed in ``@auto_docstring``, which reads the
    model's folder off the patch's file name): none may end ``site-emit-invalid``."""
    from forward_rewrite.verify import import_all_modeling_modules

    import_all_modeling_modules()
    forward_rewrite.install()
    failed = [
        f"{c['qualname']} {name} {s['name']}: {s['detail']}"
        for c in forward_rewrite.audit()["classes"]
        for name, p in (c.get("passes") or {}).items()
        for s in p.get("sites") or []
        if s.get("reason") == "site-emit-invalid"
    ]
    assert failed == []
    glm4v = sites("Glm4vForConditionalGeneration", "residual-norm")
    assert glm4v["Glm4vTextDecoderLayer"]["installed"]
    from transformers.models.glm4v import modeling_glm4v

    # the docstring @auto_docstring wrote is the patched forward's
    assert modeling_glm4v.Glm4vTextDecoderLayer.forward.__doc__
