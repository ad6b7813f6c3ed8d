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


# ------------------------------------------------------------- the clamped SwiGLU forms
# DeepSeek-V4, GLM-5-Next, HY-V4 (the gate clamped before the activation) and Step-3.7 (the
# activation's output clamped): `gated-mlp` lowers them with `limit=` read through
# `fusion_guard.swiglu_limit`. The tests down to the guard's run without the fused op; the
# ones that train a patched model need the op's `limit` / `clamp_after_activation`.


def _clamped_modules():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4
    from transformers.models.glm5_next import modeling_glm5_next
    from transformers.models.step3p7 import modeling_step3p7

    return modeling_deepseek_v4, modeling_glm5_next, modeling_step3p7


def test_swiglu_limit_reads_a_python_number_above_zero():
    before = dict(fusion_guard.taken)
    for value, want in [(7, 7.0), (0.5, 0.5), (float("inf"), float("inf"))]:
        got = fusion_guard.swiglu_limit(value)
        assert got == want and type(got) is float, (value, got)
    for value in (
        0,
        0.0,
        -1,
        -0.5,
        float("-inf"),
        float("nan"),
        True,
        False,
        None,
        "7",
        [7.0],
        torch.tensor(7.0),
        torch.tensor([7.0]),
        10**400,  # an int beyond float
    ):
        assert fusion_guard.swiglu_limit(value) is None, value
    # it guards no tensor and counts nothing (the activation guard after it does)
    assert fusion_guard.taken == before
    with fusion_guard.disabled(), torch.no_grad():
        assert fusion_guard.swiglu_limit(7.0) == 7.0


def test_clamped_swiglu_sites_install_with_their_limit(tmp_path):
    deepseek, glm, step = _clamped_modules()
    stock_gate = deepseek.DeepseekV4Experts.__dict__["_apply_gate"]
    stock_forward = deepseek.DeepseekV4MLP.__dict__["forward"]
    forward_rewrite.install(cache_dir=tmp_path)
    mlp = sites("DeepseekV4ForCausalLM", "gated-mlp")["DeepseekV4MLP"]
    assert mlp["installed"], mlp
    assert mlp["lowered"]["limit"] == "self.limit"
    assert mlp["lowered"]["clamp"] == "gate before act"
    source = _source(deepseek.DeepseekV4MLP.forward)
    assert "fusion_guard.swiglu_limit(self.limit)" in source
    assert "limit=_fr_limit" in source
    step_mlp = sites("Step3p7ForConditionalGeneration", "gated-mlp")["Step3p7MLP"]
    assert step_mlp["installed"] and step_mlp["lowered"]["clamp"] == "activation output"
    assert "clamp_after_activation=True" in _source(step.Step3p7MLP.forward)
    glm_sites = sites("Glm5NextForConditionalGeneration", "gated-mlp")
    assert glm_sites["Glm5NextTextMLP"]["installed"]
    assert glm_sites["Glm5NextVisionMLP"]["installed"]
    # the experts' own gate: bound by its hash, the class's own body its fallback
    for qualname, experts, limit, act in [
        ("DeepseekV4ForCausalLM", deepseek.DeepseekV4Experts, "limit", "self.act_fn"),
        (
            "Glm5NextForConditionalGeneration",
            glm.Glm5NextTextExperts,
            "swiglu_limit",
            "F.silu",
        ),
    ]:
        gate = sites(qualname, "gated-mlp")[experts.__name__]
        assert gate["kind"] == "experts-gate" and gate["installed"], gate
        assert gate["original_sha256"] and gate["lowered"]["act"] == act
        forward = sites(qualname, "gated-mlp", "experts-forward")[experts.__name__]
        assert forward["installed"], forward
        form = fusion_guard.experts_forms[experts]
        assert form.limit == limit and form.clamp_after_activation is False
        assert form.gate is experts.__dict__["_apply_gate"]
    assert "gated_mlp_act_packed" in _source(deepseek.DeepseekV4Experts._apply_gate)
    forward_rewrite.uninstall()
    assert deepseek.DeepseekV4Experts.__dict__["_apply_gate"] is stock_gate
    assert deepseek.DeepseekV4MLP.__dict__["forward"] is stock_forward
    assert fusion_guard.experts_forms == {}


