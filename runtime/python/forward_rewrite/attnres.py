"""Block Attention Residuals (AttnRes, arXiv:2603.15031) retrofitted to a transformers decoder.

``apply(model, block_size=..., mode=...)`` rewrites the model's decoder: the input of each
sublayer (attention, MLP; a parallel-residual layer is one sublayer) becomes a softmax mix over
the sources ``[the embedding, the sums of completed blocks, the partial sum of the current
block]`` with weights ``softmax_i(w . RMSNorm(v_i))`` from a learned pseudo-query ``w`` per
sublayer; each sublayer's output is added to the current block's partial sum; the final hidden
state is the same mix with one more query. Modes:

* ``"retrofit"`` (default): the mix is scaled by the number of sources. With ``w = 0`` the
  weights are uniform and the mix is the plain sum of the sources, which is the standard
  residual stream: a pretrained model computes what it computed before (up to the order of
  floating-point additions).
* ``"paper"``: the plain softmax mix of the paper (for training from scratch).
* ``"additive"``: the stock residual stream plus ``alpha * sum_i softmax(q . c_i / sqrt(d)) c_i``
  added to each sublayer's output, the query ``q`` being the residual stream (the sources are
  the same block sums); identical to stock at ``alpha = 0``. It has no parameters.

The pseudo-queries and their key norms are parameters of the model (``<layer>.attnres.query``,
``<layer>.attnres.key_norm``, one row per sublayer, and the base model's ``attnres`` for the
final mix), placed on each layer's device; ``model.config.attnres`` records the settings, so
``save_pretrained`` writes both and ``apply(model)`` on the reloaded model restores them.

The forwards come from the rewriter's ``attnres`` pass (``rewriter/src/passes/attnres/``, through
``_native.rewrite_attnres_emit``): the AttnRes state travels
as explicit positional tensors between the layers, so gradient checkpointing and
``torch.compile`` keep working. The emitted code calls ``begin / finish`` (base model) and
``enter / add / leave`` (layer) below. A model that is not applied is never touched.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from . import _native

MODES = ("retrofit", "paper", "additive")
_INFO = json.loads(_native.rewrite_attnres_info())
#: The pass's reason codes and their meanings (``rewriter/src/passes/attnres/reason.rs``).
REASONS: dict[str, str] = dict(_INFO["reasons"])
#: Class-name fragments of recurrent mixers (the pass's list).
RECURRENT: tuple[str, ...] = tuple(_INFO["recurrent"])
DEFAULT_BLOCKS = 8


class AttnResError(ValueError):
    """A bad argument or state (apply twice, remove when not applied, bad mode/block_size)."""


class AttnResRefused(AttnResError):
    """The rewrite refuses the model: ``code`` is a reason code of ``REASONS``."""

    def __init__(self, qualname: str, code: str, detail: str):
        super().__init__(f"attnres refuses {qualname}: {code}: {detail}")
        self.qualname = qualname
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class _Ctx:
    offset: (
        int  # global index of this module's first sublayer (the final mix: the total)
    )
    slots: int
    block_size: int
    mode: str
    alpha: float
    eps: float


class AttnResQueries(nn.Module):
    """Pseudo-queries and the weights of their key RMSNorms, one row per sublayer."""

    def __init__(self, n: int, d: int, *, device=None, dtype=None):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n, d, device=device, dtype=dtype))
        self.key_norm = nn.Parameter(torch.ones(n, d, device=device, dtype=dtype))


# ---------------------------------------------------------------------------------------
# The mix (reference in torch; the fused op is used where it applies)


def mix_reference(
    sources, query, key_norm, *, eps: float, scale: float = 1.0, like=None
):
    """``scale * sum_i softmax_i(query . (key_norm * RMSNorm(v_i))) v_i`` over the list of
    sources, computed in float32 on the query's device; the result has ``like``'s dtype (the
    first source's when ``like`` is None)."""
    dev = query.device
    out_dtype = (like if like is not None else sources[0]).dtype
    vs = [s.to(device=dev, dtype=torch.float32) for s in sources]
    q = query.float() * key_norm.float()
    logits = torch.stack(
        [(v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)) @ q for v in vs],
        dim=-1,
    )
    w = torch.softmax(logits, dim=-1)
    if scale != 1.0:
        w = w * scale
    out = w[..., 0, None] * vs[0]
    for i in range(1, len(vs)):
        out = out + w[..., i, None] * vs[i]
    return out.to(out_dtype)


