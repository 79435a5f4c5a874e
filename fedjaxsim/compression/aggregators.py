"""The server's view of compressed uploads: a mean of what it can decode.

:func:`quantized_mean` quantizes every client's whole message (its update and
its side channel, flattened into one vector, optionally after a randomized
Walsh-Hadamard rotation) inside the aggregator's per-client
``client_transform``, under the engine's vmap, and the contribution is what
the server decodes from that message, times the client's weight. Decoding
(dequantization and the inverse rotation) is linear, so decoding each
message and summing equals summing and decoding once; doing it per client
keeps the contribution an ordinary pytree, summed in a stream over chunks
and devices like the plain weighted mean. The bits each client sends are in
the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjaxsim.compression.hadamard import padded_size, rotate, unrotate
from fedjaxsim.compression.quantization import (
    check_num_bits,
    dequantize,
    quantized_bits,
    stochastic_quantize,
)
from fedjaxsim.core.aggregators import Aggregator, Contribution, average, weigh

UNCOMPRESSED_BITS = 32  # float32 per coordinate


def quantize_roundtrip(vector: jax.Array, num_bits: int, rotation: bool, rng: jax.Array):
    """What the server decodes of one client's quantized ``vector`` (float32[d]).

    Args:
      vector: the flattened update.
      num_bits: bits per coordinate, in [1, 16].
      rotation: rotate by a randomized Walsh-Hadamard transform before
        quantizing (the rotation's seed is shared randomness, not sent).
      rng: the client's key (rotation and stochastic rounding).

    Returns:
      ``(decoded float32[d], bits int)``: an unbiased estimate of ``vector``
      and the bits sent.
    """
    rotation_rng, rounding_rng = jax.random.split(rng)
    size = vector.shape[0]
    if rotation:
        rotated = rotate(vector, rotation_rng)
        quantized = stochastic_quantize(rotated, num_bits, rounding_rng)
        decoded = unrotate(dequantize(quantized, num_bits), rotation_rng, size)
        return decoded, quantized_bits(padded_size(size), num_bits)
    quantized = stochastic_quantize(vector, num_bits, rounding_rng)
    return dequantize(quantized, num_bits), quantized_bits(size, num_bits)


def quantized_mean(num_bits: int, rotation: bool = False) -> Aggregator:
    """Weighted mean of stochastically quantized client messages.

    Args:
      num_bits: bits per coordinate ``b`` in [1, 16].
      rotation: apply the randomized Walsh-Hadamard rotation first (Suresh
        et al. 2017's ``pi_srk``); the update is padded to a power of two.

    Returns:
      An Aggregator with empty state. Metrics: ``compression_bits_per_client``
      (mean over participating clients), ``compression_uncompressed_bits_per_client``
      (32 per coordinate) and ``total_weight``.

    Raises:
      ValueError: naming ``num_bits`` outside [1, 16].
    """
    num_bits = check_num_bits(num_bits)

    def client_transform(payload, weight, state, rng):
        del state
        flat, unravel = ravel_pytree(payload)
        decoded, bits = quantize_roundtrip(flat, num_bits, rotation, rng)
        counted = (weight > 0).astype(jnp.float32)
        return Contribution(
            summed={
                "clients": weigh(unravel(decoded.astype(flat.dtype)), weight),
                "num_clients": counted,
                "bits_sent": counted * bits,
                "uncompressed_bits": counted * (UNCOMPRESSED_BITS * flat.shape[0]),
            }
        )

    def finalize(contributions, state, rng):
        del rng
        summed = contributions.summed
        num_clients = jnp.maximum(summed["num_clients"], 1.0)
        metrics = {
            "compression_bits_per_client": summed["bits_sent"] / num_clients,
            "compression_uncompressed_bits_per_client": summed["uncompressed_bits"] / num_clients,
            "total_weight": summed["clients"].weight,
        }
        return average(summed["clients"]), state, metrics

    return Aggregator(init=lambda params: (), client_transform=client_transform, finalize=finalize)