def test_clamped_swiglu_limit_not_a_number_runs_stock(tmp_path):
    deepseek, _, _ = _clamped_modules()
    forward_rewrite.install(cache_dir=tmp_path)
    config = deepseek.DeepseekV4Config(
        hidden_size=8, intermediate_size=12, hidden_act="silu", swiglu_limit=0.05
    )
    torch.manual_seed(0)
    mlp = deepseek.DeepseekV4MLP(config).train()
    x = torch.randn(2, 3, 8)

    def stock(limit):
        gate = mlp.gate_proj(x).clamp(max=limit)
        up = mlp.up_proj(x).clamp(min=-limit, max=limit)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    # a tensor limit (or none above 0): the stock body, and the activation guard never ran
    for limit in (torch.tensor(0.05), 0.0):
        mlp.limit = limit
        before = dict(fusion_guard.taken)
        torch.testing.assert_close(mlp(x), stock(limit), rtol=0, atol=0)
        assert fusion_guard.taken == before, limit


def _experts_plan(module, experts):
    x = torch.randn(6, experts.hidden_dim)
    top_k_index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    top_k_weights = torch.rand(6, 2)
    return fusion_guard.moe_experts(experts, x, top_k_index, top_k_weights)


def test_moe_experts_guard_passes_a_clamped_gates_limit(tmp_path, monkeypatch):
    deepseek, glm, _ = _clamped_modules()
    forward_rewrite.install(cache_dir=tmp_path)
    config = deepseek.DeepseekV4Config(
        hidden_size=8,
        intermediate_size=8,
        num_local_experts=4,
        hidden_act="silu",
        swiglu_limit=7.0,
    )
    experts = deepseek.DeepseekV4Experts(config).train()
    experts.limit = 7  # an int limit is a bound too
    for p in experts.parameters():
        nn.init.normal_(p)
    plan = _experts_plan(deepseek, experts)
    assert plan == {
        "activation": "silu",
        "transposed": experts.is_transposed,
        "limit": 7.0,
        "clamp_after_activation": False,
    }, plan
    experts.limit = float("inf")
    assert _experts_plan(deepseek, experts)["limit"] == float("inf")
    # read on every call: a limit the op does not take runs stock, before the activation
    # guard counts anything
    for limit in (torch.tensor(7.0), 0, float("nan"), None):
        experts.limit = limit
        before = dict(fusion_guard.taken)
        assert _experts_plan(deepseek, experts) is None, limit
        assert fusion_guard.taken == before, limit
    # GLM-5-Next's gate applies torch's functional SiLU by the module's name F
    config = glm.Glm5NextTextConfig(
        hidden_size=8, moe_intermediate_size=8, num_local_experts=4, swiglu_limit=7.0
    )
    experts = glm.Glm5NextTextExperts(config).train()
    for p in experts.parameters():
        nn.init.normal_(p)
    assert _experts_plan(glm, experts)["activation"] == "silu"
    monkeypatch.setattr(glm, "F", type("F", (), {"silu": staticmethod(torch.tanh)}))
    assert _experts_plan(glm, experts) is None


CLAMPED_MODELS = [
    ("deepseek_v4", "DeepseekV4ForCausalLM", ("gated-mlp", "experts-forward")),
    ("glm5_next", "Glm5NextForConditionalGeneration", ("gated-mlp", "experts-forward")),
    ("hy_v4", "HYV4ForCausalLM", ("gated-mlp", "experts-forward")),
    ("step3p7", "Step3p7ForConditionalGeneration", ("gated-mlp",)),
]


