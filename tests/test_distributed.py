"""Issue 11: training under engines and adapters equals a single-process stock run, and the
fused path ran on every call.

Through ``gpu/distributed.py`` (the script the GPU machine runs), with ``--smoke``: tiny
float32 Llama, Qwen3-MoE (router aux loss on) and Gemma3 (soft-cap 3) models, 2 optimizer
steps of 2 micro-batches each (``num_items_in_batch`` over the step and the ranks).

* world size 2 (``torch.distributed.run``, gloo, CPU): DDP (``no_sync`` accumulation);
  FSDP2 root-only and per-layer units with the head as its own unit, tied and untied;
  transformers' ``[norm, lm_head]`` plan; bf16 mixed precision; DDP + PEFT LoRA (frozen
  head, LoRA head); DeepSpeed ZeRO-2 and ZeRO-3 through accelerate. One launch for all.
* one process: PEFT LoRA (attention and MLP with the head frozen; on the head too, with
  adapter dropout; ``modules_to_save``), gradient checkpointing (reentrant and not).

Per case: every micro-batch loss within 1e-5, every gradient after the first step within
1e-4, every parameter after the last step within 1e-5 (relative to the tensor's largest
element) of the single-process stock run; the guard fused every call (counters summed over
ranks) by the expected route; a frozen head never had a weight gradient computed.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "gpu" / "distributed.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("fr_gpu_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_script()
CASES = {c.name: c for c in harness.default_cases()}
WORLD2 = [n for n, c in CASES.items() if c.engine != "none"]
ONE_PROCESS = [n for n, c in CASES.items() if c.engine == "none"]


def expected_route(case):
    if case.peft == "lora-head":
        return "peft-lora"
    if case.engine.startswith(("fsdp2-units", "fsdp2-norm-head")):
        return "fsdp2"
    if case.engine == "zero3":
        return "deepspeed"
    return "direct"


def assert_row(result, case, calls):
    if "error" in result:
        pytest.skip(result["error"])  # deepspeed or peft not installed
    fused = result["fused"]
    assert result["problems"] == [], result["problems"]
    assert fused["calls"] == calls
    assert fused["fused"] == calls and fused["fallback"] == {}, fused
    assert fused["op_calls"] == calls
    assert fused["routes"] == {expected_route(case): calls}
    # A frozen head (PEFT LoRA elsewhere) never computes its weight gradient.
    assert fused["dw_skipped"] == (calls if case.peft == "lora" else 0)
    if case.attnres:
        # The pseudo-queries trained under the engine (and equal the reference's: param_err).
        assert fused["attnres_update"] > 0, fused
    else:
        assert fused["attnres_update"] is None, fused
    assert fused["loss_err"] <= 1e-5 or case.mixed_precision
    assert fused["grad_err"] <= 1e-4 or case.mixed_precision


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "results.json"
    env = dict(os.environ)
    # DeepSpeed builds its CPU communication op with ninja, from the venv's bin.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(SCRIPT),
        "--smoke",
        "--fused-only",
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
    )
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-6000:])
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    print(proc.stdout)
    return results


@pytest.mark.parametrize("name", WORLD2)
def test_world_size_2_equals_one_stock_process(world2, name):
    assert name in world2, sorted(world2)
    assert_row(world2[name], CASES[name], calls=2 * 2 * 2)


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_one_process_adapters_and_checkpointing_equal_stock(name):
    case = CASES[name]
    if case.peft:
        pytest.importorskip("peft")
    threads = torch.get_num_threads()
    s = harness.Settings(
        smoke=True, steps=2, micro=2, device=torch.device("cpu"), world=1, rank=0
    )
    try:
        result = harness.run_case(case, s, fused_only=True)
    finally:
        torch.set_num_threads(threads)
    result["problems"] = harness.check(result, sixteen_bit=False)
    assert_row(result, case, calls=2 * 2)
