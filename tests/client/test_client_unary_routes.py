"""Blocking unary calls on an AuthenticatedChannel take one of two routes:
the direct one (no interceptors of the caller's own: the bearer is added
without gRPC's interceptor machinery) or the intercepted one (caller
interceptors present, and ``.future()``). Both must behave the same; every
test here runs on both, against a real server on 127.0.0.1."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from support.client import (
    ECHO,
    CountingSource,
    EchoServer,
    FailingSource,
    FixedSource,
    start_echo_server,
)

from ambient_grpc_auth.client._unary import DirectUnaryUnary
from ambient_grpc_auth.client.channel import AuthenticatedChannel, create_channel
from ambient_grpc_auth.client.interceptor import AuthInterceptor, TokenUnavailableRpcError
from ambient_grpc_auth.client.tokens import Token, TokenSource
from ambient_grpc_auth.errors import TokenUnavailableError
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc

R = echo_pb2.EchoRequest
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
ROUTES = ("direct", "intercepted")


class _PassThrough(grpc.UnaryUnaryClientInterceptor):
    """A caller interceptor that changes nothing (forces the intercepted route)."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


def _open(
    server: EchoServer, source: TokenSource, route: str, **kwargs: Any
) -> tuple[AuthenticatedChannel, Any]:
    interceptors = [_PassThrough()] if route == "intercepted" else []
    channel = create_channel(server.target, source, tls=False, interceptors=interceptors, **kwargs)
    return channel, echo_pb2_grpc.EchoServiceStub(channel)


def test_the_direct_route_is_taken_only_without_caller_interceptors(server: EchoServer) -> None:
    direct, direct_stub = _open(server, CountingSource(), "direct")
    intercepted, intercepted_stub = _open(server, CountingSource(), "intercepted")
    try:
        assert isinstance(direct_stub.Echo, DirectUnaryUnary)
        assert not isinstance(intercepted_stub.Echo, DirectUnaryUnary)
        assert "tok-" not in repr(direct_stub.Echo)
    finally:
        direct.close()
        intercepted.close()


@pytest.mark.parametrize("route", ROUTES)
def test_bearer_metadata_and_timeout(server: EchoServer, route: str) -> None:
    channel, stub = _open(server, CountingSource(), route)
    md = (("x-trace", "abc"), ("Authorization", "Bearer forged"), ("x-bin-bin", b"\x00"))
    try:
        assert stub.Echo(R(text="a")).caller == "Bearer tok-1"
        reply, call = stub.Echo.with_call(R(text="b"), timeout=5.0, metadata=md)
        assert reply.caller == "Bearer tok-1"
        assert call.code() is grpc.StatusCode.OK
        assert stub.Echo.future(R(text="c")).result(timeout=5).caller == "Bearer tok-1"
    finally:
        channel.close()
    first, second, third = server.servicer.calls
    assert first.metadata["authorization"] == ["Bearer tok-1"]
    assert second.metadata["authorization"] == ["Bearer tok-1"]
    assert second.metadata["x-trace"] == ["abc"]
    assert second.metadata["x-bin-bin"] == [b"\x00"]
    assert second.time_remaining is not None
    assert 2.0 < second.time_remaining <= 5.1
    assert first.time_remaining is None or first.time_remaining > 1e6
    assert third.metadata["authorization"] == ["Bearer tok-1"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("with_call", [False, True])
def test_unauthenticated_is_retried_once(server: EchoServer, route: str, with_call: bool) -> None:
    source = CountingSource()
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source, route)
    try:
        if with_call:
            reply, call = stub.Echo.with_call(R(text="u"), timeout=10.0)
            assert call.code() is grpc.StatusCode.OK
        else:
            reply = stub.Echo(R(text="u"), timeout=10.0)
        assert reply.caller == "Bearer tok-2"
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.invalidated == ["tok-1"]
        assert channel.interceptor.unauthenticated_retries == 1
        # The retry kept the caller's deadline (what is left of it).
        retried = server.servicer.calls[-1]
        assert retried.time_remaining is not None
        assert retried.time_remaining <= 10.1  # grpc-timeout rounds up
    finally:
        channel.close()


@pytest.mark.parametrize("route", ROUTES)
def test_a_second_unauthenticated_surfaces(server: EchoServer, route: str) -> None:
    source = CountingSource()
    server.auth.reject_all = True
    channel, stub = _open(server, source, route)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.invalidated == ["tok-1", "tok-2"]
        assert source.current is None
    finally:
        channel.close()


