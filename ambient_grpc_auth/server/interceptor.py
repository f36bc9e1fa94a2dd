"""API-server authentication and authorization for sync ``grpc`` servers.

:class:`ServerAuthInterceptor` is a :class:`grpc.ServerInterceptor`. For every
call that the bypass selector does not exempt (health checks and reflection by
default) it verifies the bearer token before any handler code runs, classifies
the caller (user, service, runner scoped to one session), applies the method's
rule and, for session rules, the ownership check on every request message,
then runs the handler with the caller available from
:func:`ambient_grpc_auth.principal.current_principal`, in unary handlers and
inside response generators alike. For client-streaming and bidirectional
methods the first message is read and checked before the handler starts, each
later one as the handler reads it.

The decisions, and their order, come from
:class:`~ambient_grpc_auth.server.engine.AuthEngine` (written once for this
interceptor and its ``grpc.aio`` twin); this module only turns them into gRPC
handlers. Rejections use a handler of the method's own cardinality; details
sent to the peer are generic ("authentication required", "invalid
credentials", "permission denied", "authentication temporarily unavailable");
the specific reason is logged (logger ``ambient_grpc_auth.server.interceptor``,
no token material) and counted in the metrics hook. Methods the server does
not implement answer UNIMPLEMENTED only to authenticated callers.

Streaming calls are bounded per caller (``max_streams_per_principal``) and in
total (``max_concurrent_streams``): each holds a worker thread for as long as
it is open, so keep the total below the server's worker count and unary calls
always find a free worker. Beyond a limit a new stream is refused
RESOURCE_EXHAUSTED. Streaming calls to bypassed methods (health ``Watch``,
reflection) count too, all of them as one anonymous caller.

Configure with :class:`~ambient_grpc_auth.server.config.ServerAuthConfig`, e.g.::

    interceptor = ServerAuthInterceptor.from_env(issuers=[...], owner_lookup=store.owner_of)
    server = grpc.server(executor, interceptors=[interceptor])

Place it first in the interceptor list so nothing runs before it. Thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ambient_grpc_auth.server._handlers import (
    BypassedStreams,
    Handler,
    rejecting_factory,
    wrap_bypassed_stream,
    wrap_sync_handler,
)
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.engine import Admission, AuthEngine, Denial, Pass, Verification
from ambient_grpc_auth.server.metrics import MetricsHook

__all__ = ["ServerAuthInterceptor"]


class ServerAuthInterceptor(grpc.ServerInterceptor):
    """The sync server interceptor; see the module docstring."""

    def __init__(self, *, config: ServerAuthConfig) -> None:
        self._engine = AuthEngine(config)
        self._bypassed = BypassedStreams(self._engine, wrap_bypassed_stream)

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

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        decision = self._engine.admit(
            handler_call_details.method, handler_call_details.invocation_metadata, handler
        )
        if isinstance(decision, Verification):
            # grpc runs interceptors on the server's one polling thread: a
            # verification that may wait on a key fetch runs in the handler,
            # on a worker thread, so that nothing else waits with it.
            return _verifying_handler(handler, decision, self._handler_for)
        if decision is Pass.BYPASSED:
            return self._bypassed.handler_for(handler, handler_call_details.method)
        return self._handler_for(handler, decision)

    def _handler_for(
        self, handler: Handler | None, decision: Pass | Denial | Admission
    ) -> Handler | None:
        if isinstance(decision, Admission):
            wrapped: Handler | None = decision.wrapped
            if wrapped is None:
                assert handler is not None  # admissions are only made for a handler
                wrapped = decision.wrapped = wrap_sync_handler(
                    handler,
                    decision.principal,
                    decision.check,
                    self._engine.metrics,
                    decision.open_stream,
                )
            return wrapped
        if isinstance(decision, Denial):
            return _rejecting_handler(handler, decision)
        return handler  # unimplemented


def _verifying_handler(
    handler: Handler | None,
    verification: Verification,
    handler_for: Callable[[Handler | None, Pass | Denial | Admission], Handler | None],
) -> Handler:
    """A handler of ``handler``'s cardinality that completes ``verification``
    in the worker thread, then runs the handler its decision selects."""

    def resolve(context: grpc.ServicerContext) -> Handler:
        decision = verification.verify()
        if isinstance(decision, Denial):
            context.abort(*decision)
        chosen = handler_for(handler, decision)
        if chosen is None:  # an authenticated caller, a method the server lacks
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return chosen

    def uu(request: Any, context: grpc.ServicerContext) -> Any:
        return resolve(context).unary_unary(request, context)  # type: ignore[misc]

    def us(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from resolve(context).unary_stream(request, context)  # type: ignore[misc]

    def su(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return resolve(context).stream_unary(requests, context)  # type: ignore[misc]

    def ss(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        yield from resolve(context).stream_stream(requests, context)  # type: ignore[misc]

    if handler is None:
        return grpc.stream_stream_rpc_method_handler(ss)
    behaviour = {(False, False): uu, (False, True): us, (True, False): su, (True, True): ss}[
        (handler.request_streaming, handler.response_streaming)
    ]
    return rejecting_factory(handler)(
        behaviour, handler.request_deserializer, handler.response_serializer
    )


def _rejecting_handler(handler: Handler | None, denial: Denial) -> Handler:
    """A handler of ``handler``'s cardinality that aborts with ``denial``."""
    code, details = denial

    def reject(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    return rejecting_factory(handler)(reject)
