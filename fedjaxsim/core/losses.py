"""Losses: per-example losses of a model, and their masked mean over a batch.

A per-example loss is ``(params, batch, rng) -> float32[batch_size]``, one
value per example slot, padding included; :func:`masked_mean_loss` is how
every algorithm turns it into the mean over real examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.core.tasks import TokenLosses
from fedjaxsim.core.types import PerExampleLossFn


def masked_mean_loss(
    per_example_loss_fn: PerExampleLossFn, params, batch, mask, rng
) -> tuple[jax.Array, jax.Array]:
    """Mean loss over the real examples of a batch, and their loss sum.

    Padding slots are excluded with ``where`` (not a multiply, so a NaN in a
    padding slot cannot leak) and the mean divides by ``max(sum(mask), 1)`` so
    an all-padding batch has loss and gradient exactly zero.

    A loss that returns :class:`~fedjaxsim.core.tasks.TokenLosses` (next-token
    tasks) is averaged over the real tokens of the real examples instead; its
    second value is then that mean times the real examples, so that every
    algorithm's ``loss_sum / num_examples`` stays a mean loss.
    """
    losses = per_example_loss_fn(params, batch, rng)
    if isinstance(losses, TokenLosses):
        loss_sum = jnp.sum(jnp.where(mask, losses.loss_sum, 0.0))
        count = jnp.sum(jnp.where(mask, losses.count, 0.0))
        mean = loss_sum / jnp.maximum(count, 1.0)
        return mean, mean * jnp.sum(mask, dtype=mean.dtype)
    loss_sum = jnp.sum(jnp.where(mask, losses, 0.0))
    count = jnp.sum(mask.astype(losses.dtype))
    return loss_sum / jnp.maximum(count, 1.0), loss_sum


def classification_loss(model, input_key: str = "x", label_key: str = "y") -> PerExampleLossFn:
    """Per-example softmax cross-entropy of ``model`` (``model.apply(params, x, rng, train)``)."""

    def per_example_loss(params, batch, rng):
        logits = model.apply(params, batch[input_key], rng, True)
        labels = jnp.asarray(batch[label_key], jnp.int32)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

    return per_example_loss


def squared_error_loss(model, input_key: str = "x", label_key: str = "y") -> PerExampleLossFn:
    """Per-example ``0.5 * ||model(x) - y||^2`` for regression."""

    def per_example_loss(params, batch, rng):
        prediction = model.apply(params, batch[input_key], rng, True)
        residual = prediction - batch[label_key]
        return 0.5 * jnp.sum(residual.reshape(residual.shape[0], -1) ** 2, axis=-1)

    return per_example_loss


# The batch key under which the engine hands client steps the round's frozen
# inputs (``round_fn(..., frozen=...)``).
FROZEN_KEY = "frozen"


def with_frozen_params(per_example_loss_fn: PerExampleLossFn, merge) -> PerExampleLossFn:
    """A loss over the trainable part of the params, the rest frozen.

    The algorithm trains, stacks per client and aggregates only the trainable
    part (e.g. LoRA adapters); the frozen part (the base weights) comes from
    ``batch[FROZEN_KEY]``, where the engine puts what the round got as
    ``frozen``. It is one unbatched array for every client, and gradients
    never flow into it.

    Args:
      per_example_loss_fn: ``(full_params, batch, rng) -> float32[batch]``.
      merge: ``(frozen, trainable) -> full_params``, e.g.
        ``fedjaxsim.models.lora.merge_params``.

    Returns:
      ``(trainable, batch, rng) -> float32[batch]``.
    """

    def per_example_loss(trainable, batch, rng):
        if FROZEN_KEY not in batch:
            raise ValueError(
                f"this loss reads the frozen params from batch[{FROZEN_KEY!r}]: pass them to "
                "the round as round_fn(..., frozen=base)"
            )
        data = {key: value for key, value in batch.items() if key != FROZEN_KEY}
        frozen = jax.lax.stop_gradient(batch[FROZEN_KEY])
        return per_example_loss_fn(merge(frozen, trainable), data, rng)

    return per_example_loss
