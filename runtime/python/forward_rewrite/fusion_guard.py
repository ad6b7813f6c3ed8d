"""The run-time guards of the decoder-fusion passes (``rms-norm``, ``rotary``, ``gated-mlp``):
what the patched norm / MLP forwards and ``apply_rotary_pos_emb`` call before taking the
fused path (README, "Decoder fusion passes").

Each guard answers, per call, whether the fused op computes exactly what the stock code
would for these arguments; when it does not, the patched function runs its stock body, byte
for byte (invariant 3). A wrong fused path corrupts training silently, a stock one only costs
speed, so every guard errs on the side of stock: plain tensors only (no DTensor or other
subclass), bfloat16 / float16 / float32 (float64: the stock code computes in float32, the op
in float64), CPU or CUDA with its backend built, and for the MLP an activation module that is
exactly SiLU or the tanh GELU with no hooks of its own (the product skips its ``__call__``), or
torch's functional SiLU itself where the source applies the function (``gated_function``).
``swiglu_limit`` reads the limit of a clamped SwiGLU (DeepSeek-V4, GLM-5-Next, Step-3.7:
``gate.clamp(max=L)``, ``up.clamp(min=-L, max=L)``) on every call: a Python number > 0 (inf
allowed) goes to the op as ``limit=``, anything else (a tensor, NaN, 0, a bool) runs stock.
GPT-OSS's and MiniMax-M3's SwiGLU (``swiglu_oai``: ``(up + 1) * gate * sigmoid(gate *
alpha)``, written out, no activation module) reads its alpha through ``swiglu_alpha`` (a
finite Python number) and takes the fused path through ``gated_oai`` (the module in train
mode, x as for ``gated_act``), which counts it.
``moe_experts`` (the ``experts-forward`` sites) runs ``forward_rewrite.moe_experts`` for an
experts class the installer registered (``experts_forms``), with its fused gate in place,
transformers' flags as the op computes them (gated, concatenated, no bias, no post-expert
norm, no expert parallelism), the weights torch's grouped GEMM takes as stock does, and for a
clamped gate its limit as ``swiglu_limit`` reads it (and a ``swiglu_oai`` gate's alpha as
``swiglu_alpha`` reads it).
``disabled()`` turns every guard off for a block (real stock code everywhere).

``residual_norm`` (the ``residual-norm`` pass) fuses a layer's residual add into the norm
after it only when that norm's class runs its fused ``rms-norm`` forward (``norm_forms``,
filled by the installer) and the module has no hooks: the fused path reads the norm's
weight and eps itself instead of calling it.

The fused paths run in training steps only (invariant 2, inference is untouched): autograd
recording (``torch.is_grad_enabled()``), and the norm / activation module in train mode, or for
the rotary function q or k requiring a gradient. Evaluation, ``torch.no_grad()`` and
``torch.inference_mode()`` run the stock bodies byte for byte.
"""

import contextlib
import contextvars
import functools
import math
import sys

import torch
from torch import nn

from ._fusions_backend import GATED_NORM_MAX_HIDDEN

__all__ = [
    "disabled",
    "gated_act",
    "gated_function",
    "gated_oai",
    "gated_rms_norm",
    "moe_experts",
    "residual_norm",
    "rms_norm",
    "rotary",
    "rotary_single",
    "swiglu_alpha",
    "swiglu_limit",
]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_PLAIN = (torch.Tensor, nn.Parameter)
_off: contextvars.ContextVar = contextvars.ContextVar(
    "forward_rewrite_fusions_off", default=False
)
_cuda_backend = None
#: How many calls each guard let through to the fused op (tests and ``audit()`` read it).
taken = {
    "rms-norm": 0,
    "gated-rms-norm": 0,
    "residual-norm": 0,
    "rotary": 0,
    "gated-mlp": 0,
    "experts-forward": 0,
}
#: The norm classes whose fused ``rms-norm`` forward is in place, by class: (that forward,
#: the eps attribute, offset, cast_before_weight). The installer fills it; ``residual_norm``
#: fuses a layer's add into a norm only through it.
norm_forms = {}
#: The MoE experts classes whose ``experts-forward`` site is installed, by class: an
#: ``_ExpertsForm`` (the decorator's ``forward``, the fused ``_apply_gate``, how the gate's
#: activation is found, the clamp of a clamped SwiGLU gate and a ``swiglu_oai`` gate's alpha
#: attribute), as the installer found them.
experts_forms = {}


