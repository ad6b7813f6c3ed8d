"""The installer (``install``, ``uninstall``, ``patch_model``, ``audit``) on the real
transformers package: the import hook and the sweep, the compiled cache bound by hashes,
the checks that keep a class stock, readable tracebacks, the version floor, and agreement
with the CLI's audit on every modeling module transformers ships."""

import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import forward_rewrite
import pytest
import torch
import transformers
from forward_rewrite import _installer as installer
from forward_rewrite.verify import import_all_modeling_modules
from model_cases import batch, build, loss_and_grads
from transformers.models.llama import modeling_llama

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS_DIR = Path(transformers.__file__).parent


@pytest.fixture(autouse=True)
def stock_afterwards():
    forward_rewrite.uninstall()
    yield
    forward_rewrite.uninstall()


def cli():
    """The CLI binary: $FORWARD_REWRITE_BIN, else the newest build of cargo's (scripts/test
    runs cargo test first, which builds target/debug/forward-rewrite)."""
    if os.environ.get("FORWARD_REWRITE_BIN"):
        return os.environ["FORWARD_REWRITE_BIN"]
    built = [
        path
        for path in (
            ROOT / "target" / "release" / "forward-rewrite",
            ROOT / "target" / "debug" / "forward-rewrite",
        )
        if path.is_file()
    ]
    if not built:
        raise AssertionError(
            "forward-rewrite not built: run `cargo build -p forward-rewrite`"
        )
    return str(max(built, key=lambda path: path.stat().st_mtime))


def entry(qualname):
    return next(
        c for c in forward_rewrite.audit()["classes"] if c["qualname"] == qualname
    )


def test_install_in_a_fresh_interpreter_patches_a_tiny_llama():
    """The issue's acceptance line: import, install, build a tiny Llama, read audit()."""
    code = """
import json, torch, forward_rewrite, transformers
forward_rewrite.install()
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).train()
ids = torch.randint(0, 64, (2, 8))
out = model(input_ids=ids, labels=ids)
out.loss.backward()
entry = [c for c in forward_rewrite.audit()["classes"] if c["qualname"] == "LlamaForCausalLM"]
print(json.dumps({"entry": entry[0], "logits": out.logits is None,
                  "hook": forward_rewrite.audit()["installed"]}))
"""
    env = {**os.environ, "FORWARD_REWRITE_CACHE": "/nonexistent/forward-rewrite"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entry"]["verdict"] == "patched"
    assert result["entry"]["installed"] and result["entry"]["origin"] == "rewrite"
    assert result["logits"], "the patched forward did not fuse"
    assert result["hook"]


def test_sweep_patches_imported_modules_and_uninstall_restores_the_stock_forward():
    stock = modeling_llama.LlamaForCausalLM.forward
    summary = forward_rewrite.install()
    assert summary["installed"] >= 1
    patched = modeling_llama.LlamaForCausalLM.forward
    assert patched is not stock
    assert patched.__forward_rewrite__["head"] == "lm_head"
    assert patched.__qualname__ == "LlamaForCausalLM.forward"
    assert modeling_llama.forward_rewrite is forward_rewrite
    forward_rewrite.uninstall()
    assert modeling_llama.LlamaForCausalLM.forward is stock
    assert "forward_rewrite" not in vars(modeling_llama)
    assert forward_rewrite.audit()["classes"] == []
    assert not any(isinstance(f, installer._PatchingFinder) for f in sys.meta_path)


def test_the_import_hook_patches_modules_imported_after_install():
    name = "transformers.models.olmo.modeling_olmo"
    saved = sys.modules.pop(name, None)
    try:
        forward_rewrite.install()
        module = importlib.import_module(name)
        assert getattr(module.OlmoForCausalLM.forward, "__forward_rewrite__", None)
        assert entry("OlmoForCausalLM")["installed"]
        # inspect still finds the module's source through the wrapping loader
        assert "class OlmoForCausalLM" in module.__loader__.get_source(name)
    finally:
        forward_rewrite.uninstall()
        if saved is not None:
            sys.modules[name] = saved
            transformers.models.olmo.modeling_olmo = saved


def test_inference_is_untouched_and_eval_takes_the_stock_path():
    model = build("llama")
    inputs = batch()
    with torch.no_grad():
        stock_logits = model(input_ids=inputs["input_ids"]).logits
        stock_eval = model.eval()(**inputs)
    model.train()
    forward_rewrite.patch_model(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=inputs["input_ids"]).logits, stock_logits)
        out = model.eval()(**inputs)
    assert torch.equal(out.logits, stock_eval.logits)
    assert torch.equal(out.loss, stock_eval.loss)


