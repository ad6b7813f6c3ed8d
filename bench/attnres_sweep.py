"""Retrofit exactness of forward_rewrite.attnres over the corpus: every class the fused-loss
installer patches, built tiny by forward_rewrite.verify, with attnres.apply(mode="retrofit")
against its stock logits (float32, eval and train mode with the same seed).

    python bench/attnres_sweep.py [--limit N] [--json FILE]

Prints one line per class: applied (with the worst relative logit error), refused (code) or
skipped (the tiny model does not build), then the counts.
"""

import argparse
import importlib
import json
import sys
import warnings

import torch
from forward_rewrite import attnres
from forward_rewrite.verify import patched_classes, tiny_inputs, tiny_model


def logits(model, inputs, train):
    model.train(train)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    return out.logits


def rel(a, b):
    return (
        (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)
    ).item()


def check(module, qualname):
    cls = getattr(importlib.import_module(module), qualname)
    try:
        model = tiny_model(cls)
    except RuntimeError as exc:
        return {"status": "skipped", "reason": str(exc)[:120]}
    inputs = tiny_inputs(model)
    try:
        ref = [logits(model, inputs, t) for t in (False, True)]
    except Exception as exc:  # noqa: BLE001  (seq2seq models need their labels to run)
        return {"status": "skipped", "reason": f"stock run: {exc}"[:120]}
    try:
        attnres.apply(model, block_size=2)
    except attnres.AttnResRefused as exc:
        return {"status": "refused", "reason": exc.code, "detail": exc.detail[:120]}
    out = [logits(model, inputs, t) for t in (False, True)]
    err = max(rel(a, b) for a, b in zip(out, ref))
    return {
        "status": "applied",
        "err": err,
        "sublayers": model._attnres_applied["sublayers"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    targets = patched_classes()[: args.limit]
    results = []
    for module, qualname in targets:
        try:
            r = check(module, qualname)
        except Exception as exc:  # noqa: BLE001  (reported, the sweep goes on)
            r = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:160]}"}
        r.update(module=module, qualname=qualname)
        results.append(r)
        extra = f"{r['err']:.1e}" if "err" in r else r.get("reason", "")
        print(f"{r['status']:8s} {qualname:50s} {extra}", flush=True)
    counts = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(counts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if counts.get("error", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
