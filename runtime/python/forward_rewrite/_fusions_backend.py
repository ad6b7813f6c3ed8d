"""The backend contract of the decoder-fusion ops and the checks every backend runs.

A backend is a module (``forward_rewrite._fusions_cpu``: the Rust CPU twins;
``forward_rewrite._fusions_cuda``: the CUDA kernels through cudarc) with eight functions::

    rms_norm_forward(x, weight, eps, offset, cast_before_weight, residual=None)
        -> (y, rstd), or (y, rstd, s) with a residual
    rms_norm_backward(dy, x, weight, rstd, offset, cast_before_weight, weight_grad,
        dres=None) -> (dx, dw or None)
    gated_rms_norm_forward(x, gate, weight, eps, cast_before_weight, activation, gate_first,
        groups) -> (y, rstd)
    gated_rms_norm_backward(dy, x, gate, weight, rstd, cast_before_weight, activation,
        gate_first, groups, weight_grad) -> (dx, dgate, dw or None)
    rms_scale_first_forward(x, eps) -> (y, rstd)
    rms_scale_first_backward(dy, x, rstd) -> dx
    rotary(q, k, cos, sin, rotary_dim, interleaved, head_index, out_dtype, transpose)
        -> (q_out, k_out)
    gated_act(gate, up, fn) -> out
    gated_act_backward(dout, gate, up, fn, into_inputs) -> (dgate, dup)
    gated_act_packed(gate_up, fn, interleaved) -> out
    gated_act_backward_packed(dout, gate_up, fn, into_inputs, interleaved) -> dgate_up

on the layouts ``forward_rewrite.fused_ops`` prepares (README, "Fused decoder ops"):

* RMSNorm: ``x`` (rows, hidden) contiguous; ``weight`` (hidden,) of x's dtype or float32;
  ``y`` of the output dtype (:func:`rms_out_dtype`); ``rstd`` (rows,) float32 (float64 for
  float64 inputs); ``dy`` (rows, hidden) of y's dtype. With ``residual`` (x's shape, dtype
  and device, contiguous) the decoder layer's residual add runs in front: ``s = residual +
  x`` as torch adds two tensors of x's dtype (float32 sum rounded once; float64 on the CPU in
  float64) is returned as a new contiguous tensor and normalised in place of x (y and rstd
  are those of s, bit for bit). Its backward takes ``x = s`` and ``dres`` (x's shape, dtype
  and device, contiguous), the gradient reaching s from elsewhere, added to dx in float32
  before dx's one rounding: ``dx = round(norm's dx + dres)``; dw is unchanged.
* gated RMSNorm: as RMSNorm, with ``gate`` of x's shape, dtype and device, contiguous; y, dy,
  dx and dgate of x's dtype (the forms end in ``.to(input_dtype)``); ``activation`` "silu" or
  "sigmoid"; on CUDA rows of at most ``GATED_NORM_MAX_HIDDEN`` elements. ``gate_first``: the
  gate multiplies x before the norm (Mamba's form). With ``groups`` > 1 a row is one group:
  ``weight`` has ``groups * hidden`` elements, row i is weighted by its segment ``i %
  groups``, and rows is a multiple of groups.
* scale-first RMSNorm (DeepSeek-V4's unweighted norm, the scale rounded to x's dtype before
  the product): ``x`` (rows, hidden) contiguous, no weight; ``y``, ``dy`` and ``dx`` of x's
  dtype and shape, contiguous; ``rstd`` as RMSNorm's.
* rotary: q, k, cos, sin 4-D, unit stride along the last dimension, any other strides;
  ``head_index`` (0, 1 or 2) is the dimension cos and sin are broadcast over (size 1 there);
  on the two other leading dimensions cos/sin have q's size or 1. Outputs have q's and k's
  layouts (``torch.empty_like``); k may have no heads (``rotary_single``). With
  ``transpose`` the inputs are the output gradients and ``out_dtype`` is q's dtype.
* gated product: gate and up (rows, cols) with unit stride along cols and a row stride of at
  least cols (Phi-3's chunks of one projection); outputs contiguous. The packed backward
  takes gate_up (rows, 2 * cols) (gate its first half, up its second, row stride at least
  2 * cols) and returns its gradient as one contiguous (rows, 2 * cols) tensor. With
  ``into_inputs`` the backward writes the gradients over its inputs and returns them (gate
  and up contiguous and apart, gate_up contiguous; the ``check_gated*`` say so): each element
  is read before it is overwritten, by the same thread, so nothing else is allocated.
  ``fn`` (:class:`GateFn`) is what the product computes of gate and up: the activation,
  and the clamped SwiGLU's ``limit`` (None, or a float above 0, inf allowed: gate clamped at
  max ``limit`` before the activation, with ``clamp_after`` the activation's output, and up
  to [-limit, limit], the gradients zero where a clamp holds, at a bound as the running
  torch's clamp backward decides: :data:`CLAMP_GRAD_AT_BOUND`), and swiglu_oai's ``alpha``;
  the native functions check them. ``interleaved`` (the packed forms): gate_up holds (gate,
  up) pairs, GPT-OSS's ``gate_up[..., ::2]``, ``gate_up[..., 1::2]``, not two halves; the
  gradient is written in the same layout.

A backend calls the matching ``check_*`` first, so a wrong call is a Python error naming the
argument before any pointer reaches native code.
"""

