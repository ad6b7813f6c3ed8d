"""Wrong arguments are Python exceptions naming the argument: from the public op, from the
backend checks, and from the native function itself (never a crash or a panic)."""

import importlib.util

import forward_rewrite
import pytest
import torch
from forward_rewrite import _cpu, _native, ops
from op_reference import problem


@pytest.fixture
def args():
    h, head, labels = problem(2, 5, 8, 20, bias=True)
    return h, head, labels


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda h, m, y: (h[..., :7], m, y, {}), ValueError, "hidden_states"),
        (lambda h, m, y: (h.double(), m, y, {}), TypeError, "hidden_states"),
        (lambda h, m, y: ([1.0], m, y, {}), TypeError, "hidden_states"),
        (lambda h, m, y: (h, m.bfloat16(), y, {}), TypeError, "head"),
        (lambda h, m, y: (h, torch.nn.Sequential(m), y, {}), TypeError, "head"),
        (lambda h, m, y: (h, m.weight[0], y, {}), ValueError, "head"),
        (lambda h, m, y: (h, m, y[:, :4], {}), ValueError, "labels"),
        (lambda h, m, y: (h, m, y.float(), {}), TypeError, "labels"),
        (lambda h, m, y: (h, m, None, {}), TypeError, "labels"),
        (
            lambda h, m, y: (h, m, y, {"shift_labels": y[:1]}),
            ValueError,
            "shift_labels",
        ),
        (lambda h, m, y: (h, m, y, {"vocab_size": 21}), ValueError, "vocab_size"),
        (lambda h, m, y: (h, m, y, {"reduction": "avg"}), ValueError, "reduction"),
        (
            lambda h, m, y: (h, m, y, {"reduction": "sum", "num_items_in_batch": 3}),
            ValueError,
            "num_items_in_batch",
        ),
        (
            lambda h, m, y: (h, m, y, {"num_items_in_batch": "3"}),
            TypeError,
            "num_items_in_batch",
        ),
        (
            lambda h, m, y: (h, m, y, {"num_items_in_batch": torch.ones(2)}),
            ValueError,
            "num_items_in_batch",
        ),
        (lambda h, m, y: (h, m, y, {"ignore_index": 1.5}), TypeError, "ignore_index"),
        (
            lambda h, m, y: (h, m, y, {"label_smoothing": 1.5}),
            ValueError,
            "label_smoothing",
        ),
        (
            lambda h, m, y: (h, m, y, {"logit_softcapping": 0.0}),
            ValueError,
            "logit_softcapping",
        ),
        (
            lambda h, m, y: (h, m, y, {"logit_softcapping": torch.tensor(3.0)}),
            TypeError,
            "logit_softcapping",
        ),
        (
            lambda h, m, y: (h, m, y, {"logit_scale_divide": 0}),
            ValueError,
            "logit_scale_divide",
        ),
        (
            lambda h, m, y: (h, m, y, {"logit_scale_multiply": float("nan")}),
            ValueError,
            "logit_scale_multiply",
        ),
        (
            lambda h, m, y: (h.to("meta"), m.to("meta"), y, {}),
            ValueError,
            "hidden_states",
        ),
    ],
)
def test_bad_arguments_name_themselves(args, change, error, name):
    h, head, labels, kw = change(*args)
    with pytest.raises(error, match=f"^{name}"):
        forward_rewrite.fused_lm_head_loss(h, head, labels, **kw)


def test_device_mismatch_names_the_head(args):
    h, head, labels = args
    with pytest.raises(ValueError, match="^head: weight on cpu, hidden_states on meta"):
        forward_rewrite.fused_lm_head_loss(h.to("meta"), head, labels)


def test_out_of_range_label_is_a_value_error(args):
    h, head, labels = args
    labels[1, 3] = 20
    with pytest.raises(ValueError, match="targets: row 7 has target 20"):
        forward_rewrite.fused_lm_head_loss(h, head, labels)
    labels[1, 3] = -5
    with pytest.raises(ValueError, match="target -5"):
        forward_rewrite.fused_lm_head_loss(h, head, labels)


