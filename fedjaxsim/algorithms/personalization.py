"""Personalization evaluation: fine-tune on each client, then evaluate it.

The protocol of the personalization literature (for example Wang et al.,
"Federated Evaluation of On-device Personalization", arXiv:1910.10252, and
the evaluation of Ditto, Li et al., ICML 2021): start from a model (the
global model, or a client's own personal model), take ``k`` local SGD steps on
the client's *training* data, evaluate on the client's *test* data, and
report the distribution of the per-client metrics rather than one pooled
number, since personalization is about the clients that the global model
serves worst.

Usage::

    train, test = pack_for_personalization(train_clients, test_clients, ids,
                                           num_finetune_steps=5, batch_size=10)
    evaluate = build_personalized_evaluation(loss_fn, learning_rate=0.05)
    per_client = evaluate(params, train, test, rng)   # {"loss": float32[num_clients], ...}
    summary = summarize_over_clients(per_client["loss"])

Everything returns JAX arrays; the runner turns them into floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjaxsim.algorithms.common import check_number, sgd_step
from fedjaxsim.algorithms.fed_avg import masked_mean_loss
from fedjaxsim.core.client_batch import Cohort
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.types import PerExampleLossFn

# (params, batch) -> float32[batch_size]: one value per example.
PerExampleMetricFn = Callable[..., jax.Array]


class ClientDistribution(NamedTuple):
    """A metric's distribution over clients (all float32[])."""

    mean: jax.Array  # float32[]: mean over clients
    percentile_10: jax.Array  # float32[]: 10th percentile over clients
    percentile_50: jax.Array  # float32[]: median over clients
    percentile_90: jax.Array  # float32[]: 90th percentile over clients
    worst_10_percent_mean: jax.Array  # float32[]: mean of the worst ceil(10%) of clients


def summarize_over_clients(values, higher_is_better: bool = False) -> ClientDistribution:
    """Summarises one value per client.

    Args:
      values: float[num_clients], e.g. each client's test loss.
      higher_is_better: True for metrics like accuracy, where the worst
        clients are those with the *lowest* values.

    Returns:
      A :class:`ClientDistribution`. Percentiles interpolate linearly, as
      ``numpy.percentile`` does.

    Raises:
      ValueError: for an empty or non-vector ``values``.
    """
    values = jnp.asarray(values, jnp.float32)
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(f"values must be a non-empty vector, got shape {values.shape}")
    num_worst = max(1, math.ceil(0.1 * values.shape[0]))
    ordered = jnp.sort(values)
    worst = ordered[:num_worst] if higher_is_better else ordered[-num_worst:]
    p10, p50, p90 = jnp.percentile(values, jnp.array([10.0, 50.0, 90.0]))
    return ClientDistribution(jnp.mean(values), p10, p50, p90, jnp.mean(worst))


def pack_for_personalization(
    train_clients: Sequence[Mapping[str, np.ndarray]],
    test_clients: Sequence[Mapping[str, np.ndarray]],
    client_ids: Sequence[int],
    *,
    num_finetune_steps: int,
    batch_size: int,
    eval_batch_size: int | None = None,
    seed: int = 0,
    round_index: int = 0,
    num_total_clients: int | None = None,
) -> tuple[Cohort | None, Cohort]:
    """Packs each client's training and test data (host NumPy).

    Args:
      train_clients: per client, the arrays it fine-tunes on.
      test_clients: per client (same order), the arrays it is evaluated on.
      client_ids: population ids (shuffling seeds and per-client RNG).
      num_finetune_steps: ``k >= 0`` local steps; every client takes exactly
        ``k`` (re-shuffled epochs as needed). ``0`` means no fine-tuning.
      batch_size: fine-tuning batch size.
      eval_batch_size: test batch size; defaults to ``batch_size``.
      seed, round_index: shuffling seeds of the fine-tuning batches.
      num_total_clients: population size; defaults to ``max(client_ids) + 1``.

    Returns:
      ``(train_cohort, test_cohort)``, one client per lane and in the order of
      ``client_ids``; ``train_cohort`` is None when ``num_finetune_steps`` is 0.

    Raises:
      ValueError: for mismatched lengths or a negative step count, and
        whatever :func:`~fedjaxsim.core.packing.pack_cohort` rejects.
    """
    if len(train_clients) != len(test_clients) or len(train_clients) != len(client_ids):
        raise ValueError(
            f"got {len(train_clients)} train clients, {len(test_clients)} test clients and "
            f"{len(client_ids)} client ids; they must match"
        )
    if (
        isinstance(num_finetune_steps, bool)
        or not isinstance(num_finetune_steps, int)
        or num_finetune_steps < 0
    ):
        raise ValueError(f"num_finetune_steps must be an int >= 0, got {num_finetune_steps!r}")
    if num_total_clients is None:
        num_total_clients = int(max(client_ids)) + 1
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    test_config = PackingConfig(
        batch_size=eval_batch_size, shuffle=False, step_bucket="exact", weighting="num_examples"
    )
    test = pack_cohort(
        test_clients,
        client_ids,
        test_config,
        seed=seed,
        round_index=round_index,
        num_total_clients=num_total_clients,
    )
    if num_finetune_steps == 0:
        return None, test
    fewest_batches = min(
        math.ceil(len(next(iter(client.values()))) / batch_size) for client in train_clients
    )
    train_config = PackingConfig(
        batch_size=batch_size,
        num_epochs=math.ceil(num_finetune_steps / fewest_batches),
        max_steps=num_finetune_steps,
        step_bucket="exact",
        weighting="uniform",
    )
    train = pack_cohort(
        train_clients,
        client_ids,
        train_config,
        seed=seed,
        round_index=round_index,
        num_total_clients=num_total_clients,
        num_steps=num_finetune_steps,
    )
    return train, test


