"""The experiment config: typed dataclasses, YAML files, command-line overrides.

One :class:`ExperimentConfig` describes a run completely. It is built in three
layers, each overriding the one before:

1. the dataclass defaults (the embedded digits job of ``fedjaxsim run``);
2. a YAML file (``--config FILE.yaml``), read with `dacite
   <https://github.com/konradhalas/dacite>`_ in strict mode: an unknown key or
   a value of the wrong type fails with the dotted key (``training.rounds``)
   and what was expected;
3. single keys from the command line, parsed by `tyro
   <https://brentyi.github.io/tyro/>`_ from the same dataclasses
   (``--training.rounds 10``; the common keys also have short aliases such as
   ``--rounds``).

The algorithm and the dataset family are unions of one dataclass each
(``runner/algorithm_configs.py``, ``runner/data_configs.py``), chosen by their
``name``: ``algorithm: {name: fedadam, ...}`` in YAML, ``algorithm:fedadam``
or ``--algorithm fedadam`` on the command line. Each holds only its own keys,
with its builder's defaults, and its builder checks the values.

:func:`validate` checks values and cross-key rules (positive counts, a cohort
no larger than the population, the algorithm's hyper-parameters) before any
work starts, and :func:`resolve` fills every ``None`` that means "the
measured default of the backend" with the value actually used, which is what
the runner writes to ``config.yaml`` in the output folder. That file loads
back with ``--config`` unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import dacite
import tyro

from fedjaxsim.core.validation import InvalidArgument, check_int, check_optional_int
from fedjaxsim.runner.aggregation_configs import (
    AGGREGATOR_CONFIGS,
    ATTACK_CONFIGS,
    MeanAggregator,
    NoAttack,
)
from fedjaxsim.runner.algorithm_configs import ALGORITHM_CONFIGS, FedAvgConfig
from fedjaxsim.runner.data_configs import DATA_CONFIGS, DigitsData
from fedjaxsim.runner.model_configs import MODEL_CONFIGS, BuiltinModel
from fedjaxsim.runner.privacy_configs import (
    COMPRESSION_CONFIGS,
    NoCompression,
    PrivacyConfig,
    SecureAggregationConfig,
    default_delta,
)
from fedjaxsim.runner.system_configs import AsynchronyConfig, SystemConfig


def _alias(*names: str):
    return tyro.conf.arg(aliases=names)


def section_names(cls) -> tuple[str, ...]:
    """The ``name`` values a section dataclass stands for (its ``Literal``)."""
    return typing.get_args(typing.get_type_hints(cls)["name"])


def _subcommand(cls) -> str:
    names = section_names(cls)
    if len(names) == 1:
        return names[0]
    return cls.__name__.removesuffix("Data").lower()  # a family of several datasets or models


def _union(classes):
    return Union[tuple(Annotated[cls, tyro.conf.subcommand(_subcommand(cls))] for cls in classes)]


AlgorithmConfig = _union(ALGORITHM_CONFIGS)
DataConfig = _union(DATA_CONFIGS)
ModelConfig = _union(MODEL_CONFIGS)
AggregatorConfig = _union(AGGREGATOR_CONFIGS)
AttackConfig = _union(ATTACK_CONFIGS)
CompressionConfig = _union(COMPRESSION_CONFIGS)


def _registry(classes) -> dict[str, type]:
    return {name: cls for cls in classes for name in section_names(cls)}


ALGORITHMS = _registry(ALGORITHM_CONFIGS)
DATASETS = _registry(DATA_CONFIGS)
MODELS = _registry(MODEL_CONFIGS)
AGGREGATORS = _registry(AGGREGATOR_CONFIGS)
ATTACKS = _registry(ATTACK_CONFIGS)
COMPRESSIONS = _registry(COMPRESSION_CONFIGS)
# The sections that are unions chosen by name: (registry, default member).
UNION_SECTIONS = {
    "data": (DATASETS, DigitsData),
    "model": (MODELS, BuiltinModel),
    "algorithm": (ALGORITHMS, FedAvgConfig),
    "aggregator": (AGGREGATORS, MeanAggregator),
    "attack": (ATTACKS, NoAttack),
    "compression": (COMPRESSIONS, NoCompression),
}


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
    weighting: Literal["num_examples", "num_processed", "num_tokens", "uniform"] = "num_examples"
    """Client weights in the average (num_tokens: real target tokens, for next-token tasks)."""
    sampling: Literal["fixed_size", "poisson", "shuffle"] = "fixed_size"
    """Cohorts: fixed_size (uniform, no replacement), poisson (cohort_size expected), shuffle."""


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How rounds run: the lane layout, the execution plan
    (fedjaxsim.core.engine.ExecutionPlan), the convolution lowering and the
    devices. None takes the measured per-backend default (clients_per_chunk
    stays None, all lanes in one vmap, when the default plan has None)."""

    num_lanes: Annotated[int | Literal["per_client"] | None, _alias("--num-lanes")] = None
    """Pack the cohort into this many vmap lanes, clients one after another in each;
    per_client gives every client its own lane (default: one lane per device on CPU,
    per_client elsewhere)."""
    clients_per_chunk: Annotated[int | None, _alias("--clients-per-chunk")] = None
    """Lanes trained together under one vmap."""
    chunk_loop: Literal["scan", "unroll"] | None = None
    """How chunks are looped over."""
    scan_unroll: int | None = None
    """Unroll of the local-step scan."""
    sort_chunks: bool | None = None
    """Group lanes into chunks by length and skip steps that are padding for a whole chunk."""
    conv_lowering: Literal["auto", "patches", "lax", "onednn"] | None = None
    """How the model's convolutions are lowered when it is built (patches: slices
    plus one matmul; onednn: oneDNN's convolution on CPU, the default there when
    oneDNN is installed, else the patches)."""
    num_devices: int = 1
    """Shard the cohort's lanes over this many local devices (a "clients" mesh);
    server state is replicated, and the CPU default then trains one lane per
    device, in parallel. `fedjaxsim run` splits a CPU host into one XLA device
    per core (up to 8; XLA_FLAGS=--xla_force_host_platform_device_count=N
    overrides); see benchmarks/RESULTS.md for when that pays."""


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

    data: DataConfig = DigitsData()
    model: ModelConfig = BuiltinModel()
    algorithm: AlgorithmConfig = FedAvgConfig()
    aggregator: AggregatorConfig = MeanAggregator()
    attack: AttackConfig = NoAttack()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    compression: CompressionConfig = NoCompression()
    training: TrainingConfig = TrainingConfig()
    system: SystemConfig = SystemConfig()
    asynchrony: AsynchronyConfig = AsynchronyConfig()
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


