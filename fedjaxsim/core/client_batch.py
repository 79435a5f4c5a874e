"""The stacked cohort: every sampled client's local batches on array axes.

A cohort is laid out in *lanes*. The engine vmaps over lanes; inside a lane,
local steps run in a ``lax.scan``. The default layout has one client per lane
(``data[num_clients, num_steps, batch, ...]``). Packing several clients into a
lane, one after another, removes the padding steps that ragged client sizes
otherwise force on every vmapped client (a client with 3 steps in a cohort
whose largest client has 24 would idle for 21): the engine resets the local
state where a new client starts and finalizes a client where it ends.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from fedjaxsim.core.types import PyTree


class Cohort(NamedTuple):
    """A packed cohort, the input of one federated round.

    Padding examples and padding steps are zero in ``mask``. Padding clients
    have ``weight == 0`` and the out-of-range ``client_id == num_total_clients``
    (never -1, which would wrap around in a gather). Empty lane positions hold
    ``num_clients`` in ``lane_clients``. A cohort padded to a client-count
    bucket (``pack_cohort(num_clients=...)``) lists its padding clients after
    the real ones and gives them no lane position, so the engine trains only
    the real clients and its per-client records for the others are zero; a
    cohort may be all padding.
    """

    data: PyTree  # dict of arrays: any[num_lanes, num_steps, batch_size, ...]
    mask: jax.Array | np.ndarray  # bool[num_lanes, num_steps, batch_size]
    step_position: (
        jax.Array | np.ndarray
    )  # int32[num_lanes, num_steps]: lane position of the step's client
    lane_clients: (
        jax.Array | np.ndarray
    )  # int32[num_lanes, clients_per_lane]: cohort index per position
    weight: jax.Array | np.ndarray  # float32[num_clients]
    client_id: jax.Array | np.ndarray  # int32[num_clients]: population ids

    @property
    def num_clients(self) -> int:
        return np.shape(self.weight)[0]

    @property
    def num_lanes(self) -> int:
        return np.shape(self.mask)[0]

    @property
    def num_steps(self) -> int:
        return np.shape(self.mask)[1]

    @property
    def batch_size(self) -> int:
        return np.shape(self.mask)[2]

    @property
    def clients_per_lane(self) -> int:
        return np.shape(self.lane_clients)[1]


def validate_cohort(cohort: Cohort) -> None:
    """Checks that every leaf of ``cohort`` has consistent axes.

    Raises:
      ValueError: naming the offending leaf and its shape.
    """
    if np.ndim(cohort.mask) != 3:
        raise ValueError(
            f"cohort.mask must be bool[num_lanes, num_steps, batch_size], "
            f"got shape {np.shape(cohort.mask)}"
        )
    lead = tuple(np.shape(cohort.mask))
    for path, leaf in jax.tree_util.tree_leaves_with_path(cohort.data):
        if tuple(np.shape(leaf)[:3]) != lead:
            raise ValueError(
                f"cohort.data{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}; "
                f"its first three axes must equal the mask's {lead} "
                "(num_lanes, num_steps, batch_size)"
            )
    if tuple(np.shape(cohort.step_position)) != lead[:2]:
        raise ValueError(
            f"cohort.step_position has shape {np.shape(cohort.step_position)}, "
            f"expected {lead[:2]} (num_lanes, num_steps)"
        )
    if np.ndim(cohort.lane_clients) != 2 or np.shape(cohort.lane_clients)[0] != lead[0]:
        raise ValueError(
            f"cohort.lane_clients has shape {np.shape(cohort.lane_clients)}, "
            f"expected ({lead[0]}, clients_per_lane)"
        )
    if np.ndim(cohort.weight) != 1 or np.shape(cohort.client_id) != np.shape(cohort.weight):
        raise ValueError(
            f"cohort.weight {np.shape(cohort.weight)} and cohort.client_id "
            f"{np.shape(cohort.client_id)} must both have shape (num_clients,)"
        )
