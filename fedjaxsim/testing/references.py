"""Independent, loop-based float64 references.

Nothing here imports the engine: FedAvg is written as the textbook loop
"each client runs E epochs of minibatch SGD over its own shuffled examples;
the server averages the deltas by weight". The only thing shared with the
library is the documented shuffling rule (a NumPy Generator seeded with
``[0x5EED5F1E, seed, round, client_id]``, one permutation per epoch), which
defines *which* examples form a batch, not how they are trained on.

Models are lists of float64 arrays with a ``loss_and_grad(params, x, y) ->
(mean loss, list of gradients)`` function. Every client of every reference
trains with :func:`local_sgd`, the one client loop; server optimizers are
small float64 objects called as ``optimizer(params, pseudo_gradient) ->
params``, where the pseudo-gradient is the weighted mean of the clients'
``server - client`` deltas.
"""

from __future__ import annotations

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


def softmax_regression_loss_and_grad(params, x, y):
    """:func:`softmax_loss_and_grad` for ``params = [weights, bias]``."""
    weights, bias = params
    loss, grad_weights, grad_bias = softmax_loss_and_grad(weights, bias, x, y)
    return loss, [grad_weights, grad_bias]


def epoch_batches(
    num_examples, batch_size, num_epochs, seed, round_index, client_id, max_steps=None
):
    """The example indices of each local step, per the documented shuffling rule."""
    rng = np.random.default_rng([SHUFFLE_STREAM, seed, round_index, client_id])
    batches = []
    for _ in range(num_epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            batches.append(order[start : start + batch_size])
    return batches if max_steps is None else batches[:max_steps]


class ClientData(NamedTuple):
    """One client of a reference cohort, batched as its local steps use its data."""

    client_id: int  # population id (the shuffling seed)
    batches: list  # (x, y) of each local step, in order
    weight: float  # aggregation weight (PackingConfig.weighting)


class RoundSchedule(NamedTuple):
    """Which examples each local step of a round trains on, and how clients weigh.

    The reference's side of ``PackingConfig`` (batch size, epochs, step cap,
    weighting) plus the shuffling seeds of the round; :meth:`pack` is the
    reference's ``pack_cohort``.
    """

    batch_size: int
    num_epochs: int
    seed: int
    round_index: int
    max_steps: int | None = None
    weighting: str = "num_examples"  # or "num_processed", "uniform"

    def pack(self, clients, client_ids):
        """The reference cohort: a :class:`ClientData` per ``(x, y)`` pair and its id."""
        cohort = []
        for (x, y), client_id in zip(clients, client_ids):
            batches = batched(x, y, self.batches(len(y), client_id))
            num_processed = sum(len(batch_y) for _, batch_y in batches)
            weight = {"num_examples": len(y), "num_processed": num_processed, "uniform": 1.0}
            cohort.append(ClientData(client_id, batches, weight[self.weighting]))
        return cohort

    def batches(self, num_examples, client_id):
        """The example indices of each of the client's local steps."""
        return epoch_batches(
            num_examples,
            self.batch_size,
            self.num_epochs,
            self.seed,
            self.round_index,
            client_id,
            self.max_steps,
        )


def batched(x, y, batches):
    """``(x[batch], y[batch])`` for each batch of example indices."""
    return [(x[batch], y[batch]) for batch in batches]


class LocalRun(NamedTuple):
    """One client's local training."""

    params: list  # float64 arrays: the client's model after its last step
    num_steps: int  # local steps taken
    num_examples: int  # examples trained on (with repeats over epochs)
    loss_sum: float  # sum over those examples of the loss at the model each step starts from


def local_sgd(params, batches, *, loss_and_grad, learning_rate, momentum=0.0, correction=None):
    """The client loop every reference shares: SGD from ``params`` over ``batches``.

    Each step, on the batch's ``(x, y)``::

        d = grad F(w) + correction          # a list like w, or w -> such a list
        m = momentum * m + d                # m = d without momentum
        w = w - learning_rate * m           # optax.sgd(learning_rate, momentum)

    Returns:
      A :class:`LocalRun`.
    """
    local = [p.copy() for p in params]
    velocity = [np.zeros_like(p) for p in params]
    loss_sum, num_examples = 0.0, 0
    for x, y in batches:
        loss, grads = loss_and_grad(local, x, y)
        if correction is not None:
            term = correction(local) if callable(correction) else correction
            grads = [g + c for g, c in zip(grads, term)]
        velocity = [momentum * v + g for v, g in zip(velocity, grads)]
        local = [w - learning_rate * v for w, v in zip(local, velocity)]
        loss_sum += loss * len(y)
        num_examples += len(y)
    return LocalRun(local, len(batches), num_examples, loss_sum)


def proximal_term(center, mu):
    """The ``correction`` of a term ``mu/2 ||w - center||^2``: its gradient ``mu (w - center)``."""
    return lambda w: [mu * (wi - ci) for wi, ci in zip(w, center)]


def weighted_mean(vectors, weights):
    """``sum_i w_i v_i / sum_i w_i`` for lists of arrays ``v_i``."""
    total = float(sum(weights))
    return [sum(w * v[i] for w, v in zip(weights, vectors)) / total for i in range(len(vectors[0]))]


def fed_avg_round(params, cohort, *, loss_and_grad, client_learning_rate, server_optimizer=None):
    """One FedAvg round (McMahan et al. 2017), with a server optimizer (Reddi et al. 2020).

    Every client runs local SGD from ``params``; the server feeds the
    weighted mean of the deltas ``params - client params`` to
    ``server_optimizer`` as a pseudo-gradient. The default, SGD with learning
    rate 1, sets the params to the weighted mean of the client models.

    Args:
      cohort: :class:`ClientData` per client (:meth:`RoundSchedule.pack`).

    Returns:
      ``(new params, list of every client's LocalRun)``.
    """
    server_optimizer = ServerSgd(1.0) if server_optimizer is None else server_optimizer
    runs = [
        local_sgd(
            params, client.batches, loss_and_grad=loss_and_grad, learning_rate=client_learning_rate
        )
        for client in cohort
    ]
    deltas = [[s - w for s, w in zip(params, run.params)] for run in runs]
    pseudo_gradient = weighted_mean(deltas, [client.weight for client in cohort])
    return server_optimizer(params, pseudo_gradient), runs


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
    """One FedAvg round of softmax regression (:func:`fed_avg_round`).

    Args:
      weights, bias: float64 server model.
      clients: list of (x float64[n, features], y int[n]).
      client_ids: population ids (for the shuffling seed).
      server_step: ``f(delta_weights, delta_bias) -> (new_weights, new_bias)``
        from the averaged ``server - client`` deltas; default is plain FedAvg.

    Returns:
      (new_weights, new_bias, per-client dict lists of loss sums and counts).
    """
    schedule = RoundSchedule(batch_size, num_epochs, seed, round_index, max_steps, weighting)

    def server_optimizer(params, pseudo_gradient):
        return list(server_step(*pseudo_gradient))

    (new_weights, new_bias), runs = fed_avg_round(
        [weights, bias],
        schedule.pack(clients, client_ids),
        loss_and_grad=softmax_regression_loss_and_grad,
        client_learning_rate=client_learning_rate,
        server_optimizer=None if server_step is None else server_optimizer,
    )
    metrics = {
        "loss_sum": [r.loss_sum for r in runs],
        "num_examples": [r.num_examples for r in runs],
    }
    return new_weights, new_bias, metrics


class ServerSgd:
    """Server SGD with heavy-ball momentum: ``m = momentum m + g; x = x - lr m`` (optax.sgd)."""

    def __init__(self, learning_rate, momentum=0.0):
        self.learning_rate, self.momentum = learning_rate, momentum
        self.velocity = None

    def __call__(self, params, pseudo_gradient):
        if self.velocity is None:
            self.velocity = [np.zeros_like(g) for g in pseudo_gradient]
        self.velocity = [self.momentum * v + g for v, g in zip(self.velocity, pseudo_gradient)]
        return [x - self.learning_rate * v for x, v in zip(params, self.velocity)]


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


class BiasCorrectedYogi:
    """Yogi (Zaheer et al., NeurIPS 2018) in the bias-corrected form optax documents.

    Both moments start at ``initial_accumulator`` (optax: 1e-6), not zero::

        m = b1 m + (1 - b1) g
        v = v - (1 - b2) sign(v - g^2) g^2
        x = x - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, learning_rate, b1, b2, eps, initial_accumulator=1e-6):
        self.learning_rate, self.b1, self.b2, self.eps = learning_rate, b1, b2, eps
        self.initial_accumulator = initial_accumulator
        self.t, self.m, self.v = 0, None, None

    def __call__(self, params, pseudo_gradient):
        if self.m is None:
            self.m = [np.full_like(g, self.initial_accumulator) for g in pseudo_gradient]
            self.v = [np.full_like(g, self.initial_accumulator) for g in pseudo_gradient]
        self.t += 1
        b1, b2 = self.b1, self.b2
        self.m = [b1 * m + (1 - b1) * g for m, g in zip(self.m, pseudo_gradient)]
        self.v = [v - (1 - b2) * np.sign(v - g**2) * g**2 for v, g in zip(self.v, pseudo_gradient)]
        m_hat = [m / (1 - b1**self.t) for m in self.m]
        v_hat = [v / (1 - b2**self.t) for v in self.v]
        return [
            x - self.learning_rate * m / (np.sqrt(v) + self.eps)
            for x, m, v in zip(params, m_hat, v_hat)
        ]


class ReddiAdaptiveServer:
    """The server of Reddi et al. 2020 (ICLR 2021), Algorithm 2, as printed.

    With ``Delta_t`` the averaged *client minus server* delta (minus the
    pseudo-gradient this is called with), from ``m_{-1} = 0`` and
    ``v_{-1} = tau^2``::

        m_t = b1 m_{t-1} + (1 - b1) Delta_t
        v_t = v_{t-1} + Delta_t^2                                  FedAdagrad
        v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                      FedAdam
        v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)   FedYogi
        x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

    No bias correction. ``second_moment`` is "adagrad", "adam" or "yogi".
    """

    def __init__(self, second_moment, learning_rate, b1, b2, tau):
        self.second_moment = second_moment
        self.learning_rate, self.b1, self.b2, self.tau = learning_rate, b1, b2, tau
        self.m, self.v = None, None

    def _next_v(self, v, delta):
        square = delta * delta
        if self.second_moment == "adagrad":
            return v + square
        if self.second_moment == "adam":
            return self.b2 * v + (1 - self.b2) * square
        if self.second_moment == "yogi":
            return v - (1 - self.b2) * square * np.sign(v - square)
        raise ValueError(f"unknown second moment {self.second_moment!r}")

    def __call__(self, params, pseudo_gradient):
        deltas = [-g for g in pseudo_gradient]
        if self.m is None:
            self.m = [np.zeros_like(d) for d in deltas]
            self.v = [np.full_like(d, self.tau**2) for d in deltas]
        self.m = [self.b1 * m + (1 - self.b1) * d for m, d in zip(self.m, deltas)]
        self.v = [self._next_v(v, d) for v, d in zip(self.v, deltas)]
        return [
            x + self.learning_rate * m / (np.sqrt(v) + self.tau)
            for x, m, v in zip(params, self.m, self.v)
        ]


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
