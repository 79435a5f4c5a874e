"""Secure aggregation: exact unmasking with and without dropouts, uniform masked inputs."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

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


def test_secure_round_equals_the_plaintext_quantized_mean(logreg_loss, logreg_params):
    """Masking changes nothing, with dropouts too; the result is the survivors'
    clipped mean up to one quantization level."""
    cohort = harness.cohort()
    clip_norm, bits = 1.0, 12
    common = {
        "quantization_bits": bits,
        "modulus_bits": 32,
        "dropout_rate": 0.3,
        "threshold_fraction": 0.0,
    }
    masked_state, masked_out = harness.run_round(
        logreg_loss, logreg_params, secure_aggregator(clip_norm, **common), cohort
    )
    plain_state, _ = harness.run_round(
        logreg_loss, logreg_params, secure_aggregator(clip_norm, masking=False, **common), cohort
    )
    for got, want in zip(jax.tree.leaves(masked_state.params), jax.tree.leaves(plain_state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    metrics = masked_out.server_metrics
    assert float(metrics["secagg_num_participants"]) == len(harness.CLIENT_IDS)
    num_survivors = int(metrics["secagg_num_survivors"])
    assert 0 < num_survivors < len(harness.CLIENT_IDS)  # this seed drops someone
    assert float(metrics["secagg_num_dropped"]) == len(harness.CLIENT_IDS) - num_survivors
    assert float(metrics["secagg_aborted"]) == 0
    num_params = harness.flat(logreg_params).size
    assert float(metrics["secagg_bits_per_client"]) == 32 * num_params

    # Against float64: the survivors are not reported, so the aggregate must be
    # the clipped mean of some subset of that size, to within one quantization level.
    updates, _ = harness.client_updates(logreg_loss, logreg_params, cohort)
    rows = harness.flat_rows(updates)
    clipped = rows * np.minimum(1.0, clip_norm / np.linalg.norm(rows, axis=1))[:, None]
    delta = harness.flat(logreg_params) - harness.flat(masked_state.params)
    errors = [
        np.abs(delta - clipped[list(subset)].mean(axis=0)).max()
        for subset in itertools.combinations(range(len(rows)), num_survivors)
    ]
    assert min(errors) <= 1.0 / quantization_scale(clip_norm, bits)
    assert sorted(errors)[1] > 1.0 / quantization_scale(clip_norm, bits)  # and only one


def test_too_few_survivors_abort_the_round():
    # Masking is verified above; the abort rule does not depend on it.
    aggregator = secure_aggregator(1.0, dropout_rate=0.5, threshold_fraction=0.9, masking=False)
    reduced = {
        "quantized": {"w": jnp.ones((NUM_CLIENTS, 3), jnp.int32)},
        "participant": jnp.ones(NUM_CLIENTS, bool),
        "nonfinite": jnp.zeros(NUM_CLIENTS, bool),
    }
    finalize = jax.jit(aggregator.finalize)
    aborted_rounds = 0
    for seed in range(6):
        aggregate, _, metrics = finalize(reduced, aggregator.init(None), jax.random.key(seed))
        survivors = int(metrics["secagg_num_survivors"])
        aborted = survivors < int(np.floor(0.9 * NUM_CLIENTS)) + 1
        assert float(metrics["secagg_aborted"]) == aborted
        if aborted:
            aborted_rounds += 1
            np.testing.assert_array_equal(np.asarray(aggregate["w"]), 0.0)
        else:
            np.testing.assert_allclose(
                np.asarray(aggregate["w"]), 1.0 / quantization_scale(1.0, 16)
            )
    assert aborted_rounds > 0


def test_a_sum_that_could_overflow_the_modulus_is_rejected():
    aggregator = secure_aggregator(1.0, quantization_bits=16, modulus_bits=16)
    reduced = {
        "quantized": {"w": jnp.zeros((NUM_CLIENTS, 3), jnp.int32)},
        "participant": jnp.ones(NUM_CLIENTS, bool),
        "nonfinite": jnp.zeros(NUM_CLIENTS, bool),
    }
    with pytest.raises(ValueError, match="modulus_bits"):
        aggregator.finalize(reduced, aggregator.init(None), jax.random.key(0))


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
    with pytest.raises(ValueError, match=parameter):
        secure_aggregator(**arguments)
