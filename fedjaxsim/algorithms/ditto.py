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

Personal models live in a
:class:`~fedjaxsim.core.client_state.ClientStateStore` (default
:func:`initial_client_state`). Deviations from Algorithm 1, both for
cross-device populations: the personal and global updates share the local
batches (one step of each per batch, instead of separate passes), and a
client's personal model starts from the global model it first receives
instead of ``w^0`` (the same when every client joins in round 0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.algorithms.common import (
    check_number,
    divide,
    num_real_examples,
    require_client_state,
    sgd_step,
    weighted_contribution,
)
from fedjaxsim.algorithms.fed_avg import masked_mean_loss
from fedjaxsim.core.aggregators import tree_l2_norm
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.types import Params, PerExampleLossFn


class DittoServerState(NamedTuple):
    params: Params  # float32 pytree: the global model w
    round: jax.Array  # int32[]: rounds completed


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
    return DittoClientState(
        personal_params=jax.tree.map(jnp.zeros_like, params),
        has_personal_model=jnp.zeros((), bool),
    )


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
      An :class:`Algorithm` with :class:`DittoServerState`, to run with
      ``client_states`` gathered from a store whose default is
      :func:`initial_client_state`. Client metrics add
      ``personal_loss_sum`` (the personal model's training loss).

    Raises:
      ValueError: naming the first invalid hyper-parameter, or (at the first
        call of the round) when no ``client_states`` are passed.
    """
    check_number("client_learning_rate", client_learning_rate, minimum=0.0, strict=True)
    check_number("personal_learning_rate", personal_learning_rate, minimum=0.0, strict=True)
    check_number("regularization", regularization, minimum=0.0)
    check_number("server_learning_rate", server_learning_rate, minimum=0.0)

    def init(params: Params) -> DittoServerState:
        return DittoServerState(params=params, round=jnp.zeros((), jnp.int32))

    def broadcast(server_state: DittoServerState) -> Params:
        return server_state.params

    def client_init(server_params, client_state: DittoClientState, rng) -> DittoLocalState:
        del rng
        require_client_state(
            client_state, "ditto", "fedjaxsim.algorithms.ditto.initial_client_state"
        )
        personal = jax.tree.map(
            lambda v, w: jnp.where(client_state.has_personal_model, v, w),
            client_state.personal_params,
            server_params,
        )
        return DittoLocalState(server_params, personal, server_params)

    def loss_and_grad(params, batch, mask, rng):
        (_, loss_sum), grads = jax.value_and_grad(
            lambda p: masked_mean_loss(per_example_loss_fn, p, batch, mask, rng), has_aux=True
        )(params)
        return loss_sum, grads

    def client_step(local: DittoLocalState, batch, mask, rng):
        loss_sum, grads = loss_and_grad(local.params, batch, mask, rng)
        personal_loss_sum, personal_grads = loss_and_grad(local.personal_params, batch, mask, rng)
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
        stats = {
            "loss_sum": loss_sum,
            "personal_loss_sum": personal_loss_sum,
            "num_examples": num_real_examples(mask),
        }
        return new_local, stats

    def client_finalize(server_params, local: DittoLocalState) -> ClientOutput:
        delta = jax.tree.map(jnp.subtract, server_params, local.params)
        return ClientOutput(
            update=delta,
            client_state=DittoClientState(local.personal_params, jnp.ones((), bool)),
            metrics={
                "update_norm": tree_l2_norm(delta),
                "personal_distance_to_global": tree_l2_norm(
                    jax.tree.map(jnp.subtract, local.personal_params, server_params)
                ),
            },
        )

    def client_contribution(server_state, output: ClientOutput, weight, rng):
        del server_state, rng
        return weighted_contribution(weight, {"delta": output.update})

    def server_update(server_state: DittoServerState, reduced, rng):
        del rng
        delta = divide(reduced["weighted_delta"], reduced["weight"])
        params = sgd_step(server_state.params, delta, server_learning_rate)
        metrics = {
            "total_weight": reduced["weight"],
            "num_nonfinite_updates": reduced["num_nonfinite_updates"],
            "server_update_norm": tree_l2_norm(delta),
        }
        return DittoServerState(params, server_state.round + 1), metrics

    return Algorithm(
        init=init,
        broadcast=broadcast,
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        client_contribution=client_contribution,
        server_update=server_update,
        reduction="sum",
    )
