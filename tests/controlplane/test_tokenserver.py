"""The /token endpoint over real sockets: compatibility, v2, JWKS, rotation, OIDC upstream.

Every server here listens on 127.0.0.1 port 0 and is closed in teardown. The
encryption key is RSA-4096 throughout (generated once per test process).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import CIMultiDict
from support.cp import (
    copy_keys,
    fetch_jwks,
    get,
    other_rsa4096,
    public_pem,
    runner_style_bearer,
    serving,
    verify_with,
)
from support.keys import other_key
from support.waiting import async_wait_until as wait_until

from ambient_grpc_auth.claims import RUNNER_TOKEN_USE, SESSION_ID_CLAIM, TOKEN_USE_CLAIM
from ambient_grpc_auth.controlplane.app import STATE
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import (
    DEFAULT_SUBJECT,
    IssuedToken,
    JwtIssuer,
    format_rfc3339,
)
from ambient_grpc_auth.controlplane.keys import (
    load_keys,
    load_public_key,
    private_key_pem,
    rotate_signing_key,
)
from ambient_grpc_auth.controlplane.oidc_issuer import OidcClientCredentialsIssuer, OidcSettings
from ambient_grpc_auth.controlplane.server import create_app
from ambient_grpc_auth.controlplane.signing import SigningKey, SigningKeySet, generate_signing_key
from ambient_grpc_auth.errors import ConfigurationError, TokenRejectedError
from ambient_grpc_auth.jwk import parse_jwks
from ambient_grpc_auth.proof import encrypt_v1, encrypt_v2
from ambient_grpc_auth.server.authn import JwtAuthenticator, TrustedIssuer
from ambient_grpc_auth.server.jwks import StaticKeySet
from ambient_grpc_auth.testing import FakeClock

SID = "session-0123456789abcdef"
ISS = "https://cp.ambient.test"
AUD = "ambient-api-server"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
CLIENT_ID = "ambient-cp"
CLIENT_SECRET = "s3cr:et pass+word"  # needs form-encoding inside Basic auth
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return copy_keys(tmp_path / "keys")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


def cfg(keys_dir: Path, **kw: Any) -> TokenServerConfig:
    kw.setdefault("issuer", ISS)
    return TokenServerConfig(keys_dir=keys_dir, audience=AUD, **kw)


def pub_key(keys_dir: Path) -> rsa.RSAPublicKey:
    return load_public_key(public_pem(keys_dir))


async def token_of(http: aiohttp.ClientSession, url: str, bearer: str) -> dict[str, str]:
    status, body, _ = await get(http, url, bearer)
    assert status == 200, body
    doc: dict[str, str] = json.loads(body)
    return doc


# ---------------------------------------------------------------- compatibility


async def test_runner_request_gets_a_verifiable_token(
    keys_dir: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(cfg(keys_dir)) as srv:
        bearer = runner_style_bearer(public_pem(keys_dir), SID)
        status, body, headers = await get(http, srv.token_url, bearer)
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json")
        assert headers["Cache-Control"] == "no-store"
        doc = json.loads(body)
        assert set(doc) == {"token", "expires_at"}
        assert RFC3339.fullmatch(doc["expires_at"])
        claims = verify_with(
            await fetch_jwks(http, srv.jwks_url), doc["token"], issuer=ISS, audience=AUD
        )
        health_status, health_body, _ = await get(http, srv.url + "/healthz")
        assert (health_status, health_body) == (200, "ok")
    assert claims[SESSION_ID_CLAIM] == SID
    assert claims[TOKEN_USE_CLAIM] == RUNNER_TOKEN_USE
    assert claims["sub"] == DEFAULT_SUBJECT
    assert claims["exp"] - claims["iat"] == 900
    # A short bearer: only what verifiers read (preferred_username for the
    # platform's API server), no typ header.
    assert set(claims) == {
        "iss",
        "aud",
        "sub",
        "iat",
        "exp",
        SESSION_ID_CLAIM,
        TOKEN_USE_CLAIM,
        "preferred_username",
    }
    assert jwt.get_unverified_header(doc["token"]) == {
        "alg": "ES256",
        "kid": jwt.get_unverified_header(doc["token"])["kid"],
    }
    assert len(doc["token"].rsplit(".", 1)[1]) == 86
    expires = datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
    assert expires.timestamp() == claims["exp"]
    assert abs(claims["iat"] - time.time()) < 30
    # Logs carry the session id and outcome, never the proof or the token.
    assert SID in caplog.text
    assert "issued" in caplog.text
    assert bearer not in caplog.text
    assert doc["token"] not in caplog.text


async def test_refusals_have_the_contract_statuses(
    keys_dir: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pem = public_pem(keys_dir)
    good = runner_style_bearer(pem, SID)
    wrong_key = encrypt_v1(other_rsa4096(), SID)  # right size, wrong key
    short = runner_style_bearer(pem, "short")
    spaced = runner_style_bearer(pem, "session 0123456789")
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("missing header", {}, 401),
        ("wrong scheme", {"headers": {"Authorization": f"Basic {good}"}}, 401),
        ("scheme only", {"headers": {"Authorization": "Bearer"}}, 401),
        ("bad base64", {"headers": {"Authorization": "Bearer " + "!" * 684}}, 401),
        ("short base64", {"headers": {"Authorization": "Bearer QUJD"}}, 401),
        ("wrong key", {"headers": {"Authorization": f"Bearer {wrong_key}"}}, 401),
        ("two headers", {"headers": CIMultiDict([("Authorization", f"Bearer {good}")] * 2)}, 401),
        ("short session id", {"headers": {"Authorization": f"Bearer {short}"}}, 403),
        ("session id with whitespace", {"headers": {"Authorization": f"Bearer {spaced}"}}, 403),
        ("POST", {"method": "POST", "headers": {"Authorization": f"Bearer {good}"}}, 405),
        ("PUT", {"method": "PUT"}, 405),
        ("HEAD", {"method": "HEAD"}, 405),
        ("lower-case scheme", {"headers": {"Authorization": f"bearer {good}"}}, 200),
    ]
    async with serving(cfg(keys_dir)) as srv:
        for name, kw, expected in cases:
            status, body, headers = await get(http, srv.token_url, **kw)
            assert status == expected, name
            for secret in (good, wrong_key, short, spaced):
                assert secret not in body, name
            if expected == 200:
                continue
            assert len(body) < 40, name
            if expected == 405:
                assert headers["Allow"] == "GET", name
            if expected == 401:
                assert body in ("missing bearer proof", "invalid session proof"), name
                assert headers.get("WWW-Authenticate") == "Bearer", name
            if expected == 403:
                assert body == "session not allowed", name
        counts = srv.counters.snapshot()
        reasons = srv.counters.reasons()
    assert counts["unauthorized"] == 7
    assert counts["forbidden"] == 2
    assert counts["method_not_allowed"] == 3
    assert counts["issued"] == 1
    assert reasons["header_missing"] == 1
    assert reasons["decrypt_failed"] == 1
    assert reasons["header_duplicate"] == 1
    assert reasons["bad_base64"] == 1
    assert reasons["session_id_too_short"] == 1
    assert reasons["session_id_charset"] == 1
    for secret in (good, wrong_key, short, spaced):
        assert secret not in caplog.text
    # A refused session id that failed the rule is not logged verbatim.
    assert "session 0123456789" not in caplog.text


async def test_oversized_header_is_a_client_error(
    keys_dir: Path, http: aiohttp.ClientSession
) -> None:
    async with serving(cfg(keys_dir, max_header_size=2048)) as srv:
        huge = "A" * 3000
        status, body, _ = await get(http, srv.token_url, huge)
        assert 400 <= status < 500
        assert huge[:100] not in body
        # Between the proof-length limit and the header limit: still a clean 401.
        status, body, _ = await get(http, srv.token_url, "A" * 1500)
        assert (status, body) == (401, "invalid session proof")


# ---------------------------------------------------------------- v2 proofs


async def test_v2_fresh_once_and_window(keys_dir: Path, http: aiohttp.ClientSession) -> None:
    clock = FakeClock(start=time.time())
    pub = pub_key(keys_dir)
    async with serving(cfg(keys_dir, clock=clock, proof_window=60)) as srv:
        fresh = encrypt_v2(pub, SID, now=clock.time())
        doc = await token_of(http, srv.token_url, fresh)
        assert doc["token"]
        status, body, _ = await get(http, srv.token_url, fresh)
        assert (status, body) == (401, "invalid session proof")
        old = encrypt_v2(pub, SID, now=clock.time() - 61)
        future = encrypt_v2(pub, SID, now=clock.time() + 61)
        assert (await get(http, srv.token_url, old))[0] == 401
        assert (await get(http, srv.token_url, future))[0] == 401
        # Within the window on both sides.
        await token_of(http, srv.token_url, encrypt_v2(pub, SID, now=clock.time() - 59))
        await token_of(http, srv.token_url, encrypt_v2(pub, SID, now=clock.time() + 59))
        # A proof made now is too old once the clock has moved on.
        later = encrypt_v2(pub, SID, now=clock.time())
        clock.advance(61)
        assert (await get(http, srv.token_url, later))[0] == 401
        # v1 is still accepted by default.
        await token_of(http, srv.token_url, encrypt_v1(pub, SID))
        reasons = srv.counters.reasons()
    assert reasons == {"replayed": 1, "stale": 2, "future": 1}


async def test_require_fresh_proof_refuses_v1(keys_dir: Path, http: aiohttp.ClientSession) -> None:
    pub = pub_key(keys_dir)
    async with serving(cfg(keys_dir, require_fresh_proof=True)) as srv:
        status, _, _ = await get(
            http, srv.token_url, runner_style_bearer(public_pem(keys_dir), SID)
        )
        assert status == 401
        await token_of(http, srv.token_url, encrypt_v2(pub, SID, now=time.time()))
        assert srv.counters.reasons() == {"fresh_proof_required": 1}


class SharedReplayStore:
    """A ReplayStore standing in for a network one (e.g. Redis) shared by
    replicas: records the threads it is called on and can fail."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, float] = {}
        self.threads: set[int] = set()
        self.fail = False

    def remember(self, key: str, until: float) -> bool:
        self.threads.add(threading.get_ident())
        if self.fail:
            raise ConnectionError("replay store unreachable")
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = until
            return True


