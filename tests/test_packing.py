"""The packing guarantee (issue 9, item 2), on the CPU in float32: packed sequences stay
apart in every layer of a patched model, whatever ``use_cache`` is, on the mask backends
(eager, sdpa) and on a varlen backend registered through transformers'
``AttentionInterface``; the metadata is computed once per forward; bad input is refused
with its reason code or runs stock (README, "Packing")."""

import inspect
import itertools
import json
import sys
import threading

import forward_rewrite
import pytest
import torch
import transformers
from forward_rewrite import attention, packing
from forward_rewrite.packing import PackingError
from packing_cases import (
    LOGITS_TOL,
    ROUNDING,
    build,
    crosstalk,
    isolation,
    packed_batch,
    problems,
    rel,
)
from transformers import masking_utils, modeling_flash_attention_utils
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: A representative set of the classes bench/packing_sweep.py finds isolated: dense,
#: sliding-window (Mistral, Gemma 2/3, Cohere 2), chunked attention (Llama 4), attention
#: soft-capping (Gemma 2, eager), mixtures of experts (Qwen3-MoE, Mixtral), latent
#: attention (DeepSeek V3), learned absolute positions (GPT-BigCode), partial rotary
#: (GPT-NeoX, Phi), logit scaling (Granite), and a vision-language wrapper run on text
#: (Llava).
CLASSES = [
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Cohere2ForCausalLM",
    "Llama4ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV3ForCausalLM",
    "GPTNeoXForCausalLM",
    "PhiForCausalLM",
    "GPTBigCodeForCausalLM",
    "GraniteForCausalLM",
    "LlavaForConditionalGeneration",
]
#: Classes whose tiny model has no sdpa (transformers refuses it for them).
EAGER_ONLY = {"Gemma2ForCausalLM"}

VARLEN = "forward_rewrite_test_varlen"


@pytest.fixture(autouse=True)
def stock_afterwards():
    forward_rewrite.uninstall()
    yield
    forward_rewrite.uninstall()


def patched(model):
    forward_rewrite.patch_model(model)
    return model


# -------------------------------------------------------------------- isolation


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("name", CLASSES)
def test_packed_sequences_are_isolated(name, backend):
    if backend == "sdpa" and name in EAGER_ONLY:
        pytest.skip("transformers has no sdpa for this class")
    model = patched(build(getattr(transformers, name), backend))
    errors = isolation(model)
    assert problems(errors) == [], errors
    assert errors["fused"], "the packed training step did not take the fused path"
    assert crosstalk(model) <= ROUNDING
    report = forward_rewrite.audit()["classes"]
    runtime = [c["packing_runtime"] for c in report if c["qualname"] == name]
    assert runtime[0]["path"] == "mask" and runtime[0]["backend"] == backend
    assert runtime[0]["syncs_per_forward"] == 1 and runtime[0]["masks_per_forward"] >= 1


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_stock_leaks_and_patched_does_not(backend):
    """The bug: with use_cache at its default, stock transformers lets a packed sequence
    attend to the ones before it. This test fails on stock."""
    model = build(transformers.LlamaForCausalLM, backend)
    stock = isolation(model, with_labels=False)
    assert stock["logits_eval"] > 1e-2 and stock["logits_train"] > 1e-2, stock
    assert crosstalk(model) > 1e-2
    patched(model)
    errors = isolation(model, with_labels=False)
    assert problems(errors) == [], errors
    assert crosstalk(model) <= ROUNDING


@pytest.mark.parametrize("use_cache", [True, False])
def test_isolated_whatever_use_cache_is(use_cache):
    model = patched(build(transformers.MistralForCausalLM, "sdpa")).eval()
    inputs, segments = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            use_cache=use_cache,
        )
        assert (out.past_key_values is not None) == use_cache
        for r, s, n in segments:
            alone = model(input_ids=inputs["input_ids"][r : r + 1, s : s + n]).logits
            assert rel(out.logits[r, s : s + n], alone[0]) <= LOGITS_TOL


