"""Float64 loop references of the algorithm library, written from the papers.

Nothing here imports the engine or the algorithm modules. Each function is one
round of one algorithm as the paper's pseudo-code reads: a Python loop over
the clients of a reference cohort, each running
:func:`~fedjaxsim.testing.references.local_sgd` (the one client loop:
gradient, optional correction and momentum, step) over its local batches,
then the server step. Models are a list of float64 arrays with a
``loss_and_grad(params, x, y) -> (mean loss, list of gradients)`` function
(:func:`least_squares_loss_and_grad`, :func:`softmax_regression_loss_and_grad`).

A reference cohort is what
:meth:`~fedjaxsim.testing.references.RoundSchedule.pack` makes of ``(x, y)``
clients: each client's batches (the documented shuffling rule fixes *which*
examples form each batch, not how they are trained on) and its weight
(``PackingConfig.weighting``).

FedAvg and its adaptive servers are :func:`fedjaxsim.testing.references.fed_avg_round`
with the server optimizers of that module.
"""

from __future__ import annotations

import math

import numpy as np

from fedjaxsim.testing.references import (
    RoundSchedule,
    batched,
    epoch_batches,
    local_sgd,
    proximal_term,
    softmax_regression_loss_and_grad,
    weighted_mean,
)

__all__ = [
    "RoundSchedule",
    "ditto_round",
    "fed_nova_norm_of_coefficients",
    "fed_nova_round",
    "fed_prox_round",
    "fine_tune_and_evaluate",
    "least_squares_loss_and_grad",
    "mime_lite_round",
    "q_ffl_round",
    "scaffold_round",
    "softmax_regression_loss_and_grad",
]


def least_squares_loss_and_grad(params, x, y):
    """Mean of ``0.5 * (x @ w - y)^2`` over the examples, and its gradient.

    Args:
      params: ``[w]`` with w float64[dim, 1].
      x: float64[n, dim]; y: float64[n, 1].
    """
    (w,) = params
    residual = x @ w - y
    return 0.5 * float(np.mean(np.sum(residual**2, axis=1))), [x.T @ residual / len(x)]


def _weights(cohort):
    return [client.weight for client in cohort]


def _mean_over_batches(values, batches):
    """The example-weighted mean of per-batch ``values`` (lists of arrays)."""
    return weighted_mean(values, [len(y) for _, y in batches])


def fed_prox_round(params, cohort, *, loss_and_grad, client_learning_rate, proximal_mu):
    """One FedProx round (Li et al. 2020): local SGD on ``F_k(w) + mu/2 ||w - w_server||^2``.

    Returns:
      The new server params (the weighted average of the client models).
    """
    models = []
    for client in cohort:
        run = local_sgd(
            params,
            client.batches,
            loss_and_grad=loss_and_grad,
            learning_rate=client_learning_rate,
            correction=proximal_term(params, proximal_mu),
        )
        models.append(run.params)
    return weighted_mean(models, _weights(cohort))


def scaffold_round(
    params,
    server_control,
    client_controls,
    cohort,
    *,
    loss_and_grad,
    client_learning_rate,
    server_learning_rate,
    num_total_clients,
):
    """One SCAFFOLD round (Karimireddy et al. 2020, Algorithm 1, option II).

    Client i steps ``y <- y - lr (g_i(y) - c_i + c)`` K times, then
    ``c_i+ = c_i - c + (x - y) / (K lr)``; the server moves
    ``x <- x + lr_g mean(y - x)`` and ``c <- c + sum(c_i+ - c_i) / N``.

    Args:
      server_control: c, a list like params.
      client_controls: dict client id -> c_i (missing means zeros); updated in
        place for the sampled clients.

    Returns:
      ``(new_params, new_server_control)``.
    """
    model_deltas, control_deltas = [], []
    for client in cohort:
        client_control = client_controls.get(client.client_id, [np.zeros_like(p) for p in params])
        drift_correction = [c - ci for c, ci in zip(server_control, client_control)]
        run = local_sgd(
            params,
            client.batches,
            loss_and_grad=loss_and_grad,
            learning_rate=client_learning_rate,
            correction=drift_correction,
        )
        new_control = [
            ci - c + (x0 - w) / (run.num_steps * client_learning_rate)
            for ci, c, x0, w in zip(client_control, server_control, params, run.params)
        ]
        model_deltas.append([w - x0 for w, x0 in zip(run.params, params)])
        control_deltas.append([new - old for new, old in zip(new_control, client_control)])
        client_controls[client.client_id] = new_control
    mean_delta = weighted_mean(model_deltas, _weights(cohort))
    new_params = [x0 + server_learning_rate * d for x0, d in zip(params, mean_delta)]
    new_control = [
        c + sum(dc[i] for dc in control_deltas) / num_total_clients
        for i, c in enumerate(server_control)
    ]
    return new_params, new_control