def _mix(sources, module: AttnResQueries, row: int, ctx: _Ctx, like):
    scale = float(len(sources)) if ctx.mode == "retrofit" else 1.0
    query, key_norm = module.query[row], module.key_norm[row]
    from . import _attnres_op

    if _attnres_op.usable(sources, query, like):
        return _attnres_op.mix(
            list(sources),
            query,
            key_norm,
            eps=ctx.eps,
            scale=scale,
            out_dtype=like.dtype,
        )
    return mix_reference(sources, query, key_norm, eps=ctx.eps, scale=scale, like=like)


def _additive_mix(sources, residual, alpha: float, like):
    dev = residual.device
    vs = [s.to(device=dev, dtype=torch.float32) for s in sources]
    q = residual.float()
    logits = torch.stack([(q * v).sum(-1) for v in vs], dim=-1) / math.sqrt(q.shape[-1])
    w = torch.softmax(logits, dim=-1)
    out = w[..., 0, None] * vs[0]
    for i in range(1, len(vs)):
        out = out + w[..., i, None] * vs[i]
    return (alpha * out).to(like.dtype)


# ---------------------------------------------------------------------------------------
# What the emitted forwards call


def begin(base, hidden_states):
    """The sources before the first layer: the embedding (the stream entering layer 0)."""
    return (hidden_states,)


def finish(base, hidden_states, sources):
    """The final hidden state: the mix with the base model's query (the stream in additive mode)."""
    ctx = base._attnres_ctx
    if ctx.mode == "additive":
        return hidden_states
    return _mix(tuple(sources), base.attnres, 0, ctx, hidden_states)


def enter(layer, hidden_states, sources):
    """The first sublayer's input; the state is ``(stream, *sources)`` inside the layer."""
    ctx = layer._attnres_ctx
    state = (hidden_states, *sources)
    if ctx.mode == "additive":
        return hidden_states, state
    return _mix(tuple(sources), layer.attnres, 0, ctx, hidden_states), state


def add(layer, slot: int, residual, branch, state):
    """A residual add ``residual + branch`` of sublayer ``slot``: returns the next sublayer's
    input (the stream after the last one) and the new state."""
    ctx = layer._attnres_ctx
    stream, *sources = state
    g = ctx.offset + slot
    if ctx.mode == "additive":
        new_stream = residual + (
            branch + _additive_mix(sources, residual, ctx.alpha, branch)
        )
    else:
        new_stream = stream + branch
    if g % ctx.block_size == 0:
        sources.append(branch)
    else:
        sources[-1] = sources[-1] + branch
    if ctx.mode != "additive" and slot + 1 < ctx.slots:
        nxt = _mix(tuple(sources), layer.attnres, slot + 1, ctx, branch)
    else:
        nxt = new_stream
    return nxt, (new_stream, *sources)


def leave(layer, hidden_states, state):
    """The layer's return: ``(stream, *sources)``."""
    return (state[0], *state[1:])


# ---------------------------------------------------------------------------------------
# apply / remove

_SUBCLASSES: dict[tuple[type, str], type] = {}


def _qualname(obj) -> str:
    cls = type(obj)
    return cls.__qualname__


def _defining_function(cls: type):
    """The stock forward ``cls`` runs and its class: under ``install()`` a layer's forward may
    be the residual-norm pass's patch, whose adds AttnRes replaces anyway."""
    from ._installer import stock_function

    for klass in cls.__mro__:
        if "forward" in klass.__dict__:
            return inspect.unwrap(stock_function(klass.__dict__["forward"])), klass
    raise TypeError(f"{cls.__name__} has no forward")


