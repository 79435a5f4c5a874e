"""``fedjaxsim plot``: accuracy and loss of one or several runs, as a PNG.

The figure has four panels: test accuracy against rounds and against wall
time (``elapsed_seconds``), and loss against rounds and against wall time
(train loss solid, test loss dashed, in the run's colour), one line per run,
so runs compare side by side. :func:`collect_series` is the data handed to
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
}


def _labels(folders: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where names repeat."""
    names = [folder.name or str(folder) for folder in folders]
    return [
        f"{folder.parent.name}/{name}" if names.count(name) > 1 else name
        for folder, name in zip(folders, names)
    ]


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
        series[label] = {
            panel: (
                [r[x] for r in records if x in r and y in r],
                [r[y] for r in records if x in r and y in r],
            )
            for panel, (y, x) in PANELS.items()
        }
    return series


def build_figure(series: Mapping[str, Mapping[str, tuple[list, list]]]):
    """A 2x2 matplotlib figure of :func:`collect_series`' output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    (accuracy_round, accuracy_time), (loss_round, loss_time) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
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
    for axis, (xlabel, ylabel) in (
        (accuracy_round, ("round", "test accuracy")),
        (accuracy_time, ("wall time (s)", "test accuracy")),
        (loss_round, ("round", "loss (train solid, test dashed)")),
        (loss_time, ("wall time (s)", "loss (train solid, test dashed)")),
    ):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def save_figure(figure, path: str | Path, dpi: int = 100) -> None:
    """Saves as PNG atomically and closes the figure."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    write_atomic(Path(path), buffer.getvalue())


def plot_runs(folders: Sequence[str | Path], output: str | Path) -> dict:
    """Reads runs, draws them and writes ``output``; returns the series."""
    series = collect_series(folders)
    save_figure(build_figure(series), output)
    return series
