"""The server pipeline on its own, without gRPC: ``AuthEngine.admit`` and the
request phase of the admission it returns (sync and async completions)."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest
from support.server import (
    AUDIENCE,
    CP_ISSUER,
    CP_KID,
    ECHO,
    IDP_ISSUER,
    IDP_KID,
    OWNERS,
    STATIC_TOKEN,
    mint,
    runner_token,
    signing_key,
)

from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.principal import CallerKind
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.engine import (
    Admission,
    AuthEngine,
    Decision,
    Denial,
    Pass,
    Verification,
)
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import DENY, MethodRule, OwnershipPolicy
from ambient_grpc_auth.testing import FakeClock

ECHO_CALL = ECHO + "Echo"
CLOSED = "/ambient.testing.v1.Closed/Call"
OPEN = "/ambient.testing.v1.Open/Call"
HEALTH = "/grpc.health.v1.Health/Check"

UNAUTH_MISSING = Denial(grpc.StatusCode.UNAUTHENTICATED, "authentication required")
UNAUTH_INVALID = Denial(grpc.StatusCode.UNAUTHENTICATED, "invalid credentials")
DENIED = Denial(grpc.StatusCode.PERMISSION_DENIED, "permission denied")
UNAVAILABLE = Denial(grpc.StatusCode.UNAVAILABLE, "authentication temporarily unavailable")

HANDLER = object()  # the engine only compares handlers by identity


class Lookups:
    """The owner lookup, counting its calls."""

    def __init__(self, owners: dict[str, str | None]) -> None:
        self.owners = owners
        self.calls: list[str] = []

    def __call__(self, session_id: str) -> str | None:
        self.calls.append(session_id)
        if session_id == "s-broken":
            raise OSError("store is down")
        return self.owners.get(session_id)


class Setup:
    def __init__(self, *, inline: bool = False) -> None:
        self.clock = FakeClock()
        self.metrics = AuthMetrics()
        self.lookup = Lookups(dict(OWNERS))
        key = signing_key().public_key()
        issuers = [
            TrustedIssuer(
                issuer=IDP_ISSUER,
                audiences=(AUDIENCE,),
                keys=_keys(IDP_KID, key),
            ),
            TrustedIssuer(
                issuer=CP_ISSUER,
                audiences=(AUDIENCE,),
                keys=_keys(CP_KID, key),
                control_plane=True,
            ),
        ]
        rules = {ECHO_CALL: MethodRule.session("session_id"), CLOSED: DENY}
        self.engine = AuthEngine(
            ServerAuthConfig.from_env(
                environ={"AMBIENT_API_TOKEN": STATIC_TOKEN},
                issuers=issuers,
                ownership=OwnershipPolicy(rules=rules),
                owner_lookup=self.lookup,
                owner_lookup_inline=inline,
                metrics=self.metrics,
                clock=self.clock,
            )
        )

    def user(self, name: str) -> Any:
        return bearer(mint(self.clock.time(), sub=name))

    def denied(self) -> dict[str, int]:
        return dict(self.metrics.snapshot().denied)


def _keys(kid: str, key: Any) -> StaticKeySet:
    return StaticKeySet(keys=[VerificationKey(kid=kid, key=key)])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + token),)


def request(session_id: object) -> Any:
    return types.SimpleNamespace(session_id=session_id)


Complete = Callable[[Verification], Decision]


def _sync(step: Verification) -> Decision:
    return step.verify()


def _async(step: Verification) -> Decision:
    return asyncio.run(step.verify_async())


@pytest.fixture(params=[_sync, _async], ids=["verify", "verify_async"])
def complete(request: pytest.FixtureRequest) -> Complete:
    return cast(Complete, request.param)


def admit(
    setup: Setup,
    complete: Complete,
    metadata: Any,
    method: str = ECHO_CALL,
    handler: object = HANDLER,
) -> Decision:
    decision = setup.engine.admit(method, metadata, handler)
    if isinstance(decision, Verification):
        decision = complete(decision)
        assert not isinstance(decision, Verification)
    return decision


def admitted(setup: Setup, complete: Complete, metadata: Any, method: str = ECHO_CALL) -> Admission:
    decision = admit(setup, complete, metadata, method)
    assert isinstance(decision, Admission), decision
    return decision


# --- phase 1: method and metadata --------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "expected", "reason"),
    [
        ((), UNAUTH_MISSING, "missing"),
        (None, UNAUTH_MISSING, "missing"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), UNAUTH_INVALID, "malformed"),
        ((("authorization", "Bearer "),), UNAUTH_INVALID, "malformed"),
        (
            (("authorization", "Bearer a"), ("authorization", "Bearer b")),
            UNAUTH_INVALID,
            "duplicate",
        ),
        ((("authorization", b"Bearer abc"),), UNAUTH_INVALID, "malformed"),
        ((("authorization", "Bearer " + "x" * 20_000),), UNAUTH_INVALID, "oversized"),
    ],
)
def test_a_missing_or_bad_bearer_is_refused_before_any_verification(
    metadata: Any, expected: Denial, reason: str
) -> None:
    setup = Setup()
    assert setup.engine.admit(ECHO_CALL, metadata, HANDLER) == expected
    assert setup.denied() == {reason: 1}
    # Unknown methods are refused the same way: existence is not revealed.
    assert setup.engine.admit("/no.Such/Method", metadata, None) == expected


def test_an_unknown_issuer_is_unauthenticated(complete: Complete) -> None:
    setup = Setup()
    token = mint(setup.clock.time(), iss="https://elsewhere.test")
    assert admit(setup, complete, bearer(token)) == UNAUTH_INVALID
    assert setup.denied() == {"unknown_issuer": 1}


def test_an_expired_token_is_unauthenticated(complete: Complete) -> None:
    setup = Setup()
    token = mint(setup.clock.time() - 3600, ttl=60)
    assert admit(setup, complete, bearer(token)) == UNAUTH_INVALID
    assert setup.denied() == {"expired": 1}


def test_a_bypassed_method_is_served_unchecked() -> None:
    setup = Setup()
    assert setup.engine.admit(HEALTH, None, HANDLER) is Pass.BYPASSED
    assert setup.engine.admit(HEALTH, (("authorization", "junk"),), HANDLER) is Pass.BYPASSED
    snap = setup.metrics.snapshot()
    assert (snap.bypassed, snap.denied_total, snap.cache_misses) == (2, 0, 0)


def test_an_unimplemented_method_passes_only_for_authenticated_callers(
    complete: Complete,
) -> None:
    setup = Setup()
    assert admit(setup, complete, setup.user("alice"), "/no.Such/Method", None) is (
        Pass.UNIMPLEMENTED
    )
    assert setup.engine.admit("/no.Such/Method", (), None) == UNAUTH_MISSING


def test_a_denying_rule_refuses_authenticated_callers(complete: Complete) -> None:
    setup = Setup()
    assert admit(setup, complete, bearer(STATIC_TOKEN), CLOSED) == DENIED
    assert setup.denied() == {"method_denied": 1}


def test_a_method_without_session_rule_has_no_request_phase(complete: Complete) -> None:
    setup = Setup()
    admission = admitted(setup, complete, setup.user("alice"), OPEN)
    assert admission.check is None
    assert asyncio.run(admission.check_async(request(None))) is None
    assert setup.lookup.calls == []


# --- caller kinds and the request phase --------------------------------------------------


def test_a_service_caller_may_act_on_any_session_without_a_lookup(complete: Complete) -> None:
    setup = Setup()
    admission = admitted(setup, complete, bearer(STATIC_TOKEN))
    assert admission.principal.kind is CallerKind.SERVICE
    assert admission.check is not None
    for session_id in ("s-alice", "s-bob", "s-ghost"):
        assert admission.check(request(session_id)) is None
        assert asyncio.run(admission.check_async(request(session_id))) is None
    assert admission.check(request("")) == DENIED
    assert setup.lookup.calls == []
    assert setup.denied() == {"missing_session_id": 1}


def test_a_runner_is_scoped_to_its_own_session(complete: Complete) -> None:
    setup = Setup()
    admission = admitted(setup, complete, bearer(runner_token(setup.clock.time(), "s-bob")))
    assert admission.principal.kind is CallerKind.SERVICE
    assert admission.principal.session_scope == "s-bob"
    assert admission.check is not None
    assert admission.check(request("s-bob")) is None
    assert admission.check(request("s-alice")) == DENIED
    assert asyncio.run(admission.check_async(request("s-alice"))) == DENIED
    assert setup.lookup.calls == []
    assert setup.denied() == {"out_of_scope": 2}


def test_a_runner_token_without_session_is_refused(complete: Complete) -> None:
    setup = Setup()
    assert admit(setup, complete, bearer(runner_token(setup.clock.time(), None))) == (
        UNAUTH_INVALID
    )
    assert setup.denied() == {"runner_without_session": 1}


@pytest.mark.parametrize("inline", [False, True])
def test_only_the_owner_passes(complete: Complete, inline: bool) -> None:
    setup = Setup(inline=inline)
    alice = admitted(setup, complete, setup.user("alice"))
    bob = admitted(setup, complete, setup.user("bob"))
    assert alice.principal.kind is CallerKind.USER
    assert alice.check is not None
    assert bob.check is not None
    assert alice.check_inline is inline
    for check in (alice.check, lambda r: asyncio.run(alice.check_async(r))):
        assert check(request("s-alice")) is None
        assert check(request("s-bob")) == DENIED  # someone else's
        assert check(request("s-ghost")) == DENIED  # does not exist
        assert check(request("s-ownerless")) == DENIED
        assert check(request(None)) == DENIED
    assert bob.check(request("s-bob")) is None
    assert bob.check(request("s-alice")) == DENIED
    assert setup.denied() == {
        "not_owner": 3,
        "no_such_session": 4,
        "missing_session_id": 2,
    }


def test_a_failing_owner_lookup_is_unavailable(complete: Complete) -> None:
    setup = Setup()
    admission = admitted(setup, complete, setup.user("alice"))
    assert admission.check is not None
    assert admission.check(request("s-broken")) == UNAVAILABLE
    assert asyncio.run(admission.check_async(request("s-broken"))) == UNAVAILABLE
    assert setup.denied() == {"owner_lookup_failed": 2}


# --- the verified-token cache and remembered admissions ---------------------------------


def test_a_cached_token_is_admitted_without_verification(complete: Complete) -> None:
    setup = Setup()
    md = setup.user("alice")
    first = setup.engine.admit(ECHO_CALL, md, HANDLER)
    assert isinstance(first, Verification)
    admission = complete(first)
    assert isinstance(admission, Admission)
    # The same token on the same method and handler: the same admission.
    assert setup.engine.admit(ECHO_CALL, md, HANDLER) is admission
    other = setup.engine.admit(OPEN, md, HANDLER)
    assert isinstance(other, Admission)
    assert other is not admission
    changed = setup.engine.admit(ECHO_CALL, md, object())
    assert isinstance(changed, Admission)
    assert changed is not admission
    assert changed.principal is admission.principal
    snap = setup.metrics.snapshot()
    assert (snap.cache_hits, snap.cache_misses) == (3, 1)


def test_denials_carry_fixed_details_and_no_token(
    complete: Complete, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    setup = Setup()
    tokens = [
        mint(setup.clock.time(), iss="https://elsewhere.test"),
        mint(setup.clock.time(), kid="unknown-kid"),
        mint(setup.clock.time() - 3600, ttl=60),
        "not-a-jwt-but-secret-0123456789",
    ]
    fixed = {UNAUTH_MISSING, UNAUTH_INVALID, DENIED, UNAVAILABLE}
    for token in tokens:
        decision = admit(setup, complete, bearer(token))
        assert decision in fixed
        assert token not in repr(decision)
        assert token not in caplog.text
    step = setup.engine.admit(ECHO_CALL, bearer(tokens[-1]), HANDLER)
    assert isinstance(step, Verification)
    assert tokens[-1] not in repr(step)
