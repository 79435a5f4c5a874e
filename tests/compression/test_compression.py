"""Compression: unbiased quantization, an orthogonal rotation, exact error feedback."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import hadamard

from fedjaxsim.compression import (
    dequantize,
    fast_walsh_hadamard,
    padded_size,
    quantize_roundtrip,
    quantized_mean,
    rotate,
    stochastic_quantize,
    top_k_compressor,
    unrotate,
    with_error_feedback,
)
from fedjaxsim.core.aggregators import ClientPayload, aggregate_clients
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.testing import client_store, run_rounds
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


class VectorState(NamedTuple):
    params: jax.Array  # float32[dimension]
    aggregator_state: tuple  # the weighted mean's (empty) state


def _data_vector_algorithm(dimension):
    """A toy algorithm whose update is exactly the client's single example ``x``.

    It also sends a side channel: ``means={"head": x[0]}``, ``sums={"pair": x[:2]}``;
    the server subtracts the aggregate update and reports the side channel.
    """

    def client_step(local, batch, mask, rng):
        del rng
        x = jnp.sum(jnp.where(mask[:, None], batch["x"], 0.0), axis=0)
        return local + x, {
            "loss_sum": jnp.zeros(()),
            "num_examples": jnp.sum(mask, dtype=jnp.float32),
        }

    def client_finalize(broadcast, local):
        del broadcast
        return ClientOutput(update=local, means={"head": local[0]}, sums={"pair": local[:2]})

    def server_update(state, aggregate, rng):
        del rng
        metrics = {"head": aggregate.means["head"], "pair": aggregate.sums["pair"]}
        return state._replace(params=state.params - aggregate.update), metrics

    return Algorithm(
        init=lambda params: VectorState(params, ()),
        broadcast=lambda state: state.params,
        client_init=lambda broadcast, client_state, rng: jnp.zeros((dimension,), jnp.float32),
        client_step=client_step,
        client_finalize=client_finalize,
        server_update=server_update,
    )


def test_error_feedback_carries_the_residual_exactly_into_the_next_round():
    """Float32 NumPy reference with a host dict of residuals; the library keeps
    them in a ClientStateStore across three rounds. Only the update is
    compressed: the side channel arrives as sent and costs 32 bits a value."""
    dimension, k, num_total = 12, 3, 6
    algorithm = with_error_feedback(_data_vector_algorithm(dimension), top_k_compressor(k=k))
    rng = np.random.default_rng(4)
    cohort_ids = [[0, 2, 5], [2, 3, 5], [0, 2, 4]]
    updates = [rng.normal(size=(len(ids), dimension)).astype(np.float32) for ids in cohort_ids]
    cohorts = [
        pack_cohort(
            [{"x": rows[i : i + 1]} for i in range(len(ids))],
            ids,
            PackingConfig(batch_size=1, weighting="uniform"),
            seed=0,
            round_index=round_index,
            num_total_clients=num_total,
        )
        for round_index, (ids, rows) in enumerate(zip(cohort_ids, updates))
    ]
    server, outputs, store = run_rounds(
        algorithm, jnp.zeros((dimension,), jnp.float32), cohorts, num_total_clients=num_total
    )

    residuals = {i: np.zeros(dimension, np.float32) for i in range(num_total)}  # the reference
    expected_server = np.zeros(dimension, np.float64)
    for ids, rows, out in zip(cohort_ids, updates, outputs):
        sent = []
        for row, client_id in enumerate(ids):
            corrected = rows[row] + residuals[client_id]  # float32, as in the round
            keep = np.argsort(-np.abs(corrected), kind="stable")[:k]
            compressed = np.zeros_like(corrected)
            compressed[keep] = corrected[keep]
            new_residual = np.asarray(out.client_states.residual[row])
            np.testing.assert_array_equal(new_residual, corrected - compressed)
            # Nothing is lost: what was sent plus what is kept is the corrected update.
            np.testing.assert_array_equal(compressed + new_residual, corrected)
            residuals[client_id] = corrected - compressed
            sent.append(compressed)
        side_bits = 32 * 3  # head and pair, uncompressed
        expected_bits = k * (32 + math.ceil(math.log2(dimension))) + side_bits
        np.testing.assert_array_equal(out.client_metrics["bits_sent"], expected_bits)
        np.testing.assert_array_equal(
            out.client_metrics["uncompressed_bits"], 32 * dimension + side_bits
        )
        # The side channel of the uncompressed updates: a mean and a sum.
        np.testing.assert_allclose(float(out.server_metrics["head"]), rows[:, 0].mean(), rtol=1e-6)
        np.testing.assert_allclose(out.server_metrics["pair"], rows[:, :2].sum(axis=0), rtol=1e-6)
        expected_server -= np.mean(sent, axis=0)
    np.testing.assert_allclose(np.asarray(server.params), expected_server, atol=1e-6)
    stored = store.gather(np.arange(num_total)).residual
    for client_id in range(num_total):
        np.testing.assert_array_equal(stored[client_id], residuals[client_id])


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
    store = client_store(algorithm, logreg_params, harness.NUM_TOTAL_CLIENTS)
    _, out = build_round(algorithm, ExecutionPlan())(
        algorithm.init(logreg_params), cohort, jax.random.key(0), store.gather(cohort.client_id)
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


@pytest.mark.parametrize("rotation", [False, True])
def test_quantized_mean_encodes_the_joint_message(rotation):
    """Update, means and sums are one quantized vector: one range, one bit
    count. Without rotation each decoded value is within one level of the
    client's own range; update and means are then weighted means, sums plain
    sums over the clients that count."""
    num_clients, num_bits = 6, 10
    payloads = harness.side_channel_payloads(num_clients, seed=8)
    weights = np.array([1.0, 0.0, 2.0, 0.5, 3.0, 1.0], np.float32)  # client 1: padding
    aggregator = quantized_mean(num_bits, rotation=rotation)
    aggregate, _, metrics = jax.jit(aggregate_clients, static_argnums=0)(
        aggregator, payloads, weights, aggregator.init(None), jax.random.key(2)
    )
    rows = harness.flat_rows(payloads)
    size = rows.shape[1]
    sent_size = padded_size(size) if rotation else size
    assert float(metrics["compression_bits_per_client"]) == num_bits * sent_size + 64
    assert float(metrics["compression_uncompressed_bits_per_client"]) == 32 * size
    np.testing.assert_allclose(float(metrics["total_weight"]), weights.sum(), rtol=1e-6)
    if rotation:
        return  # rounding errors are spread by the inverse rotation; unbiasedness is tested above
    present = weights > 0
    levels = (rows.max(axis=1) - rows.min(axis=1)) / (2**num_bits - 1)  # per client
    parts = np.cumsum([sum(leaf[0].size for leaf in jax.tree.leaves(part)) for part in payloads])
    got = harness.flat(ClientPayload(aggregate.update, aggregate.means, aggregate.sums))
    w = weights.astype(np.float64)
    weighted = (w[:, None] * rows).sum(axis=0) / w.sum()
    mean_bound = (w * levels).sum() / w.sum() * (1 + 1e-5)
    assert np.all(np.abs(got[: parts[1]] - weighted[: parts[1]]) <= mean_bound)
    sums = rows[present].sum(axis=0)
    sum_bound = levels[present].sum() * (1 + 1e-5)
    assert np.all(np.abs(got[parts[1] :] - sums[parts[1] :]) <= sum_bound)


def test_error_feedback_needs_its_client_states(logreg_loss, logreg_params):
    algorithm = with_error_feedback(
        harness.fed_avg_with(logreg_loss, harness.stacked_updates_aggregator()),
        top_k_compressor(k=2),
    )
    round_fn = build_round(algorithm, ExecutionPlan())
    state, cohort = algorithm.init(logreg_params), harness.cohort()
    with pytest.raises(ValueError, match="initial_client_state"):  # none: the engine says so
        round_fn(state, cohort, jax.random.key(0))
    with pytest.raises(ValueError, match="initial_error_feedback_state"):  # residuals alone
        residuals = jax.tree.map(
            lambda leaf: np.zeros((len(harness.CLIENT_IDS), *leaf.shape), np.float32),
            logreg_params,
        )
        round_fn(state, cohort, jax.random.key(0), residuals)


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
        (lambda: top_k_compressor(), "k"),  # "give exactly one of k and fraction"
    ],
)
def test_bad_compression_arguments_name_the_parameter(build, parameter):
    with pytest.raises(InvalidArgument, match=parameter) as raised:
        build()
    assert raised.value.name.rsplit(".", 1)[-1] == parameter  # what the runner maps to a key
