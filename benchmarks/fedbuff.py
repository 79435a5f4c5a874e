"""What FedBuff costs over synchronous rounds, and what its concurrency costs the host.

For buffer size K, one JSON line per concurrency M with, measured in the same run:

* ``sync_round_s``: median steady-state time of a synchronous round of K clients;
* ``buffered_step_s``: median steady-state time of a FedBuff server step (K stale
  clients, each gathering its version from the ring on the device), and the
  ratio ``buffered_step_s / sync_round_s``;
* ``sync_compile_s`` / ``buffered_compile_s``: first call minus steady state;
* ``queue_step_s``: host time of the event queue per server step (sampling,
  speeds, the heap), which is what grows with M;
* ``mean_staleness``: the staleness the queue produced.

Example: ``python benchmarks/fedbuff.py --model dense --buffer 10 --concurrency 10,100,1000``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emnist_lookalike import NUM_CLASSES, EmnistLookalike  # noqa: E402

from fedjaxsim.algorithms.fed_avg import fed_avg  # noqa: E402
from fedjaxsim.algorithms.fed_buff import polynomial_staleness  # noqa: E402
from fedjaxsim.core import clock, devices  # noqa: E402
from fedjaxsim.core.engine import (  # noqa: E402
    ClientSchedule,
    build_buffered_round,
    build_round,
    init_buffered,
)
from fedjaxsim.core.packing import PackingConfig, default_num_lanes, pack_cohort  # noqa: E402
from fedjaxsim.models import classification_loss, get_model  # noqa: E402
from fedjaxsim.runner.platform import configure_xla_cpu  # noqa: E402


def _timed(fn, *args):
    tic = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - tic


def run(model_name: str, buffer_size: int, concurrency: int, steps: int, seed: int = 0) -> dict:
    population = EmnistLookalike()
    num_clients = population.num_clients
    packing = PackingConfig(batch_size=20, step_bucket="geometric", max_steps=8)
    sizes = population.sizes
    speeds = devices.lognormal_speeds(seed, num_clients, 4_000_000, 4_000_000)
    queue = clock.BufferedSchedule(
        seed=seed,
        speeds=speeds,
        availability=devices.AlwaysAvailable(num_clients),
        work_of=lambda client: clock.step_examples(int(sizes[client]), packing),
        concurrency=concurrency,
        buffer_size=buffer_size,
        max_staleness=4 * -(-concurrency // buffer_size),
    )
    tic = time.perf_counter()
    plan = [queue.next_step() for _ in range(steps)]
    queue_step_s = (time.perf_counter() - tic) / steps

    model = get_model(model_name, NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    algorithm = fed_avg(classification_loss(model), optax.sgd(0.1), optax.sgd(1.0))
    round_fn = build_round(algorithm)
    step_fn = build_buffered_round(algorithm, staleness_weight=polynomial_staleness())
    lanes = default_num_lanes()
    # One step count for every cohort, so each form compiles once: the most a
    # lane can hold when the buffer's clients share the lanes.
    num_steps = packing.bucket(-(-buffer_size // (lanes or buffer_size)) * packing.max_steps)

    def cohort(index, ids):
        clients = []
        for client_id in ids:
            pixels, labels = population.client(int(client_id))
            clients.append({"x": pixels, "y": labels})
        packed = pack_cohort(
            clients,
            ids,
            packing,
            seed=seed,
            round_index=index,
            num_total_clients=num_clients,
            num_lanes=lanes,
            num_steps=num_steps,
        )
        return jax.device_put(packed)

    cohorts = [cohort(i, step.client_ids) for i, step in enumerate(plan)]
    state = algorithm.init(params)
    buffered = init_buffered(algorithm, state, queue.max_staleness + 1)
    sync_times, step_times = [], []
    for index, (step, packed) in enumerate(zip(plan, cohorts)):
        rng = jax.random.key(index)
        (state, _), sync_s = _timed(round_fn, state, packed, rng)
        schedule = ClientSchedule(step_budget=step.step_budget, version=step.versions)
        (buffered, _), step_s = _timed(step_fn, buffered, packed, rng, (), schedule)
        sync_times.append(sync_s)
        step_times.append(step_s)
    sync_steady = statistics.median(sync_times[1:])
    step_steady = statistics.median(step_times[1:])
    staleness = np.concatenate([i - s.versions for i, s in enumerate(plan)])
    return {
        "model": model_name,
        "buffer_size": buffer_size,
        "concurrency": concurrency,
        "steps": steps,
        "sync_round_s": sync_steady,
        "buffered_step_s": step_steady,
        "buffered_over_sync": step_steady / sync_steady,
        "sync_compile_s": sync_times[0] - sync_steady,
        "buffered_compile_s": step_times[0] - step_steady,
        "queue_step_s": queue_step_s,
        "mean_staleness": float(np.mean(staleness)),
        "backend": jax.default_backend(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dense")
    parser.add_argument("--buffer", type=int, default=10)
    parser.add_argument("--concurrency", default="10,100,1000")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    configure_xla_cpu()
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        print(json.dumps(run(args.model, args.buffer, concurrency, args.steps)), flush=True)


if __name__ == "__main__":
    main()
