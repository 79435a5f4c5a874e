"""Every algorithm composes with DP, coordinate median and top-k with error feedback.

Issue 13: "a parametrized test runs every algorithm with the DP aggregator,
coordinate median and top-k with error feedback; where the maths allows, it
compares with the float64 references". Where the composition is the plain
algorithm, the float64 reference of the plain algorithm is the answer:

* DP with no noise and an infinite clip norm, uniform weights and the cohort
  size as the fixed denominator is the uniformly weighted algorithm; top-k
  keeping all ``k = d`` coordinates sends the update as it is and leaves an
  exactly zero residual. The two are stacked (error feedback around the DP
  aggregator), so one compiled round per algorithm serves both;
* the coordinate median of identical clients is their common update.

Where it is not, each client's message (``ClientOutput.update``, ``means``,
``sums``) and the aggregate the server receives are exposed in the metrics
(:func:`expose_messages`), and the aggregate is checked against a float64
NumPy computation from the messages: DP clips each client's *whole*
message, update and side channel together, to the clip norm (McMahan et al.
2018), and its noise lands on the side channel too; the median is the
coordinate-wise median of the updates, while the side channel is streamed as
weighted means and plain sums.

Each composition compiles one round per algorithm (the standard cohort
shape), shared by the tests of this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim import ClientPayload, build_round, with_aggregator
from fedjaxsim.compression import top_k_compressor, with_error_feedback
from fedjaxsim.privacy import dp_fed_avg_aggregator
from fedjaxsim.robust import coordinate_median
from fedjaxsim.testing import client_store, run_round
from tests.algorithms.conftest import (
    CASES,
    NUM_PARAMS,
    NUM_TOTAL_CLIENTS,
    ROUND_COHORTS,
    initial_params,
    pack_both,
    pack_round,
    population,
    run_against_reference,
    standard_rounds,
)

COHORT_SIZE = len(ROUND_COHORTS[0])
# Algorithms whose clients send a side channel besides the update.
SIDE_CHANNEL = ("scaffold", "fed_nova", "mime_lite", "q_ffl")
NOISE_MULTIPLIER = 1.0


def expose_messages(algorithm):
    """``algorithm`` that also reports each client's message and the server's aggregate.

    Client metrics gain ``message`` (a ClientPayload); server metrics gain
    ``aggregate``. Nothing else changes.
    """

    def client_finalize(broadcast, local):
        output = algorithm.client_finalize(broadcast, local)
        message = ClientPayload(output.update, dict(output.means), dict(output.sums))
        return output._replace(metrics=dict(output.metrics, message=message))

    def server_update(server_state, aggregate, rng):
        server_state, metrics = algorithm.server_update(server_state, aggregate, rng)
        return server_state, dict(metrics, aggregate=aggregate)

    return algorithm._replace(client_finalize=client_finalize, server_update=server_update)


COMPOSITIONS = {
    # DP with an infinite clip norm and no noise, inside top-k error feedback
    # keeping every coordinate: both change nothing, so one compiled round
    # serves the equality with the reference and, with a finite clip norm set
    # in the aggregator state, the clipping checks.
    "dp_top_k": lambda algorithm: with_error_feedback(
        with_aggregator(
            algorithm, dp_fed_avg_aggregator(float("inf"), 0.0, expected_cohort_size=COHORT_SIZE)
        ),
        top_k_compressor(k=NUM_PARAMS),
    ),
    "dp_noised": lambda algorithm: with_aggregator(
        algorithm, dp_fed_avg_aggregator(1.0, NOISE_MULTIPLIER, expected_cohort_size=COHORT_SIZE)
    ),
    "median": lambda algorithm: with_aggregator(algorithm, coordinate_median()),
}


@pytest.fixture(scope="module")
def composed():
    """(composition, name) -> (algorithm, round_fn), each compiled once."""
    cache = {}

    def get(composition, name):
        if (composition, name) not in cache:
            algorithm = COMPOSITIONS[composition](expose_messages(CASES[name].build()))
            cache[composition, name] = (algorithm, build_round(algorithm))
        return cache[composition, name]

    return get


def _leaves(tree):
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def _first_round(algorithm, round_fn, cohort, clip_norm=None):
    """One round from a fresh state (and store); optionally with a DP clip norm."""
    params = initial_params()
    state = algorithm.init(params)
    if clip_norm is not None:
        aggregator_state = state.aggregator_state._replace(clip_norm=jnp.float32(clip_norm))
        state = state._replace(aggregator_state=aggregator_state)
    store = client_store(algorithm, params, NUM_TOTAL_CLIENTS)
    return run_round(round_fn, state, cohort, jax.random.key(0), store)


def _message_norms(message):
    """float64[num_clients]: the L2 norm of each client's whole message."""
    squares = sum(np.sum(leaf.reshape(len(leaf), -1) ** 2, axis=1) for leaf in _leaves(message))
    return np.sqrt(squares)


