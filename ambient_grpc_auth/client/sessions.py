"""Resumable session-message helpers for runners (sync ``grpc``).

:func:`watch` consumes ``WatchSessionMessages`` as an iterator that outlives
what a long-lived runner meets: UNAUTHENTICATED (the token was revoked or
expired), UNAVAILABLE and server restarts, the server ending the stream, and
the token source being down for a while. After any of these it opens a new
stream with ``after_seq`` = the last delivered seq, so every message is
delivered exactly once and in order:

- a message with ``seq <=`` the last delivered one is dropped;
- a message that skips ahead (a gap) makes the watch resume from the last
  delivered seq once; if the resumed stream shows the same gap, the server
  no longer has the missing messages and the watch moves on (logged);
- after UNAUTHENTICATED the rejected token has already been dropped by the
  channel's :class:`~ambient_grpc_auth.client.interceptor.AuthInterceptor`; the watch
  retries at once, then backs off;
- otherwise it waits with full-jitter exponential backoff (see
  :class:`WatchRetryPolicy`; base 0.1 s, cap 5 s by default), reset by every
  delivered message;
- INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED and UNIMPLEMENTED, and a
  token source failure that is not retryable, are raised at once (as the
  ``grpc.RpcError`` the call ended with); so is the last error when a limit
  of the policy is reached.

:func:`push` sends one message. It is not retried on UNAVAILABLE or
DEADLINE_EXCEEDED: the server may have stored the message before the failure,
and pushing again would store it twice. (UNAUTHENTICATED is retried once by
the interceptor: a rejected call was never handled.)

Use a channel from :func:`ambient_grpc_auth.client.channel.create_channel`; with a
plain channel the calls carry no token.
"""

from __future__ import annotations

import logging
import random as _random
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.client._core import (
    MessageVerdict,
    WatchRetryPolicy,
    WatchState,
    check_after_seq,
    check_session_id,
    session_stub,
    status_code_of,
)
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc

__all__ = [
    "DEFAULT_PUSH_TIMEOUT",
    "SessionWatch",
    "WatchRetryPolicy",
    "push",
    "watch",
]

_log = logging.getLogger(__name__)

DEFAULT_PUSH_TIMEOUT = 10.0
_Metadata = Sequence[tuple[str, str | bytes]]


def _stub(stub_or_channel: Any) -> Any:
    return session_stub(stub_or_channel, grpc.Channel, sessions_pb2_grpc.SessionServiceStub)


_check_session_id = check_session_id
_check_after_seq = check_after_seq


def _token_error(err: BaseException) -> Any:
    # Set by the interceptor when the call was not sent for lack of a token.
    return getattr(err, "token_error", None)


