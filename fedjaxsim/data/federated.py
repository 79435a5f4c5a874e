"""A federated population stored as contiguous arrays plus per-client offsets.

Every field (``"x"``, ``"y"``, ...) is one array ``[total_examples, ...]``
with the clients' examples back to back; client ``i`` owns rows
``offsets[i]:offsets[i + 1]``. Gathering a cohort is O(cohort), and fields
may be NumPy memory maps, so a population costs no more RAM than the rows
actually read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Clients as slices of contiguous field arrays.

    Attributes:
      fields: field name -> array ``[total_examples, ...]``.
      offsets: int64[num_clients + 1], non-decreasing, from 0 to total_examples.
      client_names: optional original client identifiers (e.g. writer ids),
        one per client, in the same order.
    """

    fields: Mapping[str, np.ndarray]
    offsets: np.ndarray
    client_names: Sequence[str] | None = None

    def __post_init__(self):
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or len(offsets) < 2:
            raise ValueError("offsets must be a 1-D array with at least two entries")
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must start at 0 and never decrease")
        if not self.fields:
            raise ValueError("a FederatedData needs at least one field")
        for name, array in self.fields.items():
            if len(array) != offsets[-1]:
                raise ValueError(
                    f"field {name!r} has {len(array)} rows but offsets end at {offsets[-1]}"
                )
        if self.client_names is not None and len(self.client_names) != len(offsets) - 1:
            raise ValueError(
                f"{len(self.client_names)} client names for {len(offsets) - 1} clients"
            )

    @classmethod
    def from_clients(
        cls, clients: Sequence[Mapping[str, np.ndarray]], client_names: Sequence[str] | None = None
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
        return cls(fields, offsets, client_names)

    @classmethod
    def from_partition(
        cls, fields: Mapping[str, np.ndarray], assignment: Sequence[np.ndarray]
    ) -> FederatedData:
        """Builds clients from a centralized dataset and per-client index arrays."""
        order = np.concatenate([np.asarray(a, np.int64) for a in assignment])
        sizes = np.array([len(a) for a in assignment], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return cls({k: np.asarray(v)[order] for k, v in fields.items()}, offsets)

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_examples(self) -> np.ndarray:
        """int64[num_clients]: examples per client."""
        return np.diff(np.asarray(self.offsets))

    def client(self, index: int) -> dict[str, np.ndarray]:
        """The fields of one client (views, no copy)."""
        if not 0 <= index < self.num_clients:
            raise IndexError(f"client index {index} outside [0, {self.num_clients})")
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return {name: array[start:stop] for name, array in self.fields.items()}

    def clients(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self.client(int(i)) for i in indices]

    def all_examples(self) -> dict[str, np.ndarray]:
        """Every example of every client, as the contiguous field arrays."""
        return dict(self.fields)


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
    """A named federated train split plus a held-out test split."""

    name: str
    train: FederatedData
    test: FederatedData
    num_classes: int
    input_shape: tuple[int, ...]
