"""Robust aggregators against loop-based float64 NumPy references."""

import jax
import numpy as np
import pytest

from fedjaxsim.core.aggregators import ClientPayload, aggregate_clients
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.robust import coordinate_median, krum, multi_krum, norm_bounded_mean, trimmed_mean
from tests.privacy import harness

NUM_ROWS = 11


def _stacked_inputs(seed=0):
    """Per-client updates (two leaves) and weights: two padding rows and a NaN client."""
    rng = np.random.default_rng(seed)
    updates = {
        "kernel": rng.normal(size=(NUM_ROWS, 4, 3)).astype(np.float32),
        "bias": rng.normal(size=(NUM_ROWS, 3)).astype(np.float32),
    }
    updates["kernel"][2] *= 25.0  # an outlier
    updates["bias"][5, 1] = np.nan  # a diverged client
    weights = rng.uniform(1, 5, size=NUM_ROWS).astype(np.float32)
    weights[[3, 9]] = 0.0  # padding clients
    return updates, weights


def _aggregate(aggregator, updates, weights, means=None, sums=None):
    """``aggregate_clients`` over stacked payloads; returns (flat update, aggregate, metrics)."""
    payloads = ClientPayload(updates, {} if means is None else means, {} if sums is None else sums)
    aggregate, _, metrics = jax.jit(aggregate_clients, static_argnums=0)(
        aggregator, payloads, weights, aggregator.init(None), jax.random.key(0)
    )
    return harness.flat(aggregate.update), aggregate, metrics


def _valid_rows(updates, weights):
    rows = harness.flat_rows(updates)
    keep = (weights > 0) & np.all(np.isfinite(rows), axis=1)
    return rows[keep], weights[keep]


def _trimmed_mean_reference(rows, fraction):
    n = len(rows)
    k = int(np.floor(fraction * n))
    result = []
    for column in rows.T:
        ordered = sorted(column)
        result.append(sum(ordered[k : n - k]) / (n - 2 * k))
    return np.array(result)


def _krum_reference(rows, num_byzantine, num_selected):
    n = len(rows)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[: n - num_byzantine - 2]))
    chosen = np.argsort(scores, kind="stable")[:num_selected]
    return rows[chosen].mean(axis=0), chosen


def test_coordinate_median_matches_numpy():
    updates, weights = _stacked_inputs()
    got, _, metrics = _aggregate(coordinate_median(), updates, weights)
    rows, _ = _valid_rows(updates, weights)
    assert len(rows) == 8  # even: the mean of the two middle values
    np.testing.assert_allclose(got, np.median(rows, axis=0), rtol=1e-6, atol=1e-7)
    assert float(metrics["robust_num_clients"]) == 8
    assert float(metrics["num_nonfinite_updates"]) == 1
    odd_weights = weights.copy()
    odd_weights[0] = 0.0
    got, _, _ = _aggregate(coordinate_median(), updates, odd_weights)
    np.testing.assert_array_equal(got, np.median(_valid_rows(updates, odd_weights)[0], axis=0))


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.49])
def test_trimmed_mean_matches_loop_reference(fraction):
    updates, weights = _stacked_inputs(seed=1)
    got, _, metrics = _aggregate(trimmed_mean(fraction), updates, weights)
    rows, _ = _valid_rows(updates, weights)
    np.testing.assert_allclose(got, _trimmed_mean_reference(rows, fraction), rtol=1e-5, atol=1e-6)
    assert float(metrics["trimmed_mean_num_trimmed"]) == np.floor(fraction * len(rows))


@pytest.mark.parametrize("num_byzantine, num_selected", [(2, 1), (1, 4)])
def test_krum_and_multi_krum_match_loop_reference(num_byzantine, num_selected):
    updates, weights = _stacked_inputs(seed=2)
    got, _, metrics = _aggregate(multi_krum(num_byzantine, num_selected), updates, weights)
    rows, _ = _valid_rows(updates, weights)
    expected, _ = _krum_reference(rows, num_byzantine, num_selected)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert float(metrics["krum_num_selected"]) == num_selected
    assert float(metrics["krum_too_few_clients"]) == 0
    if num_selected == 1:
        # The outlier (row 2) is never chosen.
        assert not np.allclose(got, harness.flat_rows(updates)[2])


def test_norm_bounded_mean_matches_numpy():
    updates, weights = _stacked_inputs(seed=3)
    got, _, metrics = _aggregate(norm_bounded_mean(1.5), updates, weights)
    rows, row_weights = _valid_rows(updates, weights)
    norms = np.linalg.norm(rows, axis=1)
    clipped = rows * np.minimum(1.0, 1.5 / norms)[:, None]
    expected = (row_weights[:, None] * clipped).sum(axis=0) / row_weights.sum()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["norm_bound_num_clipped"]) == np.sum(norms > 1.5)


