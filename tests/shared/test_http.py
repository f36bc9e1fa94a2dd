"""The one bounded HTTP client (sync and async drivers) against a real local
server: methods and bodies, the size cap, the deadline, redirects, proxies
from the environment, and TLS trust roots."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.tls import self_signed

from ambient_grpc_auth._http import HttpResponse, TransportError, request_async, request_sync


class _Server:
    """Answers by path: /echo, /redirect, /declared-big, /big, /trickle."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.stop = threading.Event()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                outer.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path == "/echo":
                    doc = {
                        "method": self.command,
                        "body": body.decode(),
                        "content_type": self.headers.get("Content-Type"),
                        "accept_encoding": self.headers.get("Accept-Encoding"),
                    }
                    self._send(200, json.dumps(doc).encode())
                elif self.path == "/redirect":
                    self._send(302, b"moved", {"Location": "/echo"})
                elif self.path == "/declared-big":
                    # Claims far more than it sends: the cap applies before reading.
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**9))
                    self.end_headers()
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    outer.stop.wait(5)
                elif self.path == "/big":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"x" * 5000)
                elif self.path == "/trickle":
                    # Each byte arrives well within any per-read timeout.
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    deadline = time.monotonic() + 5
                    while not outer.stop.is_set() and time.monotonic() < deadline:
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                        outer.stop.wait(0.05)
                else:
                    self._send(404, b"no such path")

            def _send(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    try:
        yield s
    finally:
        s.close()


async def send(
    use_async: bool, url: str, *, time_limit: float = 5.0, max_bytes: int = 4096, **kw: object
) -> HttpResponse:
    if use_async:
        return await request_async(url, {}, time_limit=time_limit, max_bytes=max_bytes, **kw)  # type: ignore[arg-type]
    return request_sync(url, {}, time_limit=time_limit, max_bytes=max_bytes, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("use_async", [False, True])
async def test_get_and_post(server: _Server, use_async: bool) -> None:
    got = await send(use_async, server.base + "/echo")
    assert got.status == 200
    doc = json.loads(got.body)
    assert (doc["method"], doc["body"], doc["accept_encoding"]) == ("GET", "", "identity")
    posted = await send(
        use_async,
        server.base + "/echo",
        method="POST",
        body=b"grant_type=client_credentials",
    )
    doc = json.loads(posted.body)
    assert (doc["method"], doc["body"]) == ("POST", "grant_type=client_credentials")


@pytest.mark.parametrize("use_async", [False, True])
async def test_error_statuses_are_responses(server: _Server, use_async: bool) -> None:
    assert await send(use_async, server.base + "/missing") == HttpResponse(404, b"no such path")


@pytest.mark.parametrize("use_async", [False, True])
async def test_redirects_are_returned_not_followed(server: _Server, use_async: bool) -> None:
    assert await send(use_async, server.base + "/redirect") == HttpResponse(302, b"moved")
    assert server.requests == 1


@pytest.mark.parametrize("use_async", [False, True])
@pytest.mark.parametrize("path", ["/big", "/declared-big"])
async def test_size_cap(server: _Server, use_async: bool, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError, match="larger than 4096 bytes") as err:
        await send(use_async, server.base + path)
    assert err.value.retryable is False
    # A declared length over the cap fails at once, not after the 5 s stall.
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("use_async", [False, True])
async def test_a_slow_trickle_hits_the_deadline(server: _Server, use_async: bool) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError, match="timed out") as err:
        await send(use_async, server.base + "/trickle", time_limit=0.4, max_bytes=10**6)
    assert err.value.retryable is True
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("use_async", [False, True])
async def test_proxy_environment_is_ignored(
    server: _Server, use_async: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert (await send(use_async, server.base + "/echo")).status == 200


@pytest.mark.parametrize("use_async", [False, True])
async def test_connection_refused(use_async: bool) -> None:
    probe = _Server()
    url = probe.base + "/echo"
    probe.close()
    with pytest.raises(TransportError) as err:
        await send(use_async, url)
    assert err.value.retryable is True


# --- TLS ----------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key_pem, cert_pem = self_signed()
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    return cert_file, key_file


@pytest.mark.parametrize("use_async", [False, True])
async def test_tls_context_sets_the_trust_roots(tmp_path: Path, use_async: bool) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert_file, key_file)
    tls_server = _Server(tls=server_side)
    try:
        trusting = ssl.create_default_context(cafile=str(cert_file))
        got = await send(use_async, tls_server.base + "/echo", tls_context=trusting)
        assert got.status == 200
        with pytest.raises(TransportError, match="TLS certificate verification failed"):
            await send(use_async, tls_server.base + "/echo")
    finally:
        tls_server.close()
