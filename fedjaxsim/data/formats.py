"""Readers for the file formats that federated datasets are published in.

Each reader yields ``(client_id, fields, declared_num_examples, origin)``
with the arrays exactly as the file holds them and the file they came from; dataset modules (e.g.
:mod:`fedjaxsim.data.emnist`) map columns and convert pixels. Every failure
to parse names the file.

* TensorFlow Federated's HDF5 ``ClientData``: group ``examples/<client_id>``
  holding one dataset per column.
* FedJAX's SQLite files: table ``federated_data(client_id BLOB, data BLOB,
  num_examples INTEGER)``, ``data`` being zlib-compressed msgpack of a map from
  column name to array (see :func:`decode_fedjax_examples`).
* LEAF's JSON shards: ``{"users": [...], "num_samples": [...], "user_data":
  {user: {"x": [...], "y": [...]}}}``.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# (client id, raw columns, the count the file declares or None, source file)
ClientRecord = tuple[str, dict[str, np.ndarray], "int | None", str]

# msgpack extension type codes of FedJAX's serialization (fedjax/core/serialization.py).
_EXT_NDARRAY = 1
_EXT_NATIVE_COMPLEX = 2
_EXT_NPSCALAR = 3
_EXT_BYTES_NDARRAY = 4


class DataFormatError(ValueError):
    """A file is corrupt, truncated or not in the expected format."""


def _require(module: str, extra: str):
    """Imports an optional dependency or says which pip command provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"reading this format needs the '{module}' package: pip install 'fedjaxsim[{extra}]'"
        ) from error


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    return path


# ----------------------------------------------------------------------------- TFF HDF5


def iter_tff_hdf5(path: str | Path) -> Iterator[ClientRecord]:
    """Clients of a TFF HDF5 ``ClientData`` file, in the file's (sorted) order.

    Raises:
      FileNotFoundError: no such file.
      DataFormatError: not HDF5, truncated, or without an ``examples`` group.
    """
    h5py = _require("h5py", "data")
    path = _existing(path)
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataFormatError(
            f"{path} is not a readable HDF5 file ({error}); it may be truncated or corrupt: "
            "delete it and fetch it again"
        ) from error
    with file:
        examples = file.get("examples")
        if not isinstance(examples, h5py.Group):
            raise DataFormatError(
                f"{path} has no 'examples' group: it is not a TensorFlow Federated ClientData file"
            )
        for client_id in examples:
            group = examples[client_id]
            if not isinstance(group, h5py.Group):
                raise DataFormatError(f"{path}: examples/{client_id} is not a group of columns")
            try:
                fields = {name: np.asarray(group[name][()]) for name in group}
            except (OSError, KeyError, TypeError) as error:
                raise DataFormatError(
                    f"{path}: cannot read client {client_id!r} ({error}); the file is corrupt"
                ) from error
            yield str(client_id), fields, None, str(path)


# ----------------------------------------------------------------------------- FedJAX SQLite


def _array_from_msgpack(data: bytes) -> np.ndarray:
    msgpack = _require("msgpack", "data")
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    dtype = np.dtype(dtype_name.decode("ascii"))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected:
        raise ValueError(f"array of {dtype}{list(shape)} needs {expected} bytes, got {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _bytes_array_from_msgpack(data: bytes) -> np.ndarray:
    msgpack = _require("msgpack", "data")
    shape, flat = msgpack.unpackb(data, raw=True)
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape)


def _fedjax_ext_hook(code: int, data: bytes):
    """Decodes FedJAX's msgpack extension types (arrays and scalars)."""
    if code == _EXT_NDARRAY:
        return _array_from_msgpack(data)
    if code == _EXT_NPSCALAR:
        return _array_from_msgpack(data)[()]
    if code == _EXT_BYTES_NDARRAY:
        return _bytes_array_from_msgpack(data)
    if code == _EXT_NATIVE_COMPLEX:
        msgpack = _require("msgpack", "data")
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    raise ValueError(f"unknown msgpack extension type {code}")


def decode_fedjax_examples(blob: bytes) -> dict[str, np.ndarray]:
    """One client's examples from a FedJAX SQLite ``data`` blob.

    The blob is ``zlib.compress(msgpack.packb(columns))`` where ``columns`` maps
    each column name to an array, and an array is msgpack extension type 1
    wrapping ``msgpack.packb([shape, dtype_name, row_major_bytes])`` (type 3:
    a NumPy scalar in the same encoding, type 4: an array of bytes objects as
    ``[shape, flat_list]``).

    Raises:
      ValueError: not zlib, not msgpack, or not a map of named arrays.
    """
    msgpack = _require("msgpack", "data")
    try:
        raw = zlib.decompress(blob)
    except zlib.error as error:
        raise ValueError(f"not zlib-compressed data ({error})") from error
    try:
        columns = msgpack.unpackb(raw, raw=False, ext_hook=_fedjax_ext_hook)
    except (ValueError, TypeError) as error:  # msgpack's own errors are ValueErrors
        raise ValueError(f"not a msgpack map of arrays ({error})") from error
    if not isinstance(columns, dict) or not all(isinstance(k, str) for k in columns):
        raise ValueError(
            f"expected a msgpack map from column names to arrays, got {type(columns).__name__}"
        )
    for name, value in columns.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"column {name!r} is a {type(value).__name__}, not an array")
    return columns


