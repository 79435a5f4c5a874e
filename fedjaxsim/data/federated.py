"""A federated population stored as contiguous arrays plus per-client offsets.

Every field (``"x"``, ``"y"``, ...) is one array ``[total_examples, ...]``
with the clients' examples back to back; client ``i`` owns rows
``offsets[i]:offsets[i + 1]``. Gathering a cohort is O(cohort), and fields
may be NumPy memory maps (see :mod:`fedjaxsim.data.store`), so a population
costs no more RAM than the rows actually read.

Pixel convention. Every image dataset that fedjaxsim loads hands the model
``float32`` pixels in ``[0, 1]`` with ink (the stroke of a handwritten
character) at 1.0 and background at 0.0, as FedJAX feeds its models. On disk
and in memory a field is kept in the smallest dtype that holds the source
exactly (``uint8`` for 8-bit sources) together with a *scale*:
``model_value = float32(stored_value) / scale``. The conversion happens when
clients are gathered (:meth:`FederatedData.clients` with ``decode=True``, the
default), so a 1,000,000-client population stays at one byte per pixel.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedjaxsim.core.tasks import CLASSIFICATION, Task


def decode_field(array: np.ndarray, scale: float | None) -> np.ndarray:
    """The model-facing values of a stored field.

    Args:
      array: stored values, e.g. ``uint8`` pixels.
      scale: ``None`` returns ``array`` unchanged (no copy); a number returns
        ``float32(array) / scale``, a fresh array.

    Returns:
      The decoded array.
    """
    if scale is None:
        return array
    decoded = np.asarray(array, dtype=np.float32).copy()
    # Division (not multiplication by 1/scale) is correctly rounded, so a
    # uint8 k decodes to exactly float32(k / 255) like the published files.
    decoded /= np.float32(scale)
    return decoded


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Clients as slices of contiguous field arrays.

    Attributes:
      fields: field name -> array ``[total_examples, ...]`` (stored dtype).
      offsets: int64[num_clients + 1], non-decreasing, from 0 to total_examples.
      client_names: optional original client identifiers (e.g. writer ids),
        one per client, in the same order, all distinct.
      field_scales: field name -> scale for fields stored in a compact dtype;
        gathering divides them by the scale as float32 (see the module
        docstring). Fields not listed are handed out as stored.
    """

    fields: Mapping[str, np.ndarray]
    offsets: np.ndarray
    client_names: Sequence[str] | None = None
    field_scales: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or len(offsets) < 2:
            raise ValueError("offsets must be a 1-D array with at least two entries")
        if not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(f"offsets must be integers, got dtype {offsets.dtype}")
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must start at 0 and never decrease")
        if not self.fields:
            raise ValueError("a FederatedData needs at least one field")
        for name, array in self.fields.items():
            if len(array) != offsets[-1]:
                raise ValueError(
                    f"field {name!r} has {len(array)} rows but offsets end at {offsets[-1]}"
                )
        for name, scale in self.field_scales.items():
            if name not in self.fields:
                raise ValueError(f"field_scales names {name!r}, which is not a field")
            if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"scale of field {name!r} must be a positive number, got {scale!r}"
                )
        if self.client_names is not None:
            if len(self.client_names) != len(offsets) - 1:
                raise ValueError(
                    f"{len(self.client_names)} client names for {len(offsets) - 1} clients"
                )
            if not isinstance(self.client_names, LazyClientNames):
                # A lazy list was checked when its file was written; checking it
                # here would parse every name of a million-client store at load.
                check_unique_names(self.client_names)

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[Mapping[str, np.ndarray]],
        client_names: Sequence[str] | None = None,
        field_scales: Mapping[str, float] | None = None,
    ) -> FederatedData:
        """Concatenates per-client dicts of arrays (all with the same fields)."""
        if not clients:
            raise ValueError("no clients given")
        names = list(clients[0])
        for index, client in enumerate(clients):
            if list(client) != names:
                raise ValueError(f"client {index} has fields {list(client)}, expected {names}")
            lengths = {k: len(v) for k, v in client.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"client {index} has fields of different lengths {lengths}")
        sizes = np.array([len(client[names[0]]) for client in clients], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        fields = {name: np.concatenate([np.asarray(c[name]) for c in clients]) for name in names}
        return cls(fields, offsets, client_names, dict(field_scales or {}))

    @classmethod
    def from_partition(
        cls,
        fields: Mapping[str, np.ndarray],
        assignment: Sequence[np.ndarray],
        client_names: Sequence[str] | None = None,
        field_scales: Mapping[str, float] | None = None,
    ) -> FederatedData:
        """Builds clients from a centralized dataset and per-client index arrays."""
        order = np.concatenate([np.asarray(a, np.int64) for a in assignment])
        sizes = np.array([len(a) for a in assignment], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return cls(
            {k: np.asarray(v)[order] for k, v in fields.items()},
            offsets,
            client_names,
            dict(field_scales or {}),
        )

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_examples(self) -> np.ndarray:
        """int64[num_clients]: examples per client."""
        return np.diff(np.asarray(self.offsets))

    @property
    def total_examples(self) -> int:
        return int(self.offsets[-1])

    def decode(self, fields: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Applies ``field_scales`` to arrays laid out like this data's fields.

        Works on any leading axes, so a runner may gather and pack the stored
        dtype (four times fewer bytes for uint8 pixels) and decode the packed
        cohort afterwards; zero padding stays 0.0.
        """
        return {
            name: decode_field(array, self.field_scales.get(name)) for name, array in fields.items()
        }

    def client(self, index: int, decode: bool = True) -> dict[str, np.ndarray]:
        """The fields of one client.

        Args:
          index: client position in ``[0, num_clients)``.
          decode: True converts scaled fields to the model-facing float32;
            False returns the stored arrays. Unscaled fields are views (no copy).
        """
        if not 0 <= index < self.num_clients:
            raise IndexError(f"client index {index} outside [0, {self.num_clients})")
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        rows = {name: array[start:stop] for name, array in self.fields.items()}
        return self.decode(rows) if decode else rows

    def clients(self, indices: Sequence[int], decode: bool = True) -> list[dict[str, np.ndarray]]:
        """The fields of several clients, in the order given (see :meth:`client`)."""
        return [self.client(int(i), decode) for i in indices]

    def all_examples(self, decode: bool = True) -> dict[str, np.ndarray]:
        """Every example of every client, as the contiguous field arrays."""
        return self.decode(self.fields) if decode else dict(self.fields)

    def select(self, indices: Sequence[int]) -> FederatedData:
        """A new in-memory population holding the given clients, in that order."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("select needs at least one client")
        clients = self.clients(indices, decode=False)
        names = None if self.client_names is None else [self.client_names[i] for i in indices]
        return FederatedData.from_clients(clients, names, self.field_scales)


class LazyClientNames(Sequence[str]):
    """Client names in a JSON list file, parsed on first use.

    A 1,000,000-client store loads in milliseconds because nothing reads its
    names (about 70 MB of Python strings) until a name is asked for.

    Args:
      path: JSON file holding a list of strings.
      count: the number of names the file must hold.
    """

    def __init__(self, path: str | Path, count: int):
        self.path = Path(path)
        self._count = int(count)
        self._names: list[str] | None = None
        self._lock = threading.Lock()  # the runner's prefetch thread may ask too

    def _load(self) -> list[str]:
        with self._lock:
            if self._names is None:
                try:
                    names = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as error:
                    raise ValueError(
                        f"cannot read client names from {self.path}: {error}"
                    ) from error
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError(f"{self.path} must hold a JSON list of strings")
                if len(names) != self._count:
                    raise ValueError(
                        f"{self.path} holds {len(names)} client names, expected {self._count}"
                    )
                self._names = names
            return self._names

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self._load()[index]

    def __iter__(self):
        return iter(self._load())


def check_unique_names(names: Sequence[str]) -> None:
    """Raises ValueError naming the repeated client names, if there are any."""
    if len(set(names)) == len(names):
        return
    seen, repeated = set(), []
    for name in names:
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    shown = ", ".join(repr(n) for n in repeated[:5])
    raise ValueError(
        f"duplicate client ids: {shown}{' ...' if len(repeated) > 5 else ''} "
        f"({len(repeated)} repeated); every client needs a distinct id"
    )


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
    """A named federated train split plus a held-out test split."""

    name: str
    train: FederatedData
    test: FederatedData
    num_classes: int
    input_shape: tuple[int, ...]
    task: Task = CLASSIFICATION
    """What the labels mean (:mod:`fedjaxsim.core.tasks`): classification, next
    token or multi-label; ``num_classes`` is the vocabulary or tag count of the
    latter two."""
