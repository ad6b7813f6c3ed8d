"""End to end on the GPU (issue 4, item 6): a small Llama (vocabulary 128256) and a small
Gemma3 (vocabulary 262144, soft-capping 30) train a few SGD steps in bfloat16 on CUDA,
first stock, then patched by ``forward_rewrite.install()``, from the same weights on the
same batches.

Checks, per model: the patch is installed and the fused path runs (logits None); every
step's loss matches the stock one within bfloat16 tolerance (2e-2 relative); at step 0
(same weights) every parameter's gradient is within 2e-2 (normwise relative) of stock and,
against a float32 run of the same weights, no worse than 1.25x stock's own error + 1e-3;
the patched run's extra peak memory is lower. Prints a table; exits 1 on a failed check.

    python3 gpu/e2e.py             (on the GPU machine; gpu/run.sh e2e stages it)
    python3 gpu/e2e.py --smoke     (anywhere: small sizes on the CPU, to catch script errors)
"""

import torch  # noqa: I001  (first: cudarc loads the CUDA libraries torch brought in)

import copy
import sys

import forward_rewrite
import transformers

SMOKE = "--smoke" in sys.argv
DEVICE = "cpu" if SMOKE else "cuda"
STEPS = 3
BATCH, SEQ = (2, 64) if SMOKE else (4, 1024)
VOCAB_DIVISOR = 64 if SMOKE else 1
LR = 1e-2


def configs():
    common = {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return {
        "llama": (
            "LlamaForCausalLM",
            transformers.LlamaConfig(vocab_size=128256 // VOCAB_DIVISOR, **common),
        ),
        "gemma3": (
            "Gemma3ForCausalLM",
            transformers.Gemma3TextConfig(
                vocab_size=262144 // VOCAB_DIVISOR,
                final_logit_softcapping=30.0,
                sliding_window=256,
                **common,
            ),
        ),
    }


def batches(vocab):
    g = torch.Generator(device=DEVICE).manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, vocab, (BATCH, SEQ), device=DEVICE, generator=g)
        labels = ids.clone()
        labels[:, : SEQ // 16] = -100  # prompts
        labels[1, -SEQ // 10 :] = -100  # padding
        out.append({"input_ids": ids, "labels": labels})
    return out


def normwise(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def train(model, data):
    """SGD steps; returns (losses, step-0 gradients, extra peak bytes, fused?)."""
    if SMOKE:
        base = 0
    else:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    losses, grads0, fused = [], None, True
    for step, batch in enumerate(data):
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        fused &= out.logits is None
        out.loss.backward()
        losses.append(out.loss.item())
        if step == 0:
            grads0 = {
                n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
            }
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-LR)
        del out
    if SMOKE:
        return losses, grads0, 0, fused
    torch.cuda.synchronize()
    return losses, grads0, torch.cuda.max_memory_allocated() - base, fused


def step0_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "CPU (smoke)" if SMOKE else torch.cuda.get_device_name()
    print(
        f"device: {device}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, forward_rewrite {forward_rewrite.__version__}"
    )
    failures = []
    rows = []
    for name, (class_name, config) in configs().items():
        config._attn_implementation = "sdpa"
        cls = getattr(transformers, class_name)
        torch.manual_seed(0)
        init = cls(config).to(torch.bfloat16).state_dict()
        data = batches(config.vocab_size)

        forward_rewrite.uninstall()
        # float32 reference of step 0 (same bf16 weights, upcast)
        ref_model = cls(config).to(DEVICE).float().train()
        ref_model.load_state_dict({k: v.float() for k, v in init.items()})
        ref = step0_grads(ref_model, data[0])
        del ref_model
        runs = {}
        for variant in ("stock", "patched"):
            if variant == "patched":
                forward_rewrite.install()
            model = cls(config).to(DEVICE, torch.bfloat16).train()
            model.load_state_dict(copy.deepcopy(init))
            runs[variant] = train(model, data)
            del model
        entry = next(
            c for c in forward_rewrite.audit()["classes"] if c["qualname"] == class_name
        )
        forward_rewrite.uninstall()

        (s_loss, s_grad, s_peak, _), (p_loss, p_grad, p_peak, fused) = (
            runs["stock"],
            runs["patched"],
        )
        if not (entry["installed"] and fused):
            failures.append(
                f"{name}: patch installed={entry['installed']}, fused={fused}"
            )
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(p_loss, s_loss))
        if loss_err > 2e-2:
            failures.append(f"{name}: loss differs from stock by {loss_err:.2e}")
        worst_vs_stock, worst_name = 0.0, ""
        stock_ref = patched_ref = 0.0
        for n, g in p_grad.items():
            e = normwise(g, s_grad[n])
            if e > worst_vs_stock:
                worst_vs_stock, worst_name = e, n
            es, ep = normwise(s_grad[n], ref[n]), normwise(g, ref[n])
            stock_ref, patched_ref = max(stock_ref, es), max(patched_ref, ep)
            if ep > 1.25 * es + 1e-3:
                failures.append(
                    f"{name}: {n} gradient vs float32 {ep:.2e} > stock's {es:.2e}"
                )
        if worst_vs_stock > 2e-2:
            failures.append(
                f"{name}: {worst_name} gradient differs from stock {worst_vs_stock:.2e}"
            )
        if p_peak >= s_peak and not SMOKE:
            failures.append(f"{name}: patched peak {p_peak} >= stock {s_peak}")
        rows.append(
            (
                name,
                config.vocab_size,
                s_loss,
                p_loss,
                loss_err,
                worst_vs_stock,
                worst_name,
                stock_ref,
                patched_ref,
                s_peak / 2**30,
                p_peak / 2**30,
            )
        )

    print(f"\n{STEPS} SGD steps, bf16, {BATCH}x{SEQ} tokens, lr {LR}\n")
    print(
        "| model | vocab | stock losses | patched losses | max loss rel diff | worst grad diff vs stock (param) | worst grad err vs fp32: stock / patched | extra peak GiB: stock / patched |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {', '.join(f'{x:.4f}' for x in r[2])} | "
            f"{', '.join(f'{x:.4f}' for x in r[3])} | {r[4]:.1e} | {r[5]:.1e} ({r[6]}) | "
            f"{r[7]:.1e} / {r[8]:.1e} | {r[9]:.2f} / {r[10]:.2f} |"
        )
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("\nall end-to-end checks passed")


if __name__ == "__main__":
    main()
