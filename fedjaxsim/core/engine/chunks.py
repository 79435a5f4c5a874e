"""Chunks: lanes are trained ``clients_per_chunk`` at a time, so memory stays bounded.

Chunks run in a ``lax.scan`` (or unrolled); the clients' sums are added as
they go and their records (metrics, states, stacked contributions) are
scattered back to cohort order at the end.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.core.engine.client import ClientRecord, ClientSums
from fedjaxsim.core.engine.lanes import LaneInputs
from fedjaxsim.core.engine.plan import ExecutionPlan
from fedjaxsim.core.trees import tree_add
from fedjaxsim.core.types import PyTree

# (context, chunk of LaneInputs) -> (sums, records [lanes, per_lane, ...])
TrainChunk = Callable[..., tuple[ClientSums, ClientRecord]]


class TrainedClients(NamedTuple):
    """A block of lanes after training."""

    sums: ClientSums  # summed over every client of the block
    records: ClientRecord  # [num_clients, ...] in cohort order; zeros for absent clients


def pad_lanes(tree: PyTree, num_padding: int) -> PyTree:
    """Appends ``num_padding`` empty lanes (zeros) to every leaf's axis 0."""

    def pad(leaf):
        return jnp.pad(leaf, [(0, num_padding)] + [(0, 0)] * (leaf.ndim - 1))

    return jax.tree.map(pad, tree)


def lanes_by_steps(mask, num_chunks: int) -> jax.Array:
    """Groups lanes into ``num_chunks`` equal chunks by their number of real
    steps, longest first (ties in lane order): chunk i holds the lanes ranked
    ``[i * chunk, (i + 1) * chunk)``, so a chunk of short clients can stop early.

    Args:
      mask: ``bool[num_lanes, num_steps, batch]``; ``num_lanes`` divisible by
        ``num_chunks``.

    Returns:
      ``int32[num_chunks, num_lanes // num_chunks]`` lane indices.
    """
    lane_steps = jnp.sum(jnp.any(mask, axis=2), axis=1)
    order = jnp.argsort(-lane_steps, stable=True).astype(jnp.int32)
    return order.reshape(num_chunks, -1)


def scatter_to_clients(records: PyTree, output_lanes, num_clients: int) -> PyTree:
    """``[lanes, per_lane, ...]`` records to ``[num_clients, ...]`` in cohort order.

    ``output_lanes`` (int32[lanes, per_lane]) holds each position's cohort
    index, ``num_clients`` where unoccupied: those rows are dropped.
    """
    positions = output_lanes.reshape(-1)

    def scatter(leaf):
        leaf = leaf.reshape(-1, *leaf.shape[2:])
        out = jnp.zeros((num_clients, *leaf.shape[1:]), leaf.dtype)
        return out.at[positions].set(leaf, mode="drop")

    return jax.tree.map(scatter, records)


def _chunk_slicer(plan: ExecutionPlan, lanes: LaneInputs, num_chunks: int, chunk: int):
    """``(chunk_lanes int32[num_chunks, chunk], chunk_inputs(index) -> LaneInputs)``."""
    if plan.sort_chunks:
        chunk_lanes = lanes_by_steps(lanes.mask, num_chunks)

        def chunk_inputs(index):  # each chunk is gathered inside the loop: one chunk's copy
            return jax.tree.map(lambda leaf: jnp.take(leaf, chunk_lanes[index], axis=0), lanes)

        return chunk_lanes, chunk_inputs
    # Lane l = c * num_chunks + i goes to chunk i, position c. The reshape to
    # [chunk, num_chunks, ...] is free and each chunk is a strided slice of it
    # taken inside the loop, so the cohort is never duplicated in memory.
    chunk_lanes = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(chunk, num_chunks).T
    grouped = jax.tree.map(lambda leaf: leaf.reshape(chunk, num_chunks, *leaf.shape[1:]), lanes)

    def chunk_inputs(index):
        return jax.tree.map(
            lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, axis=1, keepdims=False), grouped
        )

    return chunk_lanes, chunk_inputs


def train_lanes(
    train_chunk: TrainChunk,
    plan: ExecutionPlan,
    context,
    lanes: LaneInputs,
    lane_clients: jax.Array,
    num_clients: int,
    clients_per_chunk: int | None,
) -> TrainedClients:
    """Trains a block of lanes (all of them, or one device's) in chunks.

    Args:
      lane_clients: int32[lanes, per_lane], the cohort index of each
        position (``num_clients`` where empty).
    """
    num_lanes = lanes.mask.shape[0]
    chunk = num_lanes if clients_per_chunk is None else min(clients_per_chunk, num_lanes)
    num_chunks = -(-num_lanes // chunk)
    num_padding = num_chunks * chunk - num_lanes
    if num_padding:  # empty lanes: no real examples, unoccupied positions
        lanes = pad_lanes(lanes, num_padding)
        lane_clients = jnp.pad(
            lane_clients, ((0, num_padding), (0, 0)), constant_values=num_clients
        )
    if num_chunks == 1:
        sums, records = train_chunk(context, lanes)
        return TrainedClients(sums, scatter_to_clients(records, lane_clients, num_clients))

    chunk_lanes, chunk_inputs = _chunk_slicer(plan, lanes, num_chunks, chunk)
    if plan.chunk_loop == "unroll":
        outputs = [train_chunk(context, chunk_inputs(i)) for i in range(num_chunks)]
        sums = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *[o[0] for o in outputs])
        records = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[1] for o in outputs])
    else:
        shapes = jax.eval_shape(lambda: train_chunk(context, chunk_inputs(0))[0])

        def body(total, index):
            sums, records = train_chunk(context, chunk_inputs(index))
            return tree_add(total, sums), records

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        sums, records = jax.lax.scan(body, zeros, jnp.arange(num_chunks, dtype=jnp.int32))
    # Records are [num_chunks, chunk, per_lane, ...]; row (i, c) is lane chunk_lanes[i, c].
    records = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), records)
    output_lanes = lane_clients[chunk_lanes.reshape(-1)]
    return TrainedClients(sums, scatter_to_clients(records, output_lanes, num_clients))
