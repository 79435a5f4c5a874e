"""Large-cohort throughput of the EMNIST-62 models on one accelerator (CNN by default).

Two parts, in one process (the prepared GPU check; run it with benchmarks/gpu.sh):

1. **Plan sweep** at one cohort size (``--sweep-cohort``, default 1,000):
   every execution plan of ``--plans`` trains the same cohort, so the per-backend
   default of :func:`fedjaxsim.core.engine.default_plan` is chosen by measurement.
2. **Cohort curve**: cohorts of ``--cohorts`` (default 10, 100, 1,000, 10,000)
   with the sweep's fastest plan (or ``--curve-plan``).

Workload: the EMNIST look-alike (benchmarks/emnist_lookalike.py), FedAvg, 1 local
epoch of batch 20, client SGD 0.1, server SGD 1.0. Pixels travel as uint8 (the
model scales them). Each cohort is packed once on the host and trained for a
few rounds, so the figures are device steady state; the first round's extra
time is reported as ``compile_s`` and packing as ``pack_s``. The ceiling is
plain centralized jitted SGD on one shared model at a large batch (the best of
``--central-batches``), measured in the same process.

Plan names are dot-separated tokens: ``c256`` (clients_per_chunk), ``k4``
(pack about 4 clients one after another per lane: num_lanes = max(min(cohort,
chunk), cohort / 4)), ``lax`` or ``patches`` (conv lowering), ``nosort`` (chunks
not grouped by length), ``u2`` (scan unroll). Example: ``c256.k4.lax``.

Every plan runs inside try/except, so one failure (e.g. an API change in the
device's jax) does not cost the rest of the run. Rows go to stdout as JSON
lines and, with ``--out``, to a JSONL file. ``--cohorts 10 --sweep-cohort 0
--rounds 1 --plans c8.patches`` runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emnist_lookalike import NUM_CLASSES, NUM_CLIENTS, EmnistLookalike  # noqa: E402

from fedjaxsim.algorithms.fed_avg import fed_sgd_avg  # noqa: E402
from fedjaxsim.core.engine import ExecutionPlan, build_round  # noqa: E402
from fedjaxsim.core.losses import classification_loss  # noqa: E402
from fedjaxsim.core.packing import PackingConfig, pack_cohort  # noqa: E402
from fedjaxsim.models import get_model  # noqa: E402

DEFAULT_PLANS = "c256.lax.nosort,c256.lax,c256.k4.lax,c256.patches,c128.lax,c1024.lax"


class Layout(NamedTuple):
    plan: ExecutionPlan  # what the engine does
    num_lanes: int | None  # pack_cohort(num_lanes=...)
    clients_per_lane: int | None  # the k of the name
    lowering: str  # get_model(lowering=...)


def parse_plan(name: str, cohort: int) -> Layout:
    """The layout a dot-separated plan name stands for."""
    fields = {"clients_per_chunk": None, "sort_chunks": True, "scan_unroll": 1}
    clients_per_lane, lowering = None, "lax"
    for token in name.split("."):
        if token in ("lax", "patches"):
            lowering = token
        elif token == "nosort":
            fields["sort_chunks"] = False
        elif token[:1] == "c" and token[1:].isdigit():
            fields["clients_per_chunk"] = int(token[1:])
        elif token[:1] == "k" and token[1:].isdigit():
            clients_per_lane = int(token[1:])
        elif token[:1] == "u" and token[1:].isdigit():
            fields["scan_unroll"] = int(token[1:])
        else:
            raise ValueError(f"unknown plan token {token!r} in {name!r}")
    num_lanes = None
    if clients_per_lane:
        lane_floor = min(cohort, fields["clients_per_chunk"] or cohort)
        num_lanes = max(lane_floor, -(-cohort // clients_per_lane))
    return Layout(ExecutionPlan(**fields), num_lanes, clients_per_lane, lowering)


class ClientCache:
    """uint8 clients of the look-alike, generated once per writer."""

    def __init__(self):
        self.population = EmnistLookalike()
        self.clients = {}

    def __call__(self, client_id: int):
        if client_id not in self.clients:
            pixels, labels = self.population.client(client_id)
            self.clients[client_id] = {"x": np.round(pixels * 255).astype(np.uint8), "y": labels}
        return self.clients[client_id]


def cohort_clients(cache: ClientCache, cohort_size: int):
    ids = np.sort(np.random.default_rng(cohort_size).choice(NUM_CLIENTS, size=min(cohort_size, NUM_CLIENTS), replace=False))
    ids = np.resize(ids, cohort_size)  # cohorts above the population reuse writers
    return [cache(int(i)) for i in ids]


def centralized_examples_per_s(loss_fn, params, batch, steps):
    rng = np.random.default_rng(batch)
    data = {
        "x": jnp.asarray(rng.integers(0, 256, (steps, batch, 28, 28, 1)).astype(np.uint8)),
        "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (steps, batch)).astype(np.int32)),
    }

    @jax.jit
    def train(params, data):
        def step(params, batch_data):
            grads = jax.grad(lambda p: loss_fn(p, batch_data, jax.random.key(0)).mean())(params)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), None

        return jax.lax.scan(step, params, data)[0]

    jax.block_until_ready(train(params, data))
    times = []
    for _ in range(3):
        tic = time.perf_counter()
        jax.block_until_ready(train(params, data))
        times.append(time.perf_counter() - tic)
    return steps * batch / min(times)


def time_plan(plan_name, cohort_size, clients, algorithms, params, rounds, context):
    layout = parse_plan(plan_name, cohort_size)
    plan, algorithm = layout.plan, algorithms[layout.lowering]
    tic = time.perf_counter()
    cohort = pack_cohort(
        clients, np.arange(cohort_size), PackingConfig(batch_size=20, step_bucket="geometric"),
        seed=0, round_index=0, num_total_clients=cohort_size, num_lanes=layout.num_lanes,
    )
    pack_seconds = time.perf_counter() - tic
    cohort = jax.device_put(cohort)
    round_fn = build_round(algorithm, plan)
    state = algorithm.init(params)
    tic = time.perf_counter()
    state, _ = round_fn(state, cohort, jax.random.key(0))
    jax.block_until_ready(state.params)
    first = time.perf_counter() - tic
    times = []
    for r in range(rounds):
        tic = time.perf_counter()
        state, output = round_fn(state, cohort, jax.random.key(r + 1))
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - tic)
    seconds = statistics.median(times)
    examples = int(np.asarray(cohort.mask).sum())
    slots = int(np.prod(np.asarray(cohort.mask).shape))
    loss = float(np.sum(output.client_metrics["loss_sum"]) / max(examples, 1))
    return {
        **context, "plan": plan_name, "cohort": cohort_size, "batch": 20,
        "clients_per_chunk": plan.clients_per_chunk, "num_lanes": layout.num_lanes,
        "clients_per_lane": layout.clients_per_lane, "conv_lowering": layout.lowering,
        "sort_chunks": plan.sort_chunks, "sec_per_round": round(seconds, 4),
        "examples_per_s": round(examples / seconds, 1),
        "compile_s": round(first - seconds, 2), "pack_s": round(pack_seconds, 2),
        "examples": examples, "padded_slot_fraction": round(1 - examples / slots, 3),
        "train_loss": round(loss, 4),
        "ratio_to_central": round(examples / seconds / context["central_examples_per_s"], 3),
    }


def run_model(model_name, args, started, emit, cache):
    """Central ceiling, plan sweep and cohort curve of one model."""
    losses = {lowering: classification_loss(get_model(model_name, NUM_CLASSES, lowering)) for lowering in ("lax", "patches")}
    params = get_model(model_name, NUM_CLASSES).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    algorithms = {
        lowering: fed_sgd_avg(loss_fn, client_learning_rate=0.1, server_learning_rate=1.0)
        for lowering, loss_fn in losses.items()
    }
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    central = {}
    for batch in [int(b) for b in args.central_batches.split(",")]:
        for lowering, loss_fn in losses.items():
            try:
                central[(batch, lowering)] = centralized_examples_per_s(loss_fn, params, batch, 10)
                emit({"model": model_name, "central_batch": batch, "conv_lowering": lowering,
                      "examples_per_s": round(central[(batch, lowering)], 1), "device": device})
            except Exception:  # noqa: BLE001 (one failure must not end the run)
                traceback.print_exc()
    limit = max(central.values()) if central else float("nan")
    context = {"model": model_name, "central_examples_per_s": round(limit, 1), "device": device, "jax_version": jax.__version__}

    def over_budget(what, budget=None):
        if time.perf_counter() - started > (args.time_budget if budget is None else budget):
            print(f"# skipped {what}: time budget spent", flush=True)
            return True
        return False

    sweep = []
    if args.sweep_cohort:
        clients = cohort_clients(cache, args.sweep_cohort)
        for name in args.plans.split(","):
            if over_budget(f"plan {name}", args.sweep_budget):
                continue
            try:
                row = time_plan(name, args.sweep_cohort, clients, algorithms, params, args.rounds, context)
                sweep.append(row)
                emit({"part": "sweep", **row})
            except Exception:  # noqa: BLE001
                print(f"# plan {name} failed:", flush=True)
                traceback.print_exc()
    if args.curve_plan:
        curve_plan = args.curve_plan
    elif sweep:
        curve_plan = min(sweep, key=lambda row: row["sec_per_round"])["plan"]
    else:
        curve_plan = args.plans.split(",")[0]
    curve = []
    for cohort_size in [int(c) for c in args.cohorts.split(",")]:
        if over_budget(f"cohort {cohort_size}"):
            continue
        try:
            row = time_plan(curve_plan, cohort_size, cohort_clients(cache, cohort_size), algorithms, params, args.rounds, context)
            curve.append(row)
            emit({"part": "curve", **row})
        except Exception:  # noqa: BLE001
            print(f"# cohort {cohort_size} failed:", flush=True)
            traceback.print_exc()
    print(f"\n{model_name} ({device}, jax {jax.__version__}; central limit {limit:.0f} examples/s)")
    print(f"{'part':>6} {'plan':>16} {'cohort':>7} {'sec/round':>10} {'examples/s':>12} {'vs central':>10} {'compile_s':>9} {'padded':>7}")
    for part, rows in (("sweep", sweep), ("curve", curve)):
        for row in rows:
            print(
                f"{part:>6} {row['plan']:>16} {row['cohort']:>7} {row['sec_per_round']:>10.3f} "
                f"{row['examples_per_s']:>12.0f} {row['ratio_to_central']:>10.2f} {row['compile_s']:>9.1f} "
                f"{row['padded_slot_fraction']:>7.2f}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn", help="comma-separated: cnn, dense, logreg")
    parser.add_argument("--plans", default=DEFAULT_PLANS, help="plans of the sweep (see the module docstring)")
    parser.add_argument("--sweep-cohort", type=int, default=1000, help="0 skips the sweep")
    parser.add_argument("--curve-plan", default=None, help="plan of the cohort curve (default: the sweep's fastest)")
    parser.add_argument("--cohorts", default="10,100,1000,10000")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration")
    parser.add_argument("--central-batches", default="1024,5120")
    parser.add_argument("--sweep-budget", type=float, default=170.0, help="start no sweep plan after this many seconds")
    parser.add_argument("--time-budget", type=float, default=300.0, help="start no cohort after this many seconds")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def emit(row):
        print(json.dumps(row), flush=True)
        if args.out:  # appended line by line: a killed run keeps what it measured
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")

    cache = ClientCache()
    for model_name in args.models.split(","):
        run_model(model_name, args, started, emit, cache)


if __name__ == "__main__":
    main()