import itertools
from typing import NamedTuple

import torch

#: float64 runs on the CPU only (it is there for ``torch.autograd.gradcheck``).
FUSION_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
ACTIVATIONS = ("silu", "gelu_tanh", "swiglu_oai")


class GateFn(NamedTuple):
    """What the gated product computes of gate and up (``gated_act.cu``): ``activation``
    (:data:`ACTIVATIONS`; ``"swiglu_oai"``, GPT-OSS's and MiniMax-M3's ``(up + 1) * gate *
    sigmoid(gate * alpha)``, takes ``alpha``), the clamped SwiGLU's ``limit`` and whether
    the gate is clamped after the activation (``clamp_after``)."""

    activation: str = "silu"
    limit: float | None = None
    clamp_after: bool = False
    alpha: float | None = None

    def native(self):
        """The keyword arguments of the native gated functions."""
        return {
            "activation": self.activation,
            "limit": self.limit,
            "clamp_after_activation": self.clamp_after,
            "grad_at_bound": self.limit is not None and CLAMP_GRAD_AT_BOUND,
            "alpha": self.alpha,
        }


def _clamp_grad_at_bound():
    """Whether the running torch's ``clamp`` backward passes the gradient of a value that
    lies exactly at a bound (torch 2.11 does, 2.15 does not: a value at the bound of a
    16-bit clamp is common enough to matter). The clamped SwiGLU's backward follows it, as
    the stock expression's would. Asked of torch itself, once, on the CPU, at import (so no
    mode the ops later run under sees it)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([-1.0, 1.0], requires_grad=True)
        (g,) = torch.autograd.grad(x.clamp(min=-1.0, max=1.0).sum(), x)
    low, high = g.tolist()
    if low != high:
        raise RuntimeError(
            f"torch's clamp backward treats its two bounds apart ({low}, {high}): the "
            "clamped SwiGLU does not know this torch"
        )
    return high == 1.0


CLAMP_GRAD_AT_BOUND = _clamp_grad_at_bound()


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")


def _floating(name, t, device_type):
    _floating_dtype(name, t.dtype, device_type)


def _floating_dtype(name, dtype, device_type):
    if dtype not in FUSION_DTYPES:
        raise TypeError(
            f"{name}: dtype {dtype} is not bfloat16, float16 or float32 "
            "(or float64 on the CPU)"
        )
    if dtype == torch.float64 and device_type != "cpu":
        raise TypeError(f"{name}: float64 is supported on the CPU only")


def _on(name, t, ref, device_type):
    if t.device.type != device_type:
        raise ValueError(f"{name}: on {t.device}, expected a {device_type} tensor")
    if t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, the first input is on {ref.device}")


def _contiguous(name, t):
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def _wide(name, dtype, base):
    """``dtype`` must be ``base`` or float32 (float64 only with float64)."""
    if base == torch.float64 or dtype == torch.float64:
        if dtype != base:
            raise TypeError(f"{name}: float64 mixes only with float64, got {dtype}")
        return
    if dtype not in (base, torch.float32):
        raise TypeError(f"{name}: dtype {dtype} must be {base} or torch.float32")


def rms_out_dtype(x_dtype, w_dtype, cast_before_weight):
    """Llama order: ``weight * x.to(input_dtype)`` is of the promoted dtype; Gemma / OLMo 2
    order: ``(...).type_as(x)`` / ``.to(input_dtype)`` is of x's dtype."""
    if cast_before_weight:
        return torch.promote_types(x_dtype, w_dtype)
    return x_dtype


