"""Cohorts padded to a client-count bucket (variable cohorts, e.g. Poisson sampling).

Packing: padding entries have weight 0, the out-of-range id and no lane
position; the lane axes depend only on the bucket. Engine: a padded cohort
runs exactly the round of the unpadded one, and an all-padding cohort
changes nothing.
"""

import functools

import jax
import numpy as np
import optax
import pytest

from fedjaxsim import scaffold
from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import (
    PackingConfig,
    assign_lanes,
    client_count_bucket,
    pack_cohort,
)
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.testing import run_rounds, synthetic_clients

SIZES = [3, 17, 1, 8, 12]
IDS = [4, 9, 0, 21, 13]
NUM_TOTAL_CLIENTS = 30
BUCKET = 8
CONFIG = PackingConfig(batch_size=4, num_epochs=2)
LAYOUTS = [None, 1, 2]  # one client per lane; a lone packed lane (CPU default); two lanes


def _pack(clients, ids, num_lanes=None, **kwargs):
    return pack_cohort(
        clients,
        ids,
        kwargs.pop("config", CONFIG),
        seed=1,
        round_index=0,
        num_total_clients=NUM_TOTAL_CLIENTS,
        num_lanes=num_lanes,
        **kwargs,
    )


@pytest.fixture(scope="module")
def clients():
    return synthetic_clients(SIZES, seed=11)


# ---------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("num_lanes", LAYOUTS)
def test_padding_entries_follow_the_real_clients_and_leave_their_lanes_alone(clients, num_lanes):
    plain = _pack(clients, IDS, num_lanes)
    padded = _pack(clients, IDS, num_lanes, num_clients=BUCKET)
    n = len(IDS)
    np.testing.assert_array_equal(padded.weight[:n], plain.weight)
    np.testing.assert_array_equal(padded.weight[n:], 0.0)
    np.testing.assert_array_equal(padded.client_id[:n], IDS)
    np.testing.assert_array_equal(padded.client_id[n:], NUM_TOTAL_CLIENTS)
    assert padded.weight.dtype == np.float32 and padded.client_id.dtype == np.int32
    # No padding entry has a lane position: only real cohort indices and the
    # empty marker (the padded client count) appear in lane_clients.
    occupied = padded.lane_clients[padded.lane_clients < BUCKET]
    assert sorted(occupied.tolist()) == list(range(n))
    assert np.all(padded.lane_clients[padded.lane_clients >= n] == BUCKET)
    # The real lanes are the unpadded cohort's, the extra lanes empty and zero.
    lanes = plain.num_lanes
    assert padded.num_steps == plain.num_steps
    for name in plain.data:
        np.testing.assert_array_equal(padded.data[name][:lanes], plain.data[name])
        assert not padded.data[name][lanes:].any()
    np.testing.assert_array_equal(padded.mask[:lanes], plain.mask)
    assert not padded.mask[lanes:].any()
    np.testing.assert_array_equal(padded.step_position[:lanes], plain.step_position)
    positions = plain.clients_per_lane
    # The same positions; an empty one holds the padded count instead of n.
    expected = np.where(plain.lane_clients == n, BUCKET, plain.lane_clients)
    np.testing.assert_array_equal(padded.lane_clients[:lanes, :positions], expected)


@pytest.mark.parametrize(
    "num_lanes, lane_shape", [(None, (BUCKET, 1)), (1, (1, BUCKET)), (3, (3, BUCKET - 2))]
)
def test_lane_axes_depend_only_on_the_bucket(num_lanes, lane_shape):
    """Cohorts of 0 to 8 clients padded to 8 share every axis but the steps
    (the bucket of the longest lane; one for an all-padding cohort), pinned here."""
    config = PackingConfig(batch_size=2, max_steps=2)
    population = synthetic_clients([1, 9, 4, 2, 7, 3, 5, 6], seed=2)
    template = population[0]
    shapes = set()
    for count in range(BUCKET + 1):
        cohort = _pack(
            population[:count],
            list(range(count)),
            num_lanes,
            config=config,
            num_clients=BUCKET,
            template=template,
            num_steps=BUCKET * 2,
        )
        leaves = jax.tree.leaves(cohort)
        shapes.add(tuple((np.shape(leaf), np.asarray(leaf).dtype) for leaf in leaves))
        assert cohort.lane_clients.shape == lane_shape
    assert len(shapes) == 1


