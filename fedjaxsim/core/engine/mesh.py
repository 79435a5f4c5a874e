"""The clients mesh: each device trains its block of lanes, one psum adds them up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fedjaxsim.core import sharding
from fedjaxsim.core.engine.chunks import TrainedClients, pad_lanes


def on_mesh(train_block, mesh, clients_per_chunk: int | None):
    """Wraps ``train_block(context, lanes, lane_clients, num_clients, clients_per_chunk)``
    so that each device of ``mesh`` runs it on its own block of lanes.

    Each device trains its lanes exactly as one device would (its lone lane
    unvmapped, its chunks grouped by length, ``clients_per_chunk`` split
    between the devices) and writes its clients' records into
    ``[num_clients]`` rows, zeros elsewhere; one ``psum`` over the clients
    axis then gives every sum and every client's exact records at once.
    Cohorts whose lane count the devices do not divide get empty lanes.
    """
    num_devices = sharding.mesh_size(mesh)
    per_device_chunk = None if clients_per_chunk is None else -(-clients_per_chunk // num_devices)
    lanes_spec = PartitionSpec(sharding.CLIENT_AXIS)

    def train(context, lanes, lane_clients, num_clients) -> TrainedClients:
        num_padding = -lanes.mask.shape[0] % num_devices
        if num_padding:  # whole lanes per device
            lanes = pad_lanes(lanes, num_padding)
            lane_clients = jnp.pad(
                lane_clients, ((0, num_padding), (0, 0)), constant_values=num_clients
            )

        def device_block(context, lanes, lane_clients):
            trained = train_block(context, lanes, lane_clients, num_clients, per_device_chunk)
            return jax.lax.psum(trained, sharding.CLIENT_AXIS)

        return jax.shard_map(
            device_block,
            mesh=mesh,
            in_specs=(PartitionSpec(), lanes_spec, lanes_spec),
            out_specs=PartitionSpec(),
            # Varying-axis checks off: user custom_vjp rules (and the CPU dense
            # layer's) need not annotate which values vary per device.
            check_vma=False,
        )(context, lanes, lane_clients)

    return train


def replicate(tree, mesh):
    """Pins every leaf of ``tree`` to a replicated sharding on ``mesh``."""
    everywhere = sharding.replicated(mesh)
    return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, everywhere), tree)
