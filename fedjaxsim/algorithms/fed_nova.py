"""FedNova: normalized averaging for clients that take different numbers of steps.

Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency Problem
in Heterogeneous Federated Optimization". NeurIPS 2020 (arXiv:2007.07481).

When clients run different numbers of local steps ``tau_i``, FedAvg's
weighted average of deltas over-weights clients that step more and converges
to the optimum of a *different* objective. FedNova writes every local solver
as ``x - y_i = lr * G_i a_i`` (``G_i`` the stacked local gradients, ``a_i``
their non-negative coefficients), normalises each delta by ``||a_i||_1`` and
rescales the average by the effective number of steps
``tau_eff = sum_i p_i ||a_i||_1``::

    x <- x - server_lr * tau_eff * sum_i p_i (x - y_i) / ||a_i||_1

with ``p_i`` the cohort weights normalised to sum to 1. For local SGD
``||a_i||_1 = tau_i``, so equal step counts give FedAvg exactly.

FedNova is FedAvg (``fed_avg(...)._replace(...)``) whose clients send the
normalised delta as their update and ``||a_i||_1`` on the side channel (a
mean, so ``tau_eff`` comes out of the aggregator with the update's weights),
and whose server scales the aggregate by ``tau_eff`` before its SGD step.

``||a_i||_1`` is tracked in the local state by running the local solver's
linear recursion on a scalar shadow whose gradient is always 1: it equals the
paper's closed forms for SGD (``tau``), heavy-ball momentum ``rho``
(``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``) and a proximal term
``mu`` (``(1 - (1 - lr mu)^tau) / (lr mu)``), and stays exact when both are
combined.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg, local_loss_and_grads, step_stats
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.trees import sgd_step, tree_l2_norm, tree_scale, tree_subtract, tree_zeros_like
from fedjaxsim.core.types import Params, PerExampleLossFn, PyTree
from fedjaxsim.core.validation import InvalidArgument, check_real


class FedNovaLocalState(NamedTuple):
    params: Params  # float32 pytree like params: the client's model y
    momentum: Params  # float32 pytree like params: heavy-ball buffer (zeros when momentum=0)
    server_params: Params  # float32 pytree like params: x, the centre of the proximal term
    step_norm: jax.Array  # float32[]: ||a||_1 so far (the scalar shadow's displacement)
    step_norm_momentum: jax.Array  # float32[]: the scalar shadow's momentum buffer
    num_steps: jax.Array  # int32[]: real local steps taken so far (tau)


def fed_nova(
    per_example_loss_fn: PerExampleLossFn,
    client_learning_rate: float,
    server_learning_rate: float = 1.0,
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
) -> Algorithm:
    """Builds FedNova with local SGD (optionally heavy-ball momentum and a proximal term).

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      client_learning_rate: local step size ``lr > 0``.
      server_learning_rate: server step size ``>= 0`` (1 in the paper).
      momentum: local heavy-ball momentum ``rho`` in ``[0, 1)``:
        ``m <- rho m + g; y <- y - lr m`` (``optax.sgd(lr, momentum=rho)``),
        reset every round.
      proximal_mu: FedProx term ``mu/2 ||y - x||^2`` in the local objective,
        ``mu >= 0`` with ``lr * mu < 1``.

    Returns:
      An :class:`~fedjaxsim.core.algorithm.Algorithm` with FedAvg's
      :class:`~fedjaxsim.algorithms.fed_avg.ServerState`.

    Raises:
      ValueError: naming the first invalid hyper-parameter.
    """
    check_real("client_learning_rate", client_learning_rate, minimum=0.0, strict_minimum=True)
    check_real("momentum", momentum, minimum=0.0, maximum=1.0, strict_maximum=True)
    check_real("proximal_mu", proximal_mu, minimum=0.0)
    if client_learning_rate * proximal_mu >= 1.0:
        raise InvalidArgument(
            "proximal_mu",
            f"proximal_mu * client_learning_rate must be < 1 (the local solver diverges "
            f"otherwise), got proximal_mu={proximal_mu!r}, "
            f"client_learning_rate={client_learning_rate!r}",
        )
    check_real("server_learning_rate", server_learning_rate, minimum=0.0)
    base = fed_avg(
        per_example_loss_fn, optax.sgd(client_learning_rate), optax.sgd(server_learning_rate)
    )

    def client_init(server_params, client_state, rng) -> FedNovaLocalState:
        del client_state, rng
        zero = jnp.zeros((), jnp.float32)
        return FedNovaLocalState(
            params=server_params,
            momentum=tree_zeros_like(server_params),
            server_params=server_params,
            step_norm=zero,
            step_norm_momentum=zero,
            num_steps=jnp.zeros((), jnp.int32),
        )

    def client_step(local: FedNovaLocalState, batch, mask, rng):
        loss_sum, grads = local_loss_and_grads(per_example_loss_fn, local.params, batch, mask, rng)
        if proximal_mu:
            grads = jax.tree.map(
                lambda g, y, x: g + proximal_mu * (y - x), grads, local.params, local.server_params
            )
        velocity = jax.tree.map(lambda m, g: momentum * m + g, local.momentum, grads)
        # The same recursion on a scalar with unit gradient: its displacement
        # (in units of lr) is sum_k a_k = ||a||_1, since y - x is linear in g.
        shadow_gradient = 1.0 - client_learning_rate * proximal_mu * local.step_norm
        shadow_momentum = momentum * local.step_norm_momentum + shadow_gradient
        new_local = FedNovaLocalState(
            params=sgd_step(local.params, velocity, client_learning_rate),
            momentum=velocity,
            server_params=local.server_params,
            step_norm=local.step_norm + shadow_momentum,
            step_norm_momentum=shadow_momentum,
            num_steps=local.num_steps + 1,
        )
        return new_local, step_stats(loss_sum, mask)

    def client_finalize(server_params, local: FedNovaLocalState) -> ClientOutput:
        delta = tree_subtract(server_params, local.params)
        # A client with no real step (only padding lanes) has delta 0; keep 0/1.
        norm = jnp.where(local.step_norm > 0, local.step_norm, 1.0)
        return ClientOutput(
            update=jax.tree.map(lambda d: d / norm, delta),
            metrics={
                "update_norm": tree_l2_norm(delta),
                "step_norm": local.step_norm,
                "num_local_steps": local.num_steps.astype(jnp.float32),
            },
            means={"step_norm": local.step_norm},
        )

    return base._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        server_update=scaled_by_effective_steps(base.server_update, "step_norm", keep=True),
    )


def scaled_by_effective_steps(server_update, side_key: str, keep: bool):
    """``server_update`` of the aggregate scaled by ``tau_eff``, the side-channel mean
    ``side_key`` (removed from the means unless ``keep``)."""

    def update(server_state, aggregate, rng):
        means = dict(aggregate.means)
        effective_steps = means[side_key] if keep else means.pop(side_key)  # tau_eff
        scaled = aggregate._replace(
            update=tree_scale(aggregate.update, effective_steps), means=means
        )
        server_state, metrics = server_update(server_state, scaled, rng)
        return server_state, dict(metrics, effective_num_steps=effective_steps)

    return update


class CountedLocalState(NamedTuple):
    inner: PyTree  # the wrapped algorithm's local state
    num_steps: jax.Array  # int32[]: real local steps taken so far (tau_i)


def normalized_local_steps(algorithm: Algorithm, side_key: str = "local_steps") -> Algorithm:
    """``algorithm`` with FedNova's normalisation by local steps, for partial work.

    When clients stop early (a deadline, a step budget), plain averaging
    weighs a client's delta by how far it got. This wrapper counts each
    client's real steps ``tau_i``, sends ``delta_i / tau_i`` as its update
    and ``tau_i`` on the side channel (a weighted mean, so ``tau_eff = sum_i
    p_i tau_i`` comes out of the aggregator), and scales the aggregate by
    ``tau_eff`` before the wrapped server step: FedNova with ``||a_i||_1 =
    tau_i``, which is exact for local SGD (:func:`fed_nova` keeps the exact
    norm for momentum and proximal terms too). When every client runs the
    same number of steps it is the wrapped algorithm.

    Raises:
      ValueError: when the algorithm already sends a side-channel mean named
        ``side_key``.
    """

    def client_init(broadcast, client_state, rng) -> CountedLocalState:
        inner = algorithm.client_init(broadcast, client_state, rng)
        return CountedLocalState(inner, jnp.zeros((), jnp.int32))

    def client_step(local: CountedLocalState, batch, mask, rng):
        inner, stats = algorithm.client_step(local.inner, batch, mask, rng)
        return CountedLocalState(inner, local.num_steps + 1), stats

    def client_finalize(broadcast, local: CountedLocalState) -> ClientOutput:
        output = algorithm.client_finalize(broadcast, local.inner)
        if side_key in output.means:
            raise ValueError(
                f"the algorithm already sends a side-channel mean {side_key!r}; pass "
                "another side_key"
            )
        steps = local.num_steps.astype(jnp.float32)
        norm = jnp.where(steps > 0, steps, 1.0)  # no step: the delta is 0 anyway
        return output._replace(
            update=jax.tree.map(lambda d: d / norm, output.update),
            means=dict(output.means, **{side_key: steps}),
        )

    return algorithm._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        server_update=scaled_by_effective_steps(algorithm.server_update, side_key, keep=False),
    )
