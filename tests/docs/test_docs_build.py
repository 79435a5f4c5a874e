"""The docs site builds with warnings as errors, and every page is on it.

One ``sphinx-build -W --keep-going -b html`` of ``docs/`` into a temporary
folder, in a subprocess (so that pytest's ``filterwarnings = error`` does not
turn a deprecation inside Sphinx into a failure, and the build sees a fresh
interpreter, as ``sphinx-build`` on the command line does). Sphinx warns
about a page that no toctree reaches ("document isn't included in any
toctree"), a broken cross-document link and a docstring that docutils cannot
parse; with ``-W`` each of them fails the build. The build takes about 20 s
on 2 CPU cores (autodoc imports the whole package; notebooks are not
executed, see ``tests/docs/test_notebooks.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("myst_nb", reason='pip install -e ".[docs]"')
pytest.importorskip("furo", reason='pip install -e ".[docs]"')

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BUILD_TIMEOUT_S = 600


def _sources() -> list[Path]:
    """Every page of the site: Markdown and notebooks under docs/, outside _build."""
    pages = [*DOCS.rglob("*.md"), *DOCS.rglob("*.ipynb")]
    return sorted(
        page
        for page in pages
        if "_build" not in page.relative_to(DOCS).parts and ".ipynb_checkpoints" not in page.parts
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site's folder."""
    out = tmp_path_factory.mktemp("docs")
    html = out / "html"
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "-d",
        str(out / "doctrees"),
        str(DOCS),
        str(html),
    ]
    start = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, (
        f"sphinx-build failed after {seconds:.0f} s:\n{result.stderr[-8000:]}"
    )
    return html


def test_build_has_the_key_pages(site):
    for page in (
        "index.html",
        "getting_started.html",
        "cli.html",
        "configs.html",
        "benchmarks.html",
        "tutorials/index.html",
        "concepts/index.html",
        "api/index.html",
        "api/fedjaxsim.html",
        "api/core.html",
        "api/engine.html",
        "api/algorithms.html",
        "api/models.html",
        "api/data.html",
        "api/privacy.html",
        "api/robust.html",
        "api/compression.html",
        "api/runner.html",
    ):
        assert (site / page).is_file(), page


def test_every_source_page_is_built(site):
    # Sphinx only warns about a page outside every toctree, which -W turns
    # into a failed build; here each source must also have come out as HTML.
    for source in _sources():
        page = source.relative_to(DOCS).with_suffix(".html")
        assert (site / page).is_file(), f"{source.relative_to(ROOT)} was not built"


def test_tutorials_index_lists_every_notebook(site):
    index = (site / "tutorials" / "index.html").read_text()
    notebooks = sorted((DOCS / "tutorials").glob("*.ipynb"))
    for notebook in notebooks:
        assert f'href="{notebook.stem}.html"' in index, notebook.name


def test_api_pages_document_the_public_modules(site):
    expected = {
        "fedjaxsim.html": ["fedjaxsim"],
        "algorithms.html": [
            "fedjaxsim.algorithms.fed_avg.fed_avg",
            "fedjaxsim.algorithms.scaffold.scaffold",
        ],
        "core.html": [
            "fedjaxsim.core.aggregators.Aggregator",
            "fedjaxsim.core.algorithm.Algorithm",
            "fedjaxsim.core.packing.pack_cohort",
            "fedjaxsim.core.sampling.sample_uniform",
            "fedjaxsim.core.client_state.ClientStateStore",
            "fedjaxsim.core.evaluation.batch_for_eval",
            "fedjaxsim.core.losses.classification_loss",
            "fedjaxsim.core.tasks.task_loss",
            "fedjaxsim.core.tasks.metric_sums",
        ],
        "engine.html": [
            "fedjaxsim.core.engine.round.build_round",
            "fedjaxsim.core.engine.plan.ExecutionPlan",
        ],
        "models.html": [
            "fedjaxsim.models.get_model",
            "fedjaxsim.models.model.from_linen",
            "fedjaxsim.models.sequence.CharLstm",
            "fedjaxsim.models.resnet.ResNet18",
        ],
        "data.html": [
            "fedjaxsim.data.digits.federated_digits",
            "fedjaxsim.data.shakespeare.load_shakespeare",
            "fedjaxsim.data.fed_cifar100.load_fed_cifar100",
        ],
        "privacy.html": [
            "fedjaxsim.privacy.dp.dp_fed_avg_aggregator",
            "fedjaxsim.privacy.accounting.compute_epsilon",
            "fedjaxsim.privacy.secure_aggregation.secure_aggregator",
        ],
        "robust.html": ["fedjaxsim.robust.aggregators.coordinate_median"],
        "compression.html": ["fedjaxsim.compression.aggregators.compressed"],
        "runner.html": [
            "fedjaxsim.runner.config.ExperimentConfig",
            "fedjaxsim.runner.experiment.run_experiment",
            "fedjaxsim.runner.plot.plot_runs",
        ],
    }
    for page, names in expected.items():
        text = (site / "api" / page).read_text()
        for name in names:
            assert f'id="{name}"' in text or f'id="module-{name}"' in text, (page, name)


def test_benchmarks_page_holds_the_results(site):
    text = (site / "benchmarks.html").read_text()
    for source in ("RESULTS.md", "RESULTS_packing.md"):
        first_heading = re.search(r"^# (.+)$", (ROOT / "benchmarks" / source).read_text(), re.M)
        title = re.sub(r"`", "", first_heading.group(1))
        assert title.split("(")[0].strip() in re.sub(r"<[^>]+>", "", text), source