def test_an_all_ones_mask_is_no_mask():
    model = patched(build(transformers.LlamaForCausalLM, "sdpa")).eval()
    inputs, _ = packed_batch(model.config.vocab_size)
    ids, pos = inputs["input_ids"], inputs["position_ids"]
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos).logits
        got = model(
            input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)
        )
    assert torch.equal(got.logits, want)


def test_isolated_with_gradient_checkpointing():
    model = patched(build(transformers.LlamaForCausalLM, "sdpa"))
    model.activation_checkpointing_enable()
    errors = isolation(model)
    assert problems(errors) == [], errors


def test_torch_compile_keeps_the_guarantee():
    """Dynamo traces the wrapper (graph breaks at the one read-back) and the masking
    hook; the compiled forward gives the eager patched logits."""
    model = patched(build(transformers.LlamaForCausalLM, "sdpa")).eval()
    inputs, _ = packed_batch(model.config.vocab_size)
    ids, pos = inputs["input_ids"], inputs["position_ids"]
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos).logits
        got = torch.compile(model, backend="eager")(input_ids=ids, position_ids=pos)
    assert torch.allclose(got.logits, want, rtol=1e-6, atol=1e-6)


def test_the_stock_mask_detection_never_runs_in_a_packed_forward(monkeypatch):
    """transformers' own detection reads back a value (a sync) per mask; the packed
    forward already knows the answer."""
    calls = []
    original = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(
        masking_utils,
        "find_packed_sequence_indices",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    facts = count_calls(monkeypatch, packing, "_facts")
    model = patched(build(transformers.Gemma3ForCausalLM, "sdpa")).eval()
    inputs, _ = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    assert calls == [] and facts == [1]
    runtime = packing.report(transformers.Gemma3ForCausalLM)
    assert runtime["masks_per_forward"] == 2  # full and sliding: one each per forward


# ------------------------------------------------------------- the varlen path


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


#: What the test backend received, one entry per attention call.
RECEIVED = []


def varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """Varlen attention per segment in plain torch: the segments are those of
    ``cu_seq_lens_q`` over the flattened batch; without it each row is one sequence (what
    a flash kernel does without metadata). Causal, with the layer's sliding window and
    soft-cap, grouped-query heads repeated."""
    RECEIVED.append(
        {
            "cu_seq_lens_q": cu_seq_lens_q,
            "cu_seq_lens_k": cu_seq_lens_k,
            "max_length_q": max_length_q,
            "max_length_k": max_length_k,
            "attention_mask": attention_mask,
        }
    )
    b, h, length, _ = query.shape
    groups = h // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    q, k, v = (
        x.transpose(0, 1).reshape(h, b * length, -1) for x in (query, key, value)
    )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if cu_seq_lens_q is None:
        cu = [r * length for r in range(b + 1)]
    else:
        assert torch.equal(cu_seq_lens_q, cu_seq_lens_k)
        cu = cu_seq_lens_q.tolist()
    out = torch.empty(h, b * length, v.shape[-1], dtype=q.dtype)
    for start, end in itertools.pairwise(cu):
        scores = (q[:, start:end] @ k[:, start:end].transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(end - start)
        allowed = i[None, :] <= i[:, None]
        if sliding_window is not None:
            allowed &= (i[:, None] - i[None, :]) < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, start:end] = scores.softmax(-1) @ v[:, start:end]
    return out.reshape(h, b, length, -1).permute(1, 2, 0, 3), None


@pytest.fixture
def varlen_backend():
    transformers.AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, masking_utils.flash_attention_mask)
    attention.register(VARLEN, like="flash_attention_2", needs_dtype_cast=False)
    RECEIVED.clear()
    yield VARLEN
    attention.unregister(VARLEN)
    ALL_ATTENTION_FUNCTIONS._global_mapping.pop(VARLEN, None)
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(VARLEN, None)
    RECEIVED.clear()


