"""Memory evidence on the CPU: the fused step's extra peak RSS stays within the chunk
budget plus its weight-sized outputs whatever the token count, while the stock step grows
with tokens x vocabulary. Each measurement runs in its own process (bench/cpu_memory.py)."""

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "cpu_memory.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("cpu_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/status"
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_peak_is_bounded_by_the_budget_not_by_tokens_times_vocab(dtype):
    bench = load_bench()
    hidden, vocab, budget = 128, 16000, 32 * 2**20
    mib = 2**20
    small, large = 1024, 8192
    fused = {
        n: bench.measure("fused", dtype, n, hidden, vocab, budget)
        for n in (small, large)
    }
    stock = bench.measure("stock", dtype, large, hidden, vocab, budget)
    logits_mib = large * vocab * 4 / mib  # 500 MiB of float32 logits

    # Outputs that are not scratch: dW and its float32 accumulator, dh, and the
    # gradients backward hands to autograd; a few MiB of allocator slack.
    weight_mib = vocab * hidden * 4 / mib
    allowed = budget / mib + 3 * weight_mib + 3 * large * hidden * 4 / mib + 16
    assert fused[large]["extra_peak_mib"] <= allowed, (fused, allowed)
    # Eight times the tokens: no growth in proportion to tokens x vocabulary.
    growth = fused[large]["extra_peak_mib"] - fused[small]["extra_peak_mib"]
    assert growth <= 0.1 * logits_mib, fused
    # Stock holds at least the float32 logits and their gradient at once.
    assert stock["extra_peak_mib"] >= 2 * logits_mib, stock
    assert abs(stock["loss"] - fused[large]["loss"]) <= 1e-2 * stock["loss"]
