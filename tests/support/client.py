"""Test support for the runner-side client: fake token sources (besides the
public :class:`~ambient_grpc_auth.testing.FakeTokenSource`), an Echo server
that records what it sees, a bearer-checking server interceptor (sync), and
helpers to run the reference SessionService behind it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from ambient_grpc_auth._bearer import extract_bearer
from ambient_grpc_auth.client.tokens import Token
from ambient_grpc_auth.errors import TokenRejectedError, TokenUnavailableError
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.testing import Clock, FakeTokenSource

# Fast channel reconnects so restart tests do not wait for gRPC's 1 s+ backoff.
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
)

ECHO = "/ambient.testing.v1.EchoService/Echo"
STREAM_ECHO = "/ambient.testing.v1.EchoService/StreamEcho"
COLLECT_ECHO = "/ambient.testing.v1.EchoService/CollectEcho"
CHAT_ECHO = "/ambient.testing.v1.EchoService/ChatEcho"
WATCH = "/ambient.v1.SessionService/WatchSessionMessages"
PUSH = "/ambient.v1.SessionService/PushSessionMessage"


# --- token sources --------------------------------------------------------------


class CountingSource(FakeTokenSource):
    """The public fake, minting ``tok-1``, ``tok-2``... (``prefix`` first, as
    the tests pass it positionally)."""

    def __init__(self, prefix: str = "tok") -> None:
        super().__init__(prefix=prefix)


class MintingSource:
    """An uncached fake upstream (wrap it in CachingTokenSource): every call
    mints a new token valid for ``ttl`` seconds of ``clock``. ``delay`` makes
    a fetch slow (a real sleep in sync, an asyncio sleep in async)."""

    def __init__(self, clock: Clock, *, ttl: float = 600.0, delay: float = 0.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self.delay = delay
        self.calls = 0
        self.failures = 0
        self.fail_next = 0
        self._lock = threading.Lock()

    def _mint(self) -> Token:
        with self._lock:
            self.calls += 1
            if self.fail_next:
                self.fail_next -= 1
                self.failures += 1
                raise TokenUnavailableError("control plane unreachable (test)", retryable=True)
            return Token(f"minted-{self.calls}", self.clock.time() + self.ttl)

    def get_token(self) -> Token:
        if self.delay:
            time.sleep(self.delay)
        return self._mint()

    async def get_token_async(self) -> Token:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._mint()


class FixedSource:
    """Always the same token; no invalidate (not refreshable)."""

    def __init__(self, value: str = "static-token") -> None:
        self.token = Token(value, None)
        self.fetches = 0

    def get_token(self) -> Token:
        self.fetches += 1
        return self.token

    async def get_token_async(self) -> Token:
        return self.get_token()


class FailingSource:
    def __init__(self, *, retryable: bool, exc: Exception | None = None) -> None:
        self.retryable = retryable
        self.exc = exc

    def get_token(self) -> Token:
        if self.exc is not None:
            raise self.exc
        raise TokenUnavailableError("control plane said no (test)", retryable=self.retryable)

    async def get_token_async(self) -> Token:
        return self.get_token()


class FakeSource:
    """A scriptable TokenSource. ``results`` is consumed in order (Token or
    exception); when empty, ``default`` is returned. ``gate`` (threading) and
    ``async_gate`` (asyncio) block fetches until set. Counts calls."""

    def __init__(self, *results: Token | BaseException, default: Token | None = None) -> None:
        self.results = list(results)
        self.default = default
        self.calls = 0
        self.gate: threading.Event | None = None
        self.async_gate: asyncio.Event | None = None
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def _next(self) -> Token:
        with self._lock:
            self.calls += 1
            item = self.results.pop(0) if self.results else self.default
        if item is None:
            raise TokenUnavailableError("fake source exhausted", retryable=True)
        if isinstance(item, BaseException):
            raise item
        return item

    def get_token(self) -> Token:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "gate never opened"
        return self._next()

    async def get_token_async(self) -> Token:
        self.entered.set()
        if self.async_gate is not None:
            await asyncio.wait_for(self.async_gate.wait(), 30)
        return self._next()


# --- server side ----------------------------------------------------------------


@dataclass
class AuthState:
    """What the test server accepts, and what it saw (thread-safe enough for tests)."""

    revoked: set[str] = field(default_factory=set)
    reject_all: bool = False
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, token: str | None) -> None:
        with self.lock:
            self.seen.append((method, token))

    def accepts(self, token: str | None) -> bool:
        with self.lock:
            return token is not None and not self.reject_all and token not in self.revoked

    def revoke(self, token: str) -> None:
        with self.lock:
            self.revoked.add(token)

    def tokens(self, method: str | None = None) -> list[str | None]:
        with self.lock:
            return [t for m, t in self.seen if method is None or m == method]


def _bearer_of(metadata: Any) -> str | None:
    try:
        return extract_bearer(metadata)
    except TokenRejectedError:
        return None


def _deny(context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")


def _deny_after_reading(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
    # Reject only once the client finished sending: grpc.aio clients may
    # otherwise report a made-up INTERNAL instead of the status sent (a race
    # in grpc.aio when a client stream is refused before it was sent).
    for _ in requests:
        pass
    _deny(context)


class BearerCheck(grpc.ServerInterceptor):
    """Accepts a call when its bearer is not revoked; a streaming response is
    also ended with UNAUTHENTICATED at its next message once its token gets
    revoked (as a server that re-checks expiry would)."""

    def __init__(self, state: AuthState) -> None:
        self.state = state

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        token = _bearer_of(details.invocation_metadata)
        self.state.record(details.method, token)
        accepted = self.state.accepts(token)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                (lambda req, ctx: inner_uu(req, ctx)) if accepted else (lambda r, c: _deny(c)),
                **kwargs,
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                (lambda it, ctx: inner_su(it, ctx)) if accepted else _deny_after_reading,
                **kwargs,
            )
        state = self.state

        def guarded(items: Iterator[Any], ctx: grpc.ServicerContext) -> Iterator[Any]:
            for item in items:
                if not state.accepts(token):
                    ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "token revoked")
                yield item

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                (lambda req, ctx: guarded(inner_us(req, ctx), ctx))
                if accepted
                else (lambda r, c: _deny(c)),
                **kwargs,
            )
        inner_ss = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(
            (lambda it, ctx: guarded(inner_ss(it, ctx), ctx)) if accepted else _deny_after_reading,
            **kwargs,
        )


@dataclass
class Seen:
    method: str
    metadata: dict[str, list[str | bytes]]
    time_remaining: float | None


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Echoes, and records each call's metadata and remaining deadline."""

    def __init__(self) -> None:
        self.calls: list[Seen] = []
        self._lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> str:
        md: dict[str, list[str | bytes]] = {}
        for key, value in context.invocation_metadata():
            md.setdefault(key, []).append(value)
        remaining = context.time_remaining()
        with self._lock:
            self.calls.append(Seen(method, md, remaining))
        auth = md.get("authorization", [""])[0]
        return auth if isinstance(auth, str) else ""

    def Echo(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller = self._record("Echo", context)
        return echo_pb2.EchoResponse(text=request.text, caller=caller)

    def StreamEcho(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        caller = self._record("StreamEcho", context)
        for i in range(max(1, min(request.count, 100))):
            yield echo_pb2.EchoResponse(text=request.text, index=i, caller=caller)

    def CollectEcho(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        caller = self._record("CollectEcho", context)
        texts = [r.text for r in request_iterator]
        return echo_pb2.EchoResponse(text="+".join(texts), index=len(texts), caller=caller)

    def ChatEcho(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        caller = self._record("ChatEcho", context)
        for i, r in enumerate(request_iterator):
            yield echo_pb2.EchoResponse(text=r.text, index=i, caller=caller)


@dataclass
class EchoServer:
    server: grpc.Server
    port: int
    auth: AuthState
    servicer: EchoServicer
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None).wait(5)

    def restart(self) -> None:
        """Start a new server on the same port (the old one must be stopped)."""
        self.server, _ = _bind_echo(self.port, self.auth, self.servicer, self.options)


def _bind_again(
    port: int, bind: Callable[[str], tuple[grpc.Server, int]]
) -> tuple[grpc.Server, int]:
    """``bind(address)`` (a started server and its port; RuntimeError when the
    port is taken) on 127.0.0.1:``port`` (0: any free port), retried for up to
    5 s while a just-stopped server may still hold the port."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            server, bound = bind(f"127.0.0.1:{port}")
        except RuntimeError:
            pass
        else:
            if port == 0 or bound == port:
                return server, bound
            server.stop(None)
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not bind 127.0.0.1:{port} again")
        time.sleep(0.05)


def _bind_echo(
    port: int,
    auth: AuthState,
    servicer: EchoServicer,
    options: tuple[tuple[str, Any], ...],
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    def bind(address: str) -> tuple[grpc.Server, int]:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            interceptors=[BearerCheck(auth)],
            options=list(options),
        )
        echo_pb2_grpc.add_EchoServiceServicer_to_server(servicer, server)
        try:
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
        except RuntimeError:
            bound = 0
        if not bound:
            server.stop(None)
            raise RuntimeError("port taken")
        server.start()
        return server, bound

    return _bind_again(port, bind)


def start_echo_server(
    *,
    port: int = 0,
    auth: AuthState | None = None,
    options: tuple[tuple[str, Any], ...] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> EchoServer:
    """An Echo server on 127.0.0.1 (``port`` 0: any free port) behind
    :class:`BearerCheck`. ``credentials`` makes it a secure port."""
    auth = auth or AuthState()
    servicer = EchoServicer()
    server, bound = _bind_echo(port, auth, servicer, options, credentials)
    return EchoServer(server, bound, auth, servicer, options)


def reserve_port() -> int:
    """A port that was just free on 127.0.0.1 (bound and released by gRPC)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.stop(None)
    return port


# --- the reference SessionService behind BearerCheck ----------------------------------


@dataclass
class SessionServer:
    """The reference SessionService (SQLite file, so it survives restarts)
    behind :class:`BearerCheck`, with one session."""

    store: Any
    auth: AuthState
    server: grpc.Server
    port: int
    session_id: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def append(self, count: int = 1) -> list[int]:
        return [
            self.store.append(self.session_id, "event", f"payload-{i}").seq for i in range(count)
        ]

    def stop(self) -> None:
        self.server.stop(None).wait(5)

    def restart(self) -> None:
        self.server, _ = _serve_sessions(self.store, self.auth, self.port)

    def close(self) -> None:
        self.stop()
        self.store.close()


def _serve_sessions(store: Any, auth: AuthState, port: int) -> tuple[grpc.Server, int]:
    from ambient_grpc_auth.reference.servicer import serve

    return _bind_again(
        port, lambda address: serve(store, address, interceptors=[BearerCheck(auth)])
    )


def start_session_server(db_path: str) -> SessionServer:
    from ambient_grpc_auth.reference.store import SessionStore

    store = SessionStore(db_path)
    session_id = store.create_session("client-tests").metadata.id
    auth = AuthState()
    server, bound = _serve_sessions(store, auth, 0)
    return SessionServer(store, auth, server, bound, session_id)
