"""``fused_lm_head_loss``: the lm_head projection and transformers' causal-LM loss in one
op that never materialises the tokens x vocabulary logits (ARCHITECTURE.md, contract 4).

Semantics are those of ``transformers.loss.loss_utils.ForCausalLMLoss`` followed by
``fixed_cross_entropy`` on ``head(hidden_states)``, with the logit transforms the patched
forwards lower into keywords, plus ``label_smoothing`` and ``reduction`` as in
``F.cross_entropy``. One deliberate difference: when every label is ignored, the mean
reduction gives a loss of 0 and zero gradients (stock divides 0 by 0 and gives NaN).

Two ``torch.library`` custom ops carry the work, so ``torch.compile`` treats each as one
opaque node (no graph break): ``forward_rewrite::fused_lm_head_loss`` (loss, and for the
mean and sum reductions the gradients too, computed while the logits are hot) and
``forward_rewrite::fused_lm_head_loss_backward`` (gradients recomputed with the real
``grad_output``: for ``reduction="none"``, whose gradient is per row, and for float16, where
a GradScaler's scale must reach the gradient before it is rounded to float16).
"""

import math
import numbers
import os

import torch
from torch import Tensor, nn

from . import _stats, engines
from ._backend import SUPPORTED_DTYPES

__all__ = ["chunk_budget_bytes", "fused_lm_head_loss", "set_chunk_budget_bytes"]

_REDUCTIONS = ("mean", "sum", "none")
#: Per device type. CUDA wants more: its chunks re-read the head's weight once each, so at
#: 128k-256k vocabularies about 1 GiB is needed to stay near the GEMM floor (BENCHMARKS.md).
_DEFAULT_CHUNK_BUDGET_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}


def _budget_from_env():
    raw = os.environ.get("FORWARD_REWRITE_CHUNK_BUDGET_BYTES")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"FORWARD_REWRITE_CHUNK_BUDGET_BYTES: expected a positive integer, got {raw!r}"
        ) from None
    if value <= 0:
        raise ValueError(
            f"FORWARD_REWRITE_CHUNK_BUDGET_BYTES: must be positive, got {value}"
        )
    return value


# Read once (a module global, so torch.compile sees a constant it can guard on); None
# means the per-device default.
_chunk_budget_bytes = _budget_from_env()


def chunk_budget_bytes(device_type: str = "cpu") -> int:
    """Scratch memory a backend may use per call, beyond its inputs and outputs: what
    ``set_chunk_budget_bytes`` or ``FORWARD_REWRITE_CHUNK_BUDGET_BYTES`` set, else 256 MiB
    on the CPU and 1 GiB on CUDA."""
    if _chunk_budget_bytes is not None:
        return _chunk_budget_bytes
    return _DEFAULT_CHUNK_BUDGET_BYTES.get(
        device_type, _DEFAULT_CHUNK_BUDGET_BYTES["cpu"]
    )


def set_chunk_budget_bytes(value: int | None) -> None:
    """Sets the scratch budget for every device; None restores the per-device defaults."""
    global _chunk_budget_bytes
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value <= 0
    ):
        raise ValueError(f"chunk_budget_bytes: expected a positive int, got {value!r}")
    _chunk_budget_bytes = value


def _backend(device: torch.device):
    if device.type == "cpu":
        from . import _cpu

        return _cpu.fused_ce
    if device.type == "cuda":
        try:
            from . import _cuda
        except ImportError as e:
            raise RuntimeError(
                "forward_rewrite: the CUDA backend (forward_rewrite._cuda) is not available "
                f"in this build ({e}); move the tensors to the CPU or use the stock loss"
            ) from e
        return _cuda.fused_ce
    raise ValueError(f"hidden_states: device {device} is not supported (cpu or cuda)")


def _reduce(row_loss: Tensor, denominator: Tensor | None, reduction: str) -> Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total / denominator if reduction == "mean" else total


def _grad_scale(
    grad_output: Tensor, denominator: Tensor | None, reduction: str
) -> Tensor:
    """d(objective)/d(row_loss_i) as the backends take it: float32, shape (1,) or (N,)."""
    g = grad_output.float()
    if reduction == "mean":
        g = g / denominator
    return g.reshape(-1).contiguous()


