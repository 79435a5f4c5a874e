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

from fedjaxsim.core.tasks import CLASSIFICATION, Task, metric_sums


class EvalBatches(NamedTuple):
    inputs: np.ndarray  # any[num_batches, batch_size, ...]
    labels: np.ndarray  # int32[num_batches, batch_size, ...] (a sequence or label slots)
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
    y = np.zeros((padded, *labels.shape[1:]), np.int32)
    y[:n] = labels
    mask = np.arange(padded) < n
    shape = lambda a: a.reshape(num_batches, batch_size, *a.shape[1:])  # noqa: E731
    return EvalBatches(shape(x), shape(y), shape(mask))


def task_sums(task: Task, apply_fn, params, inputs, labels, mask) -> dict:
    """Sufficient statistics of ``task``'s metrics over batches, in one ``lax.scan``.

    Args:
      task: what the labels mean (:mod:`fedjaxsim.core.tasks`).
      apply_fn: ``(params, inputs, rng, train) -> logits``, called with
        ``rng=None, train=False``.
      inputs, labels, mask: ``[num_batches, batch_size, ...]``.

    Returns:
      float32[] sums over the real (mask) examples: those of
      :func:`fedjaxsim.core.tasks.metric_sums` (``loss_sum``, ``loss_count``,
      ``num_examples`` and the task's metric numerators and denominators).
    """

    def body(totals, batch):
        x, y, m = batch
        sums = metric_sums(task, apply_fn(params, x, None, False), y, m)
        return jax.tree.map(jnp.add, totals, sums), None

    first = jax.tree.map(lambda a: a[0], (inputs, labels, mask))
    shapes = jax.eval_shape(
        lambda x, y, m: metric_sums(task, apply_fn(params, x, None, False), y, m), *first
    )
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(body, init, (inputs, labels, mask))[0]


def classification_sums(apply_fn, params, inputs, labels, mask) -> dict:
    """:func:`task_sums` of a classifier: ``loss_sum`` (softmax cross-entropy),
    ``num_correct`` and ``num_examples`` (with ``loss_count`` and
    ``num_predictions``, both equal to ``num_examples``)."""
    return task_sums(CLASSIFICATION, apply_fn, params, inputs, labels, mask)


def build_task_eval(task: Task, apply_fn):
    """Returns jitted ``evaluate(params, EvalBatches) -> dict`` of :func:`task_sums`."""
    return jax.jit(lambda params, batches: task_sums(task, apply_fn, params, *batches))


def build_classification_eval(apply_fn):
    """Returns jitted ``evaluate(params, EvalBatches) -> dict of float32[] sums``.

    Keys: ``loss_sum``, ``num_correct``, ``num_examples`` (:func:`classification_sums`).
    """
    return build_task_eval(CLASSIFICATION, apply_fn)


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
