"""An on-disk store for :class:`FederatedData` that loads as memory maps.

A store is a folder::

    manifest.json        format, version, counts, and per file: sha256,
                         byte size, dtype, shape (plus each field's scale)
    offsets.npy          int64[num_clients + 1]
    field_<name>.npy     one per field, [total_examples, ...], stored dtype
    client_names.json    optional JSON list of strings

It is written into a temporary sibling folder and renamed into place, so a
reader never sees a half-written store. Loading opens every field with
``np.load(mmap_mode="r")``: a population of 1,000,000 clients costs its offsets
(8 MB) at load time, and gathering a cohort reads only that cohort's rows.
A :class:`~fedjaxsim.data.federated.FederatedDataset` is a folder with
``train/`` and ``test/`` stores plus ``dataset.json`` (name, classes, input
shape).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedjaxsim.core.tasks import Task
from fedjaxsim.data.federated import FederatedData, FederatedDataset, LazyClientNames

STORE_FORMAT = "fedjaxsim-federated-data"
STORE_VERSION = 1
DATASET_FORMAT = "fedjaxsim-federated-dataset"
_CHUNK = 1 << 22


class StoreError(ValueError):
    """A store folder is missing, corrupt, truncated or of another format."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _field_file(name: str) -> str:
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"field name {name!r} cannot name a file; use letters, digits, '_' or '-'")
    return f"field_{name}.npy"


def _describe(path: Path, array: np.ndarray | None = None) -> dict:
    if array is None:
        return describe_file(path)
    return describe_file(path, array.dtype, array.shape)


def field_file_name(name: str) -> str:
    """The file holding field ``name`` in a store folder: ``field_<name>.npy``.

    Raises:
      ValueError: a name that cannot be part of a file name.
    """
    return _field_file(name)


def describe_file(path: str | Path, dtype=None, shape: tuple[int, ...] | None = None) -> dict:
    """The manifest entry of a store file: name, sha256 and size, plus the
    dtype and shape of an array file (pass both or neither)."""
    path = Path(path)
    entry = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    if shape is not None:
        entry["dtype"] = np.dtype(dtype).str
        entry["shape"] = [int(n) for n in shape]
    return entry


def _write_array(path: Path, array: np.ndarray) -> None:
    """np.save in bounded memory: a memory-mapped source is copied in slices."""
    if array.size == 0:  # an empty file cannot be memory-mapped
        np.save(path, np.asarray(array))
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    step = max(1, _CHUNK * 16 // max(1, array[:1].nbytes))
    for start in range(0, len(array), step):
        out[start : start + step] = array[start : start + step]
    out.flush()
    del out


def _replace_folder(temporary: Path, final: Path, overwrite: bool) -> None:
    """Renames ``temporary`` to ``final``; an existing ``final`` is swapped out first."""
    if final.exists():
        if not overwrite:
            shutil.rmtree(temporary)
            raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
        # Two renames keep a complete store at ``final`` at every instant but
        # one, instead of a half-deleted one during rmtree.
        retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, retired / final.name)
        os.rename(temporary, final)
        shutil.rmtree(retired)
    else:
        os.rename(temporary, final)


def replace_folder(temporary: str | Path, final: str | Path, *, overwrite: bool) -> None:
    """Moves a finished folder into place in one rename (two if ``final``
    exists and ``overwrite``), so readers see the old folder or the new one.

    Raises:
      FileExistsError: ``final`` exists and ``overwrite`` is False
        (``temporary`` is then deleted).
    """
    _replace_folder(Path(temporary), Path(final), overwrite)


def write_manifest(directory: str | Path, manifest: Mapping) -> None:
    """Writes ``manifest.json`` of a store folder as :func:`write_federated_data` does."""
    Path(directory, "manifest.json").write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )


def write_federated_data(
    data: FederatedData,
    directory: str | Path,
    *,
    metadata: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``data`` to a store folder, atomically.

    Args:
      data: the population; memory-mapped fields are copied in slices.
      directory: the store folder to create.
      metadata: optional JSON-serializable facts kept in the manifest (the
        source file, its sha256, ...).
      overwrite: replace an existing folder.

    Returns:
      The store folder.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      ValueError: a field name that cannot be a file name.
    """
    final = Path(directory)
    if final.exists() and not overwrite:  # fail before writing gigabytes
        raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    for name in data.fields:
        _field_file(name)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        offsets = np.asarray(data.offsets, dtype=np.int64)
        np.save(temporary / "offsets.npy", offsets)
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "num_clients": data.num_clients,
            "num_examples": data.total_examples,
            "offsets": _describe(temporary / "offsets.npy", offsets),
            "fields": {},
            "client_names": None,
            "metadata": dict(metadata or {}),
        }
        for name, array in data.fields.items():
            path = temporary / _field_file(name)
            _write_array(path, array)
            manifest["fields"][name] = {
                **_describe(path, array),
                "scale": data.field_scales.get(name),
            }
        if data.client_names is not None:
            path = temporary / "client_names.json"
            path.write_text(json.dumps(list(data.client_names)), encoding="utf-8")
            manifest["client_names"] = _describe(path)
        write_manifest(temporary, manifest)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _replace_folder(temporary, final, overwrite)
    return final


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a store folder.

    Raises:
      StoreError: no manifest, unreadable JSON, or another format or version.
    """
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise StoreError(f"{path} is missing: {directory} is not a fedjaxsim data store") from error
    except (OSError, ValueError) as error:
        raise StoreError(f"{path} is not readable JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is not a {STORE_FORMAT} manifest")
    if manifest.get("version") != STORE_VERSION:
        raise StoreError(
            f"{path} has store version {manifest.get('version')!r}; this fedjaxsim reads "
            f"version {STORE_VERSION}. Rebuild the store from the source files."
        )
    return manifest


def _check_file(directory: Path, entry: dict, verify: bool) -> Path:
    """Checks size, dtype, shape (and the sha256 if ``verify``) of one file."""
    path = directory / entry["file"]
    if not path.is_file():
        raise StoreError(f"{path} is missing from the store")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise StoreError(
            f"{path} has {size} bytes but the manifest records {entry['bytes']}: the file is "
            "truncated or was replaced. Rebuild the store."
        )
    if "dtype" in entry:
        try:
            with open(path, "rb") as file:
                version = np.lib.format.read_magic(file)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(file)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(file)
                else:
                    raise ValueError(f".npy format version {version} is not used by stores")
        except (OSError, ValueError) as error:
            raise StoreError(f"{path} is not a NumPy .npy file ({error})") from error
        if list(shape) != entry["shape"] or np.dtype(dtype).str != entry["dtype"]:
            raise StoreError(
                f"{path} holds {np.dtype(dtype).str}{list(shape)}, but the manifest records "
                f"{entry['dtype']}{entry['shape']}"
            )
    if verify:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise StoreError(
                f"{path} has sha256 {digest}, but the manifest records {entry['sha256']}: "
                "the file is corrupt. Rebuild the store."
            )
    return path


def read_federated_data(directory: str | Path, *, verify: bool = False) -> FederatedData:
    """Opens a store folder as memory maps.

    Args:
      directory: a folder written by :func:`write_federated_data`.
      verify: also hash every file against the manifest's sha256 (reads the
        whole store once). Without it, sizes, dtypes and shapes are checked,
        which catches truncation and most replacements at no cost.

    Returns:
      A FederatedData whose fields are read-only ``np.memmap`` arrays.

    Raises:
      StoreError: a missing, truncated, corrupt or foreign file, named.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    offsets_path = _check_file(directory, manifest["offsets"], verify)
    offsets = np.load(offsets_path)
    fields = {}
    for name, entry in manifest["fields"].items():
        fields[name] = np.load(_check_file(directory, entry, verify), mmap_mode="r")
    names = None
    if manifest["client_names"] is not None:
        names_path = _check_file(directory, manifest["client_names"], verify)
        names = LazyClientNames(names_path, manifest["num_clients"])
    scales = {
        name: entry["scale"]
        for name, entry in manifest["fields"].items()
        if entry["scale"] is not None
    }
    try:
        data = FederatedData(fields, offsets, names, scales)
    except ValueError as error:
        raise StoreError(f"{directory} is inconsistent: {error}") from error
    if data.num_clients != manifest["num_clients"]:
        raise StoreError(
            f"{offsets_path} describes {data.num_clients} clients, the manifest "
            f"{manifest['num_clients']}"
        )
    return data


def write_dataset(
    dataset: FederatedDataset,
    directory: str | Path,
    *,
    metadata: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a train/test :class:`FederatedDataset` as one folder, atomically."""
    final = Path(directory)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_federated_data(dataset.train, temporary / "train", metadata=metadata)
        write_federated_data(dataset.test, temporary / "test", metadata=metadata)
        write_dataset_description(
            temporary, dataset.name, dataset.num_classes, dataset.input_shape, dataset.task
        )
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _replace_folder(temporary, final, overwrite)
    return final


def write_dataset_description(
    directory: str | Path,
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    task: Task,
) -> None:
    """Writes ``dataset.json`` into a folder that already holds ``train/`` and
    ``test/`` stores, as :func:`write_dataset` does."""
    description = {
        "format": DATASET_FORMAT,
        "version": STORE_VERSION,
        "name": name,
        "num_classes": num_classes,
        "input_shape": list(input_shape),
        "task": task.as_json(),
    }
    Path(directory, "dataset.json").write_text(
        json.dumps(description, indent=1) + "\n", encoding="utf-8"
    )


def read_dataset(directory: str | Path, *, verify: bool = False) -> FederatedDataset:
    """Opens a folder written by :func:`write_dataset` (fields memory-mapped).

    Raises:
      StoreError: a missing or foreign ``dataset.json`` or a bad split store.
    """
    directory = Path(directory)
    path = directory / "dataset.json"
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise StoreError(f"{path} is missing: {directory} is not a fedjaxsim dataset") from error
    except (OSError, ValueError) as error:
        raise StoreError(f"{path} is not readable JSON ({error})") from error
    if not isinstance(description, dict) or description.get("format") != DATASET_FORMAT:
        raise StoreError(f"{path} is not a {DATASET_FORMAT} description")
    return FederatedDataset(
        name=description["name"],
        train=read_federated_data(directory / "train", verify=verify),
        test=read_federated_data(directory / "test", verify=verify),
        num_classes=int(description["num_classes"]),
        input_shape=tuple(description["input_shape"]),
        task=Task.from_json(description.get("task")),
    )
