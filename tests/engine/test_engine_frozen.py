"""Frozen round inputs: every client reads them, none trains or stacks them.

The reference is FedAvg written as a float64 loop over each client's batches
(``fedjaxsim.testing.references``) with the frozen weights as a constant of
the loss; the memory check reads XLA's compiled memory analysis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.algorithm import with_aggregator
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.losses import with_frozen_params
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.privacy import dp_fed_avg_aggregator
from fedjaxsim.testing import least_squares_problem
from fedjaxsim.testing.algorithm_references import least_squares_loss_and_grad
from fedjaxsim.testing.references import RoundSchedule, local_sgd

LEARNING_RATE = 0.05


def _full_loss(full, batch, rng):
    """Least squares of ``x @ (w + a)``: ``w`` frozen, ``a`` trained."""
    del rng
    residual = batch["x"] @ (full["w"] + full["a"]) - batch["y"]
    return 0.5 * jnp.sum(residual**2, axis=-1)


def _merge(frozen, trainable):
    return {**frozen, **trainable}


class Problem(NamedTuple):
    clients: list  # dicts of float32 x, y
    frozen_w: np.ndarray  # float32[4, 1]
    adapter: np.ndarray  # float32[4, 1]: the trained part's start


@pytest.fixture(scope="module")
def problem():
    data = least_squares_problem(num_clients=6, dim=4, seed=3)
    rng = np.random.default_rng(0)
    return Problem(
        [{"x": x, "y": y} for x, y in data.clients],
        rng.normal(size=(4, 1)).astype(np.float32),
        0.1 * rng.normal(size=(4, 1)).astype(np.float32),
    )


def _engine_round(problem, aggregator=None, num_lanes=None):
    algorithm = fed_avg(with_frozen_params(_full_loss, _merge), optax.sgd(LEARNING_RATE))
    if aggregator is not None:
        algorithm = with_aggregator(algorithm, aggregator)
    state = algorithm.init({"a": jnp.asarray(problem.adapter)})
    cohort = pack_cohort(
        problem.clients,
        range(6),
        PackingConfig(batch_size=8),
        seed=2,
        round_index=0,
        num_total_clients=6,
        num_lanes=num_lanes,
    )
    frozen = {"w": jnp.asarray(problem.frozen_w)}
    state, _ = build_round(algorithm)(state, cohort, jax.random.key(0), frozen=frozen)
    return np.asarray(state.params["a"])


def _reference_deltas(problem):
    """Float64 local SGD of each client with the frozen weights as a constant."""
    w64 = problem.frozen_w.astype(np.float64)

    def loss_and_grad(params, x, y):
        loss, (grad,) = least_squares_loss_and_grad([w64 + params[0]], x, y)
        return loss, [grad]

    schedule = RoundSchedule(batch_size=8, num_epochs=1, seed=2, round_index=0)
    clients = [(c["x"].astype(np.float64), c["y"]) for c in problem.clients]
    start = problem.adapter.astype(np.float64)
    cohort = schedule.pack(clients, range(6))
    runs = [
        local_sgd(
            [start],
            client.batches,
            loss_and_grad=loss_and_grad,
            learning_rate=LEARNING_RATE,
        )
        for client in cohort
    ]
    return [start - run.params[0] for run in runs], [client.weight for client in cohort]


@pytest.mark.parametrize("num_lanes", [None, 3])
def test_fed_avg_over_the_trainable_part_matches_a_float64_loop_with_a_frozen_constant(
    problem, num_lanes
):
    deltas, weights = _reference_deltas(problem)
    mean = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    got = _engine_round(problem, num_lanes=num_lanes)
    np.testing.assert_allclose(got, problem.adapter - mean, atol=1e-5)


def test_dp_clips_each_clients_adapter_update(problem):
    """DP-FedAvg composes with frozen inputs: each client's trainable update is
    clipped, the sum divided by the cohort size (no noise here)."""
    deltas, _ = _reference_deltas(problem)
    clip_norm = float(np.median([np.linalg.norm(d) for d in deltas]))
    clipped = [d * min(1.0, clip_norm / np.linalg.norm(d)) for d in deltas]
    expected = problem.adapter - sum(clipped) / len(clipped)
    aggregator = dp_fed_avg_aggregator(
        clip_norm=clip_norm, noise_multiplier=0.0, expected_cohort_size=6
    )
    np.testing.assert_allclose(_engine_round(problem, aggregator), expected, atol=1e-5)


def test_a_frozen_loss_without_frozen_inputs_names_the_fix():
    loss = with_frozen_params(_full_loss, _merge)
    batch = {"x": np.ones((2, 4), np.float32), "y": np.ones((2, 1), np.float32)}
    with pytest.raises(ValueError, match=r"round_fn\(\.\.\., frozen=base\)"):
        loss({"a": jnp.zeros((4, 1))}, batch, None)


def _temp_bytes(num_clients: int, frozen_size: int, train_everything: bool) -> int:
    """Compiled temporary bytes of one FedAvg round of ``x @ (W + A @ B)`` with a
    ``[frozen_size, frozen_size]`` base W and rank-2 adapters, every client vmapped."""
    rng = np.random.default_rng(0)
    base = {"kernel": jnp.asarray(rng.normal(size=(frozen_size, frozen_size)), jnp.float32)}
    adapters = {
        "lora_a": jnp.asarray(rng.normal(size=(frozen_size, 2)), jnp.float32),
        "lora_b": jnp.zeros((2, frozen_size), jnp.float32),
    }

    def full_loss(full, batch, rng):
        del rng
        x = batch["x"]
        out = x @ full["kernel"] + (x @ full["lora_a"]) @ full["lora_b"]
        return 0.5 * jnp.sum((out - batch["y"]) ** 2, axis=-1)

    clients = [
        {
            "x": rng.normal(size=(2, frozen_size)).astype(np.float32),
            "y": rng.normal(size=(2, frozen_size)).astype(np.float32),
        }
        for _ in range(num_clients)
    ]
    cohort = pack_cohort(
        clients,
        range(num_clients),
        PackingConfig(batch_size=2),
        seed=0,
        round_index=0,
        num_total_clients=num_clients,
        num_lanes=num_clients,
    )
    if train_everything:
        algorithm = fed_avg(full_loss, optax.sgd(0.1))
        args = (algorithm.init({**base, **adapters}), cohort, jax.random.key(0))
        lowered = build_round(algorithm, ExecutionPlan()).lower(*args)
    else:
        algorithm = fed_avg(with_frozen_params(full_loss, _merge), optax.sgd(0.1))
        args = (algorithm.init(adapters), cohort, jax.random.key(0))
        lowered = build_round(algorithm, ExecutionPlan()).lower(*args, frozen=base)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_memory_per_client_grows_with_the_adapters_not_the_frozen_base():
    size = 256
    base_bytes = size * size * 4
    adapter_bytes = 2 * (2 * size) * 4
    frozen_growth = (_temp_bytes(16, size, False) - _temp_bytes(8, size, False)) / 8
    # Per client: the adapters, their gradient and optimizer copies, activations
    # of two examples, a few scalars; a small multiple of the adapter size.
    assert frozen_growth <= 16 * adapter_bytes, (frozen_growth, adapter_bytes)
    assert frozen_growth < base_bytes / 4, (frozen_growth, base_bytes)
    # Training the base too stacks it per client: the check can fail.
    full_growth = (_temp_bytes(16, size, True) - _temp_bytes(8, size, True)) / 8
    assert full_growth >= base_bytes, (full_growth, base_bytes)
