"""The CUDA backend of the decoder-fusion ops: the kernels of ``kernels/rms_norm.cu``,
``rotary.cu`` and ``gated_act.cu`` through cudarc (``_native.cuda_rms_norm_forward`` ...,
runtime/src/cuda/fusions.rs), compiled by NVRTC on first use and cached on disk. Contract
and layouts: ``forward_rewrite._fusions_backend``.

Everything runs on torch's current stream of the tensors' device, every buffer (outputs, and
the RMSNorm backward's float32 partial rows of the weight gradient) is a torch allocation,
and no call synchronises with the host, so the ops can be captured in a CUDA graph.
"""

import torch

from . import _native
from ._cuda import load_nvrtc
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

_poison = False


def set_poison(value: bool) -> None:
    """For checks (gpu/check_fusions.py): fill every output with NaN before the kernels run,
    so an element they leave unwritten shows up."""
    global _poison
    _poison = bool(value)


def _empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    if _poison and t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t


def _empty_like(t, **kwargs):
    out = torch.empty_like(t, **kwargs)
    if _poison:
        out.fill_(float("nan"))
    return out


def _where(t):
    """(device index, torch's current stream on it)."""
    index = (
        t.device.index if t.device.index is not None else torch.cuda.current_device()
    )
    return index, torch.cuda.current_stream(t.device).cuda_stream


def rms_norm_forward(x, weight, eps, offset, cast_before_weight, residual=None):
    rows, hidden = check_rms(x, weight, "cuda", residual=residual)
    y = _empty_like(x, dtype=rms_out_dtype(x.dtype, weight.dtype, cast_before_weight))
    rstd = _empty(rows, dtype=rstd_dtype(x.dtype), device=x.device)
    # x is contiguous (checked), so is its empty_like: the sum's (rows, hidden) layout
    s = _empty_like(x) if residual is not None else None
    add = {}
    if s is not None:
        add = {"residual": residual.data_ptr(), "sum_out": s.data_ptr()}
    load_nvrtc()
    with torch.cuda.device(x.device):
        device, stream = _where(x)
        _native.cuda_rms_norm_forward(
            device=device,
            stream=stream,
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
            **add,
        )
    return (y, rstd) if s is None else (y, rstd, s)


def rms_norm_backward(
    dy, x, weight, rstd, offset, cast_before_weight, weight_grad, dres=None
):
    rows, hidden = check_rms(
        x,
        weight,
        "cuda",
        dy=dy,
        rstd=rstd,
        cast_before_weight=cast_before_weight,
        dres=dres,
    )
    dx = _empty_like(x)
    dw = _empty_like(weight) if weight_grad else None
    load_nvrtc()
    with torch.cuda.device(x.device):
        device, stream = _where(x)
        names = {
            "x_dtype": dtype_name(x.dtype),
            "w_dtype": dtype_name(weight.dtype),
            "y_dtype": dtype_name(dy.dtype),
            # dres's address also picks the kernel (alignment): the same for both calls
            "dres": dres.data_ptr() if dres is not None else 0,
        }
        partial = None
        if weight_grad:
            parts = _native.cuda_rms_norm_backward_parts(
                device=device,
                dy=dy.data_ptr(),
                x=x.data_ptr(),
                weight=weight.data_ptr(),
                dx=dx.data_ptr(),
                rows=rows,
                hidden=hidden,
                **names,
            )
            partial = _empty(
                (max(parts, 1), hidden), dtype=torch.float32, device=x.device
            )
        _native.cuda_rms_norm_backward(
            device=device,
            stream=stream,
            dy=dy.data_ptr(),
            x=x.data_ptr(),
            weight=weight.data_ptr(),
            rstd=rstd.data_ptr(),
            dx=dx.data_ptr(),
            dw=dw.data_ptr() if dw is not None else 0,
            dw_partial=partial.data_ptr() if partial is not None else 0,
            partial_rows=partial.shape[0] if partial is not None else 0,
            rows=rows,
            hidden=hidden,
            offset=float(offset),
            cast_before=bool(cast_before_weight),
            **names,
        )
    return dx, dw


