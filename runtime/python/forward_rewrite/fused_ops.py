"""The fused decoder ops the rewritten forwards call: RMSNorm, the rotary embedding of q and k,
and the activation product of a gated MLP (README, "Fused decoder ops").

Each computes what the stock transformers code computes, in float32 (float64 for float64
inputs, CPU only), with the stock rounding points where they decide the forward value, and
is a pair of ``torch.library`` custom ops (forward and backward) with fake kernels and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces each as one opaque
node. Both ops of a pair dispatch on the device: ``cpu`` -> ``forward_rewrite._fusions_cpu``
(Rust), ``cuda`` -> ``forward_rewrite._fusions_cuda`` (NVRTC kernels through cudarc).

* :func:`rms_norm` -- ``LlamaRMSNorm`` (``cast_before_weight=True``), ``Gemma3RMSNorm``
  (``offset=1.0, cast_before_weight=False``), ``Olmo2RMSNorm`` (``cast_before_weight=False``),
  Qwen3's per-head q/k norms (any leading shape). Saves one float per row (``1 / rms``).
  ``scale_first=True``: DeepSeek-V4's unweighted norm, its scale rounded to x's dtype first.
* :func:`gated_rms_norm` -- the ``*RMSNormGated`` of Qwen3-Next / Qwen3.5 / OLMo-Hybrid
  (``cast_before_weight=True``) and Kimi-Linear / Bailing / GLM-5-Next (``False``): the norm,
  its weight and ``act(gate)`` (SiLU or sigmoid) in one kernel each way. Saves the inputs and
  one float per row.
* :func:`add_rms_norm` -- a decoder layer's residual add and the RMSNorm after it, one
  kernel each way (the sum and its norm out; in backward the sum's own gradient joins the
  norm's input gradient).
* :func:`rotary` -- ``apply_rotary_pos_emb`` for q and k in one launch, out of place; partial
  rotary (the tail of each head passes through), the interleaved layout
  (``rotate_every_two``). Saves nothing but cos and sin.
  :func:`rotary_single` the same for one tensor (Gemma 3n, Gemma 4).
* :func:`gated_mlp_act` -- ``act_fn(gate_proj(x)) * up_proj(x)`` of ``LlamaMLP`` and its
  relatives, SiLU or tanh-GELU; the backward recomputes the activation from the inputs.
  :func:`gated_mlp_act_packed` the same on one ``gate_up`` tensor (Phi-3, the MoE experts'
  ``linear(...).chunk(2, dim=-1)``), whose gradient it writes whole (no concatenation).
"""

import math
import numbers

import torch
from torch import Tensor

from ._eager import BackwardOp, OpPair, eager_ok
from ._fusions_backend import (
    ACTIVATIONS,
    FUSION_DTYPES,
    GATED_NORM_ACTIVATIONS,
    GateFn,
    rms_out_dtype,
    rotary_dims,
    rstd_dtype,
)

__all__ = [
    "add_rms_norm",
    "gated_mlp_act",
    "gated_mlp_act_packed",
    "gated_rms_norm",
    "rms_norm",
    "rotary",
    "rotary_single",
]


_BACKENDS = {}


def _backend(device: torch.device):
    backend = _BACKENDS.get(device.type)  # looked up on every call: kept once loaded
    if backend is not None:
        return backend
    if device.type == "cpu":
        from . import _fusions_cpu as backend
    elif device.type == "cuda":
        try:
            from . import _fusions_cuda as backend
        except ImportError as e:
            raise RuntimeError(
                "forward_rewrite: the CUDA backend (forward_rewrite._fusions_cuda) is not "
                f"available in this build ({e})"
            ) from e
    else:
        raise ValueError(f"device {device} is not supported (cpu or cuda)")
    _BACKENDS[device.type] = backend
    return backend


# ---- argument checks of the public functions ------------------------------------------------


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")


def _dtype(name, t):
    if t.dtype not in FUSION_DTYPES:
        raise TypeError(
            f"{name}: dtype {t.dtype} is not bfloat16, float16 or float32 "
            "(or float64 on the CPU)"
        )
    if t.dtype == torch.float64 and t.device.type != "cpu":
        raise TypeError(f"{name}: float64 is supported on the CPU only")


def _device(name, t, ref, ref_name):
    if t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, {ref_name} is on {ref.device}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: device {t.device} is not supported (cpu or cuda)")


def _real(name, value, *, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a number >= {minimum}, got {value}")
    return value


def _bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _gate_fn(activation, limit, clamp_after_activation, alpha):
    """The checked :class:`GateFn` of the gated ops' keyword arguments: an activation of
    ``ACTIVATIONS``; the clamped SwiGLU's limit a real number above 0 (inf allowed: a clamp
    that keeps every finite value) and no clamp position without one; ``alpha`` a finite
    number for ``"swiglu_oai"`` and for nothing else."""
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {ACTIVATIONS}, got {activation!r}"
        )
    _bool("clamp_after_activation", clamp_after_activation)
    if limit is None:
        if clamp_after_activation:
            raise ValueError("clamp_after_activation: there is no limit to clamp at")
    else:
        if isinstance(limit, bool) or not isinstance(limit, numbers.Real):
            raise TypeError(
                f"limit: expected a real number, got {type(limit).__name__}"
            )
        limit = float(limit)
        if math.isnan(limit) or limit <= 0:
            raise ValueError(f"limit: expected a number above 0, got {limit}")
    if activation == "swiglu_oai":
        if alpha is None:
            raise ValueError("alpha: activation 'swiglu_oai' needs its alpha")
        alpha = _real("alpha", alpha)
    elif alpha is not None:
        raise ValueError(
            f"alpha: only activation 'swiglu_oai' takes one, not {activation!r}"
        )
    return GateFn(activation, limit, clamp_after_activation, alpha)


def _kernel_dtype(name, dtype, base):
    """The dtype a secondary tensor is computed in: ``base`` when equal, else float32 (an
    exact upcast whenever two dtypes differ, since they then promote to float32);
    float64 mixes only with float64."""
    if dtype == base:
        return dtype
    if torch.float64 in (dtype, base):
        raise TypeError(
            f"{name}: float64 mixes only with float64, got {dtype} and {base}"
        )
    return torch.float32


