"""ServerAuthConfig.from_env and the decision core, plus end-to-end checks of
failure paths (owner lookup errors, JWKS outages) on sync and aio servers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from support.keys import jwk_of, signing_key
from support.server import (
    AUDIENCE,
    CP_ISSUER,
    ECHO,
    IDP_ISSUER,
    IDP_KID,
    JwksServer,
    Recorder,
    RunningServer,
    mint,
    start_echo,
)

from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.principal import Principal
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.authn import (
    AuthenticatorChain,
    JwtAuthenticator,
    StaticTokenAuthenticator,
    TrustedIssuer,
)
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.engine import Admission, AuthEngine, Denial, Verification
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import JwksCache, StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import MethodRule, OwnershipPolicy
from ambient_grpc_auth.testing import FakeClock


def idp(keys: Any = None, **kw: Any) -> TrustedIssuer:
    if keys is None:
        keys = StaticKeySet(keys=[VerificationKey(kid=IDP_KID, key=signing_key().public_key())])
    return TrustedIssuer(
        issuer=kw.pop("issuer", IDP_ISSUER), audiences=(AUDIENCE,), keys=keys, **kw
    )


# --- from_env ----------------------------------------------------------------------


def test_from_env_needs_something_to_authenticate_with() -> None:
    with pytest.raises(ConfigurationError) as err:
        ServerAuthConfig.from_env(environ={"AMBIENT_API_TOKEN": "   "})
    assert "AMBIENT_API_TOKEN" in str(err.value)


def test_from_env_static_token_only() -> None:
    config = ServerAuthConfig.from_env(environ={"AMBIENT_API_TOKEN": " tok-123456789 \n"})
    assert isinstance(config.authenticator, StaticTokenAuthenticator)
    assert config.authenticator.authenticate("tok-123456789").username == "ambient-api-token"
    assert config.classifier.service_accounts == frozenset()
    assert config.default_owner_issuer is None
    assert config.token_cache is not None
    # A service-account name with no issuer that may assert it is refused.
    with pytest.raises(ConfigurationError) as err:
        ServerAuthConfig.from_env(
            environ={"AMBIENT_API_TOKEN": "tok-123456789", "GRPC_SERVICE_ACCOUNT": " svc \n"}
        )
    assert "GRPC_SERVICE_ACCOUNT_ISSUER" in str(err.value)


def test_from_env_chain_and_control_plane_issuers() -> None:
    config = ServerAuthConfig.from_env(
        environ={"AMBIENT_API_TOKEN": "tok-123456789"},
        issuers=[idp(), idp(issuer=CP_ISSUER, control_plane=True)],
        static_username="platform",
    )
    assert isinstance(config.authenticator, AuthenticatorChain)
    assert config.classifier.control_plane_issuers == frozenset({CP_ISSUER})
    assert config.classifier.service_accounts == frozenset()
    assert config.default_owner_issuer == IDP_ISSUER
    assert config.authenticator.authenticate("tok-123456789").username == "platform"


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIENT_API_TOKEN", "env-token-abcdef")
    monkeypatch.delenv("GRPC_SERVICE_ACCOUNT", raising=False)
    interceptor = ServerAuthInterceptor.from_env()
    assert interceptor.config.authenticator.authenticate("env-token-abcdef").is_service
    assert AioServerAuthInterceptor.from_env().config.classifier.service_accounts == frozenset()


# --- the decision core -------------------------------------------------------------


class Exploding:
    def authenticate(self, token: str) -> Principal:
        raise RuntimeError(f"bug while handling {token}")

    async def authenticate_async(self, token: str) -> Principal:
        raise RuntimeError(f"bug while handling {token}")


def _verification(engine: AuthEngine, md: Any) -> Verification:
    decision = engine.admit(ECHO + "Echo", md, object())
    assert isinstance(decision, Verification)
    return decision


def test_unexpected_authenticator_errors_become_unauthenticated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = AuthMetrics()
    engine = AuthEngine(ServerAuthConfig(authenticator=Exploding(), metrics=metrics))
    token = "secret-token-value-123"
    md = (("authorization", f"Bearer {token}"),)
    caplog.set_level(logging.DEBUG)
    for attempt in (
        lambda: _verification(engine, md).verify(),
        lambda: asyncio.run(_verification(engine, md).verify_async()),
    ):
        decision = attempt()
        assert decision == Denial(grpc.StatusCode.UNAUTHENTICATED, "invalid credentials")
        assert token not in repr(decision)
    assert metrics.snapshot().denied == {"authenticator_error": 2}
    assert "RuntimeError" in caplog.text
    assert token not in caplog.text


def test_cache_disabled_verifies_every_time() -> None:
    clock = FakeClock()
    metrics = AuthMetrics()
    engine = AuthEngine(
        ServerAuthConfig(
            authenticator=JwtAuthenticator(issuers=[idp()], clock=clock),
            token_cache=None,
            metrics=metrics,
        )
    )
    md = (("authorization", "Bearer " + mint(clock.time())),)
    for _ in range(2):
        decision = _verification(engine, md).verify()
        assert isinstance(decision, Admission)
        assert decision.principal.username == "alice"
    snap = metrics.snapshot()
    assert (snap.cache_hits, snap.cache_misses) == (0, 0)


# --- end to end: failure paths on real servers ---------------------------------------

RULES = {ECHO + "Echo": MethodRule.session("session_id")}


def _start(kind: str, config: ServerAuthConfig) -> tuple[RunningServer, Recorder]:
    recorder = Recorder()
    return start_echo(kind, config, recorder), recorder


@pytest.fixture(params=["sync", "aio"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(kind: str) -> Iterator[Callable[[ServerAuthConfig], tuple[Any, Recorder]]]:
    running: list[tuple[RunningServer, grpc.Channel]] = []

    def start(config: ServerAuthConfig) -> tuple[Any, Recorder]:
        server, recorder = _start(kind, config)
        channel = grpc.insecure_channel(server.target)
        running.append((server, channel))
        return echo_pb2_grpc.EchoServiceStub(channel), recorder

    try:
        yield start
    finally:
        for server, channel in running:
            channel.close()
            server.stop()


def _status(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_owner_lookup_failure_is_unavailable(
    serve: Callable[[ServerAuthConfig], tuple[Any, Recorder]],
) -> None:
    clock = FakeClock()

    def broken_lookup(session_id: str) -> str | None:
        raise OSError("database is gone")

    metrics = AuthMetrics()
    stub, recorder = serve(
        ServerAuthConfig(
            authenticator=JwtAuthenticator(issuers=[idp()], clock=clock),
            ownership=OwnershipPolicy(rules=RULES),
            owner_lookup=broken_lookup,
            metrics=metrics,
        )
    )
    md = (("authorization", "Bearer " + mint(clock.time())),)
    code, details = _status(lambda: stub.Echo(echo_pb2.EchoRequest(session_id="s1"), metadata=md))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == "authentication temporarily unavailable"
    assert recorder.started == []
    assert metrics.snapshot().denied == {"owner_lookup_failed": 1}


def test_without_owner_lookup_users_are_denied_services_pass(
    serve: Callable[[ServerAuthConfig], tuple[Any, Recorder]],
) -> None:
    clock = FakeClock()
    stub, recorder = serve(
        ServerAuthConfig(
            authenticator=AuthenticatorChain(
                authenticators=[
                    StaticTokenAuthenticator(token="svc-token-123456"),
                    JwtAuthenticator(issuers=[idp()], clock=clock),
                ]
            ),
            ownership=OwnershipPolicy(rules=RULES),
        )
    )
    user = (("authorization", "Bearer " + mint(clock.time())),)
    request = echo_pb2.EchoRequest(session_id="s1")
    assert (
        _status(lambda: stub.Echo(request, metadata=user))[0] == grpc.StatusCode.PERMISSION_DENIED
    )
    reply = stub.Echo(request, metadata=(("authorization", "Bearer svc-token-123456"),))
    assert reply.caller == "ambient-api-token"
    assert recorder.started == ["Echo"]


def test_inline_owner_lookup(serve: Callable[[ServerAuthConfig], tuple[Any, Recorder]]) -> None:
    clock = FakeClock()
    stub, _ = serve(
        ServerAuthConfig(
            authenticator=JwtAuthenticator(issuers=[idp()], clock=clock),
            ownership=OwnershipPolicy(rules=RULES),
            owner_lookup={"s1": "alice"}.get,
            default_owner_issuer=IDP_ISSUER,
            owner_lookup_inline=True,
        )
    )
    md = (("authorization", "Bearer " + mint(clock.time())),)
    assert stub.Echo(echo_pb2.EchoRequest(session_id="s1"), metadata=md).caller == "alice"
    code = _status(lambda: stub.Echo(echo_pb2.EchoRequest(session_id="s2"), metadata=md))[0]
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_jwks_issuer_end_to_end(serve: Callable[[ServerAuthConfig], tuple[Any, Recorder]]) -> None:
    """Keys fetched from a local JWKS endpoint (in a worker thread for aio);
    with the endpoint unreachable before any success, calls are UNAVAILABLE."""
    clock = FakeClock()
    jwks = JwksServer({"keys": [jwk_of(signing_key(), "k1")]})
    try:
        jwks.status = 503
        metrics = AuthMetrics()
        cache = JwksCache(jwks.url, clock=clock, metrics=metrics)
        stub, recorder = serve(
            ServerAuthConfig(
                authenticator=JwtAuthenticator(issuers=[idp(keys=cache)], clock=clock),
                ownership=OwnershipPolicy(rules={}),
                metrics=metrics,
            )
        )
        md = (("authorization", "Bearer " + mint(clock.time(), kid="k1")),)
        code, details = _status(lambda: stub.Echo(echo_pb2.EchoRequest(), metadata=md))
        assert (code, details) == (
            grpc.StatusCode.UNAVAILABLE,
            "authentication temporarily unavailable",
        )
        assert recorder.started == []
        jwks.status = 200
        clock.advance(30)
        assert stub.Echo(echo_pb2.EchoRequest(), metadata=md).caller == "alice"
        assert stub.Echo(echo_pb2.EchoRequest(), metadata=md).caller == "alice"
        snap = metrics.snapshot()
        assert (snap.jwks_fetches, snap.jwks_fetch_failures) == (2, 1)
        assert snap.denied == {"keys_unavailable": 1}
        assert jwks.requests == 2
    finally:
        jwks.close()
