"""Federated averaging with adaptive server optimizers.

FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-
Efficient Learning of Deep Networks from Decentralized Data". AISTATS 2017.

FedAvgM, FedAdagrad, FedAdam, FedYogi: Reddi, Charles, Zaheer, Garrett, Rush,
Konečný, Kumar, McMahan. "Adaptive Federated Optimization". ICLR 2021
(arXiv:2003.00295). Every one of them is FedAvg whose server treats the
weighted average of client deltas ``server_params - local_params`` as a
pseudo-gradient for an optax transform.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.core.aggregators import Aggregator, tree_l2_norm, weighted_mean
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.types import Params, PerExampleLossFn, PyTree


class ServerState(NamedTuple):
    params: Params  # float32 pytree: the global model
    opt_state: optax.OptState  # server optimizer state over params
    aggregator_state: PyTree  # the aggregator's state (empty for the mean)
    round: jax.Array  # int32[]: rounds completed


class LocalState(NamedTuple):
    params: Params  # the client's model during local training
    opt_state: optax.OptState  # client optimizer state, fresh every round


def masked_mean_loss(
    per_example_loss_fn: PerExampleLossFn, params, batch, mask, rng
) -> tuple[jax.Array, jax.Array]:
    """Mean loss over the real examples of a batch, and their loss sum.

    Padding slots are excluded with ``where`` (not a multiply, so a NaN in a
    padding slot cannot leak) and the mean divides by ``max(sum(mask), 1)`` so
    an all-padding batch has loss and gradient exactly zero.
    """
    losses = per_example_loss_fn(params, batch, rng)
    loss_sum = jnp.sum(jnp.where(mask, losses, 0.0))
    count = jnp.sum(mask.astype(losses.dtype))
    return loss_sum / jnp.maximum(count, 1.0), loss_sum


def check_learning_rate(name: str, value) -> None:
    """Raises ValueError for a negative or non-finite float learning rate."""
    if isinstance(value, (int, float)) and not (value >= 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def fed_avg(
    per_example_loss_fn: PerExampleLossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    aggregator: Aggregator | None = None,
) -> Algorithm:
    """Builds FedAvg with any optax client and server optimizers.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      client_optimizer: optax transform for local steps; its state is
        re-initialised from the server params every round.
      server_optimizer: optax transform applied to the averaged delta as a
        pseudo-gradient. Defaults to ``optax.sgd(1.0)``, which sets the server
        params to the weighted average of the client params (plain FedAvg).
      aggregator: how client deltas are combined; defaults to the weighted
        mean (``fedjaxsim.core.aggregators.weighted_mean``).

    Returns:
      An :class:`Algorithm`. Its server state is :class:`ServerState`.
    """
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    aggregator = weighted_mean() if aggregator is None else aggregator

    def init(params: Params) -> ServerState:
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            aggregator_state=aggregator.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def broadcast(server_state: ServerState) -> Params:
        return server_state.params

    def client_init(server_params, client_state, rng) -> LocalState:
        del client_state, rng
        return LocalState(server_params, client_optimizer.init(server_params))

    def client_step(local: LocalState, batch, mask, rng):
        (_, loss_sum), grads = jax.value_and_grad(
            lambda p: masked_mean_loss(per_example_loss_fn, p, batch, mask, rng),
            has_aux=True,
        )(local.params)
        updates, opt_state = client_optimizer.update(grads, local.opt_state, local.params)
        params = optax.apply_updates(local.params, updates)
        stats = {"loss_sum": loss_sum, "num_examples": jnp.sum(mask, dtype=jnp.float32)}
        return LocalState(params, opt_state), stats

    def client_finalize(server_params, local: LocalState) -> ClientOutput:
        delta = jax.tree.map(jnp.subtract, server_params, local.params)
        return ClientOutput(update=delta, metrics={"update_norm": tree_l2_norm(delta)})

    def client_contribution(server_state: ServerState, output: ClientOutput, weight, rng):
        return aggregator.client_transform(
            output.update, weight, server_state.aggregator_state, rng
        )

    def server_update(server_state: ServerState, reduced, rng):
        delta, aggregator_state, metrics = aggregator.finalize(
            reduced, server_state.aggregator_state, rng
        )
        updates, opt_state = server_optimizer.update(
            delta, server_state.opt_state, server_state.params
        )
        params = optax.apply_updates(server_state.params, updates)
        metrics = dict(metrics, server_update_norm=tree_l2_norm(delta))
        new_state = ServerState(params, opt_state, aggregator_state, server_state.round + 1)
        return new_state, metrics

    return Algorithm(
        init=init,
        broadcast=broadcast,
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        client_contribution=client_contribution,
        server_update=server_update,
        reduction=aggregator.reduction,
    )


def _sgd(name: str, learning_rate: float) -> optax.GradientTransformation:
    check_learning_rate(name, learning_rate)
    return optax.sgd(learning_rate)


def fed_sgd_avg(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float = 0.1,
    server_learning_rate: float = 1.0,
) -> Algorithm:
    """FedAvg with SGD on both sides (McMahan et al. 2017 when server lr is 1)."""
    return fed_avg(
        per_example_loss_fn,
        _sgd("client_learning_rate", client_learning_rate),
        _sgd("server_learning_rate", server_learning_rate),
    )


def fed_avg_m(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float = 10**-1.5,
    server_learning_rate: float = 10**-0.5,
    momentum: float = 0.9,
) -> Algorithm:
    """FedAvgM: heavy-ball momentum on the server (Reddi et al. 2020 EMNIST defaults)."""
    check_learning_rate("server_learning_rate", server_learning_rate)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    return fed_avg(
        per_example_loss_fn,
        _sgd("client_learning_rate", client_learning_rate),
        optax.sgd(server_learning_rate, momentum=momentum),
    )


def _adaptive_checks(server_learning_rate, eps):
    check_learning_rate("server_learning_rate", server_learning_rate)
    if not eps > 0:
        raise ValueError(f"eps (the adaptivity tau) must be > 0, got {eps!r}")


def fed_adam(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float = 10**-1.5,
    server_learning_rate: float = 10**-2.5,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-4,
) -> Algorithm:
    """FedAdam (Reddi et al. 2020), defaults tuned there for EMNIST CNN."""
    _adaptive_checks(server_learning_rate, eps)
    return fed_avg(
        per_example_loss_fn,
        _sgd("client_learning_rate", client_learning_rate),
        optax.adam(server_learning_rate, b1=b1, b2=b2, eps=eps),
    )


def fed_yogi(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float = 10**-1.5,
    server_learning_rate: float = 10**-2.5,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-4,
) -> Algorithm:
    """FedYogi (Reddi et al. 2020), defaults tuned there for EMNIST CNN."""
    _adaptive_checks(server_learning_rate, eps)
    return fed_avg(
        per_example_loss_fn,
        _sgd("client_learning_rate", client_learning_rate),
        optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=eps),
    )


class ScaleByAdagradTauState(NamedTuple):
    momentum: optax.Updates  # float32 pytree like params: m_t
    sum_of_squares: optax.Updates  # float32 pytree like params: v_t


def scale_by_adagrad_tau(b1: float = 0.9, eps: float = 1e-2) -> optax.GradientTransformation:
    """Reddi et al.'s FedAdagrad direction ``m_t / (sqrt(v_t) + tau)``.

    ``m_t = b1 m_{t-1} + (1 - b1) g_t`` and ``v_t = v_{t-1} + g_t^2`` with
    ``v_{-1} = tau^2`` (Algorithm 2 of the paper). ``optax.adagrad`` differs:
    it has no momentum and puts eps inside the square root.
    """

    def init_fn(params):
        return ScaleByAdagradTauState(
            momentum=jax.tree.map(jnp.zeros_like, params),
            sum_of_squares=jax.tree.map(lambda p: jnp.full_like(p, eps**2), params),
        )

    def update_fn(updates, state, params=None):
        del params
        momentum = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.momentum, updates)
        squares = jax.tree.map(lambda v, g: v + g * g, state.sum_of_squares, updates)
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), momentum, squares)
        return direction, ScaleByAdagradTauState(momentum, squares)

    return optax.GradientTransformation(init_fn, update_fn)


def fed_adagrad(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float = 10**-1.5,
    server_learning_rate: float = 10**-1,
    b1: float = 0.9,
    eps: float = 1e-2,
) -> Algorithm:
    """FedAdagrad (Reddi et al. 2020), defaults tuned there for EMNIST CNN."""
    _adaptive_checks(server_learning_rate, eps)
    return fed_avg(
        per_example_loss_fn,
        _sgd("client_learning_rate", client_learning_rate),
        optax.chain(scale_by_adagrad_tau(b1, eps), optax.scale(-server_learning_rate)),
    )
