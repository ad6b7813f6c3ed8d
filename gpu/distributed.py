"""Distributed and adapter training, stock against fused (issue 11): one command, one table.

    torchrun --standalone --nproc_per_node 1 gpu/distributed.py --check --json out.json
        world size 1 on one GPU (NCCL, bf16): every case, a table with each path's peak
        memory and the fused run's peak against the stock engine run's (``vs stock``)
    torchrun --standalone --nproc_per_node 2 gpu/distributed.py --check --json out.json
        the same on two GPUs (the engine cases; ``none`` cases need world size 1)
    python3 gpu/distributed.py ...                          (world size 1 without torchrun)
    torchrun --standalone --nproc_per_node 2 gpu/distributed.py --smoke --check   (CPU, gloo)

On the GPU machine through the staged folder (gpu/stage.sh): ``.gpu/gpu/run.sh
distributed`` (world size 1; ``NPROC=2`` for two GPUs; extra arguments pass through, e.g.
``--only fsdp2``), which writes ``$OUT/distributed.log`` and ``$OUT/distributed.json``.
Cases whose package (peft, deepspeed) does not import there are listed as not run.

Per case (an engine and layout, on one model): the model is built from the same seed on
every rank; a **single-process stock run** of the global batch (every rank's micro-batches,
one after the other, in one process on rank 0, no engine) is the reference; then the engine
runs the same steps twice from the same weights on the same batches: **stock** (inside
``forward_rewrite.keep_logits()``) and **fused** (the patched forward). Each step
accumulates ``--micro`` micro-batches (DDP ``no_sync``, FSDP2
``set_requires_gradient_sync(False)``, DeepSpeed's own accumulation) with
``num_items_in_batch`` the step's token count over all ranks, as ``Trainer`` does; the loss
is multiplied by the world size (the engines average gradients over ranks), so the
reference's summed gradient is the engines' exactly.

Columns: ``loss``: worst relative error of a micro-batch loss against the reference's;
``grad``: worst parameter gradient after the first step's accumulation (relative to the
tensor's largest element); ``param``: the same for every parameter after the last step;
``update``: the same for each parameter's change (``p_end - p_start``): a stricter view, but
its floor is the parameters' own rounding (float32: one ulp of a 0.07 weight against a 3e-5
update is 2e-4 of it; 16 bits: meaningless), so it is checked loosely (1e-3 in float32, not
at all in 16 bits); ``fused``/``fallback``: the
guard's decisions summed over ranks (``forward_rewrite.stats()``), ``route`` how the head
was computed; ``step ms``: mean time of a step after the first; ``peak MiB``: the largest
``max_memory_allocated`` over ranks during the run (CUDA only); ``vs stock``: the fused
run's peak over the stock engine run's.

Engines: ``ddp``; ``fsdp2-root`` (one ``fully_shard`` unit); ``fsdp2-units`` (one unit per
decoder layer, the head in its own unit: ``lm_head`` alone when untied, ``[embed_tokens,
lm_head]`` when tied, then the root); ``fsdp2-norm-head`` (transformers' plan for an untied
head: ``[norm, lm_head]`` with ``reshard_after_forward=False``); ``*-mp``: float32 parameters
with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``; ``zero2`` /
``zero3``: DeepSpeed through accelerate; ``none``: no engine (single process; with PEFT LoRA
on attention and MLP, on the head too, and gradient checkpointing). With ``--smoke`` models
are tiny and float32 on the CPU (the CI test runs this at world size 2 on gloo,
``tests/test_distributed.py``); otherwise the vocabularies are real (Llama 128256, Qwen3
151936, Gemma3 262144) and parameters bfloat16 (``-mp`` cases: float32 master weights).

``--check`` exits 1 when a fused run fell back, or when its errors exceed the float32
tolerances (loss 1e-5, gradients 1e-4, parameters 1e-5, updates 1e-3) or, in 16 bits, twice
the stock engine run's own error plus 2e-2. ``--json PATH`` writes every number (rank 0).
"""

import torch  # noqa: I001  (first: cudarc loads the CUDA libraries torch brought in)

import argparse
import contextlib
import gc
import json
import os
import re
import socket
import sys
import time

import torch.distributed as dist

import forward_rewrite
import forward_rewrite.attnres

# ------------------------------------------------------------------------ the models

