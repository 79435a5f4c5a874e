"""FedAvg and its adaptive-server variants against float64 loop references."""

import jax
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import (
    fed_adagrad,
    fed_adam,
    fed_avg,
    fed_avg_m,
    fed_sgd_avg,
    fed_yogi,
)
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.testing.references import adam_reference, softmax_fedavg_round_reference
from tests.conftest import make_clients

SIZES = [1, 479, 23, 64]
IDS = [11, 3, 42, 7]


def _weights(params):
    dense = params["Dense_0"]
    return np.asarray(dense["kernel"], np.float64), np.asarray(dense["bias"], np.float64)


def _cohort(clients, config, round_index, num_lanes=None):
    return pack_cohort(
        clients, IDS, config, seed=5, round_index=round_index, num_total_clients=50, num_lanes=num_lanes
    )


@pytest.mark.parametrize(
    "num_epochs, batch_size, max_steps, weighting, num_lanes",
    [
        (1, 20, None, "num_examples", None),
        (2, 16, None, "num_examples", 2),
        (3, 10, 7, "num_processed", None),
        (1, 32, None, "uniform", 1),
    ],
)
def test_one_round_matches_numpy_loop(logreg_loss, logreg_params, num_epochs, batch_size, max_steps, weighting, num_lanes):
    clients = make_clients(SIZES, seed=1)
    config = PackingConfig(batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps, weighting=weighting)
    algorithm = fed_sgd_avg(logreg_loss, client_learning_rate=0.05)
    round_fn = build_round(algorithm, ExecutionPlan(num_lanes=num_lanes))
    state, out = round_fn(algorithm.init(logreg_params), _cohort(clients, config, 0, num_lanes), jax.random.key(0))

    w, b = _weights(logreg_params)
    ref_w, ref_b, ref_metrics = softmax_fedavg_round_reference(
        w, b, [(c["x"].astype(np.float64), c["y"]) for c in clients], IDS,
        client_learning_rate=0.05, batch_size=batch_size, num_epochs=num_epochs,
        seed=5, round_index=0, max_steps=max_steps, weighting=weighting,
    )
    new_w, new_b = _weights(state.params)
    np.testing.assert_allclose(new_w, ref_w, atol=1e-5)
    np.testing.assert_allclose(new_b, ref_b, atol=1e-5)
    np.testing.assert_array_equal(out.client_metrics["num_examples"], ref_metrics["num_examples"])
    np.testing.assert_allclose(out.client_metrics["loss_sum"], ref_metrics["loss_sum"], rtol=1e-4)
    assert int(state.round) == 1


def test_adam_server_over_three_rounds_matches_numpy(logreg_loss, logreg_params):
    clients = make_clients(SIZES, seed=2)
    config = PackingConfig(batch_size=20)
    algorithm = fed_adam(logreg_loss, client_learning_rate=0.05, server_learning_rate=0.02, eps=1e-3)
    round_fn = build_round(algorithm, ExecutionPlan())
    state = algorithm.init(logreg_params)
    w, b = _weights(logreg_params)
    adam = adam_reference(0.02, 0.9, 0.99, 1e-3)
    for round_index in range(3):
        state, _ = round_fn(state, _cohort(clients, config, round_index), jax.random.key(round_index))
        w, b, _ = softmax_fedavg_round_reference(
            w, b, [(c["x"].astype(np.float64), c["y"]) for c in clients], IDS,
            client_learning_rate=0.05, batch_size=20, num_epochs=1, seed=5, round_index=round_index,
            server_step=lambda dw, db, w=w, b=b: tuple(adam([w, b], [dw, db])),
        )
    new_w, new_b = _weights(state.params)
    np.testing.assert_allclose(new_w, w, atol=2e-5)
    np.testing.assert_allclose(new_b, b, atol=2e-5)


def test_server_momentum_matches_numpy(logreg_loss, logreg_params):
    clients = make_clients(SIZES, seed=3)
    config = PackingConfig(batch_size=20)
    algorithm = fed_avg_m(logreg_loss, client_learning_rate=0.05, server_learning_rate=0.5, momentum=0.9)
    round_fn = build_round(algorithm, ExecutionPlan())
    state = algorithm.init(logreg_params)
    w, b = _weights(logreg_params)
    velocity = [np.zeros_like(w), np.zeros_like(b)]
    for round_index in range(3):
        state, _ = round_fn(state, _cohort(clients, config, round_index), jax.random.key(round_index))

        def momentum_step(dw, db, w=w, b=b):
            velocity[0] = 0.9 * velocity[0] + dw
            velocity[1] = 0.9 * velocity[1] + db
            return w - 0.5 * velocity[0], b - 0.5 * velocity[1]

        w, b, _ = softmax_fedavg_round_reference(
            w, b, [(c["x"].astype(np.float64), c["y"]) for c in clients], IDS,
            client_learning_rate=0.05, batch_size=20, num_epochs=1, seed=5,
            round_index=round_index, server_step=momentum_step,
        )
    np.testing.assert_allclose(_weights(state.params)[0], w, atol=2e-5)


