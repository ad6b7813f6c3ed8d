"""The fused op on the CPU against transformers' own ForCausalLMLoss (float32: within 1e-5
on the loss and 1e-4 on the gradients) and against a float64 reference of the transformed
logits (transforms, smoothing, reductions, 16-bit inputs)."""

import forward_rewrite
import pytest
import torch
import torch.nn.functional as F
from op_reference import (
    errors,
    fused,
    grads_of,
    problem,
    reference,
    reference_loss,
    stock,
)
from transformers.loss.loss_utils import ForCausalLMLoss


def assert_errors(got, want, loss_tol, grad_tol):
    errs = errors(got, want)
    assert errs[0] <= loss_tol, f"loss error {errs[0]:.3g}"
    for i, e in enumerate(errs[1:]):
        assert e <= grad_tol, (
            f"gradient {['hidden', 'weight', 'bias'][i]} error {e:.3g}"
        )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "loss_kw",
    [
        {},
        {"num_items_in_batch": 37},
        {"num_items_in_batch": torch.tensor(37)},
        {"ignore_index": -1},
        {"ignore_index": 0},
    ],
    ids=["mean", "num_items_int", "num_items_tensor", "ignore_-1", "ignore_0"],
)
def test_float32_matches_for_causal_lm_loss(bias, loss_kw):
    h, head, labels = problem(3, 17, 32, 101, bias=bias)
    ignore = loss_kw.get("ignore_index", -100)
    labels[labels == -100] = ignore
    assert_errors(
        fused(h, head, labels, **loss_kw), stock(h, head, labels, **loss_kw), 1e-5, 1e-4
    )


def test_a_masked_vocabulary_matches_stock():
    """A -inf bias on some columns (a masked vocabulary; the first column among them, where
    an online softmax starts): stock's loss and gradients, no NaN (the CUDA twin of this is
    gpu/check.py's "-inf bias" cases)."""
    h, head, labels = problem(2, 13, 16, 50, bias=True)
    masked = torch.zeros(50, dtype=torch.bool)
    masked[[0, 1, 7, 31]] = True
    with torch.no_grad():
        head.bias[masked] = float("-inf")
    labels[(labels >= 0) & masked[labels.clamp_min(0)]] = 2
    got = fused(h, head, labels)
    loss, grads = got
    assert all(torch.isfinite(t).all() for t in [loss, *grads])
    assert_errors(got, stock(h, head, labels), 1e-5, 1e-4)


def test_shift_labels_are_used_as_given():
    h, head, labels = problem(2, 11, 16, 40)
    shift = torch.roll(labels, 3, dims=1)  # any alignment: not re-shifted
    shift[0, :2] = -100
    got = fused(h, head, labels, shift_labels=shift)
    assert_errors(got, stock(h, head, labels, shift_labels=shift), 1e-5, 1e-4)
    # labels is not read when shift_labels is given
    got_none = fused(h, head, None, shift_labels=shift)
    assert torch.equal(got[0], got_none[0])


def test_bfloat16_is_closer_to_float64_than_stock():
    # Stock rounds the logits to bfloat16 before the loss; the fused op keeps them in float32.
    h, head, labels = problem(4, 33, 64, 300, dtype=torch.bfloat16, bias=True)
    ours, theirs, exact = (
        fused(h, head, labels),
        stock(h, head, labels),
        reference(h, head, labels),
    )
    ours_err, stock_err = errors(ours, exact), errors(theirs, exact)
    assert ours_err[0] <= 1e-5, ours_err
    for o, s in zip(ours_err[1:], stock_err[1:]):
        assert o <= 1e-2 and o <= s * 1.05, (ours_err, stock_err)
    assert all(g.dtype == torch.bfloat16 for g in ours[1])
    assert ours[0].dtype == torch.float32


