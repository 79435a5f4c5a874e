"""The one aggregation path: how clients' messages become the server's input.

Every algorithm's client half ends in a :class:`ClientPayload`: the model
``update`` (a pytree like the params) and a declared side channel of
quantities the server needs besides it (SCAFFOLD's control-variate delta,
FedNova's step normaliser, q-FFL's curvature ``h``, Mime-Lite's full-batch
gradient). Every algorithm's server half receives an :class:`Aggregate`.
Between the two sits one :class:`Aggregator`, so that clipping and DP noise,
robust rules, compression and secure aggregation compose with every
algorithm. The side channel is derived from client data too, so it never
goes around the aggregator: DP clips and noises the joint message, secure
aggregation masks it, compression encodes it.

An aggregator has the shape of ``optax.experimental.aggregating.Aggregator``
(``init`` over a params template, then pure functions of per-client updates
and state), split in two so that the engine can stream it over chunks of
clients and over devices without holding every client's message:

* ``client_transform(payload, weight, state, rng)`` runs per client under
  vmap and returns a :class:`Contribution`: a ``summed`` part the engine adds
  up over clients as they are trained, and a ``stacked`` part it keeps per
  client (``[num_clients, ...]`` in cohort order) for order statistics such
  as the median.
* ``finalize(contributions, state, rng)`` turns the summed and stacked
  contributions into ``(Aggregate, new_state, metrics)`` on the server.

The rules that hold whatever the aggregator (:func:`client_contribution`,
used by the engine and by :func:`aggregate_clients`): a client whose message
holds NaN or Inf is dropped (weight 0, its message replaced by zeros, counted
in ``num_nonfinite_updates``), and a client of weight 0 adds exactly zero to
the summed part, so padding clients change nothing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.core.trees import (
    tree_divide,
    tree_is_finite,
    tree_scale,
    tree_where,
    tree_zeros_like,
)
from fedjaxsim.core.types import PyTree


class ClientPayload(NamedTuple):
    """What one client sends to the aggregator."""

    update: PyTree  # pytree like params: the model delta (or what stands for it)
    means: dict = {}  # side channel, name -> pytree: averaged with the update's weights
    sums: dict = {}  # side channel, name -> pytree: summed over the clients counted


class Contribution(NamedTuple):
    """One client's share of an aggregate."""

    summed: PyTree = ()  # added over clients, streamed over chunks and devices
    stacked: PyTree = ()  # kept per client: [num_clients, ...] in cohort order


class Aggregate(NamedTuple):
    """What the server half of an algorithm receives."""

    update: PyTree  # pytree like params: the combination of the clients' updates
    means: dict  # side-channel means, as declared by the clients
    sums: dict  # side-channel sums
    weight: jax.Array  # float32[]: what the means were divided by (0: nothing to average)


class Aggregator(NamedTuple):
    """A streamed aggregator (see the module docstring)."""

    init: Callable[[PyTree], PyTree]  # (params template) -> state
    client_transform: Callable[..., Contribution]  # (payload, weight, state, rng) -> Contribution
    finalize: Callable[..., tuple[Aggregate, PyTree, dict]]  # (contributions, state, rng)


class WeightedPayload(NamedTuple):
    """A payload ready to be summed over clients."""

    payload: ClientPayload  # update and means times the weight; sums as sent
    weight: jax.Array  # float32[]: the weight


def weigh(payload: ClientPayload, weight) -> WeightedPayload:
    """The summable form of a payload: update and means times ``weight``."""
    weight = jnp.asarray(weight, jnp.float32)
    weighted = payload._replace(
        update=tree_scale(payload.update, weight), means=tree_scale(payload.means, weight)
    )
    return WeightedPayload(weighted, weight)


def average(summed: WeightedPayload, denominator=None) -> Aggregate:
    """Divides summed update and means by ``denominator`` (default: the summed weight).

    A zero denominator (an empty cohort) gives zeros, never a division by zero.
    """
    denominator = summed.weight if denominator is None else denominator
    payload = summed.payload
    return Aggregate(
        update=tree_divide(payload.update, denominator),
        means=tree_divide(payload.means, denominator),
        sums=payload.sums,
        weight=jnp.asarray(denominator, jnp.float32),
    )


def weighted_mean() -> Aggregator:
    """The FedAvg aggregate: ``sum_i w_i u_i / sum_i w_i``, side means likewise.

    Metrics: ``total_weight``.
    """

    def client_transform(payload, weight, state, rng):
        del state, rng
        return Contribution(summed=weigh(payload, weight))

    def finalize(contributions, state, rng):
        del rng
        summed = contributions.summed
        return average(summed), state, {"total_weight": summed.weight}

    return Aggregator(init=lambda params: (), client_transform=client_transform, finalize=finalize)


class ClientShare(NamedTuple):
    """One client's contribution after the rules every aggregator obeys."""

    contribution: Contribution  # summed part exactly zero unless the client counts
    used: jax.Array  # bool[]: weight > 0 and a finite message
    nonfinite: jax.Array  # float32[]: 1 for a client of weight > 0 dropped as non-finite


def client_contribution(
    aggregator: Aggregator, payload: ClientPayload, weight, state, rng
) -> ClientShare:
    """One client's share under ``aggregator`` (module docstring: the rules)."""
    weight = jnp.asarray(weight, jnp.float32)
    finite = tree_is_finite(payload)
    usable_weight = jnp.where(finite, weight, 0.0)
    used = usable_weight > 0
    payload = tree_where(finite, payload, tree_zeros_like(payload))
    contribution = aggregator.client_transform(payload, usable_weight, state, rng)
    summed = tree_where(used, contribution.summed, tree_zeros_like(contribution.summed))
    nonfinite = jnp.logical_and(weight > 0, ~finite).astype(jnp.float32)
    return ClientShare(contribution._replace(summed=summed), used, nonfinite)


def aggregate_clients(
    aggregator: Aggregator, payloads: ClientPayload, weights, state, rng, client_ids=None
) -> tuple[Aggregate, PyTree, dict]:
    """The aggregator in one call over stacked per-client payloads.

    optax's ``Aggregator.update`` form: ``payloads`` has leaves
    ``[num_clients, ...]`` and ``weights`` is ``float32[num_clients]``. The
    engine streams the same functions instead; this form is for users and
    tests that hold every client's message.

    Args:
      client_ids: int[num_clients]; client ``i`` draws from
        ``fold_in(rng, client_ids[i])`` (stable when the clients are
        reordered). Default: their positions.

    Returns:
      ``(aggregate, new_state, metrics)``, metrics with ``num_nonfinite_updates``.
    """
    num_clients = jnp.shape(weights)[0]
    client_ids = jnp.arange(num_clients) if client_ids is None else jnp.asarray(client_ids)
    rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, client_ids)
    shares = jax.vmap(
        lambda payload, weight, key: client_contribution(aggregator, payload, weight, state, key)
    )(payloads, weights, rngs)
    summed = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), shares.contribution.summed)
    contributions = Contribution(summed, shares.contribution.stacked)
    aggregate, state, metrics = aggregator.finalize(contributions, state, rng)
    return aggregate, state, dict(metrics, num_nonfinite_updates=jnp.sum(shares.nonfinite))
