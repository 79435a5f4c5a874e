"""TFDS loaders on tfds.testing.mock_data: no download, no TensorFlow."""

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="pip install 'fedjaxsim[tfds]'")

from fedjaxsim.data import tfds_images
from fedjaxsim.data.download import DatasetUnavailableError
from fedjaxsim.data.partition import iid_partition
from fedjaxsim.data.tfds_images import TFDS_IMAGE_DATASETS, federated_tfds

NUM_EXAMPLES = 24


def _direct(name, split):
    """The mock's examples read straight from tfds.data_source (inside mock_data)."""
    source = tfds.data_source(name, split=split)
    images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
    labels = np.array([int(source[i]["label"]) for i in range(len(source))])
    return images, labels


@pytest.mark.parametrize("name", list(TFDS_IMAGE_DATASETS))
def test_federated_tfds_partitions_exactly_the_tfds_examples(name, tmp_path):
    spec = TFDS_IMAGE_DATASETS[name]
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        dataset = federated_tfds(name, num_clients=4, partition="iid", seed=7, data_dir=tmp_path)
        images, labels = _direct(name, "train")
        test_images, test_labels = _direct(name, "test")
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == (
        name,
        spec.num_classes,
        spec.image_shape,
    )
    if spec.transpose:  # TFDS keeps EMNIST's transposed layout; fedjaxsim stands it upright
        images, test_images = images.transpose(0, 2, 1, 3), test_images.transpose(0, 2, 1, 3)
    assignment = iid_partition(NUM_EXAMPLES, 4, seed=7)
    for index, part in enumerate(assignment):
        raw = dataset.train.client(index, decode=False)
        np.testing.assert_array_equal(raw["x"], images[part])
        np.testing.assert_array_equal(raw["y"], labels[part])
        model = dataset.train.client(index)["x"]
        np.testing.assert_array_equal(model, (images[part] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(dataset.test.all_examples(decode=False)["x"], test_images)
    np.testing.assert_array_equal(dataset.test.all_examples()["y"], test_labels)
    assert "tensorflow" not in sys.modules


def test_arrays_are_cached_so_the_second_load_skips_tfds(tmp_path, monkeypatch):
    with tfds.testing.mock_data(num_examples=10):
        first = federated_tfds(
            "mnist", num_clients=2, partition="shards", shards_per_client=1, data_dir=tmp_path
        )

    def unavailable(*args, **kwargs):
        raise AssertionError("TFDS was asked again")

    monkeypatch.setattr(tfds_images, "read_tfds_split", unavailable)
    second = federated_tfds(
        "mnist", num_clients=2, partition="shards", shards_per_client=1, data_dir=tmp_path
    )
    assert isinstance(second.train.fields["x"], np.ndarray)
    np.testing.assert_array_equal(second.train.fields["x"], first.train.fields["x"])
    np.testing.assert_array_equal(second.train.offsets, first.train.offsets)


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(
        DatasetUnavailableError, match="tfds build mnist --file_format=array_record"
    ):
        federated_tfds(
            "mnist", data_dir=tmp_path / "cache", tfds_data_dir=tmp_path / "tfds", download=False
        )


def test_unknown_tfds_name_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"unknown TFDS image dataset 'cifar1000' \(did you mean 'cifar100'"
    ):
        federated_tfds("cifar1000")
