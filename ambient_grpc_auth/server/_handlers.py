"""gRPC handler plumbing shared by the sync and ``grpc.aio`` server interceptors.

- :func:`rejecting_factory` picks the handler factory of a method's
  cardinality for a rejecting handler (both interceptors);
- :func:`wrap_sync_handler` wraps a sync behaviour with the request check of
  an :class:`~ambient_grpc_auth.server.engine.Admission`, its stream slot and
  its principal (the sync interceptor, and the aio interceptor for sync
  servicer methods);
- :func:`wrap_bypassed_stream` counts a bypassed method's streaming calls
  against the stream limits (both interceptors, for sync behaviours);
- :func:`release_on_end` releases a stream slot when the call ends.

Nothing here decides anything: the decisions come from
:mod:`ambient_grpc_auth.server.engine`.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias

import grpc

from ambient_grpc_auth.principal import (
    Principal,
    principal_scope,
    reset_current_principal,
    set_current_principal,
)
from ambient_grpc_auth.server._streams import StreamSlot
from ambient_grpc_auth.server.engine import MAX_PLANNED_METHODS, AuthEngine, Denial
from ambient_grpc_auth.server.metrics import MetricsHook

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
#: An admission's request check (see ``Admission.check``).
Check = Callable[[Any], Denial | None]
#: An admission's stream slot (see ``Admission.open_stream``).
OpenStream = Callable[[], StreamSlot | Denial]

_FACTORIES: Mapping[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def rejecting_factory(handler: Handler | None) -> Callable[..., Handler]:
    """The ``grpc.*_rpc_method_handler`` function that builds a handler of
    ``handler``'s cardinality around a rejecting behaviour (or any other).

    The rejecting handler gets no deserializer, so requests are not parsed.
    With no handler (an unknown method) it is stream-stream: that aborts
    without waiting for any request, whatever the client sends.
    """
    if handler is None:
        return grpc.stream_stream_rpc_method_handler
    return _FACTORIES[(handler.request_streaming, handler.response_streaming)]


def release_on_end(context: Any, slot: StreamSlot) -> None:
    """Release ``slot`` when the call of ``context`` (sync or aio) ends for
    any reason, as a backstop to the handler's own ``finally``: a response
    generator the server stops iterating may be finalized late."""
    add_callback = getattr(context, "add_callback", None)
    if add_callback is not None:
        # Sync servers answer False when the call already ended; grpc.aio's
        # context for sync handlers answers None.
        if add_callback(slot.release) is False:
            slot.release()
        return
    add_done_callback = getattr(context, "add_done_callback", None)
    if add_done_callback is not None:  # grpc.aio
        add_done_callback(lambda _context: slot.release())


def _stream_slot(open_stream: OpenStream, context: grpc.ServicerContext) -> StreamSlot:
    """A slot for this streaming call, or abort with the denial."""
    slot = open_stream()
    if not isinstance(slot, StreamSlot):
        context.abort(*slot)
    release_on_end(context, slot)
    return slot


def _scoped_iteration(principal: Principal, start: Callable[[], Any]) -> Iterator[Any]:
    """Iterate what ``start()`` returns with ``principal`` current during
    every step (response generators run lazily, outside the handler call).

    Every step runs in one copied context in which the principal is current,
    instead of setting and resetting it around each message.
    """
    context = contextvars.copy_context()
    context.run(set_current_principal, principal)
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


def _checked_requests(
    requests: Iterator[Any], check: Check, context: grpc.ServicerContext
) -> Iterator[Any]:
    """Read and check the first request now (an empty stream is checked as a
    request without a session id, i.e. denied), then check each later one as
    the handler pulls it. The handler thus starts only with an allowed first
    message, and never receives a denied one."""
    iterator = iter(requests)
    first = next(iterator, None)
    denial = check(first)
    if denial is not None:
        context.abort(*denial)
    return itertools.chain((first,), _checked_later(iterator, check, context))


def _checked_later(
    requests: Iterator[Any], check: Check, context: grpc.ServicerContext
) -> Iterator[Any]:
    for request in requests:
        denial = check(request)
        if denial is not None:
            context.abort(*denial)
        yield request


def wrap_bypassed_stream(handler: Handler, open_stream: OpenStream) -> Handler:
    """The streaming ``handler`` of a bypassed method, holding a slot from
    ``open_stream`` while the call lasts (refused when the stream limits are
    reached). Nothing else changes: no caller, no check, no metrics.
    Response-streaming behaviours stay generator functions (see
    :func:`wrap_sync_handler`)."""
    behaviour = handler.unary_stream or handler.stream_unary or handler.stream_stream
    assert behaviour is not None  # only streaming handlers are wrapped

    def counted(request: Any, context: grpc.ServicerContext) -> Any:
        slot = _stream_slot(open_stream, context)
        try:
            return behaviour(request, context)
        finally:
            slot.release()

    def counted_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        slot = _stream_slot(open_stream, context)
        try:
            yield from behaviour(request, context)
        finally:
            slot.release()

    return rejecting_factory(handler)(
        counted_stream if handler.response_streaming else counted,
        handler.request_deserializer,
        handler.response_serializer,
    )


class BypassedStreams:
    """The handlers an interceptor serves for bypassed methods: unary ones
    unchanged, streaming ones wrapped by ``wrap`` (``wrap(handler,
    open_stream)``) to hold a slot of ``engine``'s stream limits. Wrapped
    handlers are remembered per handler, as many as the engine plans
    methods. Thread-safe (a lost race builds one wrapper twice)."""

    def __init__(self, engine: AuthEngine, wrap: Callable[[Handler, OpenStream], Handler]) -> None:
        self._engine = engine
        self._wrap = wrap
        self._wrapped: dict[int, tuple[Handler, Handler]] = {}

    def handler_for(self, handler: Handler | None, method: str) -> Handler | None:
        """What to serve for bypassed ``method`` whose handler is ``handler``."""
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        known = self._wrapped.get(id(handler))
        if known is not None and known[0] is handler:
            return known[1]
        engine = self._engine
        wrapped = self._wrap(handler, lambda: engine.open_bypassed_stream(method))
        if len(self._wrapped) < MAX_PLANNED_METHODS:
            self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped


def wrap_sync_handler(
    handler: Handler,
    principal: Principal,
    check: Check | None,
    metrics: MetricsHook,
    open_stream: OpenStream,
) -> Handler:
    """``handler`` with ``check`` applied to its request(s), the call counted
    as allowed once the first request passes, and ``principal`` current while
    its behaviour runs. A streaming call first takes a slot from
    ``open_stream`` (before reading any request, so a stream that never sends
    one counts too) and holds it until the call ends.

    Response-streaming behaviours are generator functions so that nothing,
    not even the check, runs before the first ``next()``: grpc.aio calls sync
    stream handlers on the event loop and iterates them in a worker thread.
    """
    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if not handler.request_streaming:
        if not handler.response_streaming:
            unary_unary = handler.unary_unary
            assert unary_unary is not None

            def uu(request: Any, context: grpc.ServicerContext) -> Any:
                if check is not None and (denial := check(request)) is not None:
                    context.abort(*denial)
                metrics.allowed()
                scope = set_current_principal(principal)
                try:
                    return unary_unary(request, context)
                finally:
                    reset_current_principal(scope)

            return grpc.unary_unary_rpc_method_handler(uu, deserializer, serializer)
        unary_stream = handler.unary_stream
        assert unary_stream is not None

        def us(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            slot = _stream_slot(open_stream, context)
            try:
                if check is not None and (denial := check(request)) is not None:
                    context.abort(*denial)
                metrics.allowed()
                yield from _scoped_iteration(principal, lambda: unary_stream(request, context))
            finally:
                slot.release()

        return grpc.unary_stream_rpc_method_handler(us, deserializer, serializer)
    if not handler.response_streaming:
        stream_unary = handler.stream_unary
        assert stream_unary is not None

        def su(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            slot = _stream_slot(open_stream, context)
            try:
                checked = requests if check is None else _checked_requests(requests, check, context)
                metrics.allowed()
                with principal_scope(principal):
                    return stream_unary(checked, context)
            finally:
                slot.release()

        return grpc.stream_unary_rpc_method_handler(su, deserializer, serializer)
    stream_stream = handler.stream_stream
    assert stream_stream is not None

    def ss(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        slot = _stream_slot(open_stream, context)
        try:
            checked = requests if check is None else _checked_requests(requests, check, context)
            metrics.allowed()
            yield from _scoped_iteration(principal, lambda: stream_stream(checked, context))
        finally:
            slot.release()

    return grpc.stream_stream_rpc_method_handler(ss, deserializer, serializer)
