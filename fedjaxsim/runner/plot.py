"""``fedjaxsim plot``: accuracy and loss of one or several runs, as a PNG.

The figure has four panels: test accuracy against rounds and against wall
time (``elapsed_seconds``), and loss against rounds and against wall time
(train loss solid, test loss dashed, in the run's colour), one line per run,
so runs compare side by side. When runs are differentially private, a third
row shows test accuracy against the privacy spent (``epsilon``) as each run
goes, and the privacy-utility curve across runs: each run's final accuracy
at its final epsilon. When runs keep simulated time (``system.speed``), a
row shows test accuracy and train loss against the simulated clock
(``simulated_seconds``). :func:`collect_series` is the data handed to
matplotlib, and :func:`build_figure` draws exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fedjaxsim.runner.writers import read_metrics, write_atomic

# Panel -> (y key, x key).
PANELS = {
    "accuracy_vs_round": ("test_accuracy", "round"),
    "accuracy_vs_time": ("test_accuracy", "elapsed_seconds"),
    "train_loss_vs_round": ("train_loss", "round"),
    "train_loss_vs_time": ("train_loss", "elapsed_seconds"),
    "test_loss_vs_round": ("test_loss", "round"),
    "test_loss_vs_time": ("test_loss", "elapsed_seconds"),
    "accuracy_vs_epsilon": ("test_accuracy", "epsilon"),
    "accuracy_vs_simulated_time": ("test_accuracy", "simulated_seconds"),
    "train_loss_vs_simulated_time": ("train_loss", "simulated_seconds"),
}


def _labels(folders: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where names repeat; attack runs say attack and defence."""
    names = [folder.name or str(folder) for folder in folders]
    return [
        (f"{folder.parent.name}/{name}" if names.count(name) > 1 else name) + _attack_note(folder)
        for folder, name in zip(folders, names)
    ]


def _attack_note(folder: Path) -> str:
    """`` (sign_flip 20%, defence median)`` for a run under attack, from its config.yaml."""
    path = folder / "config.yaml"
    if not path.is_file():
        return ""
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return ""
    attack = config.get("attack") or {}
    if attack.get("name", "none") == "none":
        return ""
    rule = (config.get("aggregator") or {}).get("name", "mean")
    defence = "no defence" if rule == "mean" else f"defence {rule}"
    return f" ({attack['name']} {attack.get('fraction', 0):.0%}, {defence})"


def collect_series(folders: Sequence[str | Path]) -> dict[str, dict[str, tuple[list, list]]]:
    """Reads each folder's ``metrics.jsonl`` into plot series.

    Returns:
      ``{run_label: {panel: (xs, ys)}}`` for the panels of :data:`PANELS`,
      keeping the rounds whose record has both keys.

    Raises:
      FileNotFoundError: a folder without ``metrics.jsonl``, naming it.
    """
    folders = [Path(folder) for folder in folders]
    series = {}
    for folder, label in zip(folders, _labels(folders)):
        path = folder / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} has no metrics.jsonl; pass output folders of `fedjaxsim run`"
            )
        records = read_metrics(path)
        headline = _headline(records)
        series[label] = {
            panel: (
                [r[x] for r in records if x in r and y in r],
                [r[y] for r in records if x in r and y in r],
            )
            for panel, (y, x) in _with_headline(headline).items()
        }
    return series


def _headline(records: Sequence[Mapping]) -> str:
    """The run's headline test metric: accuracy, or recall at k for tag prediction."""
    keys = {key for record in records for key in record}
    if "test_accuracy" in keys:
        return "test_accuracy"
    return next((k for k in sorted(keys) if k.startswith("test_recall_at_")), "test_accuracy")


def _with_headline(headline: str) -> dict[str, tuple[str, str]]:
    """:data:`PANELS` with the accuracy panels drawing ``headline``."""
    return {panel: (headline if y == "test_accuracy" else y, x) for panel, (y, x) in PANELS.items()}


