"""The README's functional-API example runs and equals the built-in FedAvgM."""

import re
from pathlib import Path

import jax
import numpy as np

from fedjaxsim import (
    ExecutionPlan,
    PackingConfig,
    build_round,
    fed_avg_m,
    pack_cohort,
    sample_uniform,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_equals_builtin_server_momentum():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    state = namespace["state"]

    data, model = namespace["data"], namespace["model"]
    builtin = fed_avg_m(
        namespace["classification_loss"](model),
        client_learning_rate=0.1,
        server_learning_rate=0.5,
        momentum=0.9,
    )
    round_fn = build_round(builtin, ExecutionPlan())
    expected = builtin.init(model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32)))
    for r in range(5):
        ids = sample_uniform(seed=0, round_index=r, num_total_clients=100, cohort_size=10)
        cohort = pack_cohort(
            data.train.clients(ids),
            ids,
            PackingConfig(batch_size=10),
            seed=0,
            round_index=r,
            num_total_clients=100,
        )
        expected, _ = round_fn(expected, cohort, jax.random.key(r))
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(got, want, atol=2e-6)
    moved = max(
        float(np.abs(g - w).max())
        for g, w in zip(
            jax.tree.leaves(state.params),
            jax.tree.leaves(model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))),
        )
    )
    assert moved > 1e-2
