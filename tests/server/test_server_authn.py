"""Authenticators: static token, JWT per issuer, chains; sync and async paths."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from support.keys import ec_key, other_key, signing_key
from support.server import (
    AUDIENCE,
    IDP_ISSUER,
    IDP_KID,
    alg_none_token,
    forged_payload,
    hand_made,
    hs256_with_public_pem,
    mint,
)

from ambient_grpc_auth.errors import ConfigurationError, TokenRejectedError
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.server.authn import (
    MAX_LEEWAY,
    AuthenticatorChain,
    JwtAuthenticator,
    StaticTokenAuthenticator,
    TrustedIssuer,
    UnrecognizedTokenError,
    kubernetes_issuer,
)
from ambient_grpc_auth.server.jwks import JwksCache, StaticKeySet
from ambient_grpc_auth.testing import FakeClock


def keyset(*keys: VerificationKey) -> StaticKeySet:
    return StaticKeySet(keys=keys or [VerificationKey(kid=IDP_KID, key=signing_key().public_key())])


def issuer(**kw: Any) -> TrustedIssuer:
    kw.setdefault("issuer", IDP_ISSUER)
    kw.setdefault("audiences", (AUDIENCE,))
    kw.setdefault("keys", keyset())
    return TrustedIssuer(**kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sync", "async"])
def verify(request: pytest.FixtureRequest) -> Callable[[Any, str], Principal]:
    """Run ``authenticate`` or ``authenticate_async`` (on a fresh loop)."""
    if request.param == "sync":
        return lambda authenticator, token: authenticator.authenticate(token)
    return lambda authenticator, token: asyncio.run(authenticator.authenticate_async(token))


def reason_of(fn: Callable[[], object]) -> tuple[str, grpc.StatusCode, type]:
    with pytest.raises(TokenRejectedError) as err:
        fn()
    assert "eyJ" not in str(err.value)  # never token material in messages
    return err.value.reason, err.value.code, type(err.value)


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"algorithms": ("HS256",)},
        {"algorithms": ("RS256", "HS512")},
        {"algorithms": ("none",)},
        {"algorithms": ()},
        {"audiences": ()},
        {"audiences": ("",)},
        {"leeway": MAX_LEEWAY + 1},
        {"leeway": -1},
        {"leeway": float("nan")},
        {"issuer": ""},
        {"username_claim": ""},
        {"keys": object()},
    ],
)
def test_issuer_configuration_is_validated(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        issuer(**kw)


def test_single_audience_string_is_accepted() -> None:
    assert issuer(audiences="ambient-api").audiences == ("ambient-api",)


def test_authenticator_configuration_is_validated() -> None:
    with pytest.raises(ConfigurationError):
        JwtAuthenticator(issuers=[])
    with pytest.raises(ConfigurationError):
        JwtAuthenticator(issuers=[issuer(), issuer()])
    with pytest.raises(ConfigurationError):
        AuthenticatorChain(authenticators=[])
    for bad in ("", "has space", "tab\t", "naïve"):
        with pytest.raises(ConfigurationError):
            StaticTokenAuthenticator(token=bad)


def test_kubernetes_issuer_defaults() -> None:
    k8s = kubernetes_issuer(audiences="ambient-api", ca_file=None, bearer_token_file=None)
    assert k8s.issuer == "https://kubernetes.default.svc.cluster.local"
    assert k8s.algorithms == ("RS256",)
    assert isinstance(k8s.keys, JwksCache)
    assert "kubernetes.default.svc/openid/v1/jwks" in repr(k8s.keys)


# --- static token --------------------------------------------------------------


def test_static_token(verify: Callable[[Any, str], Principal]) -> None:
    auth = StaticTokenAuthenticator(token="s3cret-token-value", username="platform")
    p = verify(auth, "s3cret-token-value")
    assert (p.username, p.kind, p.claims) == ("platform", CallerKind.SERVICE, {})
    for wrong in ("s3cret-token-valu", "s3cret-token-value2", "", "S3cret-token-value"):
        reason, _, kind = reason_of(lambda w=wrong: verify(auth, w))  # type: ignore[misc]
        assert (reason, kind) == ("static_mismatch", UnrecognizedTokenError)
    assert "s3cret" not in repr(auth)


# --- JWT -----------------------------------------------------------------------


def test_valid_token(verify: Callable[[Any, str], Principal], clock: FakeClock) -> None:
    auth = JwtAuthenticator(issuers=[issuer()], clock=clock)
    p = verify(auth, mint(clock.time(), sub="alice"))
    assert p.username == "alice"
    assert p.kind is CallerKind.USER
    assert p.issuer == IDP_ISSUER
    assert p.claims["aud"] == AUDIENCE


def test_audience_list_and_multiple_configured(
    verify: Callable[[Any, str], Principal], clock: FakeClock
) -> None:
    auth = JwtAuthenticator(issuers=[issuer(audiences=("a", "b"))], clock=clock)
    assert verify(auth, mint(clock.time(), aud=["x", "b"])).username == "alice"
    reason, code, _ = reason_of(lambda: verify(auth, mint(clock.time(), aud=["x", "y"])))
    assert (reason, code) == ("wrong_audience", grpc.StatusCode.UNAUTHENTICATED)


def _cases(now: float) -> dict[str, tuple[str, str]]:
    rsa_kid_ec_alg = jwt.encode(
        {"iss": IDP_ISSUER, "aud": AUDIENCE, "sub": "a", "exp": int(now) + 60},
        ec_key(),
        algorithm="ES256",
        headers={"kid": IDP_KID},
    )
    return {
        "bad signature": (mint(now, key=other_key()), "bad_signature"),
        "expired": (mint(now - 1000, ttl=100), "expired"),
        "nbf in future": (mint(now, nbf=int(now) + 120), "not_yet_valid"),
        "iat in future": (mint(now, iat=int(now) + 120), "not_yet_valid"),
        "exp missing": (mint(now, omit=("exp",)), "missing_claim"),
        "exp not a number": (mint(now, exp="tomorrow"), "invalid_claims"),
        "exp is a bool": (mint(now, exp=True), "invalid_claims"),
        "aud missing": (mint(now, omit=("aud",)), "missing_claim"),
        "wrong audience": (mint(now, aud="other"), "wrong_audience"),
        "no subject": (mint(now, sub=None), "no_subject"),
        "empty subject": (mint(now, sub=""), "no_subject"),
        "alg none": (alg_none_token(now), "alg_not_allowed"),
        "hs256 with public pem": (hs256_with_public_pem(now), "alg_not_allowed"),
        "alg not in allow-list": (mint(now, alg="RS512"), "alg_not_allowed"),
        "EC alg on an RSA key": (rsa_kid_ec_alg, "alg_key_mismatch"),
        "unknown kid": (mint(now, kid="k-unknown"), "unknown_kid"),
        "kid not a string": (_rs256_by_hand({"kid": 7}, now), "malformed"),
        "b64 false header": (
            _rs256_by_hand({"kid": IDP_KID, "b64": False, "crit": ["b64"]}, now),
            "malformed",
        ),
        # RFC 7515 section 4.1.11, checked by us whatever PyJWT version is
        # installed (2.11.0 accepted an unknown crit extension).
        "unsupported crit": (
            _rs256_by_hand({"kid": IDP_KID, "crit": ["x"], "x": 1}, now),
            "unsupported_crit",
        ),
        "crit naming an absent extension": (
            _rs256_by_hand({"kid": IDP_KID, "crit": ["x"]}, now),
            "unsupported_crit",
        ),
        "crit empty": (_rs256_by_hand({"kid": IDP_KID, "crit": []}, now), "malformed"),
        "crit not a list": (
            _rs256_by_hand({"kid": IDP_KID, "crit": "x", "x": 1}, now),
            "malformed",
        ),
        "crit not strings": (_rs256_by_hand({"kid": IDP_KID, "crit": [1]}, now), "malformed"),
        "crit null": (_rs256_by_hand({"kid": IDP_KID, "crit": None}, now), "malformed"),
        "crit names a standard header": (
            _rs256_by_hand({"kid": IDP_KID, "crit": ["kid"]}, now),
            "malformed",
        ),
        "crit repeats a name": (
            _rs256_by_hand({"kid": IDP_KID, "crit": ["x", "x"], "x": 1}, now),
            "malformed",
        ),
        "tampered payload": (_tamper(mint(now)), "bad_signature"),
    }


def _rs256_by_hand(extra_header: dict[str, Any], now: float) -> str:
    header = {"alg": "RS256", "typ": "JWT", **extra_header}
    return hand_made(
        header,
        forged_payload(now),
        lambda data: signing_key().sign(data, padding.PKCS1v15(), hashes.SHA256()),
    )


def _tamper(token: str) -> str:
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "admin"
    raw = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{raw}.{sig}"


CASES = (
    "bad signature",
    "expired",
    "nbf in future",
    "iat in future",
    "exp missing",
    "exp not a number",
    "exp is a bool",
    "aud missing",
    "wrong audience",
    "no subject",
    "empty subject",
    "alg none",
    "hs256 with public pem",
    "alg not in allow-list",
    "EC alg on an RSA key",
    "unknown kid",
    "kid not a string",
    "b64 false header",
    "unsupported crit",
    "crit naming an absent extension",
    "crit empty",
    "crit not a list",
    "crit not strings",
    "crit null",
    "crit names a standard header",
    "crit repeats a name",
    "tampered payload",
)


def test_case_table_is_complete() -> None:
    assert set(CASES) == set(_cases(1_800_000_000.0))


@pytest.mark.parametrize("case", CASES)
def test_rejections(case: str, verify: Callable[[Any, str], Principal], clock: FakeClock) -> None:
    auth = JwtAuthenticator(issuers=[issuer(algorithms=("RS256", "ES256"))], clock=clock)
    token, expected = _cases(clock.time())[case]
    reason, code, kind = reason_of(lambda: verify(auth, token))
    assert reason == expected
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert kind is TokenRejectedError


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-jwt", "not_a_jwt"),
        ("a.b", "not_a_jwt"),
        ("a.b.c.d", "not_a_jwt"),
        ("!!.??.xx", "not_a_jwt"),
        ("e30.e30.", "unknown_issuer"),
    ],
)
def test_unrecognized_tokens(
    token: str, reason: str, verify: Callable[[Any, str], Principal]
) -> None:
    auth = JwtAuthenticator(issuers=[issuer()])
    assert reason_of(lambda: verify(auth, token))[::2] == (reason, UnrecognizedTokenError)


def test_unknown_issuer_is_unrecognized(
    verify: Callable[[Any, str], Principal], clock: FakeClock
) -> None:
    auth = JwtAuthenticator(issuers=[issuer()], clock=clock)
    token = mint(clock.time(), iss="https://evil.test")
    assert reason_of(lambda: verify(auth, token))[::2] == ("unknown_issuer", UnrecognizedTokenError)


def test_leeway_is_applied_with_the_injected_clock(clock: FakeClock) -> None:
    auth = JwtAuthenticator(issuers=[issuer(leeway=30)], clock=clock)
    token = mint(clock.time(), ttl=100)
    clock.advance(129)
    assert auth.authenticate(token).username == "alice"
    clock.advance(1)
    assert reason_of(lambda: auth.authenticate(token))[0] == "expired"
    strict = JwtAuthenticator(issuers=[issuer(leeway=0)], clock=clock)
    early = mint(clock.time(), nbf=int(clock.time()) + 1)
    assert reason_of(lambda: strict.authenticate(early))[0] == "not_yet_valid"
    assert auth.authenticate(early).username == "alice"


def test_kid_less_token_needs_a_single_key(clock: FakeClock) -> None:
    single = JwtAuthenticator(issuers=[issuer()], clock=clock)
    assert single.authenticate(mint(clock.time(), kid=None)).username == "alice"
    two = keyset(
        VerificationKey(kid=IDP_KID, key=signing_key().public_key()),
        VerificationKey(kid="k2", key=other_key().public_key()),
    )
    double = JwtAuthenticator(issuers=[issuer(keys=two)], clock=clock)
    assert reason_of(lambda: double.authenticate(mint(clock.time(), kid=None)))[0] == "unknown_kid"
    assert double.authenticate(mint(clock.time(), kid="k2", key=other_key())).username == "alice"


def test_jwk_alg_member_must_match(clock: FakeClock) -> None:
    keys = keyset(VerificationKey(kid=IDP_KID, key=signing_key().public_key(), alg="RS384"))
    auth = JwtAuthenticator(issuers=[issuer(keys=keys, algorithms=("RS256", "RS384"))], clock=clock)
    assert reason_of(lambda: auth.authenticate(mint(clock.time())))[0] == "alg_key_mismatch"
    assert auth.authenticate(mint(clock.time(), alg="RS384")).username == "alice"


def test_es256_issuer(clock: FakeClock) -> None:
    keys = keyset(VerificationKey(kid="ec", key=ec_key().public_key()))
    auth = JwtAuthenticator(issuers=[issuer(keys=keys, algorithms=("ES256",))], clock=clock)
    assert (
        auth.authenticate(mint(clock.time(), kid="ec", key=ec_key(), alg="ES256")).username
        == "alice"
    )


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_short_rsa_keys_are_refused(clock: FakeClock) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    keys = keyset(VerificationKey(kid="weak", key=weak.public_key()))
    auth = JwtAuthenticator(issuers=[issuer(keys=keys)], clock=clock)
    token = jwt.encode(
        {"iss": IDP_ISSUER, "aud": AUDIENCE, "sub": "a", "exp": int(clock.time()) + 60},
        weak,
        algorithm="RS256",
        headers={"kid": "weak"},
    )
    assert reason_of(lambda: auth.authenticate(token))[0] == "bad_key"


def test_username_claim(clock: FakeClock) -> None:
    auth = JwtAuthenticator(issuers=[issuer(username_claim="preferred_username")], clock=clock)
    token = mint(clock.time(), sub="0f3a-uuid", preferred_username="alice")
    assert auth.authenticate(token).username == "alice"
    assert reason_of(lambda: auth.authenticate(mint(clock.time())))[0] == "no_subject"


# --- chains --------------------------------------------------------------------


def test_chain_order_and_definitive_rejections(
    verify: Callable[[Any, str], Principal], clock: FakeClock
) -> None:
    chain = AuthenticatorChain(
        authenticators=[
            StaticTokenAuthenticator(token="static-token-abcdef"),
            JwtAuthenticator(issuers=[issuer()], clock=clock),
        ]
    )
    assert verify(chain, "static-token-abcdef").kind is CallerKind.SERVICE
    assert verify(chain, mint(clock.time())).username == "alice"
    # A known issuer's bad token stops the chain with the specific reason.
    assert (
        reason_of(lambda: verify(chain, mint(clock.time(), key=other_key())))[0] == "bad_signature"
    )
    # Nobody recognises it: the last authenticator's reason.
    assert reason_of(lambda: verify(chain, "garbage"))[::2] == ("not_a_jwt", UnrecognizedTokenError)