_SMOKE_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}
_GPU_DECODER = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 4096,
}
#: name -> (class, config class, smoke vocabulary, real vocabulary, extra config)
MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", 160, 128256, {}),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        160,
        151936,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "output_router_logits": True,
            "router_aux_loss_coef": 0.01,
        },
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        160,
        262144,
        {"final_logit_softcapping": 3.0},
    ),
}


class Case:
    """One row pair of the table: ``model`` under ``engine`` (with ``tie``d embeddings,
    ``peft`` adapters: None, "lora" (attention and MLP; the head frozen), "lora-head" (the
    head too) or "lora-save" (``modules_to_save=["lm_head"]``: a trainable copy), gradient
    checkpointing ``gc``: None, "reentrant" or "non-reentrant"; ``attnres``: Block AttnRes
    applied (``forward_rewrite.attnres``, retrofit mode, blocks of 2 sublayers), in the
    engine run and the reference alike, so its pseudo-queries train under the engine)."""

    def __init__(self, model, engine, *, tie=False, peft=None, gc=None, attnres=False):
        self.model, self.engine, self.tie, self.peft, self.gc = (
            model,
            engine,
            tie,
            peft,
            gc,
        )
        self.attnres = attnres

    @property
    def name(self):
        parts = [self.engine, self.model, "tied" if self.tie else "untied"]
        if self.peft:
            parts.append(f"peft-{self.peft}")
        if self.gc:
            parts.append(f"gc-{self.gc}")
        if self.attnres:
            parts.append("attnres")
        return "/".join(parts)

    @property
    def mixed_precision(self):
        return self.engine.endswith("-mp")


def default_cases():
    cases = []
    for model, default_tie in (
        ("llama", False),
        ("qwen3_moe", False),
        ("gemma3", True),
    ):
        cases.append(Case(model, "ddp", tie=default_tie))
        for tie in (False, True):
            cases.append(Case(model, "fsdp2-root", tie=tie))
            cases.append(Case(model, "fsdp2-units", tie=tie))
    cases += [
        Case("llama", "fsdp2-norm-head"),
        Case("llama", "fsdp2-units-mp"),
        Case("gemma3", "fsdp2-units-mp", tie=True),
        Case("llama", "ddp", peft="lora"),
        Case("llama", "ddp", peft="lora-head"),
        Case("llama", "none", peft="lora"),
        Case("llama", "none", peft="lora-head"),
        Case("gemma3", "none", tie=True, peft="lora-head"),
        Case("llama", "none", peft="lora-save"),
        Case("llama", "none", gc="non-reentrant"),
        Case("llama", "none", gc="reentrant"),
        Case("llama", "none", peft="lora", gc="reentrant"),
        # AttnRes: its pseudo-queries are parameters of each layer (sharded with the layer's
        # unit) and of the base model (the root unit); its state flows between layers as
        # explicit tensors, so checkpointing recomputes it.
        Case("llama", "fsdp2-units", attnres=True),
        Case("llama", "ddp", attnres=True),
        Case("llama", "none", gc="non-reentrant", attnres=True),
        Case("llama", "zero2"),
        Case("llama", "zero3"),
        Case("gemma3", "zero3", tie=True),
    ]
    return cases


class Settings:
    def __init__(self, smoke, steps, micro, device, world, rank, dtype=None):
        self.smoke = smoke
        self.steps = steps
        self.micro = micro
        self.device = device
        self.world = world
        self.rank = rank
        self.dtype = dtype or (torch.float32 if smoke else torch.bfloat16)
        self.batch, self.seq = (2, 24) if smoke else (4, 1024)
        self.lr = 0.1 if smoke else 1e-2
        self.momentum = 0.9


def build(case, s):
    """The model of ``case`` from seed 0, on ``s.device``, in train mode, patched."""
    import transformers

    class_name, config_name, smoke_vocab, vocab, extra = MODELS[case.model]
    decoder = _SMOKE_DECODER if s.smoke else _GPU_DECODER
    config = getattr(transformers, config_name)(
        vocab_size=smoke_vocab if s.smoke else vocab,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=case.tie,
        **decoder,
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    dtype = torch.float32 if case.mixed_precision else s.dtype
    model = model.to(device=s.device, dtype=dtype).train()
    forward_rewrite.patch_model(model)
    if case.attnres:
        forward_rewrite.attnres.apply(model, block_size=2, mode="retrofit")
    if case.gc:
        kwargs = {"use_reentrant": case.gc == "reentrant"}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.23+
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs
            )
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if case.peft:
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        targets += ["gate_proj", "up_proj", "down_proj"]
        if case.peft == "lora-head":
            targets.append("lm_head")
        save = ["lm_head"] if case.peft == "lora-save" else None
        config = peft.LoraConfig(
            r=8,
            lora_alpha=16,
            # Dropout on: the fused LoRA head draws the adapter's dropout mask in stock's
            # order, so the runs agree exactly (per-micro-batch seeds).
            lora_dropout=0.1,
            target_modules=targets,
            modules_to_save=save,
            # Random A and B (B = 0 would make A's first gradient zero).
            init_lora_weights=False,
        )
        torch.manual_seed(1)
        model = peft.get_peft_model(model, config)
        if case.gc == "reentrant":
            model.enable_input_require_grads()
        model.to(device=s.device)
    return model


