"""JSONL instruction data: prompt masks, user and Dirichlet splits, held-out data, bad input,
and the runner's ``instructions`` dataset."""

import json
import warnings

import numpy as np
import pytest

from fedjaxsim.data import load_dataset, text
from fedjaxsim.data.instructions import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    InstructionRecord,
    TruncatedExamplesWarning,
    count_users,
    format_prompt,
    load_instructions,
)
from fedjaxsim.data.partition import dirichlet_label_partition
from fedjaxsim.data.validation import DroppedClientsWarning
from fedjaxsim.runner.config import (
    ConfigError,
    config_from_dict,
    load_config,
    parse_run_arguments,
    validate,
)
from fedjaxsim.runner.data_configs import InstructionData, ShakespeareData
from tests.data.benchmark_files import EOS_TOKEN

CATEGORIES = ("poetry", "math", "code")


def make_records(count, users=(5, 1, 3, 2), seed=0):
    """Records with distinct responses; inputs empty, missing, null or text."""
    rng = np.random.default_rng(seed)
    owners = np.repeat(np.arange(len(users)), users)
    owners = np.resize(owners, count)
    records = []
    for index in range(count):
        record = {
            "instruction": f"Say the number {index}.",
            "output": f"The number {index}, to be or not to be.",
            "user": f"user_{owners[index]}",
            "category": CATEGORIES[int(rng.integers(len(CATEGORIES)))],
        }
        kind = index % 4
        if kind == 1:
            record["input"] = f"O Romeo {index}"
        elif kind == 2:
            record["input"] = ""
        elif kind == 3:
            record["input"] = None
        records.append(record)
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _response_of(row_y, tokenizer):
    """The response a row trains on, from its real targets (which end in EOS)."""
    targets = text.real_targets(row_y, text.vocab_size(tokenizer)).tolist()
    decoded = tokenizer.decode(targets, skip_special_tokens=False)
    assert decoded.endswith(EOS_TOKEN)
    return decoded.removesuffix(EOS_TOKEN)


def _responses_by_client(data, tokenizer):
    return {
        name: [_response_of(row, tokenizer) for row in data.client(index)["y"]]
        for index, name in enumerate(data.client_names)
    }


def _record(entry):
    extra = entry.get("input") or ""
    return InstructionRecord(0, entry["instruction"], extra, entry["output"], None)


def test_the_alpaca_templates_by_hand():
    record = InstructionRecord(1, "Name a colour.", "", "Blue.", None)
    assert format_prompt(record) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    record = InstructionRecord(1, "Add them.", "2, 3", "5", None)
    assert format_prompt(record) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd them.\n\n### Input:\n2, 3\n\n### Response:\n"
    )
    assert format_prompt(record, "Q: {instruction} [{input}]\nA: ") == "Q: Add them. [2, 3]\nA: "


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_targets_are_masked_and_the_response_is_real(
    tmp_path, tokenizer, tokenizer_path, train_on_prompt
):
    records = make_records(4, users=(4,))
    path = write_jsonl(tmp_path / "train.jsonl", records)
    test = write_jsonl(tmp_path / "test.jsonl", records[:1])
    dataset = load_instructions(
        path,
        tokenizer=tokenizer_path,
        user_field="user",
        test_path=test,
        sequence_length=320,
        train_on_prompt=train_on_prompt,
    )
    pad_id, eos = text.vocab_size(tokenizer), text.eos_id(tokenizer)
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == (
        "instructions",
        pad_id,
        (320,),
    )
    assert dataset.task == text.next_token_task(tokenizer)
    client = dataset.train.client(0)
    assert client["x"].shape == (4, 320) and client["x"].dtype == np.int32
    for row, entry in enumerate(records):
        prompt_text = format_prompt(_record(entry))
        template = ALPACA_PROMPT if entry.get("input") else ALPACA_PROMPT_NO_INPUT
        assert prompt_text.startswith(template[:40])
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False).ids
        response = tokenizer.encode(entry["output"], add_special_tokens=False).ids + [eos]
        sequence = prompt + response
        x, y = client["x"][row], client["y"][row]
        np.testing.assert_array_equal(x[: len(sequence) - 1], sequence[:-1])
        assert np.all(x[len(sequence) - 1 :] == eos)  # inputs padded with end-of-text
        if train_on_prompt:
            np.testing.assert_array_equal(y[: len(sequence) - 1], sequence[1:])
        else:
            # Prompt tokens are no target; the first response token (predicted
            # from the last prompt token) and EOS are.
            assert np.all(y[: len(prompt) - 1] == pad_id)
            np.testing.assert_array_equal(y[len(prompt) - 1 : len(sequence) - 1], response)
            assert _response_of(y, tokenizer) == entry["output"]
        assert np.all(y[len(sequence) - 1 :] == pad_id)


