"""Where a run's files live when it runs on a cluster: a local or mounted path, and an optional copy
on shared or object storage.

The driver writes the run folder (``output.root``) on its own file system, through a path or a
``file://`` URI: on a cluster that is a volume every node mounts (NFS, a Kubernetes
PersistentVolume), so the folder outlives the head pod. ``output.upload_uri`` adds a copy on any
file system ``pyarrow.fs`` reaches by URI (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``,
``file://``): after every round only the files that changed are copied, so the copy is never more
than one round behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from fedmerge.federation.config import ConfigError

__all__ = [
    "LOCAL_SCHEMES",
    "REMOTE_SCHEMES",
    "RunUploader",
    "StorageError",
    "describe_os_error",
    "local_path",
    "named_os_error",
    "os_errors_of",
    "uri_scheme",
]

log = logging.getLogger("fedmerge")

LOCAL_SCHEMES = frozenset({"", "file"})
"""Schemes ``output.root`` accepts: a plain path, or a ``file://`` URI."""

REMOTE_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "mock"})
"""Schemes ``pyarrow.fs.FileSystem.from_uri`` understands (``mock``: pyarrow's in-memory test store)."""


class StorageError(ConfigError):
    """A storage location of the config cannot be used; the message names it."""


_FIXES = {
    errno.EACCES: "make that folder writable for this user, or set output.root to a folder you can write",
    errno.EPERM: "make that folder writable for this user, or set output.root to a folder you can write",
    errno.EROFS: "that file system is mounted read-only: remount it writable, or set output.root to a folder on "
    "a writable one",
    errno.ENOSPC: "the disk is full: free space on it, or set output.root to a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free space, or set output.root to a folder elsewhere",
    errno.ENAMETOOLONG: "a file name is too long: choose a shorter run name (name = ...)",
    errno.ENOTDIR: "part of that path is a file, not a folder: set output.root to a folder",
    errno.EEXIST: "a file is in the way of a folder: move it, or set output.root elsewhere",
    errno.EISDIR: "a folder is where a file should be: move it, or set output.root elsewhere",
    errno.ENOENT: "a folder on that path does not exist (was it removed during the run?)",
}
"""What to do about the OS errors a run's files can meet, by errno."""

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{32}$")
"""The temporary sibling that ``write_atomic`` writes first (``.<name>.tmp-<uuid hex>``)."""


def describe_os_error(err: OSError) -> str:
    """One line for an OS error met while reading or writing a run: the file, what the OS said,
    and what to do about it (the temporary file of an atomic write is named as the file it was for)."""
    code = err.errno if err.errno is not None else _errno_in(str(err))
    filename = err.filename
    if filename is not None:
        path = Path(os.fsdecode(filename))
        match = _TEMPORARY.match(path.name)
        where = str(path.with_name(match["name"])) if match else str(path)
        if err.filename2 is not None:
            where += f" -> {os.fsdecode(err.filename2)}"
    else:
        where = None
    if (
        where is not None and len(where) > 300
    ):  # a path built from a huge value: its ends say enough
        where = f"{where[:160]}...{where[-100:]} ({len(where):,} characters)"
    said = err.strerror or (
        os.strerror(code) if code is not None else str(err) or type(err).__name__
    )
    fix = (
        _FIXES.get(code, "check that path, its folder and the disk it is on")
        if code is not None
        else None
    )
    return "; ".join(part for part in (f"{where}: {said}" if where else said, fix) if part)


