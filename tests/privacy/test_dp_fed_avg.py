"""DP-FedAvg: clipping bound, noise level, side channel, adaptive clipping, FedAvg as the limit.

Statistical checks use fixed seeds (deterministic) and bounds that a correct
implementation misses with probability below about 1e-8 (chi-square quantiles
for variances, six standard errors for means), so no tolerance is tuned to a
draw.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.aggregators import ClientPayload, aggregate_clients
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.privacy import (
    AdaptiveClipping,
    EpsilonSchedule,
    clip_by_global_norm,
    dp_fed_avg,
    dp_fed_avg_aggregator,
    update_noise_multiplier,
)
from fedjaxsim.testing import run_rounds
from tests.privacy import harness

MISS_PROBABILITY = 1e-9  # per side of every statistical bound


def _assert_standard_normal(samples, label=""):
    """Asserts that ``samples`` (float64, iid under the claim) are N(0, 1).

    Variance: ``sum x^2 ~ chi2(n)``, two-sided at MISS_PROBABILITY per side.
    Mean: within six standard errors.
    """
    samples = np.asarray(samples, np.float64).ravel()
    n = samples.size
    low, high = stats.chi2.ppf([MISS_PROBABILITY, 1 - MISS_PROBABILITY], n)
    sum_of_squares = float(np.sum(samples**2))
    assert low < sum_of_squares < high, (label, sum_of_squares / n, low / n, high / n)
    assert abs(samples.mean()) < 6 / math.sqrt(n), (label, samples.mean())


def _joint_rows(payloads: ClientPayload) -> np.ndarray:
    """[num_clients, d]: each client's whole message (update, means, sums) in float64."""
    return harness.flat_rows(payloads)


def _message(aggregate) -> np.ndarray:
    """An Aggregate's update, means and sums as one float64 vector (the row order)."""
    return harness.flat(ClientPayload(aggregate.update, aggregate.means, aggregate.sums))


def _parts(payloads: ClientPayload):
    """Index arrays of the update, means and sums within a joint row."""
    sizes = [sum(leaf[0].size for leaf in jax.tree.leaves(part)) for part in payloads]
    return np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])


def _random_payloads(num_clients, seed=0):
    """Payloads with a side channel, whole-message norms over six orders of magnitude."""
    payloads = harness.side_channel_payloads(num_clients, seed=seed)
    scales = 10.0 ** np.random.default_rng(seed + 100).uniform(-3, 3, size=num_clients)
    return jax.tree.map(
        lambda leaf: (leaf * scales.reshape(-1, *[1] * (leaf.ndim - 1))).astype(np.float32),
        payloads,
    )


def test_every_client_message_is_clipped_jointly_to_the_clip_norm():
    """||(update, means, sums)|| <= C per client: the side channel is clipped with the update.

    Each client alone, with denominator 1 and no noise, so that the aggregate
    is exactly that client's clipped message.
    """
    clip_norm, num_clients = 1.5, 64
    payloads = _random_payloads(num_clients)
    aggregator = dp_fed_avg_aggregator(clip_norm, 0.0, expected_cohort_size=1)
    state = aggregator.init(None)

    @jax.jit
    def clipped_one_by_one(payloads):
        def alone(payload):
            aggregate, _, metrics = aggregate_clients(
                aggregator, payload, jnp.ones(1), state, jax.random.key(0)
            )
            return ClientPayload(aggregate.update, aggregate.means, aggregate.sums), metrics

        return jax.lax.map(alone, jax.tree.map(lambda leaf: leaf[:, None], payloads))

    clipped, metrics = clipped_one_by_one(payloads)
    clipped = _joint_rows(clipped)
    original = _joint_rows(payloads)
    norms = np.linalg.norm(clipped, axis=1)
    original_norms = np.linalg.norm(original, axis=1)
    # float32 rounding of the scaled coordinates is the only slack.
    assert np.all(norms <= clip_norm * (1 + 1e-6))
    inside = original_norms <= clip_norm
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(clipped[inside], original[inside])  # untouched, bit for bit
    np.testing.assert_allclose(norms[~inside], clip_norm, rtol=1e-6)
    # One factor for the whole message: (update, means, sums) scaled alike, never rotated.
    expected = original * np.minimum(1.0, clip_norm / original_norms)[:, None]
    np.testing.assert_allclose(clipped, expected, rtol=1e-5, atol=1e-7 * clip_norm)
    np.testing.assert_array_equal(metrics["dp_num_clipped"], (~inside).astype(np.float32))


