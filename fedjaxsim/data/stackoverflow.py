"""Stack Overflow next-word and tag prediction (TensorFlow Federated; Reddi et al. 2021).

Source. TensorFlow Federated's Stack Overflow ``ClientData``: questions and
answers grouped by user, one sentence per example, as TFF published it in
``stackoverflow.tar.bz2`` (``stackoverflow_{train,held_out,test}.h5``; TFF's
``tff.simulation.datasets.stackoverflow.load_data`` before commit 7bb20162 of
tensorflow/federated moved it to SQLite). Client ``examples/<user>`` holds
the columns ``tokens`` (the sentence, words separated by single spaces),
``title``, ``tags`` (``|``-separated), ``creation_date``, ``score`` and
``type``. Clients are read one at a time in sorted id order (as TFF's
``HDF5ClientData.client_ids``), never the whole 20 GB file, and converted
once, streaming and resumably (:mod:`fedjaxsim.data.streaming_store`), into a
memory-mapped store. Vocabularies come from ``stackoverflow.word_count`` (one
``word count`` per line, most frequent first; TFF's ``load_word_counts``) and
``stackoverflow.tag_count`` (a JSON object tag -> count; TFF's
``load_tag_counts`` orders it by decreasing count, ties in file order).

Next-word prediction (``stackoverflow_nwp``) follows TFF's
``simulation/baselines/stackoverflow/word_prediction_preprocessing.py``
(``build_to_ids_fn`` and ``batch_and_split``; the same code as Reddi et
al.'s ``utils/datasets/stackoverflow_word_prediction.py`` in
google-research/federated). With ``V`` = 10,000 most frequent words:
pad = 0, word ``i`` of the vocabulary = ``i + 1`` (1..V), oov = V + 1, bos =
V + 2, eos = V + 3 (:func:`nwp_special_ids`; 10,004 ids, uint16 on disk). A
sentence is split on single spaces (``tf.strings.split(sep=' ')``, which
splits as Python's ``bytes.split(b' ')``: consecutive spaces give empty,
out-of-vocabulary words), cut to its first ``L`` = 20 words, mapped to ids,
followed by eos only if it had fewer than ``L`` words, preceded by bos and
padded to ``L + 1``; ``x`` is ids ``[:-1]`` and ``y`` ids ``[1:]``, uint16[N, L].
Accuracy leaves out pad, oov, bos and eos targets, as Reddi et al. report it
(:func:`nwp_task`).

Tokenized next-word prediction (``tokenizer=`` a local Hugging Face
``tokenizer.json``), for fine-tuning a pretrained language model: each
sentence, the ``tokens`` string as TFF stores it (words joined by single
spaces) decoded as UTF-8, is tokenized (:func:`fedjaxsim.data.text.encode_texts`)
and becomes one row ``s = [EOS] + ids + [EOS]`` of ``L`` targets:
``x = s[:-1]`` and ``y = s[1:]``, cut to ``L`` and padded (targets with the
tokenizer's vocabulary size, inputs with the end-of-text id), as
:func:`fedjaxsim.data.text.pad_examples` lays out a prompt ``[EOS]`` and a
response ``ids + [EOS]``. The leading end-of-text token plays TFF's bos (GPT-2's
document separator), so every token of the sentence is a target, and the
trailing one its eos, lost, as TFF's, when the sentence fills the row. An
empty sentence keeps its row (one target, end-of-text), so the example
counts stay the published ones. Accuracy counts every real target
(:func:`fedjaxsim.data.text.next_token_task`). The store
(``stackoverflow_nwp_tok{digest}_seq{L}``, :func:`store_name`) never shares a
folder with the word ids, and its manifests record the tokenizer.

Tag prediction (``stackoverflow_tp``) follows TFF's
``tag_prediction_preprocessing.build_to_ids_fn``: the words of ``tokens + ' '
+ title`` split on runs of whitespace, and the ``|``-separated tags. TFF
turns them into a bag-of-words mean and a multi-hot vector at once; the store
keeps the ids and the model averages on the device:

* ``x`` uint16[N, max_words]: word ids, 1..V, V + 1 for out-of-vocabulary
  words, 0 for padding; cut to the first ``max_words`` (64) words, and the
  number of examples cut is kept in the store's metadata (``counts``). TFF's
  bag leaves out-of-vocabulary words out of the mean (one-hot of depth V),
  Reddi et al.'s ``stackoverflow_lr_dataset.py`` counts them in its
  denominator (depth V + 1, then drops the last column); both can be computed
  from ``x``.
* ``y`` uint16[N, max_tags]: the tag ids 0..T-1 of the ``T`` = 500 most
  frequent tags, in the post's order, ``T`` for a tag outside them or an
  empty slot. Stack Overflow allows at most 5 tags; an example with more than
  ``max_tags`` is an error.

Evaluation. Reddi et al. (google-research/federated,
``optimization/stackoverflow*/federated_stackoverflow*.py``) validate every
round on the first 10,000 examples of the **test** split, taken from TFF's
``create_tf_dataset_from_all_clients()``: all test clients' examples
concatenated in a shuffled client order; the final test covers the whole
test split. :func:`load_stackoverflow` offers ``eval_split`` ``"test"``
(default) or ``"held_out"`` and ``test_examples``: see
:func:`sample_eval_examples`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjaxsim.core.tasks import Task
from fedjaxsim.data import download as downloads
from fedjaxsim.data import text
from fedjaxsim.data.emnist import SplitFacts
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.formats import DataFormatError
from fedjaxsim.data.streaming_store import (
    FieldSpec,
    StreamedClient,
    write_federated_data_streaming,
)
from fedjaxsim.data.validation import InvalidClient

TASKS = ("stackoverflow_nwp", "stackoverflow_tp")
_TOKENIZER_TASK_MESSAGE = (
    "a tokenizer applies to next-word prediction (stackoverflow_nwp) only; {task} keeps its "
    "bag of words (tag prediction has no token sequence to fine-tune a language model on)"
)
SPLITS = ("train", "held_out", "test")
EVAL_SPLITS = ("test", "held_out")
DEFAULT_VOCAB_SIZE = 10_000
DEFAULT_TAG_VOCAB_SIZE = 500
DEFAULT_SEQUENCE_LENGTH = 20
DEFAULT_MAX_WORDS = 64
DEFAULT_MAX_TAGS = 5
_UINT16_IDS = 65_536

# From TensorFlow Federated's stackoverflow.load_data documentation.
PUBLISHED_FACTS = {
    "train": SplitFacts(342_477, 135_818_730),
    "held_out": SplitFacts(38_758, 16_491_230),
    "test": SplitFacts(204_088, 16_586_035),
}

_TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
# SHA-256 as TFF's loaders pin them (file_hash= in
# tensorflow_federated/python/simulation/datasets/stackoverflow.py; the h5
# archive at tensorflow/federated 2c3c896c, the count files to this day).
ARCHIVE = downloads.RemoteFile(
    "stackoverflow.tar.bz2",
    _TFF_URL + "stackoverflow.tar.bz2",
    "99eca2f8b8327a09e5fc123979df2d237acbc5e52322f6d86bf523ee47b961a2",
)
WORD_COUNT_ARCHIVE = downloads.RemoteFile(
    "stackoverflow.word_count.tar.bz2",
    _TFF_URL + "stackoverflow.word_count.tar.bz2",
    "1dc00256d6e527c54b9756d968118378ae14e6692c0b3b6cad470cdd3f0c519c",
)
TAG_COUNT_ARCHIVE = downloads.RemoteFile(
    "stackoverflow.tag_count.tar.bz2",
    _TFF_URL + "stackoverflow.tag_count.tar.bz2",
    "6fe281cec490d9384a290d560072438e7e2b377bbb823876ce7bd6f82696772d",
)
WORD_COUNT_FILE = "stackoverflow.word_count"
TAG_COUNT_FILE = "stackoverflow.tag_count"


def tff_filename(split: str) -> str:
    return f"stackoverflow_{split}.h5"


# ----------------------------------------------------------------------------- vocabularies


def read_word_counts(path: str | Path, vocab_size: int | None = None) -> dict[str, int]:
    """Words and counts of ``stackoverflow.word_count``, in file order.

    Args:
      path: the extracted file: one ``word count`` pair per line, most
        frequent first (TFF's ``load_word_counts``).
      vocab_size: stop after this many words (TFF reads only those lines).

    Raises:
      FileNotFoundError: no such file.
      DataFormatError: a line that is not ``word count`` with a count of
        digits, a repeated word, or a file that is not UTF-8 text, naming the
        file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    counts: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if vocab_size is not None and len(counts) >= vocab_size:
                    break
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdecimal():
                    raise DataFormatError(
                        f"{path}, line {number}: expected 'word count', got {line[:80]!r}; "
                        "is this TFF's stackoverflow.word_count?"
                    )
                word, count = parts
                if word in counts:
                    raise DataFormatError(f"{path}, line {number}: the word {word!r} repeats")
                counts[word] = int(count)
    except UnicodeDecodeError as error:
        raise DataFormatError(
            f"{path} is not UTF-8 text ({error}); is this TFF's stackoverflow.word_count "
            "(and not its .tar.bz2 archive)?"
        ) from error
    return counts


def read_tag_counts(path: str | Path) -> dict[str, int]:
    """Tags and counts of ``stackoverflow.tag_count``, most frequent first.

    The file is a JSON object tag -> count; as TFF's ``load_tag_counts``, the
    tags are ordered by decreasing count, ties in file order.

    Raises:
      FileNotFoundError: no such file.
      DataFormatError: not JSON, not an object of non-negative integer counts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataFormatError(
            f"{path} is not JSON ({error}); is this TFF's stackoverflow.tag_count?"
        ) from error
    if not isinstance(counts, dict):
        raise DataFormatError(
            f"{path} holds a JSON {type(counts).__name__}, expected an object tag -> count"
        )
    for tag, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise DataFormatError(
                f"{path}: tag {tag!r} has count {count!r}, expected a non-negative integer"
            )
    return dict(sorted(counts.items(), key=lambda item: item[1], reverse=True))


def word_vocabulary(path: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[str]:
    """The ``vocab_size`` most frequent words (word ``i`` gets id ``i + 1``).

    Raises:
      DataFormatError: the file holds fewer words, or is malformed.
    """
    words = list(read_word_counts(path, vocab_size))
    if len(words) < vocab_size:
        raise DataFormatError(
            f"{path} holds only {len(words)} words, but the vocabulary needs {vocab_size}: "
            "the file is truncated or not TFF's stackoverflow.word_count"
        )
    return words


def tag_vocabulary(path: str | Path, tag_vocab_size: int = DEFAULT_TAG_VOCAB_SIZE) -> list[str]:
    """The ``tag_vocab_size`` most frequent tags (tag ``i`` gets id ``i``).

    Raises:
      DataFormatError: the file holds fewer tags, or is malformed.
    """
    tags = list(read_tag_counts(path))
    if len(tags) < tag_vocab_size:
        raise DataFormatError(
            f"{path} holds only {len(tags)} tags, but the tag vocabulary needs "
            f"{tag_vocab_size}: the file is truncated or not TFF's stackoverflow.tag_count"
        )
    return tags[:tag_vocab_size]


def _vocabulary_digest(words: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- preprocessing


class SpecialIds(NamedTuple):
    """The reserved ids of next-word prediction (TFF's ``get_special_tokens``
    with one out-of-vocabulary bucket)."""

    pad: int
    oov: int
    bos: int
    eos: int


def nwp_special_ids(vocab_size: int = DEFAULT_VOCAB_SIZE) -> SpecialIds:
    """pad 0, words 1..V, then oov V + 1, bos V + 2, eos V + 3."""
    return SpecialIds(pad=0, oov=vocab_size + 1, bos=vocab_size + 2, eos=vocab_size + 3)


def nwp_task(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Task:
    """Next-token loss over non-pad targets; accuracy without pad, oov, bos, eos."""
    special = nwp_special_ids(vocab_size)
    return Task(
        kind="next_token", pad_id=special.pad, excluded_ids=(special.oov, special.bos, special.eos)
    )


def tp_task(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Task:
    """Multi-label tags, recall and precision at 5, bag-of-words inputs over ``vocab_size``."""
    return Task(kind="multilabel", top_k=5, input_vocab_size=vocab_size)


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _word_ids(vocabulary: Sequence[str]) -> dict[bytes, int]:
    ids = {word.encode("utf-8"): index + 1 for index, word in enumerate(vocabulary)}
    if len(ids) != len(vocabulary):
        raise ValueError("the vocabulary repeats a word")
    return ids


class NextWordPreprocessing:
    """TFF's next-word ``to_ids`` + ``batch_and_split`` for one client.

    Args:
      vocabulary: the in-vocabulary words, most frequent first.
      sequence_length: words kept per sentence (``L``); rows are ``L`` long.
    """

    columns = ("tokens",)

    def __init__(self, vocabulary: Sequence[str], sequence_length: int = DEFAULT_SEQUENCE_LENGTH):
        _check_int("sequence_length", sequence_length, 1)
        if not vocabulary:
            raise ValueError("the vocabulary is empty")
        _check_int("vocabulary size", len(vocabulary), 1, _UINT16_IDS - 4)
        self.vocabulary = tuple(vocabulary)
        self.sequence_length = int(sequence_length)
        self.special = nwp_special_ids(len(self.vocabulary))
        self._ids = _word_ids(self.vocabulary)

    @property
    def name(self) -> str:
        return "stackoverflow_nwp"

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary) + 4

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.sequence_length,)

    @property
    def task(self) -> Task:
        return nwp_task(len(self.vocabulary))

    @property
    def fields(self) -> dict[str, FieldSpec]:
        row = FieldSpec(np.uint16, (self.sequence_length,))
        return {"x": row, "y": row}

    @property
    def params(self) -> dict:
        return {
            "task": self.name,
            "vocab_size": len(self.vocabulary),
            "sequence_length": self.sequence_length,
        }

    def __call__(
        self, columns: Mapping[str, Sequence[bytes]]
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """``{"tokens": sentences}`` -> (``{"x", "y"}`` uint16[N, L], counts)."""
        length = self.sequence_length
        pad, oov, bos, eos = self.special
        lookup = self._ids.get
        rows = []
        truncated = tokens = out_of_vocabulary = 0
        for sentence in columns["tokens"]:
            # At most L splits: the first L parts are the sentence's first L words.
            words = sentence.split(b" ", length)
            if len(words) > length:
                truncated += 1
                words = words[:length]
            ids = [lookup(word, oov) for word in words]
            tokens += len(ids)
            out_of_vocabulary += ids.count(oov)
            if len(ids) < length:
                rows.append([bos, *ids, eos, *[pad] * (length - 1 - len(ids))])
            else:
                rows.append([bos, *ids])
        sequences = np.array(rows, dtype=np.uint16).reshape(len(rows), length + 1)
        counts = {
            "truncated_examples": truncated,
            "tokens": tokens,
            "oov_tokens": out_of_vocabulary,
        }
        return {"x": sequences[:, :-1], "y": sequences[:, 1:]}, counts


class TokenizedNextWordPreprocessing:
    """Next-word rows of a Hugging Face tokenizer's ids for one client (module docstring).

    Rows are uint16 when every id and the padding target (the vocabulary
    size) fit, as GPT-2's 50,257 do, else int32: the train split holds 135
    million sentences, so the narrower rows halve the store. Models and
    losses widen ids to int32 on the device.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` or the path of a ``tokenizer.json``.
      sequence_length: targets per row (``L``); longer sentences are cut and counted.
      eos_token: the end-of-text token before and after each sentence.

    Raises:
      ValueError: a bad ``sequence_length``, or a tokenizer without ``eos_token``.
      FileNotFoundError: a missing tokenizer file.
    """

    columns = ("tokens",)

    def __init__(
        self,
        tokenizer,
        sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
        *,
        eos_token: str = text.DEFAULT_EOS_TOKEN,
    ):
        _check_int("sequence_length", sequence_length, 1)
        self.tokenizer = text.as_tokenizer(tokenizer)
        self.sequence_length = int(sequence_length)
        self.eos_token = eos_token
        self.eos_id = text.eos_id(self.tokenizer, eos_token)
        self.pad_id = text.vocab_size(self.tokenizer)
        self.digest = text.tokenizer_digest(self.tokenizer)
        self.dtype = np.uint16 if self.pad_id < _UINT16_IDS else np.int32

    @property
    def name(self) -> str:
        return "stackoverflow_nwp"

    @property
    def num_classes(self) -> int:
        return self.pad_id

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.sequence_length,)

    @property
    def task(self) -> Task:
        return text.next_token_task(self.tokenizer)

    @property
    def fields(self) -> dict[str, FieldSpec]:
        row = FieldSpec(self.dtype, (self.sequence_length,))
        return {"x": row, "y": row}

    @property
    def params(self) -> dict:
        return tokenized_params(self.digest, self.eos_token, self.sequence_length)

    def describe(self) -> dict:
        """The tokenizer's facts for the store's metadata."""
        return text.describe_tokenizer(self.tokenizer, self.eos_token)

    def __call__(
        self, columns: Mapping[str, Sequence[bytes]]
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """``{"tokens": sentences}`` -> (``{"x", "y"}`` [N, L], counts).

        Raises:
          InvalidClient: a sentence that is not UTF-8.
        """
        sentences = text.decode_utf8(columns["tokens"], "sentence")
        length, eos, pad = self.sequence_length, self.eos_id, self.pad_id
        xs, ys = [], []
        truncated = tokens = dropped = 0
        # text.pad_examples([[EOS]], [ids + [EOS]], L, pad, EOS) row by row, in
        # plain lists: it is this loop that 135 million sentences go through.
        for ids in text.encode_texts(self.tokenizer, sentences):
            tokens += len(ids)
            sequence = [eos, *ids, eos]
            if len(sequence) - 1 > length:
                truncated += 1
                dropped += len(sequence) - 1 - length
                sequence = sequence[: length + 1]
            fill = length + 1 - len(sequence)
            xs.append(sequence[:-1] + [eos] * fill)
            ys.append(sequence[1:] + [pad] * fill)
        count = len(xs)
        fields = {
            "x": np.array(xs, dtype=self.dtype).reshape(count, length),
            "y": np.array(ys, dtype=self.dtype).reshape(count, length),
        }
        counts = {"truncated_examples": truncated, "tokens": tokens, "dropped_tokens": dropped}
        return fields, counts


def tokenized_params(digest: str, eos_token: str, sequence_length: int) -> dict:
    """The preprocessing parameters a tokenized next-word store records."""
    return {
        "task": "stackoverflow_nwp",
        "tokenizer_sha256": digest,
        "eos_token": eos_token,
        "sequence_length": int(sequence_length),
    }


class TagPreprocessing:
    """TFF's tag-prediction ``to_ids`` for one client, kept as ids (see the module docstring).

    Args:
      vocabulary: the in-vocabulary words, most frequent first (ids 1..V).
      tag_vocabulary: the in-vocabulary tags, most frequent first (ids 0..T-1).
      max_words: word slots of ``x``; longer examples are cut and counted.
      max_tags: tag slots of ``y``; an example with more tags is an error.
    """

    columns = ("tags", "title", "tokens")

    def __init__(
        self,
        vocabulary: Sequence[str],
        tag_vocabulary: Sequence[str],
        max_words: int = DEFAULT_MAX_WORDS,
        max_tags: int = DEFAULT_MAX_TAGS,
    ):
        _check_int("max_words", max_words, 1)
        _check_int("max_tags", max_tags, 1)
        if not vocabulary or not tag_vocabulary:
            raise ValueError("the word and tag vocabularies must not be empty")
        _check_int("vocabulary size", len(vocabulary), 1, _UINT16_IDS - 2)
        _check_int("tag vocabulary size", len(tag_vocabulary), 1, _UINT16_IDS - 1)
        self.vocabulary = tuple(vocabulary)
        self.tag_vocabulary = tuple(tag_vocabulary)
        self.max_words = int(max_words)
        self.max_tags = int(max_tags)
        self._ids = _word_ids(self.vocabulary)
        self._tag_ids = {tag.encode("utf-8"): i for i, tag in enumerate(self.tag_vocabulary)}
        if len(self._tag_ids) != len(self.tag_vocabulary):
            raise ValueError("the tag vocabulary repeats a tag")

    @property
    def name(self) -> str:
        return "stackoverflow_tp"

    @property
    def num_classes(self) -> int:
        return len(self.tag_vocabulary)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.max_words,)

    @property
    def task(self) -> Task:
        return tp_task(len(self.vocabulary))

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return {
            "x": FieldSpec(np.uint16, (self.max_words,)),
            "y": FieldSpec(np.uint16, (self.max_tags,)),
        }

    @property
    def params(self) -> dict:
        return {
            "task": self.name,
            "vocab_size": len(self.vocabulary),
            "tag_vocab_size": len(self.tag_vocabulary),
            "max_words": self.max_words,
            "max_tags": self.max_tags,
        }

    def __call__(
        self, columns: Mapping[str, Sequence[bytes]]
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """``{"tokens", "title", "tags"}`` -> (``{"x": uint16[N, max_words], "y":
        uint16[N, max_tags]}``, counts).

        Raises:
          InvalidClient: an example with more than ``max_tags`` tags.
        """
        max_words, max_tags = self.max_words, self.max_tags
        oov, empty = len(self.vocabulary) + 1, len(self.tag_vocabulary)
        lookup, tag_lookup = self._ids.get, self._tag_ids.get
        word_rows, tag_rows = [], []
        counts = dict.fromkeys(
            ("truncated_examples", "dropped_words", "words", "oov_words", "tags", "oov_tags"), 0
        )
        for index, (tokens, title, tags) in enumerate(
            zip(columns["tokens"], columns["title"], columns["tags"])
        ):
            words = (tokens + b" " + title).split()
            if len(words) > max_words:
                counts["truncated_examples"] += 1
                counts["dropped_words"] += len(words) - max_words
                words = words[:max_words]
            ids = [lookup(word, oov) for word in words]
            counts["words"] += len(ids)
            counts["oov_words"] += ids.count(oov)
            word_rows.append(ids + [0] * (max_words - len(ids)))
            parts = tags.split(b"|")
            if len(parts) > max_tags:
                raise InvalidClient(
                    "too many tags",
                    f"has {len(parts)} tags in example {index} ({tags[:200]!r}), more than "
                    f"max_tags={max_tags}: pass a larger max_tags (Stack Overflow allows 5)",
                )
            tag_ids = [tag_lookup(tag, empty) for tag in parts]
            named = sum(1 for tag in parts if tag)
            counts["tags"] += named
            counts["oov_tags"] += named - sum(1 for tag in tag_ids if tag != empty)
            tag_rows.append(tag_ids + [empty] * (max_tags - len(tag_ids)))
        count = len(word_rows)
        fields = {
            "x": np.array(word_rows, dtype=np.uint16).reshape(count, max_words),
            "y": np.array(tag_rows, dtype=np.uint16).reshape(count, max_tags),
        }
        return fields, counts


Preprocessing = NextWordPreprocessing | TokenizedNextWordPreprocessing | TagPreprocessing


def _vocabulary_digests(preprocessing: Preprocessing) -> dict[str, str]:
    """The vocabularies' digests that identify a conversion beside its parameters
    (a tokenizer's digest is already one of them)."""
    if isinstance(preprocessing, TokenizedNextWordPreprocessing):
        return {}
    digests = {"vocabulary_sha256": _vocabulary_digest(preprocessing.vocabulary)}
    if isinstance(preprocessing, TagPreprocessing):
        digests["tag_vocabulary_sha256"] = _vocabulary_digest(preprocessing.tag_vocabulary)
    return digests


# ----------------------------------------------------------------------------- HDF5 clients


def _h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            "reading Stack Overflow needs the 'h5py' package: pip install 'fedjaxsim[data]'"
        ) from error
    return h5py


@contextlib.contextmanager
def _examples_group(path: Path):
    """The ``examples`` group of a TFF HDF5 ClientData file, open for reading."""
    h5py = _h5py()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataFormatError(
            f"{path} is not a readable HDF5 file ({error}); it may be truncated or corrupt: "
            "delete it and extract or fetch it again"
        ) from error
    with file:
        try:
            examples = file.get("examples")
        except (OSError, KeyError, ValueError) as error:
            raise DataFormatError(f"{path}: cannot read the 'examples' group ({error})") from error
        if not isinstance(examples, h5py.Group):
            raise DataFormatError(
                f"{path} has no 'examples' group: it is not a TensorFlow Federated ClientData file"
            )
        yield examples


def h5_client_ids(path: str | Path) -> list[str]:
    """The client ids of a TFF HDF5 file, sorted (TFF's ``HDF5ClientData.client_ids``).

    Raises:
      FileNotFoundError, DataFormatError: naming the file.
    """
    path = Path(path)
    with _examples_group(path) as examples:
        try:
            return sorted(str(client_id) for client_id in examples.keys())
        except (OSError, KeyError, ValueError) as error:
            raise DataFormatError(
                f"{path}: cannot list the clients ({error}); the file is corrupt or truncated"
            ) from error


def _as_bytes(path: Path, client_id: str, column: str, values: np.ndarray) -> list[bytes]:
    if values.ndim != 1:
        raise DataFormatError(
            f"{path}: client {client_id!r} column {column!r} has shape {values.shape}, "
            "expected one string per example"
        )
    items = values.tolist()
    if all(type(value) is bytes for value in items):  # h5py's variable-length strings
        return items
    out = []
    for value in items:
        if isinstance(value, bytes):
            out.append(value)
        elif isinstance(value, str):
            out.append(value.encode("utf-8"))
        else:
            raise DataFormatError(
                f"{path}: client {client_id!r} column {column!r} holds "
                f"{type(value).__name__} values, expected strings"
            )
    return out


def iter_h5_columns(
    path: str | Path,
    columns: Sequence[str],
    *,
    start: int = 0,
    client_ids: Sequence[str] | None = None,
) -> Iterator[tuple[str, dict[str, list[bytes]]]]:
    """Clients of a TFF HDF5 file, one at a time, with only the named string columns.

    Args:
      path: e.g. ``stackoverflow_train.h5``.
      columns: the columns to read (e.g. ``("tokens",)``).
      start: the position in sorted id order to start at.
      client_ids: the sorted ids if already known (:func:`h5_client_ids`).

    Yields:
      ``(client_id, {column: list of bytes})``.

    Raises:
      DataFormatError: an unreadable file or client, or a missing column,
        naming the file and client.
    """
    path = Path(path)
    ids = h5_client_ids(path) if client_ids is None else client_ids
    with _examples_group(path) as examples:
        for client_id in ids[start:]:
            try:
                group = examples[client_id]
                missing = [column for column in columns if column not in group]
                if missing:
                    raise DataFormatError(
                        f"{path}: client {client_id!r} has no column(s) {missing} "
                        f"(it has {sorted(group)}); is this TFF's Stack Overflow?"
                    )
                raw = {column: np.asarray(group[column][()]) for column in columns}
            except (OSError, KeyError, TypeError, ValueError) as error:
                if isinstance(error, DataFormatError):
                    raise
                raise DataFormatError(
                    f"{path}: cannot read client {client_id!r} ({error}); the file is corrupt "
                    "or truncated: delete it and extract or fetch it again"
                ) from error
            yield client_id, {c: _as_bytes(path, client_id, c, v) for c, v in raw.items()}


def _convert_client(
    path: Path, client_id: str, columns: Mapping[str, list[bytes]], preprocessing: Preprocessing
) -> StreamedClient:
    lengths = {column: len(values) for column, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataFormatError(
            f"{path}: client {client_id!r} has columns of different lengths {lengths}"
        )
    if not next(iter(lengths.values())):
        raise DataFormatError(
            f"{path}: client {client_id!r} has no examples; TFF's Stack Overflow has none "
            "such, so the file is damaged or not the published one"
        )
    try:
        fields, counts = preprocessing(columns)
    except InvalidClient as problem:
        raise DataFormatError(f"{path}: client {client_id!r} {problem.detail}") from None
    return StreamedClient(client_id, fields, counts)


def _check_counts(
    num_clients: int, num_examples: int | None, expected: SplitFacts, source: str, strict: bool
) -> None:
    """Compares clients (and examples, unless None) with the published counts."""
    if num_clients == expected.num_clients and num_examples in (None, expected.num_examples):
        return
    held = f"{num_clients:,} clients" + (
        f" and {num_examples:,} examples" if num_examples is not None else ""
    )
    message = (
        f"{source} holds {held}, but the published split has {expected.num_clients:,} clients "
        f"and {expected.num_examples:,} examples: the file is truncated, of another split or "
        "another version. Delete it and fetch it again"
    )
    if strict:
        raise ValueError(message + ", or pass strict=False to use it anyway.")
    warnings.warn(message + ".", UserWarning, stacklevel=4)


def write_stackoverflow_split(
    path: str | Path,
    directory: str | Path,
    preprocessing: Preprocessing,
    *,
    expected: SplitFacts | None = None,
    strict: bool = True,
    metadata: Mapping | None = None,
    source_key: object = None,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int = 1000,
    description: str | None = None,
) -> Path:
    """Converts one TFF HDF5 split into a store folder, one client at a time.

    Memory holds one client; an interrupted conversion resumes where its last
    checkpoint left it (:func:`~fedjaxsim.data.streaming_store.write_federated_data_streaming`).

    Args:
      path: the split's ``.h5`` file.
      directory: the store folder to create.
      preprocessing: :class:`NextWordPreprocessing`,
        :class:`TokenizedNextWordPreprocessing` or :class:`TagPreprocessing`.
      expected: published counts; with ``strict`` a different client count
        fails before converting, and any mismatch after.
      strict: mismatches raise (True) or warn (False).
      metadata, source_key, overwrite, progress, checkpoint_every, description:
        as in ``write_federated_data_streaming``; ``source_key`` defaults to
        the file's name, size and modification time with the preprocessing.

    Returns:
      The store folder.

    Raises:
      DataFormatError: an unreadable file, a client without examples or
        columns, too many tags, naming the file and client.
      ValueError: counts that differ from ``expected`` and ``strict``.
    """
    path = Path(path)
    client_ids = h5_client_ids(path)
    if expected is not None and strict:
        _check_counts(len(client_ids), None, expected, str(path), strict)
    if source_key is None:
        stat = path.stat()
        source_key = {
            "file": path.name,
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "preprocessing": preprocessing.params,
            **_vocabulary_digests(preprocessing),
        }

    def clients(start: int) -> Iterator[StreamedClient]:
        records = iter_h5_columns(path, preprocessing.columns, start=start, client_ids=client_ids)
        for client_id, columns in records:
            yield _convert_client(path, client_id, columns, preprocessing)

    directory = write_federated_data_streaming(
        clients,
        directory,
        num_clients=len(client_ids),
        fields=preprocessing.fields,
        metadata={**dict(metadata or {}), "source_key": source_key},
        source_key=source_key,
        overwrite=overwrite,
        progress=progress,
        checkpoint_every=checkpoint_every,
        description=description or f"{preprocessing.name} {path.name}",
    )
    if expected is not None:
        from fedjaxsim.data.store import read_manifest

        manifest = read_manifest(directory)
        _check_counts(
            manifest["num_clients"], manifest["num_examples"], expected, str(path), strict
        )
    return directory


# ----------------------------------------------------------------------------- evaluation sample


def sample_eval_examples(data: FederatedData, num_examples: int, seed: int = 0) -> FederatedData:
    """The first ``num_examples`` examples of the clients in a seeded shuffled order.

    This is what Reddi et al. validate on: TFF's
    ``create_tf_dataset_from_all_clients(seed).take(num_examples)``, whose
    client order is ``np.random.RandomState(seed).shuffle`` of the sorted
    client ids (``ClientData.datasets``) with each client's examples in file
    order. So whole clients are taken in that order, and the last one only up
    to its first examples that complete ``num_examples``. A population with
    at most ``num_examples`` examples is returned whole, as it is.

    Args:
      data: the evaluation split (clients in sorted id order, as stored).
      num_examples: how many examples to keep.
      seed: the shuffle's seed.

    Returns:
      An in-memory population of the chosen clients in the shuffled order.
    """
    _check_int("test_examples", num_examples, 1)
    if data.total_examples <= num_examples:
        return data
    order = np.arange(data.num_clients)
    np.random.RandomState(seed).shuffle(order)
    sizes = data.num_examples[order]
    ends = np.cumsum(sizes)
    last = int(np.searchsorted(ends, num_examples))  # first client reaching the total
    chosen = [int(i) for i in order[: last + 1]]
    clients = data.clients(chosen, decode=False)
    keep = num_examples - int(ends[last] - sizes[last])
    clients[-1] = {name: array[:keep] for name, array in clients[-1].items()}
    names = None if data.client_names is None else [data.client_names[i] for i in chosen]
    return FederatedData.from_clients(clients, names, data.field_scales)


# ----------------------------------------------------------------------------- loading


def store_name(task: str, *, tokenizer=None, **params: int) -> str:
    """The store folder of ``task``: its name, plus every non-default parameter.

    Tokenized next-word prediction (``tokenizer`` a ``tokenizers.Tokenizer``)
    is ``stackoverflow_nwp_tok{digest}_seq{L}``
    (:func:`fedjaxsim.data.text.text_store_suffix`), whatever ``L``: another
    tokenizer or length is another folder, never the word ids'.
    """
    if tokenizer is not None:
        if task != "stackoverflow_nwp":
            raise ValueError(_TOKENIZER_TASK_MESSAGE.format(task=task))
        length = params.get("sequence_length", DEFAULT_SEQUENCE_LENGTH)
        return f"{task}_{text.text_store_suffix(tokenizer, length)}"
    defaults = {
        "stackoverflow_nwp": {
            "vocab_size": DEFAULT_VOCAB_SIZE,
            "sequence_length": DEFAULT_SEQUENCE_LENGTH,
        },
        "stackoverflow_tp": {
            "vocab_size": DEFAULT_VOCAB_SIZE,
            "tag_vocab_size": DEFAULT_TAG_VOCAB_SIZE,
            "max_words": DEFAULT_MAX_WORDS,
            "max_tags": DEFAULT_MAX_TAGS,
        },
    }[task]
    short = {
        "vocab_size": "vocab",
        "sequence_length": "seq",
        "tag_vocab_size": "tags",
        "max_words": "words",
        "max_tags": "maxtags",
    }
    suffix = "".join(
        f"_{short[key]}{params[key]}" for key in defaults if params[key] != defaults[key]
    )
    return task + suffix


def _fetch_extracted(
    remote: downloads.RemoteFile,
    names: Sequence[str],
    directory: Path,
    download: bool,
    progress: bool,
) -> dict[str, Path]:
    """``names`` extracted from ``remote`` into ``directory``; present ones are kept."""
    wanted = {name: directory / name for name in names}
    missing = {name: path for name, path in wanted.items() if not path.is_file()}
    if missing:
        try:
            archive = downloads.fetch(remote, directory, download=download, progress=progress)
        except downloads.DatasetUnavailableError as error:
            raise downloads.DatasetUnavailableError(
                f"{error} Or place the file(s) extracted from it, {', '.join(missing)}, in "
                f"{directory}."
            ) from error
        downloads.extract_members(archive, missing)
    return wanted


def _preprocessing(
    task: str,
    directory: Path,
    params: Mapping[str, int],
    download: bool,
    progress: bool,
    tokenizer=None,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
) -> Preprocessing:
    if tokenizer is not None:  # the tokenizer is the vocabulary: no word counts needed
        return TokenizedNextWordPreprocessing(
            tokenizer, params["sequence_length"], eos_token=eos_token
        )
    word_counts = _fetch_extracted(
        WORD_COUNT_ARCHIVE, [WORD_COUNT_FILE], directory, download, progress
    )[WORD_COUNT_FILE]
    vocabulary = word_vocabulary(word_counts, params["vocab_size"])
    if task == "stackoverflow_nwp":
        return NextWordPreprocessing(vocabulary, params["sequence_length"])
    tag_counts = _fetch_extracted(
        TAG_COUNT_ARCHIVE, [TAG_COUNT_FILE], directory, download, progress
    )[TAG_COUNT_FILE]
    tags = tag_vocabulary(tag_counts, params["tag_vocab_size"])
    return TagPreprocessing(vocabulary, tags, params["max_words"], params["max_tags"])


def _converted(directory: Path, key: object) -> bool:
    """Whether ``directory`` is a finished store of the conversion ``key``."""
    from fedjaxsim.data.store import StoreError, read_manifest

    try:
        manifest = read_manifest(directory)
    except StoreError:
        return False
    return manifest["metadata"].get("source_key") == json.loads(json.dumps(key))


def _convert_split(
    split: str,
    path: Path,
    target: Path,
    preprocessing: Preprocessing,
    *,
    strict: bool,
    progress: bool,
    checkpoint_every: int,
) -> None:
    """Converts (or keeps, if already converted from the same file) one split."""
    stat = path.stat()
    key = {
        "split": split,
        "file": path.name,
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "preprocessing": preprocessing.params,
        **_vocabulary_digests(preprocessing),
    }
    expected = PUBLISHED_FACTS[split]
    if _converted(target, key):
        from fedjaxsim.data.store import read_manifest

        manifest = read_manifest(target)
        _check_counts(
            manifest["num_clients"], manifest["num_examples"], expected, str(path), strict
        )
        return
    write_stackoverflow_split(
        path,
        target,
        preprocessing,
        expected=expected,
        strict=strict,
        metadata={
            "dataset": preprocessing.name,
            "split": split,
            "preprocessing": preprocessing.params,
            "source": {"file": path.name, "bytes": stat.st_size},
            **(
                {"tokenizer": preprocessing.describe()}
                if isinstance(preprocessing, TokenizedNextWordPreprocessing)
                else {}
            ),
        },
        source_key=key,
        overwrite=True,
        progress=progress,
        checkpoint_every=checkpoint_every,
        description=f"{preprocessing.name} {split}",
    )


def _check_stored_params(store: Path, params: Mapping) -> None:
    from fedjaxsim.data.store import read_manifest

    stored = read_manifest(store / "train")["metadata"].get("preprocessing")
    if stored is not None and stored != json.loads(json.dumps(dict(params))):
        raise ValueError(
            f"{store} was converted with {stored}, not {dict(params)}: delete the folder to "
            "convert it again"
        )


def load_stackoverflow(
    task: str = "stackoverflow_nwp",
    *,
    eval_split: str = "test",
    test_examples: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    download: bool = True,
    progress: bool = True,
    strict: bool = True,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    tag_vocab_size: int = DEFAULT_TAG_VOCAB_SIZE,
    max_words: int = DEFAULT_MAX_WORDS,
    max_tags: int = DEFAULT_MAX_TAGS,
    checkpoint_every: int = 1000,
    tokenizer=None,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
) -> FederatedDataset:
    """Stack Overflow next-word or tag prediction, memory-mapped from fedjaxsim's cache.

    The first call finds in the cache folder (see
    :func:`fedjaxsim.data.download.resolve_data_dir`) TFF's published
    archives or the files extracted from them (``stackoverflow_train.h5``,
    ``stackoverflow_test.h5``, ``stackoverflow.word_count``, and for tag
    prediction ``stackoverflow.tag_count``), fetching what is missing, and
    converts train and test, one client at a time, into the store folder
    ``stackoverflow_nwp`` or ``stackoverflow_tp`` (non-default parameters are
    added to the name, e.g. ``stackoverflow_nwp_seq30``). An interrupted
    conversion resumes when called again (train takes tens of minutes on a
    2-core CPU). Later calls open the store without touching the HDF5 files.
    ``eval_split="held_out"`` converts the held-out split on first use into
    ``<store>/held_out``. With ``tokenizer`` (next-word prediction only) the
    sentences are tokenized instead (module docstring) into
    ``stackoverflow_nwp_tok{digest}_seq{L}``, and no word counts are read.

    Args:
      task: ``"stackoverflow_nwp"`` or ``"stackoverflow_tp"`` (module docstring).
      eval_split: the split returned as ``test``: ``"test"`` (Reddi et al.)
        or ``"held_out"``.
      test_examples: keep only this many evaluation examples, sampled as
        :func:`sample_eval_examples` (Reddi et al. validate on 10,000);
        None keeps the whole split, memory-mapped.
      seed: the seed of that sample.
      data_dir: cache folder; default ``$FEDJAXSIM_DATA_DIR`` or the user cache.
      download: False never touches the network; a missing file then raises
        with the path to place it at.
      progress: progress bars for downloads and conversion.
      strict: client and example counts that differ from the published ones
        raise (True) or warn (False).
      vocab_size: most frequent words in the vocabulary (10,000).
      sequence_length: next-word rows ``L`` (20).
      tag_vocab_size: most frequent tags predicted (500).
      max_words: tag prediction's word slots per example (64).
      max_tags: tag prediction's tag slots per example (5).
      checkpoint_every: clients between resumable checkpoints.
      tokenizer: None for TFF's word ids; the path of a local Hugging Face
        ``tokenizer.json`` (or a folder holding one, or a
        ``tokenizers.Tokenizer``) tokenizes each sentence into a row of
        ``sequence_length`` tokens, for fine-tuning a pretrained language
        model. Next-word prediction only; ``vocab_size`` then does not apply.
      eos_token: the end-of-text token of ``tokenizer``, before and after
        each sentence.

    Returns:
      FederatedDataset ``stackoverflow_nwp`` (``x``, ``y`` uint16[N, L],
      ``vocab_size + 4`` classes, :func:`nwp_task`; tokenized: the
      tokenizer's vocabulary size as classes, ids uint16 where they fit,
      :func:`fedjaxsim.data.text.next_token_task`) or ``stackoverflow_tp``
      (``x`` uint16[N, max_words], ``y`` uint16[N, max_tags],
      ``tag_vocab_size`` classes, :func:`tp_task`).

    Raises:
      ValueError: a bad argument, a tokenizer for tag prediction, a tokenizer
        file that is not a tokenizer.json or lacks ``eos_token``, or files
        that fail the checks (naming them).
      FileNotFoundError: a missing tokenizer file.
      DatasetUnavailableError: files neither cached nor downloadable.
    """
    from fedjaxsim.data.store import (
        read_dataset,
        read_federated_data,
        replace_folder,
        write_dataset_description,
    )

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {eval_split!r}")
    if test_examples is not None:
        _check_int("test_examples", test_examples, 1)
    _check_int("seed", seed, 0, 2**32 - 1)
    if tokenizer is not None:
        if task != "stackoverflow_nwp":
            raise ValueError(_TOKENIZER_TASK_MESSAGE.format(task=task))
        if vocab_size != DEFAULT_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} sizes TFF's word vocabulary; with a tokenizer the "
                "vocabulary is the tokenizer's: leave vocab_size at its default"
            )
        _check_int("sequence_length", sequence_length, 1)
        # Loaded (and its end-of-text token checked) before any file is fetched.
        tokenizer = text.as_tokenizer(tokenizer)
        text.eos_id(tokenizer, eos_token)
        params = {"sequence_length": sequence_length}
        stored_params = tokenized_params(
            text.tokenizer_digest(tokenizer), eos_token, sequence_length
        )
    elif task == "stackoverflow_nwp":
        _check_int("vocab_size", vocab_size, 1, _UINT16_IDS - 4)
        _check_int("sequence_length", sequence_length, 1)
        params = {"vocab_size": vocab_size, "sequence_length": sequence_length}
    else:
        _check_int("vocab_size", vocab_size, 1, _UINT16_IDS - 2)
        _check_int("tag_vocab_size", tag_vocab_size, 1, _UINT16_IDS - 1)
        _check_int("max_words", max_words, 1)
        _check_int("max_tags", max_tags, 1)
        params = {
            "vocab_size": vocab_size,
            "tag_vocab_size": tag_vocab_size,
            "max_words": max_words,
            "max_tags": max_tags,
        }
    if tokenizer is None:
        stored_params = {"task": task, **params}
    directory = downloads.resolve_data_dir(data_dir)
    store = directory / store_name(task, tokenizer=tokenizer, **params)
    options = {"strict": strict, "progress": progress, "checkpoint_every": checkpoint_every}
    text_options = {"tokenizer": tokenizer, "eos_token": eos_token}
    if not (store / "dataset.json").is_file():
        preprocessing = _preprocessing(task, directory, params, download, progress, **text_options)
        files = _fetch_extracted(
            ARCHIVE, [tff_filename(s) for s in ("train", "test")], directory, download, progress
        )
        # Both splits are built in a fixed sibling folder, so that a rerun
        # finds (and resumes) them, and renamed into place together.
        building = store.parent / f".{store.name}.building"
        building.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            _convert_split(
                split, files[tff_filename(split)], building / split, preprocessing, **options
            )
        write_dataset_description(
            building,
            preprocessing.name,
            preprocessing.num_classes,
            preprocessing.input_shape,
            preprocessing.task,
        )
        replace_folder(building, store, overwrite=True)
    dataset = read_dataset(store)
    _check_stored_params(store, stored_params)
    evaluation = dataset.test
    if eval_split == "held_out":
        held_out = store / "held_out"
        if not (held_out / "manifest.json").is_file():
            preprocessing = _preprocessing(
                task, directory, params, download, progress, **text_options
            )
            name = tff_filename("held_out")
            path = _fetch_extracted(ARCHIVE, [name], directory, download, progress)[name]
            _convert_split("held_out", path, held_out, preprocessing, **options)
        evaluation = read_federated_data(held_out)
    if test_examples is not None:
        evaluation = sample_eval_examples(evaluation, test_examples, seed)
    return dataclasses.replace(dataset, test=evaluation)
