import hashlib

import numpy as np
import pytest

from fedjaxsim.data import fed_cifar100
from fedjaxsim.data.download import ChecksumError, DatasetUnavailableError, RemoteFile
from fedjaxsim.data.emnist import SplitFacts
from fedjaxsim.data.fed_cifar100 import (
    load_fed_cifar100,
    read_fedjax_fed_cifar100,
    read_tff_fed_cifar100,
)
from fedjaxsim.data.formats import DataFormatError
from fedjaxsim.data.validation import DroppedClientsWarning
from tests.data.benchmark_files import (
    make_cifar_clients,
    tar_bz2,
    write_fedjax_cifar_sqlite,
    write_tff_cifar_h5,
)


def test_published_facts_and_pins():
    assert fed_cifar100.PUBLISHED_FACTS["train"] == SplitFacts(500, 50_000)
    assert fed_cifar100.PUBLISHED_FACTS["test"] == SplitFacts(100, 10_000)
    assert fed_cifar100.TFF_ARCHIVE.url.endswith("/tff-datasets-public/fed_cifar100.tar.bz2")


def test_tff_and_fedjax_give_identical_clients(tmp_path):
    clients = make_cifar_clients(sizes=(3, 1, 4, 2))
    write_tff_cifar_h5(tmp_path / "c.h5", clients)
    write_fedjax_cifar_sqlite(tmp_path / "c.sqlite", clients)
    results = [
        read_tff_fed_cifar100(tmp_path / "c.h5"),
        read_fedjax_fed_cifar100(tmp_path / "c.sqlite"),
    ]
    names = sorted(clients)
    for data in results:
        assert list(data.client_names) == names
        assert data.field_scales == {"x": 255.0}
        assert data.fields["x"].dtype == np.uint8 and data.fields["x"].shape[1:] == (32, 32, 3)
        assert data.fields["y"].dtype == np.int32
        for index, name in enumerate(names):
            stored = data.client(index, decode=False)
            np.testing.assert_array_equal(stored["x"], clients[name]["image"])
            np.testing.assert_array_equal(stored["y"], clients[name]["label"])
            np.testing.assert_array_equal(
                data.client(index)["x"], clients[name]["image"] / np.float32(255)
            )
    for name in ("x", "y"):
        np.testing.assert_array_equal(results[1].fields[name], results[0].fields[name])
    np.testing.assert_array_equal(results[1].offsets, results[0].offsets)


def test_bad_labels_and_shapes_raise_or_are_dropped(tmp_path):
    good = make_cifar_clients(sizes=(2, 2), seed=1)
    bad_label = make_cifar_clients(sizes=(2,), seed=2)["3"]
    bad_label["label"] = np.array([5, 100], np.int64)
    bad_shape = make_cifar_clients(sizes=(2,), seed=3)["3"]
    bad_shape["image"] = np.zeros((2, 28, 28, 3), np.uint8)
    empty = {k: v[:0] for k, v in make_cifar_clients(sizes=(1,), seed=4)["3"].items()}
    write_tff_cifar_h5(tmp_path / "label.h5", {**good, "c_label": bad_label})
    with pytest.raises(
        ValueError, match=r"label.h5: client 'c_label' has 1 labels outside \[0, 100\)"
    ):
        read_tff_fed_cifar100(tmp_path / "label.h5")
    write_fedjax_cifar_sqlite(tmp_path / "shape.sqlite", {**good, "c_shape": bad_shape})
    with pytest.raises(
        ValueError, match=r"shape.sqlite: client 'c_shape' has images of shape \(28, 28, 3\)"
    ):
        read_fedjax_fed_cifar100(tmp_path / "shape.sqlite")
    write_tff_cifar_h5(
        tmp_path / "all.h5", {**good, "c_label": bad_label, "c_shape": bad_shape, "c_empty": empty}
    )
    with pytest.raises(ValueError, match="all.h5: client 'c_empty' has no examples"):
        read_tff_fed_cifar100(tmp_path / "all.h5")
    with pytest.warns(DroppedClientsWarning, match="dropped 3 of 5 clients"):
        data = read_tff_fed_cifar100(tmp_path / "all.h5", drop_invalid=True)
    assert list(data.client_names) == sorted(good)


@pytest.mark.parametrize(
    "reader, suffix", [(read_tff_fed_cifar100, ".h5"), (read_fedjax_fed_cifar100, ".sqlite")]
)
def test_truncated_and_foreign_files_name_the_file(tmp_path, reader, suffix):
    clients = make_cifar_clients(sizes=(20, 20))
    path = tmp_path / f"whole{suffix}"
    (write_tff_cifar_h5 if suffix == ".h5" else write_fedjax_cifar_sqlite)(path, clients)
    whole = path.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match=f"truncated{suffix}.*(truncated|corrupt)"):
        reader(truncated)
    foreign = tmp_path / f"foreign{suffix}"
    foreign.write_bytes(b"not a dataset\n" * 200)
    with pytest.raises(DataFormatError, match=f"foreign{suffix}"):
        reader(foreign)


