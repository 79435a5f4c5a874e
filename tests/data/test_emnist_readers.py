import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from fedjaxsim.data import emnist
from fedjaxsim.data.download import DatasetUnavailableError, RemoteFile
from fedjaxsim.data.emnist import (
    SplitFacts,
    load_federated_emnist,
    read_fedjax_emnist,
    read_leaf_femnist,
    read_tff_emnist,
)
from fedjaxsim.data.formats import DataFormatError
from fedjaxsim.data.validation import DroppedClientsWarning
from tests.data.emnist_files import (
    background_pixels,
    fedjax_blob,
    make_writers,
    write_fedjax_sqlite,
    write_leaf_json,
    write_tff_h5,
)


def _write_all(tmp_path, writers):
    write_tff_h5(tmp_path / "fed.h5", writers)
    write_fedjax_sqlite(tmp_path / "fed.sqlite", writers)
    write_leaf_json(tmp_path / "leaf", writers)
    return tmp_path / "fed.h5", tmp_path / "fed.sqlite", tmp_path / "leaf"


def test_three_formats_give_identical_data_with_ink_one(tmp_path):
    writers = make_writers()
    h5, sqlite, leaf = _write_all(tmp_path, writers)
    results = [read_tff_emnist(h5), read_fedjax_emnist(sqlite), read_leaf_femnist(leaf)]
    names = sorted(writers)
    for data in results:
        assert list(data.client_names) == names
        np.testing.assert_array_equal(data.num_examples, [len(writers[n][1]) for n in names])
        assert data.fields["x"].dtype == np.uint8 and data.fields["x"].shape[1:] == (28, 28, 1)
        assert data.field_scales == {"x": 255.0}
        for index, name in enumerate(names):
            levels, labels = writers[name]
            client = data.client(index, decode=False)
            # Stored value = the ink level: 255 where the pen wrote, 0 on paper.
            np.testing.assert_array_equal(client["x"][..., 0], levels)
            np.testing.assert_array_equal(client["y"], labels)
            # The model sees FedJAX's convention, 1 - pixels, to float32 rounding.
            model = data.client(index)["x"][..., 0]
            np.testing.assert_allclose(model, 1.0 - background_pixels(levels), rtol=0, atol=6e-8)
    for other in results[1:]:
        for name in ("x", "y"):
            np.testing.assert_array_equal(other.fields[name], results[0].fields[name])
            assert other.fields[name].dtype == results[0].fields[name].dtype
        np.testing.assert_array_equal(other.offsets, results[0].offsets)


def test_off_grid_pixels_fall_back_to_float32(tmp_path):
    writers = make_writers(sizes=(2, 3))

    def jittered(levels):
        return np.clip(background_pixels(levels) + np.float32(0.3 / 255), 0, 1)

    write_tff_h5(tmp_path / "odd.h5", writers, pixels=jittered)
    data = read_tff_emnist(tmp_path / "odd.h5")
    assert data.fields["x"].dtype == np.float32 and data.field_scales == {}
    name = min(writers)
    np.testing.assert_array_equal(
        data.client(0)["x"][..., 0], np.float32(1) - jittered(writers[name][0])
    )
    with pytest.raises(ValueError, match="odd.h5: pixels are not multiples of 1/255"):
        read_tff_emnist(tmp_path / "odd.h5", pixel_dtype="uint8")


def test_published_counts_are_checked_and_a_mismatch_names_the_file(tmp_path):
    writers = make_writers(sizes=(3, 4))
    write_tff_h5(tmp_path / "fed_emnist_train.h5", writers)
    right = SplitFacts(num_clients=2, num_examples=7)
    assert read_tff_emnist(tmp_path / "fed_emnist_train.h5", expected=right).total_examples == 7
    published = emnist.PUBLISHED_FACTS[(False, "train")]
    assert (published.num_clients, published.num_examples) == (3400, 671_585)
    with pytest.raises(
        ValueError, match=r"fed_emnist_train.h5 holds 2 clients and 7 examples.*3,400"
    ):
        read_tff_emnist(tmp_path / "fed_emnist_train.h5", expected=published)
    with pytest.warns(UserWarning, match="fed_emnist_train.h5 holds 2 clients"):
        read_tff_emnist(tmp_path / "fed_emnist_train.h5", expected=published, strict=False)