@contextlib.contextmanager
def disabled():
    """Within this block every decoder-fusion guard fails: the stock bodies run."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


def _device_ok(device):
    global _cuda_backend
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    if _cuda_backend is None:
        try:
            from . import _fusions_cuda  # noqa: F401

            _cuda_backend = True
        except Exception:  # noqa: BLE001 - no CUDA backend: stock
            _cuda_backend = False
    return _cuda_backend


def _tensor_ok(t, device=None):
    return (
        type(t) in _PLAIN
        and t.dtype in _DTYPES
        and (t.device == device if device is not None else _device_ok(t.device))
    )


def _real(value):
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def rms_norm(module, x, weight, eps):
    """Whether ``forward_rewrite.rms_norm(x, weight, eps, ...)`` may replace the norm's
    stock body: x and the 1-D weight (x's last dimension) plain tensors of a fused dtype on
    one device with a backend, eps a finite number >= 0. ``weight`` None: the unweighted
    form (NanoChat's), x alone checked."""
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return False
    ok = module.training and _norm_operands_ok(
        x, _UNWEIGHTED if weight is None else weight, eps
    )
    if ok:
        taken["rms-norm"] += 1
    return ok


def _norm_operands_ok(x, weight, eps):
    return (
        _tensor_ok(x)
        and x.dim() >= 1
        and x.shape[-1] > 0
        and x.numel() > 0
        and (weight is _UNWEIGHTED or _weight_ok(weight, x))
        and _real(eps)
    )


#: ``_norm_operands_ok``'s weight for the unweighted form (only ``rms_norm`` passes it: the
#: gated and residual norms read a weight that must be there).
_UNWEIGHTED = object()


def _weight_ok(weight, x):
    return (
        isinstance(weight, torch.Tensor)
        and _tensor_ok(weight, x.device)
        and weight.dim() == 1
        and weight.shape[0] == x.shape[-1]
    )


def gated_rms_norm(
    module, x, gate, weight, eps, act, *, gate_first=False, group_size=None
):
    """The activation ``forward_rewrite.gated_rms_norm`` computes for a gated norm whose
    source applies ``act`` (the module ``ACT2FN[self.activation]`` made) to the float32 gate
    (``"silu"`` or ``"sigmoid"``), or None (stock): the norm in train mode, its operands as
    for ``rms_norm``, the gate a plain tensor of x's shape, dtype and device, rows the CUDA
    kernel takes, and ``act`` exactly ``nn.SiLU``, transformers' ``SiLUActivation`` or
    ``nn.Sigmoid``, without hooks, or torch's functional SiLU itself (``F.silu``).
    The gate may be of a 16-bit float dtype with a float32 x (the op upcasts it exactly, as
    the forms' ``gate.to(torch.float32)``). ``gate_first`` (Mamba's form, ``weight *
    norm(x * act(gate)).to(x.dtype)``): the weight no wider than x (stock's result is of the
    promoted dtype otherwise); ``group_size``: a positive int dividing x's last dimension
    (stock's ``view`` fails otherwise), or None."""
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return None
    if not (module.training and _norm_operands_ok(x, weight, eps)):
        return None
    if not (_tensor_ok(gate, x.device) and gate.shape == x.shape):
        return None
    if gate.dtype != x.dtype and not (
        x.dtype == torch.float32 and gate.dtype in (torch.bfloat16, torch.float16)
    ):
        return None
    hidden = x.shape[-1]
    if group_size is not None and not (
        type(group_size) is int and group_size > 0 and hidden % group_size == 0
    ):
        return None
    if gate_first and torch.promote_types(weight.dtype, x.dtype) != x.dtype:
        return None
    row = hidden if group_size is None else group_size
    if x.device.type == "cuda" and row > GATED_NORM_MAX_HIDDEN:
        return None
    if act is nn.functional.silu:  # transformers 4.57's Qwen3-Next: F.silu written out
        taken["gated-rms-norm"] += 1
        return "silu"
    if not isinstance(act, nn.Module) or not _no_hooks(act):
        return None
    kind = type(act)
    silu_activation, _ = _silu_class()
    if kind is nn.SiLU or (silu_activation is not None and kind is silu_activation):
        name = "silu"
    elif kind is nn.Sigmoid:
        name = "sigmoid"
    else:
        return None
    taken["gated-rms-norm"] += 1
    return name


def register_norm(
    cls, forward, eps_attribute, offset, cast_before_weight, condition=None
):
    """Record that ``cls.forward`` is now ``forward``, the fused rms-norm form with these
    parameters (the installer calls it; ``forget_norms`` undoes it). ``condition``: the
    attribute under which the form applies its weight (Gemma 4's ``with_scale``; the fused
    add then runs only on instances where it is true, as the form's ``if`` tests it)."""
    norm_forms[cls] = (
        forward,
        eps_attribute,
        float(offset),
        bool(cast_before_weight),
        condition,
    )


def forget_norms():
    norm_forms.clear()


def residual_norm(norm, residual, x):
    """The keyword arguments of ``forward_rewrite.add_rms_norm`` that compute ``h = residual
    + x; norm(h)`` as the stock statements do (weight, eps, offset, cast_before_weight), or
    None (stock). The norm module must be of a class whose installed fused forward is the
    one running (``norm_forms``: a Liger or other replacement, a subclass with its own forward
    or an instance's own ``forward`` runs stock), without hooks (the fused path does not
    call the module); residual and x plain tensors of one shape, dtype and device, and the
    norm's own guard (``rms_norm``) passing for the sum."""
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return None
    form = norm_forms.get(type(norm))
    if form is None:
        return None
    forward, eps_attribute, offset, cast_before_weight, condition = form
    if type(norm).forward is not forward or "forward" in norm.__dict__:
        return None
    if condition is not None and not getattr(norm, condition, False):
        return None
    if not _no_hooks(norm) or not norm.training:
        return None
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, eps_attribute, None)
    if not (
        _norm_operands_ok(x, weight, eps)
        and _tensor_ok(residual, x.device)
        and residual.dtype == x.dtype
        and residual.shape == x.shape
    ):
        return None
    taken["residual-norm"] += 1
    return {
        "weight": weight,
        "eps": eps,
        "offset": offset,
        "cast_before_weight": cast_before_weight,
    }


def rotary(q, k, cos, sin, unsqueeze_dim):
    """Whether ``forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=...)`` may replace the
    stock body: 4-D q and k of one fused dtype and equal shapes but for the heads, cos and
    sin of one dtype and shape, unsqueezed at ``unsqueeze_dim`` broadcasting to q, an even
    rotary width within the head."""
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return False
    if not (_tensor_ok(q) and _tensor_ok(k, q.device)):
        return False
    if not (q.requires_grad or k.requires_grad):
        return False
    if not (_tensor_ok(cos, q.device) and _tensor_ok(sin, q.device)):
        return False
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int):
        return False
    if q.dtype != k.dtype or cos.dtype != sin.dtype or cos.shape != sin.shape:
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    head = unsqueeze_dim % 4
    if unsqueeze_dim not in (1, 2, -3, -2) or head == 3:
        return False
    width = cos.shape[-1]
    head_dim = q.shape[-1]
    if width <= 0 or width % 2 or width > head_dim or k.shape[-1] != head_dim:
        return False
    cos4 = cos.shape[:head] + (1,) + cos.shape[head:]
    for d in range(3):
        if d == head:
            continue
        if k.shape[d] != q.shape[d] or cos4[d] not in (1, q.shape[d]):
            return False
    taken["rotary"] += 1
    return True


