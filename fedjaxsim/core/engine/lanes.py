"""Lanes: the clients of a lane train one after another, lanes side by side.

A lane holds one client (``pack_cohort(num_lanes=None)``) or several packed
one after another. Its steps run in one loop: where a client starts, the
local state is reset from ``client_init``; where it ends, its local state and
step sums are recorded in its row of a ``[clients_per_lane]`` buffer; after
the loop every client of the lane is finalised together. With one client per
lane the reset and the record are the loop's start and end.

Lanes are vmapped in chunks (``chunks.py``); a chunk of a single lane (the
CPU plan's lone lane per device) runs without vmap, so that its loop stops at
its last real step instead of running the step bucket's padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.core.algorithm import Algorithm
from fedjaxsim.core.engine.client import (
    ClientRecord,
    ClientSums,
    RoundContext,
    batches_with_feature_shapes,
    batches_with_frozen,
    client_broadcast,
    finish_client,
    guarded_step,
)
from fedjaxsim.core.engine.plan import ExecutionPlan
from fedjaxsim.core.trees import tree_where
from fedjaxsim.core.types import PyTree

# A client's key is fold_in(round_key, client_id); its local step t draws
# fold_in(client_key, t). Its client_init and its aggregator share draw from
# these two, which no step index reaches.
INIT_STREAM = 0xFFFF_FFFF
AGGREGATOR_STREAM = 0xFFFF_FFFE


class LaneInputs(NamedTuple):
    """Every lane's inputs; the engine slices it into chunks and single lanes."""

    data: PyTree  # any[lanes, steps, batch, ...]
    mask: jax.Array  # bool[lanes, steps, batch]
    step_position: jax.Array  # int32[lanes, steps]: lane position of the step's client
    weight: jax.Array  # float32[lanes, per_lane]: 0 where a position is empty
    client_id: jax.Array  # int32[lanes, per_lane]: out of range where a position is empty
    occupied: jax.Array  # bool[lanes, per_lane]: whether a client sits at the position
    client_state: PyTree  # [lanes, per_lane, ...]: the clients' gathered states
    version: jax.Array | None = None  # int32[lanes, per_lane]: ring row of a versioned broadcast
    update_scale: jax.Array | None = None  # float32[lanes, per_lane]: factor on the update


class StepInputs(NamedTuple):
    """What one local step of a lane reads; the last three only in packed lanes."""

    batch: PyTree  # any[batch, ...]
    mask: jax.Array  # bool[batch]
    local_index: jax.Array  # int32[]: the step's index within its client's steps
    position: jax.Array | None = None  # int32[]: lane position of the step's client
    first: jax.Array | None = None  # bool[]: the client's first step
    last: jax.Array | None = None  # bool[]: where the client is recorded


def take(tree: PyTree, index) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[index], tree)


def add_leading_axis(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[None], tree)


def sum_leading(tree: PyTree) -> PyTree:
    """Sum over axis 0. Short axes are added one by one: on XLA:CPU the YNNPACK
    reduce fusion is much slower than plain adds there (benchmarks/RESULTS.md)."""

    def total(leaf):
        if leaf.shape[0] <= 32:
            return sum((leaf[i] for i in range(1, leaf.shape[0])), leaf[0])
        return jnp.sum(leaf, axis=0)

    return jax.tree.map(total, tree)


def lone_lane_live_steps(mask, step_position, occupied) -> jax.Array:
    """How many leading steps a lone lane must run: up to each occupied
    client's last real step (or, for a client with none, its position's last
    step, where it is recorded). Later steps are all padding.

    Args:
      mask: ``bool[num_steps, batch]``; step_position: ``int32[num_steps]``;
      occupied: ``bool[clients_per_lane]``.
    """
    clients_per_lane = occupied.shape[0]
    steps = jnp.arange(mask.shape[0], dtype=jnp.int32)
    real = jnp.any(mask, axis=1)
    last_real = jax.ops.segment_max(
        jnp.where(real, steps, -1), step_position, num_segments=clients_per_lane
    )
    last_of_position = jax.ops.segment_max(steps, step_position, num_segments=clients_per_lane)
    needed = jnp.where(last_real >= 0, last_real, last_of_position)
    return jnp.max(jnp.where(occupied, needed, -1)) + 1