def _as_float(value):
    """YAML's ints are floats where a float is expected (and PyYAML reads 1e-3 as a string)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_DACITE = dacite.Config(strict=True, type_hooks={float: _as_float}, cast=[tuple])


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _dotted(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _from_dict(cls, values, prefix: str):
    """``cls`` from a mapping with dacite (strict), errors as ConfigError naming the key."""
    if not isinstance(values, Mapping):
        raise ConfigError(prefix, f"expected a mapping of keys to values, got {values!r}")
    try:
        return dacite.from_dict(cls, dict(values), config=_DACITE)
    except dacite.UnexpectedDataError as error:
        key = str(sorted(error.keys)[0])
        valid = [f.name for f in dataclasses.fields(cls)]
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            _dotted(prefix, key),
            f"unknown key{hint}.{_owners(prefix, key)} Valid keys here: {', '.join(valid)}",
        ) from None
    except dacite.WrongTypeError as error:
        raise ConfigError(
            _dotted(prefix, error.field_path),
            f"expected {_describe(error.field_type)}, got {error.value!r} "
            f"({type(error.value).__name__})",
        ) from None
    except dacite.MissingValueError as error:
        raise ConfigError(
            _dotted(prefix, error.field_path), f"is required for {cls.__name__}; set it"
        ) from None


def _owners(section: str, key: str) -> str:
    """`` It belongs to fedavgm, fednova.`` when other members of a union section have ``key``."""
    if section not in UNION_SECTIONS:
        return ""
    registry = UNION_SECTIONS[section][0]
    owners = [
        name for name, cls in registry.items() if key in {f.name for f in dataclasses.fields(cls)}
    ]
    return f" It belongs to {', '.join(owners)}." if owners else ""


def _section(key: str, values, registry: dict[str, type], default: type):
    """The union member named by ``values["name"]`` (``default`` when there is none).

    A bare model name (``model: cnn``) stands for ``{name: cnn}``.
    """
    if key == "model" and isinstance(values, str):
        values = {"name": values}
    if not isinstance(values, Mapping):
        raise ConfigError(key, f"expected a mapping with a 'name', got {values!r}")
    name = values.get("name", section_names(default)[0])
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{key}.name", f"unknown {key} {name!r}{hint} Known: {', '.join(registry)}"
        )
    return _from_dict(registry[name], values, key)


def config_from_dict(values: Mapping) -> ExperimentConfig:
    """Builds a config from nested dicts, checking every key and type.

    Missing keys keep their defaults.

    Raises:
      ConfigError: for an unknown key or a value of the wrong type, naming it.
    """
    if not isinstance(values, Mapping):
        raise ConfigError("", f"expected a mapping of keys to values, got {values!r}")
    values = dict(values)
    hints = typing.get_type_hints(ExperimentConfig)
    for key, value in values.items():
        if key in UNION_SECTIONS:
            values[key] = _section(key, value, *UNION_SECTIONS[key])
        elif dataclasses.is_dataclass(hints.get(key)):  # so errors name the section's key
            values[key] = _from_dict(hints[key], value, key)
    return _from_dict(ExperimentConfig, values, "")


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
    """A copy with dotted keys replaced: ``replace(c, **{"training.rounds": 5})``.

    Setting a union section's name (``"attack.name": "none"``) switches the
    section to that member, keeping only the keys the new member has.
    """
    values = config_to_dict(config)
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node[leaf] = value
        section = parents[0] if len(parents) == 1 else None
        if leaf == "name" and section in UNION_SECTIONS and value in UNION_SECTIONS[section][0]:
            kept = {f.name for f in dataclasses.fields(UNION_SECTIONS[section][0][value])}
            values[section] = {k: v for k, v in node.items() if k in kept}
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
# Validation and resolution.


def _checked(section: str, check, *args, **kwargs):
    """Runs a check whose ``InvalidArgument`` names a key of ``section``."""
    try:
        return check(*args, **kwargs)
    except InvalidArgument as error:
        raise ConfigError(_dotted(section, error.name), str(error)) from None


def _placeholder_loss(params, batch, rng):
    raise AssertionError("validation builds the algorithm only to check its hyper-parameters")


def _validate_sections(config: ExperimentConfig) -> None:
    training, execution, evaluation = config.training, config.execution, config.evaluation
    for name in ("rounds", "cohort_size", "local_epochs", "batch_size"):
        _checked("training", check_int, name, getattr(training, name), minimum=1)
    _checked("training", check_optional_int, "max_local_steps", training.max_local_steps, minimum=1)
    if isinstance(training.step_bucket, int):
        _checked("training", check_int, "step_bucket", training.step_bucket, minimum=1)
    for name in ("clients_per_chunk", "scan_unroll"):
        _checked("execution", check_optional_int, name, getattr(execution, name), minimum=1)
    if execution.num_lanes != "per_client":
        _checked("execution", check_optional_int, "num_lanes", execution.num_lanes, minimum=1)
    _checked("execution", check_int, "num_devices", execution.num_devices, minimum=1)
    for name in ("every", "batch_size", "per_client_sample", "per_client_batch_size"):
        _checked("evaluation", check_int, name, getattr(evaluation, name), minimum=1)
    _checked("evaluation", check_int, "per_client_split", evaluation.per_client_split, minimum=2)
    _checked(
        "evaluation", check_optional_int, "per_client_chunk", evaluation.per_client_chunk, minimum=1
    )
    _checked(
        "evaluation", check_optional_int, "per_client_every", evaluation.per_client_every, minimum=0
    )
    _checked("checkpoint", check_int, "every", config.checkpoint.every, minimum=0)
    _checked("checkpoint", check_int, "keep", config.checkpoint.keep, minimum=1)
    _checked("", check_int, "seed", config.seed, minimum=0)
    if not config.output_dir:
        raise ConfigError("output_dir", "must be a non-empty path")


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Checks types, values and cross-key rules; returns ``config`` unchanged.

    The algorithm's hyper-parameters are checked by building it (its builder
    owns the checks), which traces nothing.

    Raises:
      ConfigError: naming the first bad key, with what is allowed.
    """
    if not isinstance(config, ExperimentConfig):
        raise ConfigError("", f"expected an ExperimentConfig, got {type(config).__name__}")
    config_from_dict(config_to_dict(config))  # types, for configs built in Python too
    _validate_sections(config)
    _checked("data", config.data.check)
    _checked("model", config.model.check)
    population = config.data.population()
    if config.training.cohort_size > population:
        raise ConfigError(
            "training.cohort_size",
            f"cohort_size={config.training.cohort_size} is larger than the {population} clients "
            f"of {config.data.name}; lower training.cohort_size or raise data.num_clients",
        )
    _checked("algorithm", config.algorithm.build, _placeholder_loss, population)
    _checked("aggregator", config.aggregator.build)
    _checked("aggregator", config.aggregator.check_cohort, config.training.cohort_size)
    _checked("attack", config.attack.build, 2)
    _checked("secure_aggregation", config.secure_aggregation.build)
    _checked("compression", config.compression.check)
    _checked("system", config.system.check)
    _checked("asynchrony", config.asynchrony.check)
    _validate_combinations(config)
    _validate_system(config)
    if config.privacy.enabled:
        _validate_privacy(config, population)
        privacy = config.privacy
        if privacy.noise_multiplier is not None and (
            privacy.mechanism != "tree" or privacy.tree_size is not None
        ):  # resolved: the builder checks the combination (sigma_b against z)
            _checked("privacy", privacy.build, config.training.cohort_size, config.seed)
    return config


