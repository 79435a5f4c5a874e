"""`execution.num_devices`: the runner shards cohorts over a mesh, gives the
metrics of one device, and resumes on the mesh exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedjaxsim.runner.config import load_config, replace
from fedjaxsim.runner.experiment import run_experiment
from tests.runner.runner_helpers import TINY_YAML

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("_seconds",)


def _cli(arguments, devices=2, rounds=None):
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    environment.pop("FEDJAXSIM_FAULT", None)
    command = [sys.executable, "-m", "fedjaxsim.runner.cli", "run", *arguments]
    if rounds is not None:
        command += ["--training.rounds", str(rounds)]
    return subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment, cwd=ROOT, timeout=600
    )


def _metrics(folder):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in records]


def test_two_devices_match_one_and_resume_exactly(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    # Evaluate every 5 rounds so that the 5-round first leg (which evaluates
    # after its last round) logs what the straight run logs.
    base = ["--config", str(config), "--evaluation.every", "5"]
    # The one-device reference runs in this process (one CPU device).
    run_experiment(replace(load_config(config), output_dir=str(one), **{"evaluation.every": 5}))
    result = _cli([*base, "--output-dir", str(two), "--execution.num-devices", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    # Interrupted after 5 rounds (checkpoint at 5), then resumed to 10, on the mesh.
    first = _cli([*base, "--output-dir", str(resumed), "--execution.num-devices", "2"], rounds=5)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _cli([*base, "--output-dir", str(resumed), "--execution.num-devices", "2"])
    assert second.returncode == 0, second.stderr[-2000:]

    single, sharded = _metrics(one), _metrics(two)
    assert [r["examples"] for r in single] == [r["examples"] for r in sharded]
    for a, b in zip(single, sharded):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert _metrics(resumed) == sharded  # bit-identical resume on the mesh


def test_more_devices_than_present_is_a_config_error(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    result = _cli(
        [
            "--config",
            str(config),
            "--output-dir",
            str(tmp_path / "out"),
            "--execution.num-devices",
            "4",
        ],
        devices=2,
    )
    assert result.returncode == 2
    assert "execution.num_devices" in result.stderr
    assert "xla_force_host_platform_device_count" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_splits_the_host_into_one_device_per_core_and_one_lane_per_device(tmp_path):
    """Without XLA_FLAGS, `fedjaxsim run` makes one XLA:CPU device per core, so
    --execution.num-devices 2 works out of the box, and the CPU packing
    default (default_num_lanes) puts one lane on each device."""
    from fedjaxsim.runner.platform import default_host_device_count

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FEDJAXSIM_FAULT")}
    command = [
        sys.executable,
        "-m",
        "fedjaxsim.runner.cli",
        "run",
        "--config",
        str(config),
        "--output-dir",
        str(tmp_path / "out"),
        "--execution.num-devices",
        "2",
        "--training.rounds",
        "2",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment, cwd=ROOT, timeout=600
    )
    if default_host_device_count() < 2:
        assert result.returncode == 2 and "execution.num_devices" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = (tmp_path / "out" / "config.yaml").read_text()
    assert "num_lanes: 2" in resolved and "num_devices: 2" in resolved
