"""Import-time installation of rewritten forwards into transformers' model classes.

``install()`` puts a meta-path hook in front of ``transformers.models.*.modeling_*`` and
``transformers_modules.*`` (remote code) imports, wraps transformers' loader of remote code
(``dynamic_module_utils.get_class_in_module``, which executes modules without the import
system), and sweeps the modules already imported. For each class the rewriter's candidate
rule selects (a model class whose forward computes a language-model loss, or a class named
``*ForCausalLM`` / ``*ForConditionalGeneration`` / ``*LMHeadModel``; ``candidate.rs``) it
hashes the forward the class runs (contract 2), takes the patch from the compiled cache when
the hash is in the cache's allowlist and the patch file is intact, and otherwise asks the
Rust rewriter in-process (the code the CLI runs). A patched forward is
executed in the namespace of the module that defines the original, with its source in
``linecache`` so tracebacks show the code that ran. Everything is recorded for ``audit()``.

Before a patch replaces a forward, four facts must agree, or the class is left stock
(invariants 1 and 4): the hash of the source ``inspect`` finds for the running forward
equals the hash the patch was made from; the forward the class runs is defined in the
module and class the rewriter saw; the module does not bind the name ``forward_rewrite`` to
something else; and the forward needs no class cell (``super()``) or private-name mangling,
which a function compiled outside its class body would lose.
"""

import functools
import hashlib
import importlib.abc
import inspect
import json
import linecache
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path

from . import _experts_forward, _native, fusion_guard, packing

__all__ = ["audit", "install", "patch_model", "uninstall"]

logger = logging.getLogger("forward_rewrite")

#: Oldest transformers the installer patches: 4.45 is the oldest pinned release the tests
#: run (its forwards are all in the classic shift + CrossEntropyLoss style).
MIN_TRANSFORMERS = (4, 45)

#: Modules install() patches as they are imported: transformers' PyTorch modeling modules
#: and remote code (``transformers_modules.<org>.<repo>.<revision>.<module>``).
_MODELING_MODULE = re.compile(
    r"^(?:transformers\.models\.\w+\.modeling_(?!tf_|flax_)\w+"
    r"|transformers_modules(?:\.\w+)+)$",
    re.ASCII,
)
#: The global name the emitted code reaches the runtime by (contract 3).
_RUNTIME_GLOBAL = "forward_rewrite"
#: Allowlist schema this runtime reads (ARCHITECTURE.md, "compiled cache").
_ALLOWLIST_SCHEMA = 2
#: The patch file line that names the forward it was made from (``cache.rs``).
_PATCH_SHA_PREFIX = "# original forward sha256: "


class _Record:
    """What happened to one class: the rewriter's report (its verdict updated when the
    installer refused to put the patch in place) and where the patch came from."""

    def __init__(self, report, origin):
        self.report = report
        self.origin = origin  # "cache" | "rewrite"
        self.installed = False

    def refuse(self, reason, detail, verdict="refused"):
        self.report.update(verdict=verdict, reason=reason, detail=detail)
        self.report.pop("patched_forward", None)

    def as_dict(self):
        entry = {k: v for k, v in self.report.items() if k != "patched_forward"}
        if entry.get("passes"):
            entry["passes"] = {
                name: {
                    **report,
                    "sites": [
                        {k: v for k, v in site.items() if k != "patch"}
                        for site in report.get("sites", [])
                    ],
                }
                for name, report in entry["passes"].items()
            }
        entry["origin"] = self.origin
        entry["installed"] = self.installed
        return entry


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.finder = None
        self.cache = None
        #: class -> _Record
        self.records = {}
        #: patched class -> its own ``forward`` before patching (None: it inherited one)
        self.originals = {}
        #: names of modules we added the runtime global to
        self.injected = set()
        #: module name -> {qualname: class source dict}, from the module's text
        self.module_classes = {}
        #: classes the candidate rule left out (not recorded in the audit)
        self.not_candidates = set()
        self.warned_version = False
        #: install(verified_only=True): only patches the compiled cache marks verified
        self.verified_only = False
        #: (module, name, original) of the remote-code loader we wrapped
        self.wrapped_loader = None
        #: install(passes=...): whether the fused-loss patch is installed, and the names of
        #: the passes beyond it that run (None: every pass this build knows)
        self.fused_loss = True
        self.passes = None
        #: (module name, kind, site name) -> (status, detail) of each decoder-fusion site
        #: the installer handled: ("installed", "") or (reason, detail)
        self.sites = {}
        #: (module name, kind, site name) -> (holder, attribute, original value) to restore
        self.site_originals = {}
        #: module name -> its source text (the passes read the whole module)
        self.module_texts = {}
        #: site key -> the pass that installed it
        self.site_passes = {}


_state = _State()


# ------------------------------------------------------------------------ public API


#: The base pass's name in ``install(passes=...)`` (the others come from ``_native``).
FUSED_LOSS = "fused-loss"


#: Registered passes that ``install()`` does not apply: Attention Residuals changes the
#: model, so it is opt-in per model (``forward_rewrite.attnres.apply``).
OPT_IN_PASSES = ("attnres",)


