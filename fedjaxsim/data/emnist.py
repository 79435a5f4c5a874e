"""Federated EMNIST (Caldas et al. 2018, LEAF; Cohen et al. 2017, EMNIST).

Handwritten characters grouped by writer, as published in three formats
that all hold the same writers and examples:

* TensorFlow Federated: ``fed_emnist[_digitsonly]_{train,test}.h5`` inside
  ``fed_emnist[_digitsonly].tar.bz2`` (:func:`read_tff_emnist`);
* FedJAX: ``federated_emnist[_digitsonly]_{train,test}.sqlite``
  (:func:`read_fedjax_emnist`);
* LEAF: FEMNIST JSON shards from ``data/femnist/preprocess.sh``
  (:func:`read_leaf_femnist`; LEAF publishes the script, not the files).

Every reader gives the same
:class:`~fedjaxsim.data.federated.FederatedData`: clients sorted by writer
id (FedJAX's hash prefix removed), ``"x"`` uint8[N, 28, 28, 1] with scale 255
and ``"y"`` int32[N]. The sources store 1.0 for the white background and 0.0
for ink; fedjaxsim stores ``255 * (1 - p)``, so the model sees float32 in
[0, 1] with **ink = 1.0**, as FedJAX's ``preprocess_batch`` (``1 - pixels``)
feeds its models. The published pixels are multiples of 1/255, so uint8 is
exact; a source whose pixels are not falls back to float32 storage.

Labels: 0-9 digits, 10-35 upper case, 36-61 lower case (62 classes); the
digits-only variant has 10.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from fedjaxsim.data import download as downloads
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.formats import iter_fedjax_sqlite, iter_leaf_json, iter_tff_hdf5
from fedjaxsim.data.validation import ClientCollector, InvalidClient

IMAGE_SHAPE = (28, 28, 1)
PIXEL_SCALE = 255.0
SPLITS = ("train", "test")
SOURCES = ("tff", "fedjax")
PIXEL_DTYPES = ("auto", "uint8", "float32")

# A source pixel p is taken as exact 8-bit when |255 p - round(255 p)| is
# below this; float32(k / 255) is within 2e-5 of k after scaling.
_GRID_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class SplitFacts:
    """Published size of one split."""

    num_clients: int
    num_examples: int


# From TensorFlow Federated's emnist.load_data documentation. Every writer has
# examples in both splits, so test has as many clients as train.
PUBLISHED_FACTS = {
    (False, "train"): SplitFacts(3400, 671_585),
    (False, "test"): SplitFacts(3400, 77_483),
    (True, "train"): SplitFacts(3383, 341_873),
    (True, "test"): SplitFacts(3383, 40_832),
}

_TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
_FEDJAX_URL = "https://storage.googleapis.com/gresearch/fedjax/emnist/"
# SHA-256 of TFF's archives, as TFF's own loader pins them.
TFF_ARCHIVES = {
    False: downloads.RemoteFile(
        "fed_emnist.tar.bz2",
        _TFF_URL + "fed_emnist.tar.bz2",
        "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0",
    ),
    True: downloads.RemoteFile(
        "fed_emnist_digitsonly.tar.bz2",
        _TFF_URL + "fed_emnist_digitsonly.tar.bz2",
        "55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b",
    ),
}


def num_classes(only_digits: bool) -> int:
    return 10 if only_digits else 62


def variant_name(only_digits: bool) -> str:
    return "federated_emnist_digits" if only_digits else "federated_emnist"


def tff_filename(only_digits: bool, split: str) -> str:
    return f"fed_emnist{'_digitsonly' if only_digits else ''}_{split}.h5"


def fedjax_remote(only_digits: bool, split: str) -> downloads.RemoteFile:
    """FedJAX's SQLite file; FedJAX publishes no checksum, so the example
    counts in :data:`PUBLISHED_FACTS` are what verifies it."""
    filename = f"federated_emnist_{'digitsonly_' if only_digits else ''}{split}.sqlite"
    return downloads.RemoteFile(filename, _FEDJAX_URL + filename, None)


class _OffGrid(Exception):
    """Pixels that are not multiples of 1/255 reached uint8 conversion."""


def _ink_converter(pixel_key: str, label_key: str, pixel_dtype: str) -> Callable:
    """Raw ``{pixel_key, label_key}`` columns -> stored ``{"x", "y"}``."""

    def convert(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(fields) != {pixel_key, label_key}:
            raise InvalidClient(
                "bad columns",
                f"has columns {sorted(fields)}, expected {pixel_key!r} and {label_key!r}",
            )
        pixels = np.asarray(fields[pixel_key], dtype=np.float32)
        count = len(pixels)
        if pixels[0].size != 28 * 28:
            raise InvalidClient(
                "bad shape", f"has {pixels.shape[1:]} pixels per image, expected 28x28"
            )
        if pixels.min() < 0 or pixels.max() > 1:
            raise InvalidClient(
                "pixels outside [0, 1]",
                f"has pixels outside [0, 1] (min {pixels.min()}, max {pixels.max()})",
            )
        labels = np.asarray(fields[label_key]).reshape(count).astype(np.int32)
        background = pixels.reshape(count, *IMAGE_SHAPE)
        if pixel_dtype == "float32":
            return {"x": np.float32(1.0) - background, "y": labels}
        levels = np.rint(background * np.float32(PIXEL_SCALE))
        if np.max(np.abs(background * np.float32(PIXEL_SCALE) - levels)) > _GRID_TOLERANCE:
            raise _OffGrid()
        return {"x": (PIXEL_SCALE - levels).astype(np.uint8), "y": labels}

    return convert


def _collect(
    records: Callable[[], Iterable],
    *,
    source: str,
    pixel_key: str,
    label_key: str,
    only_digits: bool,
    drop_invalid: bool,
    pixel_dtype: str,
    expected: SplitFacts | None,
    strict: bool,
) -> FederatedData:
    if pixel_dtype not in PIXEL_DTYPES:
        raise ValueError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {pixel_dtype!r}")
    # 'auto' tries uint8 first and reads again at full precision only if a
    # pixel is off the 1/255 grid, which no 8-bit source is.
    attempts = ("uint8", "float32") if pixel_dtype == "auto" else (pixel_dtype,)
    for dtype in attempts:
        collector = ClientCollector(
            source,
            num_classes=num_classes(only_digits),
            label_field=label_key,
            drop_invalid=drop_invalid,
        )
        convert = _ink_converter(pixel_key, label_key, dtype)
        try:
            for name, fields, declared, origin in records():
                collector.add(
                    name, fields, declared_num_examples=declared, convert=convert, origin=origin
                )
        except _OffGrid:
            if dtype == attempts[-1]:
                raise ValueError(
                    f"{source}: pixels are not multiples of 1/255, so uint8 would lose "
                    "precision; pass pixel_dtype='float32' or 'auto'"
                ) from None
            continue
        break
    data = collector.finish(field_scales={"x": PIXEL_SCALE} if dtype == "uint8" else None)
    if expected is not None:
        check_facts(data, expected, source, strict=strict)
    return data


def check_facts(
    data: FederatedData,
    expected: SplitFacts,
    source: str,
    *,
    strict: bool = True,
    likely: str = "mislabelled (e.g. digits-only for the full set)",
) -> None:
    """Compares client and example counts with the published ones.

    Args:
      likely: what a mismatching file most likely is, besides truncated or
        another version (the message's hint).

    Raises:
      ValueError: a mismatch and ``strict`` (else a UserWarning), naming ``source``.
    """
    if (data.num_clients, data.total_examples) == (expected.num_clients, expected.num_examples):
        return
    message = (
        f"{source} holds {data.num_clients:,} clients and {data.total_examples:,} examples, but "
        f"the published split has {expected.num_clients:,} clients and "
        f"{expected.num_examples:,} examples: the file is truncated, {likely} or another "
        "version. Delete it and fetch it again"
    )
    if strict:
        raise ValueError(message + ", or pass strict=False to use it anyway.")
    warnings.warn(message + ".", UserWarning, stacklevel=3)


def read_tff_emnist(
    path: str | Path,
    *,
    only_digits: bool = False,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
    pixel_dtype: str = "auto",
) -> FederatedData:
    """Reads one split from TensorFlow Federated's HDF5 file.

    Args:
      path: e.g. ``fed_emnist_train.h5``; clients are ``examples/<writer>``
        groups with ``pixels`` float32[N, 28, 28] (1.0 = background) and
        ``label`` int32[N].
      only_digits: the digits-only variant (labels in [0, 10)).
      expected: published counts to verify, e.g.
        ``PUBLISHED_FACTS[(only_digits, "train")]``; None skips the check.
      strict: a count mismatch raises (True) or warns (False).
      drop_invalid: drop invalid clients with a warning instead of raising
        (see :mod:`fedjaxsim.data.validation`).
      pixel_dtype: ``"uint8"`` (exact 8-bit sources only), ``"float32"``, or
        ``"auto"``: uint8 when exact, float32 otherwise.

    Returns:
      The split; see the module docstring for its layout.

    Raises:
      FileNotFoundError, DataFormatError, ValueError: naming the file.
    """
    return _collect(
        lambda: iter_tff_hdf5(path),
        source=str(path),
        pixel_key="pixels",
        label_key="label",
        only_digits=only_digits,
        drop_invalid=drop_invalid,
        pixel_dtype=pixel_dtype,
        expected=expected,
        strict=strict,
    )


def read_fedjax_emnist(
    path: str | Path,
    *,
    only_digits: bool = False,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
    pixel_dtype: str = "auto",
) -> FederatedData:
    """Reads one split from FedJAX's SQLite file.

    Args:
      path: e.g. ``federated_emnist_train.sqlite``; each row's blob holds the
        columns ``pixels`` float32[N, 28, 28] (1.0 = background) and
        ``label`` int32[N].
      only_digits, expected, strict, drop_invalid, pixel_dtype: as in
        :func:`read_tff_emnist`.

    Returns:
      The split, identical to :func:`read_tff_emnist` on the same writers.

    Raises:
      FileNotFoundError, DataFormatError, ValueError: naming the file.
    """
    return _collect(
        lambda: iter_fedjax_sqlite(path),
        source=str(path),
        pixel_key="pixels",
        label_key="label",
        only_digits=only_digits,
        drop_invalid=drop_invalid,
        pixel_dtype=pixel_dtype,
        expected=expected,
        strict=strict,
    )


def read_leaf_femnist(
    location: str | Path | Sequence[str | Path],
    *,
    only_digits: bool = False,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
    pixel_dtype: str = "auto",
) -> FederatedData:
    """Reads LEAF's FEMNIST JSON shards of one split.

    Args:
      location: a folder of ``*.json`` shards (e.g. LEAF's ``data/train``),
        one shard, or a list of shards. Each user has ``x``: N lists of 784
        floats (1.0 = background) and ``y``: N labels.
      only_digits, expected, strict, drop_invalid, pixel_dtype: as in
        :func:`read_tff_emnist`. LEAF's own sampling (``preprocess.sh``)
        decides the writers, so :data:`PUBLISHED_FACTS` apply only to
        shards made to match TFF's split.

    Returns:
      The split, identical to :func:`read_tff_emnist` on the same writers.

    Raises:
      FileNotFoundError, DataFormatError, ValueError: naming the shard.
    """
    return _collect(
        lambda: iter_leaf_json(location),
        source=str(location)
        if isinstance(location, (str, Path))
        else f"{len(location)} LEAF shards",
        pixel_key="x",
        label_key="y",
        only_digits=only_digits,
        drop_invalid=drop_invalid,
        pixel_dtype=pixel_dtype,
        expected=expected,
        strict=strict,
    )


def _source_files(
    only_digits: bool, source: str, directory: Path, download: bool, progress: bool
) -> dict[str, Path]:
    """The two split files of ``source``, fetched (and extracted) if needed."""
    if source == "tff":
        wanted = {
            tff_filename(only_digits, split): directory / tff_filename(only_digits, split)
            for split in SPLITS
        }
        if not all(path.is_file() for path in wanted.values()):
            archive = downloads.fetch(
                TFF_ARCHIVES[only_digits], directory, download=download, progress=progress
            )
            downloads.extract_members(archive, wanted)
        return {split: directory / tff_filename(only_digits, split) for split in SPLITS}
    return {
        split: downloads.fetch(
            fedjax_remote(only_digits, split), directory, download=download, progress=progress
        )
        for split in SPLITS
    }


def load_federated_emnist(
    only_digits: bool = False,
    *,
    source: str = "tff",
    data_dir: str | Path | None = None,
    download: bool = True,
    progress: bool = True,
    strict: bool = True,
) -> FederatedDataset:
    """Federated EMNIST, memory-mapped from fedjaxsim's cache.

    The first call fetches the published files into the cache folder (see
    :func:`fedjaxsim.data.download.resolve_data_dir`), checks them against
    the published client and example counts, and converts them into a store
    folder (:mod:`fedjaxsim.data.store`) next to them. Later calls open that
    store directly, in milliseconds.

    Args:
      only_digits: the 10-class digits-only variant instead of 62 classes.
      source: ``"tff"`` (HDF5, SHA-256 pinned) or ``"fedjax"`` (SQLite);
        both give identical data.
      data_dir: cache folder; default ``$FEDJAXSIM_DATA_DIR`` or the user cache.
      download: False never touches the network; a missing file then raises
        with the path to place it at.
      progress: progress bars for downloads.
      strict: a count mismatch raises (True) or warns (False).

    Returns:
      FederatedDataset with ``input_shape`` (28, 28, 1).

    Raises:
      ValueError: an unknown ``source``, or files that fail the checks.
      DatasetUnavailableError: files neither cached nor downloadable.
    """
    from fedjaxsim.data.store import read_dataset, write_dataset

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    directory = downloads.resolve_data_dir(data_dir)
    name = variant_name(only_digits)
    store = directory / name
    if (store / "dataset.json").is_file():
        return read_dataset(store)
    files = _source_files(only_digits, source, directory, download, progress)
    read = read_tff_emnist if source == "tff" else read_fedjax_emnist
    splits = {
        split: read(
            path,
            only_digits=only_digits,
            expected=PUBLISHED_FACTS[(only_digits, split)],
            strict=strict,
        )
        for split, path in files.items()
    }
    dataset = FederatedDataset(
        name, splits["train"], splits["test"], num_classes(only_digits), IMAGE_SHAPE
    )
    metadata = {
        "source": source,
        "files": {
            split: {"name": path.name, "sha256": downloads.sha256_of(path)}
            for split, path in files.items()
        },
    }
    write_dataset(dataset, store, metadata=metadata, overwrite=True)
    return read_dataset(store)
