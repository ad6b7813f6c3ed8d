"""The fused AttnRes mix op (``forward_rewrite::attnres_mix``) against a float64 reference:
forward and backward for every storage dtype, gradcheck in float64, opcheck, torch.compile,
and the runtime choosing it (and the torch reference giving the same model)."""

import pytest
import torch
from forward_rewrite import _attnres_op, attnres

TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}


def _reference(sources, u, eps, scale):
    vs = [s.double() for s in sources]
    u = u.double()
    logits = torch.stack(
        [(v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)) @ u for v in vs], -1
    )
    p = torch.softmax(logits, -1) * scale
    return sum(p[..., i, None] * v for i, v in enumerate(vs))


def _case(n, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sources = [(torch.randn(shape, generator=g) * (1 + i)).to(dtype) for i in range(n)]
    u = torch.randn(shape[-1], generator=g).to(
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    return sources, u


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    "n, shape", [(1, (3, 8)), (2, (2, 5, 16)), (9, (37, 64)), (4, (1, 1))]
)
def test_forward_and_backward_match_float64(dtype, n, shape):
    sources, u = _case(n, shape, dtype)
    scale = float(n)
    leaves = [s.clone().requires_grad_(True) for s in sources]
    ul = u.clone().requires_grad_(True)
    out = _attnres_op._mix_op(leaves, ul, 1e-6, scale)
    assert out.dtype == dtype and out.shape == sources[0].shape
    rs = [s.double().requires_grad_(True) for s in sources]
    ru = u.double().requires_grad_(True)
    ref = _reference(rs, ru, 1e-6, scale)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        out.double(), ref, rtol=rtol, atol=atol * ref.abs().max().item()
    )
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(shape, generator=g)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).double())
    for a, b in zip(leaves, rs):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(
            a.grad.double(),
            b.grad,
            rtol=rtol,
            atol=atol * (1 + b.grad.abs().max().item()),
        )
    torch.testing.assert_close(
        ul.grad.double(),
        ru.grad,
        rtol=rtol * 10,
        atol=atol * 10 * (1 + ru.grad.abs().max().item()),
    )


def test_gradcheck_float64():
    sources, u = _case(3, (4, 6), torch.float64, seed=2)
    leaves = [s.requires_grad_(True) for s in sources]
    u.requires_grad_(True)

    def f(a, b, c, uu):
        return _attnres_op._mix_op([a, b, c], uu, 1e-6, 3.0)

    assert torch.autograd.gradcheck(f, (*leaves, u))


def test_opcheck():
    sources, u = _case(3, (4, 8), torch.float32, seed=4)
    torch.library.opcheck(
        _attnres_op._mix_op, ([s.requires_grad_(True) for s in sources], u, 1e-6, 3.0)
    )


def test_uniform_weights_give_the_scaled_mean():
    sources, u = _case(5, (6, 16), torch.float32, seed=1)
    out = _attnres_op._mix_op(sources, torch.zeros_like(u), 1e-6, 5.0)
    torch.testing.assert_close(out, sum(sources), rtol=1e-6, atol=1e-6)


def test_torch_compile():
    sources, u = _case(3, (5, 8), torch.float32, seed=6)

    def f(srcs, uu):
        return _attnres_op._mix_op(srcs, uu, 1e-6, 3.0) * 2

    ref = f(sources, u)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(sources, u)
    torch.testing.assert_close(out, ref)


def test_usable():
    sources, _ = _case(2, (3, 8), torch.float32)
    q = torch.zeros(8)
    assert _attnres_op.usable(sources, q, sources[0])
    assert not _attnres_op.usable(sources, q, sources[0].half())
    assert not _attnres_op.usable([sources[0], sources[1].double()], q, sources[0])
    assert not _attnres_op.usable([sources[0], sources[1][:2]], q, sources[0])
    assert not _attnres_op.usable(sources, torch.zeros(4), sources[0])


def test_runtime_uses_the_op_and_matches_the_reference(monkeypatch):
    import transformers
    from forward_rewrite.verify import DECODER, batch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**DECODER, "num_hidden_layers": 3})
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).train()
    attnres.apply(model, block_size=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attnres.query"):
                p.normal_(0, 0.5)
    calls = []
    real = _attnres_op.mix

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(_attnres_op, "mix", counting)
    b = batch()
    fused = model(**b).loss
    fused.backward()
    g_fused = {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }
    assert calls
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(_attnres_op, "ENABLED", False)
    calls.clear()
    ref = model(**b).loss
    ref.backward()
    assert not calls
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_cuda_kernel_compiles(target):
    from forward_rewrite import _cuda, _native

    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build ships no NVRTC")
    _cuda.load_nvrtc()
    image, log = _native.cuda_compile(target, "attnres_mix")
    assert image
    assert "warning" not in log.lower() and "error" not in log.lower(), log
    for kind in ("fwd", "bwd"):
        for suffix in ("bf16", "f16", "f32"):
            assert f"attnres_{kind}_{suffix}".encode() in image
        # the register-cached instances runtime/src/cuda/attnres.rs picks
        for suffix in ("bf16", "f16"):
            for vpt in (1, 2):
                assert f"attnres_{kind}_{suffix}_r{vpt}".encode() in image
