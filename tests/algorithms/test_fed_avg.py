"""FedAvg against float64 loop references; what the adaptive-server references can tell apart.

The adaptive servers themselves (FedAvgM, FedAdam and FedYogi in both forms,
FedAdagrad) are run against their float64 references over three rounds in
``test_algorithm_references.py``; here, with the references alone, the
checks that those comparisons have teeth.
"""

import jax
import numpy as np
import optax
import pytest

from fedjaxsim import (
    ExecutionPlan,
    PackingConfig,
    build_round,
    fed_adagrad,
    fed_adam,
    fed_avg,
    fed_avg_m,
    fed_sgd_avg,
    fed_yogi,
    pack_cohort,
)
from fedjaxsim.testing import references, synthetic_clients
from fedjaxsim.testing.references import softmax_fedavg_round_reference
from tests.algorithms.conftest import B2, TAU, as_list, initial_params, standard_rounds

SIZES = [1, 479, 23, 64]
IDS = [11, 3, 42, 7]


def _weights(params):
    dense = params["Dense_0"]
    return np.asarray(dense["kernel"], np.float64), np.asarray(dense["bias"], np.float64)


@pytest.fixture(scope="module")
def fed_avg_round_fn(logreg_loss):
    algorithm = fed_sgd_avg(logreg_loss, client_learning_rate=0.05)
    return algorithm, build_round(algorithm, ExecutionPlan())


@pytest.mark.parametrize(
    "num_epochs, batch_size, max_steps, weighting, num_lanes",
    [
        (1, 20, None, "num_examples", None),
        (2, 16, None, "num_examples", 2),
        (3, 10, 7, "num_processed", None),
        (1, 32, None, "uniform", 1),
    ],
)
def test_one_round_of_the_flax_model_matches_numpy_loop(
    logreg_params, fed_avg_round_fn, num_epochs, batch_size, max_steps, weighting, num_lanes
):
    clients = synthetic_clients(SIZES, seed=1)
    config = PackingConfig(
        batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps, weighting=weighting
    )
    cohort = pack_cohort(
        clients, IDS, config, seed=5, round_index=0, num_total_clients=50, num_lanes=num_lanes
    )
    algorithm, round_fn = fed_avg_round_fn
    state, out = round_fn(algorithm.init(logreg_params), cohort, jax.random.key(0))

    w, b = _weights(logreg_params)
    ref_w, ref_b, ref_metrics = softmax_fedavg_round_reference(
        w,
        b,
        [(c["x"].astype(np.float64), c["y"]) for c in clients],
        IDS,
        client_learning_rate=0.05,
        batch_size=batch_size,
        num_epochs=num_epochs,
        seed=5,
        round_index=0,
        max_steps=max_steps,
        weighting=weighting,
    )
    new_w, new_b = _weights(state.params)
    np.testing.assert_allclose(new_w, ref_w, atol=1e-5)
    np.testing.assert_allclose(new_b, ref_b, atol=1e-5)
    np.testing.assert_array_equal(out.client_metrics["num_examples"], ref_metrics["num_examples"])
    np.testing.assert_allclose(out.client_metrics["loss_sum"], ref_metrics["loss_sum"], rtol=1e-4)
    assert int(state.round) == 1


def _reference_params(server_optimizer):
    """The conftest cases' FedAvg-family reference after their three rounds."""
    params = as_list(initial_params())
    for inputs in standard_rounds():
        params, _ = references.fed_avg_round(
            params,
            inputs.reference,
            loss_and_grad=references.softmax_regression_loss_and_grad,
            client_learning_rate=0.1,
            server_optimizer=server_optimizer,
        )
    return params


class _RecordingYogi(references.ReddiAdaptiveServer):
    """Reddi et al.'s FedYogi server that records sign(v_{t-1} - Delta_t^2)."""

    signs = ()

    def __call__(self, params, pseudo_gradient):
        previous = self.v or [np.full_like(g, self.tau**2) for g in pseudo_gradient]
        self.signs += tuple(np.sign(v - g * g).ravel() for v, g in zip(previous, pseudo_gradient))
        return super().__call__(params, pseudo_gradient)


