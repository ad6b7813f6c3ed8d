"""The packing guarantee (issue 9): packed sequences stay apart in every layer.

Padding-free packing puts several sequences in one row: ``position_ids`` restart at 0 for
each, and there is no attention mask (or an all-ones one). Stock transformers 5 keeps them
apart only by luck: its masking utilities look for packed ``position_ids`` only when no
cache object exists, and ``use_cache`` defaults to True, so a training forward creates a
``DynamicCache`` and every sequence attends to the ones before it; flash backends recompute
``cu_seqlens`` / ``max_seqlen`` from ``position_ids`` in every layer, with host syncs, and
only for a batch of one row.

``wrap_forward(forward, cls)`` (the installer applies it to each class it patches) wraps a
model class's forward. Per call, when the caller passed no cache and ``position_ids``:

1. **Detect** (``_detect``), with at most one host sync: the rows restart at 0 inside a row
   (or the collator passed ``cu_seq_lens_q/k`` + ``max_length_q/k``: then nothing is read
   back, zero syncs). One small device tensor holds every fact needed (is it packed, are
   the positions clean, is the mask all ones, does it contradict the positions, how many
   sequences, the longest) and is read back once. Not packed: the stock forward runs,
   untouched.
2. **Decide from capabilities** (``forward_rewrite.attention``) of the model's backend:
   ``packing_path == "varlen"`` (flash backends, or any backend registered as taking varlen
   kwargs): ``cu_seq_lens_q/k`` (int32, over the flattened batch) and ``max_length_q/k``
   (Python ints) are computed once and passed down the call in ``**kwargs``, which
   transformers hands to every layer's attention call. ``packing_path == "mask"`` (eager,
   sdpa, flex_attention): the per-token sequence ids are computed once, and transformers'
   own mask machinery builds the block-causal mask once per mask kind (full, sliding,
   chunked), with ``packed_sequence_mask_function`` on top of the layer's causal / sliding /
   chunked function, so windows and soft-caps are those of stock. ``None``: a ValueError
   naming the backend and the backends that can pack (from the table).
3. **Hand the facts to the mask machinery** through a ``ContextVar`` set for the duration
   of this call only (``_ACTIVE``): ``masking_utils._preprocess_mask_arguments`` is wrapped
   (``_preprocess_hook``) so that, for a mask of this forward's batch and length, it sizes
   the mask as for a fresh cache (which is what it is: the caller passed none) and returns
   this forward's sequence ids as the packed-sequence mask, instead of skipping detection
   because a cache exists (and instead of re-detecting with a sync of its own). Outside a
   packed forward the hook is a pass-through.
4. **Check after the forward** that a mask backend's model did build a mask through that
   machinery (else RuntimeError ``mask-not-built``: the boundaries were not seen).

No state outlives a call: the ``PackedBatch`` lives in the call's frame and the context
variable (reset in ``finally``), so a batch's metadata is never used for the next one;
contexts are per thread (and per asyncio task); with the collator's metadata nothing is
read back, so such a forward can be captured in a CUDA graph.

Bad input: ``position_ids`` that restart at 0 inside a row but do not count up by one
within each sequence, or whose rows do not start at 0 (``bad-position-ids``); lengths that
do not match the input (``length-mismatch``); some but not all of the four varlen kwargs,
or varlen kwargs without ``position_ids`` (``varlen-kwargs-incomplete``); a padding
attention mask whose attended tokens span a restart (``mask-contradicts-positions``):
ValueError. A padding mask whose restarts all follow a padded token (left padding), a 4D
mask, 3D (multimodal RoPE) ``position_ids`` or a cache passed in: the stock path.
"""

import functools
import inspect
import threading
from contextvars import ContextVar

import torch

from . import attention

__all__ = ["VARLEN_KWARGS", "PackingError", "report", "wrap_forward"]

#: The flash-attention keyword arguments transformers' layers pass to the attention call.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

