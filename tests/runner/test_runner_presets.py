"""Every preset in configs/ parses and resolves to the published setup it documents."""

import dataclasses
import re
import shlex
from pathlib import Path
from typing import NamedTuple

import pytest

from fedjaxsim.runner.config import (
    ExperimentConfig,
    flatten,
    load_config,
    parse_run_arguments,
    resolve,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR 2021,
# arXiv:2003.00295), laid out as their tables: one row per task, one column
# per method, base-10 logarithms. Table 10: the tuned client and server
# learning rates; Table 11: the adaptivity tau of the adaptive methods.
# google-research/federated optimization/docs/hyperparameters.md lists the same
# numbers. Section 5 fixes the rest: FedAvgM momentum 0.9; FedAdam and FedYogi
# beta1 0.9, beta2 0.99; b1 0.9 is the first moment of FedAdagrad in their
# Algorithm 2.
METHODS = ("fedadagrad", "fedadam", "fedyogi", "fedavgm", "fedavg")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
TABLE_10_CLIENT = {
    "emnist": (-1.5, -1.5, -1.5, -1.5, -1),
    "shakespeare": (0, 0, 0, 0, 0),
    "stackoverflow_nwp": (-0.5, -0.5, -0.5, -0.5, -0.5),
    "stackoverflow_tp": (2, 2, 2, 2, 2),  # "SO LR" in the paper
    "cifar100": (-1, -1.5, -1.5, -1.5, -1),
}
TABLE_10_SERVER = {
    "emnist": (-1, -2.5, -2.5, -0.5, 0),
    "shakespeare": (-0.5, -2, -2, -0.5, 0),
    "stackoverflow_nwp": (-1.5, -2, -2, 0, 0),
    "stackoverflow_tp": (1, -0.5, -0.5, 0, 0),
    "cifar100": (-1, 0, 0, 0, 0.5),
}
TABLE_11_TAU = {
    "emnist": (-2, -4, -4),
    "shakespeare": (-1, -3, -3),
    "stackoverflow_nwp": (-4, -5, -5),
    "stackoverflow_tp": (-2, -5, -5),
    "cifar100": (-2, -1, -1),
}


class Protocol(NamedTuple):
    """A task of Reddi et al.: Section 5, the Appendix and their code."""

    data: str
    model: str
    rounds: int
    cohort_size: int
    batch_size: int  # one local epoch everywhere
    example_cap: int | None  # examples a client trains on per round
    weighting: str  # what their code weights clients by (see the presets)


REDDI_TASKS = {
    "emnist": Protocol("federated_emnist", "cnn", 1500, 10, 20, None, "num_examples"),
    "shakespeare": Protocol("shakespeare", "char_lstm", 1200, 10, 4, None, "num_tokens"),
    "stackoverflow_nwp": Protocol(
        "stackoverflow_nwp", "word_lstm", 1500, 50, 16, 256, "num_processed"
    ),
    "stackoverflow_tp": Protocol(
        "stackoverflow_tp", "tag_logreg", 1500, 10, 100, 1000, "num_processed"
    ),
    "cifar100": Protocol("fed_cifar100", "resnet18", 4000, 10, 20, None, "num_examples"),
}
REDDI = {f"{task}_{method}": (task, method) for task in REDDI_TASKS for method in METHODS}


class FedjaxBenchmark(NamedTuple):
    """FedJAX's experiment flags, google/fedjax experiments/fed_avg/fed_avg.TASK.flags."""

    data: str
    source: str | None  # None: the family has no source key
    model: str
    algorithm: str
    client_learning_rate: float
    server_learning_rate: float
    adaptivity: dict
    rounds: int
    cohort_size: int
    batch_size: int  # one local epoch (ShuffleRepeatBatchHParams default)
    max_local_steps: int | None  # client_training_num_steps
    eval_every: int


FEDJAX = {
    # fed_avg.EMNIST_CONV.flags
    "fedjax_emnist_benchmark": FedjaxBenchmark(
        "federated_emnist", "fedjax", "cnn", "fedadam", 0.001, 1.0,
        {"b1": 0.9, "b2": 0.99, "eps": 0.01}, 1500, 10, 10, None, 5,
    ),
    # fed_avg.SHAKESPEARE_CHARACTER.flags
    "fedjax_shakespeare_benchmark": FedjaxBenchmark(
        "shakespeare", "fedjax", "char_lstm", "fedavg", 0.03162278, 1.0, {}, 1500, 10, 10, None, 5
    ),
    # fed_avg.STACKOVERFLOW_WORD.flags; no eval_frequency: only the final evaluation
    "fedjax_stackoverflow_benchmark": FedjaxBenchmark(
        "stackoverflow_nwp", None, "word_lstm", "fedadam", 0.5, 0.02,
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8}, 1500, 50, 16, 500, 1500,
    ),
    # fed_avg.CIFAR100_LOGISTIC.flags
    "fedjax_cifar100_benchmark": FedjaxBenchmark(
        "fed_cifar100", "fedjax", "logreg", "fedyogi", 0.01, 0.1,
        {"b1": 0.9, "b2": 0.999, "eps": 0.01}, 4000, 10, 20, None, 10,
    ),
}  # fmt: skip


