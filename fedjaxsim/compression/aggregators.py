"""Compression as an aggregator wrapper: the server aggregates what it decodes.

:func:`compressed` wraps any :class:`~fedjaxsim.core.aggregators.Aggregator`
(the weighted mean, a robust rule, DP-FedAvg, ...) so that each client's
whole message (its update and its side channel, flattened into one vector
with ``ravel_pytree``) is encoded by a :class:`Compressor` and decoded again
before the wrapped aggregator's ``client_transform`` sees it. This runs per
client, under the engine's vmap, so the wrapped aggregator streams or stacks
its contributions exactly as it would uncompressed, and the bits each client
sends are summed alongside. ``compressed(weighted_mean(), quantizer(b))`` is
Suresh et al. 2017's mean estimation; :func:`quantized_mean` is that.

Compression before DP-FedAvg keeps DP-FedAvg's guarantee: the clip bounds
whatever message the server decodes, and the noise is added after.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjaxsim.compression.quantization import quantizer
from fedjaxsim.core.aggregators import Aggregator, Contribution, weighted_mean
from fedjaxsim.core.validation import InvalidArgument

# The wrapper's two streams of a client's aggregator key: the compressor's
# randomness (rotation, stochastic rounding) and the wrapped aggregator's
# (secure aggregation's rounding, ...) never coincide.
_COMPRESSOR_STREAM = 0xC0DE
_INNER_STREAM = 0x1AA6

METRIC_NAMES = ("compression_bits_per_client", "compression_uncompressed_bits_per_client")


class Compressor(Protocol):
    """Encodes one client's flat message and returns what the server decodes."""

    def __call__(self, vector: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(vector float32[d], rng) -> (decoded float32[d], bits sent: int or float32[])``."""


def compressed(aggregator: Aggregator, compressor: Compressor) -> Aggregator:
    """``aggregator`` over the messages as the server decodes them from ``compressor``.

    Args:
      aggregator: any aggregator; its state is the wrapper's state.
      compressor: e.g. :func:`~fedjaxsim.compression.quantization.quantizer` or
        :func:`~fedjaxsim.compression.sparsification.top_k_compressor`. It
        receives the client's whole message as one flat vector and
        ``fold_in(client_key, _COMPRESSOR_STREAM)``; the wrapped aggregator's
        ``client_transform`` receives the decoded message and
        ``fold_in(client_key, _INNER_STREAM)``. ``finalize`` passes its key
        through unchanged.

    Returns:
      An :class:`~fedjaxsim.core.aggregators.Aggregator` whose ``finalize``
      returns the wrapped aggregator's aggregate, state and metrics, plus
      ``compression_bits_per_client`` (bits sent) and
      ``compression_uncompressed_bits_per_client`` (the message's bits as
      sent uncompressed, 32 per float32 value): means over the clients that
      count (weight > 0 and a finite message), 0 when none does.

    Raises:
      InvalidArgument: naming ``aggregator`` when it is not an
        :class:`~fedjaxsim.core.aggregators.Aggregator`, ``compressor`` when
        it is not callable; when traced, ``compressor`` for an aggregator
        that already compresses
        (nested ``compressed``: compose the compressors into one instead).
    """
    if not isinstance(aggregator, Aggregator):
        raise InvalidArgument(
            "aggregator",
            f"aggregator must be an Aggregator (e.g. weighted_mean()) for compressed(), got "
            f"{type(aggregator).__name__}",
        )
    if not callable(compressor):
        raise InvalidArgument(
            "compressor",
            f"compressor must be a function (vector, rng) -> (decoded, bits), e.g. "
            f"quantizer(8); got {type(compressor).__name__}",
        )

    def client_transform(payload, weight, state, rng):
        flat, unravel = ravel_pytree(payload)  # float32[d]: update, means, sums
        decoded, bits = compressor(flat, jax.random.fold_in(rng, _COMPRESSOR_STREAM))
        received = unravel(decoded.astype(flat.dtype))
        inner = aggregator.client_transform(
            received, weight, state, jax.random.fold_in(rng, _INNER_STREAM)
        )
        counted = (weight > 0).astype(jnp.float32)
        uncompressed_bits = 8 * flat.dtype.itemsize * flat.shape[0]
        return inner._replace(
            summed={
                "inner": inner.summed,
                "num_clients": counted,
                "bits_sent": counted * jnp.asarray(bits, jnp.float32),
                "uncompressed_bits": counted * jnp.float32(uncompressed_bits),
            }
        )

    def finalize(contributions, state, rng):
        summed = contributions.summed
        inner = Contribution(summed=summed["inner"], stacked=contributions.stacked)
        aggregate, state, metrics = aggregator.finalize(inner, state, rng)
        if any(name in metrics for name in METRIC_NAMES):
            raise InvalidArgument(
                "compressor",
                "compressed() wraps an aggregator that already compresses; compose the two "
                "compressors into one compressor instead",
            )
        num_clients = jnp.maximum(summed["num_clients"], 1.0)
        metrics = dict(
            metrics,
            compression_bits_per_client=summed["bits_sent"] / num_clients,
            compression_uncompressed_bits_per_client=summed["uncompressed_bits"] / num_clients,
        )
        return aggregate, state, metrics

    return Aggregator(init=aggregator.init, client_transform=client_transform, finalize=finalize)


def quantized_mean(num_bits: int, rotation: bool = False) -> Aggregator:
    """Weighted mean of stochastically quantized client messages.

    ``compressed(weighted_mean(), quantizer(num_bits, rotation))``.

    Args:
      num_bits: bits per coordinate ``b`` in [1, 16].
      rotation: apply the randomized Walsh-Hadamard rotation first (Suresh
        et al. 2017's ``pi_srk``); the message is padded to a power of two.

    Returns:
      An Aggregator with empty state. Metrics: ``compression_bits_per_client``
      (mean over participating clients), ``compression_uncompressed_bits_per_client``
      (32 per coordinate) and ``total_weight``.

    Raises:
      InvalidArgument: naming ``num_bits`` outside [1, 16].
    """
    return compressed(weighted_mean(), quantizer(num_bits, rotation))
