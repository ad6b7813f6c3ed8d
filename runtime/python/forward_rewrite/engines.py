"""How the fused op reaches the head's weight under distributed engines and adapters
(ARCHITECTURE.md, invariant 7).

The rule the competitors' bugs teach (PITFALLS.md, "Distributed engines"): never read a
weight the engine has not gathered. FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3 gather a
module's parameters in its forward pre-hook and free them in its forward hook; their backward
machinery hangs off the tensors that cross the module's boundary (FSDP2: an autograd function
on the forward's inputs that reduce-scatters the gradients, and a hook on its outputs that
gathers again for backward; ZeRO-3 the same with its own functions). So the fused op does not
read such a head's weight from outside: it *calls the head module* with its ``forward``
temporarily replaced by the fused computation (``call_through``). The engine's hooks run
around the fused op exactly as they run around ``F.linear`` in stock: the weight is the
gathered one, the hidden states that enter carry the engine's post-backward function, the
loss that leaves carries its pre-backward hook, and the op's weight gradient lands in the
same unsharded parameter's ``.grad`` that stock's lands in, before the same reduce-scatter.

``head_route(head)`` says how a head is computed, or why it cannot be (a guard reason):

* ``direct``: a plain ``nn.Linear`` with no hooks; its weight is read directly. This is the
  head under DDP (which hooks parameters, not modules), DeepSpeed ZeRO-1/2 (same), FSDP2 when
  the head belongs to the root unit or any unit that the model's forward has already
  unsharded (the head is then a plain module holding plain unsharded parameters), PEFT with
  adapters elsewhere, and gradient checkpointing (which wraps decoder layers, not the head).
* ``fsdp2`` / ``deepspeed``: the head is an ``nn.Linear`` (FSDP2 changes its class to a
  subclass ``FSDPLinear``: the original class must be exactly ``nn.Linear``) whose hooks all
  belong to that engine; computed through ``call_through``.
* ``peft-lora``: a PEFT ``lora.Linear`` head (vanilla LoRA, any number of active adapters):
  ``base(x) + sum_a s_a * B_a(A_a(dropout_a(x)))`` is one linear map of the concatenation
  ``[x, s_1 A_1(drop_1(x)), ...]`` with the weight ``[W, B_1, ...]``, so the fused op runs on
  those (see ``lora_operands``). Gradients reach A (through the concatenated hidden), B
  (through the concatenated weight) and x; dropout and ``lora_A`` are called as modules, so
  the random stream and their hooks are stock's. Not ``W + s B A``: in bfloat16 that sum
  rounds most of a small adapter update away and has no room for the adapter's dropout.
* a PEFT ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``) is routed as the module
  it forwards to (the trainable copy, or the original when adapters are off).

Anything else with hooks (a user's hook, PEFT's mixed-batch hooks, ``accelerate``'s
``add_hook_to_module``, which replaces ``forward``) is ``head-hooks``: a hook that expects the
logits would see a loss, so the stock code runs.
"""

import contextlib
import functools
import inspect

from torch import nn

__all__ = ["call_through", "head_route", "lora_operands", "plain_class"]

#: Hook functions are attributed to an engine by the module that defines them (after
#: unwrapping decorators and bound methods).
_ENGINE_MODULES = (
    ("torch.distributed.fsdp.", "fsdp2"),
    ("torch.distributed._composable.fsdp.", "fsdp2"),
    ("deepspeed.", "deepspeed"),
)
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)
_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")
_MODULES_TO_SAVE = ("peft.utils.other", "ModulesToSaveWrapper")


class Route:
    """How a head is computed: ``kind`` (``direct``, ``fsdp2``, ``deepspeed``,
    ``peft-lora``) and ``module``, the ``nn.Linear`` or ``lora.Linear`` that computes it."""

    __slots__ = ("kind", "module")

    def __init__(self, kind, module):
        self.kind = kind
        self.module = module

    def __repr__(self):
        return f"Route({self.kind!r}, {type(self.module).__name__})"


