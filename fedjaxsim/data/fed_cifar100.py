"""Federated CIFAR-100 (Reddi et al. 2021; Krizhevsky 2009).

CIFAR-100 split over 500 train and 100 test clients of 100 images each by a
Pachinko allocation over the coarse and fine labels, as published in two
formats that hold the same clients and images:

* TensorFlow Federated: ``fed_cifar100_{train,test}.h5`` inside
  ``fed_cifar100.tar.bz2``; client ``examples/<id>`` holds ``image``
  uint8[N, 32, 32, 3], ``label`` (fine, 0-99) and ``coarse_label`` (0-19)
  (:func:`read_tff_fed_cifar100`);
* FedJAX: ``federated_cifar100_{train,test}.sqlite`` with the same columns,
  which ``fedjax.datasets.cifar100.load_split`` builds from TFF's
  ``cifar100.sqlite.lzma`` and pins by SHA-256 (:func:`read_fedjax_fed_cifar100`).
  FedJAX publishes no download of the built files, so fedjaxsim reads them
  from the cache folder but never downloads them.

Every reader gives the same :class:`~fedjaxsim.data.federated.FederatedData`:
clients sorted by id (as strings), ``"x"`` uint8[N, 32, 32, 3] with scale 255
(the model sees float32 in [0, 1]) and ``"y"`` int32[N] fine labels, as
FedJAX's ``preprocess_client`` (``{"x": image, "y": label}``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fedjaxsim.data import download as downloads
from fedjaxsim.data.emnist import SplitFacts, check_facts
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.formats import iter_fedjax_sqlite, iter_tff_hdf5
from fedjaxsim.data.validation import ClientCollector, InvalidClient

IMAGE_SHAPE = (32, 32, 3)
PIXEL_SCALE = 255.0
NUM_CLASSES = 100
NUM_COARSE_CLASSES = 20
SPLITS = ("train", "test")
SOURCES = ("tff", "fedjax")
NAME = "fed_cifar100"

# TFF's cifar100.load_data documentation: 500 train and 100 test clients of
# 100 examples each (a true partition of CIFAR-100's 50,000 and 10,000 images).
PUBLISHED_FACTS = {
    "train": SplitFacts(500, 50_000),
    "test": SplitFacts(100, 10_000),
}

_TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
# SHA-256 of TFF's archive, as TFF's own loader pins it (file_hash=).
TFF_ARCHIVE = downloads.RemoteFile(
    "fed_cifar100.tar.bz2",
    _TFF_URL + "fed_cifar100.tar.bz2",
    "e8575e22c038ecef1ce6c7d492d7abee7da13b1e1ba9b70a7fc18531ba7590de",
)
# The TFF SQLite file FedJAX builds its files from.
FEDJAX_BUILD_SOURCE = _TFF_URL + "cifar100.sqlite.lzma"
# SHA-256 of the files FedJAX builds, as fedjax/datasets/cifar100.py validates them.
FEDJAX_SQLITE_SHA256 = {
    "train": "a4dc2f4ac4c9b6e7bd5234a1b568389384c00c903dcd34001c3cf50a4a81c713",
    "test": "74416c6ee8f41b1086f0e0e3c5289ac6df5a641100df48e8b583411a55de891f",
}


def tff_filename(split: str) -> str:
    return f"fed_cifar100_{split}.h5"


def fedjax_filename(split: str) -> str:
    return f"federated_cifar100_{split}.sqlite"


def _converter(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw ``image``/``label`` (+ ``coarse_label``) columns -> stored ``x``, ``y``."""
    if not {"image", "label"} <= set(fields) or not set(fields) <= {
        "image",
        "label",
        "coarse_label",
    }:
        raise InvalidClient(
            "bad columns",
            f"has columns {sorted(fields)}, expected 'image', 'label' and 'coarse_label'",
        )
    image = np.asarray(fields["image"])
    count = len(image)
    if image.shape[1:] != IMAGE_SHAPE:
        raise InvalidClient(
            "bad shape", f"has images of shape {image.shape[1:]}, expected {IMAGE_SHAPE}"
        )
    if not np.issubdtype(image.dtype, np.integer):
        raise InvalidClient("bad pixels", f"has {image.dtype} pixels, expected 8-bit integers")
    if image.dtype != np.uint8 and (image.min() < 0 or image.max() > 255):
        raise InvalidClient(
            "bad pixels",
            f"has pixels outside [0, 255] (min {image.min()}, max {image.max()})",
        )
    labels = np.asarray(fields["label"])
    if labels.size != count:
        raise InvalidClient("bad shape", f"has {labels.size} labels for {count} images")
    if "coarse_label" in fields:
        coarse = np.asarray(fields["coarse_label"])
        if coarse.size != count:
            raise InvalidClient("bad shape", f"has {coarse.size} coarse labels for {count} images")
        if coarse.size and (coarse.min() < 0 or coarse.max() >= NUM_COARSE_CLASSES):
            raise InvalidClient(
                "label out of range",
                f"has coarse labels outside [0, {NUM_COARSE_CLASSES}) in field 'coarse_label'",
            )
    return {
        "x": image.astype(np.uint8, copy=False),
        "y": labels.reshape(count).astype(np.int32),
    }


