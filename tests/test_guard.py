"""The run-time helpers of the emitted code (ARCHITECTURE.md, contract 3): ``fuses``,
``keep_logits`` / ``set_keep_logits`` and ``loss_kwargs``, on real transformers classes; and
the emitted call itself on tiny random Llama (tied embeddings) and Gemma2 (soft-cap) models,
against the stock forward's loss and every parameter's gradient."""

import logging

import forward_rewrite
import pytest
import torch
from forward_rewrite import guard
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_llama(**kw):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **kw,
    )
    return LlamaForCausalLM(config).train()


def tiny_gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=2.0,  # small, so that it matters
    )
    return Gemma2ForCausalLM(config).train()


@pytest.fixture(autouse=True)
def fresh_log_state():
    guard._logged.clear()
    forward_rewrite.set_keep_logits(False)
    yield
    forward_rewrite.set_keep_logits(False)


def test_a_training_model_with_a_plain_head_fuses():
    model = tiny_llama()
    assert forward_rewrite.fuses(model, model.lm_head, 96)


def test_eval_mode_falls_back_and_logs_once_per_class_and_reason(caplog):
    model = tiny_llama().eval()
    with caplog.at_level(logging.INFO, logger="forward_rewrite"):
        assert not forward_rewrite.fuses(model, model.lm_head, 96)
        assert not forward_rewrite.fuses(model, model.lm_head, 96)
        with forward_rewrite.keep_logits():
            assert not forward_rewrite.fuses(model, model.lm_head, 96)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "LlamaForCausalLM" in lines[0] and "eval-mode" in lines[0]
    assert "keep-logits" in lines[1]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_keep_logits_context_and_global_switch():
    model = tiny_llama()
    with forward_rewrite.keep_logits():
        with forward_rewrite.keep_logits():
            assert not forward_rewrite.fuses(model, model.lm_head, 96)
        assert not forward_rewrite.fuses(model, model.lm_head, 96)
    assert forward_rewrite.fuses(model, model.lm_head, 96)
    forward_rewrite.set_keep_logits(True)
    assert not forward_rewrite.fuses(model, model.lm_head, 96)
    forward_rewrite.set_keep_logits(False)
    assert forward_rewrite.fuses(model, model.lm_head, 96)
    with pytest.raises(TypeError, match="^enabled"):
        forward_rewrite.set_keep_logits(1)


def refusal(model, head=None, vocab=96):
    return guard._refusal(model, model.lm_head if head is None else head, vocab)


def test_a_replaced_loss_function_falls_back(caplog):
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = tiny_llama()
    model.loss_function = lambda *a, **k: ForCausalLMLoss(*a, **k)
    with caplog.at_level(logging.WARNING, logger="forward_rewrite"):
        assert not forward_rewrite.fuses(model, model.lm_head, 96)
    assert "custom-loss-function" in caplog.text
    model.loss_function = (
        ForCausalLMLoss  # transformers' own, set explicitly: still fuses
    )
    assert refusal(model) is None
    model = tiny_llama()
    model.loss_type = "ForMaskedLM"
    assert refusal(model) == "custom-loss-function"
    # The classic style computes its own CrossEntropyLoss: model.loss_function is not read.
    assert guard._refusal(model, model.lm_head, 96, "cross_entropy") is None
    with pytest.raises(ValueError, match="^loss"):
        forward_rewrite.fuses(model, model.lm_head, 96, loss="mse")


def test_calls_that_return_a_tuple_take_the_stock_path():
    """`ModelOutput.to_tuple()` drops None fields: a fused step's None logits would move
    the cache to position 1, so `tuple_guard` makes such calls take the stock path."""
    model = tiny_llama()
    seen = []

    @forward_rewrite.tuple_guard
    def forward(self, **kwargs):
        seen.append(refusal(self))
        return kwargs

    assert forward(model, return_dict=False) == {"return_dict": False}
    forward(model, return_dict=True)
    forward(model)
    model.config.return_dict = False
    forward(model)
    assert seen == ["tuple-return", None, None, "tuple-return"]
    assert forward.__wrapped__ is not None  # inspect.unwrap reaches the original