def _assert_tree_close(actual, expected, message, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected), message
    for got, want in zip(_leaves(actual), _leaves(expected)):
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5, err_msg=message)


# DP.


@pytest.mark.parametrize("name", sorted(CASES))
def test_dp_and_top_k_that_change_nothing_equal_the_uniformly_weighted_algorithm(name, composed):
    """DP with no noise, an infinite clip norm, uniform weights and the cohort
    size as denominator, under top-k error feedback with k = d: the float64
    reference of the uniformly weighted algorithm, and exactly zero residuals."""
    algorithm, round_fn = composed("dp_top_k", name)
    rounds = standard_rounds(weighting="uniform")
    _, outputs, store = run_against_reference(
        CASES[name], algorithm, round_fn, rounds, inner_states=lambda states: states.inner
    )
    for output in outputs:
        assert float(output.server_metrics["dp_num_clipped"]) == 0
        assert float(output.server_metrics["dp_noise_stddev_on_sum"]) == 0
        np.testing.assert_array_equal(output.client_metrics["residual_norm"], 0.0)
    ids = sorted({int(client_id) for inputs in rounds for client_id in inputs.cohort.client_id})
    assert store.num_written == len(ids)
    for residual in _leaves(store.gather(ids).residual):
        np.testing.assert_array_equal(residual, 0.0)


@pytest.fixture(scope="module")
def clipped_round(composed):
    """name -> (clip norm, unclipped output, clipped output, clipped state) of round 0.

    The clip norm is the median of the four clients' message norms, so two
    are clipped and two are not.
    """
    runs = {}

    def run(name):
        if name not in runs:
            algorithm, round_fn = composed("dp_top_k", name)
            cohort = pack_round(0)
            _, unclipped = _first_round(algorithm, round_fn, cohort)
            clip_norm = float(np.median(_message_norms(unclipped.client_metrics["message"])))
            state, clipped = _first_round(algorithm, round_fn, cohort, clip_norm)
            runs[name] = (clip_norm, unclipped, clipped, state)
        return runs[name]

    return run


def _clipped_aggregate(message, clip_norm):
    """Float64 DP-FedAvg without noise: clip each whole message, sum, means over the cohort size."""
    norms = _message_norms(message)
    scale = np.minimum(1.0, clip_norm / norms)
    totals = jax.tree.map(
        lambda leaf: np.tensordot(scale, np.asarray(leaf, np.float64), axes=1), message
    )

    def mean(tree):
        return jax.tree.map(lambda total: total / COHORT_SIZE, tree)

    return ClientPayload(mean(totals.update), mean(totals.means), totals.sums)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dp_clips_each_clients_whole_message(name, clipped_round):
    clip_norm, unclipped, clipped, _ = clipped_round(name)
    message = unclipped.client_metrics["message"]
    # The clients' messages do not depend on the aggregator.
    _assert_tree_close(clipped.client_metrics["message"], message, "messages")
    norms = _message_norms(message)
    assert float(clipped.server_metrics["dp_num_clipped"]) == np.sum(norms > clip_norm) == 2
    aggregate = clipped.server_metrics["aggregate"]
    expected = _clipped_aggregate(message, clip_norm)
    actual = ClientPayload(aggregate.update, aggregate.means, aggregate.sums)
    _assert_tree_close(actual, expected, f"{name}: the DP aggregate of clipped messages")
    if name in SIDE_CHANNEL:  # clipping changed the side channel too
        unclipped_aggregate = unclipped.server_metrics["aggregate"]
        side = [aggregate.means, aggregate.sums]
        unclipped_side = [unclipped_aggregate.means, unclipped_aggregate.sums]
        assert any(
            not np.allclose(a, b, rtol=1e-3) for a, b in zip(_leaves(side), _leaves(unclipped_side))
        )