def _gated_rms_call(
    x, gate, weight, eps, cast_before_weight, activation, gate_first, groups, y, rstd
):
    """The arguments both directions of ``cuda_gated_rms_norm`` share."""
    rows, hidden = x.shape
    device, stream = _where(x)
    return {
        "device": device,
        "stream": stream,
        "x": x.data_ptr(),
        "gate": gate.data_ptr(),
        "weight": weight.data_ptr(),
        "y": y.data_ptr(),
        "rstd": rstd.data_ptr(),
        "rows": rows,
        "hidden": hidden,
        "x_dtype": dtype_name(x.dtype),
        "w_dtype": dtype_name(weight.dtype),
        "eps": float(eps),
        "cast_before": bool(cast_before_weight),
        "activation": activation,
        "gate_first": bool(gate_first),
        "groups": groups,
    }


def rms_scale_first_forward(x, eps):
    rows, hidden = check_rms_scale_first(x, "cuda")
    y = _empty_like(x)
    rstd = _empty(rows, dtype=rstd_dtype(x.dtype), device=x.device)
    load_nvrtc()
    with torch.cuda.device(x.device):
        device, stream = _where(x)
        _native.cuda_rms_scale_first(
            device=device,
            stream=stream,
            x=x.data_ptr(),
            out=y.data_ptr(),
            rstd=rstd.data_ptr(),
            rows=rows,
            hidden=hidden,
            dtype=dtype_name(x.dtype),
            eps=float(eps),
        )
    return y, rstd


def rms_scale_first_backward(dy, x, rstd):
    rows, hidden = check_rms_scale_first(x, "cuda", dy=dy, rstd=rstd)
    dx = _empty_like(x)
    if rows == 0:
        return dx  # dy's address may be 0, which would pick the forward
    load_nvrtc()
    with torch.cuda.device(x.device):
        device, stream = _where(x)
        _native.cuda_rms_scale_first(
            device=device,
            stream=stream,
            x=x.data_ptr(),
            out=dx.data_ptr(),
            rstd=rstd.data_ptr(),
            rows=rows,
            hidden=hidden,
            dtype=dtype_name(x.dtype),
            dy=dy.data_ptr(),
        )
    return dx


def gated_rms_norm_forward(
    x, gate, weight, eps, cast_before_weight, activation, gate_first, groups
):
    rows, _ = check_gated_rms(x, gate, weight, activation, "cuda", groups=groups)
    y = _empty_like(x)
    rstd = _empty(rows, dtype=torch.float32, device=x.device)
    load_nvrtc()
    with torch.cuda.device(x.device):
        _native.cuda_gated_rms_norm(
            **_gated_rms_call(
                x,
                gate,
                weight,
                eps,
                cast_before_weight,
                activation,
                gate_first,
                groups,
                y,
                rstd,
            )
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
        x, gate, weight, activation, "cuda", groups=groups, dy=dy, rstd=rstd
    )
    dx = _empty_like(x)
    dgate = _empty_like(x)
    dw = _empty_like(weight) if weight_grad else None
    load_nvrtc()
    with torch.cuda.device(x.device):
        args = _gated_rms_call(
            x,
            gate,
            weight,
            0.0,
            cast_before_weight,
            activation,
            gate_first,
            groups,
            dx,
            rstd,
        )
        args.update(dy=dy.data_ptr(), dgate=dgate.data_ptr())
        if weight_grad:
            parts = _native.cuda_gated_rms_norm_backward_parts(
                device=args["device"],
                x=x.data_ptr(),
                gate=gate.data_ptr(),
                weight=weight.data_ptr(),
                dy=dy.data_ptr(),
                dx=dx.data_ptr(),
                dgate=dgate.data_ptr(),
                rows=rows,
                hidden=hidden,
                x_dtype=args["x_dtype"],
                w_dtype=args["w_dtype"],
                gate_first=bool(gate_first),
                groups=groups,
            )
            # A partial row spans the whole weight (every group of a row of x).
            partial = _empty(
                (max(parts, 1), groups * hidden), dtype=torch.float32, device=x.device
            )
            args.update(
                dw=dw.data_ptr(),
                dw_partial=partial.data_ptr(),
                partial_rows=partial.shape[0],
            )
        _native.cuda_gated_rms_norm(**args)
    return dx, dgate, dw


