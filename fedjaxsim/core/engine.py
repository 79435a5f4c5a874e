"""The jitted federated round: vmap over clients, scan over local steps.

:func:`build_round` turns an :class:`~fedjaxsim.core.algorithm.Algorithm` and an
:class:`ExecutionPlan` into one jitted function::

    round_fn(server_state, cohort, rng, client_states=()) -> (server_state, RoundOutput)

Inside it, every client of the cohort trains under ``jax.vmap``; clients are
processed ``clients_per_chunk`` at a time (a ``lax.scan`` over chunks by
default), so device memory is bounded by one chunk whatever the cohort size.
Local steps run under ``lax.scan`` (a lone, unvmapped lane: a
``lax.fori_loop`` that stops at its last real step); a step whose mask is all
padding leaves the local state (params and optimizer state) exactly unchanged
(``lax.cond`` or ``jnp.where``). Contributions of the clients are reduced over
the client axis (a running sum across chunks, or a stack for order-statistic aggregators),
and the server update runs in the same jit.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxsim.core.algorithm import REDUCTIONS, Algorithm
from fedjaxsim.core.client_batch import Cohort, validate_cohort
from fedjaxsim.core.lowering import CONV_LOWERINGS, conv_lowering
from fedjaxsim.core.types import PyTree

CHUNK_LOOPS = ("scan", "unroll")
# Padding clients added by the engine get this id: out of range for any
# population, so a stateful gather/scatter with mode="drop" ignores them.
ENGINE_PADDING_ID = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How a round is executed; every plan computes the same numbers.

    Attributes:
      num_lanes: how the host packs a cohort (``pack_cohort(num_lanes=...)``):
        ``None`` gives every client its own lane; an int packs clients into
        that many lanes, one after another, so that short clients do not idle
        through the longest client's steps.
      clients_per_chunk: lanes trained together under one vmap (with one
        client per lane, clients). ``None`` trains all lanes at once. Smaller
        chunks bound device memory.
      chunk_loop: ``"scan"`` loops over chunks with ``lax.scan`` (compiles
        once, any cohort size); ``"unroll"`` emits one copy per chunk.
      scan_unroll: the ``unroll`` argument of the local-step ``lax.scan``:
        an int, or True to unroll every step.
      conv_lowering: ``"patches"`` (shifted slices plus a matmul), ``"lax"``
        (XLA convolution) or ``"auto"`` (the measured per-backend default).
      sort_chunks: with several chunks on one device, group lanes into chunks
        by their number of real steps (longest first), and skip a local step
        outright when it is padding for every lane of the chunk. Vmapped lanes
        otherwise all run to the longest lane's step count (a batched
        ``lax.cond`` computes both branches). Ignored on a mesh, where every
        chunk must span every device.
    """

    num_lanes: int | None = None
    clients_per_chunk: int | None = None
    chunk_loop: str = "scan"
    scan_unroll: int | bool = 1
    conv_lowering: str = "auto"
    sort_chunks: bool = True

    def __post_init__(self):
        if self.clients_per_chunk is not None and (
            not isinstance(self.clients_per_chunk, int) or self.clients_per_chunk < 1
        ):
            raise ValueError(
                f"clients_per_chunk must be None or a positive int, got "
                f"{self.clients_per_chunk!r}"
            )
        if self.num_lanes is not None and (
            not isinstance(self.num_lanes, int) or self.num_lanes < 1
        ):
            raise ValueError(f"num_lanes must be None or a positive int, got {self.num_lanes!r}")
        if self.chunk_loop not in CHUNK_LOOPS:
            raise ValueError(f"chunk_loop must be one of {CHUNK_LOOPS}, got {self.chunk_loop!r}")
        if not (
            isinstance(self.scan_unroll, bool)
            or (isinstance(self.scan_unroll, int) and self.scan_unroll >= 1)
        ):
            raise ValueError(
                f"scan_unroll must be a positive int or a bool, got {self.scan_unroll!r}"
            )
        if self.conv_lowering not in CONV_LOWERINGS:
            raise ValueError(
                f"conv_lowering must be one of {CONV_LOWERINGS}, got {self.conv_lowering!r}"
            )


