"""Invariances every algorithm must satisfy under the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import fed_adam, fed_avg
from fedjaxsim.core.client_batch import Cohort
from fedjaxsim.core.engine import ExecutionPlan, build_round, lanes_by_steps
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from tests.conftest import make_clients

SIZES = [3, 17, 1, 8, 12]
IDS = [4, 9, 0, 21, 13]

ALGORITHMS = {
    "fedavg_client_adam": lambda loss: fed_avg(loss, optax.adam(0.01), optax.sgd(1.0)),
    "fedadam": lambda loss: fed_adam(loss, client_learning_rate=0.05, server_learning_rate=0.01),
}


def _pack(clients=None, ids=IDS, num_lanes=None, num_steps=None, round_index=0, **config):
    clients = make_clients(SIZES, seed=11) if clients is None else clients
    config = PackingConfig(**{"batch_size": 4, "num_epochs": 2, **config})
    return pack_cohort(
        clients, ids, config, seed=1, round_index=round_index, num_total_clients=30,
        num_lanes=num_lanes, num_steps=num_steps,
    )


def _run(algorithm, params, cohort, plan=ExecutionPlan(), rounds=2):
    round_fn = build_round(algorithm, plan)
    state = algorithm.init(params)
    for r in range(rounds):
        state, out = round_fn(state, cohort, jax.random.key(r))
    return state, out


def _assert_trees(a, b, exact=False, atol=1e-6):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.fixture(params=sorted(ALGORITHMS))
def algorithm(request, logreg_loss):
    return ALGORITHMS[request.param](logreg_loss)


def test_padded_steps_leave_params_and_optimizer_state_bit_identical(algorithm, logreg_params):
    """Client Adam would move its moments on a zero gradient: padding must skip it."""
    tight, _ = _run(algorithm, logreg_params, _pack(step_bucket="exact"))
    padded, _ = _run(algorithm, logreg_params, _pack(num_steps=19))
    _assert_trees(tight, padded, exact=True)


def test_padded_local_step_is_exact_noop_for_client_adam(logreg_loss, logreg_params):
    """Directly: the client's final local state with and without trailing padding."""
    algorithm = fed_avg(logreg_loss, optax.adam(0.01))
    for num_steps in (10, 16):
        _, out = _run(algorithm, logreg_params, _pack(num_steps=num_steps, step_bucket="exact"), rounds=1)
        if num_steps == 10:
            reference = out.client_metrics
    _assert_trees(reference, out.client_metrics, exact=True)


def test_zero_weight_clients_change_nothing(algorithm, logreg_params):
    base = _pack()
    clients = make_clients(SIZES + [6], seed=11)
    extended = _pack(clients, IDS + [29])
    weight = np.array(extended.weight)
    weight[-1] = 0.0
    extended = extended._replace(weight=weight)
    a, _ = _run(algorithm, logreg_params, base)
    b, _ = _run(algorithm, logreg_params, extended)
    _assert_trees(a, b, atol=1e-7)


def test_cohort_order_does_not_matter(algorithm, logreg_params):
    clients = make_clients(SIZES, seed=11)
    order = [3, 0, 4, 2, 1]
    a, out_a = _run(algorithm, logreg_params, _pack(clients, IDS))
    b, out_b = _run(algorithm, logreg_params, _pack([clients[i] for i in order], [IDS[i] for i in order]))
    _assert_trees(a, b, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out_a.client_metrics["loss_sum"])[order], out_b.client_metrics["loss_sum"], rtol=1e-6)


PLANS = [
    (None, ExecutionPlan()),
    (1, ExecutionPlan(num_lanes=1)),
    (2, ExecutionPlan(num_lanes=2)),
    (None, ExecutionPlan(clients_per_chunk=2)),
    (None, ExecutionPlan(clients_per_chunk=2, chunk_loop="unroll")),
    (None, ExecutionPlan(clients_per_chunk=2, sort_chunks=False)),
    (2, ExecutionPlan(num_lanes=2, clients_per_chunk=1, sort_chunks=False)),
    (3, ExecutionPlan(num_lanes=3, clients_per_chunk=2, scan_unroll=3)),
    (None, ExecutionPlan(scan_unroll=True)),
]


def test_every_plan_gives_the_same_result(algorithm, logreg_params):
    reference, reference_out = _run(algorithm, logreg_params, _pack())
    for num_lanes, plan in PLANS[1:]:
        state, out = _run(algorithm, logreg_params, _pack(num_lanes=num_lanes), plan)
        _assert_trees(reference, state, atol=2e-6)
        _assert_trees(reference_out.client_metrics, out.client_metrics, atol=1e-5)


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
    a, out_a = _run(algorithm, logreg_params, _pack(num_lanes=2), ExecutionPlan(num_lanes=2))
    b, out_b = _run(algorithm, logreg_params, _pack(num_lanes=2), ExecutionPlan(num_lanes=2))
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
    other_clients = make_clients([5, 2, 7, 11, 16], seed=3)
    state, _ = round_fn(state, _pack(other_clients, round_index=1, step_bucket=16), jax.random.key(1))
    assert len(traces) == after_first


