"""Stack Overflow next-word and tag prediction against plain-Python references,
on tiny files written here in TFF's published layouts (h5py, text, JSON)."""

import json
import re
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedjaxsim.data import stackoverflow, text
from fedjaxsim.data.download import DatasetUnavailableError, RemoteFile, sha256_of
from fedjaxsim.data.emnist import SplitFacts
from fedjaxsim.data.formats import DataFormatError
from fedjaxsim.data.stackoverflow import (
    NextWordPreprocessing,
    TagPreprocessing,
    load_stackoverflow,
    nwp_special_ids,
    nwp_task,
    read_tag_counts,
    read_word_counts,
    sample_eval_examples,
    tag_vocabulary,
    word_vocabulary,
    write_stackoverflow_split,
)
from fedjaxsim.data.store import read_federated_data, read_manifest
from tests.data.benchmark_files import EOS_TOKEN, write_tiny_tokenizer

TINY_GPT2 = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_gpt2"

# Most frequent first; the last two fall outside a vocabulary of 8.
WORD_COUNTS = [
    ("the", 90),
    (".", 80),
    ("i", 70),
    ("to", 60),
    ("python", 50),
    ("error", 40),
    ("a", 30),
    ("<URL>", 20),
    ("it", 10),
    ("is", 5),
]
VOCAB_SIZE = 8
VOCAB = [word for word, _ in WORD_COUNTS[:VOCAB_SIZE]]
# Ties keep file order: java before c#.
TAG_COUNTS = {"python": 5, "java": 9, "c#": 9, "vb . net": 2, "git": 1, "sql": 3}
TAG_VOCAB_SIZE = 4
TAG_VOCAB = ["java", "c#", "python", "sql"]
SEQUENCE_LENGTH = 5
MAX_WORDS = 6
MAX_TAGS = 3
POOL = [word for word, _ in WORD_COUNTS] + ["oov-word", "numpy", "zzz"]
TAG_POOL = ["python", "java", "c#", "vb . net", "git", "sql", "rare-tag"]


def _sentence(rng):
    words = list(rng.choice(POOL, size=rng.integers(0, 9)))
    if words and rng.random() < 0.2:
        words[0] = words[0] + " "  # a double space: an empty word for split(sep=' ')
    return " ".join(words).encode()


def make_split(num_clients, seed, prefix):
    """{client_id: columns} in TFF's layout, ids deliberately out of order."""
    rng = np.random.default_rng(seed)
    clients = {}
    for index in range(num_clients):
        size = int(rng.integers(1, 7))
        tags = [
            "|".join(rng.choice(TAG_POOL, size=rng.integers(1, MAX_TAGS + 1), replace=False))
            for _ in range(size)
        ]
        tags[0] = "" if index == 1 else tags[0]  # an answer without tags
        clients[f"{prefix}{(37 * index) % 101:05d}"] = {
            "tokens": [_sentence(rng) for _ in range(size)],
            "title": [_sentence(rng) for _ in range(size)],
            "tags": [t.encode() for t in tags],
            "creation_date": [b"2010-01-08 09:34:05 UTC"] * size,
            "score": rng.integers(-3, 100, size=size),
            "type": [b"answer"] * size,
        }
    return clients


def write_h5(path, clients):
    strings = h5py.string_dtype(encoding="ascii")
    with h5py.File(path, "w") as file:
        examples = file.create_group("examples")
        for client_id, columns in clients.items():
            group = examples.create_group(client_id)
            for name, values in columns.items():
                if name == "score":
                    group.create_dataset(name, data=np.asarray(values, np.int64))
                else:
                    group.create_dataset(name, data=np.array(values, dtype=object), dtype=strings)


def write_counts(directory):
    lines = "".join(f"{word} {count}\n" for word, count in WORD_COUNTS)
    (directory / "stackoverflow.word_count").write_text(lines)
    (directory / "stackoverflow.tag_count").write_text(json.dumps(TAG_COUNTS))