#: Reason codes of a packed forward that is refused at run time (README, "Packing").
REASONS = {
    "backend-cannot-pack": "the attention backend cannot keep packed sequences apart",
    "backend-unknown": "the attention backend is not in the table nor registered",
    "bad-position-ids": "position_ids restart at 0 but do not count up within a sequence",
    "length-mismatch": "position_ids / attention_mask do not match the input's shape",
    "varlen-kwargs-incomplete": "cu_seq_lens_q/k and max_length_q/k: all four or none",
    "mask-contradicts-positions": "a padding mask whose attended tokens span a restart",
    "mask-not-built": "the model built no attention mask through transformers' masking "
    "utilities: the boundaries were not seen",
    "masking-hook-unavailable": "transformers' masking utilities have another shape",
    "position-ids-not-taken": "the forward has no position_ids parameter",
    "encoder-states-given": "encoder states for cross-attention, which the packed mask "
    "does not describe",
}

#: Arguments that make a decoder's layers cross-attend (GPT-2, GPT-BigCode with
#: ``add_cross_attention``; Mllama): a packed forward given one is refused.
CROSS_ATTENTION_ARGS = ("encoder_hidden_states", "cross_attention_states")


class PackingError(ValueError):
    """A packed forward that cannot keep its sequences apart; ``reason`` is the code."""

    def __init__(self, reason, message):
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


class PackedBatch:
    """What one packed forward knows; lives for that forward only."""

    __slots__ = (
        "batch",
        "length",
        "masks_built",
        "metadata",
        "path",
        "sequence_ids",
        "syncs",
    )

    def __init__(self, batch, length, sequence_ids, path, metadata, syncs):
        self.batch = batch
        self.length = length
        #: (batch, length) long: the index of each token's sequence within its row
        self.sequence_ids = sequence_ids
        self.path = path  # "mask" | "varlen"
        self.metadata = metadata  # "position_ids" | "collator"
        self.syncs = syncs
        self.masks_built = 0


_ACTIVE: ContextVar = ContextVar("forward_rewrite_packed_batch", default=None)

# ------------------------------------------------------------------ the masking hook

_hook_lock = threading.Lock()
_hook = {"original": None, "signature": None}


def _enable_masking_hook():
    """Wrap ``masking_utils._preprocess_mask_arguments`` (idempotent). Returns False when
    this transformers' masking utilities do not have the expected shape."""
    with _hook_lock:
        try:
            from transformers import masking_utils
        except ImportError:
            return False
        current = getattr(masking_utils, "_preprocess_mask_arguments", None)
        if current is _preprocess_hook:
            return True
        if current is None or not hasattr(masking_utils, "create_causal_mask"):
            return False
        params = inspect.signature(current).parameters
        embeds = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"
        needed = {embeds, "attention_mask", "past_key_values", "position_ids"}
        if not needed <= set(params):
            return False
        _hook["original"] = current
        _hook["signature"] = inspect.signature(current)
        _hook["embeds"] = embeds
        masking_utils._preprocess_mask_arguments = _preprocess_hook
        return True


def disable():
    """Restore transformers' masking utilities (``uninstall()`` calls it). Forwards wrapped
    earlier keep working: a packed one then fails its ``mask-not-built`` check."""
    with _hook_lock:
        original = _hook["original"]
        if original is None:
            return
        from transformers import masking_utils

        if masking_utils._preprocess_mask_arguments is _preprocess_hook:
            masking_utils._preprocess_mask_arguments = original
        # "original" stays: if another patcher wrapped the hook, it still calls it


def _preprocess_hook(*args, **kwargs):
    """``_preprocess_mask_arguments``, which for a mask of the active packed forward sizes
    it as for a fresh cache and returns that forward's sequence ids as the packed-sequence
    mask. Everything else passes through."""
    original = _hook["original"]
    packed = _ACTIVE.get()
    if packed is None:
        return original(*args, **kwargs)
    bound = _hook["signature"].bind(*args, **kwargs)
    a = bound.arguments
    embeds = a.get(_hook["embeds"])
    if (
        a.get("attention_mask") is not None
        or a.get("position_ids") is None
        or a.get("encoder_hidden_states") is not None
        or embeds is None
        or tuple(embeds.shape[:2]) != (packed.batch, packed.length)
        or a["position_ids"].shape[-1] != packed.length
    ):
        return original(*args, **kwargs)
    cache = a.get("past_key_values")
    if cache is not None and _seen_tokens(cache) != 0:
        return original(*args, **kwargs)
    # A fresh cache sizes the mask as no cache does (kv_length = q_length, offsets 0);
    # without position_ids transformers does not re-detect (no sync): we know the answer.
    a["past_key_values"] = None
    a["position_ids"] = None
    result = original(*bound.args, **bound.kwargs)
    if result[0]:  # early exit: no mask for this backend (or a 4D one was given)
        return result
    packed.masks_built += 1
    return (*result[:2], packed.sequence_ids, *result[3:])


