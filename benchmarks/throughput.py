"""Steady-state round throughput of FedAvg against a centralized ceiling.

Workload: a synthetic look-alike of federated EMNIST-62 (benchmarks/
emnist_lookalike.py: 3,400 clients with the real split's sizes, random 28x28
pixels, 62 labels); FedAvg with 1 local epoch, batch 20, client SGD lr 0.1,
server SGD lr 1.0. For each model, cohort and execution plan it prints one
JSON line:

  sec_per_round         median wall time of a steady-state round (second
                        pass over the same cohorts; packing runs beforehand,
                        see pack_s)
  examples_per_s        real (unpadded) examples trained per second
  compile_s             time of a first pass over the cohorts (compiling every
                        step bucket they need) minus the steady second pass
  pack_s                median host packing time per round
  limit_examples_per_s  plain centralized training of the same model on the
                        same device in the same run: a jitted SGD step over
                        batches of `batch` and of `cohort x batch` examples,
                        whichever is faster. A federated round cannot beat
                        shared-weight training, so this is the ceiling.
  ratio_to_limit        examples_per_s / limit_examples_per_s

Usage:
  python benchmarks/throughput.py --model all --cohort 10 --rounds 10
  python benchmarks/throughput.py --model dense --cohort 10,50,100 --plans default,lanes1,vmap
"""

from __future__ import annotations

import argparse
import json
import os
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

from fedjaxsim.algorithms.fed_avg import fed_sgd_avg  # noqa: E402
from fedjaxsim.core.engine import ExecutionPlan, build_round, default_plan  # noqa: E402
from fedjaxsim.core.lowering import conv_lowering  # noqa: E402
from fedjaxsim.core.packing import PackingConfig, pack_cohort  # noqa: E402
from fedjaxsim.core.sharding import client_mesh, replicated, shard_cohort  # noqa: E402
from fedjaxsim.models import classification_loss, get_model  # noqa: E402
from fedjaxsim.runner.platform import RECOMMENDED_YNN_FUSION_TYPES, configure_xla_cpu  # noqa: E402


def named_plans(names: list[str], model: str) -> dict[str, ExecutionPlan]:
    """Execution plans by short name; "default" is fedjaxsim's default_plan()."""
    base = default_plan()
    plans = {}
    for name in names:
        if name == "default":
            plans[name] = base
        elif name == "vmap":  # one client per lane, whole cohort in one vmap
            plans[name] = ExecutionPlan(conv_lowering=base.conv_lowering)
        elif name.startswith("lanes"):  # lanesN or lanesNuK (scan unroll K)
            lanes, _, unroll = name[5:].partition("u")
            plans[name] = ExecutionPlan(
                num_lanes=int(lanes), scan_unroll=int(unroll or 1), conv_lowering=base.conv_lowering
            )
        elif name == "lax":  # XLA convolutions, one client per lane
            plans[name] = ExecutionPlan(conv_lowering="lax")
        else:
            raise ValueError(f"unknown plan {name!r}")
    return plans


