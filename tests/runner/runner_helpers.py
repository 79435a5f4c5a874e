"""Helpers shared by the runner tests: a tiny config, subprocesses, readers."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

# Logistic regression on the embedded digits: about a second for 10 rounds.
TINY_YAML = """\
model: logreg
training:
  rounds: 10
  cohort_size: 5
  local_epochs: 1
  batch_size: 20
  max_local_steps: 4
  step_bucket: 4  # every round has the same shape: one compilation
evaluation:
  every: 2
  per_client_every: 5
  per_client_split: 10
checkpoint:
  every: 5
  keep: 2
logging:
  progress: false
"""


def write_tiny_config(folder: Path, text: str = TINY_YAML) -> Path:
    path = Path(folder) / "tiny.yaml"
    path.write_text(text)
    return path


def start_cli(arguments: list[str], fault: str | None, log: Path) -> subprocess.Popen:
    """``python -m fedjaxsim.runner.cli ...`` in a new process, stderr/stdout to ``log``."""
    env = dict(os.environ)
    env.pop("FEDJAXSIM_FAULT", None)
    if fault:
        env["FEDJAXSIM_FAULT"] = fault
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "fedjaxsim.runner.cli", *arguments],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Polls ``condition()`` until true; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"process exited with {process.returncode} before the condition held:\n"
                + Path(log).read_text(errors="replace")
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out:\n" + Path(log).read_text(errors="replace"))
        time.sleep(0.05)


def sigkill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def checkpoint_leaves(checkpoint: Path) -> list[np.ndarray]:
    """The server-state arrays of a committed checkpoint folder, read with Orbax."""
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(Path(checkpoint).absolute() / "state")
    return [np.asarray(leaf) for leaf in jax.tree.leaves(restored)]


def assert_bitwise_equal(first: list[np.ndarray], second: list[np.ndarray]) -> None:
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def read_event_files(folder: Path) -> list:
    """Every Event proto in ``folder``'s TensorBoard files, file by file in name order.

    Parses the TFRecord framing directly (uint64 length, uint32 CRC, payload,
    uint32 CRC), independently of the writer, and decodes with the protobuf
    message tensorboardX ships (TensorFlow is not needed).
    """
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position : position + 8])
            position += 12
            events.append(
                (path.name, event_pb2.Event.FromString(data[position : position + length]))
            )
            position += length + 4
    return events