def rstd_dtype(x_dtype):
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _dy_and_rstd(x, dy, dy_dtype, rstd):
    """The checks the norms' backwards share (dy of x's shape and ``dy_dtype``; rstd one
    float of rstd_dtype per row of x): the (name, tensor) pairs given, for the device and
    layout checks."""
    named = []
    if dy is not None:
        _tensor("dy", dy)
        if dy.shape != x.shape:
            raise ValueError(
                f"dy: expected shape {tuple(x.shape)}, got {tuple(dy.shape)}"
            )
        if dy.dtype != dy_dtype:
            raise TypeError(f"dy: dtype {dy.dtype}, expected {dy_dtype}")
        named.append(("dy", dy))
    if rstd is not None:
        rows = x.shape[0]
        _tensor("rstd", rstd)
        if rstd.shape != (rows,) or rstd.dtype != rstd_dtype(x.dtype):
            raise ValueError(
                f"rstd: expected {rstd_dtype(x.dtype)} of shape ({rows},), "
                f"got {rstd.dtype} {tuple(rstd.shape)}"
            )
        named.append(("rstd", rstd))
    return named


def check_rms(
    x,
    weight,
    device_type,
    *,
    dy=None,
    rstd=None,
    cast_before_weight=True,
    groups=1,
    residual=None,
    dres=None,
):
    """Raises naming the first argument that breaks the RMSNorm contract; returns
    (rows, hidden)."""
    _tensor("x", x)
    _tensor("weight", weight)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (rows, hidden), got {tuple(x.shape)}")
    rows, hidden = x.shape
    if hidden == 0:
        raise ValueError("x: the normalised dimension is empty")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    if rows % groups:
        raise ValueError(f"groups: {groups} does not divide the {rows} rows")
    if weight.shape != (groups * hidden,):
        raise ValueError(
            f"weight: expected shape ({groups * hidden},), got {tuple(weight.shape)}"
        )
    _floating("x", x, device_type)
    _floating("weight", weight, device_type)
    _wide("weight", weight.dtype, x.dtype)
    named = [("x", x), ("weight", weight)]
    dy_dtype = rms_out_dtype(x.dtype, weight.dtype, cast_before_weight)
    named += _dy_and_rstd(x, dy, dy_dtype, rstd)
    for name, t in (("residual", residual), ("dres", dres)):
        if t is None:
            continue
        _tensor(name, t)
        if t.shape != x.shape:
            raise ValueError(
                f"{name}: expected x's shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype}, expected x's {x.dtype}")
        named.append((name, t))
    for name, t in named:
        _on(name, t, x, device_type)
        _contiguous(name, t)
    return rows, hidden


def check_rms_scale_first(x, device_type, *, dy=None, rstd=None):
    """Raises naming the first argument that breaks the scale-first RMSNorm contract;
    returns (rows, hidden)."""
    _tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (rows, hidden), got {tuple(x.shape)}")
    rows, hidden = x.shape
    if hidden == 0:
        raise ValueError("x: the normalised dimension is empty")
    _floating("x", x, device_type)
    named = [("x", x), *_dy_and_rstd(x, dy, x.dtype, rstd)]
    for name, t in named:
        _on(name, t, x, device_type)
        _contiguous(name, t)
    return rows, hidden


GATED_NORM_ACTIVATIONS = ("silu", "sigmoid")
#: The CUDA gated norm's longest row (its backward keeps a float32 row of the weight gradient
#: per team in shared memory; runtime/src/cuda/fusions.rs, ``GATED_RMS_MAX_HIDDEN``). Every
#: model with the form normalises one head: 128 or 256 elements.
GATED_NORM_MAX_HIDDEN = 8192


def check_gated_rms(
    x, gate, weight, activation, device_type, *, groups=1, dy=None, rstd=None
):
    """Raises naming the first argument that breaks the gated RMSNorm contract (x's: the
    gate, dy and the outputs have x's shape and dtype); returns (rows, hidden)."""
    _tensor("gate", gate)
    if gate.shape != x.shape:
        raise ValueError(
            f"gate: expected x's shape {tuple(x.shape)}, got {tuple(gate.shape)}"
        )
    if gate.dtype != x.dtype:
        raise TypeError(f"gate: dtype {gate.dtype}, expected x's {x.dtype}")
    if activation not in GATED_NORM_ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {GATED_NORM_ACTIVATIONS}, got {activation!r}"
        )
    if dy is not None:
        _tensor("dy", dy)
        if dy.dtype != x.dtype:
            raise TypeError(f"dy: dtype {dy.dtype}, expected x's {x.dtype}")
    # The rest as the plain norm's, with an output (and dy) of x's dtype: the gated forms
    # always end in ``.to(input_dtype)``.
    rows, hidden = check_rms(
        x,
        weight,
        device_type,
        dy=dy,
        rstd=rstd,
        cast_before_weight=False,
        groups=groups,
    )
    if device_type == "cuda" and hidden > GATED_NORM_MAX_HIDDEN:
        raise ValueError(
            f"x: rows of {hidden} elements; the CUDA gated norm takes at most "
            f"{GATED_NORM_MAX_HIDDEN}"
        )
    _on("gate", gate, x, device_type)
    _contiguous("gate", gate)
    return rows, hidden


