"""Helpers for runner-side tests: a scripted HTTP server on 127.0.0.1:0 (in a
thread, usable from sync and async tests alike) and a JWT helper. The fake
token sources are in :mod:`support.client`."""

from __future__ import annotations

import base64
import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ambient_grpc_auth.testing import FakeIssuer
from support.keys import signing_key


@functools.cache
def _issuer() -> FakeIssuer:
    return FakeIssuer("https://cp.test", key=signing_key(), kid="cp-1")


def make_jwt(exp: float | None, **claims: object) -> str:
    """A signed JWT for subject ``runner`` expiring at ``exp`` (None: no
    ``exp`` claim); runners read only ``exp``, without verification."""
    omit = ("exp",) if exp is None else ()
    return _issuer().mint("runner", expires_at=exp, claims=claims, omit=omit)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (ends early at server stop)

    @classmethod
    def json(cls, doc: object, status: int = 200) -> Reply:
        return cls(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    authorization: str | None


Handler = Callable[[Seen], Reply]


class ScriptedServer:
    """An HTTP/1.1 server whose answers come from ``handler`` (settable)."""

    def __init__(self) -> None:
        self.handler: Handler = lambda seen: Reply(404, b"no handler")
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                seen = Seen("GET", self.path, self.headers.get("Authorization"))
                with outer._lock:
                    outer.requests.append(seen)
                reply = outer.handler(seen)
                if reply.delay:
                    outer.stopping.wait(reply.delay)
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/token") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def b64_pem(pem: str) -> str:
    return base64.b64encode(pem.encode()).decode()
