"""The differential sweep under older pinned transformers releases: 4.45.2 (every model in
the classic shift + CrossEntropyLoss style) and 4.57.6 (the last 4.x). Each release is
installed by `scripts/venv` into its own `--target` directory (`corpus/cache/site-<version>`),
which a subprocess puts in front of the venv's site-packages; torch and forward_rewrite come
from the venv. Every class `install()` patches there is built tiny from its own config and
compared with its stock forward: loss and every gradient (`forward_rewrite.verify.check_class`),
the decoder fusions in place (on 4.57.6 each pass's fused path must run in enough classes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import transformers
from forward_rewrite.verify import check_class, patched_classes

assert transformers.__version__ == sys.argv[1], transformers.__version__
results = []
for module, qualname in patched_classes():
    result = check_class((module, qualname))
    print(result["status"], qualname, result.get("reason") or "", file=sys.stderr)
    results.append(
        {k: result.get(k) for k in ("qualname", "status", "reason", "fusions_taken")}
    )
print(json.dumps(results))
"""

#: version -> (at least this many verified, the patched classes the sweep must see)
FLOORS = {"4.45.2": (35, 40), "4.57.6": (85, 115)}
#: version -> pass -> verified classes in which that decoder-fusion pass's fused path must
#: have run (4.57.6, 2026-12-03: rms-norm 59, residual-norm 39, rotary 56 -- transformers
#: 4.x's `apply_rotary_pos_emb(..., position_ids=None, ...)` -- gated-mlp 51 of 110).
MIN_FUSED = {
    "4.57.6": {"rms-norm": 50, "residual-norm": 30, "rotary": 45, "gated-mlp": 40}
}


def site(version):
    return ROOT / "corpus" / "cache" / f"site-{version}"


@pytest.mark.parametrize("version", sorted(FLOORS))
def test_every_patched_class_of_an_older_release_matches_stock(version):
    if not (site(version) / "transformers").is_dir():
        pytest.skip(f"{site(version)} is missing: scripts/venv installs it")
    path = os.pathsep.join(
        [str(site(version)), str(HERE), os.environ.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, version],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    mismatches = [r for r in results if r["status"] == "mismatch"]
    verified = [r for r in results if r["status"] == "verified"]
    assert mismatches == []
    at_least, seen = FLOORS[version]
    assert len(results) >= seen, len(results)
    assert len(verified) >= at_least, [r for r in results if r["status"] != "verified"]
    fused = {
        name: sum(1 for r in verified if (r["fusions_taken"] or {}).get(name))
        for name in MIN_FUSED.get(version, {})
    }
    print(
        f"\n{version}: fused path ran per pass in {fused} of {len(verified)} verified"
    )
    for name, floor in MIN_FUSED.get(version, {}).items():
        assert fused[name] >= floor, (name, fused[name])