def test_split_by_user_with_a_held_out_fraction(tmp_path, tokenizer_path, tokenizer):
    records = make_records(22, users=(6, 1, 9, 3, 3))
    path = write_jsonl(tmp_path / "train.jsonl", records)
    dataset = load_instructions(
        path, tokenizer=tokenizer_path, user_field="user", test_fraction=0.25, seed=3
    )
    users = sorted({r["user"] for r in records})
    assert list(dataset.train.client_names) == users
    train = _responses_by_client(dataset.train, tokenizer)
    test = _responses_by_client(dataset.test, tokenizer)
    everything = [r for responses in [*train.values(), *test.values()] for r in responses]
    assert sorted(everything) == sorted(r["output"] for r in records)  # each exactly once
    for user in users:
        own = [r["output"] for r in records if r["user"] == user]
        held = test.get(user, [])
        assert sorted(train[user] + held) == sorted(own)
        # floor(0.25 n + 0.5) held out, but every client keeps a record.
        assert len(held) == min(int(np.floor(0.25 * len(own) + 0.5)), len(own) - 1)
        # Rows keep the file's order.
        assert train[user] == [r for r in own if r in train[user]]
    assert "user_1" not in test  # a single record stays for training
    assert count_users(path, "user") == len(users)
    again = load_instructions(
        path, tokenizer=tokenizer_path, user_field="user", test_fraction=0.25, seed=3
    )
    np.testing.assert_array_equal(again.test.fields["y"], dataset.test.fields["y"])
    other = load_instructions(
        path, tokenizer=tokenizer_path, user_field="user", test_fraction=0.25, seed=4
    )
    assert _responses_by_client(other.test, tokenizer) != test


def test_split_by_dirichlet_over_a_category(tmp_path, tokenizer_path, tokenizer):
    records = make_records(60)
    path = write_jsonl(tmp_path / "train.jsonl", records)
    options = dict(
        tokenizer=tokenizer_path,
        category_field="category",
        num_clients=4,
        alpha=0.3,
        test_fraction=0.2,
        seed=5,
    )
    dataset = load_instructions(path, **options)
    _, labels = np.unique([r["category"] for r in records], return_inverse=True)
    expected = dirichlet_label_partition(labels, 4, 0.3, 5)
    assert list(dataset.train.client_names) == ["0", "1", "2", "3"]
    train = _responses_by_client(dataset.train, tokenizer)
    test = _responses_by_client(dataset.test, tokenizer)
    for index, name in enumerate(dataset.train.client_names):
        assert sorted(train[name] + test.get(name, [])) == sorted(
            records[i]["output"] for i in expected[index]
        )
    seen = [r for responses in [*train.values(), *test.values()] for r in responses]
    assert sorted(seen) == sorted(r["output"] for r in records)
    again = load_instructions(path, **options)
    for split in ("train", "test"):
        for field in ("x", "y"):
            np.testing.assert_array_equal(
                getattr(again, split).fields[field], getattr(dataset, split).fields[field]
            )
        np.testing.assert_array_equal(
            getattr(again, split).offsets, getattr(dataset, split).offsets
        )
    reseeded = load_instructions(path, **{**options, "seed": 6})
    assert not np.array_equal(reseeded.train.offsets, dataset.train.offsets)


def test_a_separate_test_file_is_split_the_same_way(tmp_path, tokenizer_path, tokenizer):
    records = make_records(12)
    held = [{**r, "user": f"tester_{i % 2}"} for i, r in enumerate(make_records(5, seed=1))]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    test_path = write_jsonl(tmp_path / "test.jsonl", held)
    dataset = load_instructions(path, tokenizer=tokenizer, user_field="user", test_path=test_path)
    assert dataset.train.total_examples == 12
    assert list(dataset.test.client_names) == ["tester_0", "tester_1"]
    assert sorted(_responses_by_client(dataset.test, tokenizer)["tester_1"]) == sorted(
        r["output"] for r in held[1::2]
    )
    by_category = load_instructions(
        path, tokenizer=tokenizer, category_field="category", num_clients=8, test_path=test_path
    )
    assert by_category.train.num_clients == 8 and by_category.test.num_clients == 5
    assert by_category.test.total_examples == 5
    through_registry = load_dataset(
        "instructions", path=path, tokenizer=tokenizer_path, user_field="user", test_path=test_path
    )
    np.testing.assert_array_equal(through_registry.train.fields["x"], dataset.train.fields["x"])


