"""compressed(aggregator, compressor): any aggregator over what the server decodes.

References are float64 NumPy: top-k is deterministic, so the wrapped mean,
median and DP clip-and-sum of the sparsified messages are computed exactly;
stochastic quantization moves each coordinate of a client by at most one
level of that client's range, and the median (1-Lipschitz per coordinate in
the max norm) and the clipped sum (clipping is a projection, 1-Lipschitz in
L2) move by at most what that bound gives.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjaxsim.compression import compressed, quantizer, top_k_compressor
from fedjaxsim.core.aggregators import (
    Aggregate,
    Aggregator,
    ClientPayload,
    Contribution,
    aggregate_clients,
    weighted_mean,
)
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.privacy import dp_fed_avg_aggregator
from fedjaxsim.robust import coordinate_median
from tests.privacy import harness


def _top_k_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """Each row with all but its k largest-magnitude entries zeroed (float64)."""
    keep = np.argsort(-np.abs(rows), axis=1, kind="stable")[:, :k]
    sparse = np.zeros_like(rows)
    np.put_along_axis(sparse, keep, np.take_along_axis(rows, keep, axis=1), axis=1)
    return sparse


def _top_k_bits(k: int, size: int) -> int:
    return k * (32 + math.ceil(math.log2(size)))


def _quantization_levels(rows: np.ndarray, num_bits: int) -> np.ndarray:
    """float64[num_clients]: one quantization level of each client's range."""
    return (rows.max(axis=1) - rows.min(axis=1)) / (2**num_bits - 1)


def test_compressed_weighted_mean_averages_the_decoded_joint_messages():
    """Top-k of the whole message (update, means and sums in one vector); update
    and means the weighted mean of the sparsified rows, sums their plain sum,
    over the clients that count: a padding client and a non-finite one do not,
    in the aggregate or in the bits."""
    num_clients, k = 6, 10
    payloads = harness.side_channel_payloads(num_clients, seed=3)
    payloads.update["kernel"][3, 0, 0] = np.nan  # client 3: dropped as non-finite
    weights = np.array([1.0, 0.0, 2.0, 0.5, 3.0, 1.0], np.float32)  # client 1: padding
    aggregator = compressed(weighted_mean(), top_k_compressor(k=k))
    aggregate, state, metrics = jax.jit(aggregate_clients, static_argnums=0)(
        aggregator, payloads, weights, aggregator.init(None), jax.random.key(0)
    )
    assert state == ()  # the weighted mean's (empty) state
    rows = harness.flat_rows(payloads)
    size = rows.shape[1]
    counts = np.array([True, False, True, False, True, True])
    sent = _top_k_rows(rows[counts], k)
    w = weights[counts].astype(np.float64)
    num_averaged = sum(leaf[0].size for leaf in jax.tree.leaves((payloads.update, payloads.means)))
    expected = np.concatenate(
        [
            (w[:, None] * sent[:, :num_averaged]).sum(axis=0) / w.sum(),
            sent[:, num_averaged:].sum(axis=0),
        ]
    )
    got = harness.flat(ClientPayload(aggregate.update, aggregate.means, aggregate.sums))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert float(aggregate.weight) == w.sum()
    assert float(metrics["total_weight"]) == w.sum()
    assert float(metrics["num_nonfinite_updates"]) == 1
    assert float(metrics["compression_bits_per_client"]) == _top_k_bits(k, size)
    assert float(metrics["compression_uncompressed_bits_per_client"]) == 32 * size


def test_compressed_aggregator_with_nobody_counted_reports_zero_bits():
    aggregator = compressed(weighted_mean(), quantizer(4))
    payloads = ClientPayload(update={"w": np.ones((3, 5), np.float32)})
    aggregate, _, metrics = aggregate_clients(
        aggregator, payloads, np.zeros(3, np.float32), aggregator.init(None), jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(aggregate.update["w"]), 0.0)
    assert float(metrics["compression_bits_per_client"]) == 0.0
    assert float(metrics["compression_uncompressed_bits_per_client"]) == 0.0


def test_compressor_and_wrapped_aggregator_draw_from_their_own_streams():
    """The compressor's key, the wrapped client_transform's key and the client's
    own key are three different keys; finalize receives the round key as it is."""
    num_clients = 4

    def compressor(vector, rng):  # sends its own draw in place of the message
        return jnp.full_like(vector, jax.random.uniform(rng)), jnp.float32(0)

    def client_transform(payload, weight, state, rng):
        del state
        return Contribution(
            stacked={"received": payload.update["w"][0], "own": jax.random.uniform(rng)}
        )

    def finalize(contributions, state, rng):
        zeros = {"w": jnp.zeros(3)}
        metrics = dict(contributions.stacked, finalize=jax.random.uniform(rng))
        return Aggregate(zeros, {}, {}, jnp.zeros(())), state, metrics

    recording = Aggregator(lambda params: (), client_transform, finalize)
    payloads = ClientPayload(update={"w": np.zeros((num_clients, 3), np.float32)})
    round_key = jax.random.key(7)
    _, _, metrics = aggregate_clients(
        compressed(recording, compressor), payloads, np.ones(num_clients), (), round_key
    )
    client_draws = np.array(
        [float(jax.random.uniform(jax.random.fold_in(round_key, i))) for i in range(num_clients)]
    )
    draws = np.stack(
        [np.asarray(metrics["received"]), np.asarray(metrics["own"]), client_draws]
    ).ravel()
    assert len(np.unique(draws)) == draws.size  # no two keys coincide
    assert float(metrics["finalize"]) == float(jax.random.uniform(round_key))