@pytest.mark.parametrize(
    "name", ["LlamaForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM"]
)
def test_the_varlen_path_is_isolated(varlen_backend, name):
    cls = getattr(transformers, name)
    model = build(cls, varlen_backend)
    stock = isolation(model, with_labels=False)
    assert stock["logits_eval"] > 1e-2, "stock gives the backend no metadata"
    errors = isolation(patched(model))
    assert problems(errors) == [], errors
    assert crosstalk(model) <= ROUNDING
    assert packing.report(cls)["path"] == "varlen"


def test_the_varlen_metadata_is_computed_once_per_forward(varlen_backend, monkeypatch):
    metadata = count_calls(monkeypatch, packing, "_varlen_metadata")
    facts = count_calls(monkeypatch, packing, "_facts")
    stock_metadata = count_calls(
        monkeypatch,
        modeling_flash_attention_utils,
        "prepare_fa_kwargs_from_position_ids",
    )
    model = patched(build(transformers.LlamaForCausalLM, varlen_backend))
    layers = model.config.num_hidden_layers
    assert layers >= 2
    inputs, _ = packed_batch(model.config.vocab_size)
    model.train()
    out = model(**inputs)
    out.loss.backward()
    assert (len(metadata), len(facts), len(stock_metadata)) == (1, 1, 0)
    assert len(RECEIVED) == layers
    first = RECEIVED[0]
    assert all(r["cu_seq_lens_q"] is first["cu_seq_lens_q"] for r in RECEIVED)
    assert first["cu_seq_lens_q"].tolist() == [0, 5, 12, 16, 22, 32]
    assert first["cu_seq_lens_q"].dtype == torch.int32
    assert first["max_length_q"] == first["max_length_k"] == 10
    assert type(first["max_length_q"]) is int
    assert all(r["attention_mask"] is None for r in RECEIVED)


def test_the_collators_metadata_is_used_without_reading_anything_back(
    varlen_backend, monkeypatch
):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes the metadata:
    zero syncs, and the layers get the collator's tensors."""
    facts = count_calls(monkeypatch, packing, "_facts")
    metadata = count_calls(monkeypatch, packing, "_varlen_metadata")
    model = patched(build(transformers.LlamaForCausalLM, varlen_backend)).eval()
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    g = torch.Generator().manual_seed(3)
    features = [
        {"input_ids": torch.randint(3, 100, (n,), generator=g).tolist()}
        for n in (5, 7, 4)
    ]
    batch = collator(features)
    assert batch["position_ids"].shape == (1, 16)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert (facts, metadata) == ([], [])
    assert RECEIVED[0]["cu_seq_lens_q"] is batch["cu_seq_lens_q"]
    assert packing.report(transformers.LlamaForCausalLM)["syncs_per_forward"] == 0
    start = 0
    for f in features:
        n = len(f["input_ids"])
        alone = model(input_ids=torch.tensor([f["input_ids"]])).logits
        assert rel(out.logits[0, start : start + n], alone[0]) <= LOGITS_TOL
        start += n


def test_each_batch_gets_its_own_metadata(varlen_backend):
    model = patched(build(transformers.LlamaForCausalLM, varlen_backend)).eval()
    vocab = model.config.vocab_size
    with torch.no_grad():
        for lengths, cu in (
            (((5, 7, 4),), [0, 5, 12, 16]),
            (((2, 14),), [0, 2, 16]),
            (((8, 8),), [0, 8, 16]),
        ):
            RECEIVED.clear()
            inputs, _ = packed_batch(vocab, lengths=lengths)
            model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
            assert {tuple(r["cu_seq_lens_q"].tolist()) for r in RECEIVED} == {tuple(cu)}


