"""Shared cases for the algorithm-library tests.

Every algorithm is run on the same small softmax-regression population (a
pure-JAX model, so the float64 NumPy references need no Flax) with clients of
unequal sizes, from ``fedjaxsim.testing.synthetic_clients``. Rounds run
through ``fedjaxsim.testing.harness``. Compiling a round costs about a second
on the 2-core CI box, so each case's default-plan round function is compiled
once per session (:func:`compiled_rounds`) and shared by every test whose
cohorts have the standard shape (4 clients, 16 steps of 8 examples).

:data:`CASES` holds one configuration of every algorithm (the reference,
invariance and composition tests run them all); :data:`VARIANTS` holds more
configurations that only the reference test runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim import (
    Cohort,
    ExecutionPlan,
    PackingConfig,
    build_round,
    ditto,
    fed_adagrad,
    fed_adam,
    fed_avg_m,
    fed_nova,
    fed_prox,
    fed_sgd_avg,
    fed_yogi,
    mime_lite,
    pack_cohort,
    q_ffl,
    scaffold,
)
from fedjaxsim.testing import algorithm_references as refs
from fedjaxsim.testing import client_store, references, run_round, synthetic_clients

NUM_FEATURES = 6
NUM_CLASSES = 3
NUM_PARAMS = NUM_FEATURES * NUM_CLASSES + NUM_CLASSES
NUM_TOTAL_CLIENTS = 50
# The population: unequal sizes (1 to 10 local steps), ids spread over [0, 50).
POPULATION_SIZES = [2, 37, 9, 20, 5, 14]
POPULATION_IDS = [11, 3, 42, 7, 25, 0]
# Cohorts (indices into the population) of rounds 0, 1, 2: clients 0, 1 and 2
# come back, so stateful algorithms must carry their state across rounds.
ROUND_COHORTS = [[0, 1, 2, 3], [2, 3, 4, 5], [5, 0, 2, 1]]
# A fixed step bucket: every round has the same shapes and compiles once.
BATCH_SIZE = 8
NUM_EPOCHS = 2
PACKING = PackingConfig(batch_size=BATCH_SIZE, num_epochs=NUM_EPOCHS, step_bucket=16)
SEED = 3
# Server adaptivity tau of the Reddi et al. cases: of the order of the
# averaged deltas, so that FedYogi's sign(v - Delta^2) takes both values. A
# small b2 makes the second-moment rules (Adam, Yogi, Adagrad; with and
# without bias correction) differ by far more than the tolerance within the
# three rounds (test_fed_avg.py checks both).
TAU = 0.03
B2 = 0.5


def linear_softmax_loss(params, batch, rng):
    """Per-example cross-entropy of softmax regression (pure JAX)."""
    del rng
    logits = batch["x"] @ params["kernel"] + params["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def linear_squared_error(params, batch, rng):
    """Per-example ``0.5 * ||x w - y||^2`` of linear least squares (pure JAX)."""
    del rng
    residual = batch["x"] @ params["w"] - batch["y"]
    return 0.5 * jnp.sum(residual**2, axis=-1)


def population(sizes=POPULATION_SIZES, seed=0):
    """Synthetic classification clients: float32 x[n, 6], int32 y[n] in [0, 3)."""
    return synthetic_clients(sizes, seed=seed, num_features=NUM_FEATURES, num_classes=NUM_CLASSES)


def initial_params():
    rng = np.random.default_rng(1)
    return {
        "kernel": jnp.asarray(0.1 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.normal(size=(NUM_CLASSES,)), jnp.float32),
    }


def as_list(params):
    """{"kernel", "bias"} -> [float64 kernel, float64 bias] for the references."""
    return [np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)]


def pack_clients(clients, ids, round_index, config=PACKING, **pack_kwargs):
    return pack_cohort(
        clients,
        ids,
        config,
        seed=SEED,
        round_index=round_index,
        num_total_clients=NUM_TOTAL_CLIENTS,
        **pack_kwargs,
    )


def pack_round(round_index, clients=None, extra_clients=(), config=PACKING, **pack_kwargs):
    """The cohort of ``round_index`` (plus optional (client, id) extras)."""
    clients = population() if clients is None else clients
    members = ROUND_COHORTS[round_index]
    cohort_clients = [clients[i] for i in members] + [c for c, _ in extra_clients]
    ids = [POPULATION_IDS[i] for i in members] + [i for _, i in extra_clients]
    return pack_clients(cohort_clients, ids, round_index, config, **pack_kwargs)


def schedule(round_index, weighting="num_examples"):
    """The references' view of :data:`PACKING` in round ``round_index``."""
    return refs.RoundSchedule(BATCH_SIZE, NUM_EPOCHS, SEED, round_index, weighting=weighting)


