"""Device memory is bounded by clients_per_chunk, not by the cohort size."""

import jax
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.testing import synthetic_clients


def _temp_bytes(logreg_loss, logreg_params, num_clients, plan):
    algorithm = fed_avg(logreg_loss, optax.sgd(0.1))
    clients = synthetic_clients([6] * num_clients, seed=1)
    cohort = pack_cohort(
        clients,
        range(num_clients),
        PackingConfig(batch_size=3),
        seed=0,
        round_index=0,
        num_total_clients=num_clients,
    )
    compiled = (
        build_round(algorithm, plan)
        .lower(algorithm.init(logreg_params), cohort, jax.random.key(0))
        .compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes


def test_temporary_memory_does_not_grow_with_the_cohort(logreg_loss, logreg_params):
    chunked = ExecutionPlan(clients_per_chunk=8)
    small = _temp_bytes(logreg_loss, logreg_params, 64, chunked)
    large = _temp_bytes(logreg_loss, logreg_params, 512, chunked)
    whole = _temp_bytes(logreg_loss, logreg_params, 512, ExecutionPlan())
    # Per-client outputs (a few floats per client) may grow; the training
    # working set (per-client params, grads, activations) must not.
    per_client_outputs = 512 * 64
    assert large <= small + per_client_outputs, (small, large)
    assert whole > 4 * large, (whole, large)  # without chunks it does grow
    assert np.isfinite(small)
