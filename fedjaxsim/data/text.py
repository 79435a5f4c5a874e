"""Tokenized text for fine-tuning pretrained language models.

Tokenization uses Hugging Face ``tokenizers`` reading a local
``tokenizer.json`` (:func:`load_tokenizer`); nothing is ever downloaded.
Tokenized data is a ``next_token`` task (:mod:`fedjaxsim.core.tasks`):

* ``x`` int32[n, sequence_length]: input ids;
* ``y`` int32[n, sequence_length]: the targets, ``x`` shifted by one.

A target that must not count (padding, and the prompt of instruction data
trained on responses only) holds ``pad_id`` = the tokenizer's vocabulary size
(:func:`vocab_size`, added tokens included). That id is outside the
vocabulary, so a real token is never mistaken for padding and the
end-of-text token stays a real target the model learns to emit. Inputs are
padded with the end-of-text id (:func:`input_pad_id`): a causal model never
attends forward, and the targets of padded inputs carry no loss, so any
in-vocabulary id works and the end-of-text one needs no extra embedding row.

Documents end with the end-of-text token (GPT-2's ``"<|endoftext|>"`` by
default, :data:`DEFAULT_EOS_TOKEN`).

Two layouts:

* :func:`pack_documents`: a client's documents joined into one stream and
  cut into rows (language-model fine-tuning on plain text, e.g. a
  Shakespeare role's lines), no padding but in the last row;
* :func:`pad_examples`: one example per row (instruction tuning), truncated
  to the row and padded, with the prompt's targets masked.

The functions on token ids are pure NumPy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedjaxsim.core.tasks import Task
from fedjaxsim.data.validation import InvalidClient

if TYPE_CHECKING:  # the optional dependency is imported lazily
    from tokenizers import Tokenizer

DEFAULT_EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
INSTALL_HINT = 'pip install -e ".[llm]"'


def _tokenizers():
    try:
        import tokenizers
    except ImportError as error:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "tokenized text needs the Hugging Face `tokenizers` package: install the llm "
            f"extra ({INSTALL_HINT}, or pip install 'fedjaxsim[llm]')"
        ) from error
    return tokenizers


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a local Hugging Face ``tokenizer.json``.

    Args:
      path: the ``tokenizer.json`` file, or a folder holding one (a model
        folder saved by ``transformers``' ``save_pretrained``).

    Returns:
      The ``tokenizers.Tokenizer``.

    Raises:
      FileNotFoundError: no such file (nothing is downloaded).
      ValueError: a file that is not a tokenizer.json.
      ImportError: ``tokenizers`` is not installed, naming the extra.
    """
    path = Path(path).expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer file {file} does not exist: a Hugging Face tokenizer.json is expected "
            "(the file, or a model folder holding it). Nothing is downloaded: save one with "
            "tokenizer.save(path) or transformers' save_pretrained, and pass its path"
        )
    tokenizers = _tokenizers()
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception from Rust
        raise ValueError(
            f"{file} is not a valid Hugging Face tokenizer.json ({error}); it may be truncated, "
            "or be another file (a vocab.json or merges.txt alone is not enough)"
        ) from error


def as_tokenizer(tokenizer: str | Path | Tokenizer) -> Tokenizer:
    """``tokenizer`` itself, or the tokenizer loaded from a path (:func:`load_tokenizer`)."""
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    return tokenizer


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """Hex SHA-256 of the tokenizer's JSON, which names cached stores.

    ``Tokenizer.to_str`` writes the vocabulary in id order, so the digest is
    the same in every process and for every copy of the file.
    """
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def vocab_size(tokenizer: Tokenizer) -> int:
    """Ids in use, added tokens included: the model's output classes and the ``pad_id``.

    ``get_vocab_size(with_added_tokens=True)``, or one past the largest id if
    the ids have holes, so that ``pad_id`` is never a real token's id.
    """
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return max(int(tokenizer.get_vocab_size(with_added_tokens=True)), max(ids, default=-1) + 1)


