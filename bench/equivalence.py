"""The table of issue 3: per real transformers class, the patched forward's loss and worst
parameter-gradient error against the stock forward (float32, tiny random models built from
the classes' own configs; the cases of tests/model_cases.py). With ``--all``, every class
``install()`` patches in the installed transformers, built tiny by ``forward_rewrite.verify``
(the generic shrink, and hand-made configs where it cannot fit): verified, mismatch, or
skipped with the reason its tiny model could not be built.

    python bench/equivalence.py [--all [--device cuda]]
"""

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
import transformers
from forward_rewrite.verify import check_class, patched_classes
from model_cases import CASES, compare

VARIANTS = {
    "mean": {},
    "num_items_in_batch=13": {"num_items_in_batch": 13},
    "tied": {"tie": True},
}


def sweep(device):
    print(
        "| class | status | loss rel err | worst grad err (param) | params | s | reason |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    counts = collections.Counter()
    for module, name in patched_classes():
        r = check_class((module, name), device)
        counts[r["status"]] += 1
        errs = (
            (f"{r['loss_err']:.1e}", f"{r['grad_err']:.1e} ({r['worst_param']})")
            if "loss_err" in r
            else ("", "")
        )
        print(
            f"| {name} | {r['status']} | {errs[0]} | {errs[1]} | {r.get('params', '')} "
            f"| {r.get('seconds', '')} | {r['reason']} |",
            flush=True,
        )
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--all", action="store_true", help="every patched class, built tiny"
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="with --all: where the models run (cuda: the CUDA backend, float32)",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, float32, "
        f"{args.device if args.all else 'cpu'}"
    )
    print()
    start = time.time()
    if args.all:
        counts = sweep(args.device)
        print(f"\n{dict(counts)}, {time.time() - start:.1f} s")
        return
    print(
        "| class | variant | stock loss | loss rel err | worst grad rel err (param) | params |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for case, (class_name, _, _) in CASES.items():
        for variant, kwargs in VARIANTS.items():
            r = compare(case, **kwargs)
            assert r["fused"], f"{class_name} {variant}: not fused"
            print(
                f"| {class_name} | {variant} | {r['stock_loss']:.6f} | {r['loss_err']:.1e} "
                f"| {r['grad_err']:.1e} ({r['worst_param']}) | {r['grads']} |"
            )
    print(f"\n{time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