def _conflict(first: str, second: str, why: str) -> ConfigError:
    return ConfigError(first, f"cannot be combined with {second}: {why}")


def _validate_combinations(config: ExperimentConfig) -> None:
    """Combinations of aggregation features that cannot be made to work, naming both parts."""
    privacy, secure = config.privacy, config.secure_aggregation
    rule = config.aggregator.name
    if privacy.enabled and rule != "mean":
        raise _conflict(
            "privacy",
            f"aggregator.name={rule}",
            "the DP guarantee is for the noised sum of clipped messages, and an order statistic "
            "is not a sum; use aggregator.name=mean with privacy",
        )
    if secure.enabled and rule != "mean":
        raise _conflict(
            "secure_aggregation",
            f"aggregator.name={rule}",
            "the server only ever sees the sum of the messages; use aggregator.name=mean",
        )
    if secure.enabled and privacy.enabled:
        raise _conflict(
            "secure_aggregation",
            "privacy",
            "the simulated secure aggregation decodes the sum without adding DP noise; run them "
            "separately",
        )
    if secure.enabled and config.compression.name != "none":
        raise _conflict(
            "secure_aggregation",
            f"compression.name={config.compression.name}",
            "secure aggregation sends its own fixed-point encoding; use compression.name=none",
        )
    if config.training.sampling == "poisson" and config.aggregator.name in ("krum", "multi_krum"):
        raise _conflict(
            "training.sampling=poisson",
            f"aggregator.name={rule}",
            "Krum needs at least 2f + 3 clients every round, and a Poisson cohort's size varies",
        )


