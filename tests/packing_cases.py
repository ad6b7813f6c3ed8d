"""Packed-sequence isolation on tiny models (issue 9), shared by ``tests/test_packing.py``
and ``bench/packing_sweep.py``.

A class is built tiny from its own config class (``forward_rewrite.verify.tiny_config``) with a small
sliding window / attention chunk (so windows matter inside the short sequences), every
dropout off and no router aux loss (it depends on the batch's composition), on a given
attention backend. Two rows of packed sequences (``LENGTHS``), ``position_ids`` restarting
at 0 for each sequence, no attention mask, ``use_cache`` left at its default, and labels as
``DataCollatorWithFlattening`` makes them (-100 on the first token of each sequence, so no
loss term crosses a boundary), are compared with each sequence run alone:

* logits, without labels, in eval and in train mode: each sequence's slice of the packed
  logits equals its logits alone;
* loss and gradients, with labels, in train mode (the fused path when patched):
  ``num_items_in_batch`` is the packed batch's count of predicted tokens in every run, so
  the packed loss is the sum of the separate losses and its gradients the sum of theirs;
* crosstalk (``crosstalk``): changing the tokens of other sequences changes a sequence's
  logits by exactly 0, which tells a leak from rounding.
"""

import contextlib
import warnings

import torch
import transformers
from forward_rewrite.verify import ATTEMPTS, MAX_PARAMS, memory_cap, tiny_config
from torch import nn

#: Two packed rows of 16 tokens: (lengths of the sequences in row 0, in row 1).
LENGTHS = ((5, 7, 4), (6, 10))
#: Sliding window and attention chunk of the tiny models (shorter than most sequences).
WINDOW = 4
LOGITS_TOL = 1e-5
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
GRAD_FLOOR = 1e-3
MEMORY_CAP_BYTES = 8 << 30


class Skip(Exception):
    """The tiny model cannot be built or run stock on this backend."""


def _no_dropout(config):
    for sub in [config, *_sub_configs(config)]:
        for name, value in list(vars(sub).items()):
            if isinstance(value, float) and (
                "dropout" in name or "pdrop" in name or name == "router_jitter_noise"
            ):
                setattr(sub, name, 0.0)
        if hasattr(sub, "output_router_logits"):
            sub.output_router_logits = False


def _sub_configs(config):
    return [
        v for v in vars(config).values() if isinstance(v, transformers.PretrainedConfig)
    ]


def build(cls, attn_implementation, *, seed=0):
    """A tiny ``cls`` on ``attn_implementation`` in float32; raises Skip when it cannot
    be built."""
    first = None
    for wider, hand_made in ATTEMPTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = tiny_config(
                    cls.config_class(),
                    {**wider, "sliding_window": WINDOW, "attention_chunk_size": WINDOW},
                    model_name=cls.__name__,
                    hand_made=hand_made,
                )
                _no_dropout(config)
                config.tie_word_embeddings = False
                if attn_implementation == "sdpa":
                    # sdpa refuses attention soft-capping (transformers raises); the
                    # soft-cap is checked on eager and flex_attention
                    for sub in [config, *_sub_configs(config)]:
                        if getattr(sub, "attn_logit_softcapping", None) is not None:
                            sub.attn_logit_softcapping = None
                with torch.device("meta"):
                    params = sum(p.numel() for p in cls(config).parameters())
                if params > MAX_PARAMS:
                    raise Skip(f"not shrunk ({params} parameters)")
                torch.manual_seed(seed)
                model = cls._from_config(
                    config, attn_implementation=attn_implementation
                )
            model = model.float()
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
            return model
        except Skip:
            raise
        except Exception as exc:  # noqa: BLE001 - a config the shrink broke: try wider
            first = first or exc
    text = " ".join(str(first).split())[:160]
    raise Skip(f"{type(first).__name__}: {text}")


def packed_batch(vocab, *, seed=1, lengths=LENGTHS):
    """input_ids, position_ids, labels of the packed rows, and each sequence's
    (row, start, length)."""
    g = torch.Generator().manual_seed(seed)
    width = sum(lengths[0])
    assert all(sum(row) == width for row in lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    positions = torch.cat(
        [torch.cat([torch.arange(n) for n in row])[None] for row in lengths]
    )
    labels = ids.clone()
    labels[positions == 0] = -100
    segments = []
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            segments.append((r, start, n))
            start += n
    return {"input_ids": ids, "position_ids": positions, "labels": labels}, segments


def _vocab(model):
    return model.config.get_text_config().vocab_size


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), out.logits


def rel(got, want):
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / max(scale, 1e-30) if scale > 0 else diff


