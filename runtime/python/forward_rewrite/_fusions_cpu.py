"""The CPU backend of the decoder-fusion ops: the Rust twins of the CUDA kernels
(``_native.cpu_rms_norm_forward`` ..., runtime/src/cpu/fusions/). Contract and layouts:
``forward_rewrite._fusions_backend``. Outputs are allocated here with torch."""

import torch

from . import _native
from ._fusions_backend import (
    check_gated,
    check_gated_packed,
    check_gated_rms,
    check_rms,
    check_rms_scale_first,
    dtype_name,
    make_rotary,
    rms_out_dtype,
    rstd_dtype,
)


def rms_norm_forward(x, weight, eps, offset, cast_before_weight, residual=None):
    rows, hidden = check_rms(x, weight, "cpu", residual=residual)
    y = torch.empty_like(
        x, dtype=rms_out_dtype(x.dtype, weight.dtype, cast_before_weight)
    )
    rstd = torch.empty(rows, dtype=rstd_dtype(x.dtype))
    s = torch.empty_like(x) if residual is not None else None
    _native.cpu_rms_norm_forward(
        x=x.data_ptr(),
        weight=weight.data_ptr(),
        y=y.data_ptr(),
        rstd=rstd.data_ptr(),
        rows=rows,
        hidden=hidden,
        x_dtype=dtype_name(x.dtype),
        w_dtype=dtype_name(weight.dtype),
        y_dtype=dtype_name(y.dtype),
        eps=float(eps),
        offset=float(offset),
        cast_before=bool(cast_before_weight),
        residual=residual.data_ptr() if s is not None else None,
        sum_out=s.data_ptr() if s is not None else None,
    )
    return (y, rstd) if s is None else (y, rstd, s)


def rms_norm_backward(
    dy, x, weight, rstd, offset, cast_before_weight, weight_grad, dres=None
):
    rows, hidden = check_rms(
        x,
        weight,
        "cpu",
        dy=dy,
        rstd=rstd,
        cast_before_weight=cast_before_weight,
        dres=dres,
    )
    dx = torch.empty_like(x)
    dw = torch.empty_like(weight) if weight_grad else None
    _native.cpu_rms_norm_backward(
        dy=dy.data_ptr(),
        x=x.data_ptr(),
        weight=weight.data_ptr(),
        rstd=rstd.data_ptr(),
        dx=dx.data_ptr(),
        dw=dw.data_ptr() if dw is not None else None,
        rows=rows,
        hidden=hidden,
        x_dtype=dtype_name(x.dtype),
        w_dtype=dtype_name(weight.dtype),
        y_dtype=dtype_name(dy.dtype),
        offset=float(offset),
        cast_before=bool(cast_before_weight),
        dres=dres.data_ptr() if dres is not None else None,
    )
    return dx, dw


def rms_scale_first_forward(x, eps):
    rows, hidden = check_rms_scale_first(x, "cpu")
    y = torch.empty_like(x)
    rstd = torch.empty(rows, dtype=rstd_dtype(x.dtype))
    _native.cpu_rms_scale_first_forward(
        x=x.data_ptr(),
        y=y.data_ptr(),
        rstd=rstd.data_ptr(),
        rows=rows,
        hidden=hidden,
        x_dtype=dtype_name(x.dtype),
        eps=float(eps),
    )
    return y, rstd


def rms_scale_first_backward(dy, x, rstd):
    rows, hidden = check_rms_scale_first(x, "cpu", dy=dy, rstd=rstd)
    dx = torch.empty_like(x)
    _native.cpu_rms_scale_first_backward(
        dy=dy.data_ptr(),
        x=x.data_ptr(),
        rstd=rstd.data_ptr(),
        dx=dx.data_ptr(),
        rows=rows,
        hidden=hidden,
        x_dtype=dtype_name(x.dtype),
    )
    return dx


def gated_rms_norm_forward(
    x, gate, weight, eps, cast_before_weight, activation, gate_first, groups
):
    rows, hidden = check_gated_rms(x, gate, weight, activation, "cpu", groups=groups)
    # The gated forms end in ``.to(input_dtype)``: y is of x's dtype whatever the weight's.
    y = torch.empty_like(x)
    rstd = torch.empty(rows, dtype=rstd_dtype(x.dtype))
    _native.cpu_gated_rms_norm_forward(
        x=x.data_ptr(),
        gate=gate.data_ptr(),
        weight=weight.data_ptr(),
        y=y.data_ptr(),
        rstd=rstd.data_ptr(),
        rows=rows,
        hidden=hidden,
        x_dtype=dtype_name(x.dtype),
        w_dtype=dtype_name(weight.dtype),
        eps=float(eps),
        cast_before=bool(cast_before_weight),
        activation=activation,
        gate_first=bool(gate_first),
        groups=groups,
    )
    return y, rstd


