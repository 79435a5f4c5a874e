"""The one aggregation path (fedjaxsim.core.aggregators) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.core.aggregators import (
    Aggregate,
    Aggregator,
    ClientPayload,
    Contribution,
    aggregate_clients,
    average,
    weigh,
    weighted_mean,
)

NUM_CLIENTS = 5
WEIGHTS = np.array([2.0, 0.5, 0.0, 3.0, 1.5], np.float32)  # client 2 has weight 0


def _payloads(seed=0):
    """Stacked payloads [NUM_CLIENTS, ...]: an update, two side means, one side sum."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(size=(NUM_CLIENTS, *shape)).astype(np.float32)

    return ClientPayload(
        update={"kernel": normal(3, 2), "bias": normal(2)},
        means={"step_norm": normal(), "curvature": normal(4)},
        sums={"control_delta": {"kernel": normal(3, 2)}},
    )


def _weighted_mean64(stacked, weights):
    weights = np.asarray(weights, np.float64)
    return jax.tree.map(
        lambda leaf: np.tensordot(weights, np.asarray(leaf, np.float64), axes=1) / weights.sum(),
        stacked,
    )


def _sum64(stacked, counted):
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64)[counted].sum(axis=0), stacked)


def _assert_tree(actual, expected, exact=False):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if exact:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def aggregate():
    """aggregate_clients for the weighted mean, compiled once for the module."""
    aggregator = weighted_mean()
    return jax.jit(
        lambda payloads, weights: aggregate_clients(
            aggregator, payloads, weights, (), jax.random.key(0)
        )
    )


def test_weighted_mean_equals_float64_with_side_channel_means_and_sums(aggregate):
    payloads = _payloads()
    result, state, metrics = aggregate(payloads, WEIGHTS)
    assert isinstance(result, Aggregate) and state == ()
    _assert_tree(result.update, _weighted_mean64(payloads.update, WEIGHTS))
    _assert_tree(result.means, _weighted_mean64(payloads.means, WEIGHTS))
    # Sums are plain sums over the clients that count (weight > 0), unweighted.
    _assert_tree(result.sums, _sum64(payloads.sums, WEIGHTS > 0))
    np.testing.assert_allclose(result.weight, WEIGHTS.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["total_weight"], WEIGHTS.sum(), rtol=1e-6)
    assert float(metrics["num_nonfinite_updates"]) == 0.0


@pytest.mark.parametrize(
    "where",
    ["update", "means", "sums"],
)
@pytest.mark.parametrize("value", [np.nan, np.inf, 3e19])
def test_a_non_finite_client_is_dropped_and_counted(aggregate, where, value):
    """A NaN, Inf or overflowing value anywhere in the message (update or side
    channel) drops the whole client: the others' weighted mean, sums without
    it, and num_nonfinite_updates == 1."""
    payloads = _payloads(1)
    bad_client = 3
    leaf = {
        "update": payloads.update["bias"],
        "means": payloads.means["step_norm"],
        "sums": payloads.sums["control_delta"]["kernel"],
    }[where]
    leaf[(bad_client,) + (0,) * (leaf.ndim - 1)] = value
    result, _, metrics = aggregate(payloads, WEIGHTS)
    kept = WEIGHTS.copy()
    kept[bad_client] = 0.0
    clean = _payloads(1)  # the same values, without the poison
    _assert_tree(result.update, _weighted_mean64(clean.update, kept))
    _assert_tree(result.means, _weighted_mean64(clean.means, kept))
    _assert_tree(result.sums, _sum64(clean.sums, kept > 0))
    np.testing.assert_allclose(metrics["total_weight"], kept.sum(), rtol=1e-6)
    assert float(metrics["num_nonfinite_updates"]) == 1.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result))


def test_a_non_finite_padding_client_is_not_counted(aggregate):
    """Weight 0 already excludes a client: its NaN is neither used nor counted."""
    payloads = _payloads(2)
    payloads.update["kernel"][2] = np.nan  # client 2 has weight 0
    result, _, metrics = aggregate(payloads, WEIGHTS)
    _assert_tree(result.update, _weighted_mean64(_payloads(2).update, WEIGHTS))
    assert float(metrics["num_nonfinite_updates"]) == 0.0


