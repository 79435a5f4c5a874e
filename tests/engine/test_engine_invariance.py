"""Invariances every algorithm must satisfy under the engine.

Compiled rounds are cached per (algorithm, plan) for the module, so each
layout compiles once however many tests run it.
"""

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim import scaffold
from fedjaxsim.algorithms.fed_avg import fed_adam, fed_avg
from fedjaxsim.core.aggregators import Aggregator, Contribution, weighted_mean
from fedjaxsim.core.algorithm import with_aggregator
from fedjaxsim.core.client_batch import Cohort
from fedjaxsim.core.engine import ExecutionPlan, build_round, lanes_by_steps
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.models import classification_loss, from_linen
from fedjaxsim.testing import run_rounds, synthetic_clients

SIZES = [3, 17, 1, 8, 12]
IDS = [4, 9, 0, 21, 13]
NUM_TOTAL_CLIENTS = 30
DEFAULT_PLAN = ExecutionPlan()

ALGORITHMS = {
    "fedavg_client_adam": lambda loss: fed_avg(loss, optax.adam(0.01), optax.sgd(1.0)),
    "fedadam": lambda loss: fed_adam(loss, client_learning_rate=0.05, server_learning_rate=0.01),
}


def _pack(clients=None, ids=IDS, num_lanes=None, num_steps=None, round_index=0, **config):
    clients = synthetic_clients(SIZES, seed=11) if clients is None else clients
    config = PackingConfig(**{"batch_size": 4, "num_epochs": 2, **config})
    return pack_cohort(
        clients,
        ids,
        config,
        seed=1,
        round_index=round_index,
        num_total_clients=NUM_TOTAL_CLIENTS,
        num_lanes=num_lanes,
        num_steps=num_steps,
    )


def _round_fn(algorithm, plan=DEFAULT_PLAN):
    # repr in the key: ExecutionPlan(scan_unroll=True) == ExecutionPlan(scan_unroll=1).
    return _cached_round_fn(algorithm, plan, repr(plan))


@functools.cache
def _cached_round_fn(algorithm, plan, plan_repr):
    del plan_repr
    return build_round(algorithm, plan)


def _run(algorithm, params, cohort, plan=DEFAULT_PLAN, rounds=2, seed=0):
    """``rounds`` rounds on ``cohort``: (final state, last RoundOutput)."""
    state, outputs, _ = run_rounds(
        algorithm,
        params,
        [cohort] * rounds,
        num_total_clients=NUM_TOTAL_CLIENTS,
        round_fn=_round_fn(algorithm, plan),
        seed=seed,
    )
    return state, outputs[-1]


def _assert_trees(a, b, exact=False, atol=1e-6):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b):
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def algorithm(request, logreg_loss):
    return ALGORITHMS[request.param](logreg_loss)


def test_padded_steps_leave_params_and_optimizer_state_bit_identical(algorithm, logreg_params):
    """Client Adam would move its moments on a zero gradient: padding must skip it."""
    tight, tight_out = _run(algorithm, logreg_params, _pack(step_bucket="exact"))
    padded, padded_out = _run(algorithm, logreg_params, _pack(num_steps=19))
    _assert_trees(tight, padded, exact=True)
    _assert_trees(tight_out.client_metrics, padded_out.client_metrics, exact=True)


def test_padded_steps_are_an_exact_noop_in_a_lone_lane(logreg_loss, logreg_params):
    """The same for one lane holding every client, one after another, whose
    loop stops at the last real step (vmapped lanes: the test above)."""
    algorithm = ALGORITHMS["fedavg_client_adam"](logreg_loss)
    tight = _run(algorithm, logreg_params, _pack(num_lanes=1, step_bucket="exact"))
    padded = _run(algorithm, logreg_params, _pack(num_lanes=1, num_steps=40))
    _assert_trees(tight, padded, exact=True)


def test_zero_weight_clients_change_nothing(algorithm, logreg_params):
    base = _pack()
    clients = synthetic_clients(SIZES + [6], seed=11)
    extended = _pack(clients, IDS + [29])
    weight = np.array(extended.weight)
    weight[-1] = 0.0
    extended = extended._replace(weight=weight)
    a, _ = _run(algorithm, logreg_params, base)
    b, out_b = _run(algorithm, logreg_params, extended)
    _assert_trees(a, b, atol=1e-7)
    assert float(out_b.server_metrics["total_weight"]) == float(np.sum(base.weight))


