"""Readers of FedScale's device traces (``fedjaxsim/data/device_traces.py``).

Small traces are written in FedScale's layout (pickled dicts, and JSON of
the same dicts) into ``tmp_path`` and read back; references are loops over
FedScale's definitions.
"""

import json
import os
import pickle

import numpy as np
import pytest

from fedjaxsim.data.device_traces import (
    UnsafePickleError,
    read_behaviour_trace,
    read_device_capacity,
)


def _write_pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _write_json(path, obj):
    path.write_text(json.dumps({str(k): v for k, v in obj.items()}))
    return path


def _capacity_trace(rng, size=12):
    ids = rng.choice(100_000, size=size, replace=False)
    return {
        int(i): {
            "computation": float(rng.uniform(5, 500)),
            "communication": float(rng.uniform(100, 50_000)),
        }
        for i in ids
    }


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_device_capacity_from_pickle_and_json(tmp_path, protocol):
    trace = _capacity_trace(np.random.default_rng(0))
    expected = {i: (e["computation"], e["communication"]) for i, e in trace.items()}
    from_pickle = read_device_capacity(_write_pickle(tmp_path / "cap", trace, protocol))
    from_json = read_device_capacity(_write_json(tmp_path / "cap.json", trace))
    assert from_pickle == expected and from_json == expected
    assert list(from_pickle) == sorted(trace)
    assert all(type(i) is int for i in from_json)


def test_device_capacity_accepts_numpy_scalars(tmp_path):
    trace = {
        7: {"computation": np.float64(12.5), "communication": np.float32(800.0)},
        3: {
            "computation": np.int64(40),
            "communication": 1000.0,
        },
    }
    got = read_device_capacity(_write_pickle(tmp_path / "cap", trace))
    assert got == {3: (40.0, 1000.0), 7: (12.5, 800.0)}


def _behaviour_trace():
    return {
        # FedScale's own test entry: [1, 1] is empty under [start, end).
        5: {"active": [1, 3, 6, 9], "inactive": [1, 4, 7, 10], "finish_time": 10},
        2: {
            "duration": 211625,
            "active": [12788, 100044, 188992, 271372],
            "inactive": [65881, 133574, 208292, 276575],
            "finish_time": 518400,
            "model": "CPH1801",
        },
        9: {"active": [], "inactive": [], "finish_time": 518400, "model": "x"},
        4: {"active": [0.0, 400.5], "inactive": [100.25, 700.0], "finish_time": 600},  # clipped
    }


def test_behaviour_trace_from_pickle_and_json(tmp_path):
    trace = _behaviour_trace()
    intervals, period = read_behaviour_trace(_write_pickle(tmp_path / "behave", trace))
    json_intervals, json_period = read_behaviour_trace(_write_json(tmp_path / "b.json", trace))
    assert period == json_period == 518400.0
    expected = [  # sorted ids 2, 4, 5, 9
        [[12788, 65881], [100044, 133574], [188992, 208292], [271372, 276575]],
        [[0.0, 100.25], [400.5, 600.0]],
        [[3, 4], [6, 7], [9, 10]],
        np.zeros((0, 2)),
    ]
    for got, got_json, want in zip(intervals, json_intervals, expected, strict=True):
        assert got.dtype == np.float64 and got.shape[1:] == (2,)
        np.testing.assert_array_equal(got, np.asarray(want, np.float64).reshape(-1, 2))
        np.testing.assert_array_equal(got_json, got)


def test_behaviour_intervals_match_fedscale_away_from_boundaries(tmp_path):
    """FedScale: online iff active[k] <= t <= inactive[k] for some k, t in [0, finish_time)."""
    rng = np.random.default_rng(1)
    trace = {}
    for client in range(20):
        times = np.sort(rng.choice(np.arange(1, 5000), size=2 * rng.integers(0, 6), replace=False))
        trace[client] = {
            "active": times[0::2].tolist(),
            "inactive": times[1::2].tolist(),
            "finish_time": 5000,
        }
    intervals, period = read_behaviour_trace(_write_pickle(tmp_path / "behave", trace))
    assert period == 5000.0
    for t in rng.uniform(0, 5000, size=300):  # continuous: never exactly on a boundary
        for client, entry in trace.items():
            fedscale = any(a <= t <= i for a, i in zip(entry["active"], entry["inactive"]))
            ours = any(start <= t < end for start, end in intervals[client])
            assert ours == fedscale