def rotary_dims(head_index):
    """The two position dimensions (P0, P1) of a 4-D q, in order, for a head dimension."""
    if head_index not in (0, 1, 2):
        raise ValueError(f"head_index: expected 0, 1 or 2, got {head_index!r}")
    return [d for d in range(3) if d != head_index]


def check_rotary(q, k, cos, sin, rotary_dim, head_index, out_dtype, device_type):
    """Raises naming the first argument that breaks the rotary contract; returns
    (p0, p1, position dims)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions, got {tuple(t.shape)}")
        _floating(name, t, device_type)
        _on(name, t, q, device_type)
        if t.numel() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: the last dimension must have stride 1")
    pos = rotary_dims(head_index)
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's {head_dim}")
    for d in pos:
        if k.shape[d] != q.shape[d]:
            raise ValueError(
                f"k: shape {tuple(k.shape)} differs from q's {tuple(q.shape)} outside the "
                f"head dimension {head_index}"
            )
    if sin.shape != cos.shape:
        raise ValueError(
            f"sin: shape {tuple(sin.shape)} differs from cos' {tuple(cos.shape)}"
        )
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim: expected an int, got {type(rotary_dim).__name__}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim: expected an even number in (0, {head_dim}], got {rotary_dim}"
        )
    if cos.shape[-1] != rotary_dim:
        raise ValueError(
            f"cos: last dimension {cos.shape[-1]}, expected rotary_dim = {rotary_dim}"
        )
    if cos.shape[head_index] != 1:
        raise ValueError(
            f"cos: size {cos.shape[head_index]} in the head dimension {head_index}, expected 1"
        )
    for d in pos:
        if cos.shape[d] not in (1, q.shape[d]):
            raise ValueError(
                f"cos: shape {tuple(cos.shape)} does not broadcast to q's {tuple(q.shape)}"
            )
    if k.dtype != q.dtype:
        raise TypeError(f"k: dtype {k.dtype} differs from q's {q.dtype}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin: dtype {sin.dtype} differs from cos' {cos.dtype}")
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(
            f"out_dtype: expected a torch.dtype, got {type(out_dtype).__name__}"
        )
    _floating_dtype("out_dtype", out_dtype, device_type)
    # The kernels exist for every mix of one 16-bit dtype with float32 (input, cos/sin,
    # output), and for float64 alone.
    dtypes = {q.dtype, cos.dtype, out_dtype}
    if torch.float64 in dtypes and dtypes != {torch.float64}:
        raise TypeError(
            f"cos: float64 mixes only with float64, got {sorted(map(str, dtypes))}"
        )
    if len(dtypes - {torch.float32, torch.float64}) > 1:
        raise TypeError(
            f"cos: bfloat16 and float16 do not mix in one call, got {sorted(map(str, dtypes))}"
        )
    return q.shape[pos[0]], q.shape[pos[1]], pos


def rotary_strides(t, pos, head_index):
    """Element strides of a 4-D tensor over (P0, P1, head), 0 where the size is 1."""
    shape, stride = t.shape, t.stride()
    return [stride[d] if shape[d] > 1 else 0 for d in (*pos, head_index)]


def make_rotary(device_type, empty_like, launch):
    """A backend's ``rotary`` (the contract's signature): check the operands, allocate the
    outputs with the backend's ``empty_like``, build the keyword arguments its launcher
    takes (pointers, strides in elements, sizes, dtype names) and hand them to
    ``launch(q, kwargs)``; (q_out, k_out)."""

    def rotary(
        q, k, cos, sin, rotary_dim, interleaved, head_index, out_dtype, transpose
    ):
        p0, p1, pos = check_rotary(
            q, k, cos, sin, rotary_dim, head_index, out_dtype, device_type
        )
        q_out = empty_like(q, dtype=out_dtype)
        k_out = empty_like(k, dtype=out_dtype)
        launch(
            q,
            {
                "q": q.data_ptr(),
                "k": k.data_ptr(),
                "cos": cos.data_ptr(),
                "sin": sin.data_ptr(),
                "q_out": q_out.data_ptr(),
                "k_out": k_out.data_ptr(),
                "q_strides": rotary_strides(q, pos, head_index),
                "k_strides": rotary_strides(k, pos, head_index),
                "cos_strides": rotary_strides(cos, pos, head_index)[:2],
                "sin_strides": rotary_strides(sin, pos, head_index)[:2],
                "q_out_strides": rotary_strides(q_out, pos, head_index),
                "k_out_strides": rotary_strides(k_out, pos, head_index),
                "p0": p0,
                "p1": p1,
                "q_heads": q.shape[head_index],
                "k_heads": k.shape[head_index],
                "head_dim": q.shape[-1],
                "rot_dim": rotary_dim,
                "interleaved": bool(interleaved),
                "transpose": bool(transpose),
                "in_dtype": dtype_name(q.dtype),
                "cs_dtype": dtype_name(cos.dtype),
                "out_dtype": dtype_name(out_dtype),
            },
        )
        return q_out, k_out

    return rotary


def check_gated(gate, up, activation, device_type, *, dout=None, into_inputs=False):
    """Raises naming the first argument that breaks the gated-product contract (with
    ``into_inputs``, the backward's over its inputs); returns (rows, cols, ld_gate, ld_up)."""
    _tensor("gate", gate)
    _tensor("up", up)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {ACTIVATIONS}, got {activation!r}"
        )
    if gate.dim() != 2:
        raise ValueError(f"gate: expected shape (rows, cols), got {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(
            f"up: shape {tuple(up.shape)} differs from gate's {tuple(gate.shape)}"
        )
    _floating("gate", gate, device_type)
    if up.dtype != gate.dtype:
        raise TypeError(f"up: dtype {up.dtype} differs from gate's {gate.dtype}")
    rows, cols = gate.shape
    lds = []
    for name, t in (("gate", gate), ("up", up)):
        _on(name, t, gate, device_type)
        if rows * cols == 0:
            lds.append(cols)
            continue
        if cols > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}: the last dimension must have stride 1")
        ld = t.stride(0) if rows > 1 else cols
        if ld < cols:
            raise ValueError(f"{name}: row stride {ld} is below the row length {cols}")
        lds.append(ld)
    if dout is not None:
        _tensor("dout", dout)
        if dout.shape != gate.shape or dout.dtype != gate.dtype:
            raise ValueError(
                f"dout: expected {gate.dtype} of shape {tuple(gate.shape)}, "
                f"got {dout.dtype} {tuple(dout.shape)}"
            )
        _on("dout", dout, gate, device_type)
        _contiguous("dout", dout)
    if into_inputs:
        _into_inputs(("gate", gate), ("up", up))
    return rows, cols, lds[0], lds[1]


