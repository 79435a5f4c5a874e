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
state, so clients of different sizes are handled exactly. Deviation from the
paper: the model average is weighted by the cohort's weights (uniform in the
paper; pass ``weighting="uniform"`` when packing to get it), while ``c`` keeps
the paper's uniform ``1 / N`` so that it stays the mean of all ``c_i``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjaxsim.algorithms.common import (
    check_num_total_clients,
    check_number,
    divide,
    num_real_examples,
    require_client_state,
    sgd_step,
    weighted,
    weighted_contribution,
)
from fedjaxsim.algorithms.fed_avg import masked_mean_loss
from fedjaxsim.core.aggregators import tree_l2_norm
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.types import Params, PerExampleLossFn


class ScaffoldServerState(NamedTuple):
    params: Params  # float32 pytree: the global model x
    control: Params  # float32 pytree like params: the server control variate c
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


class ScaffoldUpdate(NamedTuple):
    delta: Params  # float32 pytree like params: x - y (the model delta)
    control_delta: Params  # float32 pytree like params: c_i+ - c_i


def initial_client_state(params: Params) -> ScaffoldClientState:
    """The client-state store's default: ``c_i = 0`` for every client."""
    return ScaffoldClientState(jax.tree.map(jnp.zeros_like, params))


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
      An :class:`Algorithm` with :class:`ScaffoldServerState`. It must be run
      with ``client_states`` gathered from a
      :class:`~fedjaxsim.core.client_state.ClientStateStore` whose default is
      :func:`initial_client_state`; ``RoundOutput.client_states`` holds the new
      :class:`ScaffoldClientState` of every client to scatter back.

    Raises:
      ValueError: for a non-positive ``client_learning_rate`` or
        ``num_total_clients``, a negative ``server_learning_rate``, or (at the
        first call of the round) no ``client_states``.
    """
    check_number("client_learning_rate", client_learning_rate, minimum=0.0, strict=True)
    check_number("server_learning_rate", server_learning_rate, minimum=0.0)
    check_num_total_clients(num_total_clients)

    def init(params: Params) -> ScaffoldServerState:
        return ScaffoldServerState(
            params=params,
            control=jax.tree.map(jnp.zeros_like, params),
            round=jnp.zeros((), jnp.int32),
        )

    def broadcast(server_state: ScaffoldServerState) -> ScaffoldBroadcast:
        return ScaffoldBroadcast(server_state.params, server_state.control)

    def client_init(server: ScaffoldBroadcast, client_state: ScaffoldClientState, rng):
        del rng
        require_client_state(
            client_state, "scaffold", "fedjaxsim.algorithms.scaffold.initial_client_state"
        )
        client_control = client_state.control
        return ScaffoldLocalState(
            params=server.params,
            client_control=client_control,
            correction=jax.tree.map(jnp.subtract, server.control, client_control),
            num_steps=jnp.zeros((), jnp.int32),
        )

    def client_step(local: ScaffoldLocalState, batch, mask, rng):
        (_, loss_sum), grads = jax.value_and_grad(
            lambda p: masked_mean_loss(per_example_loss_fn, p, batch, mask, rng), has_aux=True
        )(local.params)
        corrected = jax.tree.map(jnp.add, grads, local.correction)
        params = sgd_step(local.params, corrected, client_learning_rate)
        stats = {"loss_sum": loss_sum, "num_examples": num_real_examples(mask)}
        return local._replace(params=params, num_steps=local.num_steps + 1), stats

    def client_finalize(server: ScaffoldBroadcast, local: ScaffoldLocalState) -> ClientOutput:
        delta = jax.tree.map(jnp.subtract, server.params, local.params)
        # Option II: c_i+ - c_i = (x - y) / (K lr) - c. A client with no real
        # step (only padding lanes) divides by 1 instead of 0.
        scale = 1.0 / (jnp.maximum(local.num_steps, 1).astype(jnp.float32) * client_learning_rate)
        control_delta = jax.tree.map(lambda d, c: d * scale - c, delta, server.control)
        new_control = jax.tree.map(jnp.add, local.client_control, control_delta)
        return ClientOutput(
            update=ScaffoldUpdate(delta, control_delta),
            client_state=ScaffoldClientState(new_control),
            metrics={
                "update_norm": tree_l2_norm(delta),
                "control_delta_norm": tree_l2_norm(control_delta),
                "num_local_steps": local.num_steps.astype(jnp.float32),
            },
        )

    def client_contribution(server_state, output: ClientOutput, weight, rng):
        del server_state, rng
        update: ScaffoldUpdate = output.update
        contribution = weighted_contribution(
            weight, {"delta": update.delta}, checked_trees=(update.control_delta,)
        )
        # Unweighted sum over the clients that count (weight > 0), per the paper.
        counts = (contribution["weight"] > 0).astype(jnp.float32)
        contribution["control_delta"] = weighted(update.control_delta, counts)
        return contribution

    def server_update(server_state: ScaffoldServerState, reduced, rng):
        del rng
        delta = divide(reduced["weighted_delta"], reduced["weight"])
        params = sgd_step(server_state.params, delta, server_learning_rate)
        control = jax.tree.map(
            lambda c, dc: c + dc / num_total_clients, server_state.control, reduced["control_delta"]
        )
        metrics = {
            "total_weight": reduced["weight"],
            "num_nonfinite_updates": reduced["num_nonfinite_updates"],
            "server_update_norm": tree_l2_norm(delta),
            "server_control_norm": tree_l2_norm(control),
        }
        return ScaffoldServerState(params, control, server_state.round + 1), metrics

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