def test_fedadagrad_direction_matches_paper_formula(logreg_loss, logreg_params):
    clients = make_clients(SIZES, seed=4)
    algorithm = fed_adagrad(logreg_loss, client_learning_rate=0.05, server_learning_rate=0.1, eps=1e-2)
    round_fn = build_round(algorithm, ExecutionPlan())
    state, _ = round_fn(algorithm.init(logreg_params), _cohort(clients, PackingConfig(batch_size=20), 0), jax.random.key(0))
    w, b = _weights(logreg_params)
    ref_w, _, _ = softmax_fedavg_round_reference(
        w, b, [(c["x"].astype(np.float64), c["y"]) for c in clients], IDS,
        client_learning_rate=0.05, batch_size=20, num_epochs=1, seed=5, round_index=0,
    )
    delta = w - ref_w  # the averaged client delta
    momentum = 0.1 * delta  # (1 - b1) * delta, b1 = 0.9
    expected = w - 0.1 * momentum / (np.sqrt(1e-4 + delta**2) + 1e-2)
    np.testing.assert_allclose(_weights(state.params)[0], expected, atol=1e-5)


def test_yogi_matches_optax_on_the_averaged_delta(logreg_loss, logreg_params):
    """FedYogi is FedAvg + optax.yogi on the pseudo-gradient: check that wiring."""
    clients = make_clients(SIZES, seed=6)
    algorithm = fed_yogi(logreg_loss, client_learning_rate=0.05, server_learning_rate=0.01)
    plain = fed_sgd_avg(logreg_loss, client_learning_rate=0.05)
    cohort = _cohort(clients, PackingConfig(batch_size=20), 0)
    state, _ = build_round(algorithm, ExecutionPlan())(algorithm.init(logreg_params), cohort, jax.random.key(0))
    averaged, _ = build_round(plain, ExecutionPlan())(plain.init(logreg_params), cohort, jax.random.key(0))
    delta = jax.tree.map(lambda a, b: a - b, logreg_params, averaged.params)
    tx = optax.yogi(0.01, b1=0.9, b2=0.99, eps=1e-4)
    updates, _ = tx.update(delta, tx.init(logreg_params), logreg_params)
    expected = optax.apply_updates(logreg_params, updates)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    "builder, kwargs, message",
    [
        (fed_sgd_avg, {"client_learning_rate": -0.1}, "client_learning_rate"),
        (fed_sgd_avg, {"server_learning_rate": float("nan")}, "server_learning_rate"),
        (fed_adam, {"server_learning_rate": -1.0}, "server_learning_rate"),
        (fed_adam, {"eps": 0.0}, "eps"),
        (fed_avg_m, {"momentum": 1.0}, "momentum"),
        (fed_adagrad, {"client_learning_rate": -2.0}, "client_learning_rate"),
    ],
)
def test_invalid_hyperparameters_raise(logreg_loss, builder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        builder(logreg_loss, **kwargs)


def test_nan_client_is_skipped_and_counted(logreg_loss, logreg_params):
    """A client whose local training diverges does not poison the average."""
    clients = make_clients([10, 10], seed=7)
    clients[1]["x"] = clients[1]["x"] * 1e30  # overflows the logits to inf/NaN
    algorithm = fed_avg(logreg_loss, optax.sgd(0.05))
    config = PackingConfig(batch_size=2, check_finite=True)
    cohort = pack_cohort(clients, [0, 1], config, seed=0, round_index=0, num_total_clients=2)
    state, out = build_round(algorithm, ExecutionPlan())(algorithm.init(logreg_params), cohort, jax.random.key(0))
    assert int(out.server_metrics["num_nonfinite_updates"]) == 1
    only_first = pack_cohort(clients[:1], [0], config, seed=0, round_index=0, num_total_clients=2)
    expected, _ = build_round(algorithm, ExecutionPlan())(algorithm.init(logreg_params), only_first, jax.random.key(0))
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-7)


def test_tree_norm_and_finiteness_match_numpy():
    import jax.numpy as jnp

    from fedjaxsim.core.aggregators import tree_is_finite, tree_l2_norm

    rng = np.random.default_rng(9)
    tree = {"w": rng.normal(size=(31, 7)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32),
            "half": jnp.asarray(rng.normal(size=4), jnp.bfloat16)}
    expected = np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in tree.values()))
    np.testing.assert_allclose(float(tree_l2_norm(tree)), expected, rtol=1e-6)
    assert bool(tree_is_finite(tree))
    # bfloat16 squares are taken in float32: 300^2 would overflow float16 but not this.
    assert bool(tree_is_finite({"half": jnp.full((3,), 300.0, jnp.bfloat16)}))
    for bad in (np.nan, np.inf, -np.inf, 3e19):
        broken = dict(tree, w=tree["w"].copy())
        broken["w"][4, 2] = bad
        assert not bool(tree_is_finite(broken)), bad
