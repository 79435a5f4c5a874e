"""Shared fixtures. Tests run on one CPU device; multi-device tests spawn a
subprocess with XLA_FLAGS set, so everything else stays fast."""

from __future__ import annotations

from fedjaxsim.runner.platform import configure_xla_cpu

configure_xla_cpu()  # before any JAX computation, as the CLI does

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedjaxsim.models import classification_loss, from_linen, get_model  # noqa: E402
from fedjaxsim.models.zoo import LogisticRegression  # noqa: E402

NUM_FEATURES = 12
NUM_CLASSES = 5


def make_clients(sizes, seed=0, num_features=NUM_FEATURES, num_classes=NUM_CLASSES):
    """Synthetic classification clients with the given sizes (float32 x, int32 y)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, num_features))
    clients = []
    for n in sizes:
        y = rng.integers(0, num_classes, size=n).astype(np.int32)
        x = (centers[y] + rng.normal(size=(n, num_features))).astype(np.float32)
        clients.append({"x": x, "y": y})
    return clients


@pytest.fixture(scope="session")
def logreg_model():
    return from_linen(LogisticRegression(num_classes=NUM_CLASSES))


@pytest.fixture(scope="session")
def logreg_params(logreg_model):
    params = logreg_model.init(jax.random.key(0), np.zeros((1, NUM_FEATURES), np.float32))
    # Non-zero start so that every coordinate moves.
    return jax.tree.map(lambda p: p + 0.01, params)


@pytest.fixture(scope="session")
def logreg_loss(logreg_model):
    return classification_loss(logreg_model)


@pytest.fixture(scope="session")
def digits_cnn():
    """The built-in CNN on 8x8x1 inputs with 10 classes: small, but every layer."""
    return get_model("cnn", 10)