# ---- RMSNorm ----------------------------------------------------------------------------------


def _rms_arguments(x, weight, eps, offset, cast_before_weight):
    """The checked arguments of the public RMSNorm ops: (the weight in the kernels' dtype,
    eps, offset, cast_before_weight); errors name the argument."""
    _tensor("x", x)
    _tensor("weight", weight)
    _dtype("x", x)
    _dtype("weight", weight)
    _device("weight", weight, x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(
            f"x: expected a non-empty last dimension, got shape {tuple(x.shape)}"
        )
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"weight: expected shape ({x.shape[-1]},) (x's last dimension), "
            f"got {tuple(weight.shape)}"
        )
    eps = _real("eps", eps, minimum=0.0)
    offset = _real("offset", offset)
    cast_before_weight = _bool("cast_before_weight", cast_before_weight)
    w = weight.to(_kernel_dtype("weight", weight.dtype, x.dtype))
    return w, eps, offset, cast_before_weight


def _rms_norm_impl(
    x: Tensor, weight: Tensor, eps: float, offset: float, cast_before_weight: bool
) -> tuple[Tensor, Tensor]:
    """(y, rstd) for x (rows, hidden) contiguous, weight (hidden,) of x's dtype or float32."""
    return _backend(x.device).rms_norm_forward(
        x, weight, eps, offset, cast_before_weight
    )


_rms_norm_op = torch.library.custom_op("forward_rewrite::rms_norm", mutates_args=())(
    _rms_norm_impl
)


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps, offset, cast_before_weight):
    y = x.new_empty(
        x.shape, dtype=rms_out_dtype(x.dtype, weight.dtype, cast_before_weight)
    )
    return y, x.new_empty((x.shape[0],), dtype=rstd_dtype(x.dtype))


def _rms_norm_backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    offset: float,
    cast_before_weight: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dw); dw is empty when ``weight_grad`` is false."""
    dx, dw = _backend(x.device).rms_norm_backward(
        dy, x, weight, rstd, offset, cast_before_weight, weight_grad
    )
    return dx, dw if dw is not None else x.new_empty(0)


_rms_norm_backward_op = torch.library.custom_op(
    "forward_rewrite::rms_norm_backward", mutates_args=()
)(_rms_norm_backward_impl)


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(
    dy, x, weight, rstd, offset, cast_before_weight, weight_grad
):
    return torch.empty_like(x), torch.empty_like(
        weight
    ) if weight_grad else x.new_empty(0)


def _rms_setup(ctx, inputs, output):
    x, weight, _eps, offset, cast_before_weight = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.options = (offset, cast_before_weight)


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    offset, cast_before_weight = ctx.options
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[1]):
        return None, None, None, None, None
    dx, dw = _rms_norm_backward(
        dy.contiguous(), x, weight, rstd, offset, cast_before_weight, needs[1]
    )
    return (dx if needs[0] else None), (dw if needs[1] else None), None, None, None


_rms_norm = OpPair(
    _rms_norm_op, _rms_norm_impl, _rms_setup, _rms_backward, nondiff=(1,)
)
_rms_norm_backward = BackwardOp(_rms_norm_backward_op, _rms_norm_backward_impl)


_unit_weights: dict = {}


def _unit_weight(x: Tensor) -> Tensor:
    """A weight of ones for x's last dimension, of x's dtype, needing no gradient: the scale
    of an unweighted norm (a product by one is exact, so ``round(1 * round(xn))`` is
    ``round(xn)``). Kept per (device, dtype, size), except while compiling (x may be a fake
    tensor) or capturing a CUDA graph (the graph's pool would own it)."""
    key = (x.device, x.dtype, x.shape[-1])
    w = _unit_weights.get(key)
    if w is not None:
        return w
    w = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if not (torch.compiler.is_compiling() or capturing):
        _unit_weights[key] = w
    return w


# ---- unweighted RMSNorm, scale rounded first ---------------------------------------------------


def _rms_scale_first_impl(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd) for x (rows, hidden) contiguous."""
    return _backend(x.device).rms_scale_first_forward(x, eps)


_rms_scale_first_op = torch.library.custom_op(
    "forward_rewrite::rms_norm_scale_first", mutates_args=()
)(_rms_scale_first_impl)


@_rms_scale_first_op.register_fake
def _rms_scale_first_fake(x, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=rstd_dtype(x.dtype))


def _rms_scale_first_backward_impl(dy: Tensor, x: Tensor, rstd: Tensor) -> Tensor:
    """dx for dy and x (rows, hidden) contiguous of one dtype and the forward's rstd."""
    return _backend(x.device).rms_scale_first_backward(dy, x, rstd)


_rms_scale_first_backward_op = torch.library.custom_op(
    "forward_rewrite::rms_norm_scale_first_backward", mutates_args=()
)(_rms_scale_first_backward_impl)


@_rms_scale_first_backward_op.register_fake
def _rms_scale_first_backward_fake(dy, x, rstd):
    return torch.empty_like(x)


def _rms_scale_first_setup(ctx, inputs, output):
    x, _eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, rstd)


def _rms_scale_first_backward(ctx, dy, _drstd):
    x, rstd = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    # dy of x's dtype: the stock forward's output is x's dtype, so its gradient is too.
    return _rms_scale_first_backward_call(dy.contiguous().to(x.dtype), x, rstd), None