async def test_replicas_share_a_replay_store_called_off_the_loop(
    keys_dir: Path, http: aiohttp.ClientSession
) -> None:
    pub = pub_key(keys_dir)
    store = SharedReplayStore()
    async with (
        serving(cfg(keys_dir, replay_store=store)) as one,
        serving(cfg(keys_dir, replay_store=store)) as two,
    ):
        proof = encrypt_v2(pub, SID, now=time.time())
        await token_of(http, one.token_url, proof)
        # The other replica refuses the same proof: the store is shared.
        status, body, _ = await get(http, two.token_url, proof)
        assert (status, body) == (401, "invalid session proof")
        assert two.counters.reasons() == {"replayed": 1}
        # A store that cannot answer fails the request; the proof is not accepted.
        store.fail = True
        status, body, _ = await get(http, one.token_url, encrypt_v2(pub, SID, now=time.time()))
        assert (status, body) == (500, "internal error")
    assert len(store._keys) == 1
    # Never on the event loop's thread (the store may block on I/O).
    assert threading.get_ident() not in store.threads
    assert len(store.threads) >= 1


# ---------------------------------------------------------------- JWKS and discovery


async def test_discovery_and_standard_jwks_client(
    keys_dir: Path, http: aiohttp.ClientSession
) -> None:
    async with serving(cfg(keys_dir, issuer=None)) as srv:
        token = (await token_of(http, srv.token_url, encrypt_v1(pub_key(keys_dir), SID)))["token"]
        status, body, _ = await get(http, srv.url + "/.well-known/openid-configuration")
        assert status == 200
        disc = json.loads(body)
        assert disc["issuer"] == srv.url  # defaults to the server's own URL
        assert disc["jwks_uri"] == srv.jwks_url
        assert disc["id_token_signing_alg_values_supported"] == ["ES256"]
        client = jwt.PyJWKClient(disc["jwks_uri"], cache_jwk_set=False, timeout=5)
        # PyJWKClient does blocking I/O; the server runs on this loop.
        key = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=disc["id_token_signing_alg_values_supported"],
            issuer=disc["issuer"],
            audience=AUD,
        )
        assert claims[SESSION_ID_CLAIM] == SID
        with pytest.raises(jwt.InvalidAudienceError):
            jwt.decode(token, key.key, algorithms=["ES256"], issuer=srv.url, audience="other")
        with pytest.raises(jwt.InvalidIssuerError):
            jwt.decode(token, key.key, algorithms=["ES256"], issuer="https://evil", audience=AUD)
        head, payload, sig = token.split(".")
        forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
        forged[SESSION_ID_CLAIM] = "session-someone-else"
        forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=")
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(
                f"{head}.{forged_payload.decode()}.{sig}",
                key.key,
                algorithms=["ES256"],
                issuer=srv.url,
                audience=AUD,
            )
        jwks_doc = json.loads((await get(http, srv.jwks_url))[1])
        assert {"d", "p", "q"}.isdisjoint(jwks_doc["keys"][0])


