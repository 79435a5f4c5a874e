"""Device speeds and availability (``fedjaxsim/core/devices.py``).

References are Python loops over clients written from the docstrings'
definitions, or closed forms; random inputs are drawn here, never hard-coded.
"""

import math

import numpy as np
import pytest

from fedjaxsim.core import devices
from fedjaxsim.core.validation import InvalidArgument

# ----------------------------------------------------------------------------- speeds


def test_transfer_seconds_closed_form():
    # 1 MB at 8000 kbps: 8,000 kilobits / 8000 kbps = 1 s; 125 bytes at 1 kbps = 1 s.
    assert devices.transfer_seconds(1_000_000, 8000.0) == 1.0
    assert devices.transfer_seconds(125, 1.0) == 1.0
    np.testing.assert_array_equal(
        devices.transfer_seconds(250, np.array([1.0, 2.0, 4.0])), [2.0, 1.0, 0.5]
    )
    assert devices.transfer_seconds(0, 3.0) == 0.0


@pytest.mark.parametrize("num_bytes, kbps, name", [(-1, 1.0, "num_bytes"), (1, 0.0, "kbps")])
def test_transfer_seconds_rejects_bad_values(num_bytes, kbps, name):
    with pytest.raises(InvalidArgument) as error:
        devices.transfer_seconds(num_bytes, kbps)
    assert error.value.name == name


def test_lognormal_speeds_are_a_function_of_the_seed():
    first = devices.lognormal_speeds(3, 100, 4000, 2000)
    again = devices.lognormal_speeds(3, 100, 4000, 2000)
    other = devices.lognormal_speeds(4, 100, 4000, 2000)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        assert a.dtype == np.float64 and a.shape == (100,)


def test_zero_sigma_gives_exactly_the_medians():
    speeds = devices.lognormal_speeds(
        7,
        50,
        download_bytes=3_000_000,
        upload_bytes=1_000_000,
        median_seconds_per_example=0.02,
        compute_sigma=0.0,
        median_kbps=6000.0,
        network_sigma=0.0,
    )
    np.testing.assert_array_equal(speeds.seconds_per_example, np.full(50, 0.02))
    np.testing.assert_array_equal(speeds.download_seconds, np.full(50, 3_000_000 * 8 / 1000 / 6000))
    np.testing.assert_array_equal(speeds.upload_seconds, np.full(50, 1_000_000 * 8 / 1000 / 6000))


def test_lognormal_medians_and_sigmas_are_recovered():
    n, median_spe, median_kbps = 20_000, 0.004, 5000.0
    speeds = devices.lognormal_speeds(
        11,
        n,
        download_bytes=1e6,
        upload_bytes=5e5,
        median_seconds_per_example=median_spe,
        compute_sigma=0.6,
        median_kbps=median_kbps,
        network_sigma=0.3,
    )
    log_compute = np.log(speeds.seconds_per_example)
    log_kbps = np.log(1e6 * 8 / 1000 / speeds.download_seconds)
    # Standard errors: median ~1.25 sigma / sqrt(n) < 0.006, std ~sigma / sqrt(2n) < 0.003.
    assert abs(np.median(log_compute) - math.log(median_spe)) < 0.03
    assert abs(np.median(log_kbps) - math.log(median_kbps)) < 0.03
    assert abs(np.std(log_compute) - 0.6) < 0.02
    assert abs(np.std(log_kbps) - 0.3) < 0.02
    # Compute and network are independent draws (correlation's standard error 0.007).
    assert abs(np.corrcoef(log_compute, log_kbps)[0, 1]) < 0.04
    # One link per client, used both ways.
    np.testing.assert_allclose(speeds.upload_seconds / speeds.download_seconds, 0.5, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"seed": -1}, "seed"),
        ({"num_clients": 0}, "num_clients"),
        ({"download_bytes": -5}, "download_bytes"),
        ({"median_seconds_per_example": 0.0}, "median_seconds_per_example"),
        ({"compute_sigma": -0.1}, "compute_sigma"),
        ({"median_kbps": float("nan")}, "median_kbps"),
        ({"network_sigma": float("inf")}, "network_sigma"),
    ],
)
def test_lognormal_speeds_name_the_bad_argument(kwargs, name):
    arguments = {"seed": 0, "num_clients": 10, "download_bytes": 100, "upload_bytes": 100}
    with pytest.raises(InvalidArgument) as error:
        devices.lognormal_speeds(**{**arguments, **kwargs})
    assert error.value.name == name


