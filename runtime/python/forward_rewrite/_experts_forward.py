"""The ``experts-forward`` sites at run time (the gated-mlp pass, ``experts.rs``): transformers'
``grouped_mm`` experts implementation replaced, per experts class, by
``forward_rewrite.moe_experts``, whose backward keeps only ``gate_up`` of the routed rows.

No module source changes. An ``@use_experts_implementation`` class's ``forward`` (the
decorator's) looks its implementation up in ``integrations.moe.ALL_EXPERTS_FUNCTIONS`` on
every call; installing the first site puts :func:`grouped_mm_experts_forward` there under
``grouped_mm`` (the interface's local mapping, which ``uninstall`` restores). It runs the op
for the classes whose site is installed, when ``fusion_guard.moe_experts`` passes, and the
stock function itself otherwise -- every other class, eval, ``no_grad``, another dtype.

The stock function is transformers', so its binding is checked here, before anything is
replaced: the running ``grouped_mm_experts_forward``, ``_grouped_linear`` and ``_grouped_mm``
must equal the functions the op reproduces statement for statement
(``_native.rewrite_experts_function_ok``); the class must dispatch through that interface
(the decorator's own ``forward``), and its ``_apply_gate`` must be the gate this installer put
in place (its ``experts-gate`` site), whose fused product the op computes: transformers'
default gate, or the class's own when the rewriter read it as the default's product or the
clamped SwiGLU (DeepSeek-V4, GLM-5-Next, HY-V4) or MiniMax-M3's ``swiglu_oai``, whose limit
attribute, clamp position and alpha attribute the site's ``lowered`` gives and
``fusion_guard.register_experts`` records.
"""

import inspect

from . import _native, fusion_guard
from ._moe_op import moe_experts

_FUNCTIONS = ("grouped_mm_experts_forward", "_grouped_linear", "_grouped_mm")
_KEY = "grouped_mm"
_MISSING = object()
#: (the interface, its local value under ``grouped_mm`` before ours or _MISSING, the stock
#: function) while the dispatcher is in place.
_installed = None


def grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``grouped_mm`` experts implementation while sites are installed: the fused op
    where ``fusion_guard.moe_experts`` allows it, else transformers' own function."""
    plan = fusion_guard.moe_experts(self, hidden_states, top_k_index, top_k_weights)
    if plan is None:
        return _installed[2](self, hidden_states, top_k_index, top_k_weights)
    return moe_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.gate_up_proj,
        self.down_proj,
        **plan,
    )


def install_class(
    cls,
    gate,
    *,
    activation="self.act_fn",
    limit=None,
    clamp_after_activation=False,
    alpha=None,
):
    """Run ``cls``'s experts through the op (``gate``: the ``_apply_gate`` the installer put
    on it; ``activation``, ``limit``, ``clamp_after_activation`` and ``alpha`` what that gate
    computes, as ``fusion_guard.register_experts`` takes them); None, or (reason, detail)
    saying why the class stays stock."""
    global _installed
    try:
        from transformers.integrations import moe
    except ImportError as exc:
        return ("site-source-unavailable", f"transformers.integrations.moe: {exc}")
    interface = getattr(moe, "ALL_EXPERTS_FUNCTIONS", None)
    if interface is None or not hasattr(interface, "_local_mapping"):
        return ("site-source-unavailable", "transformers has no ALL_EXPERTS_FUNCTIONS")
    if _dispatches_through(cls) is not interface:
        return (
            "site-replaced",
            f"{cls.__name__}.forward does not dispatch through ALL_EXPERTS_FUNCTIONS",
        )
    if gate is None or cls.__dict__.get("_apply_gate") is not gate:
        return ("site-replaced", f"{cls.__name__}._apply_gate is not the fused gate")
    if _installed is None:
        stock = interface.get(_KEY)
        if stock is not getattr(moe, "grouped_mm_experts_forward", None):
            return (
                "site-replaced",
                f"ALL_EXPERTS_FUNCTIONS['{_KEY}'] is {stock!r}, not transformers' own",
            )
        for name in _FUNCTIONS:
            try:
                source = inspect.getsource(getattr(moe, name))
            except (AttributeError, OSError, TypeError) as exc:
                return ("site-source-unavailable", f"{name}: {exc}")
            problem = _native.rewrite_experts_function_ok(source)
            if problem is not None:
                return ("site-source-mismatch", f"transformers' {problem}")
        previous = interface._local_mapping.get(_KEY, _MISSING)
        interface[_KEY] = grouped_mm_experts_forward
        _installed = (interface, previous, stock)
    elif _installed[0] is not interface:
        return (
            "site-replaced",
            "transformers' experts interface changed since install",
        )
    fusion_guard.register_experts(
        cls,
        cls.__dict__["forward"],
        gate,
        activation=activation,
        limit=limit,
        clamp_after_activation=clamp_after_activation,
        alpha=alpha,
    )
    return None


def uninstall():
    """Put the interface's ``grouped_mm`` back and forget every class."""
    global _installed
    fusion_guard.forget_experts()
    if _installed is None:
        return
    interface, previous, _ = _installed
    if interface._local_mapping.get(_KEY) is grouped_mm_experts_forward:
        if previous is _MISSING:
            del interface._local_mapping[_KEY]
        else:
            interface._local_mapping[_KEY] = previous
    _installed = None


def _dispatches_through(cls):
    """The experts interface ``cls``'s own ``forward`` looks its implementation up in (the
    ``use_experts_implementation`` wrapper's closure), or None."""
    forward = cls.__dict__.get("forward")
    code = getattr(forward, "__code__", None)
    if code is None or "experts_interface" not in code.co_freevars:
        return None
    cell = forward.__closure__[code.co_freevars.index("experts_interface")]
    return cell.cell_contents
