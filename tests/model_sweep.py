"""Every patched class of the installed transformers, built tiny from its own config class
and compared with its stock forward: the differential test beyond the hand-made cases of
``model_cases.py`` (shared by ``tests/test_equivalence_sweep.py`` and
``bench/equivalence.py --all``).

A config is shrunk generically: each field named in ``SHRINK`` that the config's
``__init__`` takes, and whose default is a number, gets the small value; sub-configs
(``text_config``, ``vision_config``, ...) are shrunk the same way; a ``layer_types`` list is
cut to its shortest prefix that still holds every kind of layer (hybrid models keep an
attention layer). A class whose tiny model cannot be built or run stock (a config
validator, a shape the shrink broke, a missing optional package) is *skipped* with the
error; a class that runs stock and differs patched is a *mismatch*.
"""

import contextlib
import copy
import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

import forward_rewrite
import torch
import transformers
from forward_rewrite._installer import _MODELING_MODULE
from model_cases import DECODER, VOCAB, batch, loss_and_grads, rel_err

SHRINK = {
    # decoders
    **DECODER,
    "rotary_dim": 8,
    # mixtures of experts, latent attention
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # per-layer input embeddings (Gemma 3n, Gemma 4)
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    # other spellings of the same sizes (GPT-2 style, encoders, vision towers)
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 32,
    "num_layers": 2,
    "layers": 2,
    "attention_heads": 4,
    "ffn_dim": 64,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "depth": 1,
    "embed_dim": 32,
    "num_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
    "out_hidden_size": 32,
    "vision_output_dim": 32,
    "text_hidden_size": 32,
}
#: A tiny model larger than this was not shrunk (fields under other names): skipped.
MAX_PARAMS = 8_000_000
#: Address space one class may add. A shrink that misses a size field can leave a huge
#: buffer (transformers 4.57's FalconH1 asked for 17 GB at once in its naive Mamba path):
#: under the cap the allocation fails with a Python error and the class is skipped.
MEMORY_CAP_BYTES = 8 << 30
#: The seed before each forward: dropout and router noise draw the same in both runs.
FORWARD_SEED = 5
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
#: Gradient errors are relative to max(the parameter's largest entry, this share of the
#: largest entry of any parameter). Some gradients are zero in exact arithmetic (attention
#: key biases, router weights behind a top-k) and float32 noise of 1e-11 in both runs; the
#: error of noise relative to itself means nothing, relative to the model's scale it is 0.
GRAD_FLOOR = 1e-3


#: Tried in turn when the tiny model cannot be built: wider heads, for rotary layouts
#: written for real head sizes (multimodal RoPE sections of 64 and 32 dimensions).
WIDER = (
    {},
    {"hidden_size": 256, "head_dim": 64},
    {"hidden_size": 512, "head_dim": 128},
)


_UNREADABLE = object()


def _read(config, field):
    """``config.field``, None when unset. Per-layer fields of some configs (Gemma 4)
    refuse a global read: those are _UNREADABLE, and left alone."""
    try:
        return getattr(config, field, None)
    except Exception:  # noqa: BLE001
        return _UNREADABLE


def _takes(config, field, value):
    """The config's default for ``field`` is a plain number (or unset), so ``value`` fits."""
    default = _read(config, field)
    if default is None:
        return True
    return (
        not isinstance(default, bool)
        and isinstance(default, (int, float))
        and isinstance(value, (int, float))
    )


def tiny_config(config, wider=None):
    """A new config of the same class, shrunk (see the module docstring); ``wider``
    overrides entries of SHRINK (one of WIDER)."""
    cls = type(config)
    params = inspect.signature(cls.__init__).parameters
    shrink = {**SHRINK, **(wider or {})}
    kw = {k: v for k, v in shrink.items() if k in params and _takes(config, k, v)}
    if "kv_lora_rank" in kw:  # latent attention has as many key/value heads as queries
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    types = _read(config, "layer_types")
    if "layer_types" in params and isinstance(types, (list, tuple)) and types:
        every = set(types)
        n = max(2, next(i for i in range(1, len(types) + 1) if set(types[:i]) == every))
        kw["layer_types"] = list(types[:n])
        for k in ("num_hidden_layers", "num_layers"):
            if k in params:
                kw[k] = n
    for name in params:
        sub = _read(config, name)
        if isinstance(sub, transformers.PretrainedConfig):
            kw[name] = tiny_config(sub, wider)
    return cls(**kw)


