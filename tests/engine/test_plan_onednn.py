"""A FedAvg round of the EMNIST CNN with oneDNN convolutions equals the patch lowering's."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.models import EmnistCnn, classification_loss, conv_onednn, from_linen


@pytest.mark.skipif(
    not conv_onednn.available(), reason=f"oneDNN: {conv_onednn.unavailable_reason()}"
)
@pytest.mark.parametrize("num_lanes", [1, None], ids=["lone lane (CPU plan)", "vmapped lanes"])
def test_cnn_round_with_onednn_equals_the_patch_lowering(num_lanes):
    rng = np.random.default_rng(5)
    clients = [
        {
            "x": rng.random((size, 28, 28, 1), dtype=np.float32),
            "y": rng.integers(0, 10, size).astype(np.int32),
        }
        for size in (7, 12, 5)
    ]
    cohort = pack_cohort(
        clients,
        [0, 1, 2],
        PackingConfig(batch_size=4),
        seed=0,
        round_index=0,
        num_total_clients=3,
        num_lanes=num_lanes,
    )
    results = []
    # Both with PackedDropout, so the dropout draws are the same; the CPU gradient
    # form of the dense layers as get_model gives the patch lowering on CPU.
    for lowering in ("onednn", "patches"):
        model = from_linen(
            EmnistCnn(10, lowering=lowering, cpu_gradients=True, packed_dropout=True)
        )
        params = model.init(jax.random.key(0), clients[0]["x"][:1])
        algorithm = fed_avg(classification_loss(model), optax.sgd(0.1))
        round_fn = build_round(algorithm, ExecutionPlan())
        state, _ = round_fn(algorithm.init(params), cohort, jax.random.key(1))
        results.append((params, state.params))
    (start, onednn), (_, patches) = results
    moved = max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(onednn), jax.tree.leaves(start))
    )
    assert moved > 1e-3  # training really happened
    for a, b in zip(jax.tree.leaves(onednn), jax.tree.leaves(patches)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
