"""Aggregators: how stacked per-client updates become one server update.

Shaped like optax's experimental ``Aggregator``: an ``init`` over a params-like
template and pure functions over arrays. An aggregator is split in two so
that the engine can stream it over client chunks without holding every
client's update at once:

* ``client_transform(update, weight, state, rng)`` runs per client under vmap
  and returns a contribution pytree;
* the engine reduces contributions over the client axis (``"sum"``, streamed
  chunk by chunk, or ``"stack"``, which keeps ``[num_clients, ...]`` for order
  statistics such as the median);
* ``finalize(reduced, state, rng)`` turns the reduction into
  ``(aggregate, new_state, metrics)`` on the server.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.core.types import PyTree


class Aggregator(NamedTuple):
    init: Callable[[PyTree], PyTree]  # (params template) -> aggregator state
    client_transform: Callable[..., PyTree]  # (update, weight, state, rng) -> contribution
    finalize: Callable[..., tuple[PyTree, PyTree, dict]]  # (reduced, state, rng) -> (agg, state, metrics)
    reduction: str = "sum"


def tree_squared_norm(tree: PyTree) -> jax.Array:
    """float32[]: the sum of squares of every element of every leaf.

    Computed as dot products (``vdot``), not ``sum(square(x))``: XLA:CPU
    rewrites large reductions into slow unfused reduce-windows, and these
    norms run for every client of every round.
    """
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        flat = jnp.ravel(leaf).astype(jnp.float32)
        total = total + jnp.vdot(flat, flat)
    return total


def tree_is_finite(tree: PyTree) -> jax.Array:
    """bool[]: True when every element is finite and the squared L2 norm does
    not overflow float32 (elements beyond about 1e19 count as diverged).

    It shares :func:`tree_squared_norm` with :func:`tree_l2_norm`, so a round
    that reports update norms and checks finiteness computes it once.
    """
    return jnp.isfinite(tree_squared_norm(tree))


def tree_l2_norm(tree: PyTree) -> jax.Array:
    """float32[]: the global L2 norm of a pytree."""
    return jnp.sqrt(tree_squared_norm(tree))


def weighted_mean(skip_nonfinite: bool = True) -> Aggregator:
    """The FedAvg aggregate: ``sum_i w_i u_i / sum_i w_i``.

    Args:
      skip_nonfinite: a client whose update holds NaN or Inf (a diverged
        client) gets weight 0 instead of poisoning the average; the number of
        such clients is reported as ``num_nonfinite_updates``. With False,
        a NaN propagates into the server state.

    A cohort whose total weight is zero yields a zero update (the server
    state's params do not move), never a division by zero.
    """

    def init(params):
        del params
        return ()

    def client_transform(update, weight, state, rng):
        del state, rng
        weight = jnp.asarray(weight, jnp.float32)
        if skip_nonfinite:
            finite = tree_is_finite(update)
            weight = jnp.where(finite, weight, 0.0)
            nonfinite = jnp.logical_not(finite).astype(jnp.float32)
            # where, not multiply: 0 * NaN is NaN.
            weighted = jax.tree.map(lambda u: jnp.where(finite, weight * u, 0.0), update)
        else:
            nonfinite = jnp.zeros((), jnp.float32)
            weighted = jax.tree.map(lambda u: weight * u, update)
        return {"weighted_update": weighted, "weight": weight, "num_nonfinite_updates": nonfinite}

    def finalize(reduced, state, rng):
        del rng
        total = reduced["weight"]
        safe_total = jnp.where(total > 0, total, 1.0)
        aggregate = jax.tree.map(
            lambda s: jnp.where(total > 0, s / safe_total, 0.0).astype(s.dtype),
            reduced["weighted_update"],
        )
        metrics = {
            "total_weight": total,
            "num_nonfinite_updates": reduced["num_nonfinite_updates"],
        }
        return aggregate, state, metrics

    return Aggregator(init=init, client_transform=client_transform, finalize=finalize)
