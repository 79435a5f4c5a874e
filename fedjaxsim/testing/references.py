"""Independent, loop-based float64 references.

Nothing here imports the engine: FedAvg is written as the textbook loop
"each client runs E epochs of minibatch SGD over its own shuffled examples;
the server averages the deltas by weight". The only thing shared with the
library is the documented shuffling rule (a NumPy Generator seeded with
``[0x5EED5F1E, seed, round, client_id]``, one permutation per epoch), which
defines *which* examples form a batch, not how they are trained on.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

SHUFFLE_STREAM = 0x5EED_5F1E


def softmax_loss_and_grad(weights, bias, x, y):
    """Mean cross-entropy of softmax regression over the given examples.

    Args:
      weights: float64[features, classes]; bias: float64[classes].
      x: float64[n, features]; y: int[n].

    Returns:
      (loss, grad_weights, grad_bias), means over the n examples.
    """
    logits = x @ weights + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.mean(np.log(probabilities[np.arange(n), y]))
    residual = probabilities.copy()
    residual[np.arange(n), y] -= 1.0
    return loss, x.T @ residual / n, residual.mean(axis=0)


def epoch_batches(num_examples, batch_size, num_epochs, seed, round_index, client_id, max_steps=None):
    """The example indices of each local step, per the documented shuffling rule."""
    rng = np.random.default_rng([SHUFFLE_STREAM, seed, round_index, client_id])
    batches = []
    for _ in range(num_epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            batches.append(order[start : start + batch_size])
    return batches if max_steps is None else batches[:max_steps]


def softmax_fedavg_round_reference(
    weights,
    bias,
    clients,
    client_ids,
    *,
    client_learning_rate,
    batch_size,
    num_epochs,
    seed,
    round_index,
    max_steps=None,
    weighting="num_examples",
    server_step=None,
):
    """One FedAvg round of softmax regression, as a plain Python loop.

    Args:
      weights, bias: float64 server model.
      clients: list of (x float64[n, features], y int[n]).
      client_ids: population ids (for the shuffling seed).
      server_step: ``f(delta_weights, delta_bias) -> (new_weights, new_bias)``;
        default is plain FedAvg (server SGD with learning rate 1).

    Returns:
      (new_weights, new_bias, per-client dict lists of loss sums and counts).
    """
    deltas_w, deltas_b, client_weights, loss_sums, counts = [], [], [], [], []
    for (x, y), client_id in zip(clients, client_ids):
        w, b = weights.copy(), bias.copy()
        loss_sum, count = 0.0, 0
        for batch in epoch_batches(len(y), batch_size, num_epochs, seed, round_index, client_id, max_steps):
            loss, grad_w, grad_b = softmax_loss_and_grad(w, b, x[batch], y[batch])
            w -= client_learning_rate * grad_w
            b -= client_learning_rate * grad_b
            loss_sum += loss * len(batch)
            count += len(batch)
        deltas_w.append(weights - w)
        deltas_b.append(bias - b)
        client_weights.append(
            {"num_examples": len(y), "num_processed": count, "uniform": 1.0}[weighting]
        )
        loss_sums.append(loss_sum)
        counts.append(count)
    total = float(sum(client_weights))
    mean_w = sum(cw * d for cw, d in zip(client_weights, deltas_w)) / total
    mean_b = sum(cw * d for cw, d in zip(client_weights, deltas_b)) / total
    if server_step is None:
        new_w, new_b = weights - mean_w, bias - mean_b
    else:
        new_w, new_b = server_step(mean_w, mean_b)
    return new_w, new_b, {"loss_sum": loss_sums, "num_examples": counts}


def adam_reference(learning_rate, b1, b2, eps):
    """Adam as in Kingma & Ba (bias-corrected, eps outside the root), float64.

    Returns ``step(params, grads) -> params`` with its state in a closure.
    """
    state = {"t": 0, "m": None, "v": None}

    def step(params, grads):
        if state["m"] is None:
            state["m"] = [np.zeros_like(g) for g in grads]
            state["v"] = [np.zeros_like(g) for g in grads]
        state["t"] += 1
        t = state["t"]
        new = []
        for i, (p, g) in enumerate(zip(params, grads)):
            state["m"][i] = b1 * state["m"][i] + (1 - b1) * g
            state["v"][i] = b2 * state["v"][i] + (1 - b2) * g * g
            m_hat = state["m"][i] / (1 - b1**t)
            v_hat = state["v"][i] / (1 - b2**t)
            new.append(p - learning_rate * m_hat / (np.sqrt(v_hat) + eps))
        return new

    return step


class LeastSquaresProblem(NamedTuple):
    clients: list  # list of (x float32[n, dim], y float32[n, 1])
    optimum: np.ndarray  # float64[dim, 1]: argmin of the pooled squared error
    client_optima: list  # float64[dim, 1] per client


def least_squares_problem(num_clients=8, dim=5, seed=0, heterogeneity=1.0, min_size=5, max_size=40):
    """Heterogeneous federated linear regression with a closed-form optimum.

    Client k holds ``y = x @ w_k + noise`` with its own ``w_k`` (spread set by
    ``heterogeneity``) and its own size. The minimiser of the pooled
    objective ``sum_k sum_i (x_i w - y_i)^2`` (FedAvg's fixed point under
    example-count weighting with one full-batch step per round) is
    ``(sum X^T X)^-1 sum X^T y``.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(dim, 1))
    clients, optima = [], []
    gram, moment = np.zeros((dim, dim)), np.zeros((dim, 1))
    for _ in range(num_clients):
        n = int(rng.integers(min_size, max_size + 1))
        x = rng.normal(size=(n, dim)) * rng.uniform(0.5, 1.5, size=(1, dim))
        w_k = base + heterogeneity * rng.normal(size=(dim, 1))
        y = x @ w_k + 0.1 * rng.normal(size=(n, 1))
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
        clients.append((x32, y32))
        optima.append(np.linalg.lstsq(x64, y64, rcond=None)[0])
        gram += x64.T @ x64
        moment += x64.T @ y64
    return LeastSquaresProblem(clients, np.linalg.solve(gram, moment), optima)


def num_local_steps(num_examples, batch_size, num_epochs, max_steps=None):
    steps = num_epochs * math.ceil(num_examples / batch_size)
    return steps if max_steps is None else min(steps, max_steps)
