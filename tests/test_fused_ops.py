"""The fused decoder ops (forward_rewrite.rms_norm, rotary, gated_mlp_act) on the CPU backend,
the Rust twins of the CUDA kernels: against a float64 reference written from the
definitions and against transformers' own modules and functions (LlamaRMSNorm,
Gemma3RMSNorm, Olmo2RMSNorm, Qwen3's q/k norm, apply_rotary_pos_emb of Llama, Phi, GLM,
Cohere and GPT-J, LlamaMLP's activation product, Phi-3's fused gate_up), forward and every
gradient, for each dtype; torch.compile with fullgraph=True; gradcheck in float64;
torch.library.opcheck; bad arguments raise TypeError/ValueError naming the argument.

Tolerances (relative norm errors, ||a - b|| / ||b||):
* float32: 2e-6 forward, 2e-5 gradients, against float64 and against stock;
* bfloat16 / float16: against float64 within 1e-2 / 2e-3 (a few roundings of the dtype), and
  never worse than the stock module's own error by more than 10% (or than the float64
  result rounded to the dtype, the best any result of that dtype can do); forwards that
  round where stock rounds (RMSNorm, the gated product) equal stock on at least 99% of the
  elements.
"""

import functools
import math
import types

import forward_rewrite
import pytest
import torch
import torch.nn.functional as F
from forward_rewrite import _fusions_backend, _fusions_cpu, _native, fused_ops
from forward_rewrite._fusions_backend import CLAMP_GRAD_AT_BOUND, GateFn
from transformers.activations import ACT2FN
from transformers.models.cohere import modeling_cohere
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4UnweightedRMSNorm,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.glm import modeling_glm
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.nanochat.modeling_nanochat import NanoChatRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.phi import modeling_phi
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIXTEEN = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def gen(seed):
    return torch.Generator().manual_seed(seed)