def test_the_fed_yogi_case_takes_both_branches_of_the_sign():
    """FedYogi differs from an additive rule only through sign(v - Delta^2):
    the reference case must see both signs, or a wrong sign would pass."""
    server = _RecordingYogi("yogi", 0.05, 0.9, B2, TAU)
    _reference_params(server)
    signs = np.concatenate(server.signs)
    assert (signs > 0).sum() >= 10 and (signs < 0).sum() >= 10, signs


@pytest.mark.parametrize(
    "first, second",
    [
        # The two forms of each optimizer (bias correction and starting moments).
        (
            lambda: references.ReddiAdaptiveServer("adam", 0.05, 0.9, B2, TAU),
            lambda: references.adam_reference(0.05, 0.9, B2, TAU),
        ),
        (
            lambda: references.ReddiAdaptiveServer("yogi", 0.05, 0.9, B2, TAU),
            lambda: references.BiasCorrectedYogi(0.05, 0.9, B2, TAU),
        ),
        # The three second moments of Algorithm 2.
        (
            lambda: references.ReddiAdaptiveServer("adam", 0.05, 0.9, B2, TAU),
            lambda: references.ReddiAdaptiveServer("yogi", 0.05, 0.9, B2, TAU),
        ),
        (
            lambda: references.ReddiAdaptiveServer("adagrad", 0.05, 0.9, B2, TAU),
            lambda: references.ReddiAdaptiveServer("yogi", 0.05, 0.9, B2, TAU),
        ),
        # Bias-corrected Yogi against Adam: the sign rule and the 1e-6 start.
        (
            lambda: references.BiasCorrectedYogi(0.05, 0.9, B2, TAU),
            lambda: references.adam_reference(0.05, 0.9, B2, TAU),
        ),
    ],
    ids=["adam-forms", "yogi-forms", "adam-yogi", "adagrad-yogi", "bias-corrected-yogi-adam"],
)
def test_the_reference_cases_tell_the_adaptive_servers_apart(first, second):
    """Wiring one server rule where another was asked for would fail the
    reference test: after three rounds the rules differ by far more than its
    tolerance (atol 2e-5)."""
    differences = [
        np.max(np.abs(a - b))
        for a, b in zip(_reference_params(first()), _reference_params(second()))
    ]
    assert max(differences) > 1e-3, differences


@pytest.mark.parametrize(
    "builder, kwargs, message",
    [
        (fed_sgd_avg, {"client_learning_rate": -0.1}, "client_learning_rate"),
        (fed_sgd_avg, {"server_learning_rate": float("nan")}, "server_learning_rate"),
        (fed_adam, {"server_learning_rate": -1.0}, "server_learning_rate"),
        (fed_adam, {"eps": 0.0}, "eps"),
        (fed_adam, {"form": "adam"}, "form"),
        (fed_yogi, {"b2": 1.0}, "b2"),
        (fed_yogi, {"form": "Paper"}, "form"),
        (fed_avg_m, {"momentum": 1.0}, "momentum"),
        (fed_adagrad, {"client_learning_rate": -2.0}, "client_learning_rate"),
        (fed_adagrad, {"b1": -0.1}, "b1"),
    ],
)
def test_invalid_hyperparameters_raise(logreg_loss, builder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        builder(logreg_loss, **kwargs)


def test_nan_client_is_skipped_and_counted(logreg_loss, logreg_params):
    """A client whose local training diverges does not poison the average."""
    clients = synthetic_clients([10, 10], seed=7)
    clients[1]["x"] = clients[1]["x"] * 1e30  # finite, but overflows the logits to inf/NaN
    algorithm = fed_avg(logreg_loss, optax.sgd(0.05))
    round_fn = build_round(algorithm, ExecutionPlan())
    config = PackingConfig(batch_size=2)
    cohort = pack_cohort(clients, [0, 1], config, seed=0, round_index=0, num_total_clients=2)
    state, out = round_fn(algorithm.init(logreg_params), cohort, jax.random.key(0))
    assert int(out.server_metrics["num_nonfinite_updates"]) == 1
    # The same round with the diverging client at weight 0 is the first client's alone.
    only_first = cohort._replace(weight=np.array([cohort.weight[0], 0.0], np.float32))
    expected, out = round_fn(algorithm.init(logreg_params), only_first, jax.random.key(0))
    assert int(out.server_metrics["num_nonfinite_updates"]) == 0
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params)):
        np.testing.assert_array_equal(got, want)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
