"""Federated instruction tuning data from a JSONL file.

Each line of the file is one JSON object, an instruction record in the
Alpaca style (Taori et al. 2023, "Stanford Alpaca")::

    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "user": "u7"}

The field names are options (``instruction_field``, ``input_field``,
``response_field``). The input is optional: a record without it (missing,
``null`` or ``""``) uses the template without an input. Clients come from one
of two splits:

* ``user_field``: every distinct value of that field is a client (natural
  clients, ordered by value);
* ``category_field`` with ``num_clients`` and ``alpha``: the records are
  split by Dirichlet(``alpha``) label skew over the category
  (:func:`fedjaxsim.data.partition.dirichlet_label_partition`), seeded.

Each record is one example, one row of ``sequence_length`` tokens
(:func:`fedjaxsim.data.text.pad_examples`): the prompt (the template filled
with the instruction and input), then the response and the end-of-text
token. By default the loss is on the response only: the prompt's targets
hold ``pad_id`` (the tokenizer's vocabulary size), the response's tokens and
the end-of-text token are real targets. ``train_on_prompt=True`` counts the
prompt too. A record longer than the row is truncated, and the truncations
are counted in one :class:`TruncatedExamplesWarning`; a record whose prompt
alone fills the row has no target left and is dropped (counted in the same
warning), and a client left without examples is dropped with a
:class:`~fedjaxsim.data.validation.DroppedClientsWarning`.

Held-out evaluation is either a separate ``test_path`` JSONL (split the same
way) or a seeded ``test_fraction`` of each client's records. Everything is a
pure function of the files, the options and ``seed``.

The prompt and the response are tokenized separately and joined, so the
mask falls exactly on the boundary (tokenizing the joined text and counting
the prompt's tokens, as Alpaca's ``train.py`` does, is off by one where a
merge spans the boundary). A tokenizer that marks the start of every text it
encodes (SentencePiece's ``Metaspace`` with a prefix space, RoBERTa's
``add_prefix_space``) therefore also marks the response's start; Alpaca's
templates end in a newline, after which GPT-2-style byte-level tokenizers
need no such mark.

The default templates are Stanford Alpaca's (``PROMPT_DICT`` in its
``train.py``): :data:`ALPACA_PROMPT` with an input and
:data:`ALPACA_PROMPT_NO_INPUT` without one. A template is a ``str.format``
string with the placeholders ``{instruction}`` and ``{input}``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import string
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedjaxsim.data import text
from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.data.partition import dirichlet_label_partition, natural_id_partition
from fedjaxsim.data.validation import DroppedClientsWarning

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
DEFAULT_SEQUENCE_LENGTH = 512
DEFAULT_TEST_FRACTION = 0.1
PLACEHOLDERS = ("instruction", "input")
# Seed streams: the test file's partition and the held-out draw never reuse
# the train partition's numbers.
_TEST_PARTITION_STREAM = 1
_HELD_OUT_STREAM = 2


class TruncatedExamplesWarning(UserWarning):
    """Some examples were longer than ``sequence_length`` and lost their end."""


@dataclasses.dataclass(frozen=True)
class InstructionRecord:
    """One line of the file, its fields checked."""

    line: int  # 1-based line number in the file
    instruction: str
    input: str  # "" when the record has none
    response: str
    group: str | None  # the user or category value; None without a split field


@dataclasses.dataclass(frozen=True)
class InstructionFields:
    """Which JSON keys hold what (Alpaca's names by default)."""

    instruction: str = "instruction"
    input: str = "input"
    response: str = "output"


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL file with their 1-based line numbers.

    Blank lines are skipped (a trailing newline is common).

    Raises:
      FileNotFoundError: naming the path.
      ValueError: a line that is not a JSON object (naming the file and
        line), or a file without records.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as error:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({error}); a JSONL file holds one JSON "
                    "object per line"
                ) from error
            if not isinstance(value, dict):
                raise ValueError(
                    f"{path}:{number}: expected a JSON object, got {type(value).__name__}"
                )
            records.append((number, value))
    if not records:
        raise ValueError(f"{path} is empty: it holds no JSON records")
    return records


def _field(path: Path, line: int, record: dict, key: str, role: str, option: str) -> object:
    if key not in record:
        present = ", ".join(repr(k) for k in record) or "none"
        raise ValueError(
            f"{path}:{line}: the record has no {role} field {key!r} (fields present: {present}); "
            f"set {option}= to the name the file uses"
        )
    return record[key]


def _text(path: Path, line: int, key: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{path}:{line}: field {key!r} must be a string, got {type(value).__name__} "
            f"{value!r:.60}"
        )
    return value


