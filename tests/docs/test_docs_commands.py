"""The command lines of the docs and the README work as written.

Every ``fedjaxsim run`` line in a ``bash`` block of a docs page or the README
parses and resolves (accounting included, so each one would also start); the
ones the text describes resolve to what it says; every ``fedjaxsim plot``
line draws its figure; and the presets page names every preset in configs/.
(``predict``, ``evaluate`` and ``data inspect``, the docs' lines included, are run
in tests/runner/test_runner_predict.py.)
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import parse_run_arguments, resolve

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts),
]


def _commands(program: str) -> list[list[str]]:
    """The arguments of every ``program`` line in a bash block, after the program name."""
    commands = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith(f"{program} "):
                    commands.append(shlex.split(line)[1:])
    return commands


def test_config_command_parses(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = [c for c in _commands("fedjaxsim") if c[0] == "run" and "emnist_fedadam" in str(c)]
    assert commands
    for command in commands:
        config, _ = parse_run_arguments(command[1:])
        assert config.algorithm.name == "fedadam"
        assert config.training.rounds == 100  # overridden on the command line
        assert config.training.batch_size == 20  # from the preset
        assert config.output_dir == "runs/try"


def test_run_commands_resolve_to_what_the_text_says(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = [c for c in _commands("fedjaxsim") if c[0] == "run"]
    # Resolved as a run would be (accounting included), so each command also starts.
    parsed = [resolve(parse_run_arguments(command[1:])[0], "cpu") for command in commands]
    by_output = {config.output_dir: config for config in parsed}
    assert by_output["runs/digits-fedavg"].algorithm.name == "fedavg"  # the default job
    assert by_output["runs/digits-dp-fedavg"].privacy.target_epsilon == 10.0
    assert by_output["runs/dp-try"].training.sampling == "poisson"
    assert by_output["runs/dp-try"].privacy.noise_multiplier == 1.0
    assert by_output["runs/dp-adaptive"].privacy.adaptive_clipping
    assert by_output["runs/dp-ftrl"].privacy.mechanism == "tree"
    assert by_output["runs/secagg"].secure_aggregation.enabled
    assert by_output["runs/topk"].compression.name == "topk"
    assert by_output["runs/digits-sign-flip-mean"].attack.name == "sign_flip"
    assert by_output["runs/digits-sign-flip-median"].aggregator.name == "median"


def test_presets_page_names_every_preset():
    text = (DOCS / "configs.md").read_text()
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for path in presets:
        assert f"`{path.stem}`" in text, path.stem


PLOT_COMMANDS = [c for c in _commands("fedjaxsim") if c[0] == "plot"]


def test_the_docs_show_plot_commands():
    assert PLOT_COMMANDS


@pytest.mark.parametrize("command", PLOT_COMMANDS, ids=" ".join)
def test_plot_command_runs(command, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for folder in command[1:]:
        if not folder.startswith("-") and folder.startswith("runs/"):
            Path(folder).mkdir(parents=True)
            record = {
                "round": 1,
                "train_loss": 1.0,
                "test_accuracy": 0.5,
                "test_loss": 1.0,
                "elapsed_seconds": 1.0,
            }
            (Path(folder) / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert main(command) == 0
    output = command[command.index("--output") + 1]
    assert Path(output).read_bytes()[:4] == b"\x89PNG"
