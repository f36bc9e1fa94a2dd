"""ControlPlaneTokenSource against a scripted local endpoint and against the
project's own token server, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from support import keys
from support.runner import Reply, ScriptedServer, Seen, make_jwt

from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.tokens import Token
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import ensure_keys
from ambient_grpc_auth.controlplane.server import RunningTokenServer, start_token_server
from ambient_grpc_auth.errors import ConfigurationError, ProofError, TokenUnavailableError
from ambient_grpc_auth.proof import SessionIdRule, decode_proof
from ambient_grpc_auth.testing import FakeClock

SESSION = "session-0123456789"
ISSUED = make_jwt(1_900_000_000, session_id=SESSION)


@pytest.fixture
def http_server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return keys.signing_key()


@pytest.fixture
def public_pem() -> str:
    return keys.public_pem(keys.signing_key()).decode("ascii")


class Recorder:
    """Injected sleeps: record the delays, never wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.delays.append(seconds)


def cp_handler(
    key: rsa.RSAPrivateKey, body: Callable[[], Reply] | None = None
) -> Callable[[Seen], Reply]:
    """A minimal /token: checks the proof like a control plane, then answers."""

    def handle(seen: Seen) -> Reply:
        auth = seen.authorization or ""
        if not auth.startswith("Bearer "):
            return Reply(401, b"missing bearer proof")
        try:
            proof = decode_proof(key, auth[len("Bearer ") :])
        except ProofError:
            return Reply(401, b"invalid session proof")
        if proof.session_id != SESSION:
            return Reply(403, b"session not allowed")
        if body is not None:
            return body()
        return Reply.json({"token": ISSUED, "expires_at": "2030-01-01T00:00:00Z"})

    return handle


def source(
    server: ScriptedServer, pem: str, rec: Recorder | None = None, **kw: object
) -> ControlPlaneTokenSource:
    rec = rec or Recorder()
    kw.setdefault("timeout", 5.0)
    # The scripted endpoint advertises nothing: pin v2 here, negotiation is
    # tested in test_proof_negotiation.py.
    kw.setdefault("proof", "v2")
    return ControlPlaneTokenSource(
        server.url(),
        pem,
        SESSION,
        sleep=rec.sleep,
        async_sleep=rec.async_sleep,
        **kw,  # type: ignore[arg-type]
    )


async def fetch(src: ControlPlaneTokenSource, use_async: bool) -> Token:
    """Either driver; the sync one in a thread so the loop stays free."""
    if use_async:
        return await src.get_token_async()
    return await asyncio.to_thread(src.get_token)


def assert_no_secrets(message: str, server: ScriptedServer) -> None:
    assert SESSION not in message
    assert ISSUED not in message
    for seen in server.requests:
        if seen.authorization:
            assert seen.authorization.split(" ", 1)[1] not in message


# --- success ----------------------------------------------------------------------


@pytest.mark.parametrize("proof", ["v1", "v2"])
async def test_success_sync_and_async(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str, proof: str
) -> None:
    http_server.handler = cp_handler(rsa_key)
    src = source(http_server, public_pem, proof=proof)
    token = await asyncio.to_thread(src.get_token)
    assert token.value == ISSUED
    assert token.expires_at == 1_893_456_000.0  # 2030-01-01T00:00:00Z, not the JWT exp
    token2 = await src.get_token_async()
    assert token2.value == ISSUED
    assert http_server.count == 2
    versions = {
        decode_proof(rsa_key, s.authorization.split(" ", 1)[1]).version  # type: ignore[union-attr]
        for s in http_server.requests
    }
    assert versions == {int(proof[1])}
    assert ISSUED not in repr(token)
    assert SESSION not in repr(src)


