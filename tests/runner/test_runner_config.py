"""Typed configs: YAML files, CLI overrides, resolution, and errors that name the key.

The algorithm and the dataset family are unions of frozen dataclasses chosen
by ``name`` (``runner/algorithm_configs.py``, ``runner/data_configs.py``).
"""

import ast
import dataclasses
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import optax
import pytest
import tyro
from runner_helpers import REQUIRED

import fedjaxsim
from fedjaxsim.core.algorithm import Algorithm
from fedjaxsim.core.validation import check_real
from fedjaxsim.runner import algorithm_configs
from fedjaxsim.runner import config as config_module
from fedjaxsim.runner.algorithm_configs import (
    BuildsAlgorithm,
    DittoConfig,
    FedAdamConfig,
    algorithm_config,
)
from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import (
    ALGORITHMS,
    DATASETS,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_run_arguments,
    resolve,
    section_names,
    validate,
)
from fedjaxsim.runner.data_configs import DigitsData

RUNNER = Path(config_module.__file__).parent


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def _plain(text: str) -> str:
    """tyro's rich error box as one line of words (box drawing and wrapping removed)."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


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
    assert config.model.name == "dense"  # from the file
    assert config.training.rounds == 5  # the CLI wins over the file
    assert config.training.cohort_size == 7
    assert config.algorithm.client_learning_rate == 0.01
    assert config.algorithm.server_learning_rate == 0.02
    assert config.logging.progress is False
    resolved = resolve(config, backend="cpu")
    # Unset hyper-parameters take fed_adam's own defaults (Reddi et al.'s EMNIST values).
    signature = inspect.signature(fedjaxsim.fed_adam).parameters
    assert resolved.algorithm.b1 == signature["b1"].default == 0.9
    assert resolved.algorithm.b2 == signature["b2"].default == 0.99
    assert resolved.algorithm.eps == signature["eps"].default == 1e-4
    assert resolved.algorithm.form == "bias_corrected"
    assert not hasattr(resolved.algorithm, "momentum")  # not a hyper-parameter of fedadam
    assert resolved.data.num_clients == 100 and resolved.data.alpha == 0.5
    assert resolved.execution.num_lanes == 2  # set in the file: kept
    assert resolved.evaluation.per_client_every == 0
    assert resolve(resolved, backend="cpu") == resolved  # idempotent
    # The resolved YAML written to the output folder loads back unchanged.
    assert load_config(_yaml(tmp_path, dump_config(resolved))) == resolved


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("num_devices", [1, 2])
def test_resolution_fills_the_execution_section_from_the_backend_defaults(backend, num_devices):
    from fedjaxsim.core.engine import default_plan
    from fedjaxsim.core.packing import default_num_lanes
    from fedjaxsim.models import default_lowering
    from fedjaxsim.runner.components import execution_plan, num_lanes

    config = config_from_dict({"execution": {"num_devices": num_devices}})
    execution = resolve(config, backend=backend).execution
    plan = default_plan(backend)
    assert execution.num_lanes == (default_num_lanes(backend, num_devices) or "per_client")
    assert (
        execution.clients_per_chunk,
        execution.chunk_loop,
        execution.scan_unroll,
        execution.sort_chunks,
    ) == (plan.clients_per_chunk, plan.chunk_loop, plan.scan_unroll, plan.sort_chunks)
    assert execution.conv_lowering == default_lowering(backend)
    # The documented measured defaults: one lane per device on CPU, one client
    # per lane in chunks of 128 elsewhere; oneDNN on CPU where it loads, else patches.
    if backend == "cpu":
        assert (execution.num_lanes, execution.clients_per_chunk) == (num_devices, None)
    else:
        assert (execution.num_lanes, execution.clients_per_chunk) == ("per_client", 128)
    from fedjaxsim.models import conv_onednn

    onednn = backend == "cpu" and conv_onednn.available()
    assert execution.conv_lowering == ("onednn" if onednn else "patches")
    # What the runner hands the engine and the packer is that default.
    resolved = resolve(config, backend=backend)
    assert execution_plan(resolved) == plan
    assert num_lanes(resolved) == default_num_lanes(backend, num_devices)

    explicit = config_from_dict(
        {
            "execution": {
                "num_devices": num_devices,
                "num_lanes": "per_client",
                "clients_per_chunk": 3,
                "chunk_loop": "unroll",
                "scan_unroll": 2,
                "sort_chunks": False,
                "conv_lowering": "lax",
            }
        }
    )
    assert resolve(explicit, backend=backend).execution == explicit.execution  # set: kept


def test_no_arguments_is_the_embedded_digits_default():
    config, _ = parse_run_arguments([])
    assert config == ExperimentConfig()
    assert (config.data.name, config.model.name, config.algorithm.name) == (
        "digits",
        "cnn",
        "fedavg",
    )
    assert (config.training.rounds, config.training.cohort_size) == (60, 10)
    assert (config.training.local_epochs, config.training.batch_size) == (2, 10)
    assert (config.aggregator.name, config.attack.name) == ("mean", "none")
    resolved = resolve(config, backend="cpu")
    assert resolved.algorithm.client_learning_rate == 0.1
    assert resolved.algorithm.server_learning_rate == 1.0


def test_short_aliases_and_subcommands_match_the_dotted_keys():
    common = [
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
            "--server-lr",
            "0.5",
            *common,
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
            "--algorithm.server-learning-rate",
            "0.5",
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
    subcommands, _ = parse_run_arguments(
        [
            "data:digits",
            "--data.num-clients",
            "50",
            "--data.alpha",
            "0.3",
            "algorithm:fedavgm",
            "--algorithm.client-learning-rate",
            "0.05",
            "--algorithm.server-learning-rate",
            "0.5",
            *common,
        ]
    )
    assert short == dotted == subcommands
    assert short.algorithm.name == "fedavgm" and short.algorithm.momentum == 0.9
    assert short.data.num_clients == 50 and short.training.max_local_steps == 6
    # A family of several datasets takes its name as a flag.
    tfds, _ = parse_run_arguments(["--dataset", "cifar10", "--num-clients", "10"])
    assert (type(tfds.data).__name__, tfds.data.name, tfds.data.num_clients) == (
        "TfdsData",
        "cifar10",
        10,
    )


def test_a_dataset_family_subcommand_takes_the_dataset_name_flag():
    subcommand, _ = parse_run_arguments(["data:tfds", "--data.name", "cifar10"])
    flag, _ = parse_run_arguments(["--dataset", "cifar10"])
    assert subcommand == flag


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("training: {roundz: 5}", "training.roundz", "did you mean 'rounds'"),
        ("trainin: {rounds: 5}", "trainin", "did you mean 'training'"),
        ("training: {rounds: ten}", "training.rounds", "expected an integer, got 'ten'"),
        ("training: {rounds: 1.5}", "training.rounds", "expected an integer, got 1.5"),
        ("model: resnet", "model.name", "did you mean 'resnet18'"),
        (
            "algorithm: {client_learning_rate: fast}",
            "algorithm.client_learning_rate",
            "expected a number",
        ),
        ("training: 3", "training", "expected a mapping"),
        ("algorithm: fedadam", "algorithm", "expected a mapping with a 'name'"),
        ("algorithm: {name: fedadamm}", "algorithm.name", "did you mean 'fedadam'"),
        ("data: {name: cifar}", "data.name", "did you mean 'cifar10'"),
        (
            "algorithm: {name: fedadam, form: adam}",
            "algorithm.form",
            "expected one of 'bias_corrected', 'paper'",
        ),
        (
            "algorithm: {name: fedadam, b1: 0.9, momentum: 0.9}",
            "algorithm.momentum",  # FedAvgM's key, not FedAdam's
            "It belongs to fedavgm, fednova, mime_lite",
        ),
        (
            "algorithm: {name: fedavg, proximal_mu: 0.1}",
            "algorithm.proximal_mu",  # FedProx's key
            "Valid keys here: name, client_learning_rate, server_learning_rate",
        ),
        (
            "algorithm: {name: fedprox, client_learning_rate: 0.1}",
            "algorithm.proximal_mu",
            "is required",
        ),
        ("data: {source: fedjax}", "data.source", "unknown key"),  # federated EMNIST's key
        ("data: {partition: iid}", "data.partition", "unknown key"),  # TFDS's key
        (
            "data: {name: federated_emnist, num_clients: 10}",  # writers are the clients
            "data.num_clients",
            "unknown key",
        ),
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
        ({"training": {"rounds": -1}}, "training.rounds", "must be an int >= 1, got -1"),
        (
            {"training": {"cohort_size": 500}},
            "training.cohort_size",
            "cohort_size=500 is larger than the 100 clients of digits",
        ),
        (
            {"data": {"name": "federated_emnist"}, "training": {"cohort_size": 3401}},
            "training.cohort_size",
            "larger than the 3400 clients of federated_emnist",
        ),
        ({"data": {"alpha": 0}}, "data.alpha", "must be a finite number > 0.0"),
        ({"seed": True}, "seed", "must be an int >= 0, got True"),
        ({"evaluation": {"every": 0}}, "evaluation.every", "must be an int >= 1"),
        ({"checkpoint": {"keep": 0}}, "checkpoint.keep", "must be an int >= 1"),
        ({"execution": {"num_lanes": 0}}, "execution.num_lanes", "must be an int >= 1"),
        # Builders own their checks; the runner names the config key from the
        # parameter the builder reports (InvalidArgument.name).
        (
            {"algorithm": {"client_learning_rate": -0.1}},
            "algorithm.client_learning_rate",
            "finite number >= 0.0",
        ),
        ({"algorithm": {"name": "fedavgm", "momentum": 1.0}}, "algorithm.momentum", "< 1.0"),
        ({"algorithm": {"name": "fedyogi", "b2": 1.5}}, "algorithm.b2", "< 1.0"),
        ({"algorithm": {"name": "fedadagrad", "eps": -1.0}}, "algorithm.eps", "> 0.0"),
        (
            {"algorithm": {"name": "scaffold", "client_learning_rate": -0.1}},
            "algorithm.client_learning_rate",
            "> 0.0",
        ),
        (
            {"algorithm": {**REQUIRED["fedprox"], "name": "fedprox", "proximal_mu": -1.0}},
            "algorithm.proximal_mu",
            ">= 0.0",
        ),
        (
            {"algorithm": {**REQUIRED["fednova"], "name": "fednova", "momentum": 2.0}},
            "algorithm.momentum",
            "< 1.0",
        ),
        (
            {"algorithm": {**REQUIRED["mime_lite"], "name": "mime_lite", "momentum": 1.5}},
            "algorithm.momentum",
            "< 1.0",
        ),
        ({"algorithm": {**REQUIRED["qffl"], "name": "qffl", "q": -1.0}}, "algorithm.q", ">= 0.0"),
        (
            {"algorithm": {**REQUIRED["ditto"], "name": "ditto", "personal_learning_rate": -1}},
            "algorithm.personal_learning_rate",
            "> 0.0",
        ),
    ],
)
def test_invalid_values_name_the_key(values, key, fragment):
    with pytest.raises(ConfigError) as error:
        validate(config_from_dict(values))
    assert error.value.key == key
    assert fragment in str(error.value)


def test_configs_built_in_python_are_type_checked_too():
    default = ExperimentConfig()
    bad_rounds = dataclasses.replace(
        default, training=dataclasses.replace(default.training, rounds="10")
    )
    with pytest.raises(ConfigError, match="training.rounds: expected an integer"):
        validate(bad_rounds)
    with pytest.raises(ConfigError, match="algorithm.b1: expected a number"):
        validate(dataclasses.replace(default, algorithm=FedAdamConfig(b1="x")))
    with pytest.raises(ConfigError, match="data.num_clients: expected an integer"):
        validate(dataclasses.replace(default, data=DigitsData(num_clients=2.5)))
    with pytest.raises(ConfigError) as error:  # a dataset config where the algorithm goes
        validate(dataclasses.replace(default, algorithm=DigitsData()))
    assert error.value.key == "algorithm.name"
    with pytest.raises(TypeError):  # a required hyper-parameter cannot be left out
        DittoConfig(client_learning_rate=0.1)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rounds", "-1"], "training.rounds: rounds must be an int >= 1, got -1"),
        (["--cohort-size", "500"], "cohort_size=500 is larger than the 100 clients of digits"),
        (["--client-lr", "-0.1"], "algorithm.client_learning_rate"),
        (["--batch-size", "0"], "training.batch_size"),
        (["--dirichlet-alpha", "0"], "data.alpha"),
        (["--algorithm", "fedadamm"], "algorithm.name: unknown algorithm 'fedadamm'"),
        (["--model", "resnet"], "model.name: unknown model 'resnet'; did you mean 'resnet18'"),
        (["--model", "gpt2"], "model.checkpoint: model gpt2 needs --model.checkpoint DIR"),
        (["--algorithm", "fedavgm", "--algorithm.momentum", "1.0"], "algorithm.momentum"),
    ],
)
def test_invalid_options_fail_before_any_work(tmp_path, capsys, arguments, message):
    assert main(["run", "--output-dir", str(tmp_path / "out"), "--quiet", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--training.roundz", "5"], "Unrecognized options: --training.roundz"),
        (["--rounds", "ten"], "Error parsing --rounds/--training.rounds"),
        (["--algorithm", "fedprox", "--client-lr", "0.1"], "--algorithm.proximal-mu FLOAT"),
        # A key of another algorithm: FedAvgM's momentum on FedAvg.
        (["--algorithm", "fedavg", "--algorithm.momentum", "0.5"], "--algorithm.momentum"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser_naming_the_flag(
    tmp_path, capsys, arguments, fragment
):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--output-dir", str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2
    assert fragment in _plain(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# Config fields that are not parameters of the builder (it takes optax
# transforms instead), with the value the config documents.
RUNNER_SIDE_DEFAULTS = {
    ("fedprox", "client_learning_rate"): dataclasses.MISSING,
    ("fedprox", "server_learning_rate"): 1.0,
    ("mime_lite", "client_learning_rate"): dataclasses.MISSING,
    ("mime_lite", "momentum"): 0.9,  # Karimireddy et al.'s experiments
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_resolves_to_its_builders_defaults(name, logreg_loss):
    cls = ALGORITHMS[name]
    parameters = inspect.signature(cls.builder).parameters
    for field in dataclasses.fields(cls):
        if field.name == "name":
            assert field.default == name
            continue
        if (name, field.name) in RUNNER_SIDE_DEFAULTS:
            assert field.default == RUNNER_SIDE_DEFAULTS[name, field.name], field.name
            continue
        # Two independent declarations: the dataclass field and the builder's
        # signature. A required hyper-parameter is required in both.
        assert field.name in parameters, (name, field.name)
        builder_default = parameters[field.name].default
        if builder_default is inspect.Parameter.empty:
            assert field.default is dataclasses.MISSING, (name, field.name)
        else:
            assert field.default == builder_default, (name, field.name)
    required = REQUIRED.get(name, {})
    assert {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} == set(
        required
    )

    from_yaml = config_from_dict({"algorithm": {"name": name, **required}})
    resolved = resolve(from_yaml, backend="cpu").algorithm
    assert resolved == cls(**required)  # every unset key is the default checked above
    flags = [f"--algorithm.{k.replace('_', '-')}={v}" for k, v in required.items()]
    from_cli, _ = parse_run_arguments(["--algorithm", name, *flags])
    assert from_cli == from_yaml
    assert isinstance(resolved.build(logreg_loss, 100), Algorithm)


def test_the_config_vocabulary_matches_the_libraries():
    import typing

    from fedjaxsim.data.registry import DATASETS as LOADERS
    from fedjaxsim.models import MODEL_NAMES
    from fedjaxsim.runner.model_configs import BuiltinModel

    assert set(DATASETS) == set(LOADERS)
    assert set(typing.get_args(typing.get_type_hints(BuiltinModel)["name"])) == set(MODEL_NAMES)
    # Every algorithm builder the package exports is wired into the runner,
    # except the generic fed_avg, which takes optax transforms (the runner's
    # fedavg is fed_sgd_avg, and adaptive servers have their own entries).
    exported = {
        getattr(fedjaxsim, name)
        for name in fedjaxsim.__all__
        if inspect.isfunction(getattr(fedjaxsim, name))
        and getattr(fedjaxsim, name).__module__.startswith("fedjaxsim.algorithms.")
    }
    wired = {cls.builder for cls in ALGORITHMS.values()}
    assert wired <= exported
    assert exported - wired == {fedjaxsim.fed_avg}
    for registry in (ALGORITHMS, DATASETS):
        for name, cls in registry.items():
            default_name = {f.name: f.default for f in dataclasses.fields(cls)}["name"]
            assert name in section_names(cls) and default_name in section_names(cls)


# ---------------------------------------------------------------------------
# Adding an algorithm: one dataclass plus one registry entry.


@algorithm_config
class FedAvgNesterovConfig(BuildsAlgorithm):
    """A toy algorithm as a user would add it: FedAvg with a Nesterov server step."""

    name: tyro.conf.Suppress[Literal["fedavg_nesterov"]] = "fedavg_nesterov"
    client_learning_rate: float = 0.1
    server_momentum: float = 0.5

    def build(self, loss_fn, num_total_clients):
        del num_total_clients
        check_real(
            "server_momentum", self.server_momentum, minimum=0.0, maximum=1.0, strict_maximum=True
        )
        return fedjaxsim.fed_avg(
            loss_fn,
            optax.sgd(self.client_learning_rate),
            optax.sgd(1.0, momentum=self.server_momentum, nesterov=True),
        )


@pytest.fixture
def config_with_toy(monkeypatch):
    """``runner/config.py`` executed afresh with the toy in ``ALGORITHM_CONFIGS``.

    The registry and the unions are built when config.py is imported, so the
    test adds the one entry and executes the module's source again (as a
    separate module, so the imported one is untouched), exactly as a file
    with one more entry would be imported.
    """
    monkeypatch.setattr(
        algorithm_configs,
        "ALGORITHM_CONFIGS",
        (*algorithm_configs.ALGORITHM_CONFIGS, FedAvgNesterovConfig),
    )
    spec = importlib.util.spec_from_file_location("config_with_toy", config_module.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # for its string annotations
    spec.loader.exec_module(module)
    return module


def test_adding_an_algorithm_takes_one_dataclass_and_one_registry_entry(
    config_with_toy, tmp_path, logreg_loss, logreg_params
):
    toy = config_with_toy
    assert "fedavg_nesterov" not in ALGORITHMS  # the imported config.py is unchanged
    from_yaml = toy.load_config(
        _yaml(tmp_path, "algorithm: {name: fedavg_nesterov, server_momentum: 0.7}\n")
    )
    assert from_yaml.algorithm == FedAvgNesterovConfig(server_momentum=0.7)
    for arguments in (
        ["--algorithm", "fedavg_nesterov", "--algorithm.server-momentum", "0.7"],
        ["algorithm:fedavg-nesterov", "--algorithm.server-momentum", "0.7"],
    ):
        from_cli, _ = toy.parse_run_arguments(arguments)
        assert from_cli == from_yaml
    assert toy.resolve(from_yaml, backend="cpu").algorithm == from_yaml.algorithm
    with pytest.raises(toy.ConfigError) as error:  # the config's own check, named
        toy.validate(
            toy.config_from_dict({"algorithm": {"name": "fedavg_nesterov", "server_momentum": 1.0}})
        )
    assert error.value.key == "algorithm.server_momentum"
    with pytest.raises(toy.ConfigError) as error:
        toy.config_from_dict({"algorithm": {"name": "fedavg_nesterov", "server_momentun": 0.5}})
    assert error.value.key == "algorithm.server_momentun"
    assert "did you mean 'server_momentum'" in str(error.value)

    # It builds, and trains: from zero server momentum, a Nesterov SGD step of
    # size 1 moves the model (1 + m) times FedAvg's mean client delta.
    from fedjaxsim.core.packing import PackingConfig, pack_cohort
    from fedjaxsim.testing import run_rounds, synthetic_clients

    cohort = pack_cohort(
        synthetic_clients([7, 12, 5]),
        [0, 1, 2],
        PackingConfig(batch_size=4, num_epochs=1),
        seed=0,
        round_index=0,
        num_total_clients=10,
    )
    momentum = from_yaml.algorithm.server_momentum
    nesterov = from_yaml.algorithm.build(logreg_loss, 10)
    plain = fedjaxsim.fed_sgd_avg(logreg_loss, client_learning_rate=0.1, server_learning_rate=1.0)
    moved = {}
    for label, algorithm in (("nesterov", nesterov), ("plain", plain)):
        state, _, _ = run_rounds(algorithm, logreg_params, [cohort], num_total_clients=10)
        moved[label] = jax.tree.map(
            lambda a, b: np.asarray(a, np.float64) - b, state.params, logreg_params
        )
    for got, want in zip(jax.tree.leaves(moved["nesterov"]), jax.tree.leaves(moved["plain"])):
        assert np.max(np.abs(want)) > 1e-3
        np.testing.assert_allclose(got, (1 + momentum) * want, rtol=1e-5, atol=1e-7)


def test_config_code_has_no_per_algorithm_branches():
    """config.py and components.py never name an algorithm or its config class:
    everything algorithm-specific lives in that algorithm's dataclass."""
    classes = {cls.__name__ for cls in ALGORITHMS.values()}
    default = type(ExperimentConfig().algorithm).__name__  # the default member is named once
    for path in (RUNNER / "config.py", RUNNER / "components.py"):
        tree = ast.parse(path.read_text())
        strings = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not strings & set(ALGORITHMS), path
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        names |= {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert names & classes <= {default}, (path, names & classes)
