"""Checkpoints: a killed run resumes bit for bit, and a crash mid-save loses nothing."""

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from runner_helpers import CliRun, assert_bitwise_equal, checkpoint_leaves, write_tiny_config

from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import ConfigError, load_config, replace
from fedjaxsim.runner.experiment import run_experiment
from fedjaxsim.runner.writers import read_metrics, without_timing


def _metrics(folder):
    return [without_timing(r) for r in read_metrics(Path(folder) / "metrics.jsonl")]


def _summary(folder):
    summary = json.loads((Path(folder) / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "output_dir")}


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tiny_run, tmp_path, capsys):
    config_path, straight = tiny_run
    killed = tmp_path / "killed"
    log = tmp_path / "log.txt"
    metrics = killed / "metrics.jsonl"
    # Pause after round 7: checkpoint 5 is committed and rounds 6-7 are logged
    # past it; the resumed run must drop them and redo them identically.
    with CliRun(
        ["run", "--config", str(config_path), "--output-dir", str(killed)],
        fault="pause_after_round=7",
        log=log,
    ) as run:
        run.wait_for_line("paused after round 7")
        assert len(read_metrics(metrics)) == 7  # round 7 is logged before the pause
        run.sigkill()
    assert "round/s" not in log.read_text()  # logging.progress: false -> no progress bar
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["5"]
    assert not (killed / "summary.json").exists()

    assert main(["run", "--config", str(config_path), "--output-dir", str(killed), "--resume"]) == 0
    assert "checkpoint of round 5 of 10: the run resumes after round 5" in capsys.readouterr().err

    assert [r["round"] for r in read_metrics(metrics)] == list(range(1, 11))
    assert _metrics(killed) == _metrics(straight)
    assert _summary(killed) == _summary(straight)
    assert_bitwise_equal(
        checkpoint_leaves(killed / "checkpoints" / "10"),
        checkpoint_leaves(straight / "checkpoints" / "10"),
    )
    # keep: 2 -> the checkpoints of rounds 5 and 10 remain in both.
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["10", "5"]


def test_a_kill_during_a_save_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    config_path, straight = tiny_run
    crashed = tmp_path / "crashed"
    log = tmp_path / "log.txt"
    checkpoints = crashed / "checkpoints"
    with CliRun(
        ["run", "--config", str(config_path), "--output-dir", str(crashed)],
        fault="hang_in_save=10",
        log=log,
    ) as run:
        run.wait_for_line("inside the save of checkpoint 10")
        run.sigkill()
    names = sorted(p.name for p in checkpoints.iterdir())
    # The save of round 10 had started (its temporary folder exists) but never
    # committed; round 5 is the latest good checkpoint.
    assert "5" in names and "10" not in names
    assert any(name.startswith("10.orbax-checkpoint-tmp") for name in names), names

    assert main(["run", "--config", str(config_path), "--output-dir", str(crashed)]) == 0

    assert sorted(p.name for p in checkpoints.iterdir()) == ["10", "5"]  # tmp folder gone
    assert _metrics(crashed) == _metrics(straight)
    assert_bitwise_equal(
        checkpoint_leaves(checkpoints / "10"), checkpoint_leaves(straight / "checkpoints" / "10")
    )


def test_stateful_algorithm_resumes_with_its_client_store_and_no_pickle(tmp_path, monkeypatch):
    config = replace(
        load_config(write_tiny_config(tmp_path)),
        **{
            "algorithm.name": "scaffold",
            "algorithm.client_learning_rate": 0.05,
            "training.rounds": 6,
            "evaluation.every": 3,
            "evaluation.per_client_every": 0,
            "checkpoint.every": 3,
            "logging.tensorboard": False,
        },
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_experiment(replace(config, output_dir=str(straight)))
    run_experiment(replace(config, output_dir=str(resumed), **{"training.rounds": 3}))

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint restore tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    run_experiment(replace(config, output_dir=str(resumed)), resume="require")

    assert _metrics(resumed) == _metrics(straight)
    for folder in (straight, resumed):
        meta = json.loads((folder / "checkpoints" / "6" / "meta" / "metadata").read_text())
        assert meta["client_store_rows"] > 0  # SCAFFOLD's control variates were saved
    assert_bitwise_equal(
        checkpoint_leaves(resumed / "checkpoints" / "6"),
        checkpoint_leaves(straight / "checkpoints" / "6"),
    )
    import orbax.checkpoint as ocp

    stores = [
        ocp.StandardCheckpointer().restore((f / "checkpoints" / "6" / "clients").absolute())
        for f in (straight, resumed)
    ]
    assert sorted(stores[0]) == sorted(stores[1])
    assert_bitwise_equal(
        [np.asarray(stores[0][k]) for k in sorted(stores[0])],
        [np.asarray(stores[1][k]) for k in sorted(stores[1])],
    )


def test_resume_refuses_a_different_config_before_any_work(tiny_run, tmp_path, capsys):
    config_path, straight = tiny_run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(straight, copy)
    before = (copy / "metrics.jsonl").read_bytes()
    code = main(
        [
            "run",
            "--config",
            str(config_path),
            "--output-dir",
            str(copy),
            "--training.cohort-size",
            "6",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "training.cohort_size: 5 in the checkpoint, 6 now" in err
    assert "another --output-dir" in err
    assert (copy / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_format(tiny_run, tmp_path, capsys):
    """A run saved by an older fedjaxsim (another server-state layout and
    config schema) is refused by its format, before its config is read."""
    import shutil

    from fedjaxsim.runner.checkpoints import FORMAT_VERSION

    config_path, straight = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    for meta in (copy / "checkpoints").glob("*/meta/metadata"):
        values = json.loads(meta.read_text())
        values["format"] = FORMAT_VERSION - 1
        values["config"]["algorithm"]["momentum"] = None  # the old flat algorithm section
        meta.write_text(json.dumps(values))
    before = (copy / "metrics.jsonl").read_bytes()
    assert main(["run", "--config", str(config_path), "--output-dir", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"holds checkpoints of format {FORMAT_VERSION - 1}" in err
    assert "use another output folder" in err
    assert (copy / "metrics.jsonl").read_bytes() == before


def test_resume_flag_without_a_checkpoint_fails(tmp_path, capsys):
    config = replace(load_config(write_tiny_config(tmp_path)), output_dir=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_experiment(config, resume="require")
    assert not (tmp_path / "none").exists()


def test_runner_code_never_imports_pickle():
    runner = Path(__file__).resolve().parents[2] / "fedjaxsim" / "runner"
    for path in runner.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("pickle", "cloudpickle", "dill") for n in names), (
                path
            )
