"""Secure aggregation: exact unmasking with and without dropouts, uniform masked inputs,
the side channel masked and decoded with the update, and the encoding error against
float aggregation (a float64 reference, its one-level bound and its closed-form mean square)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjaxsim.core.aggregators import ClientPayload, aggregate_clients
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.privacy import mask_inputs, quantize_to_fixed_point, secure_aggregator, unmask_sum
from fedjaxsim.privacy.secure_aggregation import quantization_scale
from tests.privacy import harness

NUM_CLIENTS = 7


def _quantized_rows(quantization_bits, seed=0):
    """NumPy-drawn signed fixed-point updates: two leaves, [NUM_CLIENTS, ...]."""
    rng = np.random.default_rng(seed)
    limit = 2 ** (quantization_bits - 1) - 1
    return {
        "kernel": rng.integers(-limit, limit + 1, size=(NUM_CLIENTS, 6, 5), dtype=np.int64).astype(
            np.int32
        ),
        "bias": rng.integers(-limit, limit + 1, size=(NUM_CLIENTS, 5), dtype=np.int64).astype(
            np.int32
        ),
    }


@functools.partial(jax.jit, static_argnums=4)
def _protocol(quantized, participants, survivors, round_key, modulus_bits):
    masked = mask_inputs(quantized, participants, round_key, modulus_bits)
    return masked, unmask_sum(masked, participants, survivors, round_key, modulus_bits)


@pytest.mark.parametrize("modulus_bits, quantization_bits", [(32, 16), (20, 12)])
@pytest.mark.parametrize("dropped", [(), (1, 4)])
def test_unmasked_sum_equals_plaintext_sum_exactly(modulus_bits, quantization_bits, dropped):
    quantized = _quantized_rows(quantization_bits)
    participants = np.ones(NUM_CLIENTS, bool)
    participants[-1] = False  # a padding client: never joined
    survivors = participants.copy()
    survivors[list(dropped)] = False
    masked, total = _protocol(quantized, participants, survivors, jax.random.key(11), modulus_bits)
    for name, rows in quantized.items():
        expected = rows.astype(np.int64)[survivors].sum(axis=0)
        np.testing.assert_array_equal(np.asarray(total[name], np.int64), expected)
        sent = np.asarray(masked[name])
        assert np.all(sent[participants] < 2**modulus_bits)
        np.testing.assert_array_equal(sent[~participants], 0)
        # The masks are really there: no participant's input travels in the clear.
        in_clear = rows.astype(np.int64) % 2**modulus_bits
        assert np.mean(sent[participants] == in_clear[participants]) < 0.01


@pytest.mark.parametrize("modulus_bits", [8, 32])
def test_a_single_masked_input_is_indistinguishable_from_uniform(modulus_bits):
    """Even an all-zero update looks uniform on [0, 2^b) once masked."""
    size = 40_000
    quantized = {"w": jnp.zeros((4, size), jnp.int32)}
    masked = jax.jit(mask_inputs, static_argnums=3)(
        quantized, jnp.ones(4, bool), jax.random.key(5), modulus_bits
    )
    values = np.asarray(masked["w"][2], np.float64)  # one client's message
    if modulus_bits == 8:
        counts = np.bincount(values.astype(np.int64), minlength=256)
        p_value = stats.chisquare(counts).pvalue
    else:
        p_value = stats.kstest(values / 2.0**32, "uniform").pvalue
    assert p_value > 1e-4


def test_fixed_point_quantization_is_unbiased():
    clip_norm, bits, draws = 1.0, 4, 20_000
    x = jnp.asarray(np.linspace(-1.0, 1.0, 33), jnp.float32)
    keys = jax.random.split(jax.random.key(0), draws)
    quantized = jax.jit(jax.vmap(lambda key: quantize_to_fixed_point(x, clip_norm, bits, key)))(
        keys
    )
    scale = quantization_scale(clip_norm, bits)
    mean = np.asarray(quantized, np.float64).mean(axis=0) / scale
    # Each draw is off by less than one level: standard deviation <= 1 / (2 scale).
    assert np.all(np.abs(mean - np.asarray(x, np.float64)) <= 5 * 0.5 / scale / np.sqrt(draws))
    assert np.abs(np.asarray(quantized)).max() <= 2 ** (bits - 1) - 1


def test_secure_round_through_the_engine_is_the_survivors_clipped_mean(logreg_loss, logreg_params):
    """With dropouts, the round's delta is the clipped mean of exactly one subset
    of survivors, to within one quantization level (masked equals unmasked
    bit for bit: the side-channel test below)."""
    cohort = harness.cohort()
    clip_norm, bits = 1.0, 12
    aggregator = secure_aggregator(
        clip_norm, quantization_bits=bits, modulus_bits=32, dropout_rate=0.3, threshold_fraction=0.0
    )
    state, out = harness.run_round(logreg_loss, logreg_params, aggregator, cohort)
    metrics = out.server_metrics
    assert float(metrics["secagg_num_participants"]) == len(harness.CLIENT_IDS)
    num_survivors = int(metrics["secagg_num_survivors"])
    assert 0 < num_survivors < len(harness.CLIENT_IDS)  # this seed drops someone
    assert float(metrics["secagg_num_dropped"]) == len(harness.CLIENT_IDS) - num_survivors
    assert float(metrics["secagg_aborted"]) == 0
    num_params = harness.flat(logreg_params).size
    assert float(metrics["secagg_bits_per_client"]) == 32 * num_params

    updates, _ = harness.client_updates(logreg_loss, logreg_params, cohort)
    rows = harness.flat_rows(updates)
    clipped = rows * np.minimum(1.0, clip_norm / np.linalg.norm(rows, axis=1))[:, None]
    delta = harness.flat(logreg_params) - harness.flat(state.params)
    level = 1.0 / quantization_scale(clip_norm, bits)
    matches = [
        subset
        for subset in itertools.combinations(range(len(rows)), num_survivors)
        if np.abs(delta - clipped[list(subset)].mean(axis=0)).max() <= level
    ]
    assert len(matches) == 1
    # The encoding error of that round: its distance to the float mean, within one level.
    error = np.linalg.norm(delta - clipped[list(matches[0])].mean(axis=0))
    np.testing.assert_allclose(float(metrics["secagg_encoding_error"]), error, rtol=1e-3)
    assert 0 < error <= np.sqrt(num_params) * level


# 1 - 2^-15 with 16 quantization bits: exactly 2^15 levels per unit, so that
# multiples of 2^-15 quantize without rounding.
EXACT_CLIP_NORM, EXACT_BITS = 1.0 - 2.0**-15, 16


def test_too_few_survivors_abort_the_round():
    # Masking is verified above; the abort rule does not depend on it.
    aggregator = secure_aggregator(
        EXACT_CLIP_NORM,
        quantization_bits=EXACT_BITS,
        dropout_rate=0.5,
        threshold_fraction=0.5,  # at least 4 of the 7 must survive
        masking=False,
    )
    value = 3 * 2.0**-15
    payloads = ClientPayload(update={"w": np.full((NUM_CLIENTS, 3), value, np.float32)})
    run = jax.jit(
        lambda rng: aggregate_clients(
            aggregator, payloads, np.ones(NUM_CLIENTS, np.float32), aggregator.init(None), rng
        )
    )
    aborted_rounds = 0
    for seed in range(6):
        aggregate, _, metrics = run(jax.random.key(seed))
        survivors = int(metrics["secagg_num_survivors"])
        aborted = survivors < 4
        assert float(metrics["secagg_aborted"]) == aborted
        if aborted:
            aborted_rounds += 1
            np.testing.assert_array_equal(np.asarray(aggregate.update["w"]), 0.0)
            assert float(aggregate.weight) == 0.0
        else:
            np.testing.assert_array_equal(np.asarray(aggregate.update["w"]), value)
            assert float(aggregate.weight) == survivors
        # Exact values, or an abort that float aggregation shares: no encoding error
        # (up to float32 rounding of the mean, far below one level, 2^-15).
        assert float(metrics["secagg_encoding_error"]) <= 1e-9
        assert float(metrics["secagg_encoding_relative_error"]) <= 1e-6
        if aborted:
            assert float(metrics["secagg_encoding_error"]) == 0.0
    assert 0 < aborted_rounds < 6  # these seeds give both outcomes


def test_a_sum_that_could_overflow_the_modulus_is_rejected():
    aggregator = secure_aggregator(1.0, quantization_bits=16, modulus_bits=16)
    payloads = ClientPayload(update={"w": np.zeros((NUM_CLIENTS, 3), np.float32)})
    with pytest.raises(ValueError, match="modulus_bits"):
        jax.eval_shape(
            lambda: aggregate_clients(
                aggregator, payloads, np.ones(NUM_CLIENTS), aggregator.init(None), jax.random.key(0)
            )
        )


def _subsets_within(aggregate, clipped, parts, num_survivors, level):
    """The subsets of ``num_survivors`` clients whose clipped rows the decoded
    aggregate matches: update and means as their mean, sums as their sum,
    within one quantization level per client."""
    update_and_means, sums = parts
    got = harness.flat(ClientPayload(aggregate.update, aggregate.means, aggregate.sums))
    matches = []
    for subset in itertools.combinations(range(len(clipped)), num_survivors):
        rows = clipped[list(subset)]
        mean_error = np.abs(got[update_and_means] - rows[:, update_and_means].mean(axis=0))
        sum_error = np.abs(got[sums] - rows[:, sums].sum(axis=0))
        if mean_error.max() <= level and sum_error.max() <= num_survivors * level:
            matches.append(subset)
    return matches


@pytest.fixture(scope="module")
def side_channel_rounds():
    """Secure aggregation (dropout rate 0.4) of payloads with side means and sums,
    masked and in the clear, for three seeds; seven clients, one of weight 0."""
    payloads = harness.side_channel_payloads(NUM_CLIENTS, seed=5, scale=0.2)
    weights = np.array([1.0, 2.0, 1.0, 0.0, 5.0, 1.0, 0.5], np.float32)

    def rounds(masking):
        aggregator = secure_aggregator(
            1.0, quantization_bits=12, dropout_rate=0.4, threshold_fraction=0.0, masking=masking
        )
        run = jax.jit(
            lambda rng: aggregate_clients(aggregator, payloads, weights, aggregator.init(None), rng)
        )
        return [run(jax.random.key(seed)) for seed in range(3)]

    return payloads, weights, {True: rounds(True), False: rounds(False)}


def test_masked_side_channel_decodes_to_the_unmasked_one_bit_for_bit(side_channel_rounds):
    _, _, rounds = side_channel_rounds
    for masked, clear in zip(rounds[True], rounds[False]):
        (masked_aggregate, _, masked_metrics), (clear_aggregate, _, clear_metrics) = masked, clear
        for part in ("update", "means", "sums"):
            got, want = getattr(masked_aggregate, part), getattr(clear_aggregate, part)
            assert jax.tree.structure(got) == jax.tree.structure(want)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert float(masked_aggregate.weight) == float(clear_aggregate.weight)
        for key in masked_metrics:
            np.testing.assert_array_equal(masked_metrics[key], clear_metrics[key])
    assert max(float(metrics["secagg_num_dropped"]) for _, _, metrics in rounds[True]) > 0


def test_side_channel_is_clipped_with_the_update_and_decoded_as_means_and_sums(
    side_channel_rounds,
):
    """Float64 reference: one clip factor for the joint row; update and means
    the survivors' uniform mean, sums their plain sum. The survivors are not
    reported, so exactly one subset of that size must match."""
    payloads, weights, rounds = side_channel_rounds
    present = weights > 0
    rows = harness.flat_rows(payloads)[present]
    norms = np.linalg.norm(rows, axis=1)
    assert np.sum(norms > 1.0) >= 2  # the clip bites
    clipped = rows * np.minimum(1.0, 1.0 / norms)[:, None]
    sizes = [sum(leaf[0].size for leaf in jax.tree.leaves(part)) for part in payloads]
    parts = (np.arange(sizes[0] + sizes[1]), np.arange(sizes[0] + sizes[1], sum(sizes)))
    level = 1.0 / quantization_scale(1.0, 12)
    for aggregate, _, metrics in rounds[True]:
        num_survivors = int(metrics["secagg_num_survivors"])
        assert len(_subsets_within(aggregate, clipped, parts, num_survivors, level)) == 1
        assert float(aggregate.weight) == num_survivors
        assert float(metrics["secagg_num_participants"]) == present.sum()
        # The joint message travels masked: 32 bits per value of update, means and sums.
        assert float(metrics["secagg_bits_per_client"]) == 32 * sum(sizes)


def test_encoding_error_is_the_distance_to_float_aggregation_of_the_survivors(
    side_channel_rounds,
):
    """Float64 reference: the decoded update against the float mean of the same
    survivors' clipped (jointly with the side channel), unquantized updates; the
    bound of one level per coordinate, ``sqrt(d) / scale``, holds."""
    payloads, weights, rounds = side_channel_rounds
    rows = harness.flat_rows(payloads)[weights > 0]
    clipped = rows * np.minimum(1.0, 1.0 / np.linalg.norm(rows, axis=1))[:, None]
    sizes = [sum(leaf[0].size for leaf in jax.tree.leaves(part)) for part in payloads]
    parts = (np.arange(sizes[0] + sizes[1]), np.arange(sizes[0] + sizes[1], sum(sizes)))
    level = 1.0 / quantization_scale(1.0, 12)
    for aggregate, _, metrics in rounds[True]:
        num_survivors = int(metrics["secagg_num_survivors"])
        (subset,) = _subsets_within(aggregate, clipped, parts, num_survivors, level)
        float_mean = clipped[list(subset), : sizes[0]].mean(axis=0)
        error = np.linalg.norm(harness.flat(aggregate.update) - float_mean)
        np.testing.assert_allclose(float(metrics["secagg_encoding_error"]), error, rtol=1e-4)
        np.testing.assert_allclose(
            float(metrics["secagg_encoding_relative_error"]),
            error / np.linalg.norm(float_mean),
            rtol=1e-4,
        )
        assert 0 < error <= np.sqrt(sizes[0]) * level


def test_mean_square_encoding_error_matches_stochastic_rounding():
    """Over many rounds, the mean of ``secagg_encoding_error^2`` against its closed
    form: coordinate j of the mean is off by ``sum_i (B_ij - p_ij) / (n scale)``
    with independent ``B_ij ~ Bernoulli(p_ij)``, ``p_ij`` the fractional part of
    ``x_ij scale``; its variance and that of its square (from the fourth
    cumulants) give the expectation and a 5-sigma band for the sample mean."""
    num_clients, size, bits, draws = 5, 40, 6, 2000
    rows = np.random.default_rng(2).uniform(-0.15, 0.15, size=(num_clients, size))
    assert np.all(np.linalg.norm(rows, axis=1) < 1.0)  # no clipping: x_ij as sent
    payloads = ClientPayload(update={"w": rows.astype(np.float32)})
    aggregator = secure_aggregator(1.0, quantization_bits=bits, masking=False)

    def encoding_error(rng):
        _, _, metrics = aggregate_clients(
            aggregator, payloads, np.ones(num_clients, np.float32), aggregator.init(None), rng
        )
        return metrics["secagg_encoding_error"]

    keys = jax.random.split(jax.random.key(4), draws)
    squared = np.asarray(jax.jit(jax.vmap(encoding_error))(keys), np.float64) ** 2

    scaled = np.asarray(rows.astype(np.float32), np.float64) * quantization_scale(1.0, bits)
    p = scaled - np.floor(scaled)
    variance = p * (1 - p)  # of each B_ij
    fourth_cumulant = variance * (1 - 6 * variance)
    column_variance = variance.sum(axis=0)  # E[S_j^2], S_j = sum_i (B_ij - p_ij)
    column_square_variance = fourth_cumulant.sum(axis=0) + 2 * column_variance**2  # Var[S_j^2]
    denominator = (num_clients * quantization_scale(1.0, bits)) ** 2
    expected = column_variance.sum() / denominator
    standard_error = np.sqrt(column_square_variance.sum() / denominator**2 / draws)
    assert abs(squared.mean() - expected) <= 5 * standard_error


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": float("inf")}, "clip_norm"),
        ({"quantization_bits": 1}, "quantization_bits"),
        ({"quantization_bits": 32}, "quantization_bits"),
        ({"modulus_bits": 33}, "modulus_bits"),
        ({"modulus_bits": 1}, "modulus_bits"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"threshold_fraction": -0.1}, "threshold_fraction"),
    ],
)
def test_bad_secure_aggregation_arguments_name_the_parameter(kwargs, parameter):
    arguments = {"clip_norm": 1.0}
    arguments.update(kwargs)
    with pytest.raises(InvalidArgument, match=parameter) as raised:
        secure_aggregator(**arguments)
    assert raised.value.name.rsplit(".", 1)[-1] == parameter  # what the runner maps to a key
