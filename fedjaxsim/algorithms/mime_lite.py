"""Mime-Lite: the server's optimizer state, frozen, applied during local steps.

Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh. "Breaking the
centralized barrier for cross-device federated learning". NeurIPS 2021
(arXiv:2008.03606), Algorithm "MimeLite".

The server holds the model ``x`` and the state ``s`` of a base optimizer (for
example momentum, or Adam's moments). Every local step of every client
applies the base optimizer *with the server's state* but never updates that
state::

    y <- y + U(g_i(y), s)          # optax: updates, _ = tx.update(g, s, y)

so clients mimic a centralized optimizer and do not drift with local
statistics. Each client also returns the full-batch gradient of its loss at
the server model, ``grad f_i(x)``, here accumulated over the very batches of
its local steps (the example-weighted mean of the per-batch gradients at
``x``). The server then sets::

    x <- x - server_lr * weighted_mean_i(x - y_i)
    s <- V(weighted_mean_i grad f_i(x), s)   # optax: _, s = tx.update(grad, s, x)

``server_lr = 1`` makes ``x`` the weighted average of the client models, as
in the paper. The full-batch gradient rides the side channel as a mean with
the update's weights, so an aggregator that privatises the update covers it
too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.algorithms.fed_avg import local_loss_and_grads, step_stats
from fedjaxsim.core.aggregators import weighted_mean
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.losses import masked_mean_loss
from fedjaxsim.core.trees import (
    sgd_step,
    tree_add,
    tree_l2_norm,
    tree_subtract,
    tree_where,
    tree_zeros_like,
)
from fedjaxsim.core.types import Params, PerExampleLossFn, PyTree
from fedjaxsim.core.validation import check_real


class MimeLiteServerState(NamedTuple):
    params: Params  # float32 pytree: the global model x
    opt_state: optax.OptState  # base optimizer state s, updated on the server only
    aggregator_state: PyTree  # the aggregator's state
    round: jax.Array  # int32[]: rounds completed


class MimeLiteBroadcast(NamedTuple):
    params: Params  # float32 pytree: x
    opt_state: optax.OptState  # s, frozen during local training


class MimeLiteLocalState(NamedTuple):
    params: Params  # float32 pytree like params: the client's model y
    server_params: Params  # float32 pytree like params: x, where the full-batch gradient is taken
    server_opt_state: optax.OptState  # s, applied but never updated locally
    server_gradient_sum: (
        Params  # float32 pytree like params: sum over real examples of grad loss(x)
    )
    num_examples: jax.Array  # float32[]: real examples in server_gradient_sum


def mime_lite(
    per_example_loss_fn: PerExampleLossFn,
    base_optimizer: optax.GradientTransformation,
    server_learning_rate: float = 1.0,
) -> Algorithm:
    """Builds Mime-Lite.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      base_optimizer: the optax transform whose state the server keeps and
        clients apply (e.g. ``optax.sgd(lr, momentum=0.9)`` or
        ``optax.adam(lr)``); its learning rate is the local step size.
      server_learning_rate: step size ``>= 0`` on the averaged client delta.

    Returns:
      An :class:`~fedjaxsim.core.algorithm.Algorithm` with :class:`MimeLiteServerState`.

    Raises:
      ValueError: for a negative or non-finite ``server_learning_rate``.
    """
    check_real("server_learning_rate", server_learning_rate, minimum=0.0)
    aggregator = weighted_mean()

    def init(params: Params) -> MimeLiteServerState:
        return MimeLiteServerState(
            params=params,
            opt_state=base_optimizer.init(params),
            aggregator_state=aggregator.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def broadcast(server_state: MimeLiteServerState) -> MimeLiteBroadcast:
        return MimeLiteBroadcast(server_state.params, server_state.opt_state)

    def client_init(server: MimeLiteBroadcast, client_state, rng) -> MimeLiteLocalState:
        del client_state, rng
        return MimeLiteLocalState(
            params=server.params,
            server_params=server.params,
            server_opt_state=server.opt_state,
            server_gradient_sum=tree_zeros_like(server.params),
            num_examples=jnp.zeros((), jnp.float32),
        )

    def client_step(local: MimeLiteLocalState, batch, mask, rng):
        loss_sum, grads = local_loss_and_grads(per_example_loss_fn, local.params, batch, mask, rng)
        # The frozen server state: the optimizer's new state is discarded.
        updates, _ = base_optimizer.update(grads, local.server_opt_state, local.params)
        params = optax.apply_updates(local.params, updates)
        # Gradient of the loss *sum* at x: summed over steps, then divided by
        # the example count, it is the mean gradient over the client's batches.
        server_gradient = jax.grad(
            lambda p: masked_mean_loss(per_example_loss_fn, p, batch, mask, rng)[1]
        )(local.server_params)
        stats = step_stats(loss_sum, mask)
        new_local = local._replace(
            params=params,
            server_gradient_sum=tree_add(local.server_gradient_sum, server_gradient),
            num_examples=local.num_examples + stats["num_examples"],
        )
        return new_local, stats

    def client_finalize(server: MimeLiteBroadcast, local: MimeLiteLocalState) -> ClientOutput:
        delta = tree_subtract(server.params, local.params)
        server_gradient = jax.tree.map(
            lambda s: s / jnp.maximum(local.num_examples, 1.0), local.server_gradient_sum
        )
        return ClientOutput(
            update=delta,
            metrics={
                "update_norm": tree_l2_norm(delta),
                "server_gradient_norm": tree_l2_norm(server_gradient),
            },
            means={"server_gradient": server_gradient},
        )

    def server_update(server_state: MimeLiteServerState, aggregate, rng):
        del rng
        gradient = aggregate.means["server_gradient"]
        _, opt_state = base_optimizer.update(gradient, server_state.opt_state, server_state.params)
        # An empty cohort (nothing to average) leaves the optimizer state alone too.
        opt_state = tree_where(aggregate.weight > 0, opt_state, server_state.opt_state)
        params = sgd_step(server_state.params, aggregate.update, server_learning_rate)
        metrics = {
            "server_update_norm": tree_l2_norm(aggregate.update),
            "server_gradient_norm": tree_l2_norm(gradient),
        }
        new_state = server_state._replace(
            params=params, opt_state=opt_state, round=server_state.round + 1
        )
        return new_state, metrics

    return Algorithm(
        init=init,
        broadcast=broadcast,
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        server_update=server_update,
        aggregator=aggregator,
    )
