"""Property-based tests of everything that parses untrusted input.

For arbitrary input each parser either succeeds with a result that satisfies
its contract or refuses with the library's own exception carrying a fixed
reason; nothing else is ever raised and no refusal echoes the input:

- the bearer parser (``_bearer.extract_bearer``);
- the session-proof decoder (``proof.decode_proof``) and the replay guard;
- the JWT verifier (``authn``), on arbitrary strings and on arbitrary
  headers and claims validly signed with a trusted key; and, for a smaller
  sample, the whole server interceptor in front of the reference service
  (sync and grpc.aio): the status is never INTERNAL or UNKNOWN;
- the token endpoint's HTTP surface (arbitrary methods, paths and
  ``Authorization`` headers against one real aiohttp server): only the
  documented statuses, never 500, and the body never quotes the header.

Example counts are modest (``max_examples`` 50-200) so that the module runs
in seconds; the hypothesis database replays past failures first.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.client
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.cp import copy_keys
from support.keys import other_key, signing_key
from support.waiting import LoopThread

from ambient_grpc_auth._bearer import authorization_metadata, extract_bearer
from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import ensure_keys
from ambient_grpc_auth.controlplane.replay import ReplayGuard
from ambient_grpc_auth.controlplane.server import RunningTokenServer, start_token_server
from ambient_grpc_auth.errors import ConfigurationError, ProofError, TokenRejectedError
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.principal import Principal
from ambient_grpc_auth.proof import (
    DecodedProof,
    decode_proof,
    encrypt_v1,
    encrypt_v2,
    max_plaintext_bytes,
)
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference import servicer as reference
from ambient_grpc_auth.reference.aio import servicer as aio_reference
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.aio.interceptor import (
    ServerAuthInterceptor as AioServerAuthInterceptor,
)
from ambient_grpc_auth.server.authn import (
    AuthenticatorChain,
    JwtAuthenticator,
    StaticTokenAuthenticator,
    TrustedIssuer,
)
from ambient_grpc_auth.server.config import API_TOKEN_ENV, ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.policy import CallerClassifier
from ambient_grpc_auth.testing import FakeClock

T = TypeVar("T")

FAST = settings(max_examples=150, deadline=None)
MEDIUM = settings(max_examples=100, deadline=None)
# Module-scoped servers are shared on purpose: hypothesis warns about
# function-scoped fixtures only.
NETWORK = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VISIBLE_ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
E = TypeVar("E", bound=BaseException)


def outcome_of(error: type[E], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | E:
    """``fn(*args, **kwargs)``, or the ``error`` it raised; anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except error as exc:
        return exc


# --------------------------------------------------------------------------- bearer parser

BEARER_REASONS = {"missing", "duplicate", "malformed", "oversized"}
metadata_keys = st.sampled_from(
    ["authorization", "Authorization", "AUTHORIZATION", "authorization-bin", "x-trace", "auth"]
) | st.text(max_size=16)
bearer_like = st.builds(
    lambda scheme, sep, token: scheme + sep + token,
    st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR", "Basic", "Bearer:", "", "Bearerx"]),
    st.sampled_from([" ", "", "  ", "\t", " \t"]),
    st.text(VISIBLE_ASCII, max_size=70) | st.text(max_size=30),
)
metadata_values = bearer_like | st.text(max_size=60) | st.binary(max_size=40)


@FAST
@given(
    metadata=st.none() | st.lists(st.tuples(metadata_keys, metadata_values), max_size=6),
    max_bytes=st.integers(1, 64),
)
def test_extract_bearer_returns_a_token_or_rejects(
    metadata: list[tuple[str, str | bytes]] | None, max_bytes: int
) -> None:
    auth = [v for k, v in metadata or () if k == "authorization"]
    token = outcome_of(TokenRejectedError, extract_bearer, metadata, max_token_bytes=max_bytes)
    if isinstance(token, TokenRejectedError):
        assert token.reason in BEARER_REASONS
        assert str(token) == token.reason  # nothing of the value
        assert token.code is grpc.StatusCode.UNAUTHENTICATED
        identical = len(set(map(repr, auth))) == 1 and len(auth) <= 4
        expected = {0: "missing", 1: None}.get(len(auth), None if identical else "duplicate")
        if expected is not None:
            assert token.reason == expected
        return
    # Accepted: one value (or up to 4 identical ones), "Bearer <token>",
    # visible ASCII, bounded.
    assert 1 <= len(auth) <= 4
    assert all(v == auth[0] and type(v) is type(auth[0]) for v in auth)
    value = auth[0]
    assert isinstance(value, str)
    scheme, sep, rest = value.partition(" ")
    assert (scheme.lower(), sep, rest) == ("bearer", " ", token)
    assert 0 < len(token) <= max_bytes
    assert token.isascii()
    assert all(0x21 <= ord(c) <= 0x7E for c in token)


