"""Poisson and shuffled-epoch samplers: the sampling their accounting assumes.

Frequencies are checked against binomial bounds (5 standard deviations) on
fixed seeds, so the tests are deterministic and far from flaky.
"""

import math

import numpy as np
import pytest

from fedjaxsim.core.sampling import (
    rounds_per_epoch,
    sample_poisson,
    sample_shuffled,
    sample_uniform,
)
from fedjaxsim.core.validation import InvalidArgument


def _within_binomial(count, trials, probability, sigmas=5.0):
    sd = math.sqrt(trials * probability * (1 - probability))
    return abs(count - trials * probability) <= sigmas * sd


# ---------------------------------------------------------------------------
# Poisson


def test_poisson_cohorts_are_sorted_distinct_ids_in_range():
    for round_index in range(50):
        ids = sample_poisson(2, round_index, 40, 0.3)
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert np.all(np.diff(ids) > 0)  # sorted, distinct
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 40)


def test_poisson_is_deterministic_in_seed_and_round():
    first = sample_poisson(seed=3, round_index=5, num_total_clients=200, rate=0.2)
    np.testing.assert_array_equal(first, sample_poisson(3, 5, 200, 0.2))
    assert not np.array_equal(first, sample_poisson(3, 6, 200, 0.2))
    assert not np.array_equal(first, sample_poisson(4, 5, 200, 0.2))


def test_poisson_inclusion_frequency_matches_the_rate():
    """Each client joins each round with probability ``rate``, independently
    of the other clients: per-client counts are Binomial(rounds, rate), a
    pair's joint count Binomial(rounds, rate^2), the cohort size
    Binomial(N, rate) with its variance."""
    num_total_clients, rate, rounds = 30, 0.15, 3000
    included = np.zeros((rounds, num_total_clients), bool)
    for round_index in range(rounds):
        included[round_index, sample_poisson(7, round_index, num_total_clients, rate)] = True
    for count in included.sum(axis=0):
        assert _within_binomial(count, rounds, rate)
    for a, b in [(0, 1), (5, 29), (12, 13)]:
        assert _within_binomial(np.sum(included[:, a] & included[:, b]), rounds, rate**2)
    sizes = included.sum(axis=1)
    assert _within_binomial(sizes.sum(), rounds * num_total_clients, rate)
    # The sample variance of Binomial(30, 0.15) sizes is 3.825; its standard
    # error over 3000 rounds is under 0.15.
    assert abs(sizes.var() - num_total_clients * rate * (1 - rate)) < 0.6
    # Sizes vary, and an empty cohort is allowed: (1 - 0.15)^30 ~ 0.8%.
    assert len(set(sizes.tolist())) > 5
    assert _within_binomial(np.sum(sizes == 0), rounds, (1 - rate) ** num_total_clients)


def test_poisson_rate_one_takes_everyone_and_tiny_rates_give_empty_cohorts():
    np.testing.assert_array_equal(sample_poisson(0, 4, 13, 1.0), np.arange(13))
    empty = sample_poisson(0, 0, 5, 1e-9)
    assert empty.shape == (0,) and empty.dtype == np.int64


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": -0.1}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"rate": float("nan")}, "rate"),
        ({"rate": "0.1"}, "rate"),
        ({"num_total_clients": 0}, "num_total_clients"),
        ({"seed": -1}, "seed"),
        ({"round_index": -1}, "round_index"),
        ({"round_index": 1.0}, "round_index"),
    ],
)
def test_poisson_rejects_bad_input(kwargs, name):
    arguments = {"seed": 0, "round_index": 0, "num_total_clients": 10, "rate": 0.5, **kwargs}
    with pytest.raises(InvalidArgument, match=name) as raised:
        sample_poisson(**arguments)
    assert raised.value.name == name


# ---------------------------------------------------------------------------
# Shuffled epochs


@pytest.mark.parametrize(
    "num_total_clients, cohort_size, expected", [(10, 3, 3), (12, 4, 3), (7, 7, 1), (5, 1, 5)]
)
def test_rounds_per_epoch(num_total_clients, cohort_size, expected):
    assert rounds_per_epoch(num_total_clients, cohort_size) == expected