def _collect(
    records: Callable[[], Iterable],
    *,
    source: str,
    expected: SplitFacts | None,
    strict: bool,
    drop_invalid: bool,
) -> FederatedData:
    collector = ClientCollector(
        source, num_classes=NUM_CLASSES, label_field="label", drop_invalid=drop_invalid
    )
    for name, fields, declared, origin in records():
        collector.add(
            name, fields, declared_num_examples=declared, convert=_converter, origin=origin
        )
    data = collector.finish(field_scales={"x": PIXEL_SCALE})
    if expected is not None:
        check_facts(data, expected, source, strict=strict, likely="of another split")
    return data


def read_tff_fed_cifar100(
    path: str | Path,
    *,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
) -> FederatedData:
    """Reads one split from TensorFlow Federated's HDF5 file.

    Args:
      path: e.g. ``fed_cifar100_train.h5``.
      expected: published counts to verify, e.g. ``PUBLISHED_FACTS["train"]``;
        None skips the check.
      strict: a count mismatch raises (True) or warns (False).
      drop_invalid: drop invalid clients with a warning instead of raising.

    Returns:
      The split; see the module docstring for its layout.

    Raises:
      FileNotFoundError, DataFormatError, ValueError: naming the file.
    """
    return _collect(
        lambda: iter_tff_hdf5(path),
        source=str(path),
        expected=expected,
        strict=strict,
        drop_invalid=drop_invalid,
    )


def read_fedjax_fed_cifar100(
    path: str | Path,
    *,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
) -> FederatedData:
    """Reads one split from FedJAX's SQLite file; as :func:`read_tff_fed_cifar100`."""
    return _collect(
        lambda: iter_fedjax_sqlite(path),
        source=str(path),
        expected=expected,
        strict=strict,
        drop_invalid=drop_invalid,
    )


def _fedjax_file(split: str, directory: Path) -> Path:
    """FedJAX's built SQLite file in the cache folder, verified by its SHA-256."""
    path = directory / fedjax_filename(split)
    if not path.is_file():
        raise downloads.DatasetUnavailableError(
            f"{path} does not exist. FedJAX publishes no download of it: it builds it from "
            f"{FEDJAX_BUILD_SOURCE} with fedjax.datasets.cifar100.load_split({split!r}, "
            f"cache_dir={str(directory)!r}) (sha256 {FEDJAX_SQLITE_SHA256[split]}); or use "
            f"source='tff'. Set {downloads.ENV_DATA_DIR} or pass data_dir= to use another "
            "folder."
        )
    digest = downloads.sha256_of(path)
    if digest != FEDJAX_SQLITE_SHA256[split]:
        raise downloads.ChecksumError(
            f"{path} has sha256 {digest}, but FedJAX builds it with sha256 "
            f"{FEDJAX_SQLITE_SHA256[split]}: the file is corrupt, truncated or another version. "
            "Delete it and build it again."
        )
    return path


def _source_files(source: str, directory: Path, download: bool, progress: bool) -> dict[str, Path]:
    if source == "tff":
        wanted = {tff_filename(split): directory / tff_filename(split) for split in SPLITS}
        if not all(path.is_file() for path in wanted.values()):
            try:
                archive = downloads.fetch(
                    TFF_ARCHIVE, directory, download=download, progress=progress
                )
            except downloads.DatasetUnavailableError as error:
                raise downloads.DatasetUnavailableError(
                    f"{error} Or place the extracted {' and '.join(wanted)} in {directory}."
                ) from error
            downloads.extract_members(archive, wanted)
        return {split: directory / tff_filename(split) for split in SPLITS}
    return {split: _fedjax_file(split, directory) for split in SPLITS}


def load_fed_cifar100(
    *,
    source: str = "tff",
    data_dir: str | Path | None = None,
    download: bool = True,
    progress: bool = True,
    strict: bool = True,
) -> FederatedDataset:
    """Federated CIFAR-100, memory-mapped from fedjaxsim's cache.

    The first call fetches the published archive into the cache folder (or
    uses the archive or the extracted ``fed_cifar100_{train,test}.h5`` found
    there), checks them against the published counts and converts them into
    the store folder ``fed_cifar100``; later calls open that store.

    Args:
      source: ``"tff"`` (HDF5, SHA-256 pinned) or ``"fedjax"`` (FedJAX's
        built SQLite files, SHA-256 pinned, read from the cache folder only).
      data_dir: cache folder; default ``$FEDJAXSIM_DATA_DIR`` or the user cache.
      download: False never touches the network; a missing file then raises
        with the path to place it at.
      progress: progress bars for downloads.
      strict: a count mismatch raises (True) or warns (False).

    Returns:
      FederatedDataset ``"fed_cifar100"`` with 100 classes, input shape (32, 32, 3).

    Raises:
      ValueError: an unknown ``source``, or files that fail the checks.
      DatasetUnavailableError: files neither cached nor downloadable.
    """
    from fedjaxsim.data.store import read_dataset, write_dataset

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    directory = downloads.resolve_data_dir(data_dir)
    store = directory / NAME
    if (store / "dataset.json").is_file():
        return read_dataset(store)
    files = _source_files(source, directory, download, progress)
    read = read_tff_fed_cifar100 if source == "tff" else read_fedjax_fed_cifar100
    splits = {
        split: read(path, expected=PUBLISHED_FACTS[split], strict=strict)
        for split, path in files.items()
    }
    dataset = FederatedDataset(NAME, splits["train"], splits["test"], NUM_CLASSES, IMAGE_SHAPE)
    metadata = {
        "source": source,
        "files": {
            split: {"name": path.name, "sha256": downloads.sha256_of(path)}
            for split, path in files.items()
        },
    }
    write_dataset(dataset, store, metadata=metadata, overwrite=True)
    return read_dataset(store)
