"""Command line: ``fedjaxsim run``, ``plot``, ``predict``, ``evaluate``, ``generate`` and
``data inspect``.

``fedjaxsim run --help`` lists every config key as a flag; see
:mod:`fedjaxsim.runner.config`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from fedjaxsim.runner.platform import configure_xla_cpu, default_host_device_count

USAGE = """usage: fedjaxsim run [--config FILE.yaml] [--resume] [--quiet] [--KEY VALUE ...]
       fedjaxsim plot DIR [DIR ...] --output FILE.png
       fedjaxsim predict RUN_DIR INPUT [INPUT ...] [--json] [--invert]
       fedjaxsim evaluate RUN_DIR [--split {test,train}] [--per-client] [--json]
       fedjaxsim generate RUN_DIR [--prompt TEXT] [--max-new-tokens N] [--greedy] [--json]
       fedjaxsim data inspect [--dataset NAME] [--data.KEY VALUE ...] --output FILE.png

  run       run (or resume) a federated experiment; `fedjaxsim run --help` lists the keys
  plot      accuracy and loss against rounds and wall time, several runs side by side
  predict   the class and its probability for images (PNG, JPEG) or .npy arrays
  evaluate  re-evaluate a saved run's latest checkpoint
  generate  continue a prompt with a fine-tuned language model (a --model gpt2 run)
  data      `data inspect`: a picture and a summary of a federated dataset
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
    metric = summary["headline_metric"]
    final, best = summary[f"final_{metric}"], summary[f"best_{metric}"]
    print(
        f"done: {summary['rounds']} rounds, {summary['wall_seconds']:.1f} s of training, "
        f"final {metric.replace('_', ' ')} {final:.4f} (best {best:.4f}), final train loss "
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


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedjaxsim predict",
        description="Predicts with the latest checkpoint of a run: the class and its "
        "probability for each input. Images are converted to the model's input (channels, "
        "size, [0, 1] scale, the training data's gray levels); .npy arrays are taken as they "
        "are (one input or a batch).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `fedjaxsim run`")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".png, .jpg or .npy files")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")
    parser.add_argument(
        "--invert", action="store_true", help="images are dark ink on a light background"
    )
    arguments = parser.parse_args(argv)
    from fedjaxsim.runner.predict import RunError, load_run, predict, read_inputs

    try:
        run = load_run(arguments.run_dir)
        x, names = read_inputs(arguments.inputs, run.inputs, invert=arguments.invert)
    except RunError as error:
        print(f"fedjaxsim predict: {error}", file=sys.stderr)
        return 2
    probabilities = predict(run, x)
    for name, row in zip(names, probabilities):
        label = int(np.argmax(row))
        if arguments.json:
            record = {"input": name, "class": label, "probability": float(row[label])}
            record["probabilities"] = [float(p) for p in row]
            print(json.dumps(record))
        else:
            print(f"{name}: class {label} (probability {row[label]:.4f})")
    return 0


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedjaxsim evaluate",
        description="Re-evaluates the latest checkpoint of a run on a split of its dataset, "
        "as the run evaluated it.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `fedjaxsim run`")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument(
        "--per-client", action="store_true", help="add the distribution of per-client accuracy"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    arguments = parser.parse_args(argv)
    from fedjaxsim.runner.config import ConfigError
    from fedjaxsim.runner.predict import RunError, evaluate_run, load_run

    try:
        result = evaluate_run(load_run(arguments.run_dir), arguments.split, arguments.per_client)
    except (RunError, ConfigError, FileNotFoundError) as error:
        print(f"fedjaxsim evaluate: {error}", file=sys.stderr)
        return 2
    if arguments.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{key}={value}" for key, value in result.items()))
    return 0


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedjaxsim generate",
        description="Continues a prompt with the latest checkpoint of a fine-tuned language "
        "model (a `fedjaxsim run --model gpt2` output folder), by sampling or greedily.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `fedjaxsim run`")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--greedy", action="store_true", help="the most likely token each step")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    arguments = parser.parse_args(argv)
    from fedjaxsim.runner.config import ConfigError
    from fedjaxsim.runner.predict import RunError, generate_text, load_run

    try:
        result = generate_text(
            load_run(arguments.run_dir),
            arguments.prompt,
            arguments.max_new_tokens,
            greedy=arguments.greedy,
            temperature=arguments.temperature,
            top_k=arguments.top_k,
            seed=arguments.seed,
        )
    except (RunError, ConfigError, FileNotFoundError, ValueError) as error:
        print(f"fedjaxsim generate: {error}", file=sys.stderr)
        return 2
    if arguments.json:
        print(json.dumps(result))
    else:
        print(arguments.prompt + result["continuation"])
    return 0


def _data(argv: list[str]) -> int:
    if not argv or argv[0] != "inspect":
        print(
            "usage: fedjaxsim data inspect [--dataset NAME] [--data.KEY VALUE ...] "
            "--output FILE.png [--json]",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="fedjaxsim data inspect",
        description="Draws a federated dataset (client sizes, label distribution per client, "
        "sample inputs) and prints its size and skew. The dataset is chosen with the keys of "
        "`fedjaxsim run`: --dataset NAME and --data.KEY VALUE, --seed.",
    )
    parser.add_argument("--output", "-o", required=True, metavar="FILE.png")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    arguments, rest = parser.parse_known_args(argv[1:])
    from fedjaxsim.runner.config import ConfigError, parse_run_arguments
    from fedjaxsim.runner.inspect_data import inspect_dataset

    try:
        config, _ = parse_run_arguments(rest)
        dataset = config.data.load(config.seed, progress=not arguments.json)
    except (ConfigError, FileNotFoundError) as error:
        print(f"fedjaxsim data inspect: {error}", file=sys.stderr)
        return 2
    summary = inspect_dataset(dataset, arguments.output, seed=config.seed)
    if arguments.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
        print(f"wrote {arguments.output}")
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
    commands = {"predict": _predict, "evaluate": _evaluate, "generate": _generate, "data": _data}
    if command in commands:
        return commands[command](rest)
    print(f"fedjaxsim: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