def test_the_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({1: {"computation": Exploit(), "communication": 1.0}}))
    for reader in (read_device_capacity, read_behaviour_trace):
        with pytest.raises(UnsafePickleError) as error:
            reader(path)
        assert str(path) in str(error.value) and "system" in str(error.value)
        assert isinstance(error.value, ValueError)
    assert not marker.exists()


def test_the_restricted_unpickler_refuses_numpy_arrays(tmp_path):
    path = _write_pickle(tmp_path / "arrays", {1: {"computation": np.ones(2), "communication": 1}})
    with pytest.raises(UnsafePickleError, match="refused"):
        read_device_capacity(path)


def test_truncated_and_corrupt_files_name_the_path(tmp_path):
    data = pickle.dumps(_behaviour_trace())
    truncated = tmp_path / "truncated"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt_json = tmp_path / "corrupt.json"
    corrupt_json.write_text('{"1": {"computation": 3.0, ')
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (truncated, corrupt_json, empty):
        with pytest.raises(ValueError) as error:
            read_behaviour_trace(path)
        assert str(path) in str(error.value)


def test_a_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere"
    for reader in (read_device_capacity, read_behaviour_trace):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            reader(path)


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"communication": 5.0}, ["'computation'", "missing"]),
        ({"computation": "fast", "communication": 5.0}, ["'computation'", "'fast'"]),
        ({"computation": 3.0, "communication": -5.0}, ["'communication'"]),
        ({"computation": 3.0, "communication": float("nan")}, ["'communication'"]),
        ({"computation": True, "communication": 5.0}, ["'computation'"]),
    ],
)
def test_bad_capacity_entries_name_file_client_and_field(tmp_path, entry, words):
    path = _write_pickle(
        tmp_path / "cap", {11: {"computation": 1.0, "communication": 2.0}, 42: entry}
    )
    with pytest.raises(ValueError) as error:
        read_device_capacity(path)
    message = str(error.value)
    assert str(path) in message and "client 42" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"active": [1, 5], "inactive": [3, 4], "finish_time": 10}, ["inactive[1]", "go"]),
        ({"active": [1, 2], "inactive": [3, 4], "finish_time": 10}, ["active[1]"]),
        ({"active": [1, 5], "inactive": [3], "finish_time": 10}, ["2 'active'", "1 'inactive'"]),
        ({"active": [1], "inactive": [3]}, ["'finish_time'", "missing"]),
        ({"active": [1], "inactive": [3], "finish_time": 0}, ["'finish_time'"]),
        ({"active": "1,2", "inactive": [3], "finish_time": 10}, ["'active'"]),
        ({"active": [-1], "inactive": [3], "finish_time": 10}, ["'active'"]),
        ({"inactive": [3], "finish_time": 10}, ["'active'", "missing"]),
    ],
)
def test_bad_behaviour_entries_name_file_client_and_field(tmp_path, entry, words):
    good = {"active": [1], "inactive": [2], "finish_time": 10}
    path = _write_pickle(tmp_path / "behave", {3: good, 77: entry})
    with pytest.raises(ValueError) as error:
        read_behaviour_trace(path)
    message = str(error.value)
    assert str(path) in message and "client 77" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "trace, words",
    [
        ([1, 2, 3], ["dict", "list"]),
        ({}, ["non-empty"]),
        ({"abc": {"computation": 1.0, "communication": 1.0}}, ["'abc'"]),
        ({1: [1.0, 2.0]}, ["client 1", "list"]),
    ],
)
def test_bad_trace_shapes_are_named(tmp_path, trace, words):
    path = _write_pickle(tmp_path / "trace", trace)
    with pytest.raises(ValueError) as error:
        read_device_capacity(path)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)