def _errno_in(text: str) -> int | None:
    """The errno an error message quotes ("[Errno 28]", "os error 28", "code: 28"), or None."""
    match = re.search(r"(?:\[errno |os error |code: )(\d+)", text, flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def named_os_error(err: OSError, path: str | os.PathLike[str]) -> OSError:
    """``err`` itself when it names a file; else the same error naming ``path`` (a write through a
    file object that fills the disk reports ENOSPC without a file name)."""
    code = err.errno if err.errno is not None else _errno_in(str(err))
    if err.filename is not None or code is None:
        return err
    named = OSError(code, os.strerror(code), os.fspath(path))
    named.__cause__ = err
    return named


@contextlib.contextmanager
def os_errors_of(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn safetensors' ``SafetensorError`` for an I/O failure (a full disk, a read-only folder)
    into the ``OSError`` it wraps, naming ``path``: the CLI reports OS errors as one line with a
    fix, and a ``SafetensorError`` names neither the file nor the errno."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        code = _errno_in(str(err))
        if code is None:
            raise
        raise OSError(code, os.strerror(code), os.fspath(path)) from err


def uri_scheme(location: str) -> str:
    """The URI scheme of ``location`` (``s3`` for ``s3://b/k``), or '' for a plain path."""
    head, sep, _ = location.partition("://")
    return head.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", head) else ""


def local_path(location: str) -> Path:
    """A plain path or a ``file://`` URI as a ``Path``; any other scheme is a ``StorageError``."""
    scheme = uri_scheme(location)
    if scheme == "":
        return Path(location)
    if scheme != "file":
        raise StorageError(f"{location!r} is not a local path or file:// URI")
    try:
        parsed = urlparse(location)
    except ValueError as err:
        raise StorageError(f"{location!r} is not a valid URI: {err}") from None
    if parsed.netloc not in ("", "localhost"):
        raise StorageError(
            f"{location!r} names host {parsed.netloc!r}; a file:// URI must be file:///absolute/path"
        )
    return Path(unquote(parsed.path))


class RunUploader:
    """Mirrors one run folder to ``<uri>/<folder name>``, copying only files that changed.

    ``sync()`` walks the folder and copies every file whose size or modification time differs
    from the last copy; files removed locally (old checkpoints) are removed from the copy too.
    """

    def __init__(self, run_dir: str | os.PathLike[str], uri: str) -> None:
        from pyarrow import fs

        self.run_dir = Path(run_dir)
        try:
            self.filesystem, base = fs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as err:
            raise StorageError(f"output.upload_uri {uri!r} cannot be opened: {err}") from None
        self.root = f"{base.rstrip('/')}/{self.run_dir.name}"
        self.uri = uri
        self._copied: dict[str, tuple[int, int]] = {}
        try:
            self.filesystem.create_dir(self.root, recursive=True)
        except OSError as err:
            raise StorageError(
                f"cannot create {self.root!r} under output.upload_uri {uri!r}: {err}"
            ) from None

    def sync(self) -> int:
        """Copy what changed since the last call; returns the number of files copied."""
        from pyarrow import fs

        seen: dict[str, tuple[int, int]] = {}
        copied = 0
        for path in sorted(p for p in self.run_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.run_dir).as_posix()
            if rel.split("/")[-1].startswith("."):  # a temporary file of an atomic write
                continue
            stat = path.stat()
            seen[rel] = (stat.st_size, stat.st_mtime_ns)
            if self._copied.get(rel) == seen[rel]:
                continue
            target = f"{self.root}/{rel}"
            if "/" in rel:
                self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            fs.copy_files(
                str(path),
                target,
                source_filesystem=fs.LocalFileSystem(),
                destination_filesystem=self.filesystem,
            )
            copied += 1
        for rel in sorted(set(self._copied) - set(seen)):
            try:
                self.filesystem.delete_file(f"{self.root}/{rel}")
            except FileNotFoundError:
                pass
            parent = rel.rpartition("/")[0]
            if parent and not (self.run_dir / parent).exists():  # e.g. a pruned checkpoint folder
                try:
                    self.filesystem.delete_dir(f"{self.root}/{parent}")
                except (FileNotFoundError, OSError):
                    pass
        self._copied = seen
        return copied

    def listing(self) -> dict[str, int]:
        """``{relative path: size}`` of the copy, as the destination file system reports it."""
        from pyarrow import fs

        infos = self.filesystem.get_file_info(fs.FileSelector(self.root, recursive=True))
        return {
            info.path[len(self.root) + 1 :]: info.size
            for info in infos
            if info.type == fs.FileType.File
        }