class SessionWatch(Iterator[sessions_pb2.SessionMessage]):
    """Iterator of a session's messages that resumes across failures.

    Created by :func:`watch`. Iterate from one thread; :meth:`close` may be
    called from any thread: it cancels the current call and interrupts a
    backoff wait, and iteration then stops. Also a context manager.

    ``last_seq`` is the last delivered seq (persist it to resume a later
    watch), ``streams`` counts the streams opened, ``failures`` the current
    streak of failed attempts.
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
        sleep: Callable[[float], object] | None,
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
        self._closed = threading.Event()
        self._sleep = sleep if sleep is not None else self._closed.wait
        self._random = random
        self._clock = clock
        self._lock = threading.Lock()
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

    def close(self) -> None:
        """Stop: cancel the current call (the server sees CANCELLED) and end
        iteration. Idempotent, callable from any thread."""
        self._closed.set()
        with self._lock:
            call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def __enter__(self) -> SessionWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> SessionWatch:
        return self

    def _open(self) -> Any:
        request = sessions_pb2.WatchSessionMessagesRequest(
            session_id=self._session_id, after_seq=self._state.last_seq
        )
        call = self._stub.WatchSessionMessages(
            request, metadata=self._metadata, wait_for_ready=self._wait_for_ready
        )
        with self._lock:
            if self._closed.is_set():
                call.cancel()
                raise StopIteration
            self._call = call
        self.streams += 1
        return call

    def _drop_call(self, call: Any, *, cancel: bool) -> None:
        with self._lock:
            if self._call is call:
                self._call = None
        if cancel:
            call.cancel()

    def _after_end(self, code: grpc.StatusCode | None, err: grpc.RpcError | None) -> None:
        """Back off or raise after a stream ended (``err`` None: ended OK)."""
        decision = self._state.on_stream_end(
            code,
            now=self._clock.monotonic(),
            random=self._random,
            token_error=_token_error(err) if err is not None else None,
        )
        if not decision.retry:
            if err is None:
                raise StopIteration
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
            self._sleep(decision.delay)

    def __next__(self) -> sessions_pb2.SessionMessage:
        while True:
            if self._closed.is_set():
                raise StopIteration
            call = self._call if self._call is not None else self._open()
            try:
                message: sessions_pb2.SessionMessage = next(call)
            except StopIteration:
                self._drop_call(call, cancel=False)
                if self._closed.is_set():
                    raise
                self._after_end(None, None)
                continue
            except grpc.RpcError as err:
                self._drop_call(call, cancel=False)
                if self._closed.is_set():
                    raise StopIteration from None
                code = status_code_of(err)
                self._after_end(grpc.StatusCode.UNKNOWN if code is None else code, err)
                continue
            verdict = self._state.on_message(message.seq)
            if verdict is MessageVerdict.DELIVER:
                return message
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
    sleep: Callable[[float], object] | None = None,
    random: Callable[[], float] = _random.random,
    clock: Clock = SYSTEM_CLOCK,
    on_retry: Callable[[BaseException | None, float], object] | None = None,
) -> SessionWatch:
    """Watch ``session_id``'s messages with ``seq > after_seq`` (module docs).

    ``stub_or_channel`` is a ``grpc.Channel`` (normally an
    :class:`~ambient_grpc_auth.client.channel.AuthenticatedChannel`) or a
    ``SessionServiceStub``. ``after_seq`` None means 0 (everything); pass
    ``resume_after_seq_from_env()`` (from :mod:`ambient_grpc_auth.client.env`)
    to honour ``RESUME_AFTER_SEQ``.
    ``sleep`` (default: a wait that :meth:`SessionWatch.close` interrupts),
    ``random`` and ``clock`` are injectable for tests. ``on_retry(err,
    delay)``, if set, is called before each backoff with the error that
    ended the stream (None: the server ended it normally) and the delay about
    to be waited, so that a caller can report a failure at once (the watch
    itself only logs at INFO); an exception it raises propagates out of
    ``next()``, and calling :meth:`SessionWatch.close` from it ends the
    iteration. No call is made until the first ``next()``. Raises
    ValueError/TypeError for bad arguments.
    """
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


def push(
    stub_or_channel: Any,
    session_id: str,
    event_type: str,
    payload: str,
    *,
    timeout: float = DEFAULT_PUSH_TIMEOUT,
    metadata: _Metadata = (),
    wait_for_ready: bool | None = None,
) -> sessions_pb2.SessionMessage:
    """Push one message and return it as stored (with its seq).

    Raises the call's ``grpc.RpcError`` on failure; never retries UNAVAILABLE
    or DEADLINE_EXCEEDED (a retry could store the message twice). Raises
    ValueError for an empty ``session_id`` or a non-positive ``timeout``.
    """
    if not (timeout > 0):
        raise ValueError("timeout must be > 0")
    request = sessions_pb2.PushSessionMessageRequest(
        session_id=_check_session_id(session_id), event_type=event_type, payload=payload
    )
    stub = _stub(stub_or_channel)
    message: sessions_pb2.SessionMessage = stub.PushSessionMessage(
        request, timeout=timeout, metadata=tuple(metadata), wait_for_ready=wait_for_ready
    )
    return message
