"""Partitioners: a centralized labelled dataset into federated clients."""

from __future__ import annotations

import numpy as np


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffles the examples and deals them into ``num_clients`` near-equal clients."""
    if num_clients < 1 or num_clients > num_examples:
        raise ValueError(
            f"num_clients must lie in [1, {num_examples}] for {num_examples} examples, "
            f"got {num_clients}"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_label_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_examples: int = 1,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed clients: each class is split over clients by Dirichlet(alpha).

    For every class, a proportion vector over clients is drawn from
    ``Dirichlet(alpha * ones(num_clients))`` and the class's shuffled examples
    are cut accordingly (Hsu, Qi, Brown 2019, "Measuring the effects of
    non-identical data distribution"). Draws are repeated until every client
    holds at least ``min_examples``. Small alpha gives few classes per client.

    With many small clients (1,000 clients of 1.4 examples on average) no
    draw succeeds; after ``max_attempts`` the last draw is repaired instead:
    each short client in turn takes a random example from the client that
    holds the most, until it has ``min_examples``. The repaired clients lose
    some of their label skew; a draw that succeeds is never repaired.

    Returns:
      One sorted int64 index array per client; every example appears exactly once.

    Raises:
      ValueError: for non-positive alpha or too many clients.
    """
    labels = np.asarray(labels)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if num_clients < 1 or num_clients * min_examples > len(labels):
        raise ValueError(
            f"cannot give {num_clients} clients {min_examples} examples each from "
            f"{len(labels)} examples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_attempts):
        draws, sizes = [], np.zeros(num_clients, np.int64)
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            sizes += np.diff(cuts, prepend=0, append=len(members))
            draws.append((members, cuts))
        if sizes.min() >= min_examples:  # checked before the (costly) split
            return _assemble(draws, num_clients)
    return _top_up(_assemble(draws, num_clients), min_examples, rng)


def _assemble(draws, num_clients: int) -> list[np.ndarray]:
    """Each client's sorted indices from the per-class ``(members, cuts)`` of a draw."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members, cuts in draws:
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _top_up(assignment: list[np.ndarray], min_examples: int, rng) -> list[np.ndarray]:
    """Moves random examples from the largest clients to those below ``min_examples``."""
    assignment = [list(a) for a in assignment]
    for client in range(len(assignment)):
        while len(assignment[client]) < min_examples:
            donor = max(range(len(assignment)), key=lambda c: len(assignment[c]))
            taken = assignment[donor].pop(int(rng.integers(len(assignment[donor]))))
            assignment[client].append(taken)
    return [np.sort(np.asarray(a, np.int64)) for a in assignment]


def shard_partition(
    labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """Pathological non-IID shards (McMahan et al. 2017, "Communication-
    efficient learning of deep networks from decentralized data", Sec. 3).

    The examples are sorted by label (ties in random order), cut into
    ``num_clients * shards_per_client`` contiguous shards of near-equal size,
    and every client receives ``shards_per_client`` shards drawn at random
    without replacement. The paper's MNIST setting is 100 clients with 2
    shards of 300 each. A shard spans one label unless it straddles a label
    boundary, so a client holds at most ``2 * shards_per_client`` labels, and
    at most ``shards_per_client`` when every class size is a multiple of the
    shard size.

    Returns:
      One sorted int64 index array per client; every example appears exactly once.

    Raises:
      ValueError: fewer examples than shards, or non-positive counts.
    """
    labels = np.asarray(labels)
    if num_clients < 1 or shards_per_client < 1:
        raise ValueError(
            f"num_clients and shards_per_client must be positive, got {num_clients} "
            f"and {shards_per_client}"
        )
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(
            f"{num_shards} shards need at least {num_shards} examples, got {len(labels)}"
        )
    rng = np.random.default_rng(seed)
    # Random tie-break inside each label, so that which examples of a class
    # share a shard depends on the seed, not on the input order.
    order = np.lexsort((rng.random(len(labels)), labels))
    shards = np.array_split(order, num_shards)
    shard_owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    assignment = []
    for client_shards in shard_owner:
        indices = np.concatenate([shards[s] for s in client_shards])
        assignment.append(np.sort(indices).astype(np.int64))
    return assignment


def client_sizes(
    num_examples: int,
    num_clients: int,
    seed: int,
    *,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    min_examples: int = 1,
) -> np.ndarray:
    """Skewed client sizes that add up to ``num_examples``.

    Each client draws a weight, ``exp(N(0, sigma^2))`` for ``"lognormal"``
    (then ``log(size)`` has standard deviation about ``sigma``) or a Pareto
    weight with tail index ``exponent`` for ``"powerlaw"`` (``P(size > s)``
    falls as ``s^-exponent``). Every client first gets ``min_examples``; the
    rest are shared in proportion to the weights by largest remainders, so the
    sizes are exact integers that sum to ``num_examples``.

    Returns:
      int64[num_clients].

    Raises:
      ValueError: an unknown distribution, a bad parameter, or too few examples.
    """
    if num_clients < 1 or min_examples < 0 or num_clients * min_examples > num_examples:
        raise ValueError(
            f"cannot give {num_clients} clients {min_examples} examples each from {num_examples}"
        )
    rng = np.random.default_rng(seed)
    if distribution == "lognormal":
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        weights = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "powerlaw":
        if not exponent > 0:
            raise ValueError(f"exponent must be > 0, got {exponent!r}")
        weights = 1.0 + rng.pareto(exponent, num_clients)  # Pareto with x_min = 1
    else:
        raise ValueError(f"distribution must be 'lognormal' or 'powerlaw', got {distribution!r}")
    remaining = num_examples - num_clients * min_examples
    shares = weights / weights.sum() * remaining
    sizes = np.floor(shares).astype(np.int64)
    leftover = remaining - int(sizes.sum())
    sizes[np.argsort(-(shares - sizes), kind="stable")[:leftover]] += 1
    return sizes + min_examples


def quantity_skew_partition(
    num_examples: int,
    num_clients: int,
    seed: int,
    *,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    min_examples: int = 1,
) -> list[np.ndarray]:
    """Quantity skew: IID examples, client sizes from :func:`client_sizes`.

    Returns:
      One sorted int64 index array per client; every example appears exactly once.
    """
    sizes = client_sizes(
        num_examples,
        num_clients,
        seed,
        distribution=distribution,
        sigma=sigma,
        exponent=exponent,
        min_examples=min_examples,
    )
    # A separate stream from the sizes, so that changing the sizes' parameters
    # does not reuse the same numbers for the shuffle.
    order = np.random.default_rng([seed, 1]).permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def natural_id_partition(ids: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """Groups examples by an existing column (a writer, speaker or user id).

    Deterministic, so it takes no seed: clients are ordered by id value.

    Returns:
      (one sorted int64 index array per distinct id, the ids as strings).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}")
    values, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(values))
    assignment = [part.astype(np.int64) for part in np.split(order, np.cumsum(counts)[:-1])]
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    if len(set(names)) != len(names):
        raise ValueError("distinct ids print to the same string; convert them to strings first")
    return assignment, names


PARTITIONS = ("iid", "dirichlet", "shards", "quantity")


def partition_labels(
    method: str,
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
) -> list[np.ndarray]:
    """One entry point for the seeded partitioners of a labelled dataset.

    Args:
      method: ``"iid"``, ``"dirichlet"`` (``alpha``), ``"shards"``
        (``shards_per_client``) or ``"quantity"`` (``distribution``,
        ``sigma``, ``exponent``).
      labels: int[num_examples].
      num_clients: number of clients.
      seed: the partition is a pure function of its arguments and the seed.

    Returns:
      One sorted int64 index array per client.
    """
    labels = np.asarray(labels)
    if method == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if method == "dirichlet":
        return dirichlet_label_partition(labels, num_clients, alpha, seed)
    if method == "shards":
        return shard_partition(labels, num_clients, shards_per_client, seed)
    if method == "quantity":
        return quantity_skew_partition(
            len(labels),
            num_clients,
            seed,
            distribution=distribution,
            sigma=sigma,
            exponent=exponent,
        )
    raise ValueError(f"unknown partition {method!r}; choose one of {PARTITIONS}")
