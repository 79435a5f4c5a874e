"""Steady-state round throughput of FedAvg against a centralized ceiling.

Workload: a synthetic look-alike of federated EMNIST-62 (benchmarks/
emnist_lookalike.py: 3,400 clients with the real split's sizes, random 28x28
pixels, 62 labels); FedAvg with 1 local epoch, batch 20, client SGD lr 0.1,
server SGD lr 1.0. For each model, cohort and execution plan it prints one
JSON line:

  sec_per_round         wall time of a round in the steady pass that gave
                        examples_per_s: rounds are dispatched back to back
                        (round r+1 queued while round r runs) and the pass
                        waits once at its end, as the limit's steps do;
                        packing runs beforehand, see pack_s
  examples_per_s        real (unpadded) examples trained per second in a
                        steady pass over the same cohorts: the median of
                        --repeats passes (each listed in
                        examples_per_s_repeats)
  compile_s             time of a first pass over the cohorts (compiling every
                        step bucket they need) minus a median steady pass
  pack_s                median host packing time per round
  limit_examples_per_s  plain centralized training of the same model on the
                        same device in the same run: a jitted SGD step over
                        batches of `batch` and of `cohort x batch` examples,
                        whichever is faster. A federated round cannot beat
                        shared-weight training, so this is the ceiling. It is
                        sampled before each repeat's steady passes, so the
                        two see the same machine load; the median is given.
  ratio_to_limit        examples_per_s / limit_examples_per_s (medians)
  loop_limit_examples_per_s, ratio_to_loop_limit
                        a stricter ceiling: the same centralized steps run
                        inside one jitted lax.fori_loop over the batches (no
                        per-step call, as in a federated round), best of
                        batch and cohort x batch, patch lowering

On CPU the host is split into one XLA:CPU device per core by default (as
`fedjaxsim run` does) and the "default" plan trains one lane per device, the
runner's `--execution.num-devices N`; `--host-devices 1` measures one device.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emnist_lookalike import NUM_CLASSES, EmnistLookalike  # noqa: E402
from suite_lookalikes import WORKLOADS  # noqa: E402

from fedjaxsim.algorithms.fed_avg import fed_sgd_avg  # noqa: E402
from fedjaxsim.core.engine import ExecutionPlan, build_round, default_plan  # noqa: E402
from fedjaxsim.core.losses import masked_mean_loss  # noqa: E402
from fedjaxsim.core.tasks import CLASSIFICATION, Task, task_loss  # noqa: E402
from fedjaxsim.core.packing import PackingConfig, default_num_lanes, pack_cohort  # noqa: E402
from fedjaxsim.core.sharding import client_mesh, replicated, shard_cohort  # noqa: E402
from fedjaxsim.models import default_lowering, get_model  # noqa: E402
from fedjaxsim.runner.platform import (  # noqa: E402
    RECOMMENDED_YNN_FUSION_TYPES,
    configure_xla_cpu,
    default_host_device_count,
)


class Layout(NamedTuple):
    """How a named plan runs: the lanes it packs, the engine's plan, the conv lowering."""

    num_lanes: int | None  # pack_cohort(num_lanes=...)
    plan: ExecutionPlan
    lowering: str  # get_model(lowering=...)


def named_plans(names: list[str], num_devices: int = 1) -> dict[str, Layout]:
    """Layouts by short name; "default" is fedjaxsim's defaults for the backend
    (default_num_lanes, default_plan, default_lowering), as `fedjaxsim run` uses."""
    lowering = default_lowering()
    layouts = {}
    for name in names:
        if name == "default":
            layouts[name] = Layout(default_num_lanes(num_devices=num_devices), default_plan(), lowering)
        elif name == "vmap":  # one client per lane, whole cohort in one vmap
            layouts[name] = Layout(None, ExecutionPlan(), lowering)
        elif name.startswith("lanes"):  # lanesN or lanesNuK (scan unroll K)
            lanes, _, unroll = name[5:].partition("u")
            layouts[name] = Layout(int(lanes), ExecutionPlan(scan_unroll=int(unroll or 1)), lowering)
        elif name == "lax":  # XLA convolutions, one client per lane
            layouts[name] = Layout(None, ExecutionPlan(), "lax")
        else:
            raise ValueError(f"unknown plan {name!r}")
    return layouts


