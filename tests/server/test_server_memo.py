"""The server interceptors' per-call shortcuts: the per-method plan, the
remembered admissions (with their wrapped handlers) and the bound request
check. None of them may change a decision:
each call is still counted, ownership is still looked up on every call, and a
token that left the verified-token cache gets a freshly built handler."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.keys import signing_key
from support.server import (
    AUDIENCE,
    ECHO,
    IDP_ISSUER,
    IDP_KID,
    Recorder,
    mint,
    start_echo,
)

from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server import engine as serverengine
from ambient_grpc_auth.server.authn import JwtAuthenticator, TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.engine import Admission, AuthEngine, Verification
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import MethodRule, OwnershipPolicy
from ambient_grpc_auth.server.tokencache import VerifiedTokenCache
from ambient_grpc_auth.testing import FakeClock

RULE = MethodRule.session("session_id")
METHODS = {ECHO + name: RULE for name in ("Echo", "StreamEcho", "CollectEcho", "ChatEcho")}


def _config(
    clock: FakeClock,
    owners: dict[str, str],
    *,
    metrics: AuthMetrics | None = None,
    inline: bool = False,
    max_ttl: float = 300.0,
) -> ServerAuthConfig:
    issuer = TrustedIssuer(
        issuer=IDP_ISSUER,
        audiences=(AUDIENCE,),
        keys=StaticKeySet(keys=[VerificationKey(kid=IDP_KID, key=signing_key().public_key())]),
    )
    return ServerAuthConfig(
        authenticator=JwtAuthenticator(issuers=[issuer], clock=clock),
        ownership=OwnershipPolicy().with_rules(METHODS),
        owner_lookup=lambda session_id: owners.get(session_id),
        default_owner_issuer=IDP_ISSUER,
        owner_lookup_inline=inline,
        metrics=metrics or AuthMetrics(),
        token_cache=VerifiedTokenCache(clock=clock, max_ttl=max_ttl),
    )


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, token: str) -> None:
        self.method = method
        self.invocation_metadata = (("authorization", "Bearer " + token),)


def _handler() -> Any:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


class _Aborted(Exception):
    pass


class _Context:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code)


def _verify_first(interceptor: ServerAuthInterceptor, token: str) -> None:
    """The sync interceptor verifies a token the cache does not know in the
    handler it returns (on a worker thread, never on gRPC's polling thread):
    run that handler once, as the server would, so the token is verified and
    cached."""
    served = interceptor.intercept_service(lambda _d: _handler(), _Details(ECHO + "Echo", token))
    assert served is not None
    with contextlib.suppress(_Aborted):  # the session check refuses the empty request
        served.unary_unary(types.SimpleNamespace(session_id=""), _Context())


# --- white box: what is reused and what is not -------------------------------------------


def test_one_wrapper_per_token_and_method() -> None:
    clock = FakeClock()
    interceptor = ServerAuthInterceptor(config=_config(clock, {}))
    alice, bob = mint(clock.time(), sub="alice"), mint(clock.time(), sub="bob")
    _verify_first(interceptor, alice)
    _verify_first(interceptor, bob)
    handler = _handler()

    def intercept(method: str, token: str, served: Any = handler) -> Any:
        return interceptor.intercept_service(lambda _details: served, _Details(method, token))

    first = intercept(ECHO + "Echo", alice)
    assert intercept(ECHO + "Echo", alice) is first
    assert intercept(ECHO + "StreamEcho", alice) is not first
    assert intercept(ECHO + "Echo", bob) is not first
    # A service whose handler object changed gets a wrapper of the new one.
    other = _handler()
    assert intercept(ECHO + "Echo", alice, other) is not first


def test_a_token_verified_again_gets_a_new_wrapper() -> None:
    clock = FakeClock()
    interceptor = ServerAuthInterceptor(config=_config(clock, {}, max_ttl=10.0))
    token = mint(clock.time(), sub="alice", ttl=600)
    handler = _handler()
    details = _Details(ECHO + "Echo", token)
    _verify_first(interceptor, token)
    first = interceptor.intercept_service(lambda _d: handler, details)
    assert interceptor.intercept_service(lambda _d: handler, details) is first
    clock.advance(11.0)  # the cache entry is gone; the token is verified again
    _verify_first(interceptor, token)
    second = interceptor.intercept_service(lambda _d: handler, details)
    assert second is not first
    assert interceptor.intercept_service(lambda _d: handler, details) is second


def test_an_expired_token_is_refused_even_with_a_wrapper_remembered() -> None:
    clock = FakeClock()
    metrics = AuthMetrics()
    interceptor = ServerAuthInterceptor(config=_config(clock, {}, metrics=metrics))
    token = mint(clock.time(), sub="alice", ttl=60)
    handler = _handler()
    details = _Details(ECHO + "Echo", token)
    interceptor.intercept_service(lambda _d: handler, details)
    clock.advance(61.0 + 30.0)  # past exp and the default leeway
    refused = interceptor.intercept_service(lambda _d: handler, details)
    context = _AbortingContext()
    with pytest.raises(_Aborted):
        refused.unary_unary(object(), context)
    assert context.code is grpc.StatusCode.UNAUTHENTICATED
    assert metrics.snapshot().denied == {"expired": 1}


class _Aborted(Exception):
    pass


class _AbortingContext:
    code: grpc.StatusCode | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise _Aborted(details)


def test_the_memo_and_the_plans_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serverengine, "MAX_MEMO_ENTRIES", 8)
    monkeypatch.setattr(serverengine, "MAX_PLANNED_METHODS", 16)
    clock = FakeClock()
    interceptor = ServerAuthInterceptor(config=_config(clock, {}))
    engine: AuthEngine = interceptor._engine
    handler = _handler()
    for index in range(30):
        token = mint(clock.time(), sub=f"user-{index}")
        _verify_first(interceptor, token)
        interceptor.intercept_service(lambda _d: handler, _Details(ECHO + "Echo", token))
        assert len(engine._memo) <= 8
    token = mint(clock.time(), sub="alice")
    _verify_first(interceptor, token)
    for index in range(100):
        method = f"/made.up.Service{index}/Method"
        assert interceptor.intercept_service(lambda _d: None, _Details(method, token)) is None
        assert len(engine._plans) <= 16
    # Past the bound, decisions are computed per call and are still right.
    health = "/grpc.health.v1.Health/Check"
    assert engine.plan(health) == (True, OwnershipPolicy().default)
    assert health not in engine._plans


# --- the bound check decides exactly as the full decision ----------------------------------

_SESSION_IDS = st.one_of(
    st.none(),
    st.integers(),
    st.sampled_from(["", "s-alice", "s-bob", "s-ghost", "x" * 256, "x" * 257, "s-raise"]),
    st.text(max_size=300),
)


def _principal(kind: str, scope: str | None) -> Principal:
    if kind == "user":
        return Principal("alice", CallerKind.USER)
    return Principal("svc", CallerKind.SERVICE, session_scope=scope)


class _LookupFailed(Exception):
    pass


def _lookup(session_id: str) -> str | None:
    if session_id == "s-raise":
        raise _LookupFailed(session_id)
    return {"s-alice": "alice", "s-bob": "bob", "x" * 256: "alice"}.get(session_id)


class _Fixed:
    """Authenticates every token as one given principal."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    def authenticate(self, token: str) -> Principal:
        return self.principal

    async def authenticate_async(self, token: str) -> Principal:
        return self.principal


def _admitted(engine: AuthEngine, method: str) -> Admission:
    decision = engine.admit(method, (("authorization", "Bearer any-token"),), _handler())
    admission = decision.verify() if isinstance(decision, Verification) else decision
    assert isinstance(admission, Admission)
    return admission


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["user", "service"]),
    scope=st.sampled_from([None, "s-alice", "s-bob"]),
    session_id=_SESSION_IDS,
    with_lookup=st.booleans(),
)
def test_the_bound_check_agrees_with_the_full_decision(
    kind: str, scope: str | None, session_id: object, with_lookup: bool
) -> None:
    config = ServerAuthConfig(
        authenticator=_Fixed(_principal(kind, scope)),
        ownership=OwnershipPolicy(rules={ECHO + "Echo": RULE}),
        owner_lookup=_lookup if with_lookup else None,
    )
    engine = AuthEngine(config)
    request = types.SimpleNamespace(session_id=session_id)
    admission = _admitted(engine, ECHO + "Echo")
    assert admission.check is not None
    expected = admission.decide(request)
    assert admission.check(request) == expected
    assert asyncio.run(admission.check_async(request)) == expected
    # A rule that reads nothing from requests has no request check at all.
    assert _admitted(engine, ECHO + "Other").check is None


