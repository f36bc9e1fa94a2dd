"""Where control-plane keys may live: unsafe directories and odd files are refused.

A key directory (or the directory a key file really is in) that group or
others may write to, a key file that is not a regular file or that others may
write, are refused with one line naming the path and the fix; nothing ever
blocks on a FIFO. A Kubernetes-Secret-like layout (symlinks into ``..data``,
files 0440) loads without a warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.cp import KEY_FILES, copy_keys, serving
from support.tokenproc import TokenServerProcess, run_cli

from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import ensure_keys, load_keys, rotate_signing_key
from ambient_grpc_auth.errors import KeyFileError

PROG = "ambient-grpc-auth"


def _keys(tmp_path: Path) -> Path:
    return copy_keys(tmp_path / "keys", encryption_key_bits=2048)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret_layout(root: Path, file_mode: int = 0o440) -> Path:
    """A directory laid out like a mounted Kubernetes Secret:
    ``NAME -> ..data/NAME``, ``..data -> ..<timestamp>``, files in the timestamped directory."""
    source = _keys(root / "source")
    mount = root / "mount"
    mount.mkdir(mode=0o755)
    stamped = mount / "..2026_12_04_15_00_00.000000001"
    stamped.mkdir(mode=0o755)
    for name in KEY_FILES:
        (stamped / name).write_bytes((source / name).read_bytes())
        (stamped / name).chmod(file_mode)
    (mount / "..data").symlink_to(stamped.name)
    for name in KEY_FILES:
        (mount / name).symlink_to(f"..data/{name}")
    return mount


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o720, 0o702], ids=oct)
def test_writable_key_directories_are_refused(tmp_path: Path, mode: int) -> None:
    d = _keys(tmp_path)
    d.chmod(mode)
    for load in (load_keys, ensure_keys):
        with pytest.raises(KeyFileError) as info:
            load(d)
        text = str(info.value)
        assert "\n" not in text
        assert str(d) in text
        assert f"chmod 700 {d}" in text
    assert _mode(d) == mode  # refused, never changed behind the operator's back


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    d = _keys(tmp_path)
    os.chown(d, 54321, -1)
    with pytest.raises(KeyFileError, match="owned by uid 54321") as info:
        load_keys(d)
    assert f"chown {os.geteuid()} {d}" in str(info.value)
    os.chown(d, 0, -1)  # root-owned, as a Secret mount is: fine
    load_keys(d)


def test_private_directory_loads(tmp_path: Path) -> None:
    d = _keys(tmp_path)
    assert _mode(d) == 0o700
    load_keys(d)
    ensure_keys(d)


def test_keygen_refuses_a_world_writable_directory_and_creates_nothing(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    d.mkdir()
    d.chmod(0o777)
    result = run_cli(["keygen", "--dir", str(d)])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{PROG} keygen: error: {d}: ")
    assert f"chmod 700 {d}" in lines[0]
    assert list(d.iterdir()) == []
    assert _mode(d) == 0o777


@pytest.mark.parametrize("mode", [0o777, 0o770], ids=oct)
def test_token_server_refuses_a_writable_key_directory(tmp_path: Path, mode: int) -> None:
    d = _keys(tmp_path)
    d.chmod(mode)
    result = run_cli(["token-server", "--keys", str(d), "--listen", "127.0.0.1:0"], timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{PROG} token-server: error: {d}: ")
    assert f"chmod 700 {d}" in lines[0]


def _load_in_thread(d: Path, timeout: float = 10.0) -> BaseException | None:
    """Run load_keys in a thread; fail the test if it has not returned in ``timeout`` seconds."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_keys(d)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, "loading keys blocked"
    return outcome[0]


