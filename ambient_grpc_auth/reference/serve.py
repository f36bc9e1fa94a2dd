"""Running the reference SessionService behind the auth interceptor.

One function per runtime (sync ``grpc`` and ``grpc.aio``) that wires the
store, the interceptor, the standard health service and server reflection
together, so the CLI, the demo and the soak run all start the same server.
``grpc.health.v1`` and server reflection are served without authentication
(the default bypass selector): reflection tells a caller the service schema
(the same as the published ``.proto``), never data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

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
#: Reflection clients (grpcurl, grpcui, grpc-go's) ask ``v1`` first and fall
#: back to ``v1alpha``; grpcio-reflection implements ``v1alpha`` only. The two
#: protocols are the same messages under two package names, so one servicer
#: answers both.
_REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.Server | grpc.aio.Server) -> None:
    names = (_SERVICE_NAME, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME)
    servicer = (
        grpc_reflection.aio.ReflectionServicer(names)
        if isinstance(server, grpc.aio.Server)
        else grpc_reflection.ReflectionServicer(names)
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    handlers = {"ServerReflectionInfo": v1}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_REFLECTION_V1_SERVICE, handlers),)
    )


#: gRPC binds with SO_REUSEPORT by default: a second server on the same port
#: would then start silently and take half of the connections (and, with its
#: own database, half of the sessions). Refuse a port in use instead.
_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.so_reuseport", 0),)


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        return None
    return host.strip("[]"), int(port_text)


def _port_in_use(address: str) -> bool:
    """True when some socket already listens on ``address`` (HOST:PORT).

    Checked before gRPC binds, so the refusal is one clear line rather than
    gRPC's own log output. Port 0 and unparsable addresses are left to gRPC.
    """
    split = _split_address(address)
    if split is None or split[1] == 0:
        return False
    host, port = split
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return False  # gRPC reports unresolvable hosts itself
    for family, kind, proto, _, sockaddr in infos:
        with contextlib.closing(socket.socket(family, kind, proto)) as probe:
            # The same options gRPC uses (SO_REUSEADDR, no SO_REUSEPORT): a
            # port in TIME_WAIT is free, a listening one is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def _bind(
    server: grpc.Server | grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None
) -> int:
    in_use = f"cannot listen on {address}: address already in use (another server on that port?)"
    if _port_in_use(address):
        raise OSError(in_use)
    try:
        port = (
            server.add_secure_port(address, creds)
            if creds is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpcio >= 1.50 raises instead of returning 0
        port = 0
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
    reflection: bool = True,
) -> SyncSessionServer:
    """Start a sync server. Every open watch holds one of ``max_workers``
    threads; prefer the aio server for many concurrent watchers.
    ``reflection=False`` leaves server reflection out (reflection calls then
    get UNIMPLEMENTED).

    ``config.max_concurrent_streams`` is lowered to
    :func:`sync_stream_limit` ``(max_workers)`` when unset or higher, so that
    streams nobody reads can never take the workers unary calls need."""
    limit = sync_stream_limit(max_workers)
    if config.max_concurrent_streams is None or config.max_concurrent_streams > limit:
        config = dataclasses.replace(config, max_concurrent_streams=limit)
    interceptor = ServerAuthInterceptor(config=config)
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ambient-rpc")
    server = grpc.server(pool, interceptors=[interceptor], options=_SERVER_OPTIONS)
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(store), server)  # type: ignore[no-untyped-call]
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if reflection:
        _add_reflection(server)
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
    reflection: bool = True,
) -> tuple[grpc.aio.Server, int, AioServerAuthInterceptor]:
    """Start a ``grpc.aio`` server; the caller awaits ``server.stop(grace)``.
    ``reflection`` as for :func:`start_sync_session_server`."""
    interceptor = AioServerAuthInterceptor(config=config)
    server = grpc.aio.server(interceptors=(interceptor,), options=_SERVER_OPTIONS)
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(AsyncSessionServicer(store), server)  # type: ignore[no-untyped-call]
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if reflection:
        _add_reflection(server)
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
    reflection: bool = True,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (blocking).

    ``ready(port)`` is called once the server listens. Signal handlers are
    installed only from the main thread. ``reflection`` as for
    :func:`start_sync_session_server`.
    """
    if use_aio:
        asyncio.run(_run_aio(store, config, address, server_credentials, ready, reflection))
        return
    running = start_sync_session_server(
        store, config, address, server_credentials=server_credentials, reflection=reflection
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
        # Open watches end with UNAVAILABLE (clients resume) before the
        # grace period, rather than being cancelled when it runs out.
        store.end_watches()
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


async def _run_aio(
    store: SessionStore,
    config: ServerAuthConfig,
    address: str,
    creds: grpc.ServerCredentials | None,
    ready: Callable[[int], None] | None,
    reflection: bool,
) -> None:
    server, port, _ = await start_aio_session_server(
        store, config, address, server_credentials=creds, reflection=reflection
    )
    try:
        if ready is not None:
            ready(port)
        await wait_for_stop_signal()
        _log.info("session server shutting down")
    finally:
        # Cancelled handlers make grpc.aio log a CancelledError traceback per
        # open watch: end them first, so that stop() finds none running.
        store.end_watches()
        await server.stop(SHUTDOWN_GRACE_SECONDS)
