"""Tiny federated EMNIST files in the three published formats, written
straight from each format's description (h5py, sqlite3 + msgpack + zlib, json),
without fedjaxsim, so that the readers are checked against independent files.
"""

from __future__ import annotations

import json
import sqlite3
import zlib

import h5py
import msgpack
import numpy as np


def make_writers(sizes=(3, 1, 5, 2), num_classes=62, seed=0):
    """Writers as {writer_id: (levels uint8[n, 28, 28], labels int32[n])}.

    ``levels`` are the 8-bit ink levels: the files store the background-white
    pixel ``1 - levels / 255``. Writer ids are out of sorted order on purpose.
    """
    rng = np.random.default_rng(seed)
    names = [f"f{(7 * i + 3) % 10:04d}_{i:02d}" for i in range(len(sizes))]
    writers = {}
    for name, size in zip(names, sizes):
        levels = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=size).astype(np.int32)
        writers[name] = (levels, labels)
    return writers


def background_pixels(levels):
    """float32 pixels with 1.0 = white background, as TFF and FedJAX store them."""
    return (1.0 - levels.astype(np.float64) / 255.0).astype(np.float32)


def write_tff_h5(path, writers, pixels=background_pixels):
    with h5py.File(path, "w") as file:
        examples = file.create_group("examples")
        for name, (levels, labels) in writers.items():
            group = examples.create_group(name)
            group.create_dataset("pixels", data=pixels(levels))
            group.create_dataset("label", data=labels)


def _msgpack_array(array):
    """FedJAX's ndarray encoding: ext type 1 around [shape, dtype name, C bytes]."""
    array = np.ascontiguousarray(array)
    payload = msgpack.packb(
        [list(array.shape), array.dtype.name, array.tobytes()], use_bin_type=True
    )
    return msgpack.ExtType(1, payload)


def fedjax_blob(columns):
    return zlib.compress(msgpack.packb({k: _msgpack_array(v) for k, v in columns.items()}))


def write_fedjax_sqlite(path, writers, pixels=background_pixels, blob=None, num_examples=None):
    """Rows in a shuffled order behind a 16-hex-digit prefix, as FedJAX stores them."""
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, "
        "num_examples INTEGER NOT NULL)"
    )
    rows = []
    for index, (name, (levels, labels)) in enumerate(writers.items()):
        client_id = f"{(index * 0x9E3779B1) % 2**64:016x}:{name}".encode()
        data = (
            fedjax_blob({"pixels": pixels(levels), "label": labels}) if blob is None else blob(name)
        )
        count = len(labels) if num_examples is None else num_examples(name, len(labels))
        rows.append((client_id, data, count))
    connection.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", sorted(rows))
    connection.commit()
    connection.close()


def write_leaf_json(directory, writers, users_per_shard=2):
    """LEAF shards: x as lists of 784 floats k/255 of the white-background image."""
    directory.mkdir(parents=True, exist_ok=True)
    items = list(writers.items())
    for shard, start in enumerate(range(0, len(items), users_per_shard)):
        chunk = items[start : start + users_per_shard]
        content = {
            "users": [name for name, _ in chunk],
            "num_samples": [len(labels) for _, (_, labels) in chunk],
            "user_data": {
                name: {
                    "x": (1.0 - levels.reshape(len(levels), 784) / 255.0).tolist(),
                    "y": labels.tolist(),
                }
                for name, (levels, labels) in chunk
            },
        }
        (directory / f"all_data_{shard}_niid_0_keep_0_train_9.json").write_text(json.dumps(content))