@pytest.fixture
def so_dir(tmp_path, monkeypatch):
    """A data folder holding the extracted files; published counts to match."""
    splits = {
        "train": make_split(6, 0, "tr"),
        "held_out": make_split(3, 1, "ho"),
        "test": make_split(5, 2, "te"),
    }
    directory = tmp_path / "data"
    directory.mkdir()
    for split, clients in splits.items():
        write_h5(directory / f"stackoverflow_{split}.h5", clients)
    write_counts(directory)
    facts = {
        split: SplitFacts(len(clients), sum(len(c["tokens"]) for c in clients.values()))
        for split, clients in splits.items()
    }
    monkeypatch.setattr(stackoverflow, "PUBLISHED_FACTS", facts)
    return directory, splits


# ----------------------------------------------------------------------------- references


def reference_nwp(sentence, vocab, length):
    """TFF's to_ids + padded_batch + split_input_target, one sentence, by hand."""
    size = len(vocab)
    words = sentence.decode().split(" ")
    ids = [size + 2] + [vocab.index(w) + 1 if w in vocab else size + 1 for w in words[:length]]
    if len(words) < length:
        ids.append(size + 3)
    ids += [0] * (length + 1 - len(ids))
    return ids[:-1], ids[1:]


def reference_tp(tokens, title, tags, vocab, tag_vocab, max_words, max_tags):
    words = (tokens.decode() + " " + title.decode()).split()[:max_words]
    x = [vocab.index(w) + 1 if w in vocab else len(vocab) + 1 for w in words]
    parts = tags.decode().split("|")
    y = [tag_vocab.index(t) if t in tag_vocab else len(tag_vocab) for t in parts]
    return x + [0] * (max_words - len(x)), y + [len(tag_vocab)] * (max_tags - len(y))


def reference_rows(task, clients):
    """Expected x and y of every example, clients in sorted id order."""
    xs, ys = [], []
    for client_id in sorted(clients):
        columns = clients[client_id]
        if task == "stackoverflow_nwp":
            rows = [reference_nwp(s, VOCAB, SEQUENCE_LENGTH) for s in columns["tokens"]]
        else:
            rows = [
                reference_tp(*example, VOCAB, TAG_VOCAB, MAX_WORDS, MAX_TAGS)
                for example in zip(columns["tokens"], columns["title"], columns["tags"])
            ]
        xs += [x for x, _ in rows]
        ys += [y for _, y in rows]
    return np.array(xs), np.array(ys)


def _preprocessing(task):
    if task == "stackoverflow_nwp":
        return NextWordPreprocessing(VOCAB, SEQUENCE_LENGTH)
    return TagPreprocessing(VOCAB, TAG_VOCAB, MAX_WORDS, MAX_TAGS)


def _options(task):
    if task == "stackoverflow_nwp":
        return {"vocab_size": VOCAB_SIZE, "sequence_length": SEQUENCE_LENGTH}
    return {
        "vocab_size": VOCAB_SIZE,
        "tag_vocab_size": TAG_VOCAB_SIZE,
        "max_words": MAX_WORDS,
        "max_tags": MAX_TAGS,
    }


# ----------------------------------------------------------------------------- preprocessing


def test_next_word_ids_and_shift_match_a_reference_loop(so_dir, tmp_path):
    directory, splits = so_dir
    store = write_stackoverflow_split(
        directory / "stackoverflow_train.h5",
        tmp_path / "nwp",
        _preprocessing("stackoverflow_nwp"),
        progress=False,
    )
    data = read_federated_data(store, verify=True)
    train = splits["train"]
    assert list(data.client_names) == sorted(train)
    x, y = reference_rows("stackoverflow_nwp", train)
    assert data.fields["x"].dtype == np.uint16 and data.fields["x"].shape == x.shape
    np.testing.assert_array_equal(data.fields["x"], x)
    np.testing.assert_array_equal(data.fields["y"], y)
    # The targets are the inputs shifted by one.
    np.testing.assert_array_equal(data.fields["x"][:, 1:], data.fields["y"][:, :-1])
    sentences = [s for c in sorted(train) for s in train[c]["tokens"]]
    counts = read_manifest(store)["metadata"]["counts"]
    long = sum(len(s.split(b" ")) > SEQUENCE_LENGTH for s in sentences)
    assert counts["truncated_examples"] == long > 0
    assert counts["oov_tokens"] == int(np.sum(y == VOCAB_SIZE + 1))  # y holds every word


