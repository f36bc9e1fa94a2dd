"""Resumable session-message helpers for runners (``grpc.aio``).

The mirror of :mod:`ambient_grpc_auth.client.sessions`, with the same guarantees:
:func:`watch` returns an async iterator that resumes after UNAUTHENTICATED,
UNAVAILABLE, server restarts, streams the server ends and token-source
outages, delivering every seq exactly once and in order; :func:`push` sends
one message and never retries UNAVAILABLE or DEADLINE_EXCEEDED (a retry could
store the message twice).
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.client._core import (
    MessageVerdict,
    WatchRetryPolicy,
    WatchState,
    check_after_seq,
    check_session_id,
    session_stub,
)
from ambient_grpc_auth.client.sessions import DEFAULT_PUSH_TIMEOUT
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc

__all__ = [
    "DEFAULT_PUSH_TIMEOUT",
    "SessionWatch",
    "WatchRetryPolicy",
    "push",
    "watch",
]

_log = logging.getLogger(__name__)

_Metadata = Sequence[tuple[str, str | bytes]]


def _stub(stub_or_channel: Any) -> Any:
    return session_stub(stub_or_channel, grpc.aio.Channel, sessions_pb2_grpc.SessionServiceStub)


_check_session_id = check_session_id
_check_after_seq = check_after_seq


class SessionWatch:
    """Async iterator of a session's messages that resumes across failures.

    Created by :func:`watch`. Iterate from one task; :meth:`aclose` (or
    :meth:`close`) cancels the current call, interrupts a backoff wait and
    ends iteration. Cancelling the iterating task cancels the call too. Also
    an async context manager. ``last_seq``, ``streams`` and ``failures`` as in
    :class:`ambient_grpc_auth.client.sessions.SessionWatch`.
    """

    def __init__(
        self,
        stub: Any,
        session_id: str,
        *,
        after_seq: int,
        policy: WatchRetryPolicy,
        metadata: _Metadata,
        wait_for_ready: bool | None,
        sleep: Callable[[float], Awaitable[object]] | None,
        random: Callable[[], float],
        clock: Clock,
        on_retry: Callable[[BaseException | None, float], object] | None = None,
    ) -> None:
        self._stub = stub
        self._on_retry = on_retry
        self._session_id = session_id
        self._state = WatchState(policy, after_seq)
        self._metadata = tuple(metadata)
        self._wait_for_ready = wait_for_ready
        self._closed = asyncio.Event()
        self._sleep = sleep if sleep is not None else self._interruptible_sleep
        self._random = random
        self._clock = clock
        self._call: Any = None
        self.streams = 0

    def __repr__(self) -> str:
        return f"SessionWatch(session_id={self._session_id!r}, last_seq={self.last_seq})"

    @property
    def last_seq(self) -> int:
        return self._state.last_seq

    @property
    def failures(self) -> int:
        return self._state.failures

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def _interruptible_sleep(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._closed.wait()
        except TimeoutError:
            pass

    def close(self) -> None:
        """Stop: cancel the current call and end iteration (idempotent)."""
        self._closed.set()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> SessionWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> SessionWatch:
        return self

    def _open(self) -> Any:
        request = sessions_pb2.WatchSessionMessagesRequest(
            session_id=self._session_id, after_seq=self._state.last_seq
        )
        call = self._stub.WatchSessionMessages(
            request, metadata=self._metadata, wait_for_ready=self._wait_for_ready
        )
        self._call = call
        self.streams += 1
        return call

    def _drop_call(self, call: Any, *, cancel: bool) -> None:
        if self._call is call:
            self._call = None
        if cancel:
            call.cancel()

    async def _after_end(self, code: grpc.StatusCode | None, err: BaseException | None) -> None:
        decision = self._state.on_stream_end(
            code,
            now=self._clock.monotonic(),
            random=self._random,
            token_error=getattr(err, "token_error", None),
        )
        if not decision.retry:
            if err is None:
                raise StopAsyncIteration
            raise err
        _log.info(
            "session watch: stream ended (%s); resuming after seq %d in %.2fs",
            code.name if code is not None else "OK",
            self._state.last_seq,
            decision.delay,
        )
        if self._on_retry is not None:
            self._on_retry(err, decision.delay)
        if decision.delay > 0 and not self._closed.is_set():
            await self._sleep(decision.delay)

    async def __anext__(self) -> sessions_pb2.SessionMessage:
        while True:
            if self._closed.is_set():
                raise StopAsyncIteration
            call = self._call if self._call is not None else self._open()
            try:
                message = await call.read()
            except asyncio.CancelledError:
                self._drop_call(call, cancel=True)
                # grpc.aio reports a call we cancelled in close() as
                # CancelledError; only a cancellation of this task propagates.
                task = asyncio.current_task()
                if self._closed.is_set() and (task is None or task.cancelling() == 0):
                    raise StopAsyncIteration from None
                raise
            except grpc.aio.AioRpcError as err:
                self._drop_call(call, cancel=False)
                if self._closed.is_set():
                    raise StopAsyncIteration from None
                await self._after_end(err.code(), err)
                continue
            if message is grpc.aio.EOF:
                self._drop_call(call, cancel=False)
                if self._closed.is_set():
                    raise StopAsyncIteration
                await self._after_end(None, None)
                continue
            verdict = self._state.on_message(message.seq)
            if verdict is MessageVerdict.DELIVER:
                delivered: sessions_pb2.SessionMessage = message
                return delivered
            if verdict is MessageVerdict.GAP:
                _log.warning(
                    "session watch: seq jumped from %d to %d; resuming to fetch the gap",
                    self._state.last_seq,
                    message.seq,
                )
                self._drop_call(call, cancel=True)


def watch(
    stub_or_channel: Any,
    session_id: str,
    *,
    after_seq: int | None = None,
    policy: WatchRetryPolicy | None = None,
    metadata: _Metadata = (),
    wait_for_ready: bool | None = None,
    sleep: Callable[[float], Awaitable[object]] | None = None,
    random: Callable[[], float] = _random.random,
    clock: Clock = SYSTEM_CLOCK,
    on_retry: Callable[[BaseException | None, float], object] | None = None,
) -> SessionWatch:
    """Watch ``session_id``'s messages with ``seq > after_seq`` (see
    :func:`ambient_grpc_auth.client.sessions.watch`); ``stub_or_channel`` is a
    ``grpc.aio.Channel`` or a stub built on one, ``sleep`` an async callable,
    ``on_retry`` a plain (not async) callable as in the sync watch.
    Must be iterated on the loop the channel belongs to."""
    return SessionWatch(
        _stub(stub_or_channel),
        _check_session_id(session_id),
        after_seq=_check_after_seq(0 if after_seq is None else after_seq),
        policy=policy or WatchRetryPolicy(),
        metadata=metadata,
        wait_for_ready=wait_for_ready,
        sleep=sleep,
        random=random,
        clock=clock,
        on_retry=on_retry,
    )


async def push(
    stub_or_channel: Any,
    session_id: str,
    event_type: str,
    payload: str,
    *,
    timeout: float = DEFAULT_PUSH_TIMEOUT,  # noqa: ASYNC109 (the gRPC deadline the server sees)
    metadata: _Metadata = (),
    wait_for_ready: bool | None = None,
) -> sessions_pb2.SessionMessage:
    """Push one message and return it as stored; raises the call's
    ``grpc.aio.AioRpcError`` on failure and never retries UNAVAILABLE or
    DEADLINE_EXCEEDED. ValueError for an empty ``session_id`` or a
    non-positive ``timeout``."""
    if not (timeout > 0):
        raise ValueError("timeout must be > 0")
    request = sessions_pb2.PushSessionMessageRequest(
        session_id=_check_session_id(session_id), event_type=event_type, payload=payload
    )
    stub = _stub(stub_or_channel)
    message: sessions_pb2.SessionMessage = await stub.PushSessionMessage(
        request, timeout=timeout, metadata=tuple(metadata), wait_for_ready=wait_for_ready
    )
    return message
