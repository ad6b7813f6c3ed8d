"""Loss and gradient errors of the CPU fused op against transformers' ``ForCausalLMLoss``
(float32) and against a float64 reference (every dtype, with stock's own error beside it).

Errors are normwise: max |ours - theirs| / max |theirs| per tensor. Usage::

    python bench/cpu_accuracy.py
"""

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from op_reference import errors, fused, problem, reference, stock

SHAPE = (4, 64, 128, 2000)  # batch, sequence, hidden, vocab

CONFIGS = [
    ("mean, ignored rows", {}, {}),
    ("bias", {"bias": True}, {}),
    ("num_items_in_batch int", {}, {"num_items_in_batch": 211}),
    ("num_items_in_batch tensor", {}, {"num_items_in_batch": torch.tensor(211)}),
    ("ignore_index=-1", {}, {"ignore_index": -1}),
    ("shift_labels", {}, {"shift_labels": "roll"}),
    ("all ignored (stock: NaN)", {"ignored": 1.0}, {}),
]

TRANSFORMS = [
    ("softcap 30", {"logit_softcapping": 30.0}),
    ("softcap 2 + bias", {"logit_softcapping": 2.0, "bias": True}),
    ("scale x0.0625 (Cohere)", {"logit_scale_multiply": 0.0625}),
    ("scale /4 (Granite)", {"logit_scale_divide": 4.0}),
    ("label smoothing 0.1", {"label_smoothing": 0.1}),
    ("reduction sum", {"reduction": "sum"}),
]


def fmt(errs):
    return " | ".join(f"{e:.1e}" for e in errs) + " |" + " - |" * (4 - len(errs))


def main():
    b, t, h, v = SHAPE
    print(
        f"batch {b}, sequence {t}, hidden {h}, vocab {v}; columns: loss | dh | dW | db"
    )
    print("\nfloat32, fused vs transformers' ForCausalLMLoss on head(hidden)\n")
    print("| configuration | loss | dh | dW | db |\n|---|---|---|---|---|")
    for name, prob_kw, loss_kw in CONFIGS:
        x, head, labels = problem(b, t, h, v, **prob_kw)
        if loss_kw.get("ignore_index") == -1:
            labels[labels == -100] = -1
        if loss_kw.get("shift_labels") == "roll":
            loss_kw = {"shift_labels": torch.roll(labels, 1, dims=1)}
        ours, theirs = (
            fused(x, head, labels, **loss_kw),
            stock(x, head, labels, **loss_kw),
        )
        if name.startswith("all ignored"):
            print(
                f"| {name} | loss {ours[0].item():g} (stock {theirs[0].item():g}), ",
                end="",
            )
            print(
                f"max abs gradient {max(g.abs().max().item() for g in ours[1]):g} | | | |"
            )
            continue
        print(f"| {name} | {fmt(errors(ours, theirs))}")

    print(
        "\nfused vs float64 reference (stock's own error in brackets where stock applies)\n"
    )
    print("| dtype | configuration | loss | dh | dW | db |\n|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, kw in [("plain", {})] + TRANSFORMS:
            kw = dict(kw)
            bias = kw.pop("bias", False)
            x, head, labels = problem(b, t, h, v, dtype=dtype, bias=bias)
            ours = errors(
                fused(x, head, labels, **kw), reference(x, head, labels, **kw)
            )
            row = fmt(ours)
            if name == "plain":
                theirs = errors(stock(x, head, labels), reference(x, head, labels))
                row = (
                    " | ".join(f"{o:.1e} [{s:.1e}]" for o, s in zip(ours, theirs))
                    + " | - |"
                )
            print(f"| {str(dtype)[6:]} | {name} | {row}")


if __name__ == "__main__":
    main()