def make_batch(vocab, s, seed):
    """input_ids, attention_mask (right padding in row 1) and labels with ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (s.batch, s.seq), generator=g)
    mask = torch.ones(s.batch, s.seq, dtype=torch.long)
    pad = s.seq // 5
    mask[1, -pad:] = 0
    ids[1, -pad:] = 0
    labels = ids.clone()
    labels[0, : s.seq // 4] = -100
    labels[mask == 0] = -100
    return {
        "input_ids": ids.to(s.device),
        "attention_mask": mask.to(s.device),
        "labels": labels.to(s.device),
    }


def batch_seed(step, micro, rank):
    return 1000 * step + 10 * micro + rank + 1


def all_batches(case, s):
    """Every rank's micro-batches of every step, and the token count of each step."""
    vocab = MODELS[case.model][2 if s.smoke else 3]
    batches = {
        (st, m, r): make_batch(vocab, s, batch_seed(st, m, r))
        for st in range(s.steps)
        for m in range(s.micro)
        for r in range(s.world)
    }
    items = []
    for st in range(s.steps):
        count = sum(
            int((batches[(st, m, r)]["labels"][:, 1:] != -100).sum())
            for m in range(s.micro)
            for r in range(s.world)
        )
        items.append(torch.tensor(count, device=s.device))
    return batches, items


# ------------------------------------------------------------------------ the engines


def wrap(model, case, s):
    """(module to call, module whose parameters to read, optimizer, backward, step,
    no_sync(last) context factory)."""
    engine = case.engine.removesuffix("-mp")
    if engine.startswith("zero"):
        return _deepspeed(model, case, s, stage=int(engine[-1]))
    if engine == "none":
        inner = model
    elif engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [s.device.index] if s.device.type == "cuda" else None
        inner = DistributedDataParallel(model, device_ids=ids)
    else:
        inner = _fsdp2(model, case, s, engine)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)

    def backward(loss):
        (loss * s.world).backward()

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def accumulating(last):
        if engine == "ddp" and not last:
            return inner.no_sync()
        if engine.startswith("fsdp2"):
            inner.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return inner, model, backward, step, accumulating


def _fsdp2(model, case, s, engine):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(s.device.type, (s.world,))
    kw = {"mesh": mesh}
    if case.mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    decoder = model.model
    if engine in ("fsdp2-units", "fsdp2-norm-head"):
        for layer in decoder.layers:
            fully_shard(layer, **kw)
        if engine == "fsdp2-norm-head":
            fully_shard(
                [decoder.norm, model.lm_head], reshard_after_forward=False, **kw
            )
        elif case.tie:
            # The tied weight belongs to one unit, so both modules see the same gathered
            # parameter (sharding lm_head alone would untie it).
            fully_shard([decoder.embed_tokens, model.lm_head], **kw)
        else:
            fully_shard(model.lm_head, **kw)
    elif engine != "fsdp2-root":
        raise ValueError(f"unknown engine {case.engine}")
    fully_shard(model, **kw)
    return model


def _deepspeed(model, case, s, stage):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin

    # What `accelerate launch` sets for a DeepSpeed run (the process group exists already).
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    plugin = DeepSpeedPlugin(
        zero_stage=stage, gradient_accumulation_steps=s.micro, zero3_init_flag=False
    )
    plugin.deepspeed_config.update(
        {
            "train_micro_batch_size_per_gpu": s.batch,
            "train_batch_size": s.batch * s.micro * s.world,
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
    )
    if s.dtype == torch.bfloat16:
        plugin.deepspeed_config["bf16"] = {"enabled": True}
    acc = Accelerator(deepspeed_plugin=plugin)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)
    engine, _ = acc.prepare(model, opt)

    pending = []

    def backward(loss):
        # What acc.backward(loss) does (engine.backward, then engine.step, which steps the
        # optimizer only at the accumulation boundary), split so that the first step's
        # gradients can be read in between. DeepSpeed divides the loss by its
        # accumulation steps and averages over ranks: undo both.
        if pending:
            engine.step()
        engine.backward(loss * s.world * s.micro)
        pending[:] = [True]

    def step():
        engine.step()
        pending.clear()

    def accumulating(last):
        return contextlib.nullcontext()

    return engine, engine.module, backward, step, accumulating


