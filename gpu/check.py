"""Correctness of the CUDA backend against a float64 reference, on the GPU machine.

    python gpu/check.py [--quick]

Fresh random inputs for every case (hidden ~ N(0, 1), weight ~ N(0, sigma^2 / H), so logits
have a standard deviation of about sigma); outputs and workspace poisoned with NaN before
each run. Per case: row loss within 1e-5 relative (norm of the per-row vector, and the
sum); gradients within 5e-3 relative (16-bit) or 1e-5 (float32), and for 16-bit never worse
than the stock path's error on the same data (stock: logits in the model dtype, `.float()`,
cross-entropy). "Never worse" allows 2% over max(stock, floor), where floor is the error of
the float64 reference itself rounded to the output dtype: no result stored in that dtype
can be closer, and both methods sit at it when logits are small; it is checked on gradients
of at least 10,000 elements (on fewer, one rounding decides it). Then the error paths.
Exit status 1 if anything fails.
"""

import sys
import time

import torch
from common import reference, rel, stock
from forward_rewrite import _cuda, _native

FAILURES = []
GIB = 1 << 30
MIN_ELEMENTS_TO_COMPARE = 10_000


def fail(msg):
    FAILURES.append(msg)
    print("FAIL", msg, flush=True)


def make(case, gen):
    n, hdim, v = case["n"], case["h"], case["v"]
    dtype = case.get("dtype", torch.bfloat16)
    dev = "cuda"
    if case.get("noncontig"):
        base = torch.randn(n, hdim + 40, device=dev, generator=gen).to(dtype)
        h = base[:, 7 : 7 + hdim]
        assert not h.is_contiguous()
    else:
        h = torch.randn(n, hdim, device=dev, generator=gen).to(dtype)
    sigma = case.get("sigma", 2.0)
    w = (torch.randn(v, hdim, device=dev, generator=gen) * (sigma / hdim**0.5)).to(
        dtype
    )
    b = (
        (torch.randn(v, device=dev, generator=gen) * 0.5).to(dtype)
        if case.get("bias")
        else None
    )
    t = torch.randint(0, v, (n,), device=dev, generator=gen)
    if case.get("bias_neg_inf"):
        # Columns masked with a -inf bias (column 0 among them: the first value the
        # generic kernel's online pass sees), the targets among the others.
        masked = torch.rand(v, device=dev, generator=gen) < case["bias_neg_inf"]
        masked[0] = True
        b[masked] = float("-inf")
        allowed = (~masked).nonzero().squeeze(1)
        t = allowed[torch.randint(0, allowed.numel(), (n,), device=dev, generator=gen)]
    frac = case.get("ignored", 0.0)
    if frac:
        t[torch.rand(n, device=dev, generator=gen) < frac] = -100
    if case.get("all_ignored"):
        t.fill_(-100)
    count = max(int((t != -100).sum()), 1)
    if case.get("gs_rows"):
        gs = torch.rand(n, device=dev, generator=gen) * 2 / count
    else:
        gs = torch.full((1,), case.get("gs", 1.0 / count), device=dev)
    return h, w, b, t, gs


def run_case(name, case, gen):
    h, w, b, t, gs = make(case, gen)
    kw = {
        "ignore_index": -100,
        "smoothing": case.get("smoothing", 0.0),
        "scale": case.get("scale", 1.0),
        "softcap": case.get("softcap"),
        "grad_scale": gs,
    }
    t0 = time.perf_counter()
    ref = reference(h, w, b, t, **kw)
    st = stock(h, w, b, t, **kw)
    tuning = dict(case.get("tuning", {}), poison=True)
    out = _cuda.fused_ce_tuned(
        h,
        w,
        b,
        t,
        ignore_index=-100,
        label_smoothing=kw["smoothing"],
        scale=kw["scale"],
        softcap=kw["softcap"],
        grad_scale=gs,
        compute_grads=True,
        chunk_budget_bytes=case.get("budget", GIB),
        skip_ignored=case.get("skip_ignored"),
        tuning=tuning,
    )
    torch.cuda.synchronize()
    names = ["loss", "dh", "dw", "db"]
    sixteen = h.dtype != torch.float32
    grad_tol = 5e-3 if sixteen else 1e-5
    cols = []
    for i, nm in enumerate(names):
        if ref[i] is None:
            continue
        o, r, s = out[i], ref[i], st[i]
        if i == 0:
            e, es = rel(o, r), rel(s, r)
            esum = abs(o.double().sum().item() - r.sum().item()) / max(
                abs(r.sum().item()), 1e-30
            )
            if all_zero(r):
                ok = bool((o == 0).all())
                e = 0.0 if ok else float("inf")
            else:
                ok = e <= 1e-5 and esum <= 1e-5
            cols.append(f"loss {e:.1e} (stock {es:.1e})")
            if not ok:
                fail(f"{name}: loss rel {e:.2e}, sum rel {esum:.2e}")
            continue
        if all_zero(r):
            ok = bool(torch.isfinite(o).all()) and bool((o == 0).all())
            cols.append(f"{nm} zero" + ("" if ok else " NOT ZERO"))
            if not ok:
                fail(f"{name}: {nm} should be zero")
            continue
        e, es = rel(o, r), rel(s, r)
        floor = rel(r.to(o.dtype), r)
        # "Never worse than stock" is a statistical statement: on a few dozen elements
        # (the tiny case) a single rounding decides it, so there only the tolerance applies.
        meaningful = o.numel() >= MIN_ELEMENTS_TO_COMPARE
        bound = max(es, floor) * 1.02 if sixteen and meaningful else grad_tol
        cols.append(f"{nm} {e:.2e} (stock {es:.2e}, floor {floor:.2e})")
        if not (e <= grad_tol and e <= bound):
            fail(
                f"{name}: {nm} rel {e:.3e} (tolerance {grad_tol:.0e}, stock {es:.3e}, floor {floor:.3e})"
            )
    print(
        f"{name:34s} {time.perf_counter() - t0:5.1f}s  " + " | ".join(cols), flush=True
    )
    return h, w, b, t, gs, out


