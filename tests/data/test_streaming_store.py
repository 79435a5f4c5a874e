"""The streaming store writer: same bytes as write_federated_data, one client in
memory at a time, and an interrupted run that resumes to identical bytes."""

import json
import weakref

import numpy as np
import pytest

from fedjaxsim.data import streaming_store
from fedjaxsim.data.federated import FederatedData
from fedjaxsim.data.store import StoreError, read_federated_data, write_federated_data
from fedjaxsim.data.streaming_store import (
    FieldSpec,
    StreamedClient,
    partial_folder,
    write_federated_data_streaming,
)

FIELDS = {"x": FieldSpec(np.uint8, (2, 3), scale=255.0), "y": FieldSpec(np.int32)}


class Interrupted(Exception):
    """Stands in for Ctrl-C or a kill at a chosen client."""


def _clients(sizes=(3, 1, 4, 0, 2, 5, 1, 2), seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            f"user_{(7 * i) % len(sizes):02d}_{i}",
            {
                "x": rng.integers(0, 256, size=(n, 2, 3), dtype=np.uint8),
                "y": rng.integers(-5, 10, size=n).astype(np.int32),
            },
        )
        for i, n in enumerate(sizes)
    ]


def _source(clients, starts=None, fail_at=None, counts=False):
    """clients(start) as the writer wants it; records each start, and raises
    Interrupted when asked for client ``fail_at``."""

    def stream(start):
        if starts is not None:
            starts.append(start)
        for index in range(start, len(clients)):
            if index == fail_at:
                raise Interrupted(index)
            name, fields = clients[index]
            extra = {"rows": len(fields["y"]), "clients": 1} if counts else {}
            yield StreamedClient(name, {k: v.copy() for k, v in fields.items()}, extra)

    return stream


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _write(clients, folder, **options):
    options = {"progress": False, "checkpoint_every": 3, **options}
    return write_federated_data_streaming(
        options.pop("source", None) or _source(clients),
        folder,
        num_clients=len(clients),
        fields=FIELDS,
        **options,
    )


def test_streamed_store_has_the_bytes_of_write_federated_data(tmp_path):
    clients = _clients()
    data = FederatedData.from_clients(
        [fields for _, fields in clients], [name for name, _ in clients], {"x": 255.0}
    )
    write_federated_data(data, tmp_path / "direct", metadata={"source": "unit test"})
    _write(clients, tmp_path / "streamed", metadata={"source": "unit test"})
    assert _files(tmp_path / "streamed") == _files(tmp_path / "direct")
    loaded = read_federated_data(tmp_path / "streamed", verify=True)
    assert isinstance(loaded.fields["x"], np.memmap)
    assert list(loaded.client_names) == [name for name, _ in clients]
    for index, (_, fields) in enumerate(clients):
        raw = loaded.client(index, decode=False)
        for name in ("x", "y"):
            np.testing.assert_array_equal(raw[name], fields[name])
    assert not partial_folder(tmp_path / "streamed").exists()