def test_published_counts_are_checked(tmp_path):
    write_tff_cifar_h5(tmp_path / "fed_cifar100_train.h5", make_cifar_clients(sizes=(3, 4)))
    path = tmp_path / "fed_cifar100_train.h5"
    assert read_tff_fed_cifar100(path, expected=SplitFacts(2, 7)).total_examples == 7
    with pytest.raises(
        ValueError, match=r"fed_cifar100_train.h5 holds 2 clients and 7 examples.*500"
    ):
        read_tff_fed_cifar100(path, expected=fed_cifar100.PUBLISHED_FACTS["train"])
    with pytest.warns(UserWarning, match="fed_cifar100_train.h5 holds 2 clients"):
        read_tff_fed_cifar100(path, expected=fed_cifar100.PUBLISHED_FACTS["train"], strict=False)


def test_load_converts_once_then_reads_the_store(tmp_path, monkeypatch):
    train, test = make_cifar_clients(sizes=(3, 2), seed=5), make_cifar_clients(sizes=(1,), seed=6)
    source = tmp_path / "published"
    source.mkdir()
    write_tff_cifar_h5(source / "train.h5", train)
    write_tff_cifar_h5(source / "test.h5", test)
    archive = source / "fed_cifar100.tar.bz2"
    digest = tar_bz2(
        archive,
        {"fed_cifar100_train.h5": source / "train.h5", "fed_cifar100_test.h5": source / "test.h5"},
    )
    monkeypatch.setattr(
        fed_cifar100, "TFF_ARCHIVE", RemoteFile(archive.name, archive.as_uri(), digest)
    )
    monkeypatch.setitem(fed_cifar100.PUBLISHED_FACTS, "train", SplitFacts(2, 5))
    monkeypatch.setitem(fed_cifar100.PUBLISHED_FACTS, "test", SplitFacts(1, 1))
    cache = tmp_path / "cache"
    dataset = load_fed_cifar100(data_dir=cache, progress=False)
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == (
        "fed_cifar100",
        100,
        (32, 32, 3),
    )
    assert dataset.task.kind == "classification"
    assert isinstance(dataset.train.fields["x"], np.memmap)
    assert dataset.train.field_scales == {"x": 255.0}
    np.testing.assert_array_equal(
        dataset.train.fields["y"], np.concatenate([train[n]["label"] for n in sorted(train)])
    )
    for path in list(cache.glob("fed_cifar100*.*")):
        path.unlink()
    again = load_fed_cifar100(data_dir=cache, download=False)
    np.testing.assert_array_equal(again.test.fields["x"], test[next(iter(test))]["image"])


def test_load_fedjax_files_from_the_cache_verified_by_sha256(tmp_path, monkeypatch):
    clients = make_cifar_clients(sizes=(2, 2), seed=7)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(DatasetUnavailableError) as raised:
        load_fed_cifar100(source="fedjax", data_dir=cache)
    assert str(cache / "federated_cifar100_train.sqlite") in str(raised.value)
    assert "cifar100.sqlite.lzma" in str(raised.value)
    for split in ("train", "test"):
        write_fedjax_cifar_sqlite(cache / f"federated_cifar100_{split}.sqlite", clients)
    with pytest.raises(ChecksumError, match="federated_cifar100_train.sqlite has sha256"):
        load_fed_cifar100(source="fedjax", data_dir=cache)
    for split in ("train", "test"):
        digest = hashlib.sha256(
            (cache / f"federated_cifar100_{split}.sqlite").read_bytes()
        ).hexdigest()
        monkeypatch.setitem(fed_cifar100.FEDJAX_SQLITE_SHA256, split, digest)
        monkeypatch.setitem(fed_cifar100.PUBLISHED_FACTS, split, SplitFacts(2, 4))
    dataset = load_fed_cifar100(source="fedjax", data_dir=cache)
    assert list(dataset.train.client_names) == sorted(clients)


def test_offline_load_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAXSIM_DATA_DIR", str(tmp_path / "env_cache"))
    with pytest.raises(DatasetUnavailableError) as raised:
        load_fed_cifar100(download=False)
    assert str(tmp_path / "env_cache" / "fed_cifar100.tar.bz2") in str(raised.value)
    assert "fed_cifar100_train.h5 and fed_cifar100_test.h5" in str(raised.value)
    with pytest.raises(ValueError, match="source must be one of"):
        load_fed_cifar100(source="leaf")