def _compile(source: str, fn, name: str):
    import forward_rewrite

    ns = dict(fn.__globals__)
    ns["forward_rewrite"] = forward_rewrite
    code = compile(source, f"<forward-rewrite attnres {name}>", "exec")
    exec(code, ns)  # noqa: S102
    return ns[fn.__name__]


def _subclass(cls: type, source: str, fn) -> type:
    key = (cls, source)
    sub = _SUBCLASSES.get(key)
    if sub is None:
        forward = _compile(source, fn, f"{cls.__module__}.{cls.__qualname__}")
        sub = type(
            cls.__name__,
            (cls,),
            {"forward": forward, "__module__": cls.__module__, "_attnres_stock": cls},
        )
        sub.__qualname__ = cls.__qualname__
        _SUBCLASSES[key] = sub
    return sub


def _module_lists(module) -> dict[str, nn.ModuleList]:
    """The module's non-empty ``ModuleList`` children by attribute name (``layers``, ``h``, ...)."""
    return {
        name: child
        for name, child in module.named_children()
        if isinstance(child, nn.ModuleList) and len(child) > 0
    }


def _decoder(model):
    get = getattr(model, "get_decoder", None)
    base = model
    if callable(get):
        try:
            base = get()
        except (AttributeError, NotImplementedError, ValueError):
            base = model
    if not _module_lists(base):
        base_model = getattr(model, "base_model", model)
        if _module_lists(base_model):
            base = base_model
    return base


def _layer_list(top: str, base, base_fn) -> str:
    """The attribute the base model holds its layers under: ``layers`` when it is a
    ``ModuleList``, else the one non-empty ``ModuleList`` child its forward loops over
    (GPT-2's ``h``; the pass reads the loops, ``_native.rewrite_attnres_loops``)."""
    lists = _module_lists(base)
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        if "layers" not in lists:
            raise AttnResRefused(
                top, "no-layer-loop", f"{_qualname(base)}.layers is empty"
            )
        return "layers"
    looped = json.loads(_native.rewrite_attnres_loops(inspect.getsource(base_fn)))
    if isinstance(looped, dict):
        raise AttnResError(
            f"attnres failed on {top} ({_qualname(base)}.forward): {looped['error']}"
        )
    names = [n for n in lists if n in looped]
    if len(names) != 1:
        raise AttnResRefused(
            top,
            "no-layer-loop",
            f"{_qualname(base)} has no `layers` ModuleList and its forward loops over "
            + (
                f"{len(names)} of its ModuleLists ({', '.join(names)})"
                if names
                else "none of its ModuleLists"
            ),
        )
    return names[0]


def _layers(model):
    """The base model and its layer list of an applied model."""
    base = _decoder(model)
    return base, getattr(base, model._attnres_applied["layers"])


def _config_eps(config) -> float:
    for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        v = getattr(config, name, None)
        if isinstance(v, float) and v > 0:
            return v
    return 1e-6


