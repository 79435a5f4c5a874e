import json

import h5py
import numpy as np
import pytest

from fedjaxsim.data import shakespeare
from fedjaxsim.data.download import DatasetUnavailableError, RemoteFile
from fedjaxsim.data.emnist import SplitFacts
from fedjaxsim.data.formats import DataFormatError
from fedjaxsim.data.shakespeare import (
    load_shakespeare,
    preprocess_snippets,
    read_fedjax_shakespeare,
    read_leaf_shakespeare,
    read_tff_shakespeare,
)
from fedjaxsim.data.validation import DroppedClientsWarning
from tests.data.benchmark_files import (
    EOS_TOKEN,
    LINES,
    fedjax_blob,
    long_text_roles,
    make_roles,
    tar_bz2,
    write_fedjax_shakespeare,
    write_fedjax_sqlite,
    write_leaf_shakespeare,
    write_tff_shakespeare_h5,
    write_tiny_tokenizer,
)

VOCABULARY = (
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)


def reference(snippets, length):
    """FedJAX's preprocess_client as a plain loop: ids 3.. for the vocabulary,
    89 out of vocabulary, BOS 1 and EOS 2 around each snippet, x/y the joined
    sequence without its last/first id, padded with 0 and cut into rows."""
    joined = []
    for snippet in snippets:
        joined.append(1)
        for byte in snippet:
            character = chr(byte)
            joined.append(3 + VOCABULARY.index(character) if character in VOCABULARY else 89)
        joined.append(2)
    x, y = joined[:-1], joined[1:]
    while len(x) % length:
        x.append(0)
        y.append(0)
    return [x[i : i + length] for i in range(0, len(x), length)], [
        y[i : i + length] for i in range(0, len(y), length)
    ]


def test_constants_are_fedjax_ids():
    assert len(VOCABULARY) == 86 and len(set(VOCABULARY)) == 86
    assert (shakespeare.PAD, shakespeare.BOS, shakespeare.EOS) == (0, 1, 2)
    assert (shakespeare.OOV, shakespeare.VOCAB_SIZE) == (89, 90)
    assert shakespeare.TASK.kind == "next_token" and shakespeare.TASK.pad_id == 0
    assert shakespeare.TASK.excluded_ids == (1,)  # BOS; EOS counts, as in Reddi et al.
    assert shakespeare.PUBLISHED_FACTS["train"] == SplitFacts(715, 16_068)
    assert shakespeare.PUBLISHED_FACTS["test"] == SplitFacts(715, 2_356)