def test_custom_field_names_and_template(tmp_path, tokenizer):
    lines = [
        {"question": "Who?", "response": "Hamlet.", "speaker": 7},
        {"question": "Where?", "context": "Denmark", "response": "Elsinore.", "speaker": 8},
    ]
    path = write_jsonl(tmp_path / "custom.jsonl", lines)
    dataset = load_instructions(
        path,
        tokenizer=tokenizer,
        user_field="speaker",
        instruction_field="question",
        input_field="context",
        response_field="response",
        prompt_template="Q: {instruction} ({input})\nA: ",
        prompt_template_no_input="Q: {instruction}\nA: ",
        test_path=path,
        train_on_prompt=True,
    )
    assert list(dataset.train.client_names) == ["7", "8"]  # integer ids become strings
    eos = text.eos_id(tokenizer)
    pad_id = text.vocab_size(tokenizer)
    for index, expected in enumerate(["Q: Who?\nA: Hamlet.", "Q: Where? (Denmark)\nA: Elsinore."]):
        (x,), (y,) = dataset.train.client(index)["x"], dataset.train.client(index)["y"]
        targets = text.real_targets(y, pad_id).tolist()
        assert tokenizer.decode([int(x[0]), *targets], skip_special_tokens=False) == (
            expected + EOS_TOKEN
        )
        assert targets[-1] == eos


