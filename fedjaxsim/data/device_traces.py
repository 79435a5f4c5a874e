"""Readers of FedScale's device traces (Lai et al. 2022, "FedScale: Benchmarking
Model and System Performance of Federated Learning at Scale", ICML).

FedScale ships two pickled dicts keyed by an int trace client id, in
``benchmark/dataset/data/device_info/`` of github.com/SymbioticLab/FedScale
(checked at commit 7ec441c, Dec 2023; the binary files themselves are not in
the snapshot we could read, so their layout comes from the README next to
them and the code that reads them):

* ``client_device_capacity``: ``{client_id: {'computation': float,
  'communication': float}}``. ``fedscale/cloud/internal/client_metadata.py``
  reads ``computation`` as inference milliseconds per sample (its runtime
  multiplies it by 3 for a training step) and ``communication`` as the
  bandwidth that divides a model size in kilobits (``aggregator.py``:
  ``sys.getsizeof(pickle.dumps(model)) / 1024 * 8``), i.e. kbps.
* ``client_behave_trace``: ``{client_id: {'duration': int, 'inactive':
  [int], 'finish_time': int, 'active': [int], 'model': str}}``.
  ``ClientMetadata.is_active`` wraps time at the client's ``finish_time``
  and calls the client online iff ``active[k] <= t <= inactive[k]`` for some
  ``k``: the client is offline from 0 to ``active[0]``, online until
  ``inactive[0]``, and so on; it is offline from its last ``inactive`` to
  the end of the period. FedScale's own test uses ``active=[1, 3, 6, 9]``,
  ``inactive=[1, 4, 7, 10]``, ``finish_time=10``. An entry quoted from the
  real file has eight of each and ``finish_time=518400`` (six days).

What this module makes of them:

* Only ``active``, ``inactive`` and ``finish_time`` are read (``duration``
  and ``model`` are ignored). ``active`` and ``inactive`` must have the same
  length and alternate without going back (``active[0] <= inactive[0] <=
  active[1] <= ...``), and the times are clipped to ``[0, finish_time]``.
* Intervals are half-open, ``[active[k], inactive[k])`` (FedScale's are
  closed; the difference is a set of instants), so an entry with
  ``active[k] == inactive[k]`` is never online and is dropped.
* One period for every client: the largest ``finish_time``. FedScale wraps
  each client at its own ``finish_time``; the two agree when all clients
  share one (the quoted file's six days), and otherwise a client with a
  shorter trace is offline from its ``finish_time`` to the common period.
  One period keeps ``fedjaxsim.core.devices.TraceAvailability`` a single
  vectorised test per call.

Both readers accept FedScale's pickle and a JSON file of the same dict (keys
become strings there and are read back as ints). Pickles are read with a
restricted unpickler: the plain dicts, lists, numbers and strings of these
files need no global lookup, so it refuses every global except numpy's
reconstruction of a numeric scalar (in case a trace was written from numpy
values). A pickle that names anything else, ``os.system`` say, is refused
before anything is called.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from fedjaxsim.data.formats import DataFormatError

_NUMERIC_KINDS = "biuf"  # numpy scalar kinds a trace may hold: bool, int, uint, float
_SCALAR_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x, 2.x


class UnsafePickleError(DataFormatError):
    """A pickle refers to a global other than the few a trace may need."""


def _numpy_dtype(name, align=False, copy=False) -> np.dtype:
    """``numpy.dtype`` as a pickle calls it; the kind is checked in :func:`_numpy_scalar`."""
    if not isinstance(name, str):
        raise UnsafePickleError(f"numpy.dtype({name!r}) is not a numeric type name")
    return np.dtype(name, align=bool(align), copy=bool(copy))


def _numpy_scalar(dtype, data=None):
    """numpy's ``multiarray.scalar`` restricted to numeric types, as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
        raise UnsafePickleError(f"a numpy scalar of dtype {dtype!r} is not a number")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"a numpy {dtype} scalar needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


class _TraceUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global but numpy's numeric scalars."""

    def find_class(self, module, name):
        if module in _SCALAR_MODULES and name == "scalar":
            return _numpy_scalar
        if module == "numpy" and name == "dtype":
            return _numpy_dtype
        raise UnsafePickleError(
            f"the pickle refers to {module}.{name}; a device trace holds only dicts, lists, "
            "numbers and strings, so it is refused (loading it could run arbitrary code)"
        )


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    return path


