"""FedProx: FedAvg with a proximal term in every client's local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
Heterogeneous Networks". MLSys 2020 (arXiv:1812.06127).

Client k approximately minimises ``F_k(w) + mu/2 * ||w - w_server||^2``
(Algorithm 2 of the paper) with local steps of its optimizer, starting from
the server model; the proximal term keeps heterogeneous clients from drifting
far from it, and ``mu = 0`` recovers FedAvg. The server combines the deltas
``w_server - w_k`` like FedAvg (the aggregator, then an optax server
transform).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg, step_stats
from fedjaxsim.core.algorithm import Algorithm
from fedjaxsim.core.losses import masked_mean_loss
from fedjaxsim.core.trees import tree_squared_norm, tree_subtract
from fedjaxsim.core.types import Params, PerExampleLossFn
from fedjaxsim.core.validation import check_real


class FedProxLocalState(NamedTuple):
    params: Params  # float32 pytree like params: the client's model w
    opt_state: optax.OptState  # client optimizer state, fresh every round
    server_params: Params  # float32 pytree like params: w_server, the centre of the proximal term


def fed_prox(
    per_example_loss_fn: PerExampleLossFn,
    client_optimizer: optax.GradientTransformation,
    proximal_mu: float,
    server_optimizer: optax.GradientTransformation | None = None,
) -> Algorithm:
    """Builds FedProx.

    Args:
      per_example_loss_fn: ``(params, batch, rng) -> float32[batch_size]``.
      client_optimizer: optax transform for local steps (the paper uses SGD);
        its state is re-initialised every round.
      proximal_mu: ``mu >= 0``, the weight of ``mu/2 * ||w - w_server||^2``.
      server_optimizer: optax transform on the averaged delta; defaults to
        ``optax.sgd(1.0)`` (the server takes the weighted average model).

    Returns:
      An :class:`~fedjaxsim.core.algorithm.Algorithm` whose server state is
      :class:`fedjaxsim.algorithms.fed_avg.ServerState`. Client metrics report
      the data loss (``loss_sum``) without the proximal term.

    Raises:
      ValueError: if ``proximal_mu`` is negative or not finite.
    """
    check_real("proximal_mu", proximal_mu, minimum=0.0)
    # The server side (init, broadcast, aggregation, server step) and the
    # finalisation (delta = w_server - w_k) are FedAvg's; only the local
    # objective and the local state, which carries w_server, differ.
    base = fed_avg(per_example_loss_fn, client_optimizer, server_optimizer)

    def client_init(server_params, client_state, rng) -> FedProxLocalState:
        del client_state, rng
        return FedProxLocalState(server_params, client_optimizer.init(server_params), server_params)

    def local_objective(params, server_params, batch, mask, rng):
        mean_loss, loss_sum = masked_mean_loss(per_example_loss_fn, params, batch, mask, rng)
        proximal = 0.5 * proximal_mu * tree_squared_norm(tree_subtract(params, server_params))
        return mean_loss + proximal, loss_sum

    def client_step(local: FedProxLocalState, batch, mask, rng):
        grads, loss_sum = jax.grad(local_objective, has_aux=True)(
            local.params, local.server_params, batch, mask, rng
        )
        updates, opt_state = client_optimizer.update(grads, local.opt_state, local.params)
        params = optax.apply_updates(local.params, updates)
        return FedProxLocalState(params, opt_state, local.server_params), step_stats(loss_sum, mask)

    return base._replace(client_init=client_init, client_step=client_step)