def build_figure(series: Mapping[str, Mapping[str, tuple[list, list]]]):
    """A 2x2 matplotlib figure of :func:`collect_series`' output.

    A bare ``Figure``, outside pyplot, so drawing it neither switches the
    caller's backend (a notebook keeps its inline plots) nor leaks a window.
    """
    import matplotlib
    from matplotlib.figure import Figure

    private = any(panels["accuracy_vs_epsilon"][0] for panels in series.values())
    simulated = any(panels["train_loss_vs_simulated_time"][0] for panels in series.values())
    rows = 2 + private + simulated
    figure = Figure(figsize=(12, 4 * rows))
    axes = figure.subplots(rows, 2, squeeze=False)
    (accuracy_round, accuracy_time), (loss_round, loss_time) = axes[:2]
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, panels) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        style = {"color": colour, "marker": "o", "markersize": 3}
        accuracy_round.plot(*panels["accuracy_vs_round"], label=label, **style)
        accuracy_time.plot(*panels["accuracy_vs_time"], label=label, **style)
        loss_round.plot(*panels["train_loss_vs_round"], color=colour, label=f"{label} train")
        loss_time.plot(*panels["train_loss_vs_time"], color=colour, label=f"{label} train")
        loss_round.plot(
            *panels["test_loss_vs_round"], color=colour, linestyle="--", label=f"{label} test"
        )
        loss_time.plot(
            *panels["test_loss_vs_time"], color=colour, linestyle="--", label=f"{label} test"
        )
    labelled = [
        (accuracy_round, ("round", "test accuracy")),
        (accuracy_time, ("wall time (s)", "test accuracy")),
        (loss_round, ("round", "loss (train solid, test dashed)")),
        (loss_time, ("wall time (s)", "loss (train solid, test dashed)")),
    ]
    if simulated:
        accuracy_clock, loss_clock = axes[2 + private]
        draw_simulated_time(series, accuracy_clock, loss_clock, colours)
        labelled += [
            (accuracy_clock, ("simulated time (s)", "test accuracy")),
            (loss_clock, ("simulated time (s)", "train loss")),
        ]
    if private:
        accuracy_epsilon, frontier = axes[2]
        draw_privacy(series, accuracy_epsilon, frontier, colours)
        labelled += [
            (accuracy_epsilon, ("epsilon spent", "test accuracy")),
            (frontier, ("final epsilon", "final test accuracy")),
        ]
    for axis, (xlabel, ylabel) in labelled:
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if any(not line.get_label().startswith("_") for line in axis.lines):
            axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def privacy_utility(series: Mapping[str, Mapping[str, tuple[list, list]]]) -> list[tuple]:
    """``(final epsilon, final test accuracy, run)`` of each private run, by epsilon."""
    points = []
    for label, panels in series.items():
        epsilons, accuracies = panels["accuracy_vs_epsilon"]
        if epsilons:
            points.append((epsilons[-1], accuracies[-1], label))
    return sorted(points)


def draw_privacy(series, accuracy_epsilon, frontier, colours) -> None:
    """Accuracy against epsilon per run, and the privacy-utility curve across runs."""
    for index, (label, panels) in enumerate(series.items()):
        if panels["accuracy_vs_epsilon"][0]:
            colour = colours[index % len(colours)]
            accuracy_epsilon.plot(
                *panels["accuracy_vs_epsilon"], color=colour, marker="o", markersize=3, label=label
            )
    points = privacy_utility(series)
    frontier.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="black")
    for epsilon, accuracy, label in points:
        frontier.annotate(label, (epsilon, accuracy), fontsize="x-small")


def draw_simulated_time(series, accuracy_clock, loss_clock, colours) -> None:
    """Accuracy and train loss against the simulated clock, per run that keeps one."""
    for index, (label, panels) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        if panels["accuracy_vs_simulated_time"][0]:
            accuracy_clock.plot(
                *panels["accuracy_vs_simulated_time"],
                color=colour,
                marker="o",
                markersize=3,
                label=label,
            )
        if panels["train_loss_vs_simulated_time"][0]:
            loss_clock.plot(*panels["train_loss_vs_simulated_time"], color=colour, label=label)


def save_figure(figure, path: str | Path, dpi: int = 100) -> None:
    """Saves as PNG atomically."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_atomic(Path(path), buffer.getvalue())


def plot_runs(folders: Sequence[str | Path], output: str | Path) -> dict:
    """Reads runs, draws them and writes ``output``; returns the series."""
    series = collect_series(folders)
    save_figure(build_figure(series), output)
    return series
