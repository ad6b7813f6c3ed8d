"""The fused-loss pass's coverage per pinned transformers release: classes analysed,
patched (by shape: `self.loss_function` or the classic shift + CrossEntropyLoss; by name:
`*ForCausalLM`, `*ForConditionalGeneration`, other names), refused per reason code.

    python bench/coverage.py                 # every version pinned in corpus/pins.txt
    python bench/coverage.py --versions 4.45.2 5.23.0

Prints a markdown table (the one in BENCHMARKS.md). Needs the release build of the CLI
(`cargo build --release -p forward-rewrite`) and the fetched corpus (`corpus/fetch.sh`).
"""

import argparse
import collections
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pinned_versions():
    lines = (ROOT / "corpus" / "pins.txt").read_text().splitlines()
    return [
        line.split()[0] for line in lines if line.strip() and not line.startswith("#")
    ]


def audit(version):
    tree = ROOT / "corpus" / "cache" / f"transformers-{version}" / "transformers"
    if not tree.is_dir():
        raise SystemExit(f"{tree} is missing: run corpus/fetch.sh")
    binary = ROOT / "target" / "release" / "forward-rewrite"
    if not binary.is_file():
        raise SystemExit(
            f"{binary} is missing: cargo build --release -p forward-rewrite"
        )
    done = subprocess.run(
        [str(binary), "scan", str(tree), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="*", default=None)
    args = parser.parse_args()
    versions = args.versions or pinned_versions()
    docs = {v: audit(v) for v in versions}
    rows = collections.OrderedDict()

    def put(label, version, value):
        rows.setdefault(label, {})[version] = value

    reasons = sorted({r for d in docs.values() for r in d["summary"]["reasons"]})
    for version, doc in docs.items():
        classes = doc["classes"]
        patched = [c for c in classes if c["verdict"] == "patched"]
        put("modeling files", version, doc["summary"]["files"])
        put("classes analysed", version, len(classes))
        put("**patched**", version, f"**{len(patched)}**")
        for style in ("loss_function", "cross_entropy"):
            n = sum(c.get("loss_style") == style for c in patched)
            put(f"  patched, `{style}` style", version, n)
        for suffix in ("ForCausalLM", "ForConditionalGeneration"):
            n = sum(c["qualname"].endswith(suffix) for c in patched)
            put(f"  patched `*{suffix}`", version, n)
        others = [
            c["qualname"]
            for c in patched
            if not c["qualname"].endswith(("ForCausalLM", "ForConditionalGeneration"))
        ]
        put("  patched, other names", version, len(others))
        for kind in ("softcap", "scale_multiply", "scale_divide"):
            n = sum(any(t["kind"] == kind for t in c["transforms"]) for c in patched)
            put(f"  with a lowered `{kind}`", version, n)
        put("refused", version, doc["summary"]["refused"])
        for reason in reasons:
            put(f"  `{reason}`", version, doc["summary"]["reasons"].get(reason, 0))
        put("failed", version, doc["summary"]["failed"])
    print("| | " + " | ".join(versions) + " |")
    print("| --- |" + " ---: |" * len(versions))
    for label, values in rows.items():
        cells = " | ".join(str(values.get(v, 0)) for v in versions)
        print(f"| {label} | {cells} |")


if __name__ == "__main__":
    main()
