"""Fetching published dataset files into a local cache folder.

The cache folder is, in order of precedence: the ``data_dir`` argument, the
``FEDJAXSIM_DATA_DIR`` environment variable, or ``fedjaxsim`` under the user's
cache folder (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux,
``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows).

A download streams into a temporary file in the same folder with a progress
bar, is checked against its length and SHA-256, and is renamed into place
only when both match, so a file under its final name is always complete.
Without network access the error names the URL and the exact path at which
to place a copy fetched elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import lzma
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

from fedjaxsim.data.formats import DataFormatError

ENV_DATA_DIR = "FEDJAXSIM_DATA_DIR"
_CHUNK = 1 << 20
# What reading a damaged tar, .bz2, .gz or .xz stream raises.
_ARCHIVE_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class DatasetUnavailableError(FileNotFoundError):
    """A dataset file is not in the cache and could not be downloaded."""


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the published one."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A published file.

    Attributes:
      filename: name under the cache folder.
      url: where it is published (``https://``, ``http://`` or ``file://``).
      sha256: hex digest to verify, or None where the publisher gives none
        (then its content is checked by the reader, e.g. example counts).
    """

    filename: str
    url: str
    sha256: str | None = None


def default_data_dir() -> Path:
    """The cache folder when neither an argument nor the variable names one."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedjaxsim"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir``, else ``$FEDJAXSIM_DATA_DIR``, else :func:`default_data_dir`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser()
    return default_data_dir()


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(total: int | None, description: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "the download progress bar needs tqdm: pip install 'fedjaxsim[data]' "
            "(or pass progress=False)"
        ) from error
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024)


def _placement_hint(remote: RemoteFile, path: Path) -> str:
    checksum = f" (sha256 {remote.sha256})" if remote.sha256 else ""
    return (
        f"Download {remote.url}{checksum} on a machine with network access and place it at "
        f"{path}; set {ENV_DATA_DIR} or pass data_dir= to use another folder."
    )


def _stream(remote: RemoteFile, path: Path, timeout: float, progress: bool) -> None:
    """Downloads to a temporary file next to ``path``, verifies, renames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".part", dir=path.parent
    )
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(descriptor, "wb") as out:
            try:
                response = urllib.request.urlopen(remote.url, timeout=timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                if isinstance(error, urllib.error.HTTPError):
                    reason = f"HTTP {error.code} {error.reason}"
                else:
                    reason = getattr(error, "reason", error)
                raise DatasetUnavailableError(
                    f"could not download {remote.url} ({reason}). {_placement_hint(remote, path)}"
                ) from error
            with response:
                length = response.headers.get("Content-Length")
                expected = int(length) if length is not None and length.isdigit() else None
                bar = _progress_bar(expected, path.name, progress)
                try:
                    while True:
                        try:
                            chunk = response.read(_CHUNK)
                        except (http.client.HTTPException, OSError) as error:
                            raise DatasetUnavailableError(
                                f"download of {remote.url} broke off after {received} bytes "
                                f"({error}). {_placement_hint(remote, path)}"
                            ) from error
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
        if expected is not None and received != expected:
            raise DatasetUnavailableError(
                f"download of {remote.url} stopped after {received} of {expected} bytes. "
                f"{_placement_hint(remote, path)}"
            )
        if remote.sha256 is not None and digest.hexdigest() != remote.sha256:
            raise ChecksumError(
                f"{remote.url} downloaded with sha256 {digest.hexdigest()}, but the published "
                f"sha256 is {remote.sha256}; nothing was written to {path}"
            )
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def fetch(
    remote: RemoteFile,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """The local path of ``remote``, downloading it into the cache if needed.

    A file already in the cache is verified against ``remote.sha256`` (when
    known) before it is used.

    Args:
      remote: the published file.
      data_dir: cache folder (see :func:`resolve_data_dir`).
      download: False never touches the network.
      progress: show a tqdm progress bar while downloading.
      timeout: seconds to wait for the server to answer.

    Returns:
      The path of the verified file.

    Raises:
      DatasetUnavailableError: not cached and not downloadable (offline,
        ``download=False``, an HTTP error or a broken-off transfer); the
        message says which file to place where.
      ChecksumError: a cached or downloaded file has the wrong SHA-256.
    """
    path = resolve_data_dir(data_dir) / remote.filename
    if path.is_file():
        if remote.sha256 is not None:
            digest = sha256_of(path)
            if digest != remote.sha256:
                raise ChecksumError(
                    f"{path} has sha256 {digest}, but {remote.url} is published with sha256 "
                    f"{remote.sha256}: the file is corrupt, truncated or another version. "
                    "Delete it to download it again."
                )
        return path
    if not download:
        raise DatasetUnavailableError(f"{path} does not exist. {_placement_hint(remote, path)}")
    _stream(remote, path, timeout, progress)
    return path


def extract_members(archive: str | Path, members: Mapping[str, str | Path]) -> dict[str, Path]:
    """Extracts named regular files from a tar archive, each atomically.

    Args:
      archive: a tar file, compressed or not.
      members: base name of a member inside the archive (at any depth) ->
        destination path. Destinations that already exist are kept as they are.

    Returns:
      Base name -> destination path.

    Raises:
      DataFormatError: not a readable tar archive (truncated, corrupt), or a
        member is missing or not a regular file.
    """
    archive = Path(archive)
    destinations = {name: Path(dest) for name, dest in members.items()}
    todo = {name: dest for name, dest in destinations.items() if not dest.is_file()}
    if not todo:
        return destinations
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} does not exist")

    def unreadable(error: object) -> DataFormatError:
        return DataFormatError(
            f"{archive} is not a readable tar archive ({error}); it may be truncated or "
            "corrupt: delete it and fetch it again"
        )

    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(archive, "r:*"))
            # Only regular files named in ``members`` are read; no path from the
            # archive is ever used to build a destination.
            found = {Path(m.name).name: m for m in tar.getmembers() if Path(m.name).name in todo}
        except _ARCHIVE_READ_ERRORS as error:
            raise unreadable(error) from error
        for name, dest in todo.items():
            member = found.get(name)
            if member is None or not member.isfile():
                raise DataFormatError(f"{archive} has no regular file named {name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(
                prefix=f".{name}.", suffix=".part", dir=dest.parent
            )
            try:
                source = tar.extractfile(member)
                with os.fdopen(descriptor, "wb") as out:
                    while True:
                        try:
                            chunk = source.read(_CHUNK)
                        except _ARCHIVE_READ_ERRORS as error:
                            raise unreadable(error) from error
                        if not chunk:
                            break
                        out.write(chunk)
                if os.path.getsize(temporary) != member.size:
                    raise unreadable(f"member {name} is truncated")
                os.replace(temporary, dest)
            except BaseException:
                if os.path.exists(temporary):
                    os.unlink(temporary)
                raise
    return destinations
