"""Two processes on localhost (jax.distributed, gloo CPU collectives) agree
with each other bit for bit and with a single-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CHECK = Path(__file__).with_name("multi_process_check.py")
ROOT = CHECK.parents[2]


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _result(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _environment():
    environment = dict(os.environ)
    environment.pop("XLA_FLAGS", None)  # one CPU device per process
    return environment


@pytest.mark.parametrize("lanes_per_process", ["none", "2"])
def test_two_processes_match_each_other_and_one_process(lanes_per_process):
    port = str(_free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, str(CHECK), str(rank), "2", port, lanes_per_process],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_environment(),
        )
        for rank in range(2)
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    first, second = (_result(stdout) for stdout, _ in outputs)
    single = subprocess.run(
        [sys.executable, str(CHECK), "0", "1", "0", lanes_per_process],
        capture_output=True, text=True, cwd=ROOT, env=_environment(), timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    reference = _result(single.stdout)
    assert first["params"] == second["params"]  # identical server state everywhere
    assert first["examples"] == reference["examples"] == second["examples"]
    for got, want in zip(first["params"], reference["params"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