def pass_names():
    """Every pass ``install(passes=...)`` accepts: ``fused-loss`` and the registered ones
    (``rms-norm``, ``residual-norm``, ``rotary``, ``gated-mlp``, ``packing``), without the
    opt-in ones."""
    return (
        FUSED_LOSS,
        *(n for n in _native.rewrite_pass_names() if n not in OPT_IN_PASSES),
    )


def _select_passes(passes):
    known = pass_names()
    if passes is None:
        return True, list(known[1:])
    if isinstance(passes, str):
        passes = (passes,)
    try:
        names = list(passes)
    except TypeError:
        raise TypeError(
            f"passes: expected an iterable of pass names, got {type(passes).__name__}"
        ) from None
    for name in names:
        if name not in known:
            raise ValueError(
                f"passes: unknown pass {name!r} (known: {', '.join(known)})"
            )
    return FUSED_LOSS in names, [n for n in known[1:] if n in names]


def install(cache_dir=None, verified_only=False, passes=None):
    """Patch every eligible model class, now and as modules are imported.

    ``cache_dir`` is a directory written by ``forward-rewrite build --out DIR``; default
    ``$FORWARD_REWRITE_CACHE``, else ``forward-rewrite/compiled`` under the user cache dir
    (``$XDG_CACHE_HOME`` or ``~/.cache``). A missing cache is fine: classes are then
    rewritten in-process. With ``verified_only=True`` only patches that
    ``forward-rewrite build --verify`` verified are installed (every other class stays
    stock, reported ``not-verified``). ``passes`` names the passes to apply (``pass_names()``:
    ``fused-loss``, ``rms-norm``, ``residual-norm`` (fuses only into norms ``rms-norm`` put in
    place), ``rotary``, ``gated-mlp``, ``packing``); default every one, e.g.
    ``passes=("fused-loss",)`` for the fused loss alone; an unknown name is a ValueError.
    Calling ``install()`` again re-reads the cache and patches what is new (call
    ``uninstall()`` first to change the passes). Returns ``audit()``'s summary.
    """
    if not isinstance(verified_only, bool):
        raise TypeError(
            f"verified_only: expected a bool, got {type(verified_only).__name__}"
        )
    fused_loss, selected = _select_passes(passes)
    with _state.lock:
        _state.fused_loss, _state.passes = fused_loss, selected
        if not _transformers_supported():
            return audit()["summary"]
        _state.cache = _CompiledCache.load(_resolve_cache_dir(cache_dir))
        _state.verified_only = verified_only
        if _state.finder is None:
            _state.finder = _PatchingFinder()
            sys.meta_path.insert(0, _state.finder)
        _wrap_remote_code_loader()
        for name, module in list(sys.modules.items()):
            if module is not None and _MODELING_MODULE.match(name):
                _patch_module(module)
        return audit()["summary"]


def uninstall():
    """Remove the import hook and restore every stock forward."""
    with _state.lock:
        if _state.finder is not None:
            sys.meta_path[:] = [f for f in sys.meta_path if f is not _state.finder]
            _state.finder = None
        if _state.wrapped_loader is not None:
            module, name, original = _state.wrapped_loader
            setattr(module, name, original)
            _state.wrapped_loader = None
        _state.verified_only = False
        for holder, attribute, original in _state.site_originals.values():
            if isinstance(holder, dict):
                holder[attribute] = original
            else:
                setattr(holder, attribute, original)
        _state.site_originals.clear()
        fusion_guard.forget_norms()
        _experts_forward.uninstall()
        _state.sites.clear()
        _state.site_passes.clear()
        _state.module_texts.clear()
        _state.fused_loss, _state.passes = True, None
        for cls, original in _state.originals.items():
            if original is None:
                if "forward" in cls.__dict__:
                    delattr(cls, "forward")
            else:
                cls.forward = original
        for name in _state.injected:
            module = sys.modules.get(name)
            if module is not None:
                module.__dict__.pop(_RUNTIME_GLOBAL, None)
        for filename in [
            f for f in linecache.cache if f.startswith("<forward-rewrite ")
        ]:
            del linecache.cache[filename]
        packing.disable()  # packing hook (issue 9)
        packing.reset()
        _state.originals.clear()
        _state.injected.clear()
        _state.records.clear()
        _state.module_classes.clear()
        _state.not_candidates.clear()


def patch_model(model, cache_dir=None, passes=None):
    """Patch the classes of a model that is already built; returns the model.

    Every candidate class (see ``install()``) in the MRO of the model and of its submodules
    is patched, whatever module defines it: transformers', remote code, or a user's own
    module whose source ``inspect`` can read (a user's subclass that does not override
    ``forward`` runs its base's patched forward). Classes are patched, not instances, as
    ``install()`` would have done; ``uninstall()`` undoes it. ``passes`` as for
    ``install()`` (default: those of the last ``install()``, else every pass).
    """
    selection = _select_passes(passes) if passes is not None else None
    with _state.lock:
        if not _transformers_supported():
            return model
        if selection is not None:
            _state.fused_loss, _state.passes = selection
        if _state.cache is None or cache_dir is not None:
            _state.cache = _CompiledCache.load(_resolve_cache_dir(cache_dir))
        for submodule in model.modules():
            for klass in type(submodule).__mro__:
                if _is_model_source(klass.__module__) and _may_be_target(klass):
                    _patch_class(klass)
    return model