def grads(fn, inputs, grad_outputs):
    """Outputs of fn(*inputs) and the gradients of sum(out * g) for every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = torch.autograd.grad(outs, inputs, grad_outputs, allow_unused=True)
    return [o.detach() for o in outs], list(gs)


def check_against(ours, stock, ref, dtype, what):
    """ours / stock: lists of tensors; ref: float64 tensors of the same quantities."""
    for i, (o, s, r) in enumerate(zip(ours, stock, ref, strict=True)):
        assert o.dtype == s.dtype, f"{what}[{i}]: dtype {o.dtype}, stock {s.dtype}"
        assert o.shape == s.shape, (
            f"{what}[{i}]: shape {tuple(o.shape)}, stock {tuple(s.shape)}"
        )
        e, es = rel(o, r), rel(s, r)
        if dtype == torch.float32:
            tol = 2e-6 if i == 0 else 2e-5
            assert e <= tol and rel(o, s) <= 2 * tol, f"{what}[{i}]: {e:.2e} vs float64"
        else:
            floor = rel(r.to(o.dtype), r)
            assert e <= SIXTEEN[dtype], f"{what}[{i}]: {e:.2e} vs float64"
            assert e <= 1.1 * max(es, floor) + 1e-7, (
                f"{what}[{i}]: {e:.2e} vs float64, stock {es:.2e}, floor {floor:.2e}"
            )


# ---- RMSNorm --------------------------------------------------------------------------------


def rms_reference(x, w, eps, offset):
    x, w = x.double(), w.double()
    return (offset + w) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_case(shape, dtype, w_dtype, offset, seed):
    g = gen(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.2 + 1.0 - offset).to(w_dtype)
    dy = torch.randn(shape, generator=g)
    return x, w, dy


STOCK_NORMS = {
    "llama": (LlamaRMSNorm, 0.0, True),
    "qwen3_qk": (Qwen3RMSNorm, 0.0, True),
    "gemma3": (Gemma3RMSNorm, 1.0, False),
    "olmo2": (Olmo2RMSNorm, 0.0, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", list(STOCK_NORMS))
def test_rms_norm_matches_the_stock_module(family, dtype):
    cls, offset, cast_before = STOCK_NORMS[family]
    # Qwen3's q/k norms normalise each head: (batch, seq, heads, head_dim).
    shape = (2, 9, 4, 128) if family == "qwen3_qk" else (3, 17, 320)
    x, w, dy = rms_case(shape, dtype, dtype, offset, seed=1)
    eps = 1e-6
    module = cls(shape[-1], eps=eps).to(dtype)
    with torch.no_grad():
        module.weight.copy_(w)

    def stock_fn(x, w):
        with torch.no_grad():
            module.weight.copy_(w)
        module.weight.grad = None
        return module(x)

    _, ours_g = grads(
        lambda x, w: forward_rewrite.rms_norm(
            x, w, eps, offset=offset, cast_before_weight=cast_before
        ),
        [x, w],
        dy.to(dtype),
    )
    ours_y = forward_rewrite.rms_norm(
        x, w, eps, offset=offset, cast_before_weight=cast_before
    )
    # Stock gradients: through the module's parameter.
    xs = x.detach().clone().requires_grad_(True)
    stock_y = module(xs)
    stock_y.backward(dy.to(stock_y.dtype))
    stock = [stock_y.detach(), xs.grad, module.weight.grad]
    xr = x.double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    ref_y = rms_reference(xr, wr, eps, offset)
    ref_y.backward(dy.double())
    check_against(
        [ours_y, *ours_g], stock, [ref_y.detach(), xr.grad, wr.grad], dtype, family
    )
    if dtype != torch.float32:
        same = (ours_y == stock_y.detach()).float().mean().item()
        assert same >= 0.99, f"{family}: only {same:.1%} of the outputs equal stock's"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unweighted_rms_norm_matches_nanochat(dtype):
    # NanoChatRMSNorm: self._norm(x.float()).type_as(x), no weight; weight=None.
    g = gen(12)
    x = (torch.randn(3, 17, 320, generator=g) * 2).to(dtype)
    dy = torch.randn(3, 17, 320, generator=g).to(dtype)
    module = NanoChatRMSNorm(eps=1e-6)
    ours = grads(lambda t: forward_rewrite.rms_norm(t, None, 1e-6), [x], dy)
    stock = grads(module, [x], dy)
    ones = torch.ones(320, dtype=torch.float64)
    ref = grads(lambda t: rms_reference(t, ones, 1e-6, 0.0), [x.double()], dy.double())
    check_against(
        ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, "nanochat"
    )
    if dtype != torch.float32:
        assert torch.equal(ours[0][0], stock[0][0])
    with pytest.raises(ValueError, match="^offset"):
        forward_rewrite.rms_norm(x, None, 1e-6, offset=1.0)
    with pytest.raises(ValueError, match="^x"):
        forward_rewrite.rms_norm(x[..., :0], None, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "gemma3", "olmo2"])
def test_add_rms_norm_matches_the_stock_statements(family, dtype):
    """``h = r + h; r = h; h = norm(h)`` of a decoder layer against add_rms_norm: the sum
    bit for bit, the norm as the module's, and the gradients of r, h and the weight when both
    outputs feed the loss (the sum through the next residual)."""
    cls, offset, cast_before = STOCK_NORMS[family]
    shape = (3, 17, 320)
    x, w, dy = rms_case(shape, dtype, dtype, offset, seed=5)
    g = gen(6)
    r = (torch.randn(shape, generator=g) * 3).to(dtype)
    dsum = torch.randn(shape, generator=g)
    eps = 1e-6
    module = cls(shape[-1], eps=eps).to(dtype)

    def stock(r, x, w):
        with torch.no_grad():
            module.weight.copy_(w)
        total = r + x
        return module(total), total

    def ours(r, x, w):
        return forward_rewrite.add_rms_norm(
            r, x, w, eps, offset=offset, cast_before_weight=cast_before
        )

    out_grads = [dy.to(dtype), dsum.to(dtype)]
    ours_out, ours_g = grads(ours, [r, x, w], out_grads)
    # Stock gradients: the weight's through the module's parameter.
    rs, xs = (t.detach().clone().requires_grad_(True) for t in (r, x))
    module.weight.grad = None
    stock_y, stock_sum = stock(rs, xs, w)
    torch.autograd.backward([stock_y, stock_sum], out_grads)
    assert torch.equal(ours_out[1], stock_sum.detach()), "the sum rounds as torch's add"
    rr, xr, wr = (t.double().requires_grad_(True) for t in (r, x, w))
    ref_sum = rr + xr
    ref_y = rms_reference(ref_sum, wr, eps, offset)
    torch.autograd.backward([ref_y, ref_sum], [dy.double(), dsum.double()])
    check_against(
        [ours_out[0], ours_g[0], ours_g[2]],
        [stock_y.detach(), rs.grad, module.weight.grad],
        [ref_y.detach(), rr.grad, wr.grad],
        dtype,
        family,
    )
    assert torch.equal(ours_g[0], ours_g[1]), "both inputs of the add get one gradient"
    # the norm of the rounded sum: exactly rms_norm's on it
    alone = forward_rewrite.rms_norm(
        stock_sum.detach(), w, eps, offset=offset, cast_before_weight=cast_before
    )
    assert torch.equal(ours_out[0], alone)


def test_add_rms_norm_when_one_output_is_unused():
    x, w, dy = rms_case((4, 64), torch.float32, torch.float32, 0.0, seed=7)
    r = torch.randn(4, 64, generator=gen(8))
    for pick in (0, 1):
        a = [t.clone().requires_grad_(True) for t in (r, x, w)]
        forward_rewrite.add_rms_norm(*a, 1e-6)[pick].mul(dy).sum().backward()
        b = [t.clone().requires_grad_(True) for t in (r, x, w)]
        total = b[0] + b[1]
        (rms_reference(total, b[2], 1e-6, 0.0).float(), total)[pick].mul(
            dy
        ).sum().backward()
        for got, want in zip(a, b, strict=True):
            if want.grad is None:
                assert got.grad is None or not got.grad.any()
            else:
                assert rel(got.grad, want.grad) <= 2e-5


@pytest.mark.parametrize(
    "cast_before", [True, False], ids=["llama_order", "gemma_order"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_float32_weight_promotes_like_stock(dtype, cast_before):
    # Mixed precision with float32 parameters: Llama's `weight * x.to(input_dtype)` is
    # float32, Gemma's / OLMo 2's `.type_as(x)` is x's dtype.
    x, w, dy = rms_case((4, 6, 256), dtype, torch.float32, 0.0, seed=2)
    cls = LlamaRMSNorm if cast_before else Olmo2RMSNorm
    module = cls(256, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(w)
    xs = x.detach().clone().requires_grad_(True)
    stock_y = module(xs)
    stock_y.backward(dy.to(stock_y.dtype))
    xo = x.detach().clone().requires_grad_(True)
    wo = w.detach().clone().requires_grad_(True)
    ours_y = forward_rewrite.rms_norm(xo, wo, 1e-5, cast_before_weight=cast_before)
    assert ours_y.dtype == stock_y.dtype == (torch.float32 if cast_before else dtype)
    ours_y.backward(dy.to(ours_y.dtype))
    assert wo.grad.dtype == torch.float32 and xo.grad.dtype == dtype
    xr = x.double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    ref_y = rms_reference(xr, wr, 1e-5, 0.0)
    ref_y.backward(dy.double())
    check_against(
        [ours_y.detach(), xo.grad, wo.grad],
        [stock_y.detach(), xs.grad, module.weight.grad],
        [ref_y.detach(), xr.grad, wr.grad],
        dtype,
        "mixed",
    )


def test_rms_norm_bfloat16_weight_with_float32_input_is_exact_upcast():
    x, w, dy = rms_case((5, 64), torch.float32, torch.bfloat16, 0.0, seed=3)
    module = LlamaRMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(w)
    wo = w.detach().clone().requires_grad_(True)
    y = forward_rewrite.rms_norm(x, wo, 1e-6)
    assert y.dtype == torch.float32
    assert rel(y, module(x)) <= 1e-6
    y.backward(dy)
    assert wo.grad.dtype == torch.bfloat16


def test_rms_norm_float64_matches_the_reference():
    x, w, dy = rms_case((7, 3, 33), torch.float64, torch.float64, 1.0, seed=4)
    for cast_before in (True, False):
        ours = grads(
            lambda x, w, cb=cast_before: forward_rewrite.rms_norm(
                x, w, 1e-6, offset=1.0, cast_before_weight=cb
            ),
            [x, w],
            dy,
        )
        ref = grads(lambda x, w: rms_reference(x, w, 1e-6, 1.0), [x, w], dy)
        for a, b in zip(ours[0] + ours[1], ref[0] + ref[1], strict=True):
            assert rel(a, b) <= 1e-13


def test_rms_norm_only_the_needed_gradients():
    x, w, dy = rms_case((4, 16), torch.float32, torch.float32, 0.0, seed=5)
    xo = x.clone().requires_grad_(True)
    forward_rewrite.rms_norm(xo, w, 1e-6).backward(dy)  # weight needs no gradient
    assert xo.grad is not None and w.grad is None
    wo = w.clone().requires_grad_(True)
    forward_rewrite.rms_norm(x, wo, 1e-6).backward(dy)
    assert wo.grad is not None


def test_rms_norm_non_contiguous_and_empty_inputs():
    _, w, _ = rms_case((6, 40), torch.float32, torch.float32, 0.0, seed=6)
    xt = torch.randn(40, 6).t()  # non-contiguous
    assert (
        rel(forward_rewrite.rms_norm(xt, w, 1e-6), rms_reference(xt, w, 1e-6, 0.0))
        < 2e-6
    )
    empty = torch.zeros(0, 40, requires_grad=True)
    wo = w.clone().requires_grad_(True)
    y = forward_rewrite.rms_norm(empty, wo, 1e-6)
    assert y.shape == (0, 40)
    y.sum().backward()
    assert torch.equal(wo.grad, torch.zeros(40)) and empty.grad.shape == (0, 40)


def test_rms_norm_weight_gradient_is_deterministic_over_many_rows():
    # More rows than one parallel task holds: the partial sums are added in a fixed order.
    x, w, dy = rms_case((1000, 24), torch.bfloat16, torch.bfloat16, 0.0, seed=7)
    runs = [
        grads(lambda x, w: forward_rewrite.rms_norm(x, w, 1e-6), [x, w], dy.bfloat16())
        for _ in range(3)
    ]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r[1], runs[0][1], strict=True))


# ---- gated RMSNorm --------------------------------------------------------------------------


def gated_reference(x, gate, w, eps, activation):
    """The gated norm in float64 from its definition: ``w * rmsnorm(x) * act(gate)``."""
    x, gate, w = x.double(), gate.double(), w.double()
    act = torch.sigmoid(gate) if activation == "sigmoid" else F.silu(gate)
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * act


def gated_case(shape, dtype, w_dtype, seed):
    g = gen(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    gate = (torch.randn(shape, generator=g) * 2).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.2 + 1.0).to(w_dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, gate, w, dy


#: The stock gated norms (transformers 5.23.0): class, activation, cast_before_weight.
STOCK_GATED = {
    "qwen3_next": ("qwen3_next", "Qwen3NextRMSNormGated", "silu", True),
    "kimi_linear": ("kimi_linear", "KimiLinearRMSNormGated", "sigmoid", False),
}


def stock_gated(name):
    module, cls, activation, cast_before = STOCK_GATED[name]
    mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[cls])
    return getattr(mod, cls), activation, cast_before


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", list(STOCK_GATED))
def test_gated_rms_norm_matches_the_stock_module(family, dtype):
    cls, activation, cast_before = stock_gated(family)
    # (tokens, value heads, head_dim): the shape Qwen3-Next's linear attention normalises
    shape = (2, 9, 4, 128)
    x, gate, w, dy = gated_case(shape, dtype, dtype, seed=3)
    eps = 1e-6
    module = cls(shape[-1], eps=eps).to(dtype)
    assert module.activation == activation
    with torch.no_grad():
        module.weight.copy_(w)

    def ours(x, gate, w):
        return forward_rewrite.gated_rms_norm(
            x, gate, w, eps, activation=activation, cast_before_weight=cast_before
        )

    ours_y, ours_g = grads(ours, [x, gate, w], dy)
    xs = x.detach().clone().requires_grad_(True)
    gs = gate.detach().clone().requires_grad_(True)
    stock_y = module(xs, gs)
    stock_y.backward(dy)
    stock = [stock_y.detach(), xs.grad, gs.grad, module.weight.grad]
    xr, gr, wr = (t.double().requires_grad_(True) for t in (x, gate, w))
    ref_y = gated_reference(xr, gr, wr, eps, activation)
    ref_y.backward(dy.double())
    check_against(
        [ours_y[0], *ours_g],
        stock,
        [ref_y.detach(), xr.grad, gr.grad, wr.grad],
        dtype,
        family,
    )
    if dtype != torch.float32:
        same = (ours_y[0] == stock_y.detach()).float().mean().item()
        assert same >= 0.99, f"{family}: only {same:.1%} of the outputs equal stock's"


@pytest.mark.parametrize("cast_before", [True, False])
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("hidden", [1, 7, 300])
def test_gated_rms_norm_float32_weight_and_odd_rows(hidden, activation, cast_before):
    """A float32 weight with bfloat16 x (the product with the weight is then float32:
    nothing rounds before the gate), rows that fill no vector, many rows."""
    x, gate, w, dy = gated_case((70, hidden), torch.bfloat16, torch.float32, seed=4)
    eps = 1e-5

    def stock(x, gate, w):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        h = w * h.to(x.dtype) if cast_before else w.to(torch.float32) * h
        act = torch.sigmoid if activation == "sigmoid" else F.silu
        return (h * act(gate.to(torch.float32))).to(x.dtype)

    def ours(x, gate, w):
        return forward_rewrite.gated_rms_norm(
            x, gate, w, eps, activation=activation, cast_before_weight=cast_before
        )

    ours_y, ours_g = grads(ours, [x, gate, w], dy)
    stock_y, stock_g = grads(stock, [x, gate, w], dy)
    assert ours_y[0].dtype == torch.bfloat16
    assert ours_g[2].dtype == torch.float32
    xr, gr, wr = (t.double().requires_grad_(True) for t in (x, gate, w))
    ref_y = gated_reference(xr, gr, wr, eps, activation)
    ref_y.backward(dy.double())
    check_against(
        [ours_y[0], *ours_g[:2]],
        [stock_y[0], *stock_g[:2]],
        [ref_y.detach(), xr.grad, gr.grad],
        torch.bfloat16,
        f"hidden {hidden}",
    )
    # the float32 weight's gradient: a float32 sum over the rows, of round(xn) when the norm
    # rounds before the weight (as stock: not the float64 definition's)
    assert rel(ours_g[2], stock_g[2]) <= 2e-5
    if not cast_before:
        assert rel(ours_g[2], wr.grad) <= 2e-5


def test_gated_rms_norm_only_the_needed_gradients():
    x, gate, w, dy = gated_case((5, 16), torch.float32, torch.float32, seed=5)
    gate.requires_grad_(True)
    y = forward_rewrite.gated_rms_norm(x, gate, w)
    y.backward(dy)
    assert x.grad is None and w.grad is None
    gr = gate.detach().double().requires_grad_(True)
    gated_reference(x, gr, w, 1e-6, "silu").backward(dy.double())
    assert rel(gate.grad, gr.grad) <= 2e-5


def test_gated_rms_norm_non_contiguous_and_empty_inputs():
    x, gate, w, _ = gated_case((6, 32), torch.float32, torch.float32, seed=6)
    xt, gt = x.t().contiguous().t(), gate[:, :32]
    y = forward_rewrite.gated_rms_norm(xt, gt, w)
    assert torch.equal(y, forward_rewrite.gated_rms_norm(x, gate, w))
    empty = forward_rewrite.gated_rms_norm(x[:0], gate[:0], w)
    assert empty.shape == (0, 32)


#: Mamba-2's gated norm and its copies (transformers 5.23.0): the gate first, in groups.
STOCK_MAMBA_GATED = {
    "mamba2": ("mamba2", "MambaRMSNormGated"),
    "nemotron_h": ("nemotron_h", "NemotronHRMSNormGated"),
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridRMSNormGated"),
}


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", list(STOCK_MAMBA_GATED))
def test_gate_first_gated_rms_norm_matches_the_stock_module(family, dtype, groups):
    module_name, cls_name = STOCK_MAMBA_GATED[family]
    mod = __import__(
        f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[cls_name]
    )
    # (batch, tokens, intermediate): the mixer's output, normalised in groups
    shape = (2, 9, 256)
    size = shape[-1] // groups
    x, gate, w, dy = gated_case(shape, dtype, dtype, seed=13)
    eps = 1e-6
    module = getattr(mod, cls_name)(shape[-1], group_size=size, eps=eps).to(dtype)
    with torch.no_grad():
        module.weight.copy_(w)

    def ours(x, gate, w):
        return forward_rewrite.gated_rms_norm(
            x, gate, w, eps, gate_first=True, group_size=size
        )

    ours_y, ours_g = grads(ours, [x, gate, w], dy)
    xs = x.detach().clone().requires_grad_(True)
    gs = gate.detach().clone().requires_grad_(True)
    stock_y = module(xs, gs)
    stock_y.backward(dy)
    assert stock_y.dtype == ours_y[0].dtype == dtype
    stock = [stock_y.detach(), xs.grad, gs.grad, module.weight.grad]
    xr, gr, wr = (t.double().requires_grad_(True) for t in (x, gate, w))
    u = (xr * F.silu(gr)).view(*shape[:-1], groups, size)
    ref_y = wr * (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)).view(shape)
    ref_y.backward(dy.double())
    check_against(
        [ours_y[0], *ours_g],
        stock,
        [ref_y.detach(), xr.grad, gr.grad, wr.grad],
        dtype,
        f"{family} groups {groups}",
    )
    if dtype != torch.float32:
        same = (ours_y[0] == stock_y.detach()).float().mean().item()
        assert same >= 0.99, f"{family}: only {same:.1%} of the outputs equal stock's"


def test_gate_first_with_a_float32_scan_and_a_bf16_gate_and_weight():
    """Mamba's torch scan hands the norm a float32 x with the bfloat16 gate and weight of a
    bf16 model: stock's result is float32 (the weight promoted); the gate is upcast exactly
    and its gradient comes back in bfloat16."""
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    shape, size, eps = (2, 9, 96), 32, 1e-6
    x, _, _, dy = gated_case(shape, torch.float32, torch.float32, seed=15)
    _, gate, w, _ = gated_case(shape, torch.bfloat16, torch.bfloat16, seed=16)
    module = MambaRMSNormGated(shape[-1], group_size=size, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(w)

    def ours(x, gate, w):
        return forward_rewrite.gated_rms_norm(
            x, gate, w, eps, gate_first=True, group_size=size
        )

    ours_y, ours_g = grads(ours, [x, gate, w], dy)
    xs = x.detach().clone().requires_grad_(True)
    gs = gate.detach().clone().requires_grad_(True)
    stock_y = module(xs, gs)
    stock_y.backward(dy)
    assert ours_y[0].dtype == stock_y.dtype == torch.float32
    assert ours_g[1].dtype == torch.bfloat16 and ours_g[2].dtype == torch.bfloat16
    assert rel(ours_y[0], stock_y) <= 1e-6
    assert rel(ours_g[0], xs.grad) <= 1e-5
    assert rel(ours_g[1], gs.grad) <= 1e-2  # one bf16 rounding each
    assert rel(ours_g[2], module.weight.grad) <= 1e-2


@pytest.mark.parametrize("cast_before", [True, False])
@pytest.mark.parametrize("groups", [1, 3, 5])
def test_gate_first_groups_odd_rows_and_sizes(groups, cast_before):
    """Rows of x whose groups fill no vector (7 elements), many rows, sigmoid, and the
    strict float32 weighting: against the stock expression written out."""
    size = 7
    x, gate, w, dy = gated_case(
        (70, groups * size), torch.float32, torch.float32, seed=14
    )
    eps = 1e-5

    def stock(x, gate, w):
        u = (x.to(torch.float32) * torch.sigmoid(gate.to(torch.float32))).view(
            70, groups, size
        )
        u = (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)).view(x.shape)
        return w * u.to(x.dtype) if cast_before else (w.float() * u).to(x.dtype)

    def ours(x, gate, w):
        return forward_rewrite.gated_rms_norm(
            x,
            gate,
            w,
            eps,
            activation="sigmoid",
            cast_before_weight=cast_before,
            gate_first=True,
            group_size=size,
        )

    ours_y, ours_g = grads(ours, [x, gate, w], dy)
    stock_y, stock_g = grads(stock, [x, gate, w], dy)
    for got, want, what in zip(
        [ours_y[0], *ours_g], [stock_y[0], *stock_g], ["y", "dx", "dgate", "dw"]
    ):
        assert rel(got, want) <= 2e-5, f"{what}: {rel(got, want):.2e}"


# ---- rotary ---------------------------------------------------------------------------------


def rope_tables(
    batch, seq, dim, *, seed, interleaved=False, dtype=torch.float32, base=10000.0
):
    """cos and sin as the rotary embedding modules build them: (batch, seq, dim), angles
    position * inv_freq, duplicated halves (`cat`) or pairs (`repeat_interleave`)."""
    g = gen(seed)
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pos = torch.arange(seq, dtype=torch.float64)[None, :] + torch.randint(
        0, 50, (batch, 1), generator=g
    )
    freqs = pos[..., None] * inv
    emb = (
        freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    )
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_reference(q, k, cos, sin, rd, interleaved, unsqueeze_dim=1):
    def one(x):
        x = x.double()
        c = cos.double().unsqueeze(unsqueeze_dim)
        s = sin.double().unsqueeze(unsqueeze_dim)
        xr, xp = x[..., :rd], x[..., rd:]
        if interleaved:
            rot = torch.stack((-xr[..., 1::2], xr[..., ::2]), -1).flatten(-2)
        else:
            rot = torch.cat((-xr[..., rd // 2 :], xr[..., : rd // 2]), -1)
        return torch.cat((xr * c + rot * s, xp), -1)

    return one(q), one(k)


def qk(batch, heads, kv_heads, seq, head_dim, dtype, *, seed, layout="bhsd"):
    """q, k as attention builds them: projections viewed (batch, seq, heads, head_dim) and
    transposed to (batch, heads, seq, head_dim) (non-contiguous), or left as they are."""
    g = gen(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g).to(dtype)
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q, k


def stock_and_ours_rope(stock_fn, ours_fn, q, k, grad_seed):
    g = gen(grad_seed)
    gq = torch.randn(q.shape, generator=g)
    gk = torch.randn(k.shape, generator=g)
    so, sg = grads(stock_fn, [q, k], [gq.to(q.dtype), gk.to(k.dtype)])
    oo, og = grads(ours_fn, [q, k], [gq.to(q.dtype), gk.to(k.dtype)])
    return (so, sg), (oo, og), (gq, gk)


def reference_rope_grads(q, k, cos, sin, rd, interleaved, gq, gk, unsqueeze_dim=1):
    return grads(
        lambda a, b: rope_reference(a, b, cos, sin, rd, interleaved, unsqueeze_dim),
        [q.double(), k.double()],
        [gq.double(), gk.double()],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_matches_llama(dtype):
    q, k = qk(2, 8, 2, 11, 64, dtype, seed=10)
    cos, sin = rope_tables(1, 11, 64, seed=11, dtype=dtype)  # position_ids (1, seq)
    stock, ours, (gq, gk) = stock_and_ours_rope(
        lambda a, b: modeling_llama.apply_rotary_pos_emb(a, b, cos, sin),
        lambda a, b: forward_rewrite.rotary(a, b, cos, sin),
        q,
        k,
        12,
    )
    ref = reference_rope_grads(q, k, cos, sin, 64, False, gq, gk)
    check_against(
        ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, "llama"
    )
    # Outputs keep q's and k's layouts (here the transposed projections').
    assert ours[0][0].stride() == q.stride() and ours[0][1].stride() == k.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_float32_tables_with_16_bit_q(dtype):
    # Mixed precision: cos/sin float32, q/k bfloat16 -> float32 outputs (promotion), or
    # q's dtype with out_dtype (Cohere / Ernie cast back).
    q, k = qk(2, 4, 4, 6, 32, dtype, seed=13)
    cos, sin = rope_tables(2, 6, 32, seed=14)
    sq, sk = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    oq, ok = forward_rewrite.rotary(q, k, cos, sin)
    assert oq.dtype == sq.dtype == torch.float32
    assert rel(oq, sq) <= 1e-6 and rel(ok, sk) <= 1e-6
    oq, ok = forward_rewrite.rotary(q, k, cos, sin, out_dtype=dtype)
    assert oq.dtype == dtype and rel(oq, sq.to(dtype)) <= (
        1e-6 if dtype == torch.float32 else 4e-3
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_partial_like_phi(dtype):
    # Phi: the first rotary_ndims of each head rotate, the rest pass through.
    head_dim, rd = 80, 32
    q, k = qk(2, 4, 4, 7, head_dim, dtype, seed=15)
    cos, sin = rope_tables(2, 7, rd, seed=16, dtype=dtype)

    def stock_fn(a, b):
        qr, qp = a[..., :rd], a[..., rd:]
        kr, kp = b[..., :rd], b[..., rd:]
        qr, kr = modeling_phi.apply_rotary_pos_emb(qr, kr, cos, sin)
        return torch.cat((qr, qp), dim=-1), torch.cat((kr, kp), dim=-1)

    stock, ours, (gq, gk) = stock_and_ours_rope(
        stock_fn,
        lambda a, b: forward_rewrite.rotary(a, b, cos, sin, rotary_dim=rd),
        q,
        k,
        17,
    )
    ref = reference_rope_grads(q, k, cos, sin, rd, False, gq, gk)
    check_against(ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, "phi")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_interleaved_partial_like_glm(dtype):
    # GLM: cos built as cat(freqs, freqs) over the rotary half of the head; apply takes its
    # first half, repeat_interleave(2), and rotates pairs (rotate_half is GPT-J's there).
    head_dim, rd = 64, 32
    q, k = qk(1, 4, 2, 9, head_dim, dtype, seed=18)
    cos, sin = rope_tables(1, 9, rd, seed=19, dtype=dtype)
    cos_il = cos[..., : rd // 2].repeat_interleave(2, dim=-1)
    sin_il = sin[..., : rd // 2].repeat_interleave(2, dim=-1)
    stock, ours, (gq, gk) = stock_and_ours_rope(
        lambda a, b: modeling_glm.apply_rotary_pos_emb(a, b, cos, sin),
        lambda a, b: forward_rewrite.rotary(a, b, cos_il, sin_il, interleaved=True),
        q,
        k,
        20,
    )
    ref = reference_rope_grads(q, k, cos_il, sin_il, rd, True, gq, gk)
    check_against(ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, "glm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_interleaved_in_float32_like_cohere(dtype):
    # Cohere: interleaved tables, computed in float32, cast back to q's dtype.
    q, k = qk(2, 4, 2, 5, 64, dtype, seed=21)
    cos, sin = rope_tables(2, 5, 64, seed=22, interleaved=True, dtype=dtype)
    stock, ours, (gq, gk) = stock_and_ours_rope(
        lambda a, b: modeling_cohere.apply_rotary_pos_emb(a, b, cos, sin),
        lambda a, b: forward_rewrite.rotary(
            a, b, cos, sin, interleaved=True, out_dtype=a.dtype
        ),
        q,
        k,
        23,
    )
    ref = reference_rope_grads(q, k, cos, sin, 64, True, gq, gk)
    check_against(
        ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, "cohere"
    )
    if dtype != torch.float32:
        # One float32 computation, one rounding: the same as stock's, element for element.
        assert torch.equal(ours[0][0], stock[0][0]) and torch.equal(
            ours[0][1], stock[0][1]
        )


def test_rotary_gptj_layout_seq_before_heads():
    # GPT-J: (batch, seq, heads, head_dim), half-width tables repeat_interleave'd, partial.
    head_dim, rd = 48, 16
    q, k = qk(2, 3, 3, 6, head_dim, torch.float32, seed=24, layout="bshd")
    sin, cos = (t[..., : rd // 2] for t in rope_tables(2, 6, rd, seed=25))

    def stock_fn(a, b):
        out = []
        for x in (a, b):
            rot = modeling_gptj.apply_rotary_pos_emb(x[..., :rd], sin, cos)
            out.append(torch.cat((rot, x[..., rd:]), dim=-1))
        return tuple(out)

    cos_il, sin_il = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    stock, ours, (gq, gk) = stock_and_ours_rope(
        stock_fn,
        lambda a, b: forward_rewrite.rotary(
            a, b, cos_il, sin_il, interleaved=True, unsqueeze_dim=2
        ),
        q,
        k,
        26,
    )
    ref = reference_rope_grads(q, k, cos_il, sin_il, rd, True, gq, gk, unsqueeze_dim=2)
    check_against(
        ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], torch.float32, "gptj"
    )


def test_rotary_cos_sin_gradients_when_they_require_one():
    q, k = qk(2, 3, 1, 4, 16, torch.float64, seed=27)
    cos, sin = rope_tables(1, 4, 16, seed=28, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, cos, sin)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, s: forward_rewrite.rotary(a, b, c, s), inputs
    )
    ours = torch.autograd.grad(
        sum(t.sum() for t in forward_rewrite.rotary(*inputs)), inputs
    )
    stock = torch.autograd.grad(
        sum(t.sum() for t in modeling_llama.apply_rotary_pos_emb(*inputs)), inputs
    )
    for a, b in zip(ours, stock, strict=True):
        assert rel(a, b) <= 1e-13


def test_rotary_output_no_gradient_reaches_gives_its_input_none_like_stock():
    # RecurrentGemma on transformers 4.57 uses only q's rotation for its loss: stock leaves
    # k (and the projection before it) without a gradient, and so must the fused op, or an
    # optimizer would decay a parameter stock never touches.
    q, k = qk(2, 3, 1, 4, 16, torch.float64, seed=29)
    cos, sin = rope_tables(1, 4, 16, seed=30, dtype=torch.float64)
    for used in (0, 1):
        for rotate in (forward_rewrite.rotary, modeling_llama.apply_rotary_pos_emb):
            a, b = (t.clone().requires_grad_(True) for t in (q, k))
            c, s = cos.clone().requires_grad_(True), sin.clone().requires_grad_(True)
            rotate(a, b, c, s)[used].pow(2).sum().backward()
            grads = (a.grad, b.grad)
            assert grads[1 - used] is None, rotate
            if rotate is forward_rewrite.rotary:
                ours = (grads[used], c.grad, s.grad)
            else:
                stock = (grads[used], c.grad, s.grad)
        for x, y in zip(ours, stock, strict=True):
            assert rel(x, y) <= 1e-13


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_single_matches_gemma4(dtype):
    """Gemma 4 rotates q and k by separate calls of a one-tensor apply_rotary_pos_emb, on
    (batch, seq, heads, head_dim) after the per-head norms (unsqueeze_dim=2)."""
    from transformers.models.gemma4 import modeling_gemma4

    g = gen(51)
    x = (torch.randn(2, 7, 4, 64, generator=g) * 2).to(dtype)
    cos, sin = rope_tables(2, 7, 64, seed=52, dtype=dtype)
    dy = torch.randn(2, 7, 4, 64, generator=g)

    def stock(x):
        return modeling_gemma4.apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)

    def ours(x):
        return forward_rewrite.rotary_single(x, cos, sin, unsqueeze_dim=2)

    ours_y, ours_g = grads(ours, [x], dy.to(dtype))
    stock_y, stock_g = grads(stock, [x], dy.to(dtype))
    xr = x.double().requires_grad_(True)
    ref = (xr * cos.double()[:, :, None]) + (
        modeling_gemma4.rotate_half(xr) * sin.double()[:, :, None]
    )
    ref.backward(dy.double())
    check_against(
        [*ours_y, *ours_g], [*stock_y, *stock_g], [ref.detach(), xr.grad], dtype, "x"
    )


def test_rotary_single_names_x_in_its_errors():
    cos, sin = rope_tables(1, 5, 16, seed=53)
    with pytest.raises(TypeError, match="^x"):
        forward_rewrite.rotary_single([1.0], cos, sin)
    with pytest.raises(ValueError, match="^x"):
        forward_rewrite.rotary_single(torch.randn(16), cos, sin)
    with pytest.raises(ValueError, match="^unsqueeze_dim"):
        forward_rewrite.rotary_single(
            torch.randn(1, 2, 5, 16), cos, sin, unsqueeze_dim=4
        )


def test_rotary_ranks_and_empty():
    # Rank 3: (heads, seq, head_dim) with cos (seq, head_dim) unsqueezed at 0; rank 2:
    # (seq, head_dim) with cos (seq, head_dim) unsqueezed at 0 broadcasts over nothing.
    cos, sin = rope_tables(1, 5, 16, seed=29)
    q3, k3 = torch.randn(3, 5, 16), torch.randn(1, 5, 16)
    oq, ok = forward_rewrite.rotary(q3, k3, cos[0], sin[0], unsqueeze_dim=0)
    rq, rk = rope_reference(q3, k3, cos[0], sin[0], 16, False, unsqueeze_dim=0)
    assert rel(oq, rq) <= 2e-6 and rel(ok, rk) <= 2e-6
    q2 = torch.randn(5, 16)
    with pytest.raises(ValueError, match="^cos"):
        forward_rewrite.rotary(q2, q2, cos[0], sin[0], unsqueeze_dim=0)
    e = torch.zeros(2, 0, 5, 16)
    oq, ok = forward_rewrite.rotary(e, e, cos.expand(2, 5, 16), sin.expand(2, 5, 16))
    assert oq.shape == e.shape and ok.shape == e.shape


# ---- gated MLP product ----------------------------------------------------------------------


def act_reference(name, x):
    x = x.double()
    if name == "silu":
        return x * torch.sigmoid(x)
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


STOCK_ACTS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(STOCK_ACTS))
def test_gated_product_matches_llama_mlp(activation, dtype):
    g = gen(30)
    gate = (torch.randn(3, 7, 96, generator=g) * 2).to(dtype)
    up = torch.randn(3, 7, 96, generator=g).to(dtype)
    dout = torch.randn(3, 7, 96, generator=g)
    act_fn = ACT2FN[
        STOCK_ACTS[activation]
    ]  # LlamaMLP: self.act_fn(self.gate_proj(x)) * self.up_proj(x)
    stock = grads(lambda a, b: act_fn(a) * b, [gate, up], dout.to(dtype))
    ours = grads(
        lambda a, b: forward_rewrite.gated_mlp_act(a, b, activation=activation),
        [gate, up],
        dout.to(dtype),
    )
    ref = grads(
        lambda a, b: act_reference(activation, a) * b,
        [gate.double(), up.double()],
        dout.double(),
    )
    check_against(
        ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, activation
    )
    if dtype != torch.float32:
        same = (ours[0][0] == stock[0][0]).float().mean().item()
        assert same >= 0.99, f"only {same:.1%} of the outputs equal stock's"


def test_gated_product_on_phi3_chunks():
    # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1); up * act(gate): strided views.
    g = gen(31)
    gate_up = torch.randn(2, 5, 2 * 48, generator=g).requires_grad_(True)
    dout = torch.randn(2, 5, 48, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    ours = forward_rewrite.gated_mlp_act(gate, up)
    assert ours.is_contiguous() and ours.shape == gate.shape
    (d_ours,) = torch.autograd.grad(ours, gate_up, dout)
    stock = up * F.silu(gate)
    (d_stock,) = torch.autograd.grad(stock, gate_up, dout)
    assert rel(ours, stock) <= 2e-6 and rel(d_ours, d_stock) <= 2e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(STOCK_ACTS))
def test_gated_packed_matches_phi3_and_moe_experts(activation, dtype):
    # Phi3MLP: up * act(gate) with gate, up = gate_up.chunk(2, dim=-1); the MoE experts:
    # gate, up = linear(...).chunk(2, dim=-1); act(gate) * up. One gradient for gate_up.
    g = gen(32)
    gate_up = (torch.randn(3, 5, 2 * 64, generator=g) * 2).to(dtype)
    dout = torch.randn(3, 5, 64, generator=g)
    act_fn = ACT2FN[STOCK_ACTS[activation]]

    def stock(gu):
        gate, up = gu.chunk(2, dim=-1)
        return up * act_fn(gate)

    def ref(gu):
        gate, up = gu.chunk(2, dim=-1)
        return act_reference(activation, gate) * up

    ours = grads(
        lambda gu: forward_rewrite.gated_mlp_act_packed(gu, activation=activation),
        [gate_up],
        dout.to(dtype),
    )
    st = grads(stock, [gate_up], dout.to(dtype))
    rf = grads(ref, [gate_up.double()], dout.double())
    check_against(ours[0] + ours[1], st[0] + st[1], rf[0] + rf[1], dtype, activation)
    # The same numbers as the two-tensor op on the chunks.
    two = grads(
        lambda gu: forward_rewrite.gated_mlp_act(
            *gu.chunk(2, dim=-1), activation=activation
        ),
        [gate_up],
        dout.to(dtype),
    )
    assert torch.equal(two[0][0], ours[0][0]) and torch.equal(two[1][0], ours[1][0])


def clamped(act, limit, after):
    """The clamped SwiGLU between the projections: DeepseekV4MLP's
    ``act(gate.clamp(max=L)) * up.clamp(min=-L, max=L)``, or with ``after`` Step3p7MLP's
    ``act(gate).clamp(max=L) * up.clamp(...)``; ``act`` any callable (the stock module, or
    the float64 reference)."""

    def product(gate, up):
        g = act(gate).clamp(max=limit) if after else act(gate.clamp(max=limit))
        return g * up.clamp(min=-limit, max=limit)

    return product


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("after", [False, True], ids=["deepseek-v4", "step-3.7"])
@pytest.mark.parametrize("activation", list(STOCK_ACTS))
def test_clamped_swiglu_matches_the_stock_expressions(activation, after, dtype):
    # 1.7 is no bfloat16 / float16 value: torch compares with its rounding, as the op does.
    limit = 1.7
    g = gen(36)
    gate = (torch.randn(3, 7, 96, generator=g) * 2).to(dtype)
    up = (torch.randn(3, 7, 96, generator=g) * 2).to(dtype)
    dout = torch.randn(3, 7, 96, generator=g)
    act_fn = ACT2FN[STOCK_ACTS[activation]]
    stock = grads(clamped(act_fn, limit, after), [gate, up], dout.to(dtype))
    ours = grads(
        lambda a, b: forward_rewrite.gated_mlp_act(
            a, b, activation=activation, limit=limit, clamp_after_activation=after
        ),
        [gate, up],
        dout.to(dtype),
    )
    # The reference clamps at the limit as the dtype holds it (where stock's comparisons are)
    # and, after the activation, where the activation rounded to the dtype reaches it.
    lim = torch.tensor(limit, dtype=dtype).item()

    def reference(gate, up):
        if not after:
            return clamped(lambda t: act_reference(activation, t), lim, False)(gate, up)
        a = act_reference(activation, gate)
        beyond = torch.gt if CLAMP_GRAD_AT_BOUND else torch.ge
        held = beyond(act_fn(gate.detach().to(dtype)), lim)
        return torch.where(held, lim, a) * up.clamp(min=-lim, max=lim)

    ref = grads(reference, [gate.double(), up.double()], dout.double())
    check_against(
        ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, activation
    )
    if dtype != torch.float32:
        same = (ours[0][0] == stock[0][0]).float().mean().item()
        assert same >= 0.99, f"only {same:.1%} of the outputs equal stock's"
    # No gradient through a clamp that holds (at its bound as this torch decides), as in
    # stock; and the case clamps (not vacuous).
    beyond = torch.gt if CLAMP_GRAD_AT_BOUND else torch.ge
    held_up = beyond(up.abs(), lim)
    held_gate = beyond(act_fn(gate) if after else gate, lim)
    assert held_up.any() and held_gate.any()
    for dgate, dup in (ours[1], stock[1]):
        assert (dup[held_up] == 0).all() and (dgate[held_gate] == 0).all()


def test_clamped_swiglu_packed_is_the_two_tensor_op():
    # The experts' _apply_gate of DeepSeek-V4: gate, up = gate_up.chunk(2, dim=-1).
    g = gen(37)
    gate_up = (torch.randn(5, 2 * 64, generator=g) * 3).bfloat16()
    dout = torch.randn(5, 64, generator=g).bfloat16()
    for after in (False, True):
        options = {"limit": 2.5, "clamp_after_activation": after}
        packed = grads(
            functools.partial(forward_rewrite.gated_mlp_act_packed, **options),
            [gate_up],
            dout,
        )
        two = grads(
            lambda gu, kw=options: forward_rewrite.gated_mlp_act(
                *gu.chunk(2, dim=-1), **kw
            ),
            [gate_up],
            dout,
        )
        assert torch.equal(packed[0][0], two[0][0])
        assert torch.equal(packed[1][0], two[1][0])


def test_clamped_swiglu_at_an_infinite_limit_is_the_plain_product():
    # Step-3.7's layers without a configured limit clamp at inf.
    g = gen(38)
    gate, up = (torch.randn(4, 32, generator=g) * 3).bfloat16().unbind(0)[:2]
    plain = forward_rewrite.gated_mlp_act(gate, up)
    for after in (False, True):
        inf = forward_rewrite.gated_mlp_act(
            gate, up, limit=math.inf, clamp_after_activation=after
        )
        assert torch.equal(plain, inf)


def _gpt_oss_gate(gate_up, alpha=1.702, limit=7.0):
    """GptOssExperts._apply_gate: interleaved (gate, up) pairs, clamped, (up + 1) * glu."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return GptOssExperts._apply_gate(
        types.SimpleNamespace(alpha=alpha, limit=limit), gate_up
    )