@pytest.mark.parametrize(
    "family, qualname, fused", CLAMPED_MODELS, ids=[c[0] for c in CLAMPED_MODELS]
)
def test_clamped_swiglu_models_match_stock_with_tight_limits(
    family, qualname, fused, tmp_path
):
    """Needs the fused ops' ``limit`` / ``clamp_after_activation``. Every clamped MLP and
    experts module gets a limit that clamps a good share of the tiny model's gate and up
    values, so the clamps' values and gradients are compared, not only the wiring."""
    import importlib

    from forward_rewrite import verify

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    model = verify.tiny_model(getattr(module, qualname))
    inputs = verify.tiny_inputs(model)

    def set_limits(model, limit):
        clamped = 0
        for m in model.modules():
            if type(m).__name__.endswith(("MLP", "Experts")):
                for name in ("limit", "swiglu_limit"):
                    if isinstance(getattr(m, name, None), (int, float)):
                        setattr(m, name, limit)
                        clamped += 1
        return clamped

    loose = copy.deepcopy(model)
    assert set_limits(loose, float("inf")) and set_limits(model, 0.02)
    _, _, loose_grads = loss_and_grads(loose, dict(inputs))
    stock_model = copy.deepcopy(model)
    want_loss, _, want_grads = loss_and_grads(stock_model, dict(inputs))
    # the tight limits change the gradients at order one: the clamps are compared
    assert verify.grad_error(loose_grads, want_grads)[0] > 100 * GRAD_TOL
    forward_rewrite.install(cache_dir=tmp_path)
    before = dict(fusion_guard.taken)
    got_loss, _, got_grads = loss_and_grads(model, dict(inputs))
    for name in fused:
        assert fusion_guard.taken[name] > before[name], name
    assert rel_err(got_loss, want_loss) <= LOSS_TOL
    assert set(got_grads) == set(want_grads)
    # scaled as check_class scales it: DeepSeek-V4's router weights get ~1e-12 gradients
    # (noise), which a per-parameter relative error would judge on their own
    worst, name = verify.grad_error(got_grads, want_grads)
    assert worst <= GRAD_TOL, (name, worst)


# ------------------------------------------------------------- GPT-OSS's rotary embedding


def _rotary_grads(fn, q, k, cos, sin, unsqueeze_dim):
    """The outputs of ``fn(q, k, cos, sin, unsqueeze_dim=...)`` and the gradients of every
    input (q, k and the tables) under fixed random output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, cos, sin)]
    q_out, k_out = fn(*leaves, unsqueeze_dim=unsqueeze_dim)
    g = torch.Generator().manual_seed(3)
    gq = torch.randn(q_out.shape, generator=g)
    gk = torch.randn(k_out.shape, generator=g)
    grads = torch.autograd.grad((q_out * gq).sum() + (k_out * gk).sum(), leaves)
    return (q_out.detach(), k_out.detach()), grads


def test_gpt_oss_half_tables_rotary_matches_stock_and_takes_the_fused_path(tmp_path):
    """GPT-OSS's ``apply_rotary_pos_emb`` rotates q and k through ``_apply_rotary_emb``, on
    the halves of the head with tables of half its width: patched to ``forward_rewrite.rotary``
    with each table concatenated to itself (Llama's product, term for term). Outputs and every
    gradient (q, k and the tables) equal stock's in float32, with the heads on dim 1 or 2 and a
    batch-1 table; a table of another width (one stock broadcasts over each half) runs stock."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    stock = modeling_gpt_oss.apply_rotary_pos_emb
    forward_rewrite.install(cache_dir=tmp_path, passes=("rotary",))
    site = sites("GptOssForCausalLM", "rotary")["apply_rotary_pos_emb"]
    assert site["installed"], site
    assert site["lowered"] == {"form": "half-tables", "rotation": "halves"}, site
    patched = modeling_gpt_oss.apply_rotary_pos_emb
    assert patched is not stock
    assert "forward_rewrite.rotary(q, k, _fr_cos, _fr_sin," in _source(patched)

    torch.manual_seed(0)
    for unsqueeze_dim, q_shape, k_shape, table in [
        (1, (2, 4, 5, 8), (2, 2, 5, 8), (2, 5, 4)),
        (1, (2, 4, 5, 8), (2, 2, 5, 8), (1, 5, 4)),
        (2, (2, 5, 4, 12), (2, 5, 2, 12), (2, 5, 6)),
    ]:
        q, k = torch.randn(q_shape), torch.randn(k_shape)
        cos, sin = torch.randn(table), torch.randn(table)
        want, want_grads = _rotary_grads(stock, q, k, cos, sin, unsqueeze_dim)
        before = fusion_guard.taken["rotary"]
        got, got_grads = _rotary_grads(patched, q, k, cos, sin, unsqueeze_dim)
        assert fusion_guard.taken["rotary"] == before + 1, (q_shape, table)
        torch.testing.assert_close(got, want)
        for name, a, b in zip(("q", "k", "cos", "sin"), got_grads, want_grads):
            torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")

    # tables of width 1: stock broadcasts them over each half; the op would rotate the first
    # two entries only, so the patched function runs stock
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    want, want_grads = _rotary_grads(stock, q, k, cos, sin, 1)
    before = dict(fusion_guard.taken)
    got, got_grads = _rotary_grads(patched, q, k, cos, sin, 1)
    assert fusion_guard.taken == before
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grads, want_grads, rtol=0, atol=0)
    forward_rewrite.uninstall()
    assert modeling_gpt_oss.apply_rotary_pos_emb is stock