def _full(t):
    """A parameter or gradient as one whole local tensor (FSDP2's DTensor gathered)."""
    if t is None:
        return None
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().float().cpu().clone()


@contextlib.contextmanager
def _gathered(case, module):
    if case.engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield
    else:
        yield


def _params(case, module):
    with _gathered(case, module):
        return {n: _full(p) for n, p in module.named_parameters() if p.requires_grad}


def _grads(case, module):
    if case.engine.startswith("zero"):
        from deepspeed.utils import safe_get_full_grad

        return {
            n: _full(safe_get_full_grad(p))
            for n, p in module.named_parameters()
            if p.requires_grad
        }
    return {
        n: _full(p.grad)
        for n, p in module.named_parameters()
        if p.requires_grad and p.grad is not None
    }


# ----------------------------------------------------------------------- the runs


def _sync(s):
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def run_engine(case, s, batches, items, stock):
    """The engine run on this rank: losses per (step, micro), the first step's gradients,
    the parameters before and after, step times, peak memory, the guard's counters."""
    # The previous run's model (engines' hooks make reference cycles) must not count in
    # this run's peak.
    gc.collect()
    model = build(case, s)
    call, params_of, backward, step, accumulating = wrap(model, case, s)
    start = _params(case, params_of)
    forward_rewrite.reset_stats()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(s.device)
    losses, times, grads0 = {}, [], None
    path = forward_rewrite.keep_logits() if stock else contextlib.nullcontext()
    with path:
        for st in range(s.steps):
            _sync(s)
            t0 = time.perf_counter()
            for m in range(s.micro):
                torch.manual_seed(batch_seed(st, m, s.rank))
                with accumulating(m == s.micro - 1):
                    out = call(**batches[(st, m, s.rank)], num_items_in_batch=items[st])
                    backward(out.loss)
                losses[(st, m, s.rank)] = out.loss.detach().float().item()
                fused_logits = out.logits is None
            if st == 0:
                grads0 = _grads(case, params_of)
            step()
            _sync(s)
            times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else None
    )
    return {
        "losses": losses,
        "grads0": grads0,
        "start": start,
        "end": _params(case, params_of),
        "times": times,
        "peak": peak,
        "stats": forward_rewrite.stats(),
        "logits_none": fused_logits,
    }


def run_reference(case, s, batches, items):
    """The single-process stock run of the global batch (rank 0): every rank's
    micro-batches in turn, summed gradients, the same optimizer."""
    model = build(case, s)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)
    no_engine = Case(
        case.model,
        "none",
        tie=case.tie,
        peft=case.peft,
        gc=case.gc,
        attnres=case.attnres,
    )
    start = _params(no_engine, model)
    losses, grads0 = {}, None
    with forward_rewrite.keep_logits():
        for st in range(s.steps):
            for m in range(s.micro):
                for r in range(s.world):
                    torch.manual_seed(batch_seed(st, m, r))
                    out = model(**batches[(st, m, r)], num_items_in_batch=items[st])
                    out.loss.backward()
                    losses[(st, m, r)] = out.loss.detach().float().item()
            if st == 0:
                grads0 = _grads(no_engine, model)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {
        "losses": losses,
        "grads0": grads0,
        "start": start,
        "end": _params(no_engine, model),
    }


