"""The host-side client-state store: lazy, exact, checkpointable."""

import tracemalloc

import numpy as np
import pytest

from fedjaxsim.core.client_state import ClientStateStore


def _default_state():
    # A small model's worth of state: 2 leaves, 100 float32s, plus a flag.
    return {
        "control": {
            "kernel": np.zeros((20, 4), np.float32),
            "bias": np.full((20,), 0.5, np.float32),
        },
        "seen": np.zeros((), bool),
    }


def _states_for(ids, round_index):
    """Distinct per-client values that also depend on the round."""
    ids = np.asarray(ids)
    base = (ids[:, None] * 1000 + round_index).astype(np.float32)
    return {
        "control": {
            "kernel": np.broadcast_to(base[:, :, None], (len(ids), 20, 4))
            + np.arange(4, dtype=np.float32),
            "bias": np.broadcast_to(base, (len(ids), 20)).copy(),
        },
        "seen": np.ones(len(ids), bool),
    }


def _assert_tree_equal(a, b):
    np.testing.assert_array_equal(a["control"]["kernel"], b["control"]["kernel"])
    np.testing.assert_array_equal(a["control"]["bias"], b["control"]["bias"])
    np.testing.assert_array_equal(a["seen"], b["seen"])


def _rows(tree, index):
    return {
        "control": {
            "kernel": tree["control"]["kernel"][index],
            "bias": tree["control"]["bias"][index],
        },
        "seen": tree["seen"][index],
    }


@pytest.mark.parametrize("memory_mapped", [False, True])
def test_client_sees_in_round_5_exactly_what_it_wrote_in_round_1(memory_mapped, tmp_path):
    store = ClientStateStore(
        _default_state(),
        1000,
        directory=str(tmp_path) if memory_mapped else None,
        initial_capacity=2,
    )
    cohorts = {
        1: [7, 3, 998, 41],
        2: [5, 6, 8, 9, 10],
        3: [3, 11],
        4: [12, 13, 14, 15],
        5: [41, 7, 500],
    }
    written = {}
    for round_index, ids in cohorts.items():
        gathered = store.gather(ids)
        for position, client_id in enumerate(ids):
            expected = written.get(client_id, _default_state())
            _assert_tree_equal(_rows(gathered, position), expected)
        new_states = _states_for(ids, round_index)
        store.scatter(ids, new_states)
        for position, client_id in enumerate(ids):
            written[client_id] = _rows(new_states, position)
    # Client 7 wrote in round 1 and came back in round 5: checked above; and
    # every client never sampled still reads the default.
    untouched = store.gather([0, 1, 2, 999])
    for position in range(4):
        _assert_tree_equal(_rows(untouched, position), _default_state())
    assert store.num_written == len(written)
    assert 7 in store and 0 not in store


def test_padding_ids_read_default_and_are_never_written():
    store = ClientStateStore(_default_state(), 10)
    ids = [4, 10, 2**31 - 1, 2]  # 10 and int32 max are padding (>= num_total_clients)
    store.scatter(ids, _states_for(ids, 1))
    assert store.num_written == 2 and 4 in store and 2 in store
    gathered = store.gather([10, 2**31 - 1])
    assert not gathered["seen"].any()
    np.testing.assert_array_equal(gathered["control"]["bias"], 0.5)


def test_bad_input_is_rejected_with_a_clear_message():
    store = ClientStateStore(_default_state(), 10)
    with pytest.raises(ValueError, match="never -1"):
        store.gather([3, -1])
    with pytest.raises(ValueError, match="distinct"):
        store.scatter([3, 3], _states_for([3, 3], 0))
    bad = _states_for([1, 2], 0)
    bad["control"]["bias"] = bad["control"]["bias"][:, :5]
    with pytest.raises(ValueError, match=r"\['control'\]\['bias'\].*shape"):
        store.scatter([1, 2], bad)
    with pytest.raises(ValueError, match="structure"):
        store.scatter([1, 2], {"control": _states_for([1, 2], 0)["control"]})
    with pytest.raises(ValueError, match="num_total_clients"):
        ClientStateStore(_default_state(), 0)


def test_state_dict_round_trip_is_plain_numpy_and_exact(tmp_path):
    store = ClientStateStore(_default_state(), 100)
    store.scatter([5, 90, 17], _states_for([5, 90, 17], 1))
    store.scatter([17, 3], _states_for([17, 3], 2))
    state = store.state_dict()
    assert all(type(value) is np.ndarray for value in state.values())
    np.savez(tmp_path / "store.npz", **state)  # no pickle needed
    with np.load(tmp_path / "store.npz", allow_pickle=False) as loaded:
        restored = ClientStateStore(_default_state(), 100, directory=str(tmp_path))
        restored.load_state_dict(dict(loaded))
    ids = [5, 90, 17, 3, 50]
    _assert_tree_equal(restored.gather(ids), store.gather(ids))
    assert restored.num_written == 4
    with pytest.raises(ValueError, match="num_total_clients"):
        ClientStateStore(_default_state(), 99).load_state_dict(state)


def test_million_client_population_costs_only_the_sampled_rows():
    num_total_clients = 1_000_000
    full_population_bytes = num_total_clients * (80 + 20) * 4
    tracemalloc.start()
    store = ClientStateStore(_default_state(), num_total_clients)
    rng = np.random.default_rng(0)
    sampled = set()
    for round_index in range(5):
        ids = rng.choice(num_total_clients, size=100, replace=False)
        sampled.update(ids.tolist())
        store.gather(ids)
        store.scatter(ids, _states_for(ids, round_index))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.num_written == len(sampled) <= 500
    # Rows for at most 500 clients (grown by doubling), nothing per population.
    assert store.allocated_bytes <= 1024 * 400 + 1024
    # Memory carries the claim; there is no wall-clock threshold, which a
    # loaded CI machine could fail.
    assert peak < full_population_bytes / 100, peak
