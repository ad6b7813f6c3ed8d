"""transformers' ``Trainer`` with gradient accumulation over padded batches of different
lengths (so ``num_items_in_batch`` matters): the losses it logs and the weights it ends
with are those of the stock run. Plain SGD, because Adam's normalised update turns a
1e-7 difference in a near-zero gradient into a visible one in the weights."""

import forward_rewrite
import pytest
import torch
from model_cases import VOCAB, build
from transformers import Trainer, TrainingArguments

STEPS = 4


def dataset(n=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 20, (n,), generator=g)
    return [
        {"input_ids": torch.randint(3, VOCAB, (int(k),), generator=g)} for k in lengths
    ]


def collate(examples):
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, e in enumerate(examples):
        input_ids[row, : len(e["input_ids"])] = e["input_ids"]
        attention_mask[row, : len(e["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train(tmp_path, case):
    model = build(case)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        optim="sgd",  # updates linear in the gradients: weights comparable at 1e-4
        learning_rate=0.5,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset(), data_collator=collate
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_trainer_with_gradient_accumulation_logs_the_stock_losses(tmp_path, case):
    forward_rewrite.uninstall()
    stock_losses, stock_weights = train(tmp_path / "stock", case)
    forward_rewrite.install()
    try:
        losses, weights = train(tmp_path / "patched", case)
        record = next(
            c
            for c in forward_rewrite.audit()["classes"]
            if c["qualname"] == type(build(case)).__name__
        )
    finally:
        forward_rewrite.uninstall()
    assert record["installed"]
    assert len(losses) == len(stock_losses) == STEPS
    for got, want in zip(losses, stock_losses):
        assert abs(got - want) <= 1e-5 * abs(want), (losses, stock_losses)
    worst = max(
        ((w - stock_weights[n]).abs().max() / stock_weights[n].abs().max()).item()
        for n, w in weights.items()
    )
    assert worst <= 1e-4
