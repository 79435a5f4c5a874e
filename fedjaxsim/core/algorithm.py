"""The algorithm record and its contract.

An algorithm is a builder (``fed_avg(...)``, ``scaffold(...)``) that closes
over models, optax transforms and hyper-parameters and returns an
:class:`Algorithm`: a NamedTuple of pure functions over pytrees of arrays,
plus the :class:`~fedjaxsim.core.aggregators.Aggregator` its server half
reads through. The engine (``fedjaxsim.core.engine``) owns vmap over
clients, scan over local steps, chunking, masking of padding, sharding and
the aggregation; an algorithm never calls them itself. That is what lets one
execution plan serve every algorithm, and every aggregator compose with every
algorithm.

One round, for a cohort of clients, is::

    broadcast = algorithm.broadcast(server_state)
    for each client c (vmapped, in chunks):
        local = algorithm.client_init(broadcast, client_state[c], rng_c)
        for each local step s (an all-padding step changes nothing):
            local, step_stats = algorithm.client_step(local, batch[c, s], mask[c, s], rng_cs)
        output_c = algorithm.client_finalize(broadcast, local)
        share_c = aggregator.client_transform(payload(output_c), weight[c], ...)
    aggregate, aggregator_state = aggregator.finalize(sum or stack of share_c, ...)
    server_state, metrics = algorithm.server_update(server_state, aggregate, rng)

Contract:
  * Every function is pure and jit-compatible; state leaves are arrays only.
  * The server state has a field ``aggregator_state`` that ``init`` fills with
    ``aggregator.init(params)``; the engine replaces it after aggregation.
    :func:`with_aggregator` swaps an algorithm's aggregator.
  * ``ClientOutput.update`` is a pytree like the params. Anything else the
    server needs from clients goes in the declared side channel
    (``ClientOutput.means`` or ``ClientOutput.sums``), never around the
    aggregator.
  * ``client_step`` returns sufficient statistics (sums and counts, e.g.
    ``{"loss_sum": ..., "num_examples": ...}``); the engine adds them up over
    steps. Loss means divide by ``max(sum(mask), 1)``.
  * A client whose weight is 0, or whose message is not finite, does not
    count: it adds nothing to the aggregate and keeps its old client state.
  * ``client_id`` of padding clients is out of range (``num_total_clients`` or
    above); per-client RNG is ``jax.random.fold_in(round_rng, client_id)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from fedjaxsim.core.aggregators import Aggregator, weighted_mean
from fedjaxsim.core.types import PyTree

AGGREGATOR_STATE_FIELD = "aggregator_state"


class ClientOutput(NamedTuple):
    """What one client returns after local training."""

    update: PyTree  # pytree like params: the client's model delta (server - local)
    client_state: PyTree = ()  # new per-client state for stateful algorithms
    metrics: dict[str, Any] = {}  # per-client scalars, e.g. update norm
    means: dict[str, Any] = {}  # side channel averaged with the update's weights
    sums: dict[str, Any] = {}  # side channel summed over the clients that count


class Algorithm(NamedTuple):
    """A federated algorithm as a record of pure functions (see module doc)."""

    init: Callable[..., PyTree]  # (params) -> server_state
    broadcast: Callable[[PyTree], PyTree]  # (server_state) -> broadcast
    client_init: Callable[..., PyTree]  # (broadcast, client_state, rng) -> local
    client_step: Callable[..., tuple[PyTree, dict]]  # (local, batch, mask, rng) -> (local, stats)
    client_finalize: Callable[[PyTree, PyTree], ClientOutput]  # (broadcast, local) -> output
    server_update: Callable[
        ..., tuple[PyTree, dict]
    ]  # (server_state, aggregate, rng) -> (state, metrics)
    aggregator: Aggregator = weighted_mean()
    # (params) -> one client's state before it is first trained; None when stateless.
    initial_client_state: Callable[[PyTree], PyTree] | None = None


def aggregator_state_of(server_state: PyTree) -> PyTree:
    """The ``aggregator_state`` field of a server state.

    Raises:
      ValueError: when the server state has no such field.
    """
    if not hasattr(server_state, AGGREGATOR_STATE_FIELD):
        raise ValueError(
            f"the server state ({type(server_state).__name__}) needs a field "
            f"{AGGREGATOR_STATE_FIELD!r} holding algorithm.aggregator.init(params): the engine "
            "keeps the aggregator's state there (e.g. the DP clip norm)"
        )
    return server_state.aggregator_state


def replace_aggregator_state(server_state: PyTree, aggregator_state: PyTree) -> PyTree:
    """``server_state`` (a NamedTuple or a dataclass) with ``aggregator_state`` replaced."""
    aggregator_state_of(server_state)
    if dataclasses.is_dataclass(server_state):
        return dataclasses.replace(server_state, aggregator_state=aggregator_state)
    return server_state._replace(aggregator_state=aggregator_state)


def with_aggregator(algorithm: Algorithm, aggregator: Aggregator) -> Algorithm:
    """``algorithm`` whose server half reads through ``aggregator`` instead.

    The one way to combine an algorithm with DP, a robust rule, compression
    or secure aggregation: ``with_aggregator(scaffold(...), dp_aggregator(...))``.
    """
    inner_init = algorithm.init

    def init(params):
        return replace_aggregator_state(inner_init(params), aggregator.init(params))

    return algorithm._replace(init=init, aggregator=aggregator)
