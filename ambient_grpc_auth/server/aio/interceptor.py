"""API-server authentication and authorization for ``grpc.aio`` servers.

:class:`ServerAuthInterceptor` is the ``grpc.aio`` twin of
:class:`ambient_grpc_auth.server.interceptor.ServerAuthInterceptor`, with the same
pipeline (:class:`~ambient_grpc_auth.server.engine.AuthEngine`), statuses and
configuration (:class:`~ambient_grpc_auth.server.config.ServerAuthConfig`); this
module only turns the engine's decisions into ``grpc.aio`` handlers.
It never blocks the event loop: cache hits, the static token and JWT checks
with cached keys run inline (microseconds to a fraction of a millisecond), a
JWKS fetch runs in a worker thread, and the owner lookup runs in a worker
thread of the interceptor's own bounded pool (``owner_lookup_workers``,
never the loop's default executor) unless ``owner_lookup_inline`` is set.
Streaming calls are bounded per caller and in total as in the sync twin
(RESOURCE_EXHAUSTED beyond a limit): each open stream holds a task and the
call's buffers, which streams nobody reads would otherwise pile up.

Handlers may be coroutine functions, async generator functions, coroutine
functions using the reader/writer API (``context.read()`` /
``context.write()``) or plain sync functions and generators; each is wrapped
by a function of the same kind, so grpc.aio drives it exactly as before, with
the caller available from :func:`ambient_grpc_auth.principal.current_principal`.
For client-streaming and bidirectional methods with a session rule every
request message is checked, whether read by iteration or by ``context.read()``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth.principal import (
    Principal,
    principal_scope,
    reset_current_principal,
    set_current_principal,
)
from ambient_grpc_auth.server._handlers import (
    BypassedStreams,
    Handler,
    OpenStream,
    rejecting_factory,
    release_on_end,
    wrap_bypassed_stream,
    wrap_sync_handler,
)
from ambient_grpc_auth.server._streams import StreamSlot
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.engine import Admission, AuthEngine, Denial, Pass, Verification
from ambient_grpc_auth.server.metrics import MetricsHook

__all__ = ["ServerAuthInterceptor"]

AsyncCheck = Callable[[Any], Awaitable[Denial | None]]


class ServerAuthInterceptor(grpc.aio.ServerInterceptor):
    """The ``grpc.aio`` server interceptor; see the module docstring."""

    def __init__(self, *, config: ServerAuthConfig) -> None:
        self._engine = AuthEngine(config)
        self._bypassed = BypassedStreams(self._engine, _wrap_bypassed)

    @classmethod
    def from_env(cls, **kwargs: Any) -> ServerAuthInterceptor:
        """``ServerAuthInterceptor(config=ServerAuthConfig.from_env(**kwargs))``."""
        return cls(config=ServerAuthConfig.from_env(**kwargs))

    @property
    def config(self) -> ServerAuthConfig:
        return self._engine.config

    @property
    def metrics(self) -> MetricsHook:
        return self._engine.metrics

    def open_streams(self) -> int:
        """Streaming calls open now, as counted against the stream limits."""
        return self._engine.open_streams()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        decision = self._engine.admit(
            handler_call_details.method, handler_call_details.invocation_metadata, handler
        )
        if isinstance(decision, Verification):
            decision = await decision.verify_async()
        if isinstance(decision, Admission):
            wrapped: Handler | None = decision.wrapped
            if wrapped is None:
                assert handler is not None  # admissions are only made for a handler
                wrapped = decision.wrapped = _wrap(handler, decision, self._engine.metrics)
            return wrapped
        if isinstance(decision, Denial):
            return _rejecting_handler(handler, decision)
        if decision is Pass.BYPASSED:
            return self._bypassed.handler_for(handler, handler_call_details.method)
        return handler  # unimplemented


def _rejecting_handler(handler: Handler | None, denial: Denial) -> Handler:
    """A coroutine handler of ``handler``'s cardinality that aborts at once."""
    code, details = denial

    async def reject(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    return rejecting_factory(handler)(reject)


def _is_async(behaviour: object) -> bool:
    # The same test grpc.aio applies to decide how to drive a handler.
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _behaviour(handler: Handler) -> Any:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


async def _stream_slot(open_stream: OpenStream, context: Any) -> StreamSlot:
    """A slot for this streaming call, or abort with the denial."""
    slot = open_stream()
    if isinstance(slot, StreamSlot):
        release_on_end(context, slot)
        return slot
    await context.abort(*slot)
    raise AssertionError("abort() returns by raising")  # pragma: no cover


def _wrap_bypassed(handler: Handler, open_stream: OpenStream) -> Handler:
    """The streaming ``handler`` of a bypassed method, holding a slot while
    the call lasts; a wrapper of the same kind as the behaviour."""
    inner = _behaviour(handler)
    if not _is_async(inner):
        return wrap_bypassed_stream(handler, open_stream)
    if inspect.isasyncgenfunction(inner):

        async def counted_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            slot = await _stream_slot(open_stream, context)
            try:
                async with contextlib.aclosing(inner(request, context)) as out:
                    async for item in out:
                        yield item
            finally:
                slot.release()

        behaviour: Any = counted_stream
    else:

        async def counted(request: Any, context: Any) -> Any:
            slot = await _stream_slot(open_stream, context)
            try:
                return await inner(request, context)
            finally:
                slot.release()

        behaviour = counted
    return rejecting_factory(handler)(
        behaviour, handler.request_deserializer, handler.response_serializer
    )


def _wrap(handler: Handler, admission: Admission, metrics: MetricsHook) -> Handler:
    """``handler`` with the admission's request check applied, the call
    counted as allowed once the first request passes, and the principal
    current while its behaviour runs; a wrapper of the same kind as the
    behaviour, so grpc.aio drives it as before."""
    principal = admission.principal
    inner = _behaviour(handler)
    open_stream = admission.open_stream
    if not _is_async(inner):
        # grpc.aio runs sync behaviours in worker threads: a blocking check is fine.
        return wrap_sync_handler(handler, principal, admission.check, metrics, open_stream)

    async def stream_slot(context: Any) -> StreamSlot:
        return await _stream_slot(open_stream, context)

    # Inline checks are decided without a coroutine; others await a thread.
    inline = None
    check: AsyncCheck | None = None
    if admission.check is not None:
        if admission.check_inline:
            inline = decide = admission.check

            async def check(request: Any) -> Denial | None:
                return decide(request)

        else:
            check = admission.check_async

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer

    async def start(request: Any, context: Any) -> None:
        if check is not None and (denial := await check(request)) is not None:
            await context.abort(*denial)
        metrics.allowed()

    async def requests_of(requests: Any, context: Any) -> tuple[Any, Any]:
        if check is None:
            return requests, context
        stream = await _CheckedStream.open(context, check)
        return stream, _CheckedContext(context, stream)

    if not handler.request_streaming:
        if not handler.response_streaming:

            async def uu(request: Any, context: Any) -> Any:
                if inline is not None:
                    if (denial := inline(request)) is not None:
                        await context.abort(*denial)
                    metrics.allowed()
                else:
                    await start(request, context)
                scope = set_current_principal(principal)
                try:
                    return await inner(request, context)
                finally:
                    reset_current_principal(scope)

            return grpc.unary_unary_rpc_method_handler(uu, deserializer, serializer)
        if inspect.isasyncgenfunction(inner):

            async def us_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                slot = await stream_slot(context)
                try:
                    await start(request, context)
                    relay = _relay(principal, inner, request, context)
                    async with contextlib.aclosing(relay) as out:
                        async for item in out:
                            yield item
                finally:
                    slot.release()

            return grpc.unary_stream_rpc_method_handler(us_gen, deserializer, serializer)

        async def us_rw(request: Any, context: Any) -> None:
            slot = await stream_slot(context)
            try:
                await start(request, context)
                with principal_scope(principal):
                    await inner(request, context)
            finally:
                slot.release()

        return grpc.unary_stream_rpc_method_handler(us_rw, deserializer, serializer)

    if not handler.response_streaming:

        async def su(requests: Any, context: Any) -> Any:
            slot = await stream_slot(context)
            try:
                requests, context = await requests_of(requests, context)
                metrics.allowed()
                with principal_scope(principal):
                    return await inner(requests, context)
            finally:
                slot.release()

        return grpc.stream_unary_rpc_method_handler(su, deserializer, serializer)
    if inspect.isasyncgenfunction(inner):

        async def ss_gen(requests: Any, context: Any) -> AsyncIterator[Any]:
            slot = await stream_slot(context)
            try:
                requests, context = await requests_of(requests, context)
                metrics.allowed()
                relay = _relay(principal, inner, requests, context)
                async with contextlib.aclosing(relay) as out:
                    async for item in out:
                        yield item
            finally:
                slot.release()

        return grpc.stream_stream_rpc_method_handler(ss_gen, deserializer, serializer)

    async def ss_rw(requests: Any, context: Any) -> None:
        slot = await stream_slot(context)
        try:
            requests, context = await requests_of(requests, context)
            metrics.allowed()
            with principal_scope(principal):
                await inner(requests, context)
        finally:
            slot.release()

    return grpc.stream_stream_rpc_method_handler(ss_rw, deserializer, serializer)


async def _relay(
    principal: Principal, inner: Any, request: Any, context: Any
) -> AsyncGenerator[Any, None]:
    """Drive the async generator ``inner(request, context)`` with
    ``principal`` current during every step."""
    with principal_scope(principal):
        responses = inner(request, context)
    try:
        while True:
            with principal_scope(principal):
                try:
                    item = await responses.__anext__()
                except StopAsyncIteration:
                    return
            yield item
    finally:
        with principal_scope(principal):
            await responses.aclose()


class _CheckedStream:
    """The request stream of a checked streaming-request call.

    :meth:`open` reads and checks the first message before the handler starts
    (an empty stream is checked as a request without a session id, i.e.
    denied); later messages are checked as the handler reads them, by
    iteration or through ``context.read()`` (both draw from this object, so
    the prefetched first message is delivered exactly once).
    """

    def __init__(self, context: Any, check: AsyncCheck, first: Any) -> None:
        self._context = context
        self._check = check
        self._pending = first

    @classmethod
    async def open(cls, context: Any, check: AsyncCheck) -> _CheckedStream:
        first = await context.read()
        denial = await check(None if first is grpc.aio.EOF else first)
        if denial is not None:
            await context.abort(*denial)
        return cls(context, check, first)

    async def read(self) -> Any:
        if self._pending is not None:
            message, self._pending = self._pending, None
            return message
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            denial = await self._check(message)
            if denial is not None:
                await self._context.abort(*denial)
        return message

    def __aiter__(self) -> _CheckedStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message


class _CheckedContext:
    """Forwards to the real servicer context; ``read()`` goes through the
    checked stream (the reader/writer API bypasses the request iterator)."""

    def __init__(self, context: Any, stream: _CheckedStream) -> None:
        self._context = context
        self._stream = stream

    async def read(self) -> Any:
        return await self._stream.read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
