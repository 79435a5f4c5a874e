"""Compression: unbiased quantization, an orthogonal rotation, exact error feedback."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard

from fedjaxsim.compression import (
    ErrorFeedbackClientState,
    dequantize,
    fast_walsh_hadamard,
    initial_error_feedback_state,
    padded_size,
    quantize_roundtrip,
    quantized_mean,
    rotate,
    stochastic_quantize,
    top_k_compressor,
    unrotate,
    with_error_feedback,
)
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from tests.privacy import harness

DRAWS = 4000


@pytest.mark.parametrize("num_bits, rotation", [(1, False), (3, True)])
def test_quantization_is_unbiased(num_bits, rotation):
    x = jnp.asarray(np.random.default_rng(0).normal(size=100), jnp.float32)
    keys = jax.random.split(jax.random.key(1), DRAWS)
    decoded, bits = jax.jit(jax.vmap(lambda key: quantize_roundtrip(x, num_bits, rotation, key)))(
        keys
    )
    mean = np.asarray(decoded, np.float64).mean(axis=0)
    # One draw is off by at most one level, (max - min) / (2^b - 1) <= 2 ||x|| / (2^b - 1)
    # (after a rotation too, which preserves the norm): per-coordinate std <= half of that.
    level = 2 * float(np.linalg.norm(x)) / (2**num_bits - 1)
    bound = 5 * (level / 2) / math.sqrt(DRAWS)
    assert np.all(np.abs(mean - np.asarray(x, np.float64)) < bound)
    size = padded_size(100) if rotation else 100
    assert int(bits[0]) == size * num_bits + 64


def test_quantization_levels_and_constant_vectors():
    x = jnp.asarray([0.0, 0.25, 1.0, 0.5], jnp.float32)
    quantized = jax.jit(stochastic_quantize, static_argnums=1)(x, 2, jax.random.key(0))
    assert float(quantized.minimum) == 0.0 and float(quantized.maximum) == 1.0
    np.testing.assert_array_equal(
        np.asarray(quantized.levels)[[0, 2]], [0, 3]
    )  # the range ends are exact
    assert np.all((np.asarray(quantized.levels) >= 0) & (np.asarray(quantized.levels) <= 3))
    constant = jnp.full((5,), 2.5, jnp.float32)
    roundtrip = jax.jit(lambda v: dequantize(stochastic_quantize(v, 1, jax.random.key(0)), 1))
    np.testing.assert_array_equal(roundtrip(constant), constant)


def test_rotation_is_orthogonal_and_inverted_exactly():
    n = 64
    basis = jnp.eye(n, dtype=jnp.float32)
    transform = np.asarray(jax.jit(jax.vmap(fast_walsh_hadamard))(basis), np.float64)
    np.testing.assert_allclose(transform, hadamard(n) / math.sqrt(n), atol=1e-7)
    key = jax.random.key(3)
    rotation = np.asarray(jax.jit(jax.vmap(lambda e: rotate(e, key)))(basis), np.float64).T  # R e_i
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(n), atol=1e-6)
    x = jnp.asarray(np.random.default_rng(1).normal(size=100), jnp.float32)  # not a power of two
    rotated, restored = jax.jit(lambda x: (rotate(x, key), unrotate(rotate(x, key), key, 100)))(x)
    assert rotated.shape == (128,)
    np.testing.assert_allclose(np.linalg.norm(rotated), np.linalg.norm(x), rtol=1e-6)
    np.testing.assert_allclose(restored, x, atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two"):
        fast_walsh_hadamard(jnp.zeros(12))


def _data_vector_algorithm(dimension):
    """A toy algorithm whose update is exactly the client's single example ``x``."""

    def client_step(local, batch, mask, rng):
        del rng
        x = jnp.sum(jnp.where(mask[:, None], batch["x"], 0.0), axis=0)
        return local + x, {
            "loss_sum": jnp.zeros(()),
            "num_examples": jnp.sum(mask, dtype=jnp.float32),
        }

    def server_update(state, reduced, rng):
        del rng
        return state - reduced["weighted_update"] / reduced["weight"], {}

    return Algorithm(
        init=lambda params: params,
        broadcast=lambda state: state,
        client_init=lambda broadcast, client_state, rng: jnp.zeros((dimension,), jnp.float32),
        client_step=client_step,
        client_finalize=lambda broadcast, local: ClientOutput(update=local),
        client_contribution=lambda state, output, weight, rng: {
            "weighted_update": weight * output.update,
            "weight": weight,
        },
        server_update=server_update,
    )