def import_all_modeling_modules():
    """Imports every module the installer targets (its own module pattern); returns those
    that failed (optional dependencies)."""
    root = Path(transformers.__file__).parent
    failed = []
    for model in pkgutil.iter_modules(transformers.models.__path__):
        for info in pkgutil.iter_modules([str(root / "models" / model.name)]):
            name = f"transformers.models.{model.name}.{info.name}"
            if not _MODELING_MODULE.match(name):
                continue
            try:
                importlib.import_module(name)
            except ImportError as exc:
                failed.append(f"{name}: {exc}")
    return failed


def patched_classes():
    """(module, qualname) of every class ``install()`` patches in the installed
    transformers, in audit order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_all_modeling_modules()
    forward_rewrite.install()
    try:
        return [
            (c["module"], c["qualname"])
            for c in forward_rewrite.audit()["classes"]
            if c["verdict"] == "patched"
        ]
    finally:
        forward_rewrite.uninstall()


def grad_error(grads, stock):
    """(worst error, its parameter) with the GRAD_FLOOR scale."""
    top = max((g.abs().max().item() for g in stock.values()), default=0.0)
    worst, name = 0.0, None
    for k, want in stock.items():
        if k not in grads:
            continue
        diff = (grads[k].double() - want.double()).abs().max().item()
        err = diff / max(want.abs().max().item(), GRAD_FLOOR * top, 1e-30)
        if err > worst:
            worst, name = err, k
    return worst, name


def _count_params(cls, config):
    """Parameters of the model, counted on the meta device (no memory, no init), so an
    unshrunk model of a billion parameters is never built; 0 when meta cannot build it
    (the real build then decides)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in cls(config).parameters())
    except Exception:  # noqa: BLE001
        return 0


@contextlib.contextmanager
def memory_cap(extra_bytes):
    """Caps the process's address space at its present size plus ``extra_bytes`` (Linux;
    elsewhere no cap), restoring the limit afterwards."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        vm_kb = int(
            next(
                line for line in status.splitlines() if line.startswith("VmSize:")
            ).split()[1]
        )
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration):
        yield
        return
    cap = vm_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _run(model, inputs):
    torch.manual_seed(FORWARD_SEED)
    return loss_and_grads(model, copy.copy(inputs))


def check_class(module, qualname, device="cpu"):
    """Stock vs patched for one class, on ``device`` (float32). Returns a dict with
    ``status`` ("verified", "mismatch" or "skipped"), ``reason`` (why skipped / what
    differs) and the errors."""
    # CUDA reserves its address space up front: no cap there (the GPU's memory bounds)
    on_cpu = torch.device(device).type == "cpu"
    with memory_cap(MEMORY_CAP_BYTES) if on_cpu else contextlib.nullcontext():
        return _check_class(module, qualname, device)


def _check_class(module, qualname, device):
    cls = getattr(sys.modules[module], qualname)
    out = {"qualname": qualname, "module": module}
    forward_rewrite.uninstall()
    inputs = {k: v.to(device) for k, v in batch().items()}
    first_failure = None  # what the report shows when no attempt builds
    for wider in WIDER:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = tiny_config(cls.config_class(), wider)
                out["params"] = _count_params(cls, config)
                if out["params"] > MAX_PARAMS:  # wider attempts would only be larger
                    reason = first_failure or f"not shrunk ({out['params']} parameters)"
                    return {**out, "status": "skipped", "reason": reason}
                torch.manual_seed(0)
                model = cls(config).float().to(device).train()
                stock_loss, _, stock_grads = _run(model, inputs)
            break
        except Exception as exc:  # noqa: BLE001  (any failure of the stock model is a skip)
            text = " ".join(
                line.strip() for line in str(exc).splitlines() if line.strip()
            )
            first_failure = first_failure or f"{type(exc).__name__}: {text[:140]}"
    else:
        return {**out, "status": "skipped", "reason": first_failure}
    forward_rewrite.patch_model(model)
    try:
        loss, logits, grads = _run(model, inputs)
    except Exception as exc:  # noqa: BLE001  (the stock model ran: this is ours)
        return {**out, "status": "mismatch", "reason": f"patched raised {exc!r}"}
    finally:
        forward_rewrite.uninstall()
    out["loss_err"] = rel_err(loss, stock_loss)
    out["grad_err"], out["worst_param"] = grad_error(grads, stock_grads)
    problems = []
    if logits is not None:
        problems.append("the fused path was not taken")
    if set(grads) != set(stock_grads):
        problems.append(
            f"gradients differ in kind: {sorted(set(grads) ^ set(stock_grads))}"
        )
    if not out["loss_err"] <= LOSS_TOL:
        problems.append(f"loss error {out['loss_err']:.1e}")
    if not out["grad_err"] <= GRAD_TOL:
        problems.append(f"gradient error {out['grad_err']:.1e} ({out['worst_param']})")
    return {
        **out,
        "status": "mismatch" if problems else "verified",
        "reason": "; ".join(problems),
    }
