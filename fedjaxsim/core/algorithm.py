"""The algorithm record and its contract.

An algorithm is a builder (``fed_avg(...)``, ``fed_prox(...)``) that closes
over models, optax transforms and hyper-parameters and returns an
:class:`Algorithm`: a NamedTuple of pure functions over pytrees of arrays. The
engine (``fedjaxsim.core.engine``) owns vmap over clients, scan over local
steps, chunking, masking of padding and sharding; an algorithm never calls
them itself. This is what lets one execution plan serve every algorithm and
what makes padding correct by construction.

One round, for a cohort of clients, is::

    broadcast = algorithm.broadcast(server_state)
    for each client c (vmapped, in chunks):
        local = algorithm.client_init(broadcast, client_state[c], rng_c)
        for each local step s (lax.scan; an all-padding step is skipped with
                               jnp.where, so it changes nothing):
            local, step_stats = algorithm.client_step(local, batch[c, s], mask[c, s], rng_cs)
        output_c = algorithm.client_finalize(broadcast, local)
        contribution_c = algorithm.client_contribution(server_state, output_c, weight[c], rng_c)
    reduced = sum_c contribution_c        if algorithm.reduction == "sum"
              stack_c contribution_c      if algorithm.reduction == "stack"
    server_state, server_metrics = algorithm.server_update(server_state, reduced, rng)

Contract:
  * Every function is pure and jit-compatible; state leaves are arrays only.
  * ``client_step`` returns sufficient statistics (sums and counts, e.g.
    ``{"loss_sum": ..., "num_examples": ...}``); the engine adds them up over
    steps. Loss means divide by ``max(sum(mask), 1)``.
  * With ``reduction == "sum"`` a zero-weight client must contribute exactly
    zero, so padding clients change nothing. With ``"stack"`` the aggregator
    receives the per-client contributions ``[num_clients, ...]`` and the
    weights, and must ignore zero-weight rows itself.
  * ``client_id`` of padding clients is ``num_total_clients`` (out of range);
    per-client RNG is ``jax.random.fold_in(round_rng, client_id)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from fedjaxsim.core.types import PyTree

REDUCTIONS = ("sum", "stack")


class ClientOutput(NamedTuple):
    """What one client returns after local training."""

    update: PyTree  # pytree like params: the client's model delta (server - local)
    client_state: PyTree = ()  # new per-client state for stateful algorithms
    metrics: dict[str, Any] = {}  # per-client scalars, e.g. update norm


class Algorithm(NamedTuple):
    """A federated algorithm as a record of pure functions (see module doc)."""

    init: Callable[..., PyTree]  # (params) -> server_state
    broadcast: Callable[[PyTree], PyTree]  # (server_state) -> broadcast
    client_init: Callable[..., PyTree]  # (broadcast, client_state, rng) -> local
    client_step: Callable[..., tuple[PyTree, dict]]  # (local, batch, mask, rng) -> (local, stats)
    client_finalize: Callable[[PyTree, PyTree], ClientOutput]  # (broadcast, local) -> output
    client_contribution: Callable[..., PyTree]  # (server_state, output, weight, rng) -> contribution
    server_update: Callable[..., tuple[PyTree, dict]]  # (server_state, reduced, rng) -> (state, metrics)
    reduction: str = "sum"
