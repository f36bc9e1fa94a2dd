"""API-server test helpers: tokens (valid and forged), servicers, sync/aio servers,
a JWKS endpoint. Keys: :mod:`support.keys`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc

from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.principal import current_principal
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.testing import FakeIssuer
from support.keys import public_pem, signing_key

IDP_ISSUER = "https://idp.test"
CP_ISSUER = "https://cp.test"
AUDIENCE = "ambient-api"
IDP_KID = "idp-1"
CP_KID = "cp-1"
STATIC_TOKEN = "static-service-token-0123456789abcdef"
SERVICE_ACCOUNT = "svc-backend"
ECHO = "/ambient.testing.v1.EchoService/"
ECHO_METHODS = ("Echo", "StreamEcho", "CollectEcho", "ChatEcho")
#: session id -> owner, for the EchoService ownership rules.
OWNERS: dict[str, str | None] = {"s-alice": "alice", "s-bob": "bob", "s-ownerless": None}


# --- tokens --------------------------------------------------------------------


def mint(
    now: float,
    *,
    sub: str | None = "alice",
    iss: str = IDP_ISSUER,
    aud: str | list[str] = AUDIENCE,
    kid: str | None = IDP_KID,
    key: Any = None,
    alg: str = "RS256",
    ttl: float = 600,
    omit: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A JWT shaped like the ones the control plane and IdPs issue, signed
    with ``key`` (default: the trusted :func:`signing_key`)."""
    issuer = FakeIssuer(iss, audience=AUDIENCE, key=key or signing_key(), kid=kid, algorithm=alg)
    return issuer.mint(sub, now=now, ttl=ttl, audience=aud, claims=claims, omit=omit)