def plain_class(cls):
    """The class FSDP2 swapped out: ``fully_shard`` changes a module's class to a dynamic
    subclass ``FSDP<Name>(FSDPModule, <Name>)``; anything else is returned as it is."""
    index = getattr(cls, "_orig_cls_mro_index", None)
    if isinstance(index, int) and cls.__name__.startswith("FSDP"):
        try:
            return cls.__mro__[index]
        except IndexError:
            return cls
    return cls


def _is(cls, where):
    return (cls.__module__, cls.__qualname__) == where


def _hook_engine(hook):
    """``fsdp2`` / ``deepspeed`` for a hook one of those engines registered, else None."""
    fn = hook
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif inspect.ismethod(fn):
            fn = fn.__func__
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            break
    module = getattr(fn, "__module__", None) or ""
    for prefix, engine in _ENGINE_MODULES:
        if module.startswith(prefix):
            return engine
    return None


def hooks_of(module):
    """(engines, foreign): the engines whose hooks are on ``module`` and the number of other
    hooks (its own and the global module hooks, which apply to every module)."""
    engines, foreign = set(), 0
    for name in _HOOK_DICTS:
        for hook in (getattr(module, name, None) or {}).values():
            engine = _hook_engine(hook)
            if engine is None:
                foreign += 1
            else:
                engines.add(engine)
    from torch.nn.modules import module as module_mod

    for name in _GLOBAL_HOOK_DICTS:
        foreign += len(getattr(module_mod, name, None) or {})
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        foreign += (
            1  # forward replaced on the instance (accelerate's add_hook_to_module)
        )
    return engines, foreign


def _has_any_hooks(module):
    engines, foreign = hooks_of(module)
    return bool(engines) or foreign > 0


def head_route(head):
    """(Route, None) when the fused op can compute ``head``, else (None, reason) with a
    guard reason code (``head-not-linear``, ``head-hooks``, ``head-sharded``,
    ``head-lora-unsupported``)."""
    if not isinstance(head, nn.Module):
        return None, "head-not-linear"
    cls = plain_class(type(head))
    if _is(cls, _MODULES_TO_SAVE):
        if _has_any_hooks(head):
            return None, "head-hooks"
        inner = _modules_to_save_target(head)
        if inner is None:
            return None, "head-lora-unsupported"
        return head_route(inner)
    if _is(cls, _LORA_LINEAR):
        return _lora_route(head)
    if cls is not nn.Linear:
        return None, "head-not-linear"
    engines, foreign = hooks_of(head)
    if foreign or len(engines) > 1:
        return None, "head-hooks"
    if not engines:
        if _is_dtensor(head.weight):
            return None, "head-sharded"  # tensor parallelism: no engine gathers it
        return Route("direct", head), None
    (engine,) = engines
    if engine == "fsdp2" and _fsdp2_keeps_dtensor(head):
        return (
            None,
            "head-sharded",
        )  # FSDP2 + tensor parallel: still a DTensor when gathered
    return Route(engine, head), None


def _fsdp2_keeps_dtensor(head):
    """Whether FSDP2 manages a parameter that was a DTensor before ``fully_shard`` (2-D
    FSDP + TP): its unsharded form is still sharded along the TP dimension."""
    try:
        state = head._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
        return any(p.is_dtensor for g in groups if g for p in g.fsdp_params)
    except AttributeError:
        return (
            False  # the op still refuses a weight that is not whole inside the forward
        )


def _is_dtensor(t):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _modules_to_save_target(wrapper):
    """The module ``ModulesToSaveWrapper.forward`` calls (peft 0.13-0.21), or None."""
    try:
        active = list(wrapper.active_adapters)
        if wrapper.disable_adapters or any(a not in wrapper._adapters for a in active):
            return wrapper.original_module
        if not active:
            return wrapper.original_module
        return wrapper.modules_to_save[active[0]]
    except (AttributeError, KeyError, TypeError):
        return None


