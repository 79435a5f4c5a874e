"""DP-FedAvg: user-level differential privacy by clipping and Gaussian noise.

McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent
Language Models". ICLR 2018 (arXiv:1710.06963). Adaptive clipping: Andrew,
Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive
Clipping". NeurIPS 2021 (arXiv:1905.03871).

Each sampled client's model delta ``u_k`` is clipped to L2 norm ``C``::

    clip(u_k) = u_k * min(1, C / ||u_k||)

and the server adds Gaussian noise to the *sum* and divides by a **fixed
denominator**, the estimator ``f~_f`` of McMahan et al. 2018 (Section 3)::

    aggregate = (sum_k w_k clip(u_k) + N(0, (z C)^2 I)) / W_expected

with client weights ``w_k`` in [0, 1]: ``1`` for every participating client
(uniform weights, the default), or McMahan et al.'s capped weights
``min(n_k / weight_cap, 1)``. ``W_expected`` is the *expected* total weight of
a cohort (``qW`` in the paper; the expected cohort size with uniform weights),
not the realised one: dividing by the realised count would make the
denominator depend on who was sampled and leak it under Poisson sampling. One
user changes the noised sum by at most ``C`` (weights are at most 1), so a
round is the sampled Gaussian mechanism with noise multiplier ``z``, which
:mod:`fedjaxsim.privacy.accounting` accounts for.

Adaptive clipping (Andrew et al. 2021, Algorithm 1) tracks the
``target_quantile`` of the update norms geometrically::

    b_k = 1[||u_k|| <= C]
    b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2   # m: expected cohort size
    C <- C * exp(-learning_rate * (b~ - target_quantile))

The clipped-count query has its own noise ``sigma_b``. The update noise is
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that both queries together are
one Gaussian mechanism with the configured noise multiplier ``z`` (their
Theorem 1): account with ``z``.

``noise_cohort_size`` (as in pfl-research): simulate a small cohort but add
the noise a deployment with ``noise_cohort_size`` clients per round would add
to the *average*: the noise on the sum is scaled by
``expected_cohort_size / noise_cohort_size``. The metrics then carry
``dp_noise_cohort_size`` (and ``dp_simulated_cohort_size``), and the privacy
guarantee is the deployment's: account with ``cohort_size=noise_cohort_size``.

The clipped vector is a client's whole message: its update and its side
channel together (SCAFFOLD's control delta, FedNova's step normaliser, ...),
so the aggregator privatises every algorithm, not only FedAvg. Side means are
divided by the fixed denominator like the update; side sums are not.

DP-FTRL (``mechanism="tree"``; Kairouz, McMahan, Song, Thakkar, Thakurta,
Xu, "Practical and Private (Deep) Learning without Sampling or Shuffling",
ICML 2021, arXiv:2103.00039) replaces the independent noise of every round by
tree aggregation, restarted every ``tree_size`` rounds. Round ``t`` (1-based
within tree ``k = round // tree_size``) releases the clipped sum plus the
*increment* ``noise_prefix(t) - noise_prefix(t - 1)``, where
``noise_prefix(t)`` is the sum of the dyadic nodes of ``t``'s binary
decomposition (node ``(level i, index j)`` covers rounds
``j 2^i + 1 .. (j + 1) 2^i`` of the tree and is ``N(0, (z C)^2 I)``). The prefix
sums of the released sums, what FTRL (server SGD at a constant rate) applies
to the model, then carry exactly the tree's noise: ``popcount(t)`` nodes
instead of ``t`` independent draws. Every node is a pure function of
``(tree_seed, k, i, j)``, so a node added in one round is subtracted exactly in
a later one. Clip norms must stay fixed within a tree for that cancellation,
so adaptive clipping is refused with the tree. The accounting (tree
aggregation RDP, each client at most once per tree) is in
:mod:`fedjaxsim.privacy.accounting`.

Everything per client (clipping, weights, clipped-count bits) runs in the
aggregator's ``client_transform`` under the engine's vmap; contributions are
plain sums (a padding or zero-weight client contributes exact zeros), so the
aggregation is the same when the client axis is sharded. Noise is drawn once,
on the server, in ``finalize``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.aggregators import Aggregator, Contribution, average, weigh
from fedjaxsim.core.algorithm import Algorithm, with_aggregator
from fedjaxsim.core.trees import clip_by_global_norm, split_like
from fedjaxsim.core.types import PerExampleLossFn, PyTree
from fedjaxsim.core.validation import InvalidArgument, check_choice, check_int, check_real


class EpsilonSchedule(NamedTuple):
    """Cumulative privacy spent after each round, for the per-round metrics.

    Built by :func:`fedjaxsim.privacy.accounting.epsilon_schedule`.
    """

    epsilons: np.ndarray  # float64[num_rounds]: epsilon after rounds 1, 2, ..., num_rounds
    delta: float  # the delta every epsilon is reported at


class AdaptiveClipping(NamedTuple):
    """Hyper-parameters of quantile-tracking clipping (Andrew et al. 2021).

    Attributes:
      target_quantile: the fraction ``gamma`` of client updates that should
        end up unclipped, in (0, 1). The paper's default is 0.5 (the median).
      learning_rate: ``eta_C`` of the geometric update, > 0 (paper: 0.2).
      clipped_count_stddev: ``sigma_b``, the noise on the count of unclipped
        clients; ``None`` uses the paper's ``expected_cohort_size / 20`` (0
        when ``noise_multiplier`` is 0). Must exceed ``noise_multiplier / 2``
        (the update noise pays for the rest).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    clipped_count_stddev: float | None = None


