"""Command line: ``fedjaxsim run [options]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fedjaxsim.runner.platform import configure_xla_cpu
from fedjaxsim.runner.experiment import ALGORITHMS, DATASETS, ExperimentConfig, run_experiment
from fedjaxsim.models import MODEL_NAMES

_DEFAULTS = ExperimentConfig()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjaxsim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a federated experiment")
    run.add_argument("--dataset", choices=DATASETS, default=_DEFAULTS.dataset)
    run.add_argument("--num-clients", type=int, default=_DEFAULTS.num_clients)
    run.add_argument("--dirichlet-alpha", type=float, default=_DEFAULTS.dirichlet_alpha)
    run.add_argument("--model", choices=MODEL_NAMES, default=_DEFAULTS.model)
    run.add_argument("--algorithm", choices=ALGORITHMS, default=_DEFAULTS.algorithm)
    run.add_argument("--rounds", type=int, default=_DEFAULTS.rounds)
    run.add_argument("--cohort-size", type=int, default=_DEFAULTS.cohort_size)
    run.add_argument("--local-epochs", type=int, default=_DEFAULTS.local_epochs)
    run.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    run.add_argument("--max-local-steps", type=int, default=_DEFAULTS.max_local_steps)
    run.add_argument("--client-lr", dest="client_learning_rate", type=float,
                     default=_DEFAULTS.client_learning_rate)
    run.add_argument("--server-lr", dest="server_learning_rate", type=float,
                     default=_DEFAULTS.server_learning_rate)
    run.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    run.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every)
    run.add_argument("--output-dir", default=_DEFAULTS.output_dir)
    run.add_argument("--num-lanes", type=int, default=None,
                     help="pack clients into this many vmap lanes (default: the plan's)")
    run.add_argument("--clients-per-chunk", type=int, default=None)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_xla_cpu()
    arguments = _parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    values = {k: v for k, v in vars(arguments).items() if k in fields}
    try:
        config = ExperimentConfig(**values)
    except ValueError as error:
        print(f"fedjaxsim: invalid option: {error}", file=sys.stderr)
        return 2
    summary = run_experiment(config, progress=not arguments.quiet)
    print(
        f"done: {summary['rounds']} rounds in {summary['wall_seconds']:.1f} s, "
        f"final test accuracy {summary['final_test_accuracy']:.4f} "
        f"(best {summary['best_test_accuracy']:.4f}), final train loss "
        f"{summary['final_train_loss']:.4f}; outputs in {summary['output_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
