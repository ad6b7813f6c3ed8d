"""Attention configuration: the one source of truth (issue 9).

Every attention backend forward-rewrite knows is in one table,
``attention_backends.json`` (shipped with the package; ``forward-rewrite lint`` compiles
the same file in). This module reads it and answers three questions:

* ``canonical(name)``: the name transformers expects. Canonical names (``eager``, ``sdpa``,
  ``flash_attention_2``, ``flash_attention_3``, ``flash_attention_4``, ``flex_attention``,
  ``paged|eager``) and hub kernels (``org/repo[@rev][:fn]``) pass; short forms (``fa2``,
  ``sdp``, ``flex``, ...) raise a ValueError naming the canonical name; anything else
  raises listing the valid names.
* ``capabilities(name)``: a frozen :class:`Capabilities` computed from the table, never
  settable. Hub kernels transformers itself loads in place of a flash backend (its
  ``flash_attention_2`` fallback ``kernels-community/flash-attn2``, ...) are listed in the
  table under ``known_hub_kernels`` and get that backend's capabilities; any other hub
  kernel gets the table's conservative ``hub_kernel`` answers (no packing).
* ``of_model(model_or_config)``: the backend the model's decoder layers resolved to.

A backend registered with transformers' ``AttentionInterface`` under a name of its own has
no row in the table; ``register(name, like=..., **overrides)`` declares its capabilities
(``unregister`` removes them). Code that needs to know what a backend can do asks
``capabilities``; it never compares backend names.
"""

import dataclasses
import json
import re
import threading
from importlib import resources

__all__ = [
    "Capabilities",
    "canonical",
    "capabilities",
    "names",
    "of_model",
    "register",
    "unregister",
]

