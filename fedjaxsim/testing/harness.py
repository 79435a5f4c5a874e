"""One round harness for tests: rounds of any algorithm, client states included.

Stateful algorithms (``Algorithm.initial_client_state``) get a
:class:`~fedjaxsim.core.client_state.ClientStateStore`; each round gathers
the cohort's states from it and scatters the new ones back, as the runner
does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from fedjaxsim.core.algorithm import Algorithm
from fedjaxsim.core.client_batch import Cohort
from fedjaxsim.core.client_state import ClientStateStore
from fedjaxsim.core.engine import ExecutionPlan, RoundOutput, build_round


def client_store(algorithm: Algorithm, params, num_total_clients: int) -> ClientStateStore | None:
    """A fresh store for a stateful algorithm, else None."""
    if algorithm.initial_client_state is None:
        return None
    return ClientStateStore(algorithm.initial_client_state(params), num_total_clients)


def run_round(round_fn, state, cohort: Cohort, rng, store: ClientStateStore | None = None):
    """One round; with a store, the cohort's client states come from it and go back to it."""
    client_states = () if store is None else store.gather(cohort.client_id)
    state, output = round_fn(state, cohort, rng, client_states)
    if store is not None:
        store.scatter(cohort.client_id, output.client_states)
    return state, output


def run_rounds(
    algorithm: Algorithm,
    params,
    cohorts: Sequence[Cohort],
    *,
    num_total_clients: int,
    plan: ExecutionPlan | None = None,
    round_fn=None,
    seed: int = 0,
    state=None,
    store: ClientStateStore | None = None,
) -> tuple[object, list[RoundOutput], ClientStateStore | None]:
    """Runs one round per cohort from ``algorithm.init(params)`` (or ``state``).

    Round ``r`` uses the key ``fold_in(key(seed), r)``. ``round_fn`` reuses a
    compiled round; by default one is built from ``plan``.

    Returns:
      ``(final server state, every round's RoundOutput, the client-state store)``.
    """
    round_fn = build_round(algorithm, plan) if round_fn is None else round_fn
    state = algorithm.init(params) if state is None else state
    if store is None:
        store = client_store(algorithm, params, num_total_clients)
    outputs = []
    for round_index, cohort in enumerate(cohorts):
        rng = jax.random.fold_in(jax.random.key(seed), round_index)
        state, output = run_round(round_fn, state, cohort, rng, store)
        outputs.append(output)
    return state, outputs, store
