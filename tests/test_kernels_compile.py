"""The CUDA kernels compile, without a GPU: NVRTC (from torch's CUDA wheels) builds
kernels/fused_ce.cu and the decoder-fusion modules (rms_norm.cu, rotary.cu, gated_act.cu,
each behind fusion_common.cuh) for Ampere (sm_80) and Hopper (sm_90), with no warning, and
every entry point the Rust launchers look up is in the image."""

import itertools

import pytest

torch = pytest.importorskip("torch")

from forward_rewrite import _cuda, _native

KERNELS = [
    "ce_rows",
    "ce_rows_cluster",
    "ce_rows_pipelined",
    "dh_finish",
    "target_scatter",
    "gather_rows",
    "cast_from_f32",
    "fill",
]


@pytest.fixture(scope="module")
def nvrtc():
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build ships no NVRTC")
    return _cuda.load_nvrtc()


@pytest.mark.parametrize("target", ["sm_80", "sm_90", "compute_90"])
def test_kernels_compile(nvrtc, target):
    image, log = _native.cuda_compile(target)
    assert image, f"empty image for {target}"
    assert "warning" not in log.lower(), log
    assert "error" not in log.lower(), log
    for name in KERNELS:
        for suffix in ("bf16", "f16", "f32"):
            assert f"{name}_{suffix}".encode() in image, (
                f"{name}_{suffix} missing for {target}"
            )


def test_compile_error_is_a_python_error(nvrtc):
    with pytest.raises(RuntimeError, match="NVRTC"):
        _native.cuda_compile("sm_1")
    with pytest.raises(ValueError, match="module"):
        _native.cuda_compile("sm_90", "layer_norm")


def _fusion_kernels():
    """Every name runtime/src/cuda/fusions.rs builds, per module."""
    rms = []
    for combo in (
        "bf16_bf16_bf16",
        "f16_f16_f16",
        "f32_f32_f32",
        "bf16_f32_f32",
        "bf16_f32_bf16",
        "f16_f32_f32",
        "f16_f32_f16",
    ):
        for direction, variant in itertools.product(
            ("fwd", "bwd"), ("v1", "v2", "v4", "any")
        ):
            rms.append(f"rms_{direction}_{combo}_{variant}")
    rms += [f"rms_dw_finish_{d}" for d in ("bf16", "f16", "f32")]
    rope = []
    for half in ("bf16", "f16"):
        for combo in itertools.product((half, "f32"), repeat=3):
            for variant in ("v8_half", "v8_pairs", "s_half", "s_pairs"):
                rope.append(f"rope_{'_'.join(combo)}_{variant}")
    gated = [
        f"gated_{direction}_{d}_{variant}"
        for direction in ("fwd", "bwd")
        for d in ("bf16", "f16", "f32")
        for variant in ("v8", "s")
    ]
    return {"rms_norm": rms, "rotary": rope, "gated_act": gated}


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("module", ["rms_norm", "rotary", "gated_act"])
def test_fusion_kernels_compile(nvrtc, module, target):
    image, log = _native.cuda_compile(target, module)
    assert image, f"empty image for {module} {target}"
    assert "warning" not in log.lower(), log
    assert "error" not in log.lower(), log
    for name in _fusion_kernels()[module]:
        assert name.encode() in image, f"{name} missing for {target}"


def test_fusion_kernels_compile_to_ptx(nvrtc):
    # The path a GPU newer than this NVRTC takes: PTX of the newest architecture it knows.
    image, _ = _native.cuda_compile("compute_90", "gated_act")
    assert b".entry gated_fwd_bf16_v8" in image
