"""Personalization evaluation: fine-tune k steps per client, then evaluate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjaxsim.algorithms import (
    build_personalized_evaluation,
    pack_for_personalization,
    summarize_over_clients,
)
from fedjaxsim.testing import least_squares_problem
from fedjaxsim.testing.algorithm_references import (
    fine_tune_and_evaluate,
    least_squares_loss_and_grad,
)

NUM_CLIENTS = 7
FINETUNE_STEPS = 6
LEARNING_RATE = 0.1


def squared_error(params, batch, rng):
    del rng
    residual = batch["x"] @ params["w"] - batch["y"]
    return 0.5 * jnp.sum(residual**2, axis=-1)


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
    return train, test, ids, problem.optimum.astype(np.float32)


def test_fine_tuning_matches_the_reference_and_helps_heterogeneous_clients(split_clients):
    train, test, ids, global_w = split_clients
    train_cohort, test_cohort = pack_for_personalization(
        train, test, ids, num_finetune_steps=FINETUNE_STEPS, batch_size=4, eval_batch_size=5, seed=2
    )
    assert train_cohort.num_steps == FINETUNE_STEPS
    assert (train_cohort.mask.any(axis=-1).sum(axis=1) == FINETUNE_STEPS).all()
    evaluate = build_personalized_evaluation(squared_error, LEARNING_RATE, clients_per_chunk=3)
    params = {"w": jnp.asarray(global_w)}
    result = evaluate(params, train_cohort, test_cohort, jax.random.key(0))

    as64 = lambda clients: [(c["x"].astype(np.float64), c["y"].astype(np.float64)) for c in clients]
    expected = fine_tune_and_evaluate(
        [global_w.astype(np.float64)],
        as64(train),
        as64(test),
        ids,
        loss_and_grad=least_squares_loss_and_grad,
        learning_rate=LEARNING_RATE,
        num_finetune_steps=FINETUNE_STEPS,
        batch_size=4,
        seed=2,
    )
    np.testing.assert_allclose(np.asarray(result["loss"]), expected, rtol=1e-4)
    np.testing.assert_array_equal(result["num_examples"], [len(c["y"]) for c in test])

    # Without fine-tuning, from per-client params (the path Ditto's personal
    # models take): the global model on each client's test data.
    _, test_only = pack_for_personalization(
        train, test, ids, num_finetune_steps=0, batch_size=4, eval_batch_size=5
    )
    per_client = {"w": jnp.broadcast_to(global_w, (NUM_CLIENTS, *global_w.shape))}
    baseline = build_personalized_evaluation(squared_error, LEARNING_RATE, params_per_client=True)(
        per_client, None, test_only, jax.random.key(0)
    )
    no_finetune = fine_tune_and_evaluate(
        [global_w.astype(np.float64)],
        as64(train),
        as64(test),
        ids,
        loss_and_grad=least_squares_loss_and_grad,
        learning_rate=LEARNING_RATE,
        num_finetune_steps=0,
        batch_size=4,
        seed=2,
    )
    np.testing.assert_allclose(np.asarray(baseline["loss"]), no_finetune, rtol=1e-4)
    # Clients far from the global optimum gain from k local steps.
    assert np.mean(expected) < np.mean(no_finetune)
    before = summarize_over_clients(baseline["loss"])
    after = summarize_over_clients(result["loss"])
    assert float(after.mean) < float(before.mean)
    assert float(after.worst_10_percent_mean) < float(before.worst_10_percent_mean)


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_distribution_summary_matches_numpy(higher_is_better):
    values = np.random.default_rng(0).gamma(2.0, size=25)
    summary = summarize_over_clients(values, higher_is_better=higher_is_better)
    ordered = np.sort(values)
    num_worst = math.ceil(0.1 * len(values))  # 3 of 25
    worst = ordered[:num_worst] if higher_is_better else ordered[-num_worst:]
    np.testing.assert_allclose(float(summary.mean), values.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        [float(summary.percentile_10), float(summary.percentile_50), float(summary.percentile_90)],
        np.percentile(values, [10, 50, 90]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(float(summary.worst_10_percent_mean), worst.mean(), rtol=1e-6)


def test_bad_personalization_input_raises(split_clients):
    train, test, ids, _ = split_clients
    with pytest.raises(ValueError, match="num_finetune_steps"):
        pack_for_personalization(train, test, ids, num_finetune_steps=-1, batch_size=4)
    with pytest.raises(ValueError, match="must match"):
        pack_for_personalization(train, test[:-1], ids, num_finetune_steps=1, batch_size=4)
    with pytest.raises(ValueError, match="learning_rate"):
        build_personalized_evaluation(squared_error, -0.1)
    with pytest.raises(ValueError, match="clients_per_chunk"):
        build_personalized_evaluation(squared_error, 0.1, clients_per_chunk=0)
    with pytest.raises(ValueError, match="values"):
        summarize_over_clients(np.zeros((0,)))
