"""Typed configs: YAML files, CLI overrides, resolution, and errors that name the key."""

import dataclasses
import inspect

import pytest

from fedjaxsim.algorithms import fed_adagrad, fed_adam, fed_avg_m
from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import (
    ALGORITHM_SPECS,
    ConfigError,
    ExperimentConfig,
    algorithm_defaults,
    config_from_dict,
    dump_config,
    load_config,
    parse_run_arguments,
    resolve,
    validate,
)


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_cli_overrides_then_resolution(tmp_path):
    path = _yaml(
        tmp_path,
        "model: dense\n"
        "algorithm: {name: fedadam, client_learning_rate: 1e-2}\n"  # PyYAML: a string
        "training: {rounds: 12, cohort_size: 7}\n"
        "execution: {num_lanes: 2}\n",
    )
    config, resume = parse_run_arguments(
        [
            "--config",
            str(path),
            "--training.rounds",
            "5",
            "--server-lr",
            "0.02",
            "--quiet",
            "--evaluation.per-client-every",
            "0",
        ]
    )
    assert resume is False
    assert config.model == "dense"  # from the file
    assert config.training.rounds == 5  # the CLI wins over the file
    assert config.training.cohort_size == 7
    assert config.algorithm.client_learning_rate == 0.01
    assert config.algorithm.server_learning_rate == 0.02
    assert config.logging.progress is False
    resolved = resolve(config, backend="cpu")
    # Unset hyper-parameters take fed_adam's own defaults.
    signature = inspect.signature(fed_adam).parameters
    assert resolved.algorithm.b1 == signature["b1"].default == 0.9
    assert resolved.algorithm.b2 == signature["b2"].default == 0.99
    assert resolved.algorithm.eps == signature["eps"].default == 1e-4
    assert resolved.algorithm.momentum is None  # not a hyper-parameter of fedadam
    assert resolved.data.num_clients == 100 and resolved.data.alpha == 0.5
    assert resolved.execution.num_lanes == 2
    from fedjaxsim.core.engine import default_plan

    for backend in ("cpu", "gpu"):  # unset plan fields take default_plan()'s
        plan = default_plan(backend)
        execution = resolve(ExperimentConfig(), backend=backend).execution
        assert execution.num_lanes == (plan.num_lanes or "per_client")
        assert execution.clients_per_chunk == plan.clients_per_chunk
        assert (execution.scan_unroll, execution.conv_lowering) == (
            plan.scan_unroll,
            plan.conv_lowering,
        )
    assert resolved.execution.conv_lowering == "patches"  # default_plan("cpu")
    assert resolved.evaluation.per_client_every == 0
    assert resolve(resolved, backend="cpu") == resolved  # idempotent
    # The resolved YAML written to the output folder loads back unchanged.
    assert load_config(_yaml(tmp_path, dump_config(resolved))) == resolved


def test_no_arguments_is_the_embedded_digits_default():
    config, _ = parse_run_arguments([])
    assert config == ExperimentConfig()
    assert (config.data.name, config.model, config.algorithm.name) == ("digits", "cnn", "fedavg")
    assert (config.training.rounds, config.training.cohort_size) == (60, 10)
    assert (config.training.local_epochs, config.training.batch_size) == (2, 10)
    resolved = resolve(config, backend="cpu")
    assert resolved.algorithm.client_learning_rate == 0.1
    assert resolved.algorithm.server_learning_rate == 1.0


