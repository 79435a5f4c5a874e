"""Tiny Shakespeare and federated CIFAR-100 files in their published formats,
written straight from each format's description (h5py; sqlite3 + msgpack +
zlib as FedJAX's ``SQLiteFederatedDataBuilder`` writes them; LEAF's JSON),
without fedjaxsim, so that the readers are checked against independent files.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import tarfile
import zlib

import h5py
import msgpack
import numpy as np

LINES = [
    b"To be, or not to be, that is the question:",
    b"Whether 'tis nobler in the mind to suffer",
    b"The slings and arrows of outrageous fortune,",
    b"Or to take arms against a sea of troubles\nAnd by opposing end them.",
    b"O Romeo, Romeo! wherefore art thou Romeo?",
    b"All the world's a stage, ~ and all the men and women merely players;",
    b"",
    b"\xc3\xa9t\xc3\xa9 \x7f",
]


def make_roles(sizes=(2, 1, 3), seed=0):
    """Roles as {PLAY_ROLE: [snippet bytes, ...]}, names out of sorted order."""
    rng = np.random.default_rng(seed)
    names = ["THE_TEMPEST_PROSPERO", "HAMLET_HAMLET", "MACBETH_LADY_MACBETH", "KING_LEAR_FOOL"]
    return {
        names[i % len(names)] + ("" if i < len(names) else f"_{i}"): [
            LINES[j] for j in rng.integers(0, len(LINES), size=size)
        ]
        for i, size in enumerate(sizes)
    }


def long_text_roles(seed=0, count=3):
    """Roles of one snippet each, longer than LEAF's 80-character window."""
    rng = np.random.default_rng(seed)
    ascii_lines = [line for line in LINES if line.isascii() and line]
    roles = {}
    for index in range(count):
        chosen = rng.permutation(len(ascii_lines))[: 2 + index]
        roles[f"ROLE_{(7 * index + 3) % 10}"] = [b" ".join(ascii_lines[i] for i in chosen)]
    return roles


def write_tff_shakespeare_h5(path, roles):
    """``examples/<role>/snippets``: variable-length byte strings, as TFF stores them."""
    with h5py.File(path, "w") as file:
        examples = file.create_group("examples")
        for name, snippets in roles.items():
            data = np.empty(len(snippets), dtype=object)
            data[:] = snippets
            examples.create_group(name).create_dataset(
                "snippets", data=data, dtype=h5py.vlen_dtype(bytes)
            )


def _pack(value):
    """FedJAX's serialization (fedjax/core/serialization.py): numeric arrays as
    ext type 1 ``[shape, dtype name, C bytes]``, arrays of bytes as ext type 4
    ``[shape, flat list]``."""
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        payload = msgpack.packb([list(value.shape), list(value.flatten())], use_bin_type=True)
        return msgpack.ExtType(4, payload)
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        payload = msgpack.packb(
            [list(array.shape), array.dtype.name, array.tobytes()], use_bin_type=True
        )
        return msgpack.ExtType(1, payload)
    raise TypeError(type(value))


def fedjax_blob(columns):
    return zlib.compress(msgpack.packb(columns, default=_pack, strict_types=True))


def write_fedjax_sqlite(path, clients, *, prefix=True, blob=None, num_examples=None):
    """FedJAX's ``federated_data`` table; ``clients`` maps id -> {column: array}.

    ``prefix`` puts a 16-hex-digit hash before the id (a shuffled storage
    order, as FedJAX's EMNIST and Shakespeare files); without it the ids are
    stored as text in sorted order, as FedJAX's builder converts TFF's SQLite.
    """
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, "
        "num_examples INTEGER NOT NULL)"
    )
    rows = []
    for index, (name, columns) in enumerate(clients.items()):
        client_id = f"{(index * 0x9E3779B1) % 2**64:016x}:{name}".encode() if prefix else name
        data = fedjax_blob(columns) if blob is None else blob(name)
        count = len(next(iter(columns.values())))
        rows.append((client_id, data, count if num_examples is None else num_examples(name, count)))
    connection.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", sorted(rows))
    connection.commit()
    connection.close()


def write_fedjax_shakespeare(path, roles, **options):
    clients = {}
    for name, snippets in roles.items():
        column = np.empty(len(snippets), dtype=object)
        column[:] = snippets
        clients[name] = {"snippets": column}
    write_fedjax_sqlite(path, clients, **options)


def leaf_windows(text: str, width: int = 80):
    """LEAF's ``txt_to_data``: every window of ``width`` characters and the next one."""
    x = [text[i : i + width] for i in range(0, len(text) - width)]
    y = [text[i + width] for i in range(0, len(text) - width)]
    return x, y


def write_leaf_shakespeare(directory, texts, users_per_shard=2, width=80):
    """LEAF shards; ``texts`` maps user -> the role's text (str)."""
    directory.mkdir(parents=True, exist_ok=True)
    items = list(texts.items())
    for shard, start in enumerate(range(0, len(items), users_per_shard)):
        chunk = items[start : start + users_per_shard]
        user_data = {}
        for name, text in chunk:
            x, y = leaf_windows(text, width)
            user_data[name] = {"x": x, "y": y}
        content = {
            "users": [name for name, _ in chunk],
            "num_samples": [len(user_data[name]["x"]) for name, _ in chunk],
            "user_data": user_data,
        }
        (directory / f"all_data_{shard}_niid_0_keep_0_train_9.json").write_text(json.dumps(content))


# ----------------------------------------------------------------------------- CIFAR-100


def make_cifar_clients(sizes=(3, 1, 4), seed=0, num_classes=100):
    """Clients as {id: {"image": uint8[n, 32, 32, 3], "label", "coarse_label": int64[n]}}."""
    rng = np.random.default_rng(seed)
    clients = {}
    for index, size in enumerate(sizes):
        labels = rng.integers(0, num_classes, size=size).astype(np.int64)
        clients[str((7 * index + 3) % 13)] = {
            "coarse_label": (labels % 20).astype(np.int64),
            "image": rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8),
            "label": labels,
        }
    return clients


def write_tff_cifar_h5(path, clients):
    with h5py.File(path, "w") as file:
        examples = file.create_group("examples")
        for name, columns in clients.items():
            group = examples.create_group(name)
            for column, array in columns.items():
                group.create_dataset(column, data=array)


def write_fedjax_cifar_sqlite(path, clients, **options):
    write_fedjax_sqlite(path, clients, prefix=False, **options)


def tar_bz2(path, files):
    """Writes a .tar.bz2 holding ``files`` (member name -> path); returns its sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        for name, source in files.items():
            tar.add(source, arcname=name)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


# ----------------------------------------------------------------------------- tokenizers

EOS_TOKEN = "<|endoftext|>"


def write_tiny_tokenizer(path, *, special_tokens=(EOS_TOKEN,), vocab_size=320):
    """A byte-level BPE ``tokenizer.json`` trained on :data:`LINES` (GPT-2's scheme).

    Byte-level BPE tokenizes any text and decodes it back exactly, so tests
    can check that decoding the real targets of a client gives its text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line.decode("utf-8") for line in LINES] + [
        "Below is an instruction that describes a task. Write a response.",
        "### Instruction:\n### Input:\n### Response:\n",
    ]
    tokenizer.train_from_iterator(corpus * 3, trainer=trainer)
    tokenizer.save(str(path))
    return path