@pytest.mark.parametrize("fail_at", [1, 3, 5, 7])
def test_an_interrupted_conversion_resumes_to_identical_bytes(tmp_path, fail_at):
    clients = _clients()
    _write(clients, tmp_path / "whole", source=_source(clients, counts=True))

    final = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        _write(clients, final, source=_source(clients, fail_at=fail_at, counts=True))
    # Nothing is at the final path for a reader to open.
    assert not final.exists()
    with pytest.raises(StoreError):
        read_federated_data(final)
    work = partial_folder(final)
    progress = json.loads((work / "progress.json").read_text())
    assert progress["clients_done"] == fail_at // 3 * 3  # the last checkpoint
    # A kill while writing leaves bytes past the checkpoint in every file.
    for path in work.iterdir():
        if path.name != "progress.json":
            with open(path, "ab") as file:
                file.write(b"\x07half-written client")

    starts = []
    _write(clients, final, source=_source(clients, starts=starts, counts=True))
    assert starts == [fail_at // 3 * 3]
    assert _files(final) == _files(tmp_path / "whole")
    manifest = json.loads((final / "manifest.json").read_text())
    # Counts of the clients written twice are summed once.
    assert manifest["metadata"]["counts"] == {
        "clients": len(clients),
        "rows": sum(len(fields["y"]) for _, fields in clients),
    }
    assert not work.exists()


def test_a_partial_conversion_of_another_source_starts_over(tmp_path):
    clients = _clients()
    final = tmp_path / "store"
    with pytest.raises(Interrupted):
        _write(clients, final, source=_source(clients, fail_at=5), source_key={"file": "a"})
    starts = []
    _write(clients, final, source=_source(clients, starts=starts), source_key={"file": "b"})
    assert starts == [0]
    _write(clients, tmp_path / "whole")
    assert _files(final) == _files(tmp_path / "whole")


def test_a_crash_after_the_manifest_only_renames(tmp_path, monkeypatch):
    clients = _clients()
    final = tmp_path / "store"
    calls = []

    def failing_rename(temporary, final, *, overwrite):
        calls.append(temporary)
        raise Interrupted("killed before the rename")

    monkeypatch.setattr(streaming_store, "replace_folder", failing_rename)
    with pytest.raises(Interrupted):
        _write(clients, final)
    monkeypatch.undo()
    starts = []
    _write(clients, final, source=_source(clients, starts=starts))
    assert starts == [] and calls == [partial_folder(final)]
    _write(clients, tmp_path / "whole")
    assert _files(final) == _files(tmp_path / "whole")

    # A finished folder of another source is not taken for this one.
    monkeypatch.setattr(streaming_store, "replace_folder", failing_rename)
    with pytest.raises(Interrupted):
        _write(clients[:3], tmp_path / "other", source_key="old")
    monkeypatch.undo()
    _write(clients, tmp_path / "other", source=_source(clients, starts=starts), source_key="new")
    assert starts == [0]
    assert _files(tmp_path / "other") == _files(tmp_path / "whole")


def test_the_writer_holds_one_client_at_a_time(tmp_path):
    sizes = (3, 2, 4, 1, 5)
    alive = []  # weak references to each client's arrays
    done_rows = []

    def make(index, size):
        x = np.full((size, 2, 3), index, np.uint8)
        y = np.full(size, index, np.int32)
        alive.append((weakref.ref(x), weakref.ref(y)))
        return StreamedClient(f"c{index}", {"x": x, "y": y})

    def stream(start):
        for index in range(start, len(sizes)):
            # The writer asks for the next client only after it has written
            # the previous one and let go of it.
            assert all(x() is None and y() is None for x, y in alive)
            done_rows.append(sum(sizes[:index]))
            yield make(index, sizes[index])

    write_federated_data_streaming(
        stream, tmp_path / "store", num_clients=len(sizes), fields=FIELDS, progress=False
    )
    assert done_rows == [0, 3, 5, 9, 10]
    data = read_federated_data(tmp_path / "store")
    np.testing.assert_array_equal(data.offsets, np.concatenate([[0], np.cumsum(sizes)]))
    np.testing.assert_array_equal(data.fields["y"], np.repeat(np.arange(5), sizes))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"x": np.zeros((2, 2, 3), np.uint8)}, "has fields"),
        ({"x": np.zeros((2, 3, 2), np.uint8), "y": np.zeros(2, np.int32)}, "expected rows"),
        ({"x": np.zeros((2, 2, 3), np.float32), "y": np.zeros(2, np.int32)}, "cast safely"),
        ({"x": np.zeros((2, 2, 3), np.uint8), "y": np.zeros(3, np.int32)}, "different lengths"),
    ],
)
def test_a_client_that_does_not_fit_the_fields_is_named(tmp_path, bad, message):
    clients = _clients()[:3] + [("odd_one", bad)]
    with pytest.raises(ValueError, match=f"'odd_one'.*{message}"):
        _write(clients, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_repeated_names_and_wrong_client_counts_are_refused(tmp_path):
    clients = _clients()[:3]
    twice = [*clients, (clients[0][0], clients[1][1])]
    with pytest.raises(ValueError, match="duplicate client id"):
        _write(twice, tmp_path / "a")
    with pytest.raises(ValueError, match="ended after 3 clients, expected num_clients=4"):
        write_federated_data_streaming(
            _source(clients), tmp_path / "b", num_clients=4, fields=FIELDS, progress=False
        )
    with pytest.raises(ValueError, match="more than num_clients=2"):
        write_federated_data_streaming(
            _source(clients), tmp_path / "c", num_clients=2, fields=FIELDS, progress=False
        )


def test_an_existing_store_is_kept_unless_overwrite(tmp_path):
    clients = _clients()
    _write(clients, tmp_path / "store")
    starts = []
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(clients, tmp_path / "store", source=_source(clients, starts=starts))
    assert starts == []  # refused before any work
    _write(clients[:2], tmp_path / "store", overwrite=True)
    assert read_federated_data(tmp_path / "store").num_clients == 2


def test_the_progress_bar_counts_clients_and_starts_at_the_checkpoint(tmp_path, capsys):
    clients = _clients()
    with pytest.raises(Interrupted):
        _write(clients, tmp_path / "store", source=_source(clients, fail_at=5))
    capsys.readouterr()
    _write(clients, tmp_path / "store", progress=True, description="so train")
    bar = capsys.readouterr().err
    assert "so train:" in bar and "3/8" in bar and "8/8" in bar and "client" in bar
    assert "0/8" not in bar
