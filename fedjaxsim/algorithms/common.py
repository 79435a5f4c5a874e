"""Pieces shared by the algorithm modules: argument checks and weighted sums.

Every algorithm here reduces its clients with a *sum* of weighted
contributions, so a zero-weight (padding) client must contribute exactly zero
and a client whose local training diverged (NaN or Inf) must not poison the
sum. :func:`effective_weight` and :func:`weighted` implement both rules the
way ``fedjaxsim.core.aggregators.weighted_mean`` does.
"""

from __future__ import annotations

import math
from numbers import Real

import jax
import jax.numpy as jnp

from fedjaxsim.core.aggregators import tree_is_finite
from fedjaxsim.core.types import PyTree


def check_number(
    name: str, value, *, minimum: float, strict: bool = False, maximum: float | None = None
) -> None:
    """Checks that a hyper-parameter is a finite real number in range.

    Args:
      name: the hyper-parameter's name, used in the message.
      value: the value to check.
      minimum: lower bound.
      strict: whether ``value`` must exceed ``minimum`` (otherwise ``>=``).
      maximum: optional exclusive upper bound.

    Raises:
      ValueError: naming ``name``, for a non-number, NaN, Inf or a value out
        of range.
    """
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum
    if not ok:
        low = f"> {minimum}" if strict else f">= {minimum}"
        high = "" if maximum is None else f" and < {maximum}"
        raise ValueError(f"{name} must be a finite number {low}{high}, got {value!r}")


def check_num_total_clients(value) -> None:
    """Raises ValueError unless ``num_total_clients`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_total_clients must be a positive int, got {value!r}")


def require_client_state(client_state: PyTree, algorithm_name: str, initial_state_fn: str) -> None:
    """Raises ValueError at trace time when a stateful algorithm gets no client state.

    Args:
      client_state: what the engine passed to ``client_init``.
      algorithm_name: e.g. ``"scaffold"``.
      initial_state_fn: the function that builds the store's default state.
    """
    if not jax.tree.leaves(client_state):
        raise ValueError(
            f"{algorithm_name} keeps per-client state: call "
            f"round_fn(server_state, cohort, rng, client_states=store.gather(cohort.client_id)) "
            f"with a fedjaxsim.core.client_state.ClientStateStore whose default state is "
            f"{initial_state_fn}(params); got client_states=()"
        )


def effective_weight(weight, *trees: PyTree) -> jax.Array:
    """float32[]: ``weight``, or 0 when any leaf of ``trees`` is non-finite."""
    weight = jnp.asarray(weight, jnp.float32)
    finite = jnp.all(jnp.stack([tree_is_finite(tree) for tree in trees]))
    return jnp.where(finite, weight, 0.0)


def weighted(tree: PyTree, weight) -> PyTree:
    """``weight * tree``, exactly zero where ``weight == 0`` (even over NaN)."""
    # where, not a multiply: 0 * NaN is NaN.
    return jax.tree.map(
        lambda leaf: jnp.where(weight > 0, weight * leaf, 0.0).astype(leaf.dtype), tree
    )


def weighted_contribution(weight, weighted_trees: dict, checked_trees=()) -> dict:
    """One client's summable contribution, the shape every algorithm here sums.

    Each ``weighted_trees[name]`` becomes ``weighted_<name>``, scaled by the
    client's usable weight: its weight, or 0 when any tree (weighted or in
    ``checked_trees``) is non-finite, so a diverged client is dropped rather
    than poisoning the sum. Adds ``weight`` (the usable weight) and
    ``num_nonfinite_updates`` (1 for a real client that was dropped).
    """
    weight = jnp.asarray(weight, jnp.float32)
    used = effective_weight(weight, *weighted_trees.values(), *checked_trees)
    contribution = {f"weighted_{name}": weighted(tree, used) for name, tree in weighted_trees.items()}
    contribution["weight"] = used
    contribution["num_nonfinite_updates"] = jnp.logical_and(weight > 0, used == 0).astype(jnp.float32)
    return contribution


def divide(tree: PyTree, total) -> PyTree:
    """``tree / total``, or zeros when ``total == 0`` (an empty cohort)."""
    safe_total = jnp.where(total > 0, total, 1.0)
    return jax.tree.map(
        lambda leaf: jnp.where(total > 0, leaf / safe_total, 0.0).astype(leaf.dtype), tree
    )


def sgd_step(params: PyTree, grads: PyTree, learning_rate: float) -> PyTree:
    """``params - learning_rate * grads``, leaf by leaf, keeping dtypes."""
    return jax.tree.map(lambda p, g: (p - learning_rate * g).astype(p.dtype), params, grads)


def squared_distance(tree_a: PyTree, tree_b: PyTree) -> jax.Array:
    """float32[]: ``||a - b||^2`` summed over every leaf."""
    return sum(
        jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))
    )


def num_real_examples(mask) -> jax.Array:
    """float32[]: the number of real examples of a step."""
    return jnp.sum(mask, dtype=jnp.float32)
