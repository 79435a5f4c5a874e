"""The README: its Quickstart commands, its example, and its links into the docs.

The claims that moved to the docs site are tested in tests/docs/ (commands,
presets, the layout, the functional-API example, the site build); the
default job that the Quickstart's first line runs is run end to end in
tests/runner/test_runner_main_job.py.
"""

import re
import tomllib
from pathlib import Path

from fedjaxsim.runner.config import ExperimentConfig, parse_run_arguments

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
QUICKSTART = [
    'pip install -e ".[run]" && fedjaxsim run',
    'pip install -e ".[test]" && python -m pytest -q',
]


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_quickstart_is_the_two_command_lines():
    assert _bash_lines(_section("Quickstart")) == QUICKSTART


def test_every_install_line_names_existing_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    lines = _bash_lines(README)
    assert len(lines) >= 3  # the Quickstart and the docs build
    for line in lines:
        for named in re.findall(r'pip install -e "\.\[([\w,]+)\]"', line):
            for extra in named.split(","):
                assert extra in extras, line
    assert any(requirement.startswith("pytest") for requirement in extras["test"])
    assert any(requirement.startswith("sphinx") for requirement in extras["docs"])


def test_quickstart_run_is_the_default_job():
    # `fedjaxsim` is the console script, and without arguments it runs the
    # default config (run end to end in tests/runner/test_runner_main_job.py),
    # which writes to the folder the README names.
    assert PYPROJECT["project"]["scripts"]["fedjaxsim"] == "fedjaxsim.runner.cli:main"
    config, resume_required = parse_run_arguments([])
    assert config == ExperimentConfig() and not resume_required
    assert config.algorithm.name == "fedavg" and config.data.name == "digits"
    assert (config.data.num_clients, config.data.alpha) == (100, 0.5)
    assert f"`{config.output_dir}/`" in _section("Quickstart")


def test_readme_example_trains(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    sums = namespace["sums"]
    accuracy = float(sums["num_correct"] / sums["num_examples"])
    # 10 classes: chance is 0.1; 20 rounds of FedAvgM reach far above it.
    assert accuracy > 0.7
    assert int(sums["num_examples"]) == namespace["data"].test.total_examples
    assert f"test accuracy {accuracy:.3f}" in capsys.readouterr().out


def test_readme_links_lead_to_the_docs_pages():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert local
    for link in local:
        assert (ROOT / link).is_file(), link
    linked = {Path(link) for link in local}
    docs = ROOT / "docs"
    pages = [*docs.glob("*.md"), *(docs / "concepts").glob("*.md")]
    for page in pages:
        if page.name != "index.md" and page.name != "benchmarks.md":  # benchmarks: RESULTS.md
            assert page.relative_to(ROOT) in linked, f"README does not link {page.name}"
