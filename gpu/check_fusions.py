"""Correctness of the fused decoder ops' CUDA kernels (forward_rewrite.rms_norm, add_rms_norm,
gated_rms_norm, rotary, gated_mlp_act) on the GPU machine, at the shapes of Llama-3.2-1B, Qwen3-0.6B, Gemma-2-2B and
Phi-3-mini, plus the layouts and fallbacks the models and the launchers produce.

    python3 gpu/check_fusions.py [--quick] [--tokens N]   (gpu/run.sh check_fusions stages it)
    python3 gpu/check_fusions.py --smoke                  (anywhere: tiny sizes, CPU backend)

Per case and dtype (bfloat16, float16, float32), on fresh random inputs, with every output of
the CUDA backend poisoned with NaN before the kernels run: the forward output and every
gradient (x and weight; q and k; gate and up) of

  ours   the public op and its autograd (CUDA kernels),
  stock  the transformers module or function the rewriter replaces (LlamaRMSNorm,
         Gemma2RMSNorm, a residual add and one of them, Qwen3RMSNorm over heads,
         Qwen3NextRMSNormGated / KimiLinearRMSNormGated, DeepseekV4UnweightedRMSNorm,
         apply_rotary_pos_emb of Llama / Phi / GLM /
         Cohere, ACT2FN[act](gate) * up, Phi3MLP's chunked gate_up),
  ref    the same formula in float64 (on the GPU),
  twin   ours on the CPU (the Rust code CI tests) from the same inputs,

compared as relative norm errors ||a - b|| / ||b||. A case PASSES when, for each tensor:
  * it holds no NaN or inf (every element was written) and has stock's shape and dtype;
  * float32: error vs ref <= 2e-6 (forward) / 2e-5 (gradients);
  * bfloat16 / float16: error vs ref <= 1e-2 / 2e-3, and <= 1.1 x max(stock's error vs ref,
    floor), where floor is ref rounded to the dtype (no result of that dtype is closer),
    on tensors of at least 10,000 elements (on fewer, one rounding decides it);
  * error vs twin <= 1e-5 (float32) / 2.5e-3 (bfloat16) / 5e-4 (float16): the GPU computes
    what CI tested, up to summation order and rounding ties.
Then: determinism (bit-identical reruns), a side stream, CUDA graph capture and replay,
no host synchronisation (torch.cuda.set_sync_debug_mode("error")), torch.compile
(fullgraph=True, inductor) against eager, and bad inputs raising TypeError / ValueError that
name the argument (never a CUDA error). One line per case: PASS or FAIL and the errors.
Exit status 1 if anything fails.
"""

import torch  # noqa: I001  (first: cudarc loads the CUDA libraries torch brought in)

import argparse
import math
import sys
import time
import traceback
import types

import forward_rewrite
import torch.nn.functional as F
from forward_rewrite import _native
from forward_rewrite._fusions_backend import CLAMP_GRAD_AT_BOUND, GateFn
from transformers.activations import ACT2FN
from transformers.models.cohere import modeling_cohere
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.glm import modeling_glm
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.phi import modeling_phi
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

try:  # the gated norms' stock modules (transformers 5.x)
    from transformers.models.kimi_linear.modeling_kimi_linear import (
        KimiLinearRMSNormGated,
    )
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        Qwen3NextRMSNormGated,
    )
except ImportError:
    KimiLinearRMSNormGated = Qwen3NextRMSNormGated = None
try:  # Mamba-2's gated norm: the gate first, in groups
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated
except ImportError:
    MambaRMSNormGated = None

try:  # DeepSeek-V4's unweighted norm, its scale rounded first (GLM-5-Next, Inkling 2: copies)
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4UnweightedRMSNorm,
    )
except ImportError:
    DeepseekV4UnweightedRMSNorm = None

ARGS = None
DEVICE = "cuda"
FAILURES = []
TOL_16 = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
MIN_ELEMENTS_TO_COMPARE = 10_000
TWIN_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.5e-3, torch.float16: 5e-4}

#: (hidden, heads, kv heads, head_dim, intermediate, norm, activation, eps); norm: "llama"
#: (weight * x.to(dtype)) or "gemma" ((x * (1 + w.float())).type_as(x)).
MODELS = {
    "Llama-3.2-1B": (2048, 32, 8, 64, 8192, "llama", "silu", 1e-5),
    "Qwen3-0.6B": (1024, 16, 8, 128, 3072, "llama", "silu", 1e-6),
    "Gemma-2-2B": (2304, 8, 4, 256, 9216, "gemma", "gelu_tanh", 1e-6),
    "Phi-3-mini": (3072, 32, 32, 96, 8192, "llama", "silu", 1e-5),
}


def fail(msg):
    FAILURES.append(msg)


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def fwd_bwd(fn, inputs, consts, grad_outputs):
    """Outputs of fn(*inputs, *consts) and the gradients of sum(out * g) for each input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs, *consts)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = [g.to(o.dtype) for g, o in zip(grad_outputs, outs, strict=True)]
    grads = torch.autograd.grad(outs, inputs, gs)
    return [o.detach() for o in outs] + list(grads)


def evaluate(
    name, dtype, inputs, ours, stock, ref, *, consts=(), names=None, twin=True
):
    """Runs ours, stock, the float64 reference and (on CUDA, unless ``twin`` is false) the
    CPU twin on the same inputs (differentiated) and consts (not), and prints one PASS/FAIL
    line."""
    t0 = time.perf_counter()
    g = torch.Generator(device=inputs[0].device).manual_seed(
        int(time.time() * 1e3) % 2**31
    )
    probe = stock(*[t.detach() for t in inputs], *consts)
    probe = probe if isinstance(probe, tuple) else (probe,)
    gouts = [
        torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        for p in probe
    ]
    del probe
    o = fwd_bwd(ours, inputs, consts, gouts)
    s = fwd_bwd(stock, inputs, consts, gouts)
    r = fwd_bwd(ref, [t.double() for t in inputs], consts, [x.double() for x in gouts])
    tw = None
    if DEVICE == "cuda" and twin:
        tw = fwd_bwd(
            ours,
            [t.cpu() for t in inputs],
            [c.cpu() for c in consts],
            [x.cpu() for x in gouts],
        )
    names = names or [f"out{i}" for i in range(len(gouts))] + [
        f"d{i}" for i in range(len(inputs))
    ]
    cols, bad = [], []
    for i, (a, b, c) in enumerate(zip(o, s, r, strict=True)):
        label = names[i]
        forward = i < len(gouts)
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(
                f"{label}: {a.dtype} {tuple(a.shape)} vs stock {b.dtype} {tuple(b.shape)}"
            )
        e, es = rel(a, c), rel(b, c)
        floor = rel(c.to(a.dtype), c)
        if dtype == torch.float32:
            ok = e <= (2e-6 if forward else 2e-5)
        else:
            ok = e <= TOL_16[dtype]
            # "Never worse than stock" is statistical: on a few hundred elements one
            # rounding decides it, so there only the tolerance applies.
            if a.numel() >= MIN_ELEMENTS_TO_COMPARE:
                ok = ok and e <= 1.1 * max(es, floor) + 1e-7
        text = f"{label} {e:.1e} (stock {es:.1e}, floor {floor:.1e}"
        if tw is not None:
            et = rel(a.cpu(), tw[i])
            text += f", twin {et:.1e}"
            if et > TWIN_TOL[dtype]:
                ok = False
        text += ")"
        cols.append(text)
        if not ok:
            bad.append(text)
    status = "PASS" if not bad else "FAIL"
    dt = str(dtype).removeprefix("torch.")
    print(
        f"{status} {name:44s} {dt:8s} {time.perf_counter() - t0:5.1f}s  "
        + " | ".join(cols),
        flush=True,
    )
    if bad:
        fail(f"{name} {dt}: " + "; ".join(bad))


def run(name, dtype, make):
    try:
        make(name, dtype)
    except Exception as e:  # noqa: BLE001  (a failed case is reported, the rest still run)
        print(f"FAIL {name:44s} {dtype}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        fail(f"{name} {dtype}: {type(e).__name__}: {e}")


def gen():
    return torch.Generator(device=DEVICE).manual_seed(int(time.time() * 1e6) % 2**31)


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)


# ---- RMSNorm --------------------------------------------------------------------------------


def rms_ref(offset):
    def f(x, w, eps):
        return (offset + w) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    return f


def misaligned(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary
    (differentiable), so the launchers must take their any-layout kernels."""
    flat = t.reshape(-1)
    return torch.cat((flat[:1], flat))[1:].view(t.shape)