def test_special_ids_follow_tff():
    # TFF get_special_tokens(10000, 1): pad 0, oov [10001], bos 10002, eos 10003.
    assert tuple(nwp_special_ids(10_000)) == (0, 10_001, 10_002, 10_003)
    task = nwp_task(10_000)
    assert task.kind == "next_token" and task.pad_id == 0
    assert task.excluded_ids == (10_001, 10_002, 10_003)
    # A sentence of exactly L words gets no eos; one of L - 1 does.
    prep = NextWordPreprocessing(VOCAB, 3)
    fields, _ = prep({"tokens": [b"the . i", b"the .", b"", b"it  the"]})
    bos, eos, oov = VOCAB_SIZE + 2, VOCAB_SIZE + 3, VOCAB_SIZE + 1
    np.testing.assert_array_equal(
        fields["x"], [[bos, 1, 2], [bos, 1, 2], [bos, oov, eos], [bos, oov, oov]]
    )
    np.testing.assert_array_equal(
        fields["y"], [[1, 2, 3], [1, 2, eos], [oov, eos, 0], [oov, oov, 1]]
    )


def test_tag_prediction_ids_and_slots_match_a_reference_loop(so_dir, tmp_path):
    directory, splits = so_dir
    store = write_stackoverflow_split(
        directory / "stackoverflow_test.h5",
        tmp_path / "tp",
        _preprocessing("stackoverflow_tp"),
        progress=False,
    )
    data = read_federated_data(store)
    x, y = reference_rows("stackoverflow_tp", splits["test"])
    assert data.fields["x"].shape == (len(x), MAX_WORDS)
    assert data.fields["y"].shape == (len(y), MAX_TAGS)
    np.testing.assert_array_equal(data.fields["x"], x)
    np.testing.assert_array_equal(data.fields["y"], y)
    examples = [
        t + b" " + title
        for c in splits["test"].values()
        for t, title in zip(c["tokens"], c["title"])
    ]
    counts = read_manifest(store)["metadata"]["counts"]
    assert counts["truncated_examples"] == sum(len(e.split()) > MAX_WORDS for e in examples) > 0


def test_vocabularies_are_read_as_tff_reads_them(so_dir):
    directory, _ = so_dir
    words = directory / "stackoverflow.word_count"
    assert list(read_word_counts(words, 3).items()) == WORD_COUNTS[:3]
    assert word_vocabulary(words, VOCAB_SIZE) == VOCAB
    tags = directory / "stackoverflow.tag_count"
    assert list(read_tag_counts(tags)) == ["java", "c#", "python", "sql", "vb . net", "git"]
    assert tag_vocabulary(tags, TAG_VOCAB_SIZE) == TAG_VOCAB


@pytest.mark.parametrize(
    ("name", "content", "read", "message"),
    [
        ("short.word_count", "the 9\n. 8\n", lambda p: word_vocabulary(p, 3), "only 2 words"),
        ("bad.word_count", "the 9\npython\n", lambda p: word_vocabulary(p, 3), "line 2"),
        ("neg.word_count", "the 9\nit -1\n", lambda p: word_vocabulary(p, 2), "line 2"),
        ("twice.word_count", "the 9\nthe 8\n", lambda p: word_vocabulary(p, 2), "repeats"),
        ("json.word_count", json.dumps(TAG_COUNTS), lambda p: word_vocabulary(p, 2), "line 1"),
        ("text.tag_count", "the 9\n", lambda p: tag_vocabulary(p, 1), "not JSON"),
        ("list.tag_count", "[1, 2]", lambda p: tag_vocabulary(p, 1), "JSON list"),
        ("str.tag_count", '{"a": "9"}', lambda p: tag_vocabulary(p, 1), "non-negative"),
        ("few.tag_count", '{"a": 9}', lambda p: tag_vocabulary(p, 2), "only 1 tags"),
    ],
)
def test_bad_vocabulary_files_are_named(tmp_path, name, content, read, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + ".*" + message):
        read(path)