def audit():
    """A JSON-safe report of every class the installer looked at.

    The shape of the CLI's audit document (``schema``, ``tool_version``,
    ``transformers_version``, ``summary``, ``classes`` with ``qualname``, ``module``,
    ``verdict``, ``reason``, ``forward_sha256``, ``head``, ``transforms``, ...), plus per
    class ``origin`` (``cache``: the patch came from the compiled cache; ``rewrite``: the
    rewriter ran in-process), ``installed`` (the patched forward is in place) and
    ``verified`` (what ``build --verify`` recorded for a cached patch: true / false; null
    when not checked), and at the top ``installed`` (the import hook is active),
    ``verified_only`` and ``cache_dir``. A patch the installer would not put in place is
    reported with its reason (``source-mismatch``, ``needs-class-body``, ``name-conflict``,
    ``source-unavailable``, ``not-verified``; README). Run time: per class ``calls`` (the
    guard's decisions so far: ``fused``, ``routes``, ``fallback`` by reason; null before
    the first training call) and at the top ``runtime`` (``forward_rewrite.stats()``).
    """
    from . import _stats

    with _state.lock:
        classes = sorted(
            (
                {**r.as_dict(), "packing_runtime": packing.report(cls)}  # issue 9
                for cls, r in _state.records.items()
            ),
            key=lambda c: (c["module"], c["qualname"]),
        )
        for c in classes:
            c["calls"] = _stats.for_class(c["module"], c["qualname"])
        reasons = {}
        for c in classes:
            if c["reason"] is not None:
                reasons[c["reason"]] = reasons.get(c["reason"], 0) + 1
        summary = {
            "classes": len(classes),
            **{
                v: sum(c["verdict"] == v for c in classes)
                for v in ("patched", "refused", "failed")
            },
            "installed": sum(c["installed"] for c in classes),
            "from_cache": sum(
                c["installed"] and c["origin"] == "cache" for c in classes
            ),
            "verified": sum(c.get("verified") is True for c in classes),
            "reasons": reasons,
            "passes": _pass_summary(classes),
        }
        cache = _state.cache
        return {
            "schema": 1,
            "tool_version": _native.__version__,
            "transformers_version": _transformers_version(),
            "installed": _state.finder is not None,
            "verified_only": _state.verified_only,
            "passes": [FUSED_LOSS] * _state.fused_loss
            + list(_state.passes if _state.passes is not None else pass_names()[1:]),
            "cache_dir": str(cache.root) if cache is not None and cache.root else None,
            "summary": summary,
            "classes": classes,
            "runtime": _stats.stats(),
        }


def _pass_summary(classes):
    """Per pass beyond the fused loss: classes per verdict, reasons, sites installed."""
    out = {}
    for c in classes:
        for name, report in (c.get("passes") or {}).items():
            entry = out.setdefault(
                name, {"verdicts": {}, "reasons": {}, "sites_installed": 0}
            )
            verdict = report.get("verdict")
            entry["verdicts"][verdict] = entry["verdicts"].get(verdict, 0) + 1
            if report.get("reason"):
                entry["reasons"][report["reason"]] = (
                    entry["reasons"].get(report["reason"], 0) + 1
                )
    for name, entry in out.items():
        entry["sites_installed"] = sum(
            1
            for key, (status, _) in _state.sites.items()
            if status == "installed" and _state.site_passes.get(key) == name
        )
    return out