# ------------------------------------------------- GPT-OSS's and MiniMax-M3's SwiGLU (swiglu_oai)
# `(up + 1) * gate * sigmoid(gate * alpha)` with the clamped SwiGLU's clamps, written out (no
# activation module): GPT-OSS's experts gate on interleaved pairs (`interleaved=True`; its
# `experts-forward` refused: a bias, and the op takes halves), MiniMax-M3's experts gate and
# dense MLP on halves (its `experts-forward` with `alpha` registered).


def _oai_modules():
    from transformers.models.gpt_oss import modeling_gpt_oss
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl

    return modeling_gpt_oss, modeling_minimax_m3_vl


def test_swiglu_alpha_reads_a_finite_python_number_and_gated_oai_counts_once():
    before = dict(fusion_guard.taken)
    for value, want in [(1.702, 1.702), (2, 2.0), (-0.5, -0.5), (0, 0.0)]:
        got = fusion_guard.swiglu_alpha(value)
        assert got == want and type(got) is float, (value, got)
    for value in (
        float("inf"),
        float("-inf"),
        float("nan"),
        True,
        False,
        None,
        "1.702",
        [1.702],
        torch.tensor(1.702),
        10**400,
    ):
        assert fusion_guard.swiglu_alpha(value) is None, value
    assert fusion_guard.taken == before
    module = nn.Linear(4, 4).train()
    x = torch.randn(3, 4)
    assert fusion_guard.gated_oai(module, x, 1.702) == 1.702
    assert fusion_guard.taken["gated-mlp"] == before["gated-mlp"] + 1
    counted = dict(fusion_guard.taken)
    # stock: no alpha, eval, no_grad, disabled, float64, a subclass, no module
    assert fusion_guard.gated_oai(module, x, None) is None
    assert fusion_guard.gated_oai(module.eval(), x, 1.702) is None
    module.train()
    with torch.no_grad():
        assert fusion_guard.gated_oai(module, x, 1.702) is None
    with fusion_guard.disabled():
        assert fusion_guard.gated_oai(module, x, 1.702) is None
    assert fusion_guard.gated_oai(module, x.double(), 1.702) is None
    assert fusion_guard.gated_oai(module, x.as_subclass(_Sub), 1.702) is None
    assert fusion_guard.gated_oai(None, x, 1.702) is None
    assert fusion_guard.taken == counted


class _Sub(torch.Tensor):
    pass


