"""Type aliases and Protocols shared by the functional core."""

from __future__ import annotations

from typing import Any, Protocol

import jax

PyTree = Any
Params = PyTree
Batch = PyTree  # a pytree of arrays with a leading batch axis: float32[batch, ...]
ClientId = jax.Array  # int32[], or int32[num_clients] when stacked


class PerExampleLossFn(Protocol):
    """Loss of every example of one batch.

    Args:
      params: model parameters.
      batch: pytree of arrays with leading axis ``batch_size``.
      rng: a PRNG key for stochastic layers (dropout).

    Returns:
      ``float32[batch_size]``: one loss per example, padding included; the
      caller masks and averages.
    """

    def __call__(self, params: Params, batch: Batch, rng: jax.Array) -> jax.Array: ...


class ApplyFn(Protocol):
    """``apply(params, inputs, rng, train) -> outputs`` of a model."""

    def __call__(
        self, params: Params, inputs: PyTree, rng: jax.Array | None, train: bool
    ) -> jax.Array: ...


class InitFn(Protocol):
    """``init(rng, sample_inputs) -> params`` of a model."""

    def __call__(self, rng: jax.Array, sample_inputs: PyTree) -> Params: ...
