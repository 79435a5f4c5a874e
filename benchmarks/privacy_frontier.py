"""The privacy-utility frontier of configs/digits_dp_fedavg.yaml.

Runs the preset at several target epsilons (each resolved to the smallest
noise multiplier that meets it) and without DP, for a few seeds, and writes
one JSON line per run (target, epsilon reached, noise multiplier, final and
best test accuracy) to benchmarks/results_privacy_frontier.jsonl, then a
Markdown table of the medians and the privacy-utility plot of the runs
(``fedjaxsim plot``'s third row).

    python benchmarks/privacy_frontier.py [--seeds 0 1 2] [--targets 1 2 4 8 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "digits_dp_fedavg.yaml"


def run_one(target: float | None, seed: int, folder: Path) -> dict:
    from fedjaxsim.runner.config import load_config, replace
    from fedjaxsim.runner.experiment import run_experiment

    dotted = {"seed": seed, "logging.progress": False, "checkpoint.every": 0}
    if target is None:
        dotted["privacy.target_epsilon"] = None
    else:
        dotted["privacy.target_epsilon"] = target
    config = replace(load_config(PRESET), output_dir=str(folder), **dotted)
    tic = time.perf_counter()
    summary = run_experiment(config)
    return {
        "target_epsilon": target,
        "seed": seed,
        "final_epsilon": summary.get("final_epsilon"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "seconds": time.perf_counter() - tic,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 10])
    parser.add_argument("--work", default="/tmp/privacy_frontier")
    parser.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results_privacy_frontier.jsonl")
    )
    arguments = parser.parse_args()
    work = Path(arguments.work)
    rows = []
    for target in [*arguments.targets, None]:
        for seed in arguments.seeds:
            name = f"eps{target:g}_seed{seed}" if target is not None else f"nodp_seed{seed}"
            row = run_one(target, seed, work / name)
            row["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(arguments.output, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(
        "\n| target epsilon | epsilon reached | noise multiplier | final accuracy (median) | "
        "min - max |"
    )
    print("|---|---|---|---|---|")
    for target in [*arguments.targets, None]:
        group = [r for r in rows if r["target_epsilon"] == target]
        accuracies = [r["final_test_accuracy"] for r in group]
        reached = "-" if target is None else f"{group[0]['final_epsilon']:.3f}"
        noise = "0" if target is None else f"{group[0]['noise_multiplier']:.3f}"
        label = "no DP" if target is None else f"{target:g}"
        print(
            f"| {label} | {reached} | {noise} | {statistics.median(accuracies):.4f} | "
            f"{min(accuracies):.4f} - {max(accuracies):.4f} |"
        )
    from fedjaxsim.runner.cli import main as cli

    runs = [str(work / f"eps{t:g}_seed{arguments.seeds[0]}") for t in arguments.targets]
    cli(["plot", *runs, "--output", str(work / "frontier.png")])


if __name__ == "__main__":
    main()
