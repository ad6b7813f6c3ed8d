"""The memory-lean MoE experts op (``forward_rewrite.moe_experts``) and its ``experts-forward``
sites: the op against transformers' ``grouped_mm_experts_forward`` and a float64 loop over the
experts (output and every gradient), what its backward keeps, ``torch.compile`` and
``opcheck``, bad arguments; the run-time guard's refusals; the installer's binding to the
running transformers functions and its undoing."""

import copy
import types

import forward_rewrite
import pytest
import torch
from forward_rewrite import _experts_forward, _moe_op, fusion_guard
from forward_rewrite.verify import GRAD_TOL, LOSS_TOL
from model_cases import batch, build, loss_and_grads, rel_err
from torch import nn
from transformers.integrations import moe

ACTS = {"silu": nn.SiLU(), "gelu_tanh": nn.GELU(approximate="tanh")}


@pytest.fixture(autouse=True)
def stock_afterwards():
    forward_rewrite.uninstall()
    yield
    forward_rewrite.uninstall()


def rel(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


def problem(
    tokens=29,
    hidden=16,
    inter=8,
    experts=6,
    top_k=3,
    dtype=torch.float32,
    transposed=False,
    weights_dtype=None,
    seed=0,
):
    """Random experts and a skewed routing (some experts get no row)."""
    g = torch.Generator().manual_seed(seed)
    shape1 = (
        (experts, hidden, 2 * inter) if transposed else (experts, 2 * inter, hidden)
    )
    shape2 = (experts, inter, hidden) if transposed else (experts, hidden, inter)
    w1 = (torch.randn(shape1, generator=g) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(shape2, generator=g) * inter**-0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, experts, generator=g) + torch.linspace(3, -3, experts)
    top_w, top_i = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return x, top_i, top_w.to(weights_dtype or dtype), w1, w2


def stock_module(w1, w2, activation, transposed):
    """What transformers' grouped_mm_experts_forward reads of an experts module."""
    act = ACTS[activation]
    m = types.SimpleNamespace(
        num_experts=w1.shape[0],
        has_gate=True,
        has_bias=False,
        has_post_expert_norm=False,
        is_transposed=transposed,
        _is_expert_parallel=False,
        gate_up_proj=w1,
        down_proj=w2,
    )
    m._apply_gate = lambda gu: act(gu.chunk(2, dim=-1)[0]) * gu.chunk(2, dim=-1)[1]
    return m


def reference(x, top_i, top_w, w1, w2, activation, transposed):
    """A loop over the experts (what the op computes, in the inputs' dtype)."""
    act = ACTS[activation]
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(top_i == e)
        a = w1[e] if transposed else w1[e].t()
        b = w2[e] if transposed else w2[e].t()
        gate, up = (x[tok] @ a).chunk(2, dim=-1)
        y = (act(gate) * up) @ b
        out = out.index_add(0, tok, y * top_w[tok, slot].unsqueeze(-1))
    return out


def run(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    differentiable = [t for t in inputs if t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, differentiable, grad)]


def ours(activation, transposed):
    def f(x, top_i, top_w, w1, w2):
        return forward_rewrite.moe_experts(
            x, top_i, top_w, w1, w2, activation=activation, transposed=transposed
        )

    return f


def stock(activation, transposed):
    def f(x, top_i, top_w, w1, w2):
        m = stock_module(w1, w2, activation, transposed)
        return moe.grouped_mm_experts_forward(m, x, top_i, top_w)

    return f


def ref(activation, transposed):
    def f(x, top_i, top_w, w1, w2):
        return reference(x, top_i, top_w, w1, w2, activation, transposed)

    return f


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_matches_stock_and_the_float64_loop(
    activation, transposed, blocks, monkeypatch
):
    if blocks == "many":
        # The backward's blocks of routed rows: 3 rows each, experts across blocks.
        monkeypatch.setattr(_moe_op, "_BLOCK_BYTES", 3 * 8 * 4)
    inputs = problem(transposed=transposed)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    got = run(ours(activation, transposed), inputs, grad)
    want = run(stock(activation, transposed), inputs, grad)
    exact = run(
        ref(activation, transposed),
        [t.double() if t.is_floating_point() else t for t in inputs],
        grad.double(),
    )
    names = ["out", "dx", "dweights", "dgate_up_proj", "ddown_proj"]
    for name, a, b, c in zip(names, got, want, exact, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) <= 1e-5, (name, rel(a, b))
        assert rel(a, c) <= 1e-5, (name, rel(a, c))


@pytest.mark.parametrize("after", [False, True], ids=["deepseek-v4", "step-3.7"])
def test_clamped_gate_matches_stock_and_the_float64_loop(after):
    """The experts of DeepSeek-V4 / GLM-5-Next / HY-V4 (gate clamped before SiLU) and
    Step-3.7 (the activation clamped), whose ``_apply_gate`` clamps gate and up at a limit:
    ``limit`` / ``clamp_after_activation`` of the op against transformers' function running
    that gate, and a float64 loop."""
    limit = 0.4  # the projections are ~N(0, 1): a good share of the rows clamp

    def gate_of(act):
        def apply_gate(gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            gate = act(gate).clamp(max=limit) if after else act(gate.clamp(max=limit))
            return gate * up.clamp(min=-limit, max=limit)

        return apply_gate

    def stock_clamped(x, top_i, top_w, w1, w2):
        m = stock_module(w1, w2, "silu", False)
        m._apply_gate = gate_of(nn.SiLU())
        return moe.grouped_mm_experts_forward(m, x, top_i, top_w)

    def ours_clamped(x, top_i, top_w, w1, w2):
        return forward_rewrite.moe_experts(
            x, top_i, top_w, w1, w2, limit=limit, clamp_after_activation=after
        )

    def ref_clamped(x, top_i, top_w, w1, w2):
        out = torch.zeros_like(x)
        for e in range(w1.shape[0]):
            tok, slot = torch.where(top_i == e)
            y = gate_of(nn.SiLU())(x[tok] @ w1[e].t()) @ w2[e].t()
            out = out.index_add(0, tok, y * top_w[tok, slot].unsqueeze(-1))
        return out

    inputs = problem(seed=7)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(8))
    got = run(ours_clamped, inputs, grad)
    want = run(stock_clamped, inputs, grad)
    exact = run(
        ref_clamped,
        [t.double() if t.is_floating_point() else t for t in inputs],
        grad.double(),
    )
    plain = run(ours("silu", False), inputs, grad)
    names = ["out", "dx", "dweights", "dgate_up_proj", "ddown_proj"]
    for name, a, b, c, p in zip(names, got, want, exact, plain, strict=True):
        assert rel(a, b) <= 1e-5, (name, rel(a, b))
        assert rel(a, c) <= 1e-5, (name, rel(a, c))
        assert rel(a, p) > 1e-3, (name, "the clamp changed nothing")


@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_is_as_close_to_float64_as_stock(weights_dtype):
    """16-bit experts; the routing weights of their dtype or float32 (a router that keeps
    them float32: the stock products promote, and so does the op's gradient)."""
    inputs = problem(
        tokens=64, hidden=64, inter=32, experts=8, top_k=4,
        dtype=torch.bfloat16, weights_dtype=weights_dtype, seed=3,
    )  # fmt: skip
    grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    got = run(ours("silu", False), inputs, grad.bfloat16())
    want = run(stock("silu", False), inputs, grad.bfloat16())
    exact = run(
        ref("silu", False),
        [t.double() if t.is_floating_point() else t for t in inputs],
        grad.double(),
    )
    for i, (a, b, c) in enumerate(zip(got, want, exact, strict=True)):
        assert a.dtype == b.dtype, i
        # one or two bfloat16 roundings of every product, as stock
        assert rel(a, c) <= max(1.5 * rel(b, c), 8e-3), (i, rel(a, c), rel(b, c))


def test_backward_keeps_only_gate_up_of_the_routed_rows():
    """What autograd holds between forward and backward (saved-tensor hooks): stock keeps
    the gathered input, gate_up, the gated product and the down output, all (tokens x
    top_k) rows; the op keeps gate_up and the routing (the inputs are the caller's)."""
    x, top_i, top_w, w1, w2 = problem(tokens=64, hidden=32, inter=8, experts=4, top_k=4)
    routed = top_i.numel()

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        leaves = [
            t.requires_grad_(t.is_floating_point()) for t in (x, top_i, top_w, w1, w2)
        ]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*leaves)
        own = {t.untyped_storage().data_ptr() for t in leaves}
        out.sum().backward()
        return sum(n for p, n in seen.items() if p not in own)

    lean = saved_bytes(ours("silu", False))
    full = saved_bytes(stock("silu", False))
    gate_up = routed * 2 * 8 * 4
    # gate_up, plus the permutation (int64) and offsets (int32)
    assert lean <= gate_up + routed * 8 + 4 * 4 + 64, lean
    # stock: x gathered (32 wide), gate_up (16), product (8), down output (32)
    assert full >= routed * (32 + 16 + 8 + 32) * 4, full