def isolation(model, *, seed=1, lengths=LENGTHS, with_labels=True):
    """Errors of the packed forward against each sequence alone (see the module
    docstring): ``logits_eval``, ``logits_train`` (max over sequences of the relative
    error), ``loss``, ``grad`` (worst parameter, GRAD_FLOOR scale), ``fused`` (the
    packed training step took the fused path)."""
    inputs, segments = packed_batch(_vocab(model), seed=seed, lengths=lengths)
    ids, pos, labels = inputs["input_ids"], inputs["position_ids"], inputs["labels"]
    out = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        torch.manual_seed(0)
        packed = _logits(model, input_ids=ids, position_ids=pos)
        worst = 0.0
        for r, s, n in segments:
            alone = _logits(model, input_ids=ids[r : r + 1, s : s + n])
            worst = max(worst, rel(packed[r, s : s + n], alone[0]))
        out[f"logits_{mode}"] = worst
    if not with_labels:
        return out
    model.train()
    n_items = int((labels[:, 1:] != -100).sum())
    loss, logits = _loss_and_grads(model, {**inputs, "num_items_in_batch": n_items})
    grads = _grads(model)
    out["fused"] = logits is None
    total = torch.zeros((), dtype=torch.float64)
    summed = {}
    for r, s, n in segments:
        seg_loss, _ = _loss_and_grads(
            model,
            {
                "input_ids": ids[r : r + 1, s : s + n],
                "labels": ids[r : r + 1, s : s + n],
                "num_items_in_batch": n_items,
            },
        )
        total += seg_loss.double()
        for name, g in _grads(model).items():
            summed[name] = summed[name] + g if name in summed else g
    out["loss"] = rel(loss, total)
    top = max((g.abs().max().item() for g in summed.values()), default=0.0)
    worst = 0.0
    for name, want in summed.items():
        got = grads.get(name, torch.zeros_like(want))
        diff = (got.double() - want.double()).abs().max().item()
        worst = max(worst, diff / max(want.abs().max().item(), GRAD_FLOOR * top, 1e-30))
    out["grad"] = worst
    return out


#: Crosstalk at or under this is rounding, not a leak. Dense layers give exactly 0 (a masked
#: score contributes an exact 0); MoE experts batch the tokens routed to them, so another
#: sequence's tokens change the matmul's shape and its rounding (1.5e-8 on Qwen3-MoE). A leak
#: moves logits by 1e-2 and more (the stock leak test asserts > 1e-2).
ROUNDING = 1e-6


def crosstalk(model, *, seed=1, lengths=LENGTHS):
    """The largest change of a sequence's logits (eval mode) when only the tokens of
    other sequences of its row change: the first sequence of each row (are later ones
    affected?), then the last (are earlier ones?). Exactly 0 when the sequences are apart
    in a dense model (a masked score contributes an exact 0 whatever the token behind it),
    at most ``ROUNDING`` with MoE experts, so this tells a leak from the rounding
    differences between the packed and the alone runs."""
    inputs, segments = packed_batch(_vocab(model), seed=seed, lengths=lengths)
    ids, pos = inputs["input_ids"], inputs["position_ids"]
    model.eval()
    base = _logits(model, input_ids=ids, position_ids=pos)
    g = torch.Generator().manual_seed(seed + 100)
    worst = 0.0
    for pick in (0, -1):
        changed = ids.clone()
        touched = torch.zeros_like(ids, dtype=torch.bool)
        for r, row in enumerate(lengths):
            r_segments = [(s, n) for rr, s, n in segments if rr == r]
            s, n = r_segments[pick]
            changed[r, s : s + n] = torch.randint(3, _vocab(model), (n,), generator=g)
            touched[r, s : s + n] = True
        other = _logits(model, input_ids=changed, position_ids=pos)
        diff = (other - base).abs().amax(-1)[~touched]
        worst = max(worst, diff.max().item())
    return worst


def _grads(model):
    return {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def problems(errors):
    """What exceeds the tolerances in an ``isolation`` result."""
    found = []
    for mode in ("eval", "train"):
        if not errors[f"logits_{mode}"] <= LOGITS_TOL:
            found.append(f"logits ({mode}) {errors[f'logits_{mode}']:.1e}")
    if "loss" in errors:
        if not errors["loss"] <= LOSS_TOL:
            found.append(f"loss {errors['loss']:.1e}")
        if not errors["grad"] <= GRAD_TOL:
            found.append(f"gradients {errors['grad']:.1e}")
    return found


@contextlib.contextmanager
def capped():
    with memory_cap(MEMORY_CAP_BYTES):
        yield
