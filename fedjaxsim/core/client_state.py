"""Host-side per-client state for a whole population, materialised lazily.

Stateful algorithms (SCAFFOLD's control variates, Ditto's personal models,
error-feedback residuals) keep one state pytree per client across rounds. A
:class:`ClientStateStore` holds them on the host in NumPy. Before a round the
runner gathers the sampled cohort's states; after it, it scatters the new ones
back::

    store = ClientStateStore(default_state, num_total_clients)
    client_states = store.gather(cohort.client_id)        # [num_clients, ...]
    server_state, output = round_fn(server_state, cohort, rng, client_states)
    store.scatter(cohort.client_id, output.client_states)

Memory grows with the number of clients *ever sampled*, not with the
population: a row is allocated the first time a client's state is written, and
a never-written client reads as ``default_state``. Rows live in one table per
leaf (``[capacity, *leaf_shape]``, grown by doubling) addressed through a dict
from client id to row, so a population of 1,000,000 clients costs nothing
until its clients are sampled. With ``directory`` the tables are memory-mapped
``.npy`` files of ``num_total_clients`` rows; they are created sparse, so the
file system only stores the rows that were written.

``state_dict()`` / ``load_state_dict()`` exchange a flat dict of plain NumPy
arrays (no pickle), which any checkpointer (orbax included) can save.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from fedjaxsim.core.types import PyTree

CLIENT_IDS_KEY = "client_ids"
NUM_TOTAL_CLIENTS_KEY = "num_total_clients"


def _leaf_key(index: int) -> str:
    return f"leaf_{index}"


class ClientStateStore:
    """Per-client state pytrees for a population, kept on the host.

    Args:
      default_state: one client's state (a pytree of arrays), which is both the
        template (structure, per-leaf shape and dtype) and the value a client
        reads before its state is first written.
      num_total_clients: population size; valid ids are
        ``[0, num_total_clients)``. Larger ids are padding: gathered as the
        default, ignored by :meth:`scatter`.
      directory: if given, an existing directory where each leaf's table is a
        memory-mapped ``.npy`` file (``leaf_<i>.npy``) of ``num_total_clients``
        rows, created sparse. Otherwise tables live in memory.
      initial_capacity: rows allocated in memory before the first growth.

    Raises:
      ValueError: for a non-positive population or capacity, or an empty
        ``default_state``.
    """

    def __init__(
        self,
        default_state: PyTree,
        num_total_clients: int,
        *,
        directory: str | None = None,
        initial_capacity: int = 64,
    ):
        if not isinstance(num_total_clients, (int, np.integer)) or num_total_clients < 1:
            raise ValueError(f"num_total_clients must be a positive int, got {num_total_clients!r}")
        if not isinstance(initial_capacity, (int, np.integer)) or initial_capacity < 1:
            raise ValueError(f"initial_capacity must be a positive int, got {initial_capacity!r}")
        paths_and_leaves, self._treedef = jax.tree_util.tree_flatten_with_path(default_state)
        if not paths_and_leaves:
            raise ValueError(
                "default_state has no array leaves; a stateless algorithm needs no store"
            )
        self._leaf_names = [jax.tree_util.keystr(path) for path, _ in paths_and_leaves]
        # Host copies of the default, one array per leaf (any[*leaf_shape]).
        self._defaults = [np.array(leaf) for _, leaf in paths_and_leaves]
        self._num_total_clients = int(num_total_clients)
        self._directory = None if directory is None else str(directory)
        self._slot_of: dict[int, int] = {}  # client id -> row of the tables
        if self._directory is None:
            capacity = min(int(initial_capacity), self._num_total_clients)
            self._tables = [np.empty((capacity, *d.shape), d.dtype) for d in self._defaults]
        else:
            # Full-population files, sparse on disk: untouched rows take no space.
            capacity = self._num_total_clients
            self._tables = [
                np.lib.format.open_memmap(
                    f"{self._directory}/{_leaf_key(i)}.npy",
                    mode="w+",
                    dtype=d.dtype,
                    shape=(capacity, *d.shape),
                )
                for i, d in enumerate(self._defaults)
            ]
        # int64[capacity]: the client id held by each row (the first num_written are in use).
        self._row_client_ids = np.empty(capacity, np.int64)

    @property
    def num_total_clients(self) -> int:
        """The population size."""
        return self._num_total_clients

    @property
    def default_state(self) -> PyTree:
        """The state of a client that was never written (a fresh copy)."""
        return jax.tree.unflatten(self._treedef, [d.copy() for d in self._defaults])

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the row tables (the whole sparse files when memory-mapped)."""
        return sum(table.nbytes for table in self._tables)

    @property
    def num_written(self) -> int:
        """Number of clients whose state has been written (rows in use)."""
        return len(self._slot_of)

    def __contains__(self, client_id) -> bool:
        return int(client_id) in self._slot_of

    def _validated_ids(self, client_ids) -> np.ndarray:
        ids = np.asarray(client_ids)
        if ids.size == 0:  # an empty list has a float dtype
            ids = ids.astype(np.int64)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"client_ids must be a 1-D integer array, got dtype {ids.dtype} and "
                f"shape {ids.shape}"
            )
        ids = ids.astype(np.int64)
        if ids.size and ids.min() < 0:
            raise ValueError(
                f"client_ids must be >= 0, got {int(ids.min())}; padding clients take "
                f"the out-of-range id num_total_clients ({self._num_total_clients}), "
                "never -1"
            )
        return ids

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """int64[len(ids)]: the row of each id, -1 where none was written."""
        slot_of = self._slot_of
        return np.fromiter((slot_of.get(i, -1) for i in ids.tolist()), np.int64, len(ids))

    def gather(self, client_ids) -> PyTree:
        """The states of ``client_ids``, stacked on a leading axis.

        Args:
          client_ids: int[num_clients], cohort order. Ids never written (and
            padding ids ``>= num_total_clients``) read as the default state.

        Returns:
          A pytree like ``default_state`` whose leaves are NumPy arrays
          ``[num_clients, *leaf_shape]``.

        Raises:
          ValueError: for negative or non-integer ids.
        """
        ids = self._validated_ids(client_ids)
        rows = self._rows(ids)
        written = rows >= 0
        leaves = []
        for default, table in zip(self._defaults, self._tables):
            stacked = np.empty((len(ids), *default.shape), default.dtype)
            stacked[...] = default
            stacked[written] = table[rows[written]]
            leaves.append(stacked)
        return jax.tree.unflatten(self._treedef, leaves)

    def _grow_to(self, needed_rows: int) -> None:
        capacity = len(self._row_client_ids)
        if needed_rows <= capacity:
            return
        # Only in-memory tables grow: memory-mapped ones hold the population.
        new_capacity = min(max(needed_rows, 2 * capacity), self._num_total_clients)
        grown = []
        for table in self._tables:
            bigger = np.empty((new_capacity, *table.shape[1:]), table.dtype)
            bigger[:capacity] = table
            grown.append(bigger)
        self._tables = grown
        ids = np.empty(new_capacity, np.int64)
        ids[:capacity] = self._row_client_ids
        self._row_client_ids = ids

    def scatter(self, client_ids, new_states: PyTree) -> None:
        """Writes the states of ``client_ids``; padding ids are ignored.

        Args:
          client_ids: int[num_clients], the order of ``new_states``' leading
            axis. Ids ``>= num_total_clients`` are padding and are skipped.
          new_states: a pytree like ``default_state`` whose leaves are
            ``[num_clients, *leaf_shape]`` (NumPy or JAX arrays, e.g.
            ``RoundOutput.client_states``).

        Raises:
          ValueError: for a structure, shape or dtype kind that does not match
            ``default_state`` (naming the leaf), or repeated real ids.
        """
        ids = self._validated_ids(client_ids)
        try:
            leaves = self._treedef.flatten_up_to(new_states)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"new_states does not have the structure of default_state: {error}"
            ) from error
        arrays = []
        for name, default, leaf in zip(self._leaf_names, self._defaults, leaves):
            array = np.asarray(leaf)
            if array.shape != (len(ids), *default.shape):
                raise ValueError(
                    f"new_states{name} has shape {array.shape}, expected "
                    f"{(len(ids), *default.shape)} ([num_clients, *leaf_shape])"
                )
            if not np.can_cast(array.dtype, default.dtype, casting="same_kind"):
                raise ValueError(
                    f"new_states{name} has dtype {array.dtype}, which cannot be stored as "
                    f"{default.dtype}"
                )
            arrays.append(array)
        real = ids < self._num_total_clients
        real_ids = ids[real]
        if len(np.unique(real_ids)) != len(real_ids):
            raise ValueError("client_ids passed to scatter must be distinct (padding ids aside)")
        rows = self._rows(real_ids)
        unseen = np.flatnonzero(rows < 0)
        if unseen.size:
            first_new_row = len(self._slot_of)
            self._grow_to(first_new_row + unseen.size)
            new_rows = np.arange(first_new_row, first_new_row + unseen.size)
            rows[unseen] = new_rows
            self._row_client_ids[new_rows] = real_ids[unseen]
            self._slot_of.update(zip(real_ids[unseen].tolist(), new_rows.tolist()))
        for table, array in zip(self._tables, arrays):
            table[rows] = array[real]

    def state_dict(self) -> dict[str, np.ndarray]:
        """The written states as a flat dict of plain NumPy arrays (copies).

        Returns:
          ``{"client_ids": int64[num_written], "num_total_clients": int64[],
          "leaf_<i>": [num_written, *leaf_shape]}``, rows in the order of
          ``client_ids`` and leaves in ``jax.tree.leaves(default_state)`` order.
        """
        num_written = len(self._slot_of)
        state = {
            CLIENT_IDS_KEY: self._row_client_ids[:num_written].copy(),
            NUM_TOTAL_CLIENTS_KEY: np.asarray(self._num_total_clients, np.int64),
        }
        for i, table in enumerate(self._tables):
            state[_leaf_key(i)] = np.array(table[:num_written])
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replaces every stored state with those of ``state`` (from :meth:`state_dict`).

        Raises:
          ValueError: for missing keys, a different population size, or
            leaves whose shape or dtype do not match ``default_state``.
        """
        expected = {CLIENT_IDS_KEY, NUM_TOTAL_CLIENTS_KEY} | {
            _leaf_key(i) for i in range(len(self._defaults))
        }
        if set(state) != expected:
            raise ValueError(
                f"state dict keys {sorted(state)} do not match this store's {sorted(expected)}"
            )
        if int(state[NUM_TOTAL_CLIENTS_KEY]) != self._num_total_clients:
            raise ValueError(
                f"state dict is for num_total_clients={int(state[NUM_TOTAL_CLIENTS_KEY])}, "
                f"this store has {self._num_total_clients}"
            )
        ids = self._validated_ids(state[CLIENT_IDS_KEY])
        if ids.size and ids.max() >= self._num_total_clients:
            raise ValueError(f"state dict holds client id {int(ids.max())} out of range")
        for i, (name, default) in enumerate(zip(self._leaf_names, self._defaults)):
            array = np.asarray(state[_leaf_key(i)])
            if array.shape != (len(ids), *default.shape) or array.dtype != default.dtype:
                raise ValueError(
                    f"state dict {_leaf_key(i)} (leaf {name or '<root>'}) has "
                    f"{array.dtype}{list(array.shape)}, expected "
                    f"{default.dtype}{[len(ids), *default.shape]}"
                )
        self._slot_of = {}
        self.scatter(
            ids,
            jax.tree.unflatten(
                self._treedef, [np.asarray(state[_leaf_key(i)]) for i in range(len(self._defaults))]
            ),
        )