async def test_rotation_keeps_old_key_until_its_tokens_expire(
    keys_dir: Path, http: aiohttp.ClientSession
) -> None:
    # Behind real time, so that PyJWT (which checks iat/exp against the real
    # clock) accepts tokens issued after the fake clock has been advanced.
    clock = FakeClock(start=time.time() - 30)
    pub = pub_key(keys_dir)
    config = cfg(keys_dir, clock=clock, signing_key_check_interval=5, ttl=900)
    async with serving(config) as srv:
        t1 = (await token_of(http, srv.token_url, encrypt_v1(pub, SID)))["token"]
        kid1 = jwt.get_unverified_header(t1)["kid"]
        await asyncio.to_thread(rotate_signing_key, keys_dir, clock=clock)
        clock.advance(5)  # the server checks the key directory every 5 s
        t2 = (await token_of(http, srv.token_url, encrypt_v1(pub, SID)))["token"]
        kid2 = jwt.get_unverified_header(t2)["kid"]
        assert kid2 != kid1
        jwks = await fetch_jwks(http, srv.jwks_url)
        assert {k.key_id for k in jwks.keys} == {kid1, kid2}
        for token in (t1, t2):
            assert verify_with(jwks, token, issuer=ISS, audience=AUD)[SESSION_ID_CLAIM] == SID
        # Retired at rotation: published for ttl + 60 s grace after that.
        clock.advance(900 + 60 - 5 - 1)
        jwks = await fetch_jwks(http, srv.jwks_url)
        assert {k.key_id for k in jwks.keys} == {kid1, kid2}
        clock.advance(2)
        jwks = await fetch_jwks(http, srv.jwks_url)
        assert {k.key_id for k in jwks.keys} == {kid2}
        with pytest.raises(KeyError):
            verify_with(jwks, t1, issuer=ISS, audience=AUD)
        verify_with(jwks, t2, issuer=ISS, audience=AUD)


