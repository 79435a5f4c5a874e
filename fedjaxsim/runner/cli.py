"""Command line: ``fedjaxsim run [--config FILE.yaml] [overrides]`` and ``fedjaxsim plot``.

``fedjaxsim run --help`` lists every config key as a flag; see
:mod:`fedjaxsim.runner.config`.
"""

from __future__ import annotations

import argparse
import sys

from fedjaxsim.runner.platform import configure_xla_cpu, default_host_device_count

USAGE = """usage: fedjaxsim run [--config FILE.yaml] [--resume] [--quiet] [--KEY VALUE ...]
       fedjaxsim plot DIR [DIR ...] --output FILE.png

  run    run (or resume) a federated experiment; `fedjaxsim run --help` lists the keys
  plot   accuracy and loss against rounds and wall time, several runs side by side
"""


def _run(argv: list[str]) -> int:
    from fedjaxsim.runner.config import ConfigError, parse_run_arguments

    try:
        config, resume_required = parse_run_arguments(argv)
        from fedjaxsim.runner.experiment import run_experiment

        summary = run_experiment(config, resume="require" if resume_required else "auto")
    except ConfigError as error:
        print(f"fedjaxsim: invalid config: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"fedjaxsim: {error}", file=sys.stderr)
        return 2
    accuracy = summary["final_test_accuracy"]
    best = summary["best_test_accuracy"]
    print(
        f"done: {summary['rounds']} rounds, {summary['wall_seconds']:.1f} s of training, "
        f"final test accuracy {accuracy:.4f} (best {best:.4f}), final train loss "
        f"{summary['final_train_loss']:.4f}; outputs in {summary['output_dir']}"
    )
    return 0


def _plot(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedjaxsim plot",
        description="Test accuracy and loss against rounds and against wall time, one line "
        "per run, from the metrics.jsonl of each output folder.",
    )
    parser.add_argument("folders", nargs="+", metavar="DIR", help="output folders of runs")
    parser.add_argument("--output", "-o", required=True, metavar="FILE.png")
    arguments = parser.parse_args(argv)
    from fedjaxsim.runner.plot import plot_runs

    try:
        series = plot_runs(arguments.folders, arguments.output)
    except FileNotFoundError as error:
        print(f"fedjaxsim plot: {error}", file=sys.stderr)
        return 2
    print(f"wrote {arguments.output} ({len(series)} runs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_xla_cpu(host_devices=default_host_device_count(), warn_if_late=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return _run(rest)
    if command == "plot":
        return _plot(rest)
    print(f"fedjaxsim: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
