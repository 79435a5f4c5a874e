"""SCAFFOLD: stochastic controlled averaging with control variates.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning". ICML 2020 (arXiv:1910.06378),
Algorithm 1 with option II control variates.

The server keeps the model ``x`` and a control variate ``c``; every client
keeps its own control variate ``c_i`` (zero until it is first sampled), which
lives in a :class:`~fedjaxsim.core.client_state.ClientStateStore`. A sampled
client starts from ``y = x`` and takes ``K`` local SGD steps corrected for
client drift::

    y <- y - lr * (g_i(y) - c_i + c)

then computes (option II) ``c_i+ = c_i - c + (x - y) / (K * lr)`` and sends
``delta_y = y - x`` and ``delta_c = c_i+ - c_i``. The server updates::

    x <- x + global_lr * weighted_mean_i(delta_y)
    c <- c + (1 / num_total_clients) * sum_i delta_c

``K`` is each client's own number of real local steps, counted in its local
state, so clients of different sizes are handled exactly. ``delta_c`` rides
the side channel as a plain sum (``ClientOutput.sums``), so an aggregator
that privatises or protects the update covers it too. A client that does not
count (weight 0, or a diverged, non-finite update) keeps its ``c_i`` and adds
nothing to ``c``, so ``c`` stays the mean of all ``c_i``. Deviation from the
paper: the model average is weighted by the cohort's weights (uniform in the
paper; pass ``weighting="uniform"`` when packing to get it), while ``c`` keeps
the paper's uniform ``1 / N``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.algorithms.fed_avg import local_loss_and_grads, step_stats
from fedjaxsim.core.aggregators import weighted_mean
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.trees import sgd_step, tree_add, tree_l2_norm, tree_subtract, tree_zeros_like
from fedjaxsim.core.types import Params, PerExampleLossFn, PyTree
from fedjaxsim.core.validation import check_int, check_real


class ScaffoldServerState(NamedTuple):
    params: Params  # float32 pytree: the global model x
    control: Params  # float32 pytree like params: the server control variate c
    aggregator_state: PyTree  # the aggregator's state
    round: jax.Array  # int32[]: rounds completed


class ScaffoldClientState(NamedTuple):
    control: Params  # float32 pytree like params: the client control variate c_i


class ScaffoldBroadcast(NamedTuple):
    params: Params  # float32 pytree: x
    control: Params  # float32 pytree like params: c


class ScaffoldLocalState(NamedTuple):
    params: Params  # float32 pytree like params: the client's model y
    client_control: Params  # float32 pytree like params: c_i at the start of the round
    correction: Params  # float32 pytree like params: c - c_i, added to every local gradient
    num_steps: jax.Array  # int32[]: real local steps taken so far (K)


def initial_client_state(params: Params) -> ScaffoldClientState:
    """The client-state store's default: ``c_i = 0`` for every client."""
    return ScaffoldClientState(tree_zeros_like(params))


def scaffold(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float,
    num_total_clients: int,
    server_learning_rate: float = 1.0,
) -> Algorithm:
    """Builds SCAFFOLD (option II).

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      client_learning_rate: local SGD step size ``lr > 0``.
      num_total_clients: the population size ``N`` (the server control
        variate moves by ``sum_i delta_c_i / N``).
      server_learning_rate: the global step size ``eta_g >= 0``.

    Returns:
      An :class:`~fedjaxsim.core.algorithm.Algorithm` with
      :class:`ScaffoldServerState`. It must be run with ``client_states``
      gathered from a
      :class:`~fedjaxsim.core.client_state.ClientStateStore` whose default is
      ``algorithm.initial_client_state(params)``; ``RoundOutput.client_states``
      holds the new :class:`ScaffoldClientState` of every client to scatter back.

    Raises:
      ValueError: for a non-positive ``client_learning_rate`` or
        ``num_total_clients``, or a negative ``server_learning_rate``.
    """
    check_real("client_learning_rate", client_learning_rate, minimum=0.0, strict_minimum=True)
    check_real("server_learning_rate", server_learning_rate, minimum=0.0)
    check_int("num_total_clients", num_total_clients, minimum=1)
    aggregator = weighted_mean()

    def init(params: Params) -> ScaffoldServerState:
        return ScaffoldServerState(
            params, tree_zeros_like(params), aggregator.init(params), jnp.zeros((), jnp.int32)
        )

    def broadcast(server_state: ScaffoldServerState) -> ScaffoldBroadcast:
        return ScaffoldBroadcast(server_state.params, server_state.control)

    def client_init(server: ScaffoldBroadcast, client_state: ScaffoldClientState, rng):
        del rng
        return ScaffoldLocalState(
            params=server.params,
            client_control=client_state.control,
            correction=tree_subtract(server.control, client_state.control),
            num_steps=jnp.zeros((), jnp.int32),
        )

    def client_step(local: ScaffoldLocalState, batch, mask, rng):
        loss_sum, grads = local_loss_and_grads(per_example_loss_fn, local.params, batch, mask, rng)
        params = sgd_step(local.params, tree_add(grads, local.correction), client_learning_rate)
        return local._replace(params=params, num_steps=local.num_steps + 1), step_stats(
            loss_sum, mask
        )

    def client_finalize(server: ScaffoldBroadcast, local: ScaffoldLocalState) -> ClientOutput:
        delta = tree_subtract(server.params, local.params)
        # Option II: c_i+ - c_i = (x - y) / (K lr) - c. A client with no real
        # step (only padding lanes) divides by 1 instead of 0.
        scale = 1.0 / (jnp.maximum(local.num_steps, 1).astype(jnp.float32) * client_learning_rate)
        control_delta = jax.tree.map(lambda d, c: d * scale - c, delta, server.control)
        return ClientOutput(
            update=delta,
            client_state=ScaffoldClientState(tree_add(local.client_control, control_delta)),
            metrics={
                "update_norm": tree_l2_norm(delta),
                "control_delta_norm": tree_l2_norm(control_delta),
                "num_local_steps": local.num_steps.astype(jnp.float32),
            },
            sums={"control_delta": control_delta},
        )

    def server_update(server_state: ScaffoldServerState, aggregate, rng):
        del rng
        params = sgd_step(server_state.params, aggregate.update, server_learning_rate)
        control = jax.tree.map(
            lambda c, dc: c + dc / num_total_clients,
            server_state.control,
            aggregate.sums["control_delta"],
        )
        metrics = {
            "server_update_norm": tree_l2_norm(aggregate.update),
            "server_control_norm": tree_l2_norm(control),
        }
        new_state = server_state._replace(
            params=params, control=control, round=server_state.round + 1
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
        initial_client_state=initial_client_state,
    )