_rms_scale_first = OpPair(
    _rms_scale_first_op,
    _rms_scale_first_impl,
    _rms_scale_first_setup,
    _rms_scale_first_backward,
    nondiff=(1,),
)
_rms_scale_first_backward_call = BackwardOp(
    _rms_scale_first_backward_op, _rms_scale_first_backward_impl
)


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = True,
    scale_first: bool = False,
) -> Tensor:
    """RMSNorm over the last dimension, as transformers' norm modules compute it.

    In float32: ``xn = x.float() * rsqrt(mean(x.float()**2, -1) + eps)``, then

    * ``cast_before_weight=True`` (``LlamaRMSNorm``, Qwen3's q/k norms, Mistral, ...):
      ``(offset + weight) * xn.to(x.dtype)``, of dtype ``promote(x.dtype, weight.dtype)``;
    * ``cast_before_weight=False`` (``Gemma3RMSNorm`` with ``offset=1.0``, ``Olmo2RMSNorm``
      with ``offset=0.0``): ``(xn * (offset + weight.float())).to(x.dtype)``.

    ``offset + weight`` is formed in float32. Gradients for x and weight (float32
    accumulation of the weight gradient over all rows, one rounding to weight's dtype);
    only ``1 / rms`` per row is saved besides the inputs.

    ``weight=None``: the unweighted norm, ``xn.to(x.dtype)`` (NanoChat's ``RMSNorm``:
    ``self._norm(x.float()).type_as(x)``), with ``offset`` 0.

    ``scale_first=True`` (weight None, offset 0; DeepSeek-V4's, GLM-5-Next's and Inkling-2's
    ``UnweightedRMSNorm``: ``x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) +
    eps).to(x.dtype)``): the scale ``rsqrt(...)`` is rounded to x's dtype first, then
    multiplied by x in x's dtype (one rounding). ``cast_before_weight`` is then ignored.
    """
    if _bool("scale_first", scale_first):
        return _rms_norm_scale_first(x, weight, eps, offset)
    if weight is None:
        _tensor("x", x)
        _dtype("x", x)
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(
                f"x: expected a non-empty last dimension, got shape {tuple(x.shape)}"
            )
        if _real("offset", offset) != 0.0:
            raise ValueError(f"offset: expected 0.0 without a weight, got {offset}")
        weight = _unit_weight(x)
    w, eps, offset, cast_before_weight = _rms_arguments(
        x, weight, eps, offset, cast_before_weight
    )
    x2 = x.contiguous().view(-1, x.shape[-1])
    y, _ = _rms_norm(x2, w.contiguous(), eps, offset, cast_before_weight)
    return y.view(x.shape)


def _rms_norm_scale_first(x, weight, eps, offset):
    """:func:`rms_norm` with ``scale_first=True``: its checks, then the op."""
    if weight is not None:
        raise ValueError(
            "scale_first: the scale-first norm has no weight (weight must be None)"
        )
    _tensor("x", x)
    _dtype("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(
            f"x: expected a non-empty last dimension, got shape {tuple(x.shape)}"
        )
    if _real("offset", offset) != 0.0:
        raise ValueError(f"offset: expected 0.0 with scale_first, got {offset}")
    eps = _real("eps", eps, minimum=0.0)
    y, _ = _rms_scale_first(x.contiguous().view(-1, x.shape[-1]), eps)
    return y.view(x.shape)


# ---- gated RMSNorm ----------------------------------------------------------------------------


def _gated_rms_impl(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    eps: float,
    cast_before_weight: bool,
    activation: str,
    gate_first: bool,
    groups: int,
) -> tuple[Tensor, Tensor]:
    """(y, rstd) for x and gate (rows, hidden) contiguous of one dtype (a row: one group),
    weight (groups * hidden,) of x's dtype or float32."""
    return _backend(x.device).gated_rms_norm_forward(
        x, gate, weight, eps, cast_before_weight, activation, gate_first, groups
    )


_gated_rms_op = torch.library.custom_op(
    "forward_rewrite::gated_rms_norm", mutates_args=()
)(_gated_rms_impl)


@_gated_rms_op.register_fake
def _gated_rms_fake(
    x, gate, weight, eps, cast_before_weight, activation, gate_first, groups
):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=rstd_dtype(x.dtype))


