"""Ditto: a global model trained like FedAvg, plus a personal model per client.

Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
Personalization". ICML 2021 (arXiv:2012.04221), Algorithm 1.

Every client ``k`` keeps a personal model ``v_k`` that minimises
``F_k(v) + lambda/2 * ||v - w^t||^2``, pulled toward the current global model
``w^t``; the global model is trained with FedAvg. In a round, a sampled client
starts a local copy of the global model at ``w^t`` and, on each local batch,
takes one step of each::

    w_k <- w_k - lr * grad F_k(w_k)                        (global, FedAvg)
    v_k <- v_k - personal_lr * (grad F_k(v_k) + lambda (v_k - w^t))

then sends ``w^t - w_k``; the server updates
``w <- w - server_lr * weighted_mean_k(w^t - w_k)``. ``lambda = 0`` trains
purely local models; a large ``lambda`` keeps ``v_k`` at the global model.

The global model's side is FedAvg's (``fed_avg(...)._replace(...)``): only
the local training, which also steps the personal model, differs. Personal
models live in a :class:`~fedjaxsim.core.client_state.ClientStateStore`
(default :func:`initial_client_state`); a client that does not count in the
round (weight 0, or a non-finite update) keeps its personal model as it was.
Deviations from Algorithm 1, both for
cross-device populations: the personal and global updates share the local
batches (one step of each per batch, instead of separate passes), and a
client's personal model starts from the global model it first receives
instead of ``w^0`` (the same when every client joins in round 0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg, local_loss_and_grads, step_stats
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.trees import sgd_step, tree_l2_norm, tree_subtract, tree_where, tree_zeros_like
from fedjaxsim.core.types import Params, PerExampleLossFn
from fedjaxsim.core.validation import check_real


class DittoClientState(NamedTuple):
    personal_params: Params  # float32 pytree like params: the personal model v_k
    has_personal_model: jax.Array  # bool[]: False until the client is first trained


class DittoLocalState(NamedTuple):
    params: Params  # float32 pytree like params: the client's copy of the global model
    personal_params: Params  # float32 pytree like params: v_k
    server_params: Params  # float32 pytree like params: w^t, the centre of the regularizer


def initial_client_state(params: Params) -> DittoClientState:
    """The client-state store's default: no personal model yet.

    ``personal_params`` is a placeholder (zeros like ``params``); a client
    without a personal model starts it from the global model it receives.
    """
    return DittoClientState(tree_zeros_like(params), jnp.zeros((), bool))


def ditto(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float,
    personal_learning_rate: float,
    regularization: float,
    server_learning_rate: float = 1.0,
) -> Algorithm:
    """Builds Ditto with local SGD for both the global and the personal model.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      client_learning_rate: step size ``> 0`` of the local global-model copy.
      personal_learning_rate: step size ``> 0`` of the personal model.
      regularization: ``lambda >= 0``, the pull of ``v_k`` toward ``w^t``.
      server_learning_rate: step size ``>= 0`` on the averaged delta.

    Returns:
      FedAvg's :class:`~fedjaxsim.core.algorithm.Algorithm` (server state
      :class:`fedjaxsim.algorithms.fed_avg.ServerState`) with Ditto's local
      training, to run with ``client_states`` gathered from a store whose
      default is ``algorithm.initial_client_state(params)``. Client metrics
      add ``personal_loss_sum`` (the personal model's training loss).

    Raises:
      ValueError: naming the first invalid hyper-parameter.
    """
    check_real("client_learning_rate", client_learning_rate, minimum=0.0, strict_minimum=True)
    check_real("personal_learning_rate", personal_learning_rate, minimum=0.0, strict_minimum=True)
    check_real("regularization", regularization, minimum=0.0)
    check_real("server_learning_rate", server_learning_rate, minimum=0.0)
    base = fed_avg(
        per_example_loss_fn, optax.sgd(client_learning_rate), optax.sgd(server_learning_rate)
    )

    def client_init(server_params, client_state: DittoClientState, rng) -> DittoLocalState:
        del rng
        personal = tree_where(
            client_state.has_personal_model, client_state.personal_params, server_params
        )
        return DittoLocalState(server_params, personal, server_params)

    def client_step(local: DittoLocalState, batch, mask, rng):
        loss_sum, grads = local_loss_and_grads(per_example_loss_fn, local.params, batch, mask, rng)
        personal_loss_sum, personal_grads = local_loss_and_grads(
            per_example_loss_fn, local.personal_params, batch, mask, rng
        )
        personal_grads = jax.tree.map(
            lambda g, v, w: g + regularization * (v - w),
            personal_grads,
            local.personal_params,
            local.server_params,
        )
        new_local = DittoLocalState(
            params=sgd_step(local.params, grads, client_learning_rate),
            personal_params=sgd_step(local.personal_params, personal_grads, personal_learning_rate),
            server_params=local.server_params,
        )
        return new_local, dict(step_stats(loss_sum, mask), personal_loss_sum=personal_loss_sum)

    def client_finalize(server_params, local: DittoLocalState) -> ClientOutput:
        delta = tree_subtract(server_params, local.params)
        distance = tree_l2_norm(tree_subtract(local.personal_params, server_params))
        return ClientOutput(
            update=delta,
            client_state=DittoClientState(local.personal_params, jnp.ones((), bool)),
            metrics={"update_norm": tree_l2_norm(delta), "personal_distance_to_global": distance},
        )

    return base._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        initial_client_state=initial_client_state,
    )
