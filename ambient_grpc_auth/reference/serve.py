"""Running the reference SessionService behind the auth interceptor.

One function per runtime (sync ``grpc`` and ``grpc.aio``) that wires the
store, the interceptor and the standard health service together, so the CLI,
the demo and the soak run all start the same server. ``grpc.health.v1`` is
served without authentication (the default bypass selector).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ambient_grpc_auth._shutdown import wait_for_stop_signal
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2_grpc
from ambient_grpc_auth.reference.aio.servicer import AsyncSessionServicer
from ambient_grpc_auth.reference.servicer import SessionServicer
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor

__all__ = [
    "SHUTDOWN_GRACE_SECONDS",
    "SyncSessionServer",
    "run_session_server",
    "start_aio_session_server",
    "start_sync_session_server",
    "sync_stream_limit",
]

_log = logging.getLogger(__name__)

#: In-flight unary calls get this long to finish on shutdown; open watches
#: are cancelled when it ends (clients resume from their last seq).
SHUTDOWN_GRACE_SECONDS = 2.0
_SERVICE_NAME = "ambient.v1.SessionService"


def _bind(
    server: grpc.Server | grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None
) -> int:
    port = (
        server.add_secure_port(address, creds)
        if creds is not None
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


@dataclass
class SyncSessionServer:
    """A started sync server; ``stop()`` is idempotent."""

    #: The running gRPC server.
    server: grpc.Server
    #: The port it listens on (the bound one when asked for port 0).
    port: int
    #: The auth interceptor in front of every call (for its metrics).
    interceptor: ServerAuthInterceptor
    #: The health service, set to NOT_SERVING when ``stop()`` begins.
    health: health.HealthServicer

    def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def sync_stream_limit(max_workers: int) -> int:
    """How many of a sync server's ``max_workers`` threads streams may hold:
    three quarters, so that a quarter (at least one) is always left to unary
    calls."""
    return max(1, max_workers - max(1, max_workers // 4))


def start_sync_session_server(
    store: SessionStore,
    config: ServerAuthConfig,
    address: str = "127.0.0.1:0",
    *,
    server_credentials: grpc.ServerCredentials | None = None,
    max_workers: int = 64,
) -> SyncSessionServer:
    """Start a sync server. Every open watch holds one of ``max_workers``
    threads; prefer the aio server for many concurrent watchers.

    ``config.max_concurrent_streams`` is lowered to
    :func:`sync_stream_limit` ``(max_workers)`` when unset or higher, so that
    streams nobody reads can never take the workers unary calls need."""
    limit = sync_stream_limit(max_workers)
    if config.max_concurrent_streams is None or config.max_concurrent_streams > limit:
        config = dataclasses.replace(config, max_concurrent_streams=limit)
    interceptor = ServerAuthInterceptor(config=config)
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ambient-rpc")
    server = grpc.server(pool, interceptors=[interceptor])
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(store), server)  # type: ignore[no-untyped-call]
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = _bind(server, address, server_credentials)
    server.start()
    for name in ("", _SERVICE_NAME):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return SyncSessionServer(server, port, interceptor, checker)


async def start_aio_session_server(
    store: SessionStore,
    config: ServerAuthConfig,
    address: str = "127.0.0.1:0",
    *,
    server_credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int, AioServerAuthInterceptor]:
    """Start a ``grpc.aio`` server; the caller awaits ``server.stop(grace)``."""
    interceptor = AioServerAuthInterceptor(config=config)
    server = grpc.aio.server(interceptors=(interceptor,))
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(AsyncSessionServicer(store), server)  # type: ignore[no-untyped-call]
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = _bind(server, address, server_credentials)
    await server.start()
    for name in ("", _SERVICE_NAME):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, interceptor


def run_session_server(
    store: SessionStore,
    config: ServerAuthConfig,
    address: str,
    *,
    use_aio: bool = False,
    server_credentials: grpc.ServerCredentials | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (blocking).

    ``ready(port)`` is called once the server listens. Signal handlers are
    installed only from the main thread.
    """
    if use_aio:
        asyncio.run(_run_aio(store, config, address, server_credentials, ready))
        return
    running = start_sync_session_server(
        store, config, address, server_credentials=server_credentials
    )
    stop = threading.Event()
    previous: dict[signal.Signals, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        if ready is not None:
            ready(running.port)
        while not stop.wait(0.5):
            pass
        _log.info("session server shutting down")
    finally:
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


async def _run_aio(
    store: SessionStore,
    config: ServerAuthConfig,
    address: str,
    creds: grpc.ServerCredentials | None,
    ready: Callable[[int], None] | None,
) -> None:
    server, port, _ = await start_aio_session_server(
        store, config, address, server_credentials=creds
    )
    try:
        if ready is not None:
            ready(port)
        await wait_for_stop_signal()
        _log.info("session server shutting down")
    finally:
        await server.stop(SHUTDOWN_GRACE_SECONDS)