# ----------------------------------------------------------------------- import hook


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds modeling modules through the other finders; patches them once executed."""

    def find_spec(self, fullname, path, target=None):
        if not _MODELING_MODULE.match(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
            return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        with _state.lock:
            if _state.finder is not None:
                _patch_module(module)

    def __getattr__(self, name):
        # get_source, get_filename, is_package, ...: inspect and linecache ask the loader.
        return getattr(self._inner, name)


def _wrap_remote_code_loader():
    """transformers executes remote code with ``spec_from_file_location`` +
    ``exec_module``, not through the import system, so the meta-path hook never sees it:
    wrap the function that does it (``dynamic_module_utils.get_class_in_module``), so its
    module is patched right after it ran. ``uninstall()`` puts the original back."""
    if _state.wrapped_loader is not None:
        return
    try:
        from transformers import dynamic_module_utils as loader_module
    except ImportError:
        return
    original = getattr(loader_module, "get_class_in_module", None)
    if original is None:
        return

    @functools.wraps(original)
    def get_class_in_module(*args, **kwargs):
        cls = original(*args, **kwargs)
        with _state.lock:
            module = sys.modules.get(getattr(cls, "__module__", None) or "")
            if _state.finder is not None and module is not None:
                _patch_module(module)
        return cls

    loader_module.get_class_in_module = get_class_in_module
    _state.wrapped_loader = (loader_module, "get_class_in_module", original)


# ------------------------------------------------------------------- per-class work


def _patch_module(module):
    for value in list(vars(module).values()):
        if (
            isinstance(value, type)
            and value.__module__ == module.__name__
            and _may_be_target(value)
        ):
            _patch_class(value)


def _may_be_target(cls):
    """A cheap pre-filter before the rewriter's candidate rule: a torch module with a
    forward (the rule itself runs on the class sources, as in the CLI)."""
    import torch

    return (
        isinstance(cls, type)
        and issubclass(cls, torch.nn.Module)
        and ("forward" in dir(cls))
    )


def _is_model_source(module_name):
    """Modules whose classes can be model classes the rewriter reads: everything but torch
    and transformers' own base modules (transformers' model modules and remote code are
    in)."""
    if _MODELING_MODULE.match(module_name):
        return True
    top = module_name.split(".", 1)[0]
    return top not in ("torch", "transformers", "builtins", "forward_rewrite")


def _patch_class(cls):
    if cls in _state.records or cls in _state.not_candidates:
        return
    try:
        if not _is_candidate(cls):
            _state.not_candidates.add(cls)
            return
        record = _analyse(cls)
    except (
        Exception
    ) as exc:  # one class that cannot be analysed must not stop the others
        logger.debug(
            "forward_rewrite: cannot analyse %s", cls.__qualname__, exc_info=True
        )
        record = _Record(_failed_report(cls, exc), origin="rewrite")
    _state.records[cls] = record
    _install_sites(record)
    if record.report["verdict"] != "patched":
        return
    if not _state.fused_loss:
        record.refuse("pass-off", "install(passes=...) leaves the fused-loss pass off")
        return
    if _state.verified_only and record.report.get("verified") is not True:
        record.refuse(
            "not-verified",
            "install(verified_only=True): the compiled cache holds no verified patch "
            "for this forward (forward-rewrite build --verify)",
        )
        return
    try:
        problem = _install_forward(cls, record.report)
    except Exception as exc:  # noqa: BLE001 - a patch that fails to compile: keep stock
        problem = ("emit-invalid", f"{type(exc).__name__}: {exc}", "failed")
    if problem is None:
        record.installed = True
    else:
        record.refuse(*problem)
        logger.warning(
            "forward_rewrite: %s left stock: %s", cls.__qualname__, problem[1]
        )


def _is_candidate(cls):
    """The rewriter's candidate rule (``candidate.rs``) on the class's chain."""
    chain = _class_chain(cls)
    if not chain:
        return False
    return _native.rewrite_is_candidate(
        json.dumps(chain), json.dumps(_loss_resolution(cls))
    )


def _analyse(cls):
    """The report for ``cls``: from the compiled cache when its hash is allowed, else
    from the rewriter. Raises when the class's source cannot be read."""
    owner, forward = _forward_owner(cls)
    running_sha256 = _native.rewrite_forward_sha256(
        inspect.getsource(inspect.unwrap(forward))
    )
    cached = _state.cache.lookup(running_sha256, cls) if _state.cache else None
    passes = _state.passes if _state.passes is not None else list(pass_names()[1:])
    if cached is not None:
        record = _Record(cached, origin="cache")
        if passes:
            fresh = _analyse_with_passes(cls, passes)
            record.report["passes"] = fresh.get("passes", {})
        return record
    report = _analyse_with_passes(cls, passes)
    report["verified"] = None
    if report["verdict"] == "patched":
        mismatch = _running_forward_mismatch(report, owner, running_sha256)
        if mismatch is not None:
            record = _Record(report, origin="rewrite")
            record.refuse("source-mismatch", mismatch, verdict="failed")
            return record
    return _Record(report, origin="rewrite")


def _analyse_with_passes(cls, passes):
    """The rewriter's report on ``cls``, with ``passes`` run on its module's text."""
    chain = _class_chain(cls)
    loss = _loss_resolution(cls)
    if not passes:
        return json.loads(
            _native.rewrite_analyze_class(json.dumps(chain), json.dumps(loss))
        )
    _module_classes(cls.__module__)
    text = _state.module_texts.get(cls.__module__)
    return json.loads(
        _native.rewrite_analyze_class(
            json.dumps(chain), json.dumps(loss), text, list(passes)
        )
    )


def _install_sites(record):
    """Put the patched sites of every pass beyond the fused loss in place (each site once
    per module: several model classes share a norm), updating each site's report with
    ``installed`` or the reason it was left stock; a pass none of whose sites is in place is
    ``refused`` with the first site's reason."""
    report = record.report
    module_name = report.get("module")
    module = sys.modules.get(module_name or "")
    for pass_name, pass_report in (report.get("passes") or {}).items():
        sites = pass_report.get("sites") or []
        for site in sites:
            key = (module_name, site.get("kind"), site.get("name"))
            if site.get("verdict") != "patched":
                site["installed"] = False
                continue
            if key not in _state.sites:
                try:
                    problem = _install_site(module, site)
                except Exception as exc:  # noqa: BLE001 - a site that fails: keep stock
                    problem = ("site-emit-invalid", f"{type(exc).__name__}: {exc}")
                _state.sites[key] = ("installed", "") if problem is None else problem
                _state.site_passes[key] = pass_name
                if problem is None and pass_name == "rms-norm":
                    _register_norm(module, site)
                if problem is not None:
                    logger.warning(
                        "forward_rewrite: %s.%s left stock: %s",
                        module_name,
                        site.get("name"),
                        problem[1],
                    )
            status, detail = _state.sites[key]
            site["installed"] = status == "installed"
            if status != "installed":
                site.update(verdict="refused", reason=status, detail=detail)
                site.pop("patch", None)
        if pass_report.get("verdict") == "patched" and not any(
            s.get("installed") for s in sites
        ):
            first = next((s for s in sites if s.get("reason")), {})
            pass_report.update(
                verdict="refused",
                reason=first.get("reason"),
                detail=first.get("detail", ""),
            )