# The robust-aggregation demo: a fifth of the 100 digits clients send -10x
# their update (sign flipping); the server averages, or takes the median.
SIGN_FLIP = {"digits_sign_flip_mean": "mean", "digits_sign_flip_median": "median"}


def test_every_preset_is_covered():
    names = {path.stem for path in CONFIGS.glob("*.yaml")}
    others = {"digits_fedavg", "digits_dp_fedavg", "emnist_dp_fedavg", "shakespeare_gpt2_lora"}
    assert names == set(REDDI) | set(FEDJAX) | others | set(SIGN_FLIP)


def test_the_tables_have_a_cell_for_every_method():
    assert set(TABLE_10_CLIENT) == set(TABLE_10_SERVER) == set(TABLE_11_TAU) == set(REDDI_TASKS)
    assert all(len(row) == len(METHODS) for row in TABLE_10_CLIENT.values())
    assert all(len(row) == len(METHODS) for row in TABLE_10_SERVER.values())
    assert all(len(row) == len(ADAPTIVE) for row in TABLE_11_TAU.values())


@pytest.mark.parametrize("name", sorted(REDDI))
def test_reddi_presets(name):
    task, method = REDDI[name]
    protocol, column = REDDI_TASKS[task], METHODS.index(method)
    path = CONFIGS / f"{name}.yaml"
    config = resolve(load_config(path), backend="cpu")
    assert config.data.name == protocol.data
    assert config.model.name == protocol.model
    algorithm = config.algorithm
    assert algorithm.name == method
    log_client, log_server = TABLE_10_CLIENT[task][column], TABLE_10_SERVER[task][column]
    assert algorithm.client_learning_rate == pytest.approx(10**log_client, rel=1e-15)
    assert algorithm.server_learning_rate == pytest.approx(10**log_server, rel=1e-15)
    if method == "fedavgm":
        assert algorithm.momentum == 0.9
    if method in ADAPTIVE:
        log_tau = TABLE_11_TAU[task][ADAPTIVE.index(method)]
        assert algorithm.eps == pytest.approx(10**log_tau, rel=1e-15)
        assert algorithm.b1 == 0.9
    if method in ("fedadam", "fedyogi"):
        assert algorithm.b2 == 0.99
    training = config.training
    assert (training.rounds, training.cohort_size) == (protocol.rounds, protocol.cohort_size)
    assert (training.local_epochs, training.batch_size) == (1, protocol.batch_size)
    if protocol.example_cap is None:
        assert training.max_local_steps is None
    else:  # the cap, as whole batches of one epoch
        assert training.max_local_steps * training.batch_size == protocol.example_cap
    assert training.weighting == protocol.weighting
    if protocol.data.startswith("stackoverflow"):
        # Evaluated on 10,000 examples sampled from the test split.
        assert (config.data.eval_split, config.data.test_examples) == ("test", 10_000)
    else:
        assert config.data.source == "tff"
    if protocol.data == "shakespeare":
        assert config.data.sequence_length == 80
    assert config.output_dir == f"runs/{name.replace('_', '-')}"
    assert f"#   fedjaxsim run --config configs/{name}.yaml\n" in path.read_text()


@pytest.mark.parametrize("name", sorted(FEDJAX))
def test_fedjax_benchmark_presets(name):
    expected = FEDJAX[name]
    config = resolve(load_config(CONFIGS / f"{name}.yaml"), backend="cpu")
    assert (config.data.name, getattr(config.data, "source", None), config.model.name) == (
        expected.data,
        expected.source,
        expected.model,
    )
    algorithm = config.algorithm
    assert algorithm.name == expected.algorithm
    assert (algorithm.client_learning_rate, algorithm.server_learning_rate) == (
        expected.client_learning_rate,
        expected.server_learning_rate,
    )
    for key, value in expected.adaptivity.items():
        assert getattr(algorithm, key) == value
    if expected.adaptivity:  # optax's adam and yogi, as FedJAX's optimizers
        assert algorithm.form == "bias_corrected"
    training = config.training
    assert (training.rounds, training.cohort_size) == (expected.rounds, expected.cohort_size)
    assert (training.local_epochs, training.batch_size) == (1, expected.batch_size)
    assert training.max_local_steps == expected.max_local_steps
    assert training.weighting == "num_examples"  # fedjax.algorithms.fed_avg
    assert config.evaluation.every == expected.eval_every
    if expected.data == "stackoverflow_nwp":  # full_test_eval: the whole test split
        assert (config.data.eval_split, config.data.test_examples) == ("test", None)
    assert config.output_dir == f"runs/{name.replace('_', '-')}"


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
    assert config.data.name == "federated_emnist" and config.model.name == "cnn"
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
