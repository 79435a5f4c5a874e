"""Invalid hyper-parameters and missing client state fail early and clearly."""

import jax
import optax
import pytest

from fedjaxsim import ditto, fed_nova, fed_prox, mime_lite, q_ffl, scaffold
from tests.algorithms.conftest import STATEFUL, initial_params, linear_softmax_loss, pack_round

LOSS = linear_softmax_loss


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: fed_prox(LOSS, optax.sgd(0.1), proximal_mu=-1.0), "proximal_mu"),
        (lambda: fed_prox(LOSS, optax.sgd(0.1), proximal_mu=float("inf")), "proximal_mu"),
        (
            lambda: scaffold(LOSS, client_learning_rate=0.0, num_total_clients=10),
            "client_learning_rate",
        ),
        (lambda: scaffold(LOSS, 0.1, num_total_clients=0), "num_total_clients"),
        (lambda: scaffold(LOSS, 0.1, 10, server_learning_rate=-1.0), "server_learning_rate"),
        (lambda: fed_nova(LOSS, client_learning_rate=-0.1), "client_learning_rate"),
        (lambda: fed_nova(LOSS, 0.1, momentum=1.0), "momentum"),
        (lambda: fed_nova(LOSS, 0.1, proximal_mu=-0.5), "proximal_mu"),
        (lambda: fed_nova(LOSS, 0.5, proximal_mu=2.0), "proximal_mu"),
        (
            lambda: mime_lite(LOSS, optax.sgd(0.1), server_learning_rate=float("nan")),
            "server_learning_rate",
        ),
        (lambda: q_ffl(LOSS, q=-1.0, client_learning_rate=0.1), "q must"),
        (lambda: q_ffl(LOSS, q=1.0, client_learning_rate=-0.1), "client_learning_rate"),
        (
            lambda: q_ffl(LOSS, q=1.0, client_learning_rate=0.1, lipschitz_constant=0.0),
            "lipschitz_constant",
        ),
        (lambda: ditto(LOSS, 0.1, 0.1, regularization=-1.0), "regularization"),
        (
            lambda: ditto(LOSS, 0.1, personal_learning_rate=0.0, regularization=1.0),
            "personal_learning_rate",
        ),
        (lambda: ditto(LOSS, "0.1", 0.1, regularization=1.0), "client_learning_rate"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_parameter(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_algorithm_without_client_states_raises(name, compiled_rounds):
    algorithm, round_fn = compiled_rounds(name)
    with pytest.raises(ValueError, match=r"keeps per-client state.*client_states"):
        round_fn(algorithm.init(initial_params()), pack_round(0), jax.random.key(0))
