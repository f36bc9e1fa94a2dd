"""API-server authentication and authorization for sync ``grpc`` servers.

:class:`ServerAuthInterceptor` is a :class:`grpc.ServerInterceptor`. For every call
that the bypass selector does not exempt (health checks and reflection by
default), it

1. reads exactly one ``authorization: Bearer <token>`` value and verifies the
   token (verified-token cache first, then the configured authenticators);
   failures answer UNAUTHENTICATED (or UNAVAILABLE when keys cannot be
   loaded) before any handler code runs;
2. classifies the caller as a user or a service (see
   :class:`~ambient_grpc_auth.server.policy.CallerClassifier`);
3. applies the method's rule: for session rules it reads the session id from
   the deserialized request and allows service callers (session-scoped ones
   on their own session only) and the session's owner; anything else answers
   PERMISSION_DENIED, also for sessions that do not exist. For
   client-streaming and bidirectional methods the first message is read and
   checked before the handler starts, each later one as the handler reads it;
4. runs the handler with the caller available from
   :func:`ambient_grpc_auth.principal.current_principal`, in unary handlers
   and inside response generators alike.

Rejections use a handler of the method's own cardinality; details sent to the
peer are generic ("authentication required", "invalid credentials",
"permission denied"); the specific reason is logged (logger
``ambient_grpc_auth.server.interceptor``, no token material) and counted in the metrics
hook. Methods the server does not implement answer UNIMPLEMENTED only to
authenticated callers.

Configure with :class:`~ambient_grpc_auth.server.config.ServerAuthConfig`, e.g.::

    interceptor = ServerAuthInterceptor.from_env(issuers=[...], owner_lookup=store.owner_of)
    server = grpc.server(executor, interceptors=[interceptor])

Place it first in the interceptor list so nothing runs before it. Thread-safe.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc

from ambient_grpc_auth.errors import TokenRejectedError
from ambient_grpc_auth.principal import Principal, _current, principal_scope
from ambient_grpc_auth.server.config import Denial, ServerAuthConfig, _AuthEngine
from ambient_grpc_auth.server.policy import MetricsHook

__all__ = ["ServerAuthInterceptor"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
SyncGate = Callable[[Any], Denial | None]


class ServerAuthInterceptor(grpc.ServerInterceptor):
    """The sync server interceptor; see the module docstring."""

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

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        engine = self._engine
        method = handler_call_details.method
        bypassed, rule = engine.plan(method)
        if bypassed:
            engine.metrics.bypassed()
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        try:
            token, key, principal = engine.lookup(handler_call_details.invocation_metadata)
            if principal is None:
                principal = engine.verify(token, key)
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
        gate: SyncGate | None = None
        if rule.session_field is not None:
            gate = engine.gate(method, principal, rule)
        wrapped = _wrap_sync_handler(handler, principal, gate, engine.metrics)
        if key is not None:
            engine.memo_put(key, method, principal, handler, wrapped)
        return wrapped


# --- handlers (also used by the aio interceptor for sync servicer methods) ---


def _rejecting_handler(handler: Handler | None, denial: Denial) -> Handler:
    """A handler of ``handler``'s cardinality that aborts with ``denial``.

    Requests are not deserialized (the original deserializer is dropped).
    With no handler (unknown method) a stream-stream handler is used: it
    aborts without waiting for any request, whatever the client sends.
    """
    code, details = denial

    def reject(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    if handler is None or handler.request_streaming:
        if handler is not None and not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(reject)
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


def _scoped_iteration(principal: Principal, start: Callable[[], Any]) -> Iterator[Any]:
    """Iterate what ``start()`` returns with ``principal`` current during
    every step (response generators run lazily, outside the handler call).

    Every step runs in one copied context in which the principal is current,
    instead of setting and resetting it around each message.
    """
    context = contextvars.copy_context()
    context.run(_enter_scope, principal)
    run = context.run
    iterator = run(lambda: iter(start()))
    step = iterator.__next__
    try:
        while True:
            try:
                item = run(step)
            except StopIteration:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            run(close)


def _enter_scope(principal: Principal) -> None:
    # Runs inside the copied context only; the caller's context is untouched.
    principal_scope(principal).__enter__()


def _checked_requests(
    requests: Iterator[Any], gate: SyncGate, context: grpc.ServicerContext
) -> Iterator[Any]:
    """Read and check the first request now (an empty stream is checked as a
    request without a session id, i.e. denied), then check each later one as
    the handler pulls it. The handler thus starts only with an allowed first
    message, and never receives a denied one."""
    iterator = iter(requests)
    first = next(iterator, None)
    denial = gate(first)
    if denial is not None:
        context.abort(*denial)
    return itertools.chain((first,), _gated(iterator, gate, context))


def _gated(requests: Iterator[Any], gate: SyncGate, context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        denial = gate(request)
        if denial is not None:
            context.abort(*denial)
        yield request


def _wrap_sync_handler(
    handler: Handler, principal: Principal, gate: SyncGate | None, metrics: MetricsHook
) -> Handler:
    """``handler`` with the gate applied to its request(s) and ``principal``
    current while its behaviour runs.

    Response-streaming behaviours are generator functions so that nothing,
    not even the gate, runs before the first ``next()``: grpc.aio calls sync
    stream handlers on the event loop and iterates them in a worker thread.
    """
    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if not handler.request_streaming:
        if not handler.response_streaming:
            unary_unary = handler.unary_unary
            assert unary_unary is not None

            def uu(request: Any, context: grpc.ServicerContext) -> Any:
                if gate is not None and (denial := gate(request)) is not None:
                    context.abort(*denial)
                metrics.allowed()
                scope = _current.set(principal)
                try:
                    return unary_unary(request, context)
                finally:
                    _current.reset(scope)

            return grpc.unary_unary_rpc_method_handler(uu, deserializer, serializer)
        unary_stream = handler.unary_stream
        assert unary_stream is not None

        def us(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if gate is not None and (denial := gate(request)) is not None:
                context.abort(*denial)
            metrics.allowed()
            yield from _scoped_iteration(principal, lambda: unary_stream(request, context))

        return grpc.unary_stream_rpc_method_handler(us, deserializer, serializer)
    if not handler.response_streaming:
        stream_unary = handler.stream_unary
        assert stream_unary is not None

        def su(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            checked = requests if gate is None else _checked_requests(requests, gate, context)
            metrics.allowed()
            with principal_scope(principal):
                return stream_unary(checked, context)

        return grpc.stream_unary_rpc_method_handler(su, deserializer, serializer)
    stream_stream = handler.stream_stream
    assert stream_stream is not None

    def ss(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        checked = requests if gate is None else _checked_requests(requests, gate, context)
        metrics.allowed()
        yield from _scoped_iteration(principal, lambda: stream_stream(checked, context))

    return grpc.stream_stream_rpc_method_handler(ss, deserializer, serializer)