def test_cohort_order_does_not_matter(algorithm, logreg_params):
    clients = synthetic_clients(SIZES, seed=11)
    order = [3, 0, 4, 2, 1]
    a, out_a = _run(algorithm, logreg_params, _pack(clients, IDS))
    b, out_b = _run(
        algorithm, logreg_params, _pack([clients[i] for i in order], [IDS[i] for i in order])
    )
    _assert_trees(a, b, atol=1e-7)
    for name in ("loss_sum", "num_examples", "update_norm"):
        np.testing.assert_allclose(
            np.asarray(out_a.client_metrics[name])[order], out_b.client_metrics[name], rtol=1e-6
        )


# (pack_cohort's num_lanes, plan): every layout and plan computes the same numbers.
PLANS = [
    (None, ExecutionPlan()),
    (1, ExecutionPlan()),  # one lone lane: a loop that stops at its last real step
    (1, ExecutionPlan(scan_unroll=2)),  # a lone lane in a scan
    (2, ExecutionPlan()),
    (None, ExecutionPlan(clients_per_chunk=2)),
    (None, ExecutionPlan(clients_per_chunk=2, chunk_loop="unroll")),
    (None, ExecutionPlan(clients_per_chunk=2, sort_chunks=False)),
    (2, ExecutionPlan(clients_per_chunk=1, sort_chunks=False)),
    (3, ExecutionPlan(clients_per_chunk=2, scan_unroll=3)),
    (None, ExecutionPlan(scan_unroll=True)),
]


def test_every_plan_gives_the_same_result(logreg_loss, logreg_params):
    """With client Adam, whose moments a wrongly run padding step would move.
    Plans differ only in how clients are trained, before aggregation, so one
    algorithm covers them (the server optimizer runs once, after)."""
    algorithm = ALGORITHMS["fedavg_client_adam"](logreg_loss)
    reference, reference_out = _run(algorithm, logreg_params, _pack())
    for num_lanes, plan in PLANS[1:]:
        state, out = _run(algorithm, logreg_params, _pack(num_lanes=num_lanes), plan)
        _assert_trees(reference, state, atol=2e-6)
        _assert_trees(reference_out.client_metrics, out.client_metrics, atol=1e-5)
        _assert_trees(reference_out.server_metrics, out.server_metrics, atol=1e-5)


def test_lanes_by_steps_groups_chunks_by_length_longest_first():
    steps = np.array([3, 8, 0, 8, 1, 5])  # real steps per lane
    mask = np.zeros((6, 8, 2), bool)
    for lane, n in enumerate(steps):
        mask[lane, :n, 0] = True
    chunks = np.asarray(lanes_by_steps(jnp.asarray(mask), num_chunks=3))
    np.testing.assert_array_equal(chunks, [[1, 3], [5, 0], [4, 2]])
    # Per chunk, the steps that are padding for every lane: what the engine skips.
    chunk_steps = steps[chunks].max(axis=1)
    np.testing.assert_array_equal(chunk_steps, [8, 5, 1])


def test_same_seed_is_bitwise_reproducible(algorithm, logreg_params):
    a, out_a = _run(algorithm, logreg_params, _pack(num_lanes=2))
    b, out_b = _run(algorithm, logreg_params, _pack(num_lanes=2))
    _assert_trees((a, out_a), (b, out_b), exact=True)


def test_second_round_in_same_bucket_does_not_retrace(logreg_model, logreg_params):
    traces = []

    def counting_loss(params, batch, rng):
        traces.append(1)  # runs at trace time only
        logits = logreg_model.apply(params, batch["x"], rng, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    algorithm = fed_avg(counting_loss, optax.sgd(0.1))
    round_fn = build_round(algorithm, ExecutionPlan())
    state = algorithm.init(logreg_params)
    state, _ = round_fn(state, _pack(round_index=0, step_bucket=16), jax.random.key(0))
    after_first = len(traces)
    assert after_first > 0
    other_clients = synthetic_clients([5, 2, 7, 11, 16], seed=3)
    state, _ = round_fn(
        state, _pack(other_clients, round_index=1, step_bucket=16), jax.random.key(1)
    )
    assert len(traces) == after_first


def test_init_accepts_shape_dtype_structs(algorithm, logreg_params):
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), logreg_params)
    abstract = jax.eval_shape(algorithm.init, shapes)
    concrete = algorithm.init(logreg_params)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
        assert (a.shape, a.dtype) == (c.shape, c.dtype)


