"""Packed sequences on the GPU (issue 9): isolation on flex_attention, host syncs per
forward, and the time of a packed training step, stock against patched.

1. Isolation (float32): tiny Llama, Mistral (sliding window 4) and Gemma 2 (attention
   soft-capping) on flex_attention, two packed rows, ``use_cache`` at its default: each
   sequence's logits (eval and train) equal the sequence alone, the packed loss and
   gradients equal the sums of the separate runs (``num_items_in_batch`` fixed), and
   changing one sequence's tokens changes the others' logits by exactly 0 (crosstalk).
   Stock is shown leaking.
2. Host syncs per forward (``torch.cuda.set_sync_debug_mode("warn")``, one warning per
   synchronizing call) of a 32-layer Llama (random weights, hidden 256), bfloat16, one
   packed row of 8192 tokens, no labels, ``use_cache`` at its default: stock and patched,
   on sdpa, flex_attention, the varlen test backend (``varlen_test``: transformers' flash
   decision logic - collator metadata, else ``prepare_fa_kwargs_from_position_ids`` in
   every layer - with SDPA on a block-diagonal mask as its kernel, sync-free given the
   metadata) and flash_attention_2/3 when installed; and patched with the metadata a
   collator passes (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).
   Targets: patched at most 1 per forward, 0 with the collator's metadata.
3. Forward + backward time of that row with labels (CUDA events, median of ITERS after
   WARMUP): stock (``use_cache`` default: leaks), stock ``use_cache=False`` (isolated on
   mask backends), patched, and patched inside ``keep_logits()`` (packing without the
   fused loss).

Prints the tables; exits 1 when an isolation or sync target fails.

    python3 gpu/packing.py           (on the GPU machine)
    python3 gpu/packing.py --smoke   (anywhere: CPU, 2 layers, 256 tokens, no sync counts)
"""

import torch  # noqa: I001  (first: cudarc loads the CUDA libraries torch brought in)

import importlib.util
import statistics
import sys
import warnings

import forward_rewrite
import transformers
from forward_rewrite import attention
from torch.nn import functional as F
from transformers import masking_utils, modeling_flash_attention_utils as fa_utils

SMOKE = "--smoke" in sys.argv
DEVICE = "cpu" if SMOKE else "cuda"
LAYERS = 2 if SMOKE else 32
TOKENS = 256 if SMOKE else 8192
ITERS, WARMUP = (2, 1) if SMOKE else (10, 3)
VARLEN = "varlen_test"
#: flex_attention has no backward on the CPU (and compiles slowly there): smoke uses sdpa.
ISOLATION_BACKEND = "sdpa" if SMOKE else "flex_attention"
#: Tiny isolation models (flex_attention wants head dimensions of at least 16).
TINY = {
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


# ------------------------------------------------------------- varlen test backend


def varlen_test_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    position_ids=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """transformers' flash path (``_flash_attention_forward``) with SDPA as the kernel:
    the collator's / forward's metadata when given, else metadata recomputed from
    packed ``position_ids`` (one row) in this layer, else each row is one sequence."""
    b, h, length, d = query.shape
    if (
        cu_seq_lens_q is None
        and position_ids is not None
        and fa_utils._is_packed_sequence(position_ids, b)
    ):
        (cu_seq_lens_q, _), (max_length_q, _) = (
            fa_utils.prepare_fa_kwargs_from_position_ids(position_ids)
        )
    if isinstance(max_length_q, torch.Tensor):
        max_length_q = int(max_length_q)  # a flash kernel takes an int
    total = b * length
    index = torch.arange(total, device=query.device)
    if cu_seq_lens_q is None:
        sequence = index // length
    else:
        sequence = torch.searchsorted(cu_seq_lens_q[1:].long(), index, right=True)
    allowed = (sequence[:, None] == sequence[None, :]) & (
        index[None, :] <= index[:, None]
    )
    if sliding_window is not None:
        allowed &= (index[:, None] - index[None, :]) < sliding_window
    q, k, v = (
        x.transpose(0, 1).reshape(1, x.shape[1], total, -1) for x in (query, key, value)
    )
    scale = scaling if scaling is not None else d**-0.5
    if softcap is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True
        )
    else:
        groups = h // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = softcap * torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = scores.softmax(-1) @ v
    return out.reshape(h, b, length, -1).permute(1, 2, 0, 3), None


def register_varlen_test():
    transformers.AttentionInterface.register(VARLEN, varlen_test_attention)
    masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register(
        VARLEN, masking_utils.flash_attention_mask
    )
    attention.register(VARLEN, like="flash_attention_2", needs_dtype_cast=False)


# ------------------------------------------------------------------------ isolation