def stock_function(function):
    """The stock function a site patch replaced, when ``function`` is one this installer put
    in place (``attnres`` rewrites the stock layer forward, not the fused one); else
    ``function``."""
    for holder, attribute, original in _state.site_originals.values():
        where = holder if isinstance(holder, dict) else holder.__dict__
        if where.get(attribute) is function:
            return original
    return function


def _self_attribute(text):
    """``NAME`` of the expression text ``self.NAME``, or None."""
    name = text.removeprefix("self.")
    return name if name != text and name.isidentifier() else None


def _register_norm(module, site):
    """Tell the residual-norm guard that this norm class now runs its fused form, with the
    attribute its weight is applied under, if any (``self.with_scale``: checked per
    instance by the guard). Forms whose eps or condition is not a ``self`` attribute stay
    out of the fused add, and so do gated sites (``lowered`` names a ``gate``: not the
    single-input norm the fused add computes) and unweighted ones (``weight`` "none": the
    fused add reads the norm's weight)."""
    lowered = site.get("lowered") or {}
    if "gate" in lowered or lowered.get("weight") == "none":
        return
    eps = _self_attribute(lowered.get("eps", ""))
    when = lowered.get("fused only when")
    condition = None if when is None else _self_attribute(when)
    if eps is None or (when is not None and condition is None):
        return
    cls = module.__dict__[site["name"]]
    fusion_guard.register_norm(
        cls,
        cls.__dict__["forward"],
        eps,
        float(lowered["offset"]),
        lowered["cast_before_weight"] == "true",
        condition,
    )


def _install_site(module, site):
    """Compile one site's patch in its module and put it in place; None, or (reason,
    detail) saying why it was left stock: the module's binding is not the function the
    rewriter read (``site-replaced``: Liger or another tool put its own class / function
    there; ``site-source-mismatch``: its source hashes otherwise), or the patch would need
    the class body (``needs-class-body``) or the name ``forward_rewrite`` is taken."""
    if module is None:
        return ("site-source-unavailable", "the module is not imported")
    namespace = module.__dict__
    name = site["name"]
    value = namespace.get(name)
    if site["kind"] in ("class", "experts-gate", "experts-forward") and (
        not isinstance(value, type) or value.__module__ != module.__name__
    ):
        return (
            "site-replaced",
            f"{module.__name__}.{name} is {value!r}, not the module's own class",
        )
    if site["kind"] == "experts-forward":
        # No source of the module changes: the class's experts go through the fused op
        # behind transformers' experts interface, with the fused gate its experts-gate site
        # (installed just before it) put in place.
        gate_key = (module.__name__, "experts-gate", name)
        gate = (
            value.__dict__.get("_apply_gate")
            if gate_key in _state.site_originals
            else None
        )
        clamp = _experts_clamp(site)
        if isinstance(clamp, tuple):
            return clamp
        return _experts_forward.install_class(value, gate, **clamp)
    if site["kind"] == "experts-gate" and site.get("original_sha256") is None:
        # transformers' default gate, another module's function: checked by its form.
        attribute = "_apply_gate"
        original = value.__dict__.get(attribute)
        problem = _default_gate_problem(name, original)
        if problem is not None:
            return problem
        holder = value
    else:
        if site["kind"] in ("class", "experts-gate"):
            # the class's forward, or an experts class's own gate: bound by its hash
            attribute = "forward" if site["kind"] == "class" else "_apply_gate"
            original = value.__dict__.get(attribute)
            if original is None:
                return ("site-replaced", f"{name} does not define {attribute}")
            holder = value
        else:
            if value is None or not inspect.isfunction(inspect.unwrap(value)):
                return ("site-replaced", f"{module.__name__}.{name} is not a function")
            if getattr(value, "__module__", None) != module.__name__:
                return (
                    "site-replaced",
                    (
                        f"{module.__name__}.{name} comes from "
                        f"{getattr(value, '__module__', None)}"
                    ),
                )
            attribute, original, holder = name, value, namespace
        running = _native.rewrite_forward_sha256(
            inspect.getsource(inspect.unwrap(original))
        )
        if running != site.get("original_sha256"):
            return (
                "site-source-mismatch",
                (
                    f"the running {name} hashes to {running}, the rewriter read "
                    f"{site.get('original_sha256')}"
                ),
            )
        code = inspect.unwrap(original).__code__
        if "__class__" in code.co_freevars:
            return ("needs-class-body", f"{name} uses super() or __class__")
    runtime = sys.modules[__package__]
    if namespace.get(_RUNTIME_GLOBAL, runtime) is not runtime:
        return (
            "name-conflict",
            f"{module.__name__} binds the name {_RUNTIME_GLOBAL!r} to something else",
        )
    source = site["patch"]
    filename = f"<forward-rewrite {module.__name__}.{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    compiled = compile(source, filename, "exec")
    if _RUNTIME_GLOBAL not in namespace:
        namespace[_RUNTIME_GLOBAL] = runtime
        _state.injected.add(module.__name__)
    scope = {}
    exec(compiled, namespace, scope)  # noqa: S102 - the rewriter's output, in the module
    patched = next(iter(scope.values()))
    if patched.__doc__ is None:
        # the patch drops docstring-only decorators (@auto_docstring): keep their result
        patched.__doc__ = getattr(original, "__doc__", None)
    if holder is not namespace:
        patched.__qualname__ = f"{name}.{attribute}"
    key = (module.__name__, site["kind"], name)
    if holder is namespace:
        namespace[name] = patched
    else:
        setattr(holder, attribute, patched)
        problem = _rewrap(holder, attribute, original)
        if problem is not None:
            setattr(holder, attribute, original)
            return problem
    _state.site_originals[key] = (holder, attribute, original)
    return None