def runner_token(now: float, session_id: str | None, *, iss: str = CP_ISSUER, **kw: Any) -> str:
    claims: dict[str, Any] = {TOKEN_USE_CLAIM: RUNNER_TOKEN_USE}
    if session_id is not None:
        claims[SESSION_ID_CLAIM] = session_id
    kw.setdefault("kid", CP_KID)
    kw.setdefault("sub", f"runner:{session_id}")
    return mint(now, iss=iss, **claims, **kw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_made(
    header: dict[str, Any], payload: dict[str, Any], signer: Callable[[bytes], bytes]
) -> str:
    """A JWT assembled by hand (for forgeries PyJWT refuses to produce)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    return signing_input + "." + _b64(signer(signing_input.encode("ascii")))


def forged_payload(now: float, **extra: Any) -> dict[str, Any]:
    claims = {"iss": IDP_ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": int(now)}
    return {**claims, "exp": int(now + 600), **extra}


def alg_none_token(now: float) -> str:
    return hand_made(
        {"alg": "none", "typ": "JWT", "kid": IDP_KID}, forged_payload(now), lambda _: b""
    )


def hs256_with_public_pem(now: float) -> str:
    """The classic confusion attack: HMAC keyed with the RSA public key PEM."""
    secret = public_pem(signing_key())
    return hand_made(
        {"alg": "HS256", "typ": "JWT", "kid": IDP_KID},
        forged_payload(now),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )


# --- servicers ---------------------------------------------------------------


@dataclasses.dataclass
class Recorder:
    """What the servicer saw: handler starts and request session ids."""

    started: list[str] = dataclasses.field(default_factory=list)
    seen: list[str] = dataclasses.field(default_factory=list)

    def clear(self) -> None:
        self.started.clear()
        self.seen.clear()

    def start(self, method: str, request: Any = None) -> None:
        self.started.append(method)
        if request is not None:
            self.seen.append(request.session_id)


def _reply(request: echo_pb2.EchoRequest, index: int) -> echo_pb2.EchoResponse:
    principal = current_principal()  # read where the response is produced
    caller = principal.username if principal is not None else ""
    return echo_pb2.EchoResponse(text=request.text, index=index, caller=caller)


class _Recording(echo_pb2_grpc.EchoServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder


class SyncEcho(_Recording):
    def Echo(self, request: Any, context: Any) -> Any:
        self.rec.start("Echo", request)
        return _reply(request, 0)

    def StreamEcho(self, request: Any, context: Any) -> Iterator[Any]:
        self.rec.start("StreamEcho", request)
        for i in range(max(1, min(request.count, 5))):
            yield _reply(request, i)

    def CollectEcho(self, request_iterator: Any, context: Any) -> Any:
        self.rec.start("CollectEcho")
        last = echo_pb2.EchoRequest()
        for request in request_iterator:
            self.rec.seen.append(request.session_id)
            last = request
        return _reply(last, len(self.rec.seen))

    def ChatEcho(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        self.rec.start("ChatEcho")
        for i, request in enumerate(request_iterator):
            self.rec.seen.append(request.session_id)
            yield _reply(request, i)


class AsyncEcho(_Recording):
    """Coroutines and async generators."""

    async def Echo(self, request: Any, context: Any) -> Any:
        self.rec.start("Echo", request)
        return _reply(request, 0)

    async def StreamEcho(self, request: Any, context: Any) -> Any:
        self.rec.start("StreamEcho", request)
        for i in range(max(1, min(request.count, 5))):
            yield _reply(request, i)

    async def CollectEcho(self, request_iterator: Any, context: Any) -> Any:
        self.rec.start("CollectEcho")
        last = echo_pb2.EchoRequest()
        async for request in request_iterator:
            self.rec.seen.append(request.session_id)
            last = request
        return _reply(last, len(self.rec.seen))

    async def ChatEcho(self, request_iterator: Any, context: Any) -> Any:
        self.rec.start("ChatEcho")
        i = 0
        async for request in request_iterator:
            self.rec.seen.append(request.session_id)
            yield _reply(request, i)
            i += 1


class AsyncEchoReaderWriter(AsyncEcho):
    """Streaming methods on the reader/writer API (context.read / write)."""

    async def StreamEcho(self, request: Any, context: Any) -> None:  # type: ignore[override]
        self.rec.start("StreamEcho", request)
        for i in range(max(1, min(request.count, 5))):
            await context.write(_reply(request, i))

    async def CollectEcho(self, request_iterator: Any, context: Any) -> Any:
        self.rec.start("CollectEcho")
        last = echo_pb2.EchoRequest()
        while (request := await context.read()) is not grpc.aio.EOF:
            self.rec.seen.append(request.session_id)
            last = request
        return _reply(last, len(self.rec.seen))

    async def ChatEcho(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        self.rec.start("ChatEcho")
        i = 0
        while (request := await context.read()) is not grpc.aio.EOF:
            self.rec.seen.append(request.session_id)
            await context.write(_reply(request, i))
            i += 1


# --- servers -----------------------------------------------------------------

SERVER_OPTIONS = [("grpc.max_metadata_size", 64 * 1024)]


class RunningServer:
    """A started server of one kind; ``stop()`` is idempotent."""

    def __init__(self, port: int, stop: Callable[[], None]) -> None:
        self.target = f"127.0.0.1:{port}"
        self._stop = stop
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._stop()


def start_sync_server(
    interceptors: list[Any], register: Callable[[grpc.Server], None]
) -> RunningServer:
    pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-sync-server")
    server = grpc.server(pool, interceptors=interceptors, options=SERVER_OPTIONS)
    register(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def stop() -> None:
        server.stop(None).wait(5)
        pool.shutdown(wait=True)

    return RunningServer(port, stop)


def start_aio_server_in_thread(
    interceptors: list[Any], register: Callable[[grpc.aio.Server], None]
) -> RunningServer:
    """A grpc.aio server on its own event loop in a background thread, so that
    one synchronous test body can drive both server kinds."""

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        register(server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    return run_aio_server_in_thread(start)


def run_aio_server_in_thread(
    start: Callable[[], Coroutine[Any, Any, tuple[grpc.aio.Server, int]]],
) -> RunningServer:
    """Run ``start()`` (which builds and starts a grpc.aio server) on a new
    event loop in a background thread; ``stop()`` stops server and loop."""
    loop = asyncio.new_event_loop()
    ready: futures.Future[tuple[grpc.aio.Server, int]] = futures.Future()

    async def boot() -> None:
        try:
            ready.set_result(await start())
        except BaseException as exc:
            ready.set_exception(exc)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.create_task(boot())
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    thread = threading.Thread(target=run, name="test-aio-server", daemon=True)
    thread.start()
    try:
        server, port = ready.result(timeout=10)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        raise

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        assert not thread.is_alive()

    return RunningServer(port, stop)


#: Server kinds for :func:`start_echo`: a sync server; a grpc.aio server with
#: coroutine handlers, with reader/writer streaming handlers, or with the sync
#: servicer (grpc.aio runs sync handlers in its executor).
ECHO_SERVERS: dict[str, tuple[bool, type[_Recording]]] = {
    "sync": (False, SyncEcho),
    "aio": (True, AsyncEcho),
    "aio-rw": (True, AsyncEchoReaderWriter),
    "aio-sync": (True, SyncEcho),
}


def start_echo(kind: str, config: ServerAuthConfig, recorder: Recorder) -> RunningServer:
    """The EchoService behind the real server interceptor (sync or aio, per
    ``kind``, a key of :data:`ECHO_SERVERS`), recording into ``recorder``."""
    is_aio, servicer_type = ECHO_SERVERS[kind]
    servicer = servicer_type(recorder)

    def register(server: Any) -> None:
        echo_pb2_grpc.add_EchoServiceServicer_to_server(servicer, server)

    if is_aio:
        return start_aio_server_in_thread([AioServerAuthInterceptor(config=config)], register)
    return start_sync_server([ServerAuthInterceptor(config=config)], register)


# --- a local JWKS endpoint ---------------------------------------------------


class JwksServer:
    """Serves ``document`` at ``/jwks`` on 127.0.0.1 and counts requests; ``status``,
    ``body`` override the answer; a set ``hold`` is awaited (<= 5 s) before answering."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.status = 200
        self.body: bytes | None = None
        self.hold: threading.Event | None = None
        self.requests = 0
        self._closed = False
        self.authorization: list[str | None] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    outer.requests += 1
                    outer.authorization.append(self.headers.get("Authorization"))
                    body = outer.body or json.dumps(outer.document).encode()
                    status, hold = outer.status, outer.hold
                if hold is not None:
                    hold.wait(5)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if 300 <= status < 400:
                    self.send_header("Location", outer.url + "?moved")
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (timeout tests)
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.hold is not None:
            self.hold.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
