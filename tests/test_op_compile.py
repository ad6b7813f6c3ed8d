"""torch.compile traces through the op in one graph (fullgraph=True), with ignored rows
present (Liger gave a silently wrong loss there, PR #1338), forward and backward."""

import forward_rewrite
import pytest
import torch
from op_reference import errors, grads_of, problem, stock


def loss_fn(labels, **kw):
    def f(x, head):
        return forward_rewrite.fused_lm_head_loss(
            x, head, labels, vocab_size=head.out_features, **kw
        )

    return f


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"num_items_in_batch": 29}, {"logit_softcapping": 3.0, "reduction": "sum"}],
    ids=["mean", "num_items", "softcap_sum"],
)
def test_compiled_matches_eager_with_ignored_rows(backend, kw):
    torch._dynamo.reset()
    h, head, labels = problem(3, 21, 16, 70, bias=True, ignored=0.4)
    assert (labels == -100).sum() > 10
    compiled = torch.compile(loss_fn(labels, **kw), fullgraph=True, backend=backend)
    got = grads_of(compiled, h, head)
    want = grads_of(loss_fn(labels, **kw), h, head)
    errs = errors(got, want)
    assert errs[0] <= 1e-6 and max(errs[1:]) <= 1e-5, errs
    if not kw:
        stock_errs = errors(got, stock(h, head, labels))
        assert stock_errs[0] <= 1e-5 and max(stock_errs[1:]) <= 1e-4, stock_errs


def test_compiled_reduction_none_and_float16_recompute_in_backward():
    torch._dynamo.reset()
    h, head, labels = problem(2, 11, 16, 40, bias=True, ignored=0.3)
    weights = torch.linspace(-1, 1, 22)

    def weighted(x, m):
        return (loss_fn(labels, reduction="none")(x, m) * weights).sum()

    compiled = torch.compile(weighted, fullgraph=True, backend="aot_eager")
    errs = errors(grads_of(compiled, h, head), grads_of(weighted, h, head))
    assert errs[0] <= 1e-6 and max(errs[1:]) <= 1e-5, errs

    h16, head16 = h.half(), head.half()
    compiled = torch.compile(loss_fn(labels), fullgraph=True, backend="aot_eager")
    errs = errors(
        grads_of(compiled, h16, head16), grads_of(loss_fn(labels), h16, head16)
    )
    assert errs[0] <= 1e-6 and max(errs[1:]) <= 1e-3, errs


def test_the_op_is_one_node_in_the_graph():
    torch._dynamo.reset()
    h, head, labels = problem(2, 7, 8, 20)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(loss_fn(labels), fullgraph=True, backend=capture)(h, head)
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("forward_rewrite.fused_lm_head_loss" in t for t in targets) == 1, targets
    assert not any("cross_entropy" in t or "linear" in t for t in targets), targets


def test_opcheck_validates_the_registrations():
    # torch.library.opcheck: schema, fake (meta) kernel, autograd registration.
    h, head, labels = problem(2, 7, 8, 20, bias=True)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    hidden = h.reshape(-1, 8).requires_grad_(True)
    denominator = (targets != -100).sum().clamp(min=1).float()
    op = torch.ops.forward_rewrite.fused_lm_head_loss.default
    cases = (
        (True, "mean", True),
        (True, "mean", False),  # a frozen head: no dW
        (False, "none", True),
        (False, "sum", False),
    )
    for eager, reduction, weight_grad in cases:
        args = (
            hidden,
            head.weight,
            head.bias,
            targets,
            denominator if reduction == "mean" else None,
            -100,
            0.0,
            1.0,
            None,
            reduction,
            eager,
            weight_grad,
            1 << 20,
        )
        torch.library.opcheck(
            op,
            args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
