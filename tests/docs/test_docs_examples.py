"""The Python examples of the docs pages run, and the functional-API example is FedAvgM.

Every ``python`` block of a page runs, in page order, in one namespace per
page (fragments that are not meant to run on their own, such as the
multi-host sketch, are ``{code-block} python`` directives instead). The
algorithm written from scratch in ``docs/concepts/clients_as_an_axis.md``
must equal the built-in ``fed_avg_m``.
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjaxsim import (
    Algorithm,
    ExecutionPlan,
    PackingConfig,
    build_round,
    fed_avg_m,
    pack_cohort,
    sample_uniform,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FUNCTIONAL_API = DOCS / "concepts" / "clients_as_an_axis.md"


def _blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


PAGES_WITH_EXAMPLES = sorted(
    page
    for page in DOCS.rglob("*.md")
    if "_build" not in page.relative_to(DOCS).parts and _blocks(page)
)
_namespaces: dict[Path, dict] = {}


def _run(page: Path) -> dict:
    """Runs a page's python blocks once per test session; returns its namespace."""
    if page not in _namespaces:
        namespace: dict = {}
        for index, block in enumerate(_blocks(page)):
            name = f"{page.relative_to(ROOT)} (python block {index + 1})"
            exec(compile(block, name, "exec"), namespace)  # noqa: S102
        _namespaces[page] = namespace
    return _namespaces[page]


def test_the_functional_api_page_has_its_examples():
    assert FUNCTIONAL_API in PAGES_WITH_EXAMPLES
    assert len(_blocks(FUNCTIONAL_API)) == 2  # composition, then the algorithm from scratch


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)  # pages name repository files from its root
    _run(page)


def test_composition_example_builds_algorithms():
    namespace = _run(FUNCTIONAL_API)
    for name in ("dp_scaffold", "robust_ditto"):
        assert isinstance(namespace[name], Algorithm), name


def test_algorithm_from_scratch_equals_builtin_server_momentum():
    namespace = _run(FUNCTIONAL_API)
    state = namespace["state"]
    data, model = namespace["data"], namespace["model"]
    builtin = fed_avg_m(
        namespace["classification_loss"](model),
        client_learning_rate=0.1,
        server_learning_rate=0.5,
        momentum=0.9,
    )
    round_fn = build_round(builtin, ExecutionPlan())
    initial = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    expected = builtin.init(initial)
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
        for g, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial))
    )
    assert moved > 1e-2


def test_language_model_example_trains_only_the_adapters():
    from fedjaxsim.models.lora import ADAPTER_NAMES

    namespace = _run(DOCS / "concepts" / "language_models.md")
    leaves = jax.tree_util.tree_leaves_with_path(namespace["state"].params)
    assert leaves and {path[-1].key for path, _ in leaves} == set(ADAPTER_NAMES)
    assert namespace["text"].shape == (1, 8)
