"""forward-rewrite's runtime: the installer that puts rewritten forwards into transformers'
model classes, the fused lm_head + causal-LM loss op, the fused decoder ops (RMSNorm,
rotary embedding, gated MLP product), and the helpers the rewritten forwards call (see
ARCHITECTURE.md, contracts 1-4)."""

from . import fusion_guard
from ._installer import audit, install, patch_model, uninstall
from ._moe_op import moe_experts
from ._native import __version__
from ._stats import reset_stats, stats
from .fused_ops import (
    add_rms_norm,
    gated_mlp_act,
    gated_mlp_act_packed,
    gated_rms_norm,
    rms_norm,
    rotary,
    rotary_single,
)
from .guard import (
    LOSS_KWARGS,
    fuses,
    keep_logits,
    loss_kwargs,
    set_keep_logits,
    tuple_guard,
)
from .ops import chunk_budget_bytes, fused_lm_head_loss, set_chunk_budget_bytes

__all__ = [
    "LOSS_KWARGS",
    "__version__",
    "add_rms_norm",
    "audit",
    "chunk_budget_bytes",
    "fused_lm_head_loss",
    "fuses",
    "fusion_guard",
    "gated_mlp_act",
    "gated_mlp_act_packed",
    "gated_rms_norm",
    "install",
    "keep_logits",
    "loss_kwargs",
    "moe_experts",
    "patch_model",
    "reset_stats",
    "rms_norm",
    "rotary",
    "rotary_single",
    "set_chunk_budget_bytes",
    "set_keep_logits",
    "stats",
    "tuple_guard",
    "uninstall",
]
