#!/usr/bin/env bash
# Here (no GPU needed), after gpu/stage.sh: build the wheel of a git revision (a branch with
# kernel changes not yet checked on a GPU) and stage it beside main's as a variant, so that one
# device call checks and times both:
#   gpu/stage-variant.sh REV NAME [DEST]      (DEST defaults to .gpu; the wheel goes to
#                                              DEST/variants/NAME/)
#   on the GPU:  .gpu/gpu/run.sh bench_fusions && VARIANT=NAME .gpu/gpu/run.sh bench_fusions
# The build shares this checkout's target folder (only what the revision changed recompiles).
# A wheel is ~10 MB: the device tool carries 64 MiB in all, so two or three variants fit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: gpu/stage-variant.sh REV NAME [DEST]" >&2
  exit 2
fi
rev="$1" name="$2" dest="${3:-.gpu}"
if [[ ! "$name" =~ ^[A-Za-z0-9_.-]+$ ]]; then
  echo "stage-variant: NAME must be letters, digits, '.', '_' or '-': $name" >&2
  exit 2
fi
if [[ ! -d "$dest/wheels" ]]; then
  echo "stage-variant: $dest/wheels is missing: run gpu/stage.sh first" >&2
  exit 2
fi
commit="$(git rev-parse --verify "$rev^{commit}")"
tree="$(mktemp -d)"
trap 'git worktree remove --force "$tree"' EXIT
git worktree add -q --detach "$tree" "$commit"
rm -rf "$dest/variants/$name"
CARGO_TARGET_DIR="$PWD/target" "${MATURIN:-maturin}" build --release --locked \
  -m "$tree/runtime/Cargo.toml" -o "$dest/variants/$name"
echo "$commit" > "$dest/variants/$name/REVISION"
du -sh "$dest"
