"""Resumable session watch and push (grpc.aio) against the reference
SessionService on 127.0.0.1, plus the resume logic against scripted streams."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
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
from support.waiting import async_wait_until

from ambient_grpc_auth.client.aio.channel import AuthenticatedChannel, create_channel
from ambient_grpc_auth.client.aio.sessions import SessionWatch, WatchRetryPolicy, push, watch
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.tokens import TokenSource
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2
from ambient_grpc_auth.testing import FakeClock


def _channel(srv: SessionServer, source: TokenSource) -> AuthenticatedChannel:
    return create_channel(srv.target, source, tls=False, options=FAST_RECONNECT)


class Consumer:
    """Iterates a watch in a task, collecting seqs."""

    def __init__(self, w: SessionWatch) -> None:
        self.watch = w
        self.seqs: list[int] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for message in self.watch:
                self.seqs.append(message.seq)
        except Exception as exc:
            self.error = exc

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        await async_wait_until(lambda: len(self.seqs) >= n or self.error is not None, timeout)
        assert self.error is None, self.error

    async def stop(self) -> None:
        await self.watch.aclose()
        await asyncio.wait_for(self.task, 5)


async def test_watch_replays_then_streams_live(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.append(3)
    consumer = Consumer(watch(channel, sessions.session_id))
    try:
        await consumer.wait_for(3)
        sessions.append(2)
        await consumer.wait_for(5)
        assert consumer.seqs == [1, 2, 3, 4, 5]
        assert consumer.watch.streams == 1
        assert sessions.auth.tokens(WATCH) == ["tok-1"]
    finally:
        await consumer.stop()
        await channel.close()


async def test_watch_survives_expiry_unauthenticated_restart_and_token_outage(
    sessions: SessionServer,
) -> None:
    clock = FakeClock()
    upstream = MintingSource(clock, ttl=600)
    cache = CachingTokenSource(upstream, clock=clock, min_backoff=1.0, max_backoff=2.0)
    channel = _channel(sessions, cache)
    server_up = asyncio.Event()
    server_up.set()
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        clock.advance(delay + 2.5)
        await asyncio.wait_for(server_up.wait(), 5)
        await asyncio.sleep(0.01)  # the channel is reconnecting: do not spin

    consumer = Consumer(watch(channel, sessions.session_id, sleep=fake_sleep))
    try:
        sessions.append(3)
        await consumer.wait_for(3)

        clock.advance(601)
        sessions.auth.revoke("minted-1")
        sessions.append(1)
        await consumer.wait_for(4)
        assert sessions.auth.tokens(WATCH)[-1] == "minted-2"
        assert delays == []

        sessions.auth.revoke("minted-2")
        sessions.append(1)
        await consumer.wait_for(5)
        assert sessions.auth.tokens(WATCH)[-1] == "minted-3"
        assert delays == []

        server_up.clear()
        sessions.stop()
        sessions.append(2)
        sessions.restart()
        server_up.set()
        await consumer.wait_for(7)
        assert delays
        await async_wait_until(lambda: channel.reconnects >= 1)

        restart_delays = len(delays)
        upstream.fail_next = 3
        current = sessions.auth.tokens(WATCH)[-1]
        assert current is not None
        sessions.auth.revoke(current)
        sessions.append(1)
        await consumer.wait_for(8)
        assert upstream.failures == 3
        assert len(delays) >= restart_delays + 3

        assert consumer.seqs == list(range(1, 9))
    finally:
        server_up.set()
        await consumer.stop()
        await channel.close()


async def test_non_retryable_status_is_raised(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())

    async def no_sleep(delay: float) -> None:
        raise AssertionError("slept")

    try:
        w = watch(channel, "no-such-session", sleep=no_sleep)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.__anext__()
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()


async def test_non_retryable_token_failure_is_raised(sessions: SessionServer) -> None:
    channel = _channel(sessions, FailingSource(retryable=False))
    try:
        w = watch(channel, sessions.session_id)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.__anext__()
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert sessions.auth.seen == []
    finally:
        await channel.close()


async def test_aclose_cancels_the_call_on_the_server(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.append(1)
    consumer = Consumer(watch(channel, sessions.session_id))
    try:
        await consumer.wait_for(1)
        await async_wait_until(lambda: sessions.store.subscriber_count(sessions.session_id) == 1)
        await consumer.stop()
        await async_wait_until(lambda: sessions.store.subscriber_count(sessions.session_id) == 0)
        assert consumer.error is None
        with pytest.raises(StopAsyncIteration):
            await consumer.watch.__anext__()
    finally:
        await channel.close()


async def test_cancelling_the_task_cancels_the_call(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.append(1)
    consumer = Consumer(watch(channel, sessions.session_id))
    try:
        await consumer.wait_for(1)
        await async_wait_until(lambda: sessions.store.subscriber_count(sessions.session_id) == 1)
        consumer.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer.task
        await async_wait_until(lambda: sessions.store.subscriber_count(sessions.session_id) == 0)
    finally:
        await channel.close()


async def test_aclose_interrupts_a_backoff_wait(sessions: SessionServer) -> None:
    channel = _channel(sessions, CountingSource())
    sessions.stop()
    policy = WatchRetryPolicy(base_delay=30.0, max_delay=60.0)
    consumer = Consumer(watch(channel, sessions.session_id, policy=policy, random=lambda: 0.99))
    try:
        await async_wait_until(lambda: consumer.watch.failures >= 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await consumer.stop()
        assert loop.time() - started < 3.0
        assert consumer.error is None
    finally:
        await channel.close()
        sessions.restart()


async def test_push(sessions: SessionServer) -> None:
    source = CountingSource()
    channel = _channel(sessions, source)
    try:
        first = await push(channel, sessions.session_id, "event", "hello")
        assert (first.seq, first.payload) == (1, "hello")
        sessions.auth.revoke("tok-1")
        second = await push(channel, sessions.session_id, "event", "again")
        assert second.seq == 2
        assert sessions.auth.tokens(PUSH) == ["tok-1", "tok-1", "tok-2"]
        with pytest.raises(ValueError, match="session_id"):
            await push(channel, "", "event", "x")
        with pytest.raises(ValueError, match="timeout"):
            await push(channel, "s", "event", "x", timeout=-1)
        with pytest.raises(TypeError):
            await push(object(), "s", "event", "x")
        sessions.stop()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await push(channel, sessions.session_id, "event", "lost", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert len(sessions.auth.tokens(PUSH)) == 3  # not retried
    finally:
        await channel.close()
        sessions.restart()


def test_watch_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="session_id"):
        watch(ScriptedStub(), "")
    with pytest.raises(ValueError, match="after_seq"):
        watch(ScriptedStub(), "s", after_seq=-5)
    with pytest.raises(TypeError):
        watch(object(), "s")


# --- resume logic against scripted streams ------------------------------------------------------


class ScriptedCall:
    def __init__(self, script: list[Any]) -> None:
        self._items = list(script)
        self.cancelled = False

    async def read(self) -> Any:
        await asyncio.sleep(0)
        if self.cancelled:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        if not self._items:
            return grpc.aio.EOF
        item = self._items.pop(0)
        if isinstance(item, grpc.StatusCode):
            self._items = []
            raise grpc.aio.AioRpcError(item, grpc.aio.Metadata(), grpc.aio.Metadata())
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


async def _take(w: SessionWatch, n: int) -> list[int]:
    return [(await w.__anext__()).seq for _ in range(n)]


async def test_gap_resumes_from_the_last_delivered_seq() -> None:
    stub = ScriptedStub([1, 2, 4], [3, 4, 5])
    w = watch(stub, "s")
    assert await _take(w, 5) == [1, 2, 3, 4, 5]
    assert stub.after_seqs == [0, 2]
    assert stub.calls[0].cancelled


async def test_same_gap_twice_is_accepted_and_duplicates_dropped() -> None:
    stub = ScriptedStub([1, 5], [1, 5, 6])
    w = watch(stub, "s")
    assert await _take(w, 3) == [1, 5, 6]
    assert stub.after_seqs == [0, 1]


async def test_errors_and_ends_back_off_and_resume() -> None:
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)

    stub = ScriptedStub(
        [1, grpc.StatusCode.UNAVAILABLE],
        [],
        [grpc.StatusCode.UNAUTHENTICATED],
        [grpc.StatusCode.UNAUTHENTICATED],
        [2],
    )
    w = watch(stub, "s", sleep=fake_sleep, random=lambda: 0.5)
    assert await _take(w, 2) == [1, 2]
    assert stub.after_seqs == [0, 1, 1, 1, 1]
    # UNAVAILABLE, end, UNAUTHENTICATED (immediate), UNAUTHENTICATED (backoff)
    assert delays == [pytest.approx(0.05), pytest.approx(0.1), pytest.approx(0.4)]


async def test_limit_reached_raises_the_last_error() -> None:
    async def fake_sleep(delay: float) -> None:
        return None

    stub = ScriptedStub(*([[grpc.StatusCode.UNAVAILABLE]] * 5))
    w = watch(stub, "s", sleep=fake_sleep, policy=WatchRetryPolicy(max_consecutive_failures=2))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.__anext__()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert stub.after_seqs == [0, 0, 0]


async def test_async_context_manager_closes() -> None:
    stub = ScriptedStub([1, 2, 3])
    async with watch(stub, "s") as w:
        assert (await w.__anext__()).seq == 1
    assert stub.calls[0].cancelled
    assert [m async for m in w] == []


async def test_watch_against_the_aio_reference_server_across_a_restart(tmp_path: Path) -> None:
    from ambient_grpc_auth.reference.aio.servicer import serve
    from ambient_grpc_auth.reference.store import SessionStore

    store = SessionStore(str(tmp_path / "aio.db"))
    session_id = store.create_session("aio").metadata.id
    server, port = await serve(store, "127.0.0.1:0")
    channel = create_channel(
        f"127.0.0.1:{port}", CountingSource(), tls=False, options=FAST_RECONNECT
    )
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0.02)

    consumer = Consumer(watch(channel, session_id, sleep=fake_sleep))
    try:
        for i in range(2):
            store.append(session_id, "event", f"p{i}")
        await consumer.wait_for(2)
        await server.stop(None)
        store.append(session_id, "event", "while-down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            try:
                server, _ = await serve(store, f"127.0.0.1:{port}")
                break
            except RuntimeError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        store.append(session_id, "event", "after")
        await consumer.wait_for(4)
        assert consumer.seqs == [1, 2, 3, 4]
        assert delays
        assert consumer.watch.streams >= 2
    finally:
        await consumer.stop()
        await channel.close()
        await server.stop(None)
        store.close()


async def test_on_retry_reports_each_failure_before_its_backoff() -> None:
    seen: list[tuple[grpc.StatusCode | None, float]] = []
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)

    def on_retry(err: BaseException | None, delay: float) -> None:
        assert len(delays) == len(seen)
        seen.append((err.code() if isinstance(err, grpc.aio.AioRpcError) else None, delay))

    stub = ScriptedStub([1, grpc.StatusCode.UNAVAILABLE], [], [2])
    w = watch(stub, "s", sleep=fake_sleep, random=lambda: 0.5, on_retry=on_retry)
    assert await _take(w, 2) == [1, 2]
    assert seen == [
        (grpc.StatusCode.UNAVAILABLE, pytest.approx(0.05)),
        (None, pytest.approx(0.1)),
    ]
