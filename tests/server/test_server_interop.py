"""Tokens minted by the control plane's issuer verify at the API server.

The control plane's JWT issuer signs runner tokens and publishes its JWKS;
the API server's authenticator fetches that JWKS from a local HTTP endpoint
and classifies the caller as a service scoped to the token's session,
across a signing-key rotation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.keys import other_key, signing_key
from support.server import CP_ISSUER, JwksServer

from ambient_grpc_auth.controlplane.issuers import DEFAULT_AUDIENCE, DEFAULT_SUBJECT, JwtIssuer
from ambient_grpc_auth.controlplane.signing import SigningKey, SigningKeySet
from ambient_grpc_auth.errors import TokenRejectedError
from ambient_grpc_auth.principal import CallerKind
from ambient_grpc_auth.server.authn import JwtAuthenticator, TrustedIssuer
from ambient_grpc_auth.server.jwks import JwksCache
from ambient_grpc_auth.server.policy import CallerClassifier
from ambient_grpc_auth.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer({"keys": []})
    try:
        yield server
    finally:
        server.close()


def test_control_plane_tokens_verify_and_scope(jwks_server: JwksServer, clock: FakeClock) -> None:
    first = SigningKey.from_private_key(signing_key())
    keys = {"set": SigningKeySet(current=first)}
    cp = JwtIssuer(signing_keys=lambda: keys["set"], issuer=CP_ISSUER, ttl=900, clock=clock)
    jwks_server.document = cp.jwks()

    authenticator = JwtAuthenticator(
        issuers=[
            TrustedIssuer(
                issuer=CP_ISSUER,
                audiences=(DEFAULT_AUDIENCE,),
                keys=JwksCache(jwks_server.url, clock=clock),
                control_plane=True,
            )
        ],
        clock=clock,
    )
    classifier = CallerClassifier(control_plane_issuers=frozenset({CP_ISSUER}))

    old_token = cp.issue_now("session-0001").token
    runner = classifier.classify(authenticator.authenticate(old_token))
    assert runner.kind is CallerKind.SERVICE
    assert runner.session_scope == "session-0001"
    assert runner.username == DEFAULT_SUBJECT

    # The control plane rotates its signing key; the old key stays published.
    second = SigningKey.from_private_key(other_key())
    keys["set"] = SigningKeySet(
        current=second,
        retired=(SigningKey.from_private_key(signing_key(), retired_at=clock.time()),),
    )
    jwks_server.document = cp.jwks()
    new_token = cp.issue_now("session-0002").token
    with pytest.raises(TokenRejectedError) as err:  # inside the refetch cooldown
        authenticator.authenticate(new_token)
    assert err.value.reason == "unknown_kid"
    clock.advance(30)
    rotated = classifier.classify(authenticator.authenticate(new_token))
    assert rotated.session_scope == "session-0002"
    assert authenticator.authenticate(old_token).claims["session_id"] == "session-0001"
    assert jwks_server.requests == 2
    # Past its expiry (900 s + 30 s leeway) the old token is refused.
    clock.advance(900)
    with pytest.raises(TokenRejectedError) as expired:
        authenticator.authenticate(old_token)
    assert expired.value.reason == "expired"
