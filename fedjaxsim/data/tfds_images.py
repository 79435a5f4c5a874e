"""Centralized image datasets from TensorFlow Datasets, federated by a partitioner.

Images are read through ``tfds.data_source`` (random access to
``array_record`` files, decoded with PIL or OpenCV), which does not import
TensorFlow. Preparing a dataset the first time (``download_and_prepare``, or
``tfds build NAME --file_format=array_record``) does need TensorFlow for these
image builders; it can run once on any machine and the prepared folder be
copied. After the first read, fedjaxsim keeps the decoded arrays in its own
store (:mod:`fedjaxsim.data.store`), so later loads skip TFDS entirely.

Pixels are kept as uint8 with scale 255 (model sees float32 in [0, 1]). MNIST,
EMNIST and Fashion-MNIST draw the stroke bright on a dark background, so ink
is already 1.0. TFDS stores EMNIST transposed (as the original EMNIST files);
it is transposed back so that characters read upright, as in Federated EMNIST.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import numpy as np

from fedjaxsim.data.download import DatasetUnavailableError, resolve_data_dir
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.partition import partition_labels
from fedjaxsim.data.validation import validate_federated_data

PIXEL_SCALE = 255.0


@dataclasses.dataclass(frozen=True)
class ImageDatasetSpec:
    """What fedjaxsim needs to know about a TFDS image classification dataset."""

    num_classes: int
    image_shape: tuple[int, int, int]
    transpose: bool = False  # stored transposed (EMNIST)


TFDS_IMAGE_DATASETS = {
    "mnist": ImageDatasetSpec(10, (28, 28, 1)),
    "emnist/byclass": ImageDatasetSpec(62, (28, 28, 1), transpose=True),
    "fashion_mnist": ImageDatasetSpec(10, (28, 28, 1)),
    "cifar10": ImageDatasetSpec(10, (32, 32, 3)),
    "cifar100": ImageDatasetSpec(100, (32, 32, 3)),
}


def image_dataset_spec(name: str) -> ImageDatasetSpec:
    """The spec of a supported TFDS name.

    Raises:
      ValueError: an unknown name, with the closest supported ones.
    """
    if name in TFDS_IMAGE_DATASETS:
        return TFDS_IMAGE_DATASETS[name]
    close = difflib.get_close_matches(name, TFDS_IMAGE_DATASETS, n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(
        f"unknown TFDS image dataset {name!r}{hint}. Supported: {', '.join(TFDS_IMAGE_DATASETS)}"
    )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "loading TFDS datasets needs tensorflow-datasets (TensorFlow itself is not needed "
            "to read prepared data): pip install 'fedjaxsim[tfds]'"
        ) from error
    return tfds


def read_tfds_split(
    name: str, split: str, *, tfds_data_dir: str | Path | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split through ``tfds.data_source``.

    Args:
      name: a key of :data:`TFDS_IMAGE_DATASETS`.
      split: e.g. ``"train"`` or ``"test"``.
      tfds_data_dir: TFDS's data folder (None: TFDS's default).
      download: let TFDS download and prepare a missing dataset.

    Returns:
      (uint8[N, H, W, C] images, upright; int32[N] labels).

    Raises:
      ValueError: unknown name, or examples of the wrong shape or dtype.
      DatasetUnavailableError: the split is not prepared as array_record.
    """
    spec = image_dataset_spec(name)
    tfds = _import_tfds()
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=None if tfds_data_dir is None else str(tfds_data_dir),
            download=download,
        )
    # An unprepared dataset surfaces as NotImplementedError ("random access ... is
    # not supported" for the TFRecord default) or, in older TFDS, AssertionError.
    except (NotImplementedError, AssertionError, FileNotFoundError) as error:
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared as array_record in "
            f"{tfds_data_dir or 'the TFDS data folder'} ({error}). Prepare it once with "
            f"`tfds build {name} --file_format=array_record` (needs TensorFlow, on any "
            "machine; copy the folder here) or pass download=True."
        ) from error
    count = len(source)
    images = np.empty((count, *spec.image_shape), np.uint8)
    labels = np.empty(count, np.int32)
    # One example at a time: a batched __getitems__ would be faster, but the
    # mock of tfds.testing.mock_data does not implement it, and the arrays are
    # cached after the first read anyway.
    for index in range(count):
        example = source[index]
        image = np.asarray(example["image"])
        if spec.transpose:
            image = image.transpose(1, 0, 2)
        if image.shape != spec.image_shape or image.dtype != np.uint8:
            raise ValueError(
                f"TFDS {name}/{split} example {index} is {image.dtype}{image.shape}, expected "
                f"uint8{spec.image_shape}"
            )
        images[index] = image
        labels[index] = int(example["label"])
    return images, labels