def test_v2_proofs_are_fresh_each_time(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str
) -> None:
    clock = FakeClock(1_800_000_000.0)
    http_server.handler = cp_handler(rsa_key)
    src = source(http_server, public_pem, clock=clock)
    src.get_token()
    clock.advance(5)
    src.get_token()
    proofs = [decode_proof(rsa_key, s.authorization.split(" ", 1)[1]) for s in http_server.requests]  # type: ignore[union-attr]
    assert [p.issued_at for p in proofs] == [1_800_000_000, 1_800_000_005]
    assert proofs[0].nonce != proofs[1].nonce


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"token": ISSUED}, 1_900_000_000.0),  # older CPs: no expires_at -> JWT exp
        ({"token": ISSUED, "expires_at": None}, 1_900_000_000.0),
        ({"token": ISSUED, "expires_at": "garbage"}, 1_900_000_000.0),
        ({"token": ISSUED, "expires_at": 12}, 1_900_000_000.0),
        ({"token": "opaque-token"}, None),
        ({"token": "opaque-token", "expires_at": "2030-01-01T01:00:00.5+01:00"}, 1_893_456_000.5),
    ],
)
def test_expiry_sources(
    http_server: ScriptedServer,
    rsa_key: rsa.RSAPrivateKey,
    public_pem: str,
    doc: dict[str, object],
    expected: float | None,
) -> None:
    http_server.handler = cp_handler(rsa_key, lambda: Reply.json(doc))
    assert source(http_server, public_pem).get_token().expires_at == expected


# --- HTTP failures -----------------------------------------------------------------


@pytest.mark.parametrize(("status", "text"), [(401, "invalid proof"), (403, "not allowed")])
async def test_refusals_are_not_retried(
    http_server: ScriptedServer,
    rsa_key: rsa.RSAPrivateKey,
    public_pem: str,
    status: int,
    text: str,
) -> None:
    http_server.handler = cp_handler(rsa_key, lambda: Reply(status, text.encode()))
    rec = Recorder()
    src = source(http_server, public_pem, rec)
    with pytest.raises(TokenUnavailableError) as info:
        await asyncio.to_thread(src.get_token)
    err = info.value
    assert err.retryable is False
    assert err.status == status
    assert f"HTTP {status}: {text}" in str(err)
    assert "after 1 attempt:" in str(err)
    with pytest.raises(TokenUnavailableError):
        await src.get_token_async()
    assert http_server.count == 2
    assert rec.delays == []
    assert_no_secrets(str(err), http_server)


def test_wrong_session_gets_403(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str
) -> None:
    http_server.handler = cp_handler(rsa_key)
    src = ControlPlaneTokenSource(http_server.url(), public_pem, "other-session-42")
    with pytest.raises(TokenUnavailableError) as info:
        src.get_token()
    assert info.value.status == 403
    assert "other-session-42" not in str(info.value)


