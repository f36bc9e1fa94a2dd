"""Stream limits on real servers: concurrent streams per caller and in total,
refused RESOURCE_EXHAUSTED beyond a limit, released however a stream ends
(completion, cancellation, deadline, a denied first message), unary calls
never counted. Every server kind: sync, aio (async generators), aio
(reader/writer), aio running sync handlers."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.keys import signing_key
from support.server import (
    AUDIENCE,
    ECHO,
    ECHO_SERVERS,
    IDP_ISSUER,
    IDP_KID,
    OWNERS,
    Recorder,
    RunningServer,
    mint,
    start_aio_server_in_thread,
    start_sync_server,
)
from support.waiting import wait_until

from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import MethodRule, OwnershipPolicy
from ambient_grpc_auth.testing import FakeClock

KINDS = ("sync", "aio", "aio-rw", "aio-sync")
EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent streams")
CLOCK = FakeClock()


def config(**limits: Any) -> ServerAuthConfig:
    idp = TrustedIssuer(
        issuer=IDP_ISSUER,
        audiences=(AUDIENCE,),
        keys=StaticKeySet(keys=[VerificationKey(kid=IDP_KID, key=signing_key().public_key())]),
    )
    # CollectEcho carries a session rule, so a denied first message can be tested.
    rules = {ECHO + "CollectEcho": MethodRule.session("session_id")}
    base = ServerAuthConfig.from_env(
        environ={},
        issuers=[idp],
        ownership=OwnershipPolicy(rules=rules),
        owner_lookup=OWNERS.get,
        metrics=AuthMetrics(),
        clock=CLOCK,
    )
    return dataclasses.replace(base, **limits)


@dataclasses.dataclass
class Server:
    interceptor: ServerAuthInterceptor | AioServerAuthInterceptor
    running: RunningServer
    channel: grpc.Channel
    stub: echo_pb2_grpc.EchoServiceStub


@pytest.fixture
def start(request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[Server] = []

    def run(kind: str, cfg: ServerAuthConfig) -> Server:
        is_aio, servicer_type = ECHO_SERVERS[kind]
        servicer = servicer_type(Recorder())

        def register(server: Any) -> None:
            echo_pb2_grpc.add_EchoServiceServicer_to_server(servicer, server)

        interceptor: ServerAuthInterceptor | AioServerAuthInterceptor
        if is_aio:
            interceptor = AioServerAuthInterceptor(config=cfg)
            running = start_aio_server_in_thread([interceptor], register)
        else:
            interceptor = ServerAuthInterceptor(config=cfg)
            running = start_sync_server([interceptor], register)
        channel = grpc.insecure_channel(running.target)
        server = Server(interceptor, running, channel, echo_pb2_grpc.EchoServiceStub(channel))
        started.append(server)
        return server

    yield run
    for server in started:
        server.channel.close()
        server.running.stop()


def bearer(user: str) -> tuple[tuple[str, str]]:
    return (("authorization", "Bearer " + mint(CLOCK.time(), sub=user)),)


class HeldStream:
    """A ChatEcho stream that sends one message, then keeps its request side
    open until released or cancelled."""

    def __init__(self, stub: echo_pb2_grpc.EchoServiceStub, user: str, timeout: float = 30) -> None:
        self.release = threading.Event()

        def requests() -> Iterator[echo_pb2.EchoRequest]:
            yield echo_pb2.EchoRequest(text="hi", session_id="s-" + user)
            self.release.wait(30)

        self.call = stub.ChatEcho(requests(), metadata=bearer(user), timeout=timeout)

    def first(self) -> Any:
        return next(self.call)

    def end(self) -> None:
        self.call.cancel()
        self.release.set()


def refused(stream: HeldStream) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        stream.first()
    stream.end()
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("kind", KINDS)
def test_streams_per_principal_are_bounded_and_released(kind: str, start: Any) -> None:
    server = start(kind, config(max_streams_per_principal=3))
    held = [HeldStream(server.stub, "alice") for _ in range(3)]
    try:
        for stream in held:
            assert stream.first().caller == "alice"
        assert server.interceptor.open_streams() == 3
        # A fourth stream of the same caller is refused, with fixed details...
        assert refused(HeldStream(server.stub, "alice")) == EXHAUSTED
        # ...while another caller's stream and the caller's unary calls go on.
        bob = HeldStream(server.stub, "bob")
        assert bob.first().caller == "bob"
        held.append(bob)
        reply = server.stub.Echo(echo_pb2.EchoRequest(text="u"), metadata=bearer("alice"))
        assert reply.caller == "alice"
        assert server.interceptor.open_streams() == 4
        assert server.interceptor.metrics.snapshot().denied["too_many_streams"] == 1
    finally:
        for stream in held:
            stream.end()  # cancellation releases every slot
    wait_until(lambda: server.interceptor.open_streams() == 0)
    again = HeldStream(server.stub, "alice")
    assert again.first().caller == "alice"
    again.end()
    wait_until(lambda: server.interceptor.open_streams() == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_total_streams_are_bounded(kind: str, start: Any) -> None:
    server = start(kind, config(max_streams_per_principal=None, max_concurrent_streams=2))
    held = [HeldStream(server.stub, user) for user in ("alice", "bob")]
    try:
        for stream in held:
            stream.first()
        assert refused(HeldStream(server.stub, "carol")) == EXHAUSTED
        reply = server.stub.Echo(echo_pb2.EchoRequest(text="u"), metadata=bearer("carol"))
        assert reply.caller == "carol"  # unary calls are never counted
    finally:
        for stream in held:
            stream.end()
    wait_until(lambda: server.interceptor.open_streams() == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_slots_are_released_however_a_stream_ends(kind: str, start: Any) -> None:
    server = start(kind, config(max_streams_per_principal=2))
    stub = server.stub
    open_streams = server.interceptor.open_streams
    # Completion (server streaming).
    replies = list(
        stub.StreamEcho(echo_pb2.EchoRequest(text="x", count=3), metadata=bearer("alice"))
    )
    assert len(replies) == 3
    wait_until(lambda: open_streams() == 0)
    # Deadline.
    late = HeldStream(stub, "alice", timeout=0.5)
    late.first()
    with pytest.raises(grpc.RpcError) as err:
        next(late.call)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    late.end()
    wait_until(lambda: open_streams() == 0)
    # A first message the session rule denies (alice on bob's session).
    with pytest.raises(grpc.RpcError) as err:
        stub.CollectEcho(iter([echo_pb2.EchoRequest(session_id="s-bob")]), metadata=bearer("alice"))
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    wait_until(lambda: open_streams() == 0)
    # Completion (client streaming), twice the limit in a row: nothing leaks.
    for _ in range(4):
        reply = stub.CollectEcho(
            iter([echo_pb2.EchoRequest(session_id="s-alice")]), metadata=bearer("alice")
        )
        assert reply.caller == "alice"
    wait_until(lambda: open_streams() == 0)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_streams_per_principal": 0},
        {"max_concurrent_streams": 0},
        {"owner_lookup_workers": 0},
    ],
)
def test_stream_limits_are_validated(limits: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError):
        config(**limits)


class HeldWatch:
    """An anonymous health Watch stream (a bypassed method), kept open."""

    def __init__(self, channel: grpc.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)

    def first(self) -> Any:
        return next(self.call)

    def end(self) -> None:
        self.call.cancel()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_anonymous_streams_of_bypassed_methods_are_bounded(kind: str, start: Any) -> None:
    # Health Watch needs no token; each open Watch holds a worker thread (sync)
    # or a task (aio). All of them count as one anonymous caller.
    server = start(kind, config(max_streams_per_principal=3))
    held = [HeldWatch(server.channel) for _ in range(3)]
    try:
        for watch in held:
            assert watch.first().status == health_pb2.HealthCheckResponse.SERVING
        assert server.interceptor.open_streams() == 3
        extra = HeldWatch(server.channel)
        with pytest.raises(grpc.RpcError) as err:
            extra.first()
        assert (err.value.code(), err.value.details()) == EXHAUSTED
        extra.end()
        # Unary health checks are never counted; callers with a token keep
        # their own share.
        check = health_pb2_grpc.HealthStub(server.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        alice = HeldStream(server.stub, "alice")
        assert alice.first().caller == "alice"
        held_alice = alice
    finally:
        for watch in held:
            watch.end()
    held_alice.end()
    wait_until(lambda: server.interceptor.open_streams() == 0)
    again = HeldWatch(server.channel)
    assert again.first().status == health_pb2.HealthCheckResponse.SERVING
    again.end()
    wait_until(lambda: server.interceptor.open_streams() == 0)
    assert server.interceptor.metrics.snapshot().denied["too_many_streams"] == 1