def test_tuple_returns_keep_the_positions_of_stock():
    """`return_dict=False` in a training step: `to_tuple()` drops None fields, so a fused
    step would put the cache where the logits belong; the tuple guard takes the stock path.
    (The fused loss alone: the decoder fusions of a training step round otherwise than
    stock, within float32, so the logits would not be bitwise equal.)"""
    model = build("llama").train()
    inputs = batch()
    torch.manual_seed(0)
    stock = model(**inputs, use_cache=True, return_dict=False)
    forward_rewrite.patch_model(model, passes=("fused-loss",))
    assert model(**inputs).logits is None  # the fused path runs for ModelOutput returns
    torch.manual_seed(0)
    out = model(**inputs, use_cache=True, return_dict=False)
    assert len(out) == len(stock)
    assert torch.equal(out[1], stock[1])  # logits, not the cache
    assert torch.allclose(out[0], stock[0])


def test_a_user_replaced_loss_function_runs_the_original_code(caplog):
    model = build("llama")
    forward_rewrite.patch_model(model)
    calls = []

    def my_loss(logits, labels, vocab_size, **kwargs):
        calls.append(logits.shape)
        return logits.float().mean()

    model.loss_function = my_loss
    with caplog.at_level(logging.WARNING, logger="forward_rewrite"):
        out = model(**batch())
    assert calls and out.logits is not None
    assert torch.equal(out.loss, out.logits.float().mean())
    assert "custom-loss-function" in caplog.text


def test_patch_model_patches_the_transformers_base_of_a_user_subclass():
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    model = MyLlama(build("llama").config).train()
    forward_rewrite.patch_model(model)
    assert entry("LlamaForCausalLM")["installed"]
    loss, logits, _ = loss_and_grads(model, batch())
    assert logits is None and torch.isfinite(loss)


def test_tracebacks_show_the_patched_source():
    model = build("llama")
    forward_rewrite.patch_model(model)
    inputs = batch()
    inputs["labels"] = inputs["labels"].float()
    with pytest.raises(TypeError, match="labels") as raised:
        model(**inputs)
    text = "".join(traceback.format_exception(raised.value))
    assert "<forward-rewrite transformers.models.llama.modeling_llama" in text
    assert "forward_rewrite.fused_lm_head_loss(" in text


def test_a_module_binding_the_runtime_name_is_refused():
    modeling_llama.forward_rewrite = "something else"
    try:
        forward_rewrite.patch_model(build("llama"))
        record = entry("LlamaForCausalLM")
    finally:
        del modeling_llama.forward_rewrite
    assert (record["verdict"], record["reason"], record["installed"]) == (
        "refused",
        "name-conflict",
        False,
    )
    assert "forward_rewrite" not in getattr(
        modeling_llama.LlamaForCausalLM.forward, "__dict__", {}
    )


def test_a_replaced_forward_is_not_patched():
    """Someone else's forward on the class (another patcher): the source inspect finds
    is not what the rewriter read in the module, so the class stays as it is."""
    original = modeling_llama.LlamaForCausalLM.forward

    def forward(self, input_ids=None, labels=None, **kwargs):
        return original(self, input_ids=input_ids, labels=labels, **kwargs)

    modeling_llama.LlamaForCausalLM.forward = forward
    try:
        forward_rewrite.patch_model(build("llama"))
        record = entry("LlamaForCausalLM")
        assert modeling_llama.LlamaForCausalLM.forward is forward
    finally:
        modeling_llama.LlamaForCausalLM.forward = original
    assert (record["verdict"], record["reason"]) == ("failed", "source-mismatch")