def reference_cohort(clients, ids, round_index, weighting="num_examples"):
    """The references' cohort of the same clients, packed as :func:`pack_clients` packs them."""
    pairs = [(c["x"].astype(np.float64), c["y"]) for c in clients]
    return schedule(round_index, weighting).pack(pairs, ids)


class ReferenceRound(NamedTuple):
    """One round's clients, packed for the engine and for the references."""

    cohort: Cohort  # what the engine trains
    reference: list  # the same clients as the references' ClientData


def pack_both(clients, ids, round_index, weighting="num_examples"):
    """The same clients as the engine's cohort and the references' cohort of a round."""
    config = dataclasses.replace(PACKING, weighting=weighting)
    return ReferenceRound(
        pack_clients(clients, ids, round_index, config),
        reference_cohort(clients, ids, round_index, weighting),
    )


def standard_rounds(weighting="num_examples"):
    """The rounds of :data:`ROUND_COHORTS` on the population."""
    clients = population()
    return [
        pack_both(
            [clients[i] for i in members],
            [POPULATION_IDS[i] for i in members],
            round_index,
            weighting,
        )
        for round_index, members in enumerate(ROUND_COHORTS)
    ]


def assert_close(actual, expected, atol=2e-5, message=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, atol=atol, rtol=1e-4, err_msg=message
    )


@dataclasses.dataclass(frozen=True)
class AlgorithmCase:
    """An algorithm with fixed hyper-parameters and its float64 reference.

    ``reference_round(params, extra, reference_cohort)`` returns the new
    reference ``(params, extra)``, where ``extra`` is the reference's other
    state (server control variate and client controls, personal models,
    server optimizer...), created by ``initial_extra(params)``.
    ``check_extra(server_state, stored, extra)`` compares it with the
    engine's; ``stored(ids)`` gathers the algorithm's own client states
    (stacked) from the store.
    """

    name: str
    build: Callable
    reference_round: Callable
    initial_extra: Callable = lambda params: None
    check_extra: Callable = lambda server_state, stored, extra: None


def _fed_avg_case(name, build, make_server_optimizer, check_extra=None):
    """A FedAvg-family case: local SGD at lr 0.1, then the server optimizer."""

    def reference_round(params, server_optimizer, cohort):
        params, _ = references.fed_avg_round(
            params,
            cohort,
            loss_and_grad=refs.softmax_regression_loss_and_grad,
            client_learning_rate=0.1,
            server_optimizer=server_optimizer,
        )
        return params, server_optimizer

    return AlgorithmCase(
        name,
        build,
        reference_round,
        lambda params: make_server_optimizer(),
        check_extra or (lambda server_state, stored, extra: None),
    )


def _reddi_case(name, second_moment, build, learning_rate):
    """A Reddi et al. Algorithm 2 case: the params, and the server's m_t and v_t."""

    def check_moments(server_state, stored, server):
        # chain(scale_by_adaptive_tau, scale): the first state holds m_t and v_t.
        adaptive = server_state.opt_state[0]
        for got, want in zip(as_list(adaptive.momentum), server.m):
            # The engine's m is built from server - client: minus the paper's.
            assert_close(got, -want, atol=1e-6, message=f"{name} m_t")
        for got, want in zip(as_list(adaptive.second_moment), server.v):
            assert_close(got, want, atol=1e-7, message=f"{name} v_t")

    return _fed_avg_case(
        name,
        build,
        lambda: references.ReddiAdaptiveServer(second_moment, learning_rate, 0.9, B2, TAU),
        check_moments,
    )