def _validate_system(config: ExperimentConfig) -> None:
    """Simulated devices and asynchrony with the rest: what cannot work, naming both parts."""
    system, asynchrony, training = config.system, config.asynchrony, config.training
    sampler_changed = {
        "system.over_selection": system.over_selection > 1.0,
        "system.availability": system.availability != "always",
        "asynchrony.mode=fedbuff": asynchrony.buffered,
    }
    for key, changed in sampler_changed.items():
        if changed and config.privacy.enabled:
            raise _conflict(
                key,
                "privacy",
                "clients are then not sampled as the accountant assumes (epsilon would be "
                "optimistic); deadlines and dropouts, which only remove sampled clients, are "
                "allowed with privacy",
            )
        if changed and training.sampling != "fixed_size":
            raise _conflict(
                key,
                f"training.sampling={training.sampling}",
                "the clock samples a fixed number of online clients; use fixed_size",
            )
    if not asynchrony.buffered:
        return
    if not system.clocked:
        raise ConfigError(
            "asynchrony.mode",
            "fedbuff needs simulated time: set --system.speed lognormal (or constant, or a "
            "FedScale device-capacity trace)",
        )
    if system.deadline_seconds is not None or system.over_selection > 1.0:
        raise _conflict(
            "asynchrony.mode=fedbuff",
            "system.deadline_seconds / system.over_selection",
            "asynchronous clients have no round to miss; leave them unset",
        )
    if config.secure_aggregation.enabled:
        raise _conflict(
            "asynchrony.mode=fedbuff",
            "secure_aggregation",
            "masks are agreed within a synchronous cohort",
        )
    if config.attack.name != "none":
        raise _conflict(
            "asynchrony.mode=fedbuff",
            f"attack.name={config.attack.name}",
            "attacks are simulated in synchronous rounds only",
        )
    stateful = config.algorithm.build(_placeholder_loss, config.data.population())
    if stateful.initial_client_state is not None:
        raise _conflict(
            "asynchrony.mode=fedbuff",
            f"algorithm.name={config.algorithm.name}",
            "a client's state would be read when it starts and written when it reports, "
            "with other updates in between; use a stateless algorithm",
        )
    resolved = asynchrony.resolved(training.cohort_size)
    population = config.data.population()
    if resolved.concurrency > population:
        raise ConfigError(
            "asynchrony.concurrency",
            f"concurrency={resolved.concurrency} is larger than the {population} clients; lower it",
        )
    _checked("aggregator", config.aggregator.check_cohort, resolved.buffer_size)