def test_a_binary_word_count_file_is_named(tmp_path):
    path = tmp_path / "stackoverflow.word_count"
    path.write_bytes(b"BZh91AY&SY\xff\xfe\x00")
    with pytest.raises(DataFormatError, match=re.escape(str(path)) + " is not UTF-8"):
        word_vocabulary(path, 2)


# ----------------------------------------------------------------------------- bad HDF5 files


def _convert(path, tmp_path, task="stackoverflow_tp"):
    return write_stackoverflow_split(path, tmp_path / "out", _preprocessing(task), progress=False)


def test_truncated_or_foreign_h5_files_are_named(so_dir, tmp_path):
    directory, _ = so_dir
    source = directory / "stackoverflow_train.h5"
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=re.escape(str(truncated))):
        _convert(truncated, tmp_path)
    noise = tmp_path / "noise.h5"
    noise.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataFormatError, match=re.escape(str(noise)) + " is not a readable HDF5"):
        _convert(noise, tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file.create_dataset("pixels", data=np.zeros(3))
    with pytest.raises(DataFormatError, match="has no 'examples' group"):
        _convert(other, tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(tokens=[], title=[], tags=[]), "has no examples"),
        (lambda c: c.pop("title"), r"has no column\(s\) \['title'\]"),
        (lambda c: c.update(tags=[b"a|b|c|d"] + c["tags"][1:]), "has 4 tags in example 0"),
        (lambda c: c.update(title=c["title"][:-1]), "has columns of different lengths"),
    ],
)
def test_bad_clients_are_named_with_their_file(tmp_path, edit, message):
    clients = make_split(4, 5, "u")
    for columns in clients.values():
        columns["tokens"] = columns["tokens"] + [b"a b"]
        columns["title"] = columns["title"] + [b"t"]
        columns["tags"] = columns["tags"] + [b"java"]
    bad = sorted(clients)[2]
    edit(clients[bad])
    path = tmp_path / "stackoverflow_train.h5"
    write_h5(path, clients)
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: client '{bad}' ") + message):
        _convert(path, tmp_path)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("task", ["stackoverflow_nwp", "stackoverflow_tp"])
def test_loader_converts_once_then_reopens_the_store(so_dir, task, monkeypatch):
    directory, splits = so_dir
    dataset = load_stackoverflow(
        task, data_dir=directory, download=False, progress=False, **_options(task)
    )
    assert dataset.name == task
    if task == "stackoverflow_nwp":
        assert dataset.num_classes == VOCAB_SIZE + 4 and dataset.input_shape == (SEQUENCE_LENGTH,)
        assert dataset.task == nwp_task(VOCAB_SIZE)
    else:
        assert dataset.num_classes == TAG_VOCAB_SIZE and dataset.input_shape == (MAX_WORDS,)
        assert dataset.task.kind == "multilabel" and dataset.task.top_k == 5
        assert dataset.task.input_vocab_size == VOCAB_SIZE
    for split, data in (("train", dataset.train), ("test", dataset.test)):
        assert list(data.client_names) == sorted(splits[split])
        x, y = reference_rows(task, splits[split])
        np.testing.assert_array_equal(data.fields["x"], x)
        np.testing.assert_array_equal(data.fields["y"], y)
    store = directory / stackoverflow.store_name(task, **_options(task))
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []

    # The second call opens the store and never the HDF5 files.
    for split in ("train", "held_out", "test"):
        (directory / f"stackoverflow_{split}.h5").unlink()

    def no_h5(path):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(stackoverflow, "_examples_group", no_h5)
    again = load_stackoverflow(
        task, data_dir=directory, download=False, progress=False, **_options(task)
    )
    assert isinstance(again.train.fields["x"], np.memmap)
    np.testing.assert_array_equal(again.train.fields["x"], dataset.train.fields["x"])
    assert (store / "dataset.json").is_file()