def step_inputs(lane: LaneInputs) -> StepInputs:
    """The per-step inputs of a lane; with several clients, where each starts and ends."""
    num_steps = lane.mask.shape[0]
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    if lane.weight.shape[0] == 1:
        return StepInputs(lane.data, lane.mask, steps)
    position = lane.step_position
    changes = position[1:] != position[:-1]
    first = jnp.concatenate([jnp.ones((1,), bool), changes])
    # A client is recorded at its last real step (padding steps after it would
    # be exact no-ops, but a chunk may skip them), and again where its
    # position ends, which is harmless: the state is the same.
    real = jnp.any(lane.mask, axis=1)
    ends = jnp.concatenate([changes | ~real[1:], jnp.ones((1,), bool)])
    last = ends & real | jnp.concatenate([changes, jnp.ones((1,), bool)])
    local_index = steps - jax.lax.cummax(jnp.where(first, steps, 0))
    return StepInputs(lane.data, lane.mask, local_index, position, first, last)


def loops_lone_lane(unroll) -> bool:
    """Whether a lone lane runs its steps in a loop that stops at its last real
    step (``scan_unroll`` of exactly 1; ``True``, which unrolls, compares equal to 1)."""
    return unroll is not True and unroll == 1


def run_steps(step, carry, inputs: StepInputs, active, live_steps, unroll):
    """Runs ``step(carry, inputs[t])`` over the lane's steps; returns the carry.

    A lone lane (``active is None``) loops with ``lax.fori_loop`` over its
    ``live_steps`` only (on XLA:CPU a ``lax.cond`` per batch-20 step cost the
    logistic regression 13%, so its steps guard padding with a select).
    Otherwise a ``lax.scan`` over every step, where a step that is padding for
    every lane of the chunk (``active[t]`` False) is skipped by a real branch.
    """
    if active is None and loops_lone_lane(unroll):
        return jax.lax.fori_loop(
            0, live_steps, lambda index, carry: step(carry, take(inputs, index))[0], carry
        )
    if active is None:
        return jax.lax.scan(step, carry, inputs, unroll=unroll)[0]

    def skip_idle(carry, xs):
        chunk_active, step_xs = xs
        return jax.lax.cond(chunk_active, lambda: step(carry, step_xs), lambda: (carry, None))

    return jax.lax.scan(skip_idle, carry, (active, inputs), unroll=unroll)[0]


def map_positions(fn, *args):
    """``vmap(fn)`` over the lane positions; a single position runs unvmapped."""
    if jax.tree.leaves(args)[0].shape[0] == 1:
        return add_leading_axis(fn(*take(args, 0)))
    return jax.vmap(fn)(*args)