@FAST
@given(
    token=st.text(VISIBLE_ASCII, min_size=1, max_size=200),
    noise=st.lists(st.tuples(st.sampled_from(["x-a", "x-b", "te"]), st.text(max_size=10))),
)
def test_bearer_round_trip(token: str, noise: list[tuple[str, str]]) -> None:
    metadata = [*noise, authorization_metadata(token), *noise]
    assert extract_bearer(metadata, max_token_bytes=200) == token


# --------------------------------------------------------------------------- proofs

PROOF_REASONS = {
    "bad_length",
    "bad_base64",
    "decrypt_failed",
    "not_utf8",
    "malformed_v2",
    "unsupported_version",
}


def _encrypt(plaintext: bytes) -> str:
    oaep = padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    )
    return base64.b64encode(signing_key().public_key().encrypt(plaintext, oaep)).decode("ascii")


def _decode(value: object) -> DecodedProof | ProofError:
    outcome = outcome_of(ProofError, decode_proof, signing_key(), value)
    if isinstance(outcome, ProofError):
        assert outcome.status == 401
        assert outcome.reason in PROOF_REASONS
        assert str(outcome) == outcome.reason
    return outcome


block_b64 = st.binary(min_size=256, max_size=256).map(lambda b: base64.b64encode(b).decode())
b64ish = st.text(
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n"),
    min_size=340,
    max_size=348,
)


@FAST
@given(
    value=st.text(max_size=400)
    | st.binary(max_size=400)
    | block_b64
    | b64ish
    | st.none()
    | st.integers()
)
def test_decode_proof_arbitrary_input(value: object) -> None:
    outcome = _decode(value)
    if isinstance(outcome, DecodedProof):
        # Only a real ciphertext under our key decodes; random input never does.
        pytest.fail(f"decoded a random value as {outcome!r}")


@MEDIUM
@given(plaintext=st.binary(max_size=max_plaintext_bytes(signing_key())))
def test_decode_proof_any_plaintext(plaintext: bytes) -> None:
    outcome = _decode(_encrypt(plaintext))
    try:
        text = plaintext.decode("utf-8")
    except UnicodeDecodeError:
        assert isinstance(outcome, ProofError)
        assert outcome.reason == "not_utf8"
        return
    if not text.startswith("{"):
        assert outcome == DecodedProof(session_id=text, version=1)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**41), 2**41)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=4,
)
nonce_like = st.binary(min_size=16, max_size=16).map(
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
) | st.text(max_size=24)
proof_docs = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([2, 1, 3, "2", 2.0, True, None]) | json_values,
        "sid": st.text(max_size=40) | json_values,
        "ts": st.integers(-5, 2**41) | json_values,
        "nonce": nonce_like | json_values,
    },
).flatmap(
    lambda doc: st.dictionaries(st.text(max_size=5), json_values, max_size=2).map(
        lambda extra: {**extra, **doc}
    )
)