def _rel(got, want):
    """max |got - want| / max |want| (float64)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def _worst(got, want):
    names = sorted(set(got) & set(want))
    missing = sorted(set(got) ^ set(want))
    if not names:
        return float("nan"), None, missing
    errs = {n: _rel(got[n], want[n]) for n in names}
    worst = max(errs, key=errs.get)
    return errs[worst], worst, missing


def compare(run, ref):
    loss_err = max(abs(run["losses"][k] - v) / abs(v) for k, v in ref["losses"].items())
    grad_err, grad_worst, grad_missing = _worst(run["grads0"], ref["grads0"])
    param_err, param_worst, param_missing = _worst(run["end"], ref["end"])
    update = {n: run["end"][n] - run["start"][n] for n in run["end"]}
    update_ref = {n: ref["end"][n] - ref["start"][n] for n in ref["end"]}
    update_err, update_worst, _ = _worst(update, update_ref)
    # AttnRes pseudo-queries start at zero: they moved only if they received gradients.
    attnres_update = max(
        (d.abs().max().item() for n, d in update.items() if ".attnres.query" in n),
        default=None,
    )
    return {
        "attnres_update": attnres_update,
        "loss_err": loss_err,
        "grad_err": grad_err,
        "grad_worst": grad_worst,
        "param_err": param_err,
        "param_worst": param_worst,
        "update_err": update_err,
        "update_worst": update_worst,
        "missing": sorted(set(grad_missing) | set(param_missing)),
    }


def _gather(obj, s):
    if s.world == 1:
        return [obj]
    out = [None] * s.world
    dist.all_gather_object(out, obj)
    return out


def run_case(case, s, fused_only=False):
    """Both engine runs and the reference; rank 0 returns the row pair, others None. With
    ``fused_only`` the stock engine run is skipped unless a 16-bit check needs it."""
    batches, items = all_batches(case, s)
    ref = run_reference(case, s, batches, items) if s.rank == 0 else None
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    result = {"case": case.name}
    sixteen_bit = s.dtype != torch.float32 or case.mixed_precision
    paths = ("fused",) if fused_only and not sixteen_bit else ("stock", "fused")
    for path in paths:
        run = run_engine(case, s, batches, items, stock=path == "stock")
        ranks = _gather(
            {
                "losses": run["losses"],
                "stats": run["stats"],
                "peak": run["peak"],
                "times": run["times"],
                "logits_none": run["logits_none"],
            },
            s,
        )
        if s.rank != 0:
            continue
        merged = dict(run)
        merged["losses"] = {k: v for r in ranks for k, v in r["losses"].items()}
        row = compare(merged, ref)
        classes = [r["stats"]["classes"] for r in ranks]
        row["fused"] = sum(v["fused"] for c in classes for v in c.values())
        row["fallback"] = {}
        row["routes"] = {}
        for c in classes:
            for v in c.values():
                for reason, n in v["fallback"].items():
                    row["fallback"][reason] = row["fallback"].get(reason, 0) + n
                for route, n in v["routes"].items():
                    row["routes"][route] = row["routes"].get(route, 0) + n
        row["op_calls"] = sum(sum(r["stats"]["op_calls"].values()) for r in ranks)
        row["dw_skipped"] = sum(r["stats"]["dw_skipped"] for r in ranks)
        row["calls"] = s.steps * s.micro * s.world
        row["logits_none"] = all(r["logits_none"] for r in ranks)
        later = [t for r in ranks for t in r["times"][1:]] or [
            t for r in ranks for t in r["times"]
        ]
        row["step_ms"] = 1000 * sum(later) / len(later)
        peaks = [r["peak"] for r in ranks if r["peak"] is not None]
        row["peak_mib"] = max(peaks) / 2**20 if peaks else None
        result[path] = row
    return result if s.rank == 0 else None


def check(result, sixteen_bit):
    """Problems with a fused run, as lines (empty: it passed)."""
    fused, stock = result["fused"], result.get("stock")
    problems = []
    if (
        fused["fallback"]
        or fused["fused"] != fused["calls"]
        or not fused["logits_none"]
    ):
        problems.append(
            f"fused path did not run on every call: {fused['fused']} of "
            f"{fused['calls']}, fallbacks {fused['fallback']}"
        )
    if fused["missing"]:
        problems.append(f"parameters on one side only: {fused['missing']}")
    limits = {"loss_err": 1e-5, "grad_err": 1e-4, "param_err": 1e-5, "update_err": 1e-3}
    for key, tol in limits.items():
        if sixteen_bit:
            if key == "update_err":
                continue  # a 16-bit parameter cannot hold its update exactly
            tol = 2 * stock[key] + 2e-2
        if not fused[key] <= tol:
            problems.append(f"{key} {fused[key]:.3g} > {tol:.3g}")
    return problems


# --------------------------------------------------------------------------- main


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init(smoke):
    """The process group (torchrun's environment, or a world of one)."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    cuda = torch.cuda.is_available() and not smoke
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo", device_id=device if cuda else None
    )
    return device


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _ratio(res, path):
    """The fused run's peak memory over the stock engine run's (CUDA, both ran)."""
    if path != "fused" or "stock" not in res:
        return "-"
    fused, stock = res["fused"]["peak_mib"], res["stock"]["peak_mib"]
    return "-" if not fused or not stock else f"{fused / stock:.2f}x"