def _gated_rms_backward_impl(
    dy: Tensor,
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    rstd: Tensor,
    cast_before_weight: bool,
    activation: str,
    gate_first: bool,
    groups: int,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgate, dw); dw is empty when ``weight_grad`` is false."""
    dx, dgate, dw = _backend(x.device).gated_rms_norm_backward(
        dy,
        x,
        gate,
        weight,
        rstd,
        cast_before_weight,
        activation,
        gate_first,
        groups,
        weight_grad,
    )
    return dx, dgate, dw if dw is not None else x.new_empty(0)


_gated_rms_backward_op = torch.library.custom_op(
    "forward_rewrite::gated_rms_norm_backward", mutates_args=()
)(_gated_rms_backward_impl)


@_gated_rms_backward_op.register_fake
def _gated_rms_backward_fake(
    dy,
    x,
    gate,
    weight,
    rstd,
    cast_before_weight,
    activation,
    gate_first,
    groups,
    weight_grad,
):
    dw = torch.empty_like(weight) if weight_grad else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(x), dw


def _gated_rms_setup(ctx, inputs, output):
    x, gate, weight, _eps, *options = inputs
    _, rstd = output
    ctx.save_for_backward(x, gate, weight, rstd)
    ctx.options = tuple(options)


def _gated_rms_backward(ctx, dy, _drstd):
    x, gate, weight, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[1] or needs[2]):
        return (None,) * 8
    dx, dgate, dw = _gated_rms_norm_backward(
        dy.contiguous(), x, gate, weight, rstd, *ctx.options, needs[2]
    )
    return (
        dx if needs[0] else None,
        dgate if needs[1] else None,
        dw if needs[2] else None,
    ) + (None,) * 5


_gated_rms = OpPair(
    _gated_rms_op, _gated_rms_impl, _gated_rms_setup, _gated_rms_backward, nondiff=(1,)
)
_gated_rms_norm_backward = BackwardOp(_gated_rms_backward_op, _gated_rms_backward_impl)


def gated_rms_norm(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    *,
    activation: str = "silu",
    cast_before_weight: bool = True,
    gate_first: bool = False,
    group_size: int | None = None,
) -> Tensor:
    """Gated RMSNorm over the last dimension, as transformers' ``*RMSNormGated`` computes it.

    In float32, with ``xn = x.float() * rsqrt(mean(x.float()**2, -1) + eps)`` and ``a =
    act(gate.float())`` (``activation``: ``"silu"`` or ``"sigmoid"``), the result, of x's
    dtype, is

    * ``cast_before_weight=True`` (Qwen3-Next, Qwen3.5, OLMo-Hybrid): ``(weight *
      xn.to(x.dtype)) * a``, the product with the weight of dtype ``promote(x.dtype,
      weight.dtype)`` (rounded there), then rounded once to x's dtype;
    * ``cast_before_weight=False`` (Kimi-Linear, Bailing, GLM-5-Next): ``(weight.float() * xn
      * a).to(x.dtype)``.

    ``gate_first=True`` (Mamba-2's ``MambaRMSNormGated`` and its copies in Bamba, Granite 4,
    Nemotron-H, Zamba2) applies the gate before the norm: with ``u = x.float() * a``, the
    norm of u weighted as above, ``weight * (u * rsqrt(mean(u**2) + eps)).to(x.dtype)`` for
    ``cast_before_weight=True`` (the weight then no wider than x: stock's result would be of
    the promoted dtype otherwise). ``group_size`` (Mamba's): the last dimension is normalised
    in groups of that many elements (it must divide it), each with its own ``1 / rms``; the
    weight still spans the whole dimension.

    ``gate`` has x's shape and dtype, or a 16-bit float dtype when x is float32 (Mamba's
    torch scan returns float32 while the gate projection is bfloat16): upcast exactly, as the
    forms' ``gate.to(torch.float32)`` do. Gradients for x, gate and weight (float32 accumulation
    of the weight gradient over all rows, one rounding to weight's dtype); only ``1 / rms``
    per row (group) is saved besides the inputs. On CUDA a row (group) may be up to 8192
    elements long.
    """
    w, eps, _, cast_before_weight = _rms_arguments(
        x, weight, eps, 0.0, cast_before_weight
    )
    _tensor("gate", gate)
    if gate.shape != x.shape:
        raise ValueError(
            f"gate: expected x's shape {tuple(x.shape)}, got {tuple(gate.shape)}"
        )
    if gate.dtype != x.dtype and not (
        x.dtype == torch.float32 and gate.dtype in (torch.bfloat16, torch.float16)
    ):
        raise TypeError(
            f"gate: dtype {gate.dtype}, expected x's {x.dtype} (or a 16-bit float "
            "dtype with a float32 x)"
        )
    _device("gate", gate, x, "x")
    if activation not in GATED_NORM_ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {GATED_NORM_ACTIVATIONS}, got {activation!r}"
        )
    gate_first = _bool("gate_first", gate_first)
    if (
        gate_first
        and cast_before_weight
        and torch.promote_types(weight.dtype, x.dtype) != x.dtype
    ):
        raise TypeError(
            f"weight: dtype {weight.dtype} is wider than x's {x.dtype}; with gate_first and "
            "cast_before_weight the stock form's result is of the promoted dtype"
        )
    # The forms read the gate as `gate.to(torch.float32)`: a 16-bit gate of a float32 x is
    # upcast exactly (its gradient cast back by autograd, as stock's is).
    gate = gate.to(x.dtype)
    hidden = x.shape[-1]
    size = hidden if group_size is None else group_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"group_size: expected a positive int or None, got {group_size!r}"
        )
    if hidden % size:
        raise ValueError(
            f"group_size: {size} does not divide x's last dimension {hidden}"
        )
    x2 = x.contiguous().view(-1, size)
    g2 = gate.contiguous().view(-1, size)
    y, _ = _gated_rms(
        x2,
        g2,
        w.contiguous(),
        eps,
        cast_before_weight,
        activation,
        gate_first,
        hidden // size,
    )
    return y.view(x.shape)


# ---- residual add + RMSNorm -------------------------------------------------------------------


def _add_rms_norm_impl(
    residual: Tensor,
    x: Tensor,
    weight: Tensor,
    eps: float,
    offset: float,
    cast_before_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, sum, rstd) for residual and x (rows, hidden) contiguous of one dtype."""
    y, rstd, total = _backend(x.device).rms_norm_forward(
        x, weight, eps, offset, cast_before_weight, residual=residual
    )
    return y, total, rstd


_add_rms_norm_op = torch.library.custom_op(
    "forward_rewrite::add_rms_norm", mutates_args=()
)(_add_rms_norm_impl)


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(residual, x, weight, eps, offset, cast_before_weight):
    y, rstd = _rms_norm_fake(x, weight, eps, offset, cast_before_weight)
    return y, torch.empty_like(x), rstd


