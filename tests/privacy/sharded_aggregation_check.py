"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.

One FedAvg round per kind of aggregator (DP with noise: a streamed sum and
server noise, independent or from DP-FTRL's tree; secure aggregation with dropouts: a modular uint32 sum of
stacked rows; Krum: sorts and distances over stacked rows), each put on FedAvg
with ``with_aggregator``, on one device without a mesh and on an 8-device
client mesh, for a cohort of 11 clients (which 8 does not divide). Prints, as
JSON, the largest parameter difference and whether the server metrics agree.
"""

import json
import sys

import jax
import numpy as np
import optax

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.algorithm import with_aggregator
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.core.sharding import client_mesh, shard_cohort
from fedjaxsim.models import classification_loss, from_linen
from fedjaxsim.models.zoo import LogisticRegression
from fedjaxsim.privacy import dp_fed_avg_aggregator, secure_aggregator
from fedjaxsim.robust import krum

AGGREGATORS = {
    "dp_fed_avg": lambda: dp_fed_avg_aggregator(0.5, 1.0, expected_cohort_size=11),
    "dp_ftrl": lambda: dp_fed_avg_aggregator(
        0.5, 1.0, expected_cohort_size=11, mechanism="tree", tree_size=4, tree_seed=3
    ),
    "secure": lambda: secure_aggregator(1.0, dropout_rate=0.3, threshold_fraction=0.0),
    "krum": lambda: krum(num_byzantine=2),
}
# The median and the quantized mean (stacked like Krum, summed like DP) were
# checked the same way when written; they are left out to keep the suite short.


def main():
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    sizes = [1, 7, 23, 4, 16, 9, 30, 2, 11, 5, 13]
    clients = []
    for n in sizes:
        y = rng.integers(0, 5, n).astype(np.int32)
        clients.append({"x": rng.normal(size=(n, 12)).astype(np.float32) + y[:, None], "y": y})
    ids = list(range(100, 100 + len(sizes)))
    model = from_linen(LogisticRegression(num_classes=5))
    params = model.init(jax.random.key(0), np.zeros((1, 12), np.float32))
    cohort = pack_cohort(
        clients, ids, PackingConfig(batch_size=4), seed=0, round_index=0, num_total_clients=200
    )
    mesh = client_mesh()
    report = {}
    for name, build in AGGREGATORS.items():
        algorithm = with_aggregator(fed_avg(classification_loss(model), optax.sgd(0.1)), build())
        single, single_out = build_round(algorithm, ExecutionPlan())(
            algorithm.init(params), cohort, jax.random.key(1)
        )
        sharded, sharded_out = build_round(algorithm, ExecutionPlan(), mesh=mesh)(
            algorithm.init(params), shard_cohort(cohort, mesh), jax.random.key(1)
        )
        difference = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params))
        )
        moved = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(params))
        )
        metrics_equal = all(
            np.allclose(
                np.asarray(single_out.server_metrics[key]),
                np.asarray(sharded_out.server_metrics[key]),
                rtol=1e-6,
            )
            for key in single_out.server_metrics
        )
        report[name] = {
            "max_difference": difference,
            "moved": moved,
            "metrics_equal": bool(metrics_equal),
            "metrics": {key: float(value) for key, value in single_out.server_metrics.items()},
        }
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