class _DropoutMlp(nn.Module):
    """A small model with dropout: the engine must hand it per-client, per-step keys."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(5)(x)


def test_dropout_rng_is_per_client_and_step_and_plan_invariant():
    """Dropout keys come from (round rng, client id, local step), never from a
    lane position: one client per lane, packed lanes and a reordered cohort
    agree, and another round key changes the result."""
    model = from_linen(_DropoutMlp())
    params = model.init(jax.random.key(0), jnp.zeros((1, 12)))
    algorithm = fed_avg(classification_loss(model), optax.sgd(0.1))
    clients = synthetic_clients(SIZES, seed=5)
    order = [4, 2, 0, 3, 1]
    reordered = _pack([clients[i] for i in order], [IDS[i] for i in order])
    one_per_lane, out = _run(algorithm, params, _pack(clients), rounds=1)
    for cohort in (_pack(clients, num_lanes=2), reordered):
        state, _ = _run(algorithm, params, cohort, rounds=1)
        _assert_trees(one_per_lane, state, atol=1e-6)
    other_key, other_out = _run(algorithm, params, _pack(clients), rounds=1, seed=1)
    difference = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(one_per_lane.params), jax.tree.leaves(other_key.params))
    )
    assert difference > 1e-4
    # Every client's loss moves with the key: each draws its own masks.
    assert np.all(
        np.asarray(out.client_metrics["loss_sum"])
        != np.asarray(other_out.client_metrics["loss_sum"])
    )


def test_malformed_cohort_is_rejected(algorithm, logreg_params):
    cohort = _pack()
    assert isinstance(cohort, Cohort)
    round_fn, state = _round_fn(algorithm), algorithm.init(logreg_params)
    bad = cohort._replace(step_position=cohort.step_position[:, :-1])
    with pytest.raises(ValueError, match="step_position"):
        round_fn(state, bad, jax.random.key(0))
    bad = cohort._replace(data={"x": cohort.data["x"][:, :, :2], "y": cohort.data["y"]})
    with pytest.raises(ValueError, match=r"cohort.data\['x'\]"):
        round_fn(state, bad, jax.random.key(0))
    bad = cohort._replace(client_id=cohort.client_id[:-1])
    with pytest.raises(ValueError, match="client_id"):
        round_fn(state, bad, jax.random.key(0))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"clients_per_chunk": 0}, "clients_per_chunk"),
        ({"clients_per_chunk": 2.0}, "clients_per_chunk"),
        ({"chunk_loop": "while"}, "chunk_loop"),
        ({"scan_unroll": 0}, "scan_unroll"),
        ({"scan_unroll": None}, "scan_unroll"),
        ({"sort_chunks": "yes"}, "sort_chunks"),
    ],
)
def test_invalid_plan_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as raised:
        ExecutionPlan(**kwargs)
    assert raised.value.name == field


def test_plan_holds_only_what_the_engine_uses():
    """Lanes are a packing decision and lowerings a model decision."""
    assert {f.name for f in dataclasses.fields(ExecutionPlan)} == {
        "clients_per_chunk",
        "chunk_loop",
        "scan_unroll",
        "sort_chunks",
    }


def test_a_stateful_algorithm_without_client_states_raises(logreg_loss, logreg_params):
    algorithm = scaffold(logreg_loss, client_learning_rate=0.1, num_total_clients=NUM_TOTAL_CLIENTS)
    round_fn = build_round(algorithm)
    with pytest.raises(ValueError, match=r"keeps per-client state.*client_states=\(\)"):
        round_fn(algorithm.init(logreg_params), _pack(), jax.random.key(0))


class _BareServerState(NamedTuple):
    params: dict  # float32 pytree: the global model
    opt_state: tuple  # the server optimizer's state
    round: jax.Array  # int32[]


def test_a_server_state_without_aggregator_state_raises_naming_the_field(
    logreg_loss, logreg_params
):
    base = fed_avg(logreg_loss, optax.sgd(0.1))
    server = optax.sgd(1.0)
    algorithm = base._replace(
        init=lambda params: _BareServerState(params, server.init(params), jnp.zeros((), jnp.int32))
    )
    with pytest.raises(ValueError, match=r"_BareServerState.*'aggregator_state'"):
        build_round(algorithm)(algorithm.init(logreg_params), _pack(), jax.random.key(0))


def _counting_visits(algorithm):
    """``algorithm`` with a client state that counts the rounds a client counted in."""

    def client_init(broadcast, client_state, rng):
        return algorithm.client_init(broadcast, (), rng), client_state

    def client_step(local, batch, mask, rng):
        inner, visits = local
        inner, stats = algorithm.client_step(inner, batch, mask, rng)
        return (inner, visits), stats

    def client_finalize(broadcast, local):
        inner, visits = local
        return algorithm.client_finalize(broadcast, inner)._replace(client_state=visits + 1)

    return algorithm._replace(
        client_init=client_init,
        client_step=client_step,
        client_finalize=client_finalize,
        initial_client_state=lambda params: jnp.zeros((), jnp.int32),
    )


@pytest.mark.parametrize("num_lanes", [None, 2])
def test_clients_that_do_not_count_keep_their_old_state(num_lanes, logreg_loss, logreg_params):
    """Issue 13, defect 1, at the engine: a weight-0 client and a client whose
    update is NaN keep their stored state; the others' is written."""
    algorithm = _counting_visits(fed_avg(logreg_loss, optax.sgd(0.1)))
    cohort = _pack(num_lanes=num_lanes)
    weight = np.array(cohort.weight)
    weight[0] = 0.0  # client id 4
    nan_client = 1  # client id 9: NaN features make a NaN update
    data = {name: np.array(leaf) for name, leaf in cohort.data.items()}
    lane, position = np.argwhere(np.asarray(cohort.lane_clients) == nan_client)[0]
    steps = np.asarray(cohort.step_position[lane]) == position
    data["x"][lane, steps] = np.nan
    poisoned = cohort._replace(data=data, weight=weight)

    round_fn = _round_fn(algorithm)
    state, outputs, store = run_rounds(
        algorithm,
        logreg_params,
        [poisoned, poisoned],
        num_total_clients=NUM_TOTAL_CLIENTS,
        round_fn=round_fn,
    )
    visits = dict(zip(IDS, store.gather(IDS).tolist()))
    assert visits == {4: 0, 9: 0, 0: 2, 21: 2, 13: 2}
    assert float(outputs[-1].server_metrics["num_nonfinite_updates"]) == 1.0
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state))
    # The server saw only the three clients that count.
    counted = [2, 3, 4]
    alone = _pack(
        [synthetic_clients(SIZES, seed=11)[i] for i in counted], [IDS[i] for i in counted]
    )
    expected, _, _ = run_rounds(
        algorithm,
        logreg_params,
        [alone, alone],
        num_total_clients=NUM_TOTAL_CLIENTS,
        round_fn=round_fn,
    )
    _assert_trees(state.params, expected.params, atol=1e-6)