def build_personalized_evaluation(
    per_example_loss_fn: PerExampleLossFn,
    learning_rate: float,
    eval_metric_fns: Mapping[str, PerExampleMetricFn] | None = None,
    params_per_client: bool = False,
    clients_per_chunk: int | None = None,
):
    """Builds a jitted fine-tune-then-evaluate function over clients.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``,
        the fine-tuning loss.
      learning_rate: fine-tuning SGD step size ``>= 0``.
      eval_metric_fns: name -> ``(params, batch) -> float32[batch_size]``,
        averaged over each client's test examples. Defaults to
        ``{"loss": per_example_loss_fn}`` called with a fixed key; pass
        eval-mode functions for models with dropout.
      params_per_client: False: every client starts from the same params
        (the global model). True: ``params`` has a leading ``[num_clients]``
        axis, e.g. Ditto personal models gathered from a client-state store.
      clients_per_chunk: clients fine-tuned together under one vmap (a
        ``lax.map`` over chunks bounds memory); None: all at once.

    Returns:
      ``evaluate(params, train_cohort, test_cohort, rng)`` returning a dict
      of float32[num_clients]: each metric's mean over the client's test
      examples after fine-tuning, plus ``num_examples``. ``train_cohort`` may
      be None (no fine-tuning). Cohorts come from
      :func:`pack_for_personalization`.

    Raises:
      ValueError: for an invalid ``learning_rate`` or ``clients_per_chunk``,
        and (when called) cohorts with several clients per lane or different
        client counts.
    """
    check_number("learning_rate", learning_rate, minimum=0.0)
    if clients_per_chunk is not None and (
        isinstance(clients_per_chunk, bool)
        or not isinstance(clients_per_chunk, int)
        or clients_per_chunk < 1
    ):
        raise ValueError(
            f"clients_per_chunk must be None or a positive int, got {clients_per_chunk!r}"
        )

    def default_loss(params, batch):
        return per_example_loss_fn(params, batch, jax.random.key(0))

    metric_fns = {"loss": default_loss} if eval_metric_fns is None else dict(eval_metric_fns)

    def fine_tune(params, data, mask, client_rng):
        def step(params, inputs):
            batch, step_mask, step_index = inputs
            step_rng = jax.random.fold_in(client_rng, step_index)
            grads = jax.grad(
                lambda p: masked_mean_loss(per_example_loss_fn, p, batch, step_mask, step_rng)[0]
            )(params)
            new_params = sgd_step(params, grads, learning_rate)
            # An all-padding step leaves the model exactly unchanged.
            keep = jnp.any(step_mask)
            return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_params, params), None

        steps = jnp.arange(mask.shape[0], dtype=jnp.int32)
        params, _ = jax.lax.scan(step, params, (data, mask, steps))
        return params

    def evaluate_client(params, data, mask):
        def body(sums, inputs):
            batch, batch_mask = inputs
            sums = dict(sums)
            for name, metric_fn in metric_fns.items():
                values = metric_fn(params, batch).astype(jnp.float32)
                sums[name] = sums[name] + jnp.sum(jnp.where(batch_mask, values, 0.0))
            sums["num_examples"] = sums["num_examples"] + jnp.sum(batch_mask, dtype=jnp.float32)
            return sums, None

        zero = jnp.zeros((), jnp.float32)
        sums, _ = jax.lax.scan(
            body, {name: zero for name in [*metric_fns, "num_examples"]}, (data, mask)
        )
        count = jnp.maximum(sums["num_examples"], 1.0)
        return {
            name: (sums[name] / count if name != "num_examples" else sums[name]) for name in sums
        }

    @jax.jit
    def evaluate(params, train_cohort: Cohort | None, test_cohort: Cohort, rng):
        for name, cohort in (("train_cohort", train_cohort), ("test_cohort", test_cohort)):
            if cohort is not None and cohort.clients_per_lane != 1:
                raise ValueError(f"{name} must have one client per lane (pack with num_lanes=None)")
        num_clients = test_cohort.num_clients
        if train_cohort is not None and train_cohort.num_clients != num_clients:
            raise ValueError(
                f"train_cohort has {train_cohort.num_clients} clients, test_cohort {num_clients}"
            )
        client_ids = jnp.asarray(test_cohort.client_id, jnp.int32)

        def one_client(inputs):
            client_params, client_id, train_data, train_mask, test_data, test_mask = inputs
            if train_data is not None:
                client_rng = jax.random.fold_in(rng, client_id)
                client_params = fine_tune(client_params, train_data, train_mask, client_rng)
            return evaluate_client(client_params, test_data, test_mask)

        inputs = (
            params if params_per_client else None,
            client_ids,
            None if train_cohort is None else train_cohort.data,
            None if train_cohort is None else jnp.asarray(train_cohort.mask, bool),
            test_cohort.data,
            jnp.asarray(test_cohort.mask, bool),
        )
        if params_per_client:
            per_client = one_client
        else:

            def per_client(client_inputs):
                return one_client((params, *client_inputs[1:]))

        if clients_per_chunk is None:
            return jax.vmap(per_client)(inputs)
        return jax.lax.map(per_client, inputs, batch_size=clients_per_chunk)

    return evaluate
