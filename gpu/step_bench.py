"""Training-step time and peak memory of real model shapes (issue 10's table): random
weights, bfloat16, gradient checkpointing, sdpa (eager for Gemma 2), BATCH rows of SEQ tokens, AdamW; the
median step after warm-up, per method:

* ``stock``: transformers as is;
* ``ours``: ``forward_rewrite.install()`` (every pass: fused loss, RMSNorm, rotary, gated MLP);
* ``ours-loss``: ``install(passes=("fused-loss",))`` (the fused loss alone);
* ``liger-loss``: Liger Kernel's fused linear cross-entropy only;
* ``liger``: every Liger kernel for the family (RMSNorm, RoPE, SwiGLU/GeGLU, fused loss);
* ``liger+ours``: Liger's kernels in place, then ``install()`` (our passes see Liger's
  classes and leave those sites alone);
* ``attnres`` / ``ours+attnres``: ``forward_rewrite.attnres.apply(model)`` (Block AttnRes,
  retrofit mode, default blocks) on stock transformers / after ``install()``: the cost of
  training with Attention Residuals on (issue 12; not in the default methods).

Each (model, method) runs in its own process (Liger patches transformers' modules for the
whole process), the methods interleaved per model. Prints a table; ``--json`` writes it. On a
GPU each row also has the timed steps' median SM clock and power draw (nvidia-smi sampled
every 50 ms beside them): the same cuBLAS kernels can run slower under one method if the GPU
clocks down at its power limit.

    python3 gpu/step_bench.py [--models llama-1b,qwen3-0.6b] [--steps 8] [--warmup 3]
    python3 gpu/step_bench.py --models gemma2-2b,mistral-7b-16l,phi3-mini,qwen3-moe-12l,glm-9b-12l,gemma4-12l
    python3 gpu/step_bench.py --models llama-1b --methods ours,liger --profile 15
        (one more step profiled: its 15 costliest kernels, and on a GPU the time the device
        ran work against the step's span, with the longest idle stretches between kernels,
        and its device time per kernel class: matrix products, attention and the optimizer,
        which no element-wise fusion removes, against the rest; stock's step over the former
        is the "ceiling", the most any fusion of the rest could gain)
    python3 gpu/step_bench.py --models llama-1b --methods ours,liger --rounds 4
        (each method 4 times, in the order ours, liger, liger, ours, ours, liger, ...)
    python3 gpu/step_bench.py --models qwen3-moe-12l --methods ours,liger --memory 12
        (one more step with the allocator's history recorded: the tensors alive at its peak
        memory, summed by the line of Python that allocated them, the 12 largest; that step
        recomputes each checkpointed layer whole, see memory_step)
    python3 gpu/step_bench.py --smoke      (anywhere: tiny shapes on the CPU)
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

SHAPES = {
    # Llama-3.2-1B
    "llama-1b": (
        "llama",
        {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
        },
    ),
    # Qwen3-0.6B
    "qwen3-0.6b": (
        "qwen3",
        {
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
    ),
    # Gemma-2-2B (logit soft-capping, sandwich norms, GELU-tanh gated MLP)
    "gemma2-2b": (
        "gemma2",
        {
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 256000,
            "tie_word_embeddings": True,
            # transformers refuses sdpa for Gemma 2 (its soft-capped attention scores)
            "attn_implementation": "eager",
        },
    ),
    # Mistral-7B-v0.3 at half depth (16 of 32 layers: one session's device time)
    "mistral-7b-16l": (
        "mistral",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 32768,
            "tie_word_embeddings": False,
            # v0.3 has no sliding window (MistralConfig's default is v0.1's 4096, which makes
            # transformers build a 4D mask and repeat the kv heads for sdpa)
            "sliding_window": None,
        },
    ),
    # Phi-3-mini (packed gate_up MLP, partial-form rotary)
    "phi3-mini": (
        "phi3",
        {
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32064,
            "tie_word_embeddings": False,
        },
    ),
    # Qwen3-MoE (Qwen3-30B-A3B's layer shapes, 12 layers of 32 experts, 8 active)
    "qwen3-moe-12l": (
        "qwen3_moe",
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_experts": 32,
            "num_experts_per_tok": 8,
            "num_hidden_layers": 12,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
    ),
    # GLM-4-9B's shapes at 12 of 40 layers (interleaved partial rotary, packed gate_up):
    # a family Liger has no patch for
    "glm-9b-12l": (
        "glm",
        {
            "hidden_size": 4096,
            "intermediate_size": 13696,
            "num_hidden_layers": 12,
            "num_attention_heads": 32,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "partial_rotary_factor": 0.5,
            "vocab_size": 151552,
            "tie_word_embeddings": False,
        },
    ),
    # Gemma 4's text decoder at Gemma4TextConfig's default shapes (hidden 2304, 8 heads of
    # 256, global layers' heads of 512 with partial rotary, GeGLU 9216), 12 of 30 layers,
    # without the per-layer input embeddings: q and k rotated by separate one-tensor calls
    # (rotary_single), which Liger's patch leaves to transformers
    "gemma4-12l": (
        "gemma4_text",
        {
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "hidden_size_per_layer_input": 0,
            "vocab_size": 262144,
            "tie_word_embeddings": True,
        },
    ),
    # Qwen3.5 at Qwen3_5TextConfig's default shapes (hidden 4096, 16 heads of 256 with partial
    # rotary, gated delta-net linear attention with 32 value heads of 128 in three of four
    # layers, SwiGLU 12288), 8 of 32 layers: the linear attention's gated norms
    # (gated_rms_norm) are what Liger's patch leaves to transformers; without
    # flash-linear-attention (not on the device) every method runs transformers' torch
    # recurrence, which dominates the step
    "qwen3.5-8l": (
        "qwen3_5_text",
        {
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 248320,
            "tie_word_embeddings": False,
        },
    ),
    # GPT-OSS-20B's shapes at 6 of 24 layers (32 experts of 2880, 4 active, interleaved
    # clamped gate with bias; attention sinks, so eager attention: sdpa is refused): Liger's
    # patch fuses RMSNorm, rotary and the loss, not the experts' gate
    "gpt-oss-6l": (
        "gpt_oss",
        {
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "num_hidden_layers": 6,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 201088,
            "tie_word_embeddings": False,
            "attn_implementation": "eager",
        },
    ),
    # Granite-4.0-H-Micro's shapes (hidden 2048, a dense SwiGLU of 8192, Mamba-2 mixers of 64
    # heads of 64 with one group, attention in one layer of four), 8 of 40 layers: Liger has
    # no patch for the family. Without mamba_ssm (not on the device) every method runs
    # transformers' torch chunked scan, which dominates the step; the mixers' gated norm
    # (gate first) is ours to fuse
    "granite4-h-8l": (
        "granitemoehybrid",
        {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "shared_intermediate_size": 8192,
            "num_local_experts": 0,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "layer_types": ["mamba", "mamba", "mamba", "attention"] * 2,
            "mamba_n_heads": 64,
            "mamba_d_head": 64,
            "mamba_n_groups": 1,
            "mamba_d_state": 128,
            "mamba_chunk_size": 256,
            "vocab_size": 100352,
            "tie_word_embeddings": True,
        },
    ),
}
#: The models of issue 10's first table (the default); the others by --models.
DEFAULT_MODELS = ["llama-1b", "qwen3-0.6b"]
METHODS = ["stock", "ours", "ours-loss", "liger-loss", "liger", "liger+ours"]
ATTNRES_METHODS = ["attnres", "ours+attnres"]


#: Liger's name for a family where it differs from the config's model type.
LIGER_FAMILY = {"qwen3_5_text": "qwen3_5"}


def apply_liger(family, everything):
    from liger_kernel import transformers as lk

    apply = getattr(lk, f"apply_liger_kernel_to_{LIGER_FAMILY.get(family, family)}")
    if everything:
        apply()
    else:
        apply(
            rope=False,
            rms_norm=False,
            swiglu=False,
            cross_entropy=False,
            fused_linear_cross_entropy=True,
        )


def one(model_name, method, steps, warmup, batch, seq, device, smoke, top=0, memory=0):
    """Runs in the child process: builds the model, times the steps, prints JSON."""
    import torch
    import transformers

    family, shape = SHAPES[model_name]
    shape = dict(shape)
    if smoke:
        shape.update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=512,
        )
        if "num_experts" in shape:
            shape.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        if "mamba_n_heads" in shape:  # Mamba-2 mixers: heads x head size = 2 x hidden
            shape.update(
                mamba_n_heads=4,
                mamba_d_head=32,
                mamba_d_state=16,
                mamba_chunk_size=8,
                shared_intermediate_size=128,
                layer_types=["mamba", "attention"],
            )
        # Token ids within the tiny vocabulary (Phi-3's and GLM's defaults are not).
        shape.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if method.startswith("liger"):
        apply_liger(family, everything=method != "liger-loss")
    if method in ("ours", "liger+ours", "ours+attnres"):
        import forward_rewrite

        forward_rewrite.install()
    elif method == "ours-loss":
        import forward_rewrite

        forward_rewrite.install(passes=("fused-loss",))
    config_cls = transformers.AutoConfig.for_model(family).__class__
    attn = shape.pop("attn_implementation", "sdpa")
    config = config_cls(**shape, attn_implementation=attn)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(device):  # random init on the device: seconds, not a minute
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if method.endswith("attnres"):
        from forward_rewrite import attnres

        attnres.apply(model)  # before the optimizer: it trains the pseudo-queries too
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g).to(device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    times, host, losses = [], [], []
    sampler = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(warmup + steps):
            if i == warmup and device == "cuda":
                sampler = start_clock_sampler(torch.cuda.current_device())
            if device == "cuda":
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
            t0 = time.perf_counter()
            loss = step()
            # the host's time to issue the step: near the step time, the GPU waits on Python
            issued = (time.perf_counter() - t0) * 1e3
            if device == "cuda":
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            losses.append(float(loss))
            if i >= warmup:
                times.append(ms)
                host.append(issued)
    finally:  # the sampler must not outlive a failed step
        clocks = stop_clock_sampler(sampler)
    result = {
        "model": model_name,
        "method": method,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30
        if device == "cuda"
        else None,
        "host_ms": statistics.median(host),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        # the timed steps' median SM clock and power draw (None without nvidia-smi)
        "clocks": clocks,
    }
    if top:
        try:
            result["profile"], result["device_time"] = profile_step(step, device, top)
        except Exception as e:  # noqa: BLE001  (the timed steps stand without it)
            result["profile_error"] = f"{type(e).__name__}: {e}"
    if memory and device == "cuda":
        result["peak_tensors"] = memory_step(step, memory)
    if method in ("ours", "ours-loss", "liger+ours", "ours+attnres"):
        import forward_rewrite
        from forward_rewrite import fusion_guard

        result["fused_calls"] = {
            "loss": forward_rewrite.stats().get("fused"),
            **fusion_guard.taken,
        }
    print("RESULT " + json.dumps(result), flush=True)


def start_clock_sampler(device_index):
    """Samples the GPU's SM clock and power draw every 50 ms with nvidia-smi, in its own
    process, while the timed steps run (a question the step tables left open: do the same
    cuBLAS kernels run slower under one method because the GPU clocks down at its power
    limit?). None where nvidia-smi is missing or fails."""
    import shutil

    import torch

    if not shutil.which("nvidia-smi"):
        return None
    uuid = getattr(torch.cuda.get_device_properties(device_index), "uuid", None)
    target = f"GPU-{uuid}" if uuid is not None else str(device_index)
    try:
        return subprocess.Popen(
            [
                "nvidia-smi",
                "-i",
                target,
                "--query-gpu=clocks.sm,power.draw",
                "--format=csv,noheader,nounits",
                "-lms",
                "50",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except OSError:
        return None


def stop_clock_sampler(sampler):
    """The samples' summary (``clock_summary``) once the sampler is stopped; None without one."""
    if sampler is None:
        return None
    sampler.terminate()
    try:
        out, _ = sampler.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        sampler.kill()
        out, _ = sampler.communicate()
    return clock_summary(out)


