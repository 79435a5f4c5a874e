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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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
