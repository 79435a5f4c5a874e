"""Pytree arithmetic shared by the engine, the algorithms and the aggregators.

One place for the rules every sum of client contributions relies on: norms
as dot products, finiteness, exact zeros over NaN, and division by a total
that may be zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxsim.core.types import PyTree


def tree_squared_norm(tree: PyTree) -> jax.Array:
    """float32[]: the sum of squares of every element of every leaf.

    Computed as dot products (``vdot``), not ``sum(square(x))``: XLA:CPU
    turns large reductions into slow unfused reduce-windows, and these norms
    run for every client of every round.
    """
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        flat = jnp.ravel(leaf).astype(jnp.float32)
        total = total + jnp.vdot(flat, flat)
    return total


def tree_l2_norm(tree: PyTree) -> jax.Array:
    """float32[]: the global L2 norm of a pytree."""
    return jnp.sqrt(tree_squared_norm(tree))


def tree_is_finite(tree: PyTree) -> jax.Array:
    """bool[]: every element is finite and the squared norm does not overflow.

    Elements beyond about 1e19 count as diverged. It shares
    :func:`tree_squared_norm` with :func:`tree_l2_norm`, so a client that
    reports its update norm and is checked for finiteness computes it once.
    """
    return jnp.isfinite(tree_squared_norm(tree))


def tree_where(condition, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf by leaf ``jnp.where(condition, on_true, on_false)``."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def tree_zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def tree_subtract(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(tree: PyTree, factor) -> PyTree:
    """``factor * tree``, keeping every leaf's dtype."""
    return jax.tree.map(lambda leaf: (factor * leaf).astype(leaf.dtype), tree)


def tree_masked_scale(tree: PyTree, factor, keep) -> PyTree:
    """``factor * tree`` where ``keep``, exactly zero elsewhere, even over NaN.

    ``where`` rather than a multiply by 0, since ``0 * NaN`` is NaN.
    """
    return jax.tree.map(lambda leaf: jnp.where(keep, factor * leaf, 0.0).astype(leaf.dtype), tree)


def tree_divide(tree: PyTree, total) -> PyTree:
    """``tree / total``, or exact zeros when ``total <= 0`` (nothing to average)."""
    safe_total = jnp.where(total > 0, total, 1.0)
    return jax.tree.map(
        lambda leaf: jnp.where(total > 0, leaf / safe_total, 0.0).astype(leaf.dtype), tree
    )


def tree_size(tree: PyTree) -> int:
    """The number of scalars in a pytree of arrays (or shape structs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def sgd_step(params: PyTree, direction: PyTree, learning_rate) -> PyTree:
    """``params - learning_rate * direction``, leaf by leaf, keeping dtypes."""
    return jax.tree.map(lambda p, d: (p - learning_rate * d).astype(p.dtype), params, direction)


def clip_by_global_norm(update: PyTree, clip_norm) -> tuple[PyTree, jax.Array]:
    """Scales ``update`` to global L2 norm at most ``clip_norm``.

    Args:
      update: a pytree of float arrays.
      clip_norm: float32[] ``C > 0`` (``inf`` clips nothing).

    Returns:
      ``(clipped, norm)``: ``update * min(1, C / ||update||)`` and the norm
      before clipping (float32[]). An update within the bound is returned
      unchanged, bit for bit (it is multiplied by exactly 1).
    """
    norm = tree_l2_norm(update)
    clip_norm = jnp.asarray(clip_norm, jnp.float32)
    over = norm > clip_norm
    scale = jnp.where(over, clip_norm / jnp.where(over, norm, 1.0), 1.0)
    return tree_scale(update, scale), norm


def split_like(vector: jax.Array, tree: PyTree) -> PyTree:
    """Cuts a flat ``vector`` into a pytree shaped like ``tree``, in leaf order.

    Random draws for a whole pytree are made as one flat vector and cut with
    this: every draw compiles its own PRNG kernel, so one draw per leaf made a
    round of a many-leaf model several times slower to compile.
    """
    leaves, treedef = jax.tree.flatten(tree)
    ends = np.cumsum([math.prod(leaf.shape) for leaf in leaves])
    parts = jnp.split(vector, ends[:-1]) if leaves else []
    return jax.tree.unflatten(
        treedef, [part.reshape(leaf.shape) for part, leaf in zip(parts, leaves)]
    )