def clock_summary(text):
    """Median SM clock (MHz) and power draw (W) of nvidia-smi's "clock, power" lines; lines
    that do not parse (a value "[N/A]", a cut-off last line) are skipped. None if none parse."""
    clocks, power = [], []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            c, w = float(parts[0]), float(parts[1])
        except ValueError:
            continue
        clocks.append(c)
        power.append(w)
    if not clocks:
        return None
    return {
        "sm_clock_mhz": statistics.median(clocks),
        "power_w": statistics.median(power),
        "samples": len(clocks),
    }


def device_time(spans, gaps=5):
    """Where the device waits, from the (start, end, name) of every kernel, copy and memset of
    a step (microseconds): the span from the first start to the last end, the time some
    work ran (the union of the intervals: kernels of several streams may overlap), the idle
    rest, and the ``gaps`` longest idle stretches as [ms, the work before, the work after]."""
    spans = sorted(spans)
    if not spans:
        return None
    busy, found = 0.0, []
    start, end, last = spans[0][0], spans[0][1], spans[0][2]
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            found.append((s - end, last, name))
            start, end, last = s, e, name
        elif e > end:
            end, last = e, name
    busy += end - start
    span = end - spans[0][0]
    found.sort(key=lambda g: -g[0])
    return {
        "span_ms": round(span / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "idle_ms": round((span - busy) / 1e3, 3),
        "gaps": [[round(g / 1e3, 3), a[:60], b[:60]] for g, a, b in found[:gaps]],
    }


#: Device work by what could make it faster, matched on kernel names (first match wins).
#: Matrix products, attention and the optimizer are what no element-wise fusion removes:
#: their sum bounds the step time any fusion of the rest can reach ("fusion ceiling").
KERNEL_CLASSES = [
    (
        "matmul",
        re.compile(r"nvjet|gemm|cutlass|xmma|splitKreduce|cublas", re.IGNORECASE),
    ),
    ("attention", re.compile(r"sdpa|flash|fmha|cudnn", re.IGNORECASE)),
    ("optimizer", re.compile(r"multi_tensor_apply")),
    (
        "forward-rewrite",
        re.compile(
            r"^(rms_(fwd|bwd|dw_finish)|rope|gated_(fwd|bwd)|ce_rows|dh_finish|gather_rows"
            r"|target_scatter|scale_by|cast_from_f32|fill|attnres_(fwd|bwd))_"
        ),
    ),
    ("triton", re.compile(r"^_|liger|triton", re.IGNORECASE)),
    ("other", re.compile(r"")),
]
#: The classes no fusion of element-wise work removes.
UNFUSABLE = ("matmul", "attention", "optimizer")


def kernel_classes(spans):
    """Device ms per class of KERNEL_CLASSES, from (start, end, name) in microseconds."""
    out = {name: 0.0 for name, _ in KERNEL_CLASSES}
    for start, end, kernel in spans:
        name = next(c for c, pattern in KERNEL_CLASSES if pattern.search(kernel))
        out[name] += (end - start) / 1e3
    return {name: round(ms, 3) for name, ms in out.items()}


def profile_step(step, device, top):
    """One more step under torch.profiler: the ``top`` operators and kernels by their own
    device time (CPU time on the CPU), as [name, total ms, calls], and on a GPU the step's
    device busy and idle time (``device_time``, with ``classes``: ms per kernel class; None
    on the CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    def own_time(e):
        if device != "cuda":
            return e.self_cpu_time_total
        # torch >= 2.4 names it self_device_time_total; older ones self_cuda_time_total
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, name):
                return getattr(e, name)
        return 0

    events = sorted(prof.key_averages(), key=own_time, reverse=True)
    costliest = [
        [e.key[:90], round(own_time(e) / 1e3, 3), e.count]
        for e in events[:top]
        if own_time(e) > 0
    ]
    on_device = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    busy = device_time(on_device)
    if busy:
        busy["classes"] = kernel_classes(on_device)
    return costliest, busy


def memory_step(step, top):
    """One more step with the CUDA allocator's history recorded: ``peak_tensors`` of it.

    Checkpoint recomputation runs each layer whole in this step (no early stop): with
    Python stacks recorded, torch 2.11 loses the exception by which non-reentrant
    checkpointing stops a recomputation early when it is raised while a custom
    ``autograd.Function`` saves its tensors (the MoE experts op is a layer's last), and the
    step fails with ``SystemError: ... returned NULL without setting an exception``."""
    import torch
    from torch.utils.checkpoint import set_checkpoint_early_stop

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        with set_checkpoint_early_stop(False):
            step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    traces = snapshot.get("device_traces") or [[]]
    return peak_tensors(traces[torch.cuda.current_device()], top)


#: Frames skipped when naming who allocated a tensor: the framework's own code.
_FRAMEWORK = re.compile(r"/torch/|/contextlib\.py$|^<|/functools\.py$")


def allocation_site(frames):
    """The innermost frame outside torch itself, as "file.py:line function" (the path cut
    after its package directory); "(no Python frame)" for allocations made where no Python
    runs, such as autograd's backward of a built-in operator."""
    for f in frames or []:
        name = f.get("filename", "")
        if not _FRAMEWORK.search(name):
            short = "/".join(name.split("/")[-2:])
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(no Python frame)"


def peak_tensors(trace, top):
    """The tensors alive when a recorded stretch of allocator events (``device_traces`` of
    ``torch.cuda.memory._snapshot()``, oldest first) reached its most memory, summed by
    ``allocation_site``: {"peak_gib": the rise over the memory at the start, "sites":
    [[site, GiB, tensors], ...] the ``top`` largest}. Tensors allocated before the
    recording are not seen, but their frees count against the rise."""
    rise, peak, peak_at = 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            rise += e["size"]
            if rise > peak:
                peak, peak_at = rise, i
        elif e["action"] == "free_requested":
            rise -= e["size"]
    live = {}
    for e in trace[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    sites = {}
    for e in live.values():
        site = sites.setdefault(allocation_site(e.get("frames")), [0, 0])
        site[0] += e["size"]
        site[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    return {
        "peak_gib": round(peak / 2**30, 3),
        "sites": [[s, round(b / 2**30, 3), n] for s, (b, n) in ranked],
    }


def stock_ms(rows, model):
    """The model's stock step time among the rows, or None when stock did not run."""
    return next(
        (
            s["median_ms"]
            for s in rows
            if s["model"] == model and s["method"] == "stock" and "error" not in s
        ),
        None,
    )


def print_classes(rows):
    """The profiled steps' device time per kernel class, and each one's fusion ceiling."""
    profiled = [r for r in rows if (r.get("device_time") or {}).get("classes")]
    if not profiled:
        return
    names = [name for name, _ in KERNEL_CLASSES]
    print(
        "\nOne profiled step's device ms per kernel class; ceiling: stock's step over this "
        "row's matmul + attention + optimizer, the speed-up over stock if all other work "
        "took no time"
    )
    print(f"| model | method | {' | '.join(names)} | ceiling |")
    print("| --- | --- |" + " ---: |" * (len(names) + 1))
    for r in profiled:
        classes = r["device_time"]["classes"]
        stock = stock_ms(rows, r["model"])
        floor = sum(classes[c] for c in UNFUSABLE)
        ceiling = f"{stock / floor:.2f}x" if stock and floor else ""
        cells = " | ".join(f"{classes[c]:.1f}" for c in names)
        print(f"| {r['model']} | {r['method']} | {cells} | {ceiling} |")


def merge_rounds(rows):
    """One row per (model, method) from its rounds, in first-run order: the first round's
    row (its losses and profile), with median_ms the median of the rounds' medians, min_ms
    the least, peak_gib the most, and round_ms every round's median in run order. A method
    with a failed round reports the failure."""
    merged = {}
    for r in rows:
        key = (r["model"], r["method"])
        if key not in merged:
            merged[key] = dict(r)
            if "error" not in r:
                merged[key]["round_ms"] = [r["median_ms"]]
            continue
        m = merged[key]
        if "error" in m:
            continue
        if "error" in r:
            merged[key] = dict(r)
            continue
        m["round_ms"].append(r["median_ms"])
        m["median_ms"] = statistics.median(m["round_ms"])
        m["min_ms"] = min(m["min_ms"], r["min_ms"])
        if r.get("peak_gib") is not None:
            m["peak_gib"] = max(m.get("peak_gib") or 0.0, r["peak_gib"])
    return list(merged.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, of: {', '.join(SHAPES)}",
    )
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS + ATTNRES_METHODS)} (default: %(default)s)",
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps, profile one more: its N costliest kernels, and on a GPU "
        "its device busy and idle time with the longest idle stretches",
    )
    ap.add_argument(
        "--memory",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps (GPU only), record one more step's allocations: the "
        "tensors alive at its peak memory, summed by the Python line that allocated them, "
        "the N largest",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="run the methods N times per model, the order reversed every other round "
        "(ours, liger, liger, ours, ...), so neither method always runs on the warmer or "
        "cooler GPU; a method's step time is then the median of its rounds' medians "
        "(each round's in the JSON as round_ms); --profile profiles the first round only",
    )
    ap.add_argument(
        "--timeout", type=int, default=150, help="seconds per (model, method)"
    )
    ap.add_argument(
        "--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS
    )
    a = ap.parse_args()
    unknown = [
        m for m in a.methods.split(",") if m not in METHODS + ATTNRES_METHODS
    ] + [m for m in a.models.split(",") if m not in SHAPES]
    if unknown and not a.one:
        ap.error(f"unknown model or method: {', '.join(unknown)}")
    device = "cpu" if a.smoke else "cuda"
    if a.smoke:
        a.batch, a.seq, a.steps, a.warmup = 2, 64, 2, 1
    if a.one:
        one(
            *a.one,
            a.steps,
            a.warmup,
            a.batch,
            a.seq,
            device,
            a.smoke,
            a.profile,
            a.memory,
        )
        return
    rows = []
    for model_name in a.models.split(","):
        runs = []
        for k in range(max(1, a.rounds)):
            order = a.methods.split(",")
            runs += [(m, k) for m in (order[::-1] if k % 2 else order)]
        for method, k in runs:
            cmd = [sys.executable, __file__, "--one", model_name, method]
            cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup)]
            cmd += ["--batch", str(a.batch), "--seq", str(a.seq)]
            cmd += ["--smoke"] if a.smoke else []
            cmd += ["--profile", str(a.profile)] if a.profile and k == 0 else []
            cmd += ["--memory", str(a.memory)] if a.memory and k == 0 else []
            try:
                done = subprocess.run(
                    cmd,
                    check=False,
                    capture_output=True,
                    text=True,
                    env=os.environ,
                    timeout=a.timeout,
                )
            except subprocess.TimeoutExpired:
                rows.append({"model": model_name, "method": method, "error": "timeout"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            found = [
                json.loads(line[7:])
                for line in done.stdout.splitlines()
                if line.startswith("RESULT ")
            ]
            if done.returncode != 0 or not found:
                tail = " ".join(done.stderr.strip().splitlines()[-1:])[:200]
                rows.append({"model": model_name, "method": method, "error": tail})
            else:
                rows.append(found[0])
            print(json.dumps(rows[-1]), flush=True)
    rows = merge_rounds(rows)
    print()
    print(
        f"{a.batch} x {a.seq} tokens, bf16, gradient checkpointing, sdpa, AdamW; "
        f"median of {a.steps} steps after {a.warmup}"
        + (
            f"; median of {a.rounds} rounds, the method order reversed every other round"
            if a.rounds > 1
            else ""
        )
    )
    print(
        "| model | method | step ms | vs stock | host ms to issue | peak GiB "
        "| loss (first, last) | SM MHz, W |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | error: {r['error']} | | | | | |")
            continue
        stock = stock_ms(rows, r["model"])
        speed = f"{stock / r['median_ms']:.2f}x" if stock else ""
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
        c = r.get("clocks")
        clocks = f"{c['sm_clock_mhz']:.0f}, {c['power_w']:.0f}" if c else ""
        print(
            f"| {r['model']} | {r['method']} | {r['median_ms']:.0f} | {speed} "
            f"| {r['host_ms']:.0f} | {peak} | {r['first_loss']:.3f}, {r['last_loss']:.3f} "
            f"| {clocks} |"
        )
    print_classes(rows)
    for r in rows:
        if r.get("profile_error"):
            print(
                f"\n{r['model']} / {r['method']}: profiling failed: {r['profile_error']}"
            )
        busy = r.get("device_time")
        if busy:
            print(
                f"\n{r['model']} / {r['method']}: the profiled step's device work ran "
                f"{busy['busy_ms']:.1f} of {busy['span_ms']:.1f} ms (idle {busy['idle_ms']:.1f} ms); "
                "longest idle stretches:"
            )
            print(
                "| idle ms | the work before the gap | the work after it |\n| ---: | --- | --- |"
            )
            for ms, before, after in busy["gaps"]:
                print(f"| {ms:.2f} | `{before}` | `{after}` |")
        peak = r.get("peak_tensors")
        if peak:
            print(
                f"\n{r['model']} / {r['method']}: the tensors alive at one step's peak "
                f"({peak['peak_gib']:.2f} GiB over the step's start), by where they were allocated"
            )
            print("| allocated at | GiB | tensors |\n| --- | ---: | ---: |")
            for site, gib, n in peak["sites"]:
                print(f"| `{site}` | {gib:.3f} | {n} |")
        if r.get("profile"):
            print(f"\n{r['model']} / {r['method']}: one step's costliest kernels")
            print("| kernel or operator | ms | calls |\n| --- | ---: | ---: |")
            for name, ms, calls in r["profile"]:
                print(f"| `{name}` | {ms:.2f} | {calls} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