def _group(path: Path, line: int, key: str, value) -> str:
    # Ids are often numbers in JSON; anything else (a list, an object, null)
    # has no obvious client.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(
            f"{path}:{line}: field {key!r} must be a string or an integer to split by, got "
            f"{type(value).__name__} {value!r:.60}"
        )
    return str(value)


def read_instructions(
    path: str | Path,
    fields: InstructionFields = InstructionFields(),
    group_field: str | None = None,
    group_option: str = "user_field",
) -> list[InstructionRecord]:
    """The records of a JSONL instruction file, every field checked.

    Args:
      path: the JSONL file.
      fields: the instruction, input and response keys.
      group_field: the key clients are split by (a user or category), or None.
      group_option: the option naming ``group_field``, quoted in errors.

    Raises:
      FileNotFoundError, ValueError: naming the file, the line and the field.
    """
    path = Path(path).expanduser()
    records = []
    for line, record in read_jsonl(path):
        instruction = _text(
            path,
            line,
            fields.instruction,
            _field(path, line, record, fields.instruction, "instruction", "instruction_field"),
        )
        response = _text(
            path,
            line,
            fields.response,
            _field(path, line, record, fields.response, "response", "response_field"),
        )
        extra = record.get(fields.input)
        extra = "" if extra is None else _text(path, line, fields.input, extra)
        group = None
        if group_field is not None:
            value = _field(path, line, record, group_field, "split", group_option)
            group = _group(path, line, group_field, value)
        records.append(InstructionRecord(line, instruction, extra, response, group))
    return records


def check_template(template: str, name: str = "prompt_template") -> str:
    """Checks a prompt template's placeholders; returns it.

    Raises:
      ValueError: a placeholder other than ``{instruction}`` and ``{input}``,
        or a malformed format string.
    """
    if not isinstance(template, str):
        raise ValueError(f"{name} must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(
            f"{name} is not a valid format string ({error}); write a literal brace as {{{{ or }}}}"
        ) from error
    unknown = sorted({f for _, f, _, _ in parsed if f is not None and f not in PLACEHOLDERS})
    if unknown:
        raise ValueError(
            f"{name} has placeholders {unknown}; only {{instruction}} and {{input}} are filled "
            "(write a literal brace as {{ or }})"
        )
    return template


def format_prompt(
    record: InstructionRecord,
    prompt_template: str = ALPACA_PROMPT,
    prompt_template_no_input: str = ALPACA_PROMPT_NO_INPUT,
) -> str:
    """The record's prompt: the template with an input if it has one, else the other."""
    template = prompt_template if record.input else prompt_template_no_input
    return template.format(instruction=record.instruction, input=record.input)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _split(
    records: Sequence[InstructionRecord],
    *,
    by_user: bool,
    num_clients: int | None,
    alpha: float,
    seed,
    path: Path,
) -> tuple[list[np.ndarray], list[str]]:
    """Each client's record indices (file order) and names."""
    groups = np.array([r.group for r in records], dtype=object)
    if by_user:
        return natural_id_partition(groups.astype(str))
    if num_clients > len(records):
        raise ValueError(
            f"num_clients={num_clients} is larger than the {len(records)} records of {path}: "
            "every client needs a record; lower num_clients"
        )
    _, labels = np.unique(groups.astype(str), return_inverse=True)
    assignment = dirichlet_label_partition(labels, num_clients, alpha, seed)
    width = len(str(num_clients - 1))
    return assignment, [f"{i:0{width}d}" for i in range(num_clients)]


