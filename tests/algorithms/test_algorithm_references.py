"""Every algorithm equals its float64 loop reference, round after round.

Three rounds on cohorts of clients with unequal sizes (2 to 10 local steps);
the cohorts change between rounds and some clients come back, so the stateful
algorithms (SCAFFOLD, Ditto) also prove that their state makes the round trip
through the client-state store: the reference keeps it in a plain dict. The
FedAvg family's references are Reddi et al.'s Algorithm 2 (FedAdam, FedYogi
in ``form="paper"``, FedAdagrad) and the bias-corrected Adam and Yogi of the
default form; FedNova's runs with momentum, plain SGD and a proximal term.
"""

import numpy as np
import pytest

from tests.algorithms.conftest import (
    ALL_CASES,
    NUM_EPOCHS,
    POPULATION_IDS,
    POPULATION_SIZES,
    ROUND_COHORTS,
    run_against_reference,
    standard_rounds,
)


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_matches_float64_reference_for_one_and_several_rounds(name, compiled_rounds):
    algorithm, round_fn = compiled_rounds(name)
    rounds = standard_rounds()
    state, outputs, store = run_against_reference(ALL_CASES[name], algorithm, round_fn, rounds)
    for members, output in zip(ROUND_COHORTS, outputs):
        np.testing.assert_array_equal(
            output.client_metrics["num_examples"],
            [NUM_EPOCHS * POPULATION_SIZES[i] for i in members],
        )
        assert int(output.server_metrics["num_nonfinite_updates"]) == 0
    assert int(state.round) == len(rounds)
    if store is not None:  # a row for every client trained, none for the rest
        trained = {POPULATION_IDS[i] for cohort in ROUND_COHORTS for i in cohort}
        assert store.num_written == len(trained)