MECHANISMS = ("gaussian", "tree")


class DpAggregatorState(NamedTuple):
    clip_norm: jax.Array  # float32[]: the clip norm C used by the next round
    denominator: jax.Array  # float32[]: the fixed denominator, the expected total weight
    # int32[]: rounds aggregated so far (indexes the epsilon schedule; the
    # tree mechanism's tree index and round within the tree derive from it)
    round: jax.Array


def add_noise(tree: PyTree, noise: PyTree) -> PyTree:
    """``tree + noise``, leaf by leaf, in ``tree``'s dtypes."""
    return jax.tree.map(lambda leaf, leaf_noise: leaf + leaf_noise.astype(leaf.dtype), tree, noise)


def add_gaussian_noise(tree: PyTree, stddev, rng: jax.Array) -> PyTree:
    """``tree`` plus independent ``N(0, stddev^2)`` noise on every element."""
    size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
    return add_noise(tree, split_like(stddev * jax.random.normal(rng, (size,), jnp.float32), tree))


def tree_num_levels(tree_size: int) -> int:
    """``ceil(log2(tree_size + 1))``: the levels of a tree of ``tree_size`` leaves."""
    return int(tree_size).bit_length()


def _lowest_set_bit(value: jax.Array) -> jax.Array:
    """The position of ``value``'s lowest set bit (``value >= 1``), int32[]."""
    return jax.lax.population_count((value & -value) - 1)


