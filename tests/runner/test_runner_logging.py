"""Metric outputs: JSONL lines, TensorBoard events read back, atomic files, the progress bar."""

import json

import numpy as np
from runner_helpers import read_event_files

from fedjaxsim.runner.config import load_config
from fedjaxsim.runner.writers import (
    TIMING_KEYS,
    MetricsWriter,
    TensorBoardWriter,
    read_metrics,
    tensorboard_tag,
)


def test_every_round_logs_the_documented_fields(tiny_run):
    config_path, straight = tiny_run
    config = load_config(config_path)
    records = read_metrics(straight / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, 11))
    always = {
        "round",
        "train_loss",
        "examples",
        "mean_update_norm",
        "max_update_norm",
        "nonfinite_updates",
        "pack_seconds",
        "exposed_pack_seconds",
        "compute_seconds",
        "round_seconds",
        "elapsed_seconds",
    }
    central = {"test_loss", "test_accuracy", "eval_seconds"}
    per_client = {f"client_accuracy_{k}" for k in ("mean", "p10", "p50", "p90", "worst10_mean")}
    per_client |= {"client_loss_mean", "num_eval_clients"}
    for record in records:
        r = record["round"]
        expected = set(always)
        if r % config.evaluation.every == 0:
            expected |= central
        if r % config.evaluation.per_client_every == 0:
            expected |= per_client | {"eval_seconds"}
        if r % config.checkpoint.every == 0:
            expected.add("checkpoint_seconds")
        assert set(record) == expected, r
        assert 0 < record["mean_update_norm"] <= record["max_update_norm"]
        assert record["examples"] > 0 and record["nonfinite_updates"] == 0
        # The round's wall time covers its parts (packing overlaps the previous round).
        parts = (
            record["exposed_pack_seconds"]
            + record["compute_seconds"]
            + record.get("eval_seconds", 0.0)
        )
        assert record["round_seconds"] >= parts
    elapsed = [r["elapsed_seconds"] for r in records]
    assert elapsed == sorted(elapsed)
    last = records[-1]
    assert last["num_eval_clients"] == 10  # the single test client split in 10
    assert (
        last["client_accuracy_worst10_mean"]
        <= last["client_accuracy_p10"]
        <= last["client_accuracy_p50"]
        <= last["client_accuracy_p90"]
    )
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["final_test_accuracy"] == last["test_accuracy"]
    assert summary["final_client_accuracy_p10"] == last["client_accuracy_p10"]
    assert summary["examples_trained"] == sum(r["examples"] for r in records)


def test_tensorboard_events_hold_the_metrics(tiny_run):
    _, straight = tiny_run
    records = read_metrics(straight / "metrics.jsonl")
    scalars = {}
    for _, event in read_event_files(straight / "tensorboard"):
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert tensorboard_tag("train_loss") == "train/loss"
    assert tensorboard_tag("test_accuracy") == "test/accuracy"
    assert tensorboard_tag("client_accuracy_p10") == "per_client/accuracy_p10"
    assert tensorboard_tag("compute_seconds") == "time/compute_seconds"
    for key in (
        "train_loss",
        "test_accuracy",
        "test_loss",
        "client_accuracy_p90",
        "mean_update_norm",
        "examples",
        "compute_seconds",
    ):
        expected = {r["round"]: r[key] for r in records if key in r}
        got = scalars[tensorboard_tag(key)]
        assert sorted(got) == sorted(expected), key
        np.testing.assert_allclose(
            [got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-6
        )


def test_resumed_tensorboard_purges_the_rounds_after_the_checkpoint(tmp_path):
    first = TensorBoardWriter(tmp_path)
    for step in (1, 2, 3):
        first.write({"round": step, "train_loss": float(step)})
    first.close()
    second = TensorBoardWriter(tmp_path, purge_step=3)
    second.write({"round": 3, "train_loss": 30.0})
    second.close()
    events = read_event_files(tmp_path)
    files = sorted({name for name, _ in events})
    assert len(files) == 2  # no file name collision, nothing truncated
    starts = [e for _, e in events if e.HasField("session_log")]
    # TensorBoard's purge marker: a SessionLog START at the purge step.
    assert [(e.step, e.session_log.status) for e in starts] == [(3, 1)]
    values = [(e.step, v.simple_value) for _, e in events for v in e.summary.value]
    assert values == [(1, 1.0), (2, 2.0), (3, 3.0), (3, 30.0)]


def test_metrics_writer_rewrites_history_and_reader_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n{"rou')  # killed mid-line
    assert read_metrics(path) == [{"round": 1}, {"round": 2}, {"round": 3}]
    writer = MetricsWriter(path, history=[{"round": 1}, {"round": 2}])
    writer.write({"round": 3, "train_loss": 0.5})
    writer.close()
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n{"round": 3, "train_loss": 0.5}\n'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_timing_keys_are_exactly_the_wall_time_fields():
    assert TIMING_KEYS == {
        "pack_seconds",
        "exposed_pack_seconds",
        "compute_seconds",
        "eval_seconds",
        "checkpoint_seconds",
        "round_seconds",
        "elapsed_seconds",
    }


def test_progress_bar_shows_eta(tmp_path, capsys):
    from fedjaxsim.runner.cli import main

    arguments = [
        "run",
        "--model",
        "logreg",
        "--rounds",
        "2",
        "--output-dir",
        str(tmp_path),
        "--evaluation.per-client-every",
        "0",
        "--logging.no-tensorboard",
        "--checkpoint.every",
        "0",
    ]
    assert main(arguments) == 0
    err = capsys.readouterr().err
    assert "fedjaxsim: 100%" in err and "2/2" in err and "<00:00" in err  # ETA column
    assert "test_acc=" in err
    assert not (tmp_path / "tensorboard").exists()