def test_dp_bounds_how_far_each_scaffold_client_moves_the_control_variate(composed, clipped_round):
    """A client's control delta is part of its clipped message: c moves by at
    most clip / N per client. With a clip norm a tenth of the smallest message
    norm, every client is clipped hard, so an unclipped control delta would
    move c far more."""
    _, unclipped, _, _ = clipped_round("scaffold")
    clip_norm = 0.1 * _message_norms(unclipped.client_metrics["message"]).min()
    algorithm, round_fn = composed("dp_top_k", "scaffold")
    state, output = _first_round(algorithm, round_fn, pack_round(0), clip_norm)
    assert float(output.server_metrics["dp_num_clipped"]) == COHORT_SIZE
    control_move = np.sqrt(sum(np.sum(leaf**2) for leaf in _leaves(state.control)))
    assert 0 < control_move <= COHORT_SIZE * clip_norm / NUM_TOTAL_CLIENTS * (1 + 1e-6)


@pytest.mark.parametrize("name", SIDE_CHANNEL)
def test_dp_noise_lands_on_the_side_channel_too(name, composed, clipped_round):
    """With noise multiplier z, the noised aggregate minus the clipped one is
    N(0, (z C)^2) noise on the sums, divided by the cohort size for the
    update and the means; every side-channel value carries some."""
    clip_norm, unclipped, _, _ = clipped_round(name)
    algorithm, round_fn = composed("dp_noised", name)
    _, noised = _first_round(algorithm, round_fn, pack_round(0), clip_norm)
    aggregate = noised.server_metrics["aggregate"]
    expected = _clipped_aggregate(unclipped.client_metrics["message"], clip_norm)
    noise = jax.tree.map(
        lambda got, want: np.asarray(got, np.float64) - want,
        ClientPayload(aggregate.update, aggregate.means, aggregate.sums),
        expected,
    )
    noise_on_sums = ClientPayload(
        jax.tree.map(lambda leaf: leaf * COHORT_SIZE, noise.update),
        jax.tree.map(lambda leaf: leaf * COHORT_SIZE, noise.means),
        noise.sums,
    )
    side = np.concatenate(
        [leaf.ravel() for leaf in _leaves((noise_on_sums.means, noise_on_sums.sums))]
    )
    assert side.size > 0 and (np.abs(side) > 1e-3 * clip_norm).all(), side
    standardized = np.concatenate([leaf.ravel() for leaf in _leaves(noise_on_sums)])
    standardized = standardized / (NOISE_MULTIPLIER * clip_norm)
    assert standardized.size > NUM_PARAMS
    assert 0.6 < np.std(standardized) < 1.5, np.std(standardized)
    assert abs(np.mean(standardized)) < 0.6
    np.testing.assert_allclose(
        float(noised.server_metrics["dp_noise_stddev_on_sum"]),
        NOISE_MULTIPLIER * clip_norm,
        rtol=1e-6,
    )


# Coordinate median.


@pytest.mark.parametrize("name", sorted(CASES))
def test_median_of_identical_clients_equals_the_algorithm(name, composed):
    """Four clients with the same five examples (one batch per epoch, so the
    shuffle only reorders a sum): the median is their common update."""
    algorithm, round_fn = composed("median", name)
    clients = [population()[4]] * COHORT_SIZE
    ids = [5, 15, 25, 35]
    rounds = [pack_both(clients, ids, round_index) for round_index in range(2)]
    run_against_reference(CASES[name], algorithm, round_fn, rounds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_median_is_the_coordinate_median_of_the_updates(name, composed):
    """On a heterogeneous cohort: the update is NumPy's median over clients;
    the side channel is still the weighted mean (means) and the sum (sums)."""
    algorithm, round_fn = composed("median", name)
    cohort = pack_round(0)
    _, output = _first_round(algorithm, round_fn, cohort)
    message = jax.tree.map(
        lambda leaf: np.asarray(leaf, np.float64), output.client_metrics["message"]
    )
    weight = np.asarray(cohort.weight, np.float64)
    expected = ClientPayload(
        jax.tree.map(lambda leaf: np.median(leaf, axis=0), message.update),
        jax.tree.map(lambda leaf: np.tensordot(weight, leaf, axes=1) / weight.sum(), message.means),
        jax.tree.map(lambda leaf: leaf.sum(axis=0), message.sums),
    )
    aggregate = output.server_metrics["aggregate"]
    actual = ClientPayload(aggregate.update, aggregate.means, aggregate.sums)
    _assert_tree_close(actual, expected, f"{name}: median aggregate")
    assert float(output.server_metrics["robust_num_clients"]) == COHORT_SIZE