def test_swiglu_oai_sites_install_with_their_alpha(tmp_path):
    gpt_oss, minimax = _oai_modules()
    stock_gates = (
        gpt_oss.GptOssExperts.__dict__["_apply_gate"],
        minimax.MiniMaxM3VLExperts.__dict__["_apply_gate"],
    )
    stock_mlp = minimax.MiniMaxM3VLDenseMLP.__dict__["forward"]
    forward_rewrite.install(cache_dir=tmp_path)
    gate = sites("GptOssForCausalLM", "gated-mlp")["GptOssExperts"]
    assert gate["kind"] == "experts-gate" and gate["installed"], gate
    assert gate["original_sha256"]
    assert gate["lowered"]["alpha"] == "self.alpha"
    assert gate["lowered"]["layout"] == "interleaved"
    source = _source(gpt_oss.GptOssExperts._apply_gate)
    assert "fusion_guard.swiglu_alpha(self.alpha)" in source
    assert (
        'activation="swiglu_oai", alpha=_fr_alpha, limit=_fr_limit, interleaved=True'
        in (source)
    )
    # has_bias=True (and the pairs): the experts op stays off; the gate fuses under grouped_mm
    forward = sites("GptOssForCausalLM", "gated-mlp", "experts-forward")[
        "GptOssExperts"
    ]
    assert forward["reason"] == "experts-forward-options", forward
    assert gpt_oss.GptOssExperts not in fusion_guard.experts_forms
    qualname = "MiniMaxM3VLForCausalLM"
    mlp = sites(qualname, "gated-mlp")["MiniMaxM3VLDenseMLP"]
    assert mlp["installed"] and mlp["lowered"]["alpha"] == "self.swiglu_alpha", mlp
    assert "gated_mlp_act_packed(self.gate_up_proj(hidden_states)" in _source(
        minimax.MiniMaxM3VLDenseMLP.forward
    )
    assert sites(qualname, "gated-mlp")["MiniMaxM3VLExperts"]["installed"]
    forward = sites(qualname, "gated-mlp", "experts-forward")["MiniMaxM3VLExperts"]
    assert forward["installed"], forward
    form = fusion_guard.experts_forms[minimax.MiniMaxM3VLExperts]
    assert form.alpha == "swiglu_alpha" and form.limit == "swiglu_limit"
    assert form.clamp_after_activation is False
    forward_rewrite.uninstall()
    assert (
        gpt_oss.GptOssExperts.__dict__["_apply_gate"],
        minimax.MiniMaxM3VLExperts.__dict__["_apply_gate"],
    ) == stock_gates
    assert minimax.MiniMaxM3VLDenseMLP.__dict__["forward"] is stock_mlp
    assert fusion_guard.experts_forms == {}


def test_register_experts_takes_alpha_with_swiglu_oai_only():
    from forward_rewrite import _installer

    with pytest.raises(ValueError, match="alpha"):
        fusion_guard.register_experts(nn.Module, None, None, alpha="alpha")
    with pytest.raises(ValueError, match="alpha"):
        fusion_guard.register_experts(
            nn.Module, None, None, activation="swiglu_oai", limit="limit"
        )
    with pytest.raises(ValueError, match="alpha"):
        fusion_guard.register_experts(
            nn.Module, None, None, activation="swiglu_oai", alpha="1.7", limit="limit"
        )
    with pytest.raises(ValueError, match="clamped"):
        fusion_guard.register_experts(
            nn.Module, None, None, activation="swiglu_oai", alpha="alpha"
        )
    assert fusion_guard.experts_forms == {}
    # the installer's reading of an experts-forward site's lowered
    lowered = {
        "act": "swiglu_oai",
        "activation": "swiglu_oai",
        "alpha": "self.swiglu_alpha",
        "limit": "self.swiglu_limit",
        "clamp": "gate before act",
    }
    assert _installer._experts_clamp({"lowered": lowered}) == {
        "activation": "swiglu_oai",
        "alpha": "swiglu_alpha",
        "limit": "swiglu_limit",
        "clamp_after_activation": False,
    }
    for wrong in (
        {"layout": "interleaved"},
        {"alpha": "config.alpha"},
        {"act": "self.act_fn"},
        {"limit": None},
    ):
        site = {"lowered": {k: v for k, v in {**lowered, **wrong}.items() if v}}
        assert isinstance(_installer._experts_clamp(site), tuple), wrong


def test_moe_experts_guard_passes_a_swiglu_oai_alpha(tmp_path):
    _, minimax = _oai_modules()
    forward_rewrite.install(cache_dir=tmp_path)
    config = minimax.MiniMaxM3VLTextConfig(
        hidden_size=8,
        intermediate_size=8,
        num_local_experts=4,
        swiglu_alpha=1.5,
        swiglu_limit=7.0,
    )
    experts = minimax.MiniMaxM3VLExperts(config).train()
    for p in experts.parameters():
        nn.init.normal_(p)
    plan = _experts_plan(minimax, experts)
    assert plan == {
        "activation": "swiglu_oai",
        "transposed": experts.is_transposed,
        "limit": 7.0,
        "clamp_after_activation": False,
        "alpha": 1.5,
    }, plan
    experts.swiglu_alpha = 2  # an int alpha is a number too
    assert _experts_plan(minimax, experts)["alpha"] == 2.0
    # read on every call: an alpha the op does not take runs stock, uncounted
    for alpha in (torch.tensor(1.5), float("nan"), float("inf"), True, None):
        experts.swiglu_alpha = alpha
        before = dict(fusion_guard.taken)
        assert _experts_plan(minimax, experts) is None, alpha
        assert fusion_guard.taken == before, alpha


