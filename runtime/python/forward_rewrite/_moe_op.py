"""The memory-lean MoE experts op: transformers' ``grouped_mm`` experts forward
(``integrations.moe.grouped_mm_experts_forward``) for gated, concatenated experts without
bias, post-expert norm or expert parallelism, with a backward that keeps only ``gate_up``.

The stock forward, differentiated by autograd, keeps four routed (tokens x top_k) tensors
for backward: the gathered input (``hidden[perm // k]``, tokens x k x hidden), ``gate_up``,
the gated product and the down projection's output (tokens x k x hidden, kept only for the
routing weights' gradient). On Qwen3-30B-A3B shapes at 32768 tokens that is 3.1 GiB per
layer, and it is what a checkpointed MoE step's peak is made of. This op saves ``gate_up``
alone (plus the sort permutation and group offsets) and in backward

* re-gathers the input for the up projection's weight gradient (after its input gradient
  is scattered and freed);
* gets the routing weights' gradient without the down output: ``<dy, h W_down^T> =
  <dy W_down, h>``, and ``dy W_down`` is the product the down projection's input gradient
  needs anyway;
* recomputes ``h = act(gate) * up`` from ``gate_up`` with the fused gated kernels;
* forms ``dy W_down`` and ``gate_up``'s gradient by blocks of routed rows (each row's
  products are its own), writing the latter over ``gate_up`` on the eager path when the
  graph is not kept, so that at most ``gate_up``, the routed output gradient and ``h`` are
  whole at once.

The forward runs the stock statements' operations in the stock order (the same grouped
GEMMs, the same gated kernel the ``experts-gate`` site runs, the same routing product and
float32 sum over top_k), so its output equals the stock one. The backward's products are
the stock ones but for two rounding points: the down projection's input gradient is
``(dy W_down) * w`` instead of ``(dy * w) W_down``, and the routing weights' gradient is
reduced from ``dy W_down`` and ``h`` instead of ``dy`` and the down output.

A ``torch.library`` custom op pair with fake kernels (``torch.compile`` traces one node),
and the eager fast path of the other fused ops (``_eager.OpPair``).
"""

import torch
from torch import Tensor

from ._eager import BackwardOp, OpPair
from ._fusions_backend import GateFn
from .fused_ops import (
    _backend,
    _device,
    _gate_fn,
    _may_overwrite,
    _overwritten,
    _tensor,
)

__all__ = ["moe_experts"]

#: The backward's blocks of routed rows: about this many bytes of ``dy W_down`` each.
_BLOCK_BYTES = 64 << 20


def _grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """torch's grouped GEMM, as transformers' ``_grouped_mm`` calls it when it can."""
    grouped = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped is not None:
        return grouped(a, b, offs=offsets)
    return torch._grouped_mm(a, b, offs=offsets)


def _b(weight: Tensor, transposed: bool) -> Tensor:
    """The (experts, in, out) operand of a stored weight: (experts, out, in) unless
    ``transposed``."""
    return weight if transposed else weight.transpose(-2, -1)


