"""Engine invariances, checked for every algorithm of the library.

* Padding steps are a no-op: moving each client's real steps apart, with
  all-padding steps between and before them, gives bit-identical server and
  client states. (The step count stays the same, so the round compiled for
  the reference tests is reused: a compile costs seconds on the CI box.)
* A zero-weight client changes nothing, and packing into lanes
  (``pack_cohort(..., num_lanes=2)``, several clients trained one after
  another in a lane) agrees with one client per lane.

Both run two rounds on the same cohort, gathering and scattering client
states through a store for the stateful algorithms, so the second round
sees the states the first one wrote.
"""

import jax
import numpy as np
import pytest

from fedjaxsim.testing import client_store, run_round
from tests.algorithms.conftest import (
    CASES,
    NUM_TOTAL_CLIENTS,
    initial_params,
    pack_round,
    population,
)

NUM_ROUNDS = 2
# A client that is not in round 0's cohort, added with weight 0.
EXTRA_CLIENT_SIZE = 11
EXTRA_CLIENT_ID = 49


def _run(algorithm, round_fn, cohort):
    params = initial_params()
    state = algorithm.init(params)
    store = client_store(algorithm, params, NUM_TOTAL_CLIENTS)
    for round_index in range(NUM_ROUNDS):
        state, output = run_round(round_fn, state, cohort, jax.random.key(round_index), store)
    return state, output


def _spread_real_steps(cohort):
    """The same cohort with each lane's real steps spread over all its steps.

    Lane with ``k`` real steps out of ``S``: real step ``j`` moves to
    ``round(j (S - 1) / (k - 1))`` (the last step, for ``k = 1``), in order;
    every other step is all padding (zero data, zero mask).
    """
    assert cohort.clients_per_lane == 1
    num_steps = cohort.num_steps
    data = {name: np.zeros_like(array) for name, array in cohort.data.items()}
    mask = np.zeros_like(cohort.mask)
    for lane in range(cohort.num_lanes):
        real = np.flatnonzero(cohort.mask[lane].any(axis=-1))
        if len(real) == 1:
            positions = np.array([num_steps - 1])
        else:
            positions = np.round(np.linspace(0, num_steps - 1, len(real))).astype(int)
        assert len(np.unique(positions)) == len(real)
        mask[lane, positions] = cohort.mask[lane, real]
        for name, array in data.items():
            array[lane, positions] = cohort.data[name][lane, real]
    return cohort._replace(data=data, mask=mask)


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_padding_steps_leave_every_state_bit_identical(name, compiled_rounds):
    algorithm, round_fn = compiled_rounds(name)
    cohort = pack_round(0)
    tight_state, tight_output = _run(algorithm, round_fn, cohort)
    padded_cohort = _spread_real_steps(cohort)
    assert not np.array_equal(padded_cohort.mask, cohort.mask)
    padded_state, padded_output = _run(algorithm, round_fn, padded_cohort)
    for tight, padded in zip(_leaves(tight_state), _leaves(padded_state)):
        np.testing.assert_array_equal(tight, padded)
    for tight, padded in zip(
        _leaves(tight_output.client_states), _leaves(padded_output.client_states)
    ):
        np.testing.assert_array_equal(tight, padded)


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_weight_client_and_lanes_plan_change_nothing(name, compiled_rounds):
    algorithm, round_fn = compiled_rounds(name)
    reference_state, reference_output = _run(algorithm, round_fn, pack_round(0))

    extra = population([EXTRA_CLIENT_SIZE], seed=9)[0]
    cohort = pack_round(0, extra_clients=[(extra, EXTRA_CLIENT_ID)], num_lanes=2)
    assert cohort.num_lanes == 2 and cohort.clients_per_lane > 1
    weight = np.array(cohort.weight)
    weight[-1] = 0.0
    cohort = cohort._replace(weight=weight)
    # The same jitted round: lanes are a packing decision, a new shape to trace.
    state, output = _run(algorithm, round_fn, cohort)

    for got, want in zip(_leaves(state), _leaves(reference_state)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # The real clients' new states (cohort order; the extra client is last).
    real = jax.tree.map(lambda leaf: np.asarray(leaf)[:-1], output.client_states)
    for got, want in zip(_leaves(real), _leaves(reference_output.client_states)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    for key, values in reference_output.client_metrics.items():
        np.testing.assert_allclose(
            np.asarray(output.client_metrics[key])[:-1], values, atol=1e-5, rtol=1e-5
        )
    # The zero-weight client keeps the state it had (the store's default).
    if algorithm.initial_client_state is not None:
        kept = jax.tree.map(lambda leaf: np.asarray(leaf)[-1], output.client_states)
        default = algorithm.initial_client_state(initial_params())
        for got, want in zip(_leaves(kept), _leaves(default)):
            np.testing.assert_array_equal(got, want)
