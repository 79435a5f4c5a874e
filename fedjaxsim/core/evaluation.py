"""Jitted, batched, masked central evaluation.

The test set is padded on the host to whole batches (:func:`batch_for_eval`);
one jitted ``lax.scan`` over batches returns sufficient statistics (loss sum,
correct count, example count), which the runner turns into floats. The
compiled function is reused every round. :func:`client_distribution`
summarises one value per client (host NumPy).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class EvalBatches(NamedTuple):
    inputs: np.ndarray  # any[num_batches, batch_size, ...]
    labels: np.ndarray  # int32[num_batches, batch_size]
    mask: np.ndarray  # bool[num_batches, batch_size]


def batch_for_eval(inputs, labels, batch_size: int) -> EvalBatches:
    """Pads a test set to whole batches of ``batch_size`` (NumPy, host side).

    Raises:
      ValueError: for an empty set, mismatched lengths or a bad batch size.
    """
    inputs = np.asarray(inputs)
    labels = np.asarray(labels)
    if batch_size < 1:
        raise ValueError(f"eval batch_size must be positive, got {batch_size}")
    if len(inputs) != len(labels):
        raise ValueError(f"test set has {len(inputs)} inputs but {len(labels)} labels")
    if len(inputs) == 0:
        raise ValueError("cannot evaluate on an empty test set")
    n = len(inputs)
    num_batches = -(-n // batch_size)
    padded = num_batches * batch_size
    x = np.zeros((padded, *inputs.shape[1:]), inputs.dtype)
    x[:n] = inputs
    y = np.zeros(padded, np.int32)
    y[:n] = labels
    mask = np.arange(padded) < n
    shape = lambda a: a.reshape(num_batches, batch_size, *a.shape[1:])  # noqa: E731
    return EvalBatches(shape(x), shape(y), shape(mask))


def classification_sums(apply_fn, params, inputs, labels, mask) -> dict:
    """Sufficient statistics of a classifier over batches, in one ``lax.scan``.

    Args:
      apply_fn: ``(params, inputs, rng, train) -> logits``, called with
        ``rng=None, train=False``.
      inputs, labels, mask: ``[num_batches, batch_size, ...]``.

    Returns:
      float32[] sums ``loss_sum`` (softmax cross-entropy), ``num_correct``
      and ``num_examples`` over the real (mask) examples.
    """

    def body(totals, batch):
        x, y, m = batch
        logits = apply_fn(params, x, None, False).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, axis=-1) == y
        totals = {
            "loss_sum": totals["loss_sum"] + jnp.sum(jnp.where(m, losses, 0.0)),
            "num_correct": totals["num_correct"] + jnp.sum(correct & m, dtype=jnp.float32),
            "num_examples": totals["num_examples"] + jnp.sum(m, dtype=jnp.float32),
        }
        return totals, None

    zero = jnp.zeros((), jnp.float32)
    init = {"loss_sum": zero, "num_correct": zero, "num_examples": zero}
    return jax.lax.scan(body, init, (inputs, labels, mask))[0]


def build_classification_eval(apply_fn):
    """Returns jitted ``evaluate(params, EvalBatches) -> dict of float32[] sums``.

    Keys: ``loss_sum``, ``num_correct``, ``num_examples`` (:func:`classification_sums`).
    """
    return jax.jit(lambda params, batches: classification_sums(apply_fn, params, *batches))


def client_distribution(values, higher_is_better: bool = True) -> dict[str, float]:
    """Mean, 10th/50th/90th percentiles and worst-10% mean of per-client values.

    Percentiles interpolate linearly between order statistics (NumPy's
    default). The worst 10% are the ``ceil(0.1 * n)`` lowest values (highest
    when ``higher_is_better`` is False), so there is always at least one.

    Raises:
      ValueError: for an empty or non-vector ``values``.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty vector, got shape {values.shape}")
    ordered = np.sort(values)
    num_worst = max(1, math.ceil(0.1 * values.size))
    worst = ordered[:num_worst] if higher_is_better else ordered[-num_worst:]
    p10, p50, p90 = np.percentile(values, [10.0, 50.0, 90.0])
    return {
        "mean": float(values.mean()),
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
        "worst10_mean": float(worst.mean()),
    }
