"""Personalization evaluation: fine-tune on each client, then evaluate it.

The protocol of the personalization literature (for example Wang et al.,
"Federated Evaluation of On-device Personalization", arXiv:1910.10252, and
the evaluation of Ditto, Li et al., ICML 2021): start from a model (the
global model, or a client's own personal model), take ``k`` local SGD steps on
the client's *training* data, evaluate on the client's *test* data, and
report the distribution of the per-client metrics rather than one pooled
number, since personalization is about the clients that the global model
serves worst.

It runs on the engine, like training: :func:`personalized_evaluation` is an
algorithm whose local steps fine-tune on the training batches and then sum
the metrics over the test batches of the same client
(``fedjaxsim.core.packing.pack_fine_tune_then_test`` lays them out one after
the other, with an ``is_test`` flag per example), and whose server half
leaves the model unchanged. Vmap, chunking and sharding are the engine's::

    cohort = pack_fine_tune_then_test(train_clients, test_clients, ids,
                                      num_finetune_steps=5, batch_size=10, ...)
    algorithm = personalized_evaluation(loss_fn, learning_rate=0.05)
    _, out = build_round(algorithm, plan)(algorithm.init(params), cohort, rng)
    per_client = per_client_means(out.client_metrics)   # {"loss": float32[num_clients]}
    summary = client_distribution(per_client["loss"], higher_is_better=False)

With ``personal=True`` each client starts from its own model, passed as
``client_states`` (params with a leading ``[num_clients]`` axis, e.g. Ditto's
personal models gathered from its store).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg, local_loss_and_grads
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.packing import TEST_FLAG
from fedjaxsim.core.trees import sgd_step, tree_zeros_like
from fedjaxsim.core.types import PerExampleLossFn, PyTree
from fedjaxsim.core.validation import check_real

# (params, batch) -> float32[batch_size]: one value per example.
PerExampleMetricFn = Callable[..., jax.Array]

NUM_TEST_EXAMPLES = "num_test_examples"


class FineTuneState(NamedTuple):
    params: PyTree  # the client's model, fine-tuned over the training steps


def personalized_evaluation(
    per_example_loss_fn: PerExampleLossFn,
    learning_rate: float,
    eval_metric_fns: Mapping[str, PerExampleMetricFn] | None = None,
    personal: bool = False,
) -> Algorithm:
    """Fine-tune-then-evaluate as an algorithm for the engine.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``,
        the fine-tuning loss.
      learning_rate: fine-tuning SGD step size ``>= 0``.
      eval_metric_fns: name -> ``(params, batch) -> float32[batch_size]``,
        summed over each client's test examples. Defaults to
        ``{"loss": per_example_loss_fn}`` called with a fixed key; pass
        eval-mode functions for models with dropout.
      personal: start each client from its own params, given as
        ``client_states``, instead of the broadcast model.

    Returns:
      An :class:`~fedjaxsim.core.algorithm.Algorithm` whose client metrics hold ``<name>_sum`` per
      metric and ``num_test_examples`` (:func:`per_client_means` divides
      them), and whose server state never changes.

    Raises:
      ValueError: for an invalid ``learning_rate``.
    """
    check_real("learning_rate", learning_rate, minimum=0.0)
    metric_fns = dict(eval_metric_fns or {})
    if not metric_fns:
        metric_fns["loss"] = lambda params, batch: per_example_loss_fn(
            params, batch, jax.random.key(0)
        )
    base = fed_avg(per_example_loss_fn, optax.sgd(learning_rate))

    def client_init(server_params, client_state, rng) -> FineTuneState:
        del rng
        return FineTuneState(client_state if personal else server_params)

    def client_step(local: FineTuneState, batch, mask, rng):
        is_test = batch[TEST_FLAG]
        test_mask = jnp.logical_and(mask, is_test)
        model_batch = {name: value for name, value in batch.items() if name != TEST_FLAG}
        # A test step has no training example: its gradient is exactly zero.
        train_mask = jnp.logical_and(mask, ~is_test)
        _, grads = local_loss_and_grads(
            per_example_loss_fn, local.params, model_batch, train_mask, rng
        )
        stats = {
            f"{name}_sum": jnp.sum(jnp.where(test_mask, fn(local.params, model_batch), 0.0))
            for name, fn in metric_fns.items()
        }
        stats[NUM_TEST_EXAMPLES] = jnp.sum(test_mask, dtype=jnp.float32)
        return FineTuneState(sgd_step(local.params, grads, learning_rate)), stats

    def client_finalize(server_params, local: FineTuneState) -> ClientOutput:
        return ClientOutput(update=tree_zeros_like(server_params))

    def server_update(server_state, aggregate, rng):
        del aggregate, rng
        return server_state, {}

    return base._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        server_update=server_update,
        initial_client_state=(lambda params: params) if personal else None,
    )


def per_client_means(client_metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Each metric's mean over a client's test examples, from ``RoundOutput.client_metrics``.

    Returns:
      name -> float32[num_clients], plus ``num_test_examples``.
    """
    count = jnp.maximum(client_metrics[NUM_TEST_EXAMPLES], 1.0)
    means = {
        name[: -len("_sum")]: total / count
        for name, total in client_metrics.items()
        if name.endswith("_sum")
    }
    means[NUM_TEST_EXAMPLES] = client_metrics[NUM_TEST_EXAMPLES]
    return means
