#!/usr/bin/env bash
# On the GPU machine: install the wheels carried next to this folder, then run the steps.
#   .gpu/gpu/run.sh check            correctness (gpu/check.py)
#   .gpu/gpu/run.sh bench ARGS...    benchmark (gpu/bench.py ARGS)
#   .gpu/gpu/run.sh e2e              tiny Llama and Gemma3 patched by install() (gpu/e2e.py),
#                                    on the pinned transformers when .gpu/transformers/ has it
#   .gpu/gpu/run.sh packing          packed sequences: flex isolation, syncs, step time
#                                    (gpu/packing.py), on the pinned transformers likewise
#   .gpu/gpu/run.sh check_fusions    correctness of the fused decoder ops (gpu/check_fusions.py)
#   .gpu/gpu/run.sh bench_fusions ARGS...  their speed against stock and Liger (gpu/bench_fusions.py)
#                                    (both on the pinned transformers when it imports, as e2e)
#   .gpu/gpu/run.sh check_attnres | bench_attnres ARGS...  the AttnRes mix op (gpu/*_attnres.py)
#   .gpu/gpu/run.sh step_bench ARGS...  training-step time and peak memory of Llama-3.2-1B and
#                                    Qwen3-0.6B shapes: stock, ours, Liger (gpu/step_bench.py;
#                                    --models gemma2-2b,mistral-7b-16l,phi3-mini,qwen3-moe-12l,glm-9b-12l,gemma4-12l,qwen3.5-8l,gpt-oss-6l,granite4-h-8l
#                                    for the rest of issue 10's table; --methods stock,ours,attnres,ours+attnres
#                                    for issue 12's training run with Attention Residuals on)
#   .gpu/gpu/run.sh distributed ARGS...  stock vs fused under DDP, FSDP2, DeepSpeed ZeRO, PEFT and
#                                    gradient checkpointing (gpu/distributed.py --check ARGS) through
#                                    torchrun on NPROC GPUs (default 1: world size 1, NCCL, bf16);
#                                    NPROC=2 for the two-GPU run; table in $OUT/distributed.log,
#                                    every number in $OUT/distributed.json
#   VARIANT=NAME .gpu/gpu/run.sh STEP ARGS...  the same step with the wheel gpu/stage-variant.sh
#                                    staged as NAME (a branch's kernels) instead of main's, in its
#                                    own site folder and kernel cache; logs named NAME-STEP.log
#   KERNELS=NAME .gpu/gpu/run.sh STEP ARGS...  the same step with the kernel files of
#                                    .gpu/kvar/NAME/ (a copy of kernels/ with edits: same kernel
#                                    names and parameter blocks) compiled in place of the wheel's
#                                    (FORWARD_REWRITE_KERNEL_DIR); logs named kNAME-STEP.log
# Expects the layout that gpu/stage.sh makes: .gpu/wheels/*.whl (ours and the competitors')
# and .gpu/gpu/ (these scripts). Logs go to $OUT (the device tool's output folder).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
variant="${VARIANT:-}"
site="/tmp/site${variant:+-$variant}"
tag="${variant:+$variant-}${KERNELS:+k$KERNELS-}"
if [[ -n "${KERNELS:-}" ]]; then
  export FORWARD_REWRITE_KERNEL_DIR="$here/../kvar/$KERNELS"
  [[ -d "$FORWARD_REWRITE_KERNEL_DIR" ]] || { echo "no kernel folder $FORWARD_REWRITE_KERNEL_DIR" >&2; exit 2; }
fi
if [[ ! -d "$site/forward_rewrite" ]]; then
  wheels=("$here"/../wheels/*.whl)
  if [[ -n "$variant" ]]; then
    # the competitors' wheels as staged, ours from the variant's folder
    wheels=($(printf '%s\n' "${wheels[@]}" | grep -v '/forward_rewrite-') "$here"/../variants/"$variant"/*.whl)
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" || exit 1
fi
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
export FORWARD_REWRITE_KERNEL_CACHE="/tmp/forward-rewrite-kernels${variant:+-$variant}"
if [[ -d "$here/../transformers" && ! -d /tmp/site-tf/transformers ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tf "$here"/../transformers/*.whl
fi
# the pinned transformers when it imports with this machine's other packages
pinned_transformers() {
  if PYTHONPATH=/tmp/site-tf:$PYTHONPATH python3 -c "import transformers.models.llama.modeling_llama" 2>/dev/null; then
    export PYTHONPATH=/tmp/site-tf:$PYTHONPATH
  fi
}
step="$1"
shift
case "$step" in
  check) python3 "$here/check.py" "$@" 2>&1 | tee -a "$OUT/${tag}check.log" ;;
  bench) python3 "$here/bench.py" --out "$OUT/${tag}bench.json" "$@" 2>&1 | tee -a "$OUT/${tag}bench.log" ;;
  e2e)
    pinned_transformers
    python3 "$here/e2e.py" "$@" 2>&1 | tee -a "$OUT/${tag}e2e.log" ;;
  check_attnres|bench_attnres)
    pinned_transformers
    python3 "$here/$step.py" "$@" 2>&1 | tee -a "$OUT/${tag}$step.log" ;;
  step_bench)
    pinned_transformers
    python3 "$here/step_bench.py" --json "$OUT/${tag}step_bench.json" "$@" 2>&1 | tee -a "$OUT/${tag}step_bench.log" ;;
  packing)
    pinned_transformers
    python3 "$here/packing.py" "$@" 2>&1 | tee -a "$OUT/${tag}packing.log" ;;
  check_fusions)
    pinned_transformers
    python3 "$here/check_fusions.py" "$@" 2>&1 | tee -a "$OUT/${tag}check_fusions.log" ;;
  bench_fusions)
    pinned_transformers
    python3 "$here/bench_fusions.py" --out "$OUT/${tag}bench_fusions.json" "$@" 2>&1 | tee -a "$OUT/${tag}bench_fusions.log" ;;
  distributed)
    pinned_transformers
    python3 -m torch.distributed.run --standalone --nproc-per-node="${NPROC:-1}" \
      "$here/distributed.py" --check --json "$OUT/${tag}distributed.json" "$@" 2>&1 | tee -a "$OUT/${tag}distributed.log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