def test_an_all_zero_weight_cohort_gives_exact_zeros(aggregate):
    payloads = _payloads(3)
    payloads.update["bias"][0] = np.nan  # weight 0: ignored, not counted
    result, _, metrics = aggregate(payloads, np.zeros(NUM_CLIENTS, np.float32))
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape[1:], np.float32), payloads)
    _assert_tree(result.update, zeros.update, exact=True)
    _assert_tree(result.means, zeros.means, exact=True)
    _assert_tree(result.sums, zeros.sums, exact=True)
    assert float(result.weight) == 0.0 and float(metrics["total_weight"]) == 0.0
    assert float(metrics["num_nonfinite_updates"]) == 0.0


def test_weigh_then_average():
    payload = jax.tree.map(lambda leaf: leaf[0], _payloads(4))
    weighted = weigh(payload, 2.5)
    assert weighted.weight.dtype == jnp.float32 and float(weighted.weight) == 2.5
    _assert_tree(weighted.payload.update, jax.tree.map(lambda x: 2.5 * x, payload.update))
    _assert_tree(weighted.payload.means, jax.tree.map(lambda x: 2.5 * x, payload.means))
    _assert_tree(weighted.payload.sums, payload.sums, exact=True)  # sums travel as sent
    # Two clients summed by hand, then averaged by their total weight ...
    other = jax.tree.map(lambda leaf: leaf[1], _payloads(4))
    summed = jax.tree.map(jnp.add, weighted, weigh(other, 0.5))
    result = average(summed)
    stacked = jax.tree.map(lambda a, b: np.stack([a, b]), payload, other)
    _assert_tree(result.update, _weighted_mean64(stacked.update, [2.5, 0.5]))
    _assert_tree(result.means, _weighted_mean64(stacked.means, [2.5, 0.5]))
    _assert_tree(result.sums, _sum64(stacked.sums, [True, True]))
    np.testing.assert_allclose(result.weight, 3.0)
    # ... or by a fixed denominator (DP's expected cohort weight); sums untouched.
    fixed = average(summed, denominator=10.0)
    _assert_tree(fixed.update, jax.tree.map(lambda x: x * 3.0 / 10.0, result.update))
    _assert_tree(fixed.sums, result.sums, exact=True)
    assert float(fixed.weight) == 10.0
    # A zero denominator gives zeros, not a division by zero.
    empty = average(summed, denominator=0.0)
    _assert_tree(empty.update, jax.tree.map(jnp.zeros_like, result.update), exact=True)


def test_stacked_contributions_arrive_in_cohort_order_and_dropped_clients_are_zeroed():
    """An order-statistics aggregator sees each client's row in cohort order;
    a non-finite client's row arrives as zeros with weight 0."""

    def client_transform(payload, weight, state, rng):
        del state, rng
        return Contribution(stacked=(payload.update, weight))

    def finalize(contributions, state, rng):
        del rng
        updates, weights = contributions.stacked
        median = jax.tree.map(lambda leaf: jnp.median(leaf, axis=0), updates)
        return (
            Aggregate(median, {}, {}, jnp.sum(weights)),
            state,
            {"rows": updates, "weights": weights},
        )

    median = Aggregator(
        init=lambda params: (), client_transform=client_transform, finalize=finalize
    )
    payloads = _payloads(5)._replace(means={}, sums={})
    payloads.update["kernel"][1, 0, 0] = np.inf
    result, _, metrics = aggregate_clients(median, payloads, WEIGHTS, (), jax.random.key(1))
    rows = jax.tree.map(np.array, _payloads(5).update)
    for leaf in jax.tree.leaves(rows):
        leaf[1] = 0.0
    _assert_tree(metrics["rows"], rows, exact=True)
    np.testing.assert_array_equal(
        metrics["weights"], np.where(np.arange(NUM_CLIENTS) == 1, 0.0, WEIGHTS)
    )
    _assert_tree(result.update, jax.tree.map(lambda leaf: np.median(leaf, axis=0), rows))
    assert float(metrics["num_nonfinite_updates"]) == 1.0
