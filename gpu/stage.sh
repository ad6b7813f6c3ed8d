#!/usr/bin/env bash
# Here (no GPU needed): build the abi3 wheel and stage it, the competitors' wheels and the
# GPU scripts (check, bench, e2e, check_fusions, bench_fusions: every gpu/*.py) into the
# folder that travels to the GPU machine. Liger Kernel's wheel serves bench.py (its fused
# loss) and bench_fusions.py (its RMSNorm, RoPE, SwiGLU and GeGLU).
#   gpu/stage.sh [DEST]          DEST defaults to .gpu (git-ignored; the device tool carries it)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.gpu}"
rm -rf "$dest" && mkdir -p "$dest/wheels" "$dest/gpu" "$dest/transformers"
"${MATURIN:-maturin}" build --release --locked -m runtime/Cargo.toml -o "$dest/wheels"
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform any -d "$dest/wheels" \
  liger-kernel==0.8.5 unsloth-zoo==2026.10.9 cut-cross-entropy==25.1.1
# distributed.py's adapters and DeepSpeed (best effort: a case whose package does not import
# there is reported as such, the others run). deepspeed ships an sdist: built here (pure
# Python); its small dependencies ride along (pydantic with its resolved dependencies: the
# device's Python lacks it, and deepspeed's config classes need it).
if ! python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest/wheels" \
  peft==0.21.2 accelerate hjson py-cpuinfo msgpack ninja einops \
  || ! python -m pip download --quiet --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest/wheels" pydantic psutil tqdm \
  || ! python -m pip wheel --quiet --no-deps --no-build-isolation -w "$dest/wheels" deepspeed==0.19.8; then
  echo "stage: peft/accelerate/deepspeed not staged; gpu/distributed.py skips their cases" >&2
fi
corpus/fetch.sh >/dev/null && cp corpus/cache/wheels/transformers-5.23.0-*.whl "$dest/transformers/"
cp gpu/*.py gpu/run.sh "$dest/gpu/"
du -sh "$dest"