def test_loader_extracts_the_published_archives(so_dir, tmp_path, monkeypatch):
    extracted, splits = so_dir
    directory = tmp_path / "archives"
    directory.mkdir()
    archives = {
        "ARCHIVE": ("stackoverflow.tar.bz2", [f"stackoverflow_{s}.h5" for s in splits]),
        "WORD_COUNT_ARCHIVE": ("stackoverflow.word_count.tar.bz2", ["stackoverflow.word_count"]),
        "TAG_COUNT_ARCHIVE": ("stackoverflow.tag_count.tar.bz2", ["stackoverflow.tag_count"]),
    }
    for attribute, (archive, members) in archives.items():
        with tarfile.open(directory / archive, "w:bz2") as tar:
            for member in members:
                tar.add(extracted / member, arcname=member)
        remote = RemoteFile(
            archive, "https://example.invalid/" + archive, sha256_of(directory / archive)
        )
        monkeypatch.setattr(stackoverflow, attribute, remote)
    dataset = load_stackoverflow(
        "stackoverflow_tp",
        data_dir=directory,
        download=False,
        progress=False,
        **_options("stackoverflow_tp"),
    )
    x, _ = reference_rows("stackoverflow_tp", splits["train"])
    np.testing.assert_array_equal(dataset.train.fields["x"], x)
    assert (directory / "stackoverflow_train.h5").is_file()


def test_offline_a_missing_file_says_what_to_place_where(tmp_path):
    directory = tmp_path / "empty"
    with pytest.raises(DatasetUnavailableError) as error:
        load_stackoverflow(data_dir=directory, download=False, progress=False)
    message = str(error.value)
    assert "stackoverflow.word_count.tar.bz2" in message and "stackoverflow.word_count," in message
    assert str(directory) in message
    directory.mkdir()
    (directory / "stackoverflow.word_count").write_text(
        "".join(f"w{i} {10_000 - i}\n" for i in range(10_000))
    )
    with pytest.raises(DatasetUnavailableError) as error:
        load_stackoverflow(data_dir=directory, download=False, progress=False)
    message = str(error.value)
    assert stackoverflow.ARCHIVE.url in message and stackoverflow.ARCHIVE.sha256 in message
    assert "stackoverflow_train.h5, stackoverflow_test.h5" in message


def test_held_out_and_a_seeded_sample_of_evaluation_examples(so_dir):
    directory, splits = so_dir
    options = {
        "data_dir": directory,
        "download": False,
        "progress": False,
        **_options("stackoverflow_nwp"),
    }
    full = load_stackoverflow(**options)
    assert list(full.test.client_names) == sorted(splits["test"])
    held = load_stackoverflow(eval_split="held_out", test_examples=7, seed=3, **options)
    store = directory / stackoverflow.store_name(
        "stackoverflow_nwp", **_options("stackoverflow_nwp")
    )
    assert (store / "held_out" / "manifest.json").is_file()
    # TFF: ClientData.datasets(seed) shuffles the sorted ids with
    # RandomState(seed).shuffle; create_tf_dataset_from_all_clients().take(7).
    order = sorted(splits["held_out"])
    np.random.RandomState(3).shuffle(order)
    sentences, owners = [], []
    for client_id in order:
        sentences += splits["held_out"][client_id]["tokens"]
        owners += [client_id] * len(splits["held_out"][client_id]["tokens"])
    expected = [reference_nwp(s, VOCAB, SEQUENCE_LENGTH)[0] for s in sentences[:7]]
    assert held.test.total_examples == 7
    np.testing.assert_array_equal(held.test.fields["x"], expected)
    assert list(held.test.client_names) == list(dict.fromkeys(owners[:7]))
    np.testing.assert_array_equal(held.train.fields["x"], full.train.fields["x"])
    # More examples than the split holds: the whole split.
    whole = load_stackoverflow(eval_split="held_out", test_examples=10_000, **options)
    assert whole.test.num_clients == len(splits["held_out"])


def test_sample_draws_the_same_clients_as_shuffling_the_names():
    sizes = [3, 1, 4, 1, 5, 9, 2, 6]
    clients = [{"x": np.full((n, 1), i, np.int32)} for i, n in enumerate(sizes)]
    names = [f"c{i}" for i in range(len(sizes))]
    from fedjaxsim.data.federated import FederatedData

    data = FederatedData.from_clients(clients, names)
    sample = sample_eval_examples(data, 12, seed=11)
    shuffled = list(names)
    np.random.RandomState(11).shuffle(shuffled)
    flat = [int(name[1:]) for name in shuffled for _ in range(sizes[int(name[1:])])]
    np.testing.assert_array_equal(sample.fields["x"][:, 0], flat[:12])