@pytest.mark.parametrize("use_async", [False, True])
async def test_5xx_retried_with_capped_backoff(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str, use_async: bool
) -> None:
    http_server.handler = cp_handler(rsa_key, lambda: Reply(500, b"token provider unavailable"))
    rec = Recorder()
    src = source(http_server, public_pem, rec, attempts=5, backoff_base=1.0, backoff_cap=3.0)
    with pytest.raises(TokenUnavailableError) as info:
        await fetch(src, use_async)
    err = info.value
    assert err.retryable is True
    assert err.status == 500
    assert "after 5 attempts: HTTP 500: token provider unavailable" in str(err)
    assert http_server.count == 5
    ceilings = [1.0, 2.0, 3.0, 3.0]
    assert len(rec.delays) == 4
    for delay, ceiling in zip(rec.delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert_no_secrets(str(err), http_server)


async def test_recovers_after_transient_failures(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str
) -> None:
    replies = [Reply(503, b"busy"), Reply(429, b"slow down")]
    http_server.handler = cp_handler(
        rsa_key,
        lambda: replies.pop(0) if replies else Reply.json({"token": ISSUED}),
    )
    rec = Recorder()
    token = await source(http_server, public_pem, rec).get_token_async()
    assert token.value == ISSUED
    assert http_server.count == 3
    assert len(rec.delays) == 2


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (f"<html>{ISSUED}</html>".encode(), "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (json.dumps([ISSUED]).encode(), "not an object"),
        (json.dumps({"access_token": ISSUED}).encode(), "without a token"),
        (json.dumps({"token": ""}).encode(), "without a token"),
        (json.dumps({"token": 42}).encode(), "without a token"),
        (json.dumps({"token": "has space"}).encode(), "malformed token"),
    ],
)
async def test_bad_200_bodies_are_not_retried(
    http_server: ScriptedServer,
    rsa_key: rsa.RSAPrivateKey,
    public_pem: str,
    body: bytes,
    problem: str,
) -> None:
    http_server.handler = cp_handler(rsa_key, lambda: Reply(200, body))
    rec = Recorder()
    src = source(http_server, public_pem, rec)
    for call in (asyncio.to_thread(src.get_token), src.get_token_async()):
        with pytest.raises(TokenUnavailableError, match=problem) as info:
            await call
        assert info.value.retryable is False
        assert info.value.status == 200
        assert_no_secrets(str(info.value), http_server)
    assert http_server.count == 2
    assert rec.delays == []


async def test_error_body_echoing_secrets_is_scrubbed(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str
) -> None:
    def echo(seen: Seen) -> Reply:
        return Reply(500, f"bad request with {seen.authorization} for {ISSUED}".encode())

    http_server.handler = echo
    src = source(http_server, public_pem, attempts=1)
    with pytest.raises(TokenUnavailableError) as info:
        await src.get_token_async()
    assert "HTTP 500: bad request with" in str(info.value)
    assert_no_secrets(str(info.value), http_server)