@pytest.mark.parametrize("weight_cap", [None, 2.0])
def test_side_channel_means_use_the_fixed_denominator_and_sums_do_not(weight_cap):
    """Float64 reference: clip the joint row, weigh update and means (1, or
    min(w / cap, 1)), sum over the clients that count; update and means over
    the fixed denominator, sums as they are."""
    num_clients, clip_norm, denominator = 7, 2.0, 9.0
    payloads = harness.side_channel_payloads(num_clients, seed=3)
    weights = np.array([1.0, 3.0, 0.0, 1.5, 4.0, 0.5, 2.0], np.float32)  # client 2: padding
    kwargs = {"expected_total_weight": denominator}
    if weight_cap is not None:
        kwargs["weight_cap"] = weight_cap
    aggregator = dp_fed_avg_aggregator(clip_norm, 0.0, expected_cohort_size=denominator, **kwargs)
    aggregate, state, metrics = jax.jit(aggregate_clients, static_argnums=0)(
        aggregator, payloads, weights, aggregator.init(None), jax.random.key(0)
    )

    rows = _joint_rows(payloads)
    norms = np.linalg.norm(rows, axis=1)
    clipped = rows * np.minimum(1.0, clip_norm / norms)[:, None]
    present = weights > 0
    assert np.sum(norms[present] > clip_norm) >= 2  # the clip bites
    if weight_cap is None:
        dp_weights = present.astype(np.float64)
    else:
        dp_weights = np.minimum(weights / weight_cap, 1.0)
    update_part, means_part, sums_part = _parts(payloads)
    expected = np.empty(rows.shape[1])
    weighted = (dp_weights[:, None] * clipped).sum(axis=0) / denominator
    expected[update_part] = weighted[update_part]
    expected[means_part] = weighted[means_part]
    expected[sums_part] = clipped[present][:, sums_part].sum(axis=0)
    np.testing.assert_allclose(_message(aggregate), expected, rtol=1e-5, atol=1e-6)
    assert float(aggregate.weight) == denominator
    assert float(metrics["dp_num_clients"]) == present.sum()
    assert float(metrics["dp_num_clipped"]) == np.sum(norms[present] > clip_norm)
    assert float(metrics["num_nonfinite_updates"]) == 0
    assert int(state.round) == 1


def test_zero_noise_and_infinite_clip_norm_is_fed_avg_bit_for_bit(logreg_loss, logreg_params):
    cohorts = [harness.cohort(round_index, weighting="uniform") for round_index in range(2)]
    client_optimizer = optax.sgd(harness.CLIENT_LEARNING_RATE)
    plain, _, _ = run_rounds(
        fed_avg(logreg_loss, client_optimizer),
        logreg_params,
        cohorts,
        num_total_clients=harness.NUM_TOTAL_CLIENTS,
    )
    algorithm = dp_fed_avg(
        logreg_loss,
        client_optimizer,
        clip_norm=math.inf,
        noise_multiplier=0.0,
        expected_cohort_size=len(harness.CLIENT_IDS),
    )
    private, (_, out), _ = run_rounds(
        algorithm, logreg_params, cohorts, num_total_clients=harness.NUM_TOTAL_CLIENTS
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
def test_noise_on_update_means_and_sums_has_the_calibrated_stddev(noise_cohort_size):
    """Noise of stddev z C (scaled for noise_cohort_size) on the whole summed
    message; update and means are then divided by the denominator, sums not."""
    clip_norm, noise_multiplier, cohort_size = 0.7, 1.3, 10
    zeros = ClientPayload(
        update={"a": np.zeros((2, 300, 200), np.float32)},
        means={"m": np.zeros((2, 40_000), np.float32)},
        sums={"s": np.zeros((2, 60_000), np.float32)},
    )
    aggregator = dp_fed_avg_aggregator(
        clip_norm, noise_multiplier, cohort_size, noise_cohort_size=noise_cohort_size
    )
    aggregate, _, metrics = jax.jit(aggregate_clients, static_argnums=0)(
        aggregator, zeros, np.ones(2, np.float32), aggregator.init(None), jax.random.key(3)
    )
    calibration = cohort_size if noise_cohort_size is None else noise_cohort_size
    on_sum = noise_multiplier * clip_norm * cohort_size / calibration
    _assert_standard_normal(harness.flat(aggregate.update) * cohort_size / on_sum, "update")
    _assert_standard_normal(harness.flat(aggregate.means) * cohort_size / on_sum, "means")
    _assert_standard_normal(harness.flat(aggregate.sums) / on_sum, "sums")
    np.testing.assert_allclose(float(metrics["dp_noise_stddev_on_sum"]), on_sum, rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["dp_noise_stddev_on_mean"]), on_sum / cohort_size, rtol=1e-6
    )
    if noise_cohort_size is None:
        assert "dp_noise_cohort_size" not in metrics
    else:
        assert float(metrics["dp_noise_cohort_size"]) == noise_cohort_size
        assert float(metrics["dp_simulated_cohort_size"]) == cohort_size


def _norm_spread_updates(num_clients, seed):
    """Updates of five coordinates whose norms are lognormal."""
    rng = np.random.default_rng(seed)
    norms = rng.lognormal(mean=0.0, sigma=1.0, size=num_clients).astype(np.float32)
    directions = rng.normal(size=(num_clients, 5))
    updates = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
    return ClientPayload(update=updates.astype(np.float32)), norms


