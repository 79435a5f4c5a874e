"""Which form of the LSTM's time scan runs fastest inside the engine's round.

The round is a scan over local steps (vmapped over clients on accelerators,
one lane per device on CPU); the LSTM adds a scan over time inside it. This
times a FedAvg round of the Shakespeare look-alike (char_lstm, batch 4) or the
Stack Overflow one (word_lstm, batch 16, 16 steps) for several unroll factors
of the time scan, against unroll 1 in the same run, steady state and compile
time apart, and prints one JSON line per form.

Usage:
  python benchmarks/lstm_forms.py --model char_lstm --cohort 10 --unrolls 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_lookalikes import WORKLOADS  # noqa: E402

from fedjaxsim.algorithms.fed_avg import fed_sgd_avg  # noqa: E402
from fedjaxsim.core.engine import build_round  # noqa: E402
from fedjaxsim.core.packing import PackingConfig, default_num_lanes, pack_cohort  # noqa: E402
from fedjaxsim.core.tasks import Task, task_loss  # noqa: E402
from fedjaxsim.models import from_linen  # noqa: E402
from fedjaxsim.models.sequence import CharLstm, WordLstm  # noqa: E402
from fedjaxsim.runner.platform import configure_xla_cpu  # noqa: E402

MODULES = {"char_lstm": CharLstm, "word_lstm": WordLstm}


def time_form(model_name, unroll, cohorts, population, repeats):
    model = from_linen(MODULES[model_name](vocab_size=population.num_classes, unroll=unroll))
    params = model.init(jax.random.key(0), population.sample_input())
    algorithm = fed_sgd_avg(task_loss(Task("next_token"), model), 0.5, 1.0)
    round_fn = build_round(algorithm)
    state = algorithm.init(params)

    def one_pass(state):
        tic = time.perf_counter()
        for index, cohort in enumerate(cohorts):
            state, _ = round_fn(state, cohort, jax.random.key(index))
        jax.block_until_ready(state.params)
        return state, time.perf_counter() - tic

    state, first = one_pass(state)
    passes = []
    for _ in range(repeats):
        state, seconds = one_pass(state)
        passes.append(seconds)
    return first, passes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="char_lstm", choices=sorted(MODULES))
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unrolls", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    configure_xla_cpu()
    make, batch, max_steps = WORKLOADS[args.model]
    population = make()
    packing = PackingConfig(batch_size=batch, max_steps=max_steps, step_bucket="geometric")
    cohorts = []
    examples = 0
    for index in range(args.rounds):
        ids = population.cohort_ids(index, args.cohort)
        packed = pack_cohort(
            [population.client(int(i)) for i in ids], ids, packing, seed=0, round_index=index,
            num_total_clients=population.num_clients, num_lanes=default_num_lanes(),
        )
        examples += int(np.asarray(packed.mask).sum())
        cohorts.append(jax.device_put(packed))
    results = {}
    for unroll in [int(u) for u in args.unrolls.split(",")]:
        results[unroll] = time_form(args.model, unroll, cohorts, population, args.repeats)
    base = statistics.median(results[min(results)][1])
    for unroll, (first, passes) in results.items():
        steady = statistics.median(passes)
        line = {
            "model": args.model, "cohort": args.cohort, "batch": batch, "unroll": unroll,
            "examples_per_s": round(examples / steady, 1),
            "steady_over_unroll1": round(steady / base, 3),
            "compile_s": round(first - steady, 2),
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        }
        print(json.dumps(line), flush=True)
        if args.output:
            with open(args.output, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
