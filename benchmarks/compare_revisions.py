"""Throughput of this working tree against an earlier revision, in the same run.

Each revision's own ``benchmarks/throughput.py`` runs in a fresh process
(imports resolve to that revision's tree), the two alternating sample after
sample (base then head, then head then base, ...), so both see the same
machine load. One JSON line per sample, then one summary line per model and
cohort:

  head_over_base      median over samples of head examples/s / base examples/s
                      (paired: each sample's two processes ran back to back)
  head_ratio_to_limit, base_ratio_to_limit
                      each revision's median ratio to its own centralized limit
  *_compile_s         median compile time of each revision

Usage:
  python benchmarks/compare_revisions.py --base 17752c0 --model logreg,dense,cnn --cohort 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def throughput_sample(tree: Path, model: str, cohort: int, host_devices: int) -> dict:
    """One ``throughput.py`` run of ``tree`` (one repeat); its JSON record."""
    environment = dict(os.environ, PYTHONPATH=str(tree))
    command = [
        sys.executable,
        str(tree / "benchmarks" / "throughput.py"),
        "--model",
        model,
        "--cohort",
        str(cohort),
        "--repeats",
        "1",
        "--host-devices",
        str(host_devices),
    ]
    result = subprocess.run(
        command, cwd=tree, env=environment, capture_output=True, text=True, check=True
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--model", default="logreg,dense,cnn")
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--samples", type=int, default=3, help="processes per revision and model")
    parser.add_argument("--host-devices", type=int, default=1)
    parser.add_argument("--output", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    with tempfile.TemporaryDirectory() as scratch:
        base_tree = Path(scratch) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base_tree), args.base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            trees = {"base": base_tree, "head": ROOT}
            for model in args.model.split(","):
                samples = {"base": [], "head": []}
                for index in range(args.samples):
                    order = ("base", "head") if index % 2 == 0 else ("head", "base")
                    for revision in order:
                        record = throughput_sample(
                            trees[revision], model, args.cohort, args.host_devices
                        )
                        samples[revision].append(record)
                        emit(
                            {
                                "revision": revision,
                                "rev": args.base if revision == "base" else "HEAD",
                                "sample": index,
                                **record,
                            }
                        )
                paired = [
                    head["examples_per_s"] / base["examples_per_s"]
                    for head, base in zip(samples["head"], samples["base"])
                ]
                summary = {
                    "summary": True,
                    "model": model,
                    "cohort": args.cohort,
                    "base": args.base,
                    "host_devices": args.host_devices,
                    "samples": args.samples,
                    "head_over_base": round(statistics.median(paired), 3),
                    "head_over_base_samples": [round(r, 3) for r in paired],
                }
                for revision, records in samples.items():
                    summary[f"{revision}_examples_per_s"] = statistics.median(
                        r["examples_per_s"] for r in records
                    )
                    summary[f"{revision}_ratio_to_limit"] = statistics.median(
                        r["ratio_to_limit"] for r in records
                    )
                    summary[f"{revision}_compile_s"] = statistics.median(
                        r["compile_s"] for r in records
                    )
                emit(summary)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False
            )


if __name__ == "__main__":
    main()