def rotary_single(x, cos, sin, unsqueeze_dim):
    """Whether ``forward_rewrite.rotary_single(x, cos, sin, unsqueeze_dim=...)`` may replace
    the stock body: ``rotary``'s conditions with x as both q and k."""
    return rotary(x, x, cos, sin, unsqueeze_dim)


def _silu_class():
    try:
        from transformers import activations
    except ImportError:
        return None, None
    return getattr(activations, "SiLUActivation", None), getattr(
        activations, "GELUTanh", None
    )


def _no_hooks(module):
    """Whether calling the module would run nothing but its forward: no forward or backward
    hooks of its own nor global ones (a fused path that skips ``__call__`` skips them)."""
    m = nn.modules.module
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


def gated_function(module, fn, x):
    """``"silu"`` or None (stock) for an MLP or experts module whose source applies torch's
    functional SiLU itself: called in place (``F.silu(self.w1(x)) * self.w3(x)``, LFM2) or held
    as an attribute (``self.act_fn = F.silu``, LFM2-MoE's experts). ``fn`` must be
    ``torch.nn.functional.silu`` itself when the call runs (the rewriter checked the name's
    import; a rebinding since then runs stock), and with no activation module to inspect the
    module itself must be in train mode; x as for ``gated_act``."""
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return None
    if not _tensor_ok(x) or not isinstance(module, nn.Module) or not module.training:
        return None
    if fn is not nn.functional.silu:
        return None
    taken["gated-mlp"] += 1
    return "silu"


