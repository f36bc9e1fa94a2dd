"""The token endpoint before its handlers: malformed requests, connection floods, fd pressure.

The leak and flood tests run the real ``token-server`` process and talk to it
over raw loopback sockets (every socket is closed at the end); the rest run
the server in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import select
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.cp import copy_keys, get, public_pem, runner_style_bearer, serving
from support.tokenproc import TokenServerProcess
from support.waiting import async_wait_until, wait_until

from ambient_grpc_auth.controlplane._listener import ERROR_BODIES, RateLimitedLog
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.proof import encrypt_v2
from ambient_grpc_auth.testing import FakeClock

FRAGMENT = 16


def _proof(keys: Path) -> str:
    key = serialization.load_pem_public_key(public_pem(keys))
    assert isinstance(key, rsa.RSAPublicKey)
    return encrypt_v2(key, "session-leak-1", now=time.time())


def _exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; return all that comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def _malformed(proof: str) -> dict[str, bytes]:
    """Requests whose Authorization line carries ``proof`` but breaks HTTP."""
    p = proof.encode("ascii")
    half = len(p) // 2
    head = b"GET /token HTTP/1.1\r\nHost: cp\r\n"
    end = b"\r\n"
    return {
        "control byte": head + b"Authorization: Bearer " + p[:half] + b"\x01" + p[half:] + end,
        "control byte at the end": head + b"Authorization: Bearer " + p + b"\x07" + end,
        "NUL": head + b"Authorization: Bearer " + p[:half] + b"\x00" + p[half:] + end,
        "DEL": head + b"Authorization: Bearer " + p[:half] + b"\x7f" + p[half:] + end,
        "bare CR": head + b"Authorization: Bearer " + p[:half] + b"\r" + p[half:] + b"\r\n" + end,
        "missing colon": head + b"Authorization Bearer " + p + b"\r\n" + end,
        "space before colon": head + b"Authorization : Bearer " + p + b"\r\n" + end,
        "control byte in the name": head + b"Author\x01ization: Bearer " + p + b"\r\n" + end,
        "over-long value": head
        + b"Authorization: Bearer "
        + p
        + b"A" * (8300 - len(p))
        + b"\r\n"
        + end,
        "over-long value, proof last": head
        + b"Authorization: Bearer "
        + b"A" * 8300
        + p
        + b"\r\n"
        + end,
        "second request on a kept-alive connection": b"GET /healthz HTTP/1.1\r\nHost: cp\r\n\r\n"
        + head
        + b"Authorization: Bearer "
        + p[:half]
        + b"\x01"
        + p[half:]
        + b"\r\n"
        + end,
    }


def _leaks(proof: str, text: str) -> list[str]:
    return [
        proof[i : i + FRAGMENT]
        for i in range(len(proof) - FRAGMENT + 1)
        if proof[i : i + FRAGMENT] in text
    ]


def _last_response(raw: bytes) -> tuple[int, bytes]:
    """Status and body of the last response in ``raw``."""
    start = raw.rfind(b"HTTP/1.")
    assert start >= 0, raw[:200]
    head, _, body = raw[start:].partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_malformed_requests_never_echo_or_log_the_proof(tmp_path: Path) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    proof = _proof(keys)
    responses: dict[str, bytes] = {}
    with TokenServerProcess(keys, stderr_path=tmp_path / "stderr", log_level="DEBUG") as server:
        for name, request in _malformed(proof).items():
            responses[name] = _exchange(server.port, request)
        # The server is still healthy afterwards.
        ok = _exchange(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n"
        )
        assert _last_response(ok) == (200, b"ok")
        server.stop()
        stderr = server.stderr()
    assert _leaks(proof, stderr) == []
    assert "Traceback" not in stderr
    assert "refused a malformed HTTP request" in stderr
    for name, raw in responses.items():
        text = raw.decode("latin-1")
        assert _leaks(proof, text) == [], name
        status, body = _last_response(raw)
        if name.startswith("over-long"):
            assert (status, body) == (431, ERROR_BODIES[431].encode()), name
        else:
            assert (status, body) == (400, ERROR_BODIES[400].encode()), name


async def test_parse_errors_bypass_aiohttp_logging_in_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fails loudly if aiohttp stops routing parse errors through the handler
    methods the server overrides (``handle_error``, ``log_exception``)."""
    caplog.set_level(logging.DEBUG)
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    proof = _proof(keys)
    async with serving(TokenServerConfig(keys_dir=keys)) as server:
        for request in _malformed(proof).values():
            raw = await asyncio.to_thread(_exchange, server.port, request)
            status, body = _last_response(raw)
            assert body == ERROR_BODIES[status].encode()
    assert not [r for r in caplog.records if r.name in ("aiohttp.server", "aiohttp.web")]
    assert not [r for r in caplog.records if r.exc_info]
    assert _leaks(proof, caplog.text) == []


