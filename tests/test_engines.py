"""How the guard and the op treat heads under engines and adapters (``engines.py``): which
hooks are an engine's, the call through the head module (hooks run around the fused op, the
weight is read only once gathered, a cast output keeps the exact loss), FSDP2 in one
process (a head unit under a mixed-precision policy that casts outputs, tensor-parallel
refusal), frozen heads (no weight gradient computed, on both gradient paths), PEFT LoRA
heads the op cannot represent, and the counters and log line a user reads."""

import json
import logging

import forward_rewrite
import pytest
import torch
from forward_rewrite import _cpu, engines, guard, ops
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, HIDDEN = 96, 32


def tiny_llama(tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).train()


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


@pytest.fixture(autouse=True)
def fresh_state():
    guard._logged.clear()
    forward_rewrite.reset_stats()
    yield
    forward_rewrite.uninstall()


def hook_from(module_name):
    """A hook function that looks like one an engine registered (defined in its module)."""

    def hook(*args, **kwargs):
        return None

    hook.__module__ = module_name
    return hook


FSDP_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_state"
DEEPSPEED_MODULE = "deepspeed.runtime.zero.parameter_offload"


# ------------------------------------------------------------------- which hooks


def test_engine_hooks_are_told_from_other_hooks():
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    assert engines.head_route(head)[0].kind == "direct"
    handles = [head.register_forward_pre_hook(hook_from(DEEPSPEED_MODULE))]
    handles.append(head.register_forward_hook(hook_from("deepspeed.utils.nvtx")))
    assert engines.head_route(head)[0].kind == "deepspeed"
    user = head.register_forward_hook(lambda *a: None)
    assert engines.head_route(head) == (None, "head-hooks")
    user.remove()
    for h in handles:
        h.remove()
    # A decorated bound method of an FSDP object is FSDP's (functools.wraps, __func__).
    state = type("FSDPState", (), {"_pre_forward": hook_from(FSDP_MODULE)})()
    head.register_forward_pre_hook(state._pre_forward, with_kwargs=True)
    assert engines.head_route(head)[0].kind == "fsdp2"
    head.register_forward_pre_hook(hook_from(DEEPSPEED_MODULE))
    assert engines.head_route(head) == (None, "head-hooks")  # two engines: refuse


def test_a_replaced_forward_or_a_global_hook_is_foreign():
    head = nn.Linear(HIDDEN, VOCAB)
    head.forward = lambda x: x  # accelerate's add_hook_to_module does this
    assert engines.head_route(head) == (None, "head-hooks")
    head = nn.Linear(HIDDEN, VOCAB)
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert engines.head_route(head) == (None, "head-hooks")
    finally:
        handle.remove()
    assert engines.head_route(nn.Sequential(head)) == (None, "head-not-linear")


# ----------------------------------------------------- the call through the module


class Zero3Like:
    """ZeRO-3 in miniature: the head holds an empty weight (``ds_shape`` says the real
    one); a pre-hook gathers it, a post-hook releases it, sees the output and hooks it to
    gather again before backward; hooks are attributed to DeepSpeed."""

    def __init__(self, head, gather=True):
        self.full = head.weight.detach().clone()
        self.seen = []
        head.weight = nn.Parameter(torch.empty(0))
        head.weight.ds_shape = self.full.shape

        def pre(module, args):
            if gather:
                module.weight.data = self.full

        def post(module, args, output):
            self.seen.append(output)
            module.weight.data = torch.empty(0)

            def pre_backward(grad):
                module.weight.data = self.full
                return grad

            output.register_hook(pre_backward)

        pre.__module__ = post.__module__ = DEEPSPEED_MODULE
        head.register_forward_pre_hook(pre)
        head.register_forward_hook(post)


