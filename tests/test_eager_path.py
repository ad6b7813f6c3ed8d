"""The fused decoder ops' eager fast path (``forward_rewrite._eager``): in plain eager calls
the ops run as an ``autograd.Function`` over the same implementation as their custom ops,
giving bit-identical outputs and gradients; under fake tensors, dispatch modes and functorch
transforms the registered custom op runs (compilation is covered by test_fused_ops)."""

import forward_rewrite
import pytest
import torch
from forward_rewrite import _eager
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    # (function, inputs that get gradients, constant inputs: the rotary tables)
    return {
        "rms_norm": (
            lambda x, w: forward_rewrite.rms_norm(x, w, 1e-6),
            (r(2, 6, 16), r(16)),
            (),
        ),
        "add_rms_norm": (
            lambda res, x, w: forward_rewrite.add_rms_norm(res, x, w, 1e-6),
            (r(2, 6, 16), r(2, 6, 16), r(16)),
            (),
        ),
        "rotary": (
            lambda q, k, cos, sin: forward_rewrite.rotary(q, k, cos, sin),
            (r(2, 4, 6, 12), r(2, 2, 6, 12)),
            (r(2, 6, 8), r(2, 6, 8)),
        ),
        "gated_mlp_act": (
            lambda a, b: forward_rewrite.gated_mlp_act(a, b, activation="gelu_tanh"),
            (r(2, 6, 16), r(2, 6, 16)),
            (),
        ),
        "gated_mlp_act_packed": (
            lambda gu: forward_rewrite.gated_mlp_act_packed(gu),
            (r(2, 6, 32),),
            (),
        ),
    }


def _nodes(outs):
    """The names of the autograd nodes behind ``outs``."""
    names, todo = set(), [o.grad_fn for o in outs]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


def _run(fn, inputs, constants):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *constants)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return outs, [t.grad for t in leaves], _nodes(outs)


@pytest.mark.parametrize("name", list(_cases()))
def test_the_fast_path_equals_the_custom_op_bit_for_bit(name, monkeypatch):
    case = _cases()[name]
    fast_out, fast_grads, fast_nodes = _run(*case)
    monkeypatch.setattr(_eager, "eager_ok", lambda args: False)
    op_out, op_grads, op_nodes = _run(*case)
    assert any("_eager" in n for n in fast_nodes), fast_nodes
    assert not any("_eager" in n for n in op_nodes), op_nodes
    for a, b in zip(fast_out, op_out, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(fast_grads, op_grads, strict=True):
        assert torch.equal(a, b)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_custom_ops_forward_and_backward():
    fn, inputs, _ = _cases()["rms_norm"]
    leaves = [t.clone().requires_grad_() for t in inputs]
    with _Recorder() as recorder:
        fn(*leaves).sum().backward()
    assert "forward_rewrite.rms_norm" in recorder.ops, recorder.ops
    assert "forward_rewrite.rms_norm_backward" in recorder.ops, recorder.ops


@pytest.mark.parametrize("name", list(_cases()))
def test_fake_tensors_take_the_custom_ops_fake_kernel(name):
    fn, inputs, constants = _cases()[name]
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (*inputs, *constants)]
        out = fn(*fakes)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(type(o).__name__ == "FakeTensor" for o in outs)


def test_functorch_transforms_and_subclasses_are_not_the_fast_path():
    seen = []

    def f(x):
        seen.append(_eager.eager_ok((x,)))
        return x.sum()

    torch.func.grad(f)(torch.randn(3))
    assert seen == [False]
    assert _eager.eager_ok((torch.randn(2), torch.nn.Parameter(torch.randn(2)), 3))

    class Sub(torch.Tensor):
        pass

    assert not _eager.eager_ok((torch.randn(2).as_subclass(Sub),))