def test_preprocessing_matches_fedjax_own_test():
    # fedjax/datasets/shakespeare_test.py, test_preprocess_client.
    examples = preprocess_snippets([b"hello", b"hi there"], 10)
    np.testing.assert_array_equal(
        examples["x"],
        [[1, 4, 67, 5, 5, 26, 2, 1, 4, 68], [16, 7, 4, 67, 48, 67, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(
        examples["y"],
        [[4, 67, 5, 5, 26, 2, 1, 4, 68, 16], [7, 4, 67, 48, 67, 2, 0, 0, 0, 0]],
    )
    assert examples["x"].dtype == examples["y"].dtype == np.int32


@pytest.mark.parametrize("length", [1, 2, 3, 7, 80])
def test_preprocessing_matches_a_plain_loop(length):
    rng = np.random.default_rng(length)
    for _ in range(20):
        snippets = [LINES[i][: rng.integers(0, 12)] for i in rng.integers(0, len(LINES), 3)]
        x, y = reference(snippets, length)
        examples = preprocess_snippets(snippets, length)
        assert examples["x"].tolist() == x
        assert examples["y"].tolist() == y


def test_accuracy_counts_every_character_and_eos_once_and_never_bos():
    # TFF's baseline (Reddi et al.) counts every non-padding target of
    # sequences cut per snippet: each character and the EOS, never BOS.
    snippets = [b"To be", b"", b"or not~", b"x" * 13]
    expected = []
    for snippet in snippets:
        for byte in snippet:
            character = chr(byte)
            expected.append(3 + VOCABULARY.index(character) if character in VOCABULARY else 89)
        expected.append(2)
    for length in (1, 4, 80):
        examples = preprocess_snippets(snippets, length)
        targets = examples["y"].ravel()
        counted = [int(t) for t in targets if t not in (0, *shakespeare.TASK.excluded_ids)]
        assert counted == expected
        # BOS targets exist only in FedJAX's joined sequence, right after an EOS input.
        assert set(examples["x"].ravel()[targets == 1].tolist()) == {2}


def _write_all(tmp_path, roles):
    write_tff_shakespeare_h5(tmp_path / "s.h5", roles)
    write_fedjax_shakespeare(tmp_path / "s.sqlite", roles)
    return tmp_path / "s.h5", tmp_path / "s.sqlite"


def test_tff_and_fedjax_give_identical_clients(tmp_path):
    roles = make_roles(sizes=(2, 1, 3, 4))
    h5, sqlite = _write_all(tmp_path, roles)
    results = [
        read_tff_shakespeare(h5, sequence_length=16),
        read_fedjax_shakespeare(sqlite, sequence_length=16),
    ]
    names = sorted(roles)
    for data in results:
        assert list(data.client_names) == names
        assert data.field_scales == {}
        for index, name in enumerate(names):
            client = data.client(index)
            x, y = reference(roles[name], 16)
            assert client["x"].tolist() == x and client["y"].tolist() == y
    for name in ("x", "y"):
        np.testing.assert_array_equal(results[1].fields[name], results[0].fields[name])
        assert results[0].fields[name].dtype == np.int32
    np.testing.assert_array_equal(results[1].offsets, results[0].offsets)


def test_leaf_text_gives_the_same_clients_as_one_snippet_roles(tmp_path):
    roles = long_text_roles()
    h5, sqlite = _write_all(tmp_path, roles)
    texts = {name: snippets[0].decode("ascii") for name, snippets in roles.items()}
    write_leaf_shakespeare(tmp_path / "leaf", texts)
    results = [
        read_tff_shakespeare(h5),
        read_fedjax_shakespeare(sqlite),
        read_leaf_shakespeare(tmp_path / "leaf"),
    ]
    for data in results:
        assert list(data.client_names) == sorted(roles)
        assert data.fields["x"].shape[1:] == (80,)
    for other in results[1:]:
        for name in ("x", "y"):
            np.testing.assert_array_equal(other.fields[name], results[0].fields[name])
        np.testing.assert_array_equal(other.offsets, results[0].offsets)


def test_leaf_windows_that_are_not_one_text_are_refused(tmp_path):
    texts = {name: s[0].decode("ascii") for name, s in long_text_roles(count=1).items()}
    write_leaf_shakespeare(tmp_path / "leaf", texts)
    shard = next((tmp_path / "leaf").glob("*.json"))
    content = json.loads(shard.read_text())
    user = content["users"][0]
    content["user_data"][user]["x"][3] = "z" * 80
    shard.write_text(json.dumps(content))
    with pytest.raises(DataFormatError, match=f"{shard.name}: user '{user}': window 3"):
        read_leaf_shakespeare(shard)
    shard.write_text(shard.read_text()[:-30])
    with pytest.raises(DataFormatError, match=f"{shard.name} is not valid JSON"):
        read_leaf_shakespeare(shard)


@pytest.mark.parametrize(
    "reader, suffix", [(read_tff_shakespeare, ".h5"), (read_fedjax_shakespeare, ".sqlite")]
)
def test_truncated_and_foreign_files_name_the_file(tmp_path, reader, suffix):
    roles = make_roles(sizes=(40, 30, 50), seed=2)
    h5, sqlite = _write_all(tmp_path, roles)
    whole = (h5 if suffix == ".h5" else sqlite).read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match=f"truncated{suffix}.*(truncated|corrupt)"):
        reader(truncated)
    foreign = tmp_path / f"foreign{suffix}"
    foreign.write_bytes(b"not a dataset\n" * 200)
    with pytest.raises(DataFormatError, match=f"foreign{suffix}"):
        reader(foreign)
    with pytest.raises(FileNotFoundError, match="missing"):
        reader(tmp_path / f"missing{suffix}")


def test_empty_client_is_a_clear_error_or_dropped(tmp_path):
    roles = {**make_roles(sizes=(2, 1)), "NOBODY_SILENT": []}
    write_tff_shakespeare_h5(tmp_path / "e.h5", roles)
    with pytest.raises(ValueError, match="e.h5: client 'NOBODY_SILENT' has no examples"):
        read_tff_shakespeare(tmp_path / "e.h5")
    with pytest.warns(DroppedClientsWarning, match="dropped 1 of 3 clients.*1 empty"):
        data = read_tff_shakespeare(tmp_path / "e.h5", drop_invalid=True)
    assert "NOBODY_SILENT" not in list(data.client_names)


def test_client_without_characters_is_empty(tmp_path):
    roles = {**make_roles(sizes=(2, 1)), "A_MUTE_ROLE": [b"", b""]}
    write_fedjax_shakespeare(tmp_path / "mute.sqlite", roles)
    with pytest.raises(
        ValueError, match="mute.sqlite: client 'A_MUTE_ROLE' has 2 snippets but no characters"
    ):
        read_fedjax_shakespeare(tmp_path / "mute.sqlite")
    with pytest.warns(DroppedClientsWarning, match="dropped 1 of 3 clients.*1 empty"):
        data = read_fedjax_shakespeare(tmp_path / "mute.sqlite", drop_invalid=True)
    assert list(data.client_names) == sorted(make_roles(sizes=(2, 1)))


def test_snippets_that_are_not_byte_strings_name_the_file_and_client(tmp_path):
    roles = make_roles(sizes=(2, 1))
    write_tff_shakespeare_h5(tmp_path / "ints.h5", roles)
    with h5py.File(tmp_path / "ints.h5", "a") as file:
        file.create_group("examples/NUMBERS").create_dataset("snippets", data=np.arange(3))
    with pytest.raises(
        ValueError,
        match="ints.h5: client 'NUMBERS' has a snippet of type int, expected byte strings",
    ):
        read_tff_shakespeare(tmp_path / "ints.h5")
    clients = {name: {"snippets": _object_array(s)} for name, s in roles.items()}
    clients["NUMBERS"] = {"snippets": np.arange(3, dtype=np.int64)}
    write_fedjax_sqlite(tmp_path / "ints.sqlite", clients)
    with pytest.raises(ValueError, match="ints.sqlite: client 'NUMBERS' has a snippet of type int"):
        read_fedjax_shakespeare(tmp_path / "ints.sqlite")


def test_fedjax_counts_and_blobs_are_checked_per_client(tmp_path):
    roles = make_roles(sizes=(2, 3))
    broken = max(roles)
    write_fedjax_shakespeare(
        tmp_path / "count.sqlite", roles, num_examples=lambda name, n: n + (name == broken)
    )
    held = len(roles[broken])
    declared = f"is declared with {held + 1} examples but holds {held}"
    with pytest.raises(ValueError, match=f"count.sqlite: client '{broken}' {declared}"):
        read_fedjax_shakespeare(tmp_path / "count.sqlite")

    def blob(name):
        whole = fedjax_blob({"snippets": _object_array(roles[name])})
        return whole[:7] if name == broken else whole

    write_fedjax_shakespeare(tmp_path / "blob.sqlite", roles, blob=blob)
    with pytest.raises(DataFormatError, match=f"blob.sqlite: client '{broken}' does not decode"):
        read_fedjax_shakespeare(tmp_path / "blob.sqlite")


def _object_array(snippets):
    array = np.empty(len(snippets), dtype=object)
    array[:] = snippets
    return array


def test_published_counts_are_checked_on_snippets(tmp_path):
    roles = make_roles(sizes=(2, 3))
    write_tff_shakespeare_h5(tmp_path / "shakespeare_train.h5", roles)
    path = tmp_path / "shakespeare_train.h5"
    assert read_tff_shakespeare(path, expected=SplitFacts(2, 5)).num_clients == 2
    with pytest.raises(
        ValueError, match=r"shakespeare_train.h5 holds 2 clients and 5 snippets.*715"
    ):
        read_tff_shakespeare(path, expected=shakespeare.PUBLISHED_FACTS["train"])
    with pytest.warns(UserWarning, match="shakespeare_train.h5 holds 2 clients"):
        read_tff_shakespeare(path, expected=shakespeare.PUBLISHED_FACTS["train"], strict=False)


def _publish(tmp_path, monkeypatch, train, test):
    source = tmp_path / "published"
    source.mkdir()
    write_tff_shakespeare_h5(source / "train.h5", train)
    write_tff_shakespeare_h5(source / "test.h5", test)
    archive = source / "shakespeare.tar.bz2"
    digest = tar_bz2(
        archive,
        {"shakespeare_train.h5": source / "train.h5", "shakespeare_test.h5": source / "test.h5"},
    )
    monkeypatch.setattr(
        shakespeare, "TFF_ARCHIVE", RemoteFile(archive.name, archive.as_uri(), digest)
    )
    count = lambda roles: SplitFacts(len(roles), sum(len(s) for s in roles.values()))  # noqa: E731
    monkeypatch.setitem(shakespeare.PUBLISHED_FACTS, "train", count(train))
    monkeypatch.setitem(shakespeare.PUBLISHED_FACTS, "test", count(test))
    return source


def test_load_converts_once_then_reads_the_store(tmp_path, monkeypatch):
    train, test = make_roles(sizes=(3, 2), seed=3), make_roles(sizes=(1, 1), seed=4)
    source = _publish(tmp_path, monkeypatch, train, test)
    cache = tmp_path / "cache"
    dataset = load_shakespeare(data_dir=cache, progress=False)
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == ("shakespeare", 90, (80,))
    assert dataset.task == shakespeare.TASK
    assert isinstance(dataset.train.fields["x"], np.memmap)
    assert (cache / "shakespeare" / "dataset.json").is_file()
    expected = read_tff_shakespeare(source / "train.h5")
    np.testing.assert_array_equal(dataset.train.fields["y"], expected.fields["y"])
    assert list(dataset.train.client_names) == sorted(train)
    for path in list(cache.glob("shakespeare*.*")):
        path.unlink()
    again = load_shakespeare(data_dir=cache, download=False)
    np.testing.assert_array_equal(again.test.fields["x"], dataset.test.fields["x"])
    assert again.task == shakespeare.TASK
    # Another sequence length is another store, converted from the files.
    with pytest.raises(DatasetUnavailableError, match="shakespeare.tar.bz2"):
        load_shakespeare(data_dir=cache, download=False, sequence_length=20)
    short = load_shakespeare(data_dir=cache, progress=False, sequence_length=20)
    assert short.input_shape == (20,) and short.train.fields["x"].shape[1] == 20
    assert (cache / "shakespeare_seq20" / "dataset.json").is_file()


def test_load_from_extracted_files_and_strict_counts(tmp_path, monkeypatch):
    train, test = make_roles(sizes=(2, 2), seed=5), make_roles(sizes=(1,), seed=6)
    cache = tmp_path / "cache"
    cache.mkdir()
    write_tff_shakespeare_h5(cache / "shakespeare_train.h5", train)
    write_tff_shakespeare_h5(cache / "shakespeare_test.h5", test)
    with pytest.raises(ValueError, match="shakespeare_train.h5 holds 2 clients.*strict=False"):
        load_shakespeare(data_dir=cache, download=False)
    assert not (cache / "shakespeare").exists()
    with pytest.warns(UserWarning, match="published split has 715 clients"):
        dataset = load_shakespeare(data_dir=cache, download=False, strict=False)
    assert dataset.train.num_clients == 2


def test_load_fedjax_and_leaf_sources(tmp_path, monkeypatch):
    roles = long_text_roles(count=2)
    source = tmp_path / "published"
    source.mkdir()
    for split in ("train", "test"):
        write_fedjax_shakespeare(source / f"shakespeare_{split}.sqlite", roles)
    monkeypatch.setattr(shakespeare, "_FEDJAX_URL", source.as_uri() + "/")
    for split in ("train", "test"):
        monkeypatch.setitem(shakespeare.PUBLISHED_FACTS, split, SplitFacts(2, 2))
    fedjax = load_shakespeare(source="fedjax", data_dir=tmp_path / "a", progress=False)
    texts = {name: s[0].decode("ascii") for name, s in roles.items()}
    for split in ("train", "test"):
        write_leaf_shakespeare(tmp_path / "b" / "leaf_shakespeare" / split, texts)
    leaf = load_shakespeare(source="leaf", data_dir=tmp_path / "b", download=False)
    np.testing.assert_array_equal(leaf.train.fields["x"], fedjax.train.fields["x"])
    np.testing.assert_array_equal(leaf.test.offsets, fedjax.test.offsets)


def test_leaf_has_its_own_store_and_no_tff_counts(tmp_path):
    texts = {name: s[0].decode("ascii") for name, s in long_text_roles(count=2).items()}
    for split in ("train", "test"):
        write_leaf_shakespeare(tmp_path / "leaf_shakespeare" / split, texts)
    # LEAF's roles are not TFF's 715: the published counts are not applied.
    leaf = load_shakespeare(source="leaf", data_dir=tmp_path, download=False)
    assert leaf.train.num_clients == 2 and leaf.task == shakespeare.TASK
    assert (tmp_path / "shakespeare_leaf" / "dataset.json").is_file()
    assert not (tmp_path / "shakespeare").exists()
    # TFF's text differs from LEAF's, so a TFF load never opens LEAF's store.
    with pytest.raises(DatasetUnavailableError, match="shakespeare.tar.bz2"):
        load_shakespeare(data_dir=tmp_path, download=False)
    assert shakespeare.store_name(20, "leaf") == "shakespeare_leaf_seq20"


def test_offline_load_names_the_missing_file_or_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAXSIM_DATA_DIR", str(tmp_path / "env_cache"))
    with pytest.raises(DatasetUnavailableError) as raised:
        load_shakespeare(download=False)
    message = str(raised.value)
    assert str(tmp_path / "env_cache" / "shakespeare.tar.bz2") in message
    assert "shakespeare_train.h5 and shakespeare_test.h5" in message
    assert "https://storage.googleapis.com/tff-datasets-public/shakespeare.tar.bz2" in message
    with pytest.raises(DatasetUnavailableError, match="shakespeare_train.sqlite"):
        load_shakespeare(source="fedjax", download=False)
    with pytest.raises(
        DatasetUnavailableError, match=str(tmp_path / "env_cache" / "leaf_shakespeare")
    ):
        load_shakespeare(source="leaf")
    with pytest.raises(ValueError, match="source must be one of"):
        load_shakespeare(source="gutenberg")
    with pytest.raises(ValueError, match="sequence_length"):
        load_shakespeare(sequence_length=0)


# ----------------------------------------------------------------------------- re-tokenized


def test_load_re_tokenized_caches_under_the_tokenizer_digest(tmp_path, monkeypatch, tokenizer_path):
    from fedjaxsim.data import text

    train, test = make_roles(sizes=(3, 2), seed=3), make_roles(sizes=(1, 1), seed=4)
    _publish(tmp_path, monkeypatch, train, test)
    cache = tmp_path / "cache"
    tokenizer = text.load_tokenizer(tokenizer_path)
    dataset = load_shakespeare(
        data_dir=cache, progress=False, sequence_length=24, tokenizer=str(tokenizer_path)
    )
    vocab = text.vocab_size(tokenizer)
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == ("shakespeare", vocab, (24,))
    assert dataset.task == text.next_token_task(tokenizer) and dataset.task.pad_id == vocab
    store = cache / f"shakespeare_tok{text.tokenizer_digest(tokenizer)[:16]}_seq24"
    assert store.name == shakespeare.store_name(24, "tff", tokenizer)
    assert (store / "dataset.json").is_file() and not (cache / "shakespeare").exists()
    assert isinstance(dataset.train.fields["x"], np.memmap)
    manifest = json.loads((store / "train" / "manifest.json").read_text())
    assert manifest["metadata"]["tokenizer"]["sha256"] == text.tokenizer_digest(tokenizer)
    assert list(dataset.test.client_names) == sorted(test)
    for index, name in enumerate(dataset.train.client_names):
        targets = text.real_targets(dataset.train.client(index)["y"], vocab).tolist()
        expected = "".join(s.decode() + EOS_TOKEN for s in train[name] if s)
        assert tokenizer.decode(targets, skip_special_tokens=False) == expected
    # The store is read back without the published files.
    for path in list(cache.glob("shakespeare*.*")):
        path.unlink()
    again = load_shakespeare(
        data_dir=cache, download=False, sequence_length=24, tokenizer=tokenizer_path
    )
    np.testing.assert_array_equal(again.train.fields["y"], dataset.train.fields["y"])
    assert again.task == dataset.task and again.num_classes == vocab
    # Another tokenizer is another store, never this one.
    other = write_tiny_tokenizer(tmp_path / "other.json", vocab_size=300)
    with pytest.raises(DatasetUnavailableError, match="shakespeare.tar.bz2"):
        load_shakespeare(data_dir=cache, download=False, sequence_length=24, tokenizer=other)


def test_load_re_tokenized_checks_the_tokenizer_before_any_file(tmp_path, tokenizer_path):
    with pytest.raises(FileNotFoundError, match="absent.json does not exist.*tokenizer.json"):
        load_shakespeare(data_dir=tmp_path, download=False, tokenizer=tmp_path / "absent.json")
    with pytest.raises(ValueError, match="no end-of-text token '<eos>'"):
        load_shakespeare(
            data_dir=tmp_path, download=False, tokenizer=tokenizer_path, eos_token="<eos>"
        )
