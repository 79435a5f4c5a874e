"""Turns a resolved config into the objects a run needs: data, model, algorithm.

Everything here is a pure function of the config (and its seed), which is what
makes a resumed run rebuild exactly the dataset, the test-client sample and
the algorithm of the run it continues.
"""

from __future__ import annotations

import numpy as np

from fedjaxsim.algorithms.fed_nova import normalized_local_steps
from fedjaxsim.core.algorithm import Algorithm, with_aggregator
from fedjaxsim.core.client_state import ClientStateStore
from fedjaxsim.core.engine import ExecutionPlan
from fedjaxsim.core.packing import PackingConfig
from fedjaxsim.core.tasks import CLASSIFICATION, Task
from fedjaxsim.core.validation import InvalidArgument
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.robust.attacks import attack_client_states, choose_malicious_clients, with_attack
from fedjaxsim.runner.config import ConfigError, ExperimentConfig
from fedjaxsim.runner.model_configs import BuiltModel

# Domain tag of the per-client evaluation sample (see core/sampling.py).
_EVAL_SAMPLE_STREAM = 0xE7A1_C11E


def load_dataset(config: ExperimentConfig) -> FederatedDataset:
    """Loads the config's dataset.

    Raises:
      ConfigError: when the dataset has fewer clients than the cohort (only
        known once loaded for some datasets).
    """
    dataset = config.data.load(config.seed, config.logging.progress)
    if config.training.weighting == "num_tokens" and dataset.task.kind != "next_token":
        raise ConfigError(
            "training.weighting",
            f"weighting='num_tokens' counts target tokens, but {dataset.name} is a "
            f"{dataset.task.kind} task; use num_examples",
        )
    if config.training.cohort_size > dataset.train.num_clients:
        raise ConfigError(
            "training.cohort_size",
            f"cohort_size={config.training.cohort_size} is larger than the "
            f"{dataset.train.num_clients} clients of {dataset.name}",
        )
    return dataset


def packing_config(config: ExperimentConfig, task: Task = CLASSIFICATION) -> PackingConfig:
    training = config.training
    return PackingConfig(
        batch_size=training.batch_size,
        num_epochs=training.local_epochs,
        max_steps=training.max_local_steps,
        step_bucket=training.step_bucket,
        weighting=training.weighting,
        pad_id=task.pad_id,
    )


# The built-in models that fit each task kind.
MODELS_FOR_TASK = {
    "classification": ("cnn", "dense", "logreg", "resnet18"),
    "next_token": ("char_lstm", "word_lstm", "transformer"),
    "multilabel": ("tag_logreg",),
}


def input_dtype(dataset: FederatedDataset) -> np.dtype:
    """The dtype the model sees for ``x``: float32 for scaled pixels, else as stored."""
    if "x" in dataset.train.field_scales:
        return np.dtype(np.float32)
    return np.asarray(dataset.train.fields["x"][:0]).dtype


def sample_inputs(dataset: FederatedDataset) -> np.ndarray:
    """One all-zero example batch of the model's input, to initialise it."""
    return np.zeros((1, *dataset.input_shape), input_dtype(dataset))


def check_model_fits(model: str, task: Task, dataset_name: str) -> None:
    """Raises ConfigError when the built-in ``model`` cannot learn ``task``."""
    fitting = MODELS_FOR_TASK[task.kind]
    if model not in fitting:
        raise ConfigError(
            "model",
            f"model={model!r} does not fit {dataset_name}, a {task.kind} task; "
            f"choose --model {' or '.join(fitting)}",
        )


def builtin_model(config: ExperimentConfig, num_classes: int, task: Task, where: str):
    """The config's built-in model for ``num_classes`` outputs (checked to fit ``task``)."""
    from fedjaxsim.models import get_model

    check_model_fits(config.model.name, task, where)
    options = {}
    if task.input_vocab_size is not None:
        options["vocab_size"] = task.input_vocab_size
    return get_model(
        config.model.name, num_classes, lowering=config.execution.conv_lowering, **options
    )


