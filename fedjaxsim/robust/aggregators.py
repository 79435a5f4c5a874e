"""Byzantine-robust aggregators.

* Coordinate-wise median and coordinate-wise trimmed mean: Yin, Chen,
  Ramchandran, Bartlett. "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates". ICML 2018.
* Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent". NeurIPS
  2017.
* Norm bounding: Sun, Kairouz, Suresh, McMahan. "Can You Really Backdoor
  Federated Learning?". arXiv:1911.07963, 2019.

The order-statistic aggregators (median, trimmed mean, Krum) need every
client's update at once, so their contributions are stacked: ``finalize``
receives ``[num_clients, ...]`` rows in cohort order. A row whose client
does not count (weight 0: padding, or a client whose update is NaN/Inf) takes
no part in any order statistic. Beyond that, weights are not used: these
statistics are unweighted in the papers.

The rules protect the model update. The side channel of the algorithm
(SCAFFOLD's control delta, FedNova's normaliser, ...) is streamed as usual:
weighted means and plain sums over the clients that count.

Norm bounding is linear after the per-client clip of the whole message, so
it is streamed like the weighted mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjaxsim.core.aggregators import Aggregator, Contribution, average, weigh
from fedjaxsim.core.trees import clip_by_global_norm
from fedjaxsim.core.validation import InvalidArgument, check_int, check_real


def _stack_transform(payload, weight, state, rng):
    """Per client: the update as a row and whether it counts; the side channel summed."""
    del state, rng
    return Contribution(
        summed=weigh(payload._replace(update=()), weight),
        stacked={"update": payload.update, "present": weight > 0},
    )


def _rows_mask(present: jax.Array, leaf: jax.Array) -> jax.Array:
    """``present`` reshaped to broadcast against a ``[num_clients, ...]`` leaf."""
    return present.reshape(-1, *[1] * (leaf.ndim - 1))


def _sorted_present_first(leaf: jax.Array, present: jax.Array) -> jax.Array:
    """Sorts every coordinate over clients; absent rows (+inf) go last."""
    return jnp.sort(jnp.where(_rows_mask(present, leaf), leaf, jnp.inf), axis=0)


def _stacked_aggregator(combine) -> Aggregator:
    """An aggregator whose update is ``combine(rows, present, num_present)``.

    ``combine`` returns ``(update, metrics)`` from the ``[num_clients, ...]``
    update rows, whether each row counts, and how many do.
    """

    def finalize(contributions, state, rng):
        del rng
        present = contributions.stacked["present"]
        num_present = jnp.sum(present, dtype=jnp.int32)
        update, metrics = combine(contributions.stacked["update"], present, num_present)
        aggregate = average(contributions.summed)._replace(update=update)
        return aggregate, state, dict(metrics, robust_num_clients=num_present.astype(jnp.float32))

    return Aggregator(init=lambda params: (), client_transform=_stack_transform, finalize=finalize)


def coordinate_median() -> Aggregator:
    """Coordinate-wise median of the present clients' updates (Yin et al. 2018).

    With an even number of clients the median is the mean of the two middle
    values (as ``numpy.median``). No client gives a zero update.

    Returns:
      An Aggregator with empty state; metric ``robust_num_clients``.
    """

    def median(rows, present, num_present):
        low = jnp.maximum(num_present - 1, 0) // 2
        high = num_present // 2

        def leaf_median(leaf):
            ordered = _sorted_present_first(leaf, present)
            lower = jax.lax.dynamic_index_in_dim(ordered, low, axis=0, keepdims=False)
            upper = jax.lax.dynamic_index_in_dim(ordered, high, axis=0, keepdims=False)
            value = lower + (upper - lower) / 2  # no overflow, exact when equal
            return jnp.where(num_present > 0, value, 0.0).astype(leaf.dtype)

        return jax.tree.map(leaf_median, rows), {}

    return _stacked_aggregator(median)


def trimmed_mean(trim_fraction: float) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    For each coordinate, the ``k = floor(trim_fraction * n)`` largest and
    ``k`` smallest of the ``n`` present clients' values are dropped and the
    remaining ``n - 2k >= 1`` are averaged.

    Args:
      trim_fraction: ``beta`` in [0, 0.5); 0 is the plain (unweighted) mean.

    Returns:
      An Aggregator with empty state; metrics ``robust_num_clients`` and
      ``trimmed_mean_num_trimmed`` (k, per side).

    Raises:
      ValueError: naming ``trim_fraction`` when it is outside [0, 0.5), which
        would trim every client.
    """
    trim_fraction = check_real(
        "trim_fraction", trim_fraction, minimum=0.0, maximum=0.5, strict_maximum=True
    )

    def mean_of_middle(rows, present, num_present):
        num_trimmed = jnp.floor(trim_fraction * num_present.astype(jnp.float32)).astype(jnp.int32)
        num_kept = num_present - 2 * num_trimmed
        positions = jnp.arange(present.shape[0], dtype=jnp.int32)
        kept = jnp.logical_and(positions >= num_trimmed, positions < num_present - num_trimmed)

        def leaf_mean(leaf):
            ordered = _sorted_present_first(leaf, present)
            total = jnp.sum(jnp.where(_rows_mask(kept, leaf), ordered, 0.0), axis=0)
            value = total / jnp.maximum(num_kept, 1).astype(total.dtype)
            return jnp.where(num_present > 0, value, 0.0).astype(leaf.dtype)

        metrics = {"trimmed_mean_num_trimmed": num_trimmed.astype(jnp.float32)}
        return jax.tree.map(leaf_mean, rows), metrics

    return _stacked_aggregator(mean_of_middle)