def _seen_tokens(cache):
    try:
        return int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 - a cache we cannot read: not fresh
        return -1


# ------------------------------------------------------------------------ detection


def _refuse(cls, reason, message):
    _record(cls, error=reason)
    return PackingError(reason, f"{cls.__qualname__}: {message}")


def _packing_backends():
    return [n for n in attention.names() if attention.capabilities(n).supports_packing]


def _backend(model, cls):
    try:
        name = attention.of_model(model)
        caps = attention.capabilities(name)
    except ValueError as exc:
        return None, exc
    return caps, None


def _detect(cls, model, bound, kwargs):
    """The PackedBatch of this call and the kwargs to call the forward with, or None (not
    a packed forward: stock). Raises PackingError for bad or unsupported packed input."""
    position_ids = bound.get("position_ids")
    ignored = position_ids is None and kwargs.get("position_ids") is not None
    if ignored:
        # the forward has no position_ids parameter: they would be dropped in **kwargs
        position_ids = kwargs["position_ids"]
    given = [k for k in VARLEN_KWARGS if kwargs.get(k, bound.get(k)) is not None]
    if bound.get("past_key_values") is not None:
        return None
    if position_ids is None:
        if given:
            raise _refuse(
                cls,
                "varlen-kwargs-incomplete",
                f"{given} passed without position_ids (each sequence's positions are "
                "needed for its rotary embedding and its mask)",
            )
        return None
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2:
        return None  # multimodal RoPE positions (3D) and the like: stock
    ref = bound.get("input_ids")
    if ref is None:
        ref = bound.get("inputs_embeds")
    if ref is None or ref.ndim < 2:
        return None
    batch, length = int(ref.shape[0]), int(ref.shape[1])
    mask = bound.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
        return None  # a 4D mask (or a BlockMask, a dict of masks) is the caller's
    if position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise _refuse(
            cls,
            "length-mismatch",
            f"position_ids of shape {tuple(position_ids.shape)} for an input of "
            f"{batch} x {length} tokens",
        )
    if mask is not None and tuple(mask.shape) != (batch, length):
        raise _refuse(
            cls,
            "length-mismatch",
            f"attention_mask of shape {tuple(mask.shape)} for an input of "
            f"{batch} x {length} tokens",
        )
    if given and len(given) != len(VARLEN_KWARGS):
        raise _refuse(
            cls,
            "varlen-kwargs-incomplete",
            f"got {given}; pass all of {list(VARLEN_KWARGS)} or none",
        )
    positions = position_ids.expand(batch, length)
    starts = positions == 0

    if given and mask is None:
        facts, syncs = None, 0  # the collator says it is packed: nothing to read back
    else:
        facts, syncs = _facts(positions, starts, mask), 1
        if mask is not None and not facts["mask_all_ones"]:
            if facts["contradiction"]:
                raise _refuse(
                    cls,
                    "mask-contradicts-positions",
                    "position_ids restart between two attended tokens of a padding "
                    "attention_mask; transformers would let those sequences attend to "
                    "each other. Pack without padding (attention_mask=None)",
                )
            if given:
                raise _refuse(
                    cls,
                    "mask-contradicts-positions",
                    "cu_seq_lens_q/k with a padding attention_mask: flash attention "
                    "would unpad by the mask and ignore the sequence boundaries",
                )
            return None  # a padding batch (left padding restarts after pads): stock
        if not given and not facts["restart"]:
            return None  # one sequence per row: stock
        if not facts["clean"]:
            raise _refuse(
                cls,
                "bad-position-ids",
                "position_ids restart at 0 inside a row, so the row is read as packed "
                "sequences, but each row must start at 0 and count up by one until the "
                "next 0",
            )

    if ignored:
        raise _refuse(
            cls,
            "position-ids-not-taken",
            "packed sequences (position_ids restart at 0 inside a row), but this "
            "forward has no position_ids parameter: they would be ignored and the "
            "sequences would attend to each other",
        )
    caps, problem = _backend(model, cls)
    if caps is None:
        raise _refuse(
            cls,
            "backend-unknown",
            f"packed sequences, and {problem}. Declare the backend's capabilities with "
            "forward_rewrite.attention.register(name, like=...)",
        ) from problem
    if caps.packing_path is None:
        raise _refuse(
            cls,
            "backend-cannot-pack",
            f"packed sequences (position_ids restart at 0 inside a row), but the "
            f"attention backend {caps.name!r} cannot keep them apart "
            f"(capabilities: supports_packing={caps.supports_packing}, "
            f"mask={caps.mask!r}). Use one of {_packing_backends()} "
            "(attn_implementation=...), or declare a backend registered with "
            "transformers' AttentionInterface with forward_rewrite.attention.register",
        )

    sequence_ids = starts.cumsum(-1) - 1
    call_kwargs = dict(kwargs)
    if mask is not None:
        # All ones: the same forward as no mask, and a None mask lets every backend skip
        # its own all-ones check (a sync).
        bound["attention_mask"] = None
    if caps.packing_path == "varlen" and not given:
        call_kwargs.update(_varlen_metadata(starts, facts))
    packed = PackedBatch(
        batch,
        length,
        sequence_ids,
        caps.packing_path,
        "collator" if given else "position_ids",
        syncs,
    )
    return packed, caps, call_kwargs