@MEDIUM
@given(doc=proof_docs)
def test_decode_proof_any_json_document(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    assume(len(raw) <= max_plaintext_bytes(signing_key()))
    outcome = _decode(_encrypt(raw))
    if isinstance(outcome, ProofError):
        assert "v" in doc  # only versioned documents are refused
        return
    if outcome.version == 1:
        assert "v" not in doc
        assert outcome.session_id == raw.decode()
        return
    # An accepted v2 proof is exactly the documented shape.
    assert set(doc) == {"v", "sid", "ts", "nonce"}
    assert doc["v"] == 2
    assert type(doc["v"]) is int
    assert outcome.session_id == doc["sid"]
    assert outcome.issued_at == doc["ts"]
    assert outcome.nonce == doc["nonce"]
    assert 0 <= doc["ts"] < 2**40
    assert len(doc["nonce"]) == 22


@MEDIUM
@given(
    sid=st.text(min_size=1, max_size=60),
    ts=st.integers(0, 2**40 - 1),
    nonce=st.binary(min_size=16, max_size=16),
)
def test_v2_proofs_round_trip(sid: str, ts: int, nonce: bytes) -> None:
    proof = outcome_of(
        ConfigurationError, encrypt_v2, signing_key().public_key(), sid, now=ts, nonce=nonce
    )
    if isinstance(proof, ConfigurationError):
        # Documented refusal: the JSON document must fit one OAEP block.
        doc = {"v": 2, "sid": sid, "ts": ts, "nonce": "A" * 22}
        assert len(json.dumps(doc, separators=(",", ":"))) > max_plaintext_bytes(signing_key())
        assert sid not in str(proof)
        return
    decoded = decode_proof(signing_key(), proof)
    assert (decoded.session_id, decoded.version, decoded.issued_at) == (sid, 2, ts)
    assert decoded.nonce == base64.urlsafe_b64encode(nonce).rstrip(b"=").decode()


def test_replay_guard_refuses_replay_at_the_retention_boundary() -> None:
    """A proof accepted with ts = now + window is still remembered exactly
    2 * window later, the last instant at which its ts passes the freshness
    check (the property test below found this boundary)."""
    clock = FakeClock(1000.0)
    guard = ReplayGuard(window_seconds=5, clock=clock)
    proof = DecodedProof("session-1", 2, issued_at=1005, nonce="A" * 22)
    guard.check(proof)
    clock.advance(10)
    with pytest.raises(ProofError) as info:
        guard.check(proof)
    assert info.value.reason == "replayed"
    clock.advance(0.001)
    with pytest.raises(ProofError) as info:
        guard.check(proof)
    assert info.value.reason == "stale"


SIDS = ["session-a1", "session-b2", "session-c3"]
NONCES = ["A" * 22, "B" * 21 + "A", "C" * 21 + "Q"]
guard_ops = st.lists(
    st.one_of(
        # a new v2 proof issued `offset` seconds from now
        st.tuples(
            st.just("new"),
            st.sampled_from(SIDS),
            st.sampled_from(NONCES),
            # the edges of both windows are where mistakes hide
            st.sampled_from([-30, -5, 0, 5, 30]) | st.integers(-40, 40),
        ),
        # the i-th most recent proof presented so far, presented again (a replay)
        st.tuples(st.just("replay"), st.integers(0, 3)),
        st.tuples(st.just("v1")),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0])),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=guard_ops,
    # small tables exercise eviction; a large one leaves expiry alone in play
    max_entries=st.sampled_from([1, 2, 3, 6, 1000]),
    window=st.sampled_from([5.0, 30.0]),
    require_fresh=st.booleans(),
)
def test_replay_guard_invariants(
    ops: list[tuple[Any, ...]], max_entries: int, window: float, require_fresh: bool
) -> None:
    """Whatever the sequence: one proof (session, nonce, ts) is accepted at
    most once, and only when fresh; memory stays bounded; v1 passes unless
    fresh proofs are required."""
    clock = FakeClock(1_000_000.0)
    guard = ReplayGuard(
        window_seconds=window,
        max_entries=max_entries,
        require_fresh_proof=require_fresh,
        clock=clock,
    )
    presented: list[DecodedProof] = []
    accepted_at: dict[DecodedProof, float] = {}
    for op in ops:
        if op[0] == "advance":
            clock.advance(op[1])
            continue
        if op[0] == "v1":
            refused = outcome_of(ProofError, guard.check, DecodedProof("session-v1", 1))
            if isinstance(refused, ProofError):
                assert require_fresh
                assert (refused.reason, refused.status) == ("fresh_proof_required", 401)
            else:
                assert not require_fresh
            continue
        if op[0] == "replay":
            if not presented:
                continue
            proof = presented[-1 - op[1] % len(presented)]
        else:
            _, sid, nonce, offset = op
            proof = DecodedProof(sid, 2, issued_at=int(clock.time()) + offset, nonce=nonce)
            presented.append(proof)
        now = clock.time()
        refused = outcome_of(ProofError, guard.check, proof)
        if isinstance(refused, ProofError):
            assert refused.status == 401
            assert refused.reason in {"stale", "future", "replayed"}
        else:
            assert proof.issued_at is not None
            assert abs(now - proof.issued_at) <= window
            assert proof not in accepted_at, "a proof was accepted twice"
            accepted_at[proof] = now
        assert len(guard) <= max_entries