def test_no_lane_ever_holds_more_than_the_padded_bound():
    """The packed-lane width ``num_clients - num_lanes + 1`` holds whatever
    assign_lanes does: with every client having a step, the first
    ``num_lanes`` clients (longest first) each open a lane of their own."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        num_clients = int(rng.integers(1, 12))
        num_lanes = int(rng.integers(1, 6))
        steps = rng.integers(1, 30, size=num_clients).tolist()
        lanes = assign_lanes(steps, num_lanes)
        assert max(len(lane) for lane in lanes) <= max(1, num_clients - num_lanes + 1)


@pytest.mark.parametrize("num_lanes, num_lanes_expected", [(None, 4), (2, 2)])
def test_all_padding_cohort_takes_its_shapes_from_the_template(num_lanes, num_lanes_expected):
    template = {
        "x": np.ones((5, 3, 2), np.float16),
        "y": np.ones(5, np.int64),
        "flag": np.ones(5, bool),
    }
    cohort = _pack([], [], num_lanes, num_clients=4, template=template, pad_lanes_to_multiple=2)
    assert cohort.mask.shape == (num_lanes_expected, 1, CONFIG.batch_size)  # one padding step
    assert not cohort.mask.any()
    for name, array in template.items():
        assert cohort.data[name].shape == (
            num_lanes_expected,
            1,
            CONFIG.batch_size,
            *array.shape[1:],
        )
        assert cohort.data[name].dtype == array.dtype
        assert not cohort.data[name].any()
    np.testing.assert_array_equal(cohort.weight, np.zeros(4, np.float32))
    np.testing.assert_array_equal(cohort.client_id, [NUM_TOTAL_CLIENTS] * 4)
    assert np.all(cohort.lane_clients == 4)
    # Empty ids in any array form (a Poisson draw is an empty int64 array).
    again = _pack([], np.array([], np.int64), num_lanes, num_clients=4, template=template)
    assert again.num_clients == 4


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"clients": []}, ValueError, "num_clients .* and template"),
        ({"clients": [], "num_clients": 2}, ValueError, "template"),
        ({"clients": [], "template": "first"}, ValueError, "num_clients"),
        ({"num_clients": 1}, InvalidArgument, "num_clients=1 is smaller than the 2 clients"),
        ({"num_clients": 0}, InvalidArgument, "num_clients must be an int >= 1"),
        ({"num_clients": 2.0}, InvalidArgument, "num_clients must be an int"),
        ({"template": {"x": np.zeros((1, 3), np.float32)}}, ValueError, "the template has"),
        ({"template": {}}, InvalidArgument, "template must be a non-empty mapping"),
        ({"template": {"x": np.float32(1)}}, InvalidArgument, "leading example axis"),
        ({"num_steps": 0}, InvalidArgument, "num_steps"),
    ],
)
def test_bad_padding_arguments(kwargs, error, message):
    clients = synthetic_clients([2, 3])
    kwargs = dict(kwargs)
    if kwargs.get("template") == "first":
        kwargs["template"] = clients[0]
    clients = kwargs.pop("clients", clients)
    with pytest.raises(error, match=message):
        _pack(clients, list(range(len(clients))), **kwargs)


def test_template_must_match_the_clients_and_ids_need_not_be_sorted():
    clients = synthetic_clients([2, 3])
    widened = {"x": clients[0]["x"].astype(np.float64), "y": clients[0]["y"]}
    with pytest.raises(ValueError, match="the template has"):
        _pack(clients, [3, 1], num_clients=4, template=widened)
    cohort = _pack(clients, [3, 1], num_clients=4, template=clients[1])
    np.testing.assert_array_equal(cohort.client_id, [3, 1, NUM_TOTAL_CLIENTS, NUM_TOTAL_CLIENTS])


def test_client_count_buckets():
    for n in range(300):
        pow2 = client_count_bucket(n)
        # The smallest power of two holding n clients (and one at least).
        assert pow2 == min(2**k for k in range(10) if 2**k >= max(n, 1))
        geometric = client_count_bucket(n, "geometric")
        assert max(n, 1) <= geometric <= max(n, 1) * 1.125 or geometric - n < 1
        assert client_count_bucket(n, "exact") == max(n, 1)
        assert client_count_bucket(n, 5) == 5 * max(1, -(-n // 5))
    # 8 geometric buckets per power of two.
    assert len({client_count_bucket(n, "geometric") for n in range(129, 257)}) == 8
    # A cap (the population): a bucket above it shrinks to it, never below n.
    assert client_count_bucket(70, maximum=100) == 100
    assert client_count_bucket(70, maximum=90) == 90
    assert client_count_bucket(95, maximum=90) == 95
    assert client_count_bucket(0, maximum=1) == 1
    for args, kwargs, name in [
        ((-1,), {}, "num_clients"),
        ((1.5,), {}, "num_clients"),
        ((3, "cubes"), {}, "rule"),
        ((3, 0), {}, "rule"),
        ((3,), {"maximum": 0}, "maximum"),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            client_count_bucket(*args, **kwargs)
        assert raised.value.name == name


# ---------------------------------------------------------------------------
# Engine: a padded cohort is the unpadded round; an all-padding one is a no-op.

ALGORITHMS = {
    # Adam on both sides: every moment and count of the server state must match.
    "fedavg_adam": lambda loss: fed_avg(loss, optax.adam(0.02), optax.adam(0.05)),
    # Stateful: the padded entries' client states must go nowhere.
    "scaffold": lambda loss: scaffold(loss, 0.1, NUM_TOTAL_CLIENTS),
}


@functools.cache
def _algorithm(name, loss):
    return ALGORITHMS[name](loss)


# (num_lanes, plan): the layouts of test_padded_cohort_runs_exactly_the_unpadded_round.
ENGINE_LAYOUTS = {
    "client_lanes": (None, ExecutionPlan()),
    # Chunks of 2 lanes sorted by length (the GPU default chunks lanes): the
    # padded cohort has one more chunk, all padding.
    "client_lanes_chunked": (None, ExecutionPlan(clients_per_chunk=2)),
    "lone_packed_lane": (1, ExecutionPlan()),
    "two_packed_lanes": (2, ExecutionPlan()),
}


@functools.cache
def _round_fn(algorithm, plan):
    # One compiled function per (algorithm, plan); each cohort shape compiles once in it.
    return build_round(algorithm, plan)


def _run(algorithm, params, cohorts, plan):
    return run_rounds(
        algorithm,
        params,
        cohorts,
        num_total_clients=NUM_TOTAL_CLIENTS,
        round_fn=_round_fn(algorithm, plan),
        seed=3,
    )


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("layout", sorted(ENGINE_LAYOUTS))
def test_padded_cohort_runs_exactly_the_unpadded_round(
    clients, logreg_loss, logreg_params, name, layout
):
    """Two rounds on one device: server state bit for bit, the real clients'
    metrics and states equal, the padding rows zero."""
    num_lanes, plan = ENGINE_LAYOUTS[layout]
    algorithm = _algorithm(name, logreg_loss)
    plain = _pack(clients, IDS, num_lanes)
    padded = _pack(clients, IDS, num_lanes, num_clients=BUCKET, template=clients[0])
    state, outputs, store = _run(algorithm, logreg_params, [plain] * 2, plan)
    padded_state, padded_outputs, padded_store = _run(algorithm, logreg_params, [padded] * 2, plan)
    _assert_bitwise_equal(padded_state, state)
    n = len(IDS)
    for output, padded_output in zip(outputs, padded_outputs):
        _assert_bitwise_equal(padded_output.server_metrics, output.server_metrics)
        real = jax.tree.map(lambda leaf: np.asarray(leaf)[:n], padded_output.client_metrics)
        _assert_bitwise_equal(real, output.client_metrics)
        for leaf in jax.tree.leaves(padded_output.client_metrics):
            np.testing.assert_array_equal(np.asarray(leaf)[n:], 0.0)
    if store is not None:  # every client's stored state, padding ids dropped
        everyone = np.arange(NUM_TOTAL_CLIENTS)
        _assert_bitwise_equal(padded_store.gather(everyone), store.gather(everyone))
        # The round did change the sampled clients' states.
        moved = jax.tree.leaves(store.gather(np.asarray(IDS)))[0]
        assert np.abs(np.asarray(moved)).max() > 0


@pytest.mark.parametrize("num_lanes", LAYOUTS)
def test_all_padding_cohort_changes_nothing(clients, logreg_loss, logreg_params, num_lanes):
    """No client: FedAvg (server SGD) leaves the parameters exactly as they were."""
    algorithm = fed_avg(logreg_loss, optax.sgd(0.1))
    empty = _pack([], [], num_lanes, num_clients=4, template=clients[0])
    state, (output,), _ = run_rounds(
        algorithm, logreg_params, [empty], num_total_clients=NUM_TOTAL_CLIENTS
    )
    _assert_bitwise_equal(state.params, logreg_params)
    assert float(output.server_metrics["total_weight"]) == 0.0
    assert float(output.server_metrics["num_nonfinite_updates"]) == 0.0
    for leaf in jax.tree.leaves(output.client_metrics):
        assert np.shape(leaf)[0] == 4
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
