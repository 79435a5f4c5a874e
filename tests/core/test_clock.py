"""The simulated clock: synchronous rounds under a deadline and FedBuff's event queue.

References are loops written from the definitions in ``core/clock.py``'s
docstrings; random inputs are drawn here, never hard-coded.
"""

import numpy as np
import pytest

from fedjaxsim.core import clock
from fedjaxsim.core.devices import AlwaysAvailable, DeviceSpeeds
from fedjaxsim.core.packing import PackingConfig, client_step_indices
from fedjaxsim.core.sampling import sample_uniform


@pytest.mark.parametrize("size", [1, 7, 20, 41])
@pytest.mark.parametrize("epochs, max_steps", [(1, None), (3, None), (2, 3)])
def test_step_examples_count_the_packed_steps(size, epochs, max_steps):
    packing = PackingConfig(batch_size=10, num_epochs=epochs, max_steps=max_steps)
    slots = client_step_indices(size, packing, seed=0, round_index=0, client_id=0)
    np.testing.assert_array_equal(clock.step_examples(size, packing), np.sum(slots >= 0, axis=1))


def test_selection_is_the_uniform_sampler_when_everyone_is_online():
    online = np.ones(50, bool)
    for round_index in range(5):
        np.testing.assert_array_equal(
            clock.select_online(3, round_index, online, 8), sample_uniform(3, round_index, 50, 8)
        )


def test_selection_takes_only_online_idle_clients():
    rng = np.random.default_rng(0)
    online = rng.random(200) < 0.3
    busy = rng.random(200) < 0.2
    picked = clock.select_online(1, 4, online, 25, busy)
    assert len(picked) == min(25, int(np.sum(online & ~busy)))
    assert online[picked].all() and not busy[picked].any()
    assert len(np.unique(picked)) == len(picked)
    assert len(clock.select_online(1, 4, np.zeros(200, bool), 5)) == 0


def _reference_plan(work, spe, download, upload, cohort, deadline, late, drops, at):
    """The round of plan_sync_round's docstring, client by client."""
    n = len(work)
    budget, arrival, arrives, finish = [], [], [], []
    for i in range(n):
        t, ends = download[i], []
        for examples in work[i]:
            t += examples * spe[i]
            ends.append(t)
        done = (ends[-1] if ends else download[i]) + upload[i]
        steps, arrive = len(work[i]), done
        if deadline is not None and done > deadline:
            if late == "drop":
                steps = 0
            else:
                steps = sum(1 for end in ends if end + upload[i] <= deadline)
                arrive = deadline
        budget.append(steps)
        arrival.append(arrive)
        finish.append(done)
        arrives.append(not drops[i] and steps > 0)
    counted = sorted((i for i in range(n) if arrives[i]), key=lambda i: (arrival[i], i))[:cohort]
    if len(counted) == cohort:
        duration = arrival[counted[-1]]
    else:
        ends = [arrival[i] for i in range(n) if arrives[i]]
        ends += [at[i] * finish[i] for i in range(n) if drops[i]]
        duration = max(ends) if ends else 0.0
    if deadline is not None:
        duration = min(duration, deadline)
    counts = [i in counted for i in range(n)]
    return [budget[i] if counts[i] else 0 for i in range(n)], counts, duration