def _minimax_gate(gate_up, alpha=1.702, limit=7.0):
    """MiniMaxM3VLExperts._apply_gate: GPT-OSS's function on two halves."""
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
        MiniMaxM3VLExperts,
    )

    return MiniMaxM3VLExperts._apply_gate(
        types.SimpleNamespace(swiglu_alpha=alpha, swiglu_limit=limit), gate_up
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", ["gpt-oss", "minimax-m3"])
def test_swiglu_oai_matches_the_experts_gates(model, dtype):
    # (up + 1) * gate * sigmoid(gate * alpha), gate and up clamped at 7: GPT-OSS's pairs,
    # MiniMax-M3's halves. The float64 reference is the stock function on float64 inputs.
    interleaved = model == "gpt-oss"
    stock_fn = _gpt_oss_gate if interleaved else _minimax_gate
    g = gen(39)
    gate_up = (torch.randn(3, 5, 2 * 96, generator=g) * 4).to(dtype)
    dout = torch.randn(3, 5, 96, generator=g)

    def ours_fn(gu):
        return forward_rewrite.gated_mlp_act_packed(
            gu, activation="swiglu_oai", alpha=1.702, limit=7.0, interleaved=interleaved
        )

    ours = grads(ours_fn, [gate_up], dout.to(dtype))
    stock = grads(stock_fn, [gate_up], dout.to(dtype))
    ref = grads(stock_fn, [gate_up.double()], dout.double())
    check_against(ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1], dtype, model)
    if dtype != torch.float32:
        same = (ours[0][0] == stock[0][0]).float().mean().item()
        assert same >= 0.99, f"only {same:.1%} of the outputs equal stock's"
    # the clamps hold somewhere (not vacuous), and there the gradients are zero
    gate = gate_up[..., ::2] if interleaved else gate_up[..., :96]
    assert (gate > 7).any()


