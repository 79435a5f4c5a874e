"""Metric outputs: JSONL, TensorBoard event files, the progress bar, atomic files.

Crash safety: whole files (config, summary, plots, the rewritten metrics file
on resume) are written to a temporary name, fsynced and renamed, so a reader
sees the old file or the new one, never half of one. ``metrics.jsonl`` is
appended one flushed line per round; a kill can leave a torn last line, which
:func:`read_metrics` skips and a resumed run discards (it rewrites the file
from its checkpoint's history).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

# Fields that measure time; they differ between two runs of the same config.
TIMING_KEYS = frozenset(
    {
        "pack_seconds",
        "exposed_pack_seconds",
        "compute_seconds",
        "eval_seconds",
        "checkpoint_seconds",
        "round_seconds",
        "elapsed_seconds",
    }
)


def without_timing(record: Mapping) -> dict:
    """``record`` without the wall-time fields (for comparing runs)."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def write_atomic(path: Path, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with open(temporary, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_json_atomic(path: Path, payload) -> None:
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _line(record: Mapping) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn (unparsable) last line is skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index == len(lines) - 1:  # a run killed mid-write
                break
            raise
    return records


class MetricsWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most a line.

    Args:
      path: the JSONL file.
      history: records to start from. The file is rewritten atomically to hold
        exactly these (a resumed run drops the lines written after its
        checkpoint); an empty history starts a new file.
    """

    def __init__(self, path: Path, history: Iterable[Mapping] = ()):
        self.path = Path(path)
        write_atomic(self.path, "".join(_line(r) for r in history))
        # Held open for the whole run and closed by close().
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: Mapping) -> None:
        self._file.write(_line(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def tensorboard_tag(key: str) -> str:
    """Metrics-file key -> TensorBoard tag, grouped by panel."""
    if key.startswith("test_"):
        return "test/" + key[len("test_") :]
    if key.startswith("client_") or key == "num_eval_clients":
        return "per_client/" + key.removeprefix("client_")
    if key.endswith("_seconds"):
        return "time/" + key
    return "train/" + key.removeprefix("train_")


class TensorBoardWriter:
    """Scalars of every round to TensorBoard event files (tensorboardX, no TensorFlow).

    Args:
      logdir: the event-file folder.
      purge_step: on resume, the first round to be rewritten: TensorBoard
        then ignores the events of earlier files at or after that step (the
        rounds a killed run logged past its last checkpoint).
    """

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        # A unique suffix: two writers opened in the same second would
        # otherwise share a file name and the second would truncate the first.
        suffix = f".{os.getpid()}.{purge_step or 0}"
        self._writer = SummaryWriter(
            logdir=str(logdir), purge_step=purge_step, filename_suffix=suffix
        )

    def write(self, record: Mapping) -> None:
        step = int(record["round"])
        for key, value in record.items():
            if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(tensorboard_tag(key), float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class ProgressBar:
    """tqdm bar over rounds with ETA, train loss, the last test accuracy and, under DP, epsilon."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total, initial=initial, desc="fedjaxsim", unit="round", dynamic_ncols=True
        )
        self._accuracy = float("nan")

    def update(self, record: Mapping) -> None:
        self._accuracy = record.get("test_accuracy", self._accuracy)
        postfix = {"loss": f"{record['train_loss']:.3f}", "test_acc": f"{self._accuracy:.3f}"}
        if "epsilon" in record:  # the privacy spent so far
            postfix["eps"] = f"{record['epsilon']:.3g}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
