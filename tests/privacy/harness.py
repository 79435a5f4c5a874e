"""Shared helpers for the privacy, robust and compression tests.

A FedAvg round on softmax regression (:func:`fedjaxsim.testing.synthetic_clients`)
with any aggregator, an aggregator that hands every client's payload back in
the server metrics (so that float64 NumPy references start from exactly the
updates the engine produced), and float64 flatteners for the references.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.aggregators import Aggregate, Aggregator, ClientPayload, Contribution
from fedjaxsim.core.algorithm import with_aggregator
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.testing import synthetic_clients

NUM_TOTAL_CLIENTS = 50
CLIENT_IDS = [3, 17, 8, 41, 25, 30]
SIZES = [9, 30, 14, 21, 5, 17]
CLIENT_LEARNING_RATE = 0.5


def stacked_updates_aggregator() -> Aggregator:
    """Every client's payload and weight, stacked, as server metrics; a zero aggregate.

    Metrics: ``payloads`` (a :class:`ClientPayload` with leaves
    ``[num_clients, ...]`` in cohort order), ``updates`` (its update) and
    ``weights`` (float32[num_clients], 0 for a client that does not count).
    """

    def client_transform(payload, weight, state, rng):
        del state, rng
        return Contribution(stacked={"payload": payload, "weight": weight})

    def finalize(contributions, state, rng):
        del rng
        stacked = contributions.stacked
        zeros = jax.tree.map(lambda leaf: jnp.zeros_like(leaf[0]), stacked["payload"])
        aggregate = Aggregate(zeros.update, zeros.means, zeros.sums, jnp.zeros((), jnp.float32))
        metrics = {
            "payloads": stacked["payload"],
            "updates": stacked["payload"].update,
            "weights": stacked["weight"],
        }
        return aggregate, state, metrics

    return Aggregator(init=lambda params: (), client_transform=client_transform, finalize=finalize)


def cohort(round_index=0, sizes=SIZES, ids=CLIENT_IDS, weighting="uniform", seed=1, num_lanes=None):
    """The packed cohort of ``synthetic_clients(sizes, seed)`` (batch size 8)."""
    return pack_cohort(
        synthetic_clients(sizes, seed=seed),
        ids,
        PackingConfig(batch_size=8, weighting=weighting),
        seed=seed,
        round_index=round_index,
        num_total_clients=NUM_TOTAL_CLIENTS,
        num_lanes=num_lanes,
    )


def fed_avg_with(loss_fn, aggregator: Aggregator):
    """FedAvg (client SGD, server SGD at 1) reading through ``aggregator``."""
    return with_aggregator(fed_avg(loss_fn, optax.sgd(CLIENT_LEARNING_RATE)), aggregator)


def run_round(loss_fn, params, aggregator, packed, rng_seed=0, plan=None, client_states=()):
    """One jitted round of :func:`fed_avg_with`; returns (new server state, RoundOutput)."""
    algorithm = fed_avg_with(loss_fn, aggregator)
    round_fn = build_round(algorithm, plan or ExecutionPlan())
    return round_fn(algorithm.init(params), packed, jax.random.key(rng_seed), client_states)


@functools.cache
def _stacked_updates_round(loss_fn):
    """One compiled round per loss function, shared by every test of the session."""
    return build_round(fed_avg_with(loss_fn, stacked_updates_aggregator()), ExecutionPlan())


def client_updates(loss_fn, params, packed):
    """float64 per-client update leaves [num_clients, ...] and weights, from the engine."""
    algorithm = fed_avg_with(loss_fn, stacked_updates_aggregator())
    _, out = _stacked_updates_round(loss_fn)(algorithm.init(params), packed, jax.random.key(0))
    updates = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), out.server_metrics["updates"])
    return updates, np.asarray(out.server_metrics["weights"], np.float64)


def flat_rows(tree) -> np.ndarray:
    """[num_clients, num_values]: every client's leaves as one float64 row."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate(
        [np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1
    )


def flat(tree) -> np.ndarray:
    """Every leaf of ``tree``, raveled and concatenated, in float64."""
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def side_channel_payloads(num_clients, seed=0, scale=1.0) -> ClientPayload:
    """Stacked NumPy payloads ``[num_clients, ...]`` with a two-leaf update, side means and sums.

    The side channel has the shapes of the algorithms': a scalar mean
    (FedNova's step normaliser), a vector mean and a params-like sum
    (SCAFFOLD's control delta).
    """
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (scale * rng.normal(size=(num_clients, *shape))).astype(np.float32)

    return ClientPayload(
        update={"kernel": normal(4, 3), "bias": normal(3)},
        means={"step_norm": normal(), "curvature": normal(2)},
        sums={"control_delta": {"kernel": normal(4, 3), "bias": normal(3)}},
    )