def _rng_probe(algorithm):
    """``algorithm`` that records uniform draws from client_init's key (client
    metric ``init_draw``), from each local step's key (summed over real steps:
    ``step_draw`` and ``step_draw_square``) and from the aggregator's
    per-client key (server metric ``aggregator_draws``, in cohort order)."""
    mean = weighted_mean()

    def client_init(broadcast, client_state, rng):
        return algorithm.client_init(broadcast, client_state, rng), jax.random.uniform(rng)

    def client_step(local, batch, mask, rng):
        inner, draw = local
        inner, stats = algorithm.client_step(inner, batch, mask, rng)
        step_draw = jax.random.uniform(rng)
        return (inner, draw), dict(stats, step_draw=step_draw, step_draw_square=step_draw**2)

    def client_finalize(broadcast, local):
        inner, draw = local
        output = algorithm.client_finalize(broadcast, inner)
        return output._replace(metrics=dict(output.metrics, init_draw=draw))

    def client_transform(payload, weight, state, rng):
        summed = mean.client_transform(payload, weight, state, rng).summed
        return Contribution(summed=summed, stacked=jax.random.uniform(rng))

    def finalize(contributions, state, rng):
        aggregate, state, metrics = mean.finalize(contributions, state, rng)
        return aggregate, state, dict(metrics, aggregator_draws=contributions.stacked)

    probe = algorithm._replace(
        client_init=client_init, client_step=client_step, client_finalize=client_finalize
    )
    return with_aggregator(probe, Aggregator(mean.init, client_transform, finalize))


@pytest.fixture(scope="module")
def rng_probe_outputs(logreg_loss, logreg_params):
    """One round of the probe on the cohort, and on the cohort reordered."""
    algorithm = _rng_probe(fed_avg(logreg_loss, optax.sgd(0.1)))
    clients = synthetic_clients(SIZES, seed=11)
    order = [3, 0, 4, 2, 1]
    reordered = _pack([clients[i] for i in order], [IDS[i] for i in order])
    outputs = [
        _run(algorithm, logreg_params, cohort, rounds=1)[1] for cohort in (_pack(), reordered)
    ]
    return outputs, order


def test_aggregator_keys_are_per_client_id(rng_probe_outputs):
    """A stochastic aggregator (quantization, secure aggregation) draws from
    fold_in(round key, client id): distinct per client, stable under reordering."""
    (output, reordered_output), order = rng_probe_outputs
    draws = np.asarray(output.server_metrics["aggregator_draws"])
    assert len(set(draws.tolist())) == len(IDS)
    np.testing.assert_array_equal(
        draws[order], np.asarray(reordered_output.server_metrics["aggregator_draws"])
    )


