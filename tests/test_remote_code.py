"""Remote code end to end: a model in the style of a Hugging Face remote-code repository
(`tests/remote_code/`: a config with an `auto_map`, a modeling file with the classic loss and a
`pretraining_tp` branch, a class named `*LMHeadModel`) loaded with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` is patched by
`install()` and trains exactly like stock.

Each scenario runs in a fresh interpreter: transformers reads `HF_MODULES_CACHE` when it is
imported, and the remote module must be new to the process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import json, sys
import torch
import forward_rewrite
from transformers import AutoConfig, AutoModelForCausalLM

path = sys.argv[1]
result = {}

def train(model, steps=3):
    torch.manual_seed(0)
    ids = torch.randint(0, 160, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    losses, logits = [], []
    for _ in range(steps):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        logits.append(out.logits is None)
    return losses, logits, {k: v.detach().clone() for k, v in model.state_dict().items()}

# Random weights saved once, as a hub repository would hold them.
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
torch.manual_seed(1)
AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(path)

forward_rewrite.install()
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
cls = type(model)
record = next(c for c in forward_rewrite.audit()["classes"] if c["qualname"] == cls.__name__)
result["module"] = cls.__module__
result["record"] = {k: record[k] for k in ("verdict", "reason", "installed", "origin", "head")}
fused_losses, fused_none, fused_params = train(model)
# Tuples keep their positions: return_dict=False takes the stock path, logits at [1].
out = model(input_ids=torch.randint(0, 160, (1, 8)), labels=torch.randint(0, 160, (1, 8)), return_dict=False)
result["tuple_logits_shape"] = list(out[1].shape)

forward_rewrite.uninstall()
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
stock_losses, stock_none, stock_params = train(model)
result["fused_losses"], result["stock_losses"] = fused_losses, stock_losses
result["fused_logits_none"], result["stock_logits_none"] = fused_none, stock_none
result["param_err"] = max(
    ((fused_params[k] - stock_params[k]).abs().max() / stock_params[k].abs().max().clamp_min(1e-12)).item()
    for k in stock_params
)
print(json.dumps(result))
"""


def _run(tmp_path, extra_config=None):
    repo = tmp_path / "acme-tiny"
    repo.mkdir()
    for name in ("configuration_acme.py", "modeling_acme.py"):
        shutil.copy(HERE / "remote_code" / name, repo / name)
    config = {
        "model_type": "acme",
        "architectures": ["AcmeLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_acme.AcmeConfig",
            "AutoModelForCausalLM": "modeling_acme.AcmeLMHeadModel",
        },
        **(extra_config or {}),
    }
    (repo / "config.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(repo)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_remote_code_model_is_patched_and_trains_like_stock(tmp_path):
    result = _run(tmp_path)
    assert result["module"].startswith("transformers_modules."), result["module"]
    assert result["record"] == {
        "verdict": "patched",
        "reason": None,
        "installed": True,
        "origin": "rewrite",
        "head": "lm_head",
    }
    assert result["fused_logits_none"] == [True, True, True]
    assert result["stock_logits_none"] == [False, False, False]
    for fused, stock in zip(result["fused_losses"], result["stock_losses"]):
        assert abs(fused - stock) <= 1e-5 * abs(stock)
    assert result["param_err"] <= 1e-4
    assert result["tuple_logits_shape"] == [1, 8, 160]


def test_the_pretraining_tp_branch_takes_the_stock_path(tmp_path):
    """With `pretraining_tp > 1` the original computes logits from weight slices; the fused
    branch is guarded by `not (self.config.pretraining_tp > 1)`: the stock code runs."""
    result = _run(tmp_path, {"pretraining_tp": 2})
    assert result["record"]["verdict"] == "patched"
    assert result["fused_logits_none"] == [False, False, False]
    for fused, stock in zip(result["fused_losses"], result["stock_losses"]):
        assert abs(fused - stock) <= 1e-6 * abs(stock)
