"""The public test helpers in ambient_grpc_auth.testing: they must behave as
documented, since users build their own tests on them."""

from __future__ import annotations

import asyncio
import threading

import jwt
import pytest
from support.keys import ec_key, other_key, signing_key

from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.tokens import RefreshableTokenSource, Token
from ambient_grpc_auth.errors import ConfigurationError, TokenRejectedError, TokenUnavailableError
from ambient_grpc_auth.jwk import jwk_thumbprint, parse_jwks
from ambient_grpc_auth.principal import CallerKind
from ambient_grpc_auth.server.authn import JwtAuthenticator
from ambient_grpc_auth.testing import FakeClock, FakeIssuer, FakeTokenSource

ISS = "https://idp.example.test"
AUD = "my-api"


def reason_of(authenticator: JwtAuthenticator, token: str) -> str:
    with pytest.raises(TokenRejectedError) as info:
        authenticator.authenticate(token)
    return info.value.reason


# --- FakeClock -------------------------------------------------------------------


def test_fake_clock_moves_only_when_advanced() -> None:
    clock = FakeClock(start=5_000.0)
    assert (clock.time(), clock.monotonic()) == (5_000.0, 1000.0)
    assert (clock.time(), clock.monotonic()) == (5_000.0, 1000.0)
    clock.advance(2.5)
    assert (clock.time(), clock.monotonic()) == (5_002.5, 1002.5)
    assert FakeClock().time() == 1_800_000_000.0


def test_fake_clock_drives_the_librarys_expiry_logic() -> None:
    clock = FakeClock()
    upstream = FakeTokenSource(ttl=600, clock=clock)
    cache = CachingTokenSource(upstream, clock=clock)
    first = cache.get_token()
    assert first.expires_at == clock.time() + 600
    clock.advance(60)
    assert cache.get_token() is first  # still fresh: no fetch
    clock.advance(600)
    assert cache.get_token().value == "token-2"  # expired: fetched again
    assert upstream.fetches == 2


# --- FakeTokenSource -------------------------------------------------------------


def test_fake_source_holds_its_token_until_invalidated() -> None:
    source = FakeTokenSource(prefix="t")
    assert isinstance(source, RefreshableTokenSource)
    assert not hasattr(source, "peek")  # callers take the plain get_token path
    assert source.current is None
    first = source.get_token()
    assert first == Token("t-1", None)
    assert source.get_token() is first
    assert (source.fetches, source.current) == (1, first)

    source.invalidate(Token("some-older-token"))  # stale: keeps the held one
    assert source.get_token() is first
    source.invalidate(first)
    assert source.current is None
    assert source.get_token().value == "t-2"
    assert source.fetches == 2
    assert source.invalidated == ["some-older-token", "t-1"]


def test_fake_source_plays_its_script_then_makes_tokens_up() -> None:
    clock = FakeClock()
    signed_exp = clock.time() + 30
    signed = FakeIssuer(key=signing_key()).mint(expires_at=signed_exp)
    down = TokenUnavailableError("control plane down (test)", retryable=True)
    scripted = Token("scripted", clock.time() + 10)
    source = FakeTokenSource(scripted, down, signed, ttl=60, clock=clock)

    assert source.get_token() is scripted
    clock.advance(9)
    assert source.get_token() is scripted
    clock.advance(1)  # expired: the next call fetches
    with pytest.raises(TokenUnavailableError) as info:
        source.get_token()
    assert info.value is down
    assert (source.fetches, source.failures, source.current) == (1, 1, None)
    from_str = source.get_token()
    assert (from_str.value, from_str.expires_at) == (signed, signed_exp)
    source.invalidate(from_str)
    made_up = source.get_token()
    assert made_up == Token("token-3", clock.time() + 60)  # the third token handed out

    source.enqueue(RuntimeError("bug"), Token("queued"))
    source.invalidate(made_up)
    with pytest.raises(RuntimeError):
        source.get_token()
    assert source.get_token().value == "queued"
    assert (source.fetches, source.failures) == (4, 2)


def test_fake_source_repr_shows_no_token() -> None:
    source = FakeTokenSource(Token("sekret-value"))
    source.invalidate(source.get_token())
    assert "sekret" not in repr(source)
    assert repr(source) == "FakeTokenSource(fetches=1, failures=0, invalidated=1)"
    with pytest.raises(ConfigurationError):
        FakeTokenSource(prefix="")


async def test_fake_source_async_counts_and_invalidates() -> None:
    source = FakeTokenSource(TokenUnavailableError("nope", retryable=False), prefix="a")
    with pytest.raises(TokenUnavailableError):
        await source.get_token_async()
    tokens = await asyncio.gather(*(source.get_token_async() for _ in range(20)))
    assert {t.value for t in tokens} == {"a-1"}
    source.invalidate(tokens[0])
    assert (await source.get_token_async()).value == "a-2"
    assert (source.fetches, source.failures, source.invalidated) == (2, 1, ["a-1"])


def test_fake_source_is_one_fetch_for_many_threads() -> None:
    source = FakeTokenSource()
    start = threading.Barrier(16)
    seen: list[str] = []

    def take() -> None:
        start.wait(5)
        seen.append(source.get_token().value)

    threads = [threading.Thread(target=take) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert seen == ["token-1"] * 16
    assert source.fetches == 1


# --- FakeIssuer ------------------------------------------------------------------


def test_minted_tokens_verify_with_the_matching_configuration() -> None:
    clock = FakeClock()
    issuer = FakeIssuer(ISS, audience=AUD, key=signing_key(), kid="k1", clock=clock)
    authenticator = JwtAuthenticator(issuers=[issuer.trusted_issuer()], clock=clock)

    token = issuer.mint("alice", ttl=120, claims={"email": "alice@example.test"})
    principal = authenticator.authenticate(token)
    assert (principal.username, principal.kind, principal.issuer) == ("alice", CallerKind.USER, ISS)
    assert principal.claims["email"] == "alice@example.test"
    assert principal.claims["exp"] == int(clock.time() + 120)
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "JWT", "kid": "k1"}

    clock.advance(120 + 30)  # past exp plus the default leeway
    assert reason_of(authenticator, token) == "expired"


