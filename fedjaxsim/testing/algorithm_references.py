"""Float64 loop references of the algorithm library, written from the papers.

Nothing here imports the engine or the algorithm modules. Each function is one
round of one algorithm as the paper's pseudo-code reads: a Python loop over
the clients, each a loop over its local batches, then the server step. Models
are a list of float64 arrays with a ``loss_and_grad(params, x, y) -> (mean
loss, list of gradients)`` function (:func:`least_squares_loss_and_grad`,
:func:`softmax_regression_loss_and_grad`). Batches follow the documented
shuffling rule (:func:`fedjaxsim.testing.references.epoch_batches`), which
fixes *which* examples form each batch, not how they are trained on.

Client weights follow ``PackingConfig.weighting``: ``"num_examples"`` (the
client's dataset size), ``"num_processed"`` (examples it trained on this
round) or ``"uniform"``.
"""

from __future__ import annotations

import math

import numpy as np

from fedjaxsim.testing.references import epoch_batches, softmax_loss_and_grad


def least_squares_loss_and_grad(params, x, y):
    """Mean of ``0.5 * (x @ w - y)^2`` over the examples, and its gradient.

    Args:
      params: ``[w]`` with w float64[dim, 1].
      x: float64[n, dim]; y: float64[n, 1].
    """
    (w,) = params
    residual = x @ w - y
    return 0.5 * float(np.mean(np.sum(residual**2, axis=1))), [x.T @ residual / len(x)]


def softmax_regression_loss_and_grad(params, x, y):
    """Mean softmax cross-entropy for ``params = [weights, bias]``."""
    weights, bias = params
    loss, grad_weights, grad_bias = softmax_loss_and_grad(weights, bias, x, y)
    return loss, [grad_weights, grad_bias]


def _client_weight(weighting, num_examples, num_processed):
    return {"num_examples": num_examples, "num_processed": num_processed, "uniform": 1.0}[weighting]


def _batches(num_examples, options, client_id):
    return epoch_batches(
        num_examples,
        options["batch_size"],
        options["num_epochs"],
        options["seed"],
        options["round_index"],
        client_id,
        options.get("max_steps"),
    )


def _weighted_mean(vectors, weights):
    total = float(sum(weights))
    return [sum(w * v[i] for w, v in zip(weights, vectors)) / total for i in range(len(vectors[0]))]


def _options(batch_size, num_epochs, seed, round_index, max_steps):
    return {
        "batch_size": batch_size,
        "num_epochs": num_epochs,
        "seed": seed,
        "round_index": round_index,
        "max_steps": max_steps,
    }


def fed_prox_round(
    params,
    clients,
    client_ids,
    *,
    loss_and_grad,
    client_learning_rate,
    proximal_mu,
    batch_size,
    num_epochs,
    seed,
    round_index,
    max_steps=None,
    weighting="num_examples",
):
    """One FedProx round with local SGD on ``F_k(w) + mu/2 ||w - w_server||^2``.

    Returns:
      The new server params (the weighted average of the client models).
    """
    options = _options(batch_size, num_epochs, seed, round_index, max_steps)
    models, weights = [], []
    for (x, y), client_id in zip(clients, client_ids):
        local = [p.copy() for p in params]
        processed = 0
        for batch in _batches(len(y), options, client_id):
            _, grads = loss_and_grad(local, x[batch], y[batch])
            local = [
                w - client_learning_rate * (g + proximal_mu * (w - s))
                for w, g, s in zip(local, grads, params)
            ]
            processed += len(batch)
        models.append(local)
        weights.append(_client_weight(weighting, len(y), processed))
    return _weighted_mean(models, weights)


