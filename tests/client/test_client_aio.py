"""The grpc.aio client interceptor and channel against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from support.client import (
    CHAT_ECHO,
    COLLECT_ECHO,
    ECHO,
    FAST_RECONNECT,
    STREAM_ECHO,
    CountingSource,
    EchoServer,
    FailingSource,
    FixedSource,
    MintingSource,
    reserve_port,
    start_echo_server,
)
from support.waiting import async_wait_until

from ambient_grpc_auth.client._core import interceptor_state
from ambient_grpc_auth.client.aio.channel import AuthenticatedChannel, create_channel
from ambient_grpc_auth.client.aio.interceptor import AuthInterceptor, TokenUnavailableRpcError
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.tokens import Token, TokenSource
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.testing import FakeClock

R = echo_pb2.EchoRequest
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def _open(
    server: EchoServer, source: TokenSource, **kwargs: Any
) -> tuple[AuthenticatedChannel, Any]:
    channel = create_channel(server.target, source, tls=False, **kwargs)
    return channel, echo_pb2_grpc.EchoServiceStub(channel)


@pytest.fixture
async def stub(server: EchoServer, source: CountingSource) -> AsyncIterator[Any]:
    channel, stub = _open(server, source)
    yield stub
    await channel.close()


async def _gen(*texts: str) -> AsyncIterator[Any]:
    for t in texts:
        yield R(text=t)


async def _all_shapes(stub: Any, **kwargs: Any) -> list[str]:
    seen = [(await stub.Echo(R(text="u"), **kwargs)).caller]
    seen += [r.caller async for r in stub.StreamEcho(R(text="s", count=2), **kwargs)]
    seen.append((await stub.CollectEcho(_gen("a", "b"), **kwargs)).caller)
    seen += [r.caller async for r in stub.ChatEcho(_gen("x", "y"), **kwargs)]
    return seen


# --- the bearer and the call details ------------------------------------------------------


async def test_every_shape_carries_the_bearer(stub: Any, server: EchoServer) -> None:
    assert await _all_shapes(stub) == ["Bearer tok-1"] * 6
    assert server.auth.tokens() == ["tok-1"] * 4


async def test_reader_writer_style_calls(stub: Any) -> None:
    collect = stub.CollectEcho()
    await collect.write(R(text="w1"))
    await collect.write(R(text="w2"))
    await collect.done_writing()
    reply = await collect
    assert (reply.text, reply.caller) == ("w1+w2", "Bearer tok-1")
    assert await collect.code() is grpc.StatusCode.OK

    chat = stub.ChatEcho()
    await chat.write(R(text="c1"))
    first = await chat.read()
    assert (first.text, first.caller) == ("c1", "Bearer tok-1")
    await chat.done_writing()
    assert await chat.read() is grpc.aio.EOF
    assert await chat.code() is grpc.StatusCode.OK

    stream = stub.StreamEcho(R(text="r", count=2))
    assert (await stream.read()).index == 0
    assert (await stream.read()).index == 1
    assert await stream.read() is grpc.aio.EOF


async def test_existing_metadata_kept_and_authorization_replaced(
    stub: Any, server: EchoServer
) -> None:
    md = (("x-trace", "abc"), ("authorization", "Bearer forged"), ("x-bin-bin", b"\x00\x01"))
    await _all_shapes(stub, metadata=md)
    assert len(server.servicer.calls) == 4
    for call in server.servicer.calls:
        assert call.metadata["x-trace"] == ["abc"]
        assert call.metadata["x-bin-bin"] == [b"\x00\x01"]
        assert call.metadata["authorization"] == ["Bearer tok-1"]


async def test_timeout_is_kept_for_every_shape(stub: Any, server: EchoServer) -> None:
    await _all_shapes(stub, timeout=5.0)
    await _all_shapes(stub)
    with_deadline, without = server.servicer.calls[:4], server.servicer.calls[4:]
    for call in with_deadline:
        assert call.time_remaining is not None
        assert 2.0 < call.time_remaining <= 5.1  # grpc-timeout rounds up
    for call in without:
        assert call.time_remaining is None or call.time_remaining > 1e6


async def test_compression_is_kept() -> None:
    strict = start_echo_server(options=(("grpc.compression_enabled_algorithms_bitset", 1),))
    channel, stub = _open(strict, CountingSource())
    try:
        assert (await stub.Echo(R(text="plain"))).text == "plain"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(R(text="z" * 500), compression=grpc.Compression.Gzip)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await channel.close()
        strict.stop()


async def test_wait_for_ready_is_kept() -> None:
    port = reserve_port()
    channel = create_channel(
        f"127.0.0.1:{port}", CountingSource(), tls=False, options=FAST_RECONNECT
    )
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    started: list[EchoServer] = []
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(R(text="early"), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, lambda: started.append(start_echo_server(port=port)))
        reply = await stub.Echo(R(text="late"), timeout=10, wait_for_ready=True)
        assert reply.caller == "Bearer tok-1"
    finally:
        await channel.close()
        for srv in started:
            srv.stop()


async def test_caller_interceptors_run_outside_and_never_see_the_token(
    server: EchoServer,
) -> None:
    seen: list[Any] = []

    class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            seen.append(tuple(details.metadata or ()))
            return await continuation(details, request)

    channel, stub = _open(server, CountingSource(), interceptors=[Recorder()])
    try:
        reply = await stub.Echo(R(text="u"), metadata=(("x-a", "1"),))
        assert reply.caller == "Bearer tok-1"
    finally:
        await channel.close()
    assert seen == [(("x-a", "1"),)]


async def test_sync_get_token_is_never_used() -> None:
    class AsyncOnly:
        def get_token(self) -> Token:
            raise AssertionError("blocking get_token() used on the event loop")

        async def get_token_async(self) -> Token:
            return Token("async-only", None)

    srv = start_echo_server()
    channel, stub = _open(srv, AsyncOnly())
    try:
        assert await _all_shapes(stub) == ["Bearer async-only"] * 6
    finally:
        await channel.close()
        srv.stop()


def test_interceptors_are_one_per_shape() -> None:
    # grpc.aio files an interceptor object under its first shape only.
    adapters = AuthInterceptor(CountingSource()).interceptors()
    bases = [
        grpc.aio.UnaryUnaryClientInterceptor,
        grpc.aio.UnaryStreamClientInterceptor,
        grpc.aio.StreamUnaryClientInterceptor,
        grpc.aio.StreamStreamClientInterceptor,
    ]
    for adapter, base in zip(adapters, bases, strict=True):
        assert [isinstance(adapter, b) for b in bases] == [b is base for b in bases]


def test_create_channel_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        create_channel("127.0.0.1:1", CountingSource(), tls=False)


def test_create_channel_applies_the_plaintext_policy() -> None:
    with pytest.raises(ConfigurationError, match="plaintext"):
        create_channel("api.example.com:443", CountingSource(), tls=False)
    with pytest.raises(ConfigurationError, match="root_certificates"):
        create_channel("127.0.0.1:1", CountingSource(), tls=False, root_certificates=b"x")


# --- UNAUTHENTICATED ----------------------------------------------------------------------


async def test_unauthenticated_is_retried_once_with_a_fresh_token(
    server: EchoServer, source: CountingSource
) -> None:
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source)
    try:
        call = stub.Echo(R(text="u"))
        assert (await call).caller == "Bearer tok-2"
        assert await call.code() is grpc.StatusCode.OK
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.fetches == 2
        assert source.invalidated == ["tok-1"]
        assert channel.interceptor.unauthenticated_retries == 1
    finally:
        await channel.close()


async def test_second_unauthenticated_surfaces_without_a_loop(
    server: EchoServer, source: CountingSource
) -> None:
    server.auth.reject_all = True
    channel, stub = _open(server, source)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.fetches == 2
        assert source.current is None
    finally:
        await channel.close()


async def test_retry_can_be_disabled(server: EchoServer, source: CountingSource) -> None:
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source, retry_unauthenticated=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Echo(R(text="u"))
        assert server.auth.tokens(ECHO) == ["tok-1"]
        assert source.current is None
        assert (await stub.Echo(R(text="u"))).caller == "Bearer tok-2"
    finally:
        await channel.close()


async def test_static_source_is_not_retried_with_the_same_token(server: EchoServer) -> None:
    server.auth.revoke("fixed-token")
    channel, stub = _open(server, FixedSource("fixed-token"))
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Echo(R(text="u"))
        assert server.auth.tokens(ECHO) == ["fixed-token"]
    finally:
        await channel.close()


async def test_client_stream_retried_only_when_replayable(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source)
    try:
        server.auth.revoke("tok-1")
        reply = await stub.CollectEcho([R(text="a"), R(text="b")])
        assert (reply.text, reply.caller) == ("a+b", "Bearer tok-2")
        assert server.auth.tokens(COLLECT_ECHO) == ["tok-1", "tok-2"]

        server.auth.revoke("tok-2")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CollectEcho(_gen("a", "b"))
        assert err.value.code() is UNAUTH
        assert source.current is None  # dropped before the caller saw the error

        source.get_token()
        server.auth.revoke("tok-3")
        writer = stub.CollectEcho()

        async def write_all() -> None:
            await writer.write(R(text="w"))
            await writer.done_writing()
            await writer

        with pytest.raises(grpc.aio.AioRpcError):
            await write_all()
        assert server.auth.tokens(COLLECT_ECHO) == ["tok-1", "tok-2", "tok-2", "tok-3"]
        assert source.current is None
    finally:
        await channel.close()


async def test_stream_unauthenticated_drops_the_token_before_the_caller_sees_it(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source)
    try:
        for method, make in (
            (STREAM_ECHO, lambda: stub.StreamEcho(R(text="s", count=2))),
            (CHAT_ECHO, lambda: stub.ChatEcho(_gen("c"))),
        ):
            current = source.get_token()
            server.auth.revoke(current.value)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in make():
                    pass
            assert err.value.code() is UNAUTH
            assert server.auth.tokens(method)[-1] == current.value
            assert len(server.auth.tokens(method)) == 1  # not retried
            assert source.current is None
        current = source.get_token()
        server.auth.revoke(current.value)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.StreamEcho(R(text="s")).read()
        assert source.current is None
    finally:
        await channel.close()


# --- no token -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retryable", "code"),
    [(True, grpc.StatusCode.UNAVAILABLE), (False, grpc.StatusCode.UNAUTHENTICATED)],
)
async def test_no_token_fails_every_shape_locally(
    server: EchoServer, retryable: bool, code: grpc.StatusCode
) -> None:
    channel, stub = _open(server, FailingSource(retryable=retryable))

    async def drain(call: Any) -> None:
        async for _ in call:
            pass

    attempts = [
        lambda: stub.Echo(R(text="u")),
        lambda: drain(stub.StreamEcho(R(text="s"))),
        lambda: stub.CollectEcho(_gen("a")),
        lambda: drain(stub.ChatEcho(_gen("a"))),
    ]
    try:
        for attempt in attempts:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attempt()
            assert isinstance(err.value, TokenUnavailableRpcError)
            assert err.value.code() is code
            assert (
                err.value.details() == f"could not obtain an access token: {err.value.token_error}"
            )
            assert isinstance(err.value.__cause__, TokenUnavailableError)
            assert err.value.token_error.retryable is retryable
        call = stub.Echo(R(text="u"))
        assert await call.code() is code
        assert server.auth.seen == []
    finally:
        await channel.close()


async def test_unexpected_source_exception_is_contained(
    server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    channel, stub = _open(server, FailingSource(retryable=True, exc=RuntimeError("sekret-x")))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert "sekret" not in str(err.value)
        assert "sekret" not in caplog.text
    finally:
        await channel.close()


async def test_tokens_never_logged_or_in_reprs(
    server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = CountingSource(prefix="sekret")
    server.auth.revoke("sekret-1")
    channel, stub = _open(server, source)
    try:
        await stub.Echo(R(text="u"))
        server.auth.reject_all = True
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Echo(R(text="u"))
        call = stub.StreamEcho(R(text="s"))
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass
        texts = [repr(channel), repr(channel.interceptor), caplog.text]
    finally:
        await channel.close()
    assert all("sekret" not in t for t in texts)


# --- stampede and the event loop ----------------------------------------------------------------


async def test_stampede_of_1000_tasks_on_an_expired_token_fetches_once(
    server: EchoServer,
) -> None:
    clock = FakeClock()
    upstream = MintingSource(clock, ttl=600, delay=0.05)
    cache = CachingTokenSource(upstream, clock=clock)
    channel, stub = _open(server, cache)
    try:
        assert (await stub.Echo(R(text="warm"))).caller == "Bearer minted-1"
        clock.advance(601)
        replies = await asyncio.gather(*(stub.Echo(R(text=str(i))) for i in range(1000)))
        assert {r.caller for r in replies} == {"Bearer minted-2"}
        assert len(replies) == 1000
        assert cache.fetches == 2
        assert upstream.calls == 2
    finally:
        await channel.close()


async def test_slow_fetch_never_blocks_the_event_loop(server: EchoServer) -> None:
    clock = FakeClock()
    upstream = MintingSource(clock, ttl=600, delay=0.6)
    cache = CachingTokenSource(upstream, clock=clock)
    channel, stub = _open(server, cache)
    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        started = loop.time()
        replies = await asyncio.gather(*(stub.Echo(R(text=str(i))) for i in range(20)))
        elapsed = loop.time() - started
        assert {r.caller for r in replies} == {"Bearer minted-1"}
        assert elapsed >= 0.6  # the fetch really was slow
    finally:
        stop.set()
        await task
        await channel.close()
    # A fetch that blocked the loop would stop the ticker for 0.6 s.
    during = [t for t in ticks if started <= t <= started + 0.6]
    assert len(during) >= 5
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) < 0.4
    assert upstream.calls == 1


# --- reconnect ---------------------------------------------------------------------------------


async def test_reconnect_makes_the_next_call_fetch_a_fresh_token(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source, options=FAST_RECONNECT)
    try:
        assert (await stub.Echo(R(text="before"))).caller == "Bearer tok-1"
        assert (await stub.Echo(R(text="cached"))).caller == "Bearer tok-1"
        await async_wait_until(
            lambda: channel.interceptor.last_state is grpc.ChannelConnectivity.READY
        )
        assert channel.reconnects == 0
        server.stop()
        server.restart()
        await asyncio.wait_for(channel.channel_ready(), 10)
        await async_wait_until(lambda: channel.reconnects == 1)
        assert (await stub.Echo(R(text="after"))).caller == "Bearer tok-2"
        assert source.fetches == 2
        assert source.invalidated == ["tok-1"]
    finally:
        await channel.close()


async def test_reconnect_does_not_fail_calls_in_flight(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source, options=FAST_RECONNECT)
    try:
        await stub.Echo(R(text="connect"))
        await async_wait_until(
            lambda: channel.interceptor.last_state is grpc.ChannelConnectivity.READY
        )
        server.stop()
        server.restart()
        reply = await stub.Echo(R(text="during"), timeout=10, wait_for_ready=True)
        assert reply.text == "during"
        await async_wait_until(lambda: channel.reconnects == 1)
    finally:
        await channel.close()


async def test_close_stops_the_watcher_task(server: EchoServer, source: CountingSource) -> None:
    def watchers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "ambient-grpc-auth-connectivity"]

    async with create_channel(server.target, source, tls=False) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        await stub.Echo(R(text="u"))
        assert len(watchers()) == 1
    assert watchers() == []
    with pytest.raises(Exception):  # noqa: B017 (grpc raises its own UsageError)
        await stub.Echo(R(text="u"))


async def test_watcher_counts_a_reconnect_it_only_saw_as_a_change() -> None:
    ready, shutdown = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.SHUTDOWN

    class ScriptedChannel:
        """get_state() is the head of the script; a state change pops it."""

        def __init__(self, *states: grpc.ChannelConnectivity) -> None:
            self.states = list(states)

        def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
            return self.states[0]

        async def wait_for_state_change(self, last: grpc.ChannelConnectivity) -> None:
            self.states.pop(0)
            await asyncio.sleep(0)

        async def close(self, grace: float | None = None) -> None:
            return None

    source = CountingSource()
    interceptor = AuthInterceptor(source)
    stale = await interceptor_state(interceptor).get_token_async()  # the token in use
    channel = AuthenticatedChannel(ScriptedChannel(ready, ready, shutdown), interceptor)  # type: ignore[arg-type]
    await async_wait_until(lambda: channel._watcher is not None and channel._watcher.done())
    assert channel.reconnects == 1
    assert source.invalidated == [stale.value]
    await channel.close()
