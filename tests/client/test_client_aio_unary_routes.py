"""grpc.aio unary-unary calls on an AuthenticatedChannel take the direct path
(no interceptors of the caller's own) or grpc.aio's interceptor path. The
direct path sends at once when the token source has a usable token
(``peek``), or first fetches one in a task. Every behaviour here is checked
on the three routes, against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio
import pytest
from support.client import (
    ECHO,
    CountingSource,
    EchoServer,
    FailingSource,
    FixedSource,
    start_echo_server,
)
from support.waiting import async_wait_until as wait_until

from ambient_grpc_auth.client.aio._unary import DirectAioUnaryUnary
from ambient_grpc_auth.client.aio.channel import AuthenticatedChannel, create_channel
from ambient_grpc_auth.client.aio.interceptor import TokenUnavailableRpcError
from ambient_grpc_auth.client.tokens import Token, TokenSource
from ambient_grpc_auth.errors import TokenUnavailableError
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc

R = echo_pb2.EchoRequest
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
ROUTES = ("direct-peek", "direct-fetch", "intercepted")


class PeekingSource(CountingSource):
    """CountingSource with ``peek``: the current token, if any, at once."""

    def peek(self) -> Token | None:
        return self.current


class _PassThrough(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


def _source(route: str) -> CountingSource:
    return PeekingSource() if route == "direct-peek" else CountingSource()


def _open(
    server: EchoServer, source: TokenSource, route: str, **kwargs: Any
) -> tuple[AuthenticatedChannel, Any]:
    interceptors = [_PassThrough()] if route == "intercepted" else []
    channel = create_channel(server.target, source, tls=False, interceptors=interceptors, **kwargs)
    return channel, echo_pb2_grpc.EchoServiceStub(channel)


async def test_the_direct_path_is_taken_only_without_caller_interceptors(
    server: EchoServer,
) -> None:
    direct, direct_stub = _open(server, CountingSource(), "direct-fetch")
    other, other_stub = _open(server, CountingSource(), "intercepted")
    try:
        assert isinstance(direct_stub.Echo, DirectAioUnaryUnary)
        assert not isinstance(other_stub.Echo, DirectAioUnaryUnary)
        assert (await direct_stub.Echo(R(text="a"))).caller == "Bearer tok-1"
        # Streaming shapes still go through the interceptor.
        replies = [r.caller async for r in direct_stub.StreamEcho(R(text="s", count=2))]
        assert replies == ["Bearer tok-1"] * 2
    finally:
        await direct.close()
        await other.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_bearer_metadata_timeout_and_call_api(server: EchoServer, route: str) -> None:
    source = _source(route)
    channel, stub = _open(server, source, route)
    md = (("x-trace", "abc"), ("authorization", "Bearer forged"))
    try:
        assert (await stub.Echo(R(text="a"))).caller == "Bearer tok-1"
        call = stub.Echo(R(text="b"), timeout=5.0, metadata=md)
        assert (await call).caller == "Bearer tok-1"
        assert await call.code() is grpc.StatusCode.OK
        assert await call.details() in ("", None)
        assert call.done()
        assert not call.cancelled()
        assert isinstance(await call.trailing_metadata(), grpc.aio.Metadata)
        assert isinstance(await call.initial_metadata(), grpc.aio.Metadata)
        assert "tok-1" not in repr(call)
    finally:
        await channel.close()
    first, second = server.servicer.calls
    assert first.metadata["authorization"] == ["Bearer tok-1"]
    assert first.time_remaining is None or first.time_remaining > 1e6
    assert second.metadata["authorization"] == ["Bearer tok-1"]
    assert second.metadata["x-trace"] == ["abc"]
    assert second.time_remaining is not None
    assert 2.0 < second.time_remaining <= 5.1


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("ask", ["await", "code"])
async def test_unauthenticated_is_retried_once(server: EchoServer, route: str, ask: str) -> None:
    source = _source(route)
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source, route)
    try:
        call = stub.Echo(R(text="u"), timeout=10.0)
        if ask == "code":
            # The outcome asked for first through code(): the retry happens there.
            assert await call.code() is grpc.StatusCode.OK
        assert (await call).caller == "Bearer tok-2"
        assert await call.code() is grpc.StatusCode.OK
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.invalidated == ["tok-1"]
        assert channel.interceptor.unauthenticated_retries == 1
        retried = server.servicer.calls[-1]
        assert retried.time_remaining is not None
        assert retried.time_remaining <= 10.1  # grpc-timeout rounds up
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_concurrent_awaiters_share_one_retry(server: EchoServer, route: str) -> None:
    source = _source(route)
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source, route)
    try:
        call = stub.Echo(R(text="u"), timeout=10.0)
        replies = await asyncio.gather(call, call.code(), call.trailing_metadata())
        assert replies[0].caller == "Bearer tok-2"
        assert replies[1] is grpc.StatusCode.OK
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_a_second_unauthenticated_surfaces(server: EchoServer, route: str) -> None:
    source = _source(route)
    server.auth.reject_all = True
    channel, stub = _open(server, source, route)
    try:
        call = stub.Echo(R(text="u"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() is UNAUTH
        assert await call.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.invalidated == ["tok-1", "tok-2"]
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_no_retry_when_disabled_or_static(server: EchoServer, route: str) -> None:
    source = _source(route)
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source, route, retry_unauthenticated=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert source.invalidated == ["tok-1"]
    finally:
        await channel.close()
    server.auth.revoke("fixed")
    channel, stub = _open(server, FixedSource("fixed"), route)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["tok-1", "fixed"]
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_other_errors_are_not_retried(route: str) -> None:
    nobody = start_echo_server()
    nobody.stop()
    source = _source(route)
    channel, stub = _open(nobody, source, route)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Echo(R(text="u"), timeout=5.0)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert source.invalidated == []
        assert source.fetches == 1
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ["direct-fetch", "intercepted"])
@pytest.mark.parametrize("retryable", [True, False])
async def test_no_token_fails_locally(server: EchoServer, route: str, retryable: bool) -> None:
    failure = None if retryable else RuntimeError("sekret")
    channel, stub = _open(server, FailingSource(retryable=retryable, exc=failure), route)
    expected = grpc.StatusCode.UNAVAILABLE if retryable else UNAUTH
    try:
        call = stub.Echo(R(text="u"))
        with pytest.raises(TokenUnavailableRpcError) as err:
            await call
        assert err.value.code() is expected
        assert isinstance(err.value.token_error, TokenUnavailableError)
        assert "sekret" not in str(err.value)
        assert await call.code() is expected
        # Not awaited at all: nothing is sent and nothing is logged as lost.
        stub.Echo(R(text="never awaited"))
        await asyncio.sleep(0.01)
        assert server.auth.seen == []
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_cancel_before_and_during_the_call(server: EchoServer, route: str) -> None:
    channel, stub = _open(server, _source(route), route)
    try:
        call = stub.Echo(R(text="c"))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled()
        # The channel still works afterwards.
        assert (await stub.Echo(R(text="d"))).caller.startswith("Bearer tok-")
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_cancelling_the_awaiting_task_cancels_the_rpc(route: str) -> None:
    nobody = start_echo_server()
    nobody.stop()  # wait_for_ready keeps the call pending until cancelled
    channel, stub = _open(nobody, _source(route), route)
    try:
        call = stub.Echo(R(text="w"), timeout=30.0, wait_for_ready=True)
        waiter = asyncio.ensure_future(call)
        await asyncio.sleep(0.1)
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await wait_until(call.done)
        assert call.cancelled()
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_done_callbacks_get_the_call(server: EchoServer, route: str) -> None:
    channel, stub = _open(server, _source(route), route)
    try:
        seen: list[Any] = []
        done = asyncio.Event()
        call = stub.Echo(R(text="cb"))

        def callback(finished: Any) -> None:
            seen.append(finished)
            done.set()

        call.add_done_callback(callback)
        await call
        await asyncio.wait_for(done.wait(), 5)
        assert len(seen) == 1
        if route != "intercepted":  # grpc.aio's intercepted calls do not implement it
            assert call.time_remaining() is None
    finally:
        await channel.close()


@pytest.mark.parametrize("route", ROUTES)
async def test_the_token_is_not_logged(
    server: EchoServer, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = PeekingSource(prefix="sekret") if route == "direct-peek" else CountingSource("sekret")
    server.auth.reject_all = True
    channel, stub = _open(server, source, route)
    try:
        call = stub.Echo(R(text="u"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert "sekret" not in str(err.value)
        assert "sekret" not in repr(call)
    finally:
        await channel.close()
    assert "sekret" not in caplog.text
