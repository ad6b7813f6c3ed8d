"""gpu/step_bench.py on the CPU (``--smoke``: tiny shapes), so the script the GPU machine runs
does not rot between device sessions: every method it times on issue 12's AttnRes run builds,
trains and reports, with the fused paths taken, and a profiled step does not lose the row."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_step_bench(*args):
    # The script (and the process per method it starts) imports the forward_rewrite this
    # test imports: the installed wheel, not the source folder (which has no _native).
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, str(ROOT / "gpu" / "step_bench.py"), "--smoke", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")
    ]
    return {r["method"]: r for r in rows}, done.stdout


def test_attnres_methods_train_with_every_fused_path():
    rows, table = run_step_bench(
        "--models", "llama-1b", "--methods", "stock,ours+attnres", "--profile", "3"
    )
    stock, ours = rows["stock"], rows["ours+attnres"]
    assert "error" not in stock and "error" not in ours, table
    # retrofit AttnRes is exact at initialisation: the first loss is stock's
    assert abs(ours["first_loss"] - stock["first_loss"]) < 1e-5
    calls = ours["fused_calls"]
    assert calls["loss"] > 0 and calls["rms-norm"] > 0 and calls["gated-mlp"] > 0
    assert ours["profile"] and "profile_error" not in ours
    assert "| llama-1b | ours+attnres |" in table


def test_the_granite_hybrid_row_fuses_its_mixers_gated_norm():
    # Granite 4-H: Mamba-2 mixers whose gated norm (the gate first) only we fuse
    rows, table = run_step_bench(
        "--models", "granite4-h-8l", "--methods", "stock,ours", "--steps", "1"
    )
    stock, ours = rows["stock"], rows["ours"]
    assert "error" not in stock and "error" not in ours, table
    assert abs(ours["first_loss"] - stock["first_loss"]) < 1e-5
    calls = ours["fused_calls"]
    assert calls["gated-rms-norm"] > 0 and calls["loss"] > 0, calls


def load_step_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "step_bench", ROOT / "gpu" / "step_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_time_finds_the_idle_stretches():
    device_time = load_step_bench().device_time
    # Two streams overlap (b inside a's end), then a 3 ms gap, then a 1 ms gap.
    spans = [
        (0.0, 1000.0, "a"),
        (500.0, 1500.0, "b"),
        (4500.0, 5000.0, "c"),
        (6000.0, 6500.0, "d"),
    ]
    t = device_time(spans, gaps=1)
    assert t["span_ms"] == 6.5 and t["busy_ms"] == 2.5 and t["idle_ms"] == 4.0
    assert t["gaps"] == [[3.0, "b", "c"]]
    assert device_time([], gaps=3) is None
    assert device_time([(0.0, 2.0, "x"), (1.0, 1.5, "y")])["idle_ms"] == 0.0


def test_unknown_method_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, str(ROOT / "gpu" / "step_bench.py"), "--methods", "bogus"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown model or method: bogus" in done.stderr


def test_rounds_merge_into_one_row_per_method():
    merge_rounds = load_step_bench().merge_rounds
    row = {"model": "m", "first_loss": 1.0, "profile": [["k", 1.0, 1]]}
    rows = [
        dict(row, method="ours", median_ms=10.0, min_ms=9.0, peak_gib=1.0),
        dict(row, method="liger", median_ms=11.0, min_ms=10.5, peak_gib=2.0),
        dict(row, method="liger", median_ms=13.0, min_ms=12.0, peak_gib=2.5),
        dict(row, method="ours", median_ms=12.0, min_ms=8.0, peak_gib=1.0),
        dict(row, method="ours", median_ms=11.0, min_ms=10.0, peak_gib=1.5),
        {"model": "m", "method": "liger", "error": "timeout"},
    ]
    ours, liger = merge_rounds(rows)
    assert ours["method"] == "ours" and ours["round_ms"] == [10.0, 12.0, 11.0]
    assert (
        ours["median_ms"] == 11.0 and ours["min_ms"] == 8.0 and ours["peak_gib"] == 1.5
    )
    assert ours["profile"] == row["profile"]  # the first round's
    assert liger == {"model": "m", "method": "liger", "error": "timeout"}


def test_rounds_alternate_the_method_order():
    _, out = run_step_bench(
        "--models", "llama-1b", "--methods", "stock,ours", "--rounds", "2"
    )
    runs = [
        json.loads(line)["method"] for line in out.splitlines() if line.startswith("{")
    ]
    assert runs == ["stock", "ours", "ours", "stock"]
    assert "median of 2 rounds" in out


def test_clock_summary_takes_the_medians_of_the_lines_that_parse():
    clock_summary = load_step_bench().clock_summary
    text = "1980, 650.5\n1755, 700.0\n[N/A], 690.0\n1830, 699.9\n19"
    assert clock_summary(text) == {
        "sm_clock_mhz": 1830.0,
        "power_w": 699.9,
        "samples": 3,
    }
    assert clock_summary("") is None and clock_summary("[N/A], [N/A]\n") is None


def test_clock_sampler_runs_nvidia_smi_and_stops_it(tmp_path, monkeypatch):
    # A stand-in nvidia-smi that prints two samples and then keeps running, as `-lms` does.
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho '1700, 600.0'\necho '1900, 650.0'\nexec sleep 60\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    step_bench = load_step_bench()
    import subprocess as sp
    import time

    class Props:
        uuid = "1234"

    import torch

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    sampler = step_bench.start_clock_sampler(0)
    assert isinstance(sampler, sp.Popen)
    assert sampler.args[:3] == ["nvidia-smi", "-i", "GPU-1234"]
    time.sleep(0.5)
    summary = step_bench.stop_clock_sampler(sampler)
    assert sampler.poll() is not None  # stopped
    assert summary == {"sm_clock_mhz": 1800.0, "power_w": 625.0, "samples": 2}
    assert step_bench.stop_clock_sampler(None) is None


def test_kernels_fall_into_their_classes():
    kernel_classes = load_step_bench().kernel_classes
    spans = [
        (0.0, 1000.0, "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN"),
        (0.0, 500.0, "void cublasLt::splitKreduce_kernel<32, 16, int, float>"),
        (0.0, 2000.0, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16"),
        (0.0, 300.0, "void cudnn::fusion::compute_dot_do_o_specialized<true, 128>"),
        (
            0.0,
            100.0,
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<",
        ),
        (0.0, 40.0, "rms_fwd_bf16_bf16_bf16_v1"),
        (0.0, 20.0, "ce_rows_cluster_plain_bf16"),
        (0.0, 10.0, "_rms_norm_forward_kernel"),
        (0.0, 5.0, "liger_cross_entropy_kernel"),
        (
            0.0,
            7.0,
            "void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>",
        ),
        (0.0, 1.0, "Memset (Device)"),
    ]
    assert kernel_classes(spans) == {
        "matmul": 1.5,
        "attention": 2.3,
        "optimizer": 0.1,
        "forward-rewrite": 0.06,
        "triton": 0.015,
        "other": 0.008,
    }


def test_the_ceiling_is_stock_over_the_unfusable_work(capsys):
    print_classes = load_step_bench().print_classes
    classes = {
        "matmul": 50.0,
        "attention": 20.0,
        "optimizer": 10.0,
        "forward-rewrite": 5.0,
        "triton": 0.0,
        "other": 15.0,
    }
    rows = [
        {"model": "m", "method": "stock", "median_ms": 120.0},
        {
            "model": "m",
            "method": "ours",
            "median_ms": 101.0,
            "device_time": {"classes": classes},
        },
    ]
    print_classes(rows)
    out = capsys.readouterr().out
    assert "| m | ours | 50.0 | 20.0 | 10.0 | 5.0 | 0.0 | 15.0 | 1.50x |" in out
    print_classes([{"model": "m", "method": "stock", "median_ms": 1.0}])
    assert capsys.readouterr().out == ""  # nothing profiled, no table


def test_peak_tensors_are_those_alive_at_the_most_memory():
    step_bench = load_step_bench()
    gib = 2**30

    def frames(*where):
        return [{"filename": f, "line": n, "name": fn} for f, n, fn in where]

    mlp = frames(
        ("/site/torch/nn/modules/linear.py", 125, "forward"),
        ("/site/transformers/models/llama/modeling_llama.py", 160, "forward"),
        ("/site/torch/utils/checkpoint.py", 500, "recompute"),
    )
    ours = frames(("/site/forward_rewrite/fused_ops.py", 640, "gated_mlp_act"))
    trace = [
        # a tensor from before the recording, freed: the rise counts it
        {"action": "free_requested", "addr": 9, "size": 1 * gib},
        {"action": "alloc", "addr": 1, "size": 2 * gib, "frames": mlp},
        {"action": "alloc", "addr": 2, "size": 1 * gib, "frames": mlp},
        {"action": "free_completed", "addr": 9, "size": 1 * gib},  # not a second free
        {"action": "alloc", "addr": 3, "size": 1 * gib, "frames": ours},
        {
            "action": "alloc",
            "addr": 4,
            "size": 3 * gib,
            "frames": [],
        },  # the peak: 6 GiB
        {"action": "free_requested", "addr": 4, "size": 3 * gib},
        {"action": "free_requested", "addr": 2, "size": 1 * gib},
        {
            "action": "alloc",
            "addr": 5,
            "size": 3 * gib,
            "frames": ours,
        },  # 5 GiB: no peak
    ]
    assert step_bench.peak_tensors(trace, top=2) == {
        "peak_gib": 6.0,
        "sites": [
            ["(no Python frame)", 3.0, 1],
            ["llama/modeling_llama.py:160 forward", 3.0, 2],
        ],
    }
    assert step_bench.peak_tensors([], top=3) == {"peak_gib": 0.0, "sites": []}