def test_long_examples_are_truncated_and_counted(tmp_path, tokenizer):
    records = [
        {"instruction": "Hi.", "output": "Short.", "user": "a"},
        {"instruction": "Hi.", "output": "To be, or not to be, " * 20, "user": "a"},
        {"instruction": "To be, or not to be, " * 20, "output": "Lost.", "user": "b"},
        {"instruction": "Hi.", "output": "Fine.", "user": "c"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_instructions(
            path,
            tokenizer=tokenizer,
            user_field="user",
            test_path=path,
            sequence_length=16,
            prompt_template_no_input="{instruction}\n",
        )
    messages = [(w.category, str(w.message)) for w in caught]
    train_messages = [m for c, m in messages if "(train)" in m]
    assert any(
        "2 of 4 examples are longer than sequence_length=16 tokens and were truncated; 1 of "
        "them kept no response token and were dropped" in m
        for m in train_messages
    )
    assert any(
        "(train): dropped 1 of 3 clients left without examples (first 'b')" in m
        for _, m in messages
    )
    assert {c for c, _ in messages} == {TruncatedExamplesWarning, DroppedClientsWarning}
    assert list(dataset.train.client_names) == ["a", "c"]
    prompt = tokenizer.encode("Hi.\n", add_special_tokens=False).ids
    long_row = dataset.train.client(0)["y"][1]
    assert np.all(long_row[: len(prompt) - 1] == text.vocab_size(tokenizer))
    assert np.all(long_row[len(prompt) - 1 :] != text.vocab_size(tokenizer))  # cut: all real
    assert text.eos_id(tokenizer) not in long_row.tolist()  # its end (and EOS) is gone


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path, content: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    return path


GOOD = json.dumps({"instruction": "a", "output": "b", "user": "u"}) + "\n"


@pytest.mark.parametrize(
    "content, fragment",
    [
        (GOOD + "\n" + "{'instruction': 1}\n", r"bad.jsonl:3: not valid JSON"),
        (GOOD + "[1, 2]\n", r"bad.jsonl:2: expected a JSON object, got list"),
        (
            GOOD + json.dumps({"instruction": "a", "response": "b", "user": "u"}) + "\n",
            r"bad.jsonl:2: the record has no response field 'output' \(fields present: "
            r"'instruction', 'response', 'user'\); set response_field=",
        ),
        (
            json.dumps({"output": "b", "user": "u"}) + "\n",
            r"bad.jsonl:1: the record has no instruction field 'instruction'",
        ),
        (
            json.dumps({"instruction": "a", "output": "b"}) + "\n",
            r"bad.jsonl:1: the record has no split field 'user'.*set user_field=",
        ),
        (
            json.dumps({"instruction": "a", "output": 3, "user": "u"}) + "\n",
            r"bad.jsonl:1: field 'output' must be a string, got int",
        ),
        (
            json.dumps({"instruction": "a", "input": ["x"], "output": "b", "user": "u"}) + "\n",
            r"bad.jsonl:1: field 'input' must be a string, got list",
        ),
        (
            json.dumps({"instruction": "a", "output": "b", "user": ["u"]}) + "\n",
            r"bad.jsonl:1: field 'user' must be a string or an integer",
        ),
        ("", r"bad.jsonl is empty: it holds no JSON records"),
        ("\n  \n", r"bad.jsonl is empty"),
    ],
)
def test_bad_records_name_the_file_line_and_field(tmp_path, tokenizer, content, fragment):
    path = _bad(tmp_path, content)
    with pytest.raises(ValueError, match=fragment):
        load_instructions(path, tokenizer=tokenizer, user_field="user")


@pytest.mark.parametrize(
    "options, error, fragment",
    [
        ({}, ValueError, "give exactly one of user_field"),
        ({"user_field": "user", "category_field": "category"}, ValueError, "exactly one"),
        ({"category_field": "category"}, ValueError, "category_field='category' needs num_clients"),
        (
            {"category_field": "category", "num_clients": 13},
            ValueError,
            r"num_clients=13 is larger than the 12 records of .*train.jsonl",
        ),
        ({"category_field": "category", "num_clients": 0}, ValueError, "num_clients must be"),
        (
            {"category_field": "category", "num_clients": 2, "alpha": 0},
            ValueError,
            "alpha must be a number > 0",
        ),
        ({"user_field": "user", "num_clients": 3}, ValueError, "Leave num_clients unset"),
        (
            {"user_field": "user", "test_fraction": 0.2, "test_path": "t.jsonl"},
            ValueError,
            "not both",
        ),
        ({"user_field": "user", "test_fraction": 1.0}, ValueError, r"test_fraction must lie"),
        ({"user_field": "user", "sequence_length": 0}, ValueError, "sequence_length must be"),
        (
            {"user_field": "user", "prompt_template": "{instruction} {context}"},
            ValueError,
            r"prompt_template has placeholders \['context'\]",
        ),
        (
            {"user_field": "user", "prompt_template_no_input": "{instruction"},
            ValueError,
            "prompt_template_no_input is not a valid format string",
        ),
        ({"user_field": "user", "eos_token": "</s>"}, ValueError, "no end-of-text token '</s>'"),
        (
            {"user_field": "user", "tokenizer": "nowhere/tokenizer.json"},
            FileNotFoundError,
            "nowhere/tokenizer.json does not exist: a Hugging Face tokenizer.json is expected",
        ),
        (
            {"user_field": "user", "test_path": "missing.jsonl"},
            FileNotFoundError,
            "instruction file .*missing.jsonl does not exist",
        ),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, tokenizer_path, options, error, fragment):
    path = write_jsonl(tmp_path / "train.jsonl", make_records(12))
    options = {"tokenizer": tokenizer_path, **options}
    if options.get("test_path") == "missing.jsonl":
        options["test_path"] = tmp_path / "missing.jsonl"
    with pytest.raises(error, match=fragment):
        load_instructions(path, **options)


def test_missing_file_and_nothing_to_hold_out(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="instruction file .*absent.jsonl does not exist"):
        load_instructions(tmp_path / "absent.jsonl", tokenizer=tokenizer, user_field="user")
    singles = write_jsonl(tmp_path / "singles.jsonl", make_records(3, users=(1, 1, 1)))
    with pytest.raises(ValueError, match="test_fraction=0.1 holds out no record.*test_path"):
        load_instructions(singles, tokenizer=tokenizer, user_field="user")


# ----------------------------------------------------------------------------- runner config


def test_the_runner_config_accepts_the_instruction_keys(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "train.jsonl", make_records(12))
    flags, _ = parse_run_arguments(
        [
            "--dataset",
            "instructions",
            "--data.path",
            str(path),
            "--data.tokenizer",
            str(tokenizer_path),
            "--data.user-field",
            "user",
            "--data.sequence-length",
            "64",
            "--data.train-on-prompt",
            "true",
            "--cohort-size",
            "2",
        ]
    )
    assert isinstance(flags.data, InstructionData)
    assert (flags.data.user_field, flags.data.sequence_length) == ("user", 64)
    assert flags.data.train_on_prompt is True and flags.data.population() == 4
    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        "data:\n"
        "  name: instructions\n"
        f"  path: {path}\n"
        f"  tokenizer: {tokenizer_path.parent}\n"
        "  category_field: category\n"
        "  num_clients: 3\n"
        "  alpha: 0.2\n"
        "  test_fraction: 0.3\n"
        "  response_field: output\n"
        '  prompt_template: "Q: {instruction} {input}\\nA: "\n'  # YAML reads \n in "..."
        '  prompt_template_no_input: "Q: {instruction}\\nA: "\n'
        "training: {cohort_size: 3}\n"
    )
    config = load_config(config_path)
    assert (config.data.category_field, config.data.num_clients) == ("category", 3)
    assert config.data.population() == 3
    assert config.data.prompt_template == "Q: {instruction} {input}\nA: "
    dataset = config.data.load(seed=1, progress=False)
    assert dataset.train.num_clients == 3 and dataset.test.total_examples > 0
    tokenizer = text.load_tokenizer(tokenizer_path)
    x = dataset.train.client(0)["x"][0].tolist()
    assert tokenizer.decode(x, skip_special_tokens=False).startswith("Q: Say the number")


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"user_field": "user", "category_field": "category"}, "data.user_field", "exactly one"),
        ({"category_field": "category"}, "data.num_clients", "needs num_clients"),
        ({"user_field": "user", "num_clients": 3}, "data.num_clients", "Leave it unset"),
        ({"user_field": "user", "test_fraction": 1.5}, "data.test_fraction", "< 1.0"),
        ({"user_field": "user", "tokenizer": "absent.json"}, "data.tokenizer", "nothing is down"),
        ({"user_field": "user", "path": "absent.jsonl"}, "data.path", "does not exist"),
        ({"user_field": "speaker"}, "data.path", "no split field 'speaker'"),
        ({"user_field": "user", "sequence_length": 0}, "data.sequence_length", ">= 1"),
        (
            {"user_field": "user", "prompt_template": "{instruction} {context}"},
            "data.prompt_template",
            "placeholders ['context']",
        ),
    ],
)
def test_bad_instruction_configs_name_the_key(tmp_path, tokenizer_path, data, key, fragment):
    path = write_jsonl(tmp_path / "train.jsonl", make_records(12))
    values = {"name": "instructions", "path": str(path), "tokenizer": str(tokenizer_path), **data}
    with pytest.raises(ConfigError) as error:
        validate(config_from_dict({"data": values, "training": {"cohort_size": 2}}))
    assert error.value.key == key
    assert fragment in str(error.value)


