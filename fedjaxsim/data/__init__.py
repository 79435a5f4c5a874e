"""Federated datasets: loading, partitioning, caching and validation.

This package is the only one that touches dataset files, h5py, SQLite or
tensorflow-datasets; it hands NumPy arrays to the rest of fedjaxsim. Optional
readers import their dependencies lazily (``pip install 'fedjaxsim[data]'``
for h5py and msgpack, ``'fedjaxsim[tfds]'`` for tensorflow-datasets).
"""

from fedjaxsim.data.download import (
    ChecksumError,
    DatasetUnavailableError,
    RemoteFile,
    fetch,
    resolve_data_dir,
)
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.formats import DataFormatError
from fedjaxsim.data.partition import (
    dirichlet_label_partition,
    iid_partition,
    natural_id_partition,
    partition_labels,
    quantity_skew_partition,
    shard_partition,
)
from fedjaxsim.data.registry import DATASETS, load_dataset
from fedjaxsim.data.store import (
    StoreError,
    read_dataset,
    read_federated_data,
    write_dataset,
    write_federated_data,
)
from fedjaxsim.data.validation import DroppedClientsWarning, validate_federated_data

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DataFormatError",
    "DatasetUnavailableError",
    "DroppedClientsWarning",
    "FederatedData",
    "FederatedDataset",
    "RemoteFile",
    "StoreError",
    "dirichlet_label_partition",
    "fetch",
    "iid_partition",
    "load_dataset",
    "natural_id_partition",
    "partition_labels",
    "quantity_skew_partition",
    "read_dataset",
    "read_federated_data",
    "resolve_data_dir",
    "shard_partition",
    "validate_federated_data",
    "write_dataset",
    "write_federated_data",
]
