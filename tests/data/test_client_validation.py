import numpy as np
import pytest

from fedjaxsim.data import DATASETS, load_dataset
from fedjaxsim.data.federated import FederatedData
from fedjaxsim.data.validation import (
    ClientCollector,
    DroppedClientsWarning,
    validate_federated_data,
)


def _data():
    x = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    y = np.array([0, 1, 2, 1, 0, 2, 1], np.int32)
    # Clients: a = rows 0-1, b = none, c = rows 2-4, d = rows 5-6.
    return FederatedData({"x": x, "y": y}, np.array([0, 2, 2, 5, 7]), ["a", "b", "c", "d"])


def test_valid_population_is_returned_unchanged():
    data = _data()
    valid = FederatedData(data.fields, np.array([0, 2, 5, 7]), ["a", "c", "d"])
    assert validate_federated_data(valid, num_classes=3) is valid


def test_each_problem_names_the_first_bad_client():
    data = _data()
    with pytest.raises(ValueError, match="toy: client 'b' has no examples"):
        validate_federated_data(data, num_classes=3, source="toy")
    valid = data.select([0, 2, 3])
    with pytest.raises(ValueError, match=r"client 'c' has labels outside \[0, 2\)"):
        validate_federated_data(valid, num_classes=2)
    x = valid.fields["x"].copy()
    x[6, 1] = np.inf
    with pytest.raises(ValueError, match="client 'd' has NaN or Inf values in field 'x'"):
        validate_federated_data(
            FederatedData({"x": x, "y": valid.fields["y"]}, valid.offsets, ["a", "c", "d"]),
            num_classes=3,
        )


def test_drop_invalid_keeps_exactly_the_valid_clients_and_counts_the_rest():
    data = _data()
    x = data.fields["x"].copy()
    x[0, 0] = np.nan  # client a
    y = data.fields["y"].copy()
    y[3] = 9  # client c
    bad = FederatedData({"x": x, "y": y}, data.offsets, data.client_names)
    with pytest.warns(
        DroppedClientsWarning,
        match=r"dropped 3 of 4 clients.*1 client\(s\) has NaN.*1 client\(s\) has labels outside.*1 client\(s\) has no examples",
    ):
        kept = validate_federated_data(bad, num_classes=3, drop_invalid=True)
    assert list(kept.client_names) == ["d"]
    np.testing.assert_array_equal(kept.fields["x"], x[5:7])
    np.testing.assert_array_equal(kept.fields["y"], y[5:7])


def test_collector_checks_lengths_labels_and_duplicates():
    collector = ClientCollector("file.bin", num_classes=3)
    assert collector.add("a", {"x": np.zeros((2, 1)), "y": np.array([0, 2])})
    with pytest.raises(
        ValueError, match=r"file.bin: client 'b' has fields of different lengths \{'x': 2, 'y': 1\}"
    ):
        collector.add("b", {"x": np.zeros((2, 1)), "y": np.array([0])})
    with pytest.raises(ValueError, match="file.bin: duplicate client id 'a'"):
        collector.add("a", {"x": np.zeros((1, 1)), "y": np.array([1])})
    with pytest.raises(ValueError, match="non-integer labels"):
        collector.add("c", {"x": np.zeros((1, 1)), "y": np.array([0.5])})
    data = collector.finish()
    assert list(data.client_names) == ["a"]


def test_unknown_dataset_name_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'fashion-mnist' \(did you mean 'fashion_mnist'\?\)"
    ):
        load_dataset("fashion-mnist")
    assert {
        "digits",
        "federated_emnist",
        "federated_emnist_digits",
        "mnist",
        "emnist/byclass",
        "fashion_mnist",
        "cifar10",
        "cifar100",
    } <= set(DATASETS)
    digits = load_dataset("digits", num_clients=5, seed=1)
    assert digits.train.num_clients == 5 and digits.num_classes == 10
