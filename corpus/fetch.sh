#!/usr/bin/env bash
# Fetch the pinned transformers wheels from PyPI, check their sha256 and unpack them into
# corpus/cache/transformers-VERSION/ (git-ignored). Idempotent: a version already unpacked
# and verified is skipped. Usage: corpus/fetch.sh [VERSION...]   (default: every pin)
# Without arguments it then runs fetch-lint.sh (the framework releases `lint` is tested on).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache"
python="${PYTHON:-python3}"
mkdir -p "$cache/wheels"

want=("$@")
while read -r version sha; do
  [[ -z "$version" || "$version" == \#* ]] && continue
  if ((${#want[@]})) && [[ ! " ${want[*]} " == *" $version "* ]]; then continue; fi
  dest="$cache/transformers-$version"
  if [[ -f "$dest/.verified" ]]; then continue; fi
  wheel="$cache/wheels/transformers-$version-py3-none-any.whl"
  if [[ ! -f "$wheel" ]]; then
    echo "corpus: downloading transformers $version from PyPI" >&2
    "$python" -m pip download --quiet --no-deps --only-binary=:all: \
      --dest "$cache/wheels" "transformers==$version"
  fi
  got="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "corpus: sha256 mismatch for $wheel: expected $sha, got $got" >&2
    rm -f "$wheel"
    exit 1
  fi
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  "$python" -m zipfile -e "$wheel" "$dest.tmp"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "$sha" > "$dest/.verified"
  echo "corpus: transformers $version ready in $dest/transformers" >&2
done < "$here/pins.txt"

if ((${#want[@]} == 0)); then
  "$here/fetch-lint.sh"
fi
