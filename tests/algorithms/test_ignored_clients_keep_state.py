"""Stateful algorithms keep the state of clients the server ignores (issue 13, defect 1).

SCAFFOLD's control variates ``c_i`` and Ditto's personal models ``v_k`` used
to be written back for every client of the cohort, including a zero-weight
client and a client whose update diverged: the diverged client's NaN state
then poisoned every later round, and SCAFFOLD's ``c == mean_i c_i`` broke.

The test: round 0 trains four clients, so each has a stored state. In round
1 the same four come back, the first with weight 0 and the second with
features scaled by 1e30 (finite, so packing accepts them, but its local
training overflows). After round 1 the two keep exactly the state the store
held before it, the other two move, and the round equals the float64
reference run on the two counted clients alone.
"""

import jax
import numpy as np
import pytest

from fedjaxsim.testing import client_store, run_round
from tests.algorithms.conftest import (
    CASES,
    NUM_TOTAL_CLIENTS,
    POPULATION_IDS,
    ROUND_COHORTS,
    STATEFUL,
    as_list,
    assert_close,
    initial_params,
    pack_both,
    pack_clients,
    population,
    reference_cohort,
)

MEMBERS = ROUND_COHORTS[0]
IDS = [POPULATION_IDS[i] for i in MEMBERS]
ZERO_WEIGHT, DIVERGING = 0, 1  # cohort positions of the clients the server ignores
COUNTED = [2, 3]


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _rows(tree, index):
    return [leaf[index] for leaf in _leaves(tree)]


@pytest.fixture(scope="module")
def ignored_clients_run(compiled_rounds):
    """name -> (state, output, store, states before round 1, reference extra, reference params)."""
    runs = {}

    def run(name):
        if name in runs:
            return runs[name]
        case = CASES[name]
        algorithm, round_fn = compiled_rounds(name)
        clients = [population()[i] for i in MEMBERS]
        params = initial_params()
        state = algorithm.init(params)
        store = client_store(algorithm, params, NUM_TOTAL_CLIENTS)
        reference_params = as_list(params)
        extra = case.initial_extra(reference_params)

        first = pack_both(clients, IDS, 0)
        state, _ = run_round(round_fn, state, first.cohort, jax.random.key(0), store)
        reference_params, extra = case.reference_round(reference_params, extra, first.reference)
        before = store.gather(IDS)

        clients[DIVERGING] = dict(clients[DIVERGING], x=clients[DIVERGING]["x"] * np.float32(1e30))
        cohort = pack_clients(clients, IDS, 1)
        weight = np.array(cohort.weight)
        weight[ZERO_WEIGHT] = 0.0
        cohort = cohort._replace(weight=weight)
        state, output = run_round(round_fn, state, cohort, jax.random.key(1), store)
        counted = reference_cohort([clients[i] for i in COUNTED], [IDS[i] for i in COUNTED], 1)
        reference_params, extra = case.reference_round(reference_params, extra, counted)
        runs[name] = (state, output, store, before, extra, reference_params)
        return runs[name]

    return run


@pytest.mark.parametrize("name", STATEFUL)
def test_zero_weight_and_diverged_clients_keep_their_stored_state(name, ignored_clients_run):
    state, output, store, before, _, _ = ignored_clients_run(name)
    assert int(output.server_metrics["num_nonfinite_updates"]) == 1
    after = store.gather(IDS)
    for position in (ZERO_WEIGHT, DIVERGING):
        for got, want in zip(_rows(after, position), _rows(before, position)):
            np.testing.assert_array_equal(got, want, err_msg=f"{name} client {IDS[position]}")
    for position in COUNTED:  # the test can tell a written state from a kept one
        changed = [
            not np.array_equal(got, want)
            for got, want in zip(_rows(after, position), _rows(before, position))
        ]
        assert any(changed), f"{name}: client {IDS[position]} was trained but kept its state"
    for leaf in _leaves(state) + _leaves(after):
        assert np.isfinite(leaf).all()


@pytest.mark.parametrize("name", STATEFUL)
def test_the_round_equals_the_reference_on_the_counted_clients(name, ignored_clients_run):
    state, _, store, _, extra, reference_params = ignored_clients_run(name)
    for got, want in zip(as_list(state.params), reference_params):
        assert_close(got, want, message=f"{name} params")
    # Server control variate and the c_i (SCAFFOLD), personal models (Ditto).
    CASES[name].check_extra(state, store.gather, extra)


def test_scaffold_server_control_is_the_mean_of_all_client_controls(ignored_clients_run):
    """c == (1/N) sum_i c_i over the whole population, never-trained clients at 0."""
    state, _, store, _, _, _ = ignored_clients_run("scaffold")
    controls = store.gather(np.arange(NUM_TOTAL_CLIENTS)).control
    for key, server_control in state.control.items():
        mean = controls[key].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(np.asarray(server_control), mean, atol=1e-6, err_msg=key)