def test_the_cohort_is_checked_against_the_users(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "train.jsonl", make_records(12))
    data = {"name": "instructions", "path": str(path), "tokenizer": str(tokenizer_path)}
    with pytest.raises(ConfigError, match="larger than the 4 clients of instructions"):
        validate(config_from_dict({"data": {**data, "user_field": "user"}, "training": {}}))


def test_shakespeare_takes_a_tokenizer_key(tmp_path, tokenizer_path):
    config, _ = parse_run_arguments(
        ["--dataset", "shakespeare", "--data.tokenizer", str(tokenizer_path)]
    )
    assert config.data.tokenizer == str(tokenizer_path) and config.data.eos_token == EOS_TOKEN
    assert ShakespeareData().tokenizer is None
    with pytest.raises(ConfigError) as error:
        validate(config_from_dict({"data": {"name": "shakespeare", "tokenizer": "absent.json"}}))
    assert error.value.key == "data.tokenizer" and "tokenizer.json" in str(error.value)


def test_data_inspect_summarizes_instruction_data(tmp_path, tokenizer_path, capsys):
    from fedjaxsim.runner.cli import main

    path = write_jsonl(tmp_path / "train.jsonl", make_records(12))
    output = tmp_path / "instructions.png"
    arguments = [
        "data",
        "inspect",
        "--dataset",
        "instructions",
        "--data.path",
        str(path),
        "--data.tokenizer",
        str(tokenizer_path),
        "--data.user-field",
        "user",
        "--data.sequence-length",
        "384",
        "--cohort-size",
        "2",
    ]
    assert main([*arguments, "--output", str(output), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["clients"], summary["classes"], summary["input_shape"]) == (4, 320, [384])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