def scaffold_round(
    params,
    server_control,
    client_controls,
    clients,
    client_ids,
    *,
    loss_and_grad,
    client_learning_rate,
    server_learning_rate,
    num_total_clients,
    batch_size,
    num_epochs,
    seed,
    round_index,
    max_steps=None,
    weighting="num_examples",
):
    """One SCAFFOLD round (Karimireddy et al. 2020, Algorithm 1, option II).

    Args:
      server_control: c, a list like params.
      client_controls: dict client id -> c_i (missing means zeros); updated in
        place for the sampled clients.

    Returns:
      ``(new_params, new_server_control)``.
    """
    options = _options(batch_size, num_epochs, seed, round_index, max_steps)
    model_deltas, control_deltas, weights = [], [], []
    for (x, y), client_id in zip(clients, client_ids):
        client_control = client_controls.get(client_id, [np.zeros_like(p) for p in params])
        local = [p.copy() for p in params]
        num_steps = processed = 0
        for batch in _batches(len(y), options, client_id):
            _, grads = loss_and_grad(local, x[batch], y[batch])
            local = [
                w - client_learning_rate * (g - ci + c)
                for w, g, ci, c in zip(local, grads, client_control, server_control)
            ]
            num_steps += 1
            processed += len(batch)
        new_control = [
            ci - c + (x0 - w) / (num_steps * client_learning_rate)
            for ci, c, x0, w in zip(client_control, server_control, params, local)
        ]
        model_deltas.append([w - x0 for w, x0 in zip(local, params)])
        control_deltas.append([new - old for new, old in zip(new_control, client_control)])
        client_controls[client_id] = new_control
        weights.append(_client_weight(weighting, len(y), processed))
    mean_delta = _weighted_mean(model_deltas, weights)
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
    clients,
    client_ids,
    *,
    loss_and_grad,
    client_learning_rate,
    batch_size,
    num_epochs,
    seed,
    round_index,
    max_steps=None,
    weighting="num_examples",
    server_learning_rate=1.0,
    momentum=0.0,
    proximal_mu=0.0,
):
    """One FedNova round (Wang et al. 2020): normalized averaging.

    ``x <- x - server_lr * tau_eff * sum_i p_i (x - y_i) / ||a_i||_1`` with
    ``tau_eff = sum_i p_i ||a_i||_1``.
    """
    options = _options(batch_size, num_epochs, seed, round_index, max_steps)
    normalized, norms, weights = [], [], []
    for (x, y), client_id in zip(clients, client_ids):
        local = [p.copy() for p in params]
        velocity = [np.zeros_like(p) for p in params]
        num_steps = processed = 0
        for batch in _batches(len(y), options, client_id):
            _, grads = loss_and_grad(local, x[batch], y[batch])
            grads = [g + proximal_mu * (w - s) for g, w, s in zip(grads, local, params)]
            velocity = [momentum * v + g for v, g in zip(velocity, grads)]
            local = [w - client_learning_rate * v for w, v in zip(local, velocity)]
            num_steps += 1
            processed += len(batch)
        norm = fed_nova_norm_of_coefficients(num_steps, client_learning_rate, momentum, proximal_mu)
        normalized.append([(s - w) / norm for s, w in zip(params, local)])
        norms.append(norm)
        weights.append(_client_weight(weighting, len(y), processed))
    total = float(sum(weights))
    effective_steps = sum(w * n for w, n in zip(weights, norms)) / total
    direction = _weighted_mean(normalized, weights)
    return [s - server_learning_rate * effective_steps * d for s, d in zip(params, direction)]


def mime_lite_round(
    params,
    server_momentum,
    clients,
    client_ids,
    *,
    loss_and_grad,
    client_learning_rate,
    momentum,
    batch_size,
    num_epochs,
    seed,
    round_index,
    max_steps=None,
    weighting="num_examples",
    server_learning_rate=1.0,
):
    """One Mime-Lite round with heavy-ball momentum as the base optimizer.

    The base optimizer is ``m <- g + beta m; w <- w - lr m`` (optax's
    ``sgd(lr, momentum=beta)``). Clients use the server's ``m`` without
    changing it; the server then sets ``m <- full_grad + beta m`` with the
    weighted mean of the clients' gradients at the server model.

    Returns:
      ``(new_params, new_server_momentum)``.
    """
    options = _options(batch_size, num_epochs, seed, round_index, max_steps)
    deltas, gradients, weights = [], [], []
    for (x, y), client_id in zip(clients, client_ids):
        local = [p.copy() for p in params]
        gradient_sum = [np.zeros_like(p) for p in params]
        processed = 0
        for batch in _batches(len(y), options, client_id):
            _, grads = loss_and_grad(local, x[batch], y[batch])
            local = [
                w - client_learning_rate * (g + momentum * m)
                for w, g, m in zip(local, grads, server_momentum)
            ]
            _, server_grads = loss_and_grad(params, x[batch], y[batch])
            gradient_sum = [s + len(batch) * g for s, g in zip(gradient_sum, server_grads)]
            processed += len(batch)
        deltas.append([s - w for s, w in zip(params, local)])
        gradients.append([s / processed for s in gradient_sum])
        weights.append(_client_weight(weighting, len(y), processed))
    mean_delta = _weighted_mean(deltas, weights)
    full_gradient = _weighted_mean(gradients, weights)
    new_params = [s - server_learning_rate * d for s, d in zip(params, mean_delta)]
    new_momentum = [g + momentum * m for g, m in zip(full_gradient, server_momentum)]
    return new_params, new_momentum


