"""A real ``redis-server`` on a free loopback port, for the shared replay store tests.

The server keeps nothing on disk (``--save ''``, ``--appendonly no``) and can
be stopped, paused (SIGSTOP, a Redis that accepts but never answers) and
started again on the same port. Tests skip when ``redis-server`` or the
``redis`` package is missing only outside CI; in CI (``CI`` set) that fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from support.waiting import wait_until


def require_redis() -> str:
    """The path of ``redis-server``, or skip (outside CI) / fail (in CI)."""
    path = shutil.which("redis-server")
    missing = []
    if path is None:
        missing.append("redis-server (apt-get install redis-server)")
    if importlib.util.find_spec("redis") is None:
        missing.append("the redis package (pip install -e '.[dev]')")
    if missing:
        reason = "needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must install it")
        pytest.skip(reason)
    assert path is not None
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port``."""

    def __init__(self, executable: str, password: str | None = None) -> None:
        self._executable = executable
        self._dir = tempfile.mkdtemp(prefix="agauth-redis-")
        self.port = _free_port()
        self.password = password
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{self.password}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                self._executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                *(() if self.password is None else ("--requirepass", self.password)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, timeout=20, interval=0.02)

    def answers(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise AssertionError("redis-server exited")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                if self.password is not None:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    if not s.recv(16).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def pause(self) -> None:
        """Stop answering without closing anything (a slow or hung Redis)."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def redis_server(password: str | None = None) -> Iterator[RedisServer]:
    """Fixture body: a started server (requiring ``password``, if given),
    stopped and removed afterwards."""
    server = RedisServer(require_redis(), password)
    try:
        server.start()
        yield server
    finally:
        server.close()
