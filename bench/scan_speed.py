"""Scan speed: `forward-rewrite scan` (release build) vs CPython's `ast.parse`, same files.

Usage: python3 bench/scan_speed.py [TRANSFORMERS_DIR] [--runs N]
Default: corpus/cache/transformers-5.23.0/transformers (run corpus/fetch.sh first).
Prints the median wall time of N runs of the whole scan (walk, parse, index, analyse,
JSON written to /dev/null) and the time CPython needs to only parse the same files.
"""

import argparse
import ast
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modeling_files(tree: Path) -> list[Path]:
    models = tree / "models" if (tree / "models").is_dir() else tree
    return sorted(
        p
        for p in models.rglob("modeling_*.py")
        if not p.name.startswith(("modeling_tf_", "modeling_flax_"))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "corpus/cache/transformers-5.23.0/transformers"
    parser.add_argument("tree", nargs="?", type=Path, default=default)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if not (args.tree / "__init__.py").is_file():
        print(
            f"{args.tree} is not a transformers tree: run corpus/fetch.sh",
            file=sys.stderr,
        )
        return 2

    subprocess.run(
        ["cargo", "build", "--release", "--locked", "-p", "forward-rewrite"],
        cwd=ROOT,
        check=True,
    )
    binary = ROOT / "target/release/forward-rewrite"
    command = [str(binary), "scan", str(args.tree), "--json"]
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)

    files = modeling_files(args.tree)
    size = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    for path in files:
        ast.parse(path.read_bytes(), filename=str(path))
    cpython = time.perf_counter() - start

    cores = os.cpu_count()
    print(f"files: {len(files)} modeling files, {size / 1e6:.1f} MB, {cores} cores")
    print(f"command: {' '.join(command)} > /dev/null")
    print(
        f"forward-rewrite scan (release, median of {args.runs}): "
        f"{statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f})"
    )
    print(f"CPython {sys.version.split()[0]} ast.parse only (1 run):   {cpython:.3f} s")
    print(f"ratio: {cpython / statistics.median(times):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