def _facts(positions, starts, mask):
    """Every fact detection needs, read back in one host sync."""
    restarts = starts[:, 1:]
    steps = positions[:, 1:] - positions[:, :-1]
    clean = starts[:, 0].all() & ((steps == 1) | restarts).all()
    values = [
        restarts.any(),
        clean,
        starts.sum(),
        positions.max() + 1,
    ]
    if mask is not None:
        attended = mask.bool()
        values.append(attended.all())
        values.append((restarts & attended[:, 1:] & attended[:, :-1]).any())
    stacked = torch.stack([v.to(torch.int64) for v in values])
    read = stacked.tolist()  # the one host sync
    facts = {
        "restart": bool(read[0]),
        "clean": bool(read[1]),
        "sequences": int(read[2]),
        "longest": int(read[3]),
    }
    if mask is not None:
        facts["mask_all_ones"] = bool(read[4])
        facts["contradiction"] = bool(read[5])
    return facts


def _varlen_metadata(starts, facts):
    """cu_seq_lens over the flattened batch (int32) and the longest sequence, from the
    facts already read back: no further sync."""
    flat = starts.reshape(-1)
    sequence = flat.cumsum(0) - 1
    lengths = torch.zeros(facts["sequences"], dtype=torch.int32, device=flat.device)
    lengths.index_add_(0, sequence, torch.ones_like(sequence, dtype=torch.int32))
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": facts["longest"],
        "max_length_k": facts["longest"],
    }


# ----------------------------------------------------------------------------- wrap


