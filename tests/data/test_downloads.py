"""The download path against a local HTTP server on 127.0.0.1 (no outside network)."""

import hashlib
import http.server
import io
import socket
import tarfile
import threading
from typing import ClassVar

import pytest

from fedjaxsim.data import download
from fedjaxsim.data.download import (
    ChecksumError,
    DatasetUnavailableError,
    RemoteFile,
    extract_members,
    fetch,
    resolve_data_dir,
)
from fedjaxsim.data.formats import DataFormatError

PAYLOAD = bytes(range(256)) * 9000  # 2.3 MB: several read chunks


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self):  # the name http.server calls
        type(self).requests.append(self.path)
        if self.path == "/data.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/truncated.bin":
            # Promises the whole payload, sends a third, then closes.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_download_verifies_renames_and_then_uses_the_cache(server, tmp_path):
    remote = RemoteFile("data.bin", f"{server}/data.bin", SHA)
    before = len(_Handler.requests)
    path = fetch(remote, tmp_path, progress=True)
    assert path == tmp_path / "data.bin" and path.read_bytes() == PAYLOAD
    assert fetch(remote, tmp_path, progress=False) == path
    assert len(_Handler.requests) == before + 1  # the second call never asked the server
    assert _leftovers(tmp_path) == []


def test_wrong_checksum_leaves_nothing_behind(server, tmp_path):
    remote = RemoteFile("data.bin", f"{server}/data.bin", "0" * 64)
    with pytest.raises(ChecksumError, match="published sha256 is 0000"):
        fetch(remote, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_broken_off_transfer_is_an_error_not_a_short_file(server, tmp_path):
    remote = RemoteFile("data.bin", f"{server}/truncated.bin", None)
    with pytest.raises(DatasetUnavailableError, match="truncated.bin"):
        fetch(remote, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_no_network_say_where_to_place_the_file(server, tmp_path):
    with pytest.raises(DatasetUnavailableError, match=rf"404.*place it at {tmp_path / 'gone.bin'}"):
        fetch(RemoteFile("gone.bin", f"{server}/gone.bin", None), tmp_path, progress=False)
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    remote = RemoteFile("data.bin", f"http://127.0.0.1:{closed_port}/data.bin", SHA)
    with pytest.raises(DatasetUnavailableError) as raised:
        fetch(remote, tmp_path, progress=False, timeout=5)
    assert f"place it at {tmp_path / 'data.bin'}" in str(raised.value)
    assert f"sha256 {SHA}" in str(raised.value)
    with pytest.raises(DatasetUnavailableError, match="does not exist.*FEDJAXSIM_DATA_DIR"):
        fetch(remote, tmp_path, download=False)


def test_a_corrupt_cached_file_is_named(tmp_path):
    (tmp_path / "data.bin").write_bytes(PAYLOAD[:-1])
    with pytest.raises(ChecksumError, match=rf"{tmp_path / 'data.bin'} has sha256 .* Delete it"):
        fetch(RemoteFile("data.bin", "http://127.0.0.1:9/data.bin", SHA), tmp_path, download=False)


def test_file_urls_work(tmp_path):
    source = tmp_path / "published" / "data.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = fetch(RemoteFile("data.bin", source.as_uri(), SHA), tmp_path / "cache", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(download.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "fedjaxsim"
    monkeypatch.setenv(download.ENV_DATA_DIR, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def _archive(tmp_path, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path = tmp_path / "bundle.tar.bz2"
    path.write_bytes(buffer.getvalue())
    return path


def test_extract_members(tmp_path):
    archive = _archive(tmp_path, {"datasets/a.h5": PAYLOAD, "b.h5": b"bee"})
    out = extract_members(archive, {"a.h5": tmp_path / "out" / "a.h5"})
    assert out["a.h5"].read_bytes() == PAYLOAD
    assert not (tmp_path / "out" / "b.h5").exists()
    with pytest.raises(DataFormatError, match="bundle.tar.bz2 has no regular file named c.h5"):
        extract_members(archive, {"c.h5": tmp_path / "out" / "c.h5"})
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match="bundle.tar.bz2 is not a readable tar archive"):
        extract_members(archive, {"b.h5": tmp_path / "out" / "b.h5"})
    assert _leftovers(tmp_path / "out") == []
