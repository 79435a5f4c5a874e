"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.

Trains the same cohorts on meshes of 1, 2 and 8 CPU devices, with several
layouts (execution plans, and lanes packed by ``pack_cohort``), and prints the
max parameter difference to the 1-device, one-client-per-lane result as JSON.
"""

import json
import sys

import jax
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.sharding import client_mesh, shard_cohort
from fedjaxsim.models import classification_loss, from_linen
from fedjaxsim.models.zoo import LogisticRegression
from fedjaxsim.testing import synthetic_clients


def max_difference(first, second) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second))
    )


def main():
    assert len(jax.devices()) == 8, jax.devices()
    sizes = [1, 7, 23, 4, 16, 9, 30, 2, 11, 5, 13]  # 11 clients: never divides 2 or 8
    clients = synthetic_clients(sizes)
    ids = list(range(100, 100 + len(sizes)))
    model = from_linen(LogisticRegression(num_classes=5))
    params = model.init(jax.random.key(0), np.zeros((1, 12), np.float32))
    algorithm = fed_avg(classification_loss(model), optax.adam(0.02), optax.sgd(1.0))
    config = PackingConfig(batch_size=4, num_epochs=2)

    def train(devices, plan, num_lanes=None):
        mesh = client_mesh(jax.devices()[:devices])
        round_fn = build_round(algorithm, plan, mesh=mesh)
        state = algorithm.init(params)
        for r in range(3):
            cohort = pack_cohort(
                clients,
                ids,
                config,
                seed=0,
                round_index=r,
                num_total_clients=200,
                num_lanes=num_lanes,
            )
            state, out = round_fn(state, shard_cohort(cohort, mesh), jax.random.key(r))
        return jax.device_get(state.params), jax.device_get(out.client_metrics)

    reference, reference_metrics = train(1, ExecutionPlan())
    report = {}
    for devices in (2, 8):
        for name, (plan, num_lanes) in {
            "vmap": (ExecutionPlan(), None),
            "chunks": (ExecutionPlan(clients_per_chunk=2), None),
            "lanes": (ExecutionPlan(clients_per_chunk=2), 4),  # clients one after another
        }.items():
            got, metrics = train(devices, plan, num_lanes)
            examples_equal = np.array_equal(
                metrics["num_examples"], reference_metrics["num_examples"]
            )
            report[f"{devices}:{name}"] = {
                "max_difference": max_difference(got, reference),
                "examples_equal": bool(examples_equal),
            }
    report["8:lora"] = lora_on_eight_devices()
    moved = max_difference(reference, params)
    print(json.dumps({"report": report, "moved": moved}))


def lora_on_eight_devices() -> dict:
    """LoRA adapters on the tiny GPT-2 fixture: the base frozen and replicated."""
    from pathlib import Path

    from fedjaxsim.core.losses import with_frozen_params
    from fedjaxsim.core.sharding import replicated
    from fedjaxsim.core.tasks import Task, task_loss
    from fedjaxsim.models.gpt2 import load_gpt2
    from fedjaxsim.models.lora import LoraConfig, merge_params

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_gpt2"
    lm = load_gpt2(fixture, LoraConfig(rank=2))
    vocab = lm.config.vocab_size
    task = Task("next_token", pad_id=vocab)
    loss = with_frozen_params(task_loss(task, lm.model), merge_params)
    algorithm = fed_avg(loss, optax.adam(0.01), optax.sgd(1.0))
    rng = np.random.default_rng(0)
    clients = []
    for size in [3, 1, 5, 2, 4, 1, 2, 3, 2]:  # 9 clients: never divides 8
        tokens = rng.integers(0, vocab, size=(size, 17)).astype(np.int32)
        targets = tokens[:, 1:].copy()
        targets[0, 10:] = vocab  # a short sequence: padded targets
        clients.append({"x": tokens[:, :-1], "y": targets})
    config = PackingConfig(batch_size=2)

    def train(devices):
        mesh = client_mesh(jax.devices()[:devices])
        round_fn = build_round(algorithm, ExecutionPlan(), mesh=mesh)
        state = algorithm.init(lm.adapters)
        frozen = jax.device_put(lm.base, replicated(mesh))
        for r in range(2):
            cohort = pack_cohort(
                clients, range(9), config, seed=0, round_index=r, num_total_clients=9
            )
            state, out = round_fn(
                state, shard_cohort(cohort, mesh), jax.random.key(r), frozen=frozen
            )
        return jax.device_get(state.params), jax.device_get(out.client_metrics)

    reference, reference_metrics = train(1)
    got, metrics = train(8)
    assert max_difference(reference, lm.adapters) > 1e-3  # the adapters really trained
    return {
        "max_difference": max_difference(got, reference),
        "examples_equal": bool(
            np.array_equal(metrics["num_examples"], reference_metrics["num_examples"])
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