def wrap_forward(forward, cls, static=None):
    """``forward`` (a model class's forward, patched or not) with the packing guarantee.
    The wrapper has ``forward``'s signature (``inspect.signature`` follows
    ``__wrapped__``) and attributes.

    ``static`` is the rewriter's packing verdict for ``cls`` (its ``passes.packing``
    report: ``{"verdict", "reason", "paths"}``; ARCHITECTURE.md, contract 6), None when
    there is none (a compiled cache's report): ``paths`` are the packing paths the class
    keeps sequences apart on, and a packed input on any other path (every path for a
    ``refused`` class) raises with the static reason instead of leaking silently."""
    if getattr(forward, "__forward_rewrite_packing__", False):
        return forward
    signature = inspect.signature(forward)
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return forward  # no transformers forward has *args; keep such a one as it is
    var_kw = next(
        (p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )
    hook_ok = _enable_masking_hook()

    @functools.wraps(forward)
    def packed_forward(self, *args, **kwargs):
        active = _ACTIVE.get()
        if active is not None:
            # The forward of a model inside a packed forward (a language model inside a
            # vision-language wrapper): the outer call already did the work.
            return forward(self, *args, **kwargs)
        if args:
            bound = dict(signature.bind_partial(self, *args, **kwargs).arguments)
            rest = bound.pop(var_kw, {}) if var_kw else {}
        else:
            bound, rest = _split(kwargs, signature)
        bound.pop(params[0].name, None)
        found = _detect(cls, self, bound, rest)
        if found is None:
            return forward(self, *args, **kwargs)
        packed, caps, call_kwargs = found
        crossing = [
            k for k in CROSS_ATTENTION_ARGS if {**rest, **bound}.get(k) is not None
        ]
        if crossing:
            raise _refuse(
                cls,
                "encoder-states-given",
                f"packed sequences with {crossing[0]}: the packed mask is for "
                "self-attention; run cross-attention batches unpacked",
            )
        if static is not None and packed.path not in static.get(
            "paths", (packed.path,)
        ):
            raise _refuse(
                cls,
                static.get("reason") or "backend-cannot-pack",
                f"packed sequences on {caps.name!r}: this class keeps them apart only "
                f"on the {static.get('paths')} path(s) (the rewriter's packing verdict)",
            )
        if packed.path == "mask" and not hook_ok:
            raise _refuse(
                cls,
                "masking-hook-unavailable",
                "packed sequences need transformers' masking utilities "
                "(masking_utils._preprocess_mask_arguments), which this transformers "
                "version does not have in the expected shape",
            )
        token = _ACTIVE.set(packed)
        try:
            out = forward(self, **bound, **call_kwargs)
        finally:
            _ACTIVE.reset(token)
        if packed.path == "mask" and packed.masks_built == 0:
            raise _refuse(
                cls,
                "mask-not-built",
                f"packed sequences on {caps.name!r}, but the model built no attention "
                "mask through transformers' masking utilities, so its layers did not "
                "see the sequence boundaries",
            )
        _record(cls, packed=packed, backend=caps.name)
        return out

    packed_forward.__forward_rewrite_packing__ = True
    return packed_forward


def _split(kwargs, signature):
    """(named parameters, the rest) of a keyword-only call."""
    params = signature.parameters
    bound, rest = {}, {}
    for k, v in kwargs.items():
        p = params.get(k)
        if p is not None and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            bound[k] = v
        else:
            rest[k] = v
    return bound, rest


# ---------------------------------------------------------------------------- audit

_stats_lock = threading.Lock()
_stats: dict = {}


def _record(cls, packed=None, backend=None, error=None):
    if torch.compiler.is_compiling():
        return
    key = (cls.__module__, cls.__qualname__)
    with _stats_lock:
        entry = _stats.setdefault(
            key,
            {
                "packed_forwards": 0,
                "backend": None,
                "path": None,
                "metadata": None,
                "masks_per_forward": None,
                "syncs_per_forward": None,
                "last_error": None,
            },
        )
        if error is not None:
            entry["last_error"] = error
            return
        entry["packed_forwards"] += 1
        entry["backend"] = backend
        entry["path"] = packed.path
        entry["metadata"] = packed.metadata
        entry["masks_per_forward"] = packed.masks_built
        entry["syncs_per_forward"] = packed.syncs


def report(cls):
    """What the runtime learned about packed forwards of ``cls`` (JSON-safe), or None when
    none ran."""
    with _stats_lock:
        entry = _stats.get((cls.__module__, cls.__qualname__))
        return dict(entry) if entry is not None else None


def reset():
    """Forget what ``report`` says (``uninstall()`` calls it)."""
    with _stats_lock:
        _stats.clear()
