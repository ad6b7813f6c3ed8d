#!/usr/bin/env bash
# Fetch the framework releases pinned in lint-pins.txt from PyPI (pip download, no
# dependencies), check their sha256 and unpack them into corpus/cache/lint/PACKAGE-VERSION/
# (the sdist's top directory stripped, so the package is at .../src/PACKAGE for src layouts).
# Idempotent: a release already unpacked and verified is skipped.
# Usage: corpus/fetch-lint.sh [PACKAGE-VERSION...]   (default: every pin)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache/lint"
python="${PYTHON:-python3}"
mkdir -p "$cache/dist"

want=("$@")
while read -r package version sha file; do
  [[ -z "$package" || "$package" == \#* ]] && continue
  if ((${#want[@]})) && [[ ! " ${want[*]} " == *" $package-$version "* ]]; then continue; fi
  dest="$cache/$package-$version"
  if [[ -f "$dest/.verified" && "$(cat "$dest/.verified")" == "$sha" ]]; then continue; fi
  archive="$cache/dist/$file"
  if [[ ! -f "$archive" ]]; then
    echo "corpus: downloading $package $version from PyPI" >&2
    case "$file" in
      *.whl) kind=(--only-binary=:all:) ;;
      *) kind=(--no-binary=:all:) ;;
    esac
    "$python" -m pip download --quiet --no-deps "${kind[@]}" --dest "$cache/dist" "$package==$version"
  fi
  got="$(sha256sum "$archive" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "corpus: sha256 mismatch for $archive: expected $sha, got $got" >&2
    rm -f "$archive"
    exit 1
  fi
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  case "$file" in
    *.whl) "$python" -m zipfile -e "$archive" "$dest.tmp" ;;
    *.tar.gz) tar -xzf "$archive" -C "$dest.tmp" --strip-components=1 ;;
    *) echo "corpus: do not know how to unpack $file" >&2; exit 1 ;;
  esac
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "$sha" > "$dest/.verified"
  echo "corpus: $package $version ready in $dest" >&2
done < "$here/lint-pins.txt"