def tree_noise_increment(
    tree_seed: int,
    tree_index,
    tree_round,
    *,
    size: int,
    tree_size: int,
    stddev,
) -> jax.Array:
    """``noise_prefix(t) - noise_prefix(t - 1)`` of one tree, a flat vector.

    ``noise_prefix(t) = sum_i 1[bit i of t] node(i, (t >> i) - 1)``, where node
    ``(i, j)`` of tree ``k`` is ``stddev * normal(key, (size,))`` with
    ``key = fold_in(fold_in(fold_in(key(tree_seed), k), i), j)``. Between
    ``t - 1`` and ``t`` only the node at ``t``'s lowest set bit ``b`` is added
    and the nodes of ``t - 1`` below ``b`` are removed; the nodes above ``b``
    are common and are not drawn. The loop runs over the static
    ``tree_num_levels(tree_size)`` levels; those above ``b`` skip their draw
    (``lax.cond``).

    Args:
      tree_seed: the seed of every tree's nodes (a Python int).
      tree_index: ``k``, the tree (int32[] or int).
      tree_round: ``t`` in ``1..tree_size``, the round within the tree.
      size: the length of the flat noise vector.
      tree_size: the rounds per tree (sets the number of levels).
      stddev: the standard deviation of every node's coordinates.

    Returns:
      float32[size].
    """
    tree_round = jnp.asarray(tree_round, jnp.int32)
    tree_key = jax.random.fold_in(jax.random.key(tree_seed), tree_index)
    lowest = _lowest_set_bit(tree_round)

    def add_level(level, increment):
        added = level == lowest  # the new node, ending at round t
        removed = level < lowest  # a node of t - 1 that t's new node covers
        index = jnp.where(added, (tree_round >> level) - 1, ((tree_round - 1) >> level) - 1)
        node_key = jax.random.fold_in(jax.random.fold_in(tree_key, level), jnp.maximum(index, 0))
        node = jax.lax.cond(
            jnp.logical_or(added, removed),
            lambda key: jax.random.normal(key, (size,), jnp.float32),
            lambda key: jnp.zeros((size,), jnp.float32),
            node_key,
        )
        return increment + jnp.where(added, 1.0, jnp.where(removed, -1.0, 0.0)) * node

    # A loop, not one unrolled draw per level: one PRNG kernel to compile.
    increment = jax.lax.fori_loop(
        0, tree_num_levels(tree_size), add_level, jnp.zeros((size,), jnp.float32)
    )
    return stddev * increment


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """``z_delta`` of Andrew et al. 2021: the update noise left once the count is noised.

    Args:
      noise_multiplier: the total noise multiplier ``z`` (what is accounted for).
      clipped_count_stddev: ``sigma_b``, noise on the unclipped-client count.

    Returns:
      ``(z^-2 - (2 sigma_b)^-2)^(-1/2)``, or 0 when ``z == 0``.

    Raises:
      ValueError: when ``2 sigma_b <= z`` (the count alone would spend the budget).
    """
    if noise_multiplier == 0:
        return 0.0
    if not 2.0 * clipped_count_stddev > noise_multiplier:
        raise InvalidArgument(
            "clipped_count_stddev",
            f"clipped_count_stddev must exceed noise_multiplier / 2 = {noise_multiplier / 2!r} "
            f"for adaptive clipping, got {clipped_count_stddev!r} (the default is the expected "
            "cohort / 20); raise it, sample more clients a round, or use less noise",
        )
    return (noise_multiplier**-2 - (2.0 * clipped_count_stddev) ** -2) ** -0.5


