"""Resumable session watch and push (sync) against the reference SessionService
on 127.0.0.1, plus the watch's resume logic against scripted streams."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
from support.client import (
    FAST_RECONNECT,
    PUSH,
    WATCH,
    CountingSource,
    FailingSource,
    MintingSource,
    SessionServer,
)
from support.waiting import wait_until

from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import AuthenticatedChannel, create_channel
from ambient_grpc_auth.client.env import resume_after_seq_from_env
from ambient_grpc_auth.client.sessions import (
    SessionWatch,
    WatchRetryPolicy,
    push,
    watch,
)
from ambient_grpc_auth.client.tokens import TokenSource
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.testing import FakeClock


def _channel(srv: SessionServer, source: TokenSource) -> AuthenticatedChannel:
    return create_channel(srv.target, source, tls=False, options=FAST_RECONNECT)


class Consumer:
    """Iterates a watch on a thread, collecting seqs."""

    def __init__(self, w: SessionWatch) -> None:
        self.watch = w
        self.seqs: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for message in self.watch:
                self.seqs.append(message.seq)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        wait_until(lambda: len(self.seqs) >= n or self.error is not None, timeout)
        assert self.error is None, self.error

    def stop(self) -> None:
        self.watch.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


# --- against the reference service -------------------------------------------------------


def test_watch_replays_then_streams_live(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.append(3)
    consumer = Consumer(watch(channel, sessions.session_id))
    try:
        consumer.wait_for(3)
        sessions.append(2)
        consumer.wait_for(5)
        assert consumer.seqs == [1, 2, 3, 4, 5]
        assert consumer.watch.last_seq == 5
        assert consumer.watch.streams == 1
        assert sessions.auth.tokens(WATCH) == ["tok-1"]
    finally:
        consumer.stop()
        channel.close()


def test_watch_after_seq_and_resume_after_seq_from_env(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.append(4)
    after = resume_after_seq_from_env({"RESUME_AFTER_SEQ": "2"})
    stub = sessions_pb2_grpc.SessionServiceStub(channel)
    consumer = Consumer(watch(stub, sessions.session_id, after_seq=after))
    try:
        consumer.wait_for(2)
        assert consumer.seqs == [3, 4]
    finally:
        consumer.stop()
        channel.close()


def test_watch_survives_expiry_unauthenticated_restart_and_token_outage(
    sessions: SessionServer,
) -> None:
    clock = FakeClock()
    upstream = MintingSource(clock, ttl=600)
    cache = CachingTokenSource(upstream, clock=clock, min_backoff=1.0, max_backoff=2.0)
    channel = _channel(sessions, cache)
    server_up = threading.Event()
    server_up.set()
    delays: list[float] = []

    def fake_sleep(delay: float) -> None:
        delays.append(delay)
        clock.advance(delay + 2.5)  # lets the cache's own fetch backoff pass
        server_up.wait(5)
        time.sleep(0.01)  # the channel is reconnecting: do not spin

    consumer = Consumer(watch(channel, sessions.session_id, sleep=fake_sleep))
    try:
        sessions.append(3)
        consumer.wait_for(3)
        assert sessions.auth.tokens(WATCH) == ["minted-1"]

        # 1. The token expires; the server revokes it and ends the stream.
        clock.advance(601)
        sessions.auth.revoke("minted-1")
        sessions.append(1)
        consumer.wait_for(4)
        assert sessions.auth.tokens(WATCH)[-1] == "minted-2"
        assert delays == []  # UNAUTHENTICATED: retried at once

        # 2. An UNAUTHENTICATED out of the blue (token revoked early).
        sessions.auth.revoke("minted-2")
        sessions.append(1)
        consumer.wait_for(5)
        assert sessions.auth.tokens(WATCH)[-1] == "minted-3"
        assert delays == []

        # 3. The server restarts; messages arrive while it is down.
        server_up.clear()
        sessions.stop()
        sessions.append(2)
        sessions.restart()
        server_up.set()
        consumer.wait_for(7)
        assert delays  # backed off while the server was away
        wait_until(lambda: channel.reconnects >= 1)

        # 4. The control plane is down for three fetches.
        restart_delays = len(delays)
        upstream.fail_next = 3
        current = sessions.auth.tokens(WATCH)[-1]
        assert current is not None
        sessions.auth.revoke(current)
        sessions.append(1)
        consumer.wait_for(8)
        assert upstream.failures == 3
        assert len(delays) >= restart_delays + 3
        assert max(delays) <= 5.0

        assert consumer.seqs == list(range(1, 9))  # each seq once, in order
        assert consumer.watch.failures == 0
    finally:
        server_up.set()
        consumer.stop()
        channel.close()


def test_unauthenticated_twice_backs_off(sessions: SessionServer) -> None:
    source = CountingSource()
    channel = _channel(sessions, source)
    delays: list[float] = []

    def fake_sleep(delay: float) -> None:
        delays.append(delay)
        sessions.auth.reject_all = False

    consumer = Consumer(watch(channel, sessions.session_id, sleep=fake_sleep))
    try:
        sessions.append(1)
        consumer.wait_for(1)
        sessions.auth.reject_all = True
        sessions.append(1)
        consumer.wait_for(2)
        # Stream 2 (immediate retry) was refused, stream 3 came after one backoff.
        assert len(delays) == 1
        assert 0 <= delays[0] <= 0.2
        assert sessions.auth.tokens(WATCH) == ["tok-1", "tok-2", "tok-3"]
        assert consumer.seqs == [1, 2]
    finally:
        consumer.stop()
        channel.close()


def test_non_retryable_status_is_raised(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    try:
        w = watch(channel, "no-such-session", sleep=lambda d: pytest.fail("slept"))
        with pytest.raises(grpc.RpcError) as err:
            next(w)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert w.streams == 1
    finally:
        channel.close()


def test_non_retryable_token_failure_is_raised(sessions: SessionServer) -> None:
    channel = _channel(sessions, FailingSource(retryable=False))
    try:
        w = watch(channel, sessions.session_id, sleep=lambda d: pytest.fail("slept"))
        with pytest.raises(grpc.RpcError) as err:
            next(w)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert sessions.auth.seen == []
    finally:
        channel.close()


def test_gives_up_after_max_consecutive_failures(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.stop()
    delays: list[float] = []
    try:
        w = watch(
            channel,
            sessions.session_id,
            policy=WatchRetryPolicy(max_consecutive_failures=3),
            sleep=delays.append,
        )
        with pytest.raises(grpc.RpcError) as err:
            next(w)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert w.streams == 4
        assert len(delays) == 3
    finally:
        channel.close()
        sessions.restart()


def test_gives_up_after_max_failure_duration(sessions: SessionServer) -> None:
    clock = FakeClock()
    channel = _channel(sessions, CountingSource())
    sessions.stop()

    def fake_sleep(delay: float) -> None:
        clock.advance(4.0)

    try:
        w = watch(
            channel,
            sessions.session_id,
            policy=WatchRetryPolicy(max_failure_duration=10.0),
            sleep=fake_sleep,
            clock=clock,
        )
        with pytest.raises(grpc.RpcError):
            next(w)
        assert w.streams == 4  # failures at t=0, 4, 8 retried; at 12 given up
    finally:
        channel.close()
        sessions.restart()


def test_close_cancels_the_call_on_the_server(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.append(1)
    consumer = Consumer(watch(channel, sessions.session_id))
    try:
        consumer.wait_for(1)
        wait_until(lambda: sessions.store.subscriber_count(sessions.session_id) == 1)
        consumer.stop()
        wait_until(lambda: sessions.store.subscriber_count(sessions.session_id) == 0)
        assert consumer.error is None
        assert consumer.watch.closed
        with pytest.raises(StopIteration):
            next(consumer.watch)
    finally:
        channel.close()


def test_close_interrupts_a_backoff_wait(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.stop()
    policy = WatchRetryPolicy(base_delay=30.0, max_delay=60.0)
    consumer = Consumer(watch(channel, sessions.session_id, policy=policy, random=lambda: 0.99))
    try:
        wait_until(lambda: consumer.watch.failures >= 1)
        started = time.monotonic()
        consumer.stop()  # asserts the thread ended
        assert time.monotonic() - started < 3.0
        assert consumer.error is None
    finally:
        channel.close()
        sessions.restart()


def test_watch_rejects_bad_arguments(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    try:
        with pytest.raises(ValueError, match="session_id"):
            watch(channel, "")
        with pytest.raises(ValueError, match="after_seq"):
            watch(channel, "s", after_seq=-1)
        with pytest.raises(ValueError, match="after_seq"):
            watch(channel, "s", after_seq=True)
        with pytest.raises(TypeError):
            watch(object(), "s")
    finally:
        channel.close()


# --- push ---------------------------------------------------------------------------------


def test_push_returns_the_stored_message(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    try:
        first = push(channel, sessions.session_id, "event", "hello")
        second = push(channel, sessions.session_id, "event", "again")
        assert (first.seq, second.seq) == (1, 2)
        assert first.payload == "hello"
        assert first.session_id == sessions.session_id
    finally:
        channel.close()


def test_push_unauthenticated_is_retried_once_and_stored_once(sessions: SessionServer) -> None:
    source = CountingSource()
    channel = _channel(sessions, source)
    sessions.auth.revoke("tok-1")
    try:
        message = push(channel, sessions.session_id, "event", "once")
        assert message.seq == 1
        assert sessions.auth.tokens(PUSH) == ["tok-1", "tok-2"]
        page = sessions.store.read_messages(sessions.session_id, 0)
        assert [m.payload for m in page.messages] == ["once"]
    finally:
        channel.close()


def test_push_is_not_retried_when_unavailable(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.stop()
    try:
        with pytest.raises(grpc.RpcError) as err:
            push(channel, sessions.session_id, "event", "lost", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert sessions.auth.tokens(PUSH) == []
    finally:
        channel.close()
        sessions.restart()


def test_push_rejects_bad_arguments(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    try:
        with pytest.raises(ValueError, match="session_id"):
            push(channel, "", "event", "x")
        with pytest.raises(ValueError, match="timeout"):
            push(channel, "s", "event", "x", timeout=0)
        with pytest.raises(TypeError):
            push(object(), "s", "event", "x")
        with pytest.raises(grpc.RpcError) as err:
            push(channel, "no-such-session", "event", "x")
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()


# --- resume logic against scripted streams -----------------------------------------------------


class ScriptedError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class ScriptedCall:
    """A response stream playing a script: messages (by seq), then an optional error."""

    def __init__(self, script: list[Any]) -> None:
        self._items = iter(script)
        self.cancelled = False

    def __iter__(self) -> ScriptedCall:
        return self

    def __next__(self) -> Any:
        if self.cancelled:
            raise ScriptedError(grpc.StatusCode.CANCELLED)
        item = next(self._items)
        if isinstance(item, BaseException):
            raise item
        return sessions_pb2.SessionMessage(seq=item, session_id="s")

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class ScriptedStub:
    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = list(scripts)
        self.after_seqs: list[int] = []
        self.calls: list[ScriptedCall] = []

    def WatchSessionMessages(self, request: Any, **kwargs: Any) -> ScriptedCall:
        self.after_seqs.append(request.after_seq)
        call = ScriptedCall(self.scripts.pop(0) if self.scripts else [])
        self.calls.append(call)
        return call

    def PushSessionMessage(self, request: Any, **kwargs: Any) -> Any:
        raise AssertionError("not used")


def _take(w: SessionWatch, n: int) -> list[int]:
    return [next(w).seq for _ in range(n)]


def test_gap_resumes_from_the_last_delivered_seq() -> None:
    stub = ScriptedStub([1, 2, 4], [3, 4, 5])
    w = watch(stub, "s", sleep=lambda d: pytest.fail("a gap is no failure"))
    assert _take(w, 5) == [1, 2, 3, 4, 5]
    assert stub.after_seqs == [0, 2]
    assert stub.calls[0].cancelled  # the gapped stream was cancelled


def test_same_gap_twice_is_accepted() -> None:
    stub = ScriptedStub([1, 5], [5, 6])
    w = watch(stub, "s", sleep=lambda d: None)
    assert _take(w, 3) == [1, 5, 6]
    assert stub.after_seqs == [0, 1]


def test_duplicates_after_a_resume_are_dropped() -> None:
    delays: list[float] = []
    stub = ScriptedStub(
        [1, 2, ScriptedError(grpc.StatusCode.UNAVAILABLE)],
        [1, 2, 3],
    )
    w = watch(stub, "s", sleep=delays.append, random=lambda: 0.5)
    assert _take(w, 3) == [1, 2, 3]
    assert stub.after_seqs == [0, 2]
    assert delays == [pytest.approx(0.05)]


def test_a_stream_the_server_ends_is_resumed_with_backoff() -> None:
    delays: list[float] = []
    stub = ScriptedStub([1], [], [], [2])
    w = watch(stub, "s", sleep=delays.append, random=lambda: 0.5)
    assert _take(w, 2) == [1, 2]
    assert stub.after_seqs == [0, 1, 1, 1]
    assert delays == [pytest.approx(0.05), pytest.approx(0.1), pytest.approx(0.2)]


def test_server_ending_streams_with_a_limit_stops_iteration() -> None:
    stub = ScriptedStub([1], [], [])
    w = watch(stub, "s", sleep=lambda d: None, policy=WatchRetryPolicy(max_consecutive_failures=1))
    assert [m.seq for m in w] == [1]
    assert stub.after_seqs == [0, 1]


def test_backoff_is_capped() -> None:
    delays: list[float] = []
    errors = [[ScriptedError(grpc.StatusCode.UNAVAILABLE)] for _ in range(40)]
    stub = ScriptedStub(*errors, [1])
    w = watch(stub, "s", sleep=delays.append, random=lambda: 0.999)
    assert _take(w, 1) == [1]
    assert len(delays) == 40
    assert max(delays) < 5.0
    assert delays[-1] > 4.9


def test_context_manager_closes() -> None:
    stub = ScriptedStub([1, 2, 3])
    with watch(stub, "s") as w:
        assert next(w).seq == 1
    assert stub.calls[0].cancelled
    assert list(w) == []


def test_on_retry_reports_each_failure_before_its_backoff() -> None:
    seen: list[tuple[grpc.StatusCode | None, float]] = []
    delays: list[float] = []

    def on_retry(err: BaseException | None, delay: float) -> None:
        assert len(delays) == len(seen)  # called before the wait, not after
        seen.append((err.code() if isinstance(err, ScriptedError) else None, delay))

    stub = ScriptedStub([1, ScriptedError(grpc.StatusCode.UNAVAILABLE)], [], [2])
    w = watch(stub, "s", sleep=delays.append, random=lambda: 0.5, on_retry=on_retry)
    assert _take(w, 2) == [1, 2]
    assert seen == [
        (grpc.StatusCode.UNAVAILABLE, pytest.approx(0.05)),
        (None, pytest.approx(0.1)),
    ]


def test_on_retry_may_stop_the_watch() -> None:
    class GiveUp(Exception):
        pass

    def on_retry(err: BaseException | None, delay: float) -> None:
        raise GiveUp

    stub = ScriptedStub([ScriptedError(grpc.StatusCode.UNAVAILABLE)], [1])
    w = watch(stub, "s", sleep=lambda d: pytest.fail("no wait after giving up"), on_retry=on_retry)
    with pytest.raises(GiveUp):
        next(w)
    # Closing the watch from the callback ends the iteration instead.
    holder: list[SessionWatch] = []
    closing = watch(
        ScriptedStub([], [1]), "s", sleep=lambda d: None, on_retry=lambda e, d: holder[0].close()
    )
    holder.append(closing)
    assert list(closing) == []