@pytest.mark.parametrize("use_async", [False, True])
async def test_slow_endpoint_times_out(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str, use_async: bool
) -> None:
    http_server.handler = cp_handler(rsa_key, lambda: Reply(200, b"{}", delay=3.0))
    rec = Recorder()
    src = source(http_server, public_pem, rec, timeout=0.2, attempts=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TokenUnavailableError, match="timed out") as info:
        await fetch(src, use_async)
    assert loop.time() - started < 2.0
    assert info.value.retryable is True
    assert info.value.status is None
    assert http_server.count == 2
    assert len(rec.delays) == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_connection_refused_is_retryable(public_pem: str, use_async: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = Recorder()
    src = ControlPlaneTokenSource(
        f"http://127.0.0.1:{port}/token",
        public_pem,
        SESSION,
        attempts=2,
        timeout=2,
        sleep=rec.sleep,
        async_sleep=rec.async_sleep,
    )
    with pytest.raises(TokenUnavailableError) as info:
        await fetch(src, use_async)
    assert info.value.retryable is True
    assert "refused" in str(info.value).lower() or "connect" in str(info.value).lower()
    assert len(rec.delays) == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_oversized_response_is_refused(
    http_server: ScriptedServer, rsa_key: rsa.RSAPrivateKey, public_pem: str, use_async: bool
) -> None:
    http_server.handler = cp_handler(
        rsa_key, lambda: Reply.json({"token": ISSUED, "pad": "x" * 5000})
    )
    src = source(http_server, public_pem, max_response_bytes=4096)
    with pytest.raises(TokenUnavailableError, match="larger than 4096 bytes") as info:
        await fetch(src, use_async)
    assert info.value.retryable is False
    assert http_server.count == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_redirects_are_not_followed(
    http_server: ScriptedServer, public_pem: str, use_async: bool
) -> None:
    elsewhere = ScriptedServer()
    try:
        http_server.handler = lambda seen: Reply(302, b"", {"Location": elsewhere.url()})
        src = source(http_server, public_pem)
        with pytest.raises(TokenUnavailableError, match="HTTP 302") as info:
            await fetch(src, use_async)
        assert info.value.retryable is False
        assert elsewhere.count == 0  # the proof never went there
    finally:
        elsewhere.close()


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://cp.example/token", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("http:///token", "no host"),
        ("http://user:pw@cp/token", "user information"),
        ("http://cp/token#frag", "fragment"),
        ("http://cp:99999/token", "cannot be parsed"),
        ("http://cp:0/token", "port"),
        ("cp/token", "scheme"),
        ("not a url", "whitespace"),
        ("http://cp/\x00", "control"),
        ("", "empty"),
        ("http://" + "a" * 3000, "longer"),
    ],
)
def test_malformed_urls(public_pem: str, url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as info:
        ControlPlaneTokenSource(url, public_pem, SESSION)
    if "pw" in url:
        assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://cp.example.com/token",
        "http://10.0.0.7:8080/token",
        "http://cp.ns.svc.example.com/token",
        "http://[::ffff:10.0.0.7]/token",
    ],
)
def test_plaintext_to_remote_hosts_is_refused(public_pem: str, url: str) -> None:
    """The proof gets the same policy as bearer tokens on gRPC channels."""
    with pytest.raises(ConfigurationError, match="plaintext") as info:
        ControlPlaneTokenSource(url, public_pem, SESSION)
    assert "https" in str(info.value)
    assert "allow_insecure_remote=True" in str(info.value)
    ControlPlaneTokenSource("https" + url[4:], public_pem, SESSION)
    ControlPlaneTokenSource(url, public_pem, SESSION, allow_insecure_remote=True)
    env = {"AMBIENT_CP_TOKEN_URL": url, "AMBIENT_CP_TOKEN_PUBLIC_KEY": public_pem}
    env["SESSION_ID"] = SESSION
    with pytest.raises(ConfigurationError, match="plaintext"):
        ControlPlaneTokenSource.from_env(env)
    ControlPlaneTokenSource.from_env(env, allow_insecure_remote=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/token",
        "http://[::1]/token",
        "http://localhost/token",
        "http://ambient-control-plane:8080/token",
        "http://cp.ns.svc/token",
        "http://cp.ns.svc.cluster.local:8080/token",
    ],
)
def test_plaintext_to_local_hosts_is_allowed(public_pem: str, url: str) -> None:
    ControlPlaneTokenSource(url, public_pem, SESSION)


def test_other_configuration_errors(public_pem: str, rsa_key: rsa.RSAPrivateKey) -> None:
    url = "http://127.0.0.1:1/token"
    with pytest.raises(ConfigurationError, match="public key"):
        ControlPlaneTokenSource(url, "not a key", SESSION)
    with pytest.raises(ConfigurationError, match="RSA public key"):
        ControlPlaneTokenSource(url, rsa_key, SESSION)  # type: ignore[arg-type]
    for bad in ("", "  ", "has space", "tab\there"):
        with pytest.raises(ConfigurationError, match="session id") as info:
            ControlPlaneTokenSource(url, public_pem, bad)
        assert not bad.strip() or bad not in str(info.value)
    with pytest.raises(ConfigurationError, match="too long"):
        ControlPlaneTokenSource(url, public_pem, "s" * 400)  # does not fit RSA-2048 OAEP
    # The control plane's session-id rule, checked before any request.
    with pytest.raises(ConfigurationError, match="too short") as info:
        ControlPlaneTokenSource(url, public_pem, "abc1234")
    assert "at least 8" in str(info.value) or "8 to 256" in str(info.value)
    assert "abc1234" not in str(info.value)
    env = {"AMBIENT_CP_TOKEN_URL": url, "AMBIENT_CP_TOKEN_PUBLIC_KEY": public_pem}
    with pytest.raises(ConfigurationError, match="^SESSION_ID is too short"):
        ControlPlaneTokenSource.from_env({**env, "SESSION_ID": "abc"})
    ControlPlaneTokenSource(url, public_pem, "12345678")  # exactly the minimum
    with pytest.raises(ConfigurationError, match="proof"):
        ControlPlaneTokenSource(url, public_pem, SESSION, proof="v3")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ControlPlaneTokenSource(url, public_pem, SESSION, attempts=0)
    with pytest.raises(ConfigurationError):
        ControlPlaneTokenSource(url, public_pem, SESSION, timeout=0)
    with pytest.raises(ConfigurationError):
        ControlPlaneTokenSource(url, public_pem, SESSION, backoff_base=2, backoff_cap=1)
    assert ControlPlaneTokenSource(url, rsa_key.public_key(), SESSION).proof == "auto"


