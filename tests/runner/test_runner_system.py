"""Runs on the simulated clock: deadlines, dropouts, over-selection, availability, FedBuff."""

import json

import jax
import numpy as np
import pytest
from runner_helpers import assert_bitwise_equal, checkpoint_leaves, write_tiny_config

from fedjaxsim.runner.cli import main
from fedjaxsim.runner.plot import collect_series
from fedjaxsim.runner.writers import read_metrics

# Keys that measure this machine, not the run.
WALL_CLOCK = {
    "pack_seconds",
    "exposed_pack_seconds",
    "compute_seconds",
    "round_seconds",
    "elapsed_seconds",
    "eval_seconds",
    "checkpoint_seconds",
}
# The interrupted run's last round is evaluated (as every final round is).
EVALUATION = ("test_", "client_", "num_eval_clients")
# Ten near-iid clients of about 144 digits: with 4 steps of 20 every client does the
# same work, so at constant speeds every client takes the same simulated time.
EQUAL_WORK = ["--data.num-clients", "10", "--data.alpha", "1000"]
CLOCK = [
    "--system.speed",
    "lognormal",
    "--system.deadline-seconds",
    "0.05",
    "--batch-size",
    "5",  # 3 local steps of about 0.02 simulated seconds: the deadline cuts some short
    "--system.late-clients",
    "partial",
    "--system.dropout-rate",
    "0.2",
    "--system.over-selection",
    "1.6",
    "--system.availability",
    "diurnal",
    "--system.online-hours",
    "16",
]
FEDBUFF = [
    "--system.speed",
    "lognormal",
    "--system.dropout-rate",
    "0.3",
    "--asynchrony.mode",
    "fedbuff",
    "--asynchrony.buffer-size",
    "3",
    "--asynchrony.concurrency",
    "8",
    "--asynchrony.staleness",
    "hinge",
    "--asynchrony.hinge-threshold",
    "1",
]


def _run(tmp_path, name, *arguments, rounds=6):
    config = write_tiny_config(tmp_path)
    folder = tmp_path / name
    argv = ["run", "--config", str(config), "--output-dir", str(folder), "--quiet"]
    assert main([*argv, "--rounds", str(rounds), *arguments]) == 0
    return folder


def _training_records(folder):
    return [
        {
            key: value
            for key, value in record.items()
            if key not in WALL_CLOCK and not key.startswith(EVALUATION)
        }
        for record in read_metrics(folder / "metrics.jsonl")
    ]


def _restored(folder):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore((folder / "checkpoints" / "4" / "state").absolute())


def test_fedbuff_with_concurrency_equal_to_buffer_and_equal_speeds_is_fedavg(tmp_path):
    synchronous = _run(tmp_path, "sync", *EQUAL_WORK, rounds=4)
    buffered = _run(
        tmp_path,
        "fedbuff",
        *EQUAL_WORK,
        "--system.speed",
        "constant",
        "--asynchrony.mode",
        "fedbuff",
        "--asynchrony.buffer-size",
        "5",
        "--asynchrony.concurrency",
        "5",
        rounds=4,
    )
    sync_records = read_metrics(synchronous / "metrics.jsonl")
    async_records = read_metrics(buffered / "metrics.jsonl")
    for a, b in zip(sync_records, async_records, strict=True):
        for key in ("train_loss", "examples", "test_accuracy", "test_loss"):
            assert a.get(key) == b.get(key), (a["round"], key)
        assert b["mean_staleness"] == b["max_staleness"] == 0
        assert b["arrived_clients"] == 5
    sync_params = _restored(synchronous)["params"]
    async_params = _restored(buffered)["server_state"]["params"]
    assert_bitwise_equal(
        [np.asarray(leaf) for leaf in jax.tree.leaves(sync_params)],
        [np.asarray(leaf) for leaf in jax.tree.leaves(async_params)],
    )


