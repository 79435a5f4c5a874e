"""The run's simulated devices: speeds and availability from the config, and the clocks.

:class:`SyncClock` plans the synchronous rounds one after another
(``core/clock.py``); :func:`buffered_schedule` builds FedBuff's event queue.
Both are pure functions of the config and the seed, so a resumed run replays
the plans of the rounds before its checkpoint (host arithmetic only) and
continues on the same clock.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from fedjaxsim.core import clock, devices
from fedjaxsim.core.engine import ClientSchedule
from fedjaxsim.core.packing import PackingConfig


def model_bytes(params) -> int:
    """Bytes of the model a client downloads (and of the update it uploads)."""
    return int(
        sum(np.dtype(leaf.dtype).itemsize * np.size(leaf) for leaf in jax.tree.leaves(params))
    )


def build_speeds(system, seed: int, population: int, num_bytes: int) -> devices.DeviceSpeeds:
    """The population's device speeds under ``system.speed`` (zeros without a clock)."""
    if system.speed == "none":
        zeros = np.zeros(population)
        return devices.DeviceSpeeds(zeros, zeros, zeros)
    if system.speed in ("lognormal", "constant"):
        constant = system.speed == "constant"
        return devices.lognormal_speeds(
            seed,
            population,
            num_bytes,
            num_bytes,
            median_seconds_per_example=system.seconds_per_example,
            compute_sigma=0.0 if constant else system.compute_sigma,
            median_kbps=system.kbps,
            network_sigma=0.0 if constant else system.network_sigma,
        )
    from fedjaxsim.data.device_traces import read_device_capacity

    capacity = read_device_capacity(system.speed)
    return devices.speeds_from_capacity(capacity, seed, population, num_bytes, num_bytes)


def build_availability(system, seed: int, population: int):
    """The population's availability under ``system.availability``."""
    if system.availability == "always":
        return devices.AlwaysAvailable(population)
    if system.availability == "fraction":
        return devices.FractionAvailable(population, system.online_fraction, seed)
    if system.availability == "diurnal":
        return devices.DiurnalAvailability(population, seed, online_hours=system.online_hours)
    from fedjaxsim.data.device_traces import read_behaviour_trace

    intervals, period = read_behaviour_trace(system.availability)
    return devices.TraceAvailability(intervals, period, seed, population)


class HostSchedule(NamedTuple):
    """A round's schedule on the host, padded to the packed cohort's clients."""

    step_budget: np.ndarray  # int32[num_clients]: local steps each client runs
    counts: np.ndarray | None = None  # bool[num_clients]: keeps its weight (synchronous)
    version: np.ndarray | None = None  # int32[num_clients]: version started from (FedBuff)

    def device(self) -> ClientSchedule:
        return ClientSchedule(step_budget=self.step_budget, version=self.version)


class PlannedRound(NamedTuple):
    """A synchronous round on the clock."""

    client_ids: np.ndarray  # int64[n]: the selected clients
    plan: clock.SyncRoundPlan
    start_seconds: float  # simulated time at the round's start
    num_online: int  # clients online at the start

    def record(self, clocked: bool) -> dict:
        """The round's line of metrics.jsonl, for the system's part."""
        plan = self.plan
        record = {
            "arrived_clients": int(np.sum(plan.counts)),
            "dropped_clients": int(np.sum(~plan.counts)),
            "partial_clients": int(np.sum(plan.partial)),
        }
        if clocked:
            record["simulated_seconds"] = self.start_seconds + plan.duration_seconds
            record["round_simulated_seconds"] = plan.duration_seconds
            record["online_clients"] = self.num_online
        return record


