"""The rotary forms of other signatures than Llama's, patched by the ``rotary`` pass and put in
place by ``install()``: GPT-J's and CodeGen's ``(tensor, sin, cos)`` on tables of one entry
per pair, Qwen4-Exp's optional k, CLVP's q, k and v on tables indexed by the positions,
DeepSeek-V4's trailing rope slice. Each patched function gives stock's outputs and every
gradient (the tables' too) in float32 and runs the fused op; inputs the op would compute
otherwise than stock run stock."""

import forward_rewrite
import pytest
import torch
from forward_rewrite import fusion_guard

#: float32 outputs and gradients: stock's within this (the op computes in float32 too).
TOL = 1e-6


@pytest.fixture(autouse=True)
def stock_afterwards():
    forward_rewrite.uninstall()
    yield
    forward_rewrite.uninstall()


def _site(qualname):
    entry = next(
        c for c in forward_rewrite.audit()["classes"] if c["qualname"] == qualname
    )
    return entry["passes"]["rotary"]["sites"][0]


def _patched(module, qualname, form, tmp_path):
    """The module's stock and patched ``apply_rotary_pos_emb`` (the rotary pass installed),
    the site lowered as ``form``."""
    stock = module.apply_rotary_pos_emb
    forward_rewrite.install(cache_dir=tmp_path, passes=("rotary",))
    site = _site(qualname)
    assert site["installed"], site
    assert site["lowered"]["form"] == form, site
    patched = module.apply_rotary_pos_emb
    assert patched is not stock
    return stock, patched