def _stateless(reference_fn, **hyper):
    def reference_round(params, extra, cohort):
        params = reference_fn(
            params,
            cohort,
            loss_and_grad=refs.softmax_regression_loss_and_grad,
            **hyper,
        )
        return params, extra

    return reference_round


def _scaffold_reference(params, extra, cohort):
    server_control, client_controls = extra
    params, server_control = refs.scaffold_round(
        params,
        server_control,
        client_controls,
        cohort,
        loss_and_grad=refs.softmax_regression_loss_and_grad,
        client_learning_rate=0.1,
        server_learning_rate=0.8,
        num_total_clients=NUM_TOTAL_CLIENTS,
    )
    return params, (server_control, client_controls)


def _scaffold_check(server_state, stored, extra):
    server_control, client_controls = extra
    for got, want in zip(as_list(server_state.control), server_control):
        assert_close(got, want, message="server control variate")
    ids = sorted(client_controls)
    controls = stored(ids).control
    for index, client_id in enumerate(ids):
        for got, want in zip(
            (controls["kernel"][index], controls["bias"][index]), client_controls[client_id]
        ):
            assert_close(got, want, message=f"control variate of client {client_id}")


def _mime_reference(params, extra, cohort):
    return refs.mime_lite_round(
        params,
        extra,
        cohort,
        loss_and_grad=refs.softmax_regression_loss_and_grad,
        client_learning_rate=0.1,
        momentum=0.9,
    )


def _mime_check(server_state, stored, extra):
    del stored
    trace = server_state.opt_state[0].trace  # optax.sgd(momentum=...): (TraceState, EmptyState)
    for got, want in zip(as_list(trace), extra):
        assert_close(got, want, message="server momentum")


def _ditto_reference(params, extra, cohort):
    params = refs.ditto_round(
        params,
        extra,
        cohort,
        loss_and_grad=refs.softmax_regression_loss_and_grad,
        client_learning_rate=0.1,
        personal_learning_rate=0.05,
        regularization=0.5,
    )
    return params, extra


def _ditto_check(server_state, stored, extra):
    del server_state
    ids = sorted(extra)
    states = stored(ids)
    assert states.has_personal_model.all()
    for index, client_id in enumerate(ids):
        personal = states.personal_params
        for got, want in zip(
            (personal["kernel"][index], personal["bias"][index]), extra[client_id]
        ):
            assert_close(got, want, message=f"personal model of client {client_id}")


LOSS = linear_softmax_loss

CASES = {
    case.name: case
    for case in [
        _fed_avg_case(
            "fed_avg",
            lambda: fed_sgd_avg(LOSS, client_learning_rate=0.1, server_learning_rate=0.8),
            lambda: references.ServerSgd(0.8),
        ),
        _fed_avg_case(
            "fed_avg_m",
            lambda: fed_avg_m(LOSS, 0.1, server_learning_rate=0.5, momentum=0.9),
            lambda: references.ServerSgd(0.5, momentum=0.9),
        ),
        _reddi_case(
            "fed_adam",
            "adam",
            lambda: fed_adam(LOSS, 0.1, server_learning_rate=0.05, b2=B2, eps=TAU, form="paper"),
            learning_rate=0.05,
        ),
        _reddi_case(
            "fed_yogi",
            "yogi",
            lambda: fed_yogi(LOSS, 0.1, server_learning_rate=0.05, b2=B2, eps=TAU, form="paper"),
            learning_rate=0.05,
        ),
        _reddi_case(
            "fed_adagrad",
            "adagrad",
            lambda: fed_adagrad(LOSS, 0.1, server_learning_rate=0.05, eps=TAU),
            learning_rate=0.05,
        ),
        AlgorithmCase(
            "fed_prox",
            lambda: fed_prox(LOSS, optax.sgd(0.1), proximal_mu=0.5),
            _stateless(refs.fed_prox_round, client_learning_rate=0.1, proximal_mu=0.5),
        ),
        AlgorithmCase(
            "scaffold",
            lambda: scaffold(LOSS, 0.1, NUM_TOTAL_CLIENTS, server_learning_rate=0.8),
            _scaffold_reference,
            lambda params: ([np.zeros_like(p) for p in params], {}),
            _scaffold_check,
        ),
        AlgorithmCase(
            "fed_nova",
            lambda: fed_nova(LOSS, 0.1, momentum=0.5),
            _stateless(refs.fed_nova_round, client_learning_rate=0.1, momentum=0.5),
        ),
        AlgorithmCase(
            "mime_lite",
            lambda: mime_lite(LOSS, optax.sgd(0.1, momentum=0.9)),
            _mime_reference,
            lambda params: [np.zeros_like(p) for p in params],
            _mime_check,
        ),
        AlgorithmCase(
            "q_ffl",
            lambda: q_ffl(LOSS, q=2.0, client_learning_rate=0.1),
            _stateless(refs.q_ffl_round, q=2.0, client_learning_rate=0.1),
        ),
        AlgorithmCase(
            "ditto",
            lambda: ditto(LOSS, 0.1, 0.05, regularization=0.5),
            _ditto_reference,
            lambda params: {},
            _ditto_check,
        ),
    ]
}

