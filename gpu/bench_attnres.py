"""Speed of the AttnRes mix on the GPU machine: the fused kernel (forward_rewrite::attnres_mix)
against torch eager and torch.compile of the same formula (attnres.mix_reference), forward and
forward + backward, with the HBM bytes floor.

    python3 gpu/bench_attnres.py [--json FILE] [--shapes 9:16384:4096,...] [--impls fused,compile]
    (gpu/run.sh bench_attnres stages it; defaults: the four shapes below, all three impls)

Floor: the bytes a mix must move once: forward n sources read + 1 output written; backward
n sources + the output gradient read + n source gradients written (u and the du partials are
negligible), at the copy bandwidth measured here (a device-to-device copy of 1 GiB). The issue's
target: within 1.3x of the floor for n = 9, 16k tokens, hidden 4096, bf16.

Two times per call: `ms`, the wall time of back-to-back calls (CUDA events around 20), which
includes the host's time to issue a call whenever that exceeds the GPU's (the fused backward
is two custom ops and autograd's bookkeeping: about 1 ms of host time, more than its kernel);
and `device ms`, the GPU's busy time per call (every kernel's time, from torch.profiler over 5
calls): what a call costs inside a training step, where the host runs ahead of the GPU.
"""

import torch  # noqa: I001

import argparse
import json

from forward_rewrite import _attnres_op, attnres
from step_bench import device_time

SHAPES = [(9, 16384, 4096), (5, 16384, 4096), (3, 8192, 2048), (17, 4096, 4096)]


def copy_bandwidth():
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = (
        torch.cuda.Event(enable_timing=True),
        torch.cuda.Event(enable_timing=True),
    )
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 2 * 10 / (start.elapsed_time(end) / 1e3)


def time_ms(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    start, end = (
        torch.cuda.Event(enable_timing=True),
        torch.cuda.Event(enable_timing=True),
    )
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def device_ms(fn, iters=5):
    """GPU busy time per call of ``fn``: the union of its kernels' intervals over ``iters``
    calls (torch.profiler; step_bench.device_time), divided by ``iters``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    busy = device_time(
        [
            (e.time_range.start, e.time_range.end, e.name)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
    )
    return busy["busy_ms"] / iters if busy else 0.0


def bench_shape(n, tokens, hidden, bw, compiled_ref, only):
    rows = []
    dtype = torch.bfloat16
    sources = [
        torch.randn(tokens, hidden, device="cuda", dtype=dtype).requires_grad_(True)
        for _ in range(n)
    ]
    q = (torch.randn(hidden, device="cuda") * 0.02).requires_grad_(True)
    g = torch.ones(hidden, device="cuda").requires_grad_(True)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    elem = tokens * hidden * 2
    floors = {
        "fwd": (n + 1) * elem / bw * 1e3,
        "bwd": (2 * n + 1) * elem / bw * 1e3,
        "fwd+bwd": ((n + 1) + (2 * n + 1)) * elem / bw * 1e3,
    }
    impls = {
        "fused": lambda: _attnres_op.mix(
            sources, q, g, eps=1e-6, scale=float(n), out_dtype=dtype
        ),
        "eager": lambda: attnres.mix_reference(sources, q, g, eps=1e-6, scale=float(n)),
        "compile": lambda: compiled_ref(sources, q, g, eps=1e-6, scale=float(n)),
    }
    for name, fn in impls.items():
        if name not in only:
            continue
        with torch.no_grad():
            fwd = time_ms(fn)
            fwd_dev = device_ms(fn)

        def step(fn=fn):
            # The gradients as the op hands them on (autograd.grad): `backward` would also
            # add them into the leaves' .grad from the previous iteration, a read of 2n and a
            # write of n rows per token (0.83 ms at n = 9, 16384 x 4096) that is no part of the
            # mix: in a model the sources are activations, whose gradients flow on.
            out = fn()
            torch.autograd.grad(out, [*sources, q, g], grad)

        both = time_ms(step)
        both_dev = device_ms(step)
        row = {
            "n": n,
            "tokens": tokens,
            "hidden": hidden,
            "impl": name,
            "fwd_ms": fwd,
            "fwd_floor_ms": floors["fwd"],
            "fwd_x_floor": fwd / floors["fwd"],
            "fwdbwd_ms": both,
            "fwdbwd_floor_ms": floors["fwd+bwd"],
            "fwdbwd_x_floor": both / floors["fwd+bwd"],
            # the backward alone, as the difference of the two timings
            "bwd_ms": both - fwd,
            "bwd_x_floor": (both - fwd) / floors["bwd"],
            "fwd_device_ms": fwd_dev,
            "fwd_device_x_floor": fwd_dev / floors["fwd"],
            "fwdbwd_device_ms": both_dev,
            "fwdbwd_device_x_floor": both_dev / floors["fwd+bwd"],
            "bwd_device_ms": both_dev - fwd_dev,
            "bwd_device_x_floor": (both_dev - fwd_dev) / floors["bwd"],
        }
        rows.append(row)
        print(
            f"n={n:2d} T={tokens:6d} d={hidden:5d} {name:8s} fwd {fwd:7.3f} ms ({row['fwd_x_floor']:.2f}x floor)"
            f"  fwd+bwd {both:7.3f} ms ({row['fwdbwd_x_floor']:.2f}x floor)"
            f"  bwd {row['bwd_ms']:7.3f} ms ({row['bwd_x_floor']:.2f}x floor)"
            f"\n{'':22s}device  fwd {fwd_dev:7.3f} ms ({row['fwd_device_x_floor']:.2f}x floor)"
            f"  fwd+bwd {both_dev:7.3f} ms ({row['fwdbwd_device_x_floor']:.2f}x floor)"
            f"  bwd {both_dev - fwd_dev:7.3f} ms ({row['bwd_device_x_floor']:.2f}x floor)",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument(
        "--shapes",
        type=lambda text: [tuple(map(int, s.split(":"))) for s in text.split(",")],
        default=SHAPES,
        help="sources:tokens:hidden, comma-separated (default: %(default)s)",
    )
    ap.add_argument(
        "--impls",
        type=lambda text: text.split(","),
        default=["fused", "eager", "compile"],
        help="which of fused, eager, compile to time (default: all)",
    )
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    compiled_ref = torch.compile(attnres.mix_reference)
    rows = []
    for n, tokens, hidden in args.shapes:
        rows.extend(bench_shape(n, tokens, hidden, bw, compiled_ref, args.impls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
