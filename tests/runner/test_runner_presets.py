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
    others = {"fedjax_emnist_benchmark", "digits_fedavg", "digits_dp_fedavg", "emnist_dp_fedavg"}
    assert names == set(REDDI) | others | set(SIGN_FLIP)


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


def _poisson_rdp_epsilon(z, rounds, sampled, population, delta):
    """dp-accounting's event for Poisson sampling under add-or-remove-one."""
    import dp_accounting

    event = dp_accounting.PoissonSampledDpEvent(
        sampled / population, dp_accounting.GaussianDpEvent(z)
    )
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    return accountant.compose(event, rounds).get_epsilon(delta)


def test_emnist_dp_preset_has_the_adaptive_clipping_of_andrew_et_al():
    """Andrew et al. 2021: C0 = 0.1, eta_C = 0.2, gamma = 0.5, m = 100, server momentum 0.9."""
    config = resolve(load_config(CONFIGS / "emnist_dp_fedavg.yaml"), backend="cpu")
    privacy = config.privacy
    assert privacy.adaptive_clipping and privacy.mechanism == "gaussian"
    assert (privacy.clip_norm, privacy.clip_learning_rate, privacy.target_quantile) == (
        0.1,
        0.2,
        0.5,
    )
    assert (config.algorithm.name, config.algorithm.momentum) == ("fedavgm", 0.9)
    training = config.training
    assert (training.cohort_size, training.sampling, training.rounds) == (100, "poisson", 1500)
    assert config.data.name == "federated_emnist" and config.model == "cnn"
    assert privacy.delta == min(1e-5, 3400**-1.1) == 1e-5  # the documented default
    assert privacy.adjacency == "add_or_remove_one"
    z = privacy.noise_multiplier
    assert _poisson_rdp_epsilon(z, 1500, 100, 3400, privacy.delta) <= 10.0
    assert _poisson_rdp_epsilon(z - 1e-3, 1500, 100, 3400, privacy.delta) > 10.0
    # sigma_b = m / 20 must exceed z / 2, or the update noise could not pay for the rest.
    assert 100 / 20 > z / 2


def test_digits_dp_preset_reaches_its_accuracy_at_epsilon_10(tmp_path):
    """docs/configs.md's claim: about 94% test accuracy at epsilon <= 10, delta 1e-5."""
    from fedjaxsim.runner.config import replace
    from fedjaxsim.runner.experiment import run_experiment

    config = replace(
        load_config(CONFIGS / "digits_dp_fedavg.yaml"),
        output_dir=str(tmp_path / "run"),
        **{"logging.progress": False, "checkpoint.every": 0, "evaluation.per_client_every": 0},
    )
    assert (config.data.num_clients, config.training.sampling) == (1000, "poisson")
    summary = run_experiment(config)
    assert summary["delta"] == 1e-5 and summary["final_epsilon"] <= 10.0
    z = summary["noise_multiplier"]
    assert summary["final_epsilon"] == pytest.approx(
        _poisson_rdp_epsilon(z, 200, 200, 1000, 1e-5), rel=1e-9
    )
    assert summary["final_test_accuracy"] >= 0.92
