"""Large-cohort throughput of the 62-class EMNIST CNN on one accelerator.

For cohorts of 10, 100, 1,000 and 10,000 clients of the EMNIST look-alike
(benchmarks/emnist_lookalike.py; 1 local epoch of batch 20, FedAvg, client SGD
0.1), prints a table and JSON lines with sec/round, examples/s and the ratio
to plain centralized jitted training of the same model at a large batch on the
same device. Pixels travel as uint8 (4x fewer bytes; the model scales them).
Each cohort is packed once on the host and trained for a few rounds, so the
figures are device steady state; packing time is reported separately.

It needs only jax, flax, optax and numpy (no package registry): run it with
benchmarks/gpu.sh. ``--cohorts 10 --rounds 1 --chunk 8`` runs anywhere in
seconds, which is how the test suite smoke-tests it on CPU.
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
from fedjaxsim.core.engine import ExecutionPlan, build_round, default_plan  # noqa: E402
from fedjaxsim.core.lowering import conv_lowering  # noqa: E402
from fedjaxsim.core.packing import PackingConfig, pack_cohort  # noqa: E402
from fedjaxsim.models import classification_loss, get_model  # noqa: E402


def uint8_client(population, client_id):
    pixels, labels = population.client(client_id)
    return {"x": np.round(pixels * 255).astype(np.uint8), "y": labels}


def centralized_examples_per_s(model, loss_fn, params, batch, steps, lowering):
    rng = np.random.default_rng(0)
    data = {
        "x": jnp.asarray(rng.integers(0, 256, (steps, batch, 28, 28, 1)).astype(np.uint8)),
        "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (steps, batch)).astype(np.int32)),
    }

    @jax.jit
    def train(params, data):
        def step(params, batch_data):
            with conv_lowering(lowering):
                grads = jax.grad(lambda p: loss_fn(p, batch_data, jax.random.key(0)).mean())(params)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), None

        return jax.lax.scan(step, params, data)[0]

    jax.block_until_ready(train(params, data))
    tic = time.perf_counter()
    jax.block_until_ready(train(params, data))
    return steps * batch / (time.perf_counter() - tic)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", default="10,100,1000,10000")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cohort")
    parser.add_argument("--chunk", type=int, default=None, help="clients_per_chunk (default: plan's)")
    parser.add_argument("--central-batch", type=int, default=1024)
    parser.add_argument("--time-budget", type=float, default=420.0, help="skip cohorts after this many seconds")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    base = default_plan()
    plan = ExecutionPlan(
        clients_per_chunk=args.chunk or base.clients_per_chunk, conv_lowering=base.conv_lowering
    )
    model = get_model("cnn", NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    loss_fn = classification_loss(model)
    algorithm = fed_sgd_avg(loss_fn, client_learning_rate=0.1, server_learning_rate=1.0)
    round_fn = build_round(algorithm, plan)
    population = EmnistLookalike()
    limit = centralized_examples_per_s(model, loss_fn, params, args.central_batch, 20, plan.conv_lowering)
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    rows = []
    for cohort_size in [int(c) for c in args.cohorts.split(",")]:
        if time.perf_counter() - started > args.time_budget:
            print(f"# skipped cohort {cohort_size}: time budget spent", flush=True)
            continue
        ids = np.sort(np.random.default_rng(cohort_size).choice(3400, size=min(cohort_size, 3400), replace=False))
        ids = np.resize(ids, cohort_size)  # cohorts above the population reuse writers
        tic = time.perf_counter()
        clients = [uint8_client(population, int(i)) for i in ids]
        cohort = pack_cohort(
            clients, np.arange(cohort_size), PackingConfig(batch_size=20, step_bucket="geometric"),
            seed=0, round_index=0, num_total_clients=cohort_size,
        )
        pack_seconds = time.perf_counter() - tic
        cohort = jax.device_put(cohort)
        state = algorithm.init(params)
        tic = time.perf_counter()
        state, _ = round_fn(state, cohort, jax.random.key(0))
        jax.block_until_ready(state.params)
        first = time.perf_counter() - tic
        times = []
        for r in range(args.rounds):
            tic = time.perf_counter()
            state, _ = round_fn(state, cohort, jax.random.key(r + 1))
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - tic)
        seconds = statistics.median(times)
        examples = int(np.asarray(cohort.mask).sum())
        row = {
            "model": "cnn", "cohort": cohort_size, "batch": 20,
            "clients_per_chunk": plan.clients_per_chunk, "conv_lowering": plan.conv_lowering,
            "sec_per_round": round(seconds, 4), "examples_per_s": round(examples / seconds, 1),
            "compile_s": round(first - seconds, 2), "pack_s": round(pack_seconds, 2),
            "central_examples_per_s": round(limit, 1),
            "ratio_to_central": round(examples / seconds / limit, 3), "device": device,
            "jax_version": jax.__version__,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'cohort':>7} {'sec/round':>10} {'examples/s':>12} {'vs central':>10}   ({device})")
    for row in rows:
        print(f"{row['cohort']:>7} {row['sec_per_round']:>10.3f} {row['examples_per_s']:>12.0f} {row['ratio_to_central']:>10.2f}")


if __name__ == "__main__":
    main()
