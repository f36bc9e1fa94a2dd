"""Bounds on concurrently open streaming calls, per principal and in total.

A streaming call (any method with a request or response stream) holds a
:class:`StreamSlot` from the moment its handler starts until the call ends,
for whatever reason: the handler returns or raises, the client cancels, the
deadline passes, the server stops. Unary calls are never counted, so streams
nobody reads cannot take the capacity unary calls need: on a sync server every
open stream holds a worker thread, on a ``grpc.aio`` server a task and the
call's buffers.

Callers are counted by ``(issuer, username, session scope)``: one runner
token, one user of one identity provider. Streaming calls to methods served
without authentication (health ``Watch``, reflection) count as one more
caller, the anonymous one: they too hold a worker thread or a task.
"""

from __future__ import annotations

import threading
from typing import Final

from ambient_grpc_auth.principal import Principal

__all__ = ["StreamLimiter", "StreamSlot"]

#: ``(issuer, username, session scope)``; ``None`` for the anonymous caller.
_Key = tuple[str | None, str, str | None] | None


class StreamSlot:
    """One open stream's place in the count. :meth:`release` is idempotent and
    thread-safe, so it may be called from the handler's ``finally`` and from
    an RPC-termination callback alike."""

    __slots__ = ("_key", "_limiter")

    def __init__(self, limiter: StreamLimiter, key: _Key) -> None:
        self._limiter: StreamLimiter | None = limiter
        self._key = key

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self._key)


class StreamLimiter:
    """Counts open streams; refuses one beyond ``per_principal`` for its
    caller or beyond ``total`` altogether (``None``: no limit). Thread-safe;
    one short-held lock, never held across I/O."""

    def __init__(self, *, per_principal: int | None, total: int | None) -> None:
        self._per_principal: Final = per_principal
        self._total: Final = total
        self._lock = threading.Lock()
        self._open: dict[_Key, int] = {}
        self._count = 0

    def acquire(self, principal: Principal | None) -> StreamSlot | None:
        """A slot for a new stream of ``principal`` (``None``: the anonymous
        caller), or ``None`` when a limit is reached."""
        key: _Key = (
            None
            if principal is None
            else (principal.issuer, principal.username, principal.session_scope)
        )
        with self._lock:
            held = self._open.get(key, 0)
            if (self._per_principal is not None and held >= self._per_principal) or (
                self._total is not None and self._count >= self._total
            ):
                return None
            self._open[key] = held + 1
            self._count += 1
        return StreamSlot(self, key)

    def _release(self, key: _Key) -> None:
        with self._lock:
            held = self._open[key] - 1
            if held:
                self._open[key] = held
            else:
                del self._open[key]
            self._count -= 1

    def open_streams(self, principal: Principal | None = None) -> int:
        """Streams open now: of ``principal``, or of everyone when ``None``."""
        with self._lock:
            if principal is None:
                return self._count
            return self._open.get(
                (principal.issuer, principal.username, principal.session_scope), 0
            )