def _no_grad_outputs(hidden: Tensor) -> tuple:
    empty = hidden.new_empty(0)
    return empty, empty.clone(), empty.clone()


@torch.library.custom_op("forward_rewrite::fused_lm_head_loss", mutates_args=())
def _fused_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    denominator: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    scale: float,
    softcap: float | None,
    reduction: str,
    eager_grads: bool,
    weight_grad: bool,
    chunk_budget_bytes: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dh, dw, db). With ``eager_grads`` the gradients are those of the loss itself
    (backward multiplies them by grad_output); otherwise they are empty. Without
    ``weight_grad`` (a frozen head) dW is never computed: dw is empty."""
    # Counted here, at run time, so a compiled graph counts too. Without eager gradients
    # the weight gradient (or its absence) is decided by the backward op.
    _stats.record_op(hidden.device.type, dw_skipped=eager_grads and not weight_grad)
    if eager_grads:
        grad_scale = _grad_scale(
            torch.ones((), device=hidden.device), denominator, reduction
        )
    else:
        grad_scale = None
    row_loss, dh, dw, db = _backend(hidden.device)(
        hidden,
        weight,
        bias,
        targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        scale=scale,
        softcap=softcap,
        grad_scale=grad_scale,
        compute_grads=eager_grads,
        weight_grad=weight_grad,
        chunk_budget_bytes=chunk_budget_bytes,
    )
    loss = _reduce(row_loss, denominator, reduction)
    if not eager_grads:
        dh, dw, db = _no_grad_outputs(hidden)
    else:
        dw = dw if dw is not None else hidden.new_empty(0)
        db = db if db is not None else hidden.new_empty(0)
    return loss, dh, dw, db


@_fused_op.register_fake
def _fused_op_fake(
    hidden,
    weight,
    bias,
    targets,
    denominator,
    ignore_index,
    label_smoothing,
    scale,
    softcap,
    reduction,
    eager_grads,
    weight_grad,
    chunk_budget_bytes,
):
    loss_shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(loss_shape, dtype=torch.float32)
    if not eager_grads:
        return (loss, *_no_grad_outputs(hidden))
    db = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    dw = torch.empty_like(weight) if weight_grad else hidden.new_empty(0)
    return loss, torch.empty_like(hidden), dw, db


@torch.library.custom_op(
    "forward_rewrite::fused_lm_head_loss_backward", mutates_args=()
)
def _backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    grad_scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    scale: float,
    softcap: float | None,
    weight_grad: bool,
    chunk_budget_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dw, db) of ``sum_i grad_scale_i * row_loss_i``; db is empty without a bias,
    dw without ``weight_grad``."""
    if not weight_grad:
        _stats.record_dw_skipped()
    _, dh, dw, db = _backend(hidden.device)(
        hidden,
        weight,
        bias,
        targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        scale=scale,
        softcap=softcap,
        grad_scale=grad_scale,
        compute_grads=True,
        weight_grad=weight_grad,
        chunk_budget_bytes=chunk_budget_bytes,
    )
    empty = hidden.new_empty(0)
    return dh, dw if dw is not None else empty, db if db is not None else empty.clone()


@_backward_op.register_fake
def _backward_op_fake(
    hidden,
    weight,
    bias,
    targets,
    grad_scale,
    ignore_index,
    label_smoothing,
    scale,
    softcap,
    weight_grad,
    chunk_budget_bytes,
):
    db = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    dw = torch.empty_like(weight) if weight_grad else hidden.new_empty(0)
    return torch.empty_like(hidden), dw, db