def _pretrained_model(config: ExperimentConfig, dataset: FederatedDataset, rng) -> BuiltModel:
    """The config's pretrained checkpoint, checked against the dataset's tokens."""
    name = config.model.name
    if dataset.task.kind != "next_token":
        raise ConfigError(
            "model",
            f"model={name!r} predicts the next token, but {dataset.name} is a "
            f"{dataset.task.kind} task; fine-tune it on tokenized text (e.g. --dataset "
            "shakespeare, or instructions)",
        )
    try:
        built, lm_config = config.model.load(rng)
    except InvalidArgument as error:
        raise ConfigError(f"model.{error.name}", str(error)) from error
    if dataset.num_classes > lm_config.vocab_size + 1:
        raise ConfigError(
            "data.tokenizer",
            f"{dataset.name} has {dataset.num_classes} token ids, more than the "
            f"{lm_config.vocab_size} of the checkpoint {config.model.checkpoint}; tokenize the "
            "data with the checkpoint's own tokenizer.json",
        )
    length = dataset.input_shape[0]
    if length > lm_config.n_positions:
        raise ConfigError(
            "data.sequence_length",
            f"sequences of {length} tokens are longer than the {lm_config.n_positions} "
            f"positions of {config.model.checkpoint}; lower data.sequence_length",
        )
    return built


def build_model(config: ExperimentConfig, dataset: FederatedDataset, rng) -> BuiltModel:
    """The config's model for ``dataset``: built-in (initialised from ``rng``) or pretrained.

    Raises:
      ConfigError: when the model does not fit the dataset's task, or a
        checkpoint cannot be read (naming the ``model.*`` key at fault).
    """
    if config.model.pretrained:
        return _pretrained_model(config, dataset, rng)
    model = builtin_model(config, dataset.num_classes, dataset.task, dataset.name)
    return BuiltModel(model, model.init(rng, sample_inputs(dataset)), (), None)


def num_lanes(config: ExperimentConfig) -> int | None:
    """The resolved config's lane layout, for ``pack_cohort(num_lanes=...)``."""
    lanes = config.execution.num_lanes
    return None if lanes == "per_client" else lanes


def execution_plan(config: ExperimentConfig) -> ExecutionPlan:
    """The resolved config's execution plan."""
    execution = config.execution
    return ExecutionPlan(
        clients_per_chunk=execution.clients_per_chunk,
        chunk_loop=execution.chunk_loop,
        scan_unroll=execution.scan_unroll,
        sort_chunks=execution.sort_chunks,
    )


class ClientStates:
    """What the runner keeps per client between rounds.

    The algorithm's own client state (SCAFFOLD's control variates, Ditto's
    personal models) lives in a :class:`ClientStateStore`; under an attack,
    whether each client is malicious (a pure function of the seed) is added
    to it for the round and stripped off again.
    """

    def __init__(self, store: ClientStateStore | None, malicious: np.ndarray | None):
        self.store = store
        self.malicious = malicious

    @property
    def used(self) -> bool:
        return self.store is not None or self.malicious is not None

    def gather(self, client_ids):
        inner = () if self.store is None else self.store.gather(client_ids)
        if self.malicious is None:
            return inner
        return attack_client_states(self.malicious, client_ids, inner)

    def scatter(self, client_ids, new_states) -> None:
        if self.malicious is not None:
            new_states = new_states.inner
        if self.store is not None:
            self.store.scatter(client_ids, new_states)


def build_aggregator(config: ExperimentConfig):
    """The run's aggregator: secure aggregation, DP, or the configured rule, with compression.

    ``validate`` has refused the combinations that cannot work (a robust rule
    under DP or secure aggregation, DP with secure aggregation).
    """
    if config.secure_aggregation.enabled:
        aggregator = config.secure_aggregation.build()
    elif config.privacy.enabled:
        aggregator = config.privacy.build(config.training.cohort_size, config.seed)
    else:
        aggregator = config.aggregator.build()
    return config.compression.wrap_aggregator(aggregator)