def test_published_counts_are_checked(so_dir, monkeypatch):
    directory, splits = so_dir
    facts = dict(stackoverflow.PUBLISHED_FACTS)
    facts["test"] = SplitFacts(facts["test"].num_clients, facts["test"].num_examples + 1)
    monkeypatch.setattr(stackoverflow, "PUBLISHED_FACTS", facts)
    options = {
        "data_dir": directory,
        "download": False,
        "progress": False,
        **_options("stackoverflow_nwp"),
    }
    path = re.escape(str(directory / "stackoverflow_test.h5"))
    with pytest.raises(ValueError, match=path + ".*published split has 5 clients"):
        load_stackoverflow(**options)
    with pytest.warns(UserWarning, match=path):
        dataset = load_stackoverflow(strict=False, **options)
    assert dataset.test.num_clients == len(splits["test"])


def test_an_interrupted_loader_resumes_to_the_same_store(so_dir, tmp_path, monkeypatch):
    directory, _ = so_dir
    task = "stackoverflow_tp"
    convert = stackoverflow._convert_client
    calls = []
    resumed_once = False

    def interrupted(*args):
        calls.append(args[1])
        if len(calls) == 4 and not resumed_once:
            raise KeyboardInterrupt
        return convert(*args)

    monkeypatch.setattr(stackoverflow, "_convert_client", interrupted)
    options = {"download": False, "progress": False, "checkpoint_every": 2, **_options(task)}
    with pytest.raises(KeyboardInterrupt):
        load_stackoverflow(task, data_dir=directory, **options)
    store = directory / stackoverflow.store_name(task, **_options(task))
    assert not store.exists()
    calls.clear()
    resumed_once = True
    resumed = load_stackoverflow(task, data_dir=directory, **options)
    # Clients 0-1 were checkpointed; client 2 onwards is converted again.
    first_train_again = sorted(make_split(6, 0, "tr"))[2]
    assert calls[0] == first_train_again
    monkeypatch.setattr(stackoverflow, "_convert_client", convert)
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    for path in directory.glob("stackoverflow*"):
        if path.is_file():
            (fresh_dir / path.name).write_bytes(path.read_bytes())
    fresh = load_stackoverflow(task, data_dir=fresh_dir, **options)
    for split in ("train", "test"):
        for name in ("x", "y"):
            a = getattr(resumed, split).fields[name]
            b = getattr(fresh, split).fields[name]
            np.testing.assert_array_equal(a, b)
    for file in ("field_x.npy", "field_y.npy", "offsets.npy", "client_names.json"):
        assert (store / "train" / file).read_bytes() == (
            fresh_dir / store.name / "train" / file
        ).read_bytes()


# ----------------------------------------------------------------------------- tokenized


TOKENIZED_LENGTH = 64  # longer than any tiny sentence's tokens: nothing is cut


def reference_tokenized(tokenizer, sentences, length):
    """text.pad_examples with the prompt [EOS] and the response ids + [EOS]."""
    eos = text.eos_id(tokenizer)
    ids = text.encode_texts(tokenizer, [s.decode() for s in sentences])
    fields, truncated = text.pad_examples(
        [[eos]] * len(ids), [i + [eos] for i in ids], length, text.vocab_size(tokenizer), eos
    )
    return fields, truncated