async def test_rs256_key_directory_keeps_working_then_moves_to_es256(
    keys_dir: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # A key directory from when RS256 was the default: an RSA signing.pem.
    (keys_dir / "signing.pem").write_bytes(private_key_pem(other_key()))
    pub = pub_key(keys_dir)
    caplog.set_level(logging.WARNING)
    # Not allowed to write there (a mounted Secret): the algorithm follows the key.
    async with serving(cfg(keys_dir, generate_keys=False)) as srv:
        old = (await token_of(http, srv.token_url, encrypt_v1(pub, SID)))["token"]
        assert jwt.get_unverified_header(old)["alg"] == "RS256"
        verify_with(await fetch_jwks(http, srv.jwks_url), old, issuer=ISS, audience=AUD)
    assert "signing.pem signs RS256 but ES256 is configured" in caplog.text
    # Allowed to write: the configured ES256 rotates the RSA key out, which
    # stays published so that its tokens keep verifying until they expire.
    async with serving(cfg(keys_dir)) as srv:
        new = (await token_of(http, srv.token_url, encrypt_v1(pub, SID)))["token"]
        assert jwt.get_unverified_header(new)["alg"] == "ES256"
        jwks = await fetch_jwks(http, srv.jwks_url)
        assert sorted(k.key_type for k in jwks.keys) == ["EC", "RSA"]
        for token in (old, new):
            assert verify_with(jwks, token, issuer=ISS, audience=AUD)[SESSION_ID_CLAIM] == SID
        disc = json.loads((await get(http, srv.url + "/.well-known/openid-configuration"))[1])
        assert disc["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    # Another algorithm when asked for, the same way.
    async with serving(cfg(keys_dir, signing_algorithm="EdDSA")) as srv:
        token = (await token_of(http, srv.token_url, encrypt_v1(pub, SID)))["token"]
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        jwks_doc = json.loads((await get(http, srv.jwks_url))[1])
        assert {(k["kty"], k.get("crv")) for k in jwks_doc["keys"]} == {
            ("OKP", "Ed25519"),
            ("EC", "P-256"),
            ("RSA", None),
        }


async def test_verifier_takes_es256_tokens_and_refuses_alg_key_mismatch(
    keys_dir: Path, http: aiohttp.ClientSession
) -> None:
    async with serving(cfg(keys_dir)) as srv:
        token = (await token_of(http, srv.token_url, encrypt_v1(pub_key(keys_dir), SID)))["token"]
        keys = parse_jwks((await get(http, srv.jwks_url))[1])
    auth = JwtAuthenticator(
        issuers=[TrustedIssuer(issuer=ISS, audiences=(AUD,), keys=StaticKeySet(keys=keys.values()))]
    )
    assert auth.authenticate(token).claims[SESSION_ID_CLAIM] == SID
    (kid,) = keys
    claims = jwt.decode(token, options={"verify_signature": False})
    # Signed with RS256 or EdDSA under the EC key's kid: the algorithm does
    # not fit the key's type, refused before any signature check.
    forged = [
        jwt.encode(claims, other_key(), algorithm="RS256", headers={"kid": kid}),
        jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid}),
    ]
    for bad in forged:
        with pytest.raises(TokenRejectedError) as err:
            auth.authenticate(bad)
        assert err.value.reason == "alg_key_mismatch"


