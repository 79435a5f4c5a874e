"""DP-FedAvg: clipping bound, noise level, adaptive clipping, and FedAvg as the limit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.core.aggregators import weighted_mean
from fedjaxsim.privacy import (
    AdaptiveClipping,
    EpsilonSchedule,
    clip_by_global_norm,
    dp_fed_avg_aggregator,
    update_noise_multiplier,
)
from tests.privacy import harness


def _random_updates(num_clients, seed=0):
    """A two-leaf update per client, norms spread over six orders of magnitude."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 3, size=num_clients)
    kernel = rng.normal(size=(num_clients, 7, 3)) * scales[:, None, None]
    bias = rng.normal(size=(num_clients, 3)) * scales[:, None]
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def test_every_clipped_update_has_norm_at_most_clip_norm():
    clip_norm = 1.5
    updates = _random_updates(64)
    aggregator = dp_fed_avg_aggregator(clip_norm, 0.0, expected_cohort_size=64)
    state = aggregator.init(None)
    weights = np.ones(64, np.float32)
    contributions = jax.jit(jax.vmap(aggregator.client_transform, in_axes=(0, 0, None, None)))(
        updates, weights, state, jax.random.key(0)
    )
    clipped = harness.flat_rows(contributions["clipped_sum"])
    original = harness.flat_rows(updates)
    norms = np.linalg.norm(clipped, axis=1)
    # float32 rounding of the scaled coordinates is the only slack.
    assert np.all(norms <= clip_norm * (1 + 1e-6))
    inside = np.linalg.norm(original, axis=1) <= clip_norm
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(clipped[inside], original[inside])  # untouched, bit for bit
    np.testing.assert_allclose(norms[~inside], clip_norm, rtol=1e-6)
    # Clipping scales, it never rotates.
    cosine = np.sum(clipped * original, axis=1) / (norms * np.linalg.norm(original, axis=1))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)
    assert int(contributions["num_clipped"].sum()) == int((~inside).sum())


def test_zero_noise_and_infinite_clip_norm_is_fed_avg_bit_for_bit(logreg_loss, logreg_params):
    cohort = harness.cohort(weighting="uniform")
    plain, _ = harness.run_round(logreg_loss, logreg_params, weighted_mean(), cohort)
    private, out = harness.run_round(
        logreg_loss,
        logreg_params,
        dp_fed_avg_aggregator(math.inf, 0.0, expected_cohort_size=len(harness.CLIENT_IDS)),
        cohort,
    )
    for got, want in zip(jax.tree.leaves(private.params), jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(out.server_metrics["dp_num_clipped"]) == 0
    assert float(out.server_metrics["dp_noise_stddev_on_sum"]) == 0


def test_round_matches_float64_clipped_fixed_denominator_reference(logreg_loss, logreg_params):
    """Capped example weights (McMahan et al. 2018) and a clip norm that bites."""
    cohort = harness.cohort(weighting="num_examples")
    updates, weights = harness.client_updates(logreg_loss, logreg_params, cohort)
    rows = harness.flat_rows(updates)
    norms = np.linalg.norm(rows, axis=1)
    clip_norm = float(np.median(norms))
    weight_cap, expected_total_weight = 15.0, 4.5
    aggregator = dp_fed_avg_aggregator(
        clip_norm,
        0.0,
        expected_cohort_size=len(harness.CLIENT_IDS),
        weight_cap=weight_cap,
        expected_total_weight=expected_total_weight,
    )
    state, out = harness.run_round(logreg_loss, logreg_params, aggregator, cohort)

    capped = np.minimum(weights / weight_cap, 1.0)
    clipped = rows * np.minimum(1.0, clip_norm / norms)[:, None]
    expected_delta = (capped[:, None] * clipped).sum(axis=0) / expected_total_weight
    expected = harness.flat(logreg_params) - expected_delta
    np.testing.assert_allclose(harness.flat(state.params), expected, atol=1e-6)
    assert float(out.server_metrics["dp_num_clipped"]) == np.sum(norms > clip_norm)
    assert float(out.server_metrics["dp_num_clients"]) == len(harness.CLIENT_IDS)


@pytest.mark.parametrize("noise_cohort_size", [None, 1000])
def test_noise_standard_deviation_within_confidence_bound(noise_cohort_size):
    clip_norm, noise_multiplier, cohort_size = 0.7, 1.3, 10
    template = {"a": jnp.zeros((300, 200), jnp.float32), "b": jnp.zeros((40_000,), jnp.float32)}
    aggregator = dp_fed_avg_aggregator(
        clip_norm, noise_multiplier, cohort_size, noise_cohort_size=noise_cohort_size
    )
    reduced = {
        "clipped_sum": template,
        "total_weight": jnp.float32(cohort_size),
        "num_clients": jnp.float32(cohort_size),
        "num_clipped": jnp.float32(0),
        "centered_unclipped": jnp.float32(0),
        "num_nonfinite_updates": jnp.float32(0),
    }
    aggregate, _, metrics = jax.jit(aggregator.finalize)(
        reduced, aggregator.init(template), jax.random.key(3)
    )
    noise = harness.flat(aggregate)
    calibration = cohort_size if noise_cohort_size is None else noise_cohort_size
    expected_std = noise_multiplier * clip_norm / calibration  # on the average
    n = noise.size
    # Sample std of n Gaussians: relative standard error 1/sqrt(2n); allow 5 of them.
    assert abs(noise.std() / expected_std - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(n)
    np.testing.assert_allclose(float(metrics["dp_noise_stddev_on_mean"]), expected_std, rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["dp_noise_stddev_on_sum"]), expected_std * cohort_size, rtol=1e-6
    )
    if noise_cohort_size is None:
        assert "dp_noise_cohort_size" not in metrics
    else:
        assert float(metrics["dp_noise_cohort_size"]) == noise_cohort_size
        assert float(metrics["dp_simulated_cohort_size"]) == cohort_size


def test_adaptive_clipping_update_rule_and_quantile_tracking():
    """One step is Andrew et al.'s geometric rule; many steps find the quantile."""
    num_clients, target = 200, 0.3
    rng = np.random.default_rng(7)
    norms = rng.lognormal(mean=0.0, sigma=1.0, size=num_clients).astype(np.float32)
    directions = rng.normal(size=(num_clients, 5))
    updates = (
        directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
    ).astype(np.float32)
    weights = np.ones(num_clients, np.float32)
    config = AdaptiveClipping(target_quantile=target, learning_rate=0.2, clipped_count_stddev=0.0)
    aggregator = dp_fed_avg_aggregator(1.0, 0.0, num_clients, adaptive_clipping=config)

    @jax.jit
    def one_round(state, rng):
        contributions = jax.vmap(aggregator.client_transform, in_axes=(0, 0, None, None))(
            updates, weights, state, rng
        )
        reduced = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), contributions)
        _, state, metrics = aggregator.finalize(reduced, state, rng)
        return state, metrics

    state = aggregator.init(None)
    first, metrics = one_round(state, jax.random.key(0))
    unclipped = np.mean(norms <= 1.0)
    np.testing.assert_allclose(
        float(metrics["dp_unclipped_fraction_estimate"]), unclipped, atol=1e-6
    )
    np.testing.assert_allclose(
        float(first.clip_norm), np.exp(-0.2 * (unclipped - target)), rtol=1e-6
    )
    for round_index in range(400):
        state, _ = one_round(state, jax.random.key(round_index))
    achieved = np.mean(norms <= float(state.clip_norm))
    assert abs(achieved - target) <= 0.02