def test_adaptive_clipping_update_rule_and_quantile_tracking():
    """One step is Andrew et al.'s geometric rule; many steps find the quantile (no noise)."""
    num_clients, target = 200, 0.3
    payloads, norms = _norm_spread_updates(num_clients, seed=7)
    weights = np.ones(num_clients, np.float32)
    config = AdaptiveClipping(target_quantile=target, learning_rate=0.2, clipped_count_stddev=0.0)
    aggregator = dp_fed_avg_aggregator(1.0, 0.0, num_clients, adaptive_clipping=config)

    @jax.jit
    def one_round(state, rng):
        _, state, metrics = aggregate_clients(aggregator, payloads, weights, state, rng)
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


def test_adaptive_clipping_with_noise_splits_the_budget():
    """Andrew et al. 2021 with noise (issue 13, defect 5a), over 20,000 seeded rounds.

    The noise on the summed message has stddev z_delta C with z_delta =
    (z^-2 - (2 sigma_b)^-2)^(-1/2) (the closed form, computed here), and the
    unclipped-fraction estimate is the true fraction plus noise of stddev
    sigma_b / m, m the expected cohort size; the next clip norm follows the
    geometric rule from that estimate.
    """
    num_clients, clip_norm, z, sigma_b, target, learning_rate = 20, 1.0, 1.0, 0.75, 0.5, 0.2
    expected_cohort_size = 16.0  # m: the denominator of the estimate, not the realised 20
    num_rounds = 20_000
    payloads, _ = _norm_spread_updates(num_clients, seed=11)
    payloads = payloads._replace(
        means={"step_norm": np.linspace(0.1, 0.3, num_clients, dtype=np.float32)},
        sums={"control_delta": np.full((num_clients, 2), 0.05, np.float32)},
    )
    weights = np.ones(num_clients, np.float32)
    config = AdaptiveClipping(target, learning_rate, clipped_count_stddev=sigma_b)
    aggregator = dp_fed_avg_aggregator(clip_norm, z, expected_cohort_size, adaptive_clipping=config)
    state = aggregator.init(None)

    @jax.jit
    def many_rounds(keys):
        def one(key):
            aggregate, new_state, metrics = aggregate_clients(
                aggregator, payloads, weights, state, key
            )
            message = ClientPayload(aggregate.update, aggregate.means, aggregate.sums)
            return message, new_state.clip_norm, metrics

        return jax.lax.map(one, keys, batch_size=2000)

    keys = jax.random.split(jax.random.key(2021), num_rounds)
    messages, next_clip_norms, metrics = many_rounds(keys)

    # The noiseless aggregate, in float64: joint clipping, update and means over m.
    rows = _joint_rows(payloads)
    row_norms = np.linalg.norm(rows, axis=1)
    clipped_sum = (rows * np.minimum(1.0, clip_norm / row_norms)[:, None]).sum(axis=0)
    update_part, means_part, _ = _parts(payloads)
    noisy_sums = harness.flat_rows(messages)
    noisy_sums[:, update_part] *= expected_cohort_size
    noisy_sums[:, means_part] *= expected_cohort_size
    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert z_delta > 1.3 * z  # the split is visible at this sample size
    _assert_standard_normal((noisy_sums - clipped_sum) / (z_delta * clip_norm), "update noise")
    np.testing.assert_allclose(
        np.asarray(metrics["dp_noise_stddev_on_sum"]), z_delta * clip_norm, rtol=1e-6
    )

    # Andrew et al.: b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2, b_k on the joint norm.
    assert 0.2 < np.mean(row_norms <= clip_norm) < 0.8
    noiseless = np.sum((row_norms <= clip_norm) - 0.5) / expected_cohort_size + 0.5
    estimates = np.asarray(metrics["dp_unclipped_fraction_estimate"], np.float64)
    _assert_standard_normal(
        (estimates - noiseless) / (sigma_b / expected_cohort_size), "count noise"
    )
    np.testing.assert_allclose(
        np.asarray(next_clip_norms, np.float64),
        clip_norm * np.exp(-learning_rate * (estimates - target)),
        rtol=1e-6,
    )


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
    payloads = ClientPayload(update={"w": np.zeros((2, 3), np.float32)})

    @jax.jit
    def one_round(state, rng):
        _, state, metrics = aggregate_clients(aggregator, payloads, np.ones(2), state, rng)
        return state, metrics

    state = aggregator.init(None)
    reported = []
    for round_index in range(4):
        state, metrics = one_round(state, jax.random.key(round_index))
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
        ({"clip_norm": math.inf, "noise_multiplier": 0.5}, "clip_norm"),  # noise z * inf
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
    with pytest.raises(InvalidArgument, match=parameter) as raised:
        dp_fed_avg_aggregator(**arguments)
    assert raised.value.name.rsplit(".", 1)[-1] == parameter  # what the runner maps to a key


def test_clip_by_global_norm_leaves_zero_update_alone():
    clipped, norm = clip_by_global_norm({"w": jnp.zeros((4,))}, 1.0)
    np.testing.assert_array_equal(clipped["w"], np.zeros(4))
    assert float(norm) == 0.0
