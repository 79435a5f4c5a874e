"""Federated LoRA fine-tuning of a GPT-2-shaped model: clients per round, tokens/s
and memory per client, against centralized LoRA training in the same run.

Workload: a randomly initialised GPT-2 (``--width``, ``--layers``, ``--vocab``;
the weights do not change the speed), LoRA rank ``--rank`` on the four
projections of every block, clients of ``--examples`` random token sequences
of ``--length`` tokens, batch ``--batch``, one local epoch, FedAvg with client
SGD. For each cohort it prints one JSON line:

  clients_per_s, tokens_per_s   steady state over --rounds rounds dispatched
                                back to back (median of --repeats passes)
  compile_s                     first round minus a steady one
  limit_tokens_per_s            centralized LoRA training of the same model on
                                the same device, in the same run: one jitted
                                SGD step over batches of ``batch`` sequences
                                inside a lax.fori_loop (no per-step call)
  ratio_to_limit                tokens_per_s / limit_tokens_per_s
  temp_bytes_per_client         XLA's compiled temporary memory of a round
                                with every client vmapped, (cohort C minus
                                cohort C/2) / (C/2): what each extra client
                                costs; ``full_temp_bytes_per_client`` is the
                                same with every weight trained (no LoRA)
  adapter_bytes, base_bytes     float32 bytes of the adapters and of the base

Usage:
  python benchmarks/lora.py --cohorts 10,100
  python benchmarks/lora.py --width 768 --layers 12 --vocab 50257 --cohorts 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round, default_plan
from fedjaxsim.core.losses import masked_mean_loss, with_frozen_params
from fedjaxsim.core.packing import PackingConfig, default_num_lanes, pack_cohort
from fedjaxsim.core.tasks import Task, task_loss
from fedjaxsim.models.gpt2 import GPT2Config, init_gpt2
from fedjaxsim.models.lora import LoraConfig, merge_params


def nbytes(tree) -> int:
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(tree))


def make_clients(num_clients, examples, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    clients = []
    for _ in range(num_clients):
        tokens = rng.integers(0, vocab, size=(examples, length + 1)).astype(np.int32)
        clients.append({"x": tokens[:, :-1], "y": tokens[:, 1:]})
    return clients


def pack(clients, config, round_index, num_lanes):
    return pack_cohort(
        clients,
        range(len(clients)),
        config,
        seed=0,
        round_index=round_index,
        num_total_clients=len(clients),
        num_lanes=num_lanes,
    )


def temp_bytes(algorithm, params, cohort, frozen) -> int:
    lowered = build_round(algorithm, ExecutionPlan()).lower(
        algorithm.init(params), cohort, jax.random.key(0), frozen=frozen
    )
    return lowered.compile().memory_analysis().temp_size_in_bytes


def centralized_tokens_per_s(lm, loss, batches, repeats) -> float:
    """LoRA training of the same model without federation: SGD over the batches
    in one jitted fori_loop."""
    tx = optax.sgd(0.01)
    x = jnp.asarray(np.stack([b["x"] for b in batches]))
    y = jnp.asarray(np.stack([b["y"] for b in batches]))
    mask = jnp.ones(x.shape[:2], bool)

    @jax.jit
    def train(adapters, frozen):
        def step(i, carry):
            adapters, opt_state = carry
            batch = {"x": x[i], "y": y[i], "frozen": frozen}
            grads = jax.grad(lambda p: masked_mean_loss(loss, p, batch, mask[i], None)[0])(
                adapters
            )
            updates, opt_state = tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state

        return jax.lax.fori_loop(0, x.shape[0], step, (adapters, tx.init(adapters)))

    jax.block_until_ready(train(lm.adapters, lm.base))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(train(lm.adapters, lm.base))
        times.append(time.perf_counter() - tic)
    return x.size / statistics.median(times)


def measure(args, lm, cohort_size) -> dict:
    task = Task("next_token", pad_id=lm.config.vocab_size)
    loss = with_frozen_params(task_loss(task, lm.model), merge_params)
    algorithm = fed_avg(loss, optax.sgd(0.01))
    clients = make_clients(cohort_size, args.examples, args.length, lm.config.vocab_size)
    config = PackingConfig(batch_size=args.batch)
    lanes = default_num_lanes()
    cohorts = [
        jax.device_put(pack(clients, config, r, lanes)) for r in range(args.rounds + 1)
    ]
    round_fn = build_round(algorithm, default_plan())
    frozen = jax.device_put(lm.base)
    state = algorithm.init(lm.adapters)
    tic = time.perf_counter()
    state, _ = jax.block_until_ready(round_fn(state, cohorts[0], jax.random.key(0), frozen=frozen))
    first = time.perf_counter() - tic
    passes = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        for r in range(1, args.rounds + 1):
            state, _ = round_fn(state, cohorts[r], jax.random.key(r), frozen=frozen)
        jax.block_until_ready(state)
        passes.append((time.perf_counter() - tic) / args.rounds)
    per_round = statistics.median(passes)
    tokens_per_round = cohort_size * args.examples * args.length
    batches = [
        {"x": c["x"][i : i + args.batch], "y": c["y"][i : i + args.batch]}
        for c in clients[: max(1, min(cohort_size, 10))]
        for i in range(0, args.examples, args.batch)
    ]
    limit = centralized_tokens_per_s(lm, loss, batches, args.repeats)
    half = max(1, cohort_size // 2)
    vmapped = {}
    for name, (params, frozen_tree, train_loss) in {
        "lora": (lm.adapters, lm.base, loss),
        "full": (merge_params(lm.base, lm.adapters), (), task_loss(task, lm.model)),
    }.items():
        full_algorithm = fed_avg(train_loss, optax.sgd(0.01))
        sizes = [
            temp_bytes(
                full_algorithm,
                params,
                pack(clients[:count], config, 0, count),
                frozen_tree,
            )
            for count in (half, cohort_size)
        ]
        vmapped[name] = (sizes[1] - sizes[0]) / max(cohort_size - half, 1)
    return {
        "cohort": cohort_size,
        "sec_per_round": per_round,
        "clients_per_s": cohort_size / per_round,
        "tokens_per_s": tokens_per_round / per_round,
        "compile_s": first - per_round,
        "limit_tokens_per_s": limit,
        "ratio_to_limit": tokens_per_round / per_round / limit,
        "temp_bytes_per_client": vmapped["lora"],
        "full_temp_bytes_per_client": vmapped["full"],
        "adapter_bytes": nbytes(lm.adapters),
        "base_bytes": nbytes(lm.base),
        "passes_sec_per_round": passes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="10,100")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(args.length, 64),
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
    )
    lm = init_gpt2(config, LoraConfig(rank=args.rank), jax.random.key(0))
    for cohort in (int(c) for c in args.cohorts.split(",")):
        record = measure(args, lm, cohort)
        record.update(
            width=args.width,
            layers=args.layers,
            vocab=args.vocab,
            length=args.length,
            rank=args.rank,
            batch=args.batch,
            examples_per_client=args.examples,
            device=str(jax.devices()[0].device_kind),
            backend=jax.default_backend(),
        )
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