def test_update_noise_multiplier_composes_to_the_total():
    """Andrew et al. Theorem 1: z^-2 = z_delta^-2 + (2 sigma_b)^-2."""
    z, sigma_b = 1.1, 5.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta > z
    np.testing.assert_allclose(z_delta**-2 + (2 * sigma_b) ** -2, z**-2, rtol=1e-12)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        update_noise_multiplier(2.0, 1.0)


def test_epsilon_schedule_is_reported_per_round():
    schedule = EpsilonSchedule(np.array([0.5, 0.8, 1.0]), 1e-5)
    aggregator = dp_fed_avg_aggregator(1.0, 1.0, 10, epsilon_schedule=schedule)
    template = {"w": jnp.zeros((3,), jnp.float32)}
    reduced = {
        "clipped_sum": template,
        "total_weight": jnp.float32(10),
        "num_clients": jnp.float32(10),
        "num_clipped": jnp.float32(0),
        "centered_unclipped": jnp.float32(0),
        "num_nonfinite_updates": jnp.float32(0),
    }
    finalize = jax.jit(aggregator.finalize)
    state = aggregator.init(template)
    reported = []
    for round_index in range(4):
        _, state, metrics = finalize(reduced, state, jax.random.key(round_index))
        reported.append(float(metrics["dp_epsilon"]))
        np.testing.assert_allclose(float(metrics["dp_delta"]), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(reported[:3], schedule.epsilons, rtol=1e-6)
    assert math.isnan(reported[3])  # past the schedule: unknown, not the last value


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"expected_cohort_size": 0}, "expected_cohort_size"),
        ({"noise_cohort_size": 5}, "noise_cohort_size"),
        ({"weight_cap": 10.0}, "expected_total_weight"),
        ({"weight_cap": 0.0, "expected_total_weight": 3.0}, "weight_cap"),
        ({"adaptive_clipping": AdaptiveClipping(target_quantile=1.5)}, "target_quantile"),
        ({"adaptive_clipping": AdaptiveClipping(learning_rate=0.0)}, "learning_rate"),
        (
            {
                "noise_multiplier": 3.0,
                "adaptive_clipping": AdaptiveClipping(clipped_count_stddev=1.0),
            },
            "clipped_count_stddev",
        ),
    ],
)
def test_bad_dp_arguments_name_the_parameter(kwargs, parameter):
    arguments = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_cohort_size": 10}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=parameter):
        dp_fed_avg_aggregator(**arguments)


def test_clip_by_global_norm_leaves_zero_update_alone():
    clipped, norm = clip_by_global_norm({"w": jnp.zeros((4,))}, 1.0)
    np.testing.assert_array_equal(clipped["w"], np.zeros(4))
    assert float(norm) == 0.0