def _launch_rotary(q, args):
    load_nvrtc()
    with torch.cuda.device(q.device):
        device, stream = _where(q)
        _native.cuda_rotary(device=device, stream=stream, **args)


rotary = make_rotary("cuda", _empty_like, _launch_rotary)


def _gated(gate, up, fn, dout, into_inputs=False):
    rows, cols, ld_gate, ld_up = check_gated(
        gate, up, fn.activation, "cuda", dout=dout, into_inputs=into_inputs
    )
    if into_inputs:
        # backward over its inputs: each thread reads its entries of gate and up, then
        # writes their gradients there (gated_act.cu)
        out, dup = gate, up
    else:
        out = _empty((rows, cols), dtype=gate.dtype, device=gate.device)
        dup = (
            _empty((rows, cols), dtype=gate.dtype, device=gate.device)
            if dout is not None
            else None
        )
    load_nvrtc()
    with torch.cuda.device(gate.device):
        device, stream = _where(gate)
        _native.cuda_gated_act(
            device=device,
            stream=stream,
            gate=gate.data_ptr(),
            up=up.data_ptr(),
            dout=dout.data_ptr() if dout is not None else 0,
            out=out.data_ptr(),
            dup=dup.data_ptr() if dup is not None else 0,
            rows=rows,
            cols=cols,
            ld_gate=ld_gate,
            ld_up=ld_up,
            dtype=dtype_name(gate.dtype),
            backward=dout is not None,
            **fn.native(),
        )
    return out, dup


def gated_act(gate, up, fn):
    return _gated(gate, up, fn, None)[0]


def gated_act_backward(dout, gate, up, fn, into_inputs=False):
    return _gated(gate, up, fn, dout, into_inputs)


def _gated_packed(gate_up, fn, dout, into_inputs, interleaved):
    """The packed forward (``dout`` None) or backward on gate_up's halves or pairs (up
    beside each gate: not passed); the gradient in gate_up's layout."""
    rows, cols, ld = check_gated_packed(
        dout,
        gate_up,
        fn.activation,
        "cuda",
        into_inputs=into_inputs,
        interleaved=interleaved,
    )
    backward = dout is not None
    if into_inputs:
        out = gate_up
    else:
        shape = (rows, 2 * cols) if backward else (rows, cols)
        out = _empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    half = 0 if interleaved else cols * gate_up.element_size()
    load_nvrtc()
    with torch.cuda.device(gate_up.device):
        device, stream = _where(gate_up)
        _native.cuda_gated_act(
            device=device,
            stream=stream,
            gate=gate_up.data_ptr(),
            up=0 if interleaved else gate_up.data_ptr() + half,
            dout=dout.data_ptr() if backward else 0,
            out=out.data_ptr(),
            dup=out.data_ptr() + half if backward and not interleaved else 0,
            rows=rows,
            cols=cols,
            ld_gate=ld,
            ld_up=ld,
            dtype=dtype_name(gate_up.dtype),
            backward=backward,
            ld_grad=2 * cols if backward else None,
            interleaved=interleaved,
            **fn.native(),
        )
    return out


def gated_act_packed(gate_up, fn, interleaved=False):
    return _gated_packed(gate_up, fn, None, False, interleaved)


def gated_act_backward_packed(dout, gate_up, fn, into_inputs=False, interleaved=False):
    return _gated_packed(gate_up, fn, dout, into_inputs, interleaved)
