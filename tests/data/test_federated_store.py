import json

import numpy as np
import pytest

from fedjaxsim.core.packing import PackingConfig, pack_cohort
from fedjaxsim.data.federated import FederatedData, FederatedDataset, LazyClientNames
from fedjaxsim.data.store import (
    StoreError,
    read_dataset,
    read_federated_data,
    write_dataset,
    write_federated_data,
)


def _population(sizes=(3, 1, 4), seed=0):
    rng = np.random.default_rng(seed)
    clients = [
        {
            "x": rng.integers(0, 256, size=(n, 2, 3), dtype=np.uint8),
            "y": rng.integers(0, 10, size=n).astype(np.int32),
        }
        for n in sizes
    ]
    names = [f"writer_{i}" for i in range(len(sizes))]
    return clients, FederatedData.from_clients(clients, names, {"x": 255.0})


def test_round_trip_is_memory_mapped_and_decodes_at_gather(tmp_path):
    clients, data = _population()
    write_federated_data(data, tmp_path / "store", metadata={"source": "unit test"})
    loaded = read_federated_data(tmp_path / "store", verify=True)
    assert isinstance(loaded.fields["x"], np.memmap) and isinstance(loaded.fields["y"], np.memmap)
    assert loaded.fields["x"].dtype == np.uint8
    np.testing.assert_array_equal(loaded.offsets, [0, 3, 4, 8])
    assert list(loaded.client_names) == ["writer_0", "writer_1", "writer_2"]
    for index in (2, 0):
        raw = loaded.client(index, decode=False)
        np.testing.assert_array_equal(raw["x"], clients[index]["x"])
        model = loaded.client(index)
        assert model["x"].dtype == np.float32
        # Independent expectation: the float32 quotient k / 255 for every level k.
        expected = (clients[index]["x"].astype(np.float64) / 255.0).astype(np.float32)
        np.testing.assert_array_equal(model["x"], expected)
        np.testing.assert_array_equal(model["y"], clients[index]["y"])
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["metadata"] == {"source": "unit test"}
    assert manifest["fields"]["x"]["scale"] == 255.0


def test_packing_a_cohort_from_the_store_matches_in_memory_clients(tmp_path):
    clients, data = _population(sizes=(5, 2, 7, 1))
    write_federated_data(data, tmp_path / "store")
    loaded = read_federated_data(tmp_path / "store")
    ids = [3, 0, 2]
    config = PackingConfig(batch_size=3)
    from_store = pack_cohort(
        loaded.clients(ids), ids, config, seed=1, round_index=4, num_total_clients=4
    )
    decoded = [{"x": c["x"].astype(np.float32) / np.float32(255), "y": c["y"]} for c in clients]
    reference = pack_cohort(
        [decoded[i] for i in ids], ids, config, seed=1, round_index=4, num_total_clients=4
    )
    np.testing.assert_array_equal(from_store.data["x"], reference.data["x"])
    np.testing.assert_array_equal(from_store.data["y"], reference.data["y"])
    # Packing the stored uint8 and decoding afterwards gives the same cohort.
    raw = pack_cohort(
        loaded.clients(ids, decode=False), ids, config, seed=1, round_index=4, num_total_clients=4
    )
    np.testing.assert_array_equal(loaded.decode(raw.data)["x"], reference.data["x"])


def test_million_clients_load_lazily_and_gather_a_cohort(tmp_path):
    num_clients = 1_000_000
    sizes = np.tile([1, 2], num_clients // 2)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.arange(offsets[-1], dtype=np.int64)
    names = [f"c{i}" for i in range(num_clients)]
    data = FederatedData({"row": rows}, offsets, names)
    write_federated_data(data, tmp_path / "big")
    loaded = read_federated_data(tmp_path / "big")
    assert isinstance(loaded.fields["row"], np.memmap)
    assert isinstance(loaded.client_names, LazyClientNames)
    cohort = loaded.clients([999_999, 12, 500_001])
    # Client i owns rows offsets[i]:offsets[i+1], i.e. 1.5 * i rounded down onwards.
    np.testing.assert_array_equal(cohort[0]["row"], [1_499_998, 1_499_999])
    np.testing.assert_array_equal(cohort[1]["row"], [18])
    np.testing.assert_array_equal(cohort[2]["row"], [750_001, 750_002])
    assert loaded.client_names._names is None  # gathering never parsed the names
    assert loaded.client_names[123_456] == "c123456"


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    _, first = _population(seed=1)
    _, second = _population(sizes=(2, 2), seed=2)
    write_federated_data(first, tmp_path / "store")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_federated_data(second, tmp_path / "store")
    assert read_federated_data(tmp_path / "store").num_clients == 3
    write_federated_data(second, tmp_path / "store", overwrite=True)
    assert read_federated_data(tmp_path / "store").num_clients == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary folders left


def test_bad_field_name_writes_nothing(tmp_path):
    data = FederatedData({"../x": np.zeros(2)}, np.array([0, 2]))
    with pytest.raises(ValueError, match="cannot name a file"):
        write_federated_data(data, tmp_path / "store")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_truncated_and_foreign_stores_name_the_file(tmp_path):
    _, data = _population()
    store = write_federated_data(data, tmp_path / "store")
    field = store / "field_x.npy"
    original = field.read_bytes()
    corrupt = bytearray(original)
    corrupt[-1] ^= 0xFF
    field.write_bytes(bytes(corrupt))
    read_federated_data(store)  # same size, dtype and shape: only a hash can tell
    with pytest.raises(StoreError, match="field_x.npy has sha256 .* corrupt"):
        read_federated_data(store, verify=True)
    field.write_bytes(original[:-5])
    with pytest.raises(StoreError, match="field_x.npy has .* bytes .* truncated"):
        read_federated_data(store)
    field.unlink()
    with pytest.raises(StoreError, match="field_x.npy is missing"):
        read_federated_data(store)
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json is not readable JSON"):
        read_federated_data(store)
    (store / "manifest.json").write_text(
        json.dumps({"format": "fedjaxsim-federated-data", "version": 99})
    )
    with pytest.raises(StoreError, match="store version 99"):
        read_federated_data(store)
    with pytest.raises(StoreError, match="not a fedjaxsim data store"):
        read_federated_data(tmp_path / "nowhere")


def test_dataset_round_trip(tmp_path):
    _, train = _population()
    _, test = _population(sizes=(6,), seed=3)
    dataset = FederatedDataset("toy", train, test, num_classes=10, input_shape=(2, 3))
    write_dataset(dataset, tmp_path / "toy")
    loaded = read_dataset(tmp_path / "toy")
    assert (loaded.name, loaded.num_classes, loaded.input_shape) == ("toy", 10, (2, 3))
    np.testing.assert_array_equal(loaded.test.all_examples(decode=False)["x"], test.fields["x"])
    np.testing.assert_array_equal(loaded.train.fields["y"], train.fields["y"])


def test_federated_data_rejects_duplicate_names_and_bad_scales():
    fields = {"x": np.zeros((3, 1))}
    with pytest.raises(ValueError, match="duplicate client ids: 'a'"):
        FederatedData(fields, np.array([0, 1, 3]), ["a", "a"])
    with pytest.raises(ValueError, match="scale of field 'x'"):
        FederatedData(fields, np.array([0, 3]), field_scales={"x": 0.0})
    with pytest.raises(ValueError, match="not a field"):
        FederatedData(fields, np.array([0, 3]), field_scales={"z": 2.0})