def packed(vocab, lengths, generator=None):
    g = generator or torch.Generator().manual_seed(1)
    width = sum(lengths[0])
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    labels = ids.clone()
    labels[pos == 0] = -100
    segments = []
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            segments.append((r, start, n))
            start += n
    return ids.to(DEVICE), pos.to(DEVICE), labels.to(DEVICE), segments


def rel(a, b):
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else 0.0


def isolation(model):
    """Worst relative error of packed against alone: logits (eval, train), loss, grads."""
    ids, pos, labels, segments = packed(model.config.vocab_size, ((5, 7, 4), (6, 10)))
    errs = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        with torch.no_grad():
            out = model(input_ids=ids, position_ids=pos).logits
            errs[mode] = max(
                rel(
                    out[r, s : s + n],
                    model(input_ids=ids[r : r + 1, s : s + n]).logits[0],
                )
                for r, s, n in segments
            )
    model.train()
    n_items = int((labels[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    loss = model(
        input_ids=ids, position_ids=pos, labels=labels, num_items_in_batch=n_items
    ).loss
    loss.backward()
    grads = {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }
    total, summed = 0.0, {}
    for r, s, n in segments:
        model.zero_grad(set_to_none=True)
        seg = ids[r : r + 1, s : s + n]
        seg_loss = model(input_ids=seg, labels=seg, num_items_in_batch=n_items).loss
        seg_loss.backward()
        total += seg_loss.item()
        for name, p in model.named_parameters():
            if p.grad is not None:
                summed[name] = summed.get(name, 0) + p.grad
    errs["loss"] = abs(loss.item() - total) / abs(total)
    errs["crosstalk"] = crosstalk(model, ids, pos, segments)
    top = max(g.abs().max().item() for g in summed.values())
    errs["grad"] = max(
        (grads.get(k, torch.zeros_like(g)) - g).abs().max().item()
        / max(g.abs().max().item(), 1e-3 * top)
        for k, g in summed.items()
    )
    return errs


def crosstalk(model, ids, pos, segments):
    """Largest change of the other sequences' logits (eval) when only the first sequence
    of each row changes: exactly 0 when they are apart."""
    model.eval()
    changed = ids.clone()
    touched = torch.zeros_like(ids, dtype=torch.bool)
    firsts = {}
    for r, s, n in segments:
        firsts.setdefault(r, (s, n))
    for r, (s, n) in firsts.items():
        changed[r, s : s + n] = (ids[r, s : s + n] + 1) % model.config.vocab_size
        touched[r, s : s + n] = True
    with torch.no_grad():
        base = model(input_ids=ids, position_ids=pos).logits
        other = model(input_ids=changed, position_ids=pos).logits
    return (other - base).abs().amax(-1)[~touched].max().item()


def tiny(name, backend):
    extra = {
        "LlamaForCausalLM": ("LlamaConfig", {}),
        "MistralForCausalLM": ("MistralConfig", {"sliding_window": 4}),
        "Gemma2ForCausalLM": (
            "Gemma2Config",
            {"sliding_window": 4, "attn_logit_softcapping": 5.0},
        ),
    }[name]
    config = getattr(transformers, extra[0])(**TINY, **extra[1])
    torch.manual_seed(0)
    cls = getattr(transformers, name)
    return cls._from_config(config, attn_implementation=backend).to(DEVICE).float()


def flex_isolation(failures):
    print(
        f"\n1. Isolation on {ISOLATION_BACKEND} (float32, two packed rows, "
        "use_cache default)\n"
    )
    print(
        "| model | stock: logits err, crosstalk | patched: logits err (eval / train) "
        "| loss err | grad err | crosstalk |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    tol = 1e-4
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM"):
        forward_rewrite.uninstall()
        try:
            # transformers has no sdpa for Gemma 2 (its soft-cap): eager in the smoke run
            smoke_eager = SMOKE and name == "Gemma2ForCausalLM"
            model = tiny(name, "eager" if smoke_eager else ISOLATION_BACKEND)
            stock = isolation(model)
            forward_rewrite.patch_model(model)
            errs = isolation(model)
        except Exception as exc:  # noqa: BLE001 - report, fail
            failures.append(f"isolation {name}: {type(exc).__name__}: {exc}")
            print(f"| {name} | error: {type(exc).__name__}: {str(exc)[:100]} | | | | |")
            continue
        finally:
            forward_rewrite.uninstall()
        print(
            f"| {name} | {stock['eval']:.1e}, {stock['crosstalk']:.1e} "
            f"| {errs['eval']:.1e} / {errs['train']:.1e} "
            f"| {errs['loss']:.1e} | {errs['grad']:.1e} | {errs['crosstalk']:.1e} |"
        )
        if (
            max(errs["eval"], errs["train"], errs["loss"]) > tol
            or errs["grad"] > 1e-3
            or errs["crosstalk"] != 0.0
        ):
            failures.append(f"isolation {name}: {errs}")


# ------------------------------------------------------------------ syncs and time


def big_model(backend):
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=TOKENS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation=backend
    )
    return model.to(DEVICE, torch.float32 if SMOKE else torch.bfloat16).train()


def row(vocab):
    g = torch.Generator().manual_seed(11)
    lengths = []
    while sum(lengths) < TOKENS:
        lengths.append(int(torch.randint(TOKENS // 64, TOKENS // 4, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - TOKENS
    lengths = [n for n in lengths if n > 0]
    ids, pos, labels, _ = packed(vocab, (tuple(lengths),), g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    collator = {
        "cu_seq_lens_q": cu.to(DEVICE),
        "cu_seq_lens_k": cu.to(DEVICE),
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    return ids, pos, labels, collator, len(lengths)


def count_syncs(fn):
    if SMOKE:
        fn()
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def median_ms(fn):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(ITERS):
        if SMOKE:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def backends():
    found = ["sdpa", VARLEN] if SMOKE else ["sdpa", "flex_attention", VARLEN]
    for fa, module in (
        ("flash_attention_2", "flash_attn"),
        ("flash_attention_3", "flash_attn_interface"),
    ):
        if not SMOKE and importlib.util.find_spec(module) is not None:
            found.append(fa)
    return found


def measure(model, backend):
    """Sync counts and step times of one backend's model, stock then patched."""
    ids, pos, labels, collator, n_seq = row(model.config.vocab_size)

    def forward(**extra):
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, **extra)

    def step(**extra):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, position_ids=pos, labels=labels, **extra).loss.backward()

    result = {"backend": backend, "sequences": n_seq}
    forward()  # warm up (compilation, kernel caches) before counting
    result["stock_syncs"] = count_syncs(forward)
    result["stock_ms"] = median_ms(step)
    forward(use_cache=False)
    result["stock_nocache_syncs"] = count_syncs(lambda: forward(use_cache=False))
    result["stock_nocache_ms"] = median_ms(lambda: step(use_cache=False))
    forward_rewrite.patch_model(model)
    forward()
    result["patched_syncs"] = count_syncs(forward)
    result["collator_syncs"] = count_syncs(lambda: forward(**collator))
    result["patched_ms"] = median_ms(step)
    with forward_rewrite.keep_logits():
        result["keep_logits_ms"] = median_ms(step)
    return result


def syncs_and_time(failures):
    rows = []
    for backend in backends():
        forward_rewrite.uninstall()
        try:
            result = measure(big_model(backend), backend)
        except Exception as exc:  # noqa: BLE001 - report, fail
            failures.append(f"{backend}: {type(exc).__name__}: {exc}")
            rows.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"})
            continue
        finally:
            forward_rewrite.uninstall()
        if not SMOKE:
            if result["patched_syncs"] > 1:
                failures.append(
                    f"{backend}: {result['patched_syncs']} syncs per forward"
                )
            if result["collator_syncs"] != 0:
                failures.append(
                    f"{backend}: {result['collator_syncs']} syncs with the "
                    "collator's metadata"
                )
        rows.append(result)
    return rows


def _n(value):
    return "n/a" if value is None else str(value)


def print_syncs(rows):
    print(
        f"\n2. Host syncs per forward: Llama {LAYERS} layers, hidden 256, "
        f"{'float32' if SMOKE else 'bfloat16'}, one packed row of {TOKENS} tokens, "
        "no labels\n"
    )
    print(
        "| backend | sequences | stock (use_cache default) | stock use_cache=False "
        "| patched | patched, collator metadata |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | error: {r['error'][:160]} | | | | |")
            continue
        print(
            f"| {r['backend']} | {r['sequences']} | {_n(r['stock_syncs'])} "
            f"| {_n(r['stock_nocache_syncs'])} | {_n(r['patched_syncs'])} "
            f"| {_n(r['collator_syncs'])} |"
        )
    print(
        f"\n3. Forward + backward with labels, ms (median of {ITERS} after {WARMUP} "
        "warm-up)\n"
    )
    print(
        "| backend | stock (leaks) | stock use_cache=False | patched "
        "| patched, keep_logits() |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            continue
        print(
            f"| {r['backend']} | {r['stock_ms']:.1f} | {r['stock_nocache_ms']:.1f} "
            f"| {r['patched_ms']:.1f} | {r['keep_logits_ms']:.1f} |"
        )


def main():
    if not SMOKE:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    device = "CPU (smoke)" if SMOKE else torch.cuda.get_device_name()
    print(
        f"device: {device}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, forward_rewrite {forward_rewrite.__version__}"
    )
    register_varlen_test()
    failures = []
    flex_isolation(failures)
    print_syncs(syncs_and_time(failures))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nall packing checks passed")


if __name__ == "__main__":
    main()