#: The table's capability keys, in the order the dataclass declares them.
_CAPABILITY_KEYS = (
    "mask",
    "supports_packing",
    "takes_varlen_kwargs",
    "needs_dtype_cast",
    "sliding_window",
    "softcap",
    "paged",
)
_MASK_KINDS = ("dense", "block", "varlen", "paged", "unknown")
#: transformers' own pattern for a hub kernel (``integrations.hub_kernels.is_kernel``).
_HUB_KERNEL = re.compile(r"^[^/:|]+/[^/:|]+(?:@[^/:|]+)?(?::[^/:|]+)?$")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an attention backend does, as transformers calls it. Built from the table only.

    ``mask``: the attention mask the backend consumes: ``dense`` (a 4D boolean/additive
    tensor: eager, sdpa), ``block`` (a flex ``BlockMask``), ``varlen`` (none: sequence
    boundaries come as ``cu_seq_lens_q/k`` + ``max_length_q/k``), ``paged`` (continuous
    batching's own), ``unknown``. ``supports_packing``: forward-rewrite can keep packed
    sequences apart on it. ``takes_varlen_kwargs``: it reads ``cu_seq_lens_q/k`` and
    ``max_length_q/k``. ``needs_dtype_cast``: it computes in 16 bits and transformers casts
    float32 inputs. ``sliding_window`` / ``softcap``: it honours a layer's sliding window /
    attention-logit soft-capping. ``paged``: it needs a paged cache. ``origin``: ``table``,
    ``hub_kernel`` (conservative answers), ``known_hub_kernel`` or ``registered``.
    """

    name: str
    mask: str
    supports_packing: bool
    takes_varlen_kwargs: bool
    needs_dtype_cast: bool
    sliding_window: bool
    softcap: bool
    paged: bool
    origin: str = "table"

    @property
    def packing_path(self):
        """How packed sequences are kept apart on this backend: ``"varlen"`` (metadata
        handed to every layer), ``"mask"`` (one block-causal mask per forward), or None
        (it cannot pack)."""
        if not self.supports_packing:
            return None
        if self.takes_varlen_kwargs:
            return "varlen"
        if self.mask in ("dense", "block"):
            return "mask"
        return None

    def as_dict(self):
        return dataclasses.asdict(self)


class _Table:
    def __init__(self, doc):
        self.doc = doc
        self.backends = {
            name: _capabilities(name, entry, "table")
            for name, entry in doc["backends"].items()
        }
        self.hub_kernel = doc["hub_kernel"]
        self.aliases = dict(doc["aliases"])
        self.legacy_flags = dict(doc["legacy_flags"])
        self.known_hub_kernels = dict(doc.get("known_hub_kernels", {}))
        self._check()

    def _check(self):
        for kind, mapping in (
            ("alias", self.aliases),
            ("legacy flag", self.legacy_flags),
            ("known hub kernel", self.known_hub_kernels),
        ):
            for short, target in mapping.items():
                if target not in self.backends:
                    raise ValueError(
                        f"attention_backends.json: {kind} {short!r} -> {target!r}, "
                        "which is not a backend"
                    )
        clash = set(self.aliases) & set(self.backends)
        if clash:
            raise ValueError(
                f"attention_backends.json: aliases that are backends: {sorted(clash)}"
            )
        for name in self.known_hub_kernels:
            if not _HUB_KERNEL.match(name):
                raise ValueError(
                    f"attention_backends.json: known hub kernel {name!r} is not org/repo"
                )
        _capabilities("hub kernel", self.hub_kernel, "hub_kernel")


def _capabilities(name, entry, origin):
    missing = [k for k in _CAPABILITY_KEYS if k not in entry]
    if missing:
        raise ValueError(f"attention backend {name!r}: missing capabilities {missing}")
    if entry["mask"] not in _MASK_KINDS:
        raise ValueError(
            f"attention backend {name!r}: mask {entry['mask']!r} is not one of {_MASK_KINDS}"
        )
    for key in _CAPABILITY_KEYS[1:]:
        if not isinstance(entry[key], bool):
            raise TypeError(f"attention backend {name!r}: {key} must be a boolean")
    caps = Capabilities(
        name=name, origin=origin, **{k: entry[k] for k in _CAPABILITY_KEYS}
    )
    if caps.supports_packing and caps.packing_path is None:
        raise ValueError(
            f"attention backend {name!r}: supports_packing needs varlen kwargs or a "
            "dense/block mask"
        )
    return caps


def _load():
    text = (
        resources.files(__package__)
        .joinpath("attention_backends.json")
        .read_text(encoding="utf-8")
    )
    doc = json.loads(text)
    if doc.get("schema") != 1:
        raise ValueError(
            f"attention_backends.json: unknown schema {doc.get('schema')!r}"
        )
    return _Table(doc)


_TABLE = _load()
_lock = threading.Lock()
#: name -> Capabilities declared with register(); replaced, never mutated (readers need
#: no lock).
_registered: dict = {}


def names():
    """The canonical backend names of the table, in table order."""
    return list(_TABLE.backends)


def _valid_names():
    return ", ".join([*_TABLE.backends, *_registered, "org/repo[@rev][:fn]"])


def canonical(name):
    """The canonical name for ``name``; raises ValueError for short forms (naming the
    canonical one), legacy switches and unknown names (listing the valid ones)."""
    if not isinstance(name, str):
        raise TypeError(f"attention backend: expected a str, got {type(name).__name__}")
    if name in _TABLE.backends or name in _registered:
        return name
    if name in _TABLE.aliases:
        raise ValueError(
            f"attention backend {name!r} is not a canonical name: use "
            f"{_TABLE.aliases[name]!r}"
        )
    if name in _TABLE.legacy_flags:
        raise ValueError(
            f"{name!r} is a legacy switch, not an attention backend: set "
            f"attn_implementation={_TABLE.legacy_flags[name]!r}"
        )
    if _HUB_KERNEL.match(name):
        return name
    if name.startswith("paged|"):
        raise ValueError(
            f"attention backend {name!r}: transformers 5 takes the paged| prefix only in "
            f"'paged|eager'; use {name.removeprefix('paged|')!r}"
        )
    raise ValueError(
        f"unknown attention backend {name!r}; valid names: {_valid_names()}"
    )


def capabilities(name):
    """The frozen :class:`Capabilities` of backend ``name`` (see ``canonical``)."""
    name = canonical(name)
    found = _registered.get(name) or _TABLE.backends.get(name)
    if found is not None:
        return found
    repo = name.split("@", 1)[0]
    if ":" not in name and repo in _TABLE.known_hub_kernels:
        like = _TABLE.backends[_TABLE.known_hub_kernels[repo]]
        return dataclasses.replace(like, name=name, origin="known_hub_kernel")
    return _capabilities(name, _TABLE.hub_kernel, "hub_kernel")


def register(name, *, like=None, **overrides):
    """Declare the capabilities of a backend the table does not have (one registered with
    transformers' ``AttentionInterface`` under its own name, or a hub kernel whose
    behaviour you know). ``like`` is a canonical backend whose capabilities are the
    starting point (default: the conservative hub-kernel answers); ``overrides`` set
    capability keys. Canonical names and short forms cannot be redefined. Returns the
    new :class:`Capabilities`."""
    if not isinstance(name, str) or not name:
        raise TypeError("register: name must be a non-empty str")
    if name in _TABLE.backends:
        raise ValueError(f"register: {name!r} is a canonical backend of the table")
    if name in _TABLE.aliases or name in _TABLE.legacy_flags:
        raise ValueError(
            f"register: {name!r} is a short form or legacy switch (see canonical())"
        )
    unknown = set(overrides) - set(_CAPABILITY_KEYS)
    if unknown:
        raise TypeError(
            f"register: unknown capabilities {sorted(unknown)}; "
            f"known: {list(_CAPABILITY_KEYS)}"
        )
    base = _TABLE.hub_kernel if like is None else capabilities(like).as_dict()
    entry = {k: base[k] for k in _CAPABILITY_KEYS}
    entry.update(overrides)
    caps = _capabilities(name, entry, "registered")
    global _registered
    with _lock:
        _registered = {**_registered, name: caps}
    return caps


def unregister(name):
    """Forget what ``register`` declared for ``name`` (no error when nothing was)."""
    global _registered
    with _lock:
        _registered = {k: v for k, v in _registered.items() if k != name}


def of_model(model_or_config):
    """The canonical backend of a model's (or config's) decoder: the text config's
    ``_attn_implementation`` for composite (vision-language, audio) configs."""
    config = getattr(model_or_config, "config", model_or_config)
    text = getattr(config, "get_text_config", None)
    if callable(text):
        try:
            config = text(decoder=True)
        except TypeError:
            config = text()
    name = getattr(config, "_attn_implementation", None)
    if name is None:
        raise ValueError(
            f"{type(config).__name__} has no resolved attention backend "
            "(_attn_implementation is None)"
        )
    return canonical(name)