def test_only_the_needed_gradients():
    x, top_i, top_w, w1, w2 = problem()
    x.requires_grad_()
    out = forward_rewrite.moe_experts(x, top_i, top_w, w1, w2)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    want = stock("silu", False)(x, top_i, top_w, w1, w2)
    (dx_stock,) = torch.autograd.grad(want.sum(), [x])
    assert rel(dx, dx_stock) <= 1e-5
    # Frozen experts (adapters elsewhere): no weight gradient is formed.
    w1.requires_grad_()
    out = forward_rewrite.moe_experts(x, top_i, top_w, w1, w2)
    dx, dw1 = torch.autograd.grad(out.sum(), [x, w1])
    assert dw1.shape == w1.shape


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    inputs = problem(transposed=True)
    fn = ours("gelu_tanh", True)

    def loss(*args):
        out = fn(*args)
        return (out * torch.linspace(-1, 1, out.shape[-1])).sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    a = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    b = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    la, lb = compiled(*a), loss(*b)
    la.backward()
    lb.backward()
    assert rel(la, lb) <= 1e-6
    for x, y in zip(a, b, strict=True):
        if x.is_floating_point():
            assert rel(x.grad, y.grad) <= 1e-5


def test_opcheck_validates_the_registrations():
    ops = torch.ops.forward_rewrite
    x, top_i, top_w, w1, w2 = problem()
    args = (
        x.requires_grad_(),
        top_i,
        top_w.requires_grad_(),
        w1.requires_grad_(),
        w2.requires_grad_(),
        "silu",
        False,
    )
    torch.library.opcheck(
        ops.moe_experts.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    _, gate_up, perm, offsets = ops.moe_experts(
        *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    )
    torch.library.opcheck(
        ops.moe_experts_backward.default,
        (
            torch.randn(x.shape),
            x.detach(),
            top_w.detach(),
            w1.detach(),
            w2.detach(),
            gate_up,
            perm,
            offsets,
            "silu",
            False,
            True,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


X, I, WT, W1, W2 = problem()


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: forward_rewrite.moe_experts(X[0], I, WT, W1, W2), ValueError, "x"),
        (lambda: forward_rewrite.moe_experts(X.long(), I, WT, W1, W2), TypeError, "x"),
        (lambda: forward_rewrite.moe_experts(X, I.float(), WT, W1, W2), TypeError, "top_k_index"),
        (lambda: forward_rewrite.moe_experts(X, I[:3], WT, W1, W2), ValueError, "top_k_index"),
        (lambda: forward_rewrite.moe_experts(X, I, WT[:, :1], W1, W2), ValueError, "top_k_weights"),
        (lambda: forward_rewrite.moe_experts(X, I, WT, W1[:, :, :4], W2), ValueError, "gate_up_proj"),
        (lambda: forward_rewrite.moe_experts(X, I, WT, W1, W2[:, :, :4]), ValueError, "down_proj"),
        (lambda: forward_rewrite.moe_experts(X, I, WT, W1, W2.double()), TypeError, "down_proj"),
        (lambda: forward_rewrite.moe_experts(X, I, WT, W1, W2, activation="relu"), ValueError, "activation"),
        (lambda: forward_rewrite.moe_experts(X, I, WT, W1, W2, transposed=1), TypeError, "transposed"),
        # (gate_up_proj is square here: read transposed, down_proj is the wrong shape)
        (lambda: forward_rewrite.moe_experts(X, I, WT, W1, W2, transposed=True), ValueError, "down_proj"),
        (lambda: forward_rewrite.moe_experts(X, I, WT, W1[:, :7], W2), ValueError, "gate_up_proj"),
    ],
)  # fmt: skip
def test_bad_arguments_name_themselves(call, error, name):
    with pytest.raises(error, match=rf"^{name}:"):
        call()