@pytest.fixture(scope="module")
def engine_rows(logreg_loss, logreg_params):
    """float64 [num_clients, num_params] client updates of harness.cohort(), from the engine."""
    updates, _ = harness.client_updates(logreg_loss, logreg_params, harness.cohort())
    return harness.flat_rows(updates)


def _round_delta(logreg_loss, logreg_params, aggregator):
    """The server's step of one FedAvg round (server SGD at 1: the aggregate update)."""
    state, out = harness.run_round(logreg_loss, logreg_params, aggregator, harness.cohort())
    return harness.flat(logreg_params) - harness.flat(state.params), out.server_metrics


@pytest.mark.parametrize("compression", ["top_k", "quantize"])
def test_compressed_coordinate_median_runs_in_the_engine(
    logreg_loss, logreg_params, engine_rows, compression
):
    rows = engine_rows
    size = rows.shape[1]
    if compression == "top_k":
        k = size // 3
        delta, metrics = _round_delta(
            logreg_loss, logreg_params, compressed(coordinate_median(), top_k_compressor(k=k))
        )
        np.testing.assert_allclose(delta, np.median(_top_k_rows(rows, k), axis=0), atol=1e-6)
        assert float(metrics["compression_bits_per_client"]) == _top_k_bits(k, size)
    else:
        num_bits = 6
        delta, metrics = _round_delta(
            logreg_loss, logreg_params, compressed(coordinate_median(), quantizer(num_bits))
        )
        bound = _quantization_levels(rows, num_bits).max() * (1 + 1e-5) + 1e-6
        assert np.all(np.abs(delta - np.median(rows, axis=0)) <= bound)
        assert float(metrics["compression_bits_per_client"]) == num_bits * size + 64
    assert float(metrics["compression_uncompressed_bits_per_client"]) == 32 * size
    assert float(metrics["robust_num_clients"]) == len(harness.CLIENT_IDS)


@pytest.mark.parametrize("compression", ["top_k", "quantize"])
def test_compressed_dp_fed_avg_clips_what_the_server_decodes(
    logreg_loss, logreg_params, engine_rows, compression
):
    """Noise-free DP-FedAvg: the clipped sum of the decoded messages over the
    fixed denominator; the clip sees the decoded message."""
    rows = engine_rows
    num_clients, size = rows.shape
    k, num_bits = size // 4, 8
    decoded = _top_k_rows(rows, k) if compression == "top_k" else rows
    clip_norm = float(np.median(np.linalg.norm(decoded, axis=1)))  # clips about half
    compressor = top_k_compressor(k=k) if compression == "top_k" else quantizer(num_bits)
    aggregator = compressed(dp_fed_avg_aggregator(clip_norm, 0.0, num_clients), compressor)
    delta, metrics = _round_delta(logreg_loss, logreg_params, aggregator)

    norms = np.linalg.norm(decoded, axis=1)
    expected = (decoded * np.minimum(1.0, clip_norm / norms)[:, None]).sum(axis=0) / num_clients
    if compression == "top_k":
        np.testing.assert_allclose(delta, expected, atol=1e-6)
        assert float(metrics["dp_num_clipped"]) == np.sum(norms > clip_norm)
        assert float(metrics["compression_bits_per_client"]) == _top_k_bits(k, size)
    else:
        # Each client's decoded row is within sqrt(d) levels (L2) of its update.
        bound = (math.sqrt(size) * _quantization_levels(rows, num_bits)).sum() / num_clients
        assert np.linalg.norm(delta - expected) <= bound * (1 + 1e-5) + 1e-6
        assert float(metrics["compression_bits_per_client"]) == num_bits * size + 64
    assert float(metrics["dp_num_clients"]) == num_clients


def test_compressed_dp_fed_avg_adds_its_noise_after_decoding(
    logreg_loss, logreg_params, engine_rows
):
    """With z > 0 the step is the clipped top-k mean plus Gaussian noise of
    standard deviation z C / m per coordinate (a chi-square bound)."""
    rows = engine_rows
    num_clients, size = rows.shape
    k, noise_multiplier = size // 4, 0.5
    decoded = _top_k_rows(rows, k)
    norms = np.linalg.norm(decoded, axis=1)
    clip_norm = float(np.median(norms))
    aggregator = compressed(
        dp_fed_avg_aggregator(clip_norm, noise_multiplier, num_clients), top_k_compressor(k=k)
    )
    delta, _ = _round_delta(logreg_loss, logreg_params, aggregator)
    expected = (decoded * np.minimum(1.0, clip_norm / norms)[:, None]).sum(axis=0) / num_clients
    stddev = noise_multiplier * clip_norm / num_clients
    statistic = np.sum(((delta - expected) / stddev) ** 2)
    assert stats.chi2.ppf(1e-6, size) < statistic < stats.chi2.ppf(1 - 1e-6, size)


def test_nested_compression_is_refused_when_traced():
    aggregator = compressed(compressed(weighted_mean(), quantizer(8)), quantizer(4))
    payloads = ClientPayload(update={"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(InvalidArgument, match="already compresses") as raised:
        jax.eval_shape(
            lambda: aggregate_clients(aggregator, payloads, np.ones(2), (), jax.random.key(0))
        )
    assert raised.value.name == "compressor"


@pytest.mark.parametrize(
    "build, parameter",
    [
        (lambda: compressed(object(), quantizer(4)), "aggregator"),
        (lambda: compressed(weighted_mean(), 4), "compressor"),
        (lambda: quantizer(0), "num_bits"),
        (lambda: quantizer(17, rotation=True), "num_bits"),
    ],
)
def test_bad_compressed_arguments_name_the_parameter(build, parameter):
    with pytest.raises(InvalidArgument, match=parameter) as raised:
        build()
    assert raised.value.name == parameter