@pytest.mark.parametrize("num_total_clients, cohort_size", [(12, 4), (10, 3), (9, 9), (6, 1)])
def test_shuffle_takes_each_client_at_most_once_per_epoch(num_total_clients, cohort_size):
    """The cohorts of an epoch are disjoint, of the full size, and, when the
    cohort size divides the population, cover it exactly."""
    per_epoch = num_total_clients // cohort_size
    for epoch in range(6):
        cohorts = [
            sample_shuffled(5, epoch * per_epoch + r, num_total_clients, cohort_size)
            for r in range(per_epoch)
        ]
        for ids in cohorts:
            assert ids.dtype == np.int64 and ids.shape == (cohort_size,)
            assert np.all(np.diff(ids) > 0)
            assert ids.min() >= 0 and ids.max() < num_total_clients
        seen = np.concatenate(cohorts)
        assert len(np.unique(seen)) == len(seen) == per_epoch * cohort_size
        if num_total_clients % cohort_size == 0:
            np.testing.assert_array_equal(np.sort(seen), np.arange(num_total_clients))


def test_shuffle_epochs_are_fresh_and_uniform():
    """Each epoch is a new uniform permutation: over many epochs a client
    lands in each round of its epoch with probability m / N and sits the
    epoch out with probability (N - R m) / N (N = 10, m = 3, R = 3)."""
    num_total_clients, cohort_size, epochs = 10, 3, 2000
    per_epoch = rounds_per_epoch(num_total_clients, cohort_size)
    slot_counts = np.zeros((num_total_clients, per_epoch + 1), int)  # last: sat out
    for epoch in range(epochs):
        slot = np.full(num_total_clients, per_epoch)
        for r in range(per_epoch):
            slot[sample_shuffled(1, epoch * per_epoch + r, num_total_clients, cohort_size)] = r
        slot_counts[np.arange(num_total_clients), slot] += 1
    for client_counts in slot_counts:
        for count in client_counts[:per_epoch]:
            assert _within_binomial(count, epochs, cohort_size / num_total_clients)
        assert _within_binomial(client_counts[-1], epochs, 1 / num_total_clients)
    # Consecutive epochs differ (their first cohorts, over the first 20 epochs).
    firsts = {tuple(sample_shuffled(1, e * per_epoch, 10, 3)) for e in range(20)}
    assert len(firsts) > 10


def test_shuffle_is_deterministic_and_depends_on_the_seed():
    a = [sample_shuffled(3, r, 20, 4) for r in range(10)]
    b = [sample_shuffled(3, r, 20, 4) for r in range(10)]
    c = [sample_shuffled(4, r, 20, 4) for r in range(10)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize(
    "kwargs, name, message",
    [
        ({"cohort_size": 0}, "cohort_size", "positive"),
        ({"cohort_size": 11}, "cohort_size", "larger than the population"),
        ({"cohort_size": 2.0}, "cohort_size", "positive"),
        ({"num_total_clients": 0}, "num_total_clients", "num_total_clients"),
        ({"round_index": -1}, "round_index", "round_index"),
        ({"seed": -2}, "seed", "seed"),
    ],
)
def test_shuffle_rejects_bad_input(kwargs, name, message):
    arguments = {"seed": 0, "round_index": 0, "num_total_clients": 10, "cohort_size": 3, **kwargs}
    with pytest.raises(InvalidArgument, match=message) as raised:
        sample_shuffled(**arguments)
    assert raised.value.name == name
    if "round_index" not in kwargs and "seed" not in kwargs:
        with pytest.raises(InvalidArgument, match=message):
            rounds_per_epoch(arguments["num_total_clients"], arguments["cohort_size"])


def test_uniform_sampler_names_the_bad_argument():
    with pytest.raises(InvalidArgument) as raised:
        sample_uniform(0, 0, 10, 11)
    assert raised.value.name == "cohort_size"
    with pytest.raises(InvalidArgument) as raised:
        sample_uniform(-1, 0, 10, 3)
    assert raised.value.name == "seed"
