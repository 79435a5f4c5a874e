"""Shared cases for the algorithm-library tests.

Every algorithm is run on the same small softmax-regression population (a
pure-JAX model, so the float64 NumPy references need no Flax) with clients of
unequal sizes. Compiling a round costs about a second on the 2-core CI box,
so each case's default-plan round function is compiled once per session
(:func:`compiled_round`) and shared by the reference and invariance tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms import ditto, fed_nova, fed_prox, mime_lite, q_ffl, scaffold
from fedjaxsim.algorithms.ditto import initial_client_state as ditto_initial_client_state
from fedjaxsim.algorithms.scaffold import initial_client_state as scaffold_initial_client_state
from fedjaxsim.core.client_state import ClientStateStore
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.testing import algorithm_references as refs

NUM_FEATURES = 6
NUM_CLASSES = 3
NUM_TOTAL_CLIENTS = 50
# The population: unequal sizes (1 to 10 local steps), ids spread over [0, 50).
POPULATION_SIZES = [2, 37, 9, 20, 5, 14]
POPULATION_IDS = [11, 3, 42, 7, 25, 0]
# Cohorts (indices into the population) of rounds 0, 1, 2: clients 0, 1 and 2
# come back, so stateful algorithms must carry their state across rounds.
ROUND_COHORTS = [[0, 1, 2, 3], [2, 3, 4, 5], [5, 0, 2, 1]]
# A fixed step bucket: every round has the same shapes and compiles once.
PACKING = PackingConfig(batch_size=8, num_epochs=2, step_bucket=16)
SEED = 3


def linear_softmax_loss(params, batch, rng):
    """Per-example cross-entropy of softmax regression (pure JAX)."""
    del rng
    logits = batch["x"] @ params["kernel"] + params["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def make_population(sizes=POPULATION_SIZES, seed=0):
    """Synthetic classification clients: float32 x, int32 y."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(NUM_CLASSES, NUM_FEATURES))
    clients = []
    for n in sizes:
        y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
        x = (centers[y] + rng.normal(size=(n, NUM_FEATURES))).astype(np.float32)
        clients.append({"x": x, "y": y})
    return clients


def initial_params():
    rng = np.random.default_rng(1)
    return {
        "kernel": jnp.asarray(0.1 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.normal(size=(NUM_CLASSES,)), jnp.float32),
    }


def as_list(params):
    """{"kernel", "bias"} -> [float64 kernel, float64 bias] for the references."""
    return [np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)]


def pack_round(round_index, clients=None, extra_clients=(), **pack_kwargs):
    """The cohort of ``round_index`` (plus optional (client, id) extras)."""
    clients = make_population() if clients is None else clients
    members = ROUND_COHORTS[round_index]
    cohort_clients = [clients[i] for i in members] + [c for c, _ in extra_clients]
    ids = [POPULATION_IDS[i] for i in members] + [i for _, i in extra_clients]
    return pack_cohort(
        cohort_clients,
        ids,
        pack_kwargs.pop("config", PACKING),
        seed=SEED,
        round_index=round_index,
        num_total_clients=NUM_TOTAL_CLIENTS,
        **pack_kwargs,
    )


def reference_inputs(round_index, clients=None):
    clients = make_population() if clients is None else clients
    members = ROUND_COHORTS[round_index]
    data = [(clients[i]["x"].astype(np.float64), clients[i]["y"]) for i in members]
    return data, [POPULATION_IDS[i] for i in members]


SCHEDULE = {"batch_size": 8, "num_epochs": 2, "seed": SEED}


@dataclasses.dataclass(frozen=True)
class AlgorithmCase:
    """An algorithm with fixed hyper-parameters and its float64 reference.

    ``reference_round(params, extra, clients, ids, round_index)`` returns the
    new reference ``(params, extra)``, where ``extra`` is the reference's
    other state (server control variates, personal models, momentum...).
    ``check_extra(server_state, store, extra)`` compares it with the engine's.
    """

    name: str
    build: Callable
    reference_round: Callable
    initial_extra: Callable
    check_extra: Callable
    initial_client_state: Callable | None = None


def _no_extra(server_state, store, extra):
    del server_state, store, extra


def _assert_close(actual, expected, atol=2e-5, message=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, atol=atol, rtol=1e-4, err_msg=message
    )


def _scaffold_reference(params, extra, clients, ids, round_index):
    server_control, client_controls = extra
    params, server_control = refs.scaffold_round(
        params,
        server_control,
        client_controls,
        clients,
        ids,
        loss_and_grad=refs.softmax_regression_loss_and_grad,
        client_learning_rate=0.1,
        server_learning_rate=0.8,
        num_total_clients=NUM_TOTAL_CLIENTS,
        round_index=round_index,
        **SCHEDULE,
    )
    return params, (server_control, client_controls)


