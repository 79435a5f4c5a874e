"""Client-axis sharding over a device mesh (no pmap).

The cohort's lane axis is placed with ``NamedSharding(mesh, P("clients"))``;
server state is replicated. The engine (``core/engine/mesh.py``) runs the
round's lane work under ``jax.shard_map``: each device trains its block of
lanes with the same code as a single device (so a lone lane per device runs
unvmapped, with real ``lax.cond`` skips, and on a CPU host split into one
device per core the lanes train in parallel), then one ``psum`` over
``"clients"`` sums the contributions. (Letting XLA's SPMD partitioner insert
the all-reduce from an ordinary sum would force every chunk to span every
device, vmapping a device's lanes even when it holds one.) Meshes use ``AxisType.Auto``: on jax
0.10.2 a vmap-of-scan round fails under the Explicit axis types that
``jax.make_mesh`` defaults to.
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
    # Process-major order: process p owns a contiguous block of lanes, which is
    # what make_array_from_process_local_data expects for its local lanes.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (CLIENT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


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


def _pad_to_lane_count(cohort: Cohort, num_lanes: int) -> Cohort:
    padded = pad_lanes(cohort, num_lanes)  # a multiple of num_lanes >= current count
    if padded.num_lanes != num_lanes:
        raise ValueError(f"cannot pad {cohort.num_lanes} lanes to exactly {num_lanes}")
    return padded


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


def process_block(num_items: int, process_index: int, process_count: int) -> range:
    """The contiguous share of ``num_items`` cohort clients one process packs."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    per_process = -(-num_items // process_count)
    start = min(process_index * per_process, num_items)
    return range(start, min(start + per_process, num_items))


def pack_process_share(
    clients_of_share,
    cohort_ids,
    cohort_sizes,
    config,
    *,
    seed: int,
    round_index: int,
    num_total_clients: int,
    process_index: int,
    process_count: int,
    local_device_count: int = 1,
    lanes_per_process: int | None = None,
) -> Cohort:
    """Packs this process's share of a cohort, agreeing with every other process.

    Every process knows the whole cohort's ids and sizes (cheap metadata) but
    reads and packs only the clients of its :func:`process_block`. The step
    count, the lane count per process, the weights and the client ids are
    computed from the metadata identically on every process, so the local
    cohorts concatenate into one global cohort.

    Args:
      clients_of_share: the field dicts of this process's clients, in order.
      cohort_ids, cohort_sizes: ids and example counts of the whole cohort.
      config: a ``PackingConfig``.
      lanes_per_process: ``None`` gives each client its own lane; an int packs
        each share into that many lanes.

    Returns:
      A Cohort whose lane arrays are this process's lanes and whose
      ``weight``/``client_id``/``lane_clients`` index the global cohort.
    """
    from fedjaxsim.core.packing import assign_lanes, pack_cohort

    cohort_ids = np.asarray(cohort_ids)
    sizes = [int(n) for n in cohort_sizes]
    steps = [config.steps_for(n) for n in sizes]
    shares = [process_block(len(sizes), p, process_count) for p in range(process_count)]
    longest, most_lanes, most_per_lane = 1, 1, 1
    for share in shares:
        share_steps = [steps[i] for i in share]
        if not share_steps:
            continue
        if lanes_per_process is None:
            lanes = [[i] for i in range(len(share_steps))]
        else:
            lanes = [lane for lane in assign_lanes(share_steps, lanes_per_process) if lane]
        longest = max(longest, max(sum(share_steps[i] for i in lane) for lane in lanes))
        most_per_lane = max(most_per_lane, max(len(lane) for lane in lanes))
        most_lanes = max(
            most_lanes, len(share_steps) if lanes_per_process is None else lanes_per_process
        )
    lanes_here = -(-most_lanes // local_device_count) * local_device_count
    share = shares[process_index]
    num_clients = len(sizes)
    if len(clients_of_share) != len(share):
        raise ValueError(
            f"process {process_index} must pack {len(share)} clients, got {len(clients_of_share)}"
        )
    weight = np.array([config.client_weight(n) for n in sizes], np.float32)
    if len(share) == 0:
        raise ValueError(
            f"process {process_index} has no clients: a cohort of {num_clients} over "
            f"{process_count} processes; use a cohort of at least one client per process"
        )
    local = pack_cohort(
        clients_of_share,
        cohort_ids[share.start : share.stop],
        config,
        seed=seed,
        round_index=round_index,
        num_total_clients=num_total_clients,
        num_lanes=lanes_per_process,
        num_steps=config.bucket(longest),
    )
    if local.num_lanes < lanes_here:
        local = _pad_to_lane_count(local, lanes_here)
    lane_clients = np.asarray(local.lane_clients)
    lane_clients = np.where(lane_clients < len(share), lane_clients + share.start, num_clients)
    # Every process needs the same [lanes, clients_per_lane] shape.
    extra_columns = most_per_lane - lane_clients.shape[1]
    lane_clients = np.pad(lane_clients, ((0, 0), (0, extra_columns)), constant_values=num_clients)
    return local._replace(
        lane_clients=lane_clients.astype(np.int32),
        weight=weight,
        client_id=cohort_ids.astype(np.int32),
    )


def assemble_global_cohort(local: Cohort, mesh: Mesh) -> Cohort:
    """Builds global arrays from every process's local lanes.

    Lane arrays become one array sharded over ``"clients"`` with
    ``jax.make_array_from_process_local_data``; per-client arrays, identical
    on every process, are replicated.
    """
    lanes, copies = lane_sharding(mesh), replicated(mesh)
    make = jax.make_array_from_process_local_data
    lane_array = lambda leaf: make(lanes, np.asarray(leaf))  # noqa: E731
    return Cohort(
        data=jax.tree.map(lane_array, local.data),
        mask=lane_array(local.mask),
        step_position=lane_array(local.step_position),
        lane_clients=lane_array(local.lane_clients),
        weight=make(copies, np.asarray(local.weight)),
        client_id=make(copies, np.asarray(local.client_id)),
    )