def test_all_labels_ignored_gives_zero_loss_and_zero_gradients():
    h, head, labels = problem(2, 8, 16, 30, bias=True)
    labels[:] = -100
    loss, grads = fused(h, head, labels)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    # The documented difference: stock divides 0 by 0.
    assert torch.isnan(stock(h, head, labels)[0])
    # With num_items_in_batch (gradient accumulation) stock gives 0 as well.
    loss, grads = fused(h, head, labels, num_items_in_batch=5)
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_only_the_last_token_labelled_is_all_ignored_after_the_shift():
    h, head, labels = problem(1, 6, 8, 20)
    labels[:] = -100
    labels[0, 0] = 3  # position 0 is never a target after the left shift
    loss, grads = fused(h, head, labels)
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize(
    "transforms",
    [
        {"logit_softcapping": 30.0},
        {"logit_softcapping": 2.0},
        {"logit_scale_multiply": 0.0625},
        {"logit_scale_divide": 4.0},
        {
            "logit_scale_multiply": 3.0,
            "logit_scale_divide": 2.0,
            "logit_softcapping": 5.0,
        },
    ],
    ids=["softcap30", "softcap2", "multiply", "divide", "all"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_logit_transforms_match_float64(transforms, bias):
    h, head, labels = problem(3, 13, 24, 77, bias=bias)
    h = h * 3  # large logits: the soft-cap saturates on some
    assert_errors(
        fused(h, head, labels, **transforms),
        reference(h, head, labels, **transforms),
        1e-5,
        1e-4,
    )


def test_logit_transforms_match_stock_gemma_style_code():
    # The statements a Cohere / Granite / Gemma2 forward runs on the logits, in float32.
    h, head, labels = problem(2, 9, 16, 50, bias=True)

    def stock_transformed(x, m):
        logits = m(x)
        logits = logits * 2.5
        logits = logits / 1.5
        logits = logits / 4.0
        logits = torch.tanh(logits)
        logits = logits * 4.0
        return ForCausalLMLoss(logits, labels, m.out_features)

    kw = {
        "logit_scale_multiply": 2.5,
        "logit_scale_divide": 1.5,
        "logit_softcapping": 4.0,
    }
    assert_errors(
        fused(h, head, labels, **kw), grads_of(stock_transformed, h, head), 1e-5, 1e-4
    )


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_label_smoothing_matches_f_cross_entropy(eps):
    h, head, labels = problem(2, 15, 20, 60, bias=True)
    kw = {"label_smoothing": eps, "logit_softcapping": 10.0}
    assert_errors(
        fused(h, head, labels, **kw), reference(h, head, labels, **kw), 1e-5, 1e-4
    )
    # num_items_in_batch divides the smoothed sum the same way
    kw["num_items_in_batch"] = 11
    assert_errors(
        fused(h, head, labels, **kw), reference(h, head, labels, **kw), 1e-5, 1e-4
    )


def test_reduction_sum():
    h, head, labels = problem(2, 10, 16, 40, bias=True)
    got = fused(h, head, labels, reduction="sum")
    assert_errors(got, reference(h, head, labels, reduction="sum"), 1e-5, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduction_none_per_row_losses_and_their_gradients(dtype):
    # Liger's reduction="none" had wrong gradients (#968): each row has its own grad_output.
    h, head, labels = problem(2, 12, 16, 45, dtype=dtype, bias=True)
    weights = torch.randn(2 * 12, generator=torch.Generator().manual_seed(1))

    def weighted(loss_fn):
        return lambda x, m: (loss_fn(x, m) * weights).sum()

    per_row = forward_rewrite.fused_lm_head_loss(h, head, labels, reduction="none")
    assert per_row.shape == (2 * 12,) and per_row.dtype == torch.float32
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    assert torch.all(per_row[shifted == -100] == 0)

    got = grads_of(
        weighted(
            lambda x, m: forward_rewrite.fused_lm_head_loss(
                x, m, labels, reduction="none"
            )
        ),
        h,
        head,
    )
    head64 = torch.nn.Linear(16, 45).double()
    with torch.no_grad():
        head64.weight.copy_(head.weight.double())
        head64.bias.copy_(head.bias.double())
    want = grads_of(
        weighted(lambda x, m: reference_loss(x, m, labels, reduction="none")),
        h.double(),
        head64,
    )
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert_errors(got, want, 1e-5, grad_tol)


def test_tied_embedding_and_head_accumulate_both_gradients():
    torch.manual_seed(0)
    vocab, hidden = 64, 16
    emb = torch.nn.Embedding(vocab, hidden)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight = emb.weight  # tied, as tie_word_embeddings does
    mix = torch.nn.Linear(hidden, hidden)
    ids = torch.randint(0, vocab, (2, 14))
    labels = ids.clone()
    labels[0, :3] = -100

    def run(loss_fn):
        for p in (emb.weight, mix.weight, mix.bias):
            p.grad = None
        loss = loss_fn(torch.tanh(mix(emb(ids))))
        loss.backward()
        return loss.detach(), [emb.weight.grad.clone(), mix.weight.grad.clone()]

    want = run(lambda x: ForCausalLMLoss(head(x), labels, vocab))
    got = run(
        lambda x: forward_rewrite.fused_lm_head_loss(x, head, labels, vocab_size=vocab)
    )
    assert_errors(got, want, 1e-5, 1e-4)
    # The embedding rows of the input ids receive gradient from both uses.
    assert got[1][0][ids[0, 0]].abs().sum() > 0


def test_float16_gradients_see_the_loss_scale_before_rounding():
    # A GradScaler multiplies the loss by 2**16; gradients of a loss divided by a large
    # num_items_in_batch are below float16's range unless that scale reaches them first.
    h, head, labels = problem(2, 16, 32, 50, dtype=torch.float16, bias=True, ignored=0)
    n_items = 2**28
    scale = 2.0**16

    got = grads_of(
        lambda x, m: (
            forward_rewrite.fused_lm_head_loss(x, m, labels, num_items_in_batch=n_items)
            * scale
        ),
        h,
        head,
    )
    want = reference(h, head, labels, num_items_in_batch=n_items)
    want = (want[0] * scale, [g * scale for g in want[1]])
    for g, w in zip(got[1], want[1]):
        assert g.dtype == torch.float16
        # Unscaled, every one of these gradients rounds to zero in float16 (< 2**-25).
        assert w.abs().max() / scale < 2**-25
        assert torch.count_nonzero(g) > 0.5 * g.numel()
    assert_errors(got, want, 1e-5, 2e-3)


def test_under_autocast_the_head_runs_in_the_autocast_dtype():
    h, head, labels = problem(2, 9, 16, 40, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(h, head, labels)
        want = stock(h, head, labels)
    assert got[1][1].dtype == torch.float32  # the parameter's own dtype
    exact = reference(h.bfloat16(), head.bfloat16(), labels)
    ours, theirs = errors(got, exact), errors(want, exact)
    assert ours[0] <= 1e-5 and theirs[0] > ours[0]


def test_no_grad_computes_the_loss_only():
    h, head, labels = problem(2, 9, 16, 40)
    with torch.no_grad():
        loss = forward_rewrite.fused_lm_head_loss(h, head, labels)
    assert not loss.requires_grad
    assert abs(loss.item() - stock(h, head, labels)[0].item()) <= 1e-5 * loss.item()


def test_frozen_head_and_weight_tensor_head():
    h, head, labels = problem(2, 9, 16, 40)
    head.weight.requires_grad_(False)
    want = stock(h, head, labels)
    x = h.clone().requires_grad_(True)
    loss = forward_rewrite.fused_lm_head_loss(x, head.weight, labels)
    loss.backward()
    assert head.weight.grad is None
    assert_errors((loss.detach(), [x.grad]), (want[0], want[1][:1]), 1e-5, 1e-4)


def test_non_contiguous_hidden_states():
    h, head, labels = problem(3, 10, 16, 40)
    wide = torch.randn(10, 3, 16)
    wide.copy_(h.transpose(0, 1))
    view = wide.transpose(0, 1)
    assert not view.is_contiguous()
    assert_errors(fused(view, head, labels), stock(h, head, labels), 1e-5, 1e-4)


@pytest.mark.parametrize("budget", [1, 3000, 40_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_budgets_cut_the_work_and_give_the_same_result(budget, dtype):
    h, head, labels = problem(5, 41, 24, 333, dtype=dtype, bias=True, ignored=0.1)
    whole = fused(h, head, labels, num_items_in_batch=150)
    forward_rewrite.set_chunk_budget_bytes(budget)
    try:
        assert forward_rewrite.chunk_budget_bytes("cuda") == budget
        cut = fused(h, head, labels, num_items_in_batch=150)
    finally:
        forward_rewrite.set_chunk_budget_bytes(None)
    assert forward_rewrite.chunk_budget_bytes() == 256 << 20
    assert forward_rewrite.chunk_budget_bytes("cuda") == 1 << 30
    # Only float32 summation order differs (and one bfloat16 rounding of the gradients).
    assert_errors(cut, whole, 1e-6, 1e-5 if dtype == torch.float32 else 8e-3)
    if dtype == torch.float32:
        assert_errors(cut, stock(h, head, labels, num_items_in_batch=150), 1e-5, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_saved_gradients_are_scaled_in_place_by_the_upstream_gradient(dtype):
    """Backward multiplies the gradients computed in forward by grad_output in place (no
    second V x H copy of dW): a scaled loss gives scaled gradients, and a second backward
    through the same graph is refused instead of reusing scaled tensors."""
    h, head, labels = problem(2, 12, 16, 40, bias=True)
    h, head = h.to(dtype), head.to(dtype)
    op = forward_rewrite.fused_lm_head_loss
    _, base = grads_of(lambda x, m: op(x, m, labels), h, head)
    _, scaled = grads_of(lambda x, m: 3.0 * op(x, m, labels), h, head)
    for got, want in zip(scaled, base):
        torch.testing.assert_close(got, 3.0 * want, rtol=1e-2, atol=0)
    x = h.detach().clone().requires_grad_(True)
    loss = op(x, head, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
