"""Shared helpers of the fused-op tests: random problems, the stock computation
(transformers' own ``ForCausalLMLoss`` on ``head(hidden)``), a float64 reference of the
transformed logits, and the error measure the tests and ``bench/cpu_accuracy.py`` report."""

import forward_rewrite
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss


def problem(
    batch, seq, hidden, vocab, *, dtype=torch.float32, bias=False, ignored=0.25, seed=0
):
    """hidden_states (batch, seq, hidden), a head, labels with some ``-100``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) / hidden**0.5)
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g) * 0.5)
    head = head.to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignored] = -100
    return h, head, labels


def grads_of(loss_fn, h, head):
    """The loss and the gradients of (hidden, weight, bias) of ``loss_fn(h, head)``."""
    h = h.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = loss_fn(h, head)
    loss.backward()
    grads = [h.grad, head.weight.grad] + (
        [head.bias.grad] if head.bias is not None else []
    )
    return loss.detach(), [g.detach().clone() if g is not None else None for g in grads]


def stock(h, head, labels, **kw):
    """transformers' path: logits = head(hidden), then ForCausalLMLoss."""
    return grads_of(
        lambda x, m: ForCausalLMLoss(m(x), labels, m.out_features, **kw), h, head
    )


def fused(h, head, labels, **kw):
    return grads_of(
        lambda x, m: forward_rewrite.fused_lm_head_loss(
            x, m, labels, vocab_size=m.out_features, **kw
        ),
        h,
        head,
    )


def reference_loss(
    x,
    m,
    labels,
    *,
    ignore_index=-100,
    shift_labels=None,
    num_items_in_batch=None,
    label_smoothing=0.0,
    logit_softcapping=None,
    logit_scale_multiply=None,
    logit_scale_divide=None,
    reduction="mean",
):
    """The op's definition, computed in float64 on the full logits (for autograd)."""
    w = m.weight.double()
    b = m.bias.double() if m.bias is not None else None
    z = F.linear(x.double(), w, b)
    if logit_scale_multiply is not None:
        z = z * logit_scale_multiply
    if logit_scale_divide is not None:
        z = z / logit_scale_divide
    if logit_softcapping is not None:
        z = torch.tanh(z / logit_softcapping) * logit_softcapping
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    z = z.reshape(-1, m.out_features)
    t = shift_labels.reshape(-1)
    kw = {"ignore_index": ignore_index, "label_smoothing": label_smoothing}
    if reduction == "mean" and num_items_in_batch is not None:
        return F.cross_entropy(z, t, reduction="sum", **kw) / float(num_items_in_batch)
    return F.cross_entropy(z, t, reduction=reduction, **kw)


def reference(h, head, labels, **kw):
    """Loss and gradients in float64 (head copied to float64, so its inputs are exact)."""
    head64 = torch.nn.Linear(
        head.in_features, head.out_features, bias=head.bias is not None
    )
    head64 = head64.double()
    with torch.no_grad():
        head64.weight.copy_(head.weight.double())
        if head.bias is not None:
            head64.bias.copy_(head.bias.double())
    return grads_of(lambda x, m: reference_loss(x, m, labels, **kw), h.double(), head64)


def rel_err(got, want):
    """max |got - want| / max |want| (normwise; 0/0 counts as 0)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def errors(a, b):
    """[loss error, gradient errors...] of result a against result b."""
    (la, ga), (lb, gb) = a, b
    return [rel_err(la, lb)] + [rel_err(x, y) for x, y in zip(ga, gb)]
