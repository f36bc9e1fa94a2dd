"""The sync client interceptor, call credentials and channel against real
servers on 127.0.0.1 (Echo service behind a bearer-checking interceptor)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from support.client import (
    CHAT_ECHO,
    COLLECT_ECHO,
    ECHO,
    FAST_RECONNECT,
    STREAM_ECHO,
    AuthState,
    CountingSource,
    EchoServer,
    FailingSource,
    FixedSource,
    MintingSource,
    reserve_port,
    start_echo_server,
)
from support.waiting import wait_until

from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.channel import AuthenticatedChannel, create_channel
from ambient_grpc_auth.client.interceptor import (
    AuthInterceptor,
    TokenUnavailableRpcError,
    bearer_call_credentials,
)
from ambient_grpc_auth.client.tokens import TokenSource
from ambient_grpc_auth.errors import TokenUnavailableError
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
def stub(server: EchoServer, source: CountingSource) -> Iterator[Any]:
    channel, stub = _open(server, source)
    yield stub
    channel.close()


def _all_shapes(stub: Any, **kwargs: Any) -> list[str]:
    """One call of each shape; returns the bearer each handler saw."""
    seen = [stub.Echo(R(text="u"), **kwargs).caller]
    seen += [r.caller for r in stub.StreamEcho(R(text="s", count=2), **kwargs)]
    seen.append(stub.CollectEcho(iter([R(text="a"), R(text="b")]), **kwargs).caller)
    seen += [r.caller for r in stub.ChatEcho(iter([R(text="x"), R(text="y")]), **kwargs)]
    return seen


# --- the bearer and the call details -----------------------------------------------------


def test_every_shape_carries_the_bearer(stub: Any, server: EchoServer) -> None:
    assert _all_shapes(stub) == ["Bearer tok-1"] * 6
    assert server.auth.tokens() == ["tok-1"] * 4


def test_without_the_interceptor_the_server_refuses(server: EchoServer) -> None:
    with grpc.insecure_channel(server.target) as plain, pytest.raises(grpc.RpcError) as err:
        echo_pb2_grpc.EchoServiceStub(plain).Echo(R(text="u"))
    assert err.value.code() is UNAUTH


def test_existing_metadata_kept_and_authorization_replaced(stub: Any, server: EchoServer) -> None:
    md = (("x-trace", "abc"), ("authorization", "Bearer forged"), ("x-bin-bin", b"\x00\x01"))
    _all_shapes(stub, metadata=md)
    assert [c.method for c in server.servicer.calls] == [
        "Echo",
        "StreamEcho",
        "CollectEcho",
        "ChatEcho",
    ]
    for call in server.servicer.calls:
        assert call.metadata["x-trace"] == ["abc"]
        assert call.metadata["x-bin-bin"] == [b"\x00\x01"]
        assert call.metadata["authorization"] == ["Bearer tok-1"]


def test_timeout_is_kept_for_every_shape(stub: Any, server: EchoServer) -> None:
    _all_shapes(stub, timeout=5.0)
    _all_shapes(stub)
    with_deadline, without = server.servicer.calls[:4], server.servicer.calls[4:]
    for call in with_deadline:
        assert call.time_remaining is not None
        assert 2.0 < call.time_remaining <= 5.1  # grpc-timeout rounds up
    for call in without:
        assert call.time_remaining is None or call.time_remaining > 1e6


def test_compression_is_kept() -> None:
    # A server that refuses gzip proves the request really was compressed.
    strict = start_echo_server(options=(("grpc.compression_enabled_algorithms_bitset", 1),))
    source = CountingSource()
    channel, stub = _open(strict, source)
    try:
        assert stub.Echo(R(text="plain")).text == "plain"
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="z" * 500), compression=grpc.Compression.Gzip)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError):
            list(stub.StreamEcho(R(text="z" * 500), compression=grpc.Compression.Gzip))
    finally:
        channel.close()
        strict.stop()
    normal = start_echo_server()
    channel, stub = _open(normal, CountingSource())
    try:
        reply = stub.Echo(R(text="z" * 500), compression=grpc.Compression.Gzip)
        assert reply.text == "z" * 500
    finally:
        channel.close()
        normal.stop()


def test_wait_for_ready_is_kept() -> None:
    port = reserve_port()
    channel = create_channel(
        f"127.0.0.1:{port}", CountingSource(), tls=False, options=FAST_RECONNECT
    )
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    started: list[EchoServer] = []
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="early"), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        timer = threading.Timer(0.3, lambda: started.append(start_echo_server(port=port)))
        timer.start()
        reply = stub.Echo(R(text="late"), timeout=10, wait_for_ready=True)
        assert reply.caller == "Bearer tok-1"
        timer.join()
    finally:
        channel.close()
        for srv in started:
            srv.stop()


def test_future_and_with_call_work(stub: Any) -> None:
    assert stub.Echo.future(R(text="f")).result(timeout=5).caller == "Bearer tok-1"
    reply, call = stub.Echo.with_call(R(text="w"))
    assert reply.caller == "Bearer tok-1"
    assert call.code() is grpc.StatusCode.OK


def test_caller_interceptors_run_outside_and_never_see_the_token(server: EchoServer) -> None:
    seen: list[Any] = []

    class Recorder(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            seen.append(details.metadata)
            return continuation(details, request)

    channel, stub = _open(server, CountingSource(), interceptors=[Recorder()])
    try:
        assert stub.Echo(R(text="u"), metadata=(("x-a", "1"),)).caller == "Bearer tok-1"
    finally:
        channel.close()
    assert seen == [(("x-a", "1"),)]


# --- UNAUTHENTICATED ------------------------------------------------------------------------


def test_unauthenticated_is_retried_once_with_a_fresh_token(
    server: EchoServer, source: CountingSource
) -> None:
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source)
    try:
        assert stub.Echo(R(text="u")).caller == "Bearer tok-2"
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.fetches == 2
        assert source.invalidated == ["tok-1"]
        assert channel.interceptor.unauthenticated_retries == 1
        reply, call = stub.Echo.with_call(R(text="again"))
        assert reply.caller == "Bearer tok-2"
        assert source.fetches == 2
    finally:
        channel.close()


def test_second_unauthenticated_surfaces_without_a_loop(
    server: EchoServer, source: CountingSource
) -> None:
    server.auth.reject_all = True
    channel, stub = _open(server, source)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2"]
        assert source.fetches == 2
        # Both rejected tokens were dropped: the next call starts fresh.
        assert source.current is None
    finally:
        channel.close()


def test_retry_can_be_disabled(server: EchoServer, source: CountingSource) -> None:
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source, retry_unauthenticated=False)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["tok-1"]
        assert source.current is None  # still reported
        assert stub.Echo(R(text="u")).caller == "Bearer tok-2"
    finally:
        channel.close()


def test_static_source_is_not_retried_with_the_same_token(server: EchoServer) -> None:
    fixed = FixedSource("fixed-token")
    server.auth.revoke("fixed-token")
    channel, stub = _open(server, fixed)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(ECHO) == ["fixed-token"]
    finally:
        channel.close()


def test_client_stream_retried_only_when_replayable(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source)
    try:
        server.auth.revoke("tok-1")
        reply = stub.CollectEcho([R(text="a"), R(text="b")])
        assert (reply.text, reply.caller) == ("a+b", "Bearer tok-2")
        assert server.auth.tokens(COLLECT_ECHO) == ["tok-1", "tok-2"]
        server.auth.revoke("tok-2")
        with pytest.raises(grpc.RpcError) as err:
            stub.CollectEcho(iter([R(text="a"), R(text="b")]))
        assert err.value.code() is UNAUTH
        assert server.auth.tokens(COLLECT_ECHO) == ["tok-1", "tok-2", "tok-2"]
        assert source.current is None
    finally:
        channel.close()


def test_stream_unauthenticated_drops_the_token_before_the_caller_sees_it(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source)
    try:
        server.auth.revoke("tok-1")
        for method, call in (
            (STREAM_ECHO, lambda: stub.StreamEcho(R(text="s", count=2))),
            (CHAT_ECHO, lambda: stub.ChatEcho(iter([R(text="c")]))),
        ):
            source.get_token()  # whatever is current
            current = source.current
            assert current is not None
            server.auth.revoke(current.value)
            with pytest.raises(grpc.RpcError) as err:
                list(call())
            assert err.value.code() is UNAUTH
            # Not retried (a stream may have delivered messages), but dropped.
            assert server.auth.tokens(method) == [current.value]
            assert source.current is None
    finally:
        channel.close()


def test_future_unauthenticated_drops_the_token(server: EchoServer, source: CountingSource) -> None:
    server.auth.revoke("tok-1")
    channel, stub = _open(server, source)
    try:
        future = stub.Echo.future(R(text="f"))
        assert future.exception(timeout=5) is not None
        assert future.code() is UNAUTH
        # Dropped before the caller saw the outcome: no waiting needed.
        assert source.invalidated == ["tok-1"]
        assert server.auth.tokens(ECHO) == ["tok-1"]  # a future is never retried
        assert stub.Echo.future(R(text="f")).result(timeout=5).caller == "Bearer tok-2"
    finally:
        channel.close()


class _FinishFirst(grpc.UnaryUnaryClientInterceptor):
    """Installed under the auth interceptor: hands it the future of a
    ``.future()`` call only once the server's answer has arrived, i.e. the
    fastest possible answer, every time."""

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        outcome = continuation(client_call_details, request)
        outcome.exception()  # waits until the call has finished
        return outcome


def test_future_answered_before_the_interceptor_looks_reports_unauthenticated(
    server: EchoServer, source: CountingSource
) -> None:
    server.auth.revoke("tok-1")
    with grpc.insecure_channel(server.target) as raw:
        finished_first = grpc.intercept_channel(raw, _FinishFirst())
        stub = echo_pb2_grpc.EchoServiceStub(
            grpc.intercept_channel(finished_first, AuthInterceptor(source))
        )
        future = stub.Echo.future(R(text="f"))
        assert future.done()
        err = future.exception(timeout=5)
        assert isinstance(err, grpc.RpcError)
        assert err.code() is UNAUTH
        assert future.code() is UNAUTH
        with pytest.raises(grpc.RpcError):
            future.result(timeout=5)
        # The same contract as a future answered later: not retried, the
        # rejected token dropped (once) before the caller saw the outcome.
        assert server.auth.tokens(ECHO) == ["tok-1"]
        assert source.invalidated == ["tok-1"]
        seen: list[grpc.StatusCode] = []
        future.add_done_callback(lambda done: seen.append(done.code()))
        assert seen == [UNAUTH]
        assert stub.Echo.future(R(text="f")).result(timeout=5).caller == "Bearer tok-2"
        # Blocking calls on the same stack are still retried once.
        server.auth.revoke("tok-2")
        reply, call = stub.Echo.with_call(R(text="w"))
        assert reply.caller == "Bearer tok-3"
        assert call.code() is grpc.StatusCode.OK
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-2", "tok-2", "tok-3"]
        assert source.invalidated == ["tok-1", "tok-2"]


# --- no token -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retryable", "code"),
    [(True, grpc.StatusCode.UNAVAILABLE), (False, grpc.StatusCode.UNAUTHENTICATED)],
)
def test_no_token_fails_every_shape_locally(
    server: EchoServer, retryable: bool, code: grpc.StatusCode
) -> None:
    channel, stub = _open(server, FailingSource(retryable=retryable))
    attempts = [
        lambda: stub.Echo(R(text="u")),
        lambda: stub.Echo.with_call(R(text="u")),
        lambda: stub.Echo.future(R(text="u")).result(),
        lambda: list(stub.StreamEcho(R(text="s"))),
        lambda: stub.CollectEcho(iter([R(text="a")])),
        lambda: list(stub.ChatEcho(iter([R(text="a")]))),
    ]
    try:
        for attempt in attempts:
            with pytest.raises(grpc.RpcError) as err:
                attempt()
            assert isinstance(err.value, TokenUnavailableRpcError)
            assert err.value.code() is code
            assert (
                err.value.details() == f"could not obtain an access token: {err.value.token_error}"
            )
            assert isinstance(err.value.__cause__, TokenUnavailableError)
            assert err.value.token_error.retryable is retryable
        assert server.auth.seen == []  # nothing left the process
    finally:
        channel.close()


def test_unexpected_source_exception_is_contained(server: EchoServer) -> None:
    source = FailingSource(retryable=True, exc=RuntimeError("sekret-value"))
    channel, stub = _open(server, source)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(R(text="u"))
        assert err.value.code() is UNAUTH
        assert "sekret" not in str(err.value)
        assert "sekret" not in repr(err.value)
        assert "sekret" not in str(err.value.token_error)
    finally:
        channel.close()


def test_tokens_never_logged_or_in_reprs(
    server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = CountingSource(prefix="sekret")
    server.auth.revoke("sekret-1")
    channel, stub = _open(server, source)
    try:
        stub.Echo(R(text="u"))
        server.auth.reject_all = True
        with pytest.raises(grpc.RpcError):
            stub.Echo(R(text="u"))
        with pytest.raises(grpc.RpcError):
            list(stub.StreamEcho(R(text="s")))
        texts = [repr(channel), repr(channel.interceptor), caplog.text]
    finally:
        channel.close()
    assert all("sekret" not in t for t in texts)


# --- stampede -----------------------------------------------------------------------------


def test_stampede_of_1000_calls_on_an_expired_token_fetches_once(server: EchoServer) -> None:
    clock = FakeClock()
    upstream = MintingSource(clock, ttl=600, delay=0.05)
    cache = CachingTokenSource(upstream, clock=clock)
    channel, stub = _open(server, cache)
    try:
        assert stub.Echo(R(text="warm")).caller == "Bearer minted-1"
        clock.advance(601)  # expired: every caller needs the new token
        with ThreadPoolExecutor(max_workers=64) as pool:
            replies = list(pool.map(lambda i: stub.Echo(R(text=str(i))).caller, range(1000)))
        assert replies == ["Bearer minted-2"] * 1000
        assert cache.fetches == 2
        assert upstream.calls == 2
    finally:
        channel.close()


# --- reconnect ------------------------------------------------------------------------------


def test_reconnect_makes_the_next_call_fetch_a_fresh_token(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source, options=FAST_RECONNECT)
    try:
        assert stub.Echo(R(text="before")).caller == "Bearer tok-1"
        assert stub.Echo(R(text="cached")).caller == "Bearer tok-1"
        # Connectivity is polled: let the first READY be seen before the drop.
        wait_until(lambda: channel.interceptor.last_state is grpc.ChannelConnectivity.READY)
        assert channel.reconnects == 0
        server.stop()
        server.restart()
        grpc.channel_ready_future(channel).result(timeout=10)
        wait_until(lambda: channel.reconnects == 1)
        assert stub.Echo(R(text="after")).caller == "Bearer tok-2"
        assert source.fetches == 2
        assert source.invalidated == ["tok-1"]
        assert server.auth.tokens(ECHO) == ["tok-1", "tok-1", "tok-2"]
    finally:
        channel.close()


def test_reconnect_does_not_fail_calls_in_flight(
    server: EchoServer, source: CountingSource
) -> None:
    channel, stub = _open(server, source, options=FAST_RECONNECT)
    try:
        stub.Echo(R(text="connect"))
        wait_until(lambda: channel.interceptor.last_state is grpc.ChannelConnectivity.READY)
        server.stop()
        server.restart()
        # A call made while the channel is down waits for the new connection.
        reply = stub.Echo(R(text="during"), timeout=10, wait_for_ready=True)
        assert reply.text == "during"
        wait_until(lambda: channel.reconnects == 1)
    finally:
        channel.close()


def test_channel_close_is_idempotent(server: EchoServer, source: CountingSource) -> None:
    channel, stub = _open(server, source)
    stub.Echo(R(text="u"))
    channel.close()
    channel.close()
    with pytest.raises(ValueError, match="closed"):
        stub.Echo(R(text="u"))


def test_interceptor_works_on_a_plain_intercepted_channel(server: EchoServer) -> None:
    source = CountingSource()
    interceptor = AuthInterceptor(source)
    with grpc.insecure_channel(server.target) as raw:
        stub = echo_pb2_grpc.EchoServiceStub(grpc.intercept_channel(raw, interceptor))
        assert stub.Echo(R(text="u")).caller == "Bearer tok-1"
    assert interceptor.token_source is source


# --- call credentials ---------------------------------------------------------------------------


@pytest.fixture
def local_server() -> Iterator[EchoServer]:
    srv = start_echo_server(
        credentials=grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    )
    yield srv
    srv.stop()


def _local_channel(target: str, source: TokenSource) -> grpc.Channel:
    creds = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        bearer_call_credentials(source),
    )
    return grpc.secure_channel(target, creds)


def test_call_credentials_add_the_bearer(local_server: EchoServer) -> None:
    source = CountingSource()
    with _local_channel(local_server.target, source) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        assert _all_shapes(stub) == ["Bearer tok-1"] * 6


def test_call_credentials_failure_is_generic(
    local_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    source = FailingSource(retryable=False, exc=RuntimeError("sekret-detail"))
    channel = _local_channel(local_server.target, source)
    try:
        with pytest.raises(grpc.RpcError) as err:
            echo_pb2_grpc.EchoServiceStub(channel).Echo(R(text="u"))
    finally:
        channel.close()
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    assert "could not obtain an access token" in (err.value.details() or "")
    assert "sekret" not in (err.value.details() or "")
    assert "sekret" not in caplog.text
    assert local_server.auth.seen == []


def test_call_credentials_refused_on_insecure_channels(server: EchoServer) -> None:
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        echo_pb2_grpc.EchoServiceStub(channel).Echo(
            R(text="u"), credentials=bearer_call_credentials(CountingSource())
        )
    assert err.value.code() is UNAUTH
    assert server.auth.seen == []


def test_auth_state_helper_is_strict() -> None:
    # The test server must itself refuse what it should refuse.
    state = AuthState()
    assert not state.accepts(None)
    state.revoke("x")
    assert not state.accepts("x")
    assert state.accepts("y")
