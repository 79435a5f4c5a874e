"""The behaviour each paper claims, on small problems with known answers.

Heterogeneous federated least squares (``least_squares_problem``) has
closed-form answers: each client's optimum, the optimum of the uniform
average of the client objectives, the proximal point of FedProx and the
fixed point of Ditto's personal models. Every client takes full-batch
gradient steps, so the only error left is float32 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim import (
    ExecutionPlan,
    PackingConfig,
    build_round,
    ditto,
    fed_nova,
    fed_prox,
    fed_sgd_avg,
    mime_lite,
    pack_cohort,
    q_ffl,
    scaffold,
)
from fedjaxsim.algorithms.fed_nova import FedNovaLocalState
from fedjaxsim.testing import least_squares_problem, run_rounds
from fedjaxsim.testing.algorithm_references import fed_nova_norm_of_coefficients
from tests.algorithms.conftest import initial_params, linear_softmax_loss, population
from tests.algorithms.conftest import linear_squared_error as squared_error

DIM = 5
NUM_CLIENTS = 8
LOCAL_STEPS = 20
LEARNING_RATE = 0.05
NUM_ROUNDS = 100


class LeastSquares:
    """Eight heterogeneous clients, every one in every round, full batches."""

    def __init__(self):
        problem = least_squares_problem(
            num_clients=NUM_CLIENTS, dim=DIM, seed=0, heterogeneity=1.0, min_size=15, max_size=40
        )
        self.clients = [{"x": x, "y": y} for x, y in problem.clients]
        self.ids = list(range(NUM_CLIENTS))
        data = [(x.astype(np.float64), y.astype(np.float64)) for x, y in problem.clients]
        # f_k(w) = 1/(2 n_k) ||X_k w - y_k||^2 = 1/2 w'H_k w - b_k'w + const.
        self.hessians = [x.T @ x / len(x) for x, _ in data]
        self.linear_terms = [x.T @ y / len(x) for x, y in data]
        self.data = data
        # Optimum of the uniform average (1/N) sum_k f_k, SCAFFOLD's target
        # when clients are weighted uniformly.
        self.optimum = np.linalg.solve(sum(self.hessians), sum(self.linear_terms))
        self.client_optima = [
            np.linalg.solve(h, b) for h, b in zip(self.hessians, self.linear_terms)
        ]
        self.cohort = self.pack(num_epochs=LOCAL_STEPS)

    def pack(self, num_epochs):
        config = PackingConfig(
            batch_size=64, num_epochs=num_epochs, step_bucket="exact", weighting="uniform"
        )
        return pack_cohort(
            self.clients, self.ids, config, seed=0, round_index=0, num_total_clients=NUM_CLIENTS
        )

    def client_losses(self, w):
        return np.array([0.5 * np.mean(np.sum((x @ w - y) ** 2, axis=1)) for x, y in self.data])

    def train(self, algorithm, num_rounds=NUM_ROUNDS):
        """``num_rounds`` rounds on the full cohort: ``(server state, client-state store)``."""
        state, _, store = run_rounds(
            algorithm,
            {"w": jnp.zeros((DIM, 1), jnp.float32)},
            [self.cohort] * num_rounds,
            num_total_clients=NUM_CLIENTS,
        )
        return state, store


@pytest.fixture(scope="module")
def least_squares():
    return LeastSquares()


@pytest.fixture(scope="module")
def fed_avg_least_squares_params(least_squares):
    state, _ = least_squares.train(fed_sgd_avg(squared_error, LEARNING_RATE))
    return np.asarray(state.params["w"], np.float64)


def test_scaffold_reaches_the_optimum_where_fedavg_stays_biased(
    least_squares, fed_avg_least_squares_params
):
    algorithm = scaffold(squared_error, LEARNING_RATE, num_total_clients=NUM_CLIENTS)
    state, store = least_squares.train(algorithm)
    scaffold_distance = np.linalg.norm(
        np.asarray(state.params["w"], np.float64) - least_squares.optimum
    )
    fed_avg_distance = np.linalg.norm(fed_avg_least_squares_params - least_squares.optimum)
    # FedAvg with 20 local steps settles at a biased fixed point.
    assert fed_avg_distance > 0.02, fed_avg_distance
    assert scaffold_distance < 1e-4, scaffold_distance
    # The server control variate is the mean of the client control variates,
    # and at the optimum every c_i is its client's gradient there.
    controls = store.gather(least_squares.ids).control["w"].astype(np.float64)
    np.testing.assert_allclose(np.asarray(state.control["w"]), controls.mean(axis=0), atol=1e-5)
    gradients = [
        h @ least_squares.optimum - b
        for h, b in zip(least_squares.hessians, least_squares.linear_terms)
    ]
    np.testing.assert_allclose(controls, np.stack(gradients), atol=1e-3)


def test_q_ffl_lowers_the_spread_of_client_losses(least_squares, fed_avg_least_squares_params):
    state, _ = least_squares.train(q_ffl(squared_error, q=2.0, client_learning_rate=LEARNING_RATE))
    fair_losses = least_squares.client_losses(np.asarray(state.params["w"], np.float64))
    fed_avg_losses = least_squares.client_losses(fed_avg_least_squares_params)
    assert fair_losses.std() < 0.7 * fed_avg_losses.std(), (fair_losses, fed_avg_losses)
    assert fair_losses.max() < fed_avg_losses.max()


def test_ditto_personal_models_reach_their_closed_form(least_squares, fed_avg_least_squares_params):
    """Ditto's global model is FedAvg's; each personal model converges to
    argmin_v f_k(v) + lambda/2 ||v - w||^2 at the final global model w. The
    personal models only get there across rounds, through the store."""
    regularization = 1.0
    algorithm = ditto(squared_error, LEARNING_RATE, LEARNING_RATE, regularization)
    state, store = least_squares.train(algorithm)
    global_params = np.asarray(state.params["w"], np.float64)
    np.testing.assert_allclose(global_params, fed_avg_least_squares_params, atol=1e-6)
    personal = store.gather(least_squares.ids).personal_params["w"].astype(np.float64)
    for k, (hessian, linear) in enumerate(zip(least_squares.hessians, least_squares.linear_terms)):
        expected = np.linalg.solve(
            hessian + regularization * np.eye(DIM), linear + regularization * global_params
        )
        np.testing.assert_allclose(personal[k], expected, atol=1e-4)
        # Personalised: closer to the client's own optimum than the global model is.
        own = least_squares.client_optima[k]
        assert np.linalg.norm(personal[k] - own) < np.linalg.norm(global_params - own)


def test_fed_prox_with_huge_mu_keeps_every_client_at_the_server_model(least_squares):
    """The local solution is the proximal point (H + mu I)^-1 (b + mu w_s);
    its distance to w_s is at most ||grad f_k(w_s)|| / mu."""
    proximal_mu = 1e4
    server = np.full((DIM, 1), 0.3)
    # lr = 1 / (L + mu) makes local gradient descent contract fast.
    client_optimizer = optax.sgd(1.0 / (4.0 + proximal_mu))
    algorithm = fed_prox(squared_error, client_optimizer, proximal_mu)
    cohort = least_squares.pack(num_epochs=30)
    state = algorithm.init({"w": jnp.asarray(server, jnp.float32)})
    state, output = build_round(algorithm, ExecutionPlan())(state, cohort, jax.random.key(0))
    client_moves = np.asarray(output.client_metrics["update_norm"], np.float64)
    for k, (hessian, linear) in enumerate(zip(least_squares.hessians, least_squares.linear_terms)):
        gradient_norm = np.linalg.norm(hessian @ server - linear)
        own_optimum_distance = np.linalg.norm(least_squares.client_optima[k] - server)
        proximal_point = np.linalg.solve(
            hessian + proximal_mu * np.eye(DIM), linear + proximal_mu * server
        )
        assert client_moves[k] <= 1.01 * gradient_norm / proximal_mu + 1e-6
        np.testing.assert_allclose(
            client_moves[k], np.linalg.norm(proximal_point - server), atol=2e-6
        )
        assert own_optimum_distance > 1000 * client_moves[k]
    np.testing.assert_allclose(np.asarray(state.params["w"]), server, atol=1e-3)


# Clients of 9 to 37 examples, batches of 4, at most 3 steps: every client
# takes exactly 3 local steps.
EQUAL_STEPS = PackingConfig(batch_size=4, max_steps=3)


@pytest.fixture(scope="module")
def equal_steps_run():
    """FedAvg on a cohort where every client takes 3 steps: (cohort, state)."""
    clients = [population()[i] for i in (1, 2, 3, 5)]
    cohort = pack_cohort(
        clients, [3, 42, 7, 0], EQUAL_STEPS, seed=0, round_index=0, num_total_clients=50
    )
    assert (cohort.mask.any(axis=-1).sum(axis=1) == 3).all()
    algorithm = fed_sgd_avg(linear_softmax_loss, client_learning_rate=0.1)
    return cohort, _two_rounds(algorithm, cohort)


def _two_rounds(algorithm, cohort):
    round_fn = build_round(algorithm, ExecutionPlan())
    state = algorithm.init(initial_params())
    for round_index in range(2):
        state, _ = round_fn(state, cohort, jax.random.key(round_index))
    return state


@pytest.mark.parametrize(
    "name, build",
    [
        # FedNova: ||a_i||_1 = tau_i = tau, so tau_eff * mean(delta / tau) = mean(delta).
        ("fed_nova", lambda: fed_nova(linear_softmax_loss, 0.1)),
        # Mime-Lite with a stateless base optimizer (plain SGD) is FedAvg.
        ("mime_lite", lambda: mime_lite(linear_softmax_loss, optax.sgd(0.1))),
        # q = 0: Delta_k / h_k reduces to the weighted mean of the deltas.
        ("q_ffl", lambda: q_ffl(linear_softmax_loss, q=0.0, client_learning_rate=0.1)),
    ],
)
def test_reduces_to_fed_avg(name, build, equal_steps_run):
    cohort, fed_avg_state = equal_steps_run
    state = _two_rounds(build(), cohort)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(fed_avg_state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, err_msg=name)


@pytest.mark.parametrize("momentum, proximal_mu", [(0.0, 0.0), (0.7, 0.0), (0.0, 2.0)])
def test_fed_nova_tracks_the_papers_closed_form_norms(momentum, proximal_mu):
    """||a_i||_1 from the scalar shadow equals Wang et al.'s closed forms
    (the algorithm's own client functions, without the engine)."""
    learning_rate = 0.1
    algorithm = fed_nova(
        linear_softmax_loss, learning_rate, momentum=momentum, proximal_mu=proximal_mu
    )
    client = population()[1]
    batch = {"x": jnp.asarray(client["x"][:8]), "y": jnp.asarray(client["y"][:8])}
    mask = jnp.ones(8, bool)
    local = algorithm.client_init(initial_params(), (), jax.random.key(0))
    client_step = jax.jit(algorithm.client_step)
    for num_steps in range(1, 8):
        local, _ = client_step(local, batch, mask, jax.random.key(num_steps))
        assert isinstance(local, FedNovaLocalState)
        expected = fed_nova_norm_of_coefficients(num_steps, learning_rate, momentum, proximal_mu)
        np.testing.assert_allclose(float(local.step_norm), expected, rtol=1e-5)
