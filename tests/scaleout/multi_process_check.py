"""One process of a 2-process run on localhost (or the 1-process reference).

Usage: multi_process_check.py PROCESS_ID PROCESS_COUNT PORT LANES_PER_PROCESS|none
Prints the final parameters (as lists) and metrics as one JSON line.
"""

import json
import sys

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from fedjaxsim.algorithms.fed_avg import fed_avg
from fedjaxsim.core.engine import ExecutionPlan, build_round
from fedjaxsim.core.packing import PackingConfig
from fedjaxsim.core.sampling import sample_uniform
from fedjaxsim.core.sharding import (
    assemble_global_cohort,
    client_mesh,
    pack_process_share,
    process_block,
)
from fedjaxsim.models import classification_loss, from_linen
from fedjaxsim.models.zoo import LogisticRegression
from fedjaxsim.runner.distributed import initialize
from fedjaxsim.testing import synthetic_clients


def population():
    sizes = np.random.default_rng(0).integers(1, 30, size=40)
    return synthetic_clients(sizes.tolist())


def main():
    process_id, process_count, port = (int(a) for a in sys.argv[1:4])
    lanes_per_process = None if sys.argv[4] == "none" else int(sys.argv[4])
    if process_count > 1:
        initialize(f"127.0.0.1:{port}", process_count, process_id)
    clients = population()
    model = from_linen(LogisticRegression(num_classes=5))
    params = model.init(jax.random.key(0), np.zeros((1, 12), np.float32))
    algorithm = fed_avg(classification_loss(model), optax.adam(0.02), optax.sgd(1.0))
    config = PackingConfig(batch_size=4, num_epochs=2)
    mesh = client_mesh()
    # Lanes are a packing decision (pack_process_share's lanes_per_process).
    round_fn = build_round(algorithm, ExecutionPlan(), mesh=mesh)
    state = algorithm.init(params)
    examples = []
    for r in range(3):
        ids = sample_uniform(seed=1, round_index=r, num_total_clients=len(clients), cohort_size=9)
        share = process_block(len(ids), jax.process_index(), jax.process_count())
        local = pack_process_share(
            [clients[int(ids[i])] for i in share],
            ids,
            [len(clients[int(i)]["y"]) for i in ids],
            config,
            seed=1,
            round_index=r,
            num_total_clients=len(clients),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            local_device_count=jax.local_device_count(),
            lanes_per_process=lanes_per_process,
        )
        state, out = round_fn(state, assemble_global_cohort(local, mesh), jax.random.key(r))
        gathered = multihost_utils.process_allgather(out.client_metrics["num_examples"], tiled=True)
        examples.append(np.asarray(gathered).tolist())
    # Server state is replicated: every process holds a full copy.
    leaves = [
        np.asarray(leaf.addressable_data(0)).tolist() for leaf in jax.tree.leaves(state.params)
    ]
    print(json.dumps({"process": jax.process_index(), "params": leaves, "examples": examples}))


if __name__ == "__main__":
    main()
