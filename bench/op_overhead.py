"""Host time per call of the fused decoder ops on tiny CPU tensors, where the kernels take
almost nothing and the Python path is what is measured: through the registered custom op
(``torch.library`` dispatch) and through the eager fast path (``forward_rewrite._eager``),
interleaved in one process, forward and forward + backward; stock torch expressions beside
them. Best of 5 repeats of N calls (microseconds per call).

    python bench/op_overhead.py [--calls N]
"""

import argparse
import time

import forward_rewrite
import torch
from forward_rewrite import _eager


def best_us(fn, calls):
    for _ in range(100):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return min(times)


def with_backward(fn):
    def run():
        out = fn()
        out = out if isinstance(out, tuple) else (out,)
        sum(t.sum() for t in out).backward()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, w = torch.randn(4, 64, requires_grad=True), torch.ones(64, requires_grad=True)
    g, u = (
        torch.randn(4, 64, requires_grad=True),
        torch.randn(4, 64, requires_grad=True),
    )
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16, requires_grad=True)
    cos, sin = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    gate_up = torch.randn(4, 128, requires_grad=True)

    def stock_rms():
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))

    def stock_rotary():
        def rot(t):
            return torch.cat((-t[..., 8:], t[..., :8]), dim=-1)

        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rot(q) * s, k * c + rot(k) * s

    def stock_packed():
        a, b = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(a) * b

    cases = [
        ("rms_norm", lambda: forward_rewrite.rms_norm(x, w, 1e-6), stock_rms),
        ("rotary", lambda: forward_rewrite.rotary(q, k, cos, sin), stock_rotary),
        (
            "gated_mlp_act",
            lambda: forward_rewrite.gated_mlp_act(g, u),
            lambda: torch.nn.functional.silu(g) * u,
        ),
        (
            "gated_mlp_act_packed",
            lambda: forward_rewrite.gated_mlp_act_packed(gate_up),
            stock_packed,
        ),
    ]
    fast = _eager.eager_ok
    print(f"command: python bench/op_overhead.py --calls {args.calls}")
    print(
        "| op | custom op fwd | fast path fwd | stock fwd "
        "| custom op fwd+bwd | fast path fwd+bwd | stock fwd+bwd |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ours, stock in cases:
        row = {}
        try:
            for path in ("custom op", "fast path"):
                _eager.eager_ok = fast if path == "fast path" else (lambda a: False)
                row[path] = (
                    best_us(ours, args.calls),
                    best_us(with_backward(ours), args.calls // 3),
                )
        finally:
            _eager.eager_ok = fast
        row["stock"] = (
            best_us(stock, args.calls),
            best_us(with_backward(stock), args.calls // 3),
        )
        cells = [f"{row[p][0]:.0f}" for p in ("custom op", "fast path", "stock")]
        cells += [f"{row[p][1]:.0f}" for p in ("custom op", "fast path", "stock")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
