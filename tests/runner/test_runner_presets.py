"""Every preset in configs/ parses and resolves to the published setup it documents."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from fedjaxsim.runner.config import (
    ExperimentConfig,
    flatten,
    load_config,
    parse_run_arguments,
    resolve,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Reddi et al. 2020 (arXiv:2003.00295), EMNIST CR: Table 10's base-10 log
# learning rates (client, server) and Table 11-style adaptivity; fixed
# protocol: 1,500 rounds, 10 clients, 1 epoch, batch 20.
REDDI = {
    "emnist_fedavg": ("fedavg", -1.0, 0.0, {}),
    "emnist_fedavgm": ("fedavgm", -1.5, -0.5, {"momentum": 0.9}),
    "emnist_fedadam": ("fedadam", -1.5, -2.5, {"b1": 0.9, "b2": 0.99, "eps": 1e-4}),
    "emnist_fedyogi": ("fedyogi", -1.5, -2.5, {"b1": 0.9, "b2": 0.99, "eps": 1e-4}),
    "emnist_fedadagrad": ("fedadagrad", -1.5, -1.0, {"b1": 0.9, "eps": 1e-2}),
}


# The robust-aggregation demo: a fifth of the 100 digits clients send -10x
# their update (sign flipping); the server averages, or takes the median.
SIGN_FLIP = {"digits_sign_flip_mean": "mean", "digits_sign_flip_median": "median"}


def test_every_preset_is_covered():
    names = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert names == set(REDDI) | {"fedjax_emnist_benchmark", "digits_fedavg"} | set(SIGN_FLIP)


@pytest.mark.parametrize("name", sorted(REDDI))
def test_reddi_presets(name):
    algorithm, log_client, log_server, extra = REDDI[name]
    config = resolve(load_config(CONFIGS / f"{name}.yaml"), backend="cpu")
    assert config.data.name == "federated_emnist"  # 62 classes, 3,400 writers
    assert config.model == "cnn"
    assert config.algorithm.name == algorithm
    assert config.algorithm.client_learning_rate == pytest.approx(10**log_client, rel=1e-15)
    assert config.algorithm.server_learning_rate == pytest.approx(10**log_server, rel=1e-15)
    for key, value in extra.items():
        assert getattr(config.algorithm, key) == value
    training = config.training
    assert (training.rounds, training.cohort_size) == (1500, 10)
    assert (training.local_epochs, training.batch_size) == (1, 20)
    assert training.max_local_steps is None
    assert config.output_dir == f"runs/{name.replace('_', '-')}"


def test_fedjax_benchmark_preset():
    config = resolve(load_config(CONFIGS / "fedjax_emnist_benchmark.yaml"), backend="cpu")
    assert (config.data.name, config.data.source, config.model) == (
        "federated_emnist",
        "fedjax",
        "cnn",
    )
    algorithm = config.algorithm
    assert algorithm.name == "fedadam"
    assert (algorithm.client_learning_rate, algorithm.server_learning_rate) == (0.001, 1.0)
    assert (algorithm.b1, algorithm.b2, algorithm.eps) == (0.9, 0.99, 0.01)
    training = config.training
    assert (training.rounds, training.cohort_size) == (1500, 10)
    assert (training.local_epochs, training.batch_size) == (1, 10)
    assert config.evaluation.every == 5


def test_digits_preset_is_the_embedded_default():
    assert resolve(load_config(CONFIGS / "digits_fedavg.yaml"), backend="cpu") == resolve(
        ExperimentConfig(), backend="cpu"
    )


@pytest.mark.parametrize("name", sorted(SIGN_FLIP))
def test_sign_flip_presets(name, monkeypatch):
    path = CONFIGS / f"{name}.yaml"
    config = resolve(load_config(path), backend="cpu")
    assert (config.data.name, config.data.num_clients) == ("digits", 100)
    assert config.aggregator.name == SIGN_FLIP[name]
    attack = config.attack
    assert (attack.name, attack.fraction, attack.scale) == ("sign_flip", 0.2, 10.0)
    assert config.training.cohort_size * attack.fraction == 2  # two attackers per cohort on average
    assert config.output_dir == f"runs/{name.replace('_', '-')}"
    # The two presets differ in the aggregator (and the output folder) only.
    other = load_config(CONFIGS / f"{(set(SIGN_FLIP) - {name}).pop()}.yaml")
    different = {
        key
        for key, value in flatten(dataclasses.asdict(load_config(path))).items()
        if flatten(dataclasses.asdict(other)).get(key) != value
    }
    assert different == {"aggregator.name", "output_dir"}
    # The commands in the preset's comments parse, from the repository root.
    monkeypatch.chdir(CONFIGS.parent)
    text = path.read_text().replace("\\\n#", " ")
    commands = re.findall(r"^#\s+fedjaxsim run (.*)$", text, flags=re.MULTILINE)
    assert commands
    for command in commands:
        parsed, _ = parse_run_arguments(shlex.split(command))
        assert parsed.attack.name in ("sign_flip", "none")