def gated_rms_norm_backward(
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
    rows, hidden = check_gated_rms(
        x, gate, weight, activation, "cpu", groups=groups, dy=dy, rstd=rstd
    )
    dx = torch.empty_like(x)
    dgate = torch.empty_like(x)
    dw = torch.empty_like(weight) if weight_grad else None
    _native.cpu_gated_rms_norm_backward(
        dy=dy.data_ptr(),
        x=x.data_ptr(),
        gate=gate.data_ptr(),
        weight=weight.data_ptr(),
        rstd=rstd.data_ptr(),
        dx=dx.data_ptr(),
        dgate=dgate.data_ptr(),
        dw=dw.data_ptr() if dw is not None else None,
        rows=rows,
        hidden=hidden,
        x_dtype=dtype_name(x.dtype),
        w_dtype=dtype_name(weight.dtype),
        cast_before=bool(cast_before_weight),
        activation=activation,
        gate_first=bool(gate_first),
        groups=groups,
    )
    return dx, dgate, dw


rotary = make_rotary(
    "cpu", torch.empty_like, lambda q, args: _native.cpu_rotary(**args)
)


def gated_act(gate, up, fn):
    rows, cols, ld_gate, ld_up = check_gated(gate, up, fn.activation, "cpu")
    out = torch.empty((rows, cols), dtype=gate.dtype)
    _native.cpu_gated_act(
        gate=gate.data_ptr(),
        up=up.data_ptr(),
        out=out.data_ptr(),
        rows=rows,
        cols=cols,
        ld_gate=ld_gate,
        ld_up=ld_up,
        dtype=dtype_name(gate.dtype),
        **fn.native(),
    )
    return out


def gated_act_backward(dout, gate, up, fn, into_inputs=False):
    rows, cols, ld_gate, ld_up = check_gated(
        gate, up, fn.activation, "cpu", dout=dout, into_inputs=into_inputs
    )
    dgate = torch.empty((rows, cols), dtype=gate.dtype)
    dup = torch.empty((rows, cols), dtype=gate.dtype)
    _native.cpu_gated_act_backward(
        dout=dout.data_ptr(),
        gate=gate.data_ptr(),
        up=up.data_ptr(),
        dgate=dgate.data_ptr(),
        dup=dup.data_ptr(),
        rows=rows,
        cols=cols,
        ld_gate=ld_gate,
        ld_up=ld_up,
        dtype=dtype_name(gate.dtype),
        **fn.native(),
    )
    if into_inputs:
        # Rust's slices may not alias, so the CPU twin writes apart and copies: the same
        # numbers and the same contract (host memory is not what this saves on the GPU).
        return gate.copy_(dgate), up.copy_(dup)
    return dgate, dup


def _packed_operands(gate_up, cols, interleaved):
    """The addresses of gate and up in gate_up: its two halves, or (interleaved) its
    pairs, whose up the native code reads beside each gate."""
    base = gate_up.data_ptr()
    return base, base if interleaved else base + cols * gate_up.element_size()


def gated_act_packed(gate_up, fn, interleaved=False):
    rows, cols, ld = check_gated_packed(
        None, gate_up, fn.activation, "cpu", interleaved=interleaved
    )
    gate, up = _packed_operands(gate_up, cols, interleaved)
    out = torch.empty((rows, cols), dtype=gate_up.dtype)
    _native.cpu_gated_act(
        gate=gate,
        up=up,
        out=out.data_ptr(),
        rows=rows,
        cols=cols,
        ld_gate=ld,
        ld_up=ld,
        dtype=dtype_name(gate_up.dtype),
        interleaved=interleaved,
        **fn.native(),
    )
    return out


def gated_act_backward_packed(dout, gate_up, fn, into_inputs=False, interleaved=False):
    rows, cols, ld = check_gated_packed(
        dout,
        gate_up,
        fn.activation,
        "cpu",
        into_inputs=into_inputs,
        interleaved=interleaved,
    )
    gate, up = _packed_operands(gate_up, cols, interleaved)
    dgate_up = torch.empty((rows, 2 * cols), dtype=gate_up.dtype)
    _native.cpu_gated_act_backward(
        dout=dout.data_ptr(),
        gate=gate,
        up=up,
        dgate=dgate_up.data_ptr(),
        dup=None,
        rows=rows,
        cols=cols,
        ld_gate=ld,
        ld_up=ld,
        dtype=dtype_name(gate_up.dtype),
        packed=True,
        interleaved=interleaved,
        **fn.native(),
    )
    return gate_up.copy_(dgate_up) if into_inputs else dgate_up