def fed_nova_norm_of_coefficients(num_steps, client_learning_rate, momentum=0.0, proximal_mu=0.0):
    """``||a_i||_1`` by the closed forms of Wang et al. 2020 (Section 5 and Appendix).

    Local SGD: ``tau``. Heavy-ball momentum ``rho``:
    ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``. Proximal term
    ``mu``: ``(1 - (1 - lr mu)^tau) / (lr mu)``. Not both at once.
    """
    if momentum and proximal_mu:
        raise ValueError("the closed forms cover momentum or a proximal term, not both")
    if momentum:
        rho = momentum
        return (num_steps - rho * (1 - rho**num_steps) / (1 - rho)) / (1 - rho)
    if proximal_mu:
        alpha = client_learning_rate * proximal_mu
        return (1 - (1 - alpha) ** num_steps) / alpha
    return float(num_steps)


def fed_nova_round(
    params,
    cohort,
    *,
    loss_and_grad,
    client_learning_rate,
    server_learning_rate=1.0,
    momentum=0.0,
    proximal_mu=0.0,
):
    """One FedNova round (Wang et al. 2020): normalized averaging.

    Local SGD with heavy-ball ``momentum`` or a proximal term ``mu``, then
    ``x <- x - server_lr * tau_eff * sum_i p_i (x - y_i) / ||a_i||_1`` with
    ``tau_eff = sum_i p_i ||a_i||_1`` (:func:`fed_nova_norm_of_coefficients`).
    """
    normalized, norms = [], []
    for client in cohort:
        run = local_sgd(
            params,
            client.batches,
            loss_and_grad=loss_and_grad,
            learning_rate=client_learning_rate,
            momentum=momentum,
            correction=proximal_term(params, proximal_mu),
        )
        norm = fed_nova_norm_of_coefficients(
            run.num_steps, client_learning_rate, momentum, proximal_mu
        )
        normalized.append([(s - w) / norm for s, w in zip(params, run.params)])
        norms.append(norm)
    weights = _weights(cohort)
    effective_steps = sum(w * n for w, n in zip(weights, norms)) / float(sum(weights))
    direction = weighted_mean(normalized, weights)
    return [s - server_learning_rate * effective_steps * d for s, d in zip(params, direction)]


def mime_lite_round(
    params,
    server_momentum,
    cohort,
    *,
    loss_and_grad,
    client_learning_rate,
    momentum,
    server_learning_rate=1.0,
):
    """One Mime-Lite round (Karimireddy et al. 2021) with heavy-ball momentum as base optimizer.

    The base optimizer is ``m <- g + beta m; w <- w - lr m`` (optax's
    ``sgd(lr, momentum=beta)``). Clients step with the server's ``m`` frozen,
    ``w <- w - lr (g + beta m)``; the server then sets ``m <- full_grad + beta m``
    with the weighted mean of the clients' gradients at the server model over
    their batches.

    Returns:
      ``(new_params, new_server_momentum)``.
    """
    frozen_momentum = [momentum * m for m in server_momentum]
    deltas, gradients = [], []
    for client in cohort:
        run = local_sgd(
            params,
            client.batches,
            loss_and_grad=loss_and_grad,
            learning_rate=client_learning_rate,
            correction=frozen_momentum,
        )
        server_gradients = [loss_and_grad(params, x, y)[1] for x, y in client.batches]
        deltas.append([s - w for s, w in zip(params, run.params)])
        gradients.append(_mean_over_batches(server_gradients, client.batches))
    weights = _weights(cohort)
    mean_delta = weighted_mean(deltas, weights)
    new_params = [s - server_learning_rate * d for s, d in zip(params, mean_delta)]
    new_momentum = [
        g + momentum * m for g, m in zip(weighted_mean(gradients, weights), server_momentum)
    ]
    return new_params, new_momentum


