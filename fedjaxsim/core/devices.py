"""Simulated client devices: how fast each one is, and when it is online.

Pure NumPy on the host, deterministic from an integer seed: every random draw
comes from ``np.random.default_rng([stream, seed, ...])`` with a stream
constant of its own, so no two draws (nor the samplers of ``sampling.py``)
share a stream, and a resumed run sees exactly the devices of the run it
continues. The clock (``fedjaxsim.core.clock``) turns these into round times.

Speeds (:class:`DeviceSpeeds`):

* :func:`lognormal_speeds`: log-normal compute and network speeds around
  given medians (the heavy-tailed device populations of production FL
  reports, e.g. PAPAYA).
* :func:`speeds_from_capacity`: FedScale's device-capacity trace (Lai et al.
  2022), read by ``fedjaxsim.data.device_traces.read_device_capacity``.

Availability, each an object with ``online(time_seconds) -> bool[num_clients]``,
a pure function of (seed, time):

* :class:`AlwaysAvailable`, :class:`FractionAvailable`,
  :class:`DiurnalAvailability`, and :class:`TraceAvailability` (FedScale's
  behaviour trace, read by ``read_behaviour_trace``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

from fedjaxsim.core.validation import InvalidArgument, check_int, check_real

# Stream constants: the first word of every seed, one per purpose.
_COMPUTE_STREAM = 0xDE71_CE00  # lognormal_speeds: compute speed
_NETWORK_STREAM = 0xDE71_CE01  # lognormal_speeds: network speed
_CAPACITY_STREAM = 0xDE71_CE02  # speeds_from_capacity: population -> trace client
_FRACTION_STREAM = 0xDE71_CE03  # FractionAvailable: one draw per period
_DIURNAL_STREAM = 0xDE71_CE04  # DiurnalAvailability: per-client phase
_TRACE_STREAM = 0xDE71_CE05  # TraceAvailability: population -> trace client


class DeviceSpeeds(NamedTuple):
    """How long each client of the population takes for each part of its work."""

    seconds_per_example: np.ndarray  # float64[num_clients]: local compute per trained example
    download_seconds: np.ndarray  # float64[num_clients]: time to receive the model
    upload_seconds: np.ndarray  # float64[num_clients]: time to send the update back


def transfer_seconds(num_bytes, kbps) -> np.ndarray:
    """Seconds to move ``num_bytes`` at ``kbps`` kilobits per second.

    ``num_bytes * 8 / 1000 / kbps``: kilobits of 1000 bits, as FedScale's
    communication speeds are.

    Args:
      num_bytes: bytes to move (array-like, ``>= 0``).
      kbps: link speed in kilobits per second (array-like, ``> 0``), broadcast
        against ``num_bytes``.

    Returns:
      float64 array of the broadcast shape.

    Raises:
      InvalidArgument: for negative or non-finite bytes, or a speed that is
        not positive and finite.
    """
    num_bytes = np.asarray(num_bytes, np.float64)
    kbps = np.asarray(kbps, np.float64)
    if not np.all(np.isfinite(num_bytes) & (num_bytes >= 0)):
        raise InvalidArgument("num_bytes", f"num_bytes must be finite and >= 0, got {num_bytes}")
    if not np.all(np.isfinite(kbps) & (kbps > 0)):
        raise InvalidArgument("kbps", f"kbps must be finite and > 0, got {kbps}")
    return num_bytes * 8 / 1000 / kbps


def _check_bytes(download_bytes, upload_bytes) -> tuple[float, float]:
    return (
        check_real("download_bytes", download_bytes, minimum=0.0),
        check_real("upload_bytes", upload_bytes, minimum=0.0),
    )


def _lognormal(stream: int, seed: int, num_clients: int, median: float, sigma: float):
    """float64[num_clients]: ``median * exp(sigma * z)``, z standard normal.

    Scaling the median (rather than ``rng.lognormal(log(median), sigma)``)
    keeps ``sigma == 0`` exactly at the median: ``exp(0)`` is 1.
    """
    z = np.random.default_rng([stream, seed]).standard_normal(num_clients)
    return median * np.exp(sigma * z)


def lognormal_speeds(
    seed: int,
    num_clients: int,
    download_bytes: float,
    upload_bytes: float,
    *,
    median_seconds_per_example: float = 0.005,
    compute_sigma: float = 0.5,
    median_kbps: float = 10_000.0,
    network_sigma: float = 0.5,
) -> DeviceSpeeds:
    """Log-normal compute and network speeds, independent of each other.

    Client ``i`` takes ``median_seconds_per_example * exp(compute_sigma * z_i)``
    seconds per example and has a link of ``median_kbps * exp(network_sigma *
    w_i)`` kbps, used both ways, with ``z`` and ``w`` independent standard
    normals from two streams keyed by ``seed``. A sigma of 0 gives every
    client exactly the median.

    Args:
      seed: experiment seed (>= 0).
      num_clients: population size (>= 1).
      download_bytes: size of the model a client receives.
      upload_bytes: size of the update it sends back.
      median_seconds_per_example: median compute time per trained example (> 0).
      compute_sigma: log-space standard deviation of compute times (>= 0).
      median_kbps: median link speed, kilobits per second (> 0).
      network_sigma: log-space standard deviation of link speeds (>= 0).

    Returns:
      The population's :class:`DeviceSpeeds`.

    Raises:
      InvalidArgument: naming the argument out of range.
    """
    seed = check_int("seed", seed, minimum=0)
    num_clients = check_int("num_clients", num_clients, minimum=1)
    download_bytes, upload_bytes = _check_bytes(download_bytes, upload_bytes)
    median_seconds_per_example = check_real(
        "median_seconds_per_example", median_seconds_per_example, minimum=0.0, strict_minimum=True
    )
    compute_sigma = check_real("compute_sigma", compute_sigma, minimum=0.0)
    median_kbps = check_real("median_kbps", median_kbps, minimum=0.0, strict_minimum=True)
    network_sigma = check_real("network_sigma", network_sigma, minimum=0.0)
    compute = _lognormal(
        _COMPUTE_STREAM, seed, num_clients, median_seconds_per_example, compute_sigma
    )
    kbps = _lognormal(_NETWORK_STREAM, seed, num_clients, median_kbps, network_sigma)
    return DeviceSpeeds(
        seconds_per_example=compute,
        download_seconds=transfer_seconds(download_bytes, kbps),
        upload_seconds=transfer_seconds(upload_bytes, kbps),
    )


def _trace_assignment(stream: int, seed: int, trace_size: int, num_clients: int) -> np.ndarray:
    """int64[num_clients]: the trace client of each population client.

    A seeded permutation of the trace, cycled: population clients ``i`` and
    ``i + trace_size`` share a trace client when the population is larger
    than the trace; a smaller population takes a random subset of it.
    """
    permutation = np.random.default_rng([stream, seed]).permutation(trace_size)
    return np.resize(permutation, num_clients).astype(np.int64)


def _check_capacity_entry(client_id, entry) -> tuple[float, float]:
    if not isinstance(client_id, Integral) or isinstance(client_id, bool):
        raise InvalidArgument(
            "capacity", f"capacity keys must be int trace client ids, got {client_id!r}"
        )
    try:
        pair = tuple(entry)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise InvalidArgument(
            "capacity",
            f"trace client {client_id}: the entry must be (computation ms per sample, "
            f"communication kbps), got {entry!r}",
        )
    values = []
    for field, value in zip(("computation", "communication"), pair):
        ok = isinstance(value, Real) and not isinstance(value, bool)
        if not (ok and np.isfinite(value) and value > 0):
            raise InvalidArgument(
                "capacity",
                f"trace client {client_id}: {field} must be a finite number > 0, got {value!r}; "
                "fix or drop that entry of the trace",
            )
        values.append(float(value))
    return values[0], values[1]


def speeds_from_capacity(
    capacity: Mapping[int, tuple[float, float]],
    seed: int,
    num_clients: int,
    download_bytes: float,
    upload_bytes: float,
) -> DeviceSpeeds:
    """Speeds from FedScale's device-capacity trace.

    Population client ``i`` takes trace entry ``sorted(capacity)[a[i]]``,
    where ``a`` is a seeded permutation of ``range(len(capacity))`` cycled to
    ``num_clients``: when the population outnumbers the trace, clients ``i``
    and ``i + len(capacity)`` share an entry; when it is smaller, it takes a
    random subset. (FedScale itself maps client ``i`` to entry ``i mod
    len(trace)`` in key order; the permutation keeps a trace sorted by speed
    from making low ids fast.)

    FedScale's ``computation`` is an inference latency; its runtime scales it
    by 3 (``augmentation_factor``) for a training step. This function takes
    it as it is (milliseconds become seconds), so scale the trace if you want
    FedScale's training times.

    Args:
      capacity: trace client id -> (computation milliseconds per sample,
        communication kbps).
      seed: experiment seed (>= 0).
      num_clients: population size (>= 1).
      download_bytes: size of the model a client receives.
      upload_bytes: size of the update it sends back.

    Returns:
      The population's :class:`DeviceSpeeds`.

    Raises:
      InvalidArgument: for an empty trace, or an entry whose computation or
        communication is not a finite positive number (naming the trace
        client id and the field).
    """
    seed = check_int("seed", seed, minimum=0)
    num_clients = check_int("num_clients", num_clients, minimum=1)
    download_bytes, upload_bytes = _check_bytes(download_bytes, upload_bytes)
    if not capacity:
        raise InvalidArgument("capacity", "the device-capacity trace is empty; pass a trace")
    ids = sorted(capacity)
    entries = np.array([_check_capacity_entry(i, capacity[i]) for i in ids], np.float64)
    assignment = _trace_assignment(_CAPACITY_STREAM, seed, len(ids), num_clients)
    kbps = entries[assignment, 1]
    return DeviceSpeeds(
        seconds_per_example=entries[assignment, 0] / 1000.0,
        download_seconds=transfer_seconds(download_bytes, kbps),
        upload_seconds=transfer_seconds(upload_bytes, kbps),
    )


def _check_time(time_seconds) -> float:
    return check_real("time_seconds", time_seconds, minimum=0.0)


class AlwaysAvailable:
    """Every client is online at all times."""

    def __init__(self, num_clients: int):
        self.num_clients = check_int("num_clients", num_clients, minimum=1)

    def online(self, time_seconds: float) -> np.ndarray:
        """bool[num_clients]: all True."""
        _check_time(time_seconds)
        return np.ones(self.num_clients, bool)


class FractionAvailable:
    """Each client is online with probability ``fraction``, redrawn every period.

    Within period ``k = floor(t / period_seconds)`` client ``i`` is online iff
    ``u[i] < fraction``, with ``u`` uniform from the stream of ``(seed, k)``:
    clients are independent of each other and from one period to the next.
    """

    def __init__(
        self, num_clients: int, fraction: float, seed: int, period_seconds: float = 3600.0
    ):
        self.num_clients = check_int("num_clients", num_clients, minimum=1)
        self.fraction = check_real(
            "fraction", fraction, minimum=0.0, maximum=1.0, strict_minimum=True
        )
        self.seed = check_int("seed", seed, minimum=0)
        self.period_seconds = check_real(
            "period_seconds", period_seconds, minimum=0.0, strict_minimum=True
        )

    def online(self, time_seconds: float) -> np.ndarray:
        """bool[num_clients]: who is online at ``time_seconds`` (>= 0)."""
        period = int(_check_time(time_seconds) // self.period_seconds)
        rng = np.random.default_rng([_FRACTION_STREAM, self.seed, period])
        return rng.random(self.num_clients) < self.fraction


class DiurnalAvailability:
    """Each client is online ``online_hours`` a day, starting at its own hour.

    Client ``i`` has a phase ``p[i]`` uniform in ``[0, day_seconds)``, drawn
    from the seed, and is online iff ``(t mod day + p[i]) mod day <
    online_hours * 3600``. So at any time about ``online_hours / 24`` of the
    clients are online (for a 24-hour day), and the pattern repeats every
    ``day_seconds`` exactly (``t mod day`` is taken first, and ``fmod`` is
    exact).
    """

    def __init__(
        self,
        num_clients: int,
        seed: int,
        online_hours: float = 8.0,
        day_seconds: float = 86400.0,
    ):
        self.num_clients = check_int("num_clients", num_clients, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.day_seconds = check_real("day_seconds", day_seconds, minimum=0.0, strict_minimum=True)
        self.online_hours = check_real(
            "online_hours",
            online_hours,
            minimum=0.0,
            maximum=self.day_seconds / 3600.0,
            strict_minimum=True,
        )
        rng = np.random.default_rng([_DIURNAL_STREAM, self.seed])
        self.phase_seconds = rng.uniform(0.0, self.day_seconds, self.num_clients)

    def online(self, time_seconds: float) -> np.ndarray:
        """bool[num_clients]: who is online at ``time_seconds`` (>= 0)."""
        within_day = _check_time(time_seconds) % self.day_seconds
        local = (within_day + self.phase_seconds) % self.day_seconds
        return local < self.online_hours * 3600.0


def _check_intervals(j: int, intervals, period_seconds: float) -> np.ndarray:
    """float64[k, 2] of trace client ``j``: sorted, disjoint, within one period."""
    array = np.asarray(intervals, np.float64)
    if array.size == 0:
        return np.zeros((0, 2), np.float64)
    problem = None
    if array.ndim != 2 or array.shape[1] != 2:
        problem = f"must be float[k, 2] of [start, end) pairs, got shape {array.shape}"
    elif not np.all(np.isfinite(array)):
        problem = "holds a non-finite time"
    elif np.any(array[:, 0] > array[:, 1]):
        problem = "has an interval whose end precedes its start"
    elif np.any(array[1:, 0] < array[:-1, 1]):
        problem = "has intervals out of order or overlapping"
    elif array[0, 0] < 0 or array[-1, 1] > period_seconds:
        problem = f"leaves the period [0, {period_seconds}]"
    if problem:
        raise InvalidArgument(
            "intervals",
            f"intervals[{j}] (trace client {j}) {problem}; give sorted, disjoint [start, end) "
            "online intervals within one period",
        )
    return array


class TraceAvailability:
    """Availability from a trace of online intervals that repeats every period.

    ``intervals[j]`` holds trace client ``j``'s ``[start, end)`` online
    intervals within one period. Population client ``i`` follows trace client
    ``a[i]``, with ``a`` a seeded permutation of the trace cycled to
    ``num_clients`` (as in :func:`speeds_from_capacity`), and is online at
    ``t`` iff ``t mod period_seconds`` falls in one of its intervals.

    Every interval of the trace is tested at each call (one vectorised pass,
    about a millisecond per million intervals) rather than looping over
    clients.
    """

    def __init__(
        self,
        intervals: Sequence[np.ndarray],
        period_seconds: float,
        seed: int,
        num_clients: int,
    ):
        self.period_seconds = check_real(
            "period_seconds", period_seconds, minimum=0.0, strict_minimum=True
        )
        self.seed = check_int("seed", seed, minimum=0)
        self.num_clients = check_int("num_clients", num_clients, minimum=1)
        if len(intervals) == 0:
            raise InvalidArgument("intervals", "the behaviour trace is empty; pass a trace")
        checked = [_check_intervals(j, x, self.period_seconds) for j, x in enumerate(intervals)]
        self.trace_size = len(checked)
        # Flattened intervals and the trace client each belongs to.
        self._starts = np.concatenate([x[:, 0] for x in checked])
        self._ends = np.concatenate([x[:, 1] for x in checked])
        counts = [len(x) for x in checked]
        self._owners = np.repeat(np.arange(self.trace_size), counts)
        self.assignment = _trace_assignment(
            _TRACE_STREAM, self.seed, self.trace_size, self.num_clients
        )

    def online(self, time_seconds: float) -> np.ndarray:
        """bool[num_clients]: who is online at ``time_seconds`` (>= 0)."""
        within = _check_time(time_seconds) % self.period_seconds
        hits = (self._starts <= within) & (within < self._ends)
        trace_online = np.zeros(self.trace_size, bool)
        trace_online[self._owners[hits]] = True
        return trace_online[self.assignment]