class CentralizedLimit:
    """Plain jitted SGD on one shared model (the ceiling), ready to sample.

    Candidates: batches of ``batch`` and of ``cohort x batch`` examples, and
    for the CNN both convolution lowerings; each is compiled once here.
    Issue 2's limit is one jitted step per batch ("step" candidates). A
    stricter ceiling is also measured: the same steps inside one jitted
    ``lax.fori_loop`` over the batches ("loop" candidates, patch lowering only:
    XLA's convolution gradient is the 14-30x trap inside a loop), which
    removes the per-call overhead a federated round does not pay either.
    ``sample()`` times every candidate for at least ``min_seconds``; a limit
    is the best candidate's median over samples (a best-of over noisy
    candidates within one sample would be biased upwards).
    """

    def __init__(self, model_name: str, batch: int, cohort: int, workload, min_seconds: float = 0.3):
        models = {lowering: get_model(model_name, workload.num_classes, lowering) for lowering in ("lax", "patches")}
        self.params = models["patches"].init(jax.random.key(0), workload.sample_input())
        pool = workload.examples(max(batch * cohort, 256))
        rng = np.random.default_rng(0)
        self.min_seconds = min_seconds
        self.candidates = []  # (run(params) -> params, examples per run, size, lowering, mode)
        lowerings = ("lax", "patches") if model_name == "cnn" else ("patches",)
        for lowering in lowerings:
            for size in sorted({batch, batch * cohort}):
                steps = max(3, min(30, (30 * batch * 4) // size))
                batches = []
                for _ in range(steps):
                    rows = rng.integers(0, len(pool["y"]), size)
                    batches.append({k: jnp.asarray(v[rows]) for k, v in pool.items()})

                def step(params, batch_data, key, loss_fn=task_loss(workload.task, models[lowering])):
                    mask = jnp.ones(len(batch_data["y"]), bool)
                    grads = jax.grad(lambda p: masked_mean_loss(loss_fn, p, batch_data, mask, key)[0])(params)
                    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

                jitted = jax.jit(step)

                def run_steps(params, jitted=jitted, batches=batches):
                    for batch_data in batches:
                        params = jitted(params, batch_data, jax.random.key(1))
                    return params

                self.candidates.append((run_steps, steps * size, size, lowering, "step"))
                if lowering == "patches":
                    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)

                    def loop(params, stacked, step=step, steps=steps):
                        return jax.lax.fori_loop(
                            0, steps,
                            lambda i, p: step(p, jax.tree.map(lambda leaf: leaf[i], stacked), jax.random.key(1)),
                            params,
                        )

                    jitted_loop = jax.jit(loop)
                    self.candidates.append(
                        (lambda params, f=jitted_loop, d=stacked: f(params, d), steps * size, size, lowering, "loop")
                    )
        for run, *_ in self.candidates:
            jax.block_until_ready(run(self.params))

    @staticmethod
    def name(candidate) -> str:
        _, _, size, lowering, mode = candidate
        return f"{lowering}@{size}" if mode == "step" else f"loop:{lowering}@{size}"

    def sample(self) -> list[float]:
        """Examples/s of every candidate, each timed for >= min_seconds."""
        rates = []
        for run, examples, _, _, _ in self.candidates:
            current, trained = self.params, 0
            tic = time.perf_counter()
            while True:
                current = run(current)
                trained += examples
                jax.block_until_ready(current)
                elapsed = time.perf_counter() - tic
                if elapsed >= self.min_seconds:
                    break
            rates.append(trained / elapsed)
        return rates


class FederatedRun:
    """One model, cohort and plan: rounds packed and compiled, ready to time.

    The constructor packs ``rounds`` cohorts and runs a first pass over them,
    compiling every step bucket they need; ``timed_pass()`` times another
    pass over the same cohorts (the steady state a long run reaches once its
    handful of shapes are compiled).
    """

    def __init__(self, model_name, cohort, layout, rounds, batch, population, step_bucket, mesh=None):
        model = get_model(model_name, population.num_classes, layout.lowering)
        params = model.init(jax.random.key(0), population.sample_input())
        loss = task_loss(population.task, model)
        algorithm = fed_sgd_avg(loss, client_learning_rate=0.1, server_learning_rate=1.0)
        self.round_fn = build_round(algorithm, layout.plan, mesh=mesh)
        packing = PackingConfig(
            batch_size=batch, num_epochs=1, step_bucket=step_bucket, max_steps=population.max_steps
        )
        self.cohorts, self.pack_times = [], []
        for round_index in range(rounds):
            ids = population.cohort_ids(round_index, cohort)
            clients = [population.client(int(i)) for i in ids]
            tic = time.perf_counter()
            packed = pack_cohort(
                clients, ids, packing, seed=0, round_index=round_index,
                num_total_clients=population.num_clients, num_lanes=layout.num_lanes,
            )
            self.pack_times.append(time.perf_counter() - tic)
            self.cohorts.append(jax.device_put(packed) if mesh is None else shard_cohort(packed, mesh))
        self.state = algorithm.init(params)
        if mesh is not None:  # replicated from the start: the rounds' outputs are, and a
            self.state = jax.device_put(self.state, replicated(mesh))  # placement change would recompile
        self.examples = sum(int(np.asarray(packed.mask).sum()) for packed in self.cohorts)
        self.compile_pass = self.timed_pass()

    def timed_pass(self) -> float:
        """Seconds for one pass over the cohorts. Rounds are dispatched back
        to back and the pass waits once at the end, as the limit's steps do:
        round r+1 is queued while round r runs, as in any loop that does not
        read a round's outputs before starting the next."""
        tic = time.perf_counter()
        for round_index, packed in enumerate(self.cohorts):
            self.state, _ = self.round_fn(self.state, packed, jax.random.key(round_index))
        jax.block_until_ready(self.state.params)
        return time.perf_counter() - tic


class EmnistWorkload:
    """The EMNIST look-alike as a workload: dict clients, classification."""

    num_classes, task, max_steps = NUM_CLASSES, CLASSIFICATION, None

    def __init__(self):
        self.population = EmnistLookalike()
        self.num_clients = self.population.num_clients

    def client(self, client_id: int) -> dict:
        return dict(zip(("x", "y"), self.population.client(client_id)))

    def cohort_ids(self, round_index: int, cohort_size: int):
        return self.population.cohort_ids(round_index, cohort_size)

    def sample_input(self):
        return np.zeros((1, 28, 28, 1), np.float32)

    def examples(self, count: int) -> dict:
        return examples_of(self, count)


def examples_of(workload, count: int) -> dict:
    """At least ``count`` examples pooled from the first clients (the limit's data)."""
    pooled, total, client_id = [], 0, 0
    while total < count:
        pooled.append(workload.client(client_id))
        total += len(pooled[-1]["y"])
        client_id += 1
    return {k: np.concatenate([c[k] for c in pooled]) for k in pooled[0]}


def workload(model_name: str, batch: int | None):
    """``(population, batch)`` for a model: the EMNIST look-alike, or the suite task it belongs to."""
    if model_name not in WORKLOADS:
        return EmnistWorkload(), batch or 20
    make, task_batch, max_steps = WORKLOADS[model_name]
    population = make()
    population.task = Task("next_token") if population.input_dtype == np.int32 else CLASSIFICATION
    population.max_steps = max_steps
    population.examples = lambda count: examples_of(population, count)
    return population, batch or task_batch


def measure(model_name, cohort, plans, rounds, batch, population, step_bucket, mesh, repeats):
    """Times every plan and the centralized limit, interleaved ``repeats`` times.

    Each repeat samples the limit and then one steady pass of every plan, so
    the engine and its ceiling see the same machine load; the figures are
    medians over repeats and the ratio is a ratio of medians.
    """
    limit = CentralizedLimit(model_name, batch, cohort, population)
    runs = {
        name: FederatedRun(model_name, cohort, plan, rounds, batch, population, step_bucket, mesh)
        for name, plan in plans.items()
    }
    limit_samples, passes = [], {name: [] for name in runs}
    for _ in range(repeats):
        limit_samples.append(limit.sample())
        for name, run in runs.items():
            passes[name].append(run.timed_pass())
    per_candidate = list(zip(*limit_samples))  # [candidate][repeat]
    medians = [statistics.median_low(samples) for samples in per_candidate]

    def best_of(mode):
        indices = [i for i, c in enumerate(limit.candidates) if c[4] == mode]
        best = max(indices, key=lambda i: medians[i])
        return best, list(per_candidate[best])

    best, limit_samples = best_of("step")
    limit_median = medians[best]
    _, _, limit_batch, limit_lowering, _ = limit.candidates[best]
    loop_best, _ = best_of("loop")
    loop_median = medians[loop_best]
    records = []
    for name, run in runs.items():
        layout = plans[name]
        rates = [run.examples / seconds for seconds in passes[name]]
        rate = statistics.median_low(rates)
        masks = [np.asarray(packed.mask) for packed in run.cohorts]
        records.append({
            "model": model_name,
            "cohort": cohort,
            "batch": batch,
            "plan": name,
            "num_lanes": layout.num_lanes,
            "clients_per_chunk": layout.plan.clients_per_chunk,
            "conv_lowering": layout.lowering,
            "rounds": rounds,
            "repeats": repeats,
            "step_bucket": step_bucket,
            "sec_per_round": round(run.examples / rate / rounds, 5),
            "examples_per_s": round(rate, 1),
            "examples_per_s_repeats": [round(r, 1) for r in rates],
            "compile_s": round(run.compile_pass - statistics.median(passes[name]), 3),
            "compiled_shapes": len({mask.shape for mask in masks}),
            "pack_s": round(statistics.median(run.pack_times), 5),
            "limit_examples_per_s": round(limit_median, 1),
            "limit_examples_per_s_repeats": [round(r, 1) for r in limit_samples],
            "limit_batch": limit_batch,
            "limit_conv_lowering": limit_lowering,
            "limit_candidates": {
                CentralizedLimit.name(candidate): round(median, 1)
                for candidate, median in zip(limit.candidates, medians)
            },
            "ratio_to_limit": round(rate / limit_median, 3),
            "loop_limit_examples_per_s": round(loop_median, 1),
            "loop_limit_candidate": CentralizedLimit.name(limit.candidates[loop_best]),
            "ratio_to_loop_limit": round(rate / loop_median, 3),
            "padded_step_fraction": round(1 - run.examples / sum(mask.size for mask in masks), 3),
            "device": str(jax.devices()[0].device_kind),
            "num_devices": 1 if mesh is None else mesh.size,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_version": jax.__version__,
        })
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="all",
        help="cnn, dense, logreg or all (EMNIST look-alike); char_lstm, word_lstm, transformer, "
             "resnet18 (the suite's look-alikes, benchmarks/suite_lookalikes.py); comma-separated",
    )
    parser.add_argument("--cohort", default="10", help="comma-separated cohort sizes")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: by model)")
    parser.add_argument("--batch", type=int, default=None,
                        help="local batch (default: 20, or the suite task's batch of Reddi et al.)")
    parser.add_argument("--plans", default="default", help="comma-separated: default, vmap, lanesN, lanesNuK, lax")
    parser.add_argument("--host-devices", type=int, default=default_host_device_count(),
                        help="on CPU, shard over N forced XLA:CPU host devices (a clients mesh); "
                             "default: one per core, as `fedjaxsim run` splits the host; 1: one device, no mesh")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved samples of the limit and of every plan (medians are reported)")
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
    if args.host_devices > 1:  # the flag only splits the host platform; set before JAX starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.host_devices}"
        ).strip()
        if jax.default_backend() == "cpu":
            mesh = client_mesh(jax.devices()[: args.host_devices])
    models = ["cnn", "dense", "logreg"] if args.model == "all" else args.model.split(",")
    for model_name in models:
        population, batch = workload(model_name, args.batch)
        # Default rounds: a steady pass of roughly 0.5 s (logreg, dense) to 10 s (cnn).
        rounds = args.rounds or {"cnn": 4, "dense": 30, "logreg": 80}.get(model_name, 3)
        for cohort in [int(c) for c in args.cohort.split(",")]:
            plans = named_plans(args.plans.split(","), 1 if mesh is None else mesh.size)
            bucket = int(args.step_bucket) if args.step_bucket.isdigit() else args.step_bucket
            records = measure(
                model_name, cohort, plans, rounds, batch, population, bucket, mesh, args.repeats
            )
            for record in records:
                line = json.dumps(record)
                print(line, flush=True)
                if args.output:
                    with open(args.output, "a", encoding="utf-8") as handle:
                        handle.write(line + "\n")


if __name__ == "__main__":
    main()
