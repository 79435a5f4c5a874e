"""FedJAX 0.0.17 FedAvg throughput baseline on the synthetic EMNIST look-alike.

What it measures
----------------
Training throughput (real examples per second) of FedJAX's standard federated
averaging, ``fedjax.algorithms.fed_avg.federated_averaging``, run with its
default ``for_each_client`` backend (the ``jax.jit`` backend, clients processed
one after another), on the workload from ``emnist_lookalike.py`` in this
folder. That module is plain NumPy, so the same clients and cohorts feed both
this baseline and our own benchmark.

Setup, the same for every model:

* models from ``fedjax.models.emnist`` with ``only_digits=False`` (62 classes):
  ``create_conv_model`` ("cnn"), ``create_dense_model`` ("dense") and
  ``create_logistic_model`` ("logreg");
* client optimizer ``fedjax.optimizers.sgd(0.1)``, server optimizer
  ``fedjax.optimizers.sgd(1.0)``;
* client batching ``fedjax.ShuffleRepeatBatchHParams(batch_size=20,
  num_epochs=1)``: one pass over each client's data in batches of exactly 20
  (FedJAX fills the last batch with extra re-sampled examples, so shapes never
  change and nothing is recompiled after the first round);
* each round samples ``--cohort`` clients with ``EmnistLookalike.cohort_ids``.

What is timed: for every round the client datasets (``fedjax.ClientDataset``
with features ``'x'``: float32[n, 28, 28, 1] and ``'y'``: int32[n]) and the
per-client PRNG keys are built first, untimed. The timer then covers the calls
of the algorithm's ``apply`` (which includes FedJAX's own shuffling and batching,
every client's local training, the weighted averaging and the server update),
made back to back, and ends with ``jax.block_until_ready`` on the last server
parameters: the way fedjaxsim's ``throughput.py`` times its rounds and the
centralized limit. ``--per-round`` waits after every round instead.

``--warmup`` rounds run untimed first; the first of them includes compilation.
Each model prints one JSON line on stdout:

* ``sec_per_round``: timed seconds / rounds (with ``--per-round``: the median
  round);
* ``examples_per_s``: real examples of the timed rounds (the sum of the sampled
  clients' sizes, not counting the filler examples FedJAX adds to complete
  the last batch) divided by the total timed seconds;
* ``compile_s``: wall time of the first warm-up round minus ``sec_per_round``;
* ``compile_s_size_adjusted``: wall time of the first warm-up round minus the
  steady-state time for that round's own number of examples. Cohorts differ in
  size (about +-13% at cohort 10), which for the slow cnn is of the same order
  as its compile time and can make ``compile_s`` small or even negative.

How to reproduce
----------------
FedJAX 0.0.17 needs an older JAX than fedjaxsim, so it runs from its own
virtual environment outside the repository::

    python3 -m venv /work/fedjax-venv   # Python 3.11
    /work/fedjax-venv/bin/pip install "jax==0.4.30" "jaxlib==0.4.30" \\
        "dm-haiku==0.0.12" "optax==0.2.2" "numpy<2" "scipy<1.14" \\
        fedjax==0.0.17
    /work/fedjax-venv/bin/python benchmarks/fedjax_baseline.py --model all \\
        --cohort 10 | tee -a benchmarks/fedjax_baseline_results.jsonl

Without ``--rounds`` each model runs a default number of timed rounds sized so
that one configuration takes roughly 20 to 40 seconds on 2 CPU cores; the
defaults are given for cohort 10 and scaled by ``10 / cohort`` for other
cohort sizes. ``--verbose`` prints every round's example count and time to
stderr.

Run it on an otherwise idle machine: any other process competing for the CPU
cores slows every model down (the cnn by up to half on 2 cores). On a shared
machine, repeat each configuration and keep the fastest run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import fedjax
import jax
from fedjax.algorithms import fed_avg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emnist_lookalike import EmnistLookalike  # noqa: E402  pylint: disable=g-import-not-at-top

FRAMEWORK = "fedjax-0.0.17"
BATCH_SIZE = 20
CLIENT_LR = 0.1
SERVER_LR = 1.0

MODEL_FACTORIES = {
    "cnn": fedjax.models.emnist.create_conv_model,
    "dense": fedjax.models.emnist.create_dense_model,
    "logreg": fedjax.models.emnist.create_logistic_model,
}

# Timed rounds at cohort 10 (about 2,000 examples per round) that take roughly
# 20-40 s on 2 CPU cores: cnn ~750, dense ~35,000, logreg ~145,000 examples/s.
DEFAULT_ROUNDS_AT_COHORT_10 = {"cnn": 12, "dense": 500, "logreg": 2000}


def default_rounds(model_name: str, cohort: int) -> int:
    """Timed rounds for a model when --rounds is not given."""
    rounds = DEFAULT_ROUNDS_AT_COHORT_10[model_name] * 10 / cohort
    return max(3, math.ceil(rounds))


def make_round_clients(population: EmnistLookalike, round_index: int,
                       cohort: int, rng: jax.Array):
    """Builds the (client id, ClientDataset, PRNG key) triples of one round.

    Returns the triples and the number of real examples they hold.
    """
    ids = population.cohort_ids(round_index, cohort)
    keys = jax.random.split(jax.random.fold_in(rng, round_index), cohort)
    clients = []
    num_examples = 0
    for client_id, key in zip(ids, keys):
        pixels, labels = population.client(int(client_id))
        dataset = fedjax.ClientDataset({"x": pixels, "y": labels})
        clients.append((str(int(client_id)).encode(), dataset, key))
        num_examples += len(dataset)
    keys.block_until_ready()
    return clients, num_examples


def device_string() -> str:
    """Describes the default JAX backend, e.g. 'cpu: TFRT_CPU_0 (2 CPUs)'."""
    device = jax.devices()[0]
    return (f"{device.platform}: {device} x{jax.device_count()} "
            f"({os.cpu_count()} CPUs)")


def run_model(model_name: str, cohort: int, rounds: int, warmup: int,
              seed: int, verbose: bool = False, pipelined: bool = True) -> dict:
    """Runs warm-up and timed FedAvg rounds for one model; returns the record."""
    model = MODEL_FACTORIES[model_name](only_digits=False)
    algorithm = fed_avg.federated_averaging(
        grad_fn=fedjax.model_grad(model),
        client_optimizer=fedjax.optimizers.sgd(CLIENT_LR),
        server_optimizer=fedjax.optimizers.sgd(SERVER_LR),
        client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(
            batch_size=BATCH_SIZE, num_epochs=1),
    )
    rng = jax.random.PRNGKey(seed)
    init_rng, client_rng = jax.random.split(rng)
    server_state = algorithm.init(model.init(init_rng))
    jax.block_until_ready(server_state.params)
    population = EmnistLookalike(seed=seed)

    first_round_s = first_round_examples = None
    round_seconds = []
    timed_examples = 0
    for round_index in range(warmup):
        clients, num_examples = make_round_clients(population, round_index,
                                                   cohort, client_rng)
        start = time.perf_counter()
        server_state, _ = algorithm.apply(server_state, clients)
        jax.block_until_ready(server_state.params)
        elapsed = time.perf_counter() - start
        if round_index == 0:
            first_round_s, first_round_examples = elapsed, num_examples
    timed_rounds = [
        make_round_clients(population, round_index, cohort, client_rng)
        for round_index in range(warmup, warmup + rounds)
    ]
    if pipelined:
        # Rounds back to back, one wait at the end (as fedjaxsim's benchmark
        # times its own rounds and the centralized limit).
        start = time.perf_counter()
        for clients, num_examples in timed_rounds:
            server_state, _ = algorithm.apply(server_state, clients)
            timed_examples += num_examples
        jax.block_until_ready(server_state.params)
        round_seconds = [(time.perf_counter() - start) / rounds] * rounds
    else:
        for round_index, (clients, num_examples) in enumerate(timed_rounds):
            start = time.perf_counter()
            server_state, _ = algorithm.apply(server_state, clients)
            jax.block_until_ready(server_state.params)
            elapsed = time.perf_counter() - start
            if verbose:
                print(f"{model_name} round {warmup + round_index}: {num_examples} "
                      f"examples in {elapsed:.4f} s", file=sys.stderr, flush=True)
            round_seconds.append(elapsed)
            timed_examples += num_examples

    sec_per_round = statistics.median(round_seconds)
    sec_per_example = sum(round_seconds) / timed_examples
    return {
        "framework": FRAMEWORK,
        "model": model_name,
        "cohort": cohort,
        "batch": BATCH_SIZE,
        "rounds": rounds,
        "sec_per_round": round(sec_per_round, 6),
        "examples_per_s": round(timed_examples / sum(round_seconds), 1),
        "compile_s": round(first_round_s - sec_per_round, 3),
        "compile_s_size_adjusted": round(
            first_round_s - first_round_examples * sec_per_example, 3),
        "timing": "pipelined" if pipelined else "per-round",
        "jax_version": jax.__version__,
        "device": device_string(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODEL_FACTORIES, "all"],
                        default="all")
    parser.add_argument("--cohort", type=int, default=10,
                        help="clients per round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default: per model, ~20-40 s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rounds first; the first one compiles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-round", action="store_true",
                        help="wait for every round and report the median round "
                             "(default: rounds back to back, one wait at the end)")
    parser.add_argument("--verbose", action="store_true",
                        help="print every round's time to stderr")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 to measure compile_s")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")

    names = list(MODEL_FACTORIES) if args.model == "all" else [args.model]
    for name in names:
        rounds = args.rounds or default_rounds(name, args.cohort)
        record = run_model(name, args.cohort, rounds, args.warmup, args.seed,
                           args.verbose, pipelined=not args.per_round)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
