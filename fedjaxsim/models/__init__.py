"""Models: built-in Flax modules and adapters to pure (init, apply)."""

from __future__ import annotations

from fedjaxsim.models.conv import Conv, conv2d_valid, max_pool_2x2
from fedjaxsim.models.model import (
    Model,
    classification_loss,
    count_params,
    from_functions,
    from_linen,
    from_nnx,
    squared_error_loss,
)
from fedjaxsim.models.zoo import DenseNet, EmnistCnn, LogisticRegression

MODEL_NAMES = ("cnn", "dense", "logreg")


def get_model(name: str, num_classes: int) -> Model:
    """A built-in model by name: ``"cnn"``, ``"dense"`` or ``"logreg"``."""
    modules = {
        "cnn": lambda: EmnistCnn(num_classes=num_classes),
        "dense": lambda: DenseNet(num_classes=num_classes),
        "logreg": lambda: LogisticRegression(num_classes=num_classes),
    }
    if name not in modules:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return from_linen(modules[name]())


__all__ = [
    "MODEL_NAMES",
    "Conv",
    "DenseNet",
    "EmnistCnn",
    "LogisticRegression",
    "Model",
    "classification_loss",
    "conv2d_valid",
    "count_params",
    "from_functions",
    "from_linen",
    "from_nnx",
    "get_model",
    "max_pool_2x2",
    "squared_error_loss",
]