def all_zero(r):
    return bool((r == 0).all())


CASES = {
    "v32000 n1000 bf16": {"n": 1000, "h": 512, "v": 32000},
    "v128256 n777 ignored30%": {"n": 777, "h": 256, "v": 128256, "ignored": 0.3},
    "v128256 ignored30% in-kernel": {
        "n": 777,
        "h": 256,
        "v": 128256,
        "ignored": 0.3,
        "skip_ignored": False,
    },
    "v151936 smoothing gs(N,) bf16 dW": {
        "n": 513,
        "h": 384,
        "v": 151936,
        "smoothing": 0.1,
        "gs_rows": True,
        "budget": 512
        << 20,  # too small for a float32 dW accumulator: dW accumulates in bf16
    },
    "v256000 softcap30 scale0.5 large": {
        "n": 300,
        "h": 256,
        "v": 256000,
        "softcap": 30.0,
        "scale": 0.5,
        "sigma": 15.0,
    },
    "v262144 bias softcap smooth nonc": {
        "n": 257,
        "h": 320,
        "v": 262144,
        "bias": True,
        "softcap": 20.0,
        "smoothing": 0.05,
        "noncontig": True,
    },
    "v128256 large logits sigma20": {"n": 600, "h": 256, "v": 128256, "sigma": 20.0},
    "v32000 many chunks (64MiB)": {
        "n": 3001,
        "h": 256,
        "v": 32000,
        "budget": 64 << 20,
        "ignored": 0.1,
    },
    "v128256 many chunks bias": {
        "n": 1500,
        "h": 256,
        "v": 128256,
        "budget": 160 << 20,
        "bias": True,
    },
    "v32000 all ignored": {"n": 200, "h": 128, "v": 32000, "all_ignored": True},
    "v32000 all ignored in-kernel": {
        "n": 200,
        "h": 128,
        "v": 32000,
        "all_ignored": True,
        "skip_ignored": False,
    },
    "v50257 generic kernel": {
        "n": 400,
        "h": 256,
        "v": 50257,
        "ignored": 0.2,
        "tuning": {"generic": True},
    },
    "v262144 generic kernel softcap": {
        "n": 200,
        "h": 256,
        "v": 262144,
        "softcap": 30.0,
        "tuning": {"generic": True},
    },
    "v151936 pipelined clusters": {
        "n": 700,
        "h": 256,
        "v": 151936,
        "ignored": 0.2,
        "skip_ignored": False,
        "tuning": {"pipelined": True},
    },
    "v32000 pipelined bias softcap": {
        "n": 999,
        "h": 128,
        "v": 32000,
        "bias": True,
        "softcap": 15.0,
        "smoothing": 0.1,
        "tuning": {"pipelined": True},
    },
    "v128256 dh split 3": {"n": 700, "h": 256, "v": 128256, "tuning": {"dh_splits": 3}},
    "v32000 fp16 gs=1": {
        "n": 700,
        "h": 256,
        "v": 32000,
        "dtype": torch.float16,
        "gs": 1.0,
    },
    "v32003 fp32 bias smooth": {
        "n": 300,
        "h": 192,
        "v": 32003,
        "dtype": torch.float32,
        "bias": True,
        "smoothing": 0.1,
    },
    "v5 tiny": {"n": 3, "h": 8, "v": 5},
    "v50257 generic kernel -inf bias": {
        "n": 300,
        "h": 256,
        "v": 50257,
        "bias": True,
        "bias_neg_inf": 0.01,
        "tuning": {"generic": True},
    },
    "v128256 -inf bias": {
        "n": 300,
        "h": 256,
        "v": 128256,
        "bias": True,
        "bias_neg_inf": 0.01,
    },
}
QUICK = [
    "v32000 n1000 bf16",
    "v128256 n777 ignored30%",
    "v262144 bias softcap smooth nonc",
]


