"""The table of issue 3: per real transformers class, the patched forward's loss and worst
parameter-gradient error against the stock forward (float32, tiny random models built from
the classes' own configs; the cases of tests/model_cases.py).

    python bench/equivalence.py
"""

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
import transformers
from model_cases import CASES, compare

VARIANTS = {
    "mean": {},
    "num_items_in_batch=13": {"num_items_in_batch": 13},
    "tied": {"tie": True},
}


def main():
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, float32, CPU"
    )
    print()
    print(
        "| class | variant | stock loss | loss rel err | worst grad rel err (param) | params |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    start = time.time()
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