def train_lane(
    algorithm: Algorithm,
    plan: ExecutionPlan,
    context: RoundContext,
    lane: LaneInputs,
    active: jax.Array | None,
    feature_shapes: PyTree | None = None,
) -> tuple[ClientSums, ClientRecord]:
    """Trains the clients of one lane (inputs without the lane axis).

    Args:
      active: ``bool[num_steps]`` (unbatched under vmap): whether any lane of
        the chunk has a real example at the step; None for a lone lane.
      feature_shapes: for a lone lane whose data leaves arrive flattened to
        ``[steps, batch, features]``, each leaf's per-example shape.

    Returns:
      The lane's sums over its clients, and its per-position records
      ``[clients_per_lane, ...]``.
    """
    lone = active is None
    client_step = batches_with_feature_shapes(
        batches_with_frozen(algorithm.client_step, context.frozen), feature_shapes
    )
    # Under vmap a lax.cond on a per-lane predicate becomes a select that first
    # broadcasts every operand to the lane axis, frozen inputs included (a
    # copy of a frozen base model per lane); an explicit select computes the
    # same values and leaves unbatched operands unbatched.
    guard = "cond" if lone and not loops_lone_lane(plan.scan_unroll) else "select"
    local_step = guarded_step(client_step, guard)
    client_rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        context.client_rng, lane.client_id
    )
    stream = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    init_rngs, aggregator_rngs = (
        stream(client_rngs, INIT_STREAM),
        stream(client_rngs, AGGREGATOR_STREAM),
    )

    def start(position):
        state = take(lane.client_state, position)
        version = None if lane.version is None else lane.version[position]
        broadcast = client_broadcast(context, version)
        return algorithm.client_init(broadcast, state, init_rngs[position])

    local = start(0)
    stats = jax.eval_shape(client_step, local, take(lane.data, 0), lane.mask[0], client_rngs[0])[1]
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats)
    inputs = step_inputs(lane)
    packed = inputs.position is not None

    def record(buffer, position, tree):
        return jax.tree.map(lambda rows, value: rows.at[position].set(value), buffer, tree)

    def step(carry, step_in: StepInputs):
        local, sums, finals = carry
        position = step_in.position if packed else 0
        if packed:  # a new client starts from client_init and zero sums
            local = jax.lax.cond(step_in.first, lambda: start(position), lambda: local)
            sums = tree_where(step_in.first, zero_sums, sums)
        rng = jax.random.fold_in(client_rngs[position], step_in.local_index)
        local, sums = local_step(local, sums, step_in.batch, step_in.mask, rng)
        if packed:  # unbatched, lax.cond makes the record free on every other step
            finals = jax.lax.cond(
                step_in.last, lambda: record(finals, position, (local, sums)), lambda: finals
            )
        return (local, sums, finals), None

    def buffers():  # a row per position, for the clients' final local states and sums
        return jax.tree.map(
            lambda leaf: jnp.zeros((lane.weight.shape[0], *leaf.shape), leaf.dtype),
            (local, zero_sums),
        )

    live_steps = (
        lone_lane_live_steps(lane.mask, lane.step_position, lane.occupied) if lone else None
    )
    carry = (local, zero_sums, buffers() if packed else ())
    local, sums, finals = run_steps(step, carry, inputs, active, live_steps, plan.scan_unroll)
    final_locals, final_sums = finals if packed else add_leading_axis((local, sums))

    def finish(local, sums, weight, state, rng, version, update_scale):
        return finish_client(
            algorithm, context, local, sums, weight, state, rng, version, update_scale
        )

    lane_sums, records = map_positions(
        finish,
        final_locals,
        final_sums,
        lane.weight,
        lane.client_state,
        aggregator_rngs,
        lane.version,
        lane.update_scale,
    )
    return sum_leading(lane_sums), records


def train_chunk(
    algorithm: Algorithm, plan: ExecutionPlan, context: RoundContext, lanes: LaneInputs
) -> tuple[ClientSums, ClientRecord]:
    """Trains a chunk of lanes: their sums, and records ``[lanes, per_lane, ...]``."""
    if lanes.mask.shape[0] != 1:
        active = jnp.any(lanes.mask, axis=(0, 2))  # [steps]: a real example in any lane
        lane_sums, records = jax.vmap(
            lambda lane: train_lane(algorithm, plan, context, lane, active)
        )(lanes)
        return sum_leading(lane_sums), records
    # A single lane runs without vmap, so that lax.cond really skips padding
    # steps and finalisation instead of computing both branches. A reshape
    # drops the lane axis without the copy that indexing makes; data features
    # are flattened too: with a size-1 feature axis (e.g. [..., 28, 28, 1])
    # XLA:CPU otherwise copies the whole cohort each round to relayout it.
    data = jax.tree.map(
        lambda leaf: (
            leaf.reshape(*leaf.shape[1:3], -1) if leaf.ndim > 4 else leaf.reshape(leaf.shape[1:])
        ),
        lanes.data,
    )
    lane = jax.tree.map(lambda leaf: leaf.reshape(leaf.shape[1:]), lanes._replace(data=()))
    feature_shapes = jax.tree.map(lambda leaf: leaf.shape[3:], lanes.data)
    lane_sums, records = train_lane(
        algorithm, plan, context, lane._replace(data=data), None, feature_shapes
    )
    return lane_sums, add_leading_axis(records)
