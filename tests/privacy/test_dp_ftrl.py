"""DP-FTRL's tree aggregation of noise (Kairouz et al. 2021) in the DP aggregator.

The reference draws every tree node itself, from the key derivation the
library documents (node (level i, index j) of tree k from
fold_in(fold_in(fold_in(key(seed), k), i), j)), and sums the dyadic nodes of
t's binary decomposition in float64: the noise on the prefix sum of a tree's
first t released sums. Statistical checks use fixed seeds and chi-square
bounds missed with probability below 1e-9 per side.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjaxsim.core.aggregators import ClientPayload, aggregate_clients
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.privacy import (
    AdaptiveClipping,
    dp_fed_avg,
    dp_fed_avg_aggregator,
    tree_noise_increment,
)
from fedjaxsim.testing import run_rounds
from tests.privacy import harness

MISS_PROBABILITY = 1e-9


def _node(seed, tree_index, level, index, size):
    """One tree node, N(0, 1)^size, float64, from the documented key derivation."""
    key = jax.random.key(seed)
    for part in (tree_index, level, index):
        key = jax.random.fold_in(key, part)
    return np.asarray(jax.random.normal(key, (size,), jnp.float32), np.float64)


def _noise_prefix(seed, tree_index, t, size):
    """sum over the set bits i of t of node(i, (t >> i) - 1): float64[size]."""
    total = np.zeros(size)
    for level in range(t.bit_length()):
        if t >> level & 1:
            total += _node(seed, tree_index, level, (t >> level) - 1, size)
    return total


@pytest.mark.parametrize("tree_size", [8, 13])
def test_increments_add_up_to_the_dyadic_prefix_noise(tree_size):
    """After t rounds of a tree, the increments sum to popcount(t) nodes; after
    a whole tree, to the nodes of tree_size's decomposition (the root alone for
    a power of two). Exact up to float32 rounding of the increments."""
    seed, size, stddev = 5, 64, 0.8
    increment = jax.jit(
        lambda k, t: tree_noise_increment(seed, k, t, size=size, tree_size=tree_size, stddev=stddev)
    )
    for tree_index in (0, 3):
        accumulated = np.zeros(size)
        for t in range(1, tree_size + 1):
            accumulated += np.asarray(increment(tree_index, t), np.float64)
            expected = stddev * _noise_prefix(seed, tree_index, t, size)
            np.testing.assert_allclose(accumulated, expected, rtol=0, atol=1e-5)
        if tree_size == 8:
            root = stddev * _node(seed, tree_index, 3, 0, size)
            np.testing.assert_allclose(accumulated, root, rtol=0, atol=1e-5)


def test_prefix_noise_variance_is_popcount_nodes():
    """Var of the accumulated noise after t rounds = popcount(t) (z C)^2 per coordinate.

    Over 2,000 trees (independent seeds via the tree index) of 100 coordinates:
    sum x^2 / (popcount(t) sigma^2) ~ chi2(200,000), for every t of a 13-round tree.
    """
    num_trees, size, tree_size, stddev = 2000, 100, 13, 1.7
    increments = jax.jit(
        jax.vmap(
            lambda k, t: tree_noise_increment(
                11, k, t, size=size, tree_size=tree_size, stddev=stddev
            ),
            in_axes=(0, None),
        )
    )
    trees = jnp.arange(num_trees)
    accumulated = np.zeros((num_trees, size))
    low, high = stats.chi2.ppf([MISS_PROBABILITY, 1 - MISS_PROBABILITY], num_trees * size)
    for t in range(1, tree_size + 1):
        accumulated += np.asarray(increments(trees, t), np.float64)
        expected_variance = t.bit_count() * stddev**2
        sum_of_squares = float(np.sum(accumulated**2)) / expected_variance
        assert low < sum_of_squares < high, (t, sum_of_squares / (num_trees * size))


def _tree_aggregator(tree_size, **kwargs):
    return dp_fed_avg_aggregator(
        kwargs.pop("clip_norm", 0.7),
        kwargs.pop("noise_multiplier", 1.3),
        kwargs.pop("expected_cohort_size", 5.0),
        mechanism="tree",
        tree_size=tree_size,
        **kwargs,
    )


def _message(aggregate, denominator, parts):
    """The released noisy *sum*: update and means times the denominator, sums as they are."""
    message = harness.flat(ClientPayload(aggregate.update, aggregate.means, aggregate.sums))
    update_part, means_part, _ = parts
    message[update_part] *= denominator
    message[means_part] *= denominator
    return message


def test_prefix_sums_of_released_sums_are_clipped_sums_plus_tree_noise():
    """Ten rounds, trees of four: in tree k, the released sums of its first t
    rounds add up to the clipped sums plus noise_prefix_k(t) (z C per node);
    the noise restarts with every tree; dp_tree_round and dp_tree_index."""
    tree_size, seed, clip_norm, z, denominator = 4, 9, 0.7, 1.3, 5.0
    num_clients = 6
    payloads = harness.side_channel_payloads(num_clients, seed=2)
    weights = np.array([1, 1, 0, 1, 1, 1], np.float32)  # client 2 is padding
    aggregator = _tree_aggregator(
        tree_size,
        clip_norm=clip_norm,
        noise_multiplier=z,
        expected_cohort_size=denominator,
        tree_seed=seed,
    )
    run = jax.jit(aggregate_clients, static_argnums=0)

    rows = harness.flat_rows(payloads)
    norms = np.linalg.norm(rows, axis=1)
    assert np.sum(norms[weights > 0] > clip_norm) >= 2  # the clip bites
    clipped_sum = (rows * np.minimum(1.0, clip_norm / norms)[:, None])[weights > 0].sum(axis=0)
    sizes = [sum(leaf[0].size for leaf in jax.tree.leaves(part)) for part in payloads]
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])

    state = aggregator.init(None)
    released = np.zeros_like(clipped_sum)
    for round_index in range(10):
        aggregate, state, metrics = run(
            aggregator, payloads, weights, state, jax.random.key(100 + round_index)
        )
        tree_index, t = divmod(round_index, tree_size)
        t += 1
        assert int(metrics["dp_tree_round"]) == t
        assert int(metrics["dp_tree_index"]) == tree_index
        np.testing.assert_allclose(float(metrics["dp_noise_stddev_on_sum"]), z * clip_norm)
        if t == 1:
            released = np.zeros_like(clipped_sum)  # a new tree: its own prefix sums
        released += _message(aggregate, denominator, parts)
        expected = t * clipped_sum + z * clip_norm * _noise_prefix(
            seed, tree_index, t, clipped_sum.size
        )
        np.testing.assert_allclose(released, expected, rtol=0, atol=2e-5)
    assert int(state.round) == 10


def test_without_noise_the_tree_is_the_plain_clipped_mean():
    payloads = harness.side_channel_payloads(4, seed=4)
    weights = np.ones(4, np.float32)
    run = jax.jit(aggregate_clients, static_argnums=0)
    results = []
    for options in ({}, {"mechanism": "tree", "tree_size": 3}):
        aggregator = dp_fed_avg_aggregator(0.9, 0.0, 4.0, **options)
        aggregate, _, metrics = run(
            aggregator, payloads, weights, aggregator.init(None), jax.random.key(0)
        )
        results.append(
            harness.flat(ClientPayload(aggregate.update, aggregate.means, aggregate.sums))
        )
    np.testing.assert_array_equal(results[0], results[1])
    assert int(metrics["dp_tree_round"]) == 1 and int(metrics["dp_tree_index"]) == 0


def test_dp_ftrl_runs_in_the_engine(logreg_loss, logreg_params):
    """Four engine rounds of DP-FTRL FedAvg, trees of three: the counters and finite params."""
    cohorts = [harness.cohort(round_index) for round_index in range(4)]
    algorithm = dp_fed_avg(
        logreg_loss,
        optax.sgd(harness.CLIENT_LEARNING_RATE),
        clip_norm=0.5,
        noise_multiplier=0.8,
        expected_cohort_size=len(harness.CLIENT_IDS),
        mechanism="tree",
        tree_size=3,
        tree_seed=1,
    )
    state, outputs, _ = run_rounds(
        algorithm, logreg_params, cohorts, num_total_clients=harness.NUM_TOTAL_CLIENTS
    )
    rounds = [int(out.server_metrics["dp_tree_round"]) for out in outputs]
    trees = [int(out.server_metrics["dp_tree_index"]) for out in outputs]
    assert rounds == [1, 2, 3, 1] and trees == [0, 0, 0, 1]
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))
    assert int(state.aggregator_state.round) == 4


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"mechanism": "laplace"}, "mechanism"),
        ({"mechanism": "tree"}, "tree_size"),  # missing
        ({"mechanism": "tree", "tree_size": 0}, "tree_size"),
        ({"mechanism": "tree", "tree_size": 4, "tree_seed": -1}, "tree_seed"),
        ({"tree_size": 4}, "tree_size"),  # with the Gaussian
        (
            {"mechanism": "tree", "tree_size": 4, "adaptive_clipping": AdaptiveClipping()},
            "adaptive_clipping",
        ),
    ],
)
def test_bad_tree_arguments_name_the_parameter(kwargs, parameter):
    arguments = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_cohort_size": 10}
    arguments.update(kwargs)
    with pytest.raises(InvalidArgument, match=parameter) as raised:
        dp_fed_avg_aggregator(**arguments)
    assert raised.value.name == parameter
    if parameter == "adaptive_clipping":
        assert "mechanism='tree'" in str(raised.value)  # names both parts


def test_tree_levels_cover_the_tree():
    """ceil(log2(T + 1)) levels hold every node a round of a T-round tree needs."""
    from fedjaxsim.privacy.dp import tree_num_levels

    for tree_size in range(1, 70):
        assert tree_num_levels(tree_size) == math.ceil(math.log2(tree_size + 1))
        assert max(t.bit_length() for t in range(1, tree_size + 1)) == tree_num_levels(tree_size)
