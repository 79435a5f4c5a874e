"""Client-axis sharding over a device mesh (no pmap).

The cohort's lane axis is placed with ``NamedSharding(mesh, P("clients"))``;
server state is replicated. The engine sums client contributions over the
sharded axis with an ordinary ``jnp.sum``/add and lets XLA's SPMD partitioner
insert the all-reduce: it is the same program on one device or many, there
is no hand-written collective to get wrong, and the partitioner fuses the
reduction with the chunk loop. Meshes use ``AxisType.Auto`` (on jax 0.10.2 a
vmap-of-scan round failed under the Explicit axis types that
``jax.make_mesh`` defaults to).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjaxsim.core.client_batch import Cohort

CLIENT_AXIS = "clients"


def client_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"clients"`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("client_mesh needs at least one device")
    return Mesh(
        np.asarray(devices), (CLIENT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def mesh_size(mesh: Mesh) -> int:
    if CLIENT_AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named {CLIENT_AXIS!r}, got {mesh.axis_names}")
    return int(mesh.shape[CLIENT_AXIS])


def lane_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays whose leading axis is the lane axis."""
    return NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def pad_lanes(cohort: Cohort, multiple: int) -> Cohort:
    """Appends empty lanes (host side) until the lane count divides ``multiple``."""
    num_lanes = cohort.num_lanes
    padding = -num_lanes % multiple
    if padding == 0:
        return cohort

    def pad(array, fill=0):
        array = np.asarray(array)
        widths = [(0, padding)] + [(0, 0)] * (array.ndim - 1)
        return np.pad(array, widths, constant_values=fill)

    return cohort._replace(
        data=jax.tree.map(pad, cohort.data),
        mask=pad(cohort.mask),
        step_position=pad(cohort.step_position),
        lane_clients=pad(cohort.lane_clients, fill=cohort.num_clients),
    )


def shard_cohort(cohort: Cohort, mesh: Mesh) -> Cohort:
    """Pads a host cohort to whole lanes per device and places it on ``mesh``.

    Lane-axis arrays are sharded over ``"clients"``; per-client arrays
    (``weight``, ``client_id``) are replicated.
    """
    cohort = pad_lanes(cohort, mesh_size(mesh))
    lanes, copies = lane_sharding(mesh), replicated(mesh)
    return Cohort(
        data=jax.device_put(cohort.data, lanes),
        mask=jax.device_put(cohort.mask, lanes),
        step_position=jax.device_put(cohort.step_position, lanes),
        lane_clients=jax.device_put(cohort.lane_clients, lanes),
        weight=jax.device_put(cohort.weight, copies),
        client_id=jax.device_put(cohort.client_id, copies),
    )