def test_error_feedback_carries_the_residual_exactly_into_the_next_round():
    dimension, k, num_total = 12, 3, 6
    algorithm = with_error_feedback(_data_vector_algorithm(dimension), top_k_compressor(k=k))
    round_fn = build_round(algorithm, ExecutionPlan())
    rng = np.random.default_rng(4)
    residuals = {i: np.zeros(dimension, np.float32) for i in range(num_total)}  # the host store
    server = jnp.zeros((dimension,), jnp.float32)
    for round_index, ids in enumerate([[0, 2, 5], [2, 3, 5], [0, 2, 4]]):
        updates = rng.normal(size=(len(ids), dimension)).astype(np.float32)
        clients = [{"x": updates[i : i + 1]} for i in range(len(ids))]
        cohort = pack_cohort(
            clients,
            ids,
            PackingConfig(batch_size=1, weighting="uniform"),
            seed=0,
            round_index=round_index,
            num_total_clients=num_total,
        )
        client_states = ErrorFeedbackClientState((), np.stack([residuals[i] for i in ids]))
        server, out = round_fn(server, cohort, jax.random.key(round_index), client_states)

        sent = []
        for row, client_id in enumerate(ids):
            corrected = updates[row] + residuals[client_id]  # float32, as in the round
            keep = np.argsort(-np.abs(corrected), kind="stable")[:k]
            compressed = np.zeros_like(corrected)
            compressed[keep] = corrected[keep]
            new_residual = np.asarray(out.client_states.residual[row])
            np.testing.assert_array_equal(new_residual, corrected - compressed)
            # Nothing is lost: what was sent plus what is kept is the corrected update.
            np.testing.assert_array_equal(compressed + new_residual, corrected)
            residuals[client_id] = new_residual
            sent.append(compressed)
        expected_bits = k * (32 + math.ceil(math.log2(dimension)))
        np.testing.assert_array_equal(out.client_metrics["bits_sent"], expected_bits)
        np.testing.assert_array_equal(out.client_metrics["uncompressed_bits"], 32 * dimension)
        if round_index == 0:
            expected_server = -np.mean(sent, axis=0)
        else:
            expected_server = expected_server - np.mean(sent, axis=0)
        np.testing.assert_allclose(np.asarray(server), expected_server, atol=1e-6)


def test_fed_avg_with_error_feedback_and_quantized_mean_run_in_the_engine(
    logreg_loss, logreg_params
):
    cohort = harness.cohort()
    updates, _ = harness.client_updates(logreg_loss, logreg_params, cohort)
    rows = harness.flat_rows(updates)

    # Top-k with error feedback on FedAvg: the first round's residual is the dropped part.
    algorithm = with_error_feedback(
        harness.fed_avg_with(logreg_loss, harness.stacked_updates_aggregator()),
        top_k_compressor(fraction=0.25),
    )
    initial = initial_error_feedback_state(logreg_params)
    client_states = jax.tree.map(lambda leaf: np.stack([leaf] * len(harness.CLIENT_IDS)), initial)
    _, out = build_round(algorithm, ExecutionPlan())(
        algorithm.init(logreg_params), cohort, jax.random.key(0), client_states
    )
    sent = harness.flat_rows(out.server_metrics["updates"])
    kept = harness.flat_rows(out.client_states.residual)
    np.testing.assert_allclose(sent + kept, rows, atol=1e-6)
    assert np.all(np.count_nonzero(sent, axis=1) == math.ceil(0.25 * rows.shape[1]))

    # Quantized mean: unbiased, so close to the plain mean at 8 bits; bits reported.
    state, out = harness.run_round(
        logreg_loss, logreg_params, quantized_mean(8, rotation=True), cohort
    )
    delta = harness.flat(logreg_params) - harness.flat(state.params)
    level = 2 * np.linalg.norm(rows, axis=1).max() / 255
    np.testing.assert_allclose(delta, rows.mean(axis=0), atol=level)
    size = padded_size(rows.shape[1])
    assert float(out.server_metrics["compression_bits_per_client"]) == 8 * size + 64
    assert (
        float(out.server_metrics["compression_uncompressed_bits_per_client"]) == 32 * rows.shape[1]
    )


def test_error_feedback_needs_its_client_states(logreg_loss, logreg_params):
    algorithm = with_error_feedback(
        harness.fed_avg_with(logreg_loss, harness.stacked_updates_aggregator()),
        top_k_compressor(k=2),
    )
    with pytest.raises(ValueError, match="initial_error_feedback_state"):
        build_round(algorithm, ExecutionPlan())(
            algorithm.init(logreg_params), harness.cohort(), jax.random.key(0)
        )


@pytest.mark.parametrize(
    "build, parameter",
    [
        (lambda: quantized_mean(0), "num_bits"),
        (lambda: quantized_mean(17), "num_bits"),
        (lambda: quantized_mean(2.5), "num_bits"),
        (lambda: stochastic_quantize(jnp.zeros(3), 32, jax.random.key(0)), "num_bits"),
        (lambda: top_k_compressor(k=0), "k"),
        (lambda: top_k_compressor(fraction=0.0), "fraction"),
        (lambda: top_k_compressor(fraction=1.5), "fraction"),
        (lambda: top_k_compressor(), "exactly one"),
    ],
)
def test_bad_compression_arguments_name_the_parameter(build, parameter):
    with pytest.raises(ValueError, match=parameter):
        build()
