"""q-FFL with the q-FedAvg solver: fair resource allocation across clients.

Li, Sanjabi, Beirami, Smith. "Fair Resource Allocation in Federated
Learning". ICLR 2020 (arXiv:1905.10497), Algorithm 3 (q-FedAvg).

q-FFL minimises ``sum_k p_k F_k(w)^(q+1) / (q+1)``: with ``q > 0`` clients
with a high loss weigh more, which lowers the spread of losses across
clients; ``q = 0`` is FedAvg's objective. Each sampled client ``k`` measures
its loss ``F_k(w)`` at the server model, runs local SGD from it to ``w_k``
and returns (with ``L = 1 / lr``, the paper's Lipschitz estimate)::

    dw_k    = L (w - w_k)
    Delta_k = F_k^q dw_k
    h_k     = q F_k^(q-1) ||dw_k||^2 + L F_k^q

and the server steps ``w <- w - sum_k Delta_k / sum_k h_k``. Here ``Delta_k``
is the client's update and ``h_k`` rides the side channel as a mean with the
same weights, so the ratio of the two means is the paper's ratio of sums and
q-FFL is FedAvg (``fed_avg(...)._replace(...)``) whose server divides the
aggregate by ``h`` before its unit SGD step.

``F_k(w)`` is the mean loss over the examples of the client's local batches,
evaluated at the server model during the same local steps (an extra forward
pass per step). Deviation from the paper: the sums are weighted by the
cohort's weights (the paper samples clients with probability ``p_k`` and sums
unweighted; pack with ``weighting="uniform"`` to get that form). As in the
authors' code, ``F_k`` is offset by ``1e-10`` before the powers. Very large
``F_k^q`` overflows float32; such a client is dropped by the aggregation and
counted in ``num_nonfinite_updates``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg, local_loss_and_grads, step_stats
from fedjaxsim.core.algorithm import Algorithm, ClientOutput
from fedjaxsim.core.losses import masked_mean_loss
from fedjaxsim.core.trees import sgd_step, tree_divide, tree_l2_norm, tree_squared_norm
from fedjaxsim.core.types import Params, PerExampleLossFn
from fedjaxsim.core.validation import check_real

# Offset of the losses before the powers, as in the authors' implementation.
LOSS_OFFSET = 1e-10


class QFflLocalState(NamedTuple):
    params: Params  # float32 pytree like params: the client's model
    server_params: Params  # float32 pytree like params: w, where F_k is measured
    server_loss_sum: jax.Array  # float32[]: sum over real examples of the loss at w
    num_examples: jax.Array  # float32[]: real examples in server_loss_sum


def q_ffl(
    per_example_loss_fn: PerExampleLossFn,
    q: float,
    client_learning_rate: float,
    lipschitz_constant: float | None = None,
) -> Algorithm:
    """Builds q-FFL trained with q-FedAvg.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``;
        must be non-negative (the objective raises losses to powers).
      q: fairness parameter ``q >= 0``.
      client_learning_rate: local SGD step size ``lr > 0``.
      lipschitz_constant: ``L > 0``; defaults to ``1 / client_learning_rate``
        as in the paper.

    Returns:
      An :class:`~fedjaxsim.core.algorithm.Algorithm` with FedAvg's
      :class:`~fedjaxsim.algorithms.fed_avg.ServerState`. Client metrics
      include ``server_model_loss`` (``F_k`` at the server model).

    Raises:
      ValueError: naming the first invalid hyper-parameter.
    """
    check_real("q", q, minimum=0.0)
    check_real("client_learning_rate", client_learning_rate, minimum=0.0, strict_minimum=True)
    if lipschitz_constant is None:
        lipschitz_constant = 1.0 / client_learning_rate
    check_real("lipschitz_constant", lipschitz_constant, minimum=0.0, strict_minimum=True)
    base = fed_avg(per_example_loss_fn, optax.sgd(client_learning_rate), optax.sgd(1.0))

    def client_init(server_params, client_state, rng) -> QFflLocalState:
        del client_state, rng
        zero = jnp.zeros((), jnp.float32)
        return QFflLocalState(server_params, server_params, zero, zero)

    def client_step(local: QFflLocalState, batch, mask, rng):
        loss_sum, grads = local_loss_and_grads(per_example_loss_fn, local.params, batch, mask, rng)
        _, server_loss_sum = masked_mean_loss(
            per_example_loss_fn, local.server_params, batch, mask, rng
        )
        stats = step_stats(loss_sum, mask)
        new_local = QFflLocalState(
            params=sgd_step(local.params, grads, client_learning_rate),
            server_params=local.server_params,
            server_loss_sum=local.server_loss_sum + server_loss_sum,
            num_examples=local.num_examples + stats["num_examples"],
        )
        return new_local, stats

    def client_finalize(server_params, local: QFflLocalState) -> ClientOutput:
        server_loss = local.server_loss_sum / jnp.maximum(local.num_examples, 1.0)
        loss = server_loss + LOSS_OFFSET
        gradient_estimate = jax.tree.map(
            lambda w, wk: lipschitz_constant * (w - wk), server_params, local.params
        )
        loss_power_q = jnp.power(loss, q)
        curvature = lipschitz_constant * loss_power_q
        if q:  # q F^(q-1) ||dw||^2; the term vanishes (exactly) at q = 0
            curvature = curvature + q * jnp.power(loss, q - 1.0) * tree_squared_norm(
                gradient_estimate
            )
        return ClientOutput(
            update=jax.tree.map(lambda d: loss_power_q * d, gradient_estimate),
            metrics={
                "server_model_loss": server_loss,
                "update_norm": tree_l2_norm(gradient_estimate) / lipschitz_constant,
            },
            means={"curvature": curvature},
        )

    def server_update(server_state, aggregate, rng):
        step = tree_divide(aggregate.update, aggregate.means["curvature"])
        return base.server_update(server_state, aggregate._replace(update=step), rng)

    return base._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        server_update=server_update,
    )