def privacy_accounting(config: ExperimentConfig, population: int) -> dict:
    """The keyword arguments of ``fedjaxsim.privacy.accounting`` for this run's sampler."""
    from fedjaxsim.core.sampling import rounds_per_epoch

    privacy, training = config.privacy, config.training
    tree_size = privacy.tree_size
    if privacy.mechanism == "tree" and tree_size is None:
        tree_size = rounds_per_epoch(population, training.cohort_size)
    return {
        "cohort_size": training.cohort_size,
        "num_total_clients": population,
        "sampling": training.sampling,
        "mechanism": privacy.mechanism,
        "tree_size": tree_size,
        "accountant": privacy.accountant,
    }


def _validate_privacy(config: ExperimentConfig, population: int) -> None:
    from fedjaxsim.privacy import accounting

    privacy = config.privacy
    _checked("privacy", privacy.check)
    spec = privacy_accounting(config, population)
    try:
        adjacency = accounting.adjacency(spec["sampling"], spec["mechanism"])
    except InvalidArgument as error:
        raise ConfigError(
            "privacy.mechanism",
            f"privacy.mechanism={privacy.mechanism} with training.sampling="
            f"{config.training.sampling}: {error}",
        ) from None
    if privacy.adjacency is not None and privacy.adjacency != adjacency:
        raise ConfigError(
            "privacy.adjacency",
            f"is {privacy.adjacency!r}, but this sampler and mechanism give {adjacency!r}; "
            "remove the key (it is written when the config is resolved)",
        )
    if privacy.mechanism == "tree" and privacy.tree_size is not None:
        from fedjaxsim.core.sampling import rounds_per_epoch

        epoch = rounds_per_epoch(population, config.training.cohort_size)
        if epoch % privacy.tree_size:
            raise ConfigError(
                "privacy.tree_size",
                f"{privacy.tree_size} must divide the {epoch} rounds of an epoch, so that no "
                "tree holds a client twice",
            )
    delta = privacy.delta if privacy.delta is not None else default_delta(population)
    # One round of the accounting the run will do: refuses what it cannot account.
    _checked("privacy", accounting.compute_epsilon, 1.0, 1, delta, **spec)
    if privacy.target_epsilon is not None and privacy.noise_multiplier is not None:
        epsilon = _checked(
            "privacy",
            accounting.compute_epsilon,
            privacy.noise_multiplier,
            config.training.rounds,
            delta,
            **spec,
        )
        if epsilon > privacy.target_epsilon:
            raise ConfigError(
                "privacy.noise_multiplier",
                f"noise_multiplier={privacy.noise_multiplier} spends epsilon={epsilon:.4g} in "
                f"{config.training.rounds} rounds, above privacy.target_epsilon="
                f"{privacy.target_epsilon}; remove one of the two",
            )