def fedjax_client_name(client_id: bytes | str) -> str:
    """The writer id of a FedJAX client id.

    FedJAX's EMNIST ids are ``b"<16 hex digits>:f0000_00"``: a hash prefix
    that fixes a shuffled storage order, then the writer id that TFF and LEAF
    use. The prefix is dropped so that the three formats name clients alike.
    """
    if isinstance(client_id, bytes):
        client_id = client_id.decode("utf-8")
    prefix, separator, rest = client_id.partition(":")
    if separator and rest and len(prefix) == 16 and all(c in "0123456789abcdef" for c in prefix):
        return rest
    return client_id


def iter_fedjax_sqlite(path: str | Path) -> Iterator[ClientRecord]:
    """Clients of a FedJAX SQLite file, in storage (rowid) order.

    The client id is passed through :func:`fedjax_client_name`.

    Raises:
      FileNotFoundError: no such file.
      DataFormatError: not SQLite, malformed, no ``federated_data`` table, or a
        blob that does not decode (the client is named).
    """
    path = _existing(path)
    # Read-only URI: a missing or wrong path never creates an empty database.
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        try:
            tables = {
                row[0]
                for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as error:
            raise DataFormatError(
                f"{path} is not a readable SQLite database ({error}); it may be truncated or "
                "corrupt: delete it and fetch it again"
            ) from error
        if "federated_data" not in tables:
            raise DataFormatError(
                f"{path} has no federated_data table (tables: {sorted(tables)}): it is not a "
                "FedJAX SQLite dataset"
            )
        try:
            cursor = connection.execute(
                "SELECT client_id, data, num_examples FROM federated_data ORDER BY rowid"
            )
            for client_id, blob, num_examples in cursor:
                name = fedjax_client_name(client_id)
                try:
                    fields = decode_fedjax_examples(blob)
                except (ValueError, TypeError) as error:
                    raise DataFormatError(
                        f"{path}: client {name!r} does not decode: {error}"
                    ) from error
                yield name, fields, int(num_examples), str(path)
        except sqlite3.DatabaseError as error:
            raise DataFormatError(
                f"{path} is corrupt or truncated ({error}): delete it and fetch it again"
            ) from error
    finally:
        connection.close()


# ----------------------------------------------------------------------------- LEAF JSON


def leaf_json_files(location: str | Path | Sequence[str | Path]) -> list[Path]:
    """The ``*.json`` shards of a LEAF split: a folder, one file, or a list.

    Raises:
      FileNotFoundError: a missing path, or a folder without ``.json`` files.
    """
    if isinstance(location, (str, Path)):
        location = Path(location)
        if location.is_dir():
            files = sorted(location.glob("*.json"))
            if not files:
                raise FileNotFoundError(f"{location} holds no .json shards")
            return files
        return [_existing(location)]
    return [_existing(p) for p in location]


def iter_leaf_json_records(
    location: str | Path | Sequence[str | Path],
) -> Iterator[tuple[str, dict, int, str]]:
    """Users of LEAF JSON shards with their records as JSON decoded them.

    Yields ``(user, {"x": list, "y": list}, declared count, shard)``, file by
    file in the shards' user order, for datasets whose ``x`` is not numeric
    (e.g. Shakespeare's strings).

    Raises:
      DataFormatError: unreadable JSON (a truncated shard), missing keys, or
        ``users`` and ``user_data`` that disagree, naming the shard.
    """
    for path in leaf_json_files(location):
        try:
            with open(path, encoding="utf-8") as file:
                shard = json.load(file)
        except (ValueError, UnicodeDecodeError) as error:
            raise DataFormatError(
                f"{path} is not valid JSON ({error}); it may be truncated or corrupt"
            ) from error
        if not isinstance(shard, dict) or not {"users", "num_samples", "user_data"} <= set(shard):
            raise DataFormatError(
                f"{path} is not a LEAF shard: it needs the keys users, num_samples and user_data"
            )
        users, counts, user_data = shard["users"], shard["num_samples"], shard["user_data"]
        if len(users) != len(counts):
            raise DataFormatError(
                f"{path}: {len(users)} users but {len(counts)} num_samples entries"
            )
        missing = [u for u in users if u not in user_data]
        if missing or len(user_data) != len(users):
            raise DataFormatError(
                f"{path}: users and user_data disagree (e.g. missing {missing[:3]}, "
                f"{len(users)} users, {len(user_data)} user_data entries)"
            )
        for user, count in zip(users, counts):
            record = user_data[user]
            if not isinstance(record, dict) or not {"x", "y"} <= set(record):
                raise DataFormatError(f"{path}: user {user!r} has no x and y lists")
            yield str(user), record, int(count), str(path)


def iter_leaf_json(location: str | Path | Sequence[str | Path]) -> Iterator[ClientRecord]:
    """Clients of LEAF JSON shards, file by file in the shards' user order.

    ``x`` is decoded as float32 ``[N, ...]`` and ``y`` as int64 ``[N]``; the
    declared count is the shard's ``num_samples`` entry.

    Raises:
      DataFormatError: unreadable JSON (a truncated shard), missing keys, or
        ``users`` and ``user_data`` that disagree, naming the shard.
    """
    for user, record, count, path in iter_leaf_json_records(location):
        try:
            x = np.asarray(record["x"], dtype=np.float32)
            y = np.asarray(record["y"])
        except (ValueError, TypeError) as error:
            raise DataFormatError(
                f"{path}: user {user!r} has ragged or non-numeric data ({error})"
            ) from error
        if y.size == 0:
            y = y.astype(np.int64)
        yield user, {"x": x, "y": y}, count, path
