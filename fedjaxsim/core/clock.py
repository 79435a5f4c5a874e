"""A simulated clock of client devices: who is online, who finishes, and when.

Pure NumPy on the host, deterministic from the seed. The device never sees
time: it gets a cohort and, per client, a step budget (how many local steps
to run), a weight (0 for a client that does not count) and, under
asynchrony, the server version a client started from (``ClientSchedule`` of
``fedjaxsim.core.engine``). So a run under deadlines compiles no more shapes
than one without.

A client's work in a round is download, then its local steps one after
another (each ``examples x seconds_per_example``), then upload
(:class:`~fedjaxsim.core.devices.DeviceSpeeds`).

* :func:`plan_sync_round`: one synchronous round with over-selection, a
  deadline, and clients that drop out mid-round.
* :class:`BufferedSchedule`: the event queue of buffered asynchronous
  aggregation (FedBuff): ``concurrency`` clients in flight, a server step
  whenever ``buffer_size`` updates have arrived.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, NamedTuple

import numpy as np

from fedjaxsim.core.devices import DeviceSpeeds
from fedjaxsim.core.packing import PackingConfig
from fedjaxsim.core.sampling import sample_uniform

_DROPOUT_STREAM = 0xD20B_0C17  # whether, and when, a client drops out
LATE_CLIENTS = ("drop", "partial")
# With free slots and nobody online, the asynchronous server looks again this
# much later (simulated seconds).
RETRY_SECONDS = 60.0
MAX_IDLE_RETRIES = 100_000


def step_examples(num_examples: int, packing: PackingConfig) -> np.ndarray:
    """int64[steps]: the real examples in each of a client's local steps.

    Each epoch is full batches, then the partial batch that closes it
    (``fedjaxsim.core.packing.client_step_indices``), cut at ``max_steps``.
    """
    per_epoch = math.ceil(num_examples / packing.batch_size)
    epoch = np.full(per_epoch, packing.batch_size, np.int64)
    epoch[-1] = num_examples - (per_epoch - 1) * packing.batch_size
    return np.tile(epoch, packing.num_epochs)[: packing.steps_for(num_examples)]


def select_online(
    seed: int, round_index: int, online: np.ndarray, count: int, busy: np.ndarray | None = None
) -> np.ndarray:
    """Up to ``count`` distinct clients drawn uniformly from the online, idle ones.

    With everyone online and idle this is ``sample_uniform(seed, round_index,
    population, count)`` exactly, so a clock that never binds samples the
    cohorts of a run without one.

    Args:
      online: bool[population]; busy: optional bool[population] (in flight).

    Returns:
      int64[k], ``k = min(count, online and idle)``, sorted.
    """
    candidates = np.flatnonzero(online)
    busy_count = 0 if busy is None else int(np.sum(busy[candidates]))
    draw = min(count + busy_count, len(candidates))
    if draw == 0:
        return np.zeros((0,), np.int64)
    picked = candidates[sample_uniform(seed, round_index, len(candidates), draw)]
    if busy is not None:
        picked = picked[~busy[picked]]
    return picked[:count].astype(np.int64)


class SyncRoundPlan(NamedTuple):
    """What the clock decides for one synchronous round (cohort order)."""

    step_budget: np.ndarray  # int32[n]: local steps each selected client runs
    counts: np.ndarray  # bool[n]: its update reaches the server and is used
    partial: np.ndarray  # bool[n]: counts with fewer steps than its full work
    dropped_out: np.ndarray  # bool[n]: the device vanished mid-round
    duration_seconds: float  # from the round's start until the server closes it


def _dropouts(seed: int, stream_index: int, client_ids: np.ndarray, rate: float, population: int):
    """``(drops bool[n], at float64[n])``: who drops out, at what fraction of its work."""
    rng = np.random.default_rng([_DROPOUT_STREAM, seed, stream_index])
    draws = rng.random((2, population))  # per population client: stable under reordering
    return draws[0, client_ids] < rate, draws[1, client_ids]


def plan_sync_round(
    *,
    seed: int,
    round_index: int,
    client_ids: np.ndarray,
    work: list[np.ndarray],
    speeds: DeviceSpeeds,
    cohort_size: int,
    deadline_seconds: float | None = None,
    late_clients: str = "drop",
    dropout_rate: float = 0.0,
) -> SyncRoundPlan:
    """Plans one synchronous round of the selected (possibly over-selected) clients.

    A client finishes at download + its steps + upload after the round
    starts. One that drops out (probability ``dropout_rate``, at a uniform
    point of its work) sends nothing. One that would finish after the
    deadline sends nothing (``late_clients="drop"``) or, with ``"partial"``,
    the steps it completed in time, uploaded by the deadline (nothing if
    none). Of the clients whose update arrives, the first ``cohort_size``
    count (over-selection keeps the fastest). The server closes the round
    when the ``cohort_size``-th update arrives, or else when every selected
    client has reported or dropped out, and at the latest at the deadline.

    Args:
      client_ids: int64[n], the selected clients.
      work: per selected client, :func:`step_examples` of its data.
      speeds: the population's device speeds.

    Returns:
      The :class:`SyncRoundPlan`.
    """
    if late_clients not in LATE_CLIENTS:
        raise ValueError(f"late_clients must be one of {LATE_CLIENTS}, got {late_clients!r}")
    client_ids = np.asarray(client_ids, np.int64)
    n = len(client_ids)
    population = len(speeds.seconds_per_example)
    download = speeds.download_seconds[client_ids]
    upload = speeds.upload_seconds[client_ids]
    # Seconds from the round's start to the end of each local step.
    step_ends = [
        download[i] + np.cumsum(work[i] * speeds.seconds_per_example[client_ids[i]])
        for i in range(n)
    ]
    full_steps = np.array([len(w) for w in work], np.int32)
    finish = np.array([ends[-1] if len(ends) else download[i] for i, ends in enumerate(step_ends)])
    finish = finish + upload
    drops, at = _dropouts(seed, round_index, client_ids, dropout_rate, population)
    budget = full_steps.copy()
    arrival = finish.copy()
    if deadline_seconds is not None:
        late = finish > deadline_seconds
        if late_clients == "partial":
            # Steps whose end leaves time to upload before the deadline.
            budget = np.array(
                [
                    np.searchsorted(step_ends[i], deadline_seconds - upload[i], side="right")
                    if late[i]
                    else full_steps[i]
                    for i in range(n)
                ],
                np.int32,
            )
            arrival = np.where(late, deadline_seconds, finish)
        else:
            budget = np.where(late, 0, budget)
    arrives = ~drops & (budget > 0)
    order = np.lexsort((np.arange(n), arrival))  # by arrival time, ties in cohort order
    counted = order[arrives[order]][:cohort_size]
    counts = np.zeros(n, bool)
    counts[counted] = True
    ends = np.concatenate([arrival[arrives], (at * finish)[drops]])
    if len(counted) == cohort_size:
        duration = float(arrival[counted[-1]])
    else:
        duration = float(ends.max()) if len(ends) else 0.0
    if deadline_seconds is not None:
        duration = min(duration, float(deadline_seconds))
    return SyncRoundPlan(
        step_budget=np.where(counts, budget, 0).astype(np.int32),
        counts=counts,
        partial=counts & (budget < full_steps),
        dropped_out=drops,
        duration_seconds=duration,
    )


class BufferedStep(NamedTuple):
    """The clients of one asynchronous server step, in dispatch order."""

    client_ids: np.ndarray  # int64[k]: the buffer (k = buffer_size)
    versions: np.ndarray  # int32[k]: server version each client started from
    step_budget: np.ndarray  # int32[k]: local steps each ran
    time_seconds: float  # simulated time of the step
    dropped_clients: int  # dropouts and discarded stale updates since the last step
    arrived_clients: int  # updates that arrived since the last step (the buffer)


class _Flight(NamedTuple):
    finish_seconds: float
    sequence: int  # dispatch order: breaks ties in time
    client_id: int
    version: int
    num_steps: int
    drops: bool  # vanishes at finish_seconds instead of reporting


class BufferedSchedule:
    """The event queue of FedBuff (Nguyen et al. 2022), on the simulated clock.

    ``concurrency`` clients train at once, each from the server version of
    the moment it was dispatched. When one reports, its update enters the
    buffer and its slot is refilled (with the version current after the
    reports of that instant, so clients reporting together see the same
    version); every ``buffer_size`` updates the server steps. A client drops
    out with probability ``dropout_rate`` (its slot frees at that moment);
    an update more than ``max_staleness`` versions old is discarded. Dispatch
    events are numbered, and event ``d`` samples with ``select_online(seed,
    d, ...)``: with ``concurrency == buffer_size`` and clients that all take
    the same time, step ``v`` trains exactly the cohort that round ``v`` of a
    synchronous run trains.

    Iterating from the start is the only way to reach a step, which is what
    makes a resumed run's schedule the one of the run it continues (the
    runner replays the steps before its checkpoint; no training is done).
    """

    def __init__(
        self,
        *,
        seed: int,
        speeds: DeviceSpeeds,
        availability,
        work_of: Callable[[int], np.ndarray],
        concurrency: int,
        buffer_size: int,
        max_staleness: int,
        dropout_rate: float = 0.0,
    ):
        if buffer_size > concurrency:
            raise ValueError(
                f"buffer_size={buffer_size} exceeds concurrency={concurrency}: the buffer "
                "could never fill; lower asynchrony.buffer_size or raise asynchrony.concurrency"
            )
        self.seed, self.speeds, self.availability = seed, speeds, availability
        self.work_of = work_of
        self.concurrency, self.buffer_size = concurrency, buffer_size
        self.max_staleness, self.dropout_rate = max_staleness, dropout_rate
        self.population = len(speeds.seconds_per_example)
        self.time = 0.0
        self.version = 0
        self.dispatches = 0
        self.sequence = 0
        self.queue: list[_Flight] = []
        self.busy = np.zeros(self.population, bool)

    def _duration(self, client_id: int, work: np.ndarray) -> float:
        speeds = self.speeds
        compute = float(np.sum(work) * speeds.seconds_per_example[client_id])
        return speeds.download_seconds[client_id] + compute + speeds.upload_seconds[client_id]

    def _dispatch(self) -> None:
        """Fills the free slots with online, idle clients, at the current version."""
        free = self.concurrency - len(self.queue)
        if free <= 0:
            return
        online = self.availability.online(self.time)
        ids = select_online(self.seed, self.dispatches, online, free, self.busy)
        drops, at = _dropouts(self.seed, self.dispatches, ids, self.dropout_rate, self.population)
        self.dispatches += 1
        for client_id, drop, fraction in zip(ids.tolist(), drops, at):
            work = self.work_of(client_id)
            duration = self._duration(client_id, work)
            end = self.time + (fraction * duration if drop else duration)
            flight = _Flight(end, self.sequence, client_id, self.version, len(work), bool(drop))
            heapq.heappush(self.queue, flight)
            self.busy[client_id] = True
            self.sequence += 1

    def next_step(self) -> BufferedStep:
        """Runs the clock to the next server step and returns its buffer."""
        buffer: list[_Flight] = []
        dropped = 0
        idle = 0
        self._dispatch()
        while True:
            if not self.queue:  # nobody in flight and nobody was online
                idle += 1
                if idle > MAX_IDLE_RETRIES:
                    raise RuntimeError(
                        f"no client came online in {idle * RETRY_SECONDS / 3600:.0f} simulated "
                        "hours; check system.availability"
                    )
                self.time += RETRY_SECONDS
                self._dispatch()
                continue
            now = self.queue[0].finish_seconds
            self.time = max(self.time, now)
            while self.queue and self.queue[0].finish_seconds == now:
                flight = heapq.heappop(self.queue)
                if flight.drops or self.version - flight.version > self.max_staleness:
                    self.busy[flight.client_id] = False
                    dropped += 1
                else:  # busy until the server step: one update per client per buffer
                    buffer.append(flight)
                if len(buffer) == self.buffer_size:
                    return self._step(buffer, dropped)
            self._dispatch()

    def _step(self, buffer: list[_Flight], dropped: int) -> BufferedStep:
        buffer = sorted(buffer, key=lambda flight: flight.sequence)
        step = BufferedStep(
            client_ids=np.array([f.client_id for f in buffer], np.int64),
            versions=np.array([f.version for f in buffer], np.int32),
            step_budget=np.array([f.num_steps for f in buffer], np.int32),
            time_seconds=self.time,
            dropped_clients=dropped,
            arrived_clients=len(buffer),
        )
        self.busy[step.client_ids] = False
        self.version += 1
        # Same-instant reports not yet popped stay queued for the next step;
        # the freed slots are refilled at the new version.
        self._dispatch()
        return step