def _route(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(perm, offsets): the routed rows sorted by expert, and each expert's end row (int32)
    -- the stock forward's sort and ``histc`` + ``cumsum``."""
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    device = top_k_index.device
    histc_input = (
        expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    )
    counts = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    return perm, torch.cumsum(counts, dim=0, dtype=torch.int32)


def _gate(gate_up: Tensor, fn: GateFn) -> Tensor:
    return _backend(gate_up.device).gated_act_packed(gate_up, fn)


def _row_dots(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """Each row's dot product in ``dtype`` (of a block of routed rows). Of the operands' own
    dtype: a batched GEMM (float32 accumulation, one rounding, no temporary); wider
    (float32 routing weights of bfloat16 experts, whose stock gradient is formed in
    float32): the products in that dtype."""
    if a.dtype == dtype:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return (a.to(dtype) * b.to(dtype)).sum(dim=-1)


# ---- forward ----------------------------------------------------------------------------------


def _moe_impl(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    activation: str,
    transposed: bool,
    limit: float | None = None,
    clamp_after: bool = False,
    alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, gate_up, perm, offsets): the experts' output (x's shape and dtype), and what
    backward needs."""
    tokens, top_k = top_k_index.shape
    perm, offsets = _route(top_k_index, gate_up_proj.shape[0])
    x_g = x[perm // top_k].to(gate_up_proj.dtype)
    gate_up = _grouped_mm(x_g, _b(gate_up_proj, transposed), offsets)
    del x_g
    h = _gate(gate_up, GateFn(activation, limit, clamp_after, alpha))
    y = _grouped_mm(h.to(down_proj.dtype), _b(down_proj, transposed), offsets)
    del h
    w_g = top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    if torch.promote_types(y.dtype, w_g.dtype) == y.dtype:
        weighted = y.mul_(w_g)  # the stock product, without a second routed tensor
    else:
        weighted = y * w_g
    del y
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.shape[0], device=perm.device)
    # The stock un-permutation and sum over top_k, by blocks of tokens: each token's rows
    # summed as stock sums them, without un-permuting all rows at once.
    hidden = weighted.shape[1]
    out = weighted.new_empty((tokens, hidden))
    step = max(1, (128 << 20) // (top_k * hidden * weighted.element_size()))
    for start in range(0, tokens, step):
        rows = inv_perm[start * top_k : (start + step) * top_k]
        out[start : start + step] = weighted[rows].view(-1, top_k, hidden).sum(dim=1)
    return out.to(x.dtype), gate_up, perm, offsets


_moe_op = torch.library.custom_op("forward_rewrite::moe_experts", mutates_args=())(
    _moe_impl
)


@_moe_op.register_fake
def _moe_fake(
    x,
    top_k_index,
    top_k_weights,
    gate_up_proj,
    down_proj,
    activation,
    transposed,
    limit=None,
    clamp_after=False,
    alpha=None,
):
    routed = top_k_index.numel()
    cols = gate_up_proj.shape[-1] if transposed else gate_up_proj.shape[-2]
    return (
        x.new_empty(x.shape),
        x.new_empty((routed, cols), dtype=gate_up_proj.dtype),
        x.new_empty((routed,), dtype=torch.long),
        x.new_empty((gate_up_proj.shape[0],), dtype=torch.int32),
    )


# ---- backward ---------------------------------------------------------------------------------


def _moe_backward_impl(
    dout: Tensor,
    x: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    gate_up: Tensor,
    perm: Tensor,
    offsets: Tensor,
    activation: str,
    transposed: bool,
    weight_grads: bool,
    limit: float | None = None,
    clamp_after: bool = False,
    alpha: float | None = None,
    overwrite: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dtop_k_weights, dgate_up_proj, ddown_proj); the weights' gradients are empty
    when ``weight_grads`` is false. Each routed (tokens x top_k) temporary is freed as soon
    as the next product has read it; ``overwrite`` (the eager path's promise that nothing
    reads ``gate_up`` again) writes its gradient over it, one routed tensor fewer when the
    input is re-gathered."""
    top_k = top_k_weights.shape[-1]
    rows = perm // top_k
    w_g = top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    # The routed rows' output gradient (the stock sum's and un-permutation's backward).
    dy = dout[rows].to(down_proj.dtype)
    fn = GateFn(activation, limit, clamp_after, alpha)
    h = _gate(gate_up, fn)
    # By blocks of rows (each row's products are its own): u = dy W_down, the down
    # projection's input gradient before the routing weight; the routing weights' gradient
    # <u, h>; gate_up's gradient from u * w. No whole (routed x intermediate) product is
    # made besides h, and with ``overwrite`` gate_up's gradient takes its place.
    w2 = _b(down_proj, transposed).transpose(-2, -1)
    wide = torch.promote_types(dy.dtype, top_k_weights.dtype)
    dweights_g = torch.empty(perm.shape[0], dtype=wide, device=dy.device)
    backend = _backend(gate_up.device)
    dgate_up = gate_up if overwrite else torch.empty_like(gate_up)
    routed, inter = h.shape
    step = max(1, _BLOCK_BYTES // max(1, inter * dy.element_size()))
    for start in range(0, routed, step):
        block = slice(start, start + step)
        u = _grouped_mm(dy[block], w2, offsets.clamp(start, start + step) - start)
        dweights_g[block] = _row_dots(u, h[block], wide)
        d = backend.gated_act_backward_packed(
            u.mul_(w_g[block]), gate_up[block], fn, overwrite
        )
        if not overwrite:
            dgate_up[block] = d
        del u, d
    if overwrite:
        _overwritten(gate_up)
    dweights = torch.empty(
        perm.shape[0], dtype=top_k_weights.dtype, device=top_k_weights.device
    )
    dweights[perm] = dweights_g.to(top_k_weights.dtype)  # perm: every row once
    del dweights_g
    ddown = None
    if weight_grads:
        dy.mul_(w_g)  # the stock down output's gradient, rounded where stock rounds it
        ddown = (
            _grouped_mm(h.t(), dy, offsets)
            if transposed
            else _grouped_mm(dy.t(), h, offsets)
        )
    del dy, h
    dx_g = _grouped_mm(
        dgate_up, _b(gate_up_proj, transposed).transpose(-2, -1), offsets
    )
    dx = torch.zeros(x.shape, dtype=dx_g.dtype, device=x.device)
    dx.index_put_((rows,), dx_g, accumulate=True)
    del dx_g
    dgate_up_proj = None
    if weight_grads:
        x_g = x[rows].to(gate_up_proj.dtype)
        dgate_up_proj = (
            _grouped_mm(x_g.t(), dgate_up, offsets)
            if transposed
            else _grouped_mm(dgate_up.t(), x_g, offsets)
        )
        del x_g
    empty = x.new_empty(0)
    return (
        dx.to(x.dtype),
        dweights.view(top_k_weights.shape),
        dgate_up_proj if dgate_up_proj is not None else empty,
        ddown if ddown is not None else empty,
    )


_moe_backward_op = torch.library.custom_op(
    "forward_rewrite::moe_experts_backward", mutates_args=()
)(_moe_backward_impl)


@_moe_backward_op.register_fake
def _moe_backward_fake(
    dout,
    x,
    top_k_weights,
    gate_up_proj,
    down_proj,
    gate_up,
    perm,
    offsets,
    activation,
    transposed,
    weight_grads,
    limit=None,
    clamp_after=False,
    alpha=None,
    overwrite=False,
):
    empty = x.new_empty(0)
    return (
        torch.empty_like(x),
        torch.empty_like(top_k_weights),
        torch.empty_like(gate_up_proj) if weight_grads else empty,
        torch.empty_like(down_proj) if weight_grads else empty,
    )


def _moe_setup(ctx, inputs, output):
    x, _index, top_k_weights, gate_up_proj, down_proj, *options = inputs
    _, gate_up, perm, offsets = output
    ctx.save_for_backward(
        x, top_k_weights, gate_up_proj, down_proj, gate_up, perm, offsets
    )
    ctx.options = tuple(options)  # activation, transposed, limit, clamp_after, alpha
    ctx.overwrite = True  # gate_up is the op's own: only its backward reads it


def _moe_backward(ctx, dout, _dgate_up, _dperm, _doffsets):
    saved = ctx.saved_tensors
    activation, transposed, limit, clamp_after, alpha = ctx.options
    needs = ctx.needs_input_grad
    if not any(needs):
        return (None,) * 10
    weight_grads = needs[3] or needs[4]
    args = (dout.contiguous(), *saved, activation, transposed, weight_grads)
    args += (limit, clamp_after, alpha)
    if _may_overwrite(ctx, saved[4]):
        grads = _moe_backward_impl(*args, True)
    else:
        grads = _moe_backward_call(*args, False)
    dx, dweights, dgate_up_proj, ddown = grads
    return (
        dx if needs[0] else None,
        None,
        dweights if needs[2] else None,
        dgate_up_proj if needs[3] else None,
        ddown if needs[4] else None,
        *(None,) * 5,
    )


_moe = OpPair(_moe_op, _moe_impl, _moe_setup, _moe_backward, nondiff=(1, 2, 3))
_moe_backward_call = BackwardOp(_moe_backward_op, _moe_backward_impl)


# ---- the public function ----------------------------------------------------------------------


def _check(name, t, *, dims, dtypes, x=None):
    _tensor(name, t)
    if x is not None:
        _device(name, t, x, "x")
    if t.dim() != dims:
        raise ValueError(
            f"{name}: expected {dims} dimensions, got shape {tuple(t.shape)}"
        )
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not one of {dtypes}")


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_INDICES = (torch.int64, torch.int32)


def moe_experts(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    activation: str = "silu",
    limit: float | None = None,
    clamp_after_activation: bool = False,
    alpha: float | None = None,
    transposed: bool = False,
) -> Tensor:
    """The output of gated MoE experts for ``x`` (tokens, hidden) routed to ``top_k_index``
    (tokens, top_k; every id in ``[0, experts)``) with ``top_k_weights``, as transformers'
    ``grouped_mm_experts_forward`` computes it for concatenated, bias-free experts:
    per routed row, ``(act(gate) * up) @ W_down^T * weight`` with ``gate, up`` the halves of
    ``x @ W_gate_up^T``, summed over top_k in float32 and rounded to x's dtype.

    ``gate_up_proj`` is (experts, 2 * intermediate, hidden) and ``down_proj`` (experts,
    hidden, intermediate), or both transposed (``transposed=True``: (experts, hidden, 2 *
    intermediate) and (experts, intermediate, hidden)). ``activation``: ``"silu"`` or
    ``"gelu_tanh"``, or ``"swiglu_oai"`` with ``alpha`` (MiniMax-M3's experts); ``limit``
    and ``clamp_after_activation`` make the gate the clamped SwiGLU of
    :func:`forward_rewrite.gated_mlp_act` (DeepSeek-V4's, MiniMax-M3's experts).
    Gradients for x, the routing weights and both weights; backward keeps only ``gate_up``
    of the routed rows (module docs)."""
    _check("x", x, dims=2, dtypes=_FLOATS)
    _device("x", x, x, "x")
    _check("top_k_index", top_k_index, dims=2, dtypes=_INDICES, x=x)
    _check("top_k_weights", top_k_weights, dims=2, dtypes=_FLOATS, x=x)
    _check("gate_up_proj", gate_up_proj, dims=3, dtypes=_FLOATS, x=x)
    _check("down_proj", down_proj, dims=3, dtypes=(gate_up_proj.dtype,), x=x)
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed: expected a bool, got {type(transposed).__name__}")
    fn = _gate_fn(activation, limit, clamp_after_activation, alpha)
    tokens, hidden = x.shape
    if top_k_index.shape[0] != tokens:
        raise ValueError(
            f"top_k_index: expected ({tokens}, top_k) (x's tokens), got "
            f"{tuple(top_k_index.shape)}"
        )
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights: expected top_k_index's shape {tuple(top_k_index.shape)}, "
            f"got {tuple(top_k_weights.shape)}"
        )
    experts = gate_up_proj.shape[0]
    w1 = _b(gate_up_proj, transposed).shape[1:]  # (hidden, 2 * intermediate)
    w2 = _b(down_proj, transposed).shape[1:]  # (intermediate, hidden)
    if w1[0] != hidden or w1[1] % 2 or down_proj.shape[0] != experts:
        layout = (
            f"({experts}, {hidden}, 2 * intermediate) (transposed)"
            if transposed
            else f"({experts}, 2 * intermediate, {hidden})"
        )
        raise ValueError(
            f"gate_up_proj: expected {layout}, got {tuple(gate_up_proj.shape)}"
        )
    if tuple(w2) != (w1[1] // 2, hidden):
        inner = (w1[1] // 2, hidden) if transposed else (hidden, w1[1] // 2)
        raise ValueError(
            f"down_proj: expected {(experts, *inner)}"
            f"{' (transposed)' if transposed else ''}, got {tuple(down_proj.shape)}"
        )
    out, _, _, _ = _moe(
        x,
        top_k_index,
        top_k_weights,
        gate_up_proj,
        down_proj,
        fn.activation,
        transposed,
        *fn[1:],
    )
    return out