def _load(path: Path) -> object:
    """The file's object: JSON when it starts with ``{``, otherwise a restricted pickle."""
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":  # never a pickle: "{" is no pickle opcode
        try:
            return json.loads(data)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
            raise DataFormatError(f"{path}: corrupt JSON ({error}); re-export the trace") from error
    try:
        return _TraceUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    # A damaged pickle fails with almost any exception (EOFError, UnpicklingError,
    # KeyError, struct errors...): each means the same thing here.
    except Exception as error:
        raise DataFormatError(
            f"{path}: not a readable pickle or JSON trace ({type(error).__name__}: {error}); "
            "the file is corrupt or truncated, download it again"
        ) from error


def _client_id(path: Path, key) -> int:
    """An int trace client id; JSON's string keys are read back as ints."""
    if isinstance(key, Integral) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.strip().lstrip("+-").isdigit():
        return int(key)
    raise DataFormatError(f"{path}: client id {key!r} is not an int; key the trace by int ids")


def _entries(path: Path) -> dict[int, Mapping]:
    """The trace's ``{client_id: entry}``, ids as ints, each entry a dict."""
    trace = _load(path)
    if not isinstance(trace, Mapping) or not trace:
        raise DataFormatError(
            f"{path}: expected a non-empty dict of client id -> entry, got "
            f"{type(trace).__name__} of {len(trace) if isinstance(trace, Mapping) else '?'} "
            "items; pass a FedScale trace"
        )
    entries = {}
    for key, entry in trace.items():
        client_id = _client_id(path, key)
        if not isinstance(entry, Mapping):
            raise DataFormatError(
                f"{path}: client {client_id}: the entry is a {type(entry).__name__}, not a dict"
            )
        if client_id in entries:
            raise DataFormatError(f"{path}: client {client_id} appears twice; keep one entry")
        entries[client_id] = entry
    return entries


def _number(path: Path, client_id: int, entry: Mapping, field: str, *, positive: bool) -> float:
    """``entry[field]`` as a finite float (``> 0`` or ``>= 0``), or a ValueError naming it."""
    if field not in entry:
        raise DataFormatError(
            f"{path}: client {client_id}: missing '{field}' (has {sorted(map(str, entry))}); "
            "add it or drop the client"
        )
    value = entry[field]
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise DataFormatError(
            f"{path}: client {client_id}: '{field}' must be a finite number {bound}, got "
            f"{value!r}; fix or drop that client's entry"
        )
    return float(value)


def read_device_capacity(path) -> dict[int, tuple[float, float]]:
    """Reads FedScale's ``client_device_capacity`` (pickle, or JSON of the same dict).

    Args:
      path: the file.

    Returns:
      trace client id -> (computation milliseconds per sample, communication
      kbps), for :func:`fedjaxsim.core.devices.speeds_from_capacity`.

    Raises:
      FileNotFoundError: naming the path.
      DataFormatError: (a ``ValueError``) for a corrupt or truncated file, a
        refused pickle global, or an entry without a finite positive
        ``computation`` and ``communication``, naming the file and client.
    """
    path = _existing(path)
    return {
        client_id: (
            _number(path, client_id, entry, "computation", positive=True),
            _number(path, client_id, entry, "communication", positive=True),
        )
        for client_id, entry in sorted(_entries(path).items())
    }


def _times(path: Path, client_id: int, entry: Mapping, field: str) -> np.ndarray:
    """float64[k]: the finite, non-negative times of ``entry[field]``."""
    if field not in entry:
        raise DataFormatError(
            f"{path}: client {client_id}: missing '{field}' (has {sorted(map(str, entry))}); "
            "add it or drop the client"
        )
    values = entry[field]
    ok = isinstance(values, (list, tuple)) and all(
        isinstance(v, Real) and not isinstance(v, bool) for v in values
    )
    times = np.asarray(values if ok else [], np.float64)
    if not ok or not np.all(np.isfinite(times) & (times >= 0)):
        raise DataFormatError(
            f"{path}: client {client_id}: '{field}' must be a list of finite times >= 0, got "
            f"{values!r:.80}; fix or drop that client's entry"
        )
    return times


def _client_intervals(path: Path, client_id: int, entry: Mapping) -> tuple[np.ndarray, float]:
    """float64[k, 2] ``[start, end)`` online intervals of one client, and its finish time."""
    finish = _number(path, client_id, entry, "finish_time", positive=True)
    active = _times(path, client_id, entry, "active")
    inactive = _times(path, client_id, entry, "inactive")
    if len(active) != len(inactive):
        raise DataFormatError(
            f"{path}: client {client_id}: {len(active)} 'active' times but {len(inactive)} "
            "'inactive' ones; each online spell needs both, fix or drop that client's entry"
        )
    alternating = np.stack([active, inactive], axis=1).reshape(-1)
    back = np.flatnonzero(np.diff(alternating) < 0)
    if back.size:
        k = int(back[0]) + 1
        raise DataFormatError(
            f"{path}: client {client_id}: 'active' and 'inactive' times must alternate without "
            f"going back (active[0] <= inactive[0] <= active[1] <= ...), but "
            f"{('active', 'inactive')[k % 2]}[{k // 2}]={alternating[k]} comes after "
            f"{alternating[k - 1]}; fix or drop that client's entry"
        )
    # Times past finish_time are never reached: FedScale wraps there.
    intervals = np.minimum(alternating.reshape(-1, 2), finish)
    return intervals[intervals[:, 1] > intervals[:, 0]], finish


def read_behaviour_trace(path) -> tuple[list[np.ndarray], float]:
    """Reads FedScale's ``client_behave_trace`` (pickle, or JSON of the same dict).

    Args:
      path: the file.

    Returns:
      ``(intervals, period_seconds)``: per trace client, in sorted id order,
      float64[k, 2] of ``[start, end)`` online intervals within one period,
      and the period, the largest ``finish_time`` of the trace (see the
      module docstring); for :class:`fedjaxsim.core.devices.TraceAvailability`.

    Raises:
      FileNotFoundError: naming the path.
      DataFormatError: (a ``ValueError``) for a corrupt or truncated file, a
        refused pickle global, a missing or mistyped field, or times that go
        back, naming the file and client.
    """
    path = _existing(path)
    parsed = [_client_intervals(path, i, e) for i, e in sorted(_entries(path).items())]
    return [intervals for intervals, _ in parsed], max(finish for _, finish in parsed)