def check_extras(gen):
    # Determinism: same inputs, bit-identical outputs.
    case = {"n": 900, "h": 256, "v": 128256, "ignored": 0.1}
    h, w, _b, t, gs = make(case, gen)
    kw = {
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "scale": 1.0,
        "softcap": None,
        "grad_scale": gs,
        "compute_grads": True,
        "chunk_budget_bytes": 128 << 20,
    }
    a = _cuda.fused_ce(h, w, None, t, **kw)
    c = _cuda.fused_ce(h, w, None, t, **kw)
    same = all(torch.equal(x, y) for x, y in zip(a[:3], c[:3]))
    print("determinism:", "bit-identical" if same else "DIFFERENT")
    if not same:
        fail("two runs differ")

    # A non-default stream.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        d = _cuda.fused_ce(h, w, None, t, **kw)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    same = all(torch.equal(x, y) for x, y in zip(a[:3], d[:3]))
    print("side stream:", "same results" if same else "DIFFERENT")
    if not same:
        fail("side stream differs")

    # CUDA graph capture (no host sync allowed: ignored rows go through the kernels).
    try:
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            e = _cuda.fused_ce(h, w, None, t, **kw)
        g.replay()
        torch.cuda.synchronize()
        err = max(rel(x, y) for x, y in zip(e[:3], a[:3]))
        print(f"graph capture: replay matches eager within {err:.1e}")
        if err > 1e-2:
            fail(f"graph replay differs by {err}")
    except Exception as ex:  # noqa: BLE001  (report it, keep checking)
        fail(f"graph capture: {type(ex).__name__}: {ex}")

    # Loss only (compute_grads False).
    r = _cuda.fused_ce(h, w, None, t, **dict(kw, compute_grads=False, grad_scale=None))
    e = rel(r[0], a[0])
    print(
        f"loss only: {e:.1e} from the loss of the gradient run",
        "(None grads)" if r[1] is None else "",
    )
    if e > 1e-6 or r[1] is not None:
        fail("loss-only run")

    # A frozen weight (weight_grad=False): no dW at all, loss, dh and db bit for bit those
    # of the run with dW, in both dW paths (float32 accumulator and straight into bf16), and
    # less memory (no dW, no accumulator).
    b = (torch.randn(w.shape[0], device=w.device) * 0.5).to(w.dtype)
    for budget in (128 << 20, 512 << 20):
        kwb = dict(kw, chunk_budget_bytes=budget)
        full = _cuda.fused_ce(h, w, b, t, **kwb)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        full = _cuda.fused_ce(h, w, b, t, **kwb)
        torch.cuda.synchronize()
        peak_full = torch.cuda.max_memory_allocated() - base
        del full
        full = _cuda.fused_ce(h, w, b, t, **kwb)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        frozen = _cuda.fused_ce(h, w, b, t, weight_grad=False, **kwb)
        torch.cuda.synchronize()
        peak_frozen = torch.cuda.max_memory_allocated() - base
        same = frozen[2] is None and all(
            torch.equal(frozen[i], full[i]) for i in (0, 1, 3)
        )
        print(
            f"frozen weight (budget {budget >> 20} MiB): dw None, loss/dh/db",
            "bit-identical" if same else "DIFFERENT",
            f"| peak {peak_frozen / 2**20:.0f} MiB vs {peak_full / 2**20:.0f} MiB with dW",
        )
        if not same:
            fail(f"frozen weight (budget {budget >> 20} MiB) differs from the dW run")
        if peak_frozen >= peak_full:
            fail("frozen weight: no memory saved")

    # A target out of range: NaN loss for that row, the others fine, no crash.
    t2 = t.clone()
    t2[5] = 10**9
    t2[6] = -7
    r = _cuda.fused_ce(h, w, None, t2, **kw)
    torch.cuda.synchronize()
    nan_rows = torch.isnan(r[0]).nonzero().flatten().tolist()
    print("targets out of range -> NaN rows", nan_rows)
    if set(nan_rows) != {5, 6} or not torch.isnan(r[1][5]).all():
        fail(f"out-of-range target: NaN rows {nan_rows}")
    r = _cuda.fused_ce(h, w, None, t, **kw)  # the context still works
    torch.cuda.synchronize()