def case_rms(shape, eps, style, w_dtype=None, *, shift=False, cls=None):
    """style "llama" (cast before the weight) or "gemma" (offset 1, cast after)."""

    def make(name, dtype):
        g = gen()
        offset = 1.0 if style == "gemma" else 0.0
        wd = w_dtype or dtype
        x = randn(*shape, g=g, dtype=dtype, scale=2.0)
        w = (randn(shape[-1], g=g) * 0.2 + 1.0 - offset).to(wd)
        klass = cls or (Gemma2RMSNorm if style == "gemma" else LlamaRMSNorm)
        module = klass(shape[-1], eps=eps).to(device=DEVICE, dtype=wd)

        def stock(x, w):
            return torch.func.functional_call(module, {"weight": w}, (x,))

        def ours(x, w):
            if shift:
                x = misaligned(x)
                assert x.data_ptr() % 16 != 0
            return forward_rewrite.rms_norm(
                x, w, eps, offset=offset, cast_before_weight=style == "llama"
            )

        ref = rms_ref(offset)
        evaluate(
            name,
            dtype,
            [x, w],
            ours,
            stock,
            lambda x, w: ref(x, w, eps),
            names=["y", "dx", "dw"],
        )

    return make


def gated_ref(activation):
    def f(x, gate, w, eps):
        act = torch.sigmoid(gate) if activation == "sigmoid" else F.silu(gate)
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * act

    return f


def case_gated_rms(shape, eps, style, w_dtype=None, *, shift=False):
    """A gated norm: style "qwen3-next" (Qwen3NextRMSNormGated: SiLU, the weight applied
    after the cast) or "kimi" (KimiLinearRMSNormGated: sigmoid, all in float32)."""

    def make(name, dtype):
        cls = Qwen3NextRMSNormGated if style == "qwen3-next" else KimiLinearRMSNormGated
        if cls is None:
            raise RuntimeError("this transformers has no gated norm modules")
        g = gen()
        wd = w_dtype or dtype
        x = randn(*shape, g=g, dtype=dtype, scale=2.0)
        gate = randn(*shape, g=g, dtype=dtype, scale=2.0)
        w = (randn(shape[-1], g=g) * 0.2 + 1.0).to(wd)
        module = cls(shape[-1], eps=eps).to(device=DEVICE, dtype=wd)
        activation = module.activation

        def stock(x, gate, w):
            return torch.func.functional_call(module, {"weight": w}, (x, gate))

        def ours(x, gate, w):
            if shift:
                x = misaligned(x)
                assert x.data_ptr() % 16 != 0
            return forward_rewrite.gated_rms_norm(
                x,
                gate,
                w,
                eps,
                activation=activation,
                cast_before_weight=style == "qwen3-next",
            )

        ref = gated_ref(activation)
        evaluate(
            name,
            dtype,
            [x, gate, w],
            ours,
            stock,
            lambda x, gate, w: ref(x, gate, w, eps),
            names=["y", "dx", "dgate", "dw"],
        )

    return make


def case_gated_rms_mamba(shape, eps, groups, *, shift=False):
    """Mamba-2's gated norm (MambaRMSNormGated, Nemotron-H / Granite 4 / Bamba / Zamba2's
    copies): ``weight * norm_per_group(x * silu(gate)).to(dtype)``, ``groups`` per row."""

    def make(name, dtype):
        if MambaRMSNormGated is None:
            raise RuntimeError("this transformers has no Mamba-2 gated norm")
        g = gen()
        size = shape[-1] // groups
        x = randn(*shape, g=g, dtype=dtype, scale=2.0)
        gate = randn(*shape, g=g, dtype=dtype, scale=2.0)
        w = (randn(shape[-1], g=g) * 0.2 + 1.0).to(dtype)
        module = MambaRMSNormGated(shape[-1], group_size=size, eps=eps)
        module = module.to(device=DEVICE, dtype=dtype)

        def stock(x, gate, w):
            return torch.func.functional_call(module, {"weight": w}, (x, gate))

        def ours(x, gate, w):
            if shift:
                x = misaligned(x)
                assert x.data_ptr() % 16 != 0
            return forward_rewrite.gated_rms_norm(
                x, gate, w, eps, gate_first=True, group_size=size
            )

        def ref(x, gate, w):
            u = (x * F.silu(gate)).unflatten(-1, (groups, size))
            u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
            return w * u.flatten(-2)

        evaluate(
            name,
            dtype,
            [x, gate, w],
            ours,
            stock,
            ref,
            names=["y", "dx", "dgate", "dw"],
        )

    return make