VARIANTS = {
    case.name: case
    for case in [
        # The default form of FedAdam/FedYogi (what the presets use): optax's
        # bias-corrected Adam and Yogi with eps = tau.
        _fed_avg_case(
            "fed_adam_bias_corrected",
            lambda: fed_adam(LOSS, 0.1, server_learning_rate=0.05, b2=B2, eps=TAU),
            lambda: references.adam_reference(0.05, 0.9, B2, TAU),
        ),
        _fed_avg_case(
            "fed_yogi_bias_corrected",
            lambda: fed_yogi(LOSS, 0.1, server_learning_rate=0.05, b2=B2, eps=TAU),
            lambda: references.BiasCorrectedYogi(0.05, 0.9, B2, TAU),
        ),
        # FedNova without momentum: clients take 2 to 10 steps, so the
        # normalisation by tau_i (not FedAvg's plain mean) is what is checked.
        AlgorithmCase(
            "fed_nova_sgd",
            lambda: fed_nova(LOSS, 0.1),
            _stateless(refs.fed_nova_round, client_learning_rate=0.1),
        ),
        AlgorithmCase(
            "fed_nova_proximal",
            lambda: fed_nova(LOSS, 0.1, proximal_mu=0.5),
            _stateless(refs.fed_nova_round, client_learning_rate=0.1, proximal_mu=0.5),
        ),
    ]
}

ALL_CASES = {**CASES, **VARIANTS}


def run_against_reference(case, algorithm, round_fn, rounds, inner_states=lambda states: states):
    """Runs ``rounds`` on the engine and on ``case``'s reference, comparing after each.

    Args:
      algorithm, round_fn: the case's algorithm (possibly wrapped, e.g. with
        another aggregator) and its jitted round.
      rounds: :class:`ReferenceRound` s.
      inner_states: the case's own client states from the stored ones (a
        wrapper such as error feedback nests them).

    Returns:
      ``(server state, every round's RoundOutput, client-state store)``.
    """
    params = initial_params()
    state = algorithm.init(params)
    store = client_store(algorithm, params, NUM_TOTAL_CLIENTS)
    stored = None if store is None else (lambda ids: inner_states(store.gather(ids)))
    reference_params = as_list(params)
    extra = case.initial_extra(reference_params)
    outputs = []
    for round_index, inputs in enumerate(rounds):
        state, output = run_round(
            round_fn, state, inputs.cohort, jax.random.key(round_index), store
        )
        outputs.append(output)
        reference_params, extra = case.reference_round(reference_params, extra, inputs.reference)
        for got, want in zip(as_list(state.params), reference_params):
            assert_close(got, want, message=f"{case.name} params after round {round_index}")
        case.check_extra(state, stored, extra)
    return state, outputs, store


STATEFUL = ("scaffold", "ditto")


@pytest.fixture(scope="session")
def compiled_rounds():
    """name -> (algorithm, default-plan round_fn), built once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            algorithm = ALL_CASES[name].build()
            cache[name] = (algorithm, build_round(algorithm, ExecutionPlan()))
        return cache[name]

    return get