async def test_keys_persist_across_restarts(keys_dir: Path, http: aiohttp.ClientSession) -> None:
    proof = runner_style_bearer(public_pem(keys_dir), SID)
    kids = []
    for _ in range(2):
        async with serving(cfg(keys_dir)) as srv:
            jwks = await fetch_jwks(http, srv.jwks_url)
            kids.append([k.key_id for k in jwks.keys])
            token = (await token_of(http, srv.token_url, proof))["token"]
            verify_with(jwks, token, issuer=ISS, audience=AUD)
    assert kids[0] == kids[1]
    assert len(kids[0]) == 1


# ---------------------------------------------------------------- hooks, limits, off-loop


async def test_session_check_hook(keys_dir: Path, http: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    async def check(session_id: str) -> bool:
        seen.append(session_id)
        return session_id == SID

    pem = public_pem(keys_dir)
    async with serving(cfg(keys_dir, session_check=check)) as srv:
        await token_of(http, srv.token_url, runner_style_bearer(pem, SID))
        status, body, _ = await get(
            http, srv.token_url, runner_style_bearer(pem, "session-unknown")
        )
        assert (status, body) == (403, "session not allowed")
        # Refused by the rule before the hook is consulted.
        assert (await get(http, srv.token_url, runner_style_bearer(pem, "short")))[0] == 403
    assert seen == [SID, "session-unknown"]


async def test_hook_failure_is_internal_error_without_detail(
    keys_dir: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async def check(session_id: str) -> bool:
        raise RuntimeError("backend said: secret-detail-42")

    async with serving(cfg(keys_dir, session_check=check)) as srv:
        status, body, _ = await get(
            http, srv.token_url, runner_style_bearer(public_pem(keys_dir), SID)
        )
        assert (status, body) == (500, "internal error")
        assert srv.counters.snapshot()["internal_error"] == 1
    assert "secret-detail-42" not in caplog.text
    assert "RuntimeError" in caplog.text


async def test_request_timeout(keys_dir: Path, http: aiohttp.ClientSession) -> None:
    never = asyncio.Event()

    async def check(session_id: str) -> bool:
        await never.wait()
        return True

    async with serving(cfg(keys_dir, session_check=check, request_timeout=0.3)) as srv:
        status, body, _ = await get(
            http, srv.token_url, runner_style_bearer(public_pem(keys_dir), SID)
        )
        assert (status, body) == (500, "request timed out")


async def test_decryption_runs_off_the_loop_with_bounded_queue(
    keys_dir: Path, http: aiohttp.ClientSession
) -> None:
    pem = public_pem(keys_dir)
    config = cfg(keys_dir, max_concurrent_decrypts=1, max_pending_requests=1)
    async with serving(config) as srv:
        state = srv.app[STATE]
        gate = threading.Event()
        # Occupy the only decryption worker.
        blocker = state.executor.submit(gate.wait, 10)
        try:
            first = asyncio.create_task(get(http, srv.token_url, runner_style_bearer(pem, SID)))
            await wait_until(lambda: srv.counters.snapshot().get("decrypts") == 1)
            # The loop keeps serving while the proof waits for the pool.
            status, body, _ = await get(http, srv.url + "/healthz")
            assert (status, body) == (200, "ok")
            # The one allowed pending request is taken: the next is turned away.
            status, body, headers = await get(http, srv.token_url, runner_style_bearer(pem, SID))
            assert (status, body, headers["Retry-After"]) == (503, "busy", "1")
            assert not first.done()
        finally:
            gate.set()
        assert (await first)[0] == 200
        assert blocker.result() is True


async def test_graceful_close_finishes_in_flight_requests(
    keys_dir: Path, http: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def check(session_id: str) -> bool:
        entered.set()
        await gate.wait()
        return True

    srv_cm = serving(cfg(keys_dir, session_check=check))
    srv = await srv_cm.__aenter__()
    try:
        request = asyncio.create_task(
            get(http, srv.token_url, runner_style_bearer(public_pem(keys_dir), SID))
        )
        await asyncio.wait_for(entered.wait(), 5)
        closing = asyncio.create_task(srv.close())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done()
        gate.set()
        status, _, _ = await request
        assert status == 200
        await asyncio.wait_for(closing, 10)
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(http, srv.url + "/healthz")
    finally:
        gate.set()
        await srv_cm.__aexit__(None, None, None)


async def test_create_app_embeds_in_any_runner(keys_dir: Path, http: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigurationError, match="issuer"):
        create_app(TokenServerConfig(keys_dir=keys_dir))
    app = create_app(cfg(keys_dir))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        doc = await token_of(
            http, f"http://127.0.0.1:{port}/token", runner_style_bearer(public_pem(keys_dir), SID)
        )
        assert doc["token"]
    finally:
        await runner.cleanup()


class ReplayStub:
    def remember(self, key: str, until: float) -> bool:
        return True


def test_config_validation(keys_dir: Path) -> None:
    with pytest.raises(ConfigurationError):
        TokenServerConfig()
    with pytest.raises(ConfigurationError):
        TokenServerConfig(keys_dir=keys_dir, request_timeout=0)
    with pytest.raises(ConfigurationError):
        TokenServerConfig(keys_dir=keys_dir, max_concurrent_decrypts=0)
    with pytest.raises(ConfigurationError, match="replay"):
        TokenServerConfig(keys_dir=keys_dir, replay_max_entries=0)
    with pytest.raises(ConfigurationError, match="replay"):
        TokenServerConfig(keys_dir=keys_dir, replay_store=ReplayStub(), replay_max_entries=10)
    with pytest.raises(TypeError):
        TokenServerConfig(keys_dir)  # type: ignore[call-arg]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_token_server_stops_on_signal(keys_dir: Path, sig: signal.Signals) -> None:
    script = textwrap.dedent(
        """
        import sys
        from ambient_grpc_auth.controlplane.config import TokenServerConfig
        from ambient_grpc_auth.controlplane.server import run_token_server
        config = TokenServerConfig(keys_dir=sys.argv[1], generate_keys=False)
        run_token_server(config, "127.0.0.1", 0, ready=lambda s: print(s.url, flush=True))
        print("stopped", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(keys_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
        with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
            assert resp.read() == b"ok"
        req = urllib.request.Request(
            url + "/token",
            headers={"Authorization": "Bearer " + runner_style_bearer(public_pem(keys_dir), SID)},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["token"]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == "stopped"


# ---------------------------------------------------------------- upstream OIDC issuer


class Upstream:
    """A tiny client-credentials token endpoint."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0
        self.forms: list[dict[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.release = asyncio.Event()
        self.expires_in: Any = 300
        self.access_token: str | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return web.json_response({"error": "invalid_client"}, status=401)
        ok = hmac.compare_digest(unquote_plus(user), CLIENT_ID) & hmac.compare_digest(
            unquote_plus(password).encode(), CLIENT_SECRET.encode()
        )
        if scheme != "Basic" or not ok:
            return web.json_response({"error": "invalid_client"}, status=401)
        form = dict(await request.post())
        self.forms.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if self.mode == "500":
            return web.Response(status=500, text="upstream broke")
        if self.mode == "badjson":
            return web.Response(text="{not json", content_type="application/json")
        if self.mode == "big":
            return web.json_response({"access_token": "x" * 100_000, "expires_in": 300})
        if self.mode == "hang":
            await self.release.wait()
        doc: dict[str, Any] = {
            "access_token": self.access_token or f"upstream-token-{self.calls}",
            "token_type": "Bearer",
        }
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        return web.json_response(doc)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth/token", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/oauth/token"

    async def stop(self) -> None:
        self.release.set()
        if self.gate is not None:
            self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    try:
        yield up
    finally:
        await up.stop()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(CLIENT_SECRET + "\n")
    path.chmod(0o600)
    return path


def oidc(upstream: Upstream, secret_file: Path, **kw: Any) -> OidcSettings:
    return OidcSettings(
        token_url=upstream.url, client_id=CLIENT_ID, client_secret_file=secret_file, **kw
    )


async def test_oidc_upstream_token_is_served_and_cached(
    keys_dir: Path,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    secret_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock(start=time.time())
    settings = oidc(upstream, secret_file, scope="ambient.api", audience="ambient-api-server")
    proof = runner_style_bearer(public_pem(keys_dir), SID)
    async with serving(TokenServerConfig(keys_dir=keys_dir, oidc=settings, clock=clock)) as srv:
        first = await token_of(http, srv.token_url, proof)
        second = await token_of(http, srv.token_url, proof)
        assert first == second
        assert first["token"] == "upstream-token-1"
        expires = datetime.fromisoformat(first["expires_at"].replace("Z", "+00:00"))
        assert abs(expires.timestamp() - (clock.time() + 300)) <= 1
        assert upstream.calls == 1
        assert upstream.forms == [
            {
                "grant_type": "client_credentials",
                "scope": "ambient.api",
                "audience": "ambient-api-server",
            }
        ]
        # Our own keys are not the ones these tokens verify with.
        assert (await get(http, srv.jwks_url))[0] == 404
        assert (await get(http, srv.url + "/.well-known/openid-configuration"))[0] == 404
    assert CLIENT_SECRET not in caplog.text
    assert "upstream-token-1" not in caplog.text


async def test_oidc_single_flight(upstream: Upstream, secret_file: Path) -> None:
    issuer = OidcClientCredentialsIssuer(oidc(upstream, secret_file))
    upstream.gate = asyncio.Event()
    tasks = [asyncio.create_task(issuer.issue(SID)) for _ in range(50)]
    await wait_until(lambda: upstream.calls == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert upstream.calls == 1
    assert not any(t.done() for t in tasks)
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    assert {r.token for r in results} == {"upstream-token-1"}
    assert upstream.calls == 1
    assert issuer.fetch_count == 1
    assert "upstream-token" not in repr(results[0])
    assert CLIENT_SECRET not in repr(issuer)


async def test_oidc_refreshes_within_margin(upstream: Upstream, secret_file: Path) -> None:
    clock = FakeClock(start=time.time())
    issuer = OidcClientCredentialsIssuer(
        oidc(upstream, secret_file, refresh_margin=30), clock=clock
    )
    assert (await issuer.issue(SID)).token == "upstream-token-1"
    clock.advance(269)
    assert (await issuer.issue(SID)).token == "upstream-token-1"
    clock.advance(2)  # 271 s: within 30 s of expiry
    assert (await issuer.issue(SID)).token == "upstream-token-2"
    assert upstream.calls == 2


async def test_oidc_keeps_last_good_token_until_expiry(
    upstream: Upstream, secret_file: Path
) -> None:
    clock = FakeClock(start=time.time())
    issuer = OidcClientCredentialsIssuer(oidc(upstream, secret_file), clock=clock)
    assert (await issuer.issue(SID)).token == "upstream-token-1"
    upstream.mode = "500"
    clock.advance(280)  # refresh due, refresh fails: the cached token is still valid
    assert (await issuer.issue(SID)).token == "upstream-token-1"
    calls = upstream.calls
    assert (await issuer.issue(SID)).token == "upstream-token-1"
    assert upstream.calls == calls  # failure cooldown: no new upstream request
    clock.advance(21)  # expired now
    with pytest.raises(Exception, match="HTTP 500"):
        await issuer.issue(SID)


async def test_oidc_expiry_from_jwt_when_expires_in_is_absent(
    upstream: Upstream, secret_file: Path
) -> None:
    clock = FakeClock(start=time.time())
    exp = int(clock.time()) + 123
    upstream.expires_in = None
    upstream.access_token = jwt.encode({"exp": exp, "sub": "svc"}, "k" * 32, algorithm="HS256")
    issuer = OidcClientCredentialsIssuer(oidc(upstream, secret_file), clock=clock)
    assert int((await issuer.issue(SID)).expires_at.timestamp()) == exp
    upstream.access_token = "opaque-token"
    issuer = OidcClientCredentialsIssuer(oidc(upstream, secret_file, default_ttl=77), clock=clock)
    assert int((await issuer.issue(SID)).expires_at.timestamp()) == int(clock.time()) + 77


@pytest.mark.parametrize("mode", ["500", "badjson", "hang", "big", "wrong-secret", "no-secret"])
async def test_oidc_failures_answer_500(
    mode: str,
    keys_dir: Path,
    http: aiohttp.ClientSession,
    upstream: Upstream,
    secret_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.mode = mode
    if mode == "wrong-secret":
        secret_file.write_text("not-the-secret\n")
    if mode == "no-secret":
        secret_file.unlink()
    settings = oidc(upstream, secret_file, timeout=0.3)
    proof = runner_style_bearer(public_pem(keys_dir), SID)
    async with serving(TokenServerConfig(keys_dir=keys_dir, oidc=settings)) as srv:
        status, body, _ = await get(http, srv.token_url, proof)
        assert (status, body) == (500, "token provider unavailable")
        assert srv.counters.snapshot()["upstream_error"] == 1
    assert CLIENT_SECRET not in caplog.text
    assert "not-the-secret" not in caplog.text
    assert proof not in caplog.text


def test_oidc_settings_validation(secret_file: Path) -> None:
    def make(url: str, **kw: Any) -> OidcClientCredentialsIssuer:
        return OidcClientCredentialsIssuer(
            OidcSettings(token_url=url, client_id=CLIENT_ID, client_secret_file=secret_file, **kw)
        )

    with pytest.raises(ConfigurationError, match="https"):
        make("http://idp.example.com/token")
    with pytest.raises(ConfigurationError):
        make("ftp://idp.example.com/token")
    make("https://idp.example.com/token")
    make("http://idp.example.com/token", allow_insecure_http=True)
    make("http://[::1]:8080/token")
    # The shared locality policy: plaintext also to cluster-local hosts...
    make("http://keycloak.auth.svc.cluster.local:8080/token")
    make("http://keycloak:8080/token")
    # ...but never to other addresses, private ones included.
    for remote in ("http://10.0.0.5/token", "http://[::ffff:10.0.0.5]/token"):
        with pytest.raises(ConfigurationError, match="allow_insecure_http=True"):
            make(remote)
    with pytest.raises(ConfigurationError, match="user information"):
        make("https://user:pw@idp.example.com/token")
    with pytest.raises(ConfigurationError):
        TokenServerConfig(
            keys_dir="/nonexistent",
            oidc=OidcSettings(token_url="https://x/t", client_id="a", client_secret_file="f"),
            token_issuer=make("https://idp.example.com/token"),
        )


# ---------------------------------------------------------------- issuer units and surface


class _CountingExecutor(ThreadPoolExecutor):
    """A real pool that counts what is handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize(("algorithm", "off_loop"), [("ES256", 0), ("EdDSA", 0), ("RS256", 1)])
async def test_jwt_issuer_signs_rsa_in_its_executor_and_the_rest_inline(
    algorithm: str, off_loop: int
) -> None:
    # An RSA signature takes milliseconds and must not stall the event loop;
    # ES256 and EdDSA cost less than the hop to a thread and back.
    executor = _CountingExecutor()
    try:
        key = SigningKey.from_private_key(generate_signing_key(algorithm, rsa_bits=2048))
        issuer = JwtIssuer(
            signing_keys=SigningKeySet(current=key), issuer=ISS, audience=AUD, executor=executor
        )
        issued = await issuer.issue(SID)
        assert jwt.get_unverified_header(issued.token)["alg"] == algorithm
        assert executor.submitted == off_loop
    finally:
        executor.shutdown()


async def test_jwt_issuer_units(keys_dir: Path) -> None:
    signing = load_keys(keys_dir).signing
    assert signing is not None
    clock = FakeClock(start=time.time())
    issuer = JwtIssuer(
        signing_keys=signing,
        issuer=ISS,
        audience=("api-a", "api-b"),
        ttl=60,
        subject="system:serviceaccount:ns:svc",
        clock=clock,
    )
    issued = await issuer.issue(SID)
    assert issued.token not in repr(issued)
    assert issued.expires_at.timestamp() == int(clock.time()) + 60
    jwks = jwt.PyJWKSet.from_dict(issuer.jwks())
    claims = verify_with(jwks, issued.token, issuer=ISS, audience="api-b")
    assert claims["aud"] == ["api-a", "api-b"]
    assert claims["sub"] == "system:serviceaccount:ns:svc"
    assert "jti" not in claims
    assert "nbf" not in claims
    assert issued.to_json()["expires_at"] == format_rfc3339(issued.expires_at)
    assert RFC3339.fullmatch(issued.to_json()["expires_at"])
    with pytest.raises(ValueError, match="naive"):
        format_rfc3339(datetime(2026, 1, 1))
    for bad in ({"ttl": 0}, {"ttl": 2 * 86400}, {"issuer": ""}, {"audience": ""}):
        kw: dict[str, Any] = {"signing_keys": signing, "issuer": ISS, "audience": AUD, **bad}
        with pytest.raises(ConfigurationError):
            JwtIssuer(**kw)
    assert "BEGIN" not in repr(issuer)
    assert isinstance(issued, IssuedToken)
