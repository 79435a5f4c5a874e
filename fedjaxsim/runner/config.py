"""The experiment config: typed dataclasses, YAML files, command-line overrides.

One :class:`ExperimentConfig` describes a run completely. It is built in three
layers, each overriding the one before:

1. the dataclass defaults (the embedded digits job of ``fedjaxsim run``);
2. a YAML file (``--config FILE.yaml``), checked key by key against the
   dataclasses: an unknown key or a value of the wrong type fails with the
   dotted key (``training.rounds``) and what was expected;
3. single keys from the command line, parsed by `tyro
   <https://brentyi.github.io/tyro/>`_ from the same dataclasses
   (``--training.rounds 10``; the common keys also have short aliases such as
   ``--rounds``).

:func:`validate` then checks values and cross-key rules (positive counts, a
cohort no larger than the population, hyper-parameters the chosen algorithm
takes) before any work starts, and :func:`resolve` fills every ``None`` that
means "the default of the dataset, algorithm or backend" with the value
actually used, which is what the runner writes to ``config.yaml`` in the
output folder. That file loads back with ``--config`` unchanged.

Why tyro: it derives the command line from the dataclasses themselves (types,
``Literal`` choices, docstrings as help, nested groups as dotted flags), takes
a config instance as the defaults (so a YAML file and CLI overrides compose),
names the flag in every parse error with close-match suggestions, and
installs cleanly (pure Python; docstring-parser, typeguard and
typing-extensions). simple-parsing (already pulled in by
tensorflow-datasets) silently casts ``1.5`` to ``1`` when loading a file, and
ml_collections' ConfigDict is untyped and brings absl flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from fedjaxsim.data.registry import DATASETS

# ---------------------------------------------------------------------------
# Vocabulary.

DatasetName = Literal[
    "digits",
    "federated_emnist",
    "federated_emnist_digits",
    "mnist",
    "emnist/byclass",
    "fashion_mnist",
    "cifar10",
    "cifar100",
]
ModelName = Literal["cnn", "dense", "logreg"]
AlgorithmName = Literal[
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "scaffold",
    "fednova",
    "mime_lite",
    "qffl",
    "ditto",
]
PartitionName = Literal["iid", "dirichlet", "shards", "quantity"]

NATURAL_DATASETS = ("federated_emnist", "federated_emnist_digits")


def _alias(*names: str):
    return tyro.conf.arg(aliases=names)


# ---------------------------------------------------------------------------
# The dataclasses. Fields documented with a docstring below them become the
# command-line help (tyro reads them).


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset and partitioner."""

    name: Annotated[DatasetName, _alias("--dataset")] = "digits"
    """Dataset (fedjaxsim.data.registry): digits is embedded; the EMNIST ones download once."""
    num_clients: Annotated[int | None, _alias("--num-clients")] = None
    """Clients of the train split for partitioned datasets (default 100); not for natural ones."""
    partition: PartitionName | None = None
    """Partitioner of the train split (default dirichlet; digits supports only dirichlet)."""
    alpha: Annotated[float | None, _alias("--dirichlet-alpha")] = None
    """Dirichlet concentration of the label skew (default 0.5)."""
    shards_per_client: int | None = None
    """Shards per client for partition=shards (default 2)."""
    test_fraction: float | None = None
    """digits only: stratified share of examples held out for test (default 0.2)."""
    source: Literal["tff", "fedjax"] | None = None
    """Federated EMNIST only: published files to read (default tff)."""
    data_dir: str | None = None
    """Dataset cache folder (default $FEDJAXSIM_DATA_DIR or the user cache)."""
    download: bool | None = None
    """Whether a missing dataset may be downloaded (default: the loader's)."""


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Algorithm and hyper-parameters; None takes the builder's default."""

    name: Annotated[AlgorithmName, _alias("--algorithm")] = "fedavg"
    """Federated algorithm (fedjaxsim.algorithms)."""
    client_learning_rate: Annotated[float | None, _alias("--client-lr")] = None
    """Local SGD step size."""
    server_learning_rate: Annotated[float | None, _alias("--server-lr")] = None
    """Server step size on the averaged client delta."""
    momentum: float | None = None
    """fedavgm: server momentum; fednova: local momentum; mime_lite: base-optimizer momentum."""
    b1: float | None = None
    """fedadam, fedyogi, fedadagrad: first-moment decay."""
    b2: float | None = None
    """fedadam, fedyogi: second-moment decay."""
    eps: float | None = None
    """fedadam, fedyogi, fedadagrad: adaptivity tau."""
    proximal_mu: float | None = None
    """fedprox, fednova: weight of the proximal term."""
    q: float | None = None
    """qffl: fairness exponent."""
    lipschitz_constant: float | None = None
    """qffl: L (default 1 / client_learning_rate)."""
    personal_learning_rate: float | None = None
    """ditto: step size of the personal model."""
    regularization: float | None = None
    """ditto: lambda, the pull of personal models toward the global one."""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Rounds, cohort and local training."""

    rounds: Annotated[int, _alias("--rounds")] = 60
    """Federated rounds."""
    cohort_size: Annotated[int, _alias("--cohort-size")] = 10
    """Clients sampled per round (uniformly, without replacement)."""
    local_epochs: Annotated[int, _alias("--local-epochs")] = 2
    """Local epochs per round; each a fresh shuffle."""
    batch_size: Annotated[int, _alias("--batch-size")] = 10
    """Local batch size."""
    max_local_steps: Annotated[int | None, _alias("--max-local-steps")] = None
    """Optional cap on local steps per client and round."""
    step_bucket: Literal["pow2", "geometric", "exact"] | int = "pow2"
    """Round each cohort's step count up to a bucket, so few shapes compile."""
    weighting: Literal["num_examples", "num_processed", "uniform"] = "num_examples"
    """Client weights in the average."""


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """Execution plan (fedjaxsim.core.engine.ExecutionPlan); None takes default_plan()'s
    (clients_per_chunk stays None, meaning all lanes in one vmap, when the plan has None)."""

    num_lanes: Annotated[int | Literal["per_client"] | None, _alias("--num-lanes")] = None
    """Pack the cohort into this many vmap lanes, clients one after another in each;
    per_client gives every client its own lane."""
    clients_per_chunk: Annotated[int | None, _alias("--clients-per-chunk")] = None
    """Lanes trained together under one vmap."""
    chunk_loop: Literal["scan", "unroll"] | None = None
    """How chunks are looped over."""
    scan_unroll: int | None = None
    """Unroll of the local-step scan."""
    conv_lowering: Literal["auto", "patches", "lax"] | None = None
    """How convolutions are lowered (patches: slices plus one matmul)."""
    num_devices: int = 1
    """Shard the cohort's lanes over this many local devices (a "clients" mesh);
    server state is replicated, and the CPU plan then trains one lane per
    device, in parallel. `fedjaxsim run` splits a CPU host into one XLA device
    per core (up to 8; XLA_FLAGS=--xla_force_host_platform_device_count=N
    overrides). Measured on 2 cores: 2 devices train EMNIST-size clients of the
    logreg and dense models 1.4-1.9x faster, the tiny digits rounds slower."""


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Evaluation schedule."""

    every: Annotated[int, _alias("--eval-every")] = 5
    """Central evaluation on the whole test split every N rounds (and after the last)."""
    batch_size: int = 512
    """Central evaluation batch size."""
    per_client_every: int | None = None
    """Per-client evaluation every N rounds and after the last (None: same as every; 0: off)."""
    per_client_sample: int = 100
    """Test clients evaluated one by one (a fixed sample drawn from the seed)."""
    per_client_batch_size: int = 64
    """Batch size of per-client evaluation."""
    per_client_chunk: int | None = 16
    """Test clients evaluated together under one vmap (None: all at once); bounds memory."""
    per_client_split: int = 20
    """When the test split is a single client (digits, TFDS), split it into this many
    clients with the training partitioner, so per-client statistics mean something."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint schedule (Orbax, in OUTPUT_DIR/checkpoints)."""

    every: int = 10
    """Save every N rounds (0: only after the last round, which is always saved)."""
    keep: int = 3
    """Keep the last K checkpoints."""


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Outputs besides metrics.jsonl."""

    tensorboard: bool = True
    """Write TensorBoard event files to OUTPUT_DIR/tensorboard."""
    progress: bool = True
    """Show a progress bar with ETA (--quiet turns it off)."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs. Defaults: FedAvg on the embedded digits (> 90% in < 1 min)."""

    data: DataConfig = DataConfig()
    model: ModelName = "cnn"
    """Model (fedjaxsim.models.get_model)."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    training: TrainingConfig = TrainingConfig()
    execution: ExecutionConfig = ExecutionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    seed: int = 0
    """Seeds the partition, the model init, sampling, shuffling and every round's RNG."""
    output_dir: str = "runs/digits-fedavg"
    """Output folder: config.yaml, metrics.jsonl, summary.json, plots, checkpoints."""