def _wrap_depth(fn):
    depth = 0
    while hasattr(fn, "__wrapped__"):
        fn, depth = fn.__wrapped__, depth + 1
    return depth


def _rewrap(cls, attribute, original):
    """Give the patched method the wrappers the class put around the stock one when it was
    created, beyond the decorators the patch's source re-applies: transformers'
    ``GradientCheckpointingLayer`` wraps every subclass's ``forward`` in
    ``forward_with_checkpointing`` (5.x), which is how a decoder layer checkpoints; a patch
    without it would train without gradient checkpointing. The wrapper is re-made by the
    layer base's own ``__init_subclass__``. None, or ``site-wrapped`` (another wrapper this
    installer does not know: left stock)."""
    patched = cls.__dict__[attribute]
    if _wrap_depth(patched) == _wrap_depth(original):
        return None
    code = getattr(original, "__code__", None)
    base = next(
        (
            b
            for b in cls.__mro__[1:]
            if b.__name__ == "GradientCheckpointingLayer"
            and "__init_subclass__" in b.__dict__
        ),
        None,
    )
    if (
        attribute == "forward"
        and base is not None
        and code is not None
        and code.co_name == "forward_with_checkpointing"
    ):
        base.__dict__["__init_subclass__"].__func__(cls)
        if _wrap_depth(cls.__dict__[attribute]) == _wrap_depth(original):
            return None
    wrapper = getattr(code, "co_name", original)
    return (
        "site-wrapped",
        f"{cls.__name__}.{attribute} is wrapped by {wrapper!r}, which the patch would drop",
    )


def _experts_clamp(site):
    """What an ``experts-forward`` site's gate computes, as ``register_experts`` takes it
    (the activation as the gate's source writes it, the limit attribute of a clamped SwiGLU
    gate and where the gate is clamped, a ``swiglu_oai`` gate's alpha attribute), from the
    site's ``lowered``; or (reason, detail) when the site names a limit or alpha that is not
    a ``self`` attribute, a clamp or a layout this installer does not know (the class then
    stays stock: the op takes gate and up as halves)."""
    lowered = site.get("lowered") or {}
    plan = {"activation": lowered.get("act", "self.act_fn")}
    if lowered.get("layout", "halves") != "halves":
        return (
            "site-emit-invalid",
            f"layout {lowered['layout']!r} is not one the experts op computes",
        )
    if "alpha" in lowered or plan["activation"] == "swiglu_oai":
        alpha = _self_attribute(lowered.get("alpha", ""))
        if alpha is None or plan["activation"] != "swiglu_oai":
            return (
                "site-emit-invalid",
                (
                    f"alpha {lowered.get('alpha')!r} / act {plan['activation']!r} is not "
                    "a form this installer registers"
                ),
            )
        plan["alpha"] = alpha
    if "limit" not in lowered:
        if "alpha" in plan:
            return ("site-emit-invalid", "a 'swiglu_oai' gate without its limit")
        return plan
    limit = _self_attribute(lowered["limit"])
    clamp = lowered.get("clamp")
    if limit is None or clamp not in ("gate before act", "activation output"):
        return (
            "site-emit-invalid",
            f"limit {lowered['limit']!r} / clamp {clamp!r} is not a form this installer registers",
        )
    plan["limit"] = limit
    plan["clamp_after_activation"] = clamp == "activation output"
    return plan


def _default_gate_problem(name, gate):
    """Why an MoE experts class's ``_apply_gate`` must stay (an ``experts-gate`` site), or
    None: it must be transformers' ``integrations.moe._default_apply_gate``, which
    ``@use_experts_implementation`` put on the class, with the running source in the form
    the patch falls back to (the rewriter's check, ``experts.rs``)."""
    try:
        from transformers.integrations import moe

        default = moe._default_apply_gate
    except (ImportError, AttributeError):
        return (
            "site-source-unavailable",
            "transformers.integrations.moe._default_apply_gate does not exist",
        )
    if gate is not default:
        return (
            "site-replaced",
            f"{name}._apply_gate is {gate!r}, not transformers' default gate",
        )
    try:
        source = inspect.getsource(default)
    except (OSError, TypeError) as exc:
        return ("site-source-unavailable", f"_default_apply_gate: {exc}")
    if not _native.rewrite_gate_function_ok(source):
        return (
            "site-source-mismatch",
            (
                "transformers' _default_apply_gate is not the gated product "
                "act_fn(gate) * up of gate_up's halves"
            ),
        )
    return None