def next_token_task(tokenizer: Tokenizer) -> Task:
    """The task of data tokenized with ``tokenizer``: next token, padding = vocabulary size.

    Every real id counts in accuracy, end-of-text included (the model must
    learn where a response ends).
    """
    return Task(kind="next_token", pad_id=vocab_size(tokenizer))


def eos_id(tokenizer: Tokenizer, eos_token: str = DEFAULT_EOS_TOKEN) -> int:
    """The id of the end-of-text token.

    Raises:
      ValueError: the tokenizer has no such token, naming its special tokens.
    """
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
        added = [token.content for token in tokenizer.get_added_tokens_decoder().values()]
        raise ValueError(
            f"the tokenizer has no end-of-text token {eos_token!r}; its added tokens are "
            f"{added[:10]}. Pass eos_token= (data.eos_token) with the one it uses, e.g. '</s>'"
        )
    return int(token_id)


def input_pad_id(tokenizer: Tokenizer, eos_token: str = DEFAULT_EOS_TOKEN) -> int:
    """The id padding inputs: the end-of-text token's, or 0 if the tokenizer has none."""
    token_id = tokenizer.token_to_id(eos_token)
    return 0 if token_id is None else int(token_id)


def decode_utf8(values: Sequence[bytes], what: str) -> list[str]:
    """Each of a client's byte strings as text, for a tokenizer to read.

    Raises:
      InvalidClient: naming the first ``what`` (e.g. ``"snippet"``) that is not
        UTF-8.
    """
    texts = []
    for index, value in enumerate(values):
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidClient(
                "bad text",
                f"has {what} {index} that is not UTF-8 ({error}); a tokenizer reads text",
            ) from error
    return texts


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's own special tokens.

    Text that spells a special token (``"<|endoftext|>"`` inside a document)
    is tokenized as ordinary characters where ``tokenizers`` supports it
    (0.19 and later), as tiktoken refuses special tokens in data by default:
    a document must never be cut, or a prompt ended, by its own content. The
    tokenizer's post-processor (a BOS some tokenizers add) is not applied;
    the layouts here add the end-of-text token themselves.
    """
    if not texts:
        return []
    has_switch = hasattr(tokenizer, "encode_special_tokens")
    previous = tokenizer.encode_special_tokens if has_switch else None
    if has_switch:
        tokenizer.encode_special_tokens = True
    try:
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    finally:
        if has_switch:
            tokenizer.encode_special_tokens = previous
    return [encoding.ids for encoding in encodings]


def _check_ids(sequence_length: int, pad_id: int, input_pad_id: int) -> None:
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, (int, np.integer)):
        raise ValueError(f"sequence_length must be an integer, got {sequence_length!r}")
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be at least 1, got {sequence_length}")
    for name, value in (("pad_id", pad_id), ("input_pad_id", input_pad_id)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def pack_documents(
    token_lists: Sequence[Sequence[int]],
    sequence_length: int,
    pad_id: int,
    input_pad_id: int,
    *,
    start_id: int | None = None,
) -> dict[str, np.ndarray]:
    """One client's documents as one stream cut into rows of ``sequence_length``.

    The documents (each already ending in the end-of-text token) are joined
    into one stream ``s``; ``x`` is ``s`` without its last token and ``y``
    without its first, cut into rows, the last row padded (``x`` with
    ``input_pad_id``, ``y`` with ``pad_id``). A document may span two rows:
    packing wastes no compute on padding, and the model sees the previous
    row's text only through the targets, as in Hugging Face's ``run_clm``.
    For the documents ``[a, b, EOS]`` and ``[c, EOS]``, ``start_id=EOS`` and
    ``sequence_length`` 4::

        s: [EOS, a, b, EOS, c, EOS]
        x: [[EOS, a, b, EOS], [c,   PAD_IN, PAD_IN, PAD_IN]]
        y: [[a, b, EOS, c],   [EOS, PAD,    PAD,    PAD]]

    Args:
      token_lists: the documents' token ids, each ending in end-of-text.
      sequence_length: tokens per row.
      pad_id: the target id of padding (the vocabulary size).
      input_pad_id: the input id of padding (the end-of-text id).
      start_id: a token put before the first document (the end-of-text id,
        GPT-2's document separator), so that the first document's first token
        is a target too; None starts with the first document.

    Returns:
      ``{"x", "y"}``: int32[rows, sequence_length]; no rows when the stream
      has fewer than two tokens.
    """
    _check_ids(sequence_length, pad_id, input_pad_id)
    pieces = [np.asarray(tokens, np.int64).reshape(-1) for tokens in token_lists]
    if start_id is not None:
        pieces.insert(0, np.array([start_id], np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    num_targets = max(len(stream) - 1, 0)
    rows = -(-num_targets // sequence_length)  # ceiling division
    x = np.full(rows * sequence_length, input_pad_id, np.int32)
    y = np.full(rows * sequence_length, pad_id, np.int32)
    x[:num_targets] = stream[:-1][:num_targets]
    y[:num_targets] = stream[1:]
    return {"x": x.reshape(rows, sequence_length), "y": y.reshape(rows, sequence_length)}


def pad_examples(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    sequence_length: int,
    pad_id: int,
    input_pad_id: int,
    *,
    train_on_prompt: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Prompt-response examples, one per row, with the prompt's targets masked.

    Example ``i`` is the sequence ``s = prompts[i] + responses[i]`` (the
    response ending in end-of-text); ``x = s[:-1]`` and ``y = s[1:]``, cut to
    ``sequence_length`` and padded as in :func:`pack_documents`. A target
    that is a prompt token holds ``pad_id`` unless ``train_on_prompt``, so
    the loss is on the response only: the first response token (predicted
    from the prompt's last token) and every later one, end-of-text included.
    For prompt ``[p, q]``, response ``[r, EOS]`` and ``sequence_length`` 4::

        x: [p, q, r, PAD_IN]
        y: [PAD, r, EOS, PAD]      # train_on_prompt: [q, r, EOS, PAD]

    Args:
      prompts: each example's prompt token ids.
      responses: each example's response token ids (ending in end-of-text).
      sequence_length: tokens per row; longer examples lose their end.
      pad_id: the target id of padding and masked prompt tokens.
      input_pad_id: the input id of padding.
      train_on_prompt: also count the prompt's tokens (but the first) as targets.

    Returns:
      ``({"x", "y"}, truncated)``: int32[n, sequence_length] each, and
      bool[n], the examples cut short. A truncated example whose prompt fills
      the row has no real target; callers drop (and count) those.
    """
    _check_ids(sequence_length, pad_id, input_pad_id)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    count = len(prompts)
    x = np.full((count, sequence_length), input_pad_id, np.int32)
    y = np.full((count, sequence_length), pad_id, np.int32)
    truncated = np.zeros(count, bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = np.concatenate(
            [np.asarray(prompt, np.int64).reshape(-1), np.asarray(response, np.int64).reshape(-1)]
        )
        targets = sequence[1:]
        # Position j predicts sequence[j + 1]: a prompt token while j + 1 < len(prompt).
        counted = np.arange(1, len(sequence)) >= (0 if train_on_prompt else len(prompt))
        length = min(len(targets), sequence_length)
        truncated[row] = len(targets) > sequence_length
        x[row, :length] = sequence[:length]
        y[row, :length] = np.where(counted[:length], targets[:length], pad_id)
    return {"x": x, "y": y}, truncated


def real_targets(y: np.ndarray, pad_id: int) -> np.ndarray:
    """The targets that count, in row order: ``y`` without ``pad_id`` entries."""
    y = np.asarray(y).reshape(-1)
    return y[y != pad_id]


def describe_tokenizer(tokenizer: Tokenizer, eos_token: str = DEFAULT_EOS_TOKEN) -> dict:
    """JSON facts about a tokenizer for a store's metadata."""
    return {
        "sha256": tokenizer_digest(tokenizer),
        "vocab_size": vocab_size(tokenizer),
        "eos_token": eos_token,
        "eos_id": eos_id(tokenizer, eos_token),
    }


def text_store_suffix(tokenizer: Tokenizer, sequence_length: int) -> str:
    """``tok{digest[:16]}_seq{L}``: the part of a store name that a tokenizer fixes."""
    return f"tok{tokenizer_digest(tokenizer)[:16]}_seq{sequence_length}"