SIDE_CHANNEL_CASES = {
    # name: (aggregator, float64 reference of the update from the kept rows and weights)
    "median": (coordinate_median, lambda rows, weights: np.median(rows, axis=0)),
    "trimmed_mean": (
        lambda: trimmed_mean(0.2),
        lambda rows, weights: _trimmed_mean_reference(rows, 0.2),
    ),
    "krum": (lambda: krum(2), lambda rows, weights: _krum_reference(rows, 2, 1)[0]),
    "norm_bound": (
        lambda: norm_bounded_mean(50.0),
        lambda rows, weights: (weights[:, None] * rows).sum(axis=0) / weights.sum(),
    ),
}


@pytest.mark.parametrize("name", SIDE_CHANNEL_CASES)
def test_side_channel_is_a_weighted_mean_and_a_plain_sum_over_the_present_clients(name):
    """The rule applies to the update rows; the side channel is streamed as
    declared: means weighted by the clients' weights, sums plain, both over the
    clients that count (the NaN client and the padding clients drop out whole).
    The norm bound clips the joint message; 50 is above every norm here."""
    updates, weights = _stacked_inputs(seed=4)
    updates["kernel"][2] /= 25.0  # no outlier: keeps every norm below the bound
    side = harness.side_channel_payloads(NUM_ROWS, seed=6)
    build, reference = SIDE_CHANNEL_CASES[name]
    got, aggregate, metrics = _aggregate(build(), updates, weights, side.means, side.sums)
    keep = (weights > 0) & np.all(np.isfinite(harness.flat_rows(updates)), axis=1)
    assert keep.sum() == 8
    kept_weights = weights[keep].astype(np.float64)
    means = harness.flat_rows(side.means)[keep]
    sums = harness.flat_rows(side.sums)[keep]
    np.testing.assert_allclose(
        harness.flat(aggregate.means),
        (kept_weights[:, None] * means).sum(axis=0) / kept_weights.sum(),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(harness.flat(aggregate.sums), sums.sum(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aggregate.weight), kept_weights.sum(), rtol=1e-6)
    assert float(metrics["num_nonfinite_updates"]) == 1
    # The update is the rule's, from the update rows alone.
    rows, _ = _valid_rows(updates, weights)
    assert np.linalg.norm(np.concatenate([rows, means, sums], axis=1), axis=1).max() < 50.0
    np.testing.assert_allclose(got, reference(rows, kept_weights), rtol=1e-5, atol=1e-6)


def test_median_through_the_engine_with_clients_packed_in_lanes(logreg_loss, logreg_params):
    """Stacked rows reach finalize in cohort order, whatever the lane layout."""
    updates, _ = harness.client_updates(logreg_loss, logreg_params, harness.cohort())
    packed = harness.cohort(num_lanes=4)  # several clients per lane, and empty positions
    state, out = harness.run_round(logreg_loss, logreg_params, coordinate_median(), packed)
    expected = harness.flat(logreg_params) - np.median(harness.flat_rows(updates), axis=0)
    np.testing.assert_allclose(harness.flat(state.params), expected, atol=1e-6)
    assert float(out.server_metrics["robust_num_clients"]) == len(harness.CLIENT_IDS)


def test_krum_rejects_a_cohort_too_small_for_its_attackers():
    updates, weights = _stacked_inputs()
    with pytest.raises(ValueError, match="num_byzantine"):
        _aggregate(krum(num_byzantine=5), updates, weights)  # needs 13 clients, has 11
    with pytest.raises(ValueError, match="num_selected"):
        _aggregate(multi_krum(num_byzantine=2, num_selected=10), updates, weights)


@pytest.mark.parametrize(
    "build, parameter",
    [
        (lambda: trimmed_mean(0.5), "trim_fraction"),
        (lambda: trimmed_mean(-0.1), "trim_fraction"),
        (lambda: krum(-1), "num_byzantine"),
        (lambda: multi_krum(1, 0), "num_selected"),
        (lambda: norm_bounded_mean(0.0), "max_norm"),
    ],
)
def test_bad_robust_arguments_name_the_parameter(build, parameter):
    with pytest.raises(InvalidArgument, match=parameter) as raised:
        build()
    assert raised.value.name.rsplit(".", 1)[-1] == parameter  # what the runner maps to a key