def q_ffl_round(params, cohort, *, loss_and_grad, q, client_learning_rate, lipschitz_constant=None):
    """One q-FedAvg round (Li et al. 2020, Algorithm 3), client sums weighted.

    ``F_k`` is the mean loss at the server model over the examples of the
    client's local batches (every example of an epoch, repeated per epoch).
    With ``L = 1 / lr``: ``dw_k = L (w - w_k)``, ``Delta_k = F_k^q dw_k``,
    ``h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q``; ``w <- w - sum Delta_k / sum h_k``.
    """
    lipschitz = 1.0 / client_learning_rate if lipschitz_constant is None else lipschitz_constant
    deltas, curvatures = [], []
    for client in cohort:
        run = local_sgd(
            params, client.batches, loss_and_grad=loss_and_grad, learning_rate=client_learning_rate
        )
        server_losses = [[loss_and_grad(params, x, y)[0]] for x, y in client.batches]
        (server_loss,) = _mean_over_batches(server_losses, client.batches)
        loss = server_loss + 1e-10
        gradient_estimate = [lipschitz * (s - w) for s, w in zip(params, run.params)]
        squared_norm = sum(float(np.sum(g**2)) for g in gradient_estimate)
        deltas.append([loss**q * g for g in gradient_estimate])
        curvatures.append(q * loss ** (q - 1) * squared_norm + lipschitz * loss**q)
    weights = _weights(cohort)
    total_curvature = sum(w * h for w, h in zip(weights, curvatures))
    return [
        s - sum(w * d[i] for w, d in zip(weights, deltas)) / total_curvature
        for i, s in enumerate(params)
    ]


def ditto_round(
    params,
    personal_models,
    cohort,
    *,
    loss_and_grad,
    client_learning_rate,
    personal_learning_rate,
    regularization,
    server_learning_rate=1.0,
):
    """One Ditto round (Li et al. 2021): FedAvg for w, regularised SGD for v_k.

    On the same local batches, the client's copy of the global model takes
    plain SGD steps and its personal model takes steps on
    ``F_k(v) + lambda/2 ||v - w^t||^2``.

    Args:
      personal_models: dict client id -> v_k; a missing client starts from the
        params it receives. Updated in place for the sampled clients.

    Returns:
      The new server params.
    """
    deltas = []
    for client in cohort:
        run = local_sgd(
            params, client.batches, loss_and_grad=loss_and_grad, learning_rate=client_learning_rate
        )
        personal = local_sgd(
            personal_models.get(client.client_id, params),
            client.batches,
            loss_and_grad=loss_and_grad,
            learning_rate=personal_learning_rate,
            correction=proximal_term(params, regularization),
        )
        personal_models[client.client_id] = personal.params
        deltas.append([s - w for s, w in zip(params, run.params)])
    mean_delta = weighted_mean(deltas, _weights(cohort))
    return [s - server_learning_rate * d for s, d in zip(params, mean_delta)]


def fine_tune_and_evaluate(
    params,
    train_clients,
    test_clients,
    client_ids,
    *,
    loss_and_grad,
    learning_rate,
    num_finetune_steps,
    batch_size,
    seed,
    round_index=0,
):
    """Per-client test loss after ``k`` SGD steps on the client's training data.

    Each client takes exactly ``num_finetune_steps`` steps over as many
    shuffled epochs of its training data as needed (the packing rule).

    Args:
      params: the model every client starts from, or a list with one model
        per client (``personal`` evaluation).

    Returns:
      float64[num_clients]: the mean test loss of each client.
    """
    starts = params if isinstance(params[0], (list, tuple)) else [params] * len(client_ids)
    fewest_batches = min(math.ceil(len(y) / batch_size) for _, y in train_clients)
    num_epochs = max(1, math.ceil(num_finetune_steps / fewest_batches))
    losses = []
    for start, (x, y), (x_test, y_test), client_id in zip(
        starts, train_clients, test_clients, client_ids
    ):
        batches = epoch_batches(
            len(y), batch_size, num_epochs, seed, round_index, client_id, num_finetune_steps
        )
        run = local_sgd(
            start, batched(x, y, batches), loss_and_grad=loss_and_grad, learning_rate=learning_rate
        )
        losses.append(loss_and_grad(run.params, x_test, y_test)[0])
    return np.asarray(losses)