def test_letters_in_a_digits_only_file_are_mislabelled(tmp_path):
    writers = make_writers(sizes=(4, 4, 4), num_classes=62, seed=5)
    write_fedjax_sqlite(tmp_path / "digits.sqlite", writers)
    has_letters = [n for n in sorted(writers) if writers[n][1].max() >= 10]
    assert has_letters  # the fixture must exercise the check
    # Rows are read in storage (hash) order, so any mislabelled writer may come first.
    writer = "|".join(has_letters)
    with pytest.raises(
        ValueError, match=rf"digits.sqlite: client '({writer})' has \d+ labels outside \[0, 10\)"
    ):
        read_fedjax_emnist(tmp_path / "digits.sqlite", only_digits=True)


def test_bad_clients_raise_or_are_dropped_with_a_count(tmp_path):
    good = make_writers(sizes=(3, 2), seed=1)
    levels = np.zeros((2, 28, 28), np.uint8)
    bad = {
        "w_empty": (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int32)),
        "w_short_labels": (levels, np.zeros(1, np.int32)),
        "w_label_99": (levels, np.array([1, 99], np.int32)),
    }
    write_tff_h5(tmp_path / "bad.h5", {**good, **bad})
    with pytest.raises(
        ValueError, match="bad.h5: client 'w_empty' has no examples.*drop_invalid=True"
    ):
        read_tff_emnist(tmp_path / "bad.h5")
    with pytest.warns(
        DroppedClientsWarning,
        match=r"bad.h5: dropped 3 of 5 clients.*1 empty.*1 label out of range.*1 length mismatch",
    ):
        data = read_tff_emnist(tmp_path / "bad.h5", drop_invalid=True)
    assert list(data.client_names) == sorted(good)
    np.testing.assert_array_equal(
        data.fields["y"], np.concatenate([good[n][1] for n in sorted(good)])
    )

    def with_nan(levels):
        pixels = background_pixels(levels)
        pixels[0, 3, 4] = np.nan
        return pixels

    write_tff_h5(tmp_path / "nan.h5", good, pixels=with_nan)
    with pytest.raises(
        ValueError, match="nan.h5: client '.*' has 1 NaN or Inf values in field 'pixels'"
    ):
        read_tff_emnist(tmp_path / "nan.h5")


def test_duplicate_client_ids_across_leaf_shards(tmp_path):
    writers = make_writers(sizes=(2, 2))
    write_leaf_json(tmp_path / "a", writers)
    write_leaf_json(tmp_path / "b", writers)
    shards = sorted((tmp_path / "a").glob("*.json")) + sorted((tmp_path / "b").glob("*.json"))
    first = next(iter(writers))  # the first user of the first shard
    with pytest.raises(ValueError, match=f"duplicate client id '{first}'"):
        read_leaf_femnist(shards)
    with pytest.raises(ValueError, match="duplicate client id"):  # dropping cannot pick a copy
        read_leaf_femnist(shards, drop_invalid=True)


def test_declared_counts_must_match_the_data(tmp_path):
    writers = make_writers(sizes=(3,))
    write_fedjax_sqlite(tmp_path / "count.sqlite", writers, num_examples=lambda name, n: n + 1)
    with pytest.raises(
        ValueError, match="count.sqlite: client .* is declared with 4 examples but holds 3"
    ):
        read_fedjax_emnist(tmp_path / "count.sqlite")
    write_leaf_json(tmp_path / "leaf", writers)
    shard = next((tmp_path / "leaf").glob("*.json"))
    content = json.loads(shard.read_text())
    content["num_samples"][0] = 7
    shard.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"{shard.name}: client .* is declared with 7 examples"):
        read_leaf_femnist(tmp_path / "leaf")


@pytest.mark.parametrize(
    "reader, suffix", [(read_tff_emnist, ".h5"), (read_fedjax_emnist, ".sqlite")]
)
def test_truncated_and_foreign_files_name_the_file(tmp_path, reader, suffix):
    h5, sqlite, _ = _write_all(tmp_path, make_writers(sizes=(40, 30)))
    whole = (h5 if suffix == ".h5" else sqlite).read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match=f"truncated{suffix} .*truncated or corrupt"):
        reader(truncated)
    foreign = tmp_path / f"foreign{suffix}"
    foreign.write_bytes(b"this is not a dataset\n" * 100)
    with pytest.raises(DataFormatError, match=f"foreign{suffix}"):
        reader(foreign)
    with pytest.raises(FileNotFoundError, match="missing"):
        reader(tmp_path / f"missing{suffix}")