async def test_idle_and_slow_connections_are_closed_after_the_header_timeout(
    tmp_path: Path,
) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    config = TokenServerConfig(keys_dir=keys, header_timeout=0.3)
    async with serving(config) as server:
        idle = await asyncio.open_connection("127.0.0.1", server.port)
        partial = await asyncio.open_connection("127.0.0.1", server.port)
        partial[1].write(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n")
        kept = await asyncio.open_connection("127.0.0.1", server.port)
        kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n\r\n")
        start = time.monotonic()
        for reader, writer in (idle, partial):
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        assert 0.25 <= time.monotonic() - start < 3
        # After a response the connection is idle again and gets the same deadline.
        data = await asyncio.wait_for(kept[0].read(), 5)
        assert data.startswith(b"HTTP/1.1 200")
        assert data.endswith(b"ok")
        kept[1].close()


async def test_a_busy_kept_alive_connection_outlives_the_header_timeout(tmp_path: Path) -> None:
    # The deadline moves with every response: a connection whose requests
    # come faster than the timeout stays open well past it, and is closed
    # one timeout after its last response.
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    config = TokenServerConfig(keys_dir=keys, header_timeout=0.4)
    async with serving(config) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        start = time.monotonic()
        for _ in range(6):
            await asyncio.sleep(0.25)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        assert time.monotonic() - start > 1.2  # three times the timeout
        last = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.3 <= time.monotonic() - last < 3
        writer.close()


async def test_a_slow_handler_is_not_cut_off_by_the_header_timeout(tmp_path: Path) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    proof = _proof(keys)

    async def slow_check(session_id: str) -> bool:
        await asyncio.sleep(0.8)
        return True

    config = TokenServerConfig(keys_dir=keys, header_timeout=0.2, session_check=slow_check)
    async with serving(config) as server:
        request = (
            f"GET /token HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {proof}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()


async def test_connections_beyond_the_cap_get_503(tmp_path: Path) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    config = TokenServerConfig(keys_dir=keys, max_connections=3)
    async with serving(config) as server:
        assert server.max_connections == 3
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await async_wait_until(lambda: server.open_connections == 3)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert _last_response(raw) == (503, ERROR_BODIES[503].encode())
        assert b"Retry-After: 1" in raw
        held[0][1].close()
        await async_wait_until(lambda: server.open_connections == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
        assert _last_response(await asyncio.wait_for(reader.read(), 5)) == (200, b"ok")
        writer.close()
        for _, w in held[1:]:
            w.close()


def test_rate_limited_log_counts_what_it_holds_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), interval=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelimit"):
        for _ in range(500):
            log.log(logging.WARNING, "a", "kind a happened")
        log.log(logging.WARNING, "b", "kind b happened")
        clock.advance(9.9)
        log.log(logging.WARNING, "a", "kind a happened")
        clock.advance(0.2)
        log.log(logging.WARNING, "a", "kind a happened")
        log.log(logging.WARNING, "a", "kind a happened")
    assert [r.getMessage() for r in caplog.records] == [
        "kind a happened",
        "kind b happened",
        "kind a happened (500 similar suppressed)",
    ]


async def test_handler_failures_are_logged_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    bearer = runner_style_bearer(public_pem(keys), "session-flood-1")

    async def broken_check(session_id: str) -> bool:
        raise RuntimeError("hook failed")

    config = TokenServerConfig(keys_dir=keys, session_check=broken_check, clock=FakeClock())
    caplog.set_level(logging.INFO, logger="ambient_grpc_auth")
    async with serving(config) as server, aiohttp.ClientSession() as session:
        for _ in range(20):
            status, body, _ = await get(session, server.token_url, bearer)
            assert (status, body) == (500, "internal error")
    failures = [r.getMessage() for r in caplog.records if "token request failed" in r.getMessage()]
    assert len(failures) == 1, failures
    assert "RuntimeError" in failures[0]
    assert "hook failed" not in caplog.text


# --------------------------------------------------------------------------- fd pressure


def _half_open(port: int, count: int, timeout: float = 20.0) -> list[socket.socket]:
    """``count`` connections that send part of a request head and then nothing."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            s.connect_ex(("127.0.0.1", port))
        pending = list(socks)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 0.5)
            for s in writable:
                pending.remove(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    with contextlib.suppress(OSError):
                        s.send(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _healthz_ok(port: int) -> bool:
    try:
        raw = _exchange(
            port, b"GET /healthz HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n", timeout=2
        )
    except OSError:
        return False
    return raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"ok")


@pytest.mark.slow
@pytest.mark.usefixtures("many_fds")
def test_fd_pressure_does_not_starve_healthz_or_flood_the_log(tmp_path: Path) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    with TokenServerProcess(
        keys, "--header-timeout", "1", stderr_path=tmp_path / "stderr", nofile=256
    ) as server:
        socks = _half_open(server.port, 300)
        try:
            start = time.monotonic()
            assert wait_until(lambda: _healthz_ok(server.port), timeout=8, interval=0.1)
            elapsed = time.monotonic() - start
            time.sleep(1.5)  # let the header timeouts and any accept errors happen
        finally:
            for s in socks:
                s.close()
        assert _healthz_ok(server.port)
        assert server.stop() == 0
        stderr = server.stderr()
    lines = stderr.splitlines()
    assert elapsed < 8
    assert len(lines) < 50, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "serving at most" in stderr  # the cap was lowered to fit 256 descriptors


_EMFILE_SERVER = textwrap.dedent(
    """
    import logging, os, resource, sys
    from ambient_grpc_auth.controlplane.config import TokenServerConfig
    from ambient_grpc_auth.controlplane.server import run_token_server

    def ready(server):
        # Leave a handful of descriptors: accept() soon fails with EMFILE.
        in_use = len(os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, hard))
        print("listening on", server.url, flush=True)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = TokenServerConfig(keys_dir=sys.argv[1], header_timeout=2.0)
    run_token_server(config, "127.0.0.1", 0, ready=ready)
    """
)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_accept_errors_do_not_spin_or_flood_the_log(tmp_path: Path) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _EMFILE_SERVER, str(keys)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on" in line, stderr_path.read_text()
            port = int(line.strip().rsplit(":", 1)[1])
            socks = _half_open(port, 40)
            try:
                cpu_before = _cpu_seconds(proc.pid)
                time.sleep(3)
                cpu = _cpu_seconds(proc.pid) - cpu_before
            finally:
                for s in socks:
                    s.close()
            # Once the idle connections are gone the server serves again.
            assert wait_until(lambda: _healthz_ok(port), timeout=10, interval=0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            proc.stdout.close()  # type: ignore[union-attr]
    stderr = stderr_path.read_text()
    assert "Too many open files" in stderr  # the scenario really ran out of descriptors
    assert len(stderr.splitlines()) < 15, stderr[-3000:]
    assert "Traceback" not in stderr
    assert cpu < 1.5, cpu


async def test_handler_hooks_exist_in_this_aiohttp() -> None:
    """The server subclasses aiohttp's request handler and wraps the low-level
    server's request factory; these are the names it relies on."""
    for name in ("handle_error", "log_exception", "log_access", "force_close", "connection_made"):
        assert callable(getattr(web.RequestHandler, name, None)), name

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    assert callable(web.Server(handler).request_factory)