def test_transformers_older_than_the_floor_gets_one_warning_and_no_patches(monkeypatch):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.44.2")
    monkeypatch.setattr(installer._state, "warned_version", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward_rewrite.install()
        forward_rewrite.install()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "older than 4.45" in messages[0], messages
    assert forward_rewrite.audit()["classes"] == []
    assert not hasattr(modeling_llama.LlamaForCausalLM.forward, "__forward_rewrite__")


# ---------------------------------------------------------------------- compiled cache


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """`forward-rewrite build` over the llama modeling file of the installed transformers."""
    out = tmp_path_factory.mktemp("cache")
    subprocess.run(
        [cli(), "build", str(TRANSFORMERS_DIR / "models" / "llama"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _edit_patch(cache, qualname, edit, fix_sha=True):
    """Change a cached patch file; with ``fix_sha`` the allowlist follows (as a build
    would have written it), without it the file no longer matches its entry."""
    allow = json.loads((cache / "allowlist.json").read_text())
    entry_ = next(e for e in allow["entries"] if e["qualname"] == qualname)
    patch = cache / entry_["patch"]
    patch.write_text(edit(patch.read_text()))
    if fix_sha:
        entry_["patch_sha256"] = hashlib.sha256(patch.read_bytes()).hexdigest()
        (cache / "allowlist.json").write_text(json.dumps(allow))
    return allow


def test_the_compiled_cache_is_used_when_the_hash_is_allowed(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    # Mark the cached patch so that we can see it is the one that runs.
    _edit_patch(
        cache,
        "LlamaForCausalLM",
        lambda text: text.replace("logits = None", "logits = None  # cached"),
    )
    forward_rewrite.install(cache_dir=cache)
    record = entry("LlamaForCausalLM")
    assert (record["origin"], record["installed"]) == ("cache", True)
    assert forward_rewrite.audit()["cache_dir"] == str(cache)
    assert forward_rewrite.audit()["summary"]["from_cache"] >= 1
    source = "".join(
        installer.linecache.getlines(
            "<forward-rewrite transformers.models.llama.modeling_llama."
            "LlamaForCausalLM.forward>"
        )
    )
    assert "# cached" in source
    loss, logits, _ = loss_and_grads(build("llama"), batch())
    assert logits is None and torch.isfinite(loss)


def test_a_cache_entry_for_other_source_is_never_used(built_cache, tmp_path):
    """Invariant 4: a transformers upgrade changes the forward's hash; the old patch must
    not run. Simulated by an allowlist whose hash is not the running forward's."""
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    stale = "0" * 64
    allow = json.loads((cache / "allowlist.json").read_text())
    audit_doc = json.loads((cache / "audit.json").read_text())
    for item in allow["entries"] + audit_doc["classes"]:
        if item["qualname"] == "LlamaForCausalLM":
            item["forward_sha256"] = stale
    (cache / "allowlist.json").write_text(json.dumps(allow))
    (cache / "audit.json").write_text(json.dumps(audit_doc))
    forward_rewrite.install(cache_dir=cache)
    record = entry("LlamaForCausalLM")
    assert (record["origin"], record["installed"]) == ("rewrite", True)


def test_a_tampered_or_foreign_patch_file_is_ignored_with_a_warning(
    built_cache, tmp_path
):
    """Cache integrity: the patch file's bytes must hash to the allowlist's patch_sha256
    and its header must name the entry's forward; otherwise the in-process rewrite runs."""
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    _edit_patch(
        cache,
        "LlamaForCausalLM",
        lambda text: text.replace("logits = None", "logits = 0"),
        fix_sha=False,
    )
    with pytest.warns(UserWarning, match="ignoring the cached patch .* hashes to"):
        forward_rewrite.install(cache_dir=cache)
    assert entry("LlamaForCausalLM")["origin"] == "rewrite"
    assert entry("LlamaForCausalLM")["installed"]
    forward_rewrite.uninstall()

    cache = tmp_path / "cache2"
    shutil.copytree(built_cache, cache)
    _edit_patch(
        cache,
        "LlamaForCausalLM",
        lambda text: text.replace(
            "# original forward sha256: ", "# original forward sha256: 0"
        ),
    )
    with pytest.warns(UserWarning, match="made for another forward"):
        forward_rewrite.install(cache_dir=cache)
    assert entry("LlamaForCausalLM")["origin"] == "rewrite"


def test_a_corrupted_allowlist_is_ignored_with_a_warning(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    text = (cache / "allowlist.json").read_text()
    (cache / "allowlist.json").write_text(text[: len(text) // 2])
    with pytest.warns(UserWarning, match="not using the compiled cache"):
        forward_rewrite.install(cache_dir=cache)
    assert entry("LlamaForCausalLM")["origin"] == "rewrite"
    assert entry("LlamaForCausalLM")["installed"]


def test_verified_only_installs_only_verified_patches(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    allow = json.loads((cache / "allowlist.json").read_text())
    for e in allow["entries"]:
        e["verified"] = e["qualname"] == "LlamaForCausalLM"
    (cache / "allowlist.json").write_text(json.dumps(allow))
    forward_rewrite.install(cache_dir=cache, verified_only=True)
    llama = entry("LlamaForCausalLM")
    assert (llama["origin"], llama["installed"], llama["verified"]) == (
        "cache",
        True,
        True,
    )
    assert forward_rewrite.audit()["verified_only"] is True
    # Classes of other modules have no verified patch: left stock, and said why.
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401

    qwen = entry("Qwen3ForCausalLM")
    assert (qwen["installed"], qwen["reason"]) == (False, "not-verified")
    with pytest.raises(TypeError, match="^verified_only"):
        forward_rewrite.install(verified_only="yes")


def test_a_cache_of_another_tool_version_is_ignored_with_a_warning(
    built_cache, tmp_path
):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    allow = json.loads((cache / "allowlist.json").read_text())
    allow["tool_version"] = "0.0.0-other"
    (cache / "allowlist.json").write_text(json.dumps(allow))
    with pytest.warns(UserWarning, match="built by forward-rewrite 0.0.0-other"):
        forward_rewrite.install(cache_dir=cache)
    assert entry("LlamaForCausalLM")["origin"] == "rewrite"
    assert forward_rewrite.audit()["cache_dir"] is None


def test_the_cache_directory_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FORWARD_REWRITE_CACHE", str(tmp_path / "env"))
    assert installer._resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("FORWARD_REWRITE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (
        installer._resolve_cache_dir(None)
        == tmp_path / "xdg" / "forward-rewrite" / "compiled"
    )
    assert installer._resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


# ------------------------------------------------------- every class transformers ships


def test_install_agrees_with_the_cli_on_every_class_transformers_ships(tmp_path):
    """Import every PyTorch modeling module of the installed transformers, install, and
    compare each class's verdict, reason and forward hash with `forward-rewrite scan`.
    Every patched class must also be installed: its running forward's source (inspect)
    hashes as the rewriter's cut of the module does (contract 2)."""
    audit_path = tmp_path / "audit.json"
    with audit_path.open("w") as out:
        subprocess.run(
            [cli(), "scan", str(TRANSFORMERS_DIR), "--json"], stdout=out, check=True
        )
    by_cli = {
        (c["module"], c["qualname"]): c
        for c in json.loads(audit_path.read_text())["classes"]
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        not_importable = import_all_modeling_modules()  # optional deps (torchaudio)
    assert len(not_importable) <= 3, not_importable
    forward_rewrite.install()
    installed = forward_rewrite.audit()["classes"]
    # every class the CLI found, but for those without a forward (the Auto classes) and
    # those in modules that could not be imported
    assert len(installed) >= 0.95 * len(by_cli), (len(installed), len(by_cli))
    differ = []
    for c in installed:
        want = by_cli[(c["module"], c["qualname"])]
        got_key = (c["verdict"], c["reason"], c["forward_sha256"], c["transforms"])
        want_key = (
            want["verdict"],
            want["reason"],
            want["forward_sha256"],
            want["transforms"],
        )
        if got_key != want_key:
            differ.append((c["qualname"], got_key[:2], want_key[:2], c["detail"]))
        if c["verdict"] == "patched":
            assert c["installed"], c
        # the decoder-fusion passes: the same verdicts per pass and site, and every site the
        # CLI patches is put in place (its running source hashes as the rewriter's cut)
        # (packing reads other modules in the CLI, only the class's own at install time;
        # attnres is not an install() pass)
        for name, report in (want.get("passes") or {}).items():
            if name not in ("rms-norm", "rotary", "gated-mlp"):
                continue
            mine = c["passes"][name]
            want_sites = [(s["name"], s["reason"]) for s in report["sites"]]
            got_sites = [(s["name"], s["reason"]) for s in mine["sites"]]
            if (mine["verdict"], mine["reason"], got_sites) != (
                report["verdict"],
                report["reason"],
                want_sites,
            ):
                differ.append((c["qualname"], name, got_sites, want_sites))
    assert differ == []