# --- black box: real servers, sync and aio ----------------------------------------------


@pytest.fixture(params=["sync", "aio", "aio-inline"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def served(kind: str) -> Iterator[tuple[Any, dict[str, str], AuthMetrics, Recorder, FakeClock]]:
    clock = FakeClock()
    owners = {"s-alice": "alice", "s-bob": "bob"}
    metrics = AuthMetrics()
    recorder = Recorder()
    config = _config(clock, owners, metrics=metrics, inline=kind == "aio-inline")
    server = start_echo("sync" if kind == "sync" else "aio", config, recorder)
    with grpc.insecure_channel(server.target) as channel:
        yield echo_pb2_grpc.EchoServiceStub(channel), owners, metrics, recorder, clock
    server.stop()


def _as(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + token),)


def test_every_call_is_decided_and_counted(served: Any) -> None:
    stub, owners, metrics, recorder, clock = served
    alice, bob = _as(mint(clock.time(), sub="alice")), _as(mint(clock.time(), sub="bob"))
    request = echo_pb2.EchoRequest(session_id="s-alice", text="hi")
    for _ in range(3):
        assert stub.Echo(request, metadata=alice, timeout=10).caller == "alice"
        replies = list(stub.StreamEcho(request, metadata=alice, timeout=10))
        assert [r.caller for r in replies] == ["alice"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(request, metadata=bob, timeout=10)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    snap = metrics.snapshot()
    assert snap.allowed == 6
    assert snap.denied == {"not_owner": 3}
    assert snap.cache_misses == 2
    assert recorder.started == ["Echo", "StreamEcho"] * 3


def test_ownership_is_looked_up_on_every_call(served: Any) -> None:
    stub, owners, metrics, recorder, clock = served
    alice = _as(mint(clock.time(), sub="alice"))
    request = echo_pb2.EchoRequest(session_id="s-alice", text="hi")
    assert stub.Echo(request, metadata=alice, timeout=10).caller == "alice"
    owners["s-alice"] = "bob"  # the session changed hands
    with pytest.raises(grpc.RpcError) as err:
        stub.Echo(request, metadata=alice, timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    del owners["s-alice"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Echo(request, metadata=alice, timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    owners["s-alice"] = "alice"
    assert stub.Echo(request, metadata=alice, timeout=10).caller == "alice"
    assert metrics.snapshot().denied == {"not_owner": 1, "no_such_session": 1}
