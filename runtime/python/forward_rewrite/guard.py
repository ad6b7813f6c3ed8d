"""The run-time helpers the rewritten forwards call (ARCHITECTURE.md, contract 3).

``fuses(model, head, vocab_size)`` decides, per call, whether the fused op may replace
``head(hidden) -> model.loss_function(...)`` (or, with ``loss="cross_entropy"``, the classic
shift + ``CrossEntropyLoss``); when it may not, the patched forward runs the original code
(invariant 3), and the reason is logged once per class and reason on the ``forward_rewrite``
logger. How a head under a distributed engine or an adapter is computed (and which are
refused) is ``engines.head_route``; the first fused call per class and route is logged once
at INFO, and every decision is counted (``forward_rewrite.stats()``, ``audit()``). ``keep_logits()`` / ``set_keep_logits()`` let a user ask for real logits.
``loss_kwargs(kwargs)`` keeps what ``ForCausalLMLoss`` reads. ``tuple_guard`` is the first
decorator of every patched forward: a call that will return a tuple takes the stock path.
"""

import contextlib
import contextvars
import functools
import logging

import torch

from . import _stats, engines
from ._backend import SUPPORTED_DTYPES

__all__ = [
    "LOSS_KWARGS",
    "fuses",
    "keep_logits",
    "loss_kwargs",
    "set_keep_logits",
    "tuple_guard",
]

logger = logging.getLogger("forward_rewrite")

#: The keyword arguments of ``ForCausalLMLoss`` besides logits, labels and vocab_size.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")

# Reasons (stable codes) -> what the log line says. Expected ones are logged at INFO.
_REASONS = {
    "keep-logits": "forward_rewrite.keep_logits() is active: real logits are computed",
    "eval-mode": "the model is in eval mode: real logits are computed",
    "tuple-return": (
        "the call returns a tuple (return_dict=False): a fused step would drop the logits "
        "from it and move every later element"
    ),
    "custom-loss-function": "model.loss_function is not transformers' ForCausalLMLoss",
    "head-not-linear": (
        "the head is not an nn.Linear, a PEFT LoRA Linear or modules_to_save wrapper "
        "(quantized, parametrized or replaced)"
    ),
    "head-vocab-mismatch": "the head's out_features differ from the vocabulary size",
    "head-hooks": (
        "the head has hooks that are not FSDP2's or DeepSpeed ZeRO-3's (a user's, PEFT's "
        "mixed-batch hooks, accelerate's replaced forward): a hook expecting the logits "
        "would see the loss"
    ),
    "head-sharded": (
        "the head's weight is a DTensor that no hook of the head gathers (tensor "
        "parallelism, or FSDP2 + tensor parallelism)"
    ),
    "head-lora-unsupported": (
        "the PEFT LoRA head uses a variant (DoRA, ...), a bias on lora_B, fan_in_fan_out, "
        "or adapters disabled while merged"
    ),
    "head-dtype": "the head's weight dtype is not float32, bfloat16 or float16",
    "head-device": "the head's weight is on a device without a fused backend",
    "cuda-backend-unavailable": "the CUDA backend (forward_rewrite._cuda) is not available",
}
_EXPECTED = {"keep-logits", "eval-mode", "tuple-return"}
#: The loss shapes the rewriter emits (``fuses(..., loss=...)``).
_LOSS_STYLES = ("loss_function", "cross_entropy")

_logged: set = set()
_keep_logits_depth: contextvars.ContextVar = contextvars.ContextVar(
    "forward_rewrite_keep_logits", default=0
)
_keep_logits_global = False
_tuple_call: contextvars.ContextVar = contextvars.ContextVar(
    "forward_rewrite_tuple_call", default=False
)


@contextlib.contextmanager
def keep_logits():
    """Within this block patched forwards compute and return real logits (stock path)."""
    token = _keep_logits_depth.set(_keep_logits_depth.get() + 1)
    try:
        yield
    finally:
        _keep_logits_depth.reset(token)


def set_keep_logits(enabled: bool) -> None:
    """Process-wide switch: True makes every patched forward take the stock path."""
    global _keep_logits_global
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _keep_logits_global = enabled


def loss_kwargs(kwargs) -> dict:
    """The entries of a forward's ``**kwargs`` that ``ForCausalLMLoss`` reads; it ignores
    the rest, and so does the fused op."""
    return {k: kwargs[k] for k in LOSS_KWARGS if k in kwargs}


