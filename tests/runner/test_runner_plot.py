"""`fedjaxsim plot`: a valid PNG whose plotted lines are the runs' metrics."""

import json
import struct

import numpy as np
import pytest

from fedjaxsim.runner.cli import main
from fedjaxsim.runner.plot import build_figure, collect_series


def _write_run(folder, records):
    folder.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(lines + '{"round": 9')  # a torn last line


def _records(scale):
    records = []
    for r in range(1, 7):
        record = {"round": r, "train_loss": scale / r, "elapsed_seconds": 1.5 * r}
        if r % 2 == 0:
            record.update(test_accuracy=1 - scale / (r + 1), test_loss=scale / (r + 0.5))
        records.append(record)
    return records


@pytest.fixture
def two_runs(tmp_path):
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"  # same names: labels get parents
    _write_run(a, _records(1.0))
    _write_run(b, _records(2.0))
    return a, b


def test_plot_command_writes_a_png(two_runs, tmp_path, capsys):
    output = tmp_path / "compare.png"
    assert main(["plot", str(two_runs[0]), str(two_runs[1]), "--output", str(output)]) == 0
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (1200, 800)
    assert "2 runs" in capsys.readouterr().out


def test_plotted_series_are_the_metrics(two_runs):
    series = collect_series(two_runs)
    assert list(series) == ["x/run", "y/run"]
    for label, scale in (("x/run", 1.0), ("y/run", 2.0)):
        records = _records(scale)
        evaluated = [r for r in records if "test_accuracy" in r]
        panels = series[label]
        assert panels["accuracy_vs_round"] == (
            [r["round"] for r in evaluated],
            [r["test_accuracy"] for r in evaluated],
        )
        assert panels["accuracy_vs_time"] == (
            [r["elapsed_seconds"] for r in evaluated],
            [r["test_accuracy"] for r in evaluated],
        )
        assert panels["train_loss_vs_round"] == (
            [r["round"] for r in records],
            [r["train_loss"] for r in records],
        )
        assert panels["test_loss_vs_time"] == (
            [r["elapsed_seconds"] for r in evaluated],
            [r["test_loss"] for r in evaluated],
        )

    figure = build_figure(series)
    accuracy_round, accuracy_time, loss_round, loss_time = figure.axes
    assert [line.get_label() for line in accuracy_round.lines] == ["x/run", "y/run"]
    for axis, panel in ((accuracy_round, "accuracy_vs_round"), (accuracy_time, "accuracy_vs_time")):
        for line, label in zip(axis.lines, series):
            np.testing.assert_array_equal(line.get_xydata(), np.column_stack(series[label][panel]))
    assert [line.get_label() for line in loss_time.lines] == [
        "x/run train",
        "x/run test",
        "y/run train",
        "y/run test",
    ]
    np.testing.assert_array_equal(
        loss_round.lines[1].get_xydata(), np.column_stack(series["x/run"]["test_loss_vs_round"])
    )
    assert loss_round.lines[1].get_linestyle() == "--"
    assert accuracy_time.get_xlabel() == "wall time (s)"
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_plot_of_a_folder_without_metrics_names_it(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "a.png")]) == 2
    assert f"{tmp_path} has no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_attack_runs_are_labelled_with_the_attack_and_the_defence(tmp_path):
    mean, median, clean = tmp_path / "mean", tmp_path / "median", tmp_path / "clean"
    for folder, attack, rule in (
        (mean, "sign_flip", "mean"),
        (median, "sign_flip", "median"),
        (clean, "none", "mean"),
    ):
        _write_run(folder, _records(1.0))
        text = f"attack:\n  name: {attack}\n  fraction: 0.2\naggregator:\n  name: {rule}\n"
        (folder / "config.yaml").write_text(text)
    assert list(collect_series([mean, median, clean])) == [
        "mean (sign_flip 20%, no defence)",
        "median (sign_flip 20%, defence median)",
        "clean",
    ]


def test_private_runs_add_accuracy_against_epsilon_and_the_frontier(tmp_path):
    runs = []
    for name, scale, final_accuracy in (("a", 1.0, 0.7), ("b", 4.0, 0.9)):
        records = [
            {"round": r, "train_loss": 1.0 / r, "elapsed_seconds": float(r), "epsilon": scale * r}
            for r in (1, 2, 3)
        ]
        records[1].update(test_accuracy=0.5, test_loss=1.0)
        records[2].update(test_accuracy=final_accuracy, test_loss=0.5)
        _write_run(tmp_path / name, records)
        runs.append(tmp_path / name)
    series = collect_series(runs)
    assert series["b"]["accuracy_vs_epsilon"] == ([8.0, 12.0], [0.5, 0.9])
    figure = build_figure(series)
    assert len(figure.axes) == 6
    accuracy_epsilon, frontier = figure.axes[4:]
    np.testing.assert_array_equal(accuracy_epsilon.lines[0].get_xydata(), [[2.0, 0.5], [3.0, 0.7]])
    # One point per run: its final epsilon and final accuracy, in epsilon order.
    np.testing.assert_array_equal(frontier.lines[0].get_xydata(), [[3.0, 0.7], [12.0, 0.9]])
    assert frontier.get_xlabel() == "final epsilon"
    import matplotlib.pyplot as plt

    plt.close(figure)