def _random_capacity(rng, size):
    """Distinct ids (unsorted insertion order) and distinct values, so entries are identifiable."""
    ids = rng.choice(10 * size, size=size, replace=False)
    computation = rng.permutation(np.arange(1, size + 1)) * 3.5
    communication = rng.permutation(np.arange(1, size + 1)) * 250.0
    return {int(i): (float(c), float(m)) for i, c, m in zip(ids, computation, communication)}


def _assigned_entries(capacity, speeds):
    """Per population client, the index in sorted(capacity) of the entry it got."""
    ids = sorted(capacity)
    by_kbps = {capacity[i][1]: position for position, i in enumerate(ids)}
    kbps = 1000 * 8 / 1000 / speeds.download_seconds  # download_bytes = 1000
    return np.array([by_kbps[round(k, 6)] for k in kbps])


@pytest.mark.parametrize("num_clients", [5, 17, 43])
def test_speeds_from_capacity_follow_the_trace(num_clients):
    rng = np.random.default_rng(0)
    capacity = _random_capacity(rng, 17)
    speeds = devices.speeds_from_capacity(capacity, 2, num_clients, 1000, 400)
    assigned = _assigned_entries(capacity, speeds)
    ids = sorted(capacity)
    for i in range(num_clients):  # reference: each client's entry, converted one by one
        computation, communication = capacity[ids[assigned[i]]]
        assert speeds.seconds_per_example[i] == computation / 1000.0
        assert speeds.download_seconds[i] == 1000 * 8 / 1000 / communication
        assert speeds.upload_seconds[i] == 400 * 8 / 1000 / communication
    # A permutation of the trace, cycled: i and i + 17 share an entry.
    first = assigned[: min(17, num_clients)]
    assert len(np.unique(first)) == len(first)
    for i in range(17, num_clients):
        assert assigned[i] == assigned[i - 17]
    if num_clients >= 17:
        assert sorted(first) == list(range(17))


def test_speeds_from_capacity_are_a_function_of_the_seed():
    capacity = _random_capacity(np.random.default_rng(1), 30)
    first = devices.speeds_from_capacity(capacity, 5, 30, 1000, 1000)
    again = devices.speeds_from_capacity(dict(reversed(capacity.items())), 5, 30, 1000, 1000)
    other = devices.speeds_from_capacity(capacity, 6, 30, 1000, 1000)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)  # insertion order of the trace does not matter
        assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "capacity, words",
    [
        ({}, ["empty"]),
        ({4: (10.0, 100.0), 9: (-1.0, 100.0)}, ["9", "computation"]),
        ({4: (10.0, float("nan"))}, ["4", "communication"]),
        ({4: (10.0, float("inf"))}, ["4", "communication"]),
        ({4: (10.0, 0.0)}, ["4", "communication"]),
        ({4: (True, 5.0)}, ["4", "computation"]),
        ({4: (1.0,)}, ["4"]),
        ({"a": (1.0, 2.0)}, ["'a'"]),
    ],
)
def test_speeds_from_capacity_reject_bad_traces(capacity, words):
    with pytest.raises(InvalidArgument) as error:
        devices.speeds_from_capacity(capacity, 0, 10, 100, 100)
    assert error.value.name == "capacity"
    for word in words:
        assert word in str(error.value)


# ----------------------------------------------------------------------------- availability

TIMES = [0.0, 0.5, 59.25, 3599.75, 3600.0, 7200.5, 86399.5, 86400.0, 123456.75, 1e6 + 0.25]