def pairwise_squared_distances(rows, present: jax.Array) -> jax.Array:
    """float32[n, n]: ``||x_i - x_j||^2`` over all leaves; ``inf`` off the present set.

    Computed as differences (one row against all at a time, under
    ``lax.map``), not through a Gram matrix whose cancellation in float32
    could reorder close scores. The diagonal is ``inf`` too, so that a row
    is never its own neighbour.
    """
    num_clients = present.shape[0]

    def distances_from(index):
        total = jnp.zeros((num_clients,), jnp.float32)
        for leaf in jax.tree.leaves(rows):
            flat = leaf.reshape(num_clients, -1).astype(jnp.float32)
            total = total + jnp.sum(jnp.square(flat - flat[index]), axis=1)
        return total

    distances = jax.lax.map(distances_from, jnp.arange(num_clients))
    valid = jnp.logical_and(present[:, None], present[None, :])
    valid = jnp.logical_and(valid, ~jnp.eye(num_clients, dtype=bool))
    return jnp.where(valid, distances, jnp.inf)


def krum(num_byzantine: int, num_selected: int = 1) -> Aggregator:
    """Krum, or Multi-Krum with ``num_selected > 1`` (Blanchard et al. 2017).

    With ``n`` present clients and ``f = num_byzantine`` assumed attackers,
    each client's score is the sum of squared distances to its ``n - f - 2``
    nearest other clients. Krum returns the update with the lowest score
    (ties: the first in cohort order); Multi-Krum averages the
    ``num_selected`` lowest-scoring updates (uniformly).

    Args:
      num_byzantine: ``f >= 0``, the number of attackers to tolerate; Krum
        needs ``n >= 2f + 3`` clients.
      num_selected: ``m >= 1`` updates averaged (1 is Krum). At most
        ``n - f``.

    Returns:
      An Aggregator with empty state. Metrics: ``robust_num_clients``,
      ``krum_num_selected``, ``krum_selected_index`` (cohort position of the
      best-scoring update) and ``krum_too_few_clients`` (1 when fewer than
      ``2f + 3`` clients were present, in which case the neighbour count is
      clamped to ``max(n - f - 2, 0)``).

    Raises:
      ValueError: naming the parameter for a negative ``num_byzantine`` or a
        non-positive ``num_selected``; when the round is traced, naming
        ``num_byzantine`` if the cohort has fewer than ``2f + 3`` clients, or
        ``num_selected`` if it exceeds ``num_clients - f``.
    """
    num_byzantine = check_int("num_byzantine", num_byzantine, minimum=0)
    num_selected = check_int("num_selected", num_selected, minimum=1)

    def check_cohort(num_rows):
        if num_rows < 2 * num_byzantine + 3:
            raise InvalidArgument(
                "num_byzantine",
                f"num_byzantine={num_byzantine} needs at least 2 * num_byzantine + 3 = "
                f"{2 * num_byzantine + 3} clients per round for Krum, got a cohort of {num_rows}",
            )
        if num_selected > num_rows - num_byzantine:
            raise InvalidArgument(
                "num_selected",
                f"num_selected={num_selected} exceeds num_clients - num_byzantine = "
                f"{num_rows - num_byzantine}",
            )

    def average_best(rows, present, num_present):
        num_rows = present.shape[0]
        check_cohort(num_rows)
        num_neighbours = jnp.maximum(num_present - num_byzantine - 2, 0)
        distances = jnp.sort(pairwise_squared_distances(rows, present), axis=1)
        positions = jnp.arange(num_rows, dtype=jnp.int32)
        nearest = positions[None, :] < num_neighbours
        scores = jnp.sum(jnp.where(nearest, distances, 0.0), axis=1)
        scores = jnp.where(present, scores, jnp.inf)
        order = jnp.argsort(scores, stable=True)
        rank = jnp.zeros((num_rows,), jnp.int32).at[order].set(positions)
        num_chosen = jnp.minimum(num_selected, num_present)
        chosen = jnp.logical_and(rank < num_chosen, present)

        def average_chosen(leaf):
            total = jnp.sum(jnp.where(_rows_mask(chosen, leaf), leaf, 0.0), axis=0)
            return (total / jnp.maximum(num_chosen, 1).astype(total.dtype)).astype(leaf.dtype)

        metrics = {
            "krum_num_selected": num_chosen.astype(jnp.float32),
            "krum_selected_index": order[0].astype(jnp.float32),
            "krum_too_few_clients": (num_present < 2 * num_byzantine + 3).astype(jnp.float32),
        }
        return jax.tree.map(average_chosen, rows), metrics

    return _stacked_aggregator(average_best)