def gated_act(act, x):
    """The activation ``forward_rewrite.gated_mlp_act`` computes for the MLP's activation
    module ``act`` (``"silu"`` or ``"gelu_tanh"``), or None (stock): the module must be
    exactly ``nn.SiLU``, transformers' ``SiLUActivation``, ``nn.GELU(approximate="tanh")`` or
    transformers' ``GELUTanh`` on its C implementation, without hooks; x a plain tensor of a
    fused dtype on a device with a backend."""
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return None
    if not _tensor_ok(x):
        return None
    if not isinstance(act, nn.Module) or not act.training or not _no_hooks(act):
        return None
    kind = type(act)
    silu_activation, gelu_tanh = _silu_class()
    if kind is nn.SiLU or (silu_activation is not None and kind is silu_activation):
        taken["gated-mlp"] += 1
        return "silu"
    if kind is nn.GELU and act.approximate == "tanh":
        taken["gated-mlp"] += 1
        return "gelu_tanh"
    if gelu_tanh is not None and kind is gelu_tanh:
        fn = getattr(act, "act", None)
        if (
            isinstance(fn, functools.partial)
            and fn.func is nn.functional.gelu
            and not fn.args
            and fn.keywords == {"approximate": "tanh"}
        ):
            taken["gated-mlp"] += 1
            return "gelu_tanh"
    return None


def gated_oai(module, x, alpha):
    """``alpha`` (the ``swiglu_alpha`` the guard read before) or None (stock) for an MLP or
    experts module whose source writes GPT-OSS's / MiniMax-M3's SwiGLU out (``(up + 1) * gate *
    torch.sigmoid(gate * self.<alpha>)``: ``activation="swiglu_oai"``): with no activation
    module to inspect, the module itself must be in train mode; x as for ``gated_act``. The
    guard that counts the fused path (``taken["gated-mlp"]``), once, after the limit's and
    alpha's guards."""
    if alpha is None:
        return None
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return None
    if not _tensor_ok(x) or not isinstance(module, nn.Module) or not module.training:
        return None
    taken["gated-mlp"] += 1
    return alpha


def swiglu_alpha(value):
    """The alpha of GPT-OSS's / MiniMax-M3's SwiGLU as the fused ops take it (``alpha=``), or
    None (stock): a Python int or float (not a bool, not a tensor), finite. It guards no tensor
    and counts nothing: ``gated_oai`` after it does."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        alpha = float(value)
    except OverflowError:  # an int beyond float
        return None
    return alpha if math.isfinite(alpha) else None


def swiglu_limit(value):
    """The limit of a clamped SwiGLU as ``forward_rewrite.gated_mlp_act`` /
    ``moe_experts`` take it (``limit=``), or None (stock): a Python int or float (not a bool,
    not a tensor), not NaN, > 0; inf is allowed (the clamps then change nothing, as in stock).
    It guards no tensor and counts nothing: the activation guard after it does."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        limit = float(value)
    except OverflowError:  # an int beyond float: not a bound the op takes
        return None
    if math.isnan(limit) or limit <= 0:
        return None
    return limit


