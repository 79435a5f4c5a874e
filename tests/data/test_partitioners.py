"""Each partitioner's promise, against theory rather than recorded draws."""

import numpy as np
import pytest

from fedjaxsim.data.federated import FederatedData
from fedjaxsim.data.partition import (
    client_sizes,
    dirichlet_label_partition,
    iid_partition,
    natural_id_partition,
    partition_labels,
    quantity_skew_partition,
    shard_partition,
)


def _assert_exact_cover(assignment, num_examples):
    """Every example assigned exactly once; index arrays sorted int64."""
    for part in assignment:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    counts = np.bincount(np.concatenate(assignment), minlength=num_examples)
    np.testing.assert_array_equal(counts, np.ones(num_examples, np.int64))


def _labels(num_classes=40, per_class=2000):
    return np.repeat(np.arange(num_classes), per_class)


@pytest.mark.parametrize(
    "method, options",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3}),
        ("shards", {"shards_per_client": 3}),
        ("quantity", {"sigma": 0.7}),
        ("quantity", {"distribution": "powerlaw", "exponent": 2.0}),
    ],
)
def test_every_partition_is_an_exact_cover_and_a_pure_function_of_the_seed(method, options):
    labels = np.random.default_rng(0).integers(0, 10, size=3000)
    first = partition_labels(method, labels, 25, seed=4, **options)
    _assert_exact_cover(first, len(labels))
    again = partition_labels(method, labels, 25, seed=4, **options)
    other = partition_labels(method, labels, 25, seed=5, **options)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one_and_labels_follow_the_population():
    labels = _labels(num_classes=10, per_class=3000)
    assignment = iid_partition(len(labels), 30, seed=0)
    sizes = [len(a) for a in assignment]
    assert max(sizes) - min(sizes) <= 1
    # Each client's label histogram is multinomial(1000, 1/10): 100 +- 9.5 per class.
    counts = np.stack([np.bincount(labels[a], minlength=10) for a in assignment])
    assert np.abs(counts - 100).max() < 6 * np.sqrt(1000 * 0.1 * 0.9)


def _share_variance_check(assignment, labels, num_clients, alpha):
    """The observed variance of clients' shares of each class, and its Dirichlet law.

    The partitioner splits every class over the clients by
    ``Dirichlet(alpha * ones(num_clients))``, independently per class. So a
    client's share of a class has mean ``p = 1 / num_clients`` and the
    closed-form variance ``p (1 - p) / (num_clients * alpha + 1)`` (the
    concentration is ``num_clients * alpha``). The statistic is the mean of
    ``(share - p)^2`` over clients and classes; its standard error follows from
    the Dirichlet's fourth moments over the independent classes, so the
    tolerance shrinks with the number of classes instead of being picked.

    Returns:
      ``(observed, expected, tolerance)`` with a 4-standard-error tolerance.
    """
    num_classes = int(labels.max()) + 1
    counts = np.stack([np.bincount(labels[a], minlength=num_classes) for a in assignment])
    shares = counts / counts.sum(axis=0)
    p = 1.0 / num_clients
    observed = float(((shares - p) ** 2).mean())
    a, total = alpha, num_clients * alpha
    expected = p * (1 - p) / (total + 1)

    # Per class, Q = sum_i share_i^2 has Var Q = N Var(s^2) + N (N - 1) Cov(s_i^2, s_j^2),
    # from E[s^2], E[s^4] and E[s_i^2 s_j^2] of Dirichlet(a * ones(N)).
    def rising(x, n):  # x (x + 1) ... (x + n - 1)
        return np.prod([x + k for k in range(n)])

    m2 = rising(a, 2) / rising(total, 2)
    m4 = rising(a, 4) / rising(total, 4)
    m22 = rising(a, 2) ** 2 / rising(total, 4)
    var_q = num_clients * (m4 - m2**2) + num_clients * (num_clients - 1) * (m22 - m2**2)
    # observed = mean over classes of Q / N - p^2.
    standard_error = np.sqrt(var_q / num_classes) / num_clients
    return observed, expected, 4 * standard_error


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_dirichlet_share_variance_matches_alpha(alpha):
    labels, num_clients = _labels(), 20
    assignment = dirichlet_label_partition(labels, num_clients, alpha, seed=1)
    _assert_exact_cover(assignment, len(labels))
    observed, expected, tolerance = _share_variance_check(assignment, labels, num_clients, alpha)
    assert abs(observed - expected) <= tolerance, (observed, expected, tolerance)


def test_the_dirichlet_check_at_alpha_10_rejects_an_iid_split():
    """The check above has the power to tell alpha=10 from IID (alpha -> infinity).

    At alpha=10 the expected share variance is about 10x that of an IID split
    of the same 2,000 examples per class (hypergeometric noise only), many
    tolerances apart.
    """
    labels, num_clients = _labels(), 20
    for seed in range(3):
        iid = iid_partition(len(labels), num_clients, seed=seed)
        observed, expected, tolerance = _share_variance_check(iid, labels, num_clients, 10.0)
        assert abs(observed - expected) > 3 * tolerance, (observed, expected, tolerance)
        # A near-IID Dirichlet draw fails the alpha=10 check too.
        close_to_iid = dirichlet_label_partition(labels, num_clients, 1000.0, seed=seed)
        observed, expected, tolerance = _share_variance_check(
            close_to_iid, labels, num_clients, 10.0
        )
        assert abs(observed - expected) > 3 * tolerance, (observed, expected, tolerance)


