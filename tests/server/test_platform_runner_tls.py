"""A client that does what the platform's runner does over TLS: it attaches
``grpc.access_token_call_credentials(token)`` AND passes the same
``authorization: Bearer <token>`` as explicit metadata, so every call carries
the header twice. Both server interceptors accept that; two different values
are still refused."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest
from support.tls import self_signed

from ambient_grpc_auth import ServerAuthConfig, ServerAuthInterceptor, current_principal
from ambient_grpc_auth import aio as auth_aio
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.authn import DEFAULT_STATIC_USERNAME
from ambient_grpc_auth.server.config import API_TOKEN_ENV

TOKEN = "platform-runner-service-token-0123456789"  # noqa: S105 (a test value)


@pytest.fixture(scope="module")
def tls() -> tuple[bytes, bytes]:
    return self_signed()


def _config() -> ServerAuthConfig:
    return ServerAuthConfig.from_env(environ={API_TOKEN_ENV: TOKEN})


def _caller() -> str:
    principal = current_principal()
    return principal.username if principal is not None else ""


class _SyncEcho(echo_pb2_grpc.EchoServiceServicer):
    def Echo(self, request: Any, context: Any) -> Any:
        return echo_pb2.EchoResponse(text=request.text, caller=_caller())

    def StreamEcho(self, request: Any, context: Any) -> Iterator[Any]:
        for i in range(2):
            yield echo_pb2.EchoResponse(text=request.text, index=i, caller=_caller())


class _AioEcho(echo_pb2_grpc.EchoServiceServicer):
    async def Echo(self, request: Any, context: Any) -> Any:
        return echo_pb2.EchoResponse(text=request.text, caller=_caller())

    async def StreamEcho(self, request: Any, context: Any) -> Any:
        for i in range(2):
            yield echo_pb2.EchoResponse(text=request.text, index=i, caller=_caller())


class _Server:
    def __init__(self, kind: str, tls: tuple[bytes, bytes]) -> None:
        self.kind = kind
        self._creds = grpc.ssl_server_credentials([tls])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._aio: grpc.aio.Server | None = None
        self._sync: grpc.Server | None = None
        self.port = 0

    def __enter__(self) -> _Server:
        if self.kind == "sync":
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=4),
                interceptors=[ServerAuthInterceptor(config=_config())],
            )
            echo_pb2_grpc.add_EchoServiceServicer_to_server(_SyncEcho(), server)
            self.port = server.add_secure_port("127.0.0.1:0", self._creds)
            server.start()
            self._sync = server
            return self
        loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start() -> None:
            interceptor = auth_aio.ServerAuthInterceptor(config=_config())
            server = grpc.aio.server(interceptors=[interceptor])
            echo_pb2_grpc.add_EchoServiceServicer_to_server(_AioEcho(), server)
            self.port = server.add_secure_port("127.0.0.1:0", self._creds)
            await server.start()
            self._aio = server
            started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sync is not None:
            self._sync.stop(None).wait(5)
            return
        assert self._loop is not None
        assert self._aio is not None
        assert self._thread is not None
        asyncio.run_coroutine_threadsafe(self._aio.stop(None), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _platform_runner_channel(port: int, cert: bytes, token: str) -> grpc.Channel:
    """Credentials the way the platform's runner builds them under TLS."""
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(cert), grpc.access_token_call_credentials(token)
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_call_credentials_plus_identical_metadata_are_accepted(
    kind: str, tls: tuple[bytes, bytes]
) -> None:
    with _Server(kind, tls) as server, _platform_runner_channel(server.port, tls[1], TOKEN) as ch:
        stub = echo_pb2_grpc.EchoServiceStub(ch)
        metadata = [("authorization", f"Bearer {TOKEN}")]
        reply = stub.Echo(echo_pb2.EchoRequest(text="hi"), metadata=metadata, timeout=10)
        assert (reply.text, reply.caller) == ("hi", DEFAULT_STATIC_USERNAME)
        stream = stub.StreamEcho(echo_pb2.EchoRequest(text="s"), metadata=metadata, timeout=10)
        assert [r.index for r in stream] == [0, 1]


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_call_credentials_plus_a_different_token_are_refused(
    kind: str, tls: tuple[bytes, bytes]
) -> None:
    with _Server(kind, tls) as server, _platform_runner_channel(server.port, tls[1], TOKEN) as ch:
        stub = echo_pb2_grpc.EchoServiceStub(ch)
        other = [("authorization", "Bearer some-other-token-0123456789")]
        with pytest.raises(grpc.RpcError) as info:
            stub.Echo(echo_pb2.EchoRequest(text="hi"), metadata=other, timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in (info.value.details() or "")