def _resolve_privacy(config: ExperimentConfig) -> PrivacyConfig:
    """Fills delta, the noise multiplier of a target epsilon, the tree size and the adjacency."""
    from fedjaxsim.privacy import accounting

    privacy = config.privacy
    if not privacy.enabled:
        return privacy
    population = config.data.population()
    spec = privacy_accounting(config, population)
    delta = privacy.delta if privacy.delta is not None else default_delta(population)
    noise_multiplier = privacy.noise_multiplier
    if noise_multiplier is None:
        noise_multiplier = _checked(
            "privacy",
            accounting.find_noise_multiplier,
            privacy.target_epsilon,
            config.training.rounds,
            delta,
            **spec,
        )
    return dataclasses.replace(
        privacy,
        delta=delta,
        noise_multiplier=noise_multiplier,
        tree_size=spec["tree_size"],
        adjacency=accounting.adjacency(spec["sampling"], spec["mechanism"]),
    )


def resolve(config: ExperimentConfig, backend: str | None = None) -> ExperimentConfig:
    """Validates ``config`` and fills each ``None`` default with the value used.

    The execution section gets the backend's measured defaults (the lane
    layout of ``default_num_lanes``, ``default_plan``'s fields and the models'
    ``default_lowering``), and ``evaluation.per_client_every`` the central
    schedule. Idempotent: ``resolve(resolve(c)) == resolve(c)``.
    """
    from fedjaxsim.core.engine import default_plan
    from fedjaxsim.core.packing import default_num_lanes
    from fedjaxsim.models import default_lowering

    validate(config)
    plan = default_plan(backend)
    execution = config.execution
    lanes = execution.num_lanes
    if lanes is None:
        lanes = default_num_lanes(backend, execution.num_devices) or "per_client"

    def pick(value, default):
        return default if value is None else value

    execution = dataclasses.replace(
        execution,
        num_lanes=lanes,
        clients_per_chunk=pick(execution.clients_per_chunk, plan.clients_per_chunk),
        chunk_loop=pick(execution.chunk_loop, plan.chunk_loop),
        scan_unroll=pick(execution.scan_unroll, int(plan.scan_unroll)),
        sort_chunks=pick(execution.sort_chunks, plan.sort_chunks),
        conv_lowering=pick(execution.conv_lowering, default_lowering(backend)),
    )
    evaluation = config.evaluation
    if evaluation.per_client_every is None:
        evaluation = dataclasses.replace(evaluation, per_client_every=evaluation.every)
    asynchrony = config.asynchrony
    if asynchrony.buffered:
        asynchrony = asynchrony.resolved(config.training.cohort_size)
    data = config.data
    if config.model.pretrained and getattr(data, "tokenizer", "") is None:
        # A pretrained model reads text through its own tokenizer.json.
        data = dataclasses.replace(data, tokenizer=config.model.checkpoint)
    resolved = dataclasses.replace(
        config, data=data, execution=execution, evaluation=evaluation, asynchrony=asynchrony
    )
    return validate(dataclasses.replace(resolved, privacy=_resolve_privacy(resolved)))