class ConfigError(ValueError):
    """An invalid config. ``key`` is the dotted key at fault (``training.rounds``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


# ---------------------------------------------------------------------------
# Dicts and YAML.


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # strips Annotated


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value, tp, key: str):
    """Checks ``value`` (from YAML) against type ``tp``; returns the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    raise ConfigError(key, f"expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _from_dict(cls, values, prefix: str = ""):
    if not isinstance(values, Mapping):
        raise ConfigError(prefix, f"expected a mapping of keys to values, got {values!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(dotted, f"unknown key{hint} Valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(values: Mapping) -> ExperimentConfig:
    """Builds a config from nested dicts, checking every key and type.

    Missing keys keep their defaults.

    Raises:
      ConfigError: for an unknown key or a value of the wrong type, naming it.
    """
    return _from_dict(ExperimentConfig, values)


def config_to_dict(config: ExperimentConfig) -> dict:
    """Nested plain dicts (YAML/JSON-ready)."""
    return dataclasses.asdict(config)


def load_config(path: str | Path) -> ExperimentConfig:
    """Reads a YAML file (keys as in :func:`config_to_dict`; missing keys default).

    Raises:
      ConfigError: unknown keys, wrong types, or a file that is not YAML.
      FileNotFoundError: no such file.
    """
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("", f"{path} is not valid YAML: {error}") from error
    try:
        return config_from_dict({} if values is None else values)
    except ConfigError as error:
        raise ConfigError(error.key, f"{error.message} (in {path})") from None


def dump_config(config: ExperimentConfig) -> str:
    """The config as YAML text that :func:`load_config` reads back unchanged."""
    import yaml

    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def replace(config: ExperimentConfig, **dotted) -> ExperimentConfig:
    """A copy with dotted keys replaced: ``replace(c, **{"training.rounds": 5})``."""
    values = config_to_dict(config)
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config_from_dict(values)


def flatten(values: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


# ---------------------------------------------------------------------------
# Algorithms: which hyper-parameters each takes, and their defaults.


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """How the runner builds one algorithm from :class:`AlgorithmConfig`.

    Attributes:
      builder: the ``fedjaxsim.algorithms`` function (its signature supplies
        the defaults of hyper-parameters it declares with one).
      hparams: the AlgorithmConfig fields this algorithm takes.
      runner_defaults: defaults for fields the builder takes as an optax
        transform rather than a number (fedprox, mime_lite).
      stateful: keeps per-client state in a ClientStateStore.
    """

    builder: str
    hparams: tuple[str, ...]
    runner_defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)
    stateful: bool = False


ALGORITHM_SPECS: dict[str, AlgorithmSpec] = {
    "fedavg": AlgorithmSpec("fed_sgd_avg", ("client_learning_rate", "server_learning_rate")),
    "fedavgm": AlgorithmSpec(
        "fed_avg_m", ("client_learning_rate", "server_learning_rate", "momentum")
    ),
    "fedadam": AlgorithmSpec(
        "fed_adam", ("client_learning_rate", "server_learning_rate", "b1", "b2", "eps")
    ),
    "fedyogi": AlgorithmSpec(
        "fed_yogi", ("client_learning_rate", "server_learning_rate", "b1", "b2", "eps")
    ),
    "fedadagrad": AlgorithmSpec(
        "fed_adagrad", ("client_learning_rate", "server_learning_rate", "b1", "eps")
    ),
    # fed_prox takes optax transforms: the runner uses SGD on both sides, and
    # the server's sgd(1.0) is fed_prox's own default.
    "fedprox": AlgorithmSpec(
        "fed_prox",
        ("client_learning_rate", "server_learning_rate", "proximal_mu"),
        runner_defaults={"server_learning_rate": 1.0},
    ),
    "scaffold": AlgorithmSpec(
        "scaffold", ("client_learning_rate", "server_learning_rate"), stateful=True
    ),
    "fednova": AlgorithmSpec(
        "fed_nova", ("client_learning_rate", "server_learning_rate", "momentum", "proximal_mu")
    ),
    # Mime-Lite's base optimizer is SGD with momentum (0.9 in Karimireddy et
    # al. 2020's experiments); its learning rate is the local step size.
    "mime_lite": AlgorithmSpec(
        "mime_lite",
        ("client_learning_rate", "server_learning_rate", "momentum"),
        runner_defaults={"momentum": 0.9},
    ),
    "qffl": AlgorithmSpec("q_ffl", ("client_learning_rate", "q", "lipschitz_constant")),
    "ditto": AlgorithmSpec(
        "ditto",
        (
            "client_learning_rate",
            "personal_learning_rate",
            "regularization",
            "server_learning_rate",
        ),
        stateful=True,
    ),
}

# Hyper-parameters whose builder default depends on others (None stays None).
_DERIVED_DEFAULTS = {("qffl", "lipschitz_constant")}


def builder_function(name: str):
    """The ``fedjaxsim.algorithms`` builder of algorithm ``name``."""
    from fedjaxsim import algorithms

    return getattr(algorithms, ALGORITHM_SPECS[name].builder)


def algorithm_defaults(name: str) -> dict[str, Any]:
    """Each hyper-parameter of ``name`` with its default (``inspect.empty`` if required)."""
    spec = ALGORITHM_SPECS[name]
    parameters = inspect.signature(builder_function(name)).parameters
    defaults = {}
    for hparam in spec.hparams:
        if hparam in spec.runner_defaults:
            defaults[hparam] = spec.runner_defaults[hparam]
        elif hparam in parameters:
            defaults[hparam] = parameters[hparam].default
        else:
            defaults[hparam] = inspect.Parameter.empty
    return defaults


# ---------------------------------------------------------------------------
# Validation and resolution.

_DATA_DEFAULTS = {
    "num_clients": 100,
    "partition": "dirichlet",
    "alpha": 0.5,
    "shards_per_client": 2,
}


def _data_keys(name: str) -> dict[str, Any]:
    """Keys that apply to dataset ``name`` with their defaults (None: loader's)."""
    if name == "digits":
        return {"num_clients": 100, "partition": "dirichlet", "alpha": 0.5, "test_fraction": 0.2}
    if name in NATURAL_DATASETS:
        return {"source": "tff", "data_dir": None, "download": None}
    return dict(_DATA_DEFAULTS, data_dir=None, download=None)


def population(data: DataConfig) -> int:
    """Number of training clients of the (resolved or unresolved) data config."""
    if data.name in NATURAL_DATASETS:
        from fedjaxsim.data.emnist import PUBLISHED_FACTS

        return PUBLISHED_FACTS[(data.name == "federated_emnist_digits", "train")].num_clients
    return data.num_clients if data.num_clients is not None else _DATA_DEFAULTS["num_clients"]


def _check_int(key: str, value, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(key, f"must be {bound}, got {value!r}")


def _check_float(key: str, value, *, positive: bool = False, below_one: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    ok = ok and (value < 1 if below_one else True)
    if not ok:
        low = "> 0" if positive else ">= 0"
        high = " and < 1" if below_one else ""
        raise ConfigError(key, f"must be a finite number {low}{high}, got {value!r}")


def _check_type_tree(config: ExperimentConfig) -> None:
    """Re-checks every field's type (configs may be built in Python)."""
    config_from_dict(config_to_dict(config))


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Checks values and cross-key rules; returns ``config`` unchanged.

    Raises:
      ConfigError: naming the first bad key, with what is allowed.
    """
    if not isinstance(config, ExperimentConfig):
        raise ConfigError("", f"expected an ExperimentConfig, got {type(config).__name__}")
    _check_type_tree(config)
    data, training, evaluation = config.data, config.training, config.evaluation

    if data.name not in DATASETS:
        raise ConfigError(
            "data.name", f"unknown dataset {data.name!r}; known: {', '.join(DATASETS)}"
        )
    # Data: keys that do not apply to this dataset are errors, not silently ignored.
    applicable = _data_keys(data.name)
    for field in dataclasses.fields(DataConfig):
        value = getattr(data, field.name)
        if field.name != "name" and value is not None and field.name not in applicable:
            raise ConfigError(
                f"data.{field.name}",
                f"does not apply to dataset {data.name!r}; remove it (keys for "
                f"{data.name}: {', '.join(applicable) or 'none'})",
            )
    if data.name == "digits" and data.partition not in (None, "dirichlet"):
        raise ConfigError(
            "data.partition",
            f"digits is split with a Dirichlet label skew only, got {data.partition!r}; "
            "use partition: dirichlet and set alpha, or a TFDS dataset such as mnist",
        )
    _check_int("data.num_clients", data.num_clients, 1, optional=True)
    _check_int("data.shards_per_client", data.shards_per_client, 1, optional=True)
    _check_float("data.alpha", data.alpha, positive=True)
    if data.test_fraction is not None and not 0 < data.test_fraction < 1:
        raise ConfigError("data.test_fraction", f"must lie in (0, 1), got {data.test_fraction!r}")

    # Training.
    for name in ("rounds", "cohort_size", "local_epochs", "batch_size"):
        _check_int(f"training.{name}", getattr(training, name), 1)
    _check_int("training.max_local_steps", training.max_local_steps, 1, optional=True)
    if isinstance(training.step_bucket, int):
        _check_int("training.step_bucket", training.step_bucket, 1)
    clients = population(data)
    if training.cohort_size > clients:
        source = "data.num_clients" if data.name not in NATURAL_DATASETS else data.name
        raise ConfigError(
            "training.cohort_size",
            f"cohort_size={training.cohort_size} is larger than num_clients={clients} "
            f"({source}); lower training.cohort_size or raise data.num_clients",
        )

    # Execution.
    for name in ("num_lanes", "clients_per_chunk", "scan_unroll"):
        value = getattr(config.execution, name)
        if value != "per_client":
            _check_int(f"execution.{name}", value, 1, optional=True)
    _check_int("execution.num_devices", config.execution.num_devices, 1)

    # Evaluation and checkpoints.
    for name in ("every", "batch_size", "per_client_sample", "per_client_batch_size"):
        _check_int(f"evaluation.{name}", getattr(evaluation, name), 1)
    _check_int("evaluation.per_client_split", evaluation.per_client_split, 2)
    _check_int("evaluation.per_client_chunk", evaluation.per_client_chunk, 1, optional=True)
    _check_int("evaluation.per_client_every", evaluation.per_client_every, 0, optional=True)
    _check_int("checkpoint.every", config.checkpoint.every, 0)
    _check_int("checkpoint.keep", config.checkpoint.keep, 1)
    _check_int("seed", config.seed, 0)
    if not config.output_dir:
        raise ConfigError("output_dir", "must be a non-empty path")

    _validate_algorithm(config.algorithm)
    return config


def _validate_algorithm(algorithm: AlgorithmConfig) -> None:
    spec = ALGORITHM_SPECS[algorithm.name]
    for field in dataclasses.fields(AlgorithmConfig):
        value = getattr(algorithm, field.name)
        if field.name == "name" or value is None:
            continue
        if field.name not in spec.hparams:
            raise ConfigError(
                f"algorithm.{field.name}",
                f"is not a hyper-parameter of {algorithm.name}; remove it ({algorithm.name} "
                f"takes {', '.join(spec.hparams)})",
            )
    defaults = algorithm_defaults(algorithm.name)
    for hparam, default in defaults.items():
        if getattr(algorithm, hparam) is None and default is inspect.Parameter.empty:
            raise ConfigError(
                f"algorithm.{hparam}",
                f"is required for {algorithm.name} (its builder has no default); set it, e.g. "
                f"--algorithm.{hparam.replace('_', '-')} VALUE",
            )
    for name in ("client_learning_rate", "personal_learning_rate"):
        _check_float(f"algorithm.{name}", getattr(algorithm, name), positive=True)
    for name in ("server_learning_rate", "proximal_mu", "q", "regularization"):
        _check_float(f"algorithm.{name}", getattr(algorithm, name))
    for name in ("momentum", "b1", "b2"):
        _check_float(f"algorithm.{name}", getattr(algorithm, name), below_one=True)
    _check_float("algorithm.eps", algorithm.eps, positive=True)
    _check_float("algorithm.lipschitz_constant", algorithm.lipschitz_constant, positive=True)


def resolve(config: ExperimentConfig, backend: str | None = None) -> ExperimentConfig:
    """Validates ``config`` and fills each ``None`` default with the value used.

    Dataset keys get the dataset's defaults, hyper-parameters the builder's
    (read from its signature), the execution plan ``default_plan(backend)``'s
    fields, and ``evaluation.per_client_every`` the central schedule.
    Idempotent: ``resolve(resolve(c)) == resolve(c)``.
    """
    from fedjaxsim.core.engine import default_plan

    validate(config)
    data = config.data
    data = dataclasses.replace(
        data,
        **{
            key: default
            for key, default in _data_keys(data.name).items()
            if getattr(data, key) is None and default is not None
        },
    )
    algorithm = config.algorithm
    filled = {
        hparam: default
        for hparam, default in algorithm_defaults(algorithm.name).items()
        if getattr(algorithm, hparam) is None
        and (algorithm.name, hparam) not in _DERIVED_DEFAULTS
        and default is not inspect.Parameter.empty
    }
    algorithm = dataclasses.replace(algorithm, **filled)
    plan = default_plan(backend)
    execution = config.execution
    if execution.num_lanes is None:
        lanes = "per_client" if plan.num_lanes is None else plan.num_lanes
        if plan.num_lanes == 1 and execution.num_devices > 1:
            lanes = execution.num_devices  # one lane per device (the CPU plan, in parallel)
        execution = dataclasses.replace(execution, num_lanes=lanes)
    execution = dataclasses.replace(
        execution,
        clients_per_chunk=(
            plan.clients_per_chunk
            if execution.clients_per_chunk is None
            else execution.clients_per_chunk
        ),
        chunk_loop=execution.chunk_loop or plan.chunk_loop,
        scan_unroll=int(plan.scan_unroll)
        if execution.scan_unroll is None
        else execution.scan_unroll,
        conv_lowering=execution.conv_lowering or plan.conv_lowering,
    )
    evaluation = config.evaluation
    if evaluation.per_client_every is None:
        evaluation = dataclasses.replace(evaluation, per_client_every=evaluation.every)
    return validate(
        dataclasses.replace(
            config, data=data, algorithm=algorithm, execution=execution, evaluation=evaluation
        )
    )


# ---------------------------------------------------------------------------
# Command line.

RUN_DESCRIPTION = (
    "Run a federated experiment. Settings come from the defaults (FedAvg on the embedded "
    "digits), then from --config FILE.yaml, then from single-key flags (--training.rounds 10, "
    "or the short aliases shown). Also: --resume (continue from the latest checkpoint in the "
    "output folder; a run also resumes automatically when its folder has one) and --quiet "
    "(no progress bar)."
)


def parse_run_arguments(argv: Sequence[str]) -> tuple[ExperimentConfig, bool]:
    """Parses ``fedjaxsim run`` arguments.

    Returns:
      ``(config, resume_required)``; the config is validated, not resolved.

    Raises:
      SystemExit: for flags tyro rejects (unknown flag, wrong type, bad choice),
        after printing the flag and the fix.
      ConfigError: for an invalid YAML file or invalid values.
    """
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--quiet", action="store_true")
    known, rest = pre.parse_known_args(list(argv))
    base = load_config(known.config) if known.config else ExperimentConfig()
    config = tyro.cli(
        ExperimentConfig,
        default=base,
        args=rest,
        prog="fedjaxsim run",
        description=RUN_DESCRIPTION,
    )
    if known.quiet:
        config = dataclasses.replace(
            config, logging=dataclasses.replace(config.logging, progress=False)
        )
    return validate(config), known.resume
