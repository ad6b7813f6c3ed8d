"""The backend contract (ARCHITECTURE.md, contract 4) and the checks every backend runs.

A backend is a module with one function::

    fused_ce(hidden, weight, bias, targets, *, ignore_index, label_smoothing, scale,
             softcap, grad_scale, compute_grads, chunk_budget_bytes)
        -> (row_loss, dh, dw, db)

``forward_rewrite._cpu`` (Rust, on the CPU) and ``forward_rewrite._cuda`` (Rust through
cudarc) implement it; ``forward_rewrite.ops`` picks one by the tensors' device. A backend
calls :func:`check_args` first, so a wrong call is a Python error naming the argument
before any pointer reaches native code.
"""

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_args(
    hidden,
    weight,
    bias,
    targets,
    grad_scale,
    compute_grads,
    device_type,
    *,
    row_strided_hidden=False,
):
    """Raises TypeError/ValueError naming the first argument that breaks the contract.
    With ``row_strided_hidden`` (CUDA), ``hidden`` may have padded rows: a row stride of H
    or more, unit stride along H."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a tensor or None, got {type(bias).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected shape (N, H), got {tuple(hidden.shape)}")
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight: expected shape (V, {h}), got {tuple(weight.shape)}")
    v = weight.shape[0]
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"hidden: dtype {hidden.dtype} is not float32, bfloat16 or float16"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}"
        )
    if bias is not None:
        if bias.shape != (v,):
            raise ValueError(f"bias: expected shape ({v},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"bias: dtype {bias.dtype} differs from hidden's {hidden.dtype}"
            )
    if targets.shape != (n,) or targets.dtype != torch.int64:
        raise ValueError(
            f"targets: expected int64 of shape ({n},), got {targets.dtype} {tuple(targets.shape)}"
        )
    named = [("hidden", hidden), ("weight", weight), ("targets", targets)]
    if bias is not None:
        named.append(("bias", bias))
    if compute_grads:
        if not isinstance(grad_scale, torch.Tensor):
            raise TypeError(
                "grad_scale: expected a float32 tensor when compute_grads is set"
            )
        if grad_scale.dtype != torch.float32 or grad_scale.shape not in ((1,), (n,)):
            raise ValueError(
                f"grad_scale: expected float32 of shape (1,) or ({n},), "
                f"got {grad_scale.dtype} {tuple(grad_scale.shape)}"
            )
        named.append(("grad_scale", grad_scale))
    for name, t in named:
        if t.device.type != device_type:
            raise ValueError(f"{name}: on {t.device}, expected a {device_type} tensor")
        if t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device}, hidden is on {hidden.device}")
    if row_strided_hidden:
        if n > 0 and h > 0 and (hidden.stride(1) != 1 or hidden.stride(0) < h):
            raise ValueError(
                f"hidden: strides {hidden.stride()} are not row-major; "
                "call .contiguous() first"
            )
        named = named[1:]
    for name, t in named:
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    return n, h, v