def table(results):
    head = (
        f"{'case':44} {'path':5} {'route':10} {'fused':>5} {'fallback':>16} "
        f"{'loss':>8} {'grad':>8} {'param':>8} {'update':>8} {'step ms':>8} {'peak MiB':>9} "
        f"{'vs stock':>8}"
    )
    lines = [head, "-" * len(head)]
    for res in results:
        if "error" in res:
            lines.append(f"{res['case']:44} ERROR {res['error']}")
            continue
        for path in ("stock", "fused"):
            if path not in res:
                continue
            r = res[path]
            fallback = ",".join(f"{k}:{v}" for k, v in r["fallback"].items()) or "-"
            route = ",".join(r["routes"]) or "-"
            lines.append(
                f"{res['case'] if path == 'stock' or 'stock' not in res else '':44} "
                f"{path:5} {route:10} "
                f"{r['fused']:>5} {fallback:>16} {r['loss_err']:8.1e} "
                f"{r['grad_err']:8.1e} {r['param_err']:8.1e} {r['update_err']:8.1e} "
                f"{_fmt(r['step_ms'], '8.1f')} "
                f"{_fmt(r['peak_mib'], '9.0f')} {_ratio(res, path):>8}"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny float32 models, CPU, gloo"
    )
    p.add_argument("--only", default=None, help="regex on case names")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--micro", type=int, default=2, help="micro-batches per step")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--check", action="store_true", help="exit 1 on a failed check")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="parameter dtype (default: float32 with --smoke, else bfloat16)",
    )
    p.add_argument(
        "--fused-only",
        action="store_true",
        help="skip the stock engine runs (kept for 16-bit checks)",
    )
    args = p.parse_args(argv)

    device = init(args.smoke)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    steps = args.steps or (2 if args.smoke else 4)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    s = Settings(args.smoke, steps, args.micro, device, world, rank, dtype)
    cases = [
        c
        for c in default_cases()
        if (args.only is None or re.search(args.only, c.name))
        # without an engine, ranks would train apart: single-process cases run alone
        and (world == 1 or c.engine != "none")
    ]
    results, failed = [], []
    for case in cases:
        needs = ["deepspeed"] if case.engine.startswith("zero") else []
        needs += ["peft"] if case.peft else []
        missing = [why for why in map(_import_error, needs) if why]
        if missing:
            results.append({"case": case.name, "error": "; ".join(missing)})
            continue
        if rank == 0:
            print(f"running {case.name}", file=sys.stderr, flush=True)
        result = run_case(case, s, fused_only=args.fused_only)
        if rank == 0:
            result["problems"] = check(
                result, s.dtype != torch.float32 or case.mixed_precision
            )
            if result["problems"]:
                failed.append((case.name, result["problems"]))
            results.append(result)
            # Each case's rows as it ends, the JSON rewritten: a run cut short by a time
            # limit keeps what it measured.
            print("\n".join(table([result]).splitlines()[2:]), flush=True)
            if args.json:
                _write_json(args.json, world, device, s, steps, results)
        dist.barrier()
    if rank == 0:
        print(
            f"world size {world}, {device.type}, {s.dtype}, {steps} steps x {s.micro} "
            f"micro-batches of {s.batch}x{s.seq} per rank"
        )
        print(table(results))
        for name, problems in failed:
            print(f"FAIL {name}: {'; '.join(problems)}")
    dist.destroy_process_group()
    return 1 if (args.check and failed) else 0


def _write_json(path, world, device, s, steps, results):
    with open(path, "w") as f:
        json.dump(
            {
                "world": world,
                "device": device.type,
                "dtype": str(s.dtype),
                "steps": steps,
                "micro": s.micro,
                "results": results,
            },
            f,
            indent=1,
            default=str,
        )


def _import_error(name):
    """Why the package ``name`` does not import here (None when it does): the case that
    needs it is listed with this instead of run."""
    try:
        __import__(name)
    except Exception as e:  # noqa: BLE001  (any failure: the package is not usable here)
        return f"{name} does not import: {type(e).__name__}: {e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
