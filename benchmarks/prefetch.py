"""How much of a round is exposed packing and host-to-device transfer.

The runner prepares round r+1 (sample, gather, pack, ``device_put``) in a
worker thread while round r trains (``fedjaxsim.runner.prefetch``). This
benchmark drives the same generator over the EMNIST look-alike (uint8 pixels
held in memory, as a memory-mapped store would serve them) and reports per
configuration, as one JSON line:

* ``pack_s``: median time to prepare a round (in the worker);
* ``compute_s``: median time of the jitted round itself;
* ``exposed_s`` / ``exposed_fraction``: median wait for the prepared round, and
  its share of the round time (wait + compute);
* the same round time with preparation done synchronously (``ahead=False``),
  measured in the same run, and the ratio ``sync_round_s / round_s``.

Example: ``python benchmarks/prefetch.py --model logreg --cohort 10,100,1000``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emnist_lookalike import NUM_CLASSES, EmnistLookalike  # noqa: E402

from fedjaxsim.algorithms.fed_avg import fed_sgd_avg  # noqa: E402
from fedjaxsim.core.engine import build_round, default_plan  # noqa: E402
from fedjaxsim.core.packing import PackingConfig, default_num_lanes, pack_cohort  # noqa: E402
from fedjaxsim.core.sampling import sample_uniform  # noqa: E402
from fedjaxsim.models import classification_loss, get_model  # noqa: E402
from fedjaxsim.runner.platform import configure_xla_cpu  # noqa: E402
from fedjaxsim.runner.prefetch import prefetch_rounds  # noqa: E402


def run(model_name: str, cohort_size: int, rounds: int, seed: int = 0) -> dict:
    population = EmnistLookalike()
    sampled = [sample_uniform(seed, r, population.num_clients, cohort_size) for r in range(rounds)]
    clients = {}
    for ids in sampled:  # generated before timing: the store's role
        for client_id in ids:
            if int(client_id) not in clients:
                pixels, labels = population.client(int(client_id))
                clients[int(client_id)] = {"x": np.round(pixels * 255).astype(np.uint8), "y": labels}
    plan = default_plan()
    model = get_model(model_name, NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    algorithm = fed_sgd_avg(classification_loss(model), client_learning_rate=0.1, server_learning_rate=1.0)
    round_fn = build_round(algorithm, plan)
    packing = PackingConfig(batch_size=20, step_bucket="geometric")

    def prepare(round_index):
        tic = time.perf_counter()
        ids = sampled[round_index]
        cohort = pack_cohort(
            [clients[int(i)] for i in ids], ids, packing, seed=seed, round_index=round_index,
            num_total_clients=population.num_clients, num_lanes=default_num_lanes(),
        )
        return jax.device_put(cohort), time.perf_counter() - tic

    state = algorithm.init(params)
    # Compile every step bucket first, so the timed passes are steady state.
    for round_index, (cohort, _), _ in prefetch_rounds(prepare, 0, rounds, ahead=False):
        state, _ = round_fn(state, cohort, jax.random.key(round_index))
        jax.block_until_ready(state.params)
    results = {}
    for ahead in (True, False):
        records = []
        for round_index, (cohort, pack_seconds), waited in prefetch_rounds(prepare, 0, rounds, ahead=ahead):
            tic = time.perf_counter()
            state, _ = round_fn(state, cohort, jax.random.key(round_index))
            jax.block_until_ready(state.params)
            compute = time.perf_counter() - tic
            records.append((pack_seconds, waited, compute))
        # The first round has nothing to overlap with in either mode.
        steady = records[1:] if len(records) > 1 else records
        results[ahead] = {
            "pack_s": statistics.median(r[0] for r in steady),
            "exposed_s": statistics.median(r[1] for r in steady),
            "compute_s": statistics.median(r[2] for r in steady),
            "round_s": statistics.median(r[1] + r[2] for r in steady),
        }
    overlapped, synchronous = results[True], results[False]
    return {
        "model": model_name, "cohort": cohort_size, "rounds": rounds,
        "pack_s": round(overlapped["pack_s"], 4), "compute_s": round(overlapped["compute_s"], 4),
        "exposed_s": round(overlapped["exposed_s"], 4),
        "round_s": round(overlapped["round_s"], 4),
        "exposed_fraction": round(overlapped["exposed_s"] / overlapped["round_s"], 3),
        "sync_round_s": round(synchronous["round_s"], 4),
        "sync_exposed_fraction": round(synchronous["exposed_s"] / synchronous["round_s"], 3),
        "speedup_vs_sync": round(synchronous["round_s"] / overlapped["round_s"], 3),
        "device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="logreg", help="cnn, dense or logreg (comma-separated)")
    parser.add_argument("--cohort", default="10,100,1000", help="comma-separated cohort sizes")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    configure_xla_cpu()
    for model_name in args.model.split(","):
        for cohort_size in [int(c) for c in args.cohort.split(",")]:
            print(json.dumps(run(model_name, cohort_size, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
