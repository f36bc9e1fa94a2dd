"""The reference ``ambient.v1.SessionService`` for ``grpc.aio`` servers.

Mirror of :mod:`ambient_grpc_auth.reference.servicer` over the same
:class:`~ambient_grpc_auth.reference.store.SessionStore`. Every SQLite call runs in a
worker thread (``asyncio.to_thread``, which also carries the caller's
principal along), so the event loop never waits on the database lock or on
disk. The store announces commits with ``loop.call_soon_threadsafe``, so
watchers may share a store with sync servers and direct callers in other
threads. A watch that is cancelled (client gone, deadline, server stop) ends
through ``CancelledError`` and releases its subscription.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio

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

__all__ = ["AsyncSessionServicer", "serve"]

_Context = grpc.aio.ServicerContext[object, object]


class AsyncSessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    """``grpc.aio`` servicer over a :class:`SessionStore`; one instance serves
    every call. Same statuses, messages and lag limits as the sync servicer."""

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

    async def GetSession(
        self, request: sessions_pb2.GetSessionRequest, context: _Context
    ) -> sessions_pb2.Session:
        try:
            return await asyncio.to_thread(self._store.get_session, request.id)
        except SessionStoreError as exc:
            await context.abort(*status_of(exc))

    async def CreateSession(
        self, request: sessions_pb2.CreateSessionRequest, context: _Context
    ) -> sessions_pb2.Session:
        principal = current_principal()
        try:
            return await asyncio.to_thread(
                self._store.create_session,
                request.name,
                project_id=request.project_id if request.HasField("project_id") else None,
                created_by=principal.username if principal is not None else None,
                created_by_issuer=principal.issuer if principal is not None else None,
            )
        except SessionStoreError as exc:
            await context.abort(*status_of(exc))

    async def PushSessionMessage(
        self, request: sessions_pb2.PushSessionMessageRequest, context: _Context
    ) -> sessions_pb2.SessionMessage:
        try:
            check_push_allowed(current_principal(), request.event_type)
            return await asyncio.to_thread(
                self._store.append, request.session_id, request.event_type, request.payload
            )
        except SessionStoreError as exc:
            await context.abort(*status_of(exc))

    async def WatchSessionMessages(
        self, request: sessions_pb2.WatchSessionMessagesRequest, context: _Context
    ) -> AsyncIterator[sessions_pb2.SessionMessage]:
        store = self._store
        try:
            session_id, last = validate_watch(request.session_id, request.after_seq)
            await asyncio.to_thread(store.require_session, session_id)
            # Subscribing only takes the notifier's short lock: fine on the loop.
            subscription = store.subscribe(session_id)
        except SessionStoreError as exc:
            await context.abort(*status_of(exc))
        try:
            while subscription.active:
                # Live messages come from the in-memory tail; replay and
                # laggards read the database, off the loop.
                batch, more = subscription.recent(last, PAGE_SIZE), False
                if not batch:
                    try:
                        page = await asyncio.to_thread(store.read_messages, session_id, last)
                    except SessionStoreError as exc:
                        await context.abort(*status_of(exc))
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
                        await context.abort(*BEHIND_STATUS)
                if not more:
                    await subscription.wait_async(last)
            if (status := ended_status(subscription)) is not None:
                await context.abort(*status)
        finally:
            subscription.close()


async def serve(
    store: SessionStore,
    address: str = "127.0.0.1:0",
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    server_credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a ``grpc.aio`` server with an :class:`AsyncSessionServicer`.

    Returns the started server and the bound port. The caller stops the server
    (``await server.stop(grace)`` cancels open watches) and closes the store.
    Raises ``RuntimeError`` when the address cannot be bound.
    """
    server = grpc.aio.server(interceptors=tuple(interceptors))
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(AsyncSessionServicer(store), server)  # type: ignore[no-untyped-call]
    if server_credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials)
    await server.start()
    return server, port
