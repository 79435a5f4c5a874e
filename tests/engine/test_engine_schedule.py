"""Step budgets, update scales and versioned broadcasts: the engine's side of the clock.

References are independent: budgets against steps masked on the host by a
Python loop, a stale start against a synchronous round from that version,
FedNova-style normalisation against ``fed_nova``, staleness weights against
their formulas.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.algorithms.fed_buff import staleness_weight
from fedjaxsim.algorithms.fed_nova import fed_nova, normalized_local_steps
from fedjaxsim.core.engine import (
    ClientSchedule,
    build_buffered_round,
    build_round,
    init_buffered,
)
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.testing import synthetic_clients

SIZES = [3, 17, 1, 8, 12]
IDS = [4, 9, 0, 21, 13]
POPULATION = 30
BUDGETS = np.array([1, 3, 0, 4, 2], np.int32)


def _pack(num_lanes=None, keep=range(len(SIZES))):
    clients = [synthetic_clients(SIZES, seed=11)[i] for i in keep]
    ids = [IDS[i] for i in keep]
    config = PackingConfig(batch_size=4, num_epochs=2)
    return pack_cohort(
        clients,
        ids,
        config,
        seed=1,
        round_index=0,
        num_total_clients=POPULATION,
        num_lanes=num_lanes,
    )


def _host_budgeted(cohort, budgets):
    """The cohort with every step past its client's budget masked out, by a plain loop."""
    mask = np.array(cohort.mask)
    for lane in range(cohort.num_lanes):
        seen = {}
        for step in range(cohort.num_steps):
            position = int(cohort.step_position[lane, step])
            client = int(cohort.lane_clients[lane, position])
            if client >= cohort.num_clients:
                continue
            index = seen.get(position, 0)
            seen[position] = index + 1
            if index >= budgets[client]:
                mask[lane, step] = False
    return cohort._replace(mask=mask)


def _algorithm(loss):
    return fed_avg(loss, optax.sgd(0.1), optax.sgd(1.0))


