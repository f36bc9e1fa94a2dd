"""The interceptor contract, for every RPC shape, on real servers.

Each scenario runs against four servers on 127.0.0.1:0: sync grpc; grpc.aio
with coroutine / async-generator handlers; grpc.aio with reader/writer
handlers; grpc.aio with plain sync handlers. Rejected calls must never start
the handler; details must be generic and free of token material.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.keys import other_key, signing_key
from support.server import (
    CP_ISSUER,
    CP_KID,
    ECHO,
    ECHO_METHODS,
    IDP_ISSUER,
    IDP_KID,
    OWNERS,
    SERVICE_ACCOUNT,
    STATIC_TOKEN,
    Recorder,
    RunningServer,
    alg_none_token,
    hs256_with_public_pem,
    mint,
    runner_token,
    start_echo,
)

from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import MethodRule, OwnershipPolicy
from ambient_grpc_auth.testing import FakeClock

KINDS = ("sync", "aio", "aio-rw", "aio-sync")
SA_PATTERN = "system:serviceaccount:*:session-*-sa"
GENERIC_DETAILS = {"authentication required", "invalid credentials", "permission denied"}
SHAPES = ("unary", "server_stream", "client_stream", "bidi")
OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def build_config(clock: FakeClock, metrics: AuthMetrics) -> ServerAuthConfig:
    key = signing_key().public_key()
    idp = TrustedIssuer(
        issuer=IDP_ISSUER,
        audiences=("ambient-api",),
        keys=StaticKeySet(keys=[VerificationKey(kid=IDP_KID, key=key)]),
    )
    cp = TrustedIssuer(
        issuer=CP_ISSUER,
        audiences=("ambient-api",),
        keys=StaticKeySet(keys=[VerificationKey(kid=CP_KID, key=key)]),
        control_plane=True,
    )
    rules = {ECHO + name: MethodRule.session("session_id") for name in ECHO_METHODS}
    return ServerAuthConfig.from_env(
        environ={
            "AMBIENT_API_TOKEN": STATIC_TOKEN,
            "GRPC_SERVICE_ACCOUNT": SERVICE_ACCOUNT,
            "GRPC_SERVICE_ACCOUNT_ISSUER": IDP_ISSUER,
        },
        issuers=[idp, cp],
        service_account_patterns=[(IDP_ISSUER, SA_PATTERN)],
        ownership=OwnershipPolicy(rules=rules),
        owner_lookup=OWNERS.get,
        metrics=metrics,
        clock=clock,
    )


@dataclasses.dataclass
class Harness:
    kind: str
    clock: FakeClock
    metrics: AuthMetrics
    recorder: Recorder
    server: RunningServer
    channel: grpc.Channel
    stub: echo_pb2_grpc.EchoServiceStub


@pytest.fixture(scope="module", params=KINDS)
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    kind: str = request.param
    clock, metrics, recorder = FakeClock(), AuthMetrics(), Recorder()
    server = start_echo(kind, build_config(clock, metrics), recorder)
    channel = grpc.insecure_channel(server.target)
    try:
        yield Harness(
            kind, clock, metrics, recorder, server, channel, echo_pb2_grpc.EchoServiceStub(channel)
        )
    finally:
        channel.close()
        server.stop()


@pytest.fixture
def h(harness: Harness, caplog: pytest.LogCaptureFixture) -> Harness:
    harness.recorder.clear()
    caplog.set_level(logging.INFO, logger="ambient_grpc_auth")
    return harness


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    callers: list[str]


def call(
    h: Harness, shape: str, metadata: tuple[tuple[str, str], ...], session_ids: list[str]
) -> Outcome:
    requests = [echo_pb2.EchoRequest(session_id=s, text="hi", count=2) for s in session_ids]
    md = metadata or None
    try:
        if shape == "unary":
            responses = [h.stub.Echo(requests[0], metadata=md, timeout=10)]
        elif shape == "server_stream":
            responses = list(h.stub.StreamEcho(requests[0], metadata=md, timeout=10))
        elif shape == "client_stream":
            responses = [h.stub.CollectEcho(iter(requests), metadata=md, timeout=10)]
        else:
            responses = list(h.stub.ChatEcho(iter(requests), metadata=md, timeout=10))
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", [])
    return Outcome(OK, "", [r.caller for r in responses])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + token),)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    metadata: Callable[[float], tuple[tuple[str, str], ...]]
    session: str
    code: grpc.StatusCode
    caller: str = ""
    reason: str | None = None


def tok(factory: Callable[[float], str]) -> Callable[[float], tuple[tuple[str, str], ...]]:
    return lambda now: bearer(factory(now))


def raw(value: str) -> Callable[[float], tuple[tuple[str, str], ...]]:
    return lambda now: (("authorization", value),)


def S(  # noqa: N802 (a table constructor)
    name: str,
    md: Callable[[float], tuple[tuple[str, str], ...]],
    session: str,
    code: grpc.StatusCode,
    reason: str | None = None,
    caller: str = "",
) -> Scenario:
    return Scenario(name, md, session, code, caller, reason)


A, B, U = "s-alice", "s-bob", UNAUTH
SA = "system:serviceaccount:ambient:session-7-sa"
SCENARIOS = [
    S("no-token", lambda now: (), A, U, "missing"),
    S("basic-scheme", raw("Basic YWxpY2U6cHc="), A, U, "malformed"),
    S("scheme-only", raw("Bearer"), A, U, "malformed"),
    S("empty-token", raw("Bearer "), A, U),
    S("two-values", lambda n: bearer(mint(n)) + bearer(mint(n, sub="bob")), A, U, "duplicate"),
    S("oversized", raw("Bearer " + "a" * (16 * 1024 + 1)), A, U, "oversized"),
    S("not-a-jwt", raw("Bearer opaque-garbage-token"), A, U),
    S("expired", tok(lambda n: mint(n - 4000, ttl=600)), A, U, "expired"),
    S("not-yet-valid", tok(lambda n: mint(n, nbf=int(n) + 600)), A, U, "not_yet_valid"),
    S("issued-in-future", tok(lambda n: mint(n, iat=int(n) + 600)), A, U, "not_yet_valid"),
    S("no-exp", tok(lambda n: mint(n, omit=("exp",))), A, U, "missing_claim"),
    S("bad-signature", tok(lambda n: mint(n, key=other_key())), A, U, "bad_signature"),
    S("wrong-issuer", tok(lambda n: mint(n, iss="https://evil.test")), A, U),
    S("wrong-audience", tok(lambda n: mint(n, aud="someone-else")), A, U, "wrong_audience"),
    S("alg-none", tok(alg_none_token), A, U, "alg_not_allowed"),
    S("hs256-public-pem", tok(hs256_with_public_pem), A, U, "alg_not_allowed"),
    S("unknown-kid", tok(lambda n: mint(n, kid="unknown")), A, U, "unknown_kid"),
    S("owner", tok(mint), A, OK, caller="alice"),
    S("owner-lowercase-scheme", lambda n: raw("bearer " + mint(n))(n), A, OK, caller="alice"),
    S("expired-within-leeway", tok(lambda n: mint(n - 620, ttl=600)), A, OK, caller="alice"),
    S("non-owner", tok(mint), B, DENIED, "not_owner"),
    S("nonexistent-session", tok(mint), "s-missing", DENIED, "no_such_session"),
    S("ownerless-session", tok(mint), "s-ownerless", DENIED, "no_such_session"),
    S("empty-session-id", tok(mint), "", DENIED, "missing_session_id"),
    S("static-service-token", raw("Bearer " + STATIC_TOKEN), B, OK, caller="ambient-api-token"),
    S("static-token-prefix", raw("Bearer " + STATIC_TOKEN[:-1]), B, U),
    S(
        "grpc-service-account",
        tok(lambda n: mint(n, sub=SERVICE_ACCOUNT)),
        B,
        OK,
        caller=SERVICE_ACCOUNT,
    ),
    S("sa-pattern", tok(lambda n: mint(n, sub=SA)), B, OK, caller=SA),
    S("sa-pattern-miss", tok(lambda n: mint(n, sub=SA[:-3])), B, DENIED, "not_owner"),
    S("runner-own-session", tok(lambda n: runner_token(n, B)), B, OK, caller="runner:s-bob"),
    S("runner-other-session", tok(lambda n: runner_token(n, B)), A, DENIED, "out_of_scope"),
    S(
        "runner-without-session",
        tok(lambda n: runner_token(n, None)),
        B,
        U,
        "runner_without_session",
    ),
    S(
        "runner-claims-from-user-idp",
        tok(lambda n: runner_token(n, B, iss=IDP_ISSUER, kid=IDP_KID, sub="mallory")),
        B,
        DENIED,
        "not_owner",
    ),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_contract(
    h: Harness, scenario: Scenario, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    metadata = scenario.metadata(h.clock.time())
    before = h.metrics.snapshot()
    outcome = call(h, shape, metadata, [scenario.session, scenario.session])
    assert outcome.code == scenario.code, (outcome.code, outcome.details)
    if scenario.code is OK:
        expected_count = 2
        assert outcome.callers == [scenario.caller] * (
            1 if shape in ("unary", "client_stream") else expected_count
        )
        assert h.recorder.started == [_method(shape)]
        return
    # Rejected: the handler never started (unary requests) or never saw the
    # offending message (streaming requests are checked per message).
    assert h.recorder.started == []
    assert h.recorder.seen == []
    assert outcome.details in GENERIC_DETAILS
    for _key, value in metadata:
        token = value.partition(" ")[2]
        if len(token) >= 8:
            assert token not in outcome.details
            assert token not in caplog.text
    if scenario.reason is not None:
        after = h.metrics.snapshot()
        assert after.denied.get(scenario.reason, 0) == before.denied.get(scenario.reason, 0) + 1


def _method(shape: str) -> str:
    return dict(zip(SHAPES, ECHO_METHODS, strict=True))[shape]


@pytest.mark.parametrize("shape", ["client_stream", "bidi"])
def test_stream_requests_checked_per_message(h: Harness, shape: str) -> None:
    """The first message is alice's own session, the second is bob's: the call
    fails with PERMISSION_DENIED and the handler never sees the second one."""
    outcome = call(h, shape, bearer(mint(h.clock.time())), ["s-alice", "s-bob", "s-alice"])
    assert outcome.code == DENIED
    assert outcome.details == "permission denied"
    assert h.recorder.seen == ["s-alice"]


def test_health_needs_no_token(h: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(h.channel)
    before = h.metrics.snapshot().bypassed
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert h.metrics.snapshot().bypassed == before + 2


def test_unknown_method_reveals_nothing_without_credentials(h: Harness) -> None:
    raw = h.channel.unary_unary(ECHO + "Nope")
    with pytest.raises(grpc.RpcError) as anonymous:
        raw(b"", timeout=5)
    assert anonymous.value.code() == UNAUTH
    with pytest.raises(grpc.RpcError) as authenticated:
        raw(b"", metadata=bearer(mint(h.clock.time())), timeout=5)
    assert authenticated.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_verified_tokens_are_cached_until_exp(h: Harness) -> None:
    token = mint(h.clock.time(), ttl=60)
    before = h.metrics.snapshot()
    for _ in range(3):
        assert call(h, "unary", bearer(token), ["s-alice"]).code == OK
    after = h.metrics.snapshot()
    assert after.cache_misses - before.cache_misses == 1
    assert after.cache_hits - before.cache_hits == 2
    # Past exp the cache entry is gone and verification rejects (leeway 30 s).
    h.clock.advance(60 + 31)
    try:
        outcome = call(h, "unary", bearer(token), ["s-alice"])
    finally:
        h.clock.advance(-(60 + 31))
    assert outcome.code == UNAUTH
    assert h.metrics.snapshot().cache_misses - after.cache_misses == 1
