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

    Returns:
      One sorted int64 index array per client; every example appears exactly once.

    Raises:
      ValueError: for non-positive alpha, too many clients, or when no draw in
        ``max_attempts`` satisfies ``min_examples``.
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
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        assignment = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(a) for a in assignment) >= min_examples:
            return assignment
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_attempts} attempts gave every one of "
        f"{num_clients} clients {min_examples} examples; raise alpha or lower num_clients"
    )