# ---------------------------------------------------------------------------
# Command line.

RUN_DESCRIPTION = (
    "Run a federated experiment. Settings come from the defaults (FedAvg on the embedded "
    "digits), then from --config FILE.yaml, then from single-key flags (--training.rounds 10, "
    "or the short aliases shown). Pick the algorithm, the dataset, the aggregator and an attack "
    "with --algorithm NAME, --dataset NAME, --aggregator.name NAME and --attack.name NAME, and "
    "compression with --compression.name NAME (or the subcommands algorithm:NAME, data:FAMILY, "
    "aggregator:NAME, attack:NAME, compression:NAME); --privacy.noise-multiplier Z or "
    "--privacy.target-epsilon E makes the run differentially private; --secure-aggregation "
    "sums the messages under masks. Also: "
    "--resume (continue from the latest checkpoint in the output folder; a run also resumes "
    "automatically when its folder has one) and --quiet (no progress bar)."
)


# Flags that pick a union member by name, and the section they pick in.
_SELECTION_FLAGS = {
    "--algorithm": "algorithm",
    "--algorithm.name": "algorithm",
    "--dataset": "data",
    "--data.name": "data",
    "--model": "model",
    "--model.name": "model",
    "--aggregator.name": "aggregator",
    "--attack.name": "attack",
    "--compression.name": "compression",
}


def _selection_arguments(selected: dict[str, str], given: Sequence[str]) -> list[str]:
    """``given`` with the names picked by flags (``--algorithm fedadam``) as tyro's
    subcommand tokens in front, unless ``given`` already holds the subcommand."""
    leading, trailing = [], []
    for section, name in selected.items():
        registry, _ = UNION_SECTIONS[section]
        if name not in registry:
            close = difflib.get_close_matches(name, registry, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{section}.name", f"unknown {section} {name!r}{hint} Known: {', '.join(registry)}"
            )
        member = registry[name]
        if not any(token.startswith(f"{section}:") for token in given):
            leading.append(f"{section}:{_subcommand(member)}")
        if len(section_names(member)) > 1:  # a family of several: its name is a real flag
            trailing += [f"--{section}.name", name]
    return [*leading, *given, *trailing]


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

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--quiet", action="store_true")
    for flag in _SELECTION_FLAGS:
        pre.add_argument(flag, default=None, dest=flag)
    pre.add_argument("--secure-aggregation", action="store_true")
    known, rest = pre.parse_known_args(list(argv))
    if known.secure_aggregation:  # the bare flag turns it on
        rest = ["--secure-aggregation.enabled", *rest]
    selected = {
        section: getattr(known, flag)
        for flag, section in _SELECTION_FLAGS.items()
        if getattr(known, flag) is not None
    }
    base = load_config(known.config) if known.config else ExperimentConfig()
    config = tyro.cli(
        ExperimentConfig,
        default=base,
        args=_selection_arguments(selected, rest),
        prog="fedjaxsim run",
        description=RUN_DESCRIPTION,
        config=(tyro.conf.CascadeSubcommandArgs,),
    )
    if known.quiet:
        config = dataclasses.replace(
            config, logging=dataclasses.replace(config.logging, progress=False)
        )
    return validate(config), known.resume
