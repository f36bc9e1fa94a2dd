"""Safe key-file I/O: exclusive atomic creation, atomic replacement, bounded reads.

Every error is a :class:`~ambient_grpc_auth.errors.KeyFileError` naming the
path; file contents never appear in messages.

Where keys may live: a key directory, and the directory a key file really is
in (after symlinks, as in a Kubernetes Secret mount, where ``DIR/x.pem`` links
to ``DIR/..data/x.pem``), must not be writable by group or others nor owned by
another user than this process's or root, or whoever can write there could
plant a key; a key file must be a regular file and
not writable by group or others. Read-only filesystems are exempt from the
write checks: nobody can write there (Secret volumes are always mounted
read-only, and their mount point is often mode 1777). A key file readable by
others is logged as a warning, except on a read-only filesystem, where the
mode comes from the Secret's ``defaultMode`` and the pod is the boundary.
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
    "check_key_dir",
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


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _open_to_others(path: Path, st: os.stat_result) -> bool:
    """True if group or others may write ``path`` (``st`` is its stat) on a writable filesystem."""
    return bool(st.st_mode & 0o022) and not _read_only_fs(path)


def check_key_dir(directory: Path) -> None:
    """Refuse a key directory that group or others may write to, or that is
    owned by another user than this process's or root.

    A missing directory passes (the caller reports the missing file). The
    check follows a symlinked directory to its target. Raises KeyFileError
    with one line naming the directory and the fix.
    """
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot inspect key directory ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"{directory}: exists and is not a directory")
    if _open_to_others(directory, st):
        raise KeyFileError(
            f"{directory}: key directory is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}), so anyone could plant keys there; "
            f"refusing to use it: run `chmod 700 {directory}`"
        )
    if st.st_uid not in (0, os.geteuid()) and not _read_only_fs(directory):
        # Its owner can plant keys whatever the mode (e.g. a directory
        # created first by someone else in a shared /tmp).
        raise KeyFileError(
            f"{directory}: key directory is owned by uid {st.st_uid}, neither this user "
            f"(uid {os.geteuid()}) nor root; refusing to use it: run "
            f"`chown {os.geteuid()} {directory}`"
        )


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _stat_key_file(path: Path) -> os.stat_result:
    try:
        st = os.stat(path)  # follows symlinks, as a Secret mount needs
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file is missing") from None
    except PermissionError:
        raise KeyFileError(f"{path}: key file is not readable (permission denied)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(
            f"{path}: not a regular file ({_file_kind(st.st_mode)}); "
            "a key file must be a regular file or a symlink to one"
        )
    return st


def read_key_file(path: Path, *, secret: bool = True) -> bytes:
    """Read a key file of at most :data:`MAX_KEY_FILE_BYTES`.

    Raises KeyFileError if it is missing, not a regular file (a FIFO, device,
    socket or directory is refused before it is opened, and the open never
    blocks), unreadable, too large, writable by group or others, or if its
    directory (as named, and where the file really is after symlinks) is
    writable by group or others (see the module docstring). For ``secret``
    files a mode readable by others is logged as a warning (not refused:
    Secret volumes default to 0644).
    """
    st = _stat_key_file(path)
    check_key_dir(path.parent)
    real_parent = Path(os.path.realpath(path)).parent
    if real_parent != path.parent:
        check_key_dir(real_parent)
    try:
        # O_NONBLOCK: if the name was swapped for a FIFO since the stat, the
        # open returns at once and the fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file is missing") from None
    except PermissionError:
        raise KeyFileError(f"{path}: key file is not readable (permission denied)") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file ({_file_kind(st.st_mode)})")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_KEY_FILE_BYTES:
            chunk = os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    finally:
        os.close(fd)
    if size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: key file is too large")
    if _open_to_others(path, st):
        raise KeyFileError(
            f"{path}: key file is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it: run `chmod 600 {path}`"
        )
    if secret and st.st_mode & 0o004 and not _read_only_fs(path):
        _log.warning(
            "key file %s is readable by others (mode %04o); run `chmod 600 %s`",
            path,
            stat.S_IMODE(st.st_mode),
            path,
        )
    return b"".join(chunks)


def make_key_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) with mode 0700 if it does not exist.

    An existing directory is checked with :func:`check_key_dir` (never
    changed): one that group or others may write to is refused.
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise KeyFileError(f"{directory}: exists and is not a directory") from None
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot create key directory ({exc.strerror})") from None
    check_key_dir(directory)


@contextlib.contextmanager
def directory_lock(directory: Path, name: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``directory/name``.

    Serialises maintenance operations between processes on one host.
    """
    check_key_dir(directory)
    try:
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot open lock file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