def test_tokenized_next_word_rows_decode_to_the_sentences(so_dir, tokenizer_path, monkeypatch):
    directory, splits = so_dir
    (directory / "stackoverflow.word_count").unlink()  # the tokenizer is the vocabulary
    tokenizer = text.load_tokenizer(tokenizer_path)
    vocab = text.vocab_size(tokenizer)
    options = {"data_dir": directory, "download": False, "progress": False}
    dataset = load_stackoverflow(
        tokenizer=str(tokenizer_path), sequence_length=TOKENIZED_LENGTH, **options
    )
    assert (dataset.name, dataset.num_classes) == ("stackoverflow_nwp", vocab)
    assert dataset.input_shape == (TOKENIZED_LENGTH,)
    assert dataset.task == text.next_token_task(tokenizer) and dataset.task.pad_id == vocab
    digest = text.tokenizer_digest(tokenizer)
    store = directory / f"stackoverflow_nwp_tok{digest[:16]}_seq{TOKENIZED_LENGTH}"
    assert store.name == stackoverflow.store_name(
        "stackoverflow_nwp", tokenizer=tokenizer, sequence_length=TOKENIZED_LENGTH
    )
    assert (store / "dataset.json").is_file()
    assert not (directory / "stackoverflow_nwp").exists()
    manifest = read_manifest(store / "train")
    assert manifest["metadata"]["tokenizer"]["sha256"] == digest
    assert manifest["metadata"]["tokenizer"]["eos_token"] == EOS_TOKEN
    assert manifest["metadata"]["counts"]["truncated_examples"] == 0
    for split, data in (("train", dataset.train), ("test", dataset.test)):
        clients = splits[split]
        assert list(data.client_names) == sorted(clients)
        assert data.fields["x"].dtype == np.uint16  # the tiny vocabulary fits
        sentences = [s for c in sorted(clients) for s in clients[c]["tokens"]]
        expected, _ = reference_tokenized(tokenizer, sentences, TOKENIZED_LENGTH)
        np.testing.assert_array_equal(data.fields["x"], expected["x"])
        np.testing.assert_array_equal(data.fields["y"], expected["y"])
        for index, name in enumerate(data.client_names):
            targets = text.real_targets(data.client(index)["y"], vocab).tolist()
            decoded = tokenizer.decode(targets, skip_special_tokens=False)
            assert decoded == "".join(s.decode() + EOS_TOKEN for s in clients[name]["tokens"])

    # The evaluation sample is drawn as for the word ids (TFF's shuffled clients).
    held = load_stackoverflow(
        tokenizer=tokenizer_path,
        sequence_length=TOKENIZED_LENGTH,
        eval_split="held_out",
        test_examples=7,
        seed=3,
        **options,
    )
    order = sorted(splits["held_out"])
    np.random.RandomState(3).shuffle(order)
    sentences = [s for c in order for s in splits["held_out"][c]["tokens"]][:7]
    expected, _ = reference_tokenized(tokenizer, sentences, TOKENIZED_LENGTH)
    np.testing.assert_array_equal(held.test.fields["x"], expected["x"])
    assert (store / "held_out" / "manifest.json").is_file()

    # A second load reads the store, never the HDF5 files.
    for path in directory.glob("stackoverflow_*.h5"):
        path.unlink()

    def no_h5(path):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(stackoverflow, "_examples_group", no_h5)
    again = load_stackoverflow(tokenizer=tokenizer, sequence_length=TOKENIZED_LENGTH, **options)
    assert isinstance(again.train.fields["y"], np.memmap)
    np.testing.assert_array_equal(again.train.fields["y"], dataset.train.fields["y"])
    assert again.task == dataset.task and again.num_classes == vocab
    # Another tokenizer, or another length, is another store, never this one.
    other = write_tiny_tokenizer(directory.parent / "other.json", vocab_size=300)
    for tokenized in (
        {"tokenizer": other, "sequence_length": TOKENIZED_LENGTH},
        {"tokenizer": tokenizer_path, "sequence_length": 32},
    ):
        with pytest.raises(DatasetUnavailableError, match="stackoverflow.tar.bz2"):
            load_stackoverflow(**tokenized, **options)


