"""The server's view of compressed uploads: a mean of what it can decode.

:func:`quantized_mean` quantizes every client's update (optionally after a
randomized Walsh-Hadamard rotation) inside the aggregator's per-client
``client_transform``, under the engine's vmap, and the contribution is what
the server decodes from that client's message, times its weight. Decoding
(dequantization and the inverse rotation) is linear, so decoding each
message and summing equals summing and decoding once; doing it per client
keeps the contribution an ordinary params-shaped pytree, summed in a stream
over chunks and devices like the plain weighted mean (a zero-weight client
contributes exact zeros). The bits each client sends are in the metrics.
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
from fedjaxsim.core.aggregators import Aggregator
from fedjaxsim.privacy._validation import masked_scale, usable_weight

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
    """Weighted mean of stochastically quantized client updates.

    Args:
      num_bits: bits per coordinate ``b`` in [1, 16].
      rotation: apply the randomized Walsh-Hadamard rotation first (Suresh
        et al. 2017's ``pi_srk``); the update is padded to a power of two.

    Returns:
      A ``"sum"`` Aggregator with empty state. Metrics:
      ``compression_bits_per_client`` (mean over participating clients),
      ``compression_uncompressed_bits_per_client`` (32 per coordinate),
      ``total_weight`` and ``num_nonfinite_updates``.

    Raises:
      ValueError: naming ``num_bits`` outside [1, 16].
    """
    num_bits = check_num_bits(num_bits)

    def client_transform(update, weight, state, rng):
        del state
        raw_weight = jnp.asarray(weight, jnp.float32)
        weight = usable_weight(raw_weight, update)
        present = weight > 0
        safe = jax.tree.map(lambda leaf: jnp.where(present, leaf, 0.0), update)
        flat, unravel = ravel_pytree(safe)
        decoded, bits = quantize_roundtrip(flat, num_bits, rotation, rng)
        present_float = present.astype(jnp.float32)
        return {
            "weighted_update": masked_scale(unravel(decoded.astype(flat.dtype)), weight, present),
            "weight": weight,
            "num_clients": present_float,
            "bits_sent": present_float * bits,
            "uncompressed_bits": present_float * (UNCOMPRESSED_BITS * flat.shape[0]),
            "num_nonfinite_updates": jnp.logical_and(raw_weight > 0, ~present).astype(jnp.float32),
        }

    def finalize(reduced, state, rng):
        del rng
        total = reduced["weight"]
        safe_total = jnp.where(total > 0, total, 1.0)
        aggregate = jax.tree.map(
            lambda leaf: jnp.where(total > 0, leaf / safe_total, 0.0).astype(leaf.dtype),
            reduced["weighted_update"],
        )
        num_clients = jnp.maximum(reduced["num_clients"], 1.0)
        metrics = {
            "compression_bits_per_client": reduced["bits_sent"] / num_clients,
            "compression_uncompressed_bits_per_client": reduced["uncompressed_bits"] / num_clients,
            "total_weight": total,
            "num_nonfinite_updates": reduced["num_nonfinite_updates"],
        }
        return aggregate, state, metrics

    return Aggregator(init=lambda params: (), client_transform=client_transform, finalize=finalize)