def _bitwise(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("num_lanes", [None, 2], ids=["per_client", "packed"])
def test_a_step_budget_is_the_steps_masked_on_the_host(logreg_loss, logreg_params, num_lanes):
    algorithm = _algorithm(logreg_loss)
    round_fn = build_round(algorithm)
    cohort = _pack(num_lanes)
    state = algorithm.init(logreg_params)
    rng = jax.random.key(3)
    budgeted, out = round_fn(state, cohort, rng, (), ClientSchedule(step_budget=BUDGETS))
    reference, expected = round_fn(state, _host_budgeted(cohort, BUDGETS), rng)
    assert _bitwise(budgeted.params, reference.params)
    assert _bitwise(out.client_metrics, expected.client_metrics)
    full, _ = round_fn(state, cohort, rng)
    assert not _bitwise(full.params, budgeted.params)  # the budget bites


def test_a_client_with_no_steps_and_no_weight_changes_nothing(logreg_loss, logreg_params):
    algorithm = _algorithm(logreg_loss)
    round_fn = build_round(algorithm)
    state = algorithm.init(logreg_params)
    rng = jax.random.key(5)
    cohort = _pack()
    weight = np.array(cohort.weight)
    weight[1] = 0.0
    schedule = ClientSchedule(step_budget=np.where(np.arange(5) == 1, 0, 99).astype(np.int32))
    with_idle, out = round_fn(state, cohort._replace(weight=weight), rng, (), schedule)
    keep = [0, 2, 3, 4]
    without, _ = round_fn(state, _pack(keep=keep), rng)
    np.testing.assert_array_equal(out.client_metrics["num_examples"][1], 0.0)
    assert _bitwise(with_idle.params, without.params)


def test_an_update_scale_multiplies_the_update(logreg_loss, logreg_params):
    algorithm = _algorithm(logreg_loss)
    round_fn = build_round(algorithm)
    state = algorithm.init(logreg_params)
    rng = jax.random.key(7)
    cohort = _pack()
    halved, _ = round_fn(state, cohort, rng, (), ClientSchedule(update_scale=np.full(5, 0.5)))
    plain, _ = round_fn(state, cohort, rng)
    for start, half, full in zip(
        *map(jax.tree.leaves, (state.params, halved.params, plain.params))
    ):
        np.testing.assert_allclose(start - half, 0.5 * (start - full), rtol=1e-5, atol=1e-7)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_a_buffered_step_from_fresh_versions_is_a_round(logreg_loss, logreg_params):
    algorithm = _algorithm(logreg_loss)
    step_fn = build_buffered_round(algorithm, staleness_weight=staleness_weight("polynomial"))
    round_fn = build_round(algorithm)
    state = algorithm.init(logreg_params)
    rng = jax.random.key(9)
    cohort = _pack()
    # The step donates its state: the buffered server gets its own copy.
    buffered = init_buffered(algorithm, _copy(state), ring_size=3)
    schedule = ClientSchedule(version=np.zeros(5, np.int32))
    buffered, out = step_fn(buffered, cohort, rng, (), schedule)
    synchronous, expected = round_fn(state, cohort, rng)
    assert int(buffered.version) == 1
    assert _bitwise(buffered.server_state.params, synchronous.params)
    assert _bitwise(out.client_metrics, expected.client_metrics)
    assert _bitwise(jax.tree.map(lambda ring: ring[1], buffered.ring), synchronous.params)


def test_a_stale_client_trains_from_its_version_and_is_down_weighted(logreg_loss, logreg_params):
    """Two steps, then a buffer started from version 0: with server SGD at rate 1, the
    step is x2 - w(2) * mean_i (x0 - y_i(x0)), and y_i(x0) is what a round from x0 trains."""
    algorithm = _algorithm(logreg_loss)
    weight = staleness_weight("polynomial", exponent=0.5)
    step_fn = build_buffered_round(algorithm, staleness_weight=weight)
    round_fn = build_round(algorithm)
    state0 = algorithm.init(logreg_params)
    cohort = _pack()
    buffered = init_buffered(algorithm, _copy(state0), ring_size=3)
    fresh = ClientSchedule(version=np.zeros(5, np.int32))
    buffered, _ = step_fn(buffered, cohort, jax.random.key(1), (), fresh)
    buffered, _ = step_fn(
        buffered, cohort, jax.random.key(2), (), fresh._replace(version=np.ones(5, np.int32))
    )
    x2 = _copy(buffered.server_state.params)
    rng = jax.random.key(3)
    buffered, _ = step_fn(buffered, cohort, rng, (), fresh)  # staleness 2 for every client
    from_x0, _ = round_fn(state0, cohort, rng)
    scale = 1.0 / math.sqrt(3.0)
    expected = jax.tree.map(
        lambda x2_, x0, x1: np.float64(x2_) - scale * (np.float64(x0) - np.float64(x1)),
        x2,
        state0.params,
        from_x0.params,
    )
    for got, want in zip(jax.tree.leaves(buffered.server_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_sync_round_refuses_versions(logreg_loss, logreg_params):
    algorithm = _algorithm(logreg_loss)
    with pytest.raises(ValueError, match="build_buffered_round"):
        build_round(algorithm)(
            algorithm.init(logreg_params),
            _pack(),
            jax.random.key(0),
            (),
            ClientSchedule(version=np.zeros(5, np.int32)),
        )


def test_step_normalisation_is_fed_nova_for_local_sgd(logreg_loss, logreg_params):
    """Ragged budgets: normalized_local_steps(FedAvg with SGD) against fed_nova's own norm."""
    normalized = normalized_local_steps(_algorithm(logreg_loss))
    nova = fed_nova(logreg_loss, client_learning_rate=0.1, server_learning_rate=1.0)
    cohort = _pack()
    schedule = ClientSchedule(step_budget=np.array([1, 3, 2, 4, 2], np.int32))
    rng = jax.random.key(11)
    ours, out = build_round(normalized)(normalized.init(logreg_params), cohort, rng, (), schedule)
    theirs, expected = build_round(nova)(nova.init(logreg_params), cohort, rng, (), schedule)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    tau = np.asarray(out.server_metrics["effective_num_steps"])
    np.testing.assert_allclose(tau, expected.server_metrics["effective_num_steps"], rtol=1e-6)
    weights = np.asarray(cohort.weight) / np.sum(cohort.weight)
    np.testing.assert_allclose(
        tau, np.sum(weights * [1, 3, 2, 4, 2]), rtol=1e-6
    )  # all within reach


@pytest.mark.parametrize(
    "rule, parameters, formula",
    [
        ("constant", {}, lambda s: 1.0),
        ("polynomial", {"exponent": 0.5}, lambda s: 1.0 / math.sqrt(1.0 + s)),
        ("polynomial", {"exponent": 2.0}, lambda s: (1.0 + s) ** -2.0),
        (
            "hinge",
            {"slope": 10.0, "threshold": 4.0},
            lambda s: 1.0 if s <= 4 else 1.0 / (10.0 * (s - 4) + 1.0),
        ),
    ],
)
def test_staleness_weights_match_their_formulas(rule, parameters, formula):
    staleness = np.arange(0, 40, dtype=np.int32)
    got = np.asarray(staleness_weight(rule, **parameters)(staleness))
    want = [formula(int(s)) for s in staleness]
    np.testing.assert_allclose(got, want, rtol=1e-6)