def _scaffold_check(server_state, store, extra):
    server_control, client_controls = extra
    for got, want in zip(as_list(server_state.control), server_control):
        _assert_close(got, want, message="server control variate")
    ids = sorted(client_controls)
    stored = store.gather(ids).control
    for index, client_id in enumerate(ids):
        for got, want in zip(
            (stored["kernel"][index], stored["bias"][index]), client_controls[client_id]
        ):
            _assert_close(got, want, message=f"control variate of client {client_id}")
    assert store.num_written == len(client_controls)


def _mime_reference(params, extra, clients, ids, round_index):
    return refs.mime_lite_round(
        params,
        extra,
        clients,
        ids,
        loss_and_grad=refs.softmax_regression_loss_and_grad,
        client_learning_rate=0.1,
        momentum=0.9,
        round_index=round_index,
        **SCHEDULE,
    )


def _mime_check(server_state, store, extra):
    del store
    trace = server_state.opt_state[0].trace  # optax.sgd(momentum=...): (TraceState, EmptyState)
    for got, want in zip(as_list(trace), extra):
        _assert_close(got, want, message="server momentum")


def _ditto_reference(params, extra, clients, ids, round_index):
    params = refs.ditto_round(
        params,
        extra,
        clients,
        ids,
        loss_and_grad=refs.softmax_regression_loss_and_grad,
        client_learning_rate=0.1,
        personal_learning_rate=0.05,
        regularization=0.5,
        round_index=round_index,
        **SCHEDULE,
    )
    return params, extra


def _ditto_check(server_state, store, extra):
    del server_state
    ids = sorted(extra)
    stored = store.gather(ids)
    assert stored.has_personal_model.all()
    for index, client_id in enumerate(ids):
        personal = stored.personal_params
        for got, want in zip(
            (personal["kernel"][index], personal["bias"][index]), extra[client_id]
        ):
            _assert_close(got, want, message=f"personal model of client {client_id}")
    assert store.num_written == len(extra)


def _stateless(reference_fn, **hyper):
    def reference_round(params, extra, clients, ids, round_index):
        params = reference_fn(
            params,
            clients,
            ids,
            loss_and_grad=refs.softmax_regression_loss_and_grad,
            round_index=round_index,
            **SCHEDULE,
            **hyper,
        )
        return params, extra

    return reference_round


CASES = {
    case.name: case
    for case in [
        AlgorithmCase(
            "fed_prox",
            lambda: fed_prox(linear_softmax_loss, optax.sgd(0.1), proximal_mu=0.5),
            _stateless(refs.fed_prox_round, client_learning_rate=0.1, proximal_mu=0.5),
            lambda params: None,
            _no_extra,
        ),
        AlgorithmCase(
            "scaffold",
            lambda: scaffold(linear_softmax_loss, 0.1, NUM_TOTAL_CLIENTS, server_learning_rate=0.8),
            _scaffold_reference,
            lambda params: ([np.zeros_like(p) for p in params], {}),
            _scaffold_check,
            scaffold_initial_client_state,
        ),
        AlgorithmCase(
            "fed_nova",
            lambda: fed_nova(linear_softmax_loss, 0.1, momentum=0.5),
            _stateless(refs.fed_nova_round, client_learning_rate=0.1, momentum=0.5),
            lambda params: None,
            _no_extra,
        ),
        AlgorithmCase(
            "mime_lite",
            lambda: mime_lite(linear_softmax_loss, optax.sgd(0.1, momentum=0.9)),
            _mime_reference,
            lambda params: [np.zeros_like(p) for p in params],
            _mime_check,
        ),
        AlgorithmCase(
            "q_ffl",
            lambda: q_ffl(linear_softmax_loss, q=2.0, client_learning_rate=0.1),
            _stateless(refs.q_ffl_round, q=2.0, client_learning_rate=0.1),
            lambda params: None,
            _no_extra,
        ),
        AlgorithmCase(
            "ditto",
            lambda: ditto(linear_softmax_loss, 0.1, 0.05, regularization=0.5),
            _ditto_reference,
            lambda params: {},
            _ditto_check,
            ditto_initial_client_state,
        ),
    ]
}


def new_store(case: AlgorithmCase, params):
    """A fresh client-state store for a stateful case, else None."""
    if case.initial_client_state is None:
        return None
    return ClientStateStore(case.initial_client_state(params), NUM_TOTAL_CLIENTS)


def run_round(round_fn, state, cohort, store, rng):
    """One round, gathering and scattering client states when there is a store."""
    client_states = () if store is None else store.gather(cohort.client_id)
    state, output = round_fn(state, cohort, rng, client_states)
    if store is not None:
        store.scatter(cohort.client_id, output.client_states)
    return state, output


@pytest.fixture(scope="session")
def compiled_rounds():
    """name -> (algorithm, default-plan round_fn), built once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            algorithm = CASES[name].build()
            cache[name] = (algorithm, build_round(algorithm, ExecutionPlan()))
        return cache[name]

    return get