def test_threads_do_not_share_packed_state():
    model = patched(build(transformers.LlamaForCausalLM, "sdpa")).eval()
    vocab = model.config.vocab_size
    cases = [
        packed_batch(vocab, seed=s, lengths=lengths)[0]
        for s, lengths in (
            (1, ((5, 7, 4),)),
            (2, ((16,),)),
            (3, ((3, 3, 10),)),
            (4, ((1, 15),)),
        )
    ]
    with torch.no_grad():
        want = [
            model(input_ids=c["input_ids"], position_ids=c["position_ids"]).logits
            for c in cases
        ]
    got = [None] * len(cases)
    errors = []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(5):
                    got[i] = model(
                        input_ids=cases[i]["input_ids"],
                        position_ids=cases[i]["position_ids"],
                    ).logits
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------- backends that cannot


def test_a_backend_that_cannot_pack_is_named_with_what_to_use():
    model = patched(build(transformers.LlamaForCausalLM, "eager")).eval()
    model.config._attn_implementation = "paged|eager"
    inputs, _ = packed_batch(model.config.vocab_size)
    with pytest.raises(PackingError) as info:
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    assert info.value.reason == "backend-cannot-pack"
    message = str(info.value)
    assert "'paged|eager'" in message
    for usable in ("sdpa", "flex_attention", "flash_attention_2"):
        assert usable in message
    entry = packing.report(transformers.LlamaForCausalLM)
    assert entry["last_error"] == "backend-cannot-pack"


def test_an_unknown_hub_kernel_cannot_pack():
    model = patched(build(transformers.LlamaForCausalLM, "eager")).eval()
    model.config._attn_implementation = "someone/attention-kernel"
    inputs, _ = packed_batch(model.config.vocab_size)
    with pytest.raises(PackingError, match="someone/attention-kernel") as info:
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    assert info.value.reason == "backend-cannot-pack"


def test_a_backend_registered_only_with_transformers_is_unknown():
    transformers.AttentionInterface.register("undeclared_backend", varlen_attention)
    try:
        model = patched(build(transformers.LlamaForCausalLM, "undeclared_backend"))
        inputs, _ = packed_batch(model.config.vocab_size)
        with pytest.raises(PackingError, match="attention.register") as info:
            model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
        assert info.value.reason == "backend-unknown"
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop("undeclared_backend", None)


def test_a_model_whose_masks_ignore_position_ids_is_refused_loudly():
    """GPT-OSS builds its masks without position_ids: transformers cannot see the
    boundaries there even without a cache; the packed forward raises instead of
    training across documents: before it runs when the rewriter's static verdict says
    so, after it (``mask-not-built``, the run time's own check) when there is none
    (a compiled cache's report)."""
    model = patched(build(transformers.GptOssForCausalLM, "eager"))
    inputs, _ = packed_batch(model.config.vocab_size)
    with pytest.raises(PackingError) as info:
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    assert info.value.reason == "packing-mask-without-position-ids"
    forward_rewrite.uninstall()
    cls = transformers.GptOssForCausalLM
    wrapped = packing.wrap_forward(cls.forward, cls, static=None)
    with pytest.raises(PackingError) as info:
        wrapped(
            model, input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]
        )
    assert info.value.reason == "mask-not-built"


def test_encoder_states_with_packed_input_are_refused(llama):
    """The packed mask describes self-attention: a packed call that also passes encoder
    states (GPT-2 / GPT-BigCode with add_cross_attention) raises."""
    inputs, _ = packed_batch(llama.config.vocab_size)
    forward_rewrite.patch_model(llama)
    try:
        with pytest.raises(PackingError) as info:
            llama(
                input_ids=inputs["input_ids"],
                position_ids=inputs["position_ids"],
                encoder_hidden_states=torch.zeros(1, 3, llama.config.hidden_size),
            )
        assert info.value.reason == "encoder-states-given"
    finally:
        forward_rewrite.uninstall()


