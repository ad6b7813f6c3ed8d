"""The fused AttnRes mix as a torch custom op (``forward_rewrite::attnres_mix``).

``out = scale * sum_i softmax_i(u . RMSNorm(v_i)) v_i`` per token over ``n`` sources
(``u = query * key_norm``), forward and backward in one pass over the sources each: the
Rust CPU twin (``runtime/src/cpu/fusions/attnres_mix.rs``) on CPU, the NVRTC kernel
(``kernels/attnres_mix.cu`` through ``runtime/src/cuda/attnres.rs``) on CUDA when the build has
it. ``usable`` says when ``attnres._mix`` may call it; otherwise the torch reference runs.
Autograd: the gradient reaches every source and ``u`` (and through ``u`` the query and the
key norm, in torch). The fake kernel makes it traceable by ``torch.compile``.
"""

from __future__ import annotations

import functools

import torch

from . import _native

_DTYPES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}

#: Set to False to force the torch reference everywhere (tests, debugging).
ENABLED = True
#: Blocks of the CUDA backward (each writes one float32 partial row of ``du``).
CUDA_PARTS = 1024


def _cuda_args(device):
    return {
        "device": device.index
        if device.index is not None
        else torch.cuda.current_device(),
        "stream": torch.cuda.current_stream(device).cuda_stream,
    }


def _has(name: str) -> bool:
    return hasattr(_native, name)


def usable(sources, query, like) -> bool:
    """Whether the fused op can compute this mix: all sources of one supported dtype on the
    query's device, laid out as (..., hidden), and a backend for that device."""
    if not ENABLED or not sources:
        return False
    first = sources[0]
    dev = query.device
    if first.dtype not in _DTYPES or like.dtype != first.dtype:
        return False
    for s in sources:
        if s.dtype != first.dtype or s.device != dev or s.shape != first.shape:
            return False
    if first.shape[-1] != query.shape[-1]:
        return False
    if dev.type == "cpu":
        return _has("cpu_attnres_mix_forward")
    if dev.type == "cuda":
        return _has("cuda_attnres_mix_forward") and first.dtype != torch.float64
    return False


def _u_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(t):
    return t.contiguous().view(-1, t.shape[-1])


def _launch_forward(sources, u, eps, scale):
    first = sources[0]
    hidden = first.shape[-1]
    tokens = first.numel() // hidden if hidden else 0
    flat = [_flat(s) for s in sources]
    out = torch.empty_like(flat[0])
    if first.device.type == "cpu":
        fn = _native.cpu_attnres_mix_forward
    else:
        fn = functools.partial(
            _native.cuda_attnres_mix_forward, **_cuda_args(first.device)
        )
    fn(
        sources=[s.data_ptr() for s in flat],
        u=u.data_ptr(),
        out=out.data_ptr(),
        tokens=tokens,
        hidden=hidden,
        dtype=_DTYPES[first.dtype],
        eps=float(eps),
        scale=float(scale),
    )
    return out.view(first.shape)


@torch.library.custom_op("forward_rewrite::attnres_mix", mutates_args=())
def _mix_op(
    sources: list[torch.Tensor], u: torch.Tensor, eps: float, scale: float
) -> torch.Tensor:
    return _launch_forward(sources, u.contiguous(), eps, scale)


@_mix_op.register_fake
def _(sources, u, eps, scale):
    return torch.empty_like(sources[0], memory_format=torch.contiguous_format)


@torch.library.custom_op("forward_rewrite::attnres_mix_backward", mutates_args=())
def _mix_backward_op(
    sources: list[torch.Tensor],
    u: torch.Tensor,
    grad: torch.Tensor,
    eps: float,
    scale: float,
) -> list[torch.Tensor]:
    first = sources[0]
    hidden = first.shape[-1]
    tokens = first.numel() // hidden if hidden else 0
    flat = [_flat(s) for s in sources]
    g = _flat(grad.to(first.dtype))
    dsources = [torch.empty_like(f) for f in flat]
    u = u.contiguous()
    common = {
        "sources": [s.data_ptr() for s in flat],
        "u": u.data_ptr(),
        "grad": g.data_ptr(),
        "dsources": [d.data_ptr() for d in dsources],
        "tokens": tokens,
        "hidden": hidden,
        "dtype": _DTYPES[first.dtype],
        "eps": float(eps),
        "scale": float(scale),
    }
    if first.device.type == "cpu":
        du = torch.empty(hidden, dtype=u.dtype, device=u.device)
        _native.cpu_attnres_mix_backward(du=du.data_ptr(), **common)
    else:
        parts = max(1, min(tokens, CUDA_PARTS))
        partial = torch.empty(parts, hidden, dtype=torch.float32, device=u.device)
        _native.cuda_attnres_mix_backward(
            du_partial=partial.data_ptr(),
            parts=parts,
            **_cuda_args(first.device),
            **common,
        )
        du = partial.sum(0)
    return [*(d.view(first.shape) for d in dsources), du]


@_mix_backward_op.register_fake
def _(sources, u, grad, eps, scale):
    return [
        *(torch.empty_like(s, memory_format=torch.contiguous_format) for s in sources),
        torch.empty_like(u),
    ]


def _setup(ctx, inputs, output):
    sources, u, eps, scale = inputs
    ctx.save_for_backward(u, *sources)
    ctx.eps = eps
    ctx.scale = scale


def _backward(ctx, grad):
    u, *sources = ctx.saved_tensors
    grads = _mix_backward_op(sources, u, grad.contiguous(), ctx.eps, ctx.scale)
    return list(grads[:-1]), grads[-1], None, None


_mix_op.register_autograd(_backward, setup_context=_setup)


def mix(sources, query, key_norm, *, eps: float, scale: float, out_dtype):
    """The fused mix of ``attnres._mix``: ``u`` is formed in torch (so the query and the key
    norm get their gradients by autograd), the rest in the op."""
    dtype = sources[0].dtype
    u = query.to(_u_dtype(dtype)) * key_norm.to(_u_dtype(dtype))
    out = _mix_op(list(sources), u, float(eps), float(scale))
    return out.to(out_dtype)