def test_each_local_step_draws_its_own_key(rng_probe_outputs):
    """Step keys are fold_in(client key, local step): a client's draws vary
    over its steps (zero variance would mean one key reused)."""
    (output, _), _ = rng_probe_outputs
    mask = np.asarray(_pack().mask)  # one client per lane, in cohort order
    num_steps = mask.any(axis=2).sum(axis=1)
    mean = np.asarray(output.client_metrics["step_draw"], np.float64) / num_steps
    variance = np.asarray(output.client_metrics["step_draw_square"]) / num_steps - mean**2
    assert np.all(variance[num_steps > 1] > 1e-4), variance
    assert len(set(mean.tolist())) == len(IDS)


def test_client_init_and_aggregator_draw_independent_keys(rng_probe_outputs):
    (output, _), _ = rng_probe_outputs
    init_draws = np.asarray(output.client_metrics["init_draw"])
    aggregator_draws = np.asarray(output.server_metrics["aggregator_draws"])
    assert not np.any(init_draws == aggregator_draws)


def _with_interior_and_tail_padding(cohort, extra_weight):
    """A one-lane cohort with an all-padding step inserted inside the second
    client's steps and an extra client whose two steps are all padding, at the
    lane's tail (shapes pack_cohort never makes, but a hand-built cohort may)."""
    positions = np.asarray(cohort.step_position[0])
    inside = int(np.flatnonzero(positions == 1)[1])  # between client 1's first two steps

    def insert(array, at, value):
        return np.insert(np.asarray(array), at, value, axis=1)

    data = {name: insert(leaf, inside, 0) for name, leaf in cohort.data.items()}
    mask = insert(cohort.mask, inside, False)
    step_position = insert(cohort.step_position, inside, 1)
    num_clients = cohort.num_clients

    def tail(array, value):
        array = np.asarray(array)
        return np.concatenate(
            [array, np.full((1, 2, *array.shape[2:]), value, array.dtype)], axis=1
        )

    return Cohort(
        data={name: tail(leaf, 0) for name, leaf in data.items()},
        mask=tail(mask, False),
        step_position=tail(step_position, num_clients),
        lane_clients=np.concatenate([np.asarray(cohort.lane_clients), [[num_clients]]], axis=1),
        weight=np.append(np.asarray(cohort.weight), np.float32(extra_weight)),
        client_id=np.append(np.asarray(cohort.client_id), np.int32(29)),
    )


def test_lone_lane_with_interior_and_tail_padding_matches_the_scan_path(logreg_loss, logreg_params):
    """A lone lane stops at its last needed step and guards padding with a
    select; the scan path runs every step under lax.cond. Both must agree on a
    cohort with padding inside a client and a client made only of padding, and
    that client must count as a zero update of its weight."""
    algorithm = fed_avg(logreg_loss, optax.adam(0.01), optax.sgd(1.0))
    packed = _pack(num_lanes=1, step_bucket="exact")
    extra_weight = 7.0
    modified = _with_interior_and_tail_padding(packed, extra_weight)
    lone, lone_out = _run(algorithm, logreg_params, modified, rounds=1)
    scanned, scanned_out = _run(
        algorithm, logreg_params, modified, ExecutionPlan(scan_unroll=2), rounds=1
    )
    _assert_trees(lone, scanned, atol=1e-7)
    _assert_trees(lone_out.client_metrics, scanned_out.client_metrics, atol=1e-6)
    assert float(lone_out.client_metrics["num_examples"][-1]) == 0.0
    assert float(lone_out.client_metrics["update_norm"][-1]) == 0.0
    # Server SGD(1): the step is the weighted mean of deltas; the padding-only
    # client adds its weight and a zero delta, and the interior padding step
    # changes nothing, so the step shrinks by W / (W + w) exactly.
    original, original_out = _run(algorithm, logreg_params, packed, rounds=1)
    np.testing.assert_array_equal(
        np.asarray(original_out.client_metrics["loss_sum"]),
        np.asarray(lone_out.client_metrics["loss_sum"][:-1]),
    )
    total = float(np.sum(packed.weight))
    for start, before, after in zip(
        jax.tree.leaves(logreg_params),
        jax.tree.leaves(original.params),
        jax.tree.leaves(lone.params),
    ):
        expected = np.asarray(start) - (np.asarray(start) - np.asarray(before)) * total / (
            total + extra_weight
        )
        np.testing.assert_allclose(np.asarray(after), expected, atol=1e-6, rtol=1e-5)
