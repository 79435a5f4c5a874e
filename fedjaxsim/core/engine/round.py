"""The jitted federated round: gather, train clients, combine, server update.

:func:`build_round` turns an :class:`~fedjaxsim.core.algorithm.Algorithm` and
an :class:`~fedjaxsim.core.engine.plan.ExecutionPlan` into one jitted
function::

    round_fn(server_state, cohort, rng, client_states=()) -> (server_state, RoundOutput)

Reading order: this module, then ``chunks.py`` (lanes in chunks), ``lanes.py``
(the clients of a lane, one after another), ``client.py`` (one local step,
one client's finish) and ``mesh.py`` (the same on every device of a mesh).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxsim.core.aggregators import Contribution
from fedjaxsim.core.algorithm import Algorithm, aggregator_state_of, replace_aggregator_state
from fedjaxsim.core.client_batch import Cohort, validate_cohort
from fedjaxsim.core.engine.chunks import train_lanes
from fedjaxsim.core.engine.client import RoundContext, client_broadcast
from fedjaxsim.core.engine.lanes import LaneInputs, train_chunk
from fedjaxsim.core.engine.mesh import on_mesh, replicate
from fedjaxsim.core.engine.plan import ExecutionPlan, default_plan
from fedjaxsim.core.types import PyTree

# Padding clients added by the engine get this id: out of range for any
# population, so a stateful gather/scatter with mode="drop" ignores them.
ENGINE_PADDING_ID = np.iinfo(np.int32).max


class ClientSchedule(NamedTuple):
    """What a simulated clock decides per client, applied inside the round.

    Every field is optional (None: not applied) and has the cohort's
    ``[num_clients]`` axis, so a schedule changes values, never shapes: a
    run under deadlines compiles the rounds it compiles without them.
    """

    step_budget: jax.Array | np.ndarray | None = None  # int32[num_clients]: local steps allowed
    update_scale: jax.Array | np.ndarray | None = None  # float32[num_clients]: factor on updates
    version: jax.Array | np.ndarray | None = None  # int32[num_clients]: server version started from


class RoundOutput(NamedTuple):
    client_metrics: dict  # float32[num_clients] per statistic (step sums + finalize metrics)
    server_metrics: dict  # float32[] per statistic: aggregation, then the server update
    client_states: PyTree  # [num_clients, ...] new client states (old ones where unused); ()


def local_step_index(step_position: jax.Array) -> jax.Array:
    """int32[lanes, steps]: each step's index among its client's steps."""
    steps = jnp.arange(step_position.shape[1], dtype=jnp.int32)
    first = jnp.concatenate(
        [jnp.ones_like(step_position[:, :1], bool), step_position[:, 1:] != step_position[:, :-1]],
        axis=1,
    )
    return steps - jax.lax.cummax(jnp.where(first, steps, 0), axis=1)


def budgeted_mask(mask, step_position, lane_budget) -> jax.Array:
    """``mask`` without the steps past each client's budget: they become padding steps,
    which change nothing (``client.guarded_step``).

    Args:
      mask: bool[lanes, steps, batch]; step_position: int32[lanes, steps];
      lane_budget: int32[lanes, per_lane], the budget of each lane position.
    """
    budget = jnp.take_along_axis(lane_budget, step_position, axis=1)
    return mask & (local_step_index(step_position) < budget)[..., None]


def gather_lanes(
    cohort: Cohort, client_states: PyTree, schedule: ClientSchedule | None = None
) -> tuple[LaneInputs, jax.Array]:
    """Per-client arrays gathered into lane positions; returns ``(lanes, lane_clients)``."""
    schedule = ClientSchedule() if schedule is None else schedule
    num_clients = cohort.num_clients
    lane_clients = jnp.asarray(cohort.lane_clients, jnp.int32)  # [lanes, per_lane]
    occupied = lane_clients < num_clients

    def gather(tree, fill):
        return jax.tree.map(
            lambda leaf: jnp.take(leaf, lane_clients, axis=0, mode="fill", fill_value=fill), tree
        )

    weight = gather(jnp.asarray(cohort.weight, jnp.float32), 0)
    client_id = gather(jnp.asarray(cohort.client_id, jnp.int32), ENGINE_PADDING_ID)

    def gather_optional(values, dtype, fill):
        return None if values is None else gather(jnp.asarray(values, dtype), fill)

    mask = jnp.asarray(cohort.mask, bool)
    step_position = jnp.asarray(cohort.step_position, jnp.int32)
    if schedule.step_budget is not None:
        budget = gather(jnp.asarray(schedule.step_budget, jnp.int32), 0)
        mask = budgeted_mask(mask, step_position, budget)
    lanes = LaneInputs(
        data=cohort.data,
        mask=mask,
        step_position=step_position,
        weight=jnp.where(occupied, weight, 0.0),
        client_id=jnp.where(occupied, client_id, ENGINE_PADDING_ID),
        occupied=occupied,
        client_state=gather(client_states, 0),
        version=gather_optional(schedule.version, jnp.int32, 0),
        update_scale=gather_optional(schedule.update_scale, jnp.float32, 1.0),
    )
    return lanes, lane_clients


def _check_client_states(algorithm: Algorithm, client_states: PyTree) -> None:
    if algorithm.initial_client_state is not None and not jax.tree.leaves(client_states):
        raise ValueError(
            "this algorithm keeps per-client state: call round_fn(server_state, cohort, rng, "
            "client_states=store.gather(cohort.client_id)) with a "
            "fedjaxsim.core.client_state.ClientStateStore whose default state is "
            "algorithm.initial_client_state(params); got client_states=()"
        )


def _check_side_channel(
    algorithm: Algorithm, aggregate, context, client_states, versioned: bool
) -> None:
    """Raises unless the aggregate carries exactly the side channel the clients send.

    The side channel is derived from client data: an aggregator must combine
    it with the update (privatise or protect it too), never drop it.
    """
    first_state = jax.tree.map(lambda leaf: leaf[0], client_states)
    broadcast = client_broadcast(context, 0 if versioned else None)
    declared = jax.eval_shape(
        lambda: algorithm.client_finalize(
            broadcast, algorithm.client_init(broadcast, first_state, context.client_rng)
        )
    )
    for channel in ("means", "sums"):
        sent, received = set(getattr(declared, channel)), set(getattr(aggregate, channel))
        if sent != received:
            raise ValueError(
                f"the aggregator returned side-channel {channel} {sorted(received)}, but the "
                f"clients send {sorted(sent)}: an aggregator must combine the clients' whole "
                "message (e.g. clip and noise it jointly), or refuse the algorithm"
            )


def _train_cohort(algorithm: Algorithm, plan: ExecutionPlan, mesh):
    """``train(context, lanes, lane_clients, num_clients) -> TrainedClients`` under the plan."""
    train = partial(train_lanes, partial(train_chunk, algorithm, plan), plan)
    if mesh is None:
        return partial(train, clients_per_chunk=plan.clients_per_chunk)
    return on_mesh(train, mesh, plan.clients_per_chunk)


def _round_body(
    algorithm,
    train_cohort,
    mesh,
    server_state,
    broadcast,
    versioned,
    cohort,
    rng,
    client_states,
    schedule,
    frozen,
):
    """One round, top to bottom: gather, train the clients, combine, server update."""
    validate_cohort(cohort)
    _check_client_states(algorithm, client_states)
    # 1. Gather: each client's weight, id, state and schedule into its lane position.
    lanes, lane_clients = gather_lanes(cohort, client_states, schedule)
    client_rng, server_rng = jax.random.split(rng)
    aggregator_state = aggregator_state_of(server_state)
    context = RoundContext(broadcast, aggregator_state, client_rng, frozen)
    # 2. Train the clients: local steps, finalisation, each client's share.
    trained = train_cohort(context, lanes, lane_clients, cohort.num_clients)
    # 3. Combine the shares into the aggregate.
    contributions = Contribution(trained.sums.aggregator, trained.records.stacked)
    aggregate, aggregator_state, aggregation_metrics = algorithm.aggregator.finalize(
        contributions, aggregator_state, server_rng
    )
    _check_side_channel(algorithm, aggregate, context, client_states, versioned)
    # 4. The server update.
    server_state = replace_aggregator_state(server_state, aggregator_state)
    server_state, server_metrics = algorithm.server_update(
        server_state, aggregate, jax.random.fold_in(server_rng, 1)
    )
    if mesh is not None:
        server_state = replicate(server_state, mesh)
    metrics = dict(
        aggregation_metrics,
        num_nonfinite_updates=trained.sums.num_nonfinite_updates,
        **server_metrics,
    )
    records = trained.records
    return server_state, RoundOutput(records.metrics, metrics, records.client_state)


def build_round(algorithm: Algorithm, plan: ExecutionPlan | None = None, mesh=None):
    """Builds the jitted round function of ``algorithm`` under ``plan``.

    Args:
      algorithm: the algorithm record (with its aggregator).
      plan: execution plan; :func:`~fedjaxsim.core.engine.plan.default_plan` when None.
      mesh: optional ``jax.sharding.Mesh`` with a ``"clients"`` axis
        (``fedjaxsim.core.sharding.client_mesh``). Lanes are sharded over it
        (place cohorts with ``sharding.shard_cohort``), server state is
        replicated, and each device trains its block of lanes as one device
        would; one ``psum`` adds up the clients.

    Returns:
      ``round_fn(server_state, cohort, rng, client_states=(), schedule=None,
      frozen=())`` returning ``(new_server_state, RoundOutput)``.
      ``client_states`` is a pytree with a leading ``num_clients`` axis
      (cohort order) for stateful algorithms, ``()`` otherwise. ``schedule``
      is an optional :class:`ClientSchedule` (its ``version`` belongs to
      :func:`build_buffered_round`). ``frozen`` is a pytree every client
      reads and none trains, such as the base weights under LoRA adapters:
      it enters once, replicated, is never stacked per client, and reaches
      the algorithm's client steps as ``batch["frozen"]`` (a loss made by
      :func:`fedjaxsim.core.losses.with_frozen_params` reads it there). The function
      is jitted; it retraces only when shapes or dtypes change.
    """
    plan = default_plan() if plan is None else plan
    train_cohort = _train_cohort(algorithm, plan, mesh)

    def round_fn(server_state, cohort: Cohort, rng, client_states=(), schedule=None, frozen=()):
        if schedule is not None and schedule.version is not None:
            raise ValueError(
                "ClientSchedule.version is for asynchronous rounds: build them with "
                "build_buffered_round, or leave version None"
            )
        broadcast = algorithm.broadcast(server_state)
        return _round_body(
            algorithm,
            train_cohort,
            mesh,
            server_state,
            broadcast,
            False,
            cohort,
            rng,
            client_states,
            schedule,
            frozen,
        )

    return jax.jit(round_fn)


class BufferedServer(NamedTuple):
    """The server of asynchronous buffered aggregation, with its recent versions.

    Version ``v`` (the server after ``v`` steps) sits in row ``v % ring_size``
    of ``ring``, so a client that started from a stale version trains from,
    and reports its update against, exactly the model it downloaded.
    """

    server_state: PyTree  # the algorithm's server state
    ring: PyTree  # [ring_size, ...]: algorithm.broadcast of the last ring_size versions
    version: jax.Array  # int32[]: server steps taken


def init_buffered(algorithm: Algorithm, server_state: PyTree, ring_size: int) -> BufferedServer:
    """A :class:`BufferedServer` at version 0, every ring row holding its broadcast."""
    if not isinstance(ring_size, int) or ring_size < 1:
        raise ValueError(f"ring_size must be a positive int, got {ring_size!r}")
    broadcast = algorithm.broadcast(server_state)
    ring = jax.tree.map(lambda leaf: jnp.stack([leaf] * ring_size), broadcast)
    return BufferedServer(server_state, ring, jnp.zeros((), jnp.int32))


def build_buffered_round(
    algorithm: Algorithm, plan: ExecutionPlan | None = None, mesh=None, staleness_weight=None
):
    """Builds one jitted server step of buffered asynchronous aggregation (FedBuff).

    The cohort is the buffer: the clients whose updates arrived since the
    last step, each trained from the server version it started from
    (``schedule.version``, absolute). Their updates are scaled by
    ``staleness_weight(current_version - version)`` before the aggregator,
    the server steps once, and the new version enters the ring. The caller
    keeps every start version within ``ring_size - 1`` steps of the current
    one (older rows have been overwritten).

    Args:
      algorithm, plan, mesh: as :func:`build_round`.
      staleness_weight: ``int32[n] -> float32[n]``, e.g.
        ``fedjaxsim.algorithms.fed_buff.polynomial_staleness()``; None leaves
        updates unscaled.

    Returns:
      ``step_fn(buffered, cohort, rng, client_states=(), schedule=None, frozen=())``
      returning ``(new_buffered, RoundOutput)``; ``schedule.version`` is
      required. ``buffered`` is donated: its arrays are invalid after the
      call, so keep only the returned state (copy it first to reuse it).
    """
    plan = default_plan() if plan is None else plan
    train_cohort = _train_cohort(algorithm, plan, mesh)

    def step_fn(
        buffered: BufferedServer, cohort: Cohort, rng, client_states=(), schedule=None, frozen=()
    ):
        if schedule is None or schedule.version is None:
            raise ValueError(
                "a buffered step needs schedule=ClientSchedule(version=...): the server "
                "version each client started from"
            )
        ring_size = jax.tree.leaves(buffered.ring)[0].shape[0]
        version = jnp.asarray(schedule.version, jnp.int32)
        scale = schedule.update_scale
        if staleness_weight is not None:
            weights = staleness_weight(buffered.version - version).astype(jnp.float32)
            scale = weights if scale is None else weights * jnp.asarray(scale, jnp.float32)
        schedule = schedule._replace(version=version % ring_size, update_scale=scale)
        server_state, output = _round_body(
            algorithm,
            train_cohort,
            mesh,
            buffered.server_state,
            buffered.ring,
            True,
            cohort,
            rng,
            client_states,
            schedule,
            frozen,
        )
        new_version = buffered.version + 1
        row = new_version % ring_size
        ring = jax.tree.map(
            lambda rows, leaf: rows.at[row].set(leaf),
            buffered.ring,
            algorithm.broadcast(server_state),
        )
        if mesh is not None:
            ring = replicate(ring, mesh)
        return BufferedServer(server_state, ring, new_version), output

    # The ring is the server's largest state (ring_size versions of the
    # model); donating it lets XLA write the new version in place instead of
    # copying every version each step.
    return jax.jit(step_fn, donate_argnums=0)