def _plan(model):
    """Everything `apply` needs, decided before anything is changed."""
    top = _qualname(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise AttnResRefused(
            top, "encoder-decoder", "config.is_encoder_decoder is true"
        )
    base = _decoder(model)
    base_fn, base_owner = _defining_function(type(base))
    attr = _layer_list(top, base, base_fn)
    layers = getattr(base, attr)
    classes = list(dict.fromkeys(type(layer) for layer in layers))
    if len(classes) > 1:
        names = ", ".join(c.__name__ for c in classes)
        raise AttnResRefused(
            top, "hybrid-layers", f"{_qualname(base)}.{attr} holds {names}"
        )
    layer_cls = classes[0]
    for name, sub in layers[0].named_modules():
        kind = type(sub).__name__
        if any(r in kind for r in RECURRENT) and "Norm" not in kind:
            raise AttnResRefused(
                top, "recurrent-layer", f"{layer_cls.__name__}.{name} is a {kind}"
            )
    for obj in (base, *layers):
        if (
            "attnres" in obj._modules
            or "attnres" in obj._parameters
            or "attnres" in obj.__dict__
        ):
            raise AttnResRefused(
                top, "name-conflict", f"{_qualname(obj)} already has `attnres`"
            )
    if hasattr(type(base), "_attnres_stock") or hasattr(layer_cls, "_attnres_stock"):
        raise AttnResError(f"attnres is already applied to {top}")
    layer_fn, layer_owner = _defining_function(layer_cls)
    result = json.loads(
        _native.rewrite_attnres_emit(
            inspect.getsource(base_fn), inspect.getsource(layer_fn), attr
        )
    )
    where = f"{base_owner.__name__} / {layer_owner.__name__}"
    if result["verdict"] == "refused":
        raise AttnResRefused(top, result["reason"], f"{where}: {result['detail']}")
    if result["verdict"] != "patched":
        raise AttnResError(f"attnres failed on {top} ({where}): {result['detail']}")
    slots = [count_slots(result["slots"], layer) for layer in layers]
    if any(s == 0 for s in slots):
        raise AttnResRefused(
            top, "no-residual", f"a {layer_cls.__name__} runs no residual add"
        )
    return (
        base,
        attr,
        layer_cls,
        layer_fn,
        result["layer_forward"],
        type(base),
        base_fn,
        result["model_forward"],
        slots,
    )


def count_slots(tree: list, layer) -> int:
    """The residual adds a layer instance runs: the pass's slot tree, its static ``self.``
    tests evaluated on the instance."""
    n = 0
    for node in tree:
        if "add" in node:
            n += 1
            continue
        branch = node["if"]
        if branch["test"] is None:
            n += count_slots(branch["then"], layer)
        else:
            code = compile(branch["test"], "<attnres test>", "eval")
            taken = eval(code, {"__builtins__": {}}, {"self": layer})
            n += count_slots(branch["then"] if taken else branch["orelse"], layer)
    return n


def _param_like(module: nn.Module, fallback: nn.Module):
    for p in module.parameters():
        return p.device, p.dtype
    for p in fallback.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _check_args(block_size, mode, alpha):
    if mode not in MODES:
        raise AttnResError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 1
    ):
        raise AttnResError(
            f"block_size must be a positive int (sublayers per block) or None; got {block_size!r}"
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
    ):
        raise AttnResError(f"alpha must be a finite number; got {alpha!r}")


def applied(model) -> dict | None:
    """The settings of an applied model (a copy), or None."""
    info = getattr(model, "_attnres_applied", None)
    return dict(info) if info is not None else None


