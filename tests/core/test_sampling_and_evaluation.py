import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.evaluation import batch_for_eval, build_classification_eval, client_distribution
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.sampling import sample_uniform
from fedjaxsim.models import from_functions, squared_error_loss
from fedjaxsim.testing import least_squares_problem, run_round, run_rounds

LEARNING_RATE = 0.3


def test_fedavg_reaches_the_closed_form_least_squares_optimum():
    """One full-batch local step, example-count weights: FedAvg is gradient
    descent on the pooled objective, whose minimiser is (X^T X)^-1 X^T y.

    (An algorithm property; it lives here because it pins the engine, packing
    and weighting together on a closed form.)
    """
    problem = least_squares_problem(num_clients=6, dim=4, seed=0, heterogeneity=1.0)
    model = from_functions(None, lambda params, x, rng, train: x @ params)
    algorithm = fed_avg(squared_error_loss(model), optax.sgd(LEARNING_RATE))
    clients = [{"x": x, "y": y} for x, y in problem.clients]
    cohort = pack_cohort(
        clients,
        range(6),
        PackingConfig(batch_size=64, shuffle=False),
        seed=0,
        round_index=0,
        num_total_clients=6,
    )
    assert cohort.num_steps == 1  # one full-batch step per client
    round_fn = build_round(algorithm, ExecutionPlan())
    start = jnp.zeros((4, 1), jnp.float32)

    # Round 1 against one float64 gradient step on the pooled objective.
    state, _ = run_round(round_fn, algorithm.init(start), cohort, jax.random.key(0))
    x = np.concatenate([x for x, _ in problem.clients]).astype(np.float64)
    y = np.concatenate([y for _, y in problem.clients]).astype(np.float64)
    expected = -LEARNING_RATE * x.T @ (x @ np.zeros((4, 1)) - y) / len(x)
    np.testing.assert_allclose(np.asarray(state.params), expected, rtol=1e-5, atol=1e-6)

    state, _, _ = run_rounds(
        algorithm, start, [cohort] * 299, num_total_clients=6, round_fn=round_fn, state=state
    )
    distance = np.linalg.norm(np.asarray(state.params, np.float64) - problem.optimum)
    assert distance < 1e-4, distance
    # Not trivially close: the start was far, and the clients' own optima differ.
    assert np.linalg.norm(problem.optimum) > 0.5
    assert max(np.linalg.norm(o - problem.optimum) for o in problem.client_optima) > 0.3


def test_sampling_is_deterministic_distinct_and_uniform():
    first = sample_uniform(seed=3, round_index=5, num_total_clients=50, cohort_size=10)
    np.testing.assert_array_equal(first, sample_uniform(3, 5, 50, 10))
    assert len(set(first.tolist())) == 10 and first.min() >= 0 and first.max() < 50
    assert not np.array_equal(first, sample_uniform(3, 6, 50, 10))
    assert not np.array_equal(first, sample_uniform(4, 5, 50, 10))
    counts = np.zeros(50)
    rounds = 2000
    for r in range(rounds):
        counts[sample_uniform(0, r, 50, 10)] += 1
    # Each client is picked with probability 1/5: binomial(2000, 0.2), sd ~17.9.
    expected = rounds * 10 / 50
    assert np.abs(counts - expected).max() < 5 * np.sqrt(rounds * 0.2 * 0.8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cohort_size": 11}, "larger than the population"),
        ({"cohort_size": 0}, "positive"),
        ({"round_index": -1}, "round_index"),
    ],
)
def test_sampling_rejects_bad_cohorts(kwargs, message):
    arguments = {"seed": 0, "round_index": 0, "num_total_clients": 10, "cohort_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_uniform(**arguments)


def test_evaluation_matches_numpy_and_ignores_padding(logreg_model, logreg_params):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 12)).astype(np.float32)
    y = rng.integers(0, 5, size=37).astype(np.int32)
    batches = batch_for_eval(x, y, batch_size=8)
    assert batches.mask.shape == (5, 8) and batches.mask.sum() == 37
    evaluate = build_classification_eval(logreg_model.apply)
    sums = jax.device_get(evaluate(logreg_params, batches))
    dense = logreg_params["Dense_0"]
    logits = x.astype(np.float64) @ np.asarray(dense["kernel"], np.float64) + np.asarray(
        dense["bias"]
    )
    shifted = logits - logits.max(1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert sums["num_examples"] == 37
    np.testing.assert_allclose(
        sums["loss_sum"], -log_probabilities[np.arange(37), y].sum(), rtol=1e-5
    )
    assert sums["num_correct"] == (logits.argmax(1) == y).sum()


def test_evaluation_rejects_bad_sets():
    with pytest.raises(ValueError, match="empty"):
        batch_for_eval(np.zeros((0, 3)), np.zeros(0), 4)
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        batch_for_eval(np.zeros((3, 3)), np.zeros(2), 4)
    with pytest.raises(ValueError, match="batch_size"):
        batch_for_eval(np.zeros((3, 3)), np.zeros(3), 0)


def test_client_distribution_by_hand():
    """Values 1..20 in shuffled order: percentiles interpolate between order
    statistics (p10 sits 1.9 of the way from the 1st value), and the worst 10%
    are the 2 lowest, or the 2 highest when lower is better."""
    values = np.random.default_rng(0).permutation(np.arange(1.0, 21.0))
    summary = client_distribution(values)
    assert summary == pytest.approx(
        {"mean": 10.5, "p10": 2.9, "p50": 10.5, "p90": 18.1, "worst10_mean": 1.5}
    )
    assert client_distribution(values, higher_is_better=False)["worst10_mean"] == pytest.approx(
        19.5
    )
    # ceil(0.1 * n): at least one client, and 2 of 11.
    assert client_distribution([4.0])["worst10_mean"] == 4.0
    assert client_distribution(np.arange(11.0))["worst10_mean"] == pytest.approx(0.5)
    for bad in ([], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="non-empty vector"):
            client_distribution(bad)
