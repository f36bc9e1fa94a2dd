"""A small reference ``ambient.v1.SessionService`` backed by SQLite (sync ``grpc``).

Used by the demo, the CLI and the tests as the API server behind the auth
interceptor. The storage, validation and the status mapping live in
:mod:`ambient_grpc_auth.reference.store` (commit notification in
:mod:`ambient_grpc_auth.reference.hub`) and are shared with the ``grpc.aio``
twin, :mod:`ambient_grpc_auth.reference.aio.servicer`.

Typical use::

    store = SessionStore("sessions.db")
    server, port = serve(store, "127.0.0.1:0", interceptors=[auth_interceptor])
    ...
    server.stop(grace=5).wait()   # watchers are cancelled at the end of the grace
    store.close()                 # or close the store first to end watchers at once

Security: this service enforces only the rules that belong to the data
(argument bounds, "service callers may not push user messages"). Who may
touch which session is the auth interceptor's job;
:meth:`~ambient_grpc_auth.reference.store.SessionStore.owner_of` is the
lookup it uses. ``serve`` binds whatever address it is given: pass
``server_credentials`` for anything beyond loopback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Final

import grpc

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.principal import current_principal
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.store import (
    BEHIND_STATUS,
    PAGE_SIZE,
    WATCH_MAX_LAG_CHARS,
    WATCH_MAX_LAG_MESSAGES,
    WATCH_MAX_SEND_WAIT,
    SessionStore,
    SessionStoreError,
    check_push_allowed,
    ended_status,
    status_of,
    validate_watch,
)

__all__ = ["SessionServicer", "serve"]

#: How often a waiting sync watcher re-checks that its RPC is still alive, as
#: a backstop to the termination callback that normally wakes it at once.
_POLL_SECONDS: Final = 1.0


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    """Sync servicer over a :class:`SessionStore` (thread-safe; one instance
    serves every call). Refusals are sent with :func:`status_of`'s code and a
    generic message; each watch holds one server worker thread while open.

    A watch whose send waited at least ``max_send_wait`` seconds (its client
    is not reading) while it fell more than ``max_lag_messages`` messages or
    ``max_lag_chars`` payload characters behind what was published since it
    began is ended with
    :data:`~ambient_grpc_auth.reference.store.BEHIND_STATUS` (ABORTED); the
    client helpers resume from their last seq."""

    def __init__(
        self,
        store: SessionStore,
        *,
        max_lag_messages: int = WATCH_MAX_LAG_MESSAGES,
        max_lag_chars: int = WATCH_MAX_LAG_CHARS,
        max_send_wait: float = WATCH_MAX_SEND_WAIT,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._max_lag = (max_lag_messages, max_lag_chars)
        self._max_send_wait = max_send_wait
        self._clock = clock

    def GetSession(
        self, request: sessions_pb2.GetSessionRequest, context: grpc.ServicerContext
    ) -> sessions_pb2.Session:
        try:
            return self._store.get_session(request.id)
        except SessionStoreError as exc:
            context.abort(*status_of(exc))

    def CreateSession(
        self, request: sessions_pb2.CreateSessionRequest, context: grpc.ServicerContext
    ) -> sessions_pb2.Session:
        principal = current_principal()
        try:
            return self._store.create_session(
                request.name,
                project_id=request.project_id if request.HasField("project_id") else None,
                created_by=principal.username if principal is not None else None,
                created_by_issuer=principal.issuer if principal is not None else None,
            )
        except SessionStoreError as exc:
            context.abort(*status_of(exc))

    def PushSessionMessage(
        self, request: sessions_pb2.PushSessionMessageRequest, context: grpc.ServicerContext
    ) -> sessions_pb2.SessionMessage:
        try:
            check_push_allowed(current_principal(), request.event_type)
            return self._store.append(request.session_id, request.event_type, request.payload)
        except SessionStoreError as exc:
            context.abort(*status_of(exc))

    def WatchSessionMessages(
        self, request: sessions_pb2.WatchSessionMessagesRequest, context: grpc.ServicerContext
    ) -> Iterator[sessions_pb2.SessionMessage]:
        store = self._store
        try:
            session_id, last = validate_watch(request.session_id, request.after_seq)
            store.require_session(session_id)
            subscription = store.subscribe(session_id)
        except SessionStoreError as exc:
            context.abort(*status_of(exc))
        # Client cancel, deadline and server stop all end the RPC: wake the
        # waiting worker right away instead of at its next poll.
        if not context.add_callback(subscription.close):
            subscription.close()
        try:
            while subscription.active:
                # Live messages come from the in-memory tail; replay and
                # laggards read the database.
                batch, more = subscription.recent(last, PAGE_SIZE), False
                if not batch:
                    try:
                        page = store.read_messages(session_id, last)
                    except SessionStoreError as exc:
                        context.abort(*status_of(exc))
                    batch, more = page.messages, page.more
                for message in batch:
                    # The yield returns once the message is sent: the send of
                    # a client that stopped reading waits on flow control
                    # while messages pile up behind it.
                    started = self._clock.monotonic()
                    yield message
                    last = message.seq
                    if self._clock.monotonic() - started >= self._max_send_wait and (
                        subscription.behind(last, *self._max_lag)
                    ):
                        context.abort(*BEHIND_STATUS)
                if more:
                    continue
                while not subscription.wait(last, timeout=_POLL_SECONDS):
                    if not context.is_active():
                        return
            if (status := ended_status(subscription)) is not None:
                context.abort(*status)
        finally:
            subscription.close()


def serve(
    store: SessionStore,
    address: str = "127.0.0.1:0",
    *,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    server_credentials: grpc.ServerCredentials | None = None,
    thread_pool: futures.ThreadPoolExecutor | None = None,
    max_workers: int = 32,
) -> tuple[grpc.Server, int]:
    """Start a sync gRPC server with a :class:`SessionServicer` on ``address``.

    Returns the started server and the bound port (useful with port 0).
    Without ``thread_pool`` a pool of ``max_workers`` threads is created; every
    open watch holds one of them. The caller stops the server and closes the
    store; pass your own pool to control when its idle threads exit.
    Raises ``RuntimeError`` when the address cannot be bound.
    """
    pool = thread_pool or futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix="ambient-sessions"
    )
    server = grpc.server(pool, interceptors=list(interceptors))
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(store), server)  # type: ignore[no-untyped-call]
    if server_credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials)
    server.start()
    return server, port
