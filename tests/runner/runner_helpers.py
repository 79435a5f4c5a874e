"""Helpers shared by the runner tests: a tiny config, subprocesses, readers."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Self

import jax
import numpy as np

GUARD = 300.0  # seconds; a deadlock guard for subprocesses, never a timing assertion

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

# The hyper-parameters each algorithm config requires (no default).
REQUIRED = {
    "fedprox": {"client_learning_rate": 0.05, "proximal_mu": 0.01},
    "scaffold": {"client_learning_rate": 0.05},
    "fednova": {"client_learning_rate": 0.05},
    "mime_lite": {"client_learning_rate": 0.05},
    "qffl": {"client_learning_rate": 0.05, "q": 1.0},
    "ditto": {"client_learning_rate": 0.05, "personal_learning_rate": 0.05, "regularization": 0.1},
}


def write_tiny_config(folder: Path, text: str = TINY_YAML) -> Path:
    path = Path(folder) / "tiny.yaml"
    path.write_text(text)
    return path


class CliRun:
    """``python -m fedjaxsim.runner.cli ...`` in a new process, its output copied to ``log``.

    A reader thread copies the combined stdout/stderr line by line, so a test
    blocks until a given line appears (:meth:`wait_for_line`) instead of polling.
    Use it as a context manager, so that a failing test kills the process.
    """

    def __init__(self, arguments: list[str], fault: str | None, log: Path):
        env = dict(os.environ)
        env.pop("FEDJAXSIM_FAULT", None)
        if fault:
            env["FEDJAXSIM_FAULT"] = fault
        self.log = Path(log)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedjaxsim.runner.cli", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._copy, daemon=True)
        self._reader.start()

    def _copy(self) -> None:
        with self.process.stdout, open(self.log, "w", encoding="utf-8") as handle:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                handle.write(line)
                handle.flush()
                with self._changed:
                    self._lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for_line(self, fragment: str) -> None:
        """Blocks until the process prints a line containing ``fragment``.

        Fails if the process ends first. ``GUARD`` only turns a hang into a
        failure; it is not a timing assertion.
        """

        def seen():
            return any(fragment in line for line in self._lines)

        with self._changed:
            self._changed.wait_for(lambda: seen() or self._ended, timeout=GUARD)
            if seen():
                return
            ended = self._ended
        if not ended:
            self.process.kill()
        self._reader.join()
        how = f"it exited with {self.process.wait()}" if ended else "the guard expired"
        raise AssertionError(
            f"the process printed no line with {fragment!r} ({how}):\n"
            + self.log.read_text(errors="replace")
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        """Never leaves a (paused) process behind, whatever the test did."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join()

    def sigkill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=GUARD) == -signal.SIGKILL
        self._reader.join()  # the log is complete


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
