"""Shared fixtures. Tests run on one CPU device; multi-device tests spawn a
subprocess with XLA_FLAGS set, so everything else stays fast.

Synthetic clients come from :func:`fedjaxsim.testing.synthetic_clients`; the
logistic-regression fixtures match its default shapes.
"""

from __future__ import annotations

import inspect

from fedjaxsim.runner.platform import configure_xla_cpu

configure_xla_cpu()  # before any JAX computation, as the CLI does

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedjaxsim.models import classification_loss, from_linen, get_model  # noqa: E402
from fedjaxsim.models.zoo import LogisticRegression  # noqa: E402
from fedjaxsim.testing import synthetic_clients  # noqa: E402

# The default shapes of synthetic_clients: x float32[n, SYNTHETIC_FEATURES],
# y in [0, SYNTHETIC_CLASSES).
_DEFAULTS = inspect.signature(synthetic_clients).parameters
SYNTHETIC_FEATURES = _DEFAULTS["num_features"].default
SYNTHETIC_CLASSES = _DEFAULTS["num_classes"].default


@pytest.fixture(scope="session")
def logreg_model():
    return from_linen(LogisticRegression(num_classes=SYNTHETIC_CLASSES))


@pytest.fixture(scope="session")
def logreg_params(logreg_model):
    params = logreg_model.init(jax.random.key(0), np.zeros((1, SYNTHETIC_FEATURES), np.float32))
    # Non-zero start so that every coordinate moves.
    return jax.tree.map(lambda p: p + 0.01, params)


@pytest.fixture(scope="session")
def logreg_loss(logreg_model):
    return classification_loss(logreg_model)


@pytest.fixture(scope="session")
def digits_cnn():
    """The built-in CNN on 8x8x1 inputs with 10 classes: small, but every layer."""
    return get_model("cnn", 10)