def dp_fed_avg_aggregator(
    clip_norm: float,
    noise_multiplier: float,
    expected_cohort_size: float,
    *,
    weight_cap: float | None = None,
    expected_total_weight: float | None = None,
    adaptive_clipping: AdaptiveClipping | None = None,
    noise_cohort_size: int | None = None,
    epsilon_schedule: EpsilonSchedule | None = None,
    mechanism: str = "gaussian",
    tree_size: int | None = None,
    tree_seed: int = 0,
) -> Aggregator:
    """The DP-FedAvg aggregator (fixed-denominator estimator; see the module doc).

    Args:
      clip_norm: the L2 clip norm ``C > 0`` (the initial one with adaptive
        clipping); ``inf`` disables clipping (and privacy; only without noise).
      noise_multiplier: ``z >= 0``; the noise on the sum has standard
        deviation ``z * C``.
      expected_cohort_size: ``m > 0``, the expected number of clients per
        round (the cohort size under fixed-size sampling, ``qN`` under Poisson).
      weight_cap: ``None`` gives every participating client weight 1;
        a number ``> 0`` gives ``min(weight / weight_cap, 1)`` (McMahan et al.
        2018's capped example counts, with the engine's client weight).
      expected_total_weight: the fixed denominator ``qW``; defaults to
        ``expected_cohort_size`` and is required with ``weight_cap``.
      adaptive_clipping: track a quantile of the update norms (Andrew et al.).
      noise_cohort_size: calibrate the noise for this many clients per round
        instead of ``expected_cohort_size`` (must be >= it); labelled in the
        metrics. Account with ``cohort_size=noise_cohort_size``.
      epsilon_schedule: from :func:`fedjaxsim.privacy.accounting.epsilon_schedule`;
        when given, round ``r``'s metrics carry ``dp_epsilon`` (spent after it;
        NaN past the schedule's end) and ``dp_delta``.
      mechanism: ``"gaussian"`` (independent noise every round, DP-FedAvg) or
        ``"tree"`` (tree-aggregated noise, DP-FTRL; see the module doc).
      tree_size: rounds per tree, the restart period; required with the tree.
      tree_seed: the seed of the tree's nodes (tree only): every node must be
        drawn again, identically, in the later round that removes it, so the
        nodes come from this seed, not from the round's rng.

    Returns:
      An :class:`~fedjaxsim.core.aggregators.Aggregator` whose state is
      :class:`DpAggregatorState`. Server metrics: ``dp_clip_norm`` (the C
      used), ``dp_noise_stddev_on_sum``, ``dp_noise_stddev_on_mean``,
      ``dp_num_clients``, ``dp_num_clipped``, ``dp_clipped_fraction``; plus
      ``dp_unclipped_fraction_estimate`` and ``dp_next_clip_norm`` with
      adaptive clipping, ``dp_noise_cohort_size`` and
      ``dp_simulated_cohort_size`` with ``noise_cohort_size``, and
      ``dp_epsilon``/``dp_delta`` with a schedule; ``dp_tree_round`` (``t``,
      1-based within the tree) and ``dp_tree_index`` (``k``) with the tree,
      whose ``dp_noise_stddev_on_sum`` is that of one tree node (the prefix
      sum after ``t`` rounds of a tree carries ``popcount(t)`` nodes).

    Raises:
      ValueError: naming the parameter, for a non-positive ``clip_norm`` (or
        an infinite one with noise), a negative ``noise_multiplier``, a
        non-positive cohort size or weight, a ``noise_cohort_size`` below
        ``expected_cohort_size``, adaptive clipping hyper-parameters out of
        range or a clipped-count noise too small for the noise multiplier, an
        unknown mechanism, a missing or non-positive ``tree_size`` with the
        tree (or one given with the Gaussian), or adaptive clipping with the tree.
    """
    clip_norm = check_real("clip_norm", clip_norm, minimum=0.0, strict_minimum=True, allow_inf=True)
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, minimum=0.0)
    if noise_multiplier > 0 and math.isinf(clip_norm):
        # The noise is z * C: infinite, and every aggregate would be NaN.
        raise InvalidArgument(
            "clip_norm",
            f"clip_norm must be finite when noise_multiplier > 0 (the noise stddev is "
            f"noise_multiplier * clip_norm), got clip_norm={clip_norm!r}, "
            f"noise_multiplier={noise_multiplier!r}",
        )
    expected_cohort_size = check_real(
        "expected_cohort_size", expected_cohort_size, minimum=0.0, strict_minimum=True
    )
    if weight_cap is not None:
        weight_cap = check_real("weight_cap", weight_cap, minimum=0.0, strict_minimum=True)
        if expected_total_weight is None:
            raise InvalidArgument(
                "expected_total_weight",
                "expected_total_weight (the fixed denominator qW) is required with weight_cap",
            )
    if expected_total_weight is None:
        expected_total_weight = expected_cohort_size
    expected_total_weight = check_real(
        "expected_total_weight", expected_total_weight, minimum=0.0, strict_minimum=True
    )
    mechanism = check_choice("mechanism", mechanism, MECHANISMS)
    if mechanism == "tree":
        if tree_size is None:
            raise InvalidArgument(
                "tree_size",
                "tree_size (rounds per tree, the restart period) is required with mechanism='tree'",
            )
        tree_size = check_int("tree_size", tree_size, minimum=1)
        tree_seed = check_int("tree_seed", tree_seed, minimum=0)
        if adaptive_clipping is not None:
            raise InvalidArgument(
                "adaptive_clipping",
                "adaptive_clipping cannot be combined with mechanism='tree': a tree's nodes "
                "cancel between rounds only at a fixed clip norm, and the clipped-count query "
                "has no tree accounting; use a fixed clip_norm with the tree, or "
                "mechanism='gaussian'",
            )
    elif tree_size is not None:
        raise InvalidArgument(
            "tree_size",
            f"tree_size is for mechanism='tree' only, got tree_size={tree_size!r} with "
            "mechanism='gaussian'; remove it or use mechanism='tree'",
        )
    noise_scale = 1.0
    if noise_cohort_size is not None:
        noise_cohort_size = check_int("noise_cohort_size", noise_cohort_size, minimum=1)
        if noise_cohort_size < expected_cohort_size:
            raise InvalidArgument(
                "noise_cohort_size",
                f"noise_cohort_size must be >= expected_cohort_size ({expected_cohort_size!r}), "
                f"got {noise_cohort_size!r}",
            )
        noise_scale = expected_cohort_size / noise_cohort_size
    update_multiplier = noise_multiplier
    count_stddev = 0.0
    if adaptive_clipping is not None:
        if math.isinf(clip_norm):
            raise InvalidArgument("clip_norm", "clip_norm must be finite with adaptive_clipping")
        check_real(
            "adaptive_clipping.target_quantile",
            adaptive_clipping.target_quantile,
            minimum=0.0,
            maximum=1.0,
            strict_minimum=True,
            strict_maximum=True,
        )
        check_real(
            "adaptive_clipping.learning_rate",
            adaptive_clipping.learning_rate,
            minimum=0.0,
            strict_minimum=True,
        )
        count_stddev = adaptive_clipping.clipped_count_stddev
        if count_stddev is None:  # the paper's choice; no noise in a non-private run
            count_stddev = expected_cohort_size / 20.0 if noise_multiplier > 0 else 0.0
        count_stddev = check_real(
            "adaptive_clipping.clipped_count_stddev", count_stddev, minimum=0.0
        )
        update_multiplier = update_noise_multiplier(noise_multiplier, count_stddev)
    if epsilon_schedule is not None:
        epsilons = jnp.asarray(epsilon_schedule.epsilons, jnp.float32)
        if epsilons.ndim != 1 or epsilons.shape[0] < 1:
            raise InvalidArgument(
                "epsilon_schedule",
                f"epsilon_schedule.epsilons must be float[num_rounds], got shape {epsilons.shape}",
            )

    def tree_noise(payload, round_index, stddev):
        """The tree's noise increment for the round, shaped like ``payload``."""
        size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(payload))
        flat = tree_noise_increment(
            tree_seed,
            round_index // tree_size,
            round_index % tree_size + 1,
            size=size,
            tree_size=tree_size,
            stddev=stddev,
        )
        return split_like(flat, payload)

    def init(params):
        del params
        # The denominator is state, not a closure constant: XLA would turn a
        # division by a constant into a multiplication by its (rounded)
        # reciprocal, and the mean would no longer equal FedAvg's bit for bit.
        return DpAggregatorState(
            clip_norm=jnp.asarray(clip_norm, jnp.float32),
            denominator=jnp.asarray(expected_total_weight, jnp.float32),
            round=jnp.zeros((), jnp.int32),
        )

    def client_transform(payload, weight, state: DpAggregatorState, rng):
        del rng
        present = weight > 0
        if weight_cap is None:
            dp_weight = present.astype(jnp.float32)
        else:
            dp_weight = jnp.where(present, jnp.minimum(weight / weight_cap, 1.0), 0.0)
        clipped, norm = clip_by_global_norm(payload, state.clip_norm)
        unclipped = jnp.logical_and(present, norm <= state.clip_norm)
        as_float = lambda condition: condition.astype(jnp.float32)  # noqa: E731
        return Contribution(
            summed={
                "clients": weigh(clipped, dp_weight),
                "num_clients": as_float(present),
                "num_clipped": as_float(jnp.logical_and(present, ~unclipped)),
                # Andrew et al. count b_k - 1/2 so that one user moves it by 1/2.
                "centered_unclipped": jnp.where(present, as_float(unclipped) - 0.5, 0.0),
            }
        )

    def finalize(contributions, state: DpAggregatorState, rng):
        reduced = contributions.summed
        update_rng, count_rng = jax.random.split(rng)
        clients = reduced["clients"]
        if update_multiplier > 0:
            noise_stddev = update_multiplier * noise_scale * state.clip_norm
            if mechanism == "tree":
                noise = tree_noise(clients.payload, state.round, noise_stddev)
                clients = clients._replace(payload=add_noise(clients.payload, noise))
            else:
                clients = clients._replace(
                    payload=add_gaussian_noise(clients.payload, noise_stddev, update_rng)
                )
        else:  # not 0 * C, which is NaN for an infinite C
            noise_stddev = jnp.zeros((), jnp.float32)
        aggregate = average(clients, state.denominator)
        num_clients = reduced["num_clients"]
        metrics = {
            "dp_clip_norm": state.clip_norm,
            "dp_noise_stddev_on_sum": jnp.asarray(noise_stddev, jnp.float32),
            "dp_noise_stddev_on_mean": noise_stddev / state.denominator,
            "dp_num_clients": num_clients,
            "dp_num_clipped": reduced["num_clipped"],
            "dp_clipped_fraction": reduced["num_clipped"] / jnp.maximum(num_clients, 1.0),
        }
        new_clip_norm = state.clip_norm
        if adaptive_clipping is not None:
            noisy_count = reduced["centered_unclipped"]
            if count_stddev > 0:
                noisy_count = noisy_count + count_stddev * jax.random.normal(
                    count_rng, (), jnp.float32
                )
            unclipped_fraction = noisy_count / expected_cohort_size + 0.5
            new_clip_norm = state.clip_norm * jnp.exp(
                -adaptive_clipping.learning_rate
                * (unclipped_fraction - adaptive_clipping.target_quantile)
            )
            metrics["dp_unclipped_fraction_estimate"] = unclipped_fraction
            metrics["dp_next_clip_norm"] = new_clip_norm
        if mechanism == "tree":  # float32 like every statistic (exact below 2**24)
            metrics["dp_tree_round"] = (state.round % tree_size + 1).astype(jnp.float32)
            metrics["dp_tree_index"] = (state.round // tree_size).astype(jnp.float32)
        if noise_cohort_size is not None:
            metrics["dp_noise_cohort_size"] = jnp.asarray(noise_cohort_size, jnp.float32)
            metrics["dp_simulated_cohort_size"] = jnp.asarray(expected_cohort_size, jnp.float32)
        if epsilon_schedule is not None:
            index = jnp.minimum(state.round, epsilons.shape[0] - 1)
            metrics["dp_epsilon"] = jnp.where(
                state.round < epsilons.shape[0], epsilons[index], jnp.nan
            )
            metrics["dp_delta"] = jnp.asarray(epsilon_schedule.delta, jnp.float32)
        new_state = DpAggregatorState(new_clip_norm, state.denominator, state.round + 1)
        return aggregate, new_state, metrics

    return Aggregator(init=init, client_transform=client_transform, finalize=finalize)


def dp_fed_avg(
    per_example_loss_fn: PerExampleLossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    **dp_options,
) -> Algorithm:
    """DP-FedAvg (McMahan et al. 2018): FedAvg with the DP-FedAvg aggregator.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      client_optimizer: optax transform for local steps.
      server_optimizer: optax transform on the noised average (default
        ``sgd(1.0)``; McMahan et al. 2018 also use server momentum).
      **dp_options: the arguments of :func:`dp_fed_avg_aggregator`
        (``clip_norm``, ``noise_multiplier``, ``expected_cohort_size``, ...).

    Returns:
      ``with_aggregator(fed_avg(...), dp_fed_avg_aggregator(**dp_options))``;
      the DP state lives in ``ServerState.aggregator_state``. Any other
      algorithm is made private the same way.
    """
    return with_aggregator(
        fed_avg(per_example_loss_fn, client_optimizer, server_optimizer),
        dp_fed_avg_aggregator(**dp_options),
    )