def multi_krum(num_byzantine: int, num_selected: int) -> Aggregator:
    """Multi-Krum (Blanchard et al. 2017): :func:`krum` averaging ``num_selected`` updates."""
    return krum(num_byzantine, num_selected)


def norm_bounded_mean(max_norm: float) -> Aggregator:
    """Weighted mean of messages clipped to L2 norm ``max_norm`` (Sun et al. 2019).

    Bounds what one client (e.g. a boosted model-replacement attacker) can
    move the average by, at no privacy noise. The whole message (update and
    side channel) is clipped.

    Args:
      max_norm: ``M > 0``.

    Returns:
      An Aggregator with empty state; metrics ``total_weight`` and
      ``norm_bound_num_clipped``.

    Raises:
      ValueError: naming ``max_norm`` for a non-positive or infinite value.
    """
    max_norm = check_real("max_norm", max_norm, minimum=0.0, strict_minimum=True)

    def client_transform(payload, weight, state, rng):
        del state, rng
        clipped, norm = clip_by_global_norm(payload, max_norm)
        num_clipped = jnp.logical_and(weight > 0, norm > max_norm).astype(jnp.float32)
        return Contribution(summed={"clients": weigh(clipped, weight), "num_clipped": num_clipped})

    def finalize(contributions, state, rng):
        del rng
        summed = contributions.summed
        metrics = {
            "total_weight": summed["clients"].weight,
            "norm_bound_num_clipped": summed["num_clipped"],
        }
        return average(summed["clients"]), state, metrics

    return Aggregator(init=lambda params: (), client_transform=client_transform, finalize=finalize)