@torch.library.custom_op("forward_rewrite::scale_in_place", mutates_args=("grad",))
def _scale_in_place(grad: Tensor, factor: Tensor) -> None:
    """``grad *= factor`` (one float32): the float32 product, rounded once to grad's dtype.
    On the GPU our kernel does it without a host sync, and does nothing when the factor is
    exactly 1: a mean loss's usual incoming gradient, for which ``mul_`` would read and write
    all of dW for no change (and by a 0-dim tensor torch takes its broadcasting path: 1.5 ms
    a step at Llama-3.2-1B shapes for dh and dW). Elsewhere ``mul_`` by the factor as a Python number on the
    CPU (the same one rounding; the host read costs nothing there) and as a tensor on a GPU
    tensor the kernel does not take (non-contiguous), where torch rounds the factor to a
    16-bit grad's dtype first."""
    if grad.is_cuda:
        from . import _cuda

        if not _cuda.scale_in_place(grad, factor):
            grad.mul_(factor.reshape(()))
    else:
        grad.mul_(factor.item())


def _setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        targets,
        denominator,
        ignore_index,
        label_smoothing,
        scale,
        softcap,
        reduction,
        eager_grads,
        weight_grad,
        budget,
    ) = inputs
    _, dh, dw, db = output
    ctx.eager_grads = eager_grads
    ctx.has_bias = bias is not None
    ctx.weight_grad = weight_grad
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, scale, softcap, weight_grad, budget)
    if eager_grads:
        ctx.save_for_backward(dh, dw, db)
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, denominator)


def _backward(ctx, grad_loss, _grad_dh, _grad_dw, _grad_db):
    if ctx.eager_grads:
        dh, dw, db = ctx.saved_tensors
        # Scaled in place: `dw * g` would hold a second V x H copy of dW at the step's peak
        # (1 GiB in bf16 at V=128k, H=4096). The saved gradients are this op's own outputs and
        # nothing else reads them; a second backward through the same graph
        # (retain_graph=True) is refused by autograd's version check instead of reusing them.
        g = grad_loss.reshape(())
        grads = (dh, dw if ctx.weight_grad else None, db if ctx.has_bias else None)
        for t in grads:
            if t is not None:
                _scale_in_place(t, g)
    else:
        hidden, weight, bias, targets, denominator = ctx.saved_tensors
        ignore_index, label_smoothing, scale, softcap, weight_grad, budget = ctx.options
        dh, dw, db = _backward_op(
            hidden,
            weight,
            bias,
            targets,
            _grad_scale(grad_loss, denominator, ctx.reduction),
            ignore_index,
            label_smoothing,
            scale,
            softcap,
            weight_grad,
            budget,
        )
        grads = (dh, dw if weight_grad else None, db if ctx.has_bias else None)
    needs = ctx.needs_input_grad
    grads = tuple(g if needs[i] else None for i, g in enumerate(grads))
    return (*grads, *(None,) * 10)


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def _optional_number(name, value, *, nonzero=False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name}: expected a real number or None, got {type(value).__name__}"
        )
    value = float(value)
    if not math.isfinite(value) or (nonzero and value == 0.0):
        raise ValueError(
            f"{name}: expected a finite{' non-zero' if nonzero else ''} number, got {value}"
        )
    return value


