"""Packed-sequence isolation over every class ``install()`` patches (issue 9): each class
built tiny (tests/packing_cases.py), on eager and sdpa, ``use_cache`` at its default,
stock and patched. Per class and backend: ``isolated`` (no crosstalk beyond rounding: changing the other
sequences' tokens changes nothing, and logits, loss and gradients equal each sequence alone
within 1e-5 / 1e-4), ``isolated (rounding)`` (no crosstalk, but the alone run rounds
differently beyond those tolerances), ``LEAK`` (crosstalk), ``refused`` (the runtime
raised: its reason code) or ``skipped`` (the tiny model cannot be built or run stock), and
whether stock leaks (crosstalk). The ground truth the rewriter's static packing verdict is checked against.

    python bench/packing_sweep.py [--backends eager,sdpa] [--only REGEX] [--json OUT]
"""

import argparse
import collections
import json
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import forward_rewrite
from forward_rewrite.packing import PackingError
from forward_rewrite.verify import patched_classes
from packing_cases import (
    ROUNDING,
    Skip,
    build,
    capped,
    crosstalk,
    isolation,
    problems,
)


def check(cls, backend):
    out = {"class": cls.__qualname__, "backend": backend}
    forward_rewrite.uninstall()
    try:
        with capped():
            model = build(cls, backend)
            stock = crosstalk(model)
    except Skip as exc:
        return {**out, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - stock does not run tiny: skipped
        text = " ".join(str(exc).split())[:160]
        return {**out, "status": "skipped", "reason": f"{type(exc).__name__}: {text}"}
    out["stock_leaks"] = stock > ROUNDING
    forward_rewrite.patch_model(model)
    try:
        with capped():
            errors = isolation(model)
            errors["crosstalk"] = crosstalk(model)
    except PackingError as exc:
        return {**out, "status": "refused", "reason": exc.reason, "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - stock ran: this is ours
        text = " ".join(str(exc).split())[:200]
        return {**out, "status": "error", "reason": f"{type(exc).__name__}: {text}"}
    finally:
        forward_rewrite.uninstall()
    found = problems(errors)
    if errors["crosstalk"] > ROUNDING:
        status = "LEAK"
        found.insert(0, f"crosstalk {errors['crosstalk']:.1e}")
    else:
        # apart (no crosstalk); the alone runs may still round differently
        status = "isolated (rounding)" if found else "isolated"
    return {**out, "status": status, "reason": "; ".join(found), "errors": errors}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="eager,sdpa")
    parser.add_argument("--only", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes = patched_classes()
    results = []
    print("| class | backend | status | stock leaks | reason |")
    print("| --- | --- | --- | --- | --- |")
    start = time.perf_counter()
    for module, name in classes:
        if args.only and not re.search(args.only, name):
            continue
        cls = getattr(sys.modules[module], name)
        for backend in args.backends.split(","):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = check(cls, backend)
            r["seconds"] = round(time.perf_counter() - t0, 2)
            r["module"] = module
            results.append(r)
            print(
                f"| {name} | {backend} | {r['status']} | {r.get('stock_leaks', '')} "
                f"| {r.get('reason', '')} |",
                flush=True,
            )
    counts = collections.Counter((r["backend"], r["status"]) for r in results)
    print(f"\n{dict(counts)} in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
