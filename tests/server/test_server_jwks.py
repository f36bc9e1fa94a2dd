"""Key sources: JWK parsing, static key sets, and the JWKS URL cache against a
real local HTTP server (rotation, outages, unknown-kid floods, limits)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from support.keys import ec_key, jwk_of, other_key, public_pem, signing_key
from support.server import AUDIENCE, IDP_ISSUER, JwksServer, mint
from support.waiting import wait_until

from ambient_grpc_auth.controlplane import keys as cp_keys
from ambient_grpc_auth.errors import ConfigurationError, KeyFileError, TokenRejectedError
from ambient_grpc_auth.jwk import jwk_thumbprint, key_from_jwk, parse_jwks
from ambient_grpc_auth.server.authn import JwtAuthenticator, TrustedIssuer
from ambient_grpc_auth.server.jwks import JwksCache, KeysUnavailableError, StaticKeySet
from ambient_grpc_auth.server.metrics import AuthMetrics
from ambient_grpc_auth.testing import FakeClock

COOLDOWN = 30.0


def doc(*entries: dict[str, object]) -> dict[str, object]:
    return {"keys": list(entries)}


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer(doc(jwk_of(signing_key(), "k1")))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def cache_for(server: JwksServer, clock: FakeClock, **kw: object) -> JwksCache:
    return JwksCache(server.url, clock=clock, cooldown=COOLDOWN, **kw)  # type: ignore[arg-type]


# --- JWK parsing -----------------------------------------------------------------


def test_thumbprint_matches_the_control_plane_keys_module() -> None:
    # The control plane names its signing keys with the same function verifiers use.
    published = cp_keys.SigningKey.from_private_key(signing_key()).public_jwk()
    assert published["kid"] == jwk_thumbprint(signing_key().public_key())
    assert key_from_jwk({**published, "kid": None}).kid == published["kid"]


def test_ec_thumbprint_is_rfc7638() -> None:
    members = jwk_of(ec_key(), None)
    canonical = json.dumps(
        {k: members[k] for k in ("crv", "kty", "x", "y")}, sort_keys=True, separators=(",", ":")
    )
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
    assert jwk_thumbprint(ec_key().public_key()) == expected.decode()


def test_key_from_jwk_takes_public_members_only() -> None:
    private_jwk = json.loads(
        __import__("jwt").algorithms.RSAAlgorithm.to_jwk(signing_key())
    )  # includes "d", "p", "q"...
    private_jwk.pop("key_ops", None)
    key = key_from_jwk({**private_jwk, "kid": "k"})
    assert isinstance(key.key, rsa.RSAPublicKey)
    assert key.kid == "k"
    no_kid = key_from_jwk(jwk_of(signing_key(), None))
    assert no_kid.kid == jwk_thumbprint(signing_key().public_key())


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},  # far too short
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "RSA", "n": "@@@", "e": "AQAB"},
        {"kty": "OKP", "crv": "X25519", "x": "AA"},
        {"kty": "nope"},
    ],
)
def test_unusable_jwks_are_refused(jwk: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        key_from_jwk(jwk)


def test_encryption_keys_and_bad_ops_are_refused() -> None:
    base = jwk_of(signing_key(), "k")
    with pytest.raises(ValueError):
        key_from_jwk({**base, "use": "enc"})
    with pytest.raises(ValueError):
        key_from_jwk({**base, "key_ops": ["encrypt"]})
    assert key_from_jwk({**base, "use": "sig", "key_ops": ["verify"]}).kid == "k"


def test_parse_jwks_skips_bad_keys_and_duplicate_kids() -> None:
    keys = parse_jwks(
        json.dumps(
            doc(
                {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                jwk_of(signing_key(), "a"),
                jwk_of(other_key(), "a"),
                jwk_of(ec_key(), "b"),
                "not-an-object",  # type: ignore[arg-type]
            )
        )
    )
    assert sorted(keys) == ["a", "b"]
    assert keys["a"].key.public_numbers() == signing_key().public_key().public_numbers()  # type: ignore[union-attr]
    for bad in (b"", b"[]", b"{}", b'{"keys": "x"}', json.dumps(doc({"kty": "oct"})).encode()):
        with pytest.raises(ValueError):
            parse_jwks(bad)


# --- static key sets -------------------------------------------------------------


def test_pem_files(tmp_path: Path) -> None:
    rsa_file, ec_file = tmp_path / "rsa.pem", tmp_path / "ec.pem"
    rsa_file.write_bytes(public_pem(signing_key()))
    ec_file.write_bytes(public_pem(ec_key()))
    keys = StaticKeySet.from_pem_files([rsa_file, ec_file])
    assert set(keys.keys) == {
        jwk_thumbprint(signing_key().public_key()),
        jwk_thumbprint(ec_key().public_key()),
    }
    with pytest.raises(TokenRejectedError) as err:
        keys.get_key(None)  # two keys: a kid is required
    assert err.value.reason == "unknown_kid"
    single = StaticKeySet.from_pem_files([rsa_file])
    assert single.get_key(None).kid == jwk_thumbprint(signing_key().public_key())
    assert asyncio.run(single.get_key_async(None)) is single.get_key(None)


def test_pem_file_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    weak = tmp_path / "weak.pem"
    weak.write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    for path in (garbage, weak, tmp_path / "missing.pem"):
        with pytest.raises(KeyFileError) as err:
            StaticKeySet.from_pem_files([path])
        assert "BEGIN" not in str(err.value)
    with pytest.raises(ConfigurationError):
        StaticKeySet.from_pem_files([])


def test_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(doc(jwk_of(signing_key(), "k1"), jwk_of(ec_key(), "k2"))))
    keys = StaticKeySet.from_jwks_file(path)
    assert sorted(keys.keys) == ["k1", "k2"]
    path.write_text("{not json")
    with pytest.raises(KeyFileError):
        StaticKeySet.from_jwks_file(path)


# --- JWKS cache ------------------------------------------------------------------


def test_first_use_fetches_then_serves_from_memory(
    jwks_server: JwksServer, clock: FakeClock
) -> None:
    metrics = AuthMetrics()
    cache = cache_for(jwks_server, clock, metrics=metrics)
    assert cache.keys is None
    assert cache.get_key("k1").kid == "k1"
    assert cache.get_key(None).kid == "k1"  # one key: kid optional
    assert asyncio.run(cache.get_key_async("k1")).kid == "k1"
    assert jwks_server.requests == 1
    assert metrics.snapshot().jwks_fetches == 1
    assert jwks_server.authorization == [None]


def test_key_rotation_is_picked_up_after_refetch(jwks_server: JwksServer, clock: FakeClock) -> None:
    cache = cache_for(jwks_server, clock)
    auth = JwtAuthenticator(
        issuers=[TrustedIssuer(issuer=IDP_ISSUER, audiences=(AUDIENCE,), keys=cache)], clock=clock
    )
    assert auth.authenticate(mint(clock.time(), kid="k1")).username == "alice"
    jwks_server.document = doc(jwk_of(signing_key(), "k1"), jwk_of(other_key(), "k2"))
    rotated = mint(clock.time(), kid="k2", key=other_key())
    # Within the cooldown of the first fetch the new kid is still unknown...
    with pytest.raises(TokenRejectedError) as err:
        auth.authenticate(rotated)
    assert err.value.reason == "unknown_kid"
    assert jwks_server.requests == 1
    # ...and once it has passed, one refetch finds it.
    clock.advance(COOLDOWN)
    assert auth.authenticate(rotated).username == "alice"
    assert auth.authenticate(mint(clock.time(), kid="k1")).username == "alice"
    assert jwks_server.requests == 2


def test_endpoint_down_keeps_last_good_key_set(jwks_server: JwksServer, clock: FakeClock) -> None:
    metrics = AuthMetrics()
    cache = cache_for(jwks_server, clock, refresh_interval=60.0, metrics=metrics)
    assert cache.get_key("k1").kid == "k1"
    jwks_server.status = 503
    clock.advance(61)  # stale: served at once, a background refresh fails
    assert cache.get_key("k1").kid == "k1"
    wait_until(lambda: metrics.snapshot().jwks_fetch_failures == 1)
    assert jwks_server.requests == 2
    jwks_server.close()  # now nothing listens at all
    clock.advance(61)
    assert cache.get_key("k1").kid == "k1"
    wait_until(lambda: metrics.snapshot().jwks_fetch_failures == 2)
    with pytest.raises(TokenRejectedError):
        cache.get_key("k-new")
    snap = metrics.snapshot()
    assert snap.jwks_fetches == 3
    assert snap.jwks_fetch_failures == 2


def test_unknown_kid_flood_fetches_at_most_once_per_cooldown(
    jwks_server: JwksServer, clock: FakeClock
) -> None:
    cache = cache_for(jwks_server, clock)
    assert cache.get_key("k1").kid == "k1"
    clock.advance(COOLDOWN)
    rejected: list[str] = []
    lock = threading.Lock()

    def flood(worker: int) -> None:
        for i in range(50):
            try:
                cache.get_key(f"forged-{worker}-{i}")
            except TokenRejectedError as exc:
                with lock:
                    rejected.append(exc.reason)

    threads = [threading.Thread(target=flood, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert rejected == ["unknown_kid"] * 400
    assert jwks_server.requests == 2  # the initial fetch plus one for the whole flood

    async def async_flood() -> list[BaseException | object]:
        return await asyncio.gather(
            *(cache.get_key_async(f"async-forged-{i}") for i in range(200)), return_exceptions=True
        )

    results = asyncio.run(async_flood())
    assert all(isinstance(r, TokenRejectedError) for r in results)
    assert jwks_server.requests == 2  # still inside the cooldown
    clock.advance(COOLDOWN)
    results = asyncio.run(async_flood())
    assert all(isinstance(r, TokenRejectedError) for r in results)
    assert jwks_server.requests == 3


def test_concurrent_first_use_is_single_flight(jwks_server: JwksServer, clock: FakeClock) -> None:
    jwks_server.hold = threading.Event()
    cache = cache_for(jwks_server, clock)
    found: list[str] = []

    def get() -> None:
        found.append(cache.get_key("k1").kid)

    threads = [threading.Thread(target=get) for _ in range(10)]
    for t in threads:
        t.start()
    jwks_server.hold.set()
    for t in threads:
        t.join(10)
    assert found == ["k1"] * 10
    assert jwks_server.requests == 1


def test_stale_key_set_is_served_while_it_is_refreshed(
    jwks_server: JwksServer, clock: FakeClock
) -> None:
    """A known kid never waits for a refetch: with the refresh of a stale set
    held at the endpoint, lookups of known kids still answer."""
    cache = cache_for(jwks_server, clock, refresh_interval=60.0)
    assert cache.get_key("k1").kid == "k1"
    release = jwks_server.hold = threading.Event()
    jwks_server.document = doc(jwk_of(signing_key(), "k1"), jwk_of(other_key(), "k2"))
    clock.advance(61)
    try:
        for _ in range(3):  # one background refresh, the key served every time
            assert cache.get_key("k1").kid == "k1"
            assert asyncio.run(cache.get_key_async("k1")).kid == "k1"
        wait_until(lambda: jwks_server.requests == 2)
        assert cache.fetch_count == 2
        assert "k2" not in (cache.keys or {})  # the refresh is still held
    finally:
        release.set()
    wait_until(lambda: "k2" in (cache.keys or {}))


def test_known_kids_do_not_wait_for_an_unknown_kid_fetch(
    jwks_server: JwksServer, clock: FakeClock
) -> None:
    cache = cache_for(jwks_server, clock)
    assert cache.get_key("k1").kid == "k1"
    clock.advance(COOLDOWN)
    release = jwks_server.hold = threading.Event()
    errors: list[str] = []
    waiter = threading.Thread(
        target=lambda: errors.append(_reason(lambda: cache.get_key("k-unknown")))
    )
    waiter.start()
    try:
        wait_until(lambda: jwks_server.requests == 2)  # the refetch is running
        assert cache.get_key("k1").kid == "k1"
        assert asyncio.run(cache.get_key_async("k1")).kid == "k1"
        assert waiter.is_alive()  # ...and still running after the known kids answered
    finally:
        release.set()
    waiter.join(5)
    assert errors == ["unknown_kid"]


def _reason(fn: Callable[[], object]) -> str:
    try:
        fn()
    except TokenRejectedError as exc:
        return exc.reason
    return "accepted"


def test_waiters_for_a_running_fetch_are_bounded(jwks_server: JwksServer, clock: FakeClock) -> None:
    """Beyond ``max_waiters`` calls waiting on one fetch, further unknown-kid
    calls are answered UNAVAILABLE at once instead of holding a thread."""
    cache = cache_for(jwks_server, clock, max_waiters=3)
    release = jwks_server.hold = threading.Event()
    results: list[str] = []
    lock = threading.Lock()

    def get(kid: str) -> None:
        reason = _reason(lambda: cache.get_key(kid))
        with lock:
            results.append(reason)

    leader = threading.Thread(target=get, args=("k1",))
    leader.start()
    wait_until(lambda: jwks_server.requests == 1)
    waiters = [threading.Thread(target=get, args=(f"k-{i}",)) for i in range(3)]
    for t in waiters:
        t.start()
    wait_until(lambda: cache.waiters == 3)
    # The next ones are refused at once, in this thread, while the fetch is held.
    with pytest.raises(KeysUnavailableError) as err:
        cache.get_key("k-late")
    assert err.value.code is grpc.StatusCode.UNAVAILABLE

    async def late() -> None:
        with pytest.raises(KeysUnavailableError):
            await cache.get_key_async("k-late-async")

    asyncio.run(late())
    assert cache.waiters == 3
    release.set()
    for t in [leader, *waiters]:
        t.join(5)
    assert sorted(results) == ["accepted", "unknown_kid", "unknown_kid", "unknown_kid"]
    assert cache.waiters == 0
    assert jwks_server.requests == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_waiting_for_a_fetch_is_bounded_by_the_timeout(
    jwks_server: JwksServer, clock: FakeClock, mode: str
) -> None:
    cache = cache_for(jwks_server, clock, timeout=0.3)
    release = jwks_server.hold = threading.Event()
    try:
        leader = threading.Thread(target=lambda: _reason(lambda: cache.get_key("k1")))
        leader.start()
        wait_until(lambda: jwks_server.requests == 1)
        get: Callable[[], object] = (
            (lambda: cache.get_key("k-other"))
            if mode == "sync"
            else (lambda: asyncio.run(cache.get_key_async("k-other")))
        )
        with pytest.raises(KeysUnavailableError):
            get()
        assert cache.waiters == 0
    finally:
        release.set()
    leader.join(5)


async def test_async_fetch_does_not_block_the_loop(
    jwks_server: JwksServer, clock: FakeClock
) -> None:
    """The endpoint answers only after a task on this loop releases it: if the
    fetch blocked the loop, the release could never run."""
    release = threading.Event()
    jwks_server.hold = release
    cache = cache_for(jwks_server, clock)

    async def release_soon() -> None:
        release.set()

    fetch = asyncio.create_task(cache.get_key_async("k1"))
    await release_soon()
    assert (await asyncio.wait_for(fetch, 5)).kid == "k1"


def test_nothing_fetched_yet_means_unavailable(jwks_server: JwksServer, clock: FakeClock) -> None:
    jwks_server.status = 500
    cache = cache_for(jwks_server, clock)
    for _ in range(3):
        with pytest.raises(KeysUnavailableError) as err:
            cache.get_key("k1")
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
    assert jwks_server.requests == 1  # retried only after the cooldown
    jwks_server.status = 200
    clock.advance(COOLDOWN)
    assert cache.get_key("k1").kid == "k1"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"x" * (64 * 1024 + 1)),  # over the size cap
        (200, b"<html>not json</html>"),
        (200, json.dumps(doc({"kty": "oct", "k": "AA"})).encode()),
        (302, b"{}"),  # redirects are not followed
        (404, b"{}"),
    ],
)
def test_bad_responses_are_failed_fetches(
    jwks_server: JwksServer, clock: FakeClock, status: int, body: bytes
) -> None:
    jwks_server.status, jwks_server.body = status, body
    cache = cache_for(jwks_server, clock, max_bytes=64 * 1024)
    assert cache.refresh() is False
    assert cache.keys is None
    assert jwks_server.requests == 1


def test_fetch_timeout(jwks_server: JwksServer, clock: FakeClock) -> None:
    jwks_server.hold = threading.Event()  # never released before the timeout
    cache = cache_for(jwks_server, clock, timeout=0.3)
    with pytest.raises(KeysUnavailableError):
        cache.get_key("k1")


def test_bearer_token_file_is_sent_and_reread(
    jwks_server: JwksServer, clock: FakeClock, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-one\n")
    cache = cache_for(jwks_server, clock, bearer_token_file=token_file)
    assert cache.refresh()
    token_file.write_text("sa-token-two")
    assert cache.refresh()
    assert jwks_server.authorization == ["Bearer sa-token-one", "Bearer sa-token-two"]
    assert "sa-token" not in repr(cache)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.test/jwks", "http://", "not a url", ""]
)
def test_only_http_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        JwksCache(url)


@pytest.mark.parametrize(
    "url", ["http://keys.example.com/jwks", "http://10.0.0.9/jwks", "http://8.8.8.8/jwks"]
)
def test_plaintext_jwks_from_remote_hosts_is_refused(url: str) -> None:
    """Keys read over plaintext from a remote host could be substituted."""
    with pytest.raises(ConfigurationError, match="plaintext") as err:
        JwksCache(url)
    assert "allow_insecure_remote=True" in str(err.value)
    JwksCache("https" + url[4:])
    JwksCache(url, allow_insecure_remote=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/jwks",
        "http://[::1]/jwks",
        "http://localhost/.well-known/jwks.json",
        "http://ambient-cp:8080/.well-known/jwks.json",
        "http://cp.ns.svc.cluster.local/.well-known/jwks.json",
    ],
)
def test_plaintext_jwks_from_local_hosts_is_allowed(url: str) -> None:
    JwksCache(url)