def _lora_route(head):
    """A vanilla-LoRA ``lora.Linear`` head, as its forward computes it (peft 0.21)."""
    try:
        base = head.base_layer
        merged = bool(head.merged)
        disabled = bool(head.disable_adapters)
        active = [a for a in head.active_adapters if a in head.lora_A]
    except AttributeError:
        return None, "head-lora-unsupported"
    if _has_any_hooks(head):
        return None, "head-hooks"
    if disabled and merged:
        return None, "head-lora-unsupported"  # stock unmerges first: a side effect
    if disabled or merged or not active:
        # Stock runs the base layer alone (merged: the update is in its weight).
        return head_route(base)
    if plain_class(type(base)) is not nn.Linear or _has_any_hooks(base):
        return (
            (None, "head-hooks") if _has_any_hooks(base) else (None, "head-not-linear")
        )
    if _is_dtensor(base.weight):
        return None, "head-sharded"
    variants = getattr(head, "lora_variant", {}) or {}
    dora = getattr(head, "use_dora", {}) or {}
    for a in active:
        lora_a, lora_b = head.lora_A[a], head.lora_B[a]
        dropout = head.lora_dropout[a]
        if a in variants or dora.get(a, False):
            return None, "head-lora-unsupported"  # DoRA and other variants
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return None, "head-lora-unsupported"
        if lora_b.bias is not None or type(dropout) not in (nn.Dropout, nn.Identity):
            return None, "head-lora-unsupported"
        if _has_any_hooks(lora_b):
            return None, "head-hooks"  # B is read as a weight, so nothing may gather it
        if lora_b.weight.shape[0] != base.weight.shape[0]:
            return None, "head-lora-unsupported"
    if getattr(head, "fan_in_fan_out", False):
        return None, "head-lora-unsupported"
    return Route("peft-lora", head), None


def lora_operands(head, x):
    """(hidden, weight, bias) with ``hidden @ weight.T + bias == head(x)`` for a LoRA head
    that ``head_route`` accepted: ``[x, s_a * A_a(drop_a(x)) ...]`` and ``[W, B_a ...]``,
    in the base weight's dtype (the op needs one dtype; adapters kept in float32 for a
    bfloat16 model are cast, as their product would be when added to the bf16 base output).
    Dropout and ``lora_A`` run as modules, in stock's order."""
    import torch

    base = head.base_layer
    weight = base.weight
    hiddens, weights = [x], [weight]
    for a in head.active_adapters:
        if a not in head.lora_A:
            continue
        lora_a, lora_b = head.lora_A[a], head.lora_B[a]
        x = head._cast_input_dtype(x, lora_a.weight.dtype)  # stock rebinds x, so do we
        u = lora_a(head.lora_dropout[a](x)) * head.scaling[a]
        hiddens.append(u.to(weight.dtype))
        weights.append(lora_b.weight.to(weight.dtype))
    hidden = torch.cat([h.to(weight.dtype) for h in hiddens], dim=-1)
    return hidden, torch.cat(weights, dim=1), base.bias


@contextlib.contextmanager
def _forward_replaced(module, forward):
    had = "forward" in vars(module)
    previous = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def call_through(module, hidden, compute):
    """``compute(hidden)`` run as ``module``'s forward: ``module(hidden)`` with ``forward``
    replaced for the call, so the module's hooks (an engine's gather, cast, post-backward
    registration; then its free and pre-backward registration) run around it, and
    ``compute`` reads the parameters the pre-hooks gathered. ``compute`` receives the
    hidden states the pre-hooks passed on (FSDP2 wraps them for its post-backward).

    Returns the module's output (the hooks may have replaced the tensor: DeepSpeed passes
    it through an autograd function of its own), with its value restored to the exact
    float32 loss if a hook cast it (FSDP2's ``MixedPrecisionPolicy(output_dtype=...)``):
    the gradient still flows through the hooks' tensor, so their backward hooks fire."""
    computed = []

    def forward(h, *args, **kwargs):
        if args or kwargs:
            raise RuntimeError(
                f"forward_rewrite: a pre-forward hook of {type(module).__name__} added "
                f"arguments {list(kwargs) or len(args)}; the fused head takes none"
            )
        loss = compute(h)
        computed.append(loss)
        return loss

    with _forward_replaced(module, forward):
        out = module(hidden)
    if not computed:
        raise RuntimeError(
            f"forward_rewrite: a hook of {type(module).__name__} skipped its forward"
        )
    loss = computed[0]
    if out is loss:
        return out
    if out.dtype != loss.dtype:
        # Value from the fused op, gradient through the hooks' tensor.
        return loss.detach() + (out - out.detach()).to(loss.dtype)
    return out
