"""The randomized Walsh-Hadamard rotation used before quantization.

Suresh, Yu, Kumar, McMahan. "Distributed Mean Estimation with Limited
Communication". ICML 2017 (Section 4, stochastic rotated quantization).
Rotating a vector by ``R = H D / sqrt(n)`` (``H`` the Sylvester-Hadamard
matrix of order ``n = 2^m``, ``D`` a diagonal of random signs) spreads its
energy evenly over coordinates, so the range ``[min, max]`` a uniform
quantizer must cover shrinks from about ``||x||`` to about
``||x|| sqrt(log(n) / n)``, and the quantization error with it. ``R`` is
orthogonal: the server undoes it exactly (up to float rounding) with
``R^T = D H / sqrt(n)``. It costs ``O(n log n)`` through the fast transform.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def padded_size(size: int) -> int:
    """The power of two a vector of ``size`` entries is zero-padded to."""
    return 1 << max(0, (int(size) - 1).bit_length())


def fast_walsh_hadamard(vector: jax.Array) -> jax.Array:
    """``H x / sqrt(n)`` for ``x`` of length ``n = 2^m``: orthonormal and its own inverse.

    Args:
      vector: float[n] with ``n`` a power of two.

    Returns:
      float[n], the normalised Sylvester-Hadamard transform (``H[i, j] =
      (-1)^popcount(i & j)``, the ordering of ``scipy.linalg.hadamard``).

    Raises:
      ValueError: when the length is not a power of two.
    """
    size = vector.shape[-1]
    if size < 1 or size & (size - 1):
        raise ValueError(f"fast_walsh_hadamard needs a power-of-two length, got {size}")
    result = vector
    half = 1
    while half < size:
        # Butterflies between entries i and i + half within blocks of 2 * half.
        blocks = result.reshape(size // (2 * half), 2, half)
        first, second = blocks[:, 0, :], blocks[:, 1, :]
        result = jnp.stack([first + second, first - second], axis=1).reshape(size)
        half *= 2
    return result / jnp.asarray(math.sqrt(size), result.dtype)


def random_signs(rng: jax.Array, size: int, dtype=jnp.float32) -> jax.Array:
    """float[size] of independent +1/-1 (the diagonal ``D``)."""
    return jnp.where(jax.random.bernoulli(rng, 0.5, (size,)), 1.0, -1.0).astype(dtype)


def rotate(vector: jax.Array, rng: jax.Array) -> jax.Array:
    """``H D x / sqrt(n)`` after zero-padding ``x`` (float[d]) to ``n = padded_size(d)``.

    Returns:
      float[n]; the same ``rng`` gives the same rotation on client and server.
    """
    size = padded_size(vector.shape[0])
    padded = jnp.pad(vector, (0, size - vector.shape[0]))
    return fast_walsh_hadamard(random_signs(rng, size, padded.dtype) * padded)


def unrotate(rotated: jax.Array, rng: jax.Array, size: int) -> jax.Array:
    """Inverse of :func:`rotate`: ``D H y / sqrt(n)``, cut back to ``size`` entries."""
    signs = random_signs(rng, rotated.shape[0], rotated.dtype)
    return (signs * fast_walsh_hadamard(rotated))[:size]