def test_short_aliases_match_the_dotted_keys():
    short, _ = parse_run_arguments(
        [
            "--dataset",
            "digits",
            "--num-clients",
            "50",
            "--dirichlet-alpha",
            "0.3",
            "--algorithm",
            "fedavgm",
            "--client-lr",
            "0.05",
            "--rounds",
            "3",
            "--cohort-size",
            "4",
            "--local-epochs",
            "1",
            "--batch-size",
            "8",
            "--eval-every",
            "2",
            "--num-lanes",
            "2",
            "--clients-per-chunk",
            "4",
            "--max-local-steps",
            "6",
            "--seed",
            "3",
        ]
    )
    dotted, _ = parse_run_arguments(
        [
            "--data.name",
            "digits",
            "--data.num-clients",
            "50",
            "--data.alpha",
            "0.3",
            "--algorithm.name",
            "fedavgm",
            "--algorithm.client-learning-rate",
            "0.05",
            "--training.rounds",
            "3",
            "--training.cohort-size",
            "4",
            "--training.local-epochs",
            "1",
            "--training.batch-size",
            "8",
            "--evaluation.every",
            "2",
            "--execution.num-lanes",
            "2",
            "--execution.clients-per-chunk",
            "4",
            "--training.max-local-steps",
            "6",
            "--seed",
            "3",
        ]
    )
    assert short == dotted
    assert short.data.num_clients == 50 and short.training.max_local_steps == 6


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("training: {roundz: 5}", "training.roundz", "did you mean 'rounds'"),
        ("trainin: {rounds: 5}", "trainin", "did you mean 'training'"),
        ("training: {rounds: ten}", "training.rounds", "expected an integer, got 'ten'"),
        ("training: {rounds: 1.5}", "training.rounds", "expected an integer, got 1.5"),
        ("seed: true", "seed", "expected an integer, got True"),
        ("model: resnet", "model", "expected one of 'cnn', 'dense', 'logreg'"),
        (
            "algorithm: {client_learning_rate: fast}",
            "algorithm.client_learning_rate",
            "expected a number or null",
        ),
        ("training: 3", "training", "expected a mapping"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(_yaml(tmp_path, text))
    assert error.value.key == key
    assert fragment in str(error.value) and "c.yaml" in str(error.value)


@pytest.mark.parametrize(
    "values, key, fragment",
    [
        ({"training": {"rounds": -1}}, "training.rounds", "positive integer, got -1"),
        (
            {"training": {"cohort_size": 500}},
            "training.cohort_size",
            "cohort_size=500 is larger than num_clients=100",
        ),
        (
            {"data": {"name": "federated_emnist"}, "training": {"cohort_size": 3401}},
            "training.cohort_size",
            "larger than num_clients=3400",
        ),
        ({"data": {"source": "fedjax"}}, "data.source", "does not apply to dataset 'digits'"),
        (
            {"data": {"name": "federated_emnist", "num_clients": 10}},
            "data.num_clients",
            "does not apply",
        ),
        ({"data": {"partition": "iid"}}, "data.partition", "Dirichlet label skew only"),
        (
            {"algorithm": {"momentum": 0.9}},
            "algorithm.momentum",
            "is not a hyper-parameter of fedavg",
        ),
        (
            {"algorithm": {"name": "fedprox", "client_learning_rate": 0.1}},
            "algorithm.proximal_mu",
            "is required for fedprox",
        ),
        (
            {"algorithm": {"client_learning_rate": -0.1}},
            "algorithm.client_learning_rate",
            "finite number > 0",
        ),
        ({"algorithm": {"name": "fedavgm", "momentum": 1.0}}, "algorithm.momentum", "< 1"),
        ({"evaluation": {"every": 0}}, "evaluation.every", "positive integer"),
        ({"checkpoint": {"keep": 0}}, "checkpoint.keep", "positive integer"),
        ({"execution": {"num_lanes": 0}}, "execution.num_lanes", "positive integer"),
    ],
)
def test_invalid_values_name_the_key(values, key, fragment):
    with pytest.raises(ConfigError) as error:
        validate(config_from_dict(values))
    assert error.value.key == key
    assert fragment in str(error.value)


def test_configs_built_in_python_are_type_checked_too():
    bad = dataclasses.replace(
        ExperimentConfig(),
        training=dataclasses.replace(ExperimentConfig().training, rounds="10"),
    )
    with pytest.raises(ConfigError, match="training.rounds: expected an integer"):
        validate(bad)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rounds", "-1"], "training.rounds: must be a positive integer, got -1"),
        (["--cohort-size", "500"], "cohort_size=500 is larger than num_clients=100"),
        (["--client-lr", "-0.1"], "algorithm.client_learning_rate"),
        (["--batch-size", "0"], "training.batch_size"),
        (["--dirichlet-alpha", "0"], "data.alpha"),
    ],
)
def test_invalid_options_fail_before_any_work(tmp_path, capsys, arguments, message):
    assert main(["run", "--output-dir", str(tmp_path / "out"), "--quiet", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--model", "resnet"], "invalid choice 'resnet'"),
        (["--training.roundz", "5"], "--training.roundz"),
        (["--rounds", "ten"], "--rounds/--training.rounds"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser_naming_the_flag(
    tmp_path, capsys, arguments, fragment
):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--output-dir", str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_algorithm_resolves_to_its_builders_defaults():
    builders = {"fedadam": fed_adam, "fedavgm": fed_avg_m, "fedadagrad": fed_adagrad}
    for name, builder in builders.items():
        parameters = inspect.signature(builder).parameters
        for hparam, default in algorithm_defaults(name).items():
            assert default == parameters[hparam].default
    required = {
        "fedprox": {"client_learning_rate": 0.05, "proximal_mu": 0.01},
        "scaffold": {"client_learning_rate": 0.05},
        "fednova": {"client_learning_rate": 0.05},
        "mime_lite": {"client_learning_rate": 0.05},
        "qffl": {"client_learning_rate": 0.05, "q": 1.0},
        "ditto": {
            "client_learning_rate": 0.05,
            "personal_learning_rate": 0.05,
            "regularization": 0.1,
        },
    }
    for name in ALGORITHM_SPECS:
        config = config_from_dict({"algorithm": {"name": name, **required.get(name, {})}})
        resolved = resolve(config, backend="cpu").algorithm
        for hparam in ALGORITHM_SPECS[name].hparams:
            value = getattr(resolved, hparam)
            assert value is not None or (name, hparam) == ("qffl", "lipschitz_constant")


def test_the_config_vocabulary_matches_the_libraries():
    import typing

    from fedjaxsim.data.registry import DATASETS
    from fedjaxsim.models import MODEL_NAMES
    from fedjaxsim.runner.config import AlgorithmName, DatasetName, ModelName

    assert set(typing.get_args(DatasetName)) == set(DATASETS)
    assert set(typing.get_args(ModelName)) == set(MODEL_NAMES)
    assert set(typing.get_args(AlgorithmName)) == set(ALGORITHM_SPECS)
