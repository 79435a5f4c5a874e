"""Turns a resolved config into the objects a run needs: data, model, algorithm.

Everything here is a pure function of the config (and its seed), which is what
makes a resumed run rebuild exactly the dataset, the test-client sample and
the algorithm of the run it continues.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax

from fedjaxsim.core.engine import ExecutionPlan
from fedjaxsim.core.packing import PackingConfig
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.runner.config import (
    ALGORITHM_SPECS,
    NATURAL_DATASETS,
    ConfigError,
    ExperimentConfig,
    builder_function,
)

# Domain tag of the per-client evaluation sample (see core/sampling.py).
_EVAL_SAMPLE_STREAM = 0xE7A1_C11E


def load_dataset(config: ExperimentConfig) -> FederatedDataset:
    """Loads the config's dataset through ``fedjaxsim.data.registry``.

    Raises:
      ConfigError: when the dataset has fewer clients than the cohort (only
        known once loaded for some datasets).
    """
    from fedjaxsim.data.registry import load_dataset as registry_load

    data = config.data
    if data.name == "digits":
        options = {
            "num_clients": data.num_clients,
            "alpha": data.alpha,
            "test_fraction": data.test_fraction,
            "seed": config.seed,
        }
    elif data.name in NATURAL_DATASETS:
        options = {"source": data.source, "data_dir": data.data_dir}
        if data.download is not None:
            options["download"] = data.download
        options["progress"] = config.logging.progress
    else:
        options = {
            "num_clients": data.num_clients,
            "partition": data.partition,
            "seed": config.seed,
            "alpha": data.alpha,
            "shards_per_client": data.shards_per_client,
            "data_dir": data.data_dir,
        }
        if data.download is not None:
            options["download"] = data.download
    dataset = registry_load(data.name, **options)
    if config.training.cohort_size > dataset.train.num_clients:
        raise ConfigError(
            "training.cohort_size",
            f"cohort_size={config.training.cohort_size} is larger than the "
            f"{dataset.train.num_clients} clients of {dataset.name}",
        )
    return dataset


def packing_config(config: ExperimentConfig) -> PackingConfig:
    training = config.training
    return PackingConfig(
        batch_size=training.batch_size,
        num_epochs=training.local_epochs,
        max_steps=training.max_local_steps,
        step_bucket=training.step_bucket,
        weighting=training.weighting,
    )


def execution_plan(config: ExperimentConfig) -> ExecutionPlan:
    """The resolved config's execution plan."""
    execution = config.execution
    return ExecutionPlan(
        num_lanes=None if execution.num_lanes == "per_client" else execution.num_lanes,
        clients_per_chunk=execution.clients_per_chunk,
        chunk_loop=execution.chunk_loop,
        scan_unroll=execution.scan_unroll,
        conv_lowering=execution.conv_lowering,
    )


def build_algorithm(config: ExperimentConfig, loss_fn, num_total_clients: int):
    """Builds the resolved config's algorithm.

    Returns:
      ``(algorithm, initial_client_state_fn)``; the second is None for
      stateless algorithms, else ``params -> one client's default state``
      for a :class:`~fedjaxsim.core.client_state.ClientStateStore`.

    Raises:
      ConfigError: when the builder rejects a hyper-parameter (named
        ``algorithm.<name>``).
    """
    hp = config.algorithm
    name = hp.name
    builder = builder_function(name)
    try:
        if name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova", "ditto"):
            kwargs = {k: getattr(hp, k) for k in ALGORITHM_SPECS[name].hparams}
            algorithm = builder(loss_fn, **kwargs)
        elif name == "fedprox":
            algorithm = builder(
                loss_fn,
                client_optimizer=optax.sgd(hp.client_learning_rate),
                proximal_mu=hp.proximal_mu,
                server_optimizer=optax.sgd(hp.server_learning_rate),
            )
        elif name == "mime_lite":
            algorithm = builder(
                loss_fn,
                base_optimizer=optax.sgd(hp.client_learning_rate, momentum=hp.momentum or None),
                server_learning_rate=hp.server_learning_rate,
            )
        elif name == "scaffold":
            algorithm = builder(
                loss_fn,
                client_learning_rate=hp.client_learning_rate,
                num_total_clients=num_total_clients,
                server_learning_rate=hp.server_learning_rate,
            )
        elif name == "qffl":
            algorithm = builder(
                loss_fn,
                q=hp.q,
                client_learning_rate=hp.client_learning_rate,
                lipschitz_constant=hp.lipschitz_constant,
            )
        else:  # pragma: no cover - ALGORITHM_SPECS and this function list the same names
            raise ConfigError("algorithm.name", f"no runner wiring for {name!r}")
    except ConfigError:
        raise
    except ValueError as error:
        message = str(error)
        key = next(
            (
                f"algorithm.{field.name}"
                for field in dataclasses.fields(hp)
                if message.startswith(field.name)
            ),
            "algorithm",
        )
        raise ConfigError(key, message) from error
    initial_state_fn = None
    if ALGORITHM_SPECS[name].stateful:
        from fedjaxsim import algorithms

        # e.g. scaffold_initial_client_state: the store's default client state.
        initial_state_fn = getattr(algorithms, f"{name}_initial_client_state")
    return algorithm, initial_state_fn


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
        partition = config.data.partition or "dirichlet"
        assignment = partition_labels(
            partition,
            labels,
            min(config.evaluation.per_client_split, len(labels)),
            config.seed,
            alpha=config.data.alpha or 0.5,
            shards_per_client=config.data.shards_per_client or 2,
        )
        test = FederatedData.from_partition(
            examples, assignment, field_scales=dict(test.field_scales)
        )
    count = min(config.evaluation.per_client_sample, test.num_clients)
    rng = np.random.default_rng([_EVAL_SAMPLE_STREAM, config.seed])
    ids = np.sort(rng.choice(test.num_clients, size=count, replace=False)).astype(np.int64)
    return test.clients(ids), ids