def _denominator(targets, ignore_index, num_items_in_batch, device):
    """The mean's divisor as a float32 device tensor: no host-device sync."""
    if num_items_in_batch is None:
        # Clamped: with every label ignored the sum is 0, so the loss is 0, not 0/0.
        return (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch: expected one element, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        return num_items_in_batch.to(device=device, dtype=torch.float32).reshape(())
    if isinstance(num_items_in_batch, bool) or not isinstance(
        num_items_in_batch, numbers.Real
    ):
        raise TypeError(
            "num_items_in_batch: expected an int, a float, a one-element tensor or None, "
            f"got {type(num_items_in_batch).__name__}"
        )
    return torch.full((), float(num_items_in_batch), dtype=torch.float32, device=device)


def fused_lm_head_loss(
    hidden_states: Tensor,
    head,
    labels: Tensor | None,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    num_items_in_batch=None,
    shift_labels: Tensor | None = None,
    label_smoothing: float = 0.0,
    logit_softcapping: float | None = None,
    logit_scale_multiply: float | None = None,
    logit_scale_divide: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The causal-LM loss of ``head(hidden_states)`` without materialising the logits.

    Same result as ``ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch,
    ignore_index, shift_labels)`` where ``logits = head(hidden_states)``, then multiplied
    by ``logit_scale_multiply``, divided by ``logit_scale_divide`` and soft-capped
    (``cap * tanh(logits / cap)``) when those are given, in that order; computed in float32.

    * ``head``: an ``nn.Linear`` (its bias is honoured), a ``(vocab, hidden)`` weight, or a
      PEFT LoRA ``lora.Linear`` / ``ModulesToSaveWrapper`` head (``engines.py``). An
      ``nn.Linear`` with hooks (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3) is *called* with
      its forward replaced by the fused computation, so its hooks gather the weight first
      and see the loss as its output (``engines.call_through``). A head whose weight does
      not require a gradient (frozen, QLoRA-style) gets no weight gradient computed.
    * ``labels`` are shifted left with ``ignore_index`` padding, unless ``shift_labels``
      (already aligned with ``hidden_states``) is given; then ``labels`` is not read.
    * ``reduction="mean"``: sum over tokens divided by ``num_items_in_batch`` when given (an
      int, a float or a one-element tensor on any device), else by the number of tokens
      whose label is not ``ignore_index`` (0 when there is none: loss 0, zero gradients).
      ``"sum"``: the sum. ``"none"``: one float32 loss per token, 0 for ignored tokens,
      flattened to ``(tokens,)`` as ``fixed_cross_entropy`` flattens.
    * ``label_smoothing`` as in ``F.cross_entropy``.

    Returns a float32 tensor. Under ``torch.autocast``, the head runs in the autocast dtype,
    as ``nn.Linear`` would.
    """
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(
            f"hidden_states: expected a tensor, got {type(hidden_states).__name__}"
        )
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
    ):
        raise TypeError(f"vocab_size: expected an int, got {type(vocab_size).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch: only applies to reduction='mean'")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"ignore_index: expected an int, got {type(ignore_index).__name__}"
        )
    if isinstance(label_smoothing, bool) or not isinstance(
        label_smoothing, numbers.Real
    ):
        raise TypeError(
            f"label_smoothing: expected a float, got {type(label_smoothing).__name__}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"label_smoothing: expected a value in [0, 1], got {label_smoothing}"
        )
    multiply = _optional_number("logit_scale_multiply", logit_scale_multiply)
    divide = _optional_number("logit_scale_divide", logit_scale_divide, nonzero=True)
    softcap = _optional_number("logit_softcapping", logit_softcapping, nonzero=True)
    scale = (1.0 if multiply is None else multiply) / (
        1.0 if divide is None else divide
    )
    if scale == 0.0 or not math.isfinite(scale):
        raise ValueError(
            f"logit_scale_multiply: the logit scale must be finite and non-zero, got {scale}"
        )
    options = {
        "labels": labels,
        "shift_labels": shift_labels,
        "vocab_size": vocab_size,
        "ignore_index": ignore_index,
        "num_items_in_batch": num_items_in_batch,
        "label_smoothing": float(label_smoothing),
        "scale": scale,
        "softcap": softcap,
        "reduction": reduction,
    }

    if isinstance(head, torch.Tensor):
        return _loss(hidden_states, head, None, options)
    if not isinstance(head, nn.Module):
        raise TypeError(
            f"head: expected an nn.Linear or a weight tensor, got {type(head).__name__}"
        )
    route, reason = engines.head_route(head)
    if route is None:
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"head: {type(head).__name__} cannot be computed by the fused op ({reason})"
            )
        # A Linear subclass, or one with hooks of its own: run through the module if it has
        # hooks (they run, and see the loss), else read its parameters as before.
        if engines.hooks_of(head) == (set(), 0):
            return _loss(hidden_states, head.weight, head.bias, options)
        route = engines.Route("hooks", head)
    module = route.module
    if route.kind == "direct":
        return _loss(hidden_states, module.weight, module.bias, options)
    if route.kind == "peft-lora":
        hidden, weight, bias = engines.lora_operands(module, hidden_states)
        return _loss(hidden, weight, bias, options)
    full_shape = tuple(getattr(module.weight, "ds_shape", module.weight.shape))

    def compute(hidden):
        # Inside the module's forward: the pre-hooks have gathered the parameters.
        weight, bias = module.weight, module.bias
        if engines._is_dtensor(weight) or tuple(weight.shape) != full_shape:
            raise RuntimeError(
                f"forward_rewrite: {type(module).__name__}.weight is still sharded inside "
                f"its forward ({type(weight).__name__} of shape {tuple(weight.shape)}, "
                f"the head is {full_shape}); refusing to compute a loss from a shard"
            )
        return _loss(hidden, weight, bias, options)

    return engines.call_through(module, hidden_states, compute)


def _loss(hidden_states, weight, bias, o):
    """The op on a whole (gathered) weight; ``o``: the checked options."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise ValueError(f"head: expected a 2-D weight, got shape {shape}")
    vocab, hidden_size = weight.shape
    if o["vocab_size"] is not None and o["vocab_size"] != vocab:
        raise ValueError(
            f"vocab_size: {o['vocab_size']} but the head has {vocab} outputs"
        )
    if hidden_states.dim() < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states: expected last dimension {hidden_size} (the head's input size), "
            f"got shape {tuple(hidden_states.shape)}"
        )
    if weight.device != hidden_states.device:
        raise ValueError(
            f"head: weight on {weight.device}, hidden_states on {hidden_states.device}"
        )
    if bias is not None and bias.device != weight.device:
        raise ValueError(f"head: bias on {bias.device}, weight on {weight.device}")
    if hidden_states.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"hidden_states: device {hidden_states.device} is not supported (cpu or cuda)"
        )

    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if hidden_states.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"hidden_states: dtype {hidden_states.dtype} is not float32, bfloat16 or float16"
        )
    if weight.dtype != hidden_states.dtype:
        raise TypeError(
            f"head: weight dtype {weight.dtype} differs from hidden_states' {hidden_states.dtype}"
        )
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(
            f"head: bias dtype {bias.dtype} differs from the weight's {weight.dtype}"
        )

    ignore_index = o["ignore_index"]
    hidden = hidden_states.reshape(-1, hidden_size)
    tokens = hidden.shape[0]
    if o["shift_labels"] is None:
        labels = o["labels"]
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels: expected a tensor, got {type(labels).__name__}")
        if labels.dim() < 1:
            raise ValueError("labels: expected at least one dimension")
        targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        name = "labels"
    else:
        targets = o["shift_labels"]
        if not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"shift_labels: expected a tensor, got {type(targets).__name__}"
            )
        name = "shift_labels"
    if (
        targets.dtype.is_floating_point
        or targets.dtype.is_complex
        or targets.dtype == torch.bool
    ):
        raise TypeError(f"{name}: expected an integer dtype, got {targets.dtype}")
    if targets.numel() != tokens:
        raise ValueError(
            f"{name}: {targets.numel()} labels for {tokens} tokens of hidden_states "
            f"{tuple(hidden_states.shape)}"
        )
    targets = (
        targets.reshape(-1).to(device=hidden.device, dtype=torch.int64).contiguous()
    )
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None

    reduction = o["reduction"]
    denominator = None
    if reduction == "mean":
        denominator = _denominator(
            targets, ignore_index, o["num_items_in_batch"], hidden.device
        )
    grad_enabled = torch.is_grad_enabled()
    weight_grad = grad_enabled and weight.requires_grad
    wants_grad = grad_enabled and (
        hidden.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    # Gradients in the forward pass (3 GEMMs, logits computed once) when backward only has to
    # scale them: not for per-row grad_outputs (reduction "none"), and not for float16, where
    # rounding before the loss scale is applied would underflow small gradients.
    eager_grads = wants_grad and reduction != "none" and hidden.dtype != torch.float16
    loss, _, _, _ = _fused_op(
        hidden,
        weight,
        bias,
        targets,
        denominator,
        ignore_index,
        o["label_smoothing"],
        o["scale"],
        o["softcap"],
        reduction,
        eager_grads,
        weight_grad,
        chunk_budget_bytes(hidden.device.type),
    )
    return loss
