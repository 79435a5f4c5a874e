"""Argument checks and pytree helpers shared by ``privacy``, ``robust`` and ``compression``.

Every builder in those packages validates its hyper-parameters eagerly, on the
host, and raises ``ValueError`` naming the offending parameter, so that a bad
configuration fails before any tracing or compilation.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import jax
import jax.numpy as jnp

from fedjaxsim.core.aggregators import tree_is_finite
from fedjaxsim.core.types import PyTree


def check_real(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
    allow_inf: bool = False,
) -> float:
    """Checks a real hyper-parameter and returns it as a float.

    Args:
      name: the parameter's name, used in the message.
      value: the value to check.
      minimum: optional lower bound.
      maximum: optional upper bound.
      strict_minimum: whether ``value`` must exceed ``minimum`` (else ``>=``).
      strict_maximum: whether ``value`` must stay below ``maximum`` (else ``<=``).
      allow_inf: whether ``+inf`` is accepted (e.g. an infinite clip norm).

    Returns:
      ``float(value)``.

    Raises:
      ValueError: naming ``name`` for a non-number, NaN, a disallowed infinity
        or a value out of range.
    """
    ok = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok and math.isinf(value):
        ok = allow_inf and value > 0
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if strict_maximum else value <= maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if strict_minimum else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"{'<' if strict_maximum else '<='} {maximum}")
        where = f" {' and '.join(bounds)}" if bounds else ""
        kind = "a number (inf allowed)" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind}{where}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    """Checks an integer hyper-parameter in ``[minimum, maximum]`` and returns it.

    Raises:
      ValueError: naming ``name`` for a non-integer or a value out of range.
    """
    ok = isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        high = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be an int >= {minimum}{high}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """Raises ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def usable_weight(weight, update: PyTree) -> jax.Array:
    """float32[]: ``weight``, or 0 where ``update`` holds NaN or Inf.

    A diverged client is dropped (as ``fedjaxsim.core.aggregators.weighted_mean``
    does by default) instead of poisoning the aggregate.
    """
    weight = jnp.asarray(weight, jnp.float32)
    return jnp.where(tree_is_finite(update), weight, 0.0)


def masked_scale(tree: PyTree, scale, keep) -> PyTree:
    """``scale * tree`` where ``keep``, exactly zero elsewhere (even over NaN)."""
    # where, not a multiply: 0 * NaN is NaN.
    return jax.tree.map(lambda leaf: jnp.where(keep, scale * leaf, 0.0).astype(leaf.dtype), tree)


def tree_squared_norm(tree: PyTree) -> jax.Array:
    """float32[]: the squared global L2 norm of a pytree."""
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))


def tree_size(tree: PyTree) -> int:
    """The number of scalars in a pytree of arrays (or shape structs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
