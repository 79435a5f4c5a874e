"""Federated averaging with adaptive server optimizers.

FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-
Efficient Learning of Deep Networks from Decentralized Data". AISTATS 2017.

FedAvgM, FedAdagrad, FedAdam, FedYogi: Reddi, Charles, Zaheer, Garrett, Rush,
Konečný, Kumar, McMahan. "Adaptive Federated Optimization". ICLR 2021
(arXiv:2003.00295). Every one of them is FedAvg whose server treats the
aggregate of client deltas ``server_params - local_params`` as a
pseudo-gradient for an optax transform.

FedAdam and FedYogi come in two forms (``form=``):

* ``"paper"``: Algorithm 2 of Reddi et al. as printed
  (:func:`scale_by_adaptive_tau`): ``m_t = b1 m + (1 - b1) g``, the second
  moment from ``v_{-1} = tau^2``, step ``m_t / (sqrt(v_t) + tau)``, no bias
  correction.
* ``"bias_corrected"`` (the default): optax's ``adam`` and ``yogi`` with
  ``eps = tau``, which correct both moments for their zero (Yogi: 1e-6)
  start. The authors' experiment code ran the Keras optimizers of this form,
  and the EMNIST presets in ``configs/`` (their tuned learning rates) use it.

FedAdagrad always follows Algorithm 2 (optax's ``adagrad`` has no momentum
and puts its epsilon inside the root).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.core.aggregators import weighted_mean
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.losses import masked_mean_loss
from fedjaxsim.core.trees import tree_l2_norm, tree_subtract
from fedjaxsim.core.types import Params, PerExampleLossFn, PyTree
from fedjaxsim.core.validation import check_choice, check_real

ADAPTIVE_FORMS = ("bias_corrected", "paper")
SECOND_MOMENTS = ("adagrad", "adam", "yogi")


class ServerState(NamedTuple):
    params: Params  # float32 pytree: the global model
    opt_state: optax.OptState  # server optimizer state over params
    aggregator_state: PyTree  # the aggregator's state (empty for the mean)
    round: jax.Array  # int32[]: rounds completed


class LocalState(NamedTuple):
    params: Params  # the client's model during local training
    opt_state: optax.OptState  # client optimizer state, fresh every round


def local_loss_and_grads(per_example_loss_fn: PerExampleLossFn, params, batch, mask, rng):
    """``(loss_sum, grads)`` of the masked mean loss at ``params``."""
    grads, loss_sum = jax.grad(
        lambda p: masked_mean_loss(per_example_loss_fn, p, batch, mask, rng), has_aux=True
    )(params)
    return loss_sum, grads


def step_stats(loss_sum, mask) -> dict:
    """The step statistics every algorithm reports: loss sum and real examples."""
    return {"loss_sum": loss_sum, "num_examples": jnp.sum(mask, dtype=jnp.float32)}


def fed_avg(
    per_example_loss_fn: PerExampleLossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
) -> Algorithm:
    """Builds FedAvg with any optax client and server optimizers.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      client_optimizer: optax transform for local steps; its state is
        re-initialised from the server params every round.
      server_optimizer: optax transform applied to the aggregated delta as a
        pseudo-gradient. Defaults to ``optax.sgd(1.0)``, which sets the server
        params to the weighted average of the client params (plain FedAvg).

    Returns:
      An :class:`~fedjaxsim.core.algorithm.Algorithm` with the weighted mean as its aggregator
      (``fedjaxsim.core.algorithm.with_aggregator`` swaps it). Its server state
      is :class:`ServerState`.
    """
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    aggregator = weighted_mean()

    def init(params: Params) -> ServerState:
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            aggregator_state=aggregator.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def client_init(server_params, client_state, rng) -> LocalState:
        del client_state, rng
        return LocalState(server_params, client_optimizer.init(server_params))

    def client_step(local: LocalState, batch, mask, rng):
        loss_sum, grads = local_loss_and_grads(per_example_loss_fn, local.params, batch, mask, rng)
        updates, opt_state = client_optimizer.update(grads, local.opt_state, local.params)
        params = optax.apply_updates(local.params, updates)
        return LocalState(params, opt_state), step_stats(loss_sum, mask)

    def client_finalize(server_params, local) -> ClientOutput:
        delta = tree_subtract(server_params, local.params)
        return ClientOutput(update=delta, metrics={"update_norm": tree_l2_norm(delta)})

    def server_update(server_state: ServerState, aggregate, rng):
        del rng
        delta = aggregate.update
        updates, opt_state = server_optimizer.update(
            delta, server_state.opt_state, server_state.params
        )
        params = optax.apply_updates(server_state.params, updates)
        new_state = server_state._replace(
            params=params, opt_state=opt_state, round=server_state.round + 1
        )
        return new_state, {"server_update_norm": tree_l2_norm(delta)}

    return Algorithm(
        init=init,
        broadcast=lambda server_state: server_state.params,
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        server_update=server_update,
        aggregator=aggregator,
    )


def _sgd(name: str, learning_rate: float) -> optax.GradientTransformation:
    return optax.sgd(check_real(name, learning_rate, minimum=0.0))


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
    server_learning_rate = check_real("server_learning_rate", server_learning_rate, minimum=0.0)
    momentum = check_real("momentum", momentum, minimum=0.0, maximum=1.0, strict_maximum=True)
    return fed_avg(
        per_example_loss_fn,
        _sgd("client_learning_rate", client_learning_rate),
        optax.sgd(server_learning_rate, momentum=momentum),
    )


class AdaptiveTauState(NamedTuple):
    momentum: optax.Updates  # float32 pytree like params: m_t
    second_moment: optax.Updates  # float32 pytree like params: v_t


def scale_by_adaptive_tau(
    second_moment: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """Reddi et al.'s Algorithm 2 direction ``m_t / (sqrt(v_t) + tau)``.

    ``m_t = b1 m_{t-1} + (1 - b1) g_t`` from ``m_{-1} = 0``, and from
    ``v_{-1} = tau^2``:

    * ``"adagrad"``: ``v_t = v_{t-1} + g_t^2``;
    * ``"adam"``: ``v_t = b2 v_{t-1} + (1 - b2) g_t^2``;
    * ``"yogi"``: ``v_t = v_{t-1} - (1 - b2) g_t^2 sign(v_{t-1} - g_t^2)``.

    No bias correction. Chain with ``optax.scale(-learning_rate)``.
    """
    check_choice("second_moment", second_moment, SECOND_MOMENTS)

    def next_second_moment(v, g):
        square = g * g
        if second_moment == "adagrad":
            return v + square
        if second_moment == "adam":
            return b2 * v + (1 - b2) * square
        return v - (1 - b2) * square * jnp.sign(v - square)

    def init_fn(params):
        return AdaptiveTauState(
            momentum=jax.tree.map(jnp.zeros_like, params),
            second_moment=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params),
        )

    def update_fn(updates, state, params=None):
        del params
        momentum = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.momentum, updates)
        squares = jax.tree.map(next_second_moment, state.second_moment, updates)
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), momentum, squares)
        return direction, AdaptiveTauState(momentum, squares)

    return optax.GradientTransformation(init_fn, update_fn)


def _adaptive_server(second_moment, form, server_learning_rate, b1, b2, eps):
    server_learning_rate = check_real("server_learning_rate", server_learning_rate, minimum=0.0)
    check_real("b1", b1, minimum=0.0, maximum=1.0, strict_maximum=True)
    check_real("b2", b2, minimum=0.0, maximum=1.0, strict_maximum=True)
    check_real("eps", eps, minimum=0.0, strict_minimum=True)
    check_choice("form", form, ADAPTIVE_FORMS)
    if form == "paper" or second_moment == "adagrad":
        direction = scale_by_adaptive_tau(second_moment, b1, b2, eps)
        return optax.chain(direction, optax.scale(-server_learning_rate))
    optimizer = optax.adam if second_moment == "adam" else optax.yogi
    return optimizer(server_learning_rate, b1=b1, b2=b2, eps=eps)


def _adaptive_builder(second_moment: str, name: str):
    """The builder of FedAdam or FedYogi: the same signature, defaults and forms."""

    def build(
        per_example_loss_fn: PerExampleLossFn,
        client_learning_rate: float = 10**-1.5,
        server_learning_rate: float = 10**-2.5,
        b1: float = 0.9,
        b2: float = 0.99,
        eps: float = 1e-4,
        form: str = "bias_corrected",
    ) -> Algorithm:
        return fed_avg(
            per_example_loss_fn,
            _sgd("client_learning_rate", client_learning_rate),
            _adaptive_server(second_moment, form, server_learning_rate, b1, b2, eps),
        )

    build.__name__ = build.__qualname__ = name.lower().replace("fed", "fed_")
    build.__doc__ = (
        f"{name} (Reddi et al. 2020), defaults tuned there for EMNIST CNN.\n\n"
        '``eps`` is the adaptivity ``tau``; ``form`` is ``"bias_corrected"`` or\n'
        '``"paper"`` (module docstring).'
    )
    return build


fed_adam = _adaptive_builder("adam", "FedAdam")
fed_yogi = _adaptive_builder("yogi", "FedYogi")


def fed_adagrad(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float = 10**-1.5,
    server_learning_rate: float = 10**-1,
    b1: float = 0.9,
    eps: float = 1e-2,
) -> Algorithm:
    """FedAdagrad (Reddi et al. 2020, Algorithm 2), defaults tuned there for EMNIST CNN."""
    return fed_avg(
        per_example_loss_fn,
        _sgd("client_learning_rate", client_learning_rate),
        _adaptive_server("adagrad", "paper", server_learning_rate, b1, 0.0, eps),
    )
