"""The eager fast path of the fused decoder ops' custom-op pairs.

A ``torch.library.custom_op`` call costs about 70 us of Python dispatch (measured on the CPU
with tiny tensors, which isolates it: 92 us through the custom op, 21 us through an
``autograd.Function`` calling the same implementation, 18 us for the implementation alone),
and eager training pays it on every call of every fused op, forward and backward: a few
hundred calls per step of a 16-layer decoder. So, outside compilation, each op runs as an
``autograd.Function`` built from the *same* three functions the custom op is registered
with (implementation, ``setup_context``, backward): the same kernels, the same saved
tensors, the same numbers. Wherever anything may be watching the dispatcher -- Dynamo /
AOTAutograd tracing, fake or functional tensors, a dispatch or torch-function mode
(selective activation checkpointing, FlopCounterMode), functorch transforms, a tensor
subclass (DTensor) -- the registered custom op runs instead, so ``torch.compile(fullgraph=
True)``, ``opcheck`` and those modes see one opaque op exactly as before.
"""

import torch
from torch import Tensor
from torch.nn import Parameter

_PLAIN = (Tensor, Parameter)


def eager_ok(args) -> bool:
    """Whether the fast path may run for a call with these arguments."""
    if torch.compiler.is_compiling():
        return False
    if (
        torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, Tensor))


class OpPair:
    """A forward custom op with its eager twin. ``impl`` is the function the custom op was
    made from; ``setup`` / ``backward`` the functions registered as its autograd formula;
    ``nondiff``: indices of outputs that carry no gradient (saved statistics). A backward
    can tell the two apart: ``ctx.eager`` is True when the forward ran on the fast path.
    ``materialize=False``: on the fast path the backward gets None, not zeros, for an output
    no gradient reached (rotary's k when only q is used: the input then gets no gradient,
    as stock's separate expressions give none, rather than a zero one that an optimizer
    would still decay)."""

    def __init__(self, op, impl, setup, backward, nondiff=(), materialize=True):
        self.op = op
        self.impl = impl
        nondiff = tuple(nondiff)

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup(ctx, inputs, output)
            ctx.eager = True
            if not materialize:
                ctx.set_materialize_grads(False)
            if nondiff:
                ctx.mark_non_differentiable(*(output[i] for i in nondiff))
            return output

        self.function = type(
            f"{impl.__name__.strip('_')}_eager",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )
        op.register_autograd(backward, setup_context=setup)

    def __call__(self, *args):
        if eager_ok(args):
            return self.function.apply(*args)
        return self.op(*args)


class BackwardOp:
    """A backward custom op with its implementation, called directly on the fast path."""

    def __init__(self, op, impl):
        self.op = op
        self.impl = impl

    def __call__(self, *args):
        return (self.impl if eager_ok(args) else self.op)(*args)
