"""Forward + backward of linear + cross-entropy in bf16, side by side, on the GPU machine.

    python gpu/bench.py [--shapes A,B,C] [--methods ours,ours-wrapper,stock,liger,unsloth,cce]

`ours` is the public op (`forward_rewrite.fused_lm_head_loss`), what users run; `ours-wrapper`
the benchmark's own thin autograd wrapper over the backend (to see what the public op adds).
                        [--variants] [--profile] [--ignored-demo] [--iters 10] [--out FILE]

Methods: ours (forward_rewrite's CUDA backend through a small autograd wrapper), stock
(transformers: bf16 logits, `.float()`, cross-entropy), Liger Kernel's fused linear
cross-entropy, unsloth-zoo's fused loss (`unsloth_fused_ce_loss`), Cut Cross-Entropy
(`linear_cross_entropy`, defaults), and the floor: the three bf16 GEMMs every exact method
runs (logits = h W^T, dh = dlogits W, dW = dlogits^T h). Median of CUDA-event timings after
warm-up, the methods interleaved in a random order each round, each after a 50 ms rest (see
`interleaved`); extra GiB = peak allocated minus (inputs + the gradients' own size); errors against
a float64 reference (loss: relative error of the scalar; dh, dW: relative norm error).
"""

import argparse
import importlib
import importlib.util
import itertools
import json
import os
import random
import statistics
import sys
import time
import types

import forward_rewrite
import torch
from common import ours, reference, rel
from forward_rewrite import _cuda, _native

SHAPES = {
    "A": (16384, 4096, 128256),
    "B": (8192, 2304, 256000),
    "C": (16384, 2048, 151936),
}
GIB = 1 << 30
# The op's scratch budget: 1 GiB, less room for the wrapper's small tensors (row loss,
# row order, counts: about 1 MiB at these shapes) and the allocator's 2 MiB rounding.
BUDGET = GIB - (16 << 20)


def stock(h, w, t):
    logits = h @ w.T
    return torch.nn.functional.cross_entropy(logits.float(), t, ignore_index=-100)


def load_liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t)


def load_cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t: linear_cross_entropy(h, w, t)


def load_unsloth():
    """unsloth-zoo's own fused loss, imported without running the package's __init__
    (which pulls trl, datasets, torchao, ...): stub the parent packages."""
    spec = importlib.util.find_spec("unsloth_zoo")
    if spec is None:
        raise ImportError("unsloth_zoo is not installed")
    root = next(iter(spec.submodule_search_locations))
    for name, sub in (
        ("unsloth_zoo", ""),
        ("unsloth_zoo.fused_losses", "fused_losses"),
        ("unsloth_zoo.temporary_patches", "temporary_patches"),
    ):
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = m
    mod = importlib.import_module("unsloth_zoo.fused_losses.cross_entropy_loss")

    def run(h, w, t):
        return mod.unsloth_fused_ce_loss(
            None, h[None], w, None, t[None], shift_labels=False
        )

    return run


def floor_fn(h, w, t, bufs):
    logits, d, dh, dw = bufs
    torch.mm(h, w.T, out=logits)
    torch.mm(d, w, out=dh)
    torch.mm(d.T, h, out=dw)


def timed(step, iters, warmup):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), times


def train_step(fn, h, w, t):
    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    return step


def measure_once(fn, h, w, t):
    """One forward + backward after a warm-up: extra peak GiB over inputs + gradients, and
    the outputs for the error columns."""
    train_step(fn, h, w, t)()
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fn(h, w, t)
    loss.backward()
    torch.cuda.synchronize()
    grads = h.numel() * h.element_size() + w.numel() * w.element_size()
    extra = (torch.cuda.max_memory_allocated() - base - grads) / GIB
    out = (loss.detach().float(), h.grad, w.grad)
    h.grad = w.grad = None
    return extra, out