# ---- the experts-forward sites --------------------------------------------------------------


def _qwen3_moe(tmp_path, **install):
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    torch.manual_seed(0)
    model = build("qwen3_moe")
    model.config._experts_implementation = "grouped_mm"
    stock_model = copy.deepcopy(model)
    forward_rewrite.install(cache_dir=tmp_path, **install)
    return model, stock_model, modeling_qwen3_moe.Qwen3MoeExperts


def _forward_site(qualname="Qwen3MoeForCausalLM"):
    entry = next(
        c for c in forward_rewrite.audit()["classes"] if c["qualname"] == qualname
    )
    return next(
        s
        for s in entry["passes"]["gated-mlp"]["sites"]
        if s["kind"] == "experts-forward"
    )


def test_guard_refuses_what_the_op_does_not_compute(tmp_path):
    model, _, experts_cls = _qwen3_moe(tmp_path)
    assert _forward_site()["installed"]
    experts = next(m for m in model.modules() if isinstance(m, experts_cls))
    x = torch.randn(5, model.config.hidden_size)
    top_w, top_i = torch.topk(torch.randn(5, experts.num_experts).softmax(-1), 2)
    assert fusion_guard.moe_experts(experts, x, top_i, top_w) == {
        "activation": "silu",
        "transposed": False,
    }
    with torch.no_grad():
        assert fusion_guard.moe_experts(experts, x, top_i, top_w) is None
    with fusion_guard.disabled():
        assert fusion_guard.moe_experts(experts, x, top_i, top_w) is None
    assert fusion_guard.moe_experts(experts, x.double(), top_i, top_w) is None
    assert fusion_guard.moe_experts(experts, x[:, :-1], top_i, top_w) is None
    assert fusion_guard.moe_experts(experts, x, top_i[:3], top_w[:3]) is None
    assert fusion_guard.moe_experts(experts, x, top_i.float(), top_w) is None
    for attribute, value in [
        ("training", False),
        ("has_bias", True),
        ("has_post_expert_norm", True),
        ("_is_expert_parallel", True),
        ("is_concatenated", False),
        ("num_experts", experts.num_experts + 1),
    ]:
        old = getattr(experts, attribute)
        setattr(experts, attribute, value)
        assert fusion_guard.moe_experts(experts, x, top_i, top_w) is None, attribute
        setattr(experts, attribute, old)
    # An instance's own gate, a hooked activation, another activation: stock.
    experts._apply_gate = lambda gate_up: gate_up
    assert fusion_guard.moe_experts(experts, x, top_i, top_w) is None
    del experts._apply_gate
    handle = experts.act_fn.register_forward_hook(lambda *a: None)
    assert fusion_guard.moe_experts(experts, x, top_i, top_w) is None
    handle.remove()
    act = experts.act_fn
    experts.act_fn = nn.ReLU()
    assert fusion_guard.moe_experts(experts, x, top_i, top_w) is None
    experts.act_fn = act
    # A class the installer did not register (a subclass, say): stock.
    experts.__class__ = type("Sub", (experts_cls,), {})
    assert fusion_guard.moe_experts(experts, x, top_i, top_w) is None