# --------------------------------------------------------------------------- JWT verifier

NOW = 1_800_000_000
ISS = "https://cp.test"
AUD = "ambient-api"
KID = "k1"
LEEWAY = 30.0
STATIC = "static-service-token-for-properties"
JWT_REASONS = {
    "static_mismatch",
    "not_a_jwt",
    "unknown_issuer",
    "malformed",
    "unsupported_crit",
    "alg_not_allowed",
    "alg_key_mismatch",
    "unknown_kid",
    "bad_signature",
    "bad_key",
    "wrong_audience",
    "wrong_issuer",
    "missing_claim",
    "invalid_claims",
    "expired",
    "not_yet_valid",
    "no_subject",
    "runner_without_session",
    "unrecognized",
}


@functools.cache
def trusted_issuer() -> TrustedIssuer:
    key = VerificationKey(kid=KID, key=signing_key().public_key())
    return TrustedIssuer(
        issuer=ISS,
        audiences=(AUD,),
        keys=StaticKeySet(keys=[key]),
        algorithms=("RS256", "PS256"),
        leeway=LEEWAY,
        control_plane=True,
    )


@functools.cache
def authenticator() -> AuthenticatorChain:
    return AuthenticatorChain(
        authenticators=[
            StaticTokenAuthenticator(token=STATIC),
            JwtAuthenticator(issuers=[trusted_issuer()], clock=FakeClock(NOW)),
        ]
    )


CLASSIFIER = CallerClassifier(control_plane_issuers=frozenset({ISS}))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(
    header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey | None = None
) -> str:
    """A JWT with any header and claims, RS256-signed with ``key`` (default:
    the trusted key, so the signature is valid exactly when the header says RS256)."""
    signing_input = (
        _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    ).encode("ascii")
    signature = (key or signing_key()).sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return signing_input.decode("ascii") + "." + _b64(signature)


