"""The embedded default: scikit-learn's bundled handwritten digits, federated.

1,797 real 8x8 handwritten digits (UCI optical recognition of handwritten
digits, shipped inside scikit-learn, so no network is needed). A stratified
20% is held out as the test split; the rest is split over clients with
Dirichlet label skew. Pixels are scaled to [0, 1] (ink = 1.0), shape 8x8x1.
"""

from __future__ import annotations

import numpy as np

from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.partition import dirichlet_label_partition


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(float32[1797, 8, 8, 1] in [0, 1], int32[1797]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "the embedded digits dataset needs scikit-learn: pip install 'fedjaxsim[run]'"
        ) from error
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    return images, bunch.target.astype(np.int32)


def federated_digits(
    num_clients: int = 100, alpha: float = 0.5, test_fraction: float = 0.2, seed: int = 0
) -> FederatedDataset:
    """Digits split into ``num_clients`` Dirichlet(alpha) label-skewed clients.

    The test split is stratified by label and kept as a single "client".
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    images, labels = load_digits_arrays()
    rng = np.random.default_rng([seed, 0xD161])
    test_index = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_index.append(members[: int(round(test_fraction * len(members)))])
    test_index = np.sort(np.concatenate(test_index))
    train_index = np.setdiff1d(np.arange(len(labels)), test_index)
    assignment = dirichlet_label_partition(labels[train_index], num_clients, alpha, seed)
    train = FederatedData.from_partition(
        {"x": images[train_index], "y": labels[train_index]}, assignment
    )
    test = FederatedData.from_clients([{"x": images[test_index], "y": labels[test_index]}])
    return FederatedDataset("digits", train, test, num_classes=10, input_shape=(8, 8, 1))
