"""The CUDA kernels compile, without a GPU: NVRTC (from torch's CUDA wheels) builds
kernels/fused_ce.cu for Ampere (sm_80) and Hopper (sm_90), with no warning, and every
entry point the Rust launcher looks up is in the image."""

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
