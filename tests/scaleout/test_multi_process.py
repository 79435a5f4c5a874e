"""Two processes on localhost (jax.distributed, gloo CPU collectives) agree
with each other bit for bit and with a single-process run."""

import itertools
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
ATTEMPTS = 5
# What the coordinator (process 0) prints when its port was taken between
# the probe below and its own bind; it then exits.
BIND_FAILURES = ("Failed to add port to server", "Address already in use")


def _free_port():
    """A port free when probed. Another program may take it before the
    coordinator binds it, which :func:`_run_two_processes` retries."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _result(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _environment():
    environment = dict(os.environ)
    environment.pop("XLA_FLAGS", None)  # one CPU device per process
    return environment


def _start(rank, count, port, lanes_per_process):
    return subprocess.Popen(
        [sys.executable, str(CHECK), str(rank), str(count), str(port), lanes_per_process],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_environment(),
    )


def _run_two_processes(lanes_per_process, ports):
    """Both processes' outputs, on the first port of ``ports`` the coordinator could bind.

    Returns:
      ``(outputs, attempts)``: each worker's ``(stdout, stderr)``, and how many
      ports were tried.
    """
    for attempt, port in enumerate(itertools.islice(ports, ATTEMPTS), start=1):
        coordinator, worker = (_start(rank, 2, port, lanes_per_process) for rank in range(2))
        coordinator_output = coordinator.communicate(timeout=600)
        if coordinator.returncode != 0:
            worker.kill()  # it would wait for a coordinator that is gone
            worker.communicate()
            if any(message in coordinator_output[1] for message in BIND_FAILURES):
                continue
            pytest.fail(f"process 0 failed:\n{coordinator_output[1][-3000:]}")
        worker_output = worker.communicate(timeout=600)
        assert worker.returncode == 0, worker_output[1][-3000:]
        return [coordinator_output, worker_output], attempt
    pytest.fail(f"no free port for the coordinator in {ATTEMPTS} attempts")


def _fresh_ports():
    while True:
        yield _free_port()


@pytest.mark.parametrize("lanes_per_process", ["none", "2"])
def test_two_processes_match_each_other_and_one_process(lanes_per_process):
    if lanes_per_process == "none":
        ports, taken = _fresh_ports(), None
    else:
        # Start on a port that another program holds, as on a loaded machine:
        # the coordinator cannot bind it, and the run retries on a fresh one.
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = itertools.chain([taken.getsockname()[1]], _fresh_ports())
    try:
        outputs, attempts = _run_two_processes(lanes_per_process, ports)
    finally:
        if taken is not None:
            taken.close()
    if taken is not None:
        assert attempts == 2
    first, second = (_result(stdout) for stdout, _ in outputs)
    single = subprocess.run(
        [sys.executable, str(CHECK), "0", "1", "0", lanes_per_process],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=_environment(),
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    reference = _result(single.stdout)
    assert first["params"] == second["params"]  # identical server state everywhere
    assert first["examples"] == reference["examples"] == second["examples"]
    for got, want in zip(first["params"], reference["params"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