def _into_inputs(*inputs):
    """Raises unless the tensors can take their gradients in place: contiguous, and no two
    of them overlapping in memory."""
    spans = []
    for name, t in inputs:
        if not t.is_contiguous():
            raise ValueError(f"{name}: into_inputs needs a contiguous tensor")
        start = t.data_ptr()
        spans.append((start, start + t.numel() * t.element_size(), name))
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"{second}: into_inputs needs it apart from {first}")


def check_gated_packed(
    dout, gate_up, activation, device_type, *, into_inputs=False, interleaved=False
):
    """Raises naming the first argument that breaks the packed contract (``dout`` None: the
    forward's); returns (rows, cols, ld) with cols half of gate_up's last dimension."""
    _tensor("gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(
            f"gate_up: expected shape (rows, 2 * cols), got {tuple(gate_up.shape)}"
        )
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    if interleaved:
        # the pairs' row: unit stride, row stride >= 2 * cols; dout (rows, cols)
        _, _, ld, _ = check_gated(gate_up, gate_up, activation, device_type)
        if dout is not None:
            half = gate_up[:, :cols]
            check_gated(half, half, activation, device_type, dout=dout)
    else:
        _, _, ld, _ = check_gated(
            gate_up[:, :cols], gate_up[:, cols:], activation, device_type, dout=dout
        )
    if into_inputs:
        _into_inputs(("gate_up", gate_up))
    return rows, cols, ld