def test_a_gathering_engine_runs_the_fused_op_inside_the_forward():
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    h = torch.randn(2, 9, HIDDEN, requires_grad=True)
    _, labels = batch()
    labels = labels[:, :9]
    want = forward_rewrite.fused_lm_head_loss(h, head.weight.detach().clone(), labels)
    zero = Zero3Like(head)
    model = tiny_llama()
    assert guard._refusal(model, head, VOCAB) is None  # ds_shape, not the empty weight
    loss = forward_rewrite.fused_lm_head_loss(h, head, labels, vocab_size=VOCAB)
    assert torch.equal(loss, want)
    assert zero.seen == [loss]  # the post-hook saw the loss
    assert head.weight.numel() == 0  # released after the call
    assert "forward" not in vars(head)  # the substitute is gone
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.shape == (VOCAB, HIDDEN)


def test_a_weight_still_sharded_inside_the_forward_is_an_error_not_a_loss():
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    Zero3Like(head, gather=False)
    h = torch.randn(2, 5, HIDDEN)
    labels = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(RuntimeError, match="still sharded"):
        forward_rewrite.fused_lm_head_loss(h, head, labels)
    assert "forward" not in vars(head)


def test_a_cast_output_keeps_the_exact_loss_and_the_hooks_gradient_path():
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB)
    h = torch.randn(2, 7, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 7))
    want = forward_rewrite.fused_lm_head_loss(h, head, labels)
    (want_dh,) = torch.autograd.grad(want * 3, h)
    seen_grads = []

    def post(module, args, output):  # FSDP2's MixedPrecisionPolicy(output_dtype=bf16)
        out = output.to(torch.bfloat16)
        out.register_hook(seen_grads.append)
        return out

    post.__module__ = FSDP_MODULE
    head.register_forward_hook(post)
    loss = forward_rewrite.fused_lm_head_loss(h, head, labels)
    assert loss.dtype == torch.float32 and loss.item() == want.item()
    (dh,) = torch.autograd.grad(loss * 3, h)
    assert len(seen_grads) == 1  # the gradient went through the hooks' tensor
    torch.testing.assert_close(dh, want_dh, rtol=0, atol=0)


# ---------------------------------------------------------------- FSDP2, one rank


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return out, grads


def test_fsdp2_head_unit_with_an_output_cast_fuses_with_the_exact_loss(one_rank_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ids, labels = batch()
    model = forward_rewrite.patch_model(tiny_llama())
    want, want_grads = loss_and_grads(model, ids, labels)  # fused, no engine
    model = forward_rewrite.patch_model(tiny_llama())
    policy = MixedPrecisionPolicy(output_dtype=torch.bfloat16)
    fully_shard(model.lm_head, mp_policy=policy)
    fully_shard(model)
    assert type(model.lm_head).__name__ == "FSDPLinear"
    out, grads = loss_and_grads(model, ids, labels)
    assert out.logits is None and out.loss.dtype == torch.float32
    assert out.loss.item() == want.loss.item()
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
    assert forward_rewrite.stats()["classes"][
        "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    ]["routes"] == {"direct": 1, "fsdp2": 1}


def test_a_tensor_parallel_head_is_refused(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight = nn.Parameter(
        distribute_tensor(head.weight.detach(), mesh, [Shard(0)])
    )
    assert guard._refusal(tiny_llama(), head, VOCAB) == "head-sharded"


# ----------------------------------------------------------------- frozen heads


def spy_backend(monkeypatch):
    """The ``weight_grad`` of every backend call; a call without it returns no dW."""
    calls = []
    real = _cpu.fused_ce

    def spy(*args, **kwargs):
        calls.append(kwargs["weight_grad"])
        out = real(*args, **kwargs)
        if not kwargs["weight_grad"]:
            assert out[2] is None
        return out

    monkeypatch.setattr(_cpu, "fused_ce", spy)
    return calls


def test_a_frozen_head_computes_no_weight_gradient(monkeypatch):
    ids, labels = batch()
    stock = tiny_llama()
    stock.lm_head.weight.requires_grad_(False)
    _, want = loss_and_grads(stock, ids, labels)
    model = forward_rewrite.patch_model(tiny_llama())
    model.lm_head.weight.requires_grad_(False)
    calls = spy_backend(monkeypatch)
    out, grads = loss_and_grads(model, ids, labels)
    assert out.logits is None and calls == [False]
    assert model.lm_head.weight.grad is None
    assert forward_rewrite.stats()["dw_skipped"] == 1
    assert grads.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_frozen_head_on_the_backward_path_computes_no_weight_gradient(
    monkeypatch, dtype
):
    """reduction="none" and float16 compute gradients in backward (the second op)."""
    torch.manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN).to(dtype)
    h = torch.randn(11, HIDDEN).to(dtype).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (11,))
    reduction = "none" if dtype == torch.float32 else "mean"
    calls = spy_backend(monkeypatch)
    loss = forward_rewrite.fused_lm_head_loss(h, w, labels, reduction=reduction)
    (dh,) = torch.autograd.grad(loss.sum(), h)
    assert calls == [False, False]  # forward (loss only) and backward, no dW
    h64 = h.detach().double().requires_grad_(True)
    logits = h64 @ w.double().T
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[1:]
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction=reduction)
    (want,) = torch.autograd.grad(ref.sum(), h64)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(dh.double(), want, rtol=tol, atol=tol)