@pytest.mark.parametrize("trial", range(12))
def test_a_sync_round_matches_the_loop_reference(trial):
    rng = np.random.default_rng(trial)
    population, selected, cohort = 40, 9, 6
    speeds = DeviceSpeeds(
        seconds_per_example=rng.lognormal(np.log(0.01), 0.8, population),
        download_seconds=rng.lognormal(np.log(2.0), 0.5, population),
        upload_seconds=rng.lognormal(np.log(3.0), 0.5, population),
    )
    packing = PackingConfig(batch_size=8, num_epochs=2)
    ids = np.sort(rng.choice(population, selected, replace=False))
    work = [clock.step_examples(int(rng.integers(1, 60)), packing) for _ in ids]
    deadline = [None, 8.0, 12.0][trial % 3]
    late = ["drop", "partial"][(trial // 3) % 2]
    rate = [0.0, 0.3][trial // 6]
    plan = clock.plan_sync_round(
        seed=trial,
        round_index=2,
        client_ids=ids,
        work=work,
        speeds=speeds,
        cohort_size=cohort,
        deadline_seconds=deadline,
        late_clients=late,
        dropout_rate=rate,
    )
    drops, at = clock._dropouts(trial, 2, ids, rate, population)
    budget, counts, duration = _reference_plan(
        work,
        speeds.seconds_per_example[ids],
        speeds.download_seconds[ids],
        speeds.upload_seconds[ids],
        cohort,
        deadline,
        late,
        drops,
        at,
    )
    np.testing.assert_array_equal(plan.step_budget, budget)
    np.testing.assert_array_equal(plan.counts, counts)
    np.testing.assert_array_equal(plan.dropped_out, drops)
    assert plan.duration_seconds == pytest.approx(duration, rel=1e-12)
    full = np.array([len(w) for w in work])
    np.testing.assert_array_equal(plan.partial, plan.counts & (plan.step_budget < full))
    assert np.sum(plan.counts) <= cohort


def _equal_speeds(population, spe=0.01, transfer=1.0):
    return DeviceSpeeds(
        np.full(population, spe), np.full(population, transfer), np.full(population, transfer)
    )


def test_fedbuff_with_concurrency_equal_to_buffer_and_equal_clients_is_synchronous():
    population, k = 30, 5
    queue = clock.BufferedSchedule(
        seed=4,
        speeds=_equal_speeds(population),
        availability=AlwaysAvailable(population),
        work_of=lambda client: np.full(3, 10),
        concurrency=k,
        buffer_size=k,
        max_staleness=2,
    )
    for version in range(6):
        step = queue.next_step()
        np.testing.assert_array_equal(step.client_ids, sample_uniform(4, version, population, k))
        np.testing.assert_array_equal(step.versions, version)
        assert step.time_seconds == pytest.approx((version + 1) * (2.0 + 0.3))
        assert step.arrived_clients == k and step.dropped_clients == 0


def _run_queue(seed, steps, **overrides):
    population = 60
    rng = np.random.default_rng(99)
    settings = dict(
        seed=seed,
        speeds=DeviceSpeeds(
            rng.lognormal(np.log(0.01), 1.0, population),
            rng.lognormal(0.0, 0.5, population),
            rng.lognormal(0.0, 0.5, population),
        ),
        availability=AlwaysAvailable(population),
        work_of=lambda client: np.full(1 + client % 7, 10),
        concurrency=20,
        buffer_size=4,
        max_staleness=6,
        dropout_rate=0.1,
    )
    settings.update(overrides)
    queue = clock.BufferedSchedule(**settings)
    return [queue.next_step() for _ in range(steps)]


def test_fedbuff_steps_are_deterministic_bounded_in_staleness_and_in_time_order():
    first, second = _run_queue(1, 40), _run_queue(1, 40)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.client_ids, b.client_ids)
        np.testing.assert_array_equal(a.versions, b.versions)
        assert a.time_seconds == b.time_seconds
    times = [step.time_seconds for step in first]
    assert times == sorted(times)
    staleness = np.concatenate([v - step.versions for v, step in enumerate(first)])
    assert staleness.min() >= 0 and staleness.max() <= 6
    assert staleness.max() > 0  # with 20 in flight and buffers of 4, updates are stale
    for step in first:
        assert len(np.unique(step.client_ids)) == len(step.client_ids) == 4
        np.testing.assert_array_equal(step.step_budget, 1 + step.client_ids % 7)
    assert sum(step.dropped_clients for step in first) > 0
    other = _run_queue(2, 40)
    assert any(not np.array_equal(a.client_ids, b.client_ids) for a, b in zip(first, other))


def test_fedbuff_refuses_a_buffer_larger_than_concurrency():
    with pytest.raises(ValueError, match="buffer_size=8 exceeds concurrency=4"):
        _run_queue(0, 1, concurrency=4, buffer_size=8)
