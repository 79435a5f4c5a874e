"""Datasets by name: the one place that maps a name to its loader."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from fedjaxsim.data.federated import FederatedDataset


def _digits(**options) -> FederatedDataset:
    from fedjaxsim.data.digits import federated_digits

    return federated_digits(**options)


def _emnist(only_digits: bool) -> Callable[..., FederatedDataset]:
    def load(**options) -> FederatedDataset:
        from fedjaxsim.data.emnist import load_federated_emnist

        return load_federated_emnist(only_digits, **options)

    return load


def _tfds(name: str) -> Callable[..., FederatedDataset]:
    def load(**options) -> FederatedDataset:
        from fedjaxsim.data.tfds_images import federated_tfds

        return federated_tfds(name, **options)

    return load


def _shakespeare(**options) -> FederatedDataset:
    from fedjaxsim.data.shakespeare import load_shakespeare

    return load_shakespeare(**options)


def _instructions(**options) -> FederatedDataset:
    from fedjaxsim.data.instructions import load_instructions

    return load_instructions(**options)


def _fed_cifar100(**options) -> FederatedDataset:
    from fedjaxsim.data.fed_cifar100 import load_fed_cifar100

    return load_fed_cifar100(**options)


def _stackoverflow(task: str) -> Callable[..., FederatedDataset]:
    def load(**options) -> FederatedDataset:
        from fedjaxsim.data.stackoverflow import load_stackoverflow

        return load_stackoverflow(task, **options)

    return load


# Loaders import their module only when called, so that naming a dataset
# never needs h5py or tensorflow-datasets unless that dataset is loaded.
DATASETS: dict[str, Callable[..., FederatedDataset]] = {
    "digits": _digits,
    "federated_emnist": _emnist(False),
    "federated_emnist_digits": _emnist(True),
    "mnist": _tfds("mnist"),
    "emnist/byclass": _tfds("emnist/byclass"),
    "fashion_mnist": _tfds("fashion_mnist"),
    "cifar10": _tfds("cifar10"),
    "cifar100": _tfds("cifar100"),
    "shakespeare": _shakespeare,
    "fed_cifar100": _fed_cifar100,
    "stackoverflow_nwp": _stackoverflow("stackoverflow_nwp"),
    "stackoverflow_tp": _stackoverflow("stackoverflow_tp"),
    "instructions": _instructions,
}


def load_dataset(name: str, **options) -> FederatedDataset:
    """Loads a dataset by name.

    Args:
      name: one of :data:`DATASETS`: ``"digits"`` (embedded, no download),
        ``"federated_emnist"`` and ``"federated_emnist_digits"`` (natural
        writer clients), or a TFDS image dataset partitioned into clients
        (``"mnist"``, ``"emnist/byclass"``, ``"fashion_mnist"``, ``"cifar10"``,
        ``"cifar100"``), or the benchmark suite of Reddi et al. 2021 with
        natural clients: ``"shakespeare"``, ``"fed_cifar100"``,
        ``"stackoverflow_nwp"``, ``"stackoverflow_tp"``; or ``"instructions"``,
        a JSONL instruction file tokenized with a local ``tokenizer.json``
        (:func:`fedjaxsim.data.instructions.load_instructions`: ``path=``,
        ``tokenizer=`` and ``user_field=`` or ``category_field=``).
      **options: passed to the loader (e.g. ``num_clients``, ``partition``,
        ``data_dir``).

    Raises:
      ValueError: an unknown name, with the closest known ones.
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}. Known datasets: {', '.join(DATASETS)}")
    return DATASETS[name](**options)