def _run(fn, tensors, **kwargs):
    """The outputs of ``fn(*tensors, **kwargs)`` (a tuple) and the gradient of every tensor
    under fixed random output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(3)
    total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out)
    grads = torch.autograd.grad(total, leaves)
    return tuple(o.detach() for o in out), grads


def _same(stock, patched, tensors, fused, **kwargs):
    """Patched equals stock (outputs, dtypes and gradients), and took the fused path
    ``fused`` times."""
    want, want_grads = _run(stock, tensors, **kwargs)
    before = fusion_guard.taken["rotary"]
    got, got_grads = _run(patched, tensors, **kwargs)
    assert fusion_guard.taken["rotary"] == before + fused
    assert [o.dtype for o in got] == [o.dtype for o in want]
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(
            a, b, rtol=0, atol=TOL, msg=lambda m, i=i: f"{i}: {m}"
        )


def _stock_error(fn, *args):
    with pytest.raises(Exception) as info:  # whatever stock raises
        fn(*args)
    return type(info.value)


# ----------------------------------------------------------- GPT-J, CodeGen: (tensor, sin, cos)


def test_interleaved_op_on_pair_tables_repeated_is_gptj_rotation():
    """The op's table convention for ``interleaved=True`` (one entry per element) is GPT-J's
    tables repeated per pair: float32 bit for bit; bfloat16 (stock rounds each product) the
    float32 computation rounded once; float32 tables with bfloat16 x promote like stock."""
    from transformers.models.gptj import modeling_gptj

    torch.manual_seed(0)
    for dtype, table_dtype in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ]:
        x = torch.randn(2, 5, 3, 8, dtype=dtype)
        sin, cos = (
            torch.randn(2, 5, 4, dtype=table_dtype),
            torch.randn(2, 5, 4, dtype=table_dtype),
        )
        got = forward_rewrite.rotary_single(
            x,
            cos.repeat_interleave(2, dim=-1),
            sin.repeat_interleave(2, dim=-1),
            unsqueeze_dim=2,
            interleaved=True,
        )
        want = modeling_gptj.apply_rotary_pos_emb(x, sin, cos)
        assert got.dtype == want.dtype
        if want.dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            once = modeling_gptj.apply_rotary_pos_emb(
                x.float(), sin.float(), cos.float()
            )
            torch.testing.assert_close(got, once.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("module_name", "qualname"),
    [("gptj", "GPTJForCausalLM"), ("codegen", "CodeGenForCausalLM")],
)
def test_gptj_sin_cos_form_matches_stock(module_name, qualname, tmp_path):
    """``apply_rotary_pos_emb(tensor, sin, cos)``: the tables of one entry per pair repeated
    per pair, unsqueezed at 2, rotated by ``rotate_every_two``; lowered to ``rotary_single``
    with ``interleaved=True``. A tensor wider than the repeated tables (stock fails to
    broadcast; the op would pass the tail through) runs stock."""
    import importlib

    module = importlib.import_module(
        f"transformers.models.{module_name}.modeling_{module_name}"
    )
    stock, patched = _patched(module, qualname, "sin-cos-pairs", tmp_path)
    torch.manual_seed(0)
    for x_shape, table in [((2, 5, 3, 8), (2, 5, 4)), ((2, 5, 3, 8), (1, 5, 4))]:
        x = torch.randn(x_shape)
        sin, cos = torch.randn(table), torch.randn(table)
        _same(stock, patched, (x, sin, cos), 1)
    # the attention's float32 tables with a bfloat16 tensor (CodeGen): promoted like stock
    x = torch.randn(2, 5, 3, 8, dtype=torch.bfloat16)
    sin, cos = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    want = stock(x, sin, cos)
    got = patched(x.requires_grad_(), sin, cos)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # wider than the tables: stock's error
    x = torch.randn(2, 5, 3, 12, requires_grad=True)
    sin, cos = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    before = dict(fusion_guard.taken)
    assert _stock_error(patched, x, sin, cos) is _stock_error(stock, x, sin, cos)
    assert fusion_guard.taken == before


# ----------------------------------------------------------------- Qwen4-Exp: optional k


def test_qwen4_exp_optional_k_partial_form_matches_stock(tmp_path):
    """``apply_rotary_pos_emb(q, k=None, cos=None, sin=None, unsqueeze_dim=1)``, partial:
    ``rotary`` of q and k when k is given, ``rotary_single`` of q when it is None (the
    indexer's calls), the tail past ``cos.shape[-1]`` passing through; tables of another
    dtype promote the whole head as stock's concatenation does."""
    from transformers.models.qwen4_exp import modeling_qwen4_exp

    stock, patched = _patched(
        modeling_qwen4_exp, "Qwen4ExpForCausalLM", "optional-k-partial", tmp_path
    )
    torch.manual_seed(0)
    for q_shape, k_shape, table, unsqueeze_dim in [
        ((2, 4, 5, 12), (2, 2, 5, 12), (2, 5, 8), 1),  # partial
        ((2, 4, 5, 8), (2, 2, 5, 8), (1, 5, 8), 1),  # full
        ((2, 5, 4, 12), (2, 5, 2, 12), (2, 5, 6), 2),
    ]:
        q, k = torch.randn(q_shape), torch.randn(k_shape)
        cos, sin = torch.randn(table), torch.randn(table)
        _same(stock, patched, (q, k, cos, sin), 1, unsqueeze_dim=unsqueeze_dim)

        def q_only(q, cos, sin, fn, unsqueeze_dim=unsqueeze_dim):
            return fn(q, cos=cos, sin=sin, unsqueeze_dim=unsqueeze_dim)

        _same(
            lambda *t: q_only(*t, stock),
            lambda *t: q_only(*t, patched),
            (q, cos, sin),
            1,
        )
    # bfloat16 q and k, float32 tables: float32 heads, the pass-through part too
    q = torch.randn(2, 4, 5, 12, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 5, 12, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for want, got in zip(stock(q, k, cos, sin), patched(q, k, cos, sin)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # an odd rotary width runs stock
    cos, sin = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    before = dict(fusion_guard.taken)
    q, k = torch.randn(2, 4, 5, 12, requires_grad=True), torch.randn(2, 2, 5, 12)
    for want, got in zip(stock(q, k, cos, sin), patched(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fusion_guard.taken == before


# ------------------------------------------------------------- CLVP: q, k and v, indexed tables


def test_clvp_indexed_qkv_form_matches_stock(tmp_path):
    """``apply_rotary_pos_emb(q, k, v, cos, sin, position_ids, unsqueeze_dim=1)``: the
    tables ``cos[position_ids]`` indexed once, q and k through ``rotary``, v through
    ``rotary_single``."""
    from transformers.models.clvp import modeling_clvp

    stock, patched = _patched(modeling_clvp, "ClvpForCausalLM", "indexed-qkv", tmp_path)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    cos, sin = torch.randn(7, 8), torch.randn(7, 8)
    position_ids = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])

    def call(fn):
        return lambda q, k, v, cos, sin: fn(q, k, v, cos, sin, position_ids)

    _same(call(stock), call(patched), (q, k, v, cos, sin), 2)
    # v of another dtype than q and k: stock, the fused q and k path included
    v = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    want = stock(q, k, v, cos, sin, position_ids)
    got = patched(q.requires_grad_(), k, v, cos, sin, position_ids)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_clvp_encoder_trains_like_stock_through_the_fused_path():
    """CLVP's rotary runs in its encoder (its decoder passes no rotary embedding, so
    ``check_class(ClvpForCausalLM)`` never takes it): a tiny ``ClvpEncoder``'s training
    step, loss and every gradient, equals stock's with the patched function, fused twice per
    layer (q and k, then v)."""
    from transformers import ClvpEncoderConfig
    from transformers.models.clvp import modeling_clvp

    # head_dim 64: the rotary embedding is at least 32 wide, the tail passing through
    config = ClvpEncoderConfig(
        vocab_size=50,
        hidden_size=256,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_rotary_embedding=True,
    )

    def step():
        torch.manual_seed(0)
        encoder = modeling_clvp.ClvpEncoder(config).train()
        input_ids = torch.randint(0, 50, (2, 7))
        hidden = encoder(input_ids=input_ids)[0]
        (hidden**2).mean().backward()
        return hidden.detach(), {
            n: p.grad for n, p in encoder.named_parameters() if p.grad is not None
        }

    want, want_grads = step()
    forward_rewrite.install(passes=("rotary",))
    assert _site("ClvpForCausalLM")["installed"]
    before = fusion_guard.taken["rotary"]
    got, got_grads = step()
    assert fusion_guard.taken["rotary"] == before + 2 * config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=TOL, msg=name)


# --------------------------------------------------------- DeepSeek-V4: the trailing rope slice


def test_deepseek_v4_trailing_pairs_form_matches_stock(tmp_path):
    """DeepSeek-V4's ``[nope | rope]`` heads: the last ``2 * cos.shape[-1]`` entries rotated
    on interleaved pairs in float32 with the tables repeated per pair, cast back to x's
    dtype; lowered to ``rotary_single`` of that slice, concatenated back behind the rest. A
    head narrower than the repeated tables runs stock."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    stock, patched = _patched(
        modeling_deepseek_v4, "DeepseekV4ForCausalLM", "trailing-pairs", tmp_path
    )
    torch.manual_seed(0)
    for x_shape, table, unsqueeze_dim in [
        ((2, 4, 5, 12), (2, 5, 2), 1),  # nope 8, rope 4
        ((2, 4, 5, 8), (1, 5, 4), 1),  # all rope
        ((2, 5, 4, 12), (2, 5, 3), 2),
    ]:
        x = torch.randn(x_shape)
        cos, sin = torch.randn(table), torch.randn(table)
        _same(stock, patched, (x, cos, sin), 1, unsqueeze_dim=unsqueeze_dim)
        # the inverse rotation (`-sin`) on the attention's output
        _same(
            lambda x, cos, sin, u=unsqueeze_dim: stock(x, cos, -sin, u),
            lambda x, cos, sin, u=unsqueeze_dim: patched(x, cos, -sin, u),
            (x, cos, sin),
            1,
        )
    # bfloat16 heads, float32 tables: cast back to bfloat16, float32 computation rounded once
    x = torch.randn(2, 4, 5, 12, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.randn(2, 5, 2), torch.randn(2, 5, 2)
    want, got = stock(x, cos, sin), patched(x, cos, sin)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got[..., :8], x[..., :8], rtol=0, atol=0)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0)
    # a head narrower than the repeated tables: stock's error
    x = torch.randn(2, 4, 5, 4, requires_grad=True)
    cos, sin = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    before = dict(fusion_guard.taken)
    assert _stock_error(patched, x, cos, sin) is _stock_error(stock, x, cos, sin)
    assert fusion_guard.taken == before
