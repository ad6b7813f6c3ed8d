"""The residual add fused into RMSNorm, at the backend level (``_fusions_cpu``: the Rust
twins of kernels/rms_norm.cu): ``rms_norm_forward(..., residual=r)`` returns ``s = r + x``
exactly as torch adds the two tensors, and y, rstd bit for bit those of the plain forward
applied to s; ``rms_norm_backward(..., dres=d)`` returns the plain backward's dx with d added
before its one rounding (within one ulp of ``(dx_f64 + d).to(dtype)``; float32 and float64
exactly); bad residual / dres arguments raise naming them. The CUDA kernels of the add are
checked to compile (NVRTC, no GPU needed) where torch ships NVRTC."""

import itertools

import pytest
import torch
from forward_rewrite import _fusions_cpu, _native

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = list(itertools.product([0, 1, 33], [1, 7, 64, 4096]))  # (rows, hidden)
# (weight dtype: x's or float32, cast_before_weight, offset): Llama, Llama with a float32
# weight, Gemma.
FORMS = [("x", True, 0.0), ("f32", True, 0.0), ("x", False, 1.0)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def operands(rows, hidden, dtype, w_kind, seed):
    g = gen(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = randn(rows, hidden).to(dtype)
    # The residual stream is larger than a layer's output: the sum rounds.
    residual = (4 * randn(rows, hidden)).to(dtype)
    w_dtype = dtype if w_kind == "x" or dtype == torch.float64 else torch.float32
    weight = (1 + 0.3 * randn(hidden)).to(w_dtype)
    return x, residual, weight


def ulp(mag, dtype):
    """The spacing of ``dtype`` at the magnitudes ``mag`` (float64)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(mag)  # mag in [2^(e-1), 2^e)
    spacing = torch.ldexp(torch.full_like(mag, fi.eps), e - 1)
    return torch.clamp(spacing, min=fi.tiny * fi.eps)


@pytest.mark.parametrize("form", FORMS, ids=["llama", "llama-f32w", "gemma"])
@pytest.mark.parametrize(("rows", "hidden"), SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_adds_then_normalises_the_sum(dtype, rows, hidden, form):
    w_kind, cast_before, offset = form
    x, residual, weight = operands(rows, hidden, dtype, w_kind, rows * 7919 + hidden)
    y, rstd, s = _fusions_cpu.rms_norm_forward(
        x, weight, 1e-6, offset, cast_before, residual=residual
    )
    want = residual + x
    assert s.dtype == dtype and s.shape == x.shape and s.is_contiguous()
    assert s.data_ptr() not in (x.data_ptr(), residual.data_ptr()) or rows == 0
    assert torch.equal(s, want), "s differs from residual + x"
    y_plain, rstd_plain = _fusions_cpu.rms_norm_forward(
        want, weight, 1e-6, offset, cast_before
    )
    assert y.dtype == y_plain.dtype and rstd.dtype == rstd_plain.dtype
    assert torch.equal(y, y_plain), "y differs from the norm of residual + x"
    assert torch.equal(rstd, rstd_plain), "rstd differs from the norm of residual + x"


@pytest.mark.parametrize("form", FORMS, ids=["llama", "llama-f32w", "gemma"])
@pytest.mark.parametrize(("rows", "hidden"), SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_adds_dres_before_the_rounding(dtype, rows, hidden, form):
    w_kind, cast_before, offset = form
    x, residual, weight = operands(rows, hidden, dtype, w_kind, rows * 104729 + hidden)
    _, rstd, s = _fusions_cpu.rms_norm_forward(
        x, weight, 1e-6, offset, cast_before, residual=residual
    )
    g = gen(hidden * 31 + rows)
    y_dtype = torch.promote_types(dtype, weight.dtype) if cast_before else dtype
    dy = torch.randn(rows, hidden, generator=g, dtype=torch.float64).to(y_dtype)
    dres = torch.randn(rows, hidden, generator=g, dtype=torch.float64).to(dtype)
    args = (dy, s, weight, rstd, offset, cast_before, True)
    dx, dw = _fusions_cpu.rms_norm_backward(*args, dres=dres)
    dx_plain, dw_plain = _fusions_cpu.rms_norm_backward(*args)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert torch.equal(dw, dw_plain), "dres changed dw"
    assert torch.equal(_fusions_cpu.rms_norm_backward(*args, dres=None)[0], dx_plain)
    want = (dx_plain.double() + dres.double()).to(dtype)
    if dtype in (torch.float32, torch.float64):
        # dx_plain holds the unrounded value: one rounding of its sum with dres.
        assert torch.equal(dx, want)
        return
    # 16-bit: dx_plain was rounded once already, the fused dx was not: one ulp apart at
    # most, at the magnitude of the terms.
    terms = [t.double().abs() for t in (dx_plain, dres, want, dx)]
    mag = torch.stack(terms).amax(dim=0)
    diff = (dx.double() - want.double()).abs()
    assert torch.all(diff <= ulp(mag, dtype)), (
        f"max diff {diff.max().item():.3g} beyond one ulp"
    )


def test_same_tensor_as_x_and_residual():
    x = torch.randn(5, 64, generator=gen(1)).to(torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    y, _, s = _fusions_cpu.rms_norm_forward(x, w, 1e-6, 0.0, True, residual=x)
    assert torch.equal(s, x + x)
    assert torch.equal(y, _fusions_cpu.rms_norm_forward(x + x, w, 1e-6, 0.0, True)[0])


def _rms_case():
    x = torch.randn(4, 16, generator=gen(2))
    w = torch.ones(16)
    _, rstd = _fusions_cpu.rms_norm_forward(x, w, 1e-6, 0.0, True)
    return x, w, rstd


BAD = [
    ("not a tensor", lambda x: x.tolist(), TypeError, "expected a tensor"),
    ("shape", lambda x: x[:, :8], ValueError, "shape"),
    ("rows", lambda x: x[:2], ValueError, "shape"),
    ("dtype", lambda x: x.double(), TypeError, "dtype"),
    ("strided", lambda x: x.t().contiguous().t(), ValueError, "contiguous"),
    ("device", lambda x: x.to("meta"), ValueError, "on meta"),
]
BAD_IDS = [b[0] for b in BAD]


@pytest.mark.parametrize(("what", "make", "error", "match"), BAD, ids=BAD_IDS)
def test_bad_residual(what, make, error, match):
    x, w, _ = _rms_case()
    with pytest.raises(error, match=f"^residual: .*{match}"):
        _fusions_cpu.rms_norm_forward(x, w, 1e-6, 0.0, True, residual=make(x))


@pytest.mark.parametrize(("what", "make", "error", "match"), BAD, ids=BAD_IDS)
def test_bad_dres(what, make, error, match):
    x, w, rstd = _rms_case()
    with pytest.raises(error, match=f"^dres: .*{match}"):
        _fusions_cpu.rms_norm_backward(x, x, w, rstd, 0.0, True, True, dres=make(x))


def _native_forward(x, w, y, rstd, **extra):
    _native.cpu_rms_norm_forward(
        x=x.data_ptr(),
        weight=w.data_ptr(),
        y=y.data_ptr(),
        rstd=rstd.data_ptr(),
        rows=x.shape[0],
        hidden=x.shape[1],
        x_dtype="float32",
        w_dtype="float32",
        y_dtype="float32",
        eps=1e-6,
        offset=0.0,
        cast_before=True,
        **extra,
    )


def test_native_residual_arguments():
    x, w, _ = _rms_case()
    y, rstd, s = torch.empty_like(x), torch.empty(4), torch.empty_like(x)
    for extra in ({"residual": x.data_ptr()}, {"sum_out": s.data_ptr()}):
        with pytest.raises(ValueError, match="residual, sum_out: both or neither"):
            _native_forward(x, w, y, rstd, **extra)
    with pytest.raises(ValueError, match="overlap"):
        _native_forward(x, w, y, rstd, residual=x.data_ptr(), sum_out=x.data_ptr())
    with pytest.raises(ValueError, match="sum_out: pointer not aligned"):
        _native_forward(x, w, y, rstd, residual=x.data_ptr(), sum_out=s.data_ptr() + 2)
    _native_forward(x, w, y, rstd, residual=x.data_ptr(), sum_out=s.data_ptr())
    assert torch.equal(s, x + x)


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_add_kernels_compile(target):
    """The rms_fwd_add_ instances exist for every dtype combination (NVRTC from torch's
    CUDA wheels; skipped on a CPU-only build)."""
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build ships no NVRTC")
    from forward_rewrite import _cuda

    _cuda.load_nvrtc()
    image, log = _native.cuda_compile(target, "rms_norm")
    assert "warning" not in log.lower() and "error" not in log.lower(), log
    combos = ["bf16_bf16_bf16", "f16_f16_f16", "f32_f32_f32", "bf16_f32_f32"]
    combos += ["bf16_f32_bf16", "f16_f32_f32", "f16_f32_f16"]
    for combo, variant in itertools.product(combos, ["v1", "v2", "v4", "any"]):
        for kind in ("fwd", "fwd_add", "bwd"):
            name = f"rms_{kind}_{combo}_{variant}"
            assert name.encode() in image, f"{name} missing for {target}"