times = (
    st.integers(NOW - 200, NOW + 200)
    | st.sampled_from([NOW - LEEWAY, NOW + LEEWAY, NOW - LEEWAY - 1, 0, -1, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
    | st.booleans()
    | st.none()
)


def mutations(
    base: dict[str, Any], alternatives: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with each member kept (mostly), dropped or replaced by an
    arbitrary alternative, plus arbitrary extra members: near-valid inputs
    reach every check, not only the first."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))
        for name, value in base.items():
            choice = draw(st.integers(0, 9))
            if choice < 8:
                out[name] = value
            elif choice == 8:
                out.pop(name, None)
            else:
                out[name] = draw(alternatives[name])
        return out

    return build()


headers = (
    mutations(
        {"alg": "RS256", "kid": KID, "typ": "JWT"},
        {
            "alg": st.sampled_from(["PS256", "RS384", "HS256", "none", "ES256", "", "rs256"])
            | json_scalars,
            "kid": st.sampled_from(["k2", ""]) | json_scalars,
            "typ": st.sampled_from(["at+jwt"]) | json_scalars,
        },
    )
    | st.fixed_dictionaries({"b64": st.booleans() | json_scalars, "alg": st.just("RS256")})
    | (st.fixed_dictionaries({"crit": json_values, "alg": st.just("RS256"), "kid": st.just(KID)}))
)
claims = mutations(
    {
        "iss": ISS,
        "aud": AUD,
        "exp": NOW + 300,
        "nbf": NOW - 10,
        "iat": NOW - 10,
        "sub": "alice",
        SESSION_ID_CLAIM: "session-1",
        TOKEN_USE_CLAIM: RUNNER_TOKEN_USE,
    },
    {
        "iss": st.sampled_from([ISS + "/", "https://other.test"]) | json_values,
        "aud": st.sampled_from([[AUD], ["x", AUD], "x", []]) | json_values,
        "exp": times,
        "nbf": times,
        "iat": times,
        "sub": st.sampled_from(["bob", "", "x" * 1025]) | json_values,
        SESSION_ID_CLAIM: st.sampled_from(["session-2", "", "s" * 300]) | json_values,
        TOKEN_USE_CLAIM: st.sampled_from(["other"]) | json_values,
    },
)


def _verify(token: str) -> Principal | TokenRejectedError:
    def verify() -> Principal:
        return CLASSIFIER.classify(authenticator().authenticate(token))

    outcome = outcome_of(TokenRejectedError, verify)
    if isinstance(outcome, TokenRejectedError):
        assert outcome.reason in JWT_REASONS
        assert str(outcome) == outcome.reason
        assert outcome.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
    return outcome


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@FAST
@given(header=headers, body=claims)
def test_signed_tokens_with_arbitrary_headers_and_claims(
    header: dict[str, Any], body: dict[str, Any]
) -> None:
    outcome = _verify(sign(header, body))
    if isinstance(outcome, TokenRejectedError):
        return
    # Accepted only when every rule holds.
    assert header["alg"] == "RS256"
    assert header.get("kid") in (KID, None)
    assert "crit" not in header  # no extension is understood, so none may be critical
    assert body["iss"] == ISS
    aud = body["aud"]
    assert aud == AUD or (isinstance(aud, list) and AUD in aud)
    exp = _number(body["exp"])
    assert exp is not None
    assert exp + LEEWAY > NOW
    for name in ("nbf", "iat"):
        if name in body:
            value = _number(body[name])
            assert value is not None
            assert value <= NOW + LEEWAY
    assert isinstance(body.get("sub"), str)
    assert 0 < len(body["sub"]) <= 1024
    assert outcome.username == body["sub"]
    if body.get(TOKEN_USE_CLAIM) == RUNNER_TOKEN_USE:
        assert outcome.is_service
        assert outcome.session_scope == body[SESSION_ID_CLAIM]


@MEDIUM
@given(
    trusted=st.booleans(),
    embedded=st.sampled_from(["jwk", "jku", "x5u", "x5c"]),
    kid=st.sampled_from([KID, "attacker-key", None]),
)
def test_keys_named_by_the_token_are_never_used(
    trusted: bool, embedded: str, kid: str | None
) -> None:
    """A token that carries or points at its own key (jwk, jku, x5u, x5c)
    is verified with the configured key only."""
    attacker = other_key()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))
    pointer = {"jwk": jwk, "jku": "https://attacker.test/jwks", "x5u": "https://attacker.test/c"}
    header: dict[str, Any] = {"alg": "RS256", embedded: pointer.get(embedded, ["MIIB"])}
    if kid is not None:
        header["kid"] = kid
    body = {"iss": ISS, "aud": AUD, "exp": NOW + 300, "sub": "mallory"}
    outcome = _verify(sign(header, body, None if trusted else attacker))
    if trusted and kid != "attacker-key":
        assert isinstance(outcome, Principal)
    else:
        assert isinstance(outcome, TokenRejectedError)
        assert outcome.reason in {"bad_signature", "unknown_kid"}


jwt_shaped = st.from_regex(r"[A-Za-z0-9_\-=]{0,40}\.[A-Za-z0-9_\-=]{0,60}\.[A-Za-z0-9_\-=]{0,40}")
segment_json = st.builds(
    lambda h, p, s: ".".join([_b64(h.encode()), _b64(p.encode()), s]),
    st.text(max_size=40) | json_values.map(json.dumps),
    st.text(max_size=40) | json_values.map(json.dumps),
    st.text(st.sampled_from("AbC-_="), max_size=20),
)


@FAST
@given(token=st.text(max_size=120) | jwt_shaped | segment_json)
def test_arbitrary_token_strings(token: str) -> None:
    outcome = _verify(token)
    assert isinstance(outcome, TokenRejectedError)


# --------------------------------------------------------------------------- through real servers


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


def _server_config(store: SessionStore) -> ServerAuthConfig:
    return ServerAuthConfig.from_env(
        environ={API_TOKEN_ENV: STATIC},
        issuers=[trusted_issuer()],
        owner_lookup=store.owner_of,
        clock=FakeClock(NOW),
    )


@pytest.fixture(scope="module")
def grpc_targets(loop_thread: LoopThread) -> Iterator[tuple[list[Any], str]]:
    """The reference service behind the interceptor, sync and aio; the stubs
    and one existing session id."""
    store = SessionStore(":memory:")
    session_id = store.create_session("props", created_by="alice").metadata.id
    store.append(session_id, "assistant", "hello")
    server, port = reference.serve(
        store, interceptors=[ServerAuthInterceptor(config=_server_config(store))]
    )

    async def start_aio() -> tuple[grpc.aio.Server, int]:
        interceptor = AioServerAuthInterceptor(config=_server_config(store))
        return await aio_reference.serve(store, interceptors=[interceptor])

    aio_server, aio_port = loop_thread.run(start_aio())
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in (port, aio_port)]
    try:
        stubs = [sessions_pb2_grpc.SessionServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
        yield stubs, session_id
    finally:
        for channel in channels:
            channel.close()
        server.stop(None).wait(10)
        loop_thread.run(aio_server.stop(None))
        store.close()


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
grpc_values = (
    printable
    | st.builds(lambda v: "Bearer " + v, printable)
    | st.builds(lambda h, b: "Bearer " + sign(h, b), headers, claims)
    | st.just("Bearer " + STATIC)
)
grpc_keys = st.sampled_from(["authorization", "x-trace", "authorization-bin", "te-x"])


@NETWORK
@given(
    metadata=st.lists(st.tuples(grpc_keys, grpc_values), max_size=3),
    method=st.sampled_from(["get", "push", "watch"]),
    own_session=st.booleans(),
)
def test_interceptor_statuses_for_arbitrary_credentials(
    grpc_targets: tuple[list[Any], str],
    metadata: list[tuple[str, str]],
    method: str,
    own_session: bool,
) -> None:
    stubs, session_id = grpc_targets
    # "-bin" keys carry bytes on the wire.
    md = tuple((k, v.encode() if k.endswith("-bin") else v) for k, v in metadata)
    sid = session_id if own_session else "session-that-does-not-exist"

    def call(stub: Any) -> object:
        if method == "get":
            return stub.GetSession(sessions_pb2.GetSessionRequest(id=sid), metadata=md, timeout=10)
        if method == "push":
            request = sessions_pb2.PushSessionMessageRequest(
                session_id=sid, event_type="assistant", payload="p"
            )
            return stub.PushSessionMessage(request, metadata=md, timeout=10)
        request_w = sessions_pb2.WatchSessionMessagesRequest(session_id=sid)
        stream = stub.WatchSessionMessages(request_w, metadata=md, timeout=10)
        try:
            return next(stream)  # the session holds a message: accepted watches return it
        finally:
            stream.cancel()

    for stub in stubs:
        err = outcome_of(grpc.RpcError, call, stub)
        if not isinstance(err, grpc.RpcError):
            continue
        assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err
        details = err.details() or ""
        for _, value in metadata:
            token = value.partition(" ")[2]
            if len(token) >= 12:
                assert token not in details


# --------------------------------------------------------------------------- token endpoint HTTP

ALLOWED_STATUSES = {200, 401, 403, 404, 405, 503}


@dataclasses.dataclass(frozen=True)
class TokenEndpoint:
    server: RunningTokenServer
    public_key: rsa.RSAPublicKey


@pytest.fixture(scope="module")
def token_endpoint(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TokenEndpoint]:
    """One real token endpoint for the module (RSA-2048: the HTTP surface
    does not depend on the key size)."""
    keys_dir = copy_keys(tmp_path_factory.mktemp("prop-cp") / "keys", encryption_key_bits=2048)
    keys = ensure_keys(keys_dir)
    server = loop_thread.run(
        start_token_server(TokenServerConfig(keys_dir=keys_dir, shutdown_timeout=1.0))
    )
    try:
        yield TokenEndpoint(server, keys.public_key)
    finally:
        loop_thread.run(server.close())


# Field values as HTTP allows them: visible ASCII, spaces and tabs, obs-text.
field_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(
        lambda c: not 0x7F <= ord(c) < 0xA0
    )
    | st.just("\t"),
    max_size=120,
)
# Methods the HTTP parser knows (others are a 400 from the parser, see below);
# GET on /token is drawn often so that most examples reach the handler.
methods = st.just("GET") | st.sampled_from(
    [
        "GET",
        "POST",
        "PUT",
        "DELETE",
        "PATCH",
        "HEAD",
        "OPTIONS",
        "TRACE",
        "PROPFIND",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
        "REPORT",
        "PURGE",
        "SEARCH",
        "LINK",
        "UNLINK",
    ]
)
paths = (
    st.just("/token")
    | st.sampled_from(
        [
            "/token",
            "/token/",
            "/TOKEN",
            "/healthz",
            "/.well-known/jwks.json",
            "/.well-known/openid-configuration",
            "/",
            "/token?x=1",
            "//token",
        ]
    )
    | st.lists(st.text(max_size=8), min_size=1, max_size=3).map(
        lambda parts: "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)
    )
)


