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
from fedjaxsim.core.engine.client import RoundContext
from fedjaxsim.core.engine.lanes import LaneInputs, train_chunk
from fedjaxsim.core.engine.mesh import on_mesh, replicate
from fedjaxsim.core.engine.plan import ExecutionPlan, default_plan
from fedjaxsim.core.types import PyTree

# Padding clients added by the engine get this id: out of range for any
# population, so a stateful gather/scatter with mode="drop" ignores them.
ENGINE_PADDING_ID = np.iinfo(np.int32).max


class RoundOutput(NamedTuple):
    client_metrics: dict  # float32[num_clients] per statistic (step sums + finalize metrics)
    server_metrics: dict  # float32[] per statistic: aggregation, then the server update
    client_states: PyTree  # [num_clients, ...] new client states (old ones where unused); ()


def gather_lanes(cohort: Cohort, client_states: PyTree) -> tuple[LaneInputs, jax.Array]:
    """Per-client arrays gathered into lane positions; returns ``(lanes, lane_clients)``."""
    num_clients = cohort.num_clients
    lane_clients = jnp.asarray(cohort.lane_clients, jnp.int32)  # [lanes, per_lane]
    occupied = lane_clients < num_clients

    def gather(tree, fill):
        return jax.tree.map(
            lambda leaf: jnp.take(leaf, lane_clients, axis=0, mode="fill", fill_value=fill), tree
        )

    weight = gather(jnp.asarray(cohort.weight, jnp.float32), 0)
    client_id = gather(jnp.asarray(cohort.client_id, jnp.int32), ENGINE_PADDING_ID)
    lanes = LaneInputs(
        data=cohort.data,
        mask=jnp.asarray(cohort.mask, bool),
        step_position=jnp.asarray(cohort.step_position, jnp.int32),
        weight=jnp.where(occupied, weight, 0.0),
        client_id=jnp.where(occupied, client_id, ENGINE_PADDING_ID),
        occupied=occupied,
        client_state=gather(client_states, 0),
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


def _check_side_channel(algorithm: Algorithm, aggregate, context, client_states) -> None:
    """Raises unless the aggregate carries exactly the side channel the clients send.

    The side channel is derived from client data: an aggregator must combine
    it with the update (privatise or protect it too), never drop it.
    """
    first_state = jax.tree.map(lambda leaf: leaf[0], client_states)
    declared = jax.eval_shape(
        lambda: algorithm.client_finalize(
            context.broadcast,
            algorithm.client_init(context.broadcast, first_state, context.client_rng),
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
      ``round_fn(server_state, cohort, rng, client_states=())`` returning
      ``(new_server_state, RoundOutput)``. ``client_states`` is a pytree with
      a leading ``num_clients`` axis (cohort order) for stateful algorithms,
      ``()`` otherwise. The function is jitted; it retraces only when shapes
      or dtypes change.
    """
    plan = default_plan() if plan is None else plan
    train = partial(train_lanes, partial(train_chunk, algorithm, plan), plan)
    if mesh is None:
        train_cohort = partial(train, clients_per_chunk=plan.clients_per_chunk)
    else:
        train_cohort = on_mesh(train, mesh, plan.clients_per_chunk)

    def round_fn(server_state, cohort: Cohort, rng, client_states=()):
        validate_cohort(cohort)
        _check_client_states(algorithm, client_states)
        # 1. Gather: each client's weight, id and state into its lane position.
        lanes, lane_clients = gather_lanes(cohort, client_states)
        client_rng, server_rng = jax.random.split(rng)
        aggregator_state = aggregator_state_of(server_state)
        context = RoundContext(algorithm.broadcast(server_state), aggregator_state, client_rng)
        # 2. Train the clients: local steps, finalisation, each client's share.
        trained = train_cohort(context, lanes, lane_clients, cohort.num_clients)
        # 3. Combine the shares into the aggregate.
        contributions = Contribution(trained.sums.aggregator, trained.records.stacked)
        aggregate, aggregator_state, aggregation_metrics = algorithm.aggregator.finalize(
            contributions, aggregator_state, server_rng
        )
        _check_side_channel(algorithm, aggregate, context, client_states)
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

    return jax.jit(round_fn)