def interleaved(steps, iters, warmup, rest_s=0.05):
    """Times every step `iters` times, in a fresh random order each round, each after a
    short rest. The H100's clocks follow its recent power draw: a method timed right after
    the floor's three GEMMs ran up to 13% slower than the same method timed after a lighter
    one, so a fixed order (or a method's own back-to-back loop) biases the comparison."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    torch.cuda.synchronize()
    order = list(steps)
    rng = random.Random(0)
    times = {name: [] for name in order}
    for _ in range(iters):
        rng.shuffle(order)
        for name in order:
            time.sleep(rest_s)
            a, b = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            a.record()
            steps[name]()
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b))
    return times


def profile_ours(h, w, t, tuning):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        ours(h, w, t, budget=BUDGET, tuning=tuning).backward()
        h.grad = w.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ours(h, w, t, budget=BUDGET, tuning=tuning).backward()
        torch.cuda.synchronize()
    h.grad = w.grad = None
    rows = {}
    spans = []
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        key = e.name[:60]
        n, tot = rows.get(key, (0, 0.0))
        rows[key] = (n + 1, tot + e.device_time_total / 1000.0)
        spans.append((e.time_range.start, e.time_range.end, key))
    spans.sort()
    gaps = sorted(
        ((b[0] - a[1], a[2], b[2]) for a, b in itertools.pairwise(spans)),
        reverse=True,
    )
    busy = sum(e - s for s, e, _ in spans) / 1000.0
    span = (spans[-1][1] - spans[0][0]) / 1000.0 if spans else 0.0
    print(f"    GPU busy {busy:.2f} ms of a {span:.2f} ms span; largest idle gaps:")
    for g, a, b in gaps[:4]:
        print(f"      {g / 1000.0:7.3f} ms between {a[:40]} and {b[:40]}")
    return sorted(rows.items(), key=lambda kv: -kv[1][1])


VARIANTS = {
    "ours, pipelined clusters": {"pipelined": True},
    "ours, one block per row": {"generic": True},
    "ours, dh_splits=2": {"dh_splits": 2},
    # the loss kernel's launch shape (defaults: 64 KB slices, 384 threads, three blocks per SM)
    "ours, loss blocks of 256": {"block": 256},
    "ours, loss blocks of 1024": {"block": 1024},
    "ours, 100 KB slices, blocks of 512 (the H100's)": {
        "slice_bytes": 100 * 1024,
        "block": 512,
    },
    "ours, 72 KB slices": {"slice_bytes": 72 * 1024},
    "ours, 200 KB slices": {"slice_bytes": 200 * 1024},
}


def ours_with(tuning):
    return lambda h, w, t: ours(h, w, t, budget=BUDGET, tuning=tuning)


def time_backend_only(h, w, t, args, skip_ignored=None):
    """The backend call alone (no autograd wrapper): what the wrapper adds is the rest."""
    hd_, wd_ = h.detach(), w.detach()
    gs = torch.full((1,), 1.0 / t.numel(), device="cuda")

    host = []

    def step():
        t0 = time.perf_counter()
        _cuda.fused_ce_tuned(
            hd_,
            wd_,
            None,
            t,
            ignore_index=-100,
            label_smoothing=0.0,
            scale=1.0,
            softcap=None,
            grad_scale=gs,
            compute_grads=True,
            chunk_budget_bytes=BUDGET,
            skip_ignored=skip_ignored,
        )
        host.append((time.perf_counter() - t0) * 1000)

    ms, times = timed(step, args.iters, args.warmup)
    return ms, times, statistics.median(host[args.warmup :])


def public_op(h, w, t):
    """What users and patched forwards call: `forward_rewrite.fused_lm_head_loss` (the
    custom op, its argument checks, the in-place scaling of the saved gradients), with the
    targets given as already-shifted labels."""
    return forward_rewrite.fused_lm_head_loss(h, w, None, shift_labels=t)


def load_methods(methods):
    loaders = {"liger": load_liger, "unsloth": load_unsloth, "cce": load_cce}
    forward_rewrite.set_chunk_budget_bytes(BUDGET)
    fns = {"ours": public_op, "ours-wrapper": ours_with(None), "stock": stock}
    for m in methods:
        if m in loaders:
            try:
                fns[m] = loaders[m]()
            except Exception as e:  # noqa: BLE001  (a competitor that cannot load is reported)
                print(f"{m}: cannot load ({type(e).__name__}: {e})", flush=True)
    return [(m, fns[m]) for m in methods if m in fns]


def make_inputs(n, hd, v, gen):
    h = (
        torch.randn(n, hd, device="cuda", generator=gen)
        .to(torch.bfloat16)
        .requires_grad_(True)
    )
    w = (torch.randn(v, hd, device="cuda", generator=gen) * (2.0 / hd**0.5)).to(
        torch.bfloat16
    )
    w.requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    return h, w, t


def float64_reference(h, w, t):
    rl, rdh, rdw, _ = reference(
        h.detach(),
        w.detach(),
        None,
        t,
        ignore_index=-100,
        smoothing=0.0,
        scale=1.0,
        softcap=None,
        grad_scale=torch.full((1,), 1.0 / t.numel(), device="cuda"),
    )
    return rl.mean(), rdh, rdw


def bench_shape(key, todo, gen, args):
    n, hd, v = SHAPES[key]
    shape = f"{key} ({n}, {hd}, {v})"
    h, w, t = make_inputs(n, hd, v, gen)
    ref = None
    if not args.no_ref:
        t0 = time.perf_counter()
        ref = float64_reference(h, w, t)
        print(f"[{key}] reference in {time.perf_counter() - t0:.1f}s", flush=True)
    rows, steps = {}, {}
    for name, fn in todo:
        if name == "floor":
            continue
        try:
            extra, out = measure_once(fn, h, w, t)
        except Exception as e:  # noqa: BLE001  (a method that fails is reported, the rest still run)
            print(f"[{key}] {name}: FAILED {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
            continue
        row = {"shape": shape, "method": name, "extra_gib": extra}
        if ref is not None:
            row["loss_err"] = abs(out[0].double().item() - ref[0].item()) / abs(
                ref[0].item()
            )
            row["dh_err"] = rel(out[1], ref[1])
            row["dw_err"] = rel(out[2], ref[2])
        del out
        torch.cuda.empty_cache()
        rows[name] = row
        steps[name] = train_step(fn, h, w, t)
    if any(name == "floor" for name, _ in todo):
        bufs = (
            torch.empty(n, v, device="cuda", dtype=torch.bfloat16),
            torch.randn(n, v, device="cuda", generator=gen).to(
                torch.bfloat16
            ),  # not zeros
            torch.empty(n, hd, device="cuda", dtype=torch.bfloat16),
            torch.empty(v, hd, device="cuda", dtype=torch.bfloat16),
        )
        hd_, wd_ = h.detach(), w.detach()
        steps = {"floor": lambda: floor_fn(hd_, wd_, t, bufs), **steps}
        rows = {"floor": {"shape": shape, "method": "floor"}, **rows}
    times = interleaved(steps, args.iters, args.warmup)
    floor_ms = statistics.median(times["floor"]) if "floor" in times else None
    results = []
    for name, row in rows.items():
        row["times"] = times[name]
        row["ms"] = statistics.median(times[name])
        if floor_ms and name != "floor":
            row["x_floor"] = row["ms"] / floor_ms
        results.append(row)
        print(
            f"[{key}] {name}: {row['ms']:.2f} ms"
            + (f" ({row['x_floor']:.3f}x floor)" if "x_floor" in row else "")
            + (f", extra {row['extra_gib']:.2f} GiB" if "extra_gib" in row else "")
            + (
                f", loss {row['loss_err']:.1e} dh {row['dh_err']:.2e} dW {row['dw_err']:.2e}"
                if "loss_err" in row
                else ""
            ),
            flush=True,
        )
    steps.clear()
    torch.cuda.empty_cache()
    if args.variants:
        for label, skip in (
            ("ours backend call only", None),
            ("ours backend call, no sync", False),
        ):
            ms, times, host_ms = time_backend_only(h, w, t, args, skip)
            results.append(
                {
                    "shape": shape,
                    "method": label,
                    "ms": ms,
                    "times": times,
                    "host_ms": host_ms,
                }
            )
            if floor_ms:
                results[-1]["x_floor"] = ms / floor_ms
            print(
                f"[{key}] {label}: {ms:.2f} ms (host enqueue {host_ms:.2f} ms)",
                flush=True,
            )
    if args.profile:
        try:
            print(f"[{key}] per-kernel device ms of one call of ours:")
            for k, (cnt, tot) in profile_ours(h, w, t, None)[:14]:
                print(f"    {tot:8.2f} ms  x{cnt:<4d} {k}")
            if args.variants:  # the loss kernel under each tuning variant
                for name, tuning in VARIANTS.items():
                    for k, (cnt, tot) in profile_ours(h, w, t, tuning):
                        if k.startswith("ce_rows"):
                            print(f"    {tot:8.2f} ms  x{cnt:<4d} {k}  ({name})")
        except Exception as e:  # noqa: BLE001  (the profile is optional)
            print(f"[{key}] profile failed: {type(e).__name__}: {e}")
    return results


def cell(row, key, fmt):
    return fmt.format(row[key]) if key in row else ""


def print_table(results):
    print(
        "\n| shape (N, H, V) | method | ms | x floor | extra GiB | loss err | dh err | dW err |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['shape']} | {r['method']} | {r['ms']:.1f} | {cell(r, 'x_floor', '{:.2f}')} | "
            f"{cell(r, 'extra_gib', '{:.2f}')} | {cell(r, 'loss_err', '{:.1e}')} | "
            f"{cell(r, 'dh_err', '{:.1e}')} | {cell(r, 'dw_err', '{:.1e}')} |"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="A,B,C")
    ap.add_argument("--methods", default="floor,ours,stock,liger,unsloth,cce")
    ap.add_argument(
        "--variants", action="store_true", help="time tuning variants of ours"
    )
    ap.add_argument("--profile", action="store_true", help="per-kernel times of ours")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-ref", action="store_true")
    ap.add_argument(
        "--ignored-demo",
        action="store_true",
        help="backend call with half the labels ignored: skipped (one host sync) or not",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = dict(_native.cuda_device_info(torch.cuda.current_device()))
    print(
        "device:",
        torch.cuda.get_device_name(),
        info,
        "torch",
        torch.__version__,
        flush=True,
    )
    methods = args.methods.split(",")
    todo = [("floor", None)] if "floor" in methods else []
    todo += load_methods(methods)
    if args.variants:
        todo += [(name, ours_with(tu)) for name, tu in VARIANTS.items()]
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    results = []
    for key in args.shapes.split(","):
        results += bench_shape(key, todo, gen, args)
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print_table(results)
    if args.ignored_demo:
        for key in args.shapes.split(","):
            n, hd, v = SHAPES[key]
            h, w, t = make_inputs(n, hd, v, gen)
            t[::2] = -100
            for label, skip in (
                ("skipped (1 host sync)", None),
                ("computed (no sync)", False),
            ):
                ms, _, _ = time_backend_only(h, w, t, args, skip)
                print(
                    f"[{key}] half the labels ignored, {label}: {ms:.2f} ms", flush=True
                )
            del h, w, t
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
