"""Invariant 1 on real classes: a patched forward gives the stock forward's loss and every
parameter's gradient (float32), with ignored tokens, with ``num_items_in_batch`` (an int
and a tensor, as gradient accumulation passes it) and with tied embeddings."""

import forward_rewrite
import pytest
import torch
from model_cases import CASES, compare

VARIANTS = {
    "mean": {},
    "num_items_int": {"num_items_in_batch": 13},
    "num_items_tensor": {"num_items_in_batch": torch.tensor(29)},
    "tied": {"tie": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_patched_forward_matches_stock(case, variant):
    result = compare(case, **VARIANTS[variant])
    assert result["fused"], "the patched forward did not take the fused path"
    assert result["missing"] == []
    assert result["loss_err"] <= 1e-5, result
    assert result["grad_err"] <= 1e-4, result


@pytest.mark.parametrize("case", CASES)
def test_audit_reports_the_class_and_its_transforms(case):
    class_name, _, transforms = CASES[case]
    from model_cases import build

    forward_rewrite.patch_model(build(case))
    try:
        entry = next(
            c for c in forward_rewrite.audit()["classes"] if c["qualname"] == class_name
        )
    finally:
        forward_rewrite.uninstall()
    assert entry["verdict"] == "patched" and entry["installed"], entry
    assert [t["kind"] for t in entry["transforms"]] == transforms