def _forward_owner(cls):
    """The class whose own ``forward`` ``cls`` runs, and that forward, seeing through
    forwards this installer put in place."""
    for klass in cls.__mro__:
        if klass in _state.originals:
            if _state.originals[klass] is not None:
                return klass, _state.originals[klass]
        elif "forward" in klass.__dict__:
            return klass, klass.__dict__["forward"]
    raise LookupError(f"{cls.__qualname__} has no forward")


def _running_forward_mismatch(report, owner, running_sha256):
    """Why the rewriter's view differs from what runs, or None when they agree."""
    where = (report.get("forward_module"), report.get("forward_owner"))
    if where != (owner.__module__, owner.__qualname__):
        return (
            f"the rewriter found the forward in {where[0]}.{where[1]}, "
            f"but the class runs {owner.__module__}.{owner.__qualname__}.forward"
        )
    if report.get("forward_sha256") != running_sha256:
        return (
            "the source of the running forward (inspect) hashes to "
            f"{running_sha256}, the rewriter's to {report.get('forward_sha256')}"
        )
    return None


def _class_chain(cls):
    """``cls`` and its bases from model source modules (transformers' modeling modules,
    remote code, users' modules), in MRO order, as class sources cut by the rewriter from
    each module's text (stops at the first class whose source is not found)."""
    chain = []
    for klass in cls.__mro__:
        if not _is_model_source(klass.__module__):
            continue
        source = _module_classes(klass.__module__).get(klass.__qualname__)
        if source is None:
            break
        chain.append(source)
    return chain


def _module_classes(module_name):
    classes = _state.module_classes.get(module_name)
    if classes is None:
        module = sys.modules[module_name]
        text = "".join(
            linecache.getlines(inspect.getsourcefile(module), module.__dict__)
        )
        if not text:
            raise OSError(f"no source for {module_name}")
        _state.module_texts[module_name] = text
        path = _reported_path(module_name, module)
        found = json.loads(_native.rewrite_module_classes(text, module_name, path))
        # Like Python, the last definition of a name wins.
        classes = {c["qualname"]: c for c in found}
        _state.module_classes[module_name] = classes
    return classes


def _reported_path(module_name, module):
    """The path the CLI reports for a module's file: relative to its package root
    (``models/llama/modeling_llama.py``, ``org/repo/rev/modeling_x.py`` under
    ``transformers_modules``), the file's own path outside any package."""
    parts = module_name.split(".")
    if len(parts) > 1:
        return "/".join(parts[1:]) + ".py"
    return inspect.getsourcefile(module) or f"{module_name}.py"


