"""Peak memory of one training step of the loss on the CPU: stock (``head(hidden)`` then
transformers' ``ForCausalLMLoss``) against ``forward_rewrite.fused_lm_head_loss``.

Each configuration runs in its own process, which resets its peak RSS (Linux
``/proc/self/clear_refs``) after building the inputs and reads ``VmHWM`` after forward and
backward, so the figure is the step's extra peak over the inputs, whoever allocated it
(torch or the Rust backend). Usage::

    python bench/cpu_memory.py                      # the default table
    python bench/cpu_memory.py --tokens 1024 8192 --vocab 32000 --hidden 256 --budget-mib 64

The child mode (``--child``) prints one JSON line; tests/test_op_memory.py uses it.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(path, dtype_name, tokens, hidden, vocab, budget_bytes):
    import forward_rewrite
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    forward_rewrite.set_chunk_budget_bytes(budget_bytes)
    h = torch.randn(tokens, hidden, dtype=dtype).requires_grad_(True)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
    labels = torch.randint(0, vocab, (1, tokens))
    labels[0, ::7] = -100

    def step(n):
        x = h[:n].unsqueeze(0)
        y = labels[:, :n]
        if path == "stock":
            loss = ForCausalLMLoss(head(x), y, vocab)
        else:
            loss = forward_rewrite.fused_lm_head_loss(x, head, y, vocab_size=vocab)
        loss.backward()
        return loss.item()

    # Warm up on a few tokens (lazy imports and initialisation, thread pools), then drop
    # the gradients, so that the measured step starts from the inputs alone.
    step(16)
    h.grad = None
    head.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = step(tokens)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "path": path,
                "dtype": dtype_name,
                "tokens": tokens,
                "hidden": hidden,
                "vocab": vocab,
                "budget_mib": budget_bytes / 2**20,
                "extra_peak_mib": (peak - before) / 1024,
                "seconds": seconds,
                "loss": loss,
            }
        )
    )


def measure(path, dtype, tokens, hidden, vocab, budget_bytes, threads=None):
    """Runs one configuration in a fresh process; returns its JSON record."""
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, dtype]
    cmd += [str(tokens), str(hidden), str(vocab), str(budget_bytes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--budget-mib", type=float, default=64)
    args = p.parse_args()
    budget = int(args.budget_mib * 2**20)
    print(
        f"hidden {args.hidden}, vocab {args.vocab}, chunk budget {args.budget_mib:g} MiB; "
        "extra peak RSS of one forward + backward over the inputs, MiB"
    )
    header = "| dtype | tokens | logits N x V fp32 | stock peak | fused peak | stock s | fused s |"
    print(header)
    print("|" + "---|" * 7)
    for dtype in args.dtypes:
        for n in args.tokens:
            s = measure("stock", dtype, n, args.hidden, args.vocab, budget)
            f = measure("fused", dtype, n, args.hidden, args.vocab, budget)
            rel = abs(s["loss"] - f["loss"]) / abs(s["loss"])
            assert rel < 1e-2, (s, f)
            print(
                f"| {dtype} | {n} | {n * args.vocab * 4 / 2**20:.0f} | "
                f"{s['extra_peak_mib']:.0f} | {f['extra_peak_mib']:.0f} | "
                f"{s['seconds']:.2f} | {f['seconds']:.2f} |"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, dtype, tokens, hidden, vocab, budget = sys.argv[2:8]
        child(path, dtype, int(tokens), int(hidden), int(vocab), int(budget))
    else:
        main()
