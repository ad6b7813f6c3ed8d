"""Invariant 1 across the corpus: every class ``install()`` patches in the installed
transformers, built tiny from its own config class (``forward_rewrite.verify``: the generic
shrink, and hand-made configs where it cannot fit), gives the stock forward's loss and
gradients, in train mode with dropout (same seed in both runs)."""

from forward_rewrite.verify import GRAD_TOL, LOSS_TOL, check_class, patched_classes

#: At least this share of the patched classes must build tiny and be compared; on
#: transformers 5.23.0, 225 of 226 are (`python bench/equivalence.py --all` lists the rest
#: with the reason).
MIN_VERIFIED_SHARE = 0.95


def test_every_patched_class_matches_stock():
    results = [check_class(target) for target in patched_classes()]
    mismatches = [
        f"{r['module']}.{r['qualname']}: {r['reason']}"
        for r in results
        if r["status"] == "mismatch"
    ]
    assert mismatches == [], "\n".join(mismatches)
    verified = [r for r in results if r["status"] == "verified"]
    assert len(verified) >= MIN_VERIFIED_SHARE * len(results), (
        f"only {len(verified)} of {len(results)} patched classes were compared; skipped: "
        + "; ".join(
            f"{r['qualname']} ({r['reason']})"
            for r in results
            if r["status"] == "skipped"
        )
    )
    assert all(
        r["loss_err"] <= LOSS_TOL and r["grad_err"] <= GRAD_TOL for r in verified
    )