def test_from_env(public_pem: str) -> None:
    src = ControlPlaneTokenSource.from_env(
        {
            "AMBIENT_CP_TOKEN_URL": "http://cp.ns.svc:8080/token?x=secret",
            "AMBIENT_CP_TOKEN_PUBLIC_KEY": public_pem,
            "SESSION_ID": SESSION,
        },
        proof="v1",
    )
    assert src.proof == "v1"
    assert src.endpoint == "http://cp.ns.svc:8080/token"  # no query in messages
    assert "secret" not in repr(src)
    with pytest.raises(ConfigurationError) as info:
        ControlPlaneTokenSource.from_env({})
    for name in ("AMBIENT_CP_TOKEN_URL", "AMBIENT_CP_TOKEN_PUBLIC_KEY", "SESSION_ID"):
        assert name in str(info.value)


# --- the project's token server, end to end --------------------------------------------


@pytest_asyncio.fixture
async def token_server(tmp_path: Path) -> AsyncIterator[tuple[RunningTokenServer, str]]:
    keys = await asyncio.to_thread(ensure_keys, tmp_path / "keys", encryption_key_bits=2048)
    server = await start_token_server(TokenServerConfig(keys=keys), "127.0.0.1", 0)
    try:
        yield server, keys.public_pem
    finally:
        await server.close()


@pytest.mark.parametrize("proof", ["v1", "v2"])
async def test_against_token_server(
    token_server: tuple[RunningTokenServer, str], proof: str
) -> None:
    server, pem = token_server
    src = ControlPlaneTokenSource(server.token_url, pem, SESSION, proof=proof)  # type: ignore[arg-type]
    token = await src.get_token_async()
    claims = jwt.decode(token.value, options={"verify_signature": False})
    assert claims["session_id"] == SESSION
    assert token.expires_at == claims["exp"]
    # The sync driver too (in a thread: the server runs on this loop).
    token2 = await asyncio.to_thread(src.get_token)
    assert jwt.decode(token2.value, options={"verify_signature": False})["session_id"] == SESSION
    assert server.counters.snapshot()["issued"] == 2
    # And through the cache: one fetch serves many calls.
    cache = CachingTokenSource(src)
    tokens = await asyncio.gather(*(cache.get_token_async() for _ in range(50)))
    assert len({t.value for t in tokens}) == 1
    assert cache.fetches == 1


async def test_token_server_refusals(token_server: tuple[RunningTokenServer, str]) -> None:
    server, pem = token_server
    # The server's own refusal (the client checks the same rule by default).
    lenient = SessionIdRule(min_length=1)
    short = ControlPlaneTokenSource(
        server.token_url, pem, "short", proof="v1", session_id_rule=lenient
    )
    with pytest.raises(TokenUnavailableError) as info:
        await short.get_token_async()
    assert info.value.status == 403
    assert info.value.retryable is False
    assert "short" not in str(info.value)
    other = keys.other_key().public_key()
    wrong_key = ControlPlaneTokenSource(server.token_url, other, SESSION)
    with pytest.raises(TokenUnavailableError) as info:
        await asyncio.to_thread(wrong_key.get_token)
    assert info.value.status == 401
    assert "invalid session proof" in str(info.value)
