"""The README's runner commands work as written."""

import json
import re
import shlex
from pathlib import Path

from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import parse_run_arguments, resolve

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _commands(program):
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith(f"{program} ")]


def test_readme_config_command_parses(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = [c for c in _commands("fedjaxsim") if c[0] == "run" and "emnist_fedadam" in str(c)]
    assert commands
    for command in commands:
        config, _ = parse_run_arguments(command[1:])
        assert config.algorithm.name == "fedadam"
        assert config.training.rounds == 100  # overridden on the command line
        assert config.training.batch_size == 20  # from the preset
        assert config.output_dir == "runs/try"


def test_readme_privacy_commands_parse_to_what_the_text_says(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = [c for c in _commands("fedjaxsim") if c[0] == "run"]
    # Resolved as a run would be (accounting included), so each command also starts.
    parsed = [resolve(parse_run_arguments(command[1:])[0], "cpu") for command in commands]
    by_output = {config.output_dir: config for config in parsed}
    assert by_output["runs/digits-dp-fedavg"].privacy.target_epsilon == 10.0
    assert by_output["runs/dp-try"].training.sampling == "poisson"
    assert by_output["runs/dp-try"].privacy.noise_multiplier == 1.0
    assert by_output["runs/dp-adaptive"].privacy.adaptive_clipping
    assert by_output["runs/dp-ftrl"].privacy.mechanism == "tree"
    assert by_output["runs/secagg"].secure_aggregation.enabled
    assert by_output["runs/topk"].compression.name == "topk"


def test_readme_names_every_preset():
    for path in (ROOT / "configs").glob("*.yaml"):
        assert f"`{path.stem}`" in README, path.stem


def test_readme_plot_command_runs(monkeypatch, tmp_path):
    command = next(c for c in _commands("fedjaxsim") if c[0] == "plot")
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
    assert Path("compare.png").read_bytes()[:4] == b"\x89PNG"