def _request(port: int, method: str, path: str, authorization: list[str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for value in authorization:
            conn.putheader("Authorization", value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _header_safe(value: str) -> bool:
    # What http.client can send as a field value: latin-1, no controls but tab.
    return all(
        ord(c) < 256 and (c == "\t" or not (ord(c) < 32 or 127 <= ord(c) < 160)) for c in value
    )


@settings(max_examples=100, deadline=None)
@given(
    method=methods,
    path=paths,
    authorization=st.lists(field_text | bearer_like.filter(_header_safe), max_size=3),
)
def test_token_endpoint_arbitrary_requests(
    token_endpoint: TokenEndpoint, method: str, path: str, authorization: list[str]
) -> None:
    # Surrounding blanks are not part of a field value (RFC 9110 5.5).
    authorization = [v.strip(" \t") for v in authorization]
    status, body = _request(token_endpoint.server.port, method, path, authorization)
    assert status in ALLOWED_STATUSES, (status, body[:200])
    text = body.decode("latin-1")
    for value in authorization:
        for secret in (value, value.partition(" ")[2]):
            if len(secret) >= 12:
                assert secret not in text


@NETWORK
@given(method=st.from_regex(r"[A-Za-z][A-Za-z-]{0,9}", fullmatch=True), path=paths)
def test_token_endpoint_unknown_methods(
    token_endpoint: TokenEndpoint, method: str, path: str
) -> None:
    """Method tokens the HTTP parser does not know are refused by it (400)
    before any handler runs; known ones get the documented statuses."""
    assume(method.upper() not in {"CONNECT", "PRI"})
    status, body = _request(token_endpoint.server.port, method, path, [])
    assert status in ALLOWED_STATUSES | {400}, (status, body[:200])


def _expected_status(session_id: str, version: str, skew: int) -> int:
    valid_id = 8 <= len(session_id) <= 256 and " " not in session_id and session_id.isprintable()
    if version == "v1" and session_id.startswith("{"):
        try:
            doc = json.loads(session_id)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "v" in doc:
            return 401  # a v1 id that reads as a versioned proof
    if not valid_id:
        return 403
    if version == "v2" and abs(skew) > 60:
        return 401
    return 200


@NETWORK
@given(
    session_id=st.text(min_size=1, max_size=40),
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER"]),
    version=st.sampled_from(["v1", "v2"]),
    skew=st.sampled_from([0, 30, 3600, -3600]),
)
def test_token_endpoint_with_real_proofs(
    token_endpoint: TokenEndpoint, session_id: str, scheme: str, version: str, skew: int
) -> None:
    """Well-formed proofs of arbitrary session ids: 200 with a token for a
    valid id, 403 for an invalid one, 401 for a stale v2 proof; never 500."""
    public = token_endpoint.public_key
    try:
        proof = (
            encrypt_v1(public, session_id)
            if version == "v1"
            else encrypt_v2(public, session_id, now=time.time() + skew)
        )
    except ConfigurationError:
        assume(False)  # does not fit one RSA-2048 block
        raise
    status, body = _request(token_endpoint.server.port, "GET", "/token", [f"{scheme} {proof}"])
    assert status == _expected_status(session_id, version, skew), (status, body[:200])
    assert proof not in body.decode("latin-1")
    if status == 200:
        doc = json.loads(body)
        assert set(doc) == {"token", "expires_at"}