@pytest.mark.parametrize("route", ROUTES)
def test_no_retry_when_disabled_static_or_out_of_time(server: EchoServer, route: str) -> None:
    source = CountingSource()
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source, route, retry_unauthenticated=False)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert source.invalidated == ["tok-1"]  # still reported
    finally:
        channel.close()
    server.auth.revoke("fixed")
    channel, stub = _open(server, FixedSource("fixed"), route)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["tok-1", "fixed"]
    finally:
        channel.close()


@pytest.mark.parametrize("route", ROUTES)
def test_other_errors_are_not_retried(route: str) -> None:
    source = CountingSource()
    nobody = start_echo_server()
    nobody.stop()  # its port now refuses connections
    channel, stub = _open(nobody, source, route)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"), timeout=5.0)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert source.invalidated == []
        assert source.fetches == 1
        assert channel.interceptor.unauthenticated_retries == 0
    finally:
        channel.close()


class _ClockedSource:
    """Gives ``first`` and then ``second``; counts invalidations."""

    def __init__(self) -> None:
        self.tokens = [Token("first", None), Token("second", None)]
        self.invalidated: list[str] = []

    def get_token(self) -> Token:
        return self.tokens[0]

    async def get_token_async(self) -> Token:
        return self.tokens[0]

    def invalidate(self, token: Token) -> None:
        self.invalidated.append(token.value)
        if len(self.tokens) > 1 and token is self.tokens[0]:
            self.tokens.pop(0)


@pytest.mark.parametrize("route", ROUTES)
def test_metadata_follows_the_token_in_use(server: EchoServer, route: str) -> None:
    # The bearer metadata may be built once per token; it must change with it.
    source = _ClockedSource()
    channel, stub = _open(server, source, route)
    try:
        assert stub.Echo(R(text="1")).caller == "Bearer first"
        assert stub.Echo(R(text="2")).caller == "Bearer first"
        server.auth.revoke("first")
        assert stub.Echo(R(text="3")).caller == "Bearer second"
        assert stub.Echo(R(text="4")).caller == "Bearer second"
        assert source.invalidated == ["first"]
    finally:
        channel.close()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("retryable", [True, False])
def test_no_token_fails_locally(server: EchoServer, route: str, retryable: bool) -> None:
    failure = None if retryable else RuntimeError("sekret")
    source = FailingSource(retryable=retryable, exc=failure)
    channel, stub = _open(server, source, route)
    try:
        for attempt in (
            lambda: stub.Echo(R(text="u")),
            lambda: stub.Echo.with_call(R(text="u")),
            lambda: stub.Echo.future(R(text="u")).result(),
        ):
            with pytest.raises(grpc.RpcError) as err:
                attempt()
            assert isinstance(err.value, TokenUnavailableRpcError)
            expected = grpc.StatusCode.UNAVAILABLE if retryable else UNAUTH
            assert err.value.code() is expected
            assert isinstance(err.value.__cause__, TokenUnavailableError)
            assert "sekret" not in str(err.value)
            assert "sekret" not in repr(err.value)
        assert server.auth.seen == []
    finally:
        channel.close()


@pytest.mark.parametrize("route", ROUTES)
def test_the_token_is_not_logged_on_either_route(
    server: EchoServer, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = CountingSource(prefix="sekret")
    server.auth.revoke("sekret-1")
    channel, stub = _open(server, source, route)
    try:
        stub.Echo(R(text="u"))
        server.auth.reject_all = True
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert "sekret" not in str(err.value)
    finally:
        channel.close()
    assert "sekret" not in caplog.text


def test_the_interceptor_alone_still_serves_every_unary_path(server: EchoServer) -> None:
    # grpc.intercept_channel(raw, AuthInterceptor(...)) without our channel.
    source = CountingSource()
    server.auth.revoke("tok-1")
    interceptor = AuthInterceptor(source)
    with grpc.insecure_channel(server.target) as raw:
        stub = echo_pb2_grpc.EchoServiceStub(grpc.intercept_channel(raw, interceptor))
        assert stub.Echo(R(text="u")).caller == "Bearer tok-2"
        reply, call = stub.Echo.with_call(R(text="w"))
        assert reply.caller == "Bearer tok-2"
        assert call.code() is grpc.StatusCode.OK
    assert interceptor.unauthenticated_retries == 1