def test_patched_qwen3_moe_matches_stock_with_checkpointing(tmp_path):
    model, stock_model, _ = _qwen3_moe(tmp_path)
    for m in (model, stock_model):
        m.gradient_checkpointing_enable()
    inputs = batch()
    want_loss, _, want_grads = loss_and_grads(stock_model, inputs)
    before = fusion_guard.taken["experts-forward"]
    got_loss, _, got_grads = loss_and_grads(model, inputs)
    # each layer: the forward and its recomputation
    layers = model.config.num_hidden_layers
    assert fusion_guard.taken["experts-forward"] - before == 2 * layers
    assert rel_err(got_loss, want_loss) <= LOSS_TOL
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= GRAD_TOL, name


def test_another_tools_grouped_mm_is_left_alone(monkeypatch, tmp_path):
    def theirs(self, hidden_states, top_k_index, top_k_weights):
        return moe.grouped_mm_experts_forward(
            self, hidden_states, top_k_index, top_k_weights
        )

    monkeypatch.setitem(moe.ALL_EXPERTS_FUNCTIONS._local_mapping, "grouped_mm", theirs)
    _qwen3_moe(tmp_path)
    site = _forward_site()
    assert site["reason"] == "site-replaced" and not site["installed"], site
    assert moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"] is theirs
    forward_rewrite.uninstall()
    assert moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"] is theirs