def test_always_available():
    np.testing.assert_array_equal(devices.AlwaysAvailable(9).online(5.0), np.ones(9, bool))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_fraction_available_matches_a_loop_over_clients(fraction):
    n, seed, period = 300, 4, 3600.0
    availability = devices.FractionAvailable(n, fraction, seed, period_seconds=period)
    for t in TIMES:
        # The definition: period k = floor(t / period), one uniform per client from (seed, k).
        u = np.random.default_rng([devices._FRACTION_STREAM, seed, math.floor(t / period)]).random(
            n
        )
        expected = [bool(u[i] < fraction) for i in range(n)]
        np.testing.assert_array_equal(availability.online(t), expected)


def test_fraction_available_is_constant_within_a_period_and_near_the_fraction():
    n, fraction = 20_000, 0.3
    availability = devices.FractionAvailable(n, fraction, seed=1, period_seconds=100.0)
    np.testing.assert_array_equal(availability.online(200.0), availability.online(299.75))
    assert not np.array_equal(availability.online(299.75), availability.online(300.0))
    # Binomial standard error sqrt(0.21 / 20000) = 0.0032 per period.
    means = [np.mean(availability.online(100.0 * k)) for k in range(10)]
    assert all(abs(m - fraction) < 0.02 for m in means)
    # Each client, over many periods, is online about `fraction` of them.
    history = np.array([availability.online(100.0 * k) for k in range(200)])[:, :500]
    assert abs(np.mean(history) - fraction) < 0.01
    again = devices.FractionAvailable(n, fraction, seed=1, period_seconds=100.0)
    other = devices.FractionAvailable(n, fraction, seed=2, period_seconds=100.0)
    np.testing.assert_array_equal(again.online(250.0), availability.online(250.0))
    assert not np.array_equal(other.online(250.0), availability.online(250.0))


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.2])
def test_fraction_available_rejects_bad_fractions(fraction):
    with pytest.raises(InvalidArgument) as error:
        devices.FractionAvailable(10, fraction, seed=0)
    assert error.value.name == "fraction"


def test_availability_rejects_negative_times():
    with pytest.raises(InvalidArgument) as error:
        devices.DiurnalAvailability(5, 0).online(-1.0)
    assert error.value.name == "time_seconds"


@pytest.mark.parametrize("online_hours, day", [(8.0, 86400.0), (2.5, 36000.0), (24.0, 86400.0)])
def test_diurnal_matches_a_loop_over_clients(online_hours, day):
    n = 400
    availability = devices.DiurnalAvailability(n, 3, online_hours=online_hours, day_seconds=day)
    phase = availability.phase_seconds
    assert phase.shape == (n,) and np.all((0 <= phase) & (phase < day))
    window = online_hours * 3600
    for t in TIMES:
        expected = [(t % day + phase[i]) % day < window for i in range(n)]
        np.testing.assert_array_equal(availability.online(t), expected)


def test_diurnal_fraction_online_and_periodicity():
    n, hours, day = 20_000, 8.0, 86400.0
    availability = devices.DiurnalAvailability(n, 5, online_hours=hours, day_seconds=day)
    for t in (0.0, 3 * 3600.0, 12345.5, 70000.25):
        assert abs(np.mean(availability.online(t)) - hours / 24) < 0.02
        for k in (1, 2, 7, 100):
            np.testing.assert_array_equal(availability.online(t + k * day), availability.online(t))
    # On a grid of 900 s steps, the 8-hour window holds exactly 32 of a day's 96 points for
    # every client, whatever its phase.
    grid = np.array([availability.online(900.0 * k) for k in range(96)])
    np.testing.assert_array_equal(grid.sum(axis=0), np.full(n, 32))
    # Phases spread over the day (uniform mean day / 2, standard error 176 s).
    assert abs(np.mean(availability.phase_seconds) - day / 2) < 1500
    other = devices.DiurnalAvailability(n, 6, online_hours=hours, day_seconds=day)
    assert not np.array_equal(other.phase_seconds, availability.phase_seconds)
    again = devices.DiurnalAvailability(n, 5, online_hours=hours, day_seconds=day)
    np.testing.assert_array_equal(again.phase_seconds, availability.phase_seconds)


