"""Synthetic federated clients for tests and examples."""

from __future__ import annotations

import numpy as np


def synthetic_clients(
    sizes, seed: int = 0, num_features: int = 12, num_classes: int = 5
) -> list[dict]:
    """Classification clients of the given sizes: Gaussian clusters, one per class.

    Args:
      sizes: examples per client.
      seed: seeds the class centres, labels and features.
      num_features: features per example.
      num_classes: classes; each client's labels are drawn uniformly.

    Returns:
      One ``{"x": float32[n, num_features], "y": int32[n]}`` per client.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, num_features))
    clients = []
    for n in sizes:
        y = rng.integers(0, num_classes, size=n).astype(np.int32)
        x = (centers[y] + rng.normal(size=(n, num_features))).astype(np.float32)
        clients.append({"x": x, "y": y})
    return clients
