"""The pure policy core: classification, ownership, bypass, status mapping, metrics."""

from __future__ import annotations

import threading
from types import MappingProxyType

import grpc
import pytest

from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.errors import TokenRejectedError
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.server.engine import rejection_status
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import (
    ALLOW_AUTHENTICATED,
    DENY,
    SESSION_SERVICE_RULES,
    Access,
    CallerClassifier,
    MethodRule,
    OwnershipPolicy,
    bypass_services,
    default_bypass,
    owner_access,
    rule_session_id,
    session_access,
)

CP = "https://cp.test"
K8S = "https://kubernetes.default.svc.cluster.local"


def user(name: str, issuer: str | None = "https://idp.test", **claims: object) -> Principal:
    return Principal(name, CallerKind.USER, issuer=issuer, claims=MappingProxyType(dict(claims)))


IDP = "https://idp.test"
CLASSIFIER = CallerClassifier(
    service_accounts=frozenset({(IDP, "svc-backend")}),
    service_account_patterns=((IDP, "system:serviceaccount:*:session-*-sa"),),
    control_plane_issuers=frozenset({CP}),
)


def test_plain_user_stays_a_user() -> None:
    p = CLASSIFIER.classify(user("alice"))
    assert p.kind is CallerKind.USER
    assert p.session_scope is None


def test_static_service_principal_is_kept() -> None:
    svc = Principal("ambient-api-token", CallerKind.SERVICE)
    assert CLASSIFIER.classify(svc) is svc


def test_grpc_service_account_username() -> None:
    p = CLASSIFIER.classify(user("svc-backend"))
    assert p.kind is CallerKind.SERVICE
    assert p.session_scope is None


@pytest.mark.parametrize(
    ("subject", "service"),
    [
        ("system:serviceaccount:ambient:session-42-sa", True),
        ("system:serviceaccount:other-ns:session-x-sa", True),
        ("system:serviceaccount:ambient:session-42-sa-evil", False),
        ("System:serviceaccount:ambient:session-42-sa", False),  # case-sensitive
        ("system:serviceaccount:ambient:builder", False),
    ],
)
def test_service_account_patterns(subject: str, service: bool) -> None:
    assert CLASSIFIER.classify(user(subject)).is_service is service


def test_patterns_restricted_to_issuers() -> None:
    classifier = CallerClassifier(service_account_patterns=((K8S, "system:serviceaccount:*:*"),))
    subject = "system:serviceaccount:ns:sa"
    assert classifier.classify(user(subject, issuer=K8S)).is_service
    assert not classifier.classify(user(subject, issuer="https://idp.test")).is_service


def test_runner_token_from_control_plane_is_scoped() -> None:
    p = CLASSIFIER.classify(
        user("runner", issuer=CP, **{TOKEN_USE_CLAIM: RUNNER_TOKEN_USE, SESSION_ID_CLAIM: "s1"})
    )
    assert p.kind is CallerKind.SERVICE
    assert p.session_scope == "s1"


def test_runner_scope_wins_over_service_username() -> None:
    p = CLASSIFIER.classify(
        user(
            "svc-backend", issuer=CP, **{TOKEN_USE_CLAIM: RUNNER_TOKEN_USE, SESSION_ID_CLAIM: "s1"}
        )
    )
    assert p.session_scope == "s1"


@pytest.mark.parametrize("session_id", [None, "", 42, "x" * 257])
def test_runner_token_without_usable_session_is_rejected(session_id: object) -> None:
    claims: dict[str, object] = {TOKEN_USE_CLAIM: RUNNER_TOKEN_USE}
    if session_id is not None:
        claims[SESSION_ID_CLAIM] = session_id
    with pytest.raises(TokenRejectedError) as err:
        CLASSIFIER.classify(user("runner", issuer=CP, **claims))
    assert err.value.reason == "runner_without_session"
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_runner_claims_from_other_issuer_are_ignored() -> None:
    p = CLASSIFIER.classify(
        user("mallory", **{TOKEN_USE_CLAIM: RUNNER_TOKEN_USE, SESSION_ID_CLAIM: "s1"})
    )
    assert p.kind is CallerKind.USER
    assert p.session_scope is None


