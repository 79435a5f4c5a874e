"""Every algorithm equals its float64 loop reference, round after round.

Three rounds on cohorts of clients with unequal sizes (1 to 10 local steps);
the cohorts change between rounds and some clients come back, so the stateful
algorithms (SCAFFOLD, Ditto) also prove that their state makes the round trip
through the client-state store: the reference keeps it in a plain dict.
"""

import jax
import numpy as np
import pytest

from tests.algorithms.conftest import (
    CASES,
    ROUND_COHORTS,
    SCHEDULE,
    _assert_close,
    as_list,
    initial_params,
    make_population,
    new_store,
    pack_round,
    reference_inputs,
    run_round,
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference_for_one_and_several_rounds(name, compiled_rounds):
    case = CASES[name]
    algorithm, round_fn = compiled_rounds(name)
    clients = make_population()
    params = initial_params()
    state = algorithm.init(params)
    store = new_store(case, params)
    reference_params = as_list(params)
    reference_extra = case.initial_extra(reference_params)
    for round_index in range(len(ROUND_COHORTS)):
        cohort = pack_round(round_index, clients)
        state, output = run_round(round_fn, state, cohort, store, jax.random.key(round_index))
        data, ids = reference_inputs(round_index, clients)
        np.testing.assert_array_equal(
            output.client_metrics["num_examples"],
            [SCHEDULE["num_epochs"] * len(y) for _, y in data],
        )
        reference_params, reference_extra = case.reference_round(
            reference_params, reference_extra, data, ids, round_index
        )
        for got, want in zip(as_list(state.params), reference_params):
            _assert_close(got, want, message=f"{name} params after round {round_index}")
        case.check_extra(state, store, reference_extra)
        assert int(state.round) == round_index + 1