class _ExpertsForm:
    """What ``moe_experts`` checks and passes for one registered experts class."""

    __slots__ = (
        "act_attribute",
        "act_path",
        "alpha",
        "clamp_after_activation",
        "forward",
        "gate",
        "limit",
        "namespace",
    )

    def __init__(
        self, cls, forward, gate, activation, limit, clamp_after_activation, alpha=None
    ):
        self.forward = forward
        self.gate = gate
        # ``swiglu_oai``: no activation to find, the alpha attribute read on every call.
        self.alpha = alpha
        # ``self.<name>``: the module's attribute; else a dotted name (``F.silu``) the gate's
        # source reads in its module, looked up there on every call as the source would.
        name = activation.removeprefix("self.")
        if alpha is not None:
            self.act_attribute, self.act_path, self.namespace = None, None, None
        elif name != activation:
            self.act_attribute, self.act_path, self.namespace = name, None, None
        else:
            module = sys.modules.get(cls.__module__)
            self.act_attribute = None
            self.act_path = tuple(activation.split("."))
            self.namespace = getattr(module, "__dict__", {})
        self.limit = limit
        self.clamp_after_activation = bool(clamp_after_activation)

    def activation(self, module):
        if self.act_attribute is not None:
            return getattr(module, self.act_attribute, None)
        head, *rest = self.act_path
        value = self.namespace.get(head)
        for part in rest:
            value = getattr(value, part, None)
        return value


def register_experts(
    cls,
    forward,
    gate,
    *,
    activation="self.act_fn",
    limit=None,
    clamp_after_activation=False,
    alpha=None,
):
    """Record that ``cls`` runs through ``forward_rewrite.moe_experts`` while its
    ``forward`` and ``_apply_gate`` are these (the installer calls it). ``activation``: what
    the gate applies, ``self.<attribute>`` (transformers' default: ``self.act_fn``) or a
    dotted name of the class's module (``F.silu``), or ``"swiglu_oai"`` (MiniMax-M3's gate,
    written out) with ``alpha``, the attribute holding its alpha (read through
    ``swiglu_alpha`` on every call); ``limit``: the attribute holding a clamped SwiGLU gate's
    limit (its name, read through ``swiglu_limit`` on every call), and
    ``clamp_after_activation`` where the gate is clamped (Step-3.7: the activation's
    output)."""
    if not (isinstance(activation, str) and activation):
        raise ValueError(
            f"activation must name what the gate applies, not {activation!r}"
        )
    if limit is not None and not (isinstance(limit, str) and limit.isidentifier()):
        raise ValueError(f"limit must be an attribute name, not {limit!r}")
    if (activation == "swiglu_oai") != (alpha is not None):
        raise ValueError(
            f"alpha goes with activation 'swiglu_oai' and nothing else, not {alpha!r} "
            f"with {activation!r}"
        )
    if alpha is not None:
        if not (isinstance(alpha, str) and alpha.isidentifier()):
            raise ValueError(f"alpha must be an attribute name, not {alpha!r}")
        if limit is None or clamp_after_activation:
            raise ValueError("a 'swiglu_oai' gate is clamped before the activation")
    experts_forms[cls] = _ExpertsForm(
        cls, forward, gate, activation, limit, clamp_after_activation, alpha
    )


def forget_experts():
    experts_forms.clear()