def test_a_forward_without_position_ids_is_refused():
    """Bloom's forward has no position_ids: they would land in **kwargs, unused."""
    model = patched(build(transformers.BloomForCausalLM, "eager")).eval()
    inputs, _ = packed_batch(model.config.vocab_size)
    with pytest.raises(PackingError) as info:
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    assert info.value.reason == "position-ids-not-taken"


def test_the_rewriters_static_verdict_is_obeyed(varlen_backend):
    """ARCHITECTURE.md, contract 6: a packed forward of a refused class raises with the
    static reason (never leaks silently), an unpacked one runs as called; a class whose
    verdict allows only the mask path refuses a packed forward on a varlen backend."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        return "stock"

    model = build(transformers.LlamaForCausalLM, varlen_backend).eval()
    inputs, _ = packed_batch(model.config.vocab_size)
    refused = {"verdict": "refused", "reason": "packing-recurrent-layers", "paths": []}
    mask_only = {
        "verdict": "guaranteed",
        "reason": "packing-kwargs-not-to-attention",
        "paths": ["mask"],
    }
    for static in (refused, mask_only):
        wrapped = packing.wrap_forward(forward, transformers.LlamaForCausalLM, static)
        with pytest.raises(PackingError) as info:
            wrapped(
                model,
                input_ids=inputs["input_ids"],
                position_ids=inputs["position_ids"],
            )
        assert info.value.reason == static["reason"]
        assert wrapped(model, input_ids=inputs["input_ids"]) == "stock"


def test_install_obeys_the_static_verdict_of_a_recurrent_hybrid():
    """install() hands the packing pass's verdict to the wrapper: Jamba's Mamba layers
    carry state across sequences, so a packed forward raises before it trains on a leak."""
    import transformers.models.jamba.modeling_jamba
    import transformers.models.llama.modeling_llama  # noqa: F401

    forward_rewrite.install()
    try:
        entry = next(
            c
            for c in forward_rewrite.audit()["classes"]
            if c["qualname"] == "JambaForCausalLM"
        )
        assert entry["verdict"] == "patched"
        # the first failing fact: Jamba's hybrid layers also get their masks elsewhere
        assert entry["passes"]["packing"]["verdict"] == "refused"
        assert entry["passes"]["packing"]["reason"] in {
            "packing-recurrent-layers",
            "packing-mask-not-from-masking-utils",
        }
        llama = next(
            c
            for c in forward_rewrite.audit()["classes"]
            if c["qualname"] == "LlamaForCausalLM"
        )
        assert llama["passes"]["packing"]["verdict"] == "guaranteed"
    finally:
        forward_rewrite.uninstall()


# -------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def llama():
    forward_rewrite.uninstall()
    model = build(transformers.LlamaForCausalLM, "sdpa").eval()
    yield model


def call(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


IDS = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "positions",
    [
        [0, 1, 2, 0, 2, 3, 4, 5],  # a restart, then a jump
        [1, 2, 3, 0, 1, 2, 3, 4],  # the row does not start at 0
        [0, 1, 1, 2, 0, 1, 2, 3],  # a repeat
    ],
)
def test_position_ids_that_do_not_restart_cleanly_are_refused(llama, positions):
    patched(llama)
    with pytest.raises(PackingError) as info:
        call(llama, input_ids=IDS, position_ids=torch.tensor([positions]))
    assert info.value.reason == "bad-position-ids"


def test_mismatched_lengths_are_refused(llama):
    patched(llama)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.raises(PackingError) as info:
        call(llama, input_ids=IDS, position_ids=pos)
    assert info.value.reason == "length-mismatch"
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with pytest.raises(PackingError) as info:
        call(llama, input_ids=IDS, position_ids=pos, attention_mask=torch.ones(1, 7))
    assert info.value.reason == "length-mismatch"


def test_a_padding_mask_that_contradicts_the_positions_is_refused(llama):
    """Packed sequences then padding: transformers ignores position restarts when a
    padding mask is given, so the sequences would see each other."""
    patched(llama)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    with pytest.raises(PackingError) as info:
        call(llama, input_ids=IDS, position_ids=pos, attention_mask=mask)
    assert info.value.reason == "mask-contradicts-positions"


def test_incomplete_varlen_kwargs_are_refused(llama):
    patched(llama)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(PackingError) as info:
        call(llama, input_ids=IDS, position_ids=pos, cu_seq_lens_q=cu)
    assert info.value.reason == "varlen-kwargs-incomplete"
    full = {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": 5,
        "max_length_k": 5,
    }
    with pytest.raises(PackingError) as info:
        call(llama, input_ids=IDS, **full)
    assert info.value.reason == "varlen-kwargs-incomplete"


def stock_and_patched(model, **inputs):
    forward_rewrite.uninstall()
    want = call(model, **inputs).logits
    patched(model)
    return call(model, **inputs).logits, want


@pytest.mark.parametrize(
    "inputs",
    [
        # left padding, positions as generate() makes them: restarts follow a pad
        {
            "position_ids": torch.tensor([[1, 1, 0, 1, 2, 3, 4, 5]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]),
        },
        # one sequence per row, explicit positions
        {"position_ids": torch.arange(8)[None]},
        # one sequence not starting at 0 (a continuation)
        {"position_ids": torch.arange(8)[None] + 3},
        # a 4D mask is the caller's
        {
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]),
            "attention_mask": torch.tril(torch.ones(8, 8, dtype=torch.bool))[
                None, None
            ],
        },
    ],
    ids=["left-padding", "not-packed", "offset", "4d-mask"],
)
def test_input_that_is_not_packed_runs_stock(llama, inputs):
    got, want = stock_and_patched(llama, input_ids=IDS, **inputs)
    assert torch.equal(got, want)
    assert packing.report(transformers.LlamaForCausalLM) is None


def test_a_cache_passed_in_runs_stock(llama):
    """A cache means decoding (or continuous batching): not a packed training forward."""
    cache = transformers.DynamicCache(config=llama.config)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    patched(llama)
    call(llama, input_ids=IDS, position_ids=pos, past_key_values=cache)
    assert packing.report(transformers.LlamaForCausalLM) is None


def test_generate_is_unchanged(llama):
    prompt = IDS[:, :4]
    forward_rewrite.uninstall()
    want = llama.generate(prompt, max_new_tokens=4, do_sample=False)
    patched(llama)
    got = llama.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


# -------------------------------------------------------------- the wrapper, audit


def test_the_wrapper_keeps_the_forwards_signature_and_marks():
    model = patched(build(transformers.LlamaForCausalLM, "sdpa"))
    forward = type(model).forward
    assert "position_ids" in inspect.signature(forward).parameters
    assert forward.__forward_rewrite__["head"] == "lm_head"
    assert forward.__qualname__ == "LlamaForCausalLM.forward"
    assert forward.__forward_rewrite_packing__ is True


def test_the_audit_says_what_the_runtime_learned():
    model = patched(build(transformers.LlamaForCausalLM, "sdpa")).eval()
    inputs, _ = packed_batch(model.config.vocab_size)
    call(model, input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    call(model, input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    doc = forward_rewrite.audit()
    json.dumps(doc)
    entry = next(c for c in doc["classes"] if c["qualname"] == "LlamaForCausalLM")
    assert entry["packing_runtime"] == {
        "packed_forwards": 2,
        "backend": "sdpa",
        "path": "mask",
        "metadata": "position_ids",
        "masks_per_forward": 1,
        "syncs_per_forward": 1,
        "last_error": None,
    }
    forward_rewrite.uninstall()
    assert masking_utils._preprocess_mask_arguments is not packing._preprocess_hook
    assert sys.modules["forward_rewrite"].audit()["classes"] == []