def _add_rms_norm_backward_impl(
    dy: Tensor,
    dsum: Tensor,
    total: Tensor,
    weight: Tensor,
    rstd: Tensor,
    offset: float,
    cast_before_weight: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(dsum + the norm's input gradient, dw); dw is empty when ``weight_grad`` is false."""
    dx, dw = _backend(total.device).rms_norm_backward(
        dy, total, weight, rstd, offset, cast_before_weight, weight_grad, dres=dsum
    )
    return dx, dw if dw is not None else total.new_empty(0)


_add_rms_norm_backward_op = torch.library.custom_op(
    "forward_rewrite::add_rms_norm_backward", mutates_args=()
)(_add_rms_norm_backward_impl)


@_add_rms_norm_backward_op.register_fake
def _add_rms_norm_backward_fake(
    dy, dsum, total, weight, rstd, offset, cast_before_weight, weight_grad
):
    return _rms_norm_backward_fake(
        dy, total, weight, rstd, offset, cast_before_weight, weight_grad
    )


def _add_rms_setup(ctx, inputs, output):
    _residual, _x, weight, _eps, offset, cast_before_weight = inputs
    _, total, rstd = output
    ctx.save_for_backward(total, weight, rstd)
    ctx.options = (offset, cast_before_weight)


def _add_rms_backward(ctx, dy, dsum, _drstd):
    total, weight, rstd = ctx.saved_tensors
    offset, cast_before_weight = ctx.options
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[1] or needs[2]):
        return None, None, None, None, None, None
    if dy is None:  # only the sum is used: its gradient passes through the add
        dy = torch.zeros_like(
            total, dtype=rms_out_dtype(total.dtype, weight.dtype, cast_before_weight)
        )
    if dsum is None:
        dsum = torch.zeros_like(total)
    dx, dw = _add_rms_norm_backward(
        dy.contiguous(),
        dsum.contiguous(),
        total,
        weight,
        rstd,
        offset,
        cast_before_weight,
        needs[2],
    )
    # The add's two inputs get the same gradient (as torch's AddBackward gives them).
    return (
        dx if needs[0] else None,
        dx if needs[1] else None,
        dw if needs[2] else None,
        None,
        None,
        None,
    )


_add_rms_norm = OpPair(
    _add_rms_norm_op,
    _add_rms_norm_impl,
    _add_rms_setup,
    _add_rms_backward,
    nondiff=(2,),
)
_add_rms_norm_backward = BackwardOp(
    _add_rms_norm_backward_op, _add_rms_norm_backward_impl
)


def add_rms_norm(
    residual: Tensor,
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(s, weight, eps, ...), s)`` with ``s = residual + x``: a decoder layer's
    residual add and the RMSNorm after it (``hidden = residual + hidden; residual = hidden;
    hidden = norm(hidden)``) in one kernel.

    ``s`` is rounded to the inputs' dtype as torch's add rounds it, and normalised from that
    rounded value, so both results equal the stock statements'. In backward the gradient
    that reaches ``s`` directly (through the next residual) is added to the norm's input
    gradient in float32 before one rounding (stock rounds the norm's gradient, then adds):
    residual and x get that one gradient, as an add's inputs do. ``offset`` and
    ``cast_before_weight`` as :func:`rms_norm`'s. residual and x: one shape, dtype and device.
    """
    _tensor("residual", residual)
    w, eps, offset, cast_before_weight = _rms_arguments(
        x, weight, eps, offset, cast_before_weight
    )
    _device("residual", residual, x, "x")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual: dtype {residual.dtype} differs from x's {x.dtype}")
    if residual.shape != x.shape:
        raise ValueError(
            f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}"
        )
    hidden = x.shape[-1]
    y, total, _ = _add_rms_norm(
        residual.contiguous().view(-1, hidden),
        x.contiguous().view(-1, hidden),
        w.contiguous(),
        eps,
        offset,
        cast_before_weight,
    )
    return y.view(x.shape), total.view(x.shape)


# ---- rotary -----------------------------------------------------------------------------------


def _rotary_impl(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int,
    interleaved: bool,
    head_index: int,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(q_out, k_out) in q's and k's layouts; 4-D operands (``_fusions_backend``)."""
    return _backend(q.device).rotary(
        q, k, cos, sin, rotary_dim, interleaved, head_index, out_dtype, False
    )


_rotary_op = torch.library.custom_op("forward_rewrite::rotary", mutates_args=())(
    _rotary_impl
)


@_rotary_op.register_fake
def _rotary_fake(q, k, cos, sin, rotary_dim, interleaved, head_index, out_dtype):
    return torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)


def _rotary_backward_impl(
    dq_out: Tensor,
    dk_out: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int,
    interleaved: bool,
    head_index: int,
    grad_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(dq, dk) of dtype ``grad_dtype``: the transposed rotation of the output gradients."""
    return _backend(dq_out.device).rotary(
        dq_out, dk_out, cos, sin, rotary_dim, interleaved, head_index, grad_dtype, True
    )


_rotary_backward_op = torch.library.custom_op(
    "forward_rewrite::rotary_backward", mutates_args=()
)(_rotary_backward_impl)


@_rotary_backward_op.register_fake
def _rotary_backward_fake(
    dq_out, dk_out, cos, sin, rotary_dim, interleaved, head_index, grad_dtype
):
    return torch.empty_like(dq_out, dtype=grad_dtype), torch.empty_like(
        dk_out, dtype=grad_dtype
    )


def _rotate(x, interleaved):
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, rotary_dim, interleaved, head_index, _out_dtype = inputs
    ctx.options = (rotary_dim, interleaved, head_index, q.dtype)
    ctx.shapes = (q.shape, k.shape)
    # q and k only when cos/sin need gradients (models build them under no_grad).
    ctx.table_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.table_grad else ()))


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _rotary_backward(ctx, dq_out, dk_out):
    rotary_dim, interleaved, head_index, q_dtype = ctx.options
    cos, sin = ctx.saved_tensors[:2]
    # On the fast path an output no gradient reached comes as None (materialize=False):
    # its input gets None too, and the kernel a zero stand-in.
    reached = (dq_out is not None, dk_out is not None)
    if not any(reached):
        return (None,) * 8
    given = dq_out if reached[0] else dk_out
    dq_out, dk_out = (
        g if g is not None else given.new_zeros(shape)
        for g, shape in zip((dq_out, dk_out), ctx.shapes)
    )
    needs = [n and r for n, r in zip(ctx.needs_input_grad[:2], reached)]
    needs += ctx.needs_input_grad[2:4]
    dq = dk = dcos = dsin = None
    if needs[0] or needs[1]:
        dq, dk = _rotary_backward_call(
            _unit_last_stride(dq_out),
            _unit_last_stride(dk_out),
            cos,
            sin,
            rotary_dim,
            interleaved,
            head_index,
            q_dtype,
        )
    if needs[2] or needs[3]:
        # Not fused (the stock modules never need it): d/dcos = sum of dy * x, d/dsin = sum
        # of dy * rotate(x), over what cos and sin are broadcast across, in float32
        # (float64 for float64 tables).
        q, k = ctx.saved_tensors[2:]
        acc = torch.float64 if cos.dtype == torch.float64 else torch.float32
        dcos = torch.zeros(cos.shape, dtype=acc, device=cos.device)
        dsin = torch.zeros(sin.shape, dtype=acc, device=sin.device)
        for g, x in ((dq_out, q), (dk_out, k)):
            g = g[..., :rotary_dim].to(acc)
            x = x[..., :rotary_dim].to(acc)
            dcos = dcos + (g * x).sum_to_size(cos.shape)
            dsin = dsin + (g * _rotate(x, interleaved)).sum_to_size(sin.shape)
        dcos, dsin = dcos.to(cos.dtype), dsin.to(sin.dtype)
    return (
        dq if needs[0] else None,
        dk if needs[1] else None,
        dcos if needs[2] else None,
        dsin if needs[3] else None,
        None,
        None,
        None,
        None,
    )


_rotary = OpPair(
    _rotary_op, _rotary_impl, _rotary_setup, _rotary_backward, materialize=False
)
_rotary_backward_call = BackwardOp(_rotary_backward_op, _rotary_backward_impl)


def rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    unsqueeze_dim: int = 1,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` for q and k in one launch.

    ``cos`` and ``sin`` as transformers passes them (``(batch, seq, rotary_dim)``, batch may
    be 1), unsqueezed at ``unsqueeze_dim`` to broadcast against q and k (``(batch, heads,
    seq, head_dim)`` with ``unsqueeze_dim=1``, ``(batch, seq, heads, head_dim)`` with 2).
    The first ``rotary_dim`` entries of each head (default: ``cos.shape[-1]``, which must
    equal it) become ``x * cos + rotate(x) * sin``, ``rotate`` being ``rotate_half`` or,
    with ``interleaved``, ``rotate_every_two`` (GPT-J, GLM, Cohere; cos and sin then hold one
    entry per element, as after ``repeat_interleave``); the rest of the head passes through
    (Phi, GLM partial rotary). Computed in float32, rounded once to ``out_dtype``: by
    default ``promote(q.dtype, cos.dtype)`` as the stock expression gives (pass q's dtype
    for Cohere / Ernie, which cast back). Outputs keep q's and k's memory layouts.

    Gradients: for q and k the transposed rotation (the rotation by -theta); for cos and
    sin, when they require one, an unfused float32 reduction. When only one output is used,
    the other input gets no gradient (None, as stock's two separate expressions give; under
    ``torch.compile`` the custom op's backward gets a zero gradient for it instead).
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _tensor(name, t)
        _dtype(name, t)
        _device(name, t, q, "q")
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int):
        raise TypeError(
            f"unsqueeze_dim: expected an int, got {type(unsqueeze_dim).__name__}"
        )
    interleaved = _bool("interleaved", interleaved)
    if k.dtype != q.dtype:
        raise TypeError(f"k: dtype {k.dtype} differs from q's {q.dtype}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin: dtype {sin.dtype} differs from cos' {cos.dtype}")
    if sin.shape != cos.shape:
        raise ValueError(
            f"sin: shape {tuple(sin.shape)} differs from cos' {tuple(cos.shape)}"
        )
    rank = q.dim()
    if rank not in (2, 3, 4) or k.dim() != rank:
        raise ValueError(
            f"q, k: expected 2 to 4 dimensions each, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    try:
        cos4 = cos.unsqueeze(unsqueeze_dim)
        sin4 = sin.unsqueeze(unsqueeze_dim)
    except IndexError:
        raise ValueError(
            f"unsqueeze_dim: {unsqueeze_dim} is out of range for cos of shape {tuple(cos.shape)}"
        ) from None
    if cos4.dim() != rank:
        raise ValueError(
            f"cos: shape {tuple(cos.shape)} unsqueezed at {unsqueeze_dim} has "
            f"{cos4.dim()} dimensions, q has {rank}"
        )
    head = unsqueeze_dim % rank
    if head == rank - 1:
        raise ValueError("unsqueeze_dim: must not be the last (head_dim) dimension")
    head_dim = q.shape[-1]
    if rotary_dim is None:
        rotary_dim = cos.shape[-1]
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(
            f"rotary_dim: expected an int or None, got {type(rotary_dim).__name__}"
        )
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim: expected an even number in (0, {head_dim}], got {rotary_dim}"
        )
    if cos.shape[-1] != rotary_dim:
        raise ValueError(
            f"cos: last dimension {cos.shape[-1]}, expected rotary_dim = {rotary_dim}"
        )
    if k.shape[-1] != head_dim:
        raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's {head_dim}")
    for d in range(rank - 1):
        if d == head:
            continue
        if k.shape[d] != q.shape[d]:
            raise ValueError(
                f"k: shape {tuple(k.shape)} differs from q's {tuple(q.shape)} in dimension {d}"
            )
        if cos4.shape[d] not in (1, q.shape[d]):
            raise ValueError(
                f"cos: shape {tuple(cos.shape)} (unsqueezed at {unsqueeze_dim}) does not "
                f"broadcast to q's {tuple(q.shape)}"
            )
    cs_dtype = _kernel_dtype("cos", cos.dtype, q.dtype)
    promoted = torch.promote_types(q.dtype, cos.dtype)
    if out_dtype is None:
        out_dtype = promoted
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(
            f"out_dtype: expected a torch.dtype or None, got {type(out_dtype).__name__}"
        )
    if out_dtype not in (q.dtype, promoted):
        raise ValueError(
            f"out_dtype: expected {q.dtype} or {promoted}, got {out_dtype}"
        )

    pad = 4 - rank
    q4 = _unit_last_stride(q).reshape((1,) * pad + tuple(q.shape))
    k4 = _unit_last_stride(k).reshape((1,) * pad + tuple(k.shape))
    cos4 = _unit_last_stride(cos4.to(cs_dtype)).reshape((1,) * pad + tuple(cos4.shape))
    sin4 = _unit_last_stride(sin4.to(cs_dtype)).reshape((1,) * pad + tuple(sin4.shape))
    rotary_dims(head + pad)  # validates the index
    q_out, k_out = _rotary(
        q4, k4, cos4, sin4, rotary_dim, interleaved, head + pad, out_dtype
    )
    return q_out.reshape(q.shape), k_out.reshape(k.shape)


def rotary_single(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    unsqueeze_dim: int = 1,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)`` of one tensor (Gemma 3n, Gemma
    4: q and k rotated by separate calls): :func:`rotary`'s computation, options and
    gradients for x alone (the launch's k side is empty)."""
    _tensor("x", x)
    _dtype("x", x)
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int):
        raise TypeError(
            f"unsqueeze_dim: expected an int, got {type(unsqueeze_dim).__name__}"
        )
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"x: expected 2 to 4 dimensions, got {tuple(x.shape)}")
    if not -x.dim() <= unsqueeze_dim < x.dim():
        raise ValueError(
            f"unsqueeze_dim: {unsqueeze_dim} is out of range for x of shape {tuple(x.shape)}"
        )
    none = x.detach().narrow(unsqueeze_dim % x.dim(), 0, 0)
    out, _ = rotary(
        x,
        none,
        cos,
        sin,
        rotary_dim=rotary_dim,
        interleaved=interleaved,
        unsqueeze_dim=unsqueeze_dim,
        out_dtype=out_dtype,
    )
    return out


