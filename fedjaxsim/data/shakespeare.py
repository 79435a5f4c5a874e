"""Federated Shakespeare (Caldas et al. 2018, LEAF; McMahan et al. 2017).

The lines of each speaking role of each play form one client, as published
in three formats that hold the same roles and text:

* TensorFlow Federated: ``shakespeare_{train,test}.h5`` inside
  ``shakespeare.tar.bz2``; client ``examples/<PLAY>_<ROLE>`` holds
  ``snippets``, variable-length byte strings (:func:`read_tff_shakespeare`);
* FedJAX: ``shakespeare_{train,test}.sqlite``, column ``snippets`` (an array
  of bytes) (:func:`read_fedjax_shakespeare`);
* LEAF: JSON shards from ``data/shakespeare/preprocess.sh``
  (:func:`read_leaf_shakespeare`; LEAF publishes the script, not the files).
  LEAF keeps no snippet boundaries: a user's ``x`` are the windows
  ``text[i : i + w]`` of the role's text (``w`` = 80) at every offset ``i``
  and ``y[i] = text[i + w]``, so the text is ``x[0] + "".join(y)``, which is
  read as the client's one snippet (its UTF-8 bytes).

Preprocessing is FedJAX's ``fedjax.datasets.shakespeare.preprocess_client``:
each byte maps through FedJAX's 86-character vocabulary (:data:`VOCABULARY`,
the TFF text-generation tutorial's) to ids 3..88 (a byte outside it to
``OOV`` = 89); ``PAD`` = 0, ``BOS`` = 1, ``EOS`` = 2 (vocabulary of 90). A
client's snippets become one sequence ``[BOS] + ids + [EOS]`` per snippet,
concatenated; ``x`` is that sequence without its last id and ``y`` without
its first, both padded with ``PAD`` to a multiple of ``sequence_length`` and
cut into rows. So ``[b"ABCD", b"E"]`` with sequence length 3 gives::

    x: [[BOS, A, B], [C, D, EOS],   [BOS, E, PAD]]
    y: [[A, B, C],   [D, EOS, BOS], [E, EOS, PAD]]

Accuracy counts every target but padding and ``BOS`` (:data:`TASK`), which is
the accuracy Reddi et al. 2021 report: their code and TFF's baseline count
every non-padding target, ``EOS`` included, of sequences cut per snippet, in
which ``BOS`` is never a target. FedJAX's joined sequences make ``BOS`` the
target after every ``EOS``, a free guess that would raise accuracy, so it is
left out; see the comment at :data:`TASK`.

Re-tokenized (``tokenizer=`` a local Hugging Face ``tokenizer.json``), for
fine-tuning a pretrained language model on each role: a client's snippets
are decoded as UTF-8, tokenized (:func:`tokenize_snippets`), each followed by
the end-of-text token, and packed into one stream that starts with
end-of-text too (:func:`fedjaxsim.data.text.pack_documents`), so every token
of the role's text is a target. Empty snippets are skipped. Targets are
padded with the vocabulary size (:func:`fedjaxsim.data.text.next_token_task`)
and inputs with the end-of-text id; ``num_classes`` is the vocabulary size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from fedjaxsim.core.tasks import Task
from fedjaxsim.data import download as downloads
from fedjaxsim.data import text
from fedjaxsim.data.emnist import SplitFacts
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.formats import (
    DataFormatError,
    iter_fedjax_sqlite,
    iter_leaf_json_records,
    iter_tff_hdf5,
    leaf_json_files,
)
from fedjaxsim.data.validation import ClientCollector, InvalidClient

SPLITS = ("train", "test")
SOURCES = ("tff", "fedjax", "leaf")
DEFAULT_SEQUENCE_LENGTH = 80

# fedjax/datasets/shakespeare.py: the vocabulary of the TFF "Federated Learning
# for Text Generation" tutorial, after three reserved ids.
VOCABULARY = (
    b"dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
NUM_RESERVED = 3
PAD = 0
BOS = 1
EOS = 2
OOV = NUM_RESERVED + len(VOCABULARY)  # 89
VOCAB_SIZE = OOV + 1  # 90
TABLE = np.full(256, OOV, dtype=np.int32)
TABLE[np.frombuffer(VOCABULARY, np.uint8)] = np.arange(
    NUM_RESERVED, NUM_RESERVED + len(VOCABULARY), dtype=np.int32
)

# Accuracy as Reddi et al. 2021 report it: google-research/federated
# optimization/tasks/shakespeare.py (their code) and TFF's
# simulation/baselines/shakespeare/char_prediction_tasks.py both use
# MaskedCategoricalAccuracy(masked_tokens=[pad]), so EOS and OOV targets count.
# Their preprocessing cuts each snippet on its own, so BOS is never a target
# there; in FedJAX's joined sequences it is the target after every EOS but a
# client's last (always, so a free guess), hence excluded. FedJAX's model
# masks (pad, eos) in accuracy_no_eos, but with eos = 88
# (fedjax/models/shakespeare.py numbers the special tokens after the 86
# characters), which in its dataset's ids is the character '\r', not EOS.
TASK = Task(kind="next_token", pad_id=PAD, excluded_ids=(BOS,))

# From TensorFlow Federated's shakespeare.load_data documentation: every role
# has snippets in both splits.
PUBLISHED_FACTS = {
    "train": SplitFacts(715, 16_068),
    "test": SplitFacts(715, 2_356),
}

_TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
_FEDJAX_URL = "https://storage.googleapis.com/gresearch/fedjax/shakespeare/"
# SHA-256 of TFF's archive, as TFF's own loader pins it (file_hash=).
TFF_ARCHIVE = downloads.RemoteFile(
    "shakespeare.tar.bz2",
    _TFF_URL + "shakespeare.tar.bz2",
    "0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707",
)
# Where load_shakespeare(source="leaf") looks for LEAF's data/train and data/test.
LEAF_FOLDER = "leaf_shakespeare"


def tff_filename(split: str) -> str:
    return f"shakespeare_{split}.h5"


def fedjax_remote(split: str) -> downloads.RemoteFile:
    """FedJAX's SQLite file; FedJAX publishes no checksum, so the counts in
    :data:`PUBLISHED_FACTS` are what verifies it."""
    filename = f"shakespeare_{split}.sqlite"
    return downloads.RemoteFile(filename, _FEDJAX_URL + filename, None)


def store_name(sequence_length: int, source: str = "tff", tokenizer=None) -> str:
    """The store folder: ``shakespeare``, or ``shakespeare_seq{L}`` for other lengths.

    TFF's and FedJAX's files hold the same snippets and share a store; LEAF's
    text has no snippet boundaries (and LEAF's own line handling), so its
    store is ``shakespeare_leaf[_seq{L}]``. Re-tokenized data (``tokenizer``
    a ``tokenizers.Tokenizer``) is ``shakespeare[_leaf]_tok{digest}_seq{L}``,
    the digest that of the tokenizer's JSON, so another tokenizer never opens
    this one's store.
    """
    name = "shakespeare_leaf" if source == "leaf" else "shakespeare"
    if tokenizer is not None:
        return f"{name}_{text.text_store_suffix(tokenizer, sequence_length)}"
    if sequence_length == DEFAULT_SEQUENCE_LENGTH:
        return name
    return f"{name}_seq{sequence_length}"


def _check_sequence_length(sequence_length: int) -> None:
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, (int, np.integer)):
        raise ValueError(f"sequence_length must be an integer, got {sequence_length!r}")
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be at least 1, got {sequence_length}")


def preprocess_snippets(snippets: Sequence[bytes], sequence_length: int) -> dict[str, np.ndarray]:
    """FedJAX's ``preprocess_client``: snippets -> ``x``, ``y`` int32[M, sequence_length].

    See the module docstring; the result equals FedJAX's for the same bytes.
    """
    _check_sequence_length(sequence_length)
    lengths = np.array([len(s) for s in snippets], dtype=np.int64)
    characters = TABLE[np.frombuffer(b"".join(snippets), dtype=np.uint8)]
    starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]]).astype(np.int64)
    joined_length = int(np.sum(lengths + 2))
    joined = np.empty(joined_length, dtype=np.int32)
    is_character = np.ones(joined_length, dtype=bool)
    is_character[starts] = False
    is_character[starts + lengths + 1] = False
    joined[starts] = BOS
    joined[starts + lengths + 1] = EOS
    joined[is_character] = characters
    # FedJAX: padded_length = ceil((joined_length - 1) / L) * L.
    padded_length = (joined_length - 1 + sequence_length - 1) // sequence_length * sequence_length
    x = np.full(padded_length, PAD, dtype=np.int32)
    y = np.full(padded_length, PAD, dtype=np.int32)
    x[: joined_length - 1] = joined[:-1]
    y[: joined_length - 1] = joined[1:]
    return {"x": x.reshape(-1, sequence_length), "y": y.reshape(-1, sequence_length)}


def _snippet_texts(snippets: Sequence[bytes]) -> list[str]:
    """The snippets as text (UTF-8), the empty ones left out."""
    return [snippet for snippet in text.decode_utf8(snippets, "snippet") if snippet]


def tokenize_snippets(
    snippets: Sequence[bytes],
    tokenizer,
    sequence_length: int,
    *,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
) -> dict[str, np.ndarray]:
    """One role's snippets re-tokenized: ``x``, ``y`` int32[M, sequence_length].

    Args:
      snippets: the role's snippets (UTF-8 byte strings).
      tokenizer: a ``tokenizers.Tokenizer`` or the path of a ``tokenizer.json``.
      sequence_length: tokens per row.
      eos_token: the end-of-text token that ends each snippet.

    Returns:
      The packed stream ``[EOS] + snippet_0 + [EOS] + snippet_1 + [EOS] ...``
      (:func:`fedjaxsim.data.text.pack_documents`), targets padded with the
      vocabulary size, inputs with the end-of-text id.

    Raises:
      ValueError: a snippet that is not UTF-8, or a tokenizer without ``eos_token``.
    """
    _check_sequence_length(sequence_length)
    tokenizer = text.as_tokenizer(tokenizer)
    end = text.eos_id(tokenizer, eos_token)
    documents = [ids + [end] for ids in text.encode_texts(tokenizer, _snippet_texts(snippets))]
    return text.pack_documents(
        documents, sequence_length, text.vocab_size(tokenizer), end, start_id=end
    )


def _preprocessor(
    sequence_length: int, tokenizer, eos_token: str
) -> Callable[[Sequence[bytes]], dict[str, np.ndarray]]:
    """Snippets -> stored fields: FedJAX's character ids, or re-tokenized."""
    _check_sequence_length(sequence_length)
    if tokenizer is None:
        return lambda snippets: preprocess_snippets(snippets, sequence_length)
    tokenizer = text.as_tokenizer(tokenizer)
    text.eos_id(tokenizer, eos_token)  # a missing end-of-text token fails before any file is read
    return lambda snippets: tokenize_snippets(
        snippets, tokenizer, sequence_length, eos_token=eos_token
    )


def _snippet_bytes(value) -> bytes:
    # Byte strings only, as TFF and FedJAX store them: preprocessing maps bytes,
    # and a text string's encoding would be a guess.
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    raise InvalidClient(
        "bad snippets", f"has a snippet of type {type(value).__name__}, expected byte strings"
    )


def _check_counts(
    num_clients: int,
    num_snippets: int | None,
    expected: SplitFacts,
    source: str,
    strict: bool,
) -> None:
    """Compares clients (and snippets, unless None) with the published counts."""
    if num_clients == expected.num_clients and num_snippets in (None, expected.num_examples):
        return
    held = f"{num_clients:,} clients" + (
        f" and {num_snippets:,} snippets" if num_snippets is not None else ""
    )
    message = (
        f"{source} holds {held}, but the published split has {expected.num_clients:,} clients "
        f"and {expected.num_examples:,} snippets: the file is truncated, of another split or "
        "another version. Delete it and fetch it again"
    )
    if strict:
        raise ValueError(message + ", or pass strict=False to use it anyway.")
    warnings.warn(message + ".", UserWarning, stacklevel=4)


def _collect(
    records: Callable[[], Iterable],
    *,
    source: str,
    preprocess: Callable[[Sequence[bytes]], dict[str, np.ndarray]],
    expected: SplitFacts | None,
    strict: bool,
    drop_invalid: bool,
    count_snippets: bool = True,
) -> FederatedData:
    collector = ClientCollector(source, num_classes=None, drop_invalid=drop_invalid)
    snippets_kept = 0

    def convert(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        nonlocal snippets_kept
        if "snippets" not in fields:
            raise InvalidClient("bad columns", f"has columns {sorted(fields)}, expected 'snippets'")
        array = np.asarray(fields["snippets"])
        if array.ndim != 1:
            raise InvalidClient(
                "bad shape", f"has snippets of shape {array.shape}, expected one per example"
            )
        snippets = [_snippet_bytes(value) for value in array.tolist()]
        if not any(snippets):
            # Only BOS/EOS pairs: nothing to predict, like a client without examples.
            raise InvalidClient("empty", f"has {len(snippets)} snippets but no characters")
        converted = preprocess(snippets)
        snippets_kept += len(snippets)
        return converted

    for name, fields, declared, origin in records():
        collector.add(name, fields, declared_num_examples=declared, convert=convert, origin=origin)
    data = collector.finish()
    if expected is not None:
        _check_counts(
            data.num_clients, snippets_kept if count_snippets else None, expected, source, strict
        )
    return data


def read_tff_shakespeare(
    path: str | Path,
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
    tokenizer=None,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
) -> FederatedData:
    """Reads one split from TensorFlow Federated's HDF5 file.

    Args:
      path: e.g. ``shakespeare_train.h5``; clients are ``examples/<role>``
        groups with ``snippets`` (byte strings).
      sequence_length: the length of the ``x`` and ``y`` rows.
      expected: published client and snippet counts to verify, e.g.
        ``PUBLISHED_FACTS["train"]``; None skips the check.
      strict: a count mismatch raises (True) or warns (False).
      drop_invalid: drop invalid (e.g. empty) clients with a warning instead
        of raising (see :mod:`fedjaxsim.data.validation`).
      tokenizer: None for FedJAX's character ids; a ``tokenizers.Tokenizer``
        or the path of a ``tokenizer.json`` re-tokenizes every role
        (:func:`tokenize_snippets`).
      eos_token: the end-of-text token of ``tokenizer``.

    Returns:
      The split, clients sorted by role, ``x`` and ``y`` int32[N, sequence_length].

    Raises:
      FileNotFoundError, DataFormatError, ValueError: naming the file.
    """
    return _collect(
        lambda: iter_tff_hdf5(path),
        source=str(path),
        preprocess=_preprocessor(sequence_length, tokenizer, eos_token),
        expected=expected,
        strict=strict,
        drop_invalid=drop_invalid,
    )


def read_fedjax_shakespeare(
    path: str | Path,
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
    tokenizer=None,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
) -> FederatedData:
    """Reads one split from FedJAX's SQLite file (column ``snippets``).

    Args and returns as :func:`read_tff_shakespeare`; identical data for the
    same roles and snippets.
    """
    return _collect(
        lambda: iter_fedjax_sqlite(path),
        source=str(path),
        preprocess=_preprocessor(sequence_length, tokenizer, eos_token),
        expected=expected,
        strict=strict,
        drop_invalid=drop_invalid,
    )


def _leaf_records(location) -> Iterable:
    """LEAF users as one-snippet clients: the text rebuilt from the windows."""
    for user, record, count, path in iter_leaf_json_records(location):
        windows, targets = record["x"], record["y"]
        if not (isinstance(windows, list) and isinstance(targets, list)):
            raise DataFormatError(f"{path}: user {user!r} has x and y that are not lists")
        if len(windows) != len(targets):
            raise DataFormatError(
                f"{path}: user {user!r} has {len(windows)} x windows but "
                f"{len(targets)} y characters"
            )
        if count != len(windows):
            raise DataFormatError(
                f"{path}: user {user!r} is declared with {count} samples but holds "
                f"{len(windows)} windows"
            )
        if not windows:
            yield user, {"snippets": np.empty(0, dtype=object)}, None, path
            continue
        if not all(isinstance(w, str) for w in windows) or not all(
            isinstance(t, str) and len(t) == 1 for t in targets
        ):
            raise DataFormatError(f"{path}: user {user!r} needs x strings and y single characters")
        width = len(windows[0])
        text = windows[0] + "".join(targets)
        for index, window in enumerate(windows):
            if window != text[index : index + width]:
                raise DataFormatError(
                    f"{path}: user {user!r}: window {index} is not the text at offset {index} "
                    "(LEAF's x must be the consecutive windows of one text, in order)"
                )
        snippets = np.empty(1, dtype=object)
        snippets[0] = text.encode("utf-8")
        yield user, {"snippets": snippets}, None, path


def read_leaf_shakespeare(
    location: str | Path | Sequence[str | Path],
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    expected: SplitFacts | None = None,
    strict: bool = True,
    drop_invalid: bool = False,
    tokenizer=None,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
) -> FederatedData:
    """Reads LEAF's Shakespeare JSON shards of one split.

    Each user's text is rebuilt from its windows (see the module docstring)
    and read as one snippet, so a LEAF user equals a TFF or FedJAX client
    that holds the same text as a single snippet. LEAF keeps no snippet
    boundaries, so the ``BOS``/``EOS`` between a role's snippets in TFF's
    files cannot be restored.

    Args:
      location: a folder of ``*.json`` shards, one shard, or a list of shards.
      sequence_length, strict, drop_invalid, tokenizer, eos_token: as in
        :func:`read_tff_shakespeare`.
      expected: counts to verify; only the client count is compared (LEAF
        holds one text per user, not snippets). TFF's :data:`PUBLISHED_FACTS`
        do not apply: LEAF's README lists 1,129 roles (660 after its own
        filtering), TFF's split has 715.

    Raises:
      FileNotFoundError, DataFormatError, ValueError: naming the shard.
    """
    return _collect(
        lambda: _leaf_records(location),
        source=str(location)
        if isinstance(location, (str, Path))
        else f"{len(location)} LEAF shards",
        preprocess=_preprocessor(sequence_length, tokenizer, eos_token),
        expected=expected,
        strict=strict,
        drop_invalid=drop_invalid,
        count_snippets=False,
    )


def _source_files(source: str, directory: Path, download: bool, progress: bool) -> dict[str, Path]:
    """The two split files (or LEAF folders) of ``source``, fetched if needed."""
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
    if source == "fedjax":
        return {
            split: downloads.fetch(
                fedjax_remote(split), directory, download=download, progress=progress
            )
            for split in SPLITS
        }
    folders = {split: directory / LEAF_FOLDER / split for split in SPLITS}
    for folder in folders.values():
        if not folder.is_dir() or not any(folder.glob("*.json")):
            raise downloads.DatasetUnavailableError(
                f"{folder} does not exist or holds no .json shards. LEAF publishes a script, "
                "not files: run data/shakespeare/preprocess.sh of "
                "https://github.com/TalwalkarLab/leaf and copy its data/train and data/test "
                f"folders to {folder.parent / 'train'} and {folder.parent / 'test'}; set "
                f"{downloads.ENV_DATA_DIR} or pass data_dir= to use another folder."
            )
    return folders


def load_shakespeare(
    *,
    source: str = "tff",
    data_dir: str | Path | None = None,
    download: bool = True,
    progress: bool = True,
    strict: bool = True,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    tokenizer=None,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
) -> FederatedDataset:
    """Federated Shakespeare, memory-mapped from fedjaxsim's cache.

    The first call fetches the published files into the cache folder (see
    :func:`fedjaxsim.data.download.resolve_data_dir`; it may already hold
    the archive or the extracted ``shakespeare_{train,test}.h5``), checks
    them against the published counts, preprocesses them (see the module
    docstring) and writes a store folder next to them (:func:`store_name`:
    ``shakespeare``, ``shakespeare_seq{L}`` for other lengths, ``shakespeare_leaf``
    for LEAF's text). Later calls open that store.

    Args:
      source: ``"tff"`` (HDF5, SHA-256 pinned), ``"fedjax"`` (SQLite) or
        ``"leaf"`` (JSON shards under ``DATA_DIR/leaf_shakespeare/{train,test}``,
        never downloaded, and not checked against TFF's counts).
      data_dir: cache folder; default ``$FEDJAXSIM_DATA_DIR`` or the user cache.
      download: False never touches the network; a missing file then raises
        with the path to place it at.
      progress: progress bars for downloads.
      strict: a count mismatch raises (True) or warns (False).
      sequence_length: length of the ``x`` and ``y`` rows.
      tokenizer: None for FedJAX's character ids; the path of a local Hugging
        Face ``tokenizer.json`` (or a ``tokenizers.Tokenizer``) re-tokenizes
        each role for language-model fine-tuning (module docstring), stored
        as :func:`store_name` with the tokenizer's digest.
      eos_token: the end-of-text token of ``tokenizer``.

    Returns:
      FederatedDataset ``"shakespeare"``: ``x``, ``y`` int32[N, L], 90 classes,
      input shape (L,), task :data:`TASK`; re-tokenized: the tokenizer's
      vocabulary size as classes, task
      :func:`fedjaxsim.data.text.next_token_task`.

    Raises:
      ValueError: an unknown ``source``, files that fail the checks, or a
        tokenizer file that is not a tokenizer.json or lacks ``eos_token``.
      FileNotFoundError: a missing tokenizer file.
      DatasetUnavailableError: files neither cached nor downloadable.
    """
    from fedjaxsim.data.store import read_dataset, write_dataset

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    _check_sequence_length(sequence_length)
    if tokenizer is not None:
        # Loaded (and its end-of-text token checked) before any file is fetched.
        tokenizer = text.as_tokenizer(tokenizer)
        text.eos_id(tokenizer, eos_token)
    directory = downloads.resolve_data_dir(data_dir)
    store = directory / store_name(sequence_length, source, tokenizer)
    if (store / "dataset.json").is_file():
        return read_dataset(store)
    files = _source_files(source, directory, download, progress)
    read = {
        "tff": read_tff_shakespeare,
        "fedjax": read_fedjax_shakespeare,
        "leaf": read_leaf_shakespeare,
    }[source]
    splits = {
        split: read(
            path,
            sequence_length=sequence_length,
            expected=None if source == "leaf" else PUBLISHED_FACTS[split],
            strict=strict,
            tokenizer=tokenizer,
            eos_token=eos_token,
        )
        for split, path in files.items()
    }
    if tokenizer is None:
        num_classes, task = VOCAB_SIZE, TASK
    else:
        num_classes, task = text.vocab_size(tokenizer), text.next_token_task(tokenizer)
    dataset = FederatedDataset(
        "shakespeare", splits["train"], splits["test"], num_classes, (sequence_length,), task
    )
    if source == "leaf":
        described = {
            split: {"shards": [p.name for p in leaf_json_files(path)]}
            for split, path in files.items()
        }
    else:
        described = {
            split: {"name": path.name, "sha256": downloads.sha256_of(path)}
            for split, path in files.items()
        }
    metadata = {"source": source, "sequence_length": sequence_length, "files": described}
    if tokenizer is not None:
        metadata["tokenizer"] = text.describe_tokenizer(tokenizer, eos_token)
    write_dataset(dataset, store, metadata=metadata, overwrite=True)
    return read_dataset(store)
