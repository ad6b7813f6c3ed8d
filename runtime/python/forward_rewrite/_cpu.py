"""The CPU backend: the Rust implementation in ``_native.cpu_fused_ce`` (runtime/src/cpu/).

Same function as every backend (see ``_backend``); outputs are allocated here with torch,
so torch's allocator sees them; the Rust side allocates only its chunk scratch.
"""

import torch

from . import _native
from ._backend import check_args


def fused_ce(
    hidden,
    weight,
    bias,
    targets,
    *,
    ignore_index,
    label_smoothing,
    scale,
    softcap,
    grad_scale,
    compute_grads,
    chunk_budget_bytes,
    weight_grad=True,
):
    """Per-row loss and (with ``compute_grads``) the gradients of
    ``sum_i grad_scale_i * row_loss_i``; see ARCHITECTURE.md, contract 4. Without
    ``weight_grad`` dW is neither computed nor allocated (None)."""
    n, h, v = check_args(
        hidden, weight, bias, targets, grad_scale, compute_grads, "cpu"
    )
    row_loss = torch.empty(n, dtype=torch.float32)
    dh = dw = db = None
    if compute_grads:
        dh = torch.empty_like(hidden)
        dw = torch.empty_like(weight) if weight_grad else None
        db = torch.empty_like(bias) if bias is not None else None
    _native.cpu_fused_ce(
        hidden=hidden.data_ptr(),
        weight=weight.data_ptr(),
        bias=bias.data_ptr() if bias is not None else None,
        targets=targets.data_ptr(),
        n=n,
        h=h,
        v=v,
        dtype=str(hidden.dtype).removeprefix("torch."),
        ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing),
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
        row_loss=row_loss.data_ptr(),
        grad_scale=grad_scale.data_ptr() if compute_grads else None,
        grad_scale_len=grad_scale.numel() if compute_grads else 0,
        dh=dh.data_ptr() if compute_grads else None,
        dw=dw.data_ptr() if dw is not None else None,
        db=db.data_ptr() if db is not None else None,
        chunk_budget_bytes=int(chunk_budget_bytes),
    )
    return row_loss, dh, dw, db
