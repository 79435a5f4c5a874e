"""Simulated time to accuracy: synchronous rounds against FedBuff on the digits.

Runs the embedded digits job (FedAvg, 100 Dirichlet clients) on the simulated
clock with log-normal device speeds, three ways, and prints one JSON line per
run with the simulated seconds and the server steps at which test accuracy
first reaches each target:

* ``sync``: synchronous rounds of 10 clients, waiting for the slowest;
* ``sync_deadline``: 1.3x over-selection, the first 10 to finish, a deadline
  with partial work (FedNova-normalised);
* ``fedbuff``: FedBuff with 30 clients in flight and a buffer of 10.

Usage:
  python benchmarks/time_to_accuracy.py --output benchmarks/results_time_to_accuracy.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedjaxsim.runner.config import ExperimentConfig, replace
from fedjaxsim.runner.experiment import run_experiment
from fedjaxsim.runner.writers import read_metrics

CLOCK = {"system.speed": "lognormal", "evaluation.every": 2, "evaluation.per_client_every": 0}
RUNS = {
    "sync": {},
    "sync_deadline": {
        "system.over_selection": 1.3,
        "system.deadline_seconds": 30.0,
        "system.late_clients": "partial",
    },
    "fedbuff": {
        "asynchrony.mode": "fedbuff",
        "asynchrony.buffer_size": 10,
        "asynchrony.concurrency": 30,
    },
}


def first_reaching(records: list[dict], target: float) -> tuple[float | None, int | None]:
    for record in records:
        if record.get("test_accuracy", 0.0) >= target:
            return record["simulated_seconds"], record["round"]
    return None, None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="synchronous rounds")
    parser.add_argument("--targets", default="0.8,0.85,0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        for name, overrides in RUNS.items():
            # A FedBuff step waits for a buffer, not for the slowest of a cohort, so it
            # steps far more often: 3x the steps cover a comparable simulated time.
            rounds = args.rounds * (3 if name == "fedbuff" else 1)
            config = replace(
                ExperimentConfig(),
                **CLOCK,
                **overrides,
                **{
                    "training.rounds": rounds,
                    "seed": args.seed,
                    "output_dir": str(Path(folder) / name),
                    "logging.tensorboard": False,
                },
            )
            summary = run_experiment(config, progress=False)
            records = read_metrics(Path(folder) / name / "metrics.jsonl")
            line = {
                "run": name,
                "server_steps": rounds,
                "final_test_accuracy": summary["final_test_accuracy"],
                "final_simulated_seconds": records[-1]["simulated_seconds"],
                "clients_trained": sum(r.get("arrived_clients", 0) for r in records),
            }
            for target in targets:
                seconds, step = first_reaching(records, target)
                line[f"simulated_s_to_{target}"] = seconds
                line[f"steps_to_{target}"] = step
            print(json.dumps(line), flush=True)
            if args.output:
                with open(args.output, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