@pytest.mark.parametrize("name", ["signing.pem", "private.pem", "public.pem"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    d = _keys(tmp_path)
    (d / name).unlink()
    os.mkfifo(d / name)
    error = _load_in_thread(d)
    assert isinstance(error, KeyFileError)
    assert f"{d / name}: not a regular file (a FIFO)" in str(error)


def test_token_server_with_a_fifo_signing_key_exits_at_once(tmp_path: Path) -> None:
    d = _keys(tmp_path)
    (d / "signing.pem").unlink()
    os.mkfifo(d / "signing.pem")
    result = run_cli(["token-server", "--keys", str(d), "--listen", "127.0.0.1:0"], timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "signing.pem: not a regular file (a FIFO)" in lines[0]


def test_sockets_devices_and_directories_are_refused(tmp_path: Path) -> None:
    d = _keys(tmp_path)
    (d / "signing.pem").unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(d / "signing.pem"))
        assert "(a socket)" in str(_load_in_thread(d))
    (d / "signing.pem").unlink()
    (d / "signing.pem").symlink_to("/dev/zero")
    assert "(a character device)" in str(_load_in_thread(d))
    (d / "signing.pem").unlink()
    (d / "signing.pem").mkdir()
    assert "(a directory)" in str(_load_in_thread(d))


@pytest.mark.parametrize("mode", [0o660, 0o606, 0o666], ids=oct)
def test_key_files_writable_by_others_are_refused(tmp_path: Path, mode: int) -> None:
    d = _keys(tmp_path)
    (d / "private.pem").chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_keys(d)
    assert f"chmod 600 {d / 'private.pem'}" in str(info.value)


def test_a_symlink_into_a_writable_directory_is_refused(tmp_path: Path) -> None:
    d = _keys(tmp_path)
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    (elsewhere / "signing.pem").write_bytes((d / "signing.pem").read_bytes())
    (elsewhere / "signing.pem").chmod(0o600)
    (d / "signing.pem").unlink()
    (d / "signing.pem").symlink_to(elsewhere / "signing.pem")
    with pytest.raises(KeyFileError, match=f"chmod 700 {elsewhere}"):
        load_keys(d)


def test_secret_layout_with_symlinks_loads_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mount = _secret_layout(tmp_path)
    caplog.set_level(logging.DEBUG, logger="ambient_grpc_auth")
    keys = load_keys(mount)
    assert keys.signing is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_token_server_on_a_secret_layout_starts_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mount = _secret_layout(tmp_path)
    caplog.set_level(logging.DEBUG, logger="ambient_grpc_auth")
    config = TokenServerConfig(keys_dir=mount, generate_keys=False)
    async with serving(config) as server:
        # A key check after an update of the Secret reads the files again.
        assert server.issuer is not None
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_token_server_process_on_a_secret_layout_logs_no_warning(tmp_path: Path) -> None:
    mount = _secret_layout(tmp_path)
    with TokenServerProcess(mount, "--no-generate", stderr_path=tmp_path / "stderr") as server:
        assert server.stop() == 0
        stderr = server.stderr()
    assert " WARNING " not in stderr, stderr
    assert " ERROR " not in stderr, stderr


def test_0440_files_do_not_warn_but_world_readable_ones_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _keys(tmp_path)
    caplog.set_level(logging.DEBUG, logger="ambient_grpc_auth")
    for name in KEY_FILES:
        (d / name).chmod(0o440)
    load_keys(d)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (d / "private.pem").chmod(0o644)
    load_keys(d)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "readable by others" in warnings[0]
    assert f"chmod 600 {d / 'private.pem'}" in warnings[0]


def test_rotation_refuses_a_writable_directory(tmp_path: Path) -> None:
    d = _keys(tmp_path)
    d.chmod(0o777)
    with pytest.raises(KeyFileError, match="chmod 700"):
        rotate_signing_key(d, signing_key_bits=2048)
    assert not (d / ".rotate.lock").exists()


_LOAD_ON_READ_ONLY_MOUNT = """
set -e
mount -t tmpfs -o mode=1777 tmpfs "$MNT"
mkdir -m 755 "$MNT/..2026_12_04_15_00_00.000000001"
for f in private.pem public.pem signing.pem; do
  cp "$SRC/$f" "$MNT/..2026_12_04_15_00_00.000000001/$f"
  chmod 444 "$MNT/..2026_12_04_15_00_00.000000001/$f"
done
ln -s ..2026_12_04_15_00_00.000000001 "$MNT/..data"
for f in private.pem public.pem signing.pem; do ln -s "..data/$f" "$MNT/$f"; done
mount -o remount,ro "$MNT"
exec "$PYTHON" -c "$CODE" "$MNT"
"""

_LOAD_AND_REPORT = """
import logging, os, stat, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from ambient_grpc_auth.controlplane.keys import load_keys
mnt = sys.argv[1]
assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o1777
assert load_keys(mnt).signing is not None
print("loaded")
"""


def test_read_only_secret_mount_with_a_1777_directory_loads_without_warnings(
    tmp_path: Path,
) -> None:
    """A Secret volume: a world-writable (1777) tmpfs mounted read-only, files
    0444 behind ``..data`` symlinks. Needs a private mount namespace."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("needs a private mount namespace (unshare -rm), not available here")
    source = _keys(tmp_path)
    mount = tmp_path / "mnt"
    mount.mkdir()
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", _LOAD_ON_READ_ONLY_MOUNT],
        env={
            **os.environ,
            "MNT": str(mount),
            "SRC": str(source),
            "PYTHON": sys.executable,
            "CODE": _LOAD_AND_REPORT,
        },
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded"
    assert "WARNING" not in result.stderr, result.stderr
