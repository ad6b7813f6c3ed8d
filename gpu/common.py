"""Shared by the GPU scripts: the float64 reference, the stock path, error measures, and a
small autograd wrapper around the CUDA backend (the real op is forward_rewrite.ops).

Run on the GPU machine only; `import torch` comes first so that cudarc finds torch's CUDA
libraries (gpu/README.md).
"""

import torch  # noqa: I001  (first: cudarc loads the CUDA libraries torch brought in)

import torch.nn.functional as F

from forward_rewrite import _cuda


def rel(a, b):
    """||a - b|| / ||b|| in float64 (inf when a has a NaN)."""
    a = a.double()
    b = b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def transform(z, scale, softcap):
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def reference(
    h, w, b, t, *, ignore_index, smoothing, scale, softcap, grad_scale, chunk=2048
):
    """row loss and gradients in float64, chunked over rows (V x H float64 for dW)."""
    h64, w64 = h.double(), w.double()
    b64 = b.double() if b is not None else None
    n, v = h.shape[0], w.shape[0]
    loss = torch.zeros(n, dtype=torch.float64, device=h.device)
    dh = torch.zeros_like(h64)
    dw = torch.zeros_like(w64)
    db = torch.zeros(v, dtype=torch.float64, device=h.device) if b is not None else None
    gs = grad_scale.double() if grad_scale is not None else None
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        raw = h64[r0:r1] @ w64.T
        if b64 is not None:
            raw = raw + b64
        raw.requires_grad_(True)
        z = transform(raw, scale, softcap)
        tt = t[r0:r1]
        rl = F.cross_entropy(
            z,
            tt,
            ignore_index=ignore_index,
            reduction="none",
            label_smoothing=smoothing,
        )
        loss[r0:r1] = rl.detach()
        if gs is None:
            continue
        g = gs if gs.numel() == 1 else gs[r0:r1]
        (d,) = torch.autograd.grad((rl * g).sum(), raw)
        dh[r0:r1] = d @ w64
        dw += d.T @ h64[r0:r1]
        if db is not None:
            db += d.sum(0)
    return loss, dh, dw, db


def stock(h, w, b, t, *, ignore_index, smoothing, scale, softcap, grad_scale):
    """transformers' path: logits in the model dtype (head, then the model's transforms in
    its dtype), `.float()`, cross-entropy; gradients by autograd."""
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True) if b is not None else None
    logits = F.linear(h, w, b)
    logits = transform(logits, scale, softcap)
    rl = F.cross_entropy(
        logits.float(),
        t,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=smoothing,
    )
    if grad_scale is None:
        return rl.detach(), None, None, None
    (rl * grad_scale).sum().backward()
    return rl.detach(), h.grad, w.grad, b.grad if b is not None else None


class FusedLinearCE(torch.autograd.Function):
    """mean cross-entropy over non-ignored rows through the CUDA backend; gradients are
    computed in the forward (grad_scale = 1 / count, on the device: no host sync for it)."""

    @staticmethod
    def forward(ctx, h, w, t, ignore_index, budget, tuning):
        count = (t != ignore_index).sum().clamp_min(1).float()
        gs = (1.0 / count).reshape(1)
        row_loss, dh, dw, _ = _cuda.fused_ce_tuned(
            h,
            w,
            None,
            t,
            ignore_index=ignore_index,
            label_smoothing=0.0,
            scale=1.0,
            softcap=None,
            grad_scale=gs,
            compute_grads=True,
            chunk_budget_bytes=budget,
            tuning=tuning,
        )
        ctx.save_for_backward(dh, dw)
        return row_loss.sum() / count

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        # Like Liger: skip the scaling pass over dW when the incoming gradient is 1 (a sync,
        # after the forward has been enqueued).
        if not torch.equal(grad, torch.ones_like(grad)):
            dh, dw = dh * grad, dw * grad
        return dh, dw, None, None, None, None


def ours(h, w, t, *, ignore_index=-100, budget=1 << 30, tuning=None):
    return FusedLinearCE.apply(h, w, t, ignore_index, budget, tuning)
