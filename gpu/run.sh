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
#                                    --models gemma2-2b,mistral-7b-16l,phi3-mini,qwen3-moe-12l,glm-9b-12l
#                                    for the rest of issue 10's table; --methods stock,ours,attnres,ours+attnres
#                                    for issue 12's training run with Attention Residuals on)
#   .gpu/gpu/run.sh distributed ARGS...  stock vs fused under DDP, FSDP2, DeepSpeed ZeRO, PEFT and
#                                    gradient checkpointing (gpu/distributed.py --check ARGS) through
#                                    torchrun on NPROC GPUs (default 1: world size 1, NCCL, bf16);
#                                    NPROC=2 for the two-GPU run; table in $OUT/distributed.log,
#                                    every number in $OUT/distributed.json
# Expects the layout that gpu/stage.sh makes: .gpu/wheels/*.whl (ours and the competitors')
# and .gpu/gpu/ (these scripts). Logs go to $OUT (the device tool's output folder).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if [[ ! -d /tmp/site/forward_rewrite ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$here"/../wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export FORWARD_REWRITE_KERNEL_CACHE=/tmp/forward-rewrite-kernels
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
  check) python3 "$here/check.py" "$@" 2>&1 | tee -a "$OUT/check.log" ;;
  bench) python3 "$here/bench.py" --out "$OUT/bench.json" "$@" 2>&1 | tee -a "$OUT/bench.log" ;;
  e2e)
    pinned_transformers
    python3 "$here/e2e.py" "$@" 2>&1 | tee -a "$OUT/e2e.log" ;;
  check_attnres|bench_attnres)
    pinned_transformers
    python3 "$here/$step.py" "$@" 2>&1 | tee -a "$OUT/$step.log" ;;
  step_bench)
    pinned_transformers
    python3 "$here/step_bench.py" --json "$OUT/step_bench.json" "$@" 2>&1 | tee -a "$OUT/step_bench.log" ;;
  packing)
    pinned_transformers
    python3 "$here/packing.py" "$@" 2>&1 | tee -a "$OUT/packing.log" ;;
  check_fusions)
    pinned_transformers
    python3 "$here/check_fusions.py" "$@" 2>&1 | tee -a "$OUT/check_fusions.log" ;;
  bench_fusions)
    pinned_transformers
    python3 "$here/bench_fusions.py" --out "$OUT/bench_fusions.json" "$@" 2>&1 | tee -a "$OUT/bench_fusions.log" ;;
  distributed)
    pinned_transformers
    python3 -m torch.distributed.run --standalone --nproc-per-node="${NPROC:-1}" \
      "$here/distributed.py" --check --json "$OUT/distributed.json" "$@" 2>&1 | tee -a "$OUT/distributed.log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
