"""Writing a store client by client: bounded memory, resumable, atomic.

:func:`fedjaxsim.data.store.write_federated_data` needs the whole population
as a :class:`~fedjaxsim.data.federated.FederatedData`. Stack Overflow's train
split (135,818,730 sentences in a 20 GB HDF5 file) does not fit in memory, and
converting it takes long enough that an interruption must not cost the work
done. :func:`write_federated_data_streaming` writes the same store folder
(:mod:`fedjaxsim.data.store`) from a stream of clients:

* **Bounded memory.** It pulls one client from the caller's iterator, appends
  its rows to the open files and drops it before pulling the next, so it
  never holds more than one client. Offsets (8 bytes per client) and the set
  of client names (for the duplicate check) are the only state that grows.
* **Where the rows go.** Each ``.npy`` file starts with the header of an
  empty array; rows are appended behind it. NumPy pads a header so that the
  first dimension can grow to 21 digits without changing its length
  (``numpy.lib.format.GROWTH_AXIS_MAX_DIGITS``), so the final header is
  written over the first in place. The files are byte for byte what
  :func:`~fedjaxsim.data.store.write_federated_data` writes for the same
  clients, and memory-map like them.
* **Resumable.** All work happens in ``.<name>.partial`` next to the store.
  Every ``checkpoint_every`` clients the files are flushed to disk and
  ``progress.json`` records the clients and rows done and each file's length,
  replaced atomically. A restarted conversion (after Ctrl-C, a kill or a
  crash) truncates every file to its recorded length, restarts the client
  stream at the next client, and ends byte-identical to an uninterrupted run.
  A progress record of another conversion (different ``source_key`` or
  fields) is discarded.
* **Atomic.** Only when every client is written are the headers patched, the
  sha256 of every file computed and ``manifest.json`` written; then the folder
  is renamed into place. No reader ever sees a half-written store at the
  final path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjaxsim.data.store import (
    STORE_FORMAT,
    STORE_VERSION,
    describe_file,
    field_file_name,
    replace_folder,
    write_manifest,
)

PROGRESS_FILE = "progress.json"
PROGRESS_FORMAT = "fedjaxsim-streaming-progress"
PROGRESS_VERSION = 1
OFFSETS_FILE = "offsets.npy"
NAMES_FILE = "client_names.json"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """The stored form of one field.

    Attributes:
      dtype: the dtype on disk; a client's array must cast to it safely
        (``np.can_cast(..., casting="safe")``).
      shape: the shape of one row (one example), e.g. ``(20,)``.
      scale: see :class:`~fedjaxsim.data.federated.FederatedData`.
    """

    dtype: np.dtype
    shape: tuple[int, ...] = ()
    scale: float | None = None

    def __post_init__(self):
        dtype = np.dtype(self.dtype)
        if dtype.hasobject or dtype.itemsize == 0:
            raise ValueError(f"a stored field needs a fixed-size dtype, got {dtype}")
        object.__setattr__(self, "dtype", dtype)
        shape = tuple(int(n) for n in self.shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"row shape {shape} has a negative dimension")
        object.__setattr__(self, "shape", shape)

    def as_json(self) -> dict:
        return {"dtype": self.dtype.str, "shape": list(self.shape), "scale": self.scale}


class StreamedClient(NamedTuple):
    """One client handed to :func:`write_federated_data_streaming`.

    Attributes:
      name: the client's id (distinct across clients).
      fields: field name -> array ``[num_examples, *row_shape]``.
      counts: optional integers summed over all clients into the manifest's
        ``metadata["counts"]`` (e.g. truncated examples); they are saved with
        every checkpoint, so a resumed run sums them exactly once.
    """

    name: str
    fields: Mapping[str, np.ndarray]
    counts: Mapping[str, int] = types.MappingProxyType({})


def partial_folder(directory: str | Path) -> Path:
    """Where :func:`write_federated_data_streaming` works on ``directory``."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.partial"


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer,
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape},
    )
    return buffer.getvalue()


