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
    "4.57.6": {
        "rms-norm": 50,
        "residual-norm": 30,
        "rotary": 45,
        "gated-mlp": 40,
        # Qwen3-Next's gated norm (SiLU written out as F.silu in 4.57)
        "gated-rms-norm": 1,
    }
}


def site(version):
    return ROOT / "corpus" / "cache" / f"site-{version}"


def run_under(version, script):
    """Run ``script`` (``sys.argv[1]`` is the version) with the release in front of the
    venv; the JSON of its last line of output."""
    if not (site(version) / "transformers").is_dir():
        pytest.skip(f"{site(version)} is missing: scripts/venv installs it")
    path = os.pathsep.join(
        [str(site(version)), str(HERE), os.environ.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, "-c", script, version],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version", sorted(FLOORS))
def test_every_patched_class_of_an_older_release_matches_stock(version):
    results = run_under(version, SCRIPT)
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


QWEN_VL = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, transformers
import forward_rewrite
from forward_rewrite import fusion_guard
from forward_rewrite.verify import grad_error, loss_and_grads, rel_err

assert transformers.__version__ == sys.argv[1], transformers.__version__
text = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
)
if MODEL == "qwen2_5_vl":
    from transformers import Qwen2_5_VLConfig as Config
    from transformers import Qwen2_5_VLForConditionalGeneration as Model
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 64}
else:
    from transformers import Qwen2VLConfig as Config
    from transformers import Qwen2VLForConditionalGeneration as Model
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}
torch.manual_seed(0)
model = Model(Config(**text, vision_config=vision)).float().train()
ids = torch.randint(0, 128, (2, 16))
labels = ids.clone()
labels[0, :3] = -100
inputs = dict(input_ids=ids, labels=labels)
stock_loss, _, stock_grads = loss_and_grads(model, inputs)
forward_rewrite.install()
before = dict(fusion_guard.taken)
loss, _, grads = loss_and_grads(model, inputs)
print(json.dumps({
    "taken": {k: fusion_guard.taken[k] - before.get(k, 0) for k in fusion_guard.taken},
    "loss_err": rel_err(loss, stock_loss),
    "grad_err": grad_error(grads, stock_grads)[0],
    "same_params": sorted(grads) == sorted(stock_grads),
}))
"""


@pytest.mark.parametrize("model", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_vl_of_4_57_fuses_residual_adds_into_qwen2s_imported_norm(model):
    """transformers 4.57's Qwen2-VL and Qwen2.5-VL build their decoder norms from qwen2's
    `Qwen2RMSNorm` (imported): the residual-norm site fuses there once qwen2's rms-norm site
    is in place, and the model matches stock (hand-made tiny configs: the generic shrink
    does not fit 4.x's Qwen2-VL configs)."""
    result = run_under("4.57.6", f"MODEL = {model!r}\n" + QWEN_VL)
    assert result["taken"]["residual-norm"] == 2, result  # one per layer
    assert result["taken"]["rms-norm"] > 0, result
    assert result["same_params"], result
    assert result["loss_err"] <= 1e-5 and result["grad_err"] <= 1e-4, result
