"""Safe key-file I/O: exclusive atomic creation, atomic replacement, bounded reads.

Every error is a :class:`~ambient_grpc_auth.errors.KeyFileError` naming the
path; file contents never appear in messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ambient_grpc_auth.errors import KeyFileError

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "create_exclusive",
    "directory_lock",
    "make_key_dir",
    "read_key_file",
    "replace_atomically",
]

_log = logging.getLogger("ambient_grpc_auth.controlplane.keys")

#: Upper bound on a key file we are willing to read (an RSA-16384 PEM is ~12 KiB).
MAX_KEY_FILE_BYTES = 64 * 1024


def _fsync_dir(directory: Path) -> None:
    # Make the new directory entry durable; not every filesystem supports it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(path: Path, data: bytes) -> str:
    """Write ``data`` to a fresh 0600 temporary file next to ``path``, fsynced."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create key file ({exc.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KeyFileError(f"{path}: cannot write key file ({exc.strerror})") from None
    return tmp


def create_exclusive(path: Path, data: bytes) -> bool:
    """Atomically create ``path`` holding ``data`` (mode 0600) unless it exists.

    The data is complete on disk before the name appears (temp file, fsync,
    then :func:`os.link`, which refuses to replace an existing name), so a
    concurrent reader sees either no file or the whole file. Returns False
    and leaves the existing file untouched if ``path`` already exists.
    """
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create key file ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def replace_atomically(path: Path, data: bytes) -> None:
    """Atomically replace (or create) ``path`` with ``data`` (mode 0600)."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KeyFileError(f"{path}: cannot replace key file ({exc.strerror})") from None
    _fsync_dir(path.parent)


def read_key_file(path: Path, *, secret: bool = True) -> bytes:
    """Read a key file of at most :data:`MAX_KEY_FILE_BYTES`.

    Raises KeyFileError if it is missing, not a regular file, unreadable or
    too large. For ``secret`` files a mode open to group or others is logged
    as a warning (not refused: Secret volumes default to 0644).
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"{path}: not a regular file")
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file is missing") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: not a regular file") from None
    except PermissionError:
        raise KeyFileError(f"{path}: key file is not readable (permission denied)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: key file is too large")
    if secret and st.st_mode & 0o077:
        _log.warning(
            "key file %s is accessible by group or others (mode %o)", path, st.st_mode & 0o777
        )
    return data


def make_key_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) with mode 0700 if it does not exist."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise KeyFileError(f"{directory}: exists and is not a directory") from None
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot create key directory ({exc.strerror})") from None


@contextlib.contextmanager
def directory_lock(directory: Path, name: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``directory/name``.

    Serialises maintenance operations between processes on one host.
    """
    try:
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot open lock file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