def test_session_access_decisions() -> None:
    alice = user("alice")
    service = Principal("svc", CallerKind.SERVICE)
    scoped = Principal("runner", CallerKind.SERVICE, session_scope="s1")
    assert session_access(service, "anything") is Access.ALLOW
    assert session_access(scoped, "s1") is Access.ALLOW
    assert session_access(scoped, "s2") == "out_of_scope"
    assert session_access(alice, "s1") is Access.NEEDS_OWNER
    for bad in (None, "", 7, b"s1", "x" * 257):
        assert session_access(alice, bad) == "missing_session_id"
        assert session_access(service, bad) == "missing_session_id"


def test_owner_access() -> None:
    alice = user("alice")
    assert owner_access(alice, "alice", IDP) is None
    assert owner_access(alice, "bob", IDP) == "not_owner"
    assert owner_access(alice, None, IDP) == "no_such_session"
    assert owner_access(alice, "Alice", IDP) == "not_owner"


def test_default_session_service_rules() -> None:
    policy = OwnershipPolicy()
    svc = "/ambient.v1.SessionService/"
    assert policy.rule_for(svc + "GetSession") == MethodRule.session("id")
    assert policy.rule_for(svc + "PushSessionMessage").session_field == "session_id"
    assert policy.rule_for(svc + "WatchSessionMessages").session_field == "session_id"
    assert policy.rule_for(svc + "CreateSession") is ALLOW_AUTHENTICATED
    assert policy.rule_for("/other.Service/Method") is ALLOW_AUTHENTICATED
    assert dict(policy.rules) == dict(SESSION_SERVICE_RULES)


def test_default_deny_and_extra_rules() -> None:
    policy = OwnershipPolicy(default=DENY).with_rules({"/x.Y/Z": MethodRule.session("sid")})
    assert policy.rule_for("/unknown.S/M").deny
    assert policy.rule_for("/x.Y/Z").session_field == "sid"
    with pytest.raises(ValueError):
        MethodRule.session("")


def test_rule_session_id_reads_the_field() -> None:
    class Req:
        session_id = "s9"

    assert rule_session_id(MethodRule.session("session_id"), Req()) == "s9"
    assert rule_session_id(MethodRule.session("missing"), Req()) is None
    assert rule_session_id(ALLOW_AUTHENTICATED, Req()) is None


@pytest.mark.parametrize(
    ("method", "bypassed"),
    [
        ("/grpc.health.v1.Health/Check", True),
        ("/grpc.health.v1.Health/Watch", True),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", True),
        ("/grpc.health.v1.HealthX/Check", False),
        ("/ambient.v1.SessionService/GetSession", False),
        ("grpc.health.v1.Health/Check", False),
        ("", False),
        ("/", False),
    ],
)
def test_default_bypass(method: str, bypassed: bool) -> None:
    assert default_bypass(method) is bypassed


def test_custom_bypass() -> None:
    selector = bypass_services(["my.Public"])
    assert selector("/my.Public/Anything")
    assert not selector("/grpc.health.v1.Health/Check")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            TokenRejectedError("missing"),
            (grpc.StatusCode.UNAUTHENTICATED, "authentication required"),
        ),
        (TokenRejectedError("expired"), (grpc.StatusCode.UNAUTHENTICATED, "invalid credentials")),
        (
            TokenRejectedError("not_owner", grpc.StatusCode.PERMISSION_DENIED),
            (grpc.StatusCode.PERMISSION_DENIED, "permission denied"),
        ),
        (
            TokenRejectedError("keys_unavailable", grpc.StatusCode.UNAVAILABLE),
            (grpc.StatusCode.UNAVAILABLE, "authentication temporarily unavailable"),
        ),
        (
            TokenRejectedError("weird", grpc.StatusCode.INTERNAL),
            (grpc.StatusCode.UNAUTHENTICATED, "invalid credentials"),
        ),
    ],
)
def test_rejection_status(error: TokenRejectedError, expected: tuple[grpc.StatusCode, str]) -> None:
    assert rejection_status(error) == expected


def test_metrics_are_thread_safe() -> None:
    metrics = AuthMetrics()

    def work() -> None:
        for _ in range(2000):
            metrics.allowed()
            metrics.denied("expired")
            metrics.cache(True)
            metrics.cache(False)
            metrics.jwks_fetch(False)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = metrics.snapshot()
    assert snap.allowed == 8000
    assert snap.denied == {"expired": 8000}
    assert snap.denied_total == 8000
    assert (snap.cache_hits, snap.cache_misses) == (8000, 8000)
    assert (snap.jwks_fetches, snap.jwks_fetch_failures) == (8000, 8000)