def test_swiglu_oai_pairs_are_the_halves_op_on_the_permuted_tensor():
    # The interleaved layout computes what the halves layout computes on the same pairs.
    g = gen(40)
    pairs = (torch.randn(7, 2 * 64, generator=g) * 4).bfloat16()
    halves = torch.cat((pairs[:, ::2], pairs[:, 1::2]), dim=-1)
    dout = torch.randn(7, 64, generator=g).bfloat16()
    options = {"activation": "swiglu_oai", "alpha": 1.702, "limit": 7.0}
    a = grads(
        functools.partial(
            forward_rewrite.gated_mlp_act_packed, interleaved=True, **options
        ),
        [pairs],
        dout,
    )
    b = grads(
        functools.partial(forward_rewrite.gated_mlp_act_packed, **options),
        [halves],
        dout,
    )
    assert torch.equal(a[0][0], b[0][0])
    assert torch.equal(a[1][0][:, ::2], b[1][0][:, :64])
    assert torch.equal(a[1][0][:, 1::2], b[1][0][:, 64:])


def test_gated_packed_strided_and_empty():
    base = torch.randn(4, 3, 2 * 40 + 6)
    gate_up = base[..., 3 : 3 + 80]  # a strided view
    out = forward_rewrite.gated_mlp_act_packed(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    assert out.shape == (4, 3, 40) and rel(out, F.silu(gate) * up) <= 2e-6
    empty = torch.zeros(0, 8, requires_grad=True)
    forward_rewrite.gated_mlp_act_packed(empty).sum().backward()
    assert empty.grad.shape == (0, 8)


def test_gated_product_saves_only_its_inputs():
    gate = torch.randn(4, 8, requires_grad=True)
    up = torch.randn(4, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_rewrite.gated_mlp_act(gate, up)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


# ---- gated product: gradients written over its inputs --------------------------------------


def _mlp_inputs(packed, dtype, seed=5):
    """x and the projection weights of a tiny MLP: gate and up as outputs of linear layers,
    temporaries as the patched MLPs pass them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 16, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(48 if packed else 24, 16, generator=g, dtype=dtype) * 0.3
    return x, w.requires_grad_(True)


def _gated_step(packed, activation, overwrite, dtype, keep=None, **backward):
    """Runs forward and backward; returns (x.grad, w.grad) and, through ``keep``, the
    projection output(s) the op received."""
    x, w = _mlp_inputs(packed, dtype)
    # swiglu_oai: GPT-OSS's, clamped, its pairs interleaved when packed
    oai = activation == "swiglu_oai"
    options = {"alpha": 1.702, "limit": 0.5} if oai else {}
    if packed:
        gate_up = x @ w.t()
        args = (gate_up,)
        out = forward_rewrite.gated_mlp_act_packed(
            gate_up,
            activation=activation,
            overwrite_inputs=overwrite,
            interleaved=oai,
            **options,
        )
    else:
        gate, up = x @ w[:12].t(), x @ w[12:].t()
        args = (gate, up)
        out = forward_rewrite.gated_mlp_act(
            gate, up, activation=activation, overwrite_inputs=overwrite, **options
        )
    if keep is not None:
        keep.extend(args)
        for t in args:
            t.retain_grad()
    out.pow(2).sum().backward(**backward)
    return x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", _fusions_backend.ACTIVATIONS)
@pytest.mark.parametrize("packed", [False, True], ids=["two-tensor", "packed"])
def test_overwrite_inputs_writes_the_same_gradients_over_them(
    packed, activation, dtype
):
    stock_kept, kept = [], []
    reference = _gated_step(packed, activation, False, dtype, keep=stock_kept)
    got = _gated_step(packed, activation, True, dtype, keep=kept)
    assert all(torch.equal(a, b) for a, b in zip(reference, got))
    for stock, ours in zip(stock_kept, kept):
        # the op's inputs now hold their own gradients, bit for bit the allocated ones
        assert torch.equal(ours, stock.grad)
        assert ours._version > stock._version
        assert not torch.equal(stock, stock.grad)


def test_overwrite_inputs_is_ignored_where_the_promise_cannot_hold():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def untouched(**backward):
        kept = []
        grads = _gated_step(False, "silu", True, torch.float32, keep=kept, **backward)
        return grads, all(not torch.equal(t, t.grad) for t in kept)

    reference = _gated_step(False, "silu", False, torch.float32)
    # retain_graph: the graph may run again, and its saved inputs with it
    grads, kept_intact = untouched(retain_graph=True)
    assert kept_intact and all(torch.equal(a, b) for a, b in zip(reference, grads))
    # create_graph: the backward itself is differentiated
    grads, kept_intact = untouched(create_graph=True)
    assert kept_intact and all(torch.allclose(a, b) for a, b in zip(reference, grads))
    # a dispatch mode (the custom op runs): it may hold the tensors
    with Passthrough():
        grads, kept_intact = untouched()
    assert kept_intact and all(torch.equal(a, b) for a, b in zip(reference, grads))
    # strided views of one projection, as Phi-3's chunks: allocated
    x, w = _mlp_inputs(True, torch.float32)
    gate, up = (x @ w.t()).chunk(2, dim=-1)
    for t in (gate, up):
        t.retain_grad()
    forward_rewrite.gated_mlp_act(gate, up, overwrite_inputs=True).sum().backward()
    assert not torch.equal(gate, gate.grad) and not torch.equal(up, up.grad)


def test_an_autograd_node_that_saved_an_overwritten_input_raises():
    # gate * gate saved gate before the fused op; the op's backward runs first and writes
    # over it: the version check turns a silently wrong gradient into an error
    x, w = _mlp_inputs(False, torch.float32)
    gate, up = x @ w[:12].t(), x @ w[12:].t()
    square = gate * gate
    out = forward_rewrite.gated_mlp_act(gate, up, overwrite_inputs=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + square.sum()).backward()


def test_overwrite_inputs_under_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    x, w = _mlp_inputs(False, torch.float32)

    def mlp(x, overwrite):
        return forward_rewrite.gated_mlp_act(
            x @ w[:12].t(), x @ w[12:].t(), overwrite_inputs=overwrite
        )

    grads = {}
    for overwrite in (False, True):
        for reentrant in (False, True):
            x.grad = w.grad = None
            checkpoint(mlp, x, overwrite, use_reentrant=reentrant).pow(
                2
            ).sum().backward()
            grads[overwrite, reentrant] = (x.grad.clone(), w.grad.clone())
    reference = grads[False, False]
    for got in grads.values():
        assert all(torch.equal(a, b) for a, b in zip(reference, got))


# ---- torch.compile, gradcheck, opcheck ------------------------------------------------------


def _compile_cases(dtype=torch.float32):
    g = gen(40)
    x = torch.randn(2, 5, 32, generator=g, dtype=dtype)
    w = torch.randn(32, generator=g, dtype=dtype) * 0.1 + 1
    q, k = qk(2, 4, 2, 5, 32, dtype, seed=41)
    cos, sin = rope_tables(1, 5, 32, seed=42, dtype=dtype)
    gate = torch.randn(2, 5, 40, generator=g, dtype=dtype)
    up = torch.randn(2, 5, 40, generator=g, dtype=dtype)
    return {
        "rms_norm": (lambda x, w: forward_rewrite.rms_norm(x, w, 1e-6), [x, w]),
        "rms_norm_gemma": (
            lambda x, w: forward_rewrite.rms_norm(
                x, w, 1e-6, offset=1.0, cast_before_weight=False
            ),
            [x, w],
        ),
        "add_rms_norm": (
            lambda r, x, w: forward_rewrite.add_rms_norm(r, x, w, 1e-6),
            [x * 0.5 + 1, x, w],
        ),
        "add_rms_norm_gemma": (
            lambda r, x, w: forward_rewrite.add_rms_norm(
                r, x, w, 1e-6, offset=1.0, cast_before_weight=False
            ),
            [x * -0.3 + 0.5, x, w],
        ),
        "rotary": (lambda a, b: forward_rewrite.rotary(a, b, cos, sin), [q, k]),
        "rotary_partial_interleaved": (
            lambda a, b: forward_rewrite.rotary(
                a, b, cos[..., :16], sin[..., :16], interleaved=True
            ),
            [q, k],
        ),
        "gated_silu": (lambda a, b: forward_rewrite.gated_mlp_act(a, b), [gate, up]),
        "gated_gelu": (
            lambda a, b: forward_rewrite.gated_mlp_act(a, b, activation="gelu_tanh"),
            [gate, up],
        ),
        "gated_packed": (
            lambda gu: forward_rewrite.gated_mlp_act_packed(gu, activation="gelu_tanh"),
            [torch.cat((gate, up), -1)],
        ),
        "gated_clamped": (
            lambda a, b: forward_rewrite.gated_mlp_act(a, b, limit=0.6),
            [gate, up],
        ),
        "gated_oai_pairs": (
            lambda gu: forward_rewrite.gated_mlp_act_packed(
                gu, activation="swiglu_oai", alpha=1.702, limit=1.5, interleaved=True
            ),
            [torch.cat((gate, up), -1)],
        ),
        "gated_packed_clamped_after": (
            lambda gu: forward_rewrite.gated_mlp_act_packed(
                gu, limit=0.3, clamp_after_activation=True
            ),
            [torch.cat((gate, up), -1)],
        ),
        "gated_rms_norm": (
            lambda x, g, w: forward_rewrite.gated_rms_norm(x, g, w, 1e-6),
            [x, x.flip(-1) * 1.5, w],
        ),
        "gated_rms_norm_kimi": (
            lambda x, g, w: forward_rewrite.gated_rms_norm(
                x, g, w, 1e-6, activation="sigmoid", cast_before_weight=False
            ),
            [x, x.flip(0) - 0.5, w],
        ),
        "rms_norm_scale_first": (
            lambda x: forward_rewrite.rms_norm(x, None, 1e-6, scale_first=True),
            [x],
        ),
    }


def _loss(fn):
    def f(*args):
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        return sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in out)

    return f


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", list(_compile_cases()))
def test_torch_compile_fullgraph_matches_eager(case, backend):
    torch._dynamo.reset()
    fn, inputs = _compile_cases()[case]
    compiled = torch.compile(_loss(fn), fullgraph=True, backend=backend)
    a = [t.clone().requires_grad_(True) for t in inputs]
    b = [t.clone().requires_grad_(True) for t in inputs]
    la, lb = compiled(*a), _loss(fn)(*b)
    la.backward()
    lb.backward()
    assert rel(la, lb) <= 1e-6
    for x, y in zip(a, b, strict=True):
        assert rel(x.grad, y.grad) <= 1e-5


def test_each_op_is_one_node_in_the_graph():
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cases = _compile_cases()
    for name in ("rms_norm", "rotary", "gated_silu", "gated_rms_norm"):
        fn, inputs = cases[name]
        torch.compile(fn, fullgraph=True, backend=capture)(*inputs)
    targets = [
        str(n.target)
        for gm in graphs
        for n in gm.graph.nodes
        if n.op == "call_function"
    ]
    for op in ("rms_norm", "rotary", "gated_act", "gated_rms_norm"):
        assert sum(f"forward_rewrite.{op}." in t for t in targets) == 1, targets
    assert not any("rsqrt" in t or "silu" in t or "cat" in t for t in targets), targets


@pytest.mark.parametrize("case", list(_compile_cases()))
def test_gradcheck_float64(case):
    fn, inputs = _compile_cases(torch.float64)[case]
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-8, rtol=1e-6)


def test_opcheck_validates_the_registrations():
    ops = torch.ops.forward_rewrite
    tests = (
        "test_schema",
        "test_faketensor",
        "test_autograd_registration",
        "test_aot_dispatch_dynamic",
    )
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    torch.library.opcheck(
        ops.rms_norm.default, (x, w, 1e-6, 1.0, False), test_utils=tests
    )
    r = torch.randn(6, 32, requires_grad=True)
    torch.library.opcheck(
        ops.add_rms_norm.default, (r, x, w, 1e-6, 0.0, True), test_utils=tests
    )
    _, total, rstd = ops.add_rms_norm(
        r.detach(), x.detach(), w.detach(), 1e-6, 0.0, True
    )
    torch.library.opcheck(
        ops.add_rms_norm_backward.default,
        (
            torch.randn(6, 32),
            torch.randn(6, 32),
            total,
            w.detach(),
            rstd,
            1.0,
            False,
            True,
        ),
    )
    gate = torch.randn(6, 32, requires_grad=True)
    for options in (
        (True, "silu", False, 1),
        (False, "sigmoid", False, 1),
        (True, "silu", True, 1),
        (True, "silu", True, 2),
    ):
        wg = w if options[3] == 1 else torch.randn(64, requires_grad=True)
        torch.library.opcheck(
            ops.gated_rms_norm.default, (x, gate, wg, 1e-6, *options), test_utils=tests
        )
        _, rstd = ops.gated_rms_norm(
            x.detach(), gate.detach(), wg.detach(), 1e-6, *options
        )
        torch.library.opcheck(
            ops.gated_rms_norm_backward.default,
            (
                torch.randn(6, 32),
                x.detach(),
                gate.detach(),
                wg.detach(),
                rstd,
                *options,
                True,
            ),
        )
    _, rstd = ops.rms_norm(x.detach(), w.detach(), 1e-6, 0.0, True)
    torch.library.opcheck(
        ops.rms_norm_backward.default,
        (torch.randn(6, 32), x.detach(), w.detach(), rstd, 0.0, True, True),
    )
    q, k = qk(2, 4, 2, 5, 32, torch.float32, seed=43)
    cos, sin = rope_tables(1, 5, 32, seed=44)
    args = (
        q.requires_grad_(True),
        k.requires_grad_(True),
        cos[:, None],
        sin[:, None],
        32,
        False,
        1,
        torch.float32,
    )
    torch.library.opcheck(ops.rotary.default, args, test_utils=tests)
    torch.library.opcheck(
        ops.rotary_backward.default,
        (
            torch.randn(q.shape),
            torch.randn(k.shape),
            cos[:, None],
            sin[:, None],
            32,
            False,
            1,
            torch.float32,
        ),
    )
    gate = torch.randn(2, 48)[:, :24].requires_grad_(True)
    up = torch.randn(2, 24, requires_grad=True)
    torch.library.opcheck(
        ops.gated_act.default, (gate, up, "gelu_tanh", True), test_utils=tests
    )
    torch.library.opcheck(
        ops.gated_act_backward.default,
        (torch.randn(2, 24), gate.detach(), up.detach(), "silu"),
    )
    torch.library.opcheck(
        ops.gated_act.default, (gate, up, "silu", True, 0.5, True), test_utils=tests
    )
    torch.library.opcheck(
        ops.gated_act_backward.default,
        (torch.randn(2, 24), gate.detach(), up.detach(), "silu", 0.5, False),
    )
    gate_up = torch.randn(3, 64)[:, 8:56].requires_grad_(True)
    torch.library.opcheck(
        ops.gated_act_packed.default, (gate_up, "silu", True), test_utils=tests
    )
    torch.library.opcheck(
        ops.gated_act_packed_backward.default,
        (torch.randn(3, 24), gate_up.detach(), "gelu_tanh"),
    )
    torch.library.opcheck(
        ops.gated_act_packed.default,
        (gate_up, "silu", False, 0.75, False),
        test_utils=tests,
    )
    torch.library.opcheck(
        ops.gated_act_packed.default,
        (gate_up, "swiglu_oai", True, 0.5, False, 1.702, True),
        test_utils=tests,
    )
    torch.library.opcheck(
        ops.gated_act_packed_backward.default,
        (torch.randn(3, 24), gate_up.detach(), "swiglu_oai", 7.0, False, 1.702, True),
    )


# ---- bad arguments --------------------------------------------------------------------------

X = torch.randn(3, 8)
W = torch.randn(8)
Q, K = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
COS, SIN = torch.randn(1, 3, 8), torch.randn(1, 3, 8)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: forward_rewrite.rms_norm([1.0], W), TypeError, "x"),
        (lambda: forward_rewrite.rms_norm(X, W.numpy()), TypeError, "weight"),
        (lambda: forward_rewrite.rms_norm(X, torch.randn(7)), ValueError, "weight"),
        (lambda: forward_rewrite.rms_norm(X.int(), W), TypeError, "x"),
        (lambda: forward_rewrite.rms_norm(X, W.double()), TypeError, "weight"),
        (lambda: forward_rewrite.rms_norm(X, W, -1.0), ValueError, "eps"),
        (lambda: forward_rewrite.rms_norm(X, W, "1e-6"), TypeError, "eps"),
        (lambda: forward_rewrite.rms_norm(X, W, float("nan")), ValueError, "eps"),
        (
            lambda: forward_rewrite.rms_norm(X, W, offset=float("inf")),
            ValueError,
            "offset",
        ),
        (
            lambda: forward_rewrite.rms_norm(X, W, cast_before_weight=1),
            TypeError,
            "cast_before_weight",
        ),
        (
            lambda: forward_rewrite.rms_norm(torch.randn(3, 0), torch.randn(0)),
            ValueError,
            "x",
        ),
        (lambda: forward_rewrite.rms_norm(X, W.to("meta")), ValueError, "weight"),
        (lambda: forward_rewrite.add_rms_norm(X.tolist(), X, W), TypeError, "residual"),
        (lambda: forward_rewrite.add_rms_norm(X.half(), X, W), TypeError, "residual"),
        (lambda: forward_rewrite.add_rms_norm(X[:2], X, W), ValueError, "residual"),
        (lambda: forward_rewrite.add_rms_norm(X, X, W[:7]), ValueError, "weight"),
        (lambda: forward_rewrite.add_rms_norm(X, X, W, -1.0), ValueError, "eps"),
        (
            lambda: forward_rewrite.add_rms_norm(X.to("meta"), X, W),
            ValueError,
            "residual",
        ),
        (lambda: forward_rewrite.rotary(Q, K.half(), COS, SIN), TypeError, "k"),
        (lambda: forward_rewrite.rotary(Q, K, COS, SIN.half()), TypeError, "sin"),
        (lambda: forward_rewrite.rotary(Q, K, COS, SIN[..., :6]), ValueError, "sin"),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, rotary_dim=6),
            ValueError,
            "cos",
        ),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, rotary_dim=7),
            ValueError,
            "rotary_dim",
        ),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, rotary_dim=2.0),
            TypeError,
            "rotary_dim",
        ),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, unsqueeze_dim=9),
            ValueError,
            "unsqueeze_dim",
        ),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, unsqueeze_dim=3),
            ValueError,
            "unsqueeze_dim",
        ),
        (
            lambda: forward_rewrite.rotary(Q, Q, COS, SIN, unsqueeze_dim=2),
            ValueError,
            "cos",
        ),
        (
            lambda: forward_rewrite.rotary(Q, torch.randn(1, 1, 4, 8), COS, SIN),
            ValueError,
            "k",
        ),
        (
            lambda: forward_rewrite.rotary(
                Q, K, torch.randn(2, 3, 8), torch.randn(2, 3, 8)
            ),
            ValueError,
            "cos",
        ),
        (lambda: forward_rewrite.rotary(Q[0], K, COS, SIN), ValueError, "q"),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, out_dtype=torch.float16),
            ValueError,
            "out_dtype",
        ),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, out_dtype="float32"),
            TypeError,
            "out_dtype",
        ),
        (
            lambda: forward_rewrite.rotary(Q, K, COS, SIN, interleaved=None),
            TypeError,
            "interleaved",
        ),
        (
            lambda: forward_rewrite.rotary(
                Q.bfloat16(), K.bfloat16(), COS.double(), SIN.double()
            ),
            TypeError,
            "cos",
        ),
        (lambda: forward_rewrite.gated_mlp_act(X, X[:, :4]), ValueError, "up"),
        (lambda: forward_rewrite.gated_mlp_act(X, X.half()), TypeError, "up"),
        (lambda: forward_rewrite.gated_mlp_act(X.long(), X.long()), TypeError, "gate"),
        (
            lambda: forward_rewrite.gated_mlp_act(X, X, activation="gelu"),
            ValueError,
            "activation",
        ),
        (
            lambda: forward_rewrite.gated_mlp_act(X, X, activation=None),
            TypeError,
            "activation",
        ),
        (lambda: forward_rewrite.gated_mlp_act(X, "up"), TypeError, "up"),
        (lambda: forward_rewrite.gated_mlp_act(X, X, limit="7"), TypeError, "limit"),
        (
            lambda: forward_rewrite.gated_mlp_act(X, X, activation="swiglu_oai"),
            ValueError,
            "alpha",
        ),
        (lambda: forward_rewrite.gated_mlp_act(X, X, alpha=1.7), ValueError, "alpha"),
        (
            lambda: forward_rewrite.gated_mlp_act_packed(X, interleaved=1),
            TypeError,
            "interleaved",
        ),
        (lambda: forward_rewrite.gated_mlp_act(X, X, limit=True), TypeError, "limit"),
        (lambda: forward_rewrite.gated_mlp_act(X, X, limit=0.0), ValueError, "limit"),
        (
            lambda: forward_rewrite.gated_mlp_act_packed(X, limit=math.nan),
            ValueError,
            "limit",
        ),
        (
            lambda: forward_rewrite.gated_mlp_act(X, X, clamp_after_activation=True),
            ValueError,
            "clamp_after_activation",
        ),
        (
            lambda: forward_rewrite.gated_mlp_act(
                X, X, limit=1.0, clamp_after_activation=1
            ),
            TypeError,
            "clamp_after_activation",
        ),
        (lambda: forward_rewrite.gated_mlp_act_packed(X[:, :7]), ValueError, "gate_up"),
        (lambda: forward_rewrite.gated_mlp_act_packed(X.int()), TypeError, "gate_up"),
        (
            lambda: forward_rewrite.gated_mlp_act(X, X, overwrite_inputs=1),
            TypeError,
            "overwrite_inputs",
        ),
        (
            lambda: _fusions_cpu.gated_act_backward(X, X, X[:, :8], GateFn(), True),
            ValueError,
            "up",
        ),
        (
            lambda: forward_rewrite.gated_mlp_act_packed(X, activation="x"),
            ValueError,
            "activation",
        ),
        (lambda: forward_rewrite.gated_rms_norm(X, X[:, :4], X[0]), ValueError, "gate"),
        (
            lambda: forward_rewrite.gated_rms_norm(X.half(), X, X[0].half()),
            TypeError,
            "gate",
        ),
        (lambda: forward_rewrite.gated_rms_norm(X, "g", X[0]), TypeError, "gate"),
        (lambda: forward_rewrite.gated_rms_norm(X, X, X[0, :3]), ValueError, "weight"),
        (
            lambda: forward_rewrite.gated_rms_norm(X, X, X[0], activation="gelu"),
            ValueError,
            "activation",
        ),
        (
            lambda: _fusions_cpu.gated_rms_norm_forward(
                X, X[:, :4], X[0], 1e-6, True, "silu", False, 1
            ),
            ValueError,
            "gate",
        ),
        (
            lambda: forward_rewrite.gated_rms_norm(X, X, X[0], group_size=3),
            ValueError,
            "group_size",
        ),
        (
            lambda: forward_rewrite.gated_rms_norm(X, X, X[0], group_size=True),
            ValueError,
            "group_size",
        ),
        (
            lambda: forward_rewrite.gated_rms_norm(X, X, X[0], gate_first=1),
            TypeError,
            "gate_first",
        ),
        (
            lambda: forward_rewrite.gated_rms_norm(
                X.bfloat16(), X.bfloat16(), X[0], gate_first=True
            ),
            TypeError,
            "weight",
        ),
        (
            lambda: _fusions_cpu.gated_rms_norm_forward(
                X, X, X[0], 1e-6, True, "silu", True, 2
            ),
            ValueError,
            "groups",
        ),
    ],
)
def test_bad_arguments_name_themselves(call, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        call()


@pytest.mark.parametrize(
    "call, error, name",
    [
        (
            lambda: _fusions_cpu.rms_norm_forward(
                X.t(), torch.randn(3), 1e-6, 0.0, True
            ),
            ValueError,
            "x",
        ),
        (
            lambda: _fusions_cpu.rms_norm_forward(X, W.bfloat16(), 1e-6, 0.0, True),
            TypeError,
            "weight",
        ),
        (
            lambda: _fusions_cpu.rms_norm_forward(X[None], W, 1e-6, 0.0, True),
            ValueError,
            "x",
        ),
        (
            lambda: _fusions_cpu.rms_norm_backward(
                X.bfloat16(), X, W, torch.ones(3), 0.0, True, True
            ),
            TypeError,
            "dy",
        ),
        (
            lambda: _fusions_cpu.rms_norm_backward(
                X, X, W, torch.ones(4), 0.0, True, True
            ),
            ValueError,
            "rstd",
        ),
        (
            lambda: _fusions_cpu.rotary(
                Q, Q, COS[:, None], SIN[:, None], 8, False, 2, torch.float32, False
            ),
            ValueError,
            "cos",
        ),
        (
            lambda: _fusions_cpu.rotary(
                Q, K, COS[:, None], SIN[:, None], 8, False, 3, torch.float32, False
            ),
            ValueError,
            "head_index",
        ),
        (
            lambda: _fusions_cpu.rotary(
                Q.transpose(2, 3),
                K,
                COS[:, None],
                SIN[:, None],
                8,
                False,
                1,
                torch.float32,
                False,
            ),
            ValueError,
            "q",
        ),
        (
            lambda: _fusions_cpu.rotary(
                Q.bfloat16(),
                K.bfloat16(),
                COS[:, None].half(),
                SIN[:, None].half(),
                8,
                False,
                1,
                torch.float32,
                False,
            ),
            TypeError,
            "cos",
        ),
        (lambda: _fusions_cpu.gated_act(X.t(), X.t(), GateFn()), ValueError, "gate"),
        (
            lambda: _fusions_cpu.gated_act(
                X, X.expand(3, 8)[:1].expand(3, 8), GateFn()
            ),
            ValueError,
            "up",
        ),
        (
            lambda: _fusions_cpu.gated_act(X, X, GateFn("relu")),
            ValueError,
            "activation",
        ),
        (
            lambda: _fusions_cpu.gated_act_backward(X.t(), X, X, GateFn()),
            ValueError,
            "dout",
        ),
        (
            lambda: _fusions_cpu.gated_act_backward_packed(X, X, GateFn()),
            ValueError,
            "dout",
        ),
        (
            lambda: _fusions_cpu.gated_act_backward_packed(
                X[:, :2], X[:, :5], GateFn()
            ),
            ValueError,
            "gate_up",
        ),
    ],
)
def test_backend_checks_name_the_argument(call, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        call()


def test_cuda_tensors_without_a_gpu_are_clear_errors():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu/check_fusions.py covers CUDA")
    from forward_rewrite import _fusions_cuda

    with pytest.raises((TypeError, ValueError), match=r"^(x|weight)\b"):
        _fusions_cuda.rms_norm_forward(
            X, W, 1e-6, 0.0, True
        )  # CPU tensors to the CUDA backend
    with pytest.raises(ValueError, match=r"not supported"):
        fused_ops._backend(torch.device("meta"))


def test_native_rejects_bad_pointers():
    x, w = torch.randn(4, 8), torch.randn(8)
    y, rstd = torch.empty(4, 8), torch.empty(4)
    kw = {
        "x": x.data_ptr(),
        "weight": w.data_ptr(),
        "y": y.data_ptr(),
        "rstd": rstd.data_ptr(),
        "rows": 4,
        "hidden": 8,
        "x_dtype": "float32",
        "w_dtype": "float32",
        "y_dtype": "float32",
        "eps": 1e-6,
        "offset": 0.0,
        "cast_before": True,
    }
    _native.cpu_rms_norm_forward(**kw)
    assert rel(y, rms_reference(x, w, 1e-6, 0.0)) <= 2e-6
    for change, message in (
        ({"x": 0}, "x: null pointer"),
        ({"y": x.data_ptr()}, "overlap"),
        ({"rstd": y.data_ptr() + 8}, "overlap"),
        ({"x": x.data_ptr() + 2}, "x: pointer not aligned"),
        ({"x_dtype": "int8"}, "x: expected"),
        ({"w_dtype": "bfloat16"}, "weight: dtypes"),
        ({"hidden": 0}, "x: the normalised dimension is empty"),
        ({"eps": float("nan")}, "eps"),
    ):
        with pytest.raises(ValueError, match=message):
            _native.cpu_rms_norm_forward(**dict(kw, **change))
    with pytest.raises(ValueError, match="activation"):
        _native.cpu_gated_act(
            gate=x.data_ptr(),
            up=x.data_ptr(),
            out=y.data_ptr(),
            rows=4,
            cols=8,
            ld_gate=8,
            ld_up=8,
            dtype="float32",
            activation="tanh",
        )
    with pytest.raises(ValueError, match="q_out: its strides"):
        _native.cpu_rotary(
            q=x.data_ptr(),
            k=x.data_ptr(),
            cos=w.data_ptr(),
            sin=w.data_ptr(),
            q_out=y.data_ptr(),
            k_out=rstd.data_ptr(),
            q_strides=[0, 8, 8],
            k_strides=[0, 0, 8],
            cos_strides=[0, 0],
            sin_strides=[0, 0],
            q_out_strides=[0, 4, 8],
            k_out_strides=[0, 0, 4],
            p0=1,
            p1=2,
            q_heads=2,
            k_heads=1,
            head_dim=8,
            rot_dim=8,
            interleaved=False,
            transpose=False,
            in_dtype="float32",
            cs_dtype="float32",
            out_dtype="float32",
        )


def test_public_api_is_exported():
    for name in (
        "add_rms_norm",
        "rms_norm",
        "rotary",
        "gated_mlp_act",
        "gated_mlp_act_packed",
        "gated_rms_norm",
        "rotary_single",
    ):
        assert name in forward_rewrite.__all__
        assert getattr(forward_rewrite, name) is getattr(fused_ops, name)
    assert _fusions_backend.ACTIVATIONS == ("silu", "gelu_tanh", "swiglu_oai")


# ---- unweighted RMSNorm, scale rounded first (DeepSeek-V4) -----------------------------------


def scale_first_reference(x, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 9, 64), (3, 17, 320), (5, 1), (40, 7)])
def test_scale_first_rms_norm_matches_deepseek_v4(shape, dtype):
    # DeepseekV4UnweightedRMSNorm: x * rsqrt(mean(x.float()^2) + eps).to(x.dtype).
    g = gen(50)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    module = DeepseekV4UnweightedRMSNorm(eps=1e-6)
    ours = grads(
        lambda t: forward_rewrite.rms_norm(t, None, 1e-6, scale_first=True), [x], dy
    )
    stock = grads(module, [x], dy)
    ref = grads(lambda t: scale_first_reference(t, 1e-6), [x.double()], dy.double())
    if shape[-1] == 1:
        # One element: y = x / |x| (+ eps), dx cancels to ~eps; compare the outputs only.
        ours, stock, ref = ours[0], stock[0], ref[0]
    else:
        ours, stock, ref = ours[0] + ours[1], stock[0] + stock[1], ref[0] + ref[1]
    check_against(ours, stock, ref, dtype, "deepseek_v4")
    if dtype != torch.float32:
        same = (ours[0] == stock[0]).float().mean().item()
        assert same >= 0.99, f"only {same:.1%} of the outputs equal stock's"


def test_scale_first_rounds_the_scale_before_the_product():
    # [3, 4] in bf16: r = 0.28284..., bf16(r) = 0.283203125, 3 * that rounds to 0.8515625;
    # rounding 3 * r once would give 0.84765625.
    x = torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16)
    y = forward_rewrite.rms_norm(x, None, 0.0, scale_first=True)
    assert y.tolist() == [[0.8515625, 1.1328125]]
    assert torch.equal(y, DeepseekV4UnweightedRMSNorm(eps=0.0)(x))


def test_scale_first_layouts_and_empty_inputs():
    # (torch.compile and gradcheck: the "rms_norm_scale_first" case of _compile_cases.)
    g = gen(51)
    # A transposed input (DeepSeek-V4's q after `.transpose(1, 2)`), and an empty one.
    t = torch.randn(2, 9, 4, 64, generator=g).transpose(1, 2)
    assert torch.equal(
        forward_rewrite.rms_norm(t, None, 1e-6, scale_first=True),
        forward_rewrite.rms_norm(t.contiguous(), None, 1e-6, scale_first=True),
    )
    empty = torch.randn(0, 8, requires_grad=True)
    out = forward_rewrite.rms_norm(empty, None, 1e-6, scale_first=True)
    out.sum().backward()
    assert out.shape == (0, 8) and empty.grad.shape == (0, 8)


def test_scale_first_bad_arguments_name_themselves():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="^scale_first"):
        forward_rewrite.rms_norm(x, torch.ones(8), 1e-6, scale_first=True)
    with pytest.raises(TypeError, match="^scale_first"):
        forward_rewrite.rms_norm(x, None, 1e-6, scale_first=1)
    with pytest.raises(ValueError, match="^offset"):
        forward_rewrite.rms_norm(x, None, 1e-6, offset=1.0, scale_first=True)
    with pytest.raises(ValueError, match="^eps"):
        forward_rewrite.rms_norm(x, None, -1.0, scale_first=True)
    with pytest.raises(TypeError, match="^eps"):
        forward_rewrite.rms_norm(x, None, "1e-6", scale_first=True)
    with pytest.raises(ValueError, match="^x"):
        forward_rewrite.rms_norm(x[..., :0], None, 1e-6, scale_first=True)
    with pytest.raises(TypeError, match="^x"):
        forward_rewrite.rms_norm(x.to(torch.int32), None, 1e-6, scale_first=True)
    with pytest.raises(TypeError, match="^x"):
        forward_rewrite.rms_norm([1.0], None, 1e-6, scale_first=True)
    # The backend's own checks.
    y, rstd = _fusions_cpu.rms_scale_first_forward(x, 1e-6)
    with pytest.raises(TypeError, match="^dy"):
        _fusions_cpu.rms_scale_first_backward(y.double(), x, rstd)
    with pytest.raises(ValueError, match="^rstd"):
        _fusions_cpu.rms_scale_first_backward(y, x, rstd[:2])
    with pytest.raises(ValueError, match="^x"):
        _fusions_cpu.rms_scale_first_forward(x.t(), 1e-6)


def test_scale_first_opcheck_validates_the_registrations():
    ops = torch.ops.forward_rewrite
    tests = (
        "test_schema",
        "test_faketensor",
        "test_autograd_registration",
        "test_aot_dispatch_dynamic",
    )
    x = torch.randn(6, 32, requires_grad=True)
    torch.library.opcheck(ops.rms_norm_scale_first.default, (x, 1e-6), test_utils=tests)
    _, rstd = ops.rms_norm_scale_first(x.detach(), 1e-6)
    torch.library.opcheck(
        ops.rms_norm_scale_first_backward.default,
        (torch.randn(6, 32), x.detach(), rstd),
    )