def _loss_resolution(cls):
    """What ``loss_function`` resolves to for instances of ``cls``, found the way
    ``PreTrainedModel.__init__`` finds ``loss_type`` (class name, then LOSS_MAPPING keys
    inside it). The run-time guard re-checks the real ``loss_function`` on every call.
    ``unknown`` before transformers 4.46 (no ``loss_function``: every forward computes its
    loss itself)."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return "unknown"

    loss_type = cls.__name__
    if loss_type not in LOSS_MAPPING:
        found = re.findall(f"({'|'.join(LOSS_MAPPING)})", cls.__name__)
        loss_type = found[0] if found else "ForCausalLM"
    function = LOSS_MAPPING.get(loss_type)
    if function is None:
        return "unknown"
    if function is ForCausalLMLoss:
        return "causal"
    return {"other": loss_type}


def _failed_report(cls, exc):
    return {
        "qualname": cls.__qualname__,
        "module": cls.__module__,
        "path": "/".join(cls.__module__.split(".")[1:]) + ".py",
        "line": None,
        "verdict": "failed",
        "reason": "source-unavailable",
        "detail": f"{type(exc).__name__}: {exc}",
        "forward_sha256": None,
        "head": None,
        "head_bias": None,
        "transforms": [],
        "verified": None,
    }


def _install_forward(cls, report):
    """Compile the patched forward in the original's module and set it on ``cls``.
    Returns None, or (reason, detail, verdict) saying why it was not installed."""
    owner, original = _forward_owner(cls)
    code = inspect.unwrap(original).__code__
    if "__class__" in code.co_freevars:
        return ("needs-class-body", "the forward uses super() or __class__", "refused")
    mangled = [
        n for n in code.co_names if n.startswith(f"_{owner.__name__.lstrip('_')}__")
    ]
    if mangled:
        return (
            "needs-class-body",
            f"the forward uses private names {mangled}",
            "refused",
        )
    module = sys.modules[report["forward_module"]]
    namespace = module.__dict__
    runtime = sys.modules[__package__]
    bound = namespace.get(_RUNTIME_GLOBAL, runtime)
    if bound is not runtime:
        detail = (
            f"{module.__name__} binds the name {_RUNTIME_GLOBAL!r} to something else"
        )
        return ("name-conflict", detail, "refused")

    source = report["patched_forward"]
    filename = f"<forward-rewrite {cls.__module__}.{cls.__qualname__}.forward>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = {}
    code = compile(source, filename, "exec")
    if _RUNTIME_GLOBAL not in namespace:
        namespace[_RUNTIME_GLOBAL] = runtime
        _state.injected.add(module.__name__)
    exec(code, namespace, scope)  # noqa: S102 - the rewriter's output, in the module
    patched = scope["forward"]
    patched.__qualname__ = f"{cls.__qualname__}.forward"
    if patched.__doc__ is None:
        patched.__doc__ = original.__doc__
    patched.__forward_rewrite__ = {
        k: report.get(k) for k in ("forward_sha256", "head", "transforms", "verified")
    }
    if cls not in _state.originals:
        _state.originals[cls] = cls.__dict__.get("forward")
    # Packing hook (issue 9): packed sequences stay apart whatever the backend, use_cache;
    # the packing pass's static verdict says on which paths (or raises for every one).
    if _state.passes is None or "packing" in _state.passes:
        static = (report.get("passes") or {}).get("packing")
        patched = packing.wrap_forward(patched, cls, static=static)
    cls.forward = patched
    return None


# ---------------------------------------------------------------------- compiled cache


class _CompiledCache:
    """What ``forward-rewrite build --out DIR`` wrote: an allowlist of forward hashes, the
    audit entries and the patch files. Used only when its tool version is this runtime's
    (a patch calls the runtime's helpers) and only for a forward whose hash it lists; a
    patch file whose bytes do not hash to the allowlist's ``patch_sha256``, or whose header
    names another forward, is ignored with a warning (the in-process rewrite runs)."""

    def __init__(self, root=None, entries=None, reports=None):
        self.root = root
        self.entries = entries or {}
        self.reports = reports or {}

    @classmethod
    def load(cls, root):
        if root is None or not (root / "allowlist.json").is_file():
            return cls()
        try:
            allowlist = json.loads(
                (root / "allowlist.json").read_text(encoding="utf-8")
            )
            if allowlist.get("schema") != _ALLOWLIST_SCHEMA:
                raise ValueError(
                    f"allowlist schema {allowlist.get('schema')!r}, this runtime reads "
                    f"{_ALLOWLIST_SCHEMA} (rebuild it with forward-rewrite build)"
                )
            if allowlist.get("tool_version") != _native.__version__:
                raise ValueError(
                    f"built by forward-rewrite {allowlist.get('tool_version')}, "
                    f"this runtime is {_native.__version__}"
                )
            entries = {
                (e["forward_sha256"], e["module"], e["qualname"]): e
                for e in allowlist["entries"]
            }
            audit_doc = json.loads((root / "audit.json").read_text(encoding="utf-8"))
            reports = {
                (c["forward_sha256"], c["module"], c["qualname"]): c
                for c in audit_doc["classes"]
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(
                f"forward_rewrite: not using the compiled cache in {root}: {exc}",
                stacklevel=4,
            )
            return cls()
        return cls(root, entries, reports)

    def lookup(self, forward_sha256, cls):
        """The class's report with its patch, when the allowlist has this exact hash and
        the patch file is the one the allowlist names."""
        key = (forward_sha256, cls.__module__, cls.__qualname__)
        entry = self.entries.get(key)
        report = self.reports.get(key)
        if entry is None or report is None:
            return None
        try:
            data = (self.root / entry["patch"]).read_bytes()
            problem = _patch_problem(data, entry)
            forward = None if problem else _strip_patch_header(data.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            warnings.warn(
                f"forward_rewrite: ignoring the cached patch for "
                f"{cls.__module__}.{cls.__qualname__} ({problem}); rewriting in-process",
                stacklevel=6,
            )
            return None
        return {
            **report,
            "verified": entry.get("verified"),
            "patched_forward": forward,
        }


def _patch_problem(data, entry):
    """Why a patch file must not run, or None: its bytes must hash to the allowlist's
    ``patch_sha256`` and its header must name the entry's forward hash."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("patch_sha256"):
        return f"{entry['patch']} hashes to {digest}, the allowlist says {entry.get('patch_sha256')}"
    header = f"{_PATCH_SHA_PREFIX}{entry['forward_sha256']}\n".encode()
    if header not in data.split(b"\ndef ", 1)[0] + b"\n":
        return f"{entry['patch']} was made for another forward"
    return None


def _strip_patch_header(patch):
    """A patch file is comments and ``import forward_rewrite``, then the forward."""
    lines = patch.splitlines(True)
    for index, line in enumerate(lines):
        if line.startswith(("@", "def ", "async def ")):
            return "".join(lines[index:])
    raise ValueError("the patch file has no function definition")


def _resolve_cache_dir(cache_dir):
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("FORWARD_REWRITE_CACHE"):
        return Path(os.environ["FORWARD_REWRITE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "forward-rewrite" / "compiled"


# -------------------------------------------------------------------- version check


def _transformers_version():
    module = sys.modules.get("transformers")
    if module is None:
        try:
            import transformers as module
        except ImportError:
            return None
    return getattr(module, "__version__", None)


def _transformers_supported():
    version = _transformers_version()
    if version is None:
        raise ImportError("forward_rewrite.install() needs transformers installed")
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers >= MIN_TRANSFORMERS:
        return True
    if not _state.warned_version:
        _state.warned_version = True
        warnings.warn(
            f"forward_rewrite: transformers {version} is older than "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))}; no forward is patched",
            stacklevel=3,
        )
    return False