def test_tokenized_rows_are_cut_counted_and_resume(so_dir, tokenizer_path, monkeypatch):
    directory, splits = so_dir
    tokenizer = text.load_tokenizer(tokenizer_path)
    convert = stackoverflow._convert_client
    calls = []
    resumed_once = False

    def interrupted(*args):
        calls.append(args[1])
        if len(calls) == 4 and not resumed_once:
            raise KeyboardInterrupt
        return convert(*args)

    monkeypatch.setattr(stackoverflow, "_convert_client", interrupted)
    options = {
        "data_dir": directory,
        "download": False,
        "progress": False,
        "checkpoint_every": 2,
        "tokenizer": tokenizer_path,
        "sequence_length": 4,
    }
    with pytest.raises(KeyboardInterrupt):
        load_stackoverflow(**options)
    calls.clear()
    resumed_once = True
    resumed = load_stackoverflow(**options)
    train = splits["train"]
    assert calls[0] == sorted(train)[2]  # clients 0-1 were checkpointed
    sentences = [s for c in sorted(train) for s in train[c]["tokens"]]
    expected, truncated = reference_tokenized(tokenizer, sentences, 4)
    np.testing.assert_array_equal(resumed.train.fields["x"], expected["x"])
    np.testing.assert_array_equal(resumed.train.fields["y"], expected["y"])
    store = directory / stackoverflow.store_name(
        "stackoverflow_nwp", tokenizer=tokenizer, sequence_length=4
    )
    counts = read_manifest(store / "train")["metadata"]["counts"]
    assert counts["truncated_examples"] == int(truncated.sum()) > 0
    # Every row keeps its sentence: the published example counts hold.
    assert resumed.train.total_examples == len(sentences)


def test_a_tokenizer_applies_to_next_word_prediction_only(so_dir, tokenizer_path):
    directory, _ = so_dir
    options = {"data_dir": directory, "download": False, "progress": False}
    with pytest.raises(ValueError, match=r"next-word prediction \(stackoverflow_nwp\) only"):
        load_stackoverflow("stackoverflow_tp", tokenizer=tokenizer_path, **options)
    with pytest.raises(ValueError, match="vocab_size=8 sizes TFF's word vocabulary"):
        load_stackoverflow(tokenizer=tokenizer_path, vocab_size=8, **options)
    with pytest.raises(ValueError, match="no end-of-text token '<eos>'"):
        load_stackoverflow(tokenizer=tokenizer_path, eos_token="<eos>", **options)
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        load_stackoverflow(tokenizer=directory / "absent.json", **options)
    assert not any(p.name.startswith("stackoverflow_nwp_tok") for p in directory.iterdir())


def test_config_keys_reach_the_loader(tokenizer_path, monkeypatch):
    from fedjaxsim.runner.config import ConfigError, config_from_dict, parse_run_arguments, resolve

    parsed = config_from_dict(
        {
            "data": {
                "name": "stackoverflow_nwp",
                "tokenizer": str(tokenizer_path),
                "eos_token": "<|endoftext|>",
                "sequence_length": 48,
            }
        }
    ).data
    flags, _ = parse_run_arguments(
        ["--dataset", "stackoverflow_nwp", "--data.tokenizer", str(tokenizer_path)]
        + ["--data.sequence-length", "48"]
    )
    assert flags.data == parsed
    assert (parsed.tokenizer, parsed.sequence_length) == (str(tokenizer_path), 48)
    seen = {}
    monkeypatch.setattr(stackoverflow, "load_stackoverflow", lambda *a, **k: seen.update(k))
    parsed.load(seed=0, progress=False)
    assert (seen["tokenizer"], seen["eos_token"], seen["sequence_length"]) == (
        str(tokenizer_path),
        EOS_TOKEN,
        48,
    )
    # Tag prediction: a tokenizer, the runner's from a pretrained model, is refused by name.
    with pytest.raises(ConfigError) as error:
        resolve(config_from_dict({"data": {"name": "stackoverflow_tp", "tokenizer": "x"}}))
    assert error.value.key == "data.tokenizer" and "stackoverflow_nwp" in str(error.value)
    gpt2 = {"name": "gpt2", "checkpoint": str(TINY_GPT2)}
    nwp = resolve(config_from_dict({"data": {"name": "stackoverflow_nwp"}, "model": gpt2}))
    assert nwp.data.tokenizer == str(TINY_GPT2)
    with pytest.raises(ConfigError, match="next-word prediction") as error:
        resolve(config_from_dict({"data": {"name": "stackoverflow_tp"}, "model": gpt2}))
    assert error.value.key == "data.tokenizer"
    with pytest.raises(ConfigError) as error:
        resolve(config_from_dict({"data": {"name": "stackoverflow_nwp", "tokenizer": "absent"}}))
    assert error.value.key == "data.tokenizer" and "does not exist" in str(error.value)
