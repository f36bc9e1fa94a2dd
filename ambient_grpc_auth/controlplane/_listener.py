"""The token server's connection layer: what happens before a request reaches a handler.

aiohttp's own error path echoes a malformed request's header line in the 400
body and logs it with a traceback, so a session proof sent in a broken
``Authorization`` line would land in the log and back on the wire. Here:

- :class:`TokenHttpProtocol` (an aiohttp ``RequestHandler``) answers every
  HTTP parse error with a fixed short body (400, or 431 for an over-long line)
  and logs one fixed line naming the error class only; handler failures (500,
  504) likewise. No part of a request ever reaches a log line or a body from
  here. It also closes a connection that has not delivered a complete request
  head within ``header_timeout`` seconds of opening or of its previous
  response (aiohttp before 3.14 never times out a connection that sends
  nothing).
- :class:`Listener` is the protocol factory: beyond ``max_connections`` open
  connections a new one gets a fixed 503 and is closed at once, so that file
  descriptors never run out; :func:`connection_limits` keeps the cap below
  ``RLIMIT_NOFILE``.
- :func:`listening_socket` returns a listening socket that stops a failed
  ``accept`` (EMFILE and the like) from being retried in a tight loop.
- :class:`RateLimitedLog` logs at most one line per kind of error per
  interval, with the count of the ones held back.

Everything here runs on the event loop that serves the token endpoint.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.controlplane.config import TokenServerConfig

__all__ = [
    "ERROR_BODIES",
    "Listener",
    "RateLimitedLog",
    "TokenHttpProtocol",
    "connection_limits",
    "describe_exception",
    "http_handler_args",
    "listening_socket",
    "loop_exception_handler",
]

_log = logging.getLogger("ambient_grpc_auth.controlplane.server")

#: The whole body of each error response produced below the handlers.
ERROR_BODIES = {
    400: "400 bad request",
    431: "431 request header fields too large",
    500: "500 internal server error",
    503: "503 busy",
    504: "504 gateway timeout",
}

#: File descriptors kept free for everything but client connections (the
#: listening socket, the event loop, key files, upstream HTTP clients, logs).
_FD_RESERVE = 32
_ACCEPT_RETRY_SECONDS = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BUSY_RESPONSE = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    f"Content-Length: {len(ERROR_BODIES[503])}\r\n"
    "Cache-Control: no-store\r\n"
    "Retry-After: 1\r\n"
    "Connection: close\r\n"
    "\r\n" + ERROR_BODIES[503]
).encode("ascii")


class RateLimitedLog:
    """At most one log line per ``kind`` per ``interval`` seconds.

    The first line of a kind in an interval is logged; the others are counted
    and the next line of that kind ends with ``(N similar suppressed)``. Only
    the ``max_kinds`` most recently seen kinds are tracked. Thread-safe.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
        max_kinds: int = 64,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._max_kinds = max_kinds
        self._lock = threading.Lock()
        # kind -> [time the current interval ends, lines held back in it]
        self._kinds: OrderedDict[str, list[float]] = OrderedDict()

    def log(self, level: int, kind: str, msg: str, *args: object) -> None:
        now = self._clock.monotonic()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now < entry[0]:
                entry[1] += 1
                return
            suppressed = int(entry[1]) if entry is not None else 0
            self._kinds[kind] = [now + self._interval, 0]
            self._kinds.move_to_end(kind)
            while len(self._kinds) > self._max_kinds:
                self._kinds.popitem(last=False)
        if suppressed:
            msg += " (%d similar suppressed)"
            args += (suppressed,)
        self._logger.log(level, msg, *args)


def describe_exception(exc: BaseException | None) -> str:
    """The exception's type and where it was raised (file:line function),
    never its message or source lines, which could hold request data."""
    if exc is None:
        return "no exception"
    text = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        text += f" [Errno {exc.errno}] {exc.strerror}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        text += " at " + " <- ".join(
            f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames)
        )
    return text


def http_handler_args(config: TokenServerConfig) -> dict[str, Any]:
    """Keyword arguments for aiohttp's request handler: the header limits, and
    ``header_timeout`` as the keep-alive timeout (which aiohttp 3.14 also
    applies to a connection's first request)."""
    return {
        "max_line_size": config.max_header_size,
        "max_field_size": config.max_header_size,
        "max_headers": 64,
        "keepalive_timeout": config.header_timeout,
    }


def connection_limits(max_connections: int) -> tuple[int, int]:
    """``(connection cap, listen backlog)`` that fit this process's RLIMIT_NOFILE.

    Up to a backlog's worth of connections is accepted in one go before any of
    them can be counted or refused, and refused ones take a moment to close,
    so the cap leaves twice the backlog plus a reserve free.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections, 128
    backlog = max(8, min(128, soft // 8))
    return max(1, min(max_connections, soft - 2 * backlog - _FD_RESERVE)), backlog


class _PausingSocket(socket.socket):
    """A listening socket whose ``accept`` pauses after running out of resources.

    On EMFILE and the like asyncio logs the error, stops watching the socket
    and retries a second later, but (up to Python 3.12) first calls
    ``accept`` again up to ``backlog`` times in the same loop, logging each
    failure. Refusing those calls with EAGAIN ends that loop after the first.
    """

    __slots__ = ("_paused_until",)

    def __init__(self, family: int, type: int, proto: int, fileno: int) -> None:
        super().__init__(family, type, proto, fileno)
        self._paused_until = 0.0

    def accept(self) -> tuple[socket.socket, Any]:
        now = time.monotonic()
        if now < self._paused_until:
            raise BlockingIOError(errno.EAGAIN, "accept paused")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self._paused_until = now + _ACCEPT_RETRY_SECONDS
            raise


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port`` (IPv6 if ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    plain = socket.create_server((host, port), family=family, backlog=backlog)
    sock = _PausingSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
    sock.setblocking(False)
    return sock


class _Refuse(asyncio.Protocol):
    """Answers 503 and closes: the connection cap is reached."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY_RESPONSE)
        transport.close()