def default_plan(backend: str | None = None) -> ExecutionPlan:
    """Per-backend defaults, chosen by ``benchmarks/throughput.py`` (RESULTS.md).

    CPU: the whole cohort in one lane, clients one after another in a single
    loop with no padding steps between them (the loop stops at the last real
    step), and convolutions as patches; on a mesh of host devices, one such
    lane per device. On 2 cores this beat one-lane-per-client vmap for every model
    (ragged clients leave vmapped lanes idling through padding steps, and
    XLA:CPU runs vmapped per-client convolutions as slow grouped ones).
    GPU/TPU: one client per lane, 128 lanes per vmap chunk, chunks grouped by
    length, convolutions as patches. On an H200 (jax 0.11.2, EMNIST CNN,
    cohort 1,000) this ran a round in 0.51 s; XLA's grouped convolutions took
    1.2 s (128 per chunk) to 8.4 s (256), ungrouped chunks 0.90 s, packed
    lanes 0.75-0.81 s (benchmarks/RESULTS.md). TPUs were not measured.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu":
        return ExecutionPlan(num_lanes=1, scan_unroll=1, conv_lowering="patches")
    return ExecutionPlan(clients_per_chunk=128, scan_unroll=1, conv_lowering="patches", sort_chunks=True)


class RoundOutput(NamedTuple):
    client_metrics: dict  # float32[num_clients] per statistic (step sums + finalize metrics)
    server_metrics: dict  # float32[] per statistic, from the server update
    client_states: PyTree  # new per-client state, [num_clients, ...]; () if stateless


def _where(condition, new, old):
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def _zeros_like_shapes(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _take(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


def _pad_axis0(tree, num_padding: int, fill=0):
    def pad(leaf):
        widths = [(0, num_padding)] + [(0, 0)] * (leaf.ndim - 1)
        return jnp.pad(leaf, widths, constant_values=fill)

    return jax.tree.map(pad, tree)


def _sum_leading(leaf):
    """Sum over axis 0. Short axes are added pairwise: on XLA:CPU (jax 0.10.2)
    the YNNPACK reduce fusion takes ~4.6 ms to sum [10, 784, 62] over axis 0,
    where ten adds take ~0.05 ms."""
    if leaf.shape[0] <= 32:
        return sum((leaf[i] for i in range(1, leaf.shape[0])), leaf[0])
    return jnp.sum(leaf, axis=0)


def client_scatter(output_lanes, num_clients: int):
    """Returns ``scatter(leaf)``: ``[lanes, per_lane, ...]`` outputs to
    ``[num_clients, ...]`` in cohort order (``output_lanes`` holds each
    position's cohort index, ``num_clients`` where unoccupied: dropped)."""
    positions = output_lanes.reshape(-1)

    def scatter(leaf):
        leaf = leaf.reshape(-1, *leaf.shape[2:])
        out = jnp.zeros((num_clients, *leaf.shape[1:]), leaf.dtype)
        return out.at[positions].set(leaf, mode="drop")

    return scatter


def lanes_by_steps(mask, num_chunks: int):
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


def lone_lane_live_steps(mask, step_position, occupied):
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
    last_real = jax.ops.segment_max(jnp.where(real, steps, -1), step_position, num_segments=clients_per_lane)
    last_of_position = jax.ops.segment_max(steps, step_position, num_segments=clients_per_lane)
    needed = jnp.where(last_real >= 0, last_real, last_of_position)
    return jnp.max(jnp.where(occupied, needed, -1)) + 1


def build_round(algorithm: Algorithm, plan: ExecutionPlan | None = None, mesh=None):
    """Builds the jitted round function of ``algorithm`` under ``plan``.

    Args:
      algorithm: the algorithm record.
      plan: execution plan; :func:`default_plan` when None.
      mesh: optional ``jax.sharding.Mesh`` with a ``"clients"`` axis
        (``fedjaxsim.core.sharding.client_mesh``). Lanes are sharded over it
        (place cohorts with ``sharding.shard_cohort``) and server state is
        replicated. Under ``jax.shard_map`` each device trains its block of
        lanes as one device would (``clients_per_chunk`` is split between the
        devices), and one ``psum`` sums the contributions.

    Returns:
      ``round_fn(server_state, cohort, rng, client_states=())`` returning
      ``(new_server_state, RoundOutput)``. ``client_states`` is a pytree with
      a leading ``num_clients`` axis (cohort order) for stateful algorithms,
      ``()`` otherwise. The function is jitted; it retraces only when shapes
      or dtypes change.
    """
    plan = default_plan() if plan is None else plan
    if algorithm.reduction not in REDUCTIONS:
        raise ValueError(
            f"algorithm.reduction must be one of {REDUCTIONS}, got {algorithm.reduction!r}"
        )
    stacked = algorithm.reduction == "stack"
    if mesh is not None:
        from fedjaxsim.core import sharding

        num_devices = sharding.mesh_size(mesh)
    else:
        num_devices = 1

    def local_training_step(
        local, sums, batch, step_mask, step_rng, client_step=algorithm.client_step, guard="cond"
    ):
        """One local step; an all-padding step changes nothing at all.

        ``guard="cond"``: ``lax.cond`` skips the step outright when the lane
        is not vmapped (under vmap it becomes a select). ``guard="select"``:
        the step always computes and ``jnp.where`` keeps the old state, which
        XLA fuses into the optimizer's update; used where padding steps are
        not run at all (a lone lane's loop stops at its last real step).
        """

        def train(local):
            new_local, stats = client_step(local, batch, step_mask, step_rng)
            return new_local, jax.tree.map(jnp.add, sums, stats)

        real = jnp.any(step_mask)
        if guard == "select":
            return _where(real, train(local), (local, sums))
        return jax.lax.cond(real, train, lambda local: (local, sums), local)

    def run_local_steps(step, carry, inputs, active, mask, step_position, occupied):
        """Runs ``step(carry, inputs[t])`` over the lane's steps; returns the carry.

        A lone lane (``active is None``) loops with ``lax.fori_loop`` over its
        first :func:`lone_lane_live_steps` steps only: the tail of padding steps (up to
        the step bucket) is never run, so its steps guard padding with a fused
        select instead of a ``lax.cond`` per step (on XLA:CPU a cond per
        batch-20 step cost the logreg model 13%). Otherwise a ``lax.scan`` over
        every step, where a step that is padding for the whole chunk is
        skipped by a real branch.
        """
        if active is not None or plan.scan_unroll != 1:
            carry, _ = jax.lax.scan(
                skip_idle_chunk_steps(step, active),
                carry,
                inputs if active is None else (active, *inputs),
                unroll=plan.scan_unroll,
            )
            return carry
        return jax.lax.fori_loop(
            0,
            lone_lane_live_steps(mask, step_position, occupied),
            lambda index, carry: step(carry, _take(inputs, index))[0],
            carry,
        )

    def finish_client(broadcast, server_state, local, sums, weight, client_rng):
        output = algorithm.client_finalize(broadcast, local)
        contribution = algorithm.client_contribution(server_state, output, weight, client_rng)
        return contribution, dict(sums, **output.metrics), output.client_state

    def skip_idle_chunk_steps(step, active):
        """Wraps a scan body so that a step that is padding for every lane of
        the chunk (``active`` False, unbatched) is skipped by a real branch.
        ``active is None`` (a single lane: its own cond already skips)."""
        if active is None:
            return step

        def guarded(carry, inputs):
            chunk_active, inputs = inputs[0], inputs[1:]
            return jax.lax.cond(chunk_active, lambda: step(carry, inputs), lambda: (carry, None))

        return guarded

    def train_lane(
        context, active, data, mask, step_position, weights, client_ids, occupied, states, feature_shapes=None
    ):
        """Trains the clients of one lane, one after another.

        ``active`` is ``bool[num_steps]`` (unbatched under vmap): whether any
        lane of the chunk has a real example at that step; None for a lone lane.
        ``feature_shapes``: when given, ``data`` leaves with several feature
        axes arrive flattened to ``[steps, batch, features]`` and each batch is
        reshaped back to ``[batch, *shape]``.
        Returns the lane's contribution (summed over its clients, or stacked
        ``[clients_per_lane, ...]``), and per-position metrics and states.
        """
        # A lone lane stops at its last real step, so a select guards the rest.
        guard = "select" if active is None and plan.scan_unroll == 1 else "cond"
        if feature_shapes is not None:
            algorithm_step = algorithm.client_step

            def client_step(local, batch, step_mask, step_rng):
                batch = jax.tree.map(
                    lambda leaf, shape: leaf if leaf.ndim == 1 + len(shape) else leaf.reshape(leaf.shape[0], *shape),
                    batch,
                    feature_shapes,
                )
                return algorithm_step(local, batch, step_mask, step_rng)
        else:
            client_step = algorithm.client_step
        broadcast, server_state, client_root_rng = context
        client_rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(client_root_rng, client_ids)
        clients_per_lane = weights.shape[0]
        num_steps = mask.shape[0]
        first_batch = _take(data, 0)
        local0 = algorithm.client_init(broadcast, _take(states, 0), client_rngs[0])
        stats_shape = jax.eval_shape(client_step, local0, first_batch, mask[0], client_rngs[0])[1]
        zero_stats = _zeros_like_shapes(stats_shape)

        if clients_per_lane == 1:
            # One client per lane: initialise before the scan, finalise after it.
            def step(carry, inputs):
                local, sums = carry
                batch, step_mask, step_index = inputs
                step_rng = jax.random.fold_in(client_rngs[0], step_index)
                return local_training_step(local, sums, batch, step_mask, step_rng, client_step, guard), None

            steps = jnp.arange(num_steps, dtype=jnp.int32)
            local, sums = run_local_steps(
                step, (local0, zero_stats), (data, mask, steps), active, mask, step_position, occupied
            )
            contribution, metrics, new_state = finish_client(
                broadcast, server_state, local, sums, weights[0], client_rngs[0]
            )
            if not stacked:
                contribution = _where(occupied[0], contribution, jax.tree.map(jnp.zeros_like, contribution))
            add_axis = lambda tree: jax.tree.map(lambda leaf: leaf[None], tree)  # noqa: E731
            if stacked:
                contribution = add_axis(contribution)
            return contribution, add_axis(metrics), add_axis(new_state)

        # Several clients per lane, one after another. The local state is reset
        # where a client starts; where a client ends, its local state and step
        # statistics are written into its row of a [clients_per_lane] buffer,
        # and all clients of the lane are finalised together after the scan.
        # Unbatched, lax.cond makes the write free on every other step.
        steps = jnp.arange(num_steps, dtype=jnp.int32)
        changes = step_position[1:] != step_position[:-1]
        is_first = jnp.concatenate([jnp.ones((1,), bool), changes])
        # A client is recorded at its last real step (padding steps after it
        # would be exact no-ops, but a chunk may skip them), and again where
        # its position ends, which is harmless: the state is the same.
        real = jnp.any(mask, axis=1)
        ends = jnp.concatenate([changes | ~real[1:], jnp.ones((1,), bool)])
        is_last = ends & real | jnp.concatenate([changes, jnp.ones((1,), bool)])
        local_step = steps - jax.lax.cummax(jnp.where(is_first, steps, 0))
        buffer = lambda tree: jax.tree.map(  # noqa: E731
            lambda leaf: jnp.zeros((clients_per_lane, *leaf.shape), leaf.dtype), tree
        )
        carry0 = (local0, zero_stats, buffer(local0), buffer(zero_stats))

        def step(carry, inputs):
            local, sums, local_buffer, sums_buffer = carry
            batch, step_mask, position, first, last, index = inputs
            client_rng = client_rngs[position]
            local = jax.lax.cond(
                first,
                lambda: algorithm.client_init(broadcast, _take(states, position), client_rng),
                lambda: local,
            )
            sums = _where(first, zero_stats, sums)
            step_rng = jax.random.fold_in(client_rng, index)
            local, sums = local_training_step(local, sums, batch, step_mask, step_rng, client_step, guard)

            def record(buffers):
                put = lambda buf, value: buf.at[position].set(value)  # noqa: E731
                return jax.tree.map(put, buffers[0], local), jax.tree.map(put, buffers[1], sums)

            local_buffer, sums_buffer = jax.lax.cond(
                last, record, lambda buffers: buffers, (local_buffer, sums_buffer)
            )
            return (local, sums, local_buffer, sums_buffer), None

        inputs = (data, mask, step_position, is_first, is_last, local_step)
        _, _, final_locals, final_sums = run_local_steps(
            step, carry0, inputs, active, mask, step_position, occupied
        )
        contributions, metrics, new_states = jax.vmap(
            lambda local, sums, weight, rng: finish_client(broadcast, server_state, local, sums, weight, rng)
        )(final_locals, final_sums, weights, client_rngs)
        if not stacked:
            contributions = jax.tree.map(
                lambda c: _sum_leading(jnp.where(occupied.reshape(-1, *[1] * (c.ndim - 1)), c, 0)),
                contributions,
            )
        return contributions, metrics, new_states

    def per_lane(context, *lanes):
        if jax.tree.leaves(lanes)[0].shape[0] != 1:
            active = jnp.any(lanes[1], axis=(0, 2))  # [steps]: a real example in any lane
            return jax.vmap(lambda *lane: train_lane(context, active, *lane))(*lanes)
        # A single lane runs without vmap, so that lax.cond really skips
        # padding steps and finalisation instead of computing both branches.
        # A reshape drops the lane axis without the copy that indexing makes;
        # data features are flattened too: with a size-1 feature axis (e.g.
        # [..., 28, 28, 1]) XLA:CPU otherwise copies the whole cohort each
        # round to change its layout (measured: 8 MB a round for 131 steps).
        data, *rest = lanes
        data = jax.tree.map(
            lambda leaf: leaf.reshape(*leaf.shape[1:3], -1) if leaf.ndim > 4 else leaf.reshape(leaf.shape[1:]), data
        )
        rest = jax.tree.map(lambda leaf: leaf.reshape(leaf.shape[1:]), rest)
        feature_shapes = jax.tree.map(lambda leaf: leaf.shape[3:], lanes[0])
        outputs = train_lane(context, None, data, *rest, feature_shapes=feature_shapes)
        return jax.tree.map(lambda leaf: leaf[None], outputs)

    def reduce_lanes(contribution):
        if stacked:
            return contribution
        return jax.tree.map(_sum_leading, contribution)

    def train_lanes(context, inputs, lane_clients, num_clients, clients_per_chunk):
        """Trains a block of lanes (all of them, or one device's) in chunks.

        Returns ``(reduced, metrics, new_states, output_lanes)``: the summed
        (or stacked) contributions, per-position outputs ``[lanes, per_lane,
        ...]`` and ``output_lanes`` (int32[lanes, per_lane]: the cohort index
        of each output position; ``num_clients`` where unoccupied).
        """
        num_lanes = inputs[1].shape[0]
        chunk = num_lanes if clients_per_chunk is None else min(clients_per_chunk, num_lanes)
        num_chunks = -(-num_lanes // chunk)
        num_padding = num_chunks * chunk - num_lanes
        if num_padding:  # empty lanes: no real examples, unoccupied positions
            inputs = _pad_axis0(inputs, num_padding)
        padded_lane_clients = jnp.pad(lane_clients, ((0, num_padding), (0, 0)), constant_values=num_clients)
        if num_chunks == 1:
            contribution, metrics, new_states = per_lane(context, *inputs)
            return reduce_lanes(contribution), metrics, new_states, padded_lane_clients
        if plan.sort_chunks:
            # Each chunk is gathered inside the loop (one chunk's copy).
            chunk_lanes = lanes_by_steps(inputs[1], num_chunks)

            def chunk_inputs(index):
                rows = chunk_lanes[index]
                return jax.tree.map(lambda leaf: jnp.take(leaf, rows, axis=0), inputs)
        else:
            # Lane l = c * num_chunks + i goes to chunk i, position c. The
            # reshape to [chunk, num_chunks, ...] is free (no copy) and each
            # chunk is a strided slice of it taken inside the loop, so the
            # cohort is never duplicated in device memory.
            chunk_lanes = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(chunk, num_chunks).T
            grouped = jax.tree.map(lambda leaf: leaf.reshape(chunk, num_chunks, *leaf.shape[1:]), inputs)

            def chunk_inputs(index):
                return jax.tree.map(
                    lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, axis=1, keepdims=False), grouped
                )

        if plan.chunk_loop == "unroll":
            outputs = [per_lane(context, *chunk_inputs(i)) for i in range(num_chunks)]
            concat = lambda *xs: jnp.stack(xs)  # noqa: E731
            metrics = jax.tree.map(concat, *[o[1] for o in outputs])
            new_states = jax.tree.map(concat, *[o[2] for o in outputs])
            if stacked:
                reduced = jax.tree.map(concat, *[o[0] for o in outputs])
            else:
                partial = [reduce_lanes(o[0]) for o in outputs]
                reduced = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *partial)
        else:
            indices = jnp.arange(num_chunks, dtype=jnp.int32)
            if stacked:
                _, (reduced, metrics, new_states) = jax.lax.scan(
                    lambda carry, index: (carry, per_lane(context, *chunk_inputs(index))), (), indices
                )
            else:
                shape = jax.eval_shape(lambda: reduce_lanes(per_lane(context, *chunk_inputs(0))[0]))

                def body(total, index):
                    contribution, metrics, states = per_lane(context, *chunk_inputs(index))
                    total = jax.tree.map(jnp.add, total, reduce_lanes(contribution))
                    return total, (metrics, states)

                reduced, (metrics, new_states) = jax.lax.scan(body, _zeros_like_shapes(shape), indices)
        # Outputs are [num_chunks, chunk, ...]; row (i, c) is lane chunk_lanes[i, c].
        flatten = lambda leaf: leaf.reshape(-1, *leaf.shape[2:])  # noqa: E731
        metrics = jax.tree.map(flatten, metrics)
        new_states = jax.tree.map(flatten, new_states)
        if stacked:
            reduced = jax.tree.map(flatten, reduced)
        return reduced, metrics, new_states, padded_lane_clients[chunk_lanes.reshape(-1)]

    def round_fn(server_state, cohort: Cohort, rng, client_states=()):
        with conv_lowering(plan.conv_lowering):
            return _round(server_state, cohort, rng, client_states)

    def _round(server_state, cohort: Cohort, rng, client_states):
        validate_cohort(cohort)
        num_clients = cohort.num_clients
        num_lanes = cohort.num_lanes
        lane_clients = jnp.asarray(cohort.lane_clients, jnp.int32)  # [lanes, per_lane]
        occupied = lane_clients < num_clients
        gather = lambda tree, fill: jax.tree.map(  # noqa: E731
            lambda leaf: jnp.take(leaf, lane_clients, axis=0, mode="fill", fill_value=fill), tree
        )
        lane_weights = gather(jnp.asarray(cohort.weight, jnp.float32), 0)
        lane_weights = jnp.where(occupied, lane_weights, 0.0)
        lane_ids = gather(jnp.asarray(cohort.client_id, jnp.int32), ENGINE_PADDING_ID)
        lane_ids = jnp.where(occupied, lane_ids, ENGINE_PADDING_ID)
        lane_states = gather(client_states, 0)

        client_root_rng, server_rng = jax.random.split(rng)
        context = (algorithm.broadcast(server_state), server_state, client_root_rng)
        inputs = (
            cohort.data,
            jnp.asarray(cohort.mask, bool),
            jnp.asarray(cohort.step_position, jnp.int32),
            lane_weights,
            lane_ids,
            occupied,
            lane_states,
        )
        if mesh is None:
            reduced, metrics, new_states, output_lanes = train_lanes(
                context, inputs, lane_clients, num_clients, plan.clients_per_chunk
            )
        else:
            # Each device trains its own block of lanes exactly as one device
            # would (its lone lane unvmapped, its chunks grouped by length), and
            # the contributions are summed with one psum over the clients axis.
            from jax.sharding import PartitionSpec

            lanes_spec = PartitionSpec(sharding.CLIENT_AXIS)
            num_padding = -num_lanes % num_devices
            if num_padding:  # whole lanes per device
                inputs = _pad_axis0(inputs, num_padding)
                lane_clients = jnp.pad(lane_clients, ((0, num_padding), (0, 0)), constant_values=num_clients)
            per_device_chunk = (
                None if plan.clients_per_chunk is None else -(-plan.clients_per_chunk // num_devices)
            )

            def device_block(context, inputs, lane_clients):
                reduced, metrics, new_states, output_lanes = train_lanes(
                    context, inputs, lane_clients, num_clients, per_device_chunk
                )
                # Each device writes its own clients into [num_clients] rows
                # (zeros elsewhere), so one psum of everything, added to zeros,
                # gives every client's exact outputs: a single collective.
                scatter = client_scatter(output_lanes, num_clients)
                per_client = (jax.tree.map(scatter, metrics), jax.tree.map(scatter, new_states))
                if stacked:
                    reduced = jax.tree.map(scatter, reduced)
                return jax.lax.psum((reduced, per_client), sharding.CLIENT_AXIS)

            reduced, (metrics, new_states) = jax.shard_map(
                device_block,
                mesh=mesh,
                in_specs=(PartitionSpec(), lanes_spec, lanes_spec),
                out_specs=PartitionSpec(),
                # Varying-axis checks off: user custom_vjp rules (and our CPU
                # matmul's) need not annotate which values vary per device.
                check_vma=False,
            )(context, inputs, lane_clients)

        if mesh is None:  # [lanes, per_lane, ...] -> [num_clients, ...] in cohort order
            scatter = client_scatter(output_lanes, num_clients)
            metrics = jax.tree.map(scatter, metrics)
            new_states = jax.tree.map(scatter, new_states)
            if stacked:
                reduced = jax.tree.map(scatter, reduced)
        new_server_state, server_metrics = algorithm.server_update(server_state, reduced, server_rng)
        if mesh is not None:
            everywhere = sharding.replicated(mesh)
            new_server_state = jax.tree.map(
                lambda leaf: jax.lax.with_sharding_constraint(leaf, everywhere), new_server_state
            )
        return new_server_state, RoundOutput(metrics, server_metrics, new_states)

    return jax.jit(round_fn)