def held_out_split(
    assignment: Sequence[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A seeded ``fraction`` of each client's indices held out for test.

    A client of ``n`` records holds out ``floor(fraction * n + 0.5)`` of them,
    at most ``n - 1``, so it keeps a record to train on.

    Returns:
      ``(train, test)``: per client, sorted index arrays; a test array may be empty.
    """
    rng = np.random.default_rng([seed, _HELD_OUT_STREAM])
    train, test = [], []
    for indices in assignment:
        count = min(int(np.floor(fraction * len(indices) + 0.5)), len(indices) - 1)
        shuffled = rng.permutation(np.asarray(indices, np.int64))
        test.append(np.sort(shuffled[:count]))
        train.append(np.sort(shuffled[count:]))
    return train, test


@dataclasses.dataclass
class _Counts:
    """What tokenization cut or dropped, for one warning per split."""

    examples: int = 0
    truncated: int = 0
    no_target: int = 0
    empty_clients: list[str] = dataclasses.field(default_factory=list)
    clients: int = 0


def _tokenized_clients(
    records: Sequence[InstructionRecord],
    assignment: Sequence[np.ndarray],
    names: Sequence[str],
    tokenizer,
    *,
    sequence_length: int,
    eos_token: str,
    prompt_template: str,
    prompt_template_no_input: str,
    train_on_prompt: bool,
) -> tuple[list[dict[str, np.ndarray]], list[str], _Counts]:
    end = text.eos_id(tokenizer, eos_token)
    pad_id = text.vocab_size(tokenizer)
    prompts = text.encode_texts(
        tokenizer, [format_prompt(r, prompt_template, prompt_template_no_input) for r in records]
    )
    responses = [ids + [end] for ids in text.encode_texts(tokenizer, [r.response for r in records])]
    counts = _Counts(clients=len(names))
    clients, kept_names = [], []
    for indices, name in zip(assignment, names):
        fields, truncated = text.pad_examples(
            [prompts[i] for i in indices],
            [responses[i] for i in indices],
            sequence_length,
            pad_id,
            end,
            train_on_prompt=train_on_prompt,
        )
        has_target = np.any(fields["y"] != pad_id, axis=1)
        counts.examples += len(indices)
        counts.truncated += int(truncated.sum())
        counts.no_target += int((~has_target).sum())
        if not has_target.any():
            counts.empty_clients.append(name)
            continue
        clients.append({key: value[has_target] for key, value in fields.items()})
        kept_names.append(name)
    return clients, kept_names, counts


def _warn(source: str, split: str, counts: _Counts, sequence_length: int) -> None:
    if counts.truncated:
        lost = (
            f"; {counts.no_target} of them kept no response token and were dropped"
            if counts.no_target
            else ""
        )
        warnings.warn(
            f"{source} ({split}): {counts.truncated} of {counts.examples} examples are longer "
            f"than sequence_length={sequence_length} tokens and were truncated{lost}. Raise "
            "sequence_length to keep them whole",
            TruncatedExamplesWarning,
            stacklevel=3,
        )
    if counts.empty_clients:
        first = counts.empty_clients[0]
        warnings.warn(
            f"{source} ({split}): dropped {len(counts.empty_clients)} of {counts.clients} "
            f"clients left without examples (first {first!r})",
            DroppedClientsWarning,
            stacklevel=3,
        )


def _build_split(records, assignment, names, tokenizer, source, split, options) -> FederatedData:
    clients, kept, counts = _tokenized_clients(records, assignment, names, tokenizer, **options)
    _warn(source, split, counts, options["sequence_length"])
    if not clients:
        raise ValueError(
            f"{source} ({split}): no client has an example with a response token left; raise "
            f"sequence_length (now {options['sequence_length']}) or shorten the prompt template"
        )
    return FederatedData.from_clients(clients, kept)


@functools.lru_cache(maxsize=16)
def _count_users(path: str, user_field: str, mtime_ns: int, size: int) -> int:
    del mtime_ns, size  # cache keys: a changed file is counted again
    groups = collections.Counter()
    file = Path(path)
    for line, record in read_jsonl(file):
        value = _field(file, line, record, user_field, "split", "user_field")
        groups[_group(file, line, user_field, value)] += 1
    return len(groups)


def count_users(path: str | Path, user_field: str) -> int:
    """The clients a ``user_field`` split gives: distinct values of that field.

    Reads only the JSON (no tokenizer), cached per file version, so that a
    runner can check a cohort size before loading the data.

    Raises:
      FileNotFoundError, ValueError: as :func:`read_jsonl`, or a record without the field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {path} does not exist")
    stat = path.stat()
    return _count_users(str(path.resolve()), user_field, stat.st_mtime_ns, stat.st_size)


def load_instructions(
    path: str | Path,
    *,
    tokenizer,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    user_field: str | None = None,
    category_field: str | None = None,
    num_clients: int | None = None,
    alpha: float = 0.5,
    test_path: str | Path | None = None,
    test_fraction: float | None = None,
    instruction_field: str = "instruction",
    input_field: str = "input",
    response_field: str = "output",
    prompt_template: str = ALPACA_PROMPT,
    prompt_template_no_input: str = ALPACA_PROMPT_NO_INPUT,
    train_on_prompt: bool = False,
    eos_token: str = text.DEFAULT_EOS_TOKEN,
    seed: int = 0,
) -> FederatedDataset:
    """A federated instruction-tuning dataset from a JSONL file (module docstring).

    Args:
      path: the train JSONL file, one JSON object per line.
      tokenizer: the path of a local Hugging Face ``tokenizer.json`` (or a
        folder holding one), or a ``tokenizers.Tokenizer``.
      sequence_length: tokens per example row; longer examples are truncated.
      user_field: split by this field, each distinct value a client.
      category_field: split by Dirichlet(``alpha``) label skew over this
        field into ``num_clients`` clients. Give exactly one of the two.
      num_clients: clients of the ``category_field`` split.
      alpha: Dirichlet concentration (small: few categories per client).
      test_path: a separate JSONL of held-out records, split the same way
        (a ``category_field`` split into at most ``num_clients`` clients).
      test_fraction: without ``test_path``, the share of each client's
        records held out (seeded; default 0.1). Not with ``test_path``.
      instruction_field, input_field, response_field: the JSON keys; the
        input may be missing, null or empty.
      prompt_template, prompt_template_no_input: ``str.format`` templates
        with ``{instruction}`` and ``{input}`` (default Alpaca's).
      train_on_prompt: also train on the prompt's tokens (default: the
        response only).
      eos_token: the end-of-text token ending each response.
      seed: the Dirichlet split and the held-out draw.

    Returns:
      FederatedDataset ``"instructions"``: ``x``, ``y`` int32[N, sequence_length],
      the tokenizer's vocabulary size as classes, task
      :func:`fedjaxsim.data.text.next_token_task`.

    Raises:
      FileNotFoundError: a missing data or tokenizer file.
      ValueError: bad options, or bad records, naming the file, line and field.
    """
    sequence_length = _check_count("sequence_length", sequence_length, 1)
    if (user_field is None) == (category_field is None):
        raise ValueError(
            "give exactly one of user_field (each distinct value a client) and category_field "
            f"(Dirichlet split over it), got user_field={user_field!r}, "
            f"category_field={category_field!r}"
        )
    by_user = user_field is not None
    if by_user and num_clients is not None:
        raise ValueError(
            f"num_clients={num_clients} applies to the category_field split; with "
            f"user_field={user_field!r} every user is a client. Leave num_clients unset"
        )
    if not by_user:
        if num_clients is None:
            raise ValueError(f"category_field={category_field!r} needs num_clients")
        num_clients = _check_count("num_clients", num_clients, 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if test_path is not None and test_fraction is not None:
        raise ValueError(
            f"give test_path ({test_path}) or test_fraction ({test_fraction}), not both"
        )
    if test_path is None:
        test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        if isinstance(test_fraction, bool) or not (
            isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1
        ):
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    for name, template in (
        ("prompt_template", prompt_template),
        ("prompt_template_no_input", prompt_template_no_input),
    ):
        check_template(template, name)
    seed = _check_count("seed", seed, 0)
    tokenizer = text.as_tokenizer(tokenizer)
    text.eos_id(tokenizer, eos_token)  # fails before the data is read

    fields = InstructionFields(instruction_field, input_field, response_field)
    group_field = user_field if by_user else category_field
    option = "user_field" if by_user else "category_field"
    path = Path(path).expanduser()
    records = read_instructions(path, fields, group_field, option)
    assignment, names = _split(
        records, by_user=by_user, num_clients=num_clients, alpha=alpha, seed=seed, path=path
    )
    options = dict(
        sequence_length=sequence_length,
        eos_token=eos_token,
        prompt_template=prompt_template,
        prompt_template_no_input=prompt_template_no_input,
        train_on_prompt=train_on_prompt,
    )
    if test_path is None:
        train_indices, test_indices = held_out_split(assignment, test_fraction, seed)
        held = [(t, n) for t, n in zip(test_indices, names) if len(t)]
        if not held:
            raise ValueError(
                f"test_fraction={test_fraction} holds out no record of {path}'s "
                f"{len(records)} records in {len(names)} clients (a client keeps at least one "
                "record to train on); raise test_fraction or pass test_path"
            )
        train = _build_split(records, train_indices, names, tokenizer, str(path), "train", options)
        test = _build_split(
            records,
            [t for t, _ in held],
            [n for _, n in held],
            tokenizer,
            str(path),
            "held-out test",
            options,
        )
    else:
        train = _build_split(records, assignment, names, tokenizer, str(path), "train", options)
        test_path = Path(test_path).expanduser()
        test_records = read_instructions(test_path, fields, group_field, option)
        test_assignment, test_names = _split(
            test_records,
            by_user=by_user,
            num_clients=None if by_user else min(num_clients, len(test_records)),
            alpha=alpha,
            seed=[seed, _TEST_PARTITION_STREAM],
            path=test_path,
        )
        test = _build_split(
            test_records, test_assignment, test_names, tokenizer, str(test_path), "test", options
        )
    return FederatedDataset(
        "instructions",
        train,
        test,
        text.vocab_size(tokenizer),
        (sequence_length,),
        text.next_token_task(tokenizer),
    )
