"""Jitted, batched, masked central evaluation.

The test set is padded on the host to whole batches (:func:`batch_for_eval`);
one jitted ``lax.scan`` over batches returns sufficient statistics (loss sum,
correct count, example count), which the runner turns into floats. The
compiled function is reused every round.
"""

from __future__ import annotations

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


def build_classification_eval(apply_fn):
    """Returns jitted ``evaluate(params, EvalBatches) -> dict of float32[] sums``.

    Keys: ``loss_sum``, ``num_correct``, ``num_examples``.

    Args:
      apply_fn: ``(params, inputs, rng, train) -> logits``, called with
        ``rng=None, train=False``.
    """

    @jax.jit
    def evaluate(params, batches: EvalBatches):
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
        totals, _ = jax.lax.scan(body, init, (batches.inputs, batches.labels, batches.mask))
        return totals

    return evaluate