class SyncClock:
    """Plans synchronous rounds in order, carrying the simulated time from round to round."""

    def __init__(self, config, num_examples: np.ndarray, packing: PackingConfig, num_bytes: int):
        system = config.system
        self.config, self.system, self.packing = config, system, packing
        self.num_examples = np.asarray(num_examples)
        population = len(self.num_examples)
        self.speeds = build_speeds(system, config.seed, population, num_bytes)
        self.availability = build_availability(system, config.seed, population)
        self.num_selected = system.num_selected(config.training.cohort_size)
        self.time = 0.0
        self.next_round = 0

    def plan(self, round_index: int, sample) -> PlannedRound:
        """Plans ``round_index``, which must be the next round; ``sample(round_index)``
        gives the cohort when every client is online and nothing is over-selected."""
        if round_index != self.next_round:
            raise ValueError(f"rounds are planned in order: expected {self.next_round}")
        online = self.availability.online(self.time)
        if (
            self.system.availability == "always"
            and self.num_selected == self.config.training.cohort_size
        ):
            ids = sample(round_index)
        else:
            ids = clock.select_online(self.config.seed, round_index, online, self.num_selected)
        work = [clock.step_examples(int(self.num_examples[i]), self.packing) for i in ids]
        plan = clock.plan_sync_round(
            seed=self.config.seed,
            round_index=round_index,
            client_ids=ids,
            work=work,
            speeds=self.speeds,
            cohort_size=self.config.training.cohort_size,
            deadline_seconds=self.system.deadline_seconds,
            late_clients=self.system.late_clients,
            dropout_rate=self.system.dropout_rate,
        )
        planned = PlannedRound(ids, plan, self.time, int(np.sum(online)))
        if not ids.size:  # nobody online: the server waits and tries again
            plan = plan._replace(duration_seconds=clock.RETRY_SECONDS)
            planned = planned._replace(plan=plan)
        self.time += planned.plan.duration_seconds
        self.next_round += 1
        return planned


def buffered_schedule(config, num_examples: np.ndarray, packing: PackingConfig, num_bytes: int):
    """FedBuff's event queue for the resolved config."""
    system, asynchrony = config.system, config.asynchrony
    population = len(num_examples)
    return clock.BufferedSchedule(
        seed=config.seed,
        speeds=build_speeds(system, config.seed, population, num_bytes),
        availability=build_availability(system, config.seed, population),
        work_of=lambda client: clock.step_examples(int(num_examples[client]), packing),
        concurrency=asynchrony.concurrency,
        buffer_size=asynchrony.buffer_size,
        max_staleness=asynchrony.max_staleness,
        dropout_rate=system.dropout_rate,
    )


def ring_size(config) -> int:
    return config.asynchrony.max_staleness + 1


def _padded(values: np.ndarray, size: int, dtype) -> np.ndarray:
    out = np.zeros(size, dtype)
    out[: len(values)] = values
    return out


def round_scheduler(
    config, num_examples, packing: PackingConfig, num_bytes: int, start_round: int, sample
):
    """``schedule(round_index) -> (client_ids, HostSchedule | None, metrics)`` for the run.

    Without system effects it is ``(sample(round_index), None, {})``. With
    them, the clock's rounds (or FedBuff's server steps) before
    ``start_round`` are replayed first, so a resumed run continues on the
    clock of the run it continues. Rounds must then be asked for in order.
    """
    if config.asynchrony.buffered:
        queue = buffered_schedule(config, num_examples, packing, num_bytes)
        for _ in range(start_round):
            queue.next_step()

        def buffered_round(round_index):
            step = queue.next_step()
            staleness = round_index - step.versions
            schedule = HostSchedule(step.step_budget, version=step.versions)
            record = {
                "simulated_seconds": step.time_seconds,
                "mean_staleness": float(np.mean(staleness)),
                "max_staleness": int(np.max(staleness)),
                "dropped_clients": step.dropped_clients,
                "arrived_clients": step.arrived_clients,
            }
            return step.client_ids, schedule, record

        return buffered_round
    if not config.system.enabled:
        return lambda round_index: (sample(round_index), None, {})
    sync_clock = SyncClock(config, num_examples, packing, num_bytes)
    for round_index in range(start_round):
        sync_clock.plan(round_index, sample)
    size = sync_clock.num_selected

    def sync_round(round_index):
        planned = sync_clock.plan(round_index, sample)
        plan = planned.plan
        schedule = HostSchedule(
            _padded(plan.step_budget, size, np.int32), counts=_padded(plan.counts, size, bool)
        )
        return planned.client_ids, schedule, planned.record(config.system.clocked)

    return sync_round
