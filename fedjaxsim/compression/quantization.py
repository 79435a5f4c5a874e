"""Unbiased stochastic uniform quantization of client updates.

Suresh, Yu, Kumar, McMahan. "Distributed Mean Estimation with Limited
Communication". ICML 2017 (stochastic k-level quantization, and its rotated
variant); see also Alistarh, Grubic, Li, Tomioka, Vojnovic. "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding". NeurIPS
2017.

A vector ``x`` (float[d]) is sent as its minimum and maximum (two float32)
and, per coordinate, one of ``2^b`` evenly spaced levels between them::

    t_i = (x_i - min) / (max - min) * (2^b - 1)
    level_i = floor(t_i) + Bernoulli(t_i - floor(t_i))

so ``E[decoded_i] = x_i``: the decoded vector is an unbiased estimate of
``x``, and the server's average of decoded updates an unbiased estimate of the
average update. A constant vector is sent exactly. Cost: ``b d + 64`` bits.

:func:`quantizer` packages the round trip (encode on the client, decode on the
server) as a compressor for :func:`fedjaxsim.compression.aggregators.compressed`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.compression.hadamard import padded_size, rotate, unrotate
from fedjaxsim.core.validation import check_int

MIN_BITS = 1
MAX_BITS = 16
RANGE_BITS = 64  # the minimum and maximum, two float32


class QuantizedVector(NamedTuple):
    levels: jax.Array  # int32[d]: quantization level of each coordinate, in [0, 2^b)
    minimum: jax.Array  # float32[]: value of level 0
    maximum: jax.Array  # float32[]: value of level 2^b - 1


def check_num_bits(num_bits) -> int:
    """Raises ValueError naming ``num_bits`` outside ``[1, 16]``."""
    return check_int("num_bits", num_bits, minimum=MIN_BITS, maximum=MAX_BITS)


def stochastic_quantize(vector: jax.Array, num_bits: int, rng: jax.Array) -> QuantizedVector:
    """Quantizes ``vector`` (float[d]) to ``2^num_bits`` levels, unbiasedly.

    Raises:
      ValueError: naming ``num_bits`` outside ``[1, 16]``.
    """
    num_bits = check_num_bits(num_bits)
    num_levels = (1 << num_bits) - 1
    vector = vector.astype(jnp.float32)
    minimum, maximum = jnp.min(vector), jnp.max(vector)
    span = maximum - minimum
    scaled = (
        jnp.where(span > 0, (vector - minimum) / jnp.where(span > 0, span, 1.0), 0.0) * num_levels
    )
    lower = jnp.floor(scaled)
    round_up = jax.random.uniform(rng, vector.shape, jnp.float32) < scaled - lower
    levels = jnp.clip(lower + round_up, 0, num_levels).astype(jnp.int32)
    return QuantizedVector(levels, minimum, maximum)


def dequantize(quantized: QuantizedVector, num_bits: int) -> jax.Array:
    """float32[d]: the values the levels stand for."""
    num_levels = (1 << num_bits) - 1
    step = (quantized.maximum - quantized.minimum) / num_levels
    return quantized.minimum + quantized.levels.astype(jnp.float32) * step


def quantized_bits(size: int, num_bits: int) -> int:
    """Bits to send a quantized vector of ``size`` coordinates."""
    return size * num_bits + RANGE_BITS


def quantize_roundtrip(vector: jax.Array, num_bits: int, rotation: bool, rng: jax.Array):
    """What the server decodes of one client's quantized ``vector`` (float32[d]).

    Args:
      vector: the flattened message.
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


def quantizer(num_bits: int, rotation: bool = False):
    """Unbiased stochastic quantization as a compressor (Suresh et al. 2017).

    Args:
      num_bits: bits per coordinate ``b`` in [1, 16].
      rotation: apply the randomized Walsh-Hadamard rotation first (Suresh et
        al.'s ``pi_srk``); the message is zero-padded to a power of two ``n``.

    Returns:
      A :class:`~fedjaxsim.compression.aggregators.Compressor`: ``(vector float32[d], rng)
      -> (decoded float32[d], bits float32[])`` with ``bits = b d + 64``
      (``b n + 64`` with the rotation).

    Raises:
      InvalidArgument: naming ``num_bits`` outside [1, 16] (checked here, before
        any tracing).
    """
    num_bits = check_num_bits(num_bits)
    rotation = bool(rotation)

    def compress(vector, rng):
        decoded, bits = quantize_roundtrip(vector, num_bits, rotation, rng)
        return decoded, jnp.asarray(bits, jnp.float32)

    return compress