def partial_work(config: ExperimentConfig) -> bool:
    """Whether clients may report fewer steps than their full work (late, under a deadline)."""
    system = config.system
    return system.deadline_seconds is not None and system.late_clients == "partial"


def build_algorithm(
    config: ExperimentConfig, loss_fn, dataset: FederatedDataset, params
) -> tuple[Algorithm, ClientStates]:
    """Builds the resolved config's algorithm with its aggregator, compression and attack.

    Returns:
      ``(algorithm, client_states)``.

    Raises:
      ConfigError: when a builder rejects a value (named ``<section>.<name>``).
    """
    population = dataset.train.num_clients
    sections = (
        ("algorithm", lambda: config.algorithm.build(loss_fn, population)),
        ("aggregator", lambda: build_aggregator(config)),
        ("attack", lambda: config.attack.build(dataset.num_classes)),
    )
    built = {}
    for section, build in sections:
        try:
            built[section] = build()
        except InvalidArgument as error:
            raise ConfigError(f"{section}.{error.name}", str(error)) from error
    algorithm = with_aggregator(built["algorithm"], built["aggregator"])
    if partial_work(config) and not getattr(config.algorithm, "normalizes_local_steps", False):
        algorithm = normalized_local_steps(algorithm)
    algorithm = config.compression.wrap_algorithm(algorithm)
    store = None
    if algorithm.initial_client_state is not None:
        store = ClientStateStore(algorithm.initial_client_state(params), population)
    malicious = None
    if built["attack"] is not None:
        algorithm = with_attack(algorithm, built["attack"])
        malicious = choose_malicious_clients(population, config.attack.fraction, config.seed)
    return algorithm, ClientStates(store, malicious)


def sample_cohort(config: ExperimentConfig, population: int, round_index: int) -> np.ndarray:
    """The cohort of ``round_index`` under ``training.sampling`` (a pure function of the seed)."""
    from fedjaxsim.core import sampling

    training = config.training
    if training.sampling == "poisson":
        rate = training.cohort_size / population
        return sampling.sample_poisson(config.seed, round_index, population, rate)
    if training.sampling == "shuffle":
        return sampling.sample_shuffled(config.seed, round_index, population, training.cohort_size)
    return sampling.sample_uniform(config.seed, round_index, population, training.cohort_size)


def sample_evaluation_clients(config: ExperimentConfig, dataset: FederatedDataset):
    """The fixed sample of test clients for per-client evaluation.

    When the test split is one client (digits, TFDS datasets), it is first
    split into ``evaluation.per_client_split`` clients with the training
    partitioner (Dirichlet label skew for digits), seeded by the config seed.
    The sample (``evaluation.per_client_sample`` clients, without
    replacement) is a pure function of the seed, so every evaluation of a run,
    resumed or not, sees the same clients.

    Returns:
      ``(clients, client_ids)``: a list of dicts of NumPy arrays, and int64
      ids into the (possibly split) test population.
    """
    from fedjaxsim.data.partition import partition_labels

    test: FederatedData = dataset.test
    if test.num_clients == 1:
        examples = test.all_examples(decode=False)
        labels = np.asarray(examples["y"])
        data = config.data
        assignment = partition_labels(
            data.partition,
            labels,
            min(config.evaluation.per_client_split, len(labels)),
            config.seed,
            alpha=data.alpha,
            shards_per_client=data.shards_per_client,
        )
        test = FederatedData.from_partition(
            examples, assignment, field_scales=dict(test.field_scales)
        )
    count = min(config.evaluation.per_client_sample, test.num_clients)
    rng = np.random.default_rng([_EVAL_SAMPLE_STREAM, config.seed])
    ids = np.sort(rng.choice(test.num_clients, size=count, replace=False)).astype(np.int64)
    return test.clients(ids), ids