def load_tfds_split(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    tfds_data_dir: str | Path | None = None,
    download: bool = False,
    cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_tfds_split`, cached as a memory-mapped store after the first read.

    Args:
      data_dir: fedjaxsim's cache folder (see ``resolve_data_dir``).
      cache: read and write the cache; False always asks TFDS.

    Returns:
      (uint8 images, int32 labels), possibly memory-mapped.
    """
    from fedjaxsim.data.store import read_federated_data, write_federated_data

    store = resolve_data_dir(data_dir) / "tfds" / name.replace("/", "__") / split
    if cache and (store / "manifest.json").is_file():
        data = read_federated_data(store)
        return data.fields["x"], data.fields["y"]
    images, labels = read_tfds_split(name, split, tfds_data_dir=tfds_data_dir, download=download)
    if cache:
        whole = FederatedData({"x": images, "y": labels}, np.array([0, len(labels)], np.int64))
        write_federated_data(
            whole, store, metadata={"tfds_name": name, "split": split}, overwrite=True
        )
    return images, labels


def federated_tfds(
    name: str,
    *,
    num_clients: int = 100,
    partition: str = "dirichlet",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    data_dir: str | Path | None = None,
    tfds_data_dir: str | Path | None = None,
    download: bool = False,
    cache: bool = True,
    drop_invalid: bool = False,
) -> FederatedDataset:
    """A TFDS image dataset, its train split partitioned into clients.

    The test split stays one client, for centralized evaluation.

    Args:
      name: a key of :data:`TFDS_IMAGE_DATASETS`.
      num_clients: clients of the train split.
      partition: ``"iid"``, ``"dirichlet"``, ``"shards"`` or ``"quantity"``
        (see :func:`fedjaxsim.data.partition.partition_labels` for the
        parameters ``alpha``, ``shards_per_client``, ``distribution``,
        ``sigma``, ``exponent``).
      seed: seeds the partition.
      data_dir, tfds_data_dir, download, cache: see :func:`load_tfds_split`.
      drop_invalid: drop clients with out-of-range labels with a warning
        instead of raising.

    Returns:
      FederatedDataset named ``name`` with ``"x"`` uint8 (scale 255) and ``"y"`` int32.
    """
    spec = image_dataset_spec(name)
    arrays = {
        split: load_tfds_split(
            name,
            split,
            data_dir=data_dir,
            tfds_data_dir=tfds_data_dir,
            download=download,
            cache=cache,
        )
        for split in ("train", "test")
    }
    images, labels = arrays["train"]
    assignment = partition_labels(
        partition,
        labels,
        num_clients,
        seed,
        alpha=alpha,
        shards_per_client=shards_per_client,
        distribution=distribution,
        sigma=sigma,
        exponent=exponent,
    )
    scales = {"x": PIXEL_SCALE}
    train = FederatedData.from_partition(
        {"x": images, "y": labels}, assignment, field_scales=scales
    )
    test_images, test_labels = arrays["test"]
    test = FederatedData(
        {"x": np.asarray(test_images), "y": np.asarray(test_labels)},
        np.array([0, len(test_labels)], np.int64),
        field_scales=scales,
    )
    train = validate_federated_data(
        train, num_classes=spec.num_classes, drop_invalid=drop_invalid, source=f"TFDS {name}/train"
    )
    test = validate_federated_data(
        test, num_classes=spec.num_classes, drop_invalid=False, source=f"TFDS {name}/test"
    )
    return FederatedDataset(name, train, test, spec.num_classes, spec.image_shape)