def apply(
    model,
    block_size: int | None = None,
    mode: str | None = None,
    alpha: float | None = None,
    *,
    load: bool = True,
):
    """Turn the model's residual stream into Block AttnRes (see the module docstring).

    ``block_size`` counts sublayers per block (None: the sublayers split into about 8 blocks);
    ``mode`` is ``"retrofit"`` (default), ``"paper"`` or ``"additive"``; ``alpha`` scales the
    additive mix (default 0). Arguments left None come from ``model.config.attnres`` when a
    saved model carries it, and then (``load=True``) the saved pseudo-queries are read from
    the checkpoint directory ``config._name_or_path``. Raises ``AttnResRefused`` (with
    ``.code``) for a model the rewrite refuses and ``AttnResError`` for bad arguments or a
    model already applied; nothing is changed when it raises."""
    if getattr(model, "_attnres_applied", None) is not None:
        raise AttnResError(
            f"attnres is already applied to {_qualname(model)}; call remove(model) first"
        )
    saved = getattr(getattr(model, "config", None), "attnres", None)
    from_config = isinstance(saved, dict)
    if from_config:
        block_size = saved.get("block_size") if block_size is None else block_size
        mode = saved.get("mode") if mode is None else mode
        alpha = saved.get("alpha") if alpha is None else alpha
    mode = "retrofit" if mode is None else mode
    alpha = 0.0 if alpha is None else alpha
    _check_args(block_size, mode, alpha)
    (
        base,
        attr,
        layer_cls,
        layer_fn,
        layer_src,
        base_cls,
        base_fn,
        base_src,
        slots,
    ) = _plan(model)
    total = sum(slots)
    if block_size is None:
        block_size = max(1, math.ceil(total / DEFAULT_BLOCKS))
    d = (
        model.config.get_text_config().hidden_size
        if hasattr(model.config, "get_text_config")
        else model.config.hidden_size
    )
    eps = _config_eps(
        model.config.get_text_config()
        if hasattr(model.config, "get_text_config")
        else model.config
    )
    layer_sub = _subclass(layer_cls, layer_src, layer_fn)
    base_sub = _subclass(base_cls, base_src, base_fn)

    changed: list = []
    try:
        offset = 0
        for layer, n in zip(getattr(base, attr), slots):
            ctx = _Ctx(offset, n, block_size, mode, float(alpha), eps)
            offset += n
            if mode != "additive":
                device, dtype = _param_like(layer, model)
                layer.attnres = AttnResQueries(n, d, device=device, dtype=dtype)
            layer._attnres_ctx = ctx
            changed.append((layer, type(layer)))
            layer.__class__ = layer_sub
        if mode != "additive":
            device, dtype = _param_like(getattr(base, "norm", base), model)
            base.attnres = AttnResQueries(1, d, device=device, dtype=dtype)
        base._attnres_ctx = _Ctx(total, 0, block_size, mode, float(alpha), eps)
        changed.append((base, type(base)))
        base.__class__ = base_sub
        settings = {"block_size": block_size, "mode": mode, "alpha": float(alpha)}
        model._attnres_applied = dict(
            settings, sublayers=total, base=_qualname(base), layers=attr
        )
        model.config.attnres = settings
        if from_config and load and mode != "additive":
            _load_saved(model)
    except BaseException:
        _undo(model, changed)
        if not from_config and hasattr(model.config, "attnres"):
            del model.config.attnres
        raise
    return model


def _undo(model, changed):
    for module, cls in reversed(changed):
        stock = getattr(cls, "_attnres_stock", cls)
        module.__class__ = stock
        if "attnres" in module._modules:
            del module._modules["attnres"]
        module.__dict__.pop("_attnres_ctx", None)
    model.__dict__.pop("_attnres_applied", None)


def remove(model):
    """Restore the stock forwards and drop the AttnRes parameters and ``config.attnres``."""
    if getattr(model, "_attnres_applied", None) is None:
        raise AttnResError(f"attnres is not applied to {_qualname(model)}")
    base, layers = _layers(model)
    changed = [(layer, type(layer)) for layer in layers] + [(base, type(base))]
    _undo(model, changed)
    if hasattr(model.config, "attnres"):
        del model.config.attnres
    return model


def _load_saved(model):
    """Read the saved ``*.attnres.*`` tensors from the checkpoint the model was loaded from."""
    path = getattr(model.config, "_name_or_path", None) or getattr(
        model, "name_or_path", None
    )
    if not path or not os.path.isdir(path):
        return
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        return
    from safetensors import safe_open

    params = dict(model.named_parameters())
    found = 0
    for f in files:
        with safe_open(os.path.join(path, f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118
                if ".attnres." not in key and not key.startswith("attnres."):
                    continue
                p = params.get(key)
                if p is None:
                    raise AttnResError(
                        f"saved AttnRes tensor {key} has no parameter in {_qualname(model)}"
                    )
                t = st.get_tensor(key)
                if t.shape != p.shape:
                    raise AttnResError(
                        f"saved AttnRes tensor {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                    )
                with torch.no_grad():
                    p.copy_(t.to(device=p.device, dtype=p.dtype))
                found += 1
    expected = sum(1 for k in params if ".attnres." in k or k.startswith("attnres."))
    if found not in (0, expected):
        raise AttnResError(
            f"the checkpoint at {path} holds {found} of {expected} AttnRes tensors"
        )