def test_shards_give_k_labels_when_shards_align_with_classes():
    labels = np.random.default_rng(2).permutation(_labels(num_classes=10, per_class=60))
    assignment = shard_partition(labels, num_clients=100, shards_per_client=2, seed=3)
    _assert_exact_cover(assignment, len(labels))
    # 200 shards of 3 examples, 20 per class: each shard is one label.
    assert {len(a) for a in assignment} == {6}
    assert max(len(np.unique(labels[a])) for a in assignment) <= 2
    assert np.mean([len(np.unique(labels[a])) for a in assignment]) > 1.5  # mostly two


def test_shards_stay_within_two_k_labels_in_general():
    labels = np.random.default_rng(4).integers(0, 10, size=1234)
    assignment = shard_partition(labels, num_clients=37, shards_per_client=3, seed=0)
    _assert_exact_cover(assignment, len(labels))
    assert max(len(np.unique(labels[a])) for a in assignment) <= 6
    with pytest.raises(ValueError, match="shards need at least"):
        shard_partition(labels[:10], num_clients=6, shards_per_client=2, seed=0)


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_lognormal_sizes_have_the_requested_log_spread(sigma):
    sizes = client_sizes(10_000_000, 2000, seed=0, sigma=sigma, min_examples=0)
    assert sizes.sum() == 10_000_000
    # Sample sd of 2000 normal logs has standard error sigma / sqrt(4000).
    np.testing.assert_allclose(np.std(np.log(sizes)), sigma, atol=0.05)


@pytest.mark.parametrize("exponent", [1.0, 2.5])
def test_powerlaw_sizes_have_the_requested_tail_index(exponent):
    sizes = client_sizes(
        10_000_000, 2000, seed=1, distribution="powerlaw", exponent=exponent, min_examples=0
    )
    # Hill's maximum-likelihood estimate of a Pareto tail index (x_min from the data).
    estimate = len(sizes) / np.sum(np.log(sizes / sizes.min()))
    np.testing.assert_allclose(estimate, exponent, rtol=0.1)


def test_quantity_skew_respects_the_minimum_and_keeps_labels_iid():
    labels = _labels(num_classes=4, per_class=5000)
    assignment = quantity_skew_partition(len(labels), 50, seed=2, sigma=1.5, min_examples=7)
    _assert_exact_cover(assignment, len(labels))
    sizes = np.array([len(a) for a in assignment])
    assert sizes.min() >= 7 and sizes.max() > 5 * np.median(sizes) / 2
    big = assignment[int(np.argmax(sizes))]
    np.testing.assert_allclose(np.bincount(labels[big]) / len(big), 0.25, atol=0.05)
    with pytest.raises(ValueError, match="distribution must be"):
        client_sizes(100, 5, 0, distribution="zipf")


def test_natural_id_groups_by_the_column():
    writer = np.array(["w2", "w0", "w2", "w1", "w0", "w2"])
    assignment, names = natural_id_partition(writer)
    assert names == ["w0", "w1", "w2"]
    assert [a.tolist() for a in assignment] == [[1, 4], [3], [0, 2, 5]]
    data = FederatedData.from_partition({"writer": writer}, assignment, client_names=names)
    for index, name in enumerate(names):
        assert set(data.client(index)["writer"]) == {name}
    with pytest.raises(ValueError, match="non-empty 1-D"):
        natural_id_partition(np.array([]))


def test_unknown_partition_is_named():
    with pytest.raises(ValueError, match="unknown partition 'pathological'"):
        partition_labels("pathological", np.zeros(10, int), 2, seed=0)


def test_embedded_digits_go_through_the_dirichlet_partitioner(monkeypatch):
    from fedjaxsim.data import digits

    calls = []

    def spy(labels, num_clients, alpha, seed, **options):
        assignment = dirichlet_label_partition(labels, num_clients, alpha, seed, **options)
        calls.append((np.array(labels), num_clients, alpha, seed, assignment))
        return assignment

    monkeypatch.setattr(digits, "dirichlet_label_partition", spy)
    dataset = digits.federated_digits(num_clients=10, alpha=0.5, seed=3)
    [(labels, num_clients, alpha, seed, assignment)] = calls
    assert (num_clients, alpha, seed) == (10, 0.5, 3)
    assert dataset.train.total_examples + dataset.test.total_examples == 1797
    for index, part in enumerate(assignment):
        np.testing.assert_array_equal(dataset.train.client(index)["y"], labels[part])


def _retried_dirichlet_reference(labels, num_clients, alpha, seed, min_examples=1):
    """The documented retry loop, written out: redraw until every client has enough."""
    rng = np.random.default_rng(seed)
    while True:
        parts = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        if min(sum(len(c) for c in p) for p in parts) >= min_examples:
            return [np.sort(np.concatenate(p)) for p in parts]


def test_a_dirichlet_draw_that_succeeds_is_the_retry_loop_unchanged():
    """60 clients of 300 labels at alpha 0.2: the first 33 draws leave a client empty."""
    labels = np.random.default_rng(1).integers(0, 10, size=300)
    got = dirichlet_label_partition(labels, 60, 0.2, seed=7)
    want = _retried_dirichlet_reference(labels, 60, 0.2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_many_small_clients_are_topped_up_to_the_minimum():
    """1,000 clients of 1,437 examples: no Dirichlet draw gives all of them one."""
    labels = np.random.default_rng(0).integers(0, 10, size=1437)
    first = dirichlet_label_partition(labels, 1000, 0.5, seed=0, max_attempts=20)
    _assert_exact_cover(first, len(labels))
    assert min(len(part) for part in first) == 1
    again = dirichlet_label_partition(labels, 1000, 0.5, seed=0, max_attempts=20)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="cannot give 1500 clients 1 examples"):
        dirichlet_label_partition(labels, 1500, 0.5, seed=0)