# ---- gated MLP product --------------------------------------------------------------------------


def _gated_impl(
    gate: Tensor,
    up: Tensor,
    activation: str,
    overwrite: bool,
    limit: float | None = None,
    clamp_after: bool = False,
    alpha: float | None = None,
) -> Tensor:
    """act(gate) * up for (rows, cols) operands with unit stride along cols; contiguous.
    ``overwrite`` is for the backward (see :func:`gated_mlp_act`); the rest is the
    :class:`GateFn`."""
    fn = GateFn(activation, limit, clamp_after, alpha)
    return _backend(gate.device).gated_act(gate, up, fn)


_gated_op = torch.library.custom_op("forward_rewrite::gated_act", mutates_args=())(
    _gated_impl
)


@_gated_op.register_fake
def _gated_fake(
    gate, up, activation, overwrite, limit=None, clamp_after=False, alpha=None
):
    return gate.new_empty(gate.shape)


def _gated_backward_impl(
    dout: Tensor,
    gate: Tensor,
    up: Tensor,
    activation: str,
    limit: float | None = None,
    clamp_after: bool = False,
    alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(dgate, dup), contiguous."""
    fn = GateFn(activation, limit, clamp_after, alpha)
    return _backend(gate.device).gated_act_backward(dout, gate, up, fn)


_gated_backward_op = torch.library.custom_op(
    "forward_rewrite::gated_act_backward", mutates_args=()
)(_gated_backward_impl)


@_gated_backward_op.register_fake
def _gated_backward_fake(
    dout, gate, up, activation, limit=None, clamp_after=False, alpha=None
):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _gated_setup(ctx, inputs, output):
    gate, up, activation, overwrite, *rest = inputs
    ctx.gate_fn = GateFn(activation, *rest)
    ctx.overwrite = overwrite
    ctx.save_for_backward(gate, up)


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _may_overwrite(ctx, *saved: Tensor) -> bool:
    """Whether a backward whose caller promised that nothing else reads its saved inputs
    may write their gradients over them: on the eager path only, forward and backward (a
    traced graph would not see the writes; a dispatch mode such as selective checkpointing
    may hold the tensors), not when the graph is kept for another backward
    (``retain_graph``) or differentiated again (``create_graph``), and for contiguous
    tensors of distinct storages."""
    if not (ctx.overwrite and getattr(ctx, "eager", False)):
        return False
    if _keep_graph is None or torch.is_grad_enabled() or not eager_ok(saved):
        return False
    try:
        if _keep_graph():
            return False
    except RuntimeError:  # not inside the autograd engine: someone called us directly
        return False
    storages = {t.untyped_storage().data_ptr() for t in saved}
    return len(storages) == len(saved) and all(t.is_contiguous() for t in saved)


def _overwritten(*grads: Tensor):
    """Gradients written over saved inputs: their version counters move, so an autograd
    node that saved the same tensors raises instead of reading gradients."""
    for g in grads:
        torch.autograd.graph.increment_version(g)
    return grads


def _gated_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    fn = ctx.gate_fn
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[1]):
        return (None,) * 7
    dout = dout.contiguous()
    if needs[0] and needs[1] and _may_overwrite(ctx, gate, up):
        backend = _backend(gate.device)
        dgate, dup = _overwritten(*backend.gated_act_backward(dout, gate, up, fn, True))
    else:
        dgate, dup = _gated_backward_call(dout, gate, up, *fn)
    return (dgate if needs[0] else None), (dup if needs[1] else None), *(None,) * 5


_gated = OpPair(_gated_op, _gated_impl, _gated_setup, _gated_backward)
_gated_backward_call = BackwardOp(_gated_backward_op, _gated_backward_impl)


def _rows_view(t):
    """t as (rows, cols) with unit stride along cols and row stride >= cols: a view when
    t's layout allows it (Phi-3's ``chunk`` halves of one projection), else a copy."""
    cols = t.shape[-1]
    t2 = t.reshape(-1, cols)
    rows = t2.shape[0]
    if rows * cols and (
        (cols > 1 and t2.stride(1) != 1) or (rows > 1 and t2.stride(0) < cols)
    ):
        t2 = t2.contiguous()
    return t2


def gated_mlp_act(
    gate: Tensor,
    up: Tensor,
    *,
    activation: str = "silu",
    limit: float | None = None,
    clamp_after_activation: bool = False,
    alpha: float | None = None,
    overwrite_inputs: bool = False,
) -> Tensor:
    """``act(gate) * up`` as a gated MLP computes it between its projections
    (``LlamaMLP``: ``self.act_fn(self.gate_proj(x)) * self.up_proj(x)``).

    ``activation``: ``"silu"`` (``nn.SiLU``, ``ACT2FN["silu"]``) or ``"gelu_tanh"``
    (``F.gelu(approximate="tanh")``, ``ACT2FN["gelu_pytorch_tanh"]``). The forward rounds as
    the stock expression does (the activation to the input dtype, then the product); the
    backward recomputes the activation from gate and up (nothing else is saved) in float32.
    gate and up may be strided views (Phi-3's ``gate_up.chunk(2, dim=-1)``); the result is
    contiguous, of their shape and dtype.

    ``limit`` makes it the clamped SwiGLU of DeepSeek-V4, GLM-5-Next and HY-V4:
    ``act(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)``, or with
    ``clamp_after_activation=True`` Step-3.7's ``act(gate).clamp(max=limit) * up.clamp(...)``.
    The limit is a number above 0 (``inf`` allowed), compared in the inputs' dtype as torch
    compares a tensor with a scalar; the gradients are torch's clamp backward's (zero where a
    clamp holds, and where the clamped value is NaN).

    ``activation="swiglu_oai"`` with ``alpha``: GPT-OSS's and MiniMax-M3's ``(up + 1) * gate
    * torch.sigmoid(gate * alpha)`` (with their ``limit``), rounded where their statements
    round.

    ``overwrite_inputs=True`` is the caller's promise that nothing reads gate and up after
    this call (they are temporaries, as in the MLPs the gated-mlp pass patches): the
    backward then writes their gradients over them instead of allocating two more
    (rows, cols) tensors at the peak of the MLP's backward (Liger's SwiGLU does the same).
    The writes move the inputs' version counters, so an autograd node that saved them
    raises rather than read gradients. Ignored (the gradients allocated) where the promise
    cannot hold or would not be seen: when compiling or under dispatch modes, with
    ``retain_graph`` or ``create_graph``, for strided or shared-storage inputs.
    """
    _tensor("gate", gate)
    _tensor("up", up)
    _dtype("gate", gate)
    _device("up", up, gate, "gate")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: dtype {up.dtype} differs from gate's {gate.dtype}")
    if up.shape != gate.shape:
        raise ValueError(
            f"up: shape {tuple(up.shape)} differs from gate's {tuple(gate.shape)}"
        )
    if gate.dim() < 1:
        raise ValueError("gate: expected at least one dimension")
    fn = _gate_fn(activation, limit, clamp_after_activation, alpha)
    _bool("overwrite_inputs", overwrite_inputs)
    out = _gated(
        _rows_view(gate), _rows_view(up), fn.activation, overwrite_inputs, *fn[1:]
    )
    return out.view(gate.shape)


# ---- gated MLP product on one gate_up tensor ------------------------------------------------


def _gated_packed_impl(
    gate_up: Tensor,
    activation: str,
    overwrite: bool,
    limit: float | None = None,
    clamp_after: bool = False,
    alpha: float | None = None,
    interleaved: bool = False,
) -> Tensor:
    """act(gate) * up for (rows, 2c) gate_up holding gate and up as halves or (interleaved)
    pairs; contiguous (rows, c)."""
    fn = GateFn(activation, limit, clamp_after, alpha)
    return _backend(gate_up.device).gated_act_packed(gate_up, fn, interleaved)


_gated_packed_op = torch.library.custom_op(
    "forward_rewrite::gated_act_packed", mutates_args=()
)(_gated_packed_impl)


@_gated_packed_op.register_fake
def _gated_packed_fake(
    gate_up,
    activation,
    overwrite,
    limit=None,
    clamp_after=False,
    alpha=None,
    interleaved=False,
):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


def _gated_packed_backward_impl(
    dout: Tensor,
    gate_up: Tensor,
    activation: str,
    limit: float | None = None,
    clamp_after: bool = False,
    alpha: float | None = None,
    interleaved: bool = False,
) -> Tensor:
    """The gradient of gate_up, contiguous (rows, 2c), in its layout: [dgate | dup] per
    row, or (dgate, dup) pairs."""
    fn = GateFn(activation, limit, clamp_after, alpha)
    return _backend(gate_up.device).gated_act_backward_packed(
        dout, gate_up, fn, False, interleaved
    )


_gated_packed_backward_op = torch.library.custom_op(
    "forward_rewrite::gated_act_packed_backward", mutates_args=()
)(_gated_packed_backward_impl)


@_gated_packed_backward_op.register_fake
def _gated_packed_backward_fake(
    dout,
    gate_up,
    activation,
    limit=None,
    clamp_after=False,
    alpha=None,
    interleaved=False,
):
    return gate_up.new_empty(gate_up.shape)


def _gated_packed_setup(ctx, inputs, output):
    gate_up, activation, overwrite, limit, clamp_after, alpha, interleaved = inputs
    ctx.gate_fn = GateFn(activation, limit, clamp_after, alpha)
    ctx.interleaved = interleaved
    ctx.overwrite = overwrite
    ctx.save_for_backward(gate_up)


def _gated_packed_backward(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    fn, interleaved = ctx.gate_fn, ctx.interleaved
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    dout = dout.contiguous()
    if _may_overwrite(ctx, gate_up):
        backend = _backend(gate_up.device)
        (dgate_up,) = _overwritten(
            backend.gated_act_backward_packed(dout, gate_up, fn, True, interleaved)
        )
    else:
        dgate_up = _gated_packed_backward_call(dout, gate_up, *fn, interleaved)
    return dgate_up, *(None,) * 6


_gated_packed = OpPair(
    _gated_packed_op, _gated_packed_impl, _gated_packed_setup, _gated_packed_backward
)
_gated_packed_backward_call = BackwardOp(
    _gated_packed_backward_op, _gated_packed_backward_impl
)


def gated_mlp_act_packed(
    gate_up: Tensor,
    *,
    activation: str = "silu",
    limit: float | None = None,
    clamp_after_activation: bool = False,
    alpha: float | None = None,
    interleaved: bool = False,
    overwrite_inputs: bool = False,
) -> Tensor:
    """``act(gate) * up`` with ``gate, up = gate_up.chunk(2, dim=-1)``, as ``Phi3MLP`` (``up *
    act(gate)``, the same product) and the MoE experts' ``linear(...).chunk(2, dim=-1)``
    compute it: the numerics of :func:`gated_mlp_act`, and the gradient of ``gate_up``
    written as one tensor (the chunk's backward would concatenate two). ``gate_up`` may be a
    strided view; the result is contiguous, of shape ``gate_up.shape[:-1] + (cols,)``.
    ``interleaved=True``: gate and up alternate along the last dimension (GPT-OSS's experts:
    ``gate_up[..., ::2]``, ``gate_up[..., 1::2]``), and so does the gradient. ``activation``,
    ``limit``, ``clamp_after_activation``, ``alpha``: as :func:`gated_mlp_act`'s (the MoE
    experts' ``_apply_gate`` of DeepSeek-V4, GLM-5-Next, HY-V4, GPT-OSS, MiniMax-M3).
    ``overwrite_inputs``: as :func:`gated_mlp_act`'s, for ``gate_up``."""
    _tensor("gate_up", gate_up)
    _dtype("gate_up", gate_up)
    if gate_up.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"gate_up: device {gate_up.device} is not supported (cpu or cuda)"
        )
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up: expected an even last dimension, got shape {tuple(gate_up.shape)}"
        )
    fn = _gate_fn(activation, limit, clamp_after_activation, alpha)
    _bool("interleaved", interleaved)
    _bool("overwrite_inputs", overwrite_inputs)
    cols = gate_up.shape[-1] // 2
    out = _gated_packed(
        _rows_view(gate_up), fn.activation, overwrite_inputs, *fn[1:], interleaved
    )
    return out.view(*gate_up.shape[:-1], cols)