def test_init_accepts_shape_dtype_structs(algorithm, logreg_params):
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), logreg_params)
    abstract = jax.eval_shape(algorithm.init, shapes)
    concrete = algorithm.init(logreg_params)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
        assert (a.shape, a.dtype) == (c.shape, c.dtype)


def test_dropout_rng_is_per_client_and_step_and_plan_invariant(digits_cnn):
    """Dropout keys come from (round rng, client id, local step): lanes agree."""
    from fedjaxsim.models import classification_loss

    params = digits_cnn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(0)
    clients = [
        {"x": rng.random((n, 8, 8, 1), dtype=np.float32), "y": rng.integers(0, 10, n).astype(np.int32)}
        for n in (5, 9, 3)
    ]
    algorithm = fed_avg(classification_loss(digits_cnn), optax.sgd(0.1))
    ids = [2, 7, 5]
    one_per_lane, _ = _run(algorithm, params, _pack(clients, ids), ExecutionPlan(), rounds=1)
    packed, _ = _run(algorithm, params, _pack(clients, ids, num_lanes=2), ExecutionPlan(num_lanes=2), rounds=1)
    lax_conv, _ = _run(algorithm, params, _pack(clients, ids), ExecutionPlan(conv_lowering="lax"), rounds=1)
    _assert_trees(one_per_lane, packed, atol=1e-6)
    _assert_trees(one_per_lane, lax_conv, atol=1e-5)
    # Dropout is active: a different round key changes the result.
    other_key = build_round(algorithm, ExecutionPlan())(algorithm.init(params), _pack(clients, ids), jax.random.key(1))[0]
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(one_per_lane.params), jax.tree.leaves(other_key.params)))
    assert difference > 1e-4


def test_malformed_cohort_is_rejected(algorithm, logreg_params):
    cohort = _pack()
    bad = cohort._replace(step_position=cohort.step_position[:, :-1])
    with pytest.raises(ValueError, match="step_position"):
        build_round(algorithm, ExecutionPlan())(algorithm.init(logreg_params), bad, jax.random.key(0))
    bad = cohort._replace(data={"x": cohort.data["x"][:, :, :2], "y": cohort.data["y"]})
    with pytest.raises(ValueError, match=r"cohort.data\['x'\]"):
        build_round(algorithm, ExecutionPlan())(algorithm.init(logreg_params), bad, jax.random.key(0))
    assert isinstance(cohort, Cohort)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clients_per_chunk": 0}, "clients_per_chunk"),
        ({"num_lanes": -1}, "num_lanes"),
        ({"chunk_loop": "while"}, "chunk_loop"),
        ({"scan_unroll": 0}, "scan_unroll"),
        ({"conv_lowering": "fft"}, "conv_lowering"),
    ],
)
def test_invalid_plan_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExecutionPlan(**kwargs)


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
    tail = lambda array, value: np.concatenate(  # noqa: E731
        [array, np.full((1, 2, *np.shape(array)[2:]), value, np.asarray(array).dtype)], axis=1
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
    lone, lone_out = _run(algorithm, logreg_params, modified, ExecutionPlan(num_lanes=1), rounds=1)
    scanned, scanned_out = _run(
        algorithm, logreg_params, modified, ExecutionPlan(num_lanes=1, scan_unroll=2), rounds=1
    )
    _assert_trees(lone, scanned, atol=1e-7)
    _assert_trees(lone_out.client_metrics, scanned_out.client_metrics, atol=1e-6)
    assert float(lone_out.client_metrics["num_examples"][-1]) == 0.0
    assert float(lone_out.client_metrics["update_norm"][-1]) == 0.0
    # Server SGD(1): the step is the weighted mean of deltas; the padding-only
    # client adds its weight and a zero delta, and the interior padding step
    # changes nothing, so the step shrinks by W / (W + w) exactly.
    original, original_out = _run(algorithm, logreg_params, packed, ExecutionPlan(num_lanes=1), rounds=1)
    np.testing.assert_array_equal(
        np.asarray(original_out.client_metrics["loss_sum"]), np.asarray(lone_out.client_metrics["loss_sum"][:-1])
    )
    total = float(np.sum(packed.weight))
    for start, before, after in zip(
        jax.tree.leaves(logreg_params), jax.tree.leaves(original.params), jax.tree.leaves(lone.params)
    ):
        expected = np.asarray(start) - (np.asarray(start) - np.asarray(before)) * total / (total + extra_weight)
        np.testing.assert_allclose(np.asarray(after), expected, atol=1e-6, rtol=1e-5)