@pytest.mark.skipif(
    importlib.util.find_spec("forward_rewrite._cuda") is not None,
    reason="this build has a CUDA backend",
)
def test_cuda_without_its_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA backend .* is not available"):
        ops._backend(torch.device("cuda"))


def test_backend_checks_name_the_argument(args):
    h, head, labels = args
    hidden = h.reshape(-1, 8)
    targets = labels.reshape(-1)
    kw = {
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "scale": 1.0,
        "softcap": None,
        "chunk_budget_bytes": 1 << 20,
    }
    with torch.no_grad():
        cases = [
            ((hidden[None], head.weight, None, targets), "hidden"),
            ((hidden, head.weight.t(), None, targets), "weight"),
            ((hidden, head.weight, head.bias[:3], targets), "bias"),
            ((hidden, head.weight, None, targets.int()), "targets"),
            (
                (hidden[::2], head.weight, None, targets[::2]),
                "hidden",
            ),  # not contiguous
        ]
        for call, name in cases:
            with pytest.raises((ValueError, TypeError), match=f"^{name}"):
                _cpu.fused_ce(*call, grad_scale=None, compute_grads=False, **kw)
        with pytest.raises(ValueError, match="^grad_scale"):
            _cpu.fused_ce(
                hidden,
                head.weight,
                None,
                targets,
                grad_scale=torch.ones(3),
                compute_grads=True,
                **kw,
            )


def native_args(n=4, h=3, v=5):
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h)
    targets = torch.randint(0, v, (n,))
    row_loss = torch.empty(n)
    kept = [hidden, weight, targets, row_loss]
    kw = {
        "hidden": hidden.data_ptr(),
        "weight": weight.data_ptr(),
        "bias": None,
        "targets": targets.data_ptr(),
        "n": n,
        "h": h,
        "v": v,
        "dtype": "float32",
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "scale": 1.0,
        "softcap": None,
        "row_loss": row_loss.data_ptr(),
        "grad_scale": None,
        "grad_scale_len": 0,
        "dh": None,
        "dw": None,
        "db": None,
        "chunk_budget_bytes": 1 << 20,
    }
    return kw, kept


def test_native_call_works_on_valid_pointers():
    kw, kept = native_args()
    _native.cpu_fused_ce(**kw)
    assert torch.all(kept[3] > 0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"dtype": "float64"}, "dtype"),
        ({"hidden": 0}, "hidden: null pointer"),
        ({"weight": 2}, "weight: pointer not aligned"),
        ({"h": 0}, "hidden: hidden size must be positive"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"softcap": 0.0}, "softcap"),
        ({"chunk_budget_bytes": 0}, "chunk_budget_bytes"),
        ({"grad_scale": 8, "grad_scale_len": 1}, "grad_scale, dh, dw"),
        ({"db": 8}, "grad_scale, dh, dw"),
    ],
)
def test_native_rejects_bad_calls_with_value_errors(bad, message):
    kw, _kept = native_args()
    kw.update(bad)
    with pytest.raises(ValueError, match=message):
        _native.cpu_fused_ce(**kw)


def test_native_rejects_outputs_that_overlap_inputs():
    kw, _kept = native_args()
    kw["row_loss"] = kw["hidden"]
    with pytest.raises(ValueError, match="overlap"):
        _native.cpu_fused_ce(**kw)
    kw, _kept = native_args()
    dh, gs = torch.empty(4, 3), torch.ones(1)
    kw.update(
        grad_scale=gs.data_ptr(), grad_scale_len=1, dh=dh.data_ptr(), dw=dh.data_ptr()
    )
    with pytest.raises(ValueError, match="dh and dw overlap"):
        _native.cpu_fused_ce(**kw)
    kw.update(grad_scale_len=2)
    with pytest.raises(ValueError, match="grad_scale: expected 1 or n = 4"):
        _native.cpu_fused_ce(**kw)


def test_native_rejects_missing_keywords():
    kw, _kept = native_args()
    del kw["targets"]
    with pytest.raises(TypeError, match="targets"):
        _native.cpu_fused_ce(**kw)