def case_rms_scale_first(shape, eps, *, transposed=False):
    """DeepSeek-V4's ``DeepseekV4UnweightedRMSNorm`` (GLM-5-Next's and Inkling 2's copies):
    ``x * rsqrt(mean(x.float()^2) + eps).to(x.dtype)``, no weight, against
    ``forward_rewrite.rms_norm(x, None, eps, scale_first=True)``. ``transposed``: x is
    (batch, seq, heads, head_dim) seen as (batch, heads, seq, head_dim), as its q_b_norm
    gets q after ``.transpose(1, 2)``."""

    def make(name, dtype):
        if DeepseekV4UnweightedRMSNorm is None:
            raise RuntimeError("this transformers has no DeepSeek-V4 unweighted norm")
        g = gen()
        x = randn(*shape, g=g, dtype=dtype, scale=2.0)
        if transposed:
            x = x.transpose(1, 2)
        module = DeepseekV4UnweightedRMSNorm(eps=eps)

        def ours(x):
            return forward_rewrite.rms_norm(x, None, eps, scale_first=True)

        def ref(x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

        evaluate(name, dtype, [x], ours, module, ref, names=["y", "dx"])

    return make


def case_add_rms(shape, eps, style, w_dtype=None, *, shift=False):
    """A decoder layer's ``h = r + h; r = h; h = norm(h)`` (both outputs feed the loss: the
    sum through the next residual) against forward_rewrite.add_rms_norm; style as case_rms."""

    def make(name, dtype):
        g = gen()
        offset = 1.0 if style == "gemma" else 0.0
        wd = w_dtype or dtype
        r = randn(*shape, g=g, dtype=dtype, scale=3.0)
        x = randn(*shape, g=g, dtype=dtype, scale=2.0)
        w = (randn(shape[-1], g=g) * 0.2 + 1.0 - offset).to(wd)
        klass = Gemma2RMSNorm if style == "gemma" else LlamaRMSNorm
        module = klass(shape[-1], eps=eps).to(device=DEVICE, dtype=wd)

        def stock(r, x, w):
            total = r + x
            return torch.func.functional_call(module, {"weight": w}, (total,)), total

        def ours(r, x, w):
            if shift:
                r = misaligned(r)
                assert r.data_ptr() % 16 != 0
            return forward_rewrite.add_rms_norm(
                r, x, w, eps, offset=offset, cast_before_weight=style == "llama"
            )

        norm = rms_ref(offset)

        def ref(r, x, w):
            total = r + x
            return norm(total, w, eps), total

        evaluate(
            name,
            dtype,
            [r, x, w],
            ours,
            stock,
            ref,
            names=["y", "sum", "dr", "dx", "dw"],
        )

    return make


# ---- rotary ---------------------------------------------------------------------------------


def tables(batch, seq, dim, *, interleaved=False, dtype=torch.float32, g=None):
    inv = 1.0 / 10000.0 ** (
        torch.arange(0, dim, 2, device=DEVICE, dtype=torch.float64) / dim
    )
    start = torch.randint(0, 4096, (batch, 1), device=DEVICE, generator=g).double()
    pos = torch.arange(seq, device=DEVICE, dtype=torch.float64)[None] + start
    freqs = pos[..., None] * inv
    emb = (
        freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    )
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_ref(rd, interleaved, unsqueeze_dim=1):
    """The stock formula in float64 on (q, k, cos, sin, ...): the first rd entries of each
    head become x * cos + rotate(x) * sin, the rest pass through."""

    def f(q, k, cos, sin, *_):
        def one(x):
            c = cos.double().unsqueeze(unsqueeze_dim)
            s = sin.double().unsqueeze(unsqueeze_dim)
            xr, xp = x[..., :rd], x[..., rd:]
            if interleaved:
                rot = torch.stack((-xr[..., 1::2], xr[..., ::2]), -1).flatten(-2)
            else:
                rot = torch.cat((-xr[..., rd // 2 :], xr[..., : rd // 2]), -1)
            return torch.cat((xr * c + rot * s, xp), -1)

        return one(q), one(k)

    return f


def qk(batch, seq, heads, kv, head_dim, dtype, g, *, transposed=True):
    """As attention makes them: (batch, seq, heads, d) views, transposed to (b, h, s, d)."""
    q = randn(batch, seq, heads, head_dim, g=g, dtype=dtype)
    k = randn(batch, seq, kv, head_dim, g=g, dtype=dtype)
    return (q.transpose(1, 2), k.transpose(1, 2)) if transposed else (q, k)


ROPE_NAMES = ["q_out", "k_out", "dq", "dk"]


def case_rope(
    batch, seq, heads, kv, head_dim, *, cos_batch=1, cos_dtype=None, out_dtype=None
):
    """Llama's apply_rotary_pos_emb (also Qwen3, Gemma-2, Phi-3): full rotary; position_ids
    of batch 1 (one table for every sequence) unless cos_batch says otherwise."""

    def make(name, dtype):
        g = gen()
        q, k = qk(batch, seq, heads, kv, head_dim, dtype, g)
        cos, sin = tables(cos_batch, seq, head_dim, dtype=cos_dtype or dtype, g=g)
        od = dtype if out_dtype == "q" else None

        def stock(q, k, cos, sin):
            a, b = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
            return (a.to(od), b.to(od)) if od is not None else (a, b)

        def ours(q, k, cos, sin):
            a, b = forward_rewrite.rotary(q, k, cos, sin, out_dtype=od)
            for out, x in ((a, q), (b, k)):
                if [st for st, n in zip(out.stride(), out.shape) if n > 1] != [
                    st for st, n in zip(x.stride(), x.shape) if n > 1
                ]:
                    raise AssertionError(
                        f"output strides {out.stride()}, input's {x.stride()}"
                    )
            return a, b

        evaluate(
            name,
            dtype,
            [q, k],
            ours,
            stock,
            rope_ref(head_dim, False),
            consts=(cos, sin),
            names=ROPE_NAMES,
        )

    return make


def case_rope_phi_partial(batch, seq, heads, head_dim, rd):
    def make(name, dtype):
        g = gen()
        q, k = qk(batch, seq, heads, heads, head_dim, dtype, g)
        cos, sin = tables(batch, seq, rd, dtype=dtype, g=g)

        def stock(q, k, cos, sin):
            qr, kr = modeling_phi.apply_rotary_pos_emb(
                q[..., :rd], k[..., :rd], cos, sin
            )
            return torch.cat((qr, q[..., rd:]), -1), torch.cat((kr, k[..., rd:]), -1)

        evaluate(
            name,
            dtype,
            [q, k],
            lambda q, k, cos, sin: forward_rewrite.rotary(
                q, k, cos, sin, rotary_dim=rd
            ),
            stock,
            rope_ref(rd, False),
            consts=(cos, sin),
            names=ROPE_NAMES,
        )

    return make


def case_rope_glm(batch, seq, heads, kv, head_dim, rd):
    """GLM: cat-layout tables; apply takes their first half, repeat_interleave(2), and
    rotates pairs. Ours is given the interleaved tables (what the rewritten source passes)."""

    def make(name, dtype):
        g = gen()
        q, k = qk(batch, seq, heads, kv, head_dim, dtype, g)
        cos, sin = tables(batch, seq, rd, dtype=dtype, g=g)
        cos_il = cos[..., : rd // 2].repeat_interleave(2, dim=-1)
        sin_il = sin[..., : rd // 2].repeat_interleave(2, dim=-1)
        evaluate(
            name,
            dtype,
            [q, k],
            lambda q, k, c, s, ci, si: forward_rewrite.rotary(
                q, k, ci, si, interleaved=True
            ),
            lambda q, k, c, s, ci, si: modeling_glm.apply_rotary_pos_emb(q, k, c, s),
            lambda q, k, c, s, ci, si: rope_ref(rd, True)(q, k, ci, si),
            consts=(cos, sin, cos_il, sin_il),
            names=ROPE_NAMES,
        )

    return make


def case_rope_cohere(batch, seq, heads, kv, head_dim):
    """Cohere: interleaved tables, computed in float32, cast back to q's dtype."""

    def make(name, dtype):
        g = gen()
        q, k = qk(batch, seq, heads, kv, head_dim, dtype, g)
        cos, sin = tables(batch, seq, head_dim, interleaved=True, dtype=dtype, g=g)
        evaluate(
            name,
            dtype,
            [q, k],
            lambda q, k, c, s: forward_rewrite.rotary(
                q, k, c, s, interleaved=True, out_dtype=q.dtype
            ),
            modeling_cohere.apply_rotary_pos_emb,
            rope_ref(head_dim, True),
            consts=(cos, sin),
            names=ROPE_NAMES,
        )

    return make


def case_rope_bshd(batch, seq, heads, kv, head_dim):
    """q, k in (batch, seq, heads, head_dim), unsqueeze_dim=2, contiguous."""

    def make(name, dtype):
        g = gen()
        q, k = qk(batch, seq, heads, kv, head_dim, dtype, g, transposed=False)
        cos, sin = tables(batch, seq, head_dim, dtype=dtype, g=g)
        evaluate(
            name,
            dtype,
            [q, k],
            lambda q, k, c, s: forward_rewrite.rotary(q, k, c, s, unsqueeze_dim=2),
            lambda q, k, c, s: modeling_llama.apply_rotary_pos_emb(
                q, k, c, s, unsqueeze_dim=2
            ),
            rope_ref(head_dim, False, unsqueeze_dim=2),
            consts=(cos, sin),
            names=ROPE_NAMES,
        )

    return make


def case_rope_single(batch, seq, heads, head_dim):
    """Gemma 4's one-tensor apply_rotary_pos_emb on (batch, seq, heads, head_dim),
    unsqueeze_dim=2: forward_rewrite.rotary_single (the launch's k side empty)."""

    def make(name, dtype):
        from transformers.models.gemma4 import modeling_gemma4

        g = gen()
        x = randn(batch, seq, heads, head_dim, g=g, dtype=dtype)
        cos, sin = tables(batch, seq, head_dim, dtype=dtype, g=g)
        pair = rope_ref(head_dim, False, unsqueeze_dim=2)
        evaluate(
            name,
            dtype,
            [x],
            lambda x, c, s: forward_rewrite.rotary_single(x, c, s, unsqueeze_dim=2),
            lambda x, c, s: modeling_gemma4.apply_rotary_pos_emb(
                x, c, s, unsqueeze_dim=2
            ),
            lambda x, c, s: pair(x, x, c, s)[0],
            consts=(cos, sin),
            names=["x_out", "dx"],
        )

    return make


# ---- gated MLP product ----------------------------------------------------------------------


def act_ref(activation, x):
    if activation == "silu":
        return x * torch.sigmoid(x)
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


STOCK_ACT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def case_gated(tokens, inter, activation, *, chunked=False, packed=False, shift=False):
    """LlamaMLP's act(gate) * up; chunked: Phi3MLP's gate, up = gate_up.chunk(2, -1) and
    up * act(gate), through gated_mlp_act on the chunks or (packed) gated_mlp_act_packed."""

    def make(name, dtype):
        g = gen()
        act = ACT2FN[STOCK_ACT[activation]]

        def ours(a, b):
            if (
                shift
            ):  # rows one element off 16 bytes, row stride inter + 1: scalar kernel
                a, b = F.pad(a, (1, 0))[:, 1:], F.pad(b, (1, 0))[:, 1:]
                assert a.data_ptr() % 16 != 0 and a.stride(0) == inter + 1
            return forward_rewrite.gated_mlp_act(a, b, activation=activation)

        def phi3(a, b):
            return b * act(a)

        def phi3_ref(a, b):
            return b * act_ref(activation, a)

        if chunked:
            # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1); up * act(gate)
            evaluate(
                name,
                dtype,
                [randn(tokens, 2 * inter, g=g, dtype=dtype, scale=2.0)],
                (
                    (
                        lambda gu: forward_rewrite.gated_mlp_act_packed(
                            gu, activation=activation
                        )
                    )
                    if packed
                    else (lambda gu: ours(*gu.chunk(2, dim=-1)))
                ),
                lambda gu: phi3(*gu.chunk(2, dim=-1)),
                lambda gu: phi3_ref(*gu.chunk(2, dim=-1)),
                names=["out", "dgate_up"],
            )
            return
        gate = randn(tokens, inter, g=g, dtype=dtype, scale=2.0)
        up = randn(tokens, inter, g=g, dtype=dtype)
        evaluate(
            name,
            dtype,
            [gate, up],
            ours,
            lambda a, b: act(a) * b,
            lambda a, b: act_ref(activation, a) * b,
            names=["out", "dgate", "dup"],
        )

    return make


def case_gated_clamped(tokens, inter, limit, *, after=False, packed=False):
    """The clamped SwiGLU: DeepseekV4MLP's act(gate.clamp(max=L)) * up.clamp(-L, L) or (after)
    Step3p7MLP's act(gate).clamp(max=L) * up.clamp(-L, L); packed: the experts' _apply_gate on
    one gate_up. The float64 reference clamps where stock's comparisons do: at the limit as
    the dtype holds it, after the activation on the activation rounded to the dtype."""

    def make(name, dtype):
        g = gen()
        act = ACT2FN["silu"]
        lim = torch.tensor(limit, dtype=dtype).item()

        def stock(a, b):
            a = act(a).clamp(max=limit) if after else act(a.clamp(max=limit))
            return a * b.clamp(min=-limit, max=limit)

        def ref(a, b):
            if after:
                beyond = torch.gt if CLAMP_GRAD_AT_BOUND else torch.ge
                held = beyond(act(a.detach().to(dtype)), lim)
                a = torch.where(held, lim, act_ref("silu", a))
            else:
                a = act_ref("silu", a.clamp(max=lim))
            return a * b.clamp(min=-lim, max=lim)

        options = {"limit": limit, "clamp_after_activation": after}
        if packed:
            evaluate(
                name,
                dtype,
                [randn(tokens, 2 * inter, g=g, dtype=dtype, scale=2.0)],
                lambda gu: forward_rewrite.gated_mlp_act_packed(gu, **options),
                lambda gu: stock(*gu.chunk(2, dim=-1)),
                lambda gu: ref(*gu.chunk(2, dim=-1)),
                names=["out", "dgate_up"],
            )
            return
        evaluate(
            name,
            dtype,
            [
                randn(tokens, inter, g=g, dtype=dtype, scale=2.0),
                randn(tokens, inter, g=g, dtype=dtype, scale=2.0),
            ],
            lambda a, b: forward_rewrite.gated_mlp_act(a, b, **options),
            stock,
            ref,
            names=["out", "dgate", "dup"],
        )

    return make


def case_gated_oai(rows, cols, *, interleaved=True, shift=False, limit=7.0):
    """GPT-OSS's experts gate (GptOssExperts._apply_gate: interleaved (gate, up) pairs,
    clamped at 7, (up + 1) * gate * sigmoid(gate * 1.702)) or MiniMax-M3's (the same on two
    halves), through gated_mlp_act_packed; the reference is the stock function in float64
    (7 is a value of every dtype, so the clamps decide alike)."""

    def make(name, dtype):
        import types as _types

        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
        from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
            MiniMaxM3VLExperts,
        )

        # no limit: the stock gate with an infinite one clamps nothing
        stock_limit = math.inf if limit is None else limit
        if interleaved:
            module = _types.SimpleNamespace(alpha=1.702, limit=stock_limit)
            apply = GptOssExperts._apply_gate
        else:
            module = _types.SimpleNamespace(
                swiglu_alpha=1.702, swiglu_limit=stock_limit
            )
            apply = MiniMaxM3VLExperts._apply_gate

        def stock(gu):
            return apply(module, gu)

        def ours(gu):
            if shift:  # rows one element off 16 bytes: the scalar kernel
                gu = F.pad(gu, (1, 0))[:, 1:]
            return forward_rewrite.gated_mlp_act_packed(
                gu,
                activation="swiglu_oai",
                alpha=1.702,
                limit=limit,
                interleaved=interleaved,
            )

        g = gen()
        evaluate(
            name,
            dtype,
            [randn(rows, 2 * cols, g=g, dtype=dtype, scale=4.0)],
            ours,
            stock,
            stock,
            names=["out", "dgate_up"],
        )

    return make


# ---- MoE experts ------------------------------------------------------------------------------


def case_moe(tokens, hidden, inter, experts, top_k, activation, *, transposed=False):
    """transformers' grouped_mm_experts_forward (Qwen3-MoE's experts: concatenated gate_up,
    no bias) against forward_rewrite.moe_experts; the reference loops over the experts in
    float64. No CPU twin here: CI runs the CPU path."""

    def make(name, dtype):
        from transformers.integrations import moe

        g = gen()
        act = ACT2FN[STOCK_ACT[activation]]
        scale = hidden**-0.5
        if transposed:
            w1 = randn(experts, hidden, 2 * inter, g=g, dtype=dtype, scale=scale)
            w2 = randn(experts, inter, hidden, g=g, dtype=dtype, scale=inter**-0.5)
        else:
            w1 = randn(experts, 2 * inter, hidden, g=g, dtype=dtype, scale=scale)
            w2 = randn(experts, hidden, inter, g=g, dtype=dtype, scale=inter**-0.5)
        x = randn(tokens, hidden, g=g, dtype=dtype)
        # Skewed routing (a few experts take most rows, some none), as trained routers do.
        logits = randn(tokens, experts, g=g) + torch.linspace(
            3, -3, experts, device=DEVICE
        )
        top_w, top_i = torch.topk(logits.softmax(-1), top_k, dim=-1)
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(dtype)

        def module(w1, w2):
            m = types.SimpleNamespace(
                num_experts=experts,
                has_gate=True,
                has_bias=False,
                has_post_expert_norm=False,
                is_transposed=transposed,
                _is_expert_parallel=False,
                gate_up_proj=w1,
                down_proj=w2,
            )
            m._apply_gate = lambda gu: (
                act(gu.chunk(2, dim=-1)[0]) * gu.chunk(2, dim=-1)[1]
            )
            return m

        def ours(x, w, w1, w2, idx):
            return forward_rewrite.moe_experts(
                x, idx, w, w1, w2, activation=activation, transposed=transposed
            )

        def stock(x, w, w1, w2, idx):
            return moe.grouped_mm_experts_forward(module(w1, w2), x, idx, w)

        def ref(x, w, w1, w2, idx):
            out = torch.zeros_like(x)
            for e in range(experts):
                tok, slot = torch.where(idx == e)
                if tok.numel() == 0:
                    continue
                a = w1[e] if transposed else w1[e].t()
                b = w2[e] if transposed else w2[e].t()
                gate, up = (x[tok] @ a).chunk(2, dim=-1)
                y = (act_ref(activation, gate) * up) @ b
                out = out.index_add(0, tok, y * w[tok, slot].unsqueeze(-1))
            return out

        evaluate(
            name,
            dtype,
            [x, top_w, w1, w2],
            ours,
            stock,
            ref,
            consts=(top_i,),
            names=["out", "dx", "dweights", "dgate_up_proj", "ddown_proj"],
            twin=False,
        )

    return make


# ---- the case list --------------------------------------------------------------------------


def cases(tokens):
    batch = 2 if tokens >= 2 else 1
    seq = max(tokens // batch, 1)
    out = {}
    for model, (hid, heads, kv, hd, inter, norm, act, eps) in MODELS.items():
        out[f"{model} rms_norm ({tokens}, {hid})"] = case_rms(
            (batch, seq, hid), eps, norm
        )
        out[f"{model} add_rms_norm ({tokens}, {hid})"] = case_add_rms(
            (batch, seq, hid), eps, norm
        )
        if model == "Qwen3-0.6B":
            out[f"{model} q_norm ({tokens}, {heads}, {hd})"] = case_rms(
                (batch, seq, heads, hd), eps, "llama", cls=Qwen3RMSNorm
            )
            out[f"{model} k_norm ({tokens}, {kv}, {hd})"] = case_rms(
                (batch, seq, kv, hd), eps, "llama", cls=Qwen3RMSNorm
            )
        out[f"{model} rotary q{heads} k{kv} d{hd}"] = case_rope(
            batch, seq, heads, kv, hd
        )
        out[f"{model} gated {act} ({tokens}, {inter})"] = case_gated(
            tokens,
            inter,
            act,
            chunked=model == "Phi-3-mini",
            packed=model == "Phi-3-mini",
        )
    small = max(tokens // 8, 8)
    sb, ss = (2, max(small // 2, 1))
    out.update(
        {
            "mixed: bf16 x, fp32 weight, Llama order": case_rms(
                (small, 2048), 1e-5, "llama", torch.float32
            ),
            "mixed: fp32 weight, Gemma order": case_rms(
                (small, 2304), 1e-6, "gemma", torch.float32
            ),
            "rms_norm hidden 100 (any kernel)": case_rms((small, 100), 1e-6, "llama"),
            # DeepSeek-V4's q_b_norm: q (batch, 64 heads, seq, 512) after a transpose.
            "rms_norm scale first, DeepSeek-V4 q_b_norm (small, 64 x 512)": case_rms_scale_first(
                (sb, ss, 64 if DEVICE == "cuda" else 4, 512), 1e-6, transposed=True
            ),
            "rms_norm scale first (small, 300)": case_rms_scale_first(
                (small, 300), 1e-6
            ),
            "rms_norm scale first (small, 8)": case_rms_scale_first((small, 8), 1e-6),
            "rms_norm misaligned rows (any kernel)": case_rms(
                (small, 512), 1e-6, "llama", shift=True
            ),
            "rms_norm hidden 20480 (any kernel)": case_rms((64, 20480), 1e-6, "gemma"),
            "rms_norm hidden 8 (team of 1)": case_rms((small, 8), 1e-6, "llama"),
            # Mistral-7B / Llama-3-8B: two vectors per thread in the forward.
            "rms_norm hidden 4096": case_rms((batch, seq, 4096), 1e-5, "llama"),
            "rms_norm hidden 8200 (1025 vectors)": case_rms(
                (small, 8200), 1e-6, "gemma"
            ),
            "rms_norm hidden 1000 (warp, 4 vectors)": case_rms(
                (small, 1000), 1e-6, "gemma"
            ),
            "add_rms_norm hidden 4096": case_add_rms((batch, seq, 4096), 1e-5, "llama"),
            "add_rms_norm mixed fp32 weight": case_add_rms(
                (small, 2048), 1e-5, "llama", torch.float32
            ),
            "add_rms_norm misaligned residual (any kernel)": case_add_rms(
                (small, 512), 1e-6, "llama", shift=True
            ),
            "add_rms_norm hidden 100 (any kernel)": case_add_rms(
                (small, 100), 1e-6, "gemma"
            ),
            "add_rms_norm hidden 8 (team of 1)": case_add_rms(
                (small, 8), 1e-6, "llama"
            ),
            "add_rms_norm hidden 1000 (warp, 4 vectors)": case_add_rms(
                (small, 1000), 1e-6, "gemma"
            ),
            "add_rms_norm hidden 8200 (1025 vectors)": case_add_rms(
                (small, 8200), 1e-6, "llama"
            ),
            # Qwen3-Next-80B's linear attention: 32 value heads of 128, per token.
            "gated_rms_norm Qwen3-Next (tokens, 32, 128)": case_gated_rms(
                (batch, seq, 32, 128), 1e-6, "qwen3-next"
            ),
            "gated_rms_norm Kimi (tokens, 32, 128)": case_gated_rms(
                (batch, seq, 32, 128), 1e-6, "kimi"
            ),
            "gated_rms_norm fp32 weight": case_gated_rms(
                (small, 16, 128), 1e-6, "qwen3-next", torch.float32
            ),
            "gated_rms_norm hidden 100 (any kernel)": case_gated_rms(
                (small, 100), 1e-6, "kimi"
            ),
            "gated_rms_norm misaligned rows (any kernel)": case_gated_rms(
                (small, 256), 1e-6, "qwen3-next", shift=True
            ),
            "gated_rms_norm hidden 1000 (warp teams)": case_gated_rms(
                (small, 1000), 1e-6, "qwen3-next"
            ),
            "gated_rms_norm hidden 8192 (block team)": case_gated_rms(
                (small, 8192), 1e-6, "kimi"
            ),
            "gated_rms_norm hidden 8 (team of 1)": case_gated_rms(
                (small, 8), 1e-6, "qwen3-next"
            ),
            # Nemotron-H-8B's mixer output: 8192 = 8 groups of 1024.
            "gated_rms_norm gate first, Nemotron-H (tokens, 8 x 1024)": case_gated_rms_mamba(
                (batch, seq, 8192), 1e-5, 8
            ),
            # Granite-4 / Bamba: one group of the whole row.
            "gated_rms_norm gate first, one group of 8192": case_gated_rms_mamba(
                (small, 8192), 1e-6, 1
            ),
            "gated_rms_norm gate first, 3 groups of 100 (any kernel)": case_gated_rms_mamba(
                (small, 300), 1e-6, 3
            ),
            "gated_rms_norm gate first, misaligned, 6 groups": case_gated_rms_mamba(
                (small, 6 * 64), 1e-6, 6, shift=True
            ),
            "rotary cos batch 2 (per-sequence positions)": case_rope(
                sb, ss, 8, 2, 128, cos_batch=sb
            ),
            "rotary fp32 tables, promoted output": case_rope(
                sb, ss, 8, 4, 64, cos_dtype=torch.float32
            ),
            "rotary fp32 tables, q's dtype out": case_rope(
                sb, ss, 8, 4, 64, cos_dtype=torch.float32, out_dtype="q"
            ),
            "rotary Phi partial d80 r32": case_rope_phi_partial(sb, ss, 8, 80, 32),
            "rotary GLM interleaved partial d128 r64": case_rope_glm(
                sb, ss, 8, 2, 128, 64
            ),
            "rotary Cohere interleaved, q's dtype": case_rope_cohere(sb, ss, 8, 8, 128),
            "rotary (b, s, h, d) unsqueeze_dim=2": case_rope_bshd(sb, ss, 8, 4, 64),
            "rotary d6 (scalar kernel)": case_rope(sb, ss, 3, 1, 6),
            # Gemma 4's global layers: 512-wide heads, q and k rotated by separate calls
            "rotary_single Gemma 4 (b, s, 8, 512)": case_rope_single(sb, ss, 8, 512),
            "rotary_single d6 (scalar kernel)": case_rope_single(sb, ss, 3, 6),
            "rotary Phi partial d10 r4 (scalar)": case_rope_phi_partial(
                sb, ss, 2, 10, 4
            ),
            "gated Phi-3 chunks, two-tensor op": case_gated(
                small, 1024, "silu", chunked=True
            ),
            "gated packed gelu, cols 36 (scalar)": case_gated(
                small, 36, "gelu_tanh", chunked=True, packed=True
            ),
            "gated cols 37 (scalar kernel)": case_gated(small, 37, "silu"),
            "gated misaligned rows (scalar kernel)": case_gated(
                small, 64, "gelu_tanh", shift=True
            ),
            # DeepSeek-V4 / Step-3.7's clamped SwiGLU; a limit of 1.7 (no 16-bit value)
            # clamps a good share of N(0, 2) gates and ups.
            "gated clamped DeepSeek-V4 (tokens, 2048)": case_gated_clamped(
                tokens, 2048, 1.7
            ),
            "gated clamped after activation Step-3.7": case_gated_clamped(
                small, 1024, 1.7, after=True
            ),
            "gated clamped packed experts, cols 36 (scalar)": case_gated_clamped(
                small, 36, 1.7, packed=True
            ),
            # GPT-OSS-20B's experts: intermediate 2880, the routed rows (tokens x top 4)
            "gated swiglu_oai GPT-OSS pairs (tokens x 4, 2880)": case_gated_oai(
                4 * tokens, 2880
            ),
            "gated swiglu_oai MiniMax-M3 halves": case_gated_oai(
                small, 1536, interleaved=False
            ),
            "gated swiglu_oai pairs, cols 37 (scalar)": case_gated_oai(small, 37),
            # no limit: the kernel's general instance (every choice read at run time)
            "gated swiglu_oai pairs, no limit (general)": case_gated_oai(
                small, 1024, limit=None
            ),
            "gated swiglu_oai pairs misaligned (scalar)": case_gated_oai(
                small, 64, shift=True
            ),
            # Qwen3-30B-A3B's experts (hidden 2048, 128 experts of 768, top 8).
            # (On the CPU smoke run, a few of them: the CPU grouped GEMM loops over experts.)
            "moe_experts Qwen3-MoE": case_moe(
                tokens,
                2048,
                768,
                128 if DEVICE == "cuda" else 4,
                8 if DEVICE == "cuda" else 2,
                "silu",
            ),
            "moe_experts transposed gelu, 8 experts": case_moe(
                small, 256, 64, 8, 2, "gelu_tanh", transposed=True
            ),
        }
    )
    return out


QUICK = (
    "Llama-3.2-1B",
    "add_rms_norm",
    "Qwen3-0.6B q_norm",
    "mixed",
    "rms_norm hidden 4096",
    "rotary GLM",
    "gated cols",
    "gated clamped",
    "gated swiglu_oai",
    "moe_experts",
    "gated_rms_norm",
    "rotary_single",
    "rms_norm scale first",
)


# ---- the checks beyond accuracy -------------------------------------------------------------


def small_block(g, dtype=torch.bfloat16):
    """One decoder-ish step using the three ops, for the graph / stream / sync checks."""
    x = randn(2, 64, 256, g=g, dtype=dtype).requires_grad_(True)
    w = (randn(256, g=g) * 0.1 + 1).to(dtype).requires_grad_(True)
    cos, sin = tables(1, 64, 64, dtype=dtype, g=g)

    def step():
        h = forward_rewrite.rms_norm(x, w, 1e-6)
        h, _ = forward_rewrite.add_rms_norm(x, h, w, 1e-6)
        q = h.view(2, 64, 4, 64).transpose(1, 2)
        k = h[..., :128].reshape(2, 64, 2, 64).transpose(1, 2)
        q, k = forward_rewrite.rotary(q, k, cos, sin)
        y = forward_rewrite.gated_mlp_act(q.transpose(1, 2).reshape(2, 64, 256), h)
        y = forward_rewrite.gated_rms_norm(
            y.view(2, 64, 2, 128), h.view(2, 64, 2, 128), w[:128]
        )
        loss = y.float().square().mean() + k.float().square().mean()
        gx, gw = torch.autograd.grad(loss, (x, w))
        return loss.detach(), gx, gw

    return step


def check_extras():
    g = gen()
    step = small_block(g)
    first = step()
    again = step()
    same = all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    print("determinism:", "bit-identical" if same else "DIFFERENT", flush=True)
    if not same:
        fail("two runs differ")
    # Each op alone, larger, twice.
    x = randn(4096, 2048, g=g, dtype=torch.bfloat16).requires_grad_(True)
    w = randn(2048, g=g, dtype=torch.bfloat16).requires_grad_(True)
    dy = randn(4096, 2048, g=g, dtype=torch.bfloat16)
    r = [
        torch.autograd.grad(forward_rewrite.rms_norm(x, w, 1e-6), (x, w), dy)
        for _ in range(2)
    ]
    if not all(torch.equal(a, b) for a, b in zip(*r, strict=True)):
        fail("rms_norm backward not bit-identical across runs")
        print("rms_norm backward rerun: DIFFERENT")

    if DEVICE != "cuda":
        return
    # A side stream.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side = step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(first, side, strict=True))
    print("side stream:", "same results" if same else "DIFFERENT", flush=True)
    if not same:
        fail("side stream differs")

    # No host synchronisation in forward or backward.
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        step()
        print(
            "no host sync: ok (set_sync_debug_mode('error') raised nothing)", flush=True
        )
    except Exception as e:  # noqa: BLE001
        fail(f"host sync: {type(e).__name__}: {e}")
        print("no host sync: FAILED", e, flush=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # CUDA graph capture of forward + backward, replayed.
    try:
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
        err = max(rel(a, b) for a, b in zip(captured, first, strict=True))
        print(f"graph capture: replay matches eager within {err:.1e}", flush=True)
        if err > 1e-6:
            fail(f"graph replay differs by {err}")
    except Exception as e:  # noqa: BLE001
        fail(f"graph capture: {type(e).__name__}: {e}")
        print("graph capture: FAILED", e, flush=True)

    # torch.compile, fullgraph, inductor.
    try:
        torch._dynamo.reset()

        def fn(x, w, q, k, cos, sin, gate, up):
            h = forward_rewrite.rms_norm(
                x, w, 1e-6, offset=1.0, cast_before_weight=False
            )
            a, b = forward_rewrite.rotary(q, k, cos, sin)
            y = forward_rewrite.gated_mlp_act(gate, up, activation="gelu_tanh")
            return (
                h.float().sum()
                + a.float().square().sum()
                + b.float().sum()
                + y.float().square().sum()
            )

        q, k = qk(2, 64, 8, 2, 64, torch.bfloat16, g)
        cos, sin = tables(1, 64, 64, dtype=torch.bfloat16, g=g)
        args = [
            randn(2, 64, 512, g=g, dtype=torch.bfloat16),
            randn(512, g=g, dtype=torch.bfloat16) * 0.1,
            q,
            k,
            cos,
            sin,
            randn(128, 1024, g=g, dtype=torch.bfloat16),
            randn(128, 1024, g=g, dtype=torch.bfloat16),
        ]
        grad_idx = [0, 1, 2, 3, 6, 7]

        def run_it(f):
            leaves = [
                a.detach().clone().requires_grad_(i in grad_idx)
                for i, a in enumerate(args)
            ]
            loss = f(*leaves)
            grads = torch.autograd.grad(loss, [leaves[i] for i in grad_idx])
            return [loss.detach(), *grads]

        compiled = torch.compile(fn, fullgraph=True, backend="inductor")
        got, want = run_it(compiled), run_it(fn)
        err = max(rel(a, b) for a, b in zip(got, want, strict=True))
        print(
            f"torch.compile(fullgraph=True): matches eager within {err:.1e}", flush=True
        )
        if err > 1e-5:
            fail(f"compiled differs by {err}")
    except Exception as e:  # noqa: BLE001
        fail(f"torch.compile: {type(e).__name__}: {e}")
        print("torch.compile: FAILED", e, flush=True)


def check_overwrite():
    """overwrite_inputs (what the patched MLPs pass): gradients written over the
    projections' outputs by the kernel itself, bit for bit the allocated ones, the inputs'
    versions moved, and a lower peak in backward."""
    g = gen()
    tokens, hidden, inter = (4096, 1024, 2816) if DEVICE == "cuda" else (64, 32, 48)
    x0 = randn(tokens, hidden, g=g, dtype=torch.bfloat16)
    w0 = randn(2 * inter, hidden, g=g, dtype=torch.bfloat16) * 0.03
    for packed in (False, True):
        for activation in ("silu", "gelu_tanh"):
            # The output's gradient is given (no loss ops whose float32 temporaries would
            # set the backward peak before the gated op's own allocations).
            grad_out = randn(tokens, inter, g=g, dtype=torch.bfloat16)
            runs = {}
            for overwrite in (False, True):
                x = x0.clone().requires_grad_(True)
                w = w0.clone().requires_grad_(True)
                if packed:
                    inputs = (x @ w.t(),)
                    out = forward_rewrite.gated_mlp_act_packed(
                        *inputs, activation=activation, overwrite_inputs=overwrite
                    )
                else:
                    inputs = (x @ w[:inter].t(), x @ w[inter:].t())
                    out = forward_rewrite.gated_mlp_act(
                        *inputs, activation=activation, overwrite_inputs=overwrite
                    )
                # The allocating run's input gradients, for comparison, from a pass of
                # their own (retain_grad() would clone them into both measured runs and
                # hide the saving).
                kept = None
                if not overwrite:
                    kept = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
                versions = [t._version for t in inputs]
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                out.backward(grad_out)
                peak = (
                    torch.cuda.max_memory_allocated() - base if DEVICE == "cuda" else 0
                )
                runs[overwrite] = (x.grad, w.grad, kept or inputs, versions, peak)
            (xa, wa, kept, _, peak_a), (xb, wb, over, vers, peak_b) = (
                runs[False],
                runs[True],
            )
            same = torch.equal(xa, xb) and torch.equal(wa, wb)
            written = all(torch.equal(o, k) for o, k in zip(over, kept))
            moved = all(t._version > v for t, v in zip(over, vers))
            name = (
                f"overwrite_inputs {'packed' if packed else 'two-tensor'} {activation}"
            )
            print(
                f"{name}: grads {'bit-identical' if same else 'DIFFERENT'}, inputs hold "
                f"their gradients: {written}, versions moved: {moved} | backward peak "
                f"{peak_b / 2**20:.0f} MiB vs {peak_a / 2**20:.0f} MiB allocating",
                flush=True,
            )
            if not (same and written and moved):
                fail(f"{name}: wrong gradients or inputs")
            if DEVICE == "cuda" and peak_b >= peak_a:
                fail(f"{name}: no memory saved")


def check_errors():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(64, device=DEVICE, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    cos = torch.randn(1, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    from forward_rewrite import _fusions_cuda

    bad = {
        "weight (on the CPU)": (lambda: forward_rewrite.rms_norm(x, w.cpu()), "weight"),
        "x (float64 on CUDA)": (
            lambda: forward_rewrite.rms_norm(x.double(), w.double()),
            "x",
        ),
        "weight (wrong size)": (lambda: forward_rewrite.rms_norm(x, w[:9]), "weight"),
        "x (gated rows beyond 8192: the CUDA kernel's limit)": (
            lambda: forward_rewrite.gated_rms_norm(
                x.repeat(1, 129), x.repeat(1, 129), w.repeat(129)
            ),
            "x",
        ),
        "gate (float16 with bf16 x)": (
            lambda: forward_rewrite.gated_rms_norm(x, x.half(), w),
            "gate",
        ),
        "weight (fp16 with bf16 x, Gemma order)": (
            lambda: _fusions_cuda.rms_norm_forward(x, w.half(), 1e-6, 0.0, False),
            "weight",
        ),
        "x (non-contiguous, backend)": (
            lambda: _fusions_cuda.rms_norm_forward(
                x.t().contiguous().t(), w, 1e-6, 0.0, True
            ),
            "x",
        ),
        "cos (fp16 with bf16 q and out, backend)": (
            lambda: _fusions_cuda.rotary(
                q,
                k,
                cos[:, None].half(),
                cos[:, None].half(),
                64,
                False,
                1,
                q.dtype,
                False,
            ),
            "cos",
        ),
        "k (heads x other dims)": (
            lambda: forward_rewrite.rotary(q, k[:, :, :4], cos, cos),
            "k",
        ),
        "cos (does not broadcast)": (
            lambda: forward_rewrite.rotary(
                q, k, cos.expand(3, 8, 64), cos.expand(3, 8, 64)
            ),
            "cos",
        ),
        "sin (on the CPU)": (
            lambda: forward_rewrite.rotary(q, k, cos, cos.cpu()),
            "sin",
        ),
        "rotary_dim (odd)": (
            lambda: forward_rewrite.rotary(q, k, cos, cos, rotary_dim=63),
            "rotary_dim",
        ),
        "residual (on the CPU)": (
            lambda: forward_rewrite.add_rms_norm(x.cpu(), x, w),
            "residual",
        ),
        "residual (dtype)": (
            lambda: forward_rewrite.add_rms_norm(x.float(), x, w),
            "residual",
        ),
        "residual (shape)": (
            lambda: forward_rewrite.add_rms_norm(x[:2], x, w),
            "residual",
        ),
        "up (dtype)": (lambda: forward_rewrite.gated_mlp_act(x, x.float()), "up"),
        "activation": (
            lambda: forward_rewrite.gated_mlp_act(x, x, activation="relu"),
            "activation",
        ),
        "gate (backend, column stride)": (
            lambda: _fusions_cuda.gated_act(x.t(), x.t(), GateFn()),
            "gate",
        ),
        "dw_partial (too few rows, native)": (
            lambda: _native.cuda_rms_norm_backward(
                device=x.device.index or 0,
                stream=torch.cuda.current_stream().cuda_stream,
                dy=x.data_ptr(),
                x=x.data_ptr(),
                weight=w.data_ptr(),
                rstd=w.data_ptr(),
                dx=x.data_ptr(),
                dw=w.data_ptr(),
                dw_partial=w.data_ptr(),
                partial_rows=0,
                rows=4,
                hidden=64,
                x_dtype="bfloat16",
                w_dtype="bfloat16",
                y_dtype="bfloat16",
                offset=0.0,
                cast_before=True,
            ),
            "dw_partial",
        ),
    }
    if DEVICE != "cuda":  # the smoke run: only what the CPU refuses too
        bad = {
            k: v
            for k, v in bad.items()
            if not any(w in k for w in ("CPU", "CUDA", "backend", "native"))
        }
    for what, (call, name) in bad.items():
        try:
            call()
        except (TypeError, ValueError) as e:
            if not str(e).startswith(name):
                fail(f"bad {what}: the error names the wrong argument: {e}")
                print(f"FAIL bad {what}: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            fail(f"bad {what}: {type(e).__name__} instead of TypeError/ValueError: {e}")
            print(f"FAIL bad {what}: {type(e).__name__}: {e}")
            continue
        fail(f"no error for bad {what}")
        print(f"FAIL no error for bad {what}")
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # the context still works after every refusal
    print(
        f"bad arguments: {len(bad)} cases, Python errors naming the argument",
        flush=True,
    )


def main():
    global ARGS, DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU backend"
    )
    ap.add_argument("--tokens", type=int, default=4096)
    ARGS = ap.parse_args()
    if ARGS.smoke:
        DEVICE = "cpu"
        ARGS.tokens = 16
    else:
        from forward_rewrite import _fusions_cuda

        _fusions_cuda.set_poison(True)
        print(
            "device:",
            torch.cuda.get_device_name(),
            _native.cuda_device_info(torch.cuda.current_device()),
        )
    print("torch", torch.__version__, flush=True)
    for name, make in cases(ARGS.tokens).items():
        if ARGS.quick and not name.startswith(QUICK):
            continue
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            run(name, dtype, make)
    if not ARGS.quick:
        check_extras()
        check_overwrite()
        check_errors()
    print(f"\n{len(FAILURES)} failed" if FAILURES else "\nall checks passed")
    for f in FAILURES:
        print("  -", f)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
