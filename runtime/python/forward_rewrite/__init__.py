"""forward-rewrite's runtime: the fused lm_head + causal-LM loss op and the helpers the
rewritten transformers forwards call (see ARCHITECTURE.md, contracts 3 and 4)."""

from ._native import __version__
from .guard import LOSS_KWARGS, fuses, keep_logits, loss_kwargs, set_keep_logits
from .ops import chunk_budget_bytes, fused_lm_head_loss, set_chunk_budget_bytes

__all__ = [
    "LOSS_KWARGS",
    "__version__",
    "chunk_budget_bytes",
    "fused_lm_head_loss",
    "fuses",
    "keep_logits",
    "loss_kwargs",
    "set_chunk_budget_bytes",
    "set_keep_logits",
]