def test_a_transformers_function_other_than_the_one_read_is_left_alone(
    monkeypatch, tmp_path
):
    def _grouped_linear(input, weight, offs, bias=None, is_transposed=False):
        out = moe._grouped_mm(input, weight.transpose(-2, -1), offs=offs)
        return out * 2.0

    monkeypatch.setattr(moe, "_grouped_linear", _grouped_linear)
    _qwen3_moe(tmp_path)
    site = _forward_site()
    assert site["reason"] == "site-source-mismatch", site
    assert "_grouped_linear" in site["detail"]
    assert moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"] is moe.grouped_mm_experts_forward


def test_uninstall_puts_back_a_previous_local_entry(monkeypatch, tmp_path):
    own = (
        moe.grouped_mm_experts_forward
    )  # a user's local registration of the same function
    monkeypatch.setitem(moe.ALL_EXPERTS_FUNCTIONS._local_mapping, "grouped_mm", own)
    _qwen3_moe(tmp_path)
    assert _forward_site()["installed"]
    assert (
        moe.ALL_EXPERTS_FUNCTIONS["grouped_mm"]
        is _experts_forward.grouped_mm_experts_forward
    )
    forward_rewrite.uninstall()
    assert moe.ALL_EXPERTS_FUNCTIONS._local_mapping["grouped_mm"] is own
    assert not fusion_guard.experts_forms


def test_a_kept_graph_is_differentiated_twice_alike(monkeypatch):
    """The backward writes gate_up's gradient over gate_up only when the graph is not kept
    (``retain_graph``): a second backward must read the forward's gate_up (here by blocks
    of 5 rows, in both)."""
    monkeypatch.setattr(_moe_op, "_BLOCK_BYTES", 5 * 8 * 4)
    x, top_i, top_w, w1, w2 = problem()
    leaves = [t.requires_grad_() for t in (x, top_w, w1, w2)]
    out = forward_rewrite.moe_experts(x, top_i, top_w, w1, w2)
    grad = torch.randn(out.shape)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
