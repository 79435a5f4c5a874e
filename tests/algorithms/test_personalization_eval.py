"""Personalization evaluation on the engine: fine-tune k steps per client, then evaluate.

``personalized_evaluation`` is an algorithm; ``pack_fine_tune_then_test``
lays out each client's k training steps and then its test batches; the
round's client metrics hold per-client sums that ``per_client_means``
divides. Compared with the float64 loop ``fine_tune_and_evaluate``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim import ExecutionPlan, build_round
from fedjaxsim.algorithms.personalization import per_client_means, personalized_evaluation
from fedjaxsim.core.evaluation import client_distribution
from fedjaxsim.core.packing import TEST_FLAG, pack_fine_tune_then_test
from fedjaxsim.testing import least_squares_problem
from fedjaxsim.testing.algorithm_references import (
    fine_tune_and_evaluate,
    least_squares_loss_and_grad,
)
from tests.algorithms.conftest import linear_squared_error as squared_error

NUM_CLIENTS = 7
FINETUNE_STEPS = 6
LEARNING_RATE = 0.1
BATCH_SIZE = 4
EVAL_BATCH_SIZE = 5
SEED = 2


@pytest.fixture(scope="module")
def split_clients():
    """Heterogeneous least-squares clients, 60% train / 40% test each."""
    problem = least_squares_problem(
        num_clients=NUM_CLIENTS, dim=4, seed=3, heterogeneity=2.0, min_size=10, max_size=30
    )
    train, test = [], []
    for x, y in problem.clients:
        cut = int(0.6 * len(x))
        train.append({"x": x[:cut], "y": y[:cut]})
        test.append({"x": x[cut:], "y": y[cut:]})
    ids = [10 * k + 1 for k in range(NUM_CLIENTS)]
    return train, test, ids, problem


def _as64(clients):
    return [(c["x"].astype(np.float64), c["y"].astype(np.float64)) for c in clients]


def _pack(split_clients, num_finetune_steps):
    train, test, ids, _ = split_clients
    return pack_fine_tune_then_test(
        train,
        test,
        ids,
        num_finetune_steps=num_finetune_steps,
        batch_size=BATCH_SIZE,
        eval_batch_size=EVAL_BATCH_SIZE,
        seed=SEED,
    )


def _reference(split_clients, params, num_finetune_steps):
    train, test, ids, _ = split_clients
    return fine_tune_and_evaluate(
        params,
        _as64(train),
        _as64(test),
        ids,
        loss_and_grad=least_squares_loss_and_grad,
        learning_rate=LEARNING_RATE,
        num_finetune_steps=num_finetune_steps,
        batch_size=BATCH_SIZE,
        seed=SEED,
    )


@pytest.fixture(scope="module")
def global_evaluation():
    algorithm = personalized_evaluation(squared_error, LEARNING_RATE)
    return algorithm, build_round(algorithm, ExecutionPlan(clients_per_chunk=3))


@pytest.fixture(scope="module")
def personal_evaluation():
    algorithm = personalized_evaluation(squared_error, LEARNING_RATE, personal=True)
    return algorithm, build_round(algorithm, ExecutionPlan())


def test_fine_tuning_matches_the_reference_and_helps_heterogeneous_clients(
    split_clients, global_evaluation
):
    _, test, _, problem = split_clients
    global_w = problem.optimum.astype(np.float32)
    cohort = _pack(split_clients, FINETUNE_STEPS)
    # Every client: k training steps with real examples, then only test steps.
    is_test = cohort.data[TEST_FLAG].any(axis=-1)
    assert not is_test[:, :FINETUNE_STEPS].any() and is_test[:, FINETUNE_STEPS:].all()
    assert cohort.mask[:, :FINETUNE_STEPS].any(axis=-1).all()
    algorithm, round_fn = global_evaluation
    state = algorithm.init({"w": jnp.asarray(global_w)})
    new_state, out = round_fn(state, cohort, jax.random.key(0))
    per_client = per_client_means(out.client_metrics)

    expected = _reference(split_clients, [global_w.astype(np.float64)], FINETUNE_STEPS)
    np.testing.assert_allclose(np.asarray(per_client["loss"]), expected, rtol=1e-4)
    np.testing.assert_array_equal(per_client["num_test_examples"], [len(c["y"]) for c in test])
    # Evaluation leaves the server model alone.
    np.testing.assert_array_equal(new_state.params["w"], state.params["w"])

    # Without fine-tuning: the global model on each client's test data.
    _, out = round_fn(state, _pack(split_clients, 0), jax.random.key(0))
    baseline = np.asarray(per_client_means(out.client_metrics)["loss"])
    no_finetune = _reference(split_clients, [global_w.astype(np.float64)], 0)
    np.testing.assert_allclose(baseline, no_finetune, rtol=1e-4)
    # Clients far from the global optimum gain from k local steps.
    before = client_distribution(baseline, higher_is_better=False)
    after = client_distribution(per_client["loss"], higher_is_better=False)
    assert after["mean"] < before["mean"]
    assert after["worst10_mean"] < before["worst10_mean"]


def test_personal_models_start_each_client_from_its_own_params(split_clients, personal_evaluation):
    """``personal=True``: client k fine-tunes and is evaluated from its own
    model (here its own least-squares optimum, perturbed), passed as the
    round's ``client_states`` (the path Ditto's personal models take). The
    broadcast model is zeros, which would give other losses."""
    problem = split_clients[3]
    rng = np.random.default_rng(4)
    own = [(w + 0.3 * rng.normal(size=w.shape)).astype(np.float32) for w in problem.client_optima]
    client_states = {"w": jnp.asarray(np.stack(own))}
    algorithm, round_fn = personal_evaluation
    state = algorithm.init({"w": jnp.zeros_like(client_states["w"][0])})
    for num_finetune_steps in (0, FINETUNE_STEPS):
        cohort = _pack(split_clients, num_finetune_steps)
        _, out = round_fn(state, cohort, jax.random.key(0), client_states)
        expected = _reference(
            split_clients, [[w.astype(np.float64)] for w in own], num_finetune_steps
        )
        np.testing.assert_allclose(
            np.asarray(per_client_means(out.client_metrics)["loss"]), expected, rtol=1e-4
        )


def test_bad_personalization_input_raises(split_clients, personal_evaluation):
    with pytest.raises(ValueError, match="learning_rate"):
        personalized_evaluation(squared_error, -0.1)
    with pytest.raises(ValueError, match="num_finetune_steps"):
        _pack(split_clients, -1)
    train, test, ids, _ = split_clients
    with pytest.raises(ValueError, match="must match"):
        pack_fine_tune_then_test(train, test[:-1], ids, num_finetune_steps=1, batch_size=4)
    # personal=True needs the per-client params.
    algorithm, round_fn = personal_evaluation
    with pytest.raises(ValueError, match="client_states"):
        round_fn(
            algorithm.init({"w": jnp.zeros((4, 1))}), _pack(split_clients, 0), jax.random.key(0)
        )
    with pytest.raises(ValueError, match="non-empty vector"):
        client_distribution(np.zeros((0,)))