def tuple_guard(forward):
    """Decorator (outermost on every patched forward): a call that will return a tuple runs
    the stock code. ``ModelOutput.to_tuple()`` (``@can_return_tuple``) drops ``None`` fields,
    so a fused step's ``None`` logits would move every later element one position up. The
    decision is the one ``can_return_tuple`` and 4.x forwards make: ``return_dict`` passed as a
    keyword, else the config's ``return_dict`` (``use_return_dict`` in 4.x)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if not _returns_tuple(self, kwargs):
            return forward(self, *args, **kwargs)
        token = _tuple_call.set(True)
        try:
            return forward(self, *args, **kwargs)
        finally:
            _tuple_call.reset(token)

    return wrapper


def _returns_tuple(model, kwargs) -> bool:
    passed = kwargs.get("return_dict")
    if passed is not None:
        return not passed
    config = getattr(model, "config", None)
    if config is None:
        return False
    # 4.x forwards read `config.use_return_dict` (return_dict and not torchscript); 5.x
    # deprecated that property, so it is computed here instead of read.
    return not getattr(config, "return_dict", True) or bool(
        getattr(config, "torchscript", False)
    )


def fuses(model, head, vocab_size, loss="loss_function") -> bool:
    """Whether this call may use the fused op. False (logged once per class and reason) in
    eval mode, inside ``keep_logits()``, in a call that returns a tuple, when the loss
    function is not transformers' own ``ForCausalLMLoss`` (``loss="loss_function"``: the
    original calls ``model.loss_function``; ``"cross_entropy"``: it computes the classic
    shift + ``CrossEntropyLoss`` itself), or when ``engines.head_route`` cannot compute the
    head (anything but a hook-free ``nn.Linear``, an ``nn.Linear`` whose hooks are all
    FSDP2's or all DeepSpeed ZeRO-3's, or a vanilla PEFT LoRA / modules_to_save head), or
    its weight is not ``vocab_size`` rows on a device and dtype a backend supports. Every
    decision is counted per class (``forward_rewrite.stats()``)."""
    if loss not in _LOSS_STYLES:
        raise ValueError(f"loss: expected one of {_LOSS_STYLES}, got {loss!r}")
    route, reason = _decide(model, head, vocab_size, loss)
    # Logging and counting are side effects torch.compile cannot trace; compiled calls stay
    # silent (the op still counts its executions: stats()["op_calls"]).
    if not torch.compiler.is_compiling():
        cls = engines.plain_class(type(model))
        if reason is None:
            if _stats.record_decision(cls, route=route.kind):
                _log_fused(cls, route.kind)
        else:
            _stats.record_decision(cls, reason=reason)
            _log_once(cls, reason)
    return reason is None


def _refusal(model, head, vocab_size, loss="loss_function"):
    """The reason this call may not fuse, or None."""
    return _decide(model, head, vocab_size, loss)[1]


def _decide(model, head, vocab_size, loss="loss_function"):
    """(route, None) when the call may fuse, else (None, reason)."""
    if _keep_logits_global or _keep_logits_depth.get() > 0:
        return None, "keep-logits"
    if not getattr(model, "training", False):
        return None, "eval-mode"
    if _tuple_call.get():
        return None, "tuple-return"
    if loss == "loss_function" and not _is_stock_causal_loss(
        getattr(model, "loss_function", None)
    ):
        return None, "custom-loss-function"
    route, reason = engines.head_route(head)
    if route is None:
        return None, reason
    linear = route.module.base_layer if route.kind == "peft-lora" else route.module
    weight = linear.weight
    # ZeRO-3 leaves an empty tensor outside the forward; its full shape is `ds_shape`.
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    if linear.out_features != vocab_size or shape[0] != vocab_size:
        return None, "head-vocab-mismatch"
    if weight.dtype not in SUPPORTED_DTYPES:
        return None, "head-dtype"
    if weight.device.type == "cuda":
        if not _cuda_backend_available():
            return None, "cuda-backend-unavailable"
    elif weight.device.type != "cpu":
        return None, "head-device"
    return route, None


def _is_stock_causal_loss(fn) -> bool:
    try:
        from transformers.loss import loss_utils
    except ImportError:
        return False
    stock = loss_utils.ForCausalLMLoss
    # Identity, and the original's name: a replaced module attribute is not trusted either.
    return (
        fn is stock
        and getattr(fn, "__module__", None) == "transformers.loss.loss_utils"
        and getattr(fn, "__qualname__", None) == "ForCausalLMLoss"
    )


def _cuda_backend_available() -> bool:
    try:
        from . import _cuda  # noqa: F401
    except ImportError:
        return False
    return True


def _log_fused(cls, route):
    """One INFO line per model class and route, the first time it fuses: the line a user
    greps a job's log for (its absence, with a fallback line, says why not)."""
    logger.info(
        "forward_rewrite: %s.%s uses the fused lm_head + loss (route: %s)",
        cls.__module__,
        cls.__qualname__,
        route,
    )


def _log_once(cls, reason):
    key = (cls.__module__, cls.__qualname__, reason)
    if key in _logged:
        return
    _logged.add(key)
    level = logging.INFO if reason in _EXPECTED else logging.WARNING
    logger.log(
        level,
        "forward_rewrite: %s.%s uses the stock lm_head + loss (%s: %s)",
        cls.__module__,
        cls.__qualname__,
        reason,
        _REASONS[reason],
    )