class TokenHttpProtocol(web.RequestHandler):
    """aiohttp's request handler with fixed error responses, quiet error logs
    and a deadline for each request head (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "_ag_deadline",
        "_ag_in_request",
        "_ag_listener",
        "_ag_served",
        "_ag_timer",
    )

    def __init__(self, manager: web.Server, *, listener: Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._ag_listener = listener
        # One timer per connection, moved lazily: re-arming only sets
        # ``_ag_deadline``; a timer that fires early re-schedules itself for
        # it. This keeps a timer-heap insertion and cancellation off every
        # kept-alive request.
        self._ag_timer: asyncio.TimerHandle | None = None
        self._ag_deadline = 0.0
        self._ag_in_request = False
        self._ag_served = 0

    # -- the request-head deadline

    def _ag_arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._ag_deadline = loop.time() + self._ag_listener.header_timeout
        if self._ag_timer is None:
            self._ag_timer = loop.call_at(self._ag_deadline, self._ag_expire)

    def _ag_expire(self) -> None:
        self._ag_timer = None
        if self._ag_in_request:
            return  # re-armed when the response is done
        loop = asyncio.get_running_loop()
        if loop.time() < self._ag_deadline:  # re-armed since this timer was set
            self._ag_timer = loop.call_at(self._ag_deadline, self._ag_expire)
            return
        if self._ag_served == 0:
            self._ag_listener.log.log(
                logging.INFO,
                "header-timeout",
                "closed a connection that sent no complete request within %gs",
                self._ag_listener.header_timeout,
            )
        self.force_close()

    def request_started(self) -> None:
        """A request head was parsed (or refused): its handling begins."""
        self._ag_in_request = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._ag_arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._ag_timer is not None:
            self._ag_timer.cancel()
            self._ag_timer = None
        self._ag_listener.closed(self)
        super().connection_lost(exc)

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        # Called once each response is written: the connection is idle again.
        super().log_access(request, response, time)
        self._ag_in_request = False
        self._ag_served += 1
        if self.transport is not None:
            self._ag_arm()

    # -- errors

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # ``message`` and ``exc``'s text quote the offending request bytes
        # (possibly a session proof): neither is logged nor sent.
        log = self._ag_listener.log
        if isinstance(exc, HttpProcessingError) or status in (400, 431):
            if isinstance(exc, LineTooLong):
                status = 431
            name = type(exc).__name__ if exc is not None else "parse error"
            log.log(
                logging.WARNING,
                f"parse:{name}",
                "refused a malformed HTTP request (%s, status %d)",
                name,
                status,
            )
        elif status == 504:
            log.log(logging.ERROR, "handler-timeout", "request handler timed out (504)")
        else:
            log.log(
                logging.ERROR,
                f"handler:{type(exc).__name__}",
                "request handler failed: %s",
                describe_exception(exc),
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started")
        body = ERROR_BODIES.get(status, f"{status} error")
        resp = web.Response(status=status, text=body, headers={"Cache-Control": "no-store"})
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp's remaining exception logs carry a traceback and sometimes a
        # repr of request data; keep the exception's type and location only.
        exc_info = kw.get("exc_info")
        exc = exc_info if isinstance(exc_info, BaseException) else None
        self._ag_listener.log.log(
            logging.ERROR,
            f"connection:{type(exc).__name__}",
            "HTTP connection error: %s",
            describe_exception(exc),
        )


class Listener:
    """The protocol factory for ``loop.create_server``: a
    :class:`TokenHttpProtocol` per connection up to ``max_connections`` open
    at once, a 503-and-close beyond. Call :meth:`attach` before serving.
    Event loop only."""

    def __init__(
        self,
        server: web.Server,
        *,
        max_connections: int,
        header_timeout: float,
        handler_args: dict[str, Any],
        log: RateLimitedLog,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.log = log
        self.refused = 0
        self._server = server
        self._handler_args = handler_args
        # Weak, so that a protocol whose transport never came up drops out.
        self._open: weakref.WeakSet[TokenHttpProtocol] = weakref.WeakSet()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def attach(self) -> None:
        """Have the server's request factory tell each protocol when a request starts."""
        make_request = self._server.request_factory

        def request_factory(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any, *rest: Any
        ) -> web.BaseRequest:
            if isinstance(protocol, TokenHttpProtocol):
                protocol.request_started()
            return make_request(message, payload, protocol, writer, task, *rest)

        self._server.request_factory = request_factory

    def closed(self, protocol: TokenHttpProtocol) -> None:
        self._open.discard(protocol)

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._open) >= self.max_connections:
            self.refused += 1
            self.log.log(
                logging.WARNING,
                "connection-limit",
                "connection limit (%d) reached: refusing new connections with 503",
                self.max_connections,
            )
            return _Refuse()
        protocol = TokenHttpProtocol(
            self._server,
            listener=self,
            loop=asyncio.get_running_loop(),
            **self._handler_args,
        )
        self._open.add(protocol)
        return protocol


def loop_exception_handler(
    log: RateLimitedLog,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event-loop exception handler logging one line per kind of error per
    interval (type, errno and location; no message, no traceback)."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # asyncio's messages may embed reprs of callbacks and their arguments.
        message = str(context.get("message") or "unhandled error")[:80]
        kind = f"loop:{message}:{type(exc).__name__}"
        log.log(logging.ERROR, kind, "event loop: %s: %s", message, describe_exception(exc))

    return handler