def _set_oai(model, limit, alpha=None):
    """Every GPT-OSS / MiniMax-M3 MLP and experts module's limit (and alpha) set; how many."""
    changed = 0
    for m in model.modules():
        if type(m).__name__.endswith(("MLP", "Experts")):
            for name in ("limit", "swiglu_limit"):
                if isinstance(getattr(m, name, None), (int, float)):
                    setattr(m, name, limit)
                    changed += 1
            for name in ("alpha", "swiglu_alpha"):
                if alpha is not None and isinstance(getattr(m, name, None), float):
                    setattr(m, name, alpha)
    return changed


OAI_MODELS = [
    ("gpt_oss", "GptOssForCausalLM", "grouped_mm", ("gated-mlp",)),
    ("gpt_oss", "GptOssForCausalLM", "eager", ("gated-mlp",)),
    (
        "minimax_m3_vl",
        "MiniMaxM3VLForCausalLM",
        "grouped_mm",
        ("gated-mlp", "experts-forward"),
    ),
    ("minimax_m3_vl", "MiniMaxM3VLForCausalLM", "eager", ("gated-mlp",)),
]


@pytest.mark.parametrize(
    "family, qualname, implementation, fused",
    OAI_MODELS,
    ids=[f"{c[0]}-{c[2]}" for c in OAI_MODELS],
)
def test_swiglu_oai_models_match_stock_with_tight_limits(
    family, qualname, implementation, fused, tmp_path
):
    """GPT-OSS's gate on interleaved pairs (both experts implementations call the class's
    ``_apply_gate``: ``grouped_mm`` once per layer on every routed row, ``eager`` per expert
    on its rows) and MiniMax-M3's dense MLP, gate and ``experts-forward`` (``grouped_mm``),
    with limits tight enough to clamp and an alpha of its own: loss and every gradient match
    stock, each fused path counted."""
    import importlib

    from forward_rewrite import verify

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    model = verify.tiny_model(getattr(module, qualname))
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert experts
    for m in experts:
        m.config._experts_implementation = implementation
    inputs = verify.tiny_inputs(model)
    loose = copy.deepcopy(model)
    assert _set_oai(loose, float("inf"), 1.25) and _set_oai(model, 0.05, 1.25)
    _, _, loose_grads = loss_and_grads(loose, dict(inputs))
    stock_model = copy.deepcopy(model)
    want_loss, _, want_grads = loss_and_grads(stock_model, dict(inputs))
    # the tight limits change the gradients at order one: the clamps are compared
    assert verify.grad_error(loose_grads, want_grads)[0] > 100 * GRAD_TOL
    forward_rewrite.install(cache_dir=tmp_path)
    before = dict(fusion_guard.taken)
    got_loss, _, got_grads = loss_and_grads(model, dict(inputs))
    for name in ("gated-mlp", "experts-forward"):
        ran = fusion_guard.taken[name] - before[name]
        assert (ran > 0) == (name in fused), (name, ran)
    assert rel_err(got_loss, want_loss) <= LOSS_TOL
    assert set(got_grads) == set(want_grads)
    worst, name = verify.grad_error(got_grads, want_grads)
    assert worst <= GRAD_TOL, (name, worst)


def test_gpt_oss_check_class_verifies_with_the_interleaved_gate_fused():
    from forward_rewrite import verify

    result = verify.check_class(
        ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssForCausalLM")
    )
    assert result["status"] == "verified", result
    assert "gated-mlp:GptOssExperts" in result["fusion_sites"], result
    assert result["fusions_taken"]["gated-mlp"] > 0, result
    assert result["fusions_taken"]["experts-forward"] == 0, result
