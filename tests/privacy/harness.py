"""Shared helpers for the privacy, robust and compression tests.

A round of FedAvg on softmax regression (``tests.conftest``'s synthetic
clients) with any aggregator, and an aggregator that hands the per-client
updates back in the server metrics, so that float64 NumPy references can be
computed from exactly the updates the engine produced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.aggregators import Aggregator
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from tests.conftest import make_clients

NUM_TOTAL_CLIENTS = 50
CLIENT_IDS = [3, 17, 8, 41, 25, 30]
SIZES = [9, 30, 14, 21, 5, 17]
CLIENT_LEARNING_RATE = 0.5


def stacked_updates_aggregator() -> Aggregator:
    """Returns every client's update and weight as server metrics; aggregate 0."""

    def finalize(reduced, state, rng):
        del rng
        zero = jax.tree.map(lambda leaf: jnp.zeros_like(leaf[0]), reduced["update"])
        return zero, state, {"updates": reduced["update"], "weights": reduced["weight"]}

    return Aggregator(
        init=lambda params: (),
        client_transform=lambda update, weight, state, rng: {"update": update, "weight": weight},
        finalize=finalize,
        reduction="stack",
    )


def cohort(round_index=0, sizes=SIZES, ids=CLIENT_IDS, weighting="uniform", seed=1, num_lanes=None):
    clients = make_clients(sizes, seed=seed)
    return pack_cohort(
        clients,
        ids,
        PackingConfig(batch_size=8, weighting=weighting),
        seed=seed,
        round_index=round_index,
        num_total_clients=NUM_TOTAL_CLIENTS,
        num_lanes=num_lanes,
    )


def fed_avg_with(loss_fn, aggregator: Aggregator):
    return fed_avg(loss_fn, optax.sgd(CLIENT_LEARNING_RATE), aggregator=aggregator)


def run_round(loss_fn, params, aggregator, packed, rng_seed=0, plan=None, client_states=()):
    """One jitted round; returns (new server state, RoundOutput)."""
    algorithm = fed_avg_with(loss_fn, aggregator)
    round_fn = build_round(algorithm, plan or ExecutionPlan())
    return round_fn(algorithm.init(params), packed, jax.random.key(rng_seed), client_states)


def client_updates(loss_fn, params, packed):
    """float64 per-client update leaves [num_clients, ...] and weights, from the engine."""
    _, out = run_round(loss_fn, params, stacked_updates_aggregator(), packed)
    updates = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), out.server_metrics["updates"])
    return updates, np.asarray(out.server_metrics["weights"], np.float64)


def flat_rows(tree) -> np.ndarray:
    """[num_clients, num_params]: every client's update as one float64 row."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate(
        [np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1
    )


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])