def centralized_limit(model_name: str, batch: int, cohort: int, repeats: int = 30) -> float:
    """Examples/s of plain jitted SGD on one shared model (the ceiling)."""
    model = get_model(model_name, NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    loss_fn = classification_loss(model)
    rng = np.random.default_rng(0)
    lowerings = ("lax", "patches") if model_name == "cnn" else ("patches",)
    best = 0.0
    for lowering in lowerings:
        for size in sorted({batch, batch * cohort}):
            steps = max(3, min(repeats, (repeats * batch * 4) // size))
            batches = [
                {
                    "x": jnp.asarray(rng.random((size, 28, 28, 1), dtype=np.float32)),
                    "y": jnp.asarray(rng.integers(0, NUM_CLASSES, size).astype(np.int32)),
                }
                for _ in range(steps)
            ]

            def step(params, batch_data, key):
                with conv_lowering(lowering):
                    grads = jax.grad(lambda p: loss_fn(p, batch_data, key).mean())(params)
                return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

            jitted = jax.jit(step)
            key = jax.random.key(1)
            current = jax.block_until_ready(jitted(params, batches[0], key))
            tic = time.perf_counter()
            for batch_data in batches:
                current = jitted(current, batch_data, key)
            jax.block_until_ready(current)
            best = max(best, steps * size / (time.perf_counter() - tic))
    return best


def measure(model_name, cohort, plan_name, plan, rounds, batch, population, limit, step_bucket, mesh=None):
    model = get_model(model_name, NUM_CLASSES)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    algorithm = fed_sgd_avg(classification_loss(model), client_learning_rate=0.1, server_learning_rate=1.0)
    round_fn = build_round(algorithm, plan, mesh=mesh)
    packing = PackingConfig(batch_size=batch, num_epochs=1, step_bucket=step_bucket)
    cohorts, pack_times = [], []
    for round_index in range(rounds):
        ids = population.cohort_ids(round_index, cohort)
        clients = [dict(zip(("x", "y"), population.client(int(i)))) for i in ids]
        tic = time.perf_counter()
        packed = pack_cohort(
            clients, ids, packing, seed=0, round_index=round_index,
            num_total_clients=population.num_clients, num_lanes=plan.num_lanes,
        )
        pack_times.append(time.perf_counter() - tic)
        cohorts.append(jax.device_put(packed) if mesh is None else shard_cohort(packed, mesh))
    state = algorithm.init(params)
    if mesh is not None:  # replicated from the start: the rounds' outputs are, and a
        state = jax.device_put(state, replicated(mesh))  # placement change would recompile
    # Pass 1 compiles every step bucket these cohorts need; pass 2, over the
    # same cohorts, is the steady state a long run reaches once its handful of
    # shapes are compiled. compile_s is the difference of the two passes.
    passes = []
    for _ in range(2):
        times = []
        for round_index, packed in enumerate(cohorts):
            tic = time.perf_counter()
            state, out = round_fn(state, packed, jax.random.key(round_index))
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - tic)
        passes.append(times)
    compile_pass, steady = passes
    examples = [int(np.asarray(packed.mask).sum()) for packed in cohorts]
    median = statistics.median(steady)
    examples_per_s = sum(examples) / sum(steady)
    num_shapes = len({np.shape(packed.mask) for packed in cohorts})
    return {
        "model": model_name,
        "cohort": cohort,
        "batch": batch,
        "plan": plan_name,
        "num_lanes": plan.num_lanes,
        "clients_per_chunk": plan.clients_per_chunk,
        "conv_lowering": plan.conv_lowering,
        "rounds": rounds,
        "step_bucket": step_bucket,
        "sec_per_round": round(median, 5),
        "examples_per_s": round(examples_per_s, 1),
        "compile_s": round(sum(compile_pass) - sum(steady), 3),
        "compiled_shapes": num_shapes,
        "pack_s": round(statistics.median(pack_times), 5),
        "limit_examples_per_s": round(limit, 1),
        "ratio_to_limit": round(examples_per_s / limit, 3),
        "padded_step_fraction": round(1 - sum(examples) / sum(int(np.asarray(c.mask).size) for c in cohorts), 3),
        "device": str(jax.devices()[0].device_kind),
        "num_devices": 1 if mesh is None else mesh.size,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", help="cnn, dense, logreg or all (comma-separated)")
    parser.add_argument("--cohort", default="10", help="comma-separated cohort sizes")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: by model)")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--plans", default="default", help="comma-separated: default, vmap, lanesN, lanesNuK, lax")
    parser.add_argument("--host-devices", type=int, default=None,
                        help="shard over N forced XLA:CPU host devices (a clients mesh)")
    parser.add_argument("--step-bucket", default="geometric", help="pow2, geometric, exact or an int")
    parser.add_argument("--output", default=None, help="also append the JSON lines to this file")
    parser.add_argument(
        "--ynn-fusion-types", default=RECOMMENDED_YNN_FUSION_TYPES,
        help="XLA:CPU YNNPACK fusion types; 'xla-default' leaves XLA's own choice",
    )
    args = parser.parse_args(argv)
    if args.ynn_fusion_types != "xla-default":
        configure_xla_cpu(args.ynn_fusion_types)
    mesh = None
    if args.host_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.host_devices}"
        ).strip()
        mesh = client_mesh(jax.devices()[: args.host_devices])
    models = ["cnn", "dense", "logreg"] if args.model == "all" else args.model.split(",")
    population = EmnistLookalike()
    for model_name in models:
        rounds = args.rounds or {"cnn": 4, "dense": 15, "logreg": 30}[model_name]
        for cohort in [int(c) for c in args.cohort.split(",")]:
            limit = centralized_limit(model_name, args.batch, cohort)
            for plan_name, plan in named_plans(args.plans.split(","), model_name).items():
                bucket = int(args.step_bucket) if args.step_bucket.isdigit() else args.step_bucket
                record = measure(
                    model_name, cohort, plan_name, plan, rounds, args.batch, population, limit, bucket, mesh
                )
                line = json.dumps(record)
                print(line, flush=True)
                if args.output:
                    with open(args.output, "a", encoding="utf-8") as handle:
                        handle.write(line + "\n")


if __name__ == "__main__":
    main()