def moe_experts(module, x, top_k_index, top_k_weights):
    """The keyword arguments of ``forward_rewrite.moe_experts`` (activation, transposed; for
    a clamped SwiGLU gate also limit and clamp_after_activation; for a ``swiglu_oai`` gate
    alpha)
    that compute what transformers' ``grouped_mm_experts_forward`` computes for this
    experts module and call, or None (stock): the module's class registered with its
    ``forward`` and fused gate still in place (none of its own on the instance), in train
    mode, with transformers' flags as the op computes them; x (tokens, hidden) and both
    weights plain contiguous tensors of one fused dtype, the routing (tokens, top_k), rows
    whose 16-byte alignment torch's grouped GEMM needs, and transformers' own test
    (``_can_use_grouped_mm``) choosing torch's grouped GEMM, as the stock call would; a
    clamped gate's limit as ``swiglu_limit`` reads it from the module; the activation the gate
    applies as ``gated_act`` / ``gated_function`` decide it, or for ``swiglu_oai`` its alpha as
    ``swiglu_alpha`` reads it and ``gated_oai`` lets it through."""
    if _off.get() or torch.jit.is_scripting() or not torch.is_grad_enabled():
        return None
    form = experts_forms.get(type(module))
    if form is None or not module.training:
        return None
    cls = type(module)
    if cls.forward is not form.forward or cls._apply_gate is not form.gate:
        return None
    if "forward" in module.__dict__ or "_apply_gate" in module.__dict__:
        return None
    flags = (
        getattr(module, "has_gate", None) is True
        and getattr(module, "is_concatenated", None) is True
        and getattr(module, "has_bias", None) is False
        and getattr(module, "has_post_expert_norm", None) is False
        and getattr(module, "_is_expert_parallel", None) is False
        and isinstance(getattr(module, "is_transposed", None), bool)
    )
    if not flags:
        return None
    w1 = getattr(module, "gate_up_proj", None)
    w2 = getattr(module, "down_proj", None)
    if not _experts_operands_ok(module, x, top_k_index, top_k_weights, w1, w2):
        return None
    limit = None
    if form.limit is not None:
        # Before the activation guard, which counts the fused paths it lets through.
        limit = swiglu_limit(getattr(module, form.limit, None))
        if limit is None:
            return None
    alpha = None
    if form.alpha is not None:
        # Read before the guard that counts, which sees it.
        alpha = gated_oai(module, x, swiglu_alpha(getattr(module, form.alpha, None)))
        if alpha is None:
            return None
        activation = "swiglu_oai"
    else:
        act = form.activation(module)
        if isinstance(act, nn.Module):
            activation = gated_act(act, x)
        else:
            activation = gated_function(module, act, x)
        if activation is None:
            return None
    taken["experts-forward"] += 1
    plan = {"activation": activation, "transposed": module.is_transposed}
    if form.limit is not None:
        plan["limit"] = limit
        plan["clamp_after_activation"] = form.clamp_after_activation
    if alpha is not None:
        plan["alpha"] = alpha
    return plan


def _experts_operands_ok(module, x, top_k_index, top_k_weights, w1, w2):
    if not (_tensor_ok(x) and x.dim() == 2 and x.is_contiguous()):
        return False
    for w in (w1, w2):
        if not (
            isinstance(w, torch.Tensor)
            and _tensor_ok(w, x.device)
            and w.dtype == x.dtype
            and w.dim() == 3
            and w.is_contiguous()
        ):
            return False
    if not (
        type(top_k_index) in _PLAIN
        and top_k_index.dtype in (torch.int64, torch.int32)
        and top_k_index.device == x.device
        and top_k_index.dim() == 2
        and top_k_index.shape[0] == x.shape[0]
        and _tensor_ok(top_k_weights, x.device)
        and top_k_weights.shape == top_k_index.shape
    ):
        return False
    experts = w1.shape[0]
    if getattr(module, "num_experts", None) != experts or w2.shape[0] != experts:
        return False
    hidden = x.shape[1]
    if module.is_transposed:
        inner, outer = w1.shape[1:], w2.shape[1:][::-1]
    else:
        inner, outer = w1.shape[1:][::-1], w2.shape[1:]
    if inner[0] != hidden or inner[1] % 2 or tuple(outer) != (hidden, inner[1] // 2):
        return False
    align = 16 // x.element_size()
    if hidden % align or (inner[1] // 2) % align:
        return False
    can_use = getattr(_transformers_moe(), "_can_use_grouped_mm", None)
    return can_use is not None and bool(can_use(x, w1, None))


_moe_module = None


def _transformers_moe():
    """``transformers.integrations.moe`` (imported once, off the per-call path), or None;
    its ``_can_use_grouped_mm`` is read from it on each call, as the stock function does."""
    global _moe_module
    if _moe_module is None:
        try:
            from transformers.integrations import moe
        except ImportError:
            return None
        _moe_module = moe
    return _moe_module