def check_scale(gen):
    """The backward's in-place gradient scaling (``_cuda.scale_in_place``, kernel
    ``scale_by``): bit-identical to the float32 product rounded once, for every dtype, factor
    and alignment (torch's ``mul_`` by a 0-dim float32 tensor rounds the factor to a 16-bit
    dtype first), the same bits at factor 1; and through the public op,
    ``(k * loss).backward()`` gives k times the gradients."""
    from forward_rewrite import ops

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, offset in ((4097 * 33, 0), (37, 1), (8, 0)):
            base = torch.randn(n + offset, device="cuda", generator=gen).to(dtype)
            for k in (1.0, 0.37, -2.5, 1e-30):
                factor = torch.tensor(k, device="cuda")
                ours = base.clone()[offset:]
                want = (base[offset:].float() * k).to(dtype)
                if not _cuda.scale_in_place(ours, factor):
                    fail(f"scale_in_place {dtype} n={n}: not taken")
                elif not torch.equal(ours.view(torch.uint8), want.view(torch.uint8)):
                    bad = (ours != want).sum().item()
                    fail(
                        f"scale_in_place {dtype} n={n} offset={offset} k={k}: {bad} differ"
                    )
    strided = torch.randn(64, 8, device="cuda").t()
    if _cuda.scale_in_place(strided, torch.tensor(2.0, device="cuda")):
        fail("scale_in_place took a non-contiguous tensor")
    h = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    t = torch.randint(0, 1000, (300,), device="cuda", generator=gen)
    grads = []
    for k in (1.0, 3.0):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        (k * ops.fused_lm_head_loss(hh, ww, t)).backward()
        grads.append((hh.grad.float(), ww.grad.float()))
    for name, one, three in zip(("dh", "dW"), grads[0], grads[1]):
        err = ((three - 3 * one).abs().max() / (3 * one).abs().max()).item()
        if err > 1e-2:
            fail(f"(3 * loss).backward(): {name} is not 3x ({err:.1e})")
    print(
        "in-place gradient scaling: bit-identical to the float32 product; 3 * loss scales dh, dW"
    )


def check_errors():
    h = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(10, 8, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 10, (4,), device="cuda")
    gs = torch.ones(1, device="cuda")
    good = {"hidden": h, "weight": w, "bias": None, "targets": t, "grad_scale": gs}
    bad = {
        "weight": {"weight": w.float()},
        "weight ": {"weight": torch.randn(10, 9, device="cuda", dtype=torch.bfloat16)},
        "hidden": {"hidden": h.cpu()},
        "hidden  ": {"hidden": h.t().contiguous().t()},
        "hidden   ": {"hidden": h.to(torch.float64)},
        "targets": {"targets": t.int()},
        "targets ": {"targets": t[:3]},
        "bias": {"bias": torch.randn(9, device="cuda", dtype=torch.bfloat16)},
        "grad_scale": {"grad_scale": torch.ones(3, device="cuda")},
        "grad_scale ": {
            "grad_scale": torch.ones(1, device="cuda", dtype=torch.float64)
        },
        "targets  ": {"targets": t.cpu()},
    }
    for expect, change in bad.items():
        args = dict(good, **change)
        try:
            _cuda.fused_ce(
                args["hidden"],
                args["weight"],
                args["bias"],
                args["targets"],
                ignore_index=-100,
                label_smoothing=0.0,
                scale=1.0,
                softcap=None,
                grad_scale=args["grad_scale"],
                compute_grads=True,
                chunk_budget_bytes=GIB,
            )
        except (TypeError, ValueError) as e:
            if not str(e).startswith(expect.strip()):
                fail(f"error names the wrong argument: {e}")
            continue
        fail(f"no error for a bad {expect.strip()}")
    print("bad arguments: Python errors naming the argument")


def main():
    quick = "--quick" in sys.argv
    print(
        "device:",
        torch.cuda.get_device_name(),
        _native.cuda_device_info(torch.cuda.current_device()),
    )
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(time.time()))  # fresh data on every run
    for name, case in CASES.items():
        if quick and name not in QUICK:
            continue
        try:
            run_case(name, case, gen)
        except Exception as e:  # noqa: BLE001  (a failed case is reported, the rest still run)
            fail(f"{name}: {type(e).__name__}: {e}")
    check_scale(gen)
    if not quick:
        check_extras(gen)
        check_errors()
    print(f"\n{len(FAILURES)} failed" if FAILURES else "\nall checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