def q_ffl_round(
    params,
    clients,
    client_ids,
    *,
    loss_and_grad,
    q,
    client_learning_rate,
    batch_size,
    num_epochs,
    seed,
    round_index,
    max_steps=None,
    weighting="num_examples",
    lipschitz_constant=None,
):
    """One q-FedAvg round (Li et al. 2020, Algorithm 3), client sums weighted.

    ``F_k`` is the mean loss at the server model over the examples of the
    client's local batches (every example of an epoch, repeated per epoch).
    """
    options = _options(batch_size, num_epochs, seed, round_index, max_steps)
    lipschitz = 1.0 / client_learning_rate if lipschitz_constant is None else lipschitz_constant
    deltas, curvatures, weights = [], [], []
    for (x, y), client_id in zip(clients, client_ids):
        local = [p.copy() for p in params]
        loss_sum = 0.0
        processed = 0
        for batch in _batches(len(y), options, client_id):
            _, grads = loss_and_grad(local, x[batch], y[batch])
            local = [w - client_learning_rate * g for w, g in zip(local, grads)]
            server_loss, _ = loss_and_grad(params, x[batch], y[batch])
            loss_sum += server_loss * len(batch)
            processed += len(batch)
        loss = loss_sum / processed + 1e-10
        gradient_estimate = [lipschitz * (s - w) for s, w in zip(params, local)]
        squared_norm = sum(float(np.sum(g**2)) for g in gradient_estimate)
        deltas.append([loss**q * g for g in gradient_estimate])
        curvatures.append(q * loss ** (q - 1) * squared_norm + lipschitz * loss**q)
        weights.append(_client_weight(weighting, len(y), processed))
    total_curvature = sum(w * h for w, h in zip(weights, curvatures))
    return [
        s - sum(w * d[i] for w, d in zip(weights, deltas)) / total_curvature
        for i, s in enumerate(params)
    ]


def ditto_round(
    params,
    personal_models,
    clients,
    client_ids,
    *,
    loss_and_grad,
    client_learning_rate,
    personal_learning_rate,
    regularization,
    batch_size,
    num_epochs,
    seed,
    round_index,
    max_steps=None,
    weighting="num_examples",
    server_learning_rate=1.0,
):
    """One Ditto round (Li et al. 2021): FedAvg for w, regularised SGD for v_k.

    Args:
      personal_models: dict client id -> v_k; a missing client starts from the
        params it receives. Updated in place for the sampled clients.

    Returns:
      The new server params.
    """
    options = _options(batch_size, num_epochs, seed, round_index, max_steps)
    deltas, weights = [], []
    for (x, y), client_id in zip(clients, client_ids):
        local = [p.copy() for p in params]
        personal = [p.copy() for p in personal_models.get(client_id, params)]
        processed = 0
        for batch in _batches(len(y), options, client_id):
            _, grads = loss_and_grad(local, x[batch], y[batch])
            _, personal_grads = loss_and_grad(personal, x[batch], y[batch])
            local = [w - client_learning_rate * g for w, g in zip(local, grads)]
            personal = [
                v - personal_learning_rate * (g + regularization * (v - s))
                for v, g, s in zip(personal, personal_grads, params)
            ]
            processed += len(batch)
        personal_models[client_id] = personal
        deltas.append([s - w for s, w in zip(params, local)])
        weights.append(_client_weight(weighting, len(y), processed))
    mean_delta = _weighted_mean(deltas, weights)
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

    Returns:
      float64[num_clients]: the mean test loss of each client.
    """
    losses = []
    fewest_batches = min(math.ceil(len(y) / batch_size) for _, y in train_clients)
    num_epochs = max(1, math.ceil(num_finetune_steps / fewest_batches))
    for (x, y), (x_test, y_test), client_id in zip(train_clients, test_clients, client_ids):
        local = [p.copy() for p in params]
        if num_finetune_steps:
            batches = epoch_batches(
                len(y), batch_size, num_epochs, seed, round_index, client_id, num_finetune_steps
            )
            for batch in batches:
                _, grads = loss_and_grad(local, x[batch], y[batch])
                local = [w - learning_rate * g for w, g in zip(local, grads)]
        losses.append(loss_and_grad(local, x_test, y_test)[0])
    return np.asarray(losses)
