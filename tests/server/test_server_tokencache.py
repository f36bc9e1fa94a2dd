"""The verified-token cache: bounds, expiry, LRU order, thread safety."""

from __future__ import annotations

import threading
from types import MappingProxyType

import grpc
import pytest
from support.keys import signing_key
from support.server import (
    AUDIENCE,
    ECHO,
    IDP_ISSUER,
    IDP_KID,
    Recorder,
    SyncEcho,
    mint,
    start_sync_server,
)

from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.jwk import VerificationKey
from ambient_grpc_auth.principal import CallerKind, Principal
from ambient_grpc_auth.proto.ambient.testing.v1 import echo_pb2, echo_pb2_grpc
from ambient_grpc_auth.server.authn import JwtAuthenticator, TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.interceptor import ServerAuthInterceptor
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.server.policy import OwnershipPolicy
from ambient_grpc_auth.server.tokencache import VerifiedTokenCache, token_expiry
from ambient_grpc_auth.testing import FakeClock

ALICE = Principal("alice", CallerKind.USER)


def test_bounded_under_100k_distinct_tokens() -> None:
    clock = FakeClock()
    cache = VerifiedTokenCache(clock=clock)
    assert cache.max_entries == 10_000
    far = clock.time() + 3600
    for i in range(100_000):
        cache.put(i.to_bytes(32, "big"), ALICE, far)
        if i % 9_973 == 0:
            assert len(cache) <= 10_000
    assert len(cache) == 10_000
    # The most recent entries survive; the oldest were evicted.
    assert cache.get((99_999).to_bytes(32, "big")) is ALICE
    assert cache.get((90_000).to_bytes(32, "big")) is ALICE
    assert cache.get((89_999).to_bytes(32, "big")) is None
    assert cache.get((0).to_bytes(32, "big")) is None


def test_entries_expire_at_exp_without_leeway() -> None:
    clock = FakeClock()
    cache = VerifiedTokenCache(clock=clock)
    key = cache.key_for("token")
    cache.put(key, ALICE, clock.time() + 10)
    clock.advance(9.9)
    assert cache.get(key) is ALICE
    clock.advance(0.1)
    assert cache.get(key) is None
    assert len(cache) == 0  # removed on the expired read


def test_max_ttl_caps_every_entry() -> None:
    clock = FakeClock()
    cache = VerifiedTokenCache(clock=clock, max_ttl=60)
    cache.put(b"a" * 32, ALICE, None)  # no exp (static token)
    cache.put(b"b" * 32, ALICE, clock.time() + 3600)
    clock.advance(59)
    assert cache.get(b"a" * 32) is ALICE
    assert cache.get(b"b" * 32) is ALICE
    clock.advance(1)
    assert cache.get(b"a" * 32) is None
    assert cache.get(b"b" * 32) is None


def test_already_expired_entries_are_not_stored() -> None:
    clock = FakeClock()
    cache = VerifiedTokenCache(clock=clock)
    cache.put(b"k" * 32, ALICE, clock.time())
    cache.put(b"j" * 32, ALICE, clock.time() - 5)
    assert len(cache) == 0


def test_lru_order() -> None:
    cache = VerifiedTokenCache(max_entries=2, clock=FakeClock())
    cache.put(b"a", ALICE, None)
    cache.put(b"b", ALICE, None)
    assert cache.get(b"a") is ALICE  # a is now the most recent
    cache.put(b"c", ALICE, None)
    assert cache.get(b"b") is None
    assert cache.get(b"a") is ALICE
    assert cache.get(b"c") is ALICE


def test_keys_are_digests() -> None:
    key = VerifiedTokenCache.key_for("eyJhbGciOi.secret.token")
    assert len(key) == 32
    assert b"secret" not in key
    assert VerifiedTokenCache.key_for("eyJhbGciOi.secret.token") == key
    assert "secret" not in repr(VerifiedTokenCache())


def test_token_expiry() -> None:
    def with_exp(exp: object) -> Principal:
        return Principal("a", CallerKind.USER, claims=MappingProxyType({"exp": exp}))

    assert token_expiry(with_exp(1234)) == 1234.0
    assert token_expiry(with_exp(12.5)) == 12.5
    for bad in (True, "1234", None, float("inf"), float("nan")):
        assert token_expiry(with_exp(bad)) is None
    assert token_expiry(ALICE) is None


def test_invalid_configuration() -> None:
    with pytest.raises(ConfigurationError):
        VerifiedTokenCache(max_entries=0)
    with pytest.raises(ConfigurationError):
        VerifiedTokenCache(max_ttl=0)


def test_concurrent_use_keeps_the_bound() -> None:
    cache = VerifiedTokenCache(max_entries=500, clock=FakeClock())

    def work(base: int) -> None:
        for i in range(5_000):
            key = (base * 1_000_000 + i).to_bytes(32, "big")
            cache.put(key, ALICE, None)
            cache.get(key)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(cache) == 500


def test_end_to_end_cache_stays_bounded() -> None:
    """200 distinct valid tokens through a real server with a 50-entry cache."""
    clock = FakeClock()
    cache = VerifiedTokenCache(max_entries=50, clock=clock)
    metrics = AuthMetrics()
    issuer = TrustedIssuer(
        issuer=IDP_ISSUER,
        audiences=(AUDIENCE,),
        keys=StaticKeySet(keys=[VerificationKey(kid=IDP_KID, key=signing_key().public_key())]),
    )
    config = ServerAuthConfig(
        authenticator=JwtAuthenticator(issuers=[issuer], clock=clock),
        ownership=OwnershipPolicy(rules={}),
        metrics=metrics,
        token_cache=cache,
    )
    recorder = Recorder()
    server = start_sync_server(
        [ServerAuthInterceptor(config=config)],
        lambda s: echo_pb2_grpc.add_EchoServiceServicer_to_server(SyncEcho(recorder), s),
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            echo = channel.unary_unary(
                ECHO + "Echo",
                request_serializer=echo_pb2.EchoRequest.SerializeToString,
                response_deserializer=echo_pb2.EchoResponse.FromString,
            )
            tokens = [mint(clock.time(), sub=f"user-{i}") for i in range(200)]
            for i, token in enumerate(tokens):
                reply = echo(
                    echo_pb2.EchoRequest(), metadata=(("authorization", f"Bearer {token}"),)
                )
                assert reply.caller == f"user-{i}"
                assert len(cache) <= 50
            # The most recent token is still cached: no new verification.
            echo(echo_pb2.EchoRequest(), metadata=(("authorization", f"Bearer {tokens[-1]}"),))
    finally:
        server.stop()
    snap = metrics.snapshot()
    assert len(cache) == 50
    assert (snap.cache_misses, snap.cache_hits, snap.allowed) == (200, 1, 201)