def _normalized(value) -> object:
    """``value`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def _read_progress(work: Path) -> dict | None:
    """The progress record of a partial folder, or None if absent or unreadable."""
    try:
        progress = json.loads((work / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(progress, dict)
        or progress.get("format") != PROGRESS_FORMAT
        or progress.get("version") != PROGRESS_VERSION
    ):
        return None
    return progress


def _write_progress(work: Path, progress: Mapping) -> None:
    """Replaces the progress record atomically, durable before it returns."""
    temporary = work / (PROGRESS_FILE + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump({"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, **progress}, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, work / PROGRESS_FILE)


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "the conversion progress bar needs tqdm: pip install 'fedjaxsim[data]' "
            "(or pass progress=False)"
        ) from error
    return tqdm(total=total, initial=initial, desc=description, unit="client")


class _Files:
    """The open files of a conversion in progress and the counters behind them."""

    def __init__(self, work: Path, fields: Mapping[str, FieldSpec], key: object):
        self.work = work
        self.fields = dict(fields)
        self.key = key
        self.paths = {OFFSETS_FILE: work / OFFSETS_FILE, NAMES_FILE: work / NAMES_FILE}
        self.paths.update({name: work / field_file_name(name) for name in self.fields})
        self.handles: dict[str, io.BufferedWriter] = {}
        self.clients_done = 0
        self.rows_done = 0
        self.counts: dict[str, int] = {}
        self.names: set[str] = set()

    # -- starting and resuming

    def start_fresh(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.paths[OFFSETS_FILE].write_bytes(
            _npy_header(np.dtype(np.int64), (0,)) + np.int64(0).tobytes()
        )
        for name, spec in self.fields.items():
            self.paths[name].write_bytes(_npy_header(spec.dtype, (0, *spec.shape)))
        self.paths[NAMES_FILE].write_bytes(b"[")
        self._open()
        self.checkpoint()

    def try_resume(self) -> bool:
        """Restores the last checkpoint; False when there is none to trust."""
        progress = _read_progress(self.work)
        if (
            progress is None
            or progress.get("finished")
            or progress.get("key") != self.key
            or set(progress.get("lengths", {})) != set(self.paths)
        ):
            return False
        lengths = progress["lengths"]
        for file, path in self.paths.items():
            # A file shorter than its record was not flushed before a crash of
            # the machine: nothing after the header can be trusted.
            if not path.is_file() or path.stat().st_size < lengths[file]:
                return False
        for file, path in self.paths.items():
            with open(path, "r+b") as handle:
                handle.truncate(lengths[file])
        names_text = self.paths[NAMES_FILE].read_text(encoding="utf-8") + "]"
        self.names = set(json.loads(names_text))
        self.clients_done = int(progress["clients_done"])
        self.rows_done = int(progress["rows_done"])
        self.counts = {str(k): int(v) for k, v in progress["counts"].items()}
        if len(self.names) != self.clients_done:
            return False
        self._open()
        return True

    def _open(self) -> None:
        for file, path in self.paths.items():
            self.handles[file] = open(path, "ab")  # closed in close()

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles = {}

    # -- writing

    def append(self, client: StreamedClient) -> None:
        name, fields, counts = client
        if not isinstance(name, str):
            raise ValueError(f"client {self.clients_done}: its name must be a str, got {name!r}")
        if name in self.names:
            raise ValueError(f"duplicate client id {name!r}; every client needs a distinct id")
        if set(fields) != set(self.fields):
            raise ValueError(
                f"client {name!r} has fields {sorted(fields)}, expected {sorted(self.fields)}"
            )
        rows = {}
        for field, spec in self.fields.items():
            array = np.asarray(fields[field])
            if array.ndim == 0 or array.shape[1:] != spec.shape:
                raise ValueError(
                    f"client {name!r}: field {field!r} has shape {array.shape}, expected rows "
                    f"of shape {spec.shape}"
                )
            if not np.can_cast(array.dtype, spec.dtype, casting="safe"):
                raise ValueError(
                    f"client {name!r}: field {field!r} is {array.dtype}, which does not cast "
                    f"safely to the stored {spec.dtype}"
                )
            rows[field] = np.ascontiguousarray(array, dtype=spec.dtype)
        lengths = {field: len(array) for field, array in rows.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"client {name!r} has fields of different lengths {lengths}")
        count = next(iter(lengths.values()))
        for field, array in rows.items():
            self.handles[field].write(array.tobytes())
        self.rows_done += count
        self.handles[OFFSETS_FILE].write(np.int64(self.rows_done).tobytes())
        separator = ", " if self.clients_done else ""
        self.handles[NAMES_FILE].write((separator + json.dumps(name)).encode("utf-8"))
        for key, value in counts.items():
            self.counts[str(key)] = self.counts.get(str(key), 0) + int(value)
        self.names.add(name)
        self.clients_done += 1

    def checkpoint(self) -> None:
        """Makes everything written so far durable, then records it."""
        lengths = {}
        for file, handle in self.handles.items():
            handle.flush()
            os.fsync(handle.fileno())
            lengths[file] = handle.tell()
        _write_progress(
            self.work,
            {
                "key": self.key,
                "clients_done": self.clients_done,
                "rows_done": self.rows_done,
                "counts": self.counts,
                "lengths": lengths,
            },
        )

    # -- finishing

    def finish(self, num_clients: int, metadata: Mapping | None) -> None:
        """Patches the headers, closes the names list, writes the manifest."""
        self.checkpoint()
        self.close()
        shapes = {OFFSETS_FILE: (np.dtype(np.int64), (num_clients + 1,))}
        for name, spec in self.fields.items():
            shapes[name] = (spec.dtype, (self.rows_done, *spec.shape))
        for file, (dtype, shape) in shapes.items():
            path = self.paths[file]
            empty = _npy_header(dtype, (0, *shape[1:]))
            header = _npy_header(dtype, shape)
            if len(header) != len(empty):  # NumPy < 1.23 did not pad headers for growth
                raise RuntimeError(
                    f"the .npy header of {path.name} changes length as the array grows; "
                    "streaming stores need numpy >= 1.23"
                )
            with open(path, "r+b") as handle:
                handle.write(header)
        with open(self.paths[NAMES_FILE], "ab") as handle:
            handle.write(b"]")
        metadata = dict(metadata or {})
        if self.counts:
            metadata["counts"] = dict(sorted(self.counts.items()))
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "num_clients": num_clients,
            "num_examples": self.rows_done,
            "offsets": describe_file(self.paths[OFFSETS_FILE], *shapes[OFFSETS_FILE]),
            "fields": {
                name: {**describe_file(self.paths[name], *shapes[name]), "scale": spec.scale}
                for name, spec in self.fields.items()
            },
            "client_names": describe_file(self.paths[NAMES_FILE]),
            "metadata": metadata,
        }
        write_manifest(self.work, manifest)
        # From here the folder is complete: a restart that finds this record
        # only has to rename it. (A crash before it leaves the last
        # checkpoint's record, and a restart finishes again.)
        _write_progress(self.work, {"key": self.key, "finished": True})


def write_federated_data_streaming(
    clients: Callable[[int], Iterable[StreamedClient | tuple]],
    directory: str | Path,
    *,
    num_clients: int,
    fields: Mapping[str, FieldSpec],
    metadata: Mapping | None = None,
    source_key: object = None,
    overwrite: bool = False,
    resume: bool = True,
    checkpoint_every: int = 1000,
    progress: bool = True,
    description: str | None = None,
) -> Path:
    """Writes a store folder from a stream of clients (see the module docstring).

    Args:
      clients: ``clients(start)`` yields the clients from index ``start`` on,
        in the same order on every call, as :class:`StreamedClient` or
        ``(name, fields[, counts])`` tuples. It is called once per run: with
        0, or with the first client after the last checkpoint when resuming.
        It is consumed lazily, one client at a time.
      directory: the store folder to create.
      num_clients: how many clients ``clients(0)`` yields (for the progress
        bar, and checked).
      fields: field name -> :class:`FieldSpec` of its stored rows.
      metadata: JSON-serializable facts kept in the manifest; summed
        ``counts`` are added as ``metadata["counts"]``.
      source_key: JSON-serializable identity of the source and its
        preprocessing; a partial conversion is resumed only if its key (and
        ``fields`` and ``num_clients``) are equal.
      overwrite: replace an existing store folder at the end.
      resume: False discards a partial conversion and starts again.
      checkpoint_every: clients between progress records (each costs an fsync).
      progress: a tqdm bar of clients done out of ``num_clients``.
      description: the bar's label (default: the folder's name).

    Returns:
      The store folder, readable with
      :func:`fedjaxsim.data.store.read_federated_data`.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False
        (checked before any work).
      ValueError: a client with other fields, shapes or dtypes than ``fields``,
        a repeated name, or a stream of another length than ``num_clients``.
        The partial folder stays; whatever the stream raises propagates the
        same way, so a rerun resumes from the last checkpoint.
    """
    final = Path(directory)
    if final.exists() and not overwrite:  # fail before hours of work
        raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    fields = {name: spec for name, spec in fields.items()}
    if not fields:
        raise ValueError("a store needs at least one field")
    for name in fields:
        field_file_name(name)
    key = _normalized(
        {
            "num_clients": num_clients,
            "fields": {name: spec.as_json() for name, spec in sorted(fields.items())},
            "source_key": source_key,
        }
    )
    work = partial_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    record = _read_progress(work) if resume else None
    if record is not None and record.get("finished") and record.get("key") == key:
        # A previous run finished everything but the rename.
        return _move_into_place(work, final, overwrite)
    files = _Files(work, fields, key)
    if not (resume and files.try_resume()):
        files.start_fresh()
    bar = _progress_bar(num_clients, files.clients_done, description or final.name, progress)
    try:
        for item in clients(files.clients_done):
            if files.clients_done >= num_clients:
                raise ValueError(f"the client stream yields more than num_clients={num_clients}")
            files.append(StreamedClient(*item))
            # Drop the client before asking for the next: one client at most in memory.
            del item
            if bar is not None:
                bar.update(1)
            if files.clients_done % checkpoint_every == 0:
                files.checkpoint()
        if files.clients_done != num_clients:
            raise ValueError(
                f"the client stream ended after {files.clients_done} clients, "
                f"expected num_clients={num_clients}"
            )
        if files.rows_done == 0:
            raise ValueError("the clients hold no examples; an empty store cannot be mapped")
        files.finish(num_clients, metadata)
    finally:
        files.close()
        if bar is not None:
            bar.close()
    return _move_into_place(work, final, overwrite)


def _move_into_place(work: Path, final: Path, overwrite: bool) -> Path:
    replace_folder(work, final, overwrite=overwrite)
    # A crash right here leaves this small file in a complete store, where
    # readers ignore it.
    (final / PROGRESS_FILE).unlink(missing_ok=True)
    return final
