"""``python -m forward_rewrite.verify --cache DIR``: the differential check of every patch in
a compiled cache (``forward-rewrite build``), with the patch that cache holds: a sound one is
verified, a broken one is reported ``verified: false`` (never a crash), unusable arguments
exit with status 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import forward_rewrite
import pytest
import torch
import transformers
from forward_rewrite import verify

ROOT = Path(__file__).resolve().parents[1]
LLAMA_DIR = Path(transformers.__file__).parent / "models" / "llama"
LLAMA = ("transformers.models.llama.modeling_llama", "LlamaForCausalLM")
FUSED_CALL = "loss = forward_rewrite.fused_lm_head_loss("


@pytest.fixture(autouse=True)
def stock_afterwards():
    forward_rewrite.uninstall()
    yield
    forward_rewrite.uninstall()


def cli():
    """The CLI binary ($FORWARD_REWRITE_BIN, else what cargo built), or skip."""
    for candidate in (
        os.environ.get("FORWARD_REWRITE_BIN"),
        ROOT / "target" / "release" / "forward-rewrite",
        ROOT / "target" / "debug" / "forward-rewrite",
    ):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("forward-rewrite not built: run `cargo build -p forward-rewrite`")


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """`forward-rewrite build` of LlamaForCausalLM from the installed transformers."""
    out = tmp_path_factory.mktemp("cache")
    subprocess.run(
        [cli(), "build", str(LLAMA_DIR), "--class", "LlamaForCausalLM"]
        + ["--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def cache(built_cache, tmp_path):
    """A copy of the built cache that a test may break."""
    copy = tmp_path / "cache"
    shutil.copytree(built_cache, copy)
    return copy


def edit_patch(cache, old, new):
    patch = next((cache / "patches").glob("*LlamaForCausalLM.py"))
    text = patch.read_text()
    assert old in text
    patch.write_text(text.replace(old, new))


def run_verify(*args):
    return subprocess.run(
        [sys.executable, "-m", "forward_rewrite.verify", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
    )


def test_python_m_verify_checks_every_entry_with_the_patch_of_the_cache(
    cache, tmp_path
):
    edit_patch(cache, "logits = None", "logits = None  # cached")  # still sound
    out = tmp_path / "results.json"
    done = run_verify("--cache", cache, "--out", out)
    assert done.returncode == 0, done.stderr
    allowlist = json.loads((cache / "allowlist.json").read_text())
    results = json.loads(out.read_text())
    assert [(r["module"], r["qualname"], r["forward_sha256"]) for r in results] == [
        (e["module"], e["qualname"], e["forward_sha256"]) for e in allowlist["entries"]
    ]
    [result] = results
    assert result["verified"] is True and result["status"] == "verified", result
    assert result["loss_err"] <= verify.LOSS_TOL
    assert result["grad_err"] <= verify.GRAD_TOL
    assert "[1/1] verified transformers.models.llama" in done.stderr


def test_check_class_runs_the_patch_of_the_cache_not_a_rewrite(cache):
    """The cache's patch is the one compared: a broken one is a mismatch there, while
    the in-process rewrite of the same class verifies."""
    edit_patch(cache, FUSED_CALL, FUSED_CALL.replace("= ", "= 2 * "))
    from_cache = verify.check_class(LLAMA, cache_dir=cache)
    assert from_cache["status"] == "mismatch", from_cache
    assert from_cache["reason"].startswith("loss error"), from_cache
    assert verify.check_class(LLAMA)["status"] == "verified"


def test_a_broken_patch_is_reported_not_verified(cache, tmp_path):
    """Wrong loss, a patch that raises, a patch that does not compile: each a result
    with ``verified: false``, none a crash."""
    cases = {
        "wrong loss": (FUSED_CALL, FUSED_CALL.replace("= ", "= 2 * ")),
        "raises": (FUSED_CALL, "undefined_name\n        " + FUSED_CALL),
        "does not compile": ("logits = None", "logits = = None"),
    }
    for name, (old, new) in cases.items():
        broken = tmp_path / name
        shutil.copytree(cache, broken)
        edit_patch(broken, old, new)
        [result] = verify.verify_cache(broken)
        assert result["verified"] is False, (name, result)
        assert result["status"] == "mismatch", (name, result)
    [raised] = verify.verify_cache(tmp_path / "raises")
    assert "NameError" in raised["reason"]
    [invalid] = verify.verify_cache(tmp_path / "does not compile")
    assert "not installed" in invalid["reason"] and "emit-invalid" in invalid["reason"]


def test_an_entry_that_cannot_be_checked_is_skipped(cache, tmp_path):
    """A module that does not import, a loose file (imported by its ``source_path``) whose
    class the installer does not patch, a hash the running forward does not have."""
    loose = tmp_path / "loose_model.py"
    loose.write_text(
        "from transformers import LlamaForCausalLM\n\n\n"
        "class LooseForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    allowlist = json.loads((cache / "allowlist.json").read_text())
    [llama] = allowlist["entries"]
    allowlist["entries"] = [
        {**llama, "module": "transformers.models.nowhere.modeling_nowhere"},
        {**llama, "module": "loose_model", "qualname": "LooseForCausalLM"}
        | {"source_path": str(loose)},
        {**llama, "forward_sha256": "0" * 64},
    ]
    (cache / "allowlist.json").write_text(json.dumps(allowlist))
    missing, loose_result, stale = verify.verify_cache(cache)
    assert missing["status"] == "skipped" and "cannot import" in missing["reason"]
    assert loose_result["status"] == "skipped", loose_result
    assert "cannot import" not in loose_result["reason"]
    assert stale["status"] == "skipped" and "no patch" in stale["reason"], stale
    assert not any(r["verified"] for r in (missing, loose_result, stale))


def test_unusable_arguments_exit_with_status_2(cache, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    allowlist = json.loads((other / "allowlist.json").read_text())
    (other / "allowlist.json").write_text(
        json.dumps({**allowlist, "tool_version": "0.0.0-other"})
    )
    not_json = tmp_path / "not-json"
    not_json.mkdir()
    (not_json / "allowlist.json").write_text("{")
    cases = [
        ([], "--cache"),
        (["--cache", tmp_path / "missing"], "not a directory"),
        (["--cache", tmp_path], "cannot read"),
        (["--cache", not_json], "not JSON"),
        (["--cache", other], "built by forward-rewrite 0.0.0-other"),
        (["--cache", cache, "--device", "tpu"], "--device"),
        (["--cache", cache, "--out", tmp_path / "no" / "r.json"], "--out"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--cache", cache, "--device", "cuda"], "no CUDA device"))
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            verify.main([str(a) for a in args])
        assert exit_info.value.code == 2, args
        assert message in capsys.readouterr().err, args
    done = run_verify("--cache", tmp_path / "missing")
    assert done.returncode == 2 and "not a directory" in done.stderr, done.stderr


def test_build_verify_records_the_outcome_in_the_allowlist(tmp_path):
    """`forward-rewrite build --verify` end to end: the CLI runs this interpreter's
    `python -m forward_rewrite.verify` on the cache it wrote and marks the entry verified,
    and `install(cache_dir=..., verified_only=True)` then puts that patch in place."""
    out = tmp_path / "cache"
    done = subprocess.run(
        [cli(), "build", str(LLAMA_DIR), "--class", "LlamaForCausalLM"]
        + ["--out", str(out), "--verify", "--python", sys.executable],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    entries = json.loads((out / "allowlist.json").read_text())["entries"]
    (entry,) = [e for e in entries if e["qualname"] == "LlamaForCausalLM"]
    assert entry["verified"] is True, entry
    forward_rewrite.install(cache_dir=out, verified_only=True)
    model = verify.tiny_model(transformers.LlamaForCausalLM)
    assert forward_rewrite.audit()["summary"]["verified"] >= 1
    loss = model(**verify.tiny_inputs(model)).loss
    assert torch.isfinite(loss)