@pytest.mark.parametrize("flags", [CLOCK, FEDBUFF], ids=["deadline", "fedbuff"])
def test_a_clocked_run_resumes_exactly_and_reports_its_clock(tmp_path, flags):
    straight = _run(tmp_path, "straight", *flags)
    interrupted = _run(tmp_path, "resumed", *flags, rounds=3)
    _run(tmp_path, "resumed", *flags)  # continues from its round-3 checkpoint
    assert _training_records(straight) == _training_records(interrupted)
    assert_bitwise_equal(
        checkpoint_leaves(straight / "checkpoints" / "6"),
        checkpoint_leaves(interrupted / "checkpoints" / "6"),
    )
    records = read_metrics(straight / "metrics.jsonl")
    clock = [r["simulated_seconds"] for r in records]
    assert clock == sorted(clock) and clock[0] > 0
    assert sum(r["dropped_clients"] for r in records) > 0
    if flags is CLOCK:
        assert all(r["arrived_clients"] <= 5 for r in records)
        assert sum(r["partial_clients"] for r in records) > 0
        assert all(r["round_simulated_seconds"] <= 0.05 for r in records)
    else:
        assert all(r["arrived_clients"] == 3 for r in records)
        assert max(r["max_staleness"] for r in records) > 0
    series = collect_series([straight])["straight"]
    assert len(series["accuracy_vs_simulated_time"][0]) == len(
        [r for r in records if "test_accuracy" in r]
    )
    assert main(["plot", str(straight), "--output", str(tmp_path / "clock.png")]) == 0
    assert (tmp_path / "clock.png").read_bytes()[:4] == b"\x89PNG"


def test_a_fedscale_trace_drives_speeds_and_availability(tmp_path):
    capacity = {str(i): {"computation": 5.0 + i, "communication": 800.0 + 50 * i} for i in range(7)}
    behaviour = {
        str(i): {
            "active": [0.0, 50.0 * (i + 1)],
            "inactive": [20.0 * (i + 1), 400.0],
            "finish_time": 500.0,
            "duration": 500.0,
        }
        for i in range(7)
    }
    (tmp_path / "capacity.json").write_text(json.dumps(capacity))
    (tmp_path / "behaviour.json").write_text(json.dumps(behaviour))
    folder = _run(
        tmp_path,
        "trace",
        "--system.speed",
        str(tmp_path / "capacity.json"),
        "--system.availability",
        str(tmp_path / "behaviour.json"),
        rounds=3,
    )
    records = read_metrics(folder / "metrics.jsonl")
    assert all(0 < r["online_clients"] <= 100 for r in records)
    assert records[-1]["simulated_seconds"] > 0


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["--asynchrony.mode", "fedbuff"], ["asynchrony.mode", "--system.speed lognormal"]),
        (["--system.deadline-seconds", "3"], ["system.deadline_seconds", "--system.speed"]),
        (
            [
                "--system.speed",
                "lognormal",
                "--system.over-selection",
                "1.3",
                "--privacy.noise-multiplier",
                "1.0",
            ],
            ["system.over_selection", "privacy", "optimistic"],
        ),
        (["--system.speed", "no/such/trace.pkl"], ["system.speed", "no/such/trace.pkl"]),
        (
            [
                "--system.speed",
                "constant",
                "--asynchrony.mode",
                "fedbuff",
                "--asynchrony.buffer-size",
                "6",
                "--asynchrony.concurrency",
                "4",
            ],
            ["asynchrony.buffer_size", "concurrency"],
        ),
        (
            [
                "--system.speed",
                "constant",
                "--asynchrony.mode",
                "fedbuff",
                "--algorithm",
                "scaffold",
                "--algorithm.client-learning-rate",
                "0.05",
            ],
            ["asynchrony.mode=fedbuff", "scaffold", "stateless"],
        ),
        (["--system.dropout-rate", "1.0"], ["system.dropout_rate"]),
    ],
)
def test_bad_system_options_fail_before_any_work(tmp_path, capsys, arguments, fragments):
    config = write_tiny_config(tmp_path)
    folder = tmp_path / "bad"
    assert main(["run", "--config", str(config), "--output-dir", str(folder), *arguments]) != 0
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    assert not folder.exists()