# ------------------------------------------------------------------- PEFT heads


def lora_head(**config):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    config = peft.LoraConfig(
        r=4, target_modules=["lm_head"], init_lora_weights=False, **config
    )
    return peft.get_peft_model(model, config).base_model.model


def test_lora_heads_the_op_cannot_represent_are_refused():
    model = lora_head(use_dora=True)
    assert engines.head_route(model.lm_head) == (None, "head-lora-unsupported")
    model = lora_head(lora_bias=True)
    assert engines.head_route(model.lm_head) == (None, "head-lora-unsupported")
    model = lora_head()
    assert engines.head_route(model.lm_head)[0].kind == "peft-lora"
    model.lm_head.merge()  # the update is in the base weight: the base layer alone
    route, _ = engines.head_route(model.lm_head)
    assert (route.kind, route.module) == ("direct", model.lm_head.base_layer)
    model.lm_head.unmerge()
    model.lm_head.lora_B["default"].register_forward_hook(lambda *a: None)
    assert engines.head_route(model.lm_head) == (None, "head-hooks")


def test_a_lora_head_matches_its_module():
    model = lora_head()
    head = model.lm_head
    torch.manual_seed(0)
    h = torch.randn(2, 9, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9))
    logits = head(h)
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1)
    )
    params = [h, head.lora_A["default"].weight, head.lora_B["default"].weight]
    want_grads = torch.autograd.grad(want, params)
    loss = forward_rewrite.fused_lm_head_loss(h, head, labels, vocab_size=VOCAB)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------- what a user can read


def test_counters_audit_and_the_log_line(caplog):
    ids, labels = batch()
    model = forward_rewrite.patch_model(tiny_llama())
    with caplog.at_level(logging.INFO, logger="forward_rewrite"):
        model(input_ids=ids, labels=labels).loss.backward()
        model(input_ids=ids, labels=labels).loss.backward()
        model.eval()
        model(input_ids=ids, labels=labels)
    fused_lines = [r for r in caplog.records if "uses the fused" in r.getMessage()]
    assert len(fused_lines) == 1 and "route: direct" in fused_lines[0].getMessage()
    key = "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    stats = forward_rewrite.stats()
    assert stats["classes"][key] == {
        "fused": 2,
        "routes": {"direct": 2},
        "fallback": {"eval-mode": 1},
    }
    assert stats["op_calls"] == {"cpu": 2}
    assert (stats["fused"], stats["fallback"]) == (2, 1)
    audit = forward_rewrite.audit()
    json.dumps(audit)  # JSON-safe
    assert audit["runtime"] == stats
    entry = next(c for c in audit["classes"] if c["qualname"] == "LlamaForCausalLM")
    assert entry["calls"] == stats["classes"][key]
    forward_rewrite.reset_stats()
    assert forward_rewrite.stats()["fused"] == 0


def test_the_op_module_refuses_a_module_it_cannot_compute():
    with pytest.raises(TypeError, match="^head"):
        ops.fused_lm_head_loss(
            torch.randn(2, 3, HIDDEN), nn.Sequential(), torch.zeros(2, 3, dtype=int)
        )