def test_fedjax_blob_that_does_not_decode_names_the_client(tmp_path):
    writers = make_writers(sizes=(2, 2))
    broken = max(writers)

    def blob(name):
        good = fedjax_blob(
            {"pixels": background_pixels(writers[name][0]), "label": writers[name][1]}
        )
        return good[: len(good) // 2] if name == broken else good

    write_fedjax_sqlite(tmp_path / "blob.sqlite", writers, blob=blob)
    with pytest.raises(
        DataFormatError, match=f"blob.sqlite: client '{broken}' does not decode: not zlib"
    ):
        read_fedjax_emnist(tmp_path / "blob.sqlite")


def test_truncated_leaf_shard_and_wrong_keys(tmp_path):
    write_leaf_json(tmp_path / "leaf", make_writers(sizes=(2,)))
    shard = next((tmp_path / "leaf").glob("*.json"))
    shard.write_text(shard.read_text()[:-40])
    with pytest.raises(DataFormatError, match=f"{shard.name} is not valid JSON"):
        read_leaf_femnist(tmp_path / "leaf")
    shard.write_text(json.dumps({"users": []}))
    with pytest.raises(DataFormatError, match="not a LEAF shard"):
        read_leaf_femnist(shard)


def _tar_bz2(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        for name, path in files.items():
            tar.add(path, arcname=name)
    return buffer.getvalue()


def test_load_federated_emnist_fetches_converts_and_then_reads_the_store(tmp_path, monkeypatch):
    train, test = make_writers(sizes=(3, 2), seed=3), make_writers(sizes=(1, 1), seed=4)
    source = tmp_path / "published"
    source.mkdir()
    write_tff_h5(source / "train.h5", train)
    write_tff_h5(source / "test.h5", test)
    archive = _tar_bz2(
        {"fed_emnist_train.h5": source / "train.h5", "fed_emnist_test.h5": source / "test.h5"}
    )
    (source / "fed_emnist.tar.bz2").write_bytes(archive)
    remote = RemoteFile(
        "fed_emnist.tar.bz2",
        (source / "fed_emnist.tar.bz2").as_uri(),
        hashlib.sha256(archive).hexdigest(),
    )
    monkeypatch.setitem(emnist.TFF_ARCHIVES, False, remote)
    monkeypatch.setitem(emnist.PUBLISHED_FACTS, (False, "train"), SplitFacts(2, 5))
    monkeypatch.setitem(emnist.PUBLISHED_FACTS, (False, "test"), SplitFacts(2, 2))
    cache = tmp_path / "cache"
    dataset = load_federated_emnist(data_dir=cache, progress=False)
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == (
        "federated_emnist",
        62,
        (28, 28, 1),
    )
    assert isinstance(dataset.train.fields["x"], np.memmap)
    expected = read_tff_emnist(source / "train.h5")
    np.testing.assert_array_equal(dataset.train.fields["x"], expected.fields["x"])
    assert list(dataset.train.client_names) == sorted(train)
    # The second load opens the store: the published files are no longer needed.
    for path in list(cache.glob("fed_emnist*")):
        path.unlink()
    again = load_federated_emnist(data_dir=cache, download=False)
    np.testing.assert_array_equal(
        again.test.fields["y"], np.concatenate([test[n][1] for n in sorted(test)])
    )


def test_load_federated_emnist_from_fedjax_sqlite_over_a_file_url(tmp_path, monkeypatch):
    writers = make_writers(sizes=(2, 3), num_classes=10, seed=8)
    source = tmp_path / "published"
    source.mkdir()
    for split in ("train", "test"):
        write_fedjax_sqlite(source / f"federated_emnist_digitsonly_{split}.sqlite", writers)
    monkeypatch.setattr(emnist, "_FEDJAX_URL", source.as_uri() + "/")
    for split in ("train", "test"):
        monkeypatch.setitem(emnist.PUBLISHED_FACTS, (True, split), SplitFacts(2, 5))
    dataset = load_federated_emnist(
        True, source="fedjax", data_dir=tmp_path / "cache", progress=False
    )
    assert (dataset.name, dataset.num_classes) == ("federated_emnist_digits", 10)
    np.testing.assert_array_equal(
        dataset.train.fields["y"], np.concatenate([writers[n][1] for n in sorted(writers)])
    )


def test_offline_load_says_which_file_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAXSIM_DATA_DIR", str(tmp_path / "env_cache"))
    with pytest.raises(DatasetUnavailableError) as raised:
        load_federated_emnist(download=False)
    message = str(raised.value)
    assert str(tmp_path / "env_cache" / "fed_emnist.tar.bz2") in message
    assert "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2" in message
    with pytest.raises(ValueError, match="source must be one of"):
        load_federated_emnist(source="leaf")