def test_minted_tokens_fail_with_another_key() -> None:
    clock = FakeClock()
    trusted = FakeIssuer(ISS, audience=AUD, key=signing_key(), kid="k1", clock=clock)
    forger = FakeIssuer(ISS, audience=AUD, key=other_key(), kid="k1", clock=clock)
    authenticator = JwtAuthenticator(issuers=[trusted.trusted_issuer()], clock=clock)
    assert reason_of(authenticator, forger.mint()) == "bad_signature"
    other = JwtAuthenticator(issuers=[forger.trusted_issuer()], clock=clock)
    assert reason_of(other, trusted.mint()) == "bad_signature"
    assert other.authenticate(forger.mint()).username == "alice"


def test_mint_overrides_are_applied_and_checked_by_the_server() -> None:
    clock = FakeClock()
    issuer = FakeIssuer(ISS, audience=AUD, key=signing_key(), clock=clock)
    authenticator = JwtAuthenticator(issuers=[issuer.trusted_issuer(leeway=0)], clock=clock)
    assert reason_of(authenticator, issuer.mint(audience="someone-else")) == "wrong_audience"
    assert authenticator.authenticate(issuer.mint(audience=["x", AUD])).username == "alice"
    assert reason_of(authenticator, issuer.mint(omit=("exp",))) == "missing_claim"
    assert reason_of(authenticator, issuer.mint(ttl=-1)) == "expired"
    assert reason_of(authenticator, issuer.mint(now=clock.time() + 60)) == "not_yet_valid"
    assert reason_of(authenticator, issuer.mint(None)) == "no_subject"
    assert reason_of(authenticator, issuer.mint(headers={"kid": "unknown"})) == "unknown_kid"
    expires = clock.time() + 5
    assert authenticator.authenticate(issuer.mint(expires_at=expires)).claims["exp"] == expires
    overridden = issuer.mint(claims={"sub": "bob", "jti": "fixed"})
    assert authenticator.authenticate(overridden).claims["jti"] == "fixed"
    assert authenticator.authenticate(overridden).username == "bob"


def test_runner_tokens_are_session_scoped() -> None:
    clock = FakeClock()
    cp = FakeIssuer("https://cp.test", key=signing_key(), clock=clock)
    authenticator = JwtAuthenticator(issuers=[cp.trusted_issuer(control_plane=True)], clock=clock)
    principal = authenticator.authenticate(cp.runner_token("s-1", claims={"extra": 1}))
    assert principal.username == "runner:s-1"
    assert principal.claims[SESSION_ID_CLAIM] == "s-1"
    assert principal.claims[TOKEN_USE_CLAIM] == RUNNER_TOKEN_USE
    assert principal.claims["extra"] == 1
    assert cp.trusted_issuer(control_plane=True).control_plane


def test_issuer_generates_its_own_keys() -> None:
    clock = FakeClock()
    ec_issuer = FakeIssuer(ISS, algorithm="ES384", clock=clock)
    assert ec_issuer.algorithm == "ES384"
    rsa_issuer = FakeIssuer(ISS, clock=clock)  # an RSA-2048 key of its own
    assert rsa_issuer.algorithm == "RS256"
    assert rsa_issuer.public_key.public_numbers() != signing_key().public_key().public_numbers()
    for issuer in (ec_issuer, rsa_issuer):
        authenticator = JwtAuthenticator(issuers=[issuer.trusted_issuer()], clock=clock)
        assert authenticator.authenticate(issuer.mint()).username == "alice"
    mixed = JwtAuthenticator(issuers=[rsa_issuer.trusted_issuer()], clock=clock)
    assert reason_of(mixed, FakeIssuer(ISS, key=other_key(), clock=clock).mint()) == (
        "bad_signature"
    )


def test_issuer_without_kid_and_its_jwks() -> None:
    clock = FakeClock()
    issuer = FakeIssuer(ISS, key=ec_key(), kid=None, clock=clock)
    assert issuer.algorithm == "ES256"
    token = issuer.mint()
    assert "kid" not in jwt.get_unverified_header(token)
    thumbprint = jwk_thumbprint(ec_key().public_key())
    assert list(issuer.key_set().keys) == [thumbprint]
    assert JwtAuthenticator(issuers=[issuer.trusted_issuer()], clock=clock).authenticate(token)

    published = parse_jwks(issuer.jwks())
    assert list(published) == [thumbprint]
    assert published[thumbprint].alg == "ES256"
    assert published[thumbprint].key.public_numbers() == ec_key().public_key().public_numbers()


def test_issuer_refuses_an_algorithm_that_does_not_fit_its_key() -> None:
    with pytest.raises(ConfigurationError):
        FakeIssuer(key=signing_key(), algorithm="ES256")
    with pytest.raises(ConfigurationError):
        FakeIssuer(key=ec_key(), algorithm="RS256")
    with pytest.raises(ConfigurationError):
        FakeIssuer(key=ec_key(), algorithm="ES384")  # a P-256 key
    assert FakeIssuer(key=signing_key(), algorithm="PS256").algorithm == "PS256"
    assert "kid='test-key-1'" in repr(FakeIssuer(key=signing_key()))
