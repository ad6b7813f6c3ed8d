"""gpu/bench_fusions.py on the CPU (``--smoke``: tiny shapes), so the script the GPU machine
runs does not rot between device sessions: a run that times only some methods (ours without
stock, as a branch is compared with main) still reports every op, with ours checked against
stock."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ours_alone_is_timed_and_checked_against_stock(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "gpu" / "bench_fusions.py"),
            "--smoke",
            "--models",
            "Llama-3.2-1B",
            "--methods",
            "ours",
            "--out",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT / "gpu",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    # ours-unfused (the add in torch, then our norm) is ours' baseline for add_rms_norm
    assert {r["method"] for r in rows} == {"ours", "ours-unfused"}
    assert {r["op"] for r in rows if r["method"] == "ours-unfused"} == {"add_rms_norm"}
    ops = {r["op"] for r in rows}
    assert {"rms_norm", "add_rms_norm", "rotary", "gated silu"} <= ops, ops
    # bf16 on the CPU: stock's rotary rounds after each of its ops, ours once
    assert all(r["err_vs_stock"] < 1e-2 for r in rows if r["method"] == "ours"), rows
