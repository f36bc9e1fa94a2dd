"""API-server authentication and authorization for ``grpc.aio`` servers.

:class:`ServerAuthInterceptor` is the ``grpc.aio`` twin of
:class:`ambient_grpc_auth.server.interceptor.AuthInterceptor`, with the same pipeline,
statuses and configuration (:class:`~ambient_grpc_auth.server.config.ServerAuthConfig`).
It never blocks the event loop: cache hits, the static token and JWT checks
with cached keys run inline (microseconds to a fraction of a millisecond), a
JWKS fetch runs in a worker thread, and the owner lookup runs in a worker
thread unless ``owner_lookup_inline`` is set.

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
from typing import Any, TypeAlias

import grpc
import grpc.aio

from ambient_grpc_auth.errors import TokenRejectedError
from ambient_grpc_auth.principal import Principal, _current, principal_scope
from ambient_grpc_auth.server.config import Denial, ServerAuthConfig, _AuthEngine
from ambient_grpc_auth.server.interceptor import _rejecting_handler as _sync_rejecting_handler
from ambient_grpc_auth.server.interceptor import _wrap_sync_handler
from ambient_grpc_auth.server.policy import MethodRule, MetricsHook

__all__ = ["ServerAuthInterceptor"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
AsyncGate = Callable[[Any], Awaitable[Denial | None]]


class ServerAuthInterceptor(grpc.aio.ServerInterceptor):
    """The ``grpc.aio`` server interceptor; see the module docstring."""

    def __init__(self, *, config: ServerAuthConfig) -> None:
        self._engine = _AuthEngine(config)

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

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        engine = self._engine
        method = handler_call_details.method
        bypassed, rule = engine.plan(method)
        if bypassed:
            engine.metrics.bypassed()
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        try:
            token, key, principal = engine.lookup(handler_call_details.invocation_metadata)
            if principal is None:
                principal = await engine.verify_async(token, key)
        except TokenRejectedError as exc:
            return _rejecting_handler(handler, engine.deny(method, exc))
        if handler is None:
            return None
        if rule.deny:
            denied = TokenRejectedError("method_denied", grpc.StatusCode.PERMISSION_DENIED)
            return _rejecting_handler(handler, engine.deny(method, denied, principal))
        # A caller's repeated calls to one method reuse one wrapped handler.
        if key is not None:
            wrapped: Handler | None = engine.memo_get(key, method, principal, handler)
            if wrapped is not None:
                return wrapped
        wrapped = _wrap(handler, engine, method, principal, rule)
        if key is not None:
            engine.memo_put(key, method, principal, handler, wrapped)
        return wrapped


def _rejecting_handler(handler: Handler | None, denial: Denial) -> Handler:
    """A coroutine handler of ``handler``'s cardinality that aborts at once."""
    code, details = denial

    async def reject(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    shape = _sync_rejecting_handler(handler, denial)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(shape.request_streaming, shape.response_streaming)]
    return factory(reject)


def _is_async(behaviour: object) -> bool:
    # The same test grpc.aio applies to decide how to drive a handler.
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _behaviour(handler: Handler) -> Any:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def _wrap(
    handler: Handler, engine: _AuthEngine, method: str, principal: Principal, rule: MethodRule
) -> Handler:
    metrics = engine.metrics
    inner = _behaviour(handler)
    if not _is_async(inner):
        sync_gate = None
        if rule.session_field is not None:
            sync_gate = engine.gate(method, principal, rule)
        return _wrap_sync_handler(handler, principal, sync_gate, metrics)

    # Inline lookups are decided without a coroutine; others await a thread.
    inline: Callable[[Any], Denial | None] | None = None
    gate: AsyncGate | None = None
    if rule.session_field is not None:
        if engine.lookup_inline:
            inline = engine.gate(method, principal, rule)
            decide = inline

            async def gate(request: Any) -> Denial | None:
                return decide(request)

        else:

            def gate(request: Any) -> Awaitable[Denial | None]:
                return engine.check_async(method, principal, rule, request)

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer

    async def admit(request: Any, context: Any) -> None:
        if gate is not None and (denial := await gate(request)) is not None:
            await context.abort(*denial)
        metrics.allowed()

    async def requests_of(requests: Any, context: Any) -> tuple[Any, Any]:
        if gate is None:
            return requests, context
        stream = await _GatedStream.open(context, gate)
        return stream, _GatedContext(context, stream)

    if not handler.request_streaming:
        if not handler.response_streaming:

            async def uu(request: Any, context: Any) -> Any:
                if inline is not None:
                    if (denial := inline(request)) is not None:
                        await context.abort(*denial)
                    metrics.allowed()
                else:
                    await admit(request, context)
                scope = _current.set(principal)
                try:
                    return await inner(request, context)
                finally:
                    _current.reset(scope)

            return grpc.unary_unary_rpc_method_handler(uu, deserializer, serializer)
        if inspect.isasyncgenfunction(inner):

            async def us_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                await admit(request, context)
                async with contextlib.aclosing(_relay(principal, inner, request, context)) as out:
                    async for item in out:
                        yield item

            return grpc.unary_stream_rpc_method_handler(us_gen, deserializer, serializer)

        async def us_rw(request: Any, context: Any) -> None:
            await admit(request, context)
            with principal_scope(principal):
                await inner(request, context)

        return grpc.unary_stream_rpc_method_handler(us_rw, deserializer, serializer)

    if not handler.response_streaming:

        async def su(requests: Any, context: Any) -> Any:
            requests, context = await requests_of(requests, context)
            metrics.allowed()
            with principal_scope(principal):
                return await inner(requests, context)

        return grpc.stream_unary_rpc_method_handler(su, deserializer, serializer)
    if inspect.isasyncgenfunction(inner):

        async def ss_gen(requests: Any, context: Any) -> AsyncIterator[Any]:
            requests, context = await requests_of(requests, context)
            metrics.allowed()
            async with contextlib.aclosing(_relay(principal, inner, requests, context)) as out:
                async for item in out:
                    yield item

        return grpc.stream_stream_rpc_method_handler(ss_gen, deserializer, serializer)

    async def ss_rw(requests: Any, context: Any) -> None:
        requests, context = await requests_of(requests, context)
        metrics.allowed()
        with principal_scope(principal):
            await inner(requests, context)

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


class _GatedStream:
    """The request stream of a checked streaming-request call.

    :meth:`open` reads and checks the first message before the handler starts
    (an empty stream is checked as a request without a session id, i.e.
    denied); later messages are checked as the handler reads them, by
    iteration or through ``context.read()`` (both draw from this object, so
    the prefetched first message is delivered exactly once).
    """

    def __init__(self, context: Any, gate: AsyncGate, first: Any) -> None:
        self._context = context
        self._gate = gate
        self._pending = first

    @classmethod
    async def open(cls, context: Any, gate: AsyncGate) -> _GatedStream:
        first = await context.read()
        denial = await gate(None if first is grpc.aio.EOF else first)
        if denial is not None:
            await context.abort(*denial)
        return cls(context, gate, first)

    async def read(self) -> Any:
        if self._pending is not None:
            message, self._pending = self._pending, None
            return message
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            denial = await self._gate(message)
            if denial is not None:
                await self._context.abort(*denial)
        return message

    def __aiter__(self) -> _GatedStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message


class _GatedContext:
    """Forwards to the real servicer context; ``read()`` goes through the
    checked stream (the reader/writer API bypasses the request iterator)."""

    def __init__(self, context: Any, stream: _GatedStream) -> None:
        self._context = context
        self._stream = stream

    async def read(self) -> Any:
        return await self._stream.read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