def test_heads_that_are_not_plain_hook_free_linears_fall_back():
    model = tiny_llama()
    assert refusal(model, torch.nn.Sequential(model.lm_head)) == "head-not-linear"

    class MyLinear(torch.nn.Linear):
        pass

    assert refusal(model, MyLinear(32, 96)) == "head-not-linear"
    assert refusal(model, torch.nn.Linear(32, 95), 96) == "head-vocab-mismatch"
    assert refusal(model, vocab=95) == "head-vocab-mismatch"
    assert refusal(model, torch.nn.Linear(32, 96).double()) == "head-dtype"
    for register in (
        lambda m: m.register_forward_hook(lambda *a: None),
        lambda m: m.register_forward_pre_hook(lambda *a: None),
        lambda m: m.register_full_backward_hook(lambda *a: None),
    ):
        handle = register(model.lm_head)
        assert refusal(model) == "head-hooks"
        handle.remove()
        assert refusal(model) is None
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert refusal(model) == "head-hooks"
    finally:
        handle.remove()
    assert refusal(model) is None


def test_loss_kwargs_keeps_what_for_causal_lm_loss_reads():
    kwargs = {
        "num_items_in_batch": 7,
        "ignore_index": -1,
        "shift_labels": None,
        "output_attentions": True,
        "position_ids": None,
        "cu_seq_lens_q": None,
    }
    assert forward_rewrite.loss_kwargs(kwargs) == {
        "num_items_in_batch": 7,
        "ignore_index": -1,
        "shift_labels": None,
    }
    assert forward_rewrite.loss_kwargs({}) == {}


def test_fuses_traces_under_compile_in_train_and_eval():
    torch._dynamo.reset()
    model = tiny_llama()

    def decide(x):
        if forward_rewrite.fuses(model, model.lm_head, 96):
            return x + 1
        return x - 1

    compiled = torch.compile(decide, fullgraph=True, backend="eager")
    assert compiled(torch.zeros(1)).item() == 1
    model.eval()
    assert compiled(torch.zeros(1)).item() == -1


def emitted_forward(model, input_ids, labels, **kwargs):
    """What a patched forward computes for a training step (contract 3), on the model's
    own decoder; the stock forward is ``model(input_ids, labels=labels, **kwargs)``."""
    hidden_states = model.model(input_ids=input_ids).last_hidden_state
    assert forward_rewrite.fuses(model, model.lm_head, model.config.vocab_size)
    return forward_rewrite.fused_lm_head_loss(
        hidden_states,
        model.lm_head,
        labels,
        vocab_size=model.config.vocab_size,
        logit_softcapping=getattr(model.config, "final_logit_softcapping", None),
        **forward_rewrite.loss_kwargs(kwargs),
    )


@pytest.mark.parametrize(
    "make", [tiny_llama, tiny_gemma2], ids=["llama_tied", "gemma2_softcap"]
)
@pytest.mark.parametrize("num_items", [None, 23], ids=["mean", "num_items"])
def test_emitted_call_matches_the_stock_forward(make, num_items):
    model = make()
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 96, (2, 13), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, -2:] = -100
    kwargs = {"num_items_in_batch": num_items} if num_items else {}

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.item(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    stock_loss, stock_grads = run(
        lambda: model(input_ids, labels=labels, **kwargs).loss
    )
    loss, grads = run(lambda: emitted_forward(model, input_ids, labels, **kwargs))
    assert abs(loss - stock_loss) <= 1e-5 * abs(stock_loss)
    assert grads.keys() == stock_grads.keys()
    for name, want in stock_grads.items():
        err = (grads[name] - want).abs().max() / want.abs().max()
        assert err <= 1e-4, f"{name}: {err:.3g}"


def test_readme_lists_every_guard_reason():
    """README's "Distributed training and adapters" table names every run-time reason."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for reason in guard._REASONS:
        assert f"| `{reason}` |" in readme, reason