def test_diurnal_window_is_half_open():
    availability = devices.DiurnalAvailability(2, 0, online_hours=8.0)
    # Phases set by hand so that the window's edges fall on exact times.
    availability.phase_seconds = np.array([0.0, 86400.0 - 100.0])
    expected = {
        0.0: [True, False],
        99.5: [True, False],
        100.0: [True, True],
        28799.5: [True, True],
        28800.0: [False, True],
        28900.0: [False, False],
        86400.0 + 100.0: [True, True],
    }
    for t, online in expected.items():
        assert availability.online(t).tolist() == online, t


def test_diurnal_rejects_more_hours_than_a_day():
    with pytest.raises(InvalidArgument) as error:
        devices.DiurnalAvailability(5, 0, online_hours=25.0)
    assert error.value.name == "online_hours"


def _trace_reference(intervals, period, assignment, t):
    within = t % period
    return [
        any(start <= within < end for start, end in intervals[assignment[i]])
        for i in range(len(assignment))
    ]


def test_trace_interval_boundaries_are_half_open():
    intervals = [np.array([[10.0, 20.0], [30.0, 40.0]]), np.zeros((0, 2)), np.array([[0.0, 100.0]])]
    availability = devices.TraceAvailability(intervals, 100.0, seed=0, num_clients=3)
    position = {int(j): i for i, j in enumerate(availability.assignment)}  # trace -> client
    expected = {  # time -> online per trace client
        0.0: [False, False, True],
        9.75: [False, False, True],
        10.0: [True, False, True],
        19.75: [True, False, True],
        20.0: [False, False, True],
        30.0: [True, False, True],
        40.0: [False, False, True],
        99.75: [False, False, True],
        100.0: [False, False, True],  # wraps to 0
        110.0: [True, False, True],
        1030.0: [True, False, True],
    }
    for t, online in expected.items():
        got = availability.online(t)
        assert [bool(got[position[j]]) for j in range(3)] == online, t


def test_trace_matches_a_loop_and_cycles_over_a_larger_population():
    rng = np.random.default_rng(0)
    period, trace_size, n = 1000.0, 60, 151
    intervals = []
    for _ in range(trace_size):
        edges = np.sort(rng.choice(np.arange(0.0, period + 1, 0.5), size=2 * rng.integers(0, 5)))
        intervals.append(edges.reshape(-1, 2))
    availability = devices.TraceAvailability(intervals, period, seed=9, num_clients=n)
    assignment = availability.assignment
    assert sorted(assignment[:trace_size]) == list(range(trace_size))
    np.testing.assert_array_equal(assignment, assignment[np.arange(n) % trace_size])
    times = list(rng.choice(np.arange(0.0, 3 * period, 0.25), size=80)) + [0.0, 1000.0]
    times += [float(x) for x in intervals[3].reshape(-1)]  # boundaries exactly
    for t in times:
        np.testing.assert_array_equal(
            availability.online(t), _trace_reference(intervals, period, assignment, t)
        )
        for k in (1, 5):
            np.testing.assert_array_equal(
                availability.online(t + k * period), availability.online(t)
            )
    again = devices.TraceAvailability(intervals, period, seed=9, num_clients=n)
    other = devices.TraceAvailability(intervals, period, seed=10, num_clients=n)
    np.testing.assert_array_equal(again.assignment, assignment)
    assert not np.array_equal(other.assignment, assignment)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[5.0, 3.0]]),  # end before start
        np.array([[0.0, 10.0], [5.0, 20.0]]),  # overlapping
        np.array([[0.0, 150.0]]),  # beyond the period
        np.array([[-1.0, 5.0]]),
        np.array([0.0, 5.0, 6.0]),  # not [k, 2]
        np.array([[0.0, np.nan]]),
    ],
)
def test_trace_rejects_bad_intervals(bad):
    with pytest.raises(InvalidArgument) as error:
        devices.TraceAvailability([np.array([[1.0, 2.0]]), bad], 100.0, seed=0, num_clients=4)
    assert error.value.name == "intervals"
    assert "intervals[1]" in str(error.value)


def test_trace_rejects_an_empty_trace():
    with pytest.raises(InvalidArgument):
        devices.TraceAvailability([], 100.0, seed=0, num_clients=4)
