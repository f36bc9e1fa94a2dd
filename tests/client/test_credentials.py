"""Backend credential fetch: bearer choice and fallback, host allowlist, id
parsing and quoting, error messages, over a real local HTTP server."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.client import FakeSource
from support.runner import Reply, ScriptedServer, Seen

from ambient_grpc_auth.client.credentials import (
    DEFAULT_BACKEND_URL,
    CredentialClient,
    CredentialUnavailableError,
    backend_url_from_env,
    check_backend_url,
    parse_credential_ids,
)
from ambient_grpc_auth.client.tokens import FileTokenSource, StaticTokenSource, Token
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError

CALLER = "caller-token-aaaaaaaaaaaa"
SA = "service-account-token-bbbbbbbb"
CP = "control-plane-token-cccccccc"
CREDENTIAL = {"token": "ghp_credential_value_dddddddd", "provider": "github"}
IDS = {"github": "cred-123", "gitlab": "id:with%odd"}
PATH = "/api/ambient/v1/credentials/cred-123/token"


@pytest.fixture
def http_server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


def backend(accepted: set[str], doc: object = CREDENTIAL):
    """A backend that accepts the given bearers."""

    def handle(seen: Seen) -> Reply:
        bearer = (seen.authorization or "").removeprefix("Bearer ")
        if bearer not in accepted:
            # A careless backend echoing the bearer back.
            return Reply(401, f"unauthorized: {seen.authorization}".encode())
        return Reply.json(doc)

    return handle


def client(server: ScriptedServer, **kw: object) -> CredentialClient:
    kw.setdefault("credential_ids", IDS)
    return CredentialClient(server.url(""), **kw)  # type: ignore[arg-type]


def bearers(server: ScriptedServer) -> list[str]:
    return [(s.authorization or "").removeprefix("Bearer ") for s in server.requests]


async def fetch(
    c: CredentialClient, use_async: bool, provider: str = "github", **kw: object
) -> dict[str, object]:
    """Either driver; the sync one in a thread so the loop stays free."""
    if use_async:
        return await c.fetch_async(provider, **kw)  # type: ignore[arg-type]
    return await asyncio.to_thread(c.fetch, provider, **kw)  # type: ignore[arg-type]


def assert_clean(message: str) -> None:
    for secret in (CALLER, SA, CP, CREDENTIAL["token"]):
        assert secret not in message


def test_credential_errors_are_token_unavailable_errors() -> None:
    # The module's __all__ is pinned in tests/test_public_api.py.
    assert issubclass(CredentialUnavailableError, TokenUnavailableError)


# --- happy paths and fallback ---------------------------------------------------------


async def test_caller_token_happy_path(http_server: ScriptedServer) -> None:
    http_server.handler = backend({CALLER})
    c = client(http_server, service_account=StaticTokenSource(SA))
    assert await asyncio.to_thread(c.fetch, "github", caller_token=CALLER) == CREDENTIAL
    assert await c.fetch_async("github", caller_token=Token(CALLER)) == CREDENTIAL
    assert bearers(http_server) == [CALLER, CALLER]
    assert {s.path for s in http_server.requests} == {PATH}


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("use_async", [False, True])
async def test_refused_caller_token_falls_back_once_to_sa(
    http_server: ScriptedServer, status: int, use_async: bool
) -> None:
    def handle(seen: Seen) -> Reply:
        if seen.authorization == "Bearer " + SA:
            return Reply.json(CREDENTIAL)
        return Reply(status, b"no")

    http_server.handler = handle
    c = client(
        http_server,
        service_account=StaticTokenSource(SA),
        control_plane=StaticTokenSource(CP),
    )
    result = await fetch(c, use_async, caller_token=CALLER)
    assert result == CREDENTIAL
    assert bearers(http_server) == [CALLER, SA]


@pytest.mark.parametrize("use_async", [False, True])
async def test_fallback_happens_only_once(http_server: ScriptedServer, use_async: bool) -> None:
    http_server.handler = backend(set())
    c = client(
        http_server,
        service_account=StaticTokenSource(SA),
        control_plane=StaticTokenSource(CP),
    )
    with pytest.raises(CredentialUnavailableError) as info:
        await fetch(c, use_async, caller_token=CALLER)
    err = info.value
    assert bearers(http_server) == [CALLER, SA]
    assert err.status == 401
    assert err.retryable is False
    assert err.provider == "github"
    assert "provider 'github'" in str(err)
    assert "HTTP 401 with the service-account token" in str(err)
    assert "unauthorized: Bearer [redacted]" in str(err)
    assert_clean(str(err))


async def test_no_fallback_without_service_credential(http_server: ScriptedServer) -> None:
    http_server.handler = backend({SA})
    c = client(http_server)
    with pytest.raises(CredentialUnavailableError) as info:
        await c.fetch_async("github", caller_token=CALLER)
    assert info.value.status == 401
    assert "caller token" in str(info.value)
    assert bearers(http_server) == [CALLER]
    assert_clean(str(info.value))
    with pytest.raises(CredentialUnavailableError, match="no caller token given") as info2:
        c.fetch("github")
    assert info2.value.retryable is False


async def test_sa_token_then_control_plane(http_server: ScriptedServer, tmp_path: Path) -> None:
    http_server.handler = backend({SA, CP})
    sa_file = tmp_path / "token"
    sa_file.write_text(SA + "\n")
    c = client(
        http_server,
        service_account=FileTokenSource(sa_file),
        control_plane=StaticTokenSource(CP),
    )
    assert await asyncio.to_thread(c.fetch, "github") == CREDENTIAL
    assert await c.fetch_async("github") == CREDENTIAL
    # Without a service-account token, the control-plane token is used.
    cp_only = client(http_server, control_plane=StaticTokenSource(CP))
    assert await cp_only.fetch_async("github") == CREDENTIAL
    # A service-account source that cannot deliver falls through to the next one.
    broken = client(
        http_server,
        service_account=FileTokenSource(tmp_path / "absent"),
        control_plane=StaticTokenSource(CP),
    )
    assert await asyncio.to_thread(broken.fetch, "github") == CREDENTIAL
    assert bearers(http_server) == [SA, SA, CP, CP]


async def test_all_service_sources_failing(http_server: ScriptedServer) -> None:
    c = client(
        http_server,
        service_account=FakeSource(TokenUnavailableError("sa file missing", retryable=True)),
        control_plane=FakeSource(TokenUnavailableError("cp down", retryable=True)),
    )
    with pytest.raises(CredentialUnavailableError) as info:
        await c.fetch_async("github")
    assert "sa file missing" in str(info.value)
    assert "cp down" in str(info.value)
    assert info.value.retryable is True
    assert http_server.count == 0


# --- HTTP outcomes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "retryable", "match"),
    [
        (Reply(404, b"credential not found"), False, "HTTP 404 with the caller token: credential"),
        (Reply(500, b"backend exploded"), True, "HTTP 500"),
        (Reply(503, b""), True, "HTTP 503 with the caller token: <empty body>"),
        (Reply(302, b"", {"Location": "http://evil.example.com/"}), False, "HTTP 302"),
        (Reply(200, json.dumps(CREDENTIAL["token"]).encode()), False, "not a JSON object"),
        (Reply(200, f"<b>{CREDENTIAL['token']}</b>".encode()), False, "not a JSON object"),
    ],
)
@pytest.mark.parametrize("use_async", [False, True])
async def test_failures(
    http_server: ScriptedServer, reply: Reply, retryable: bool, match: str, use_async: bool
) -> None:
    http_server.handler = lambda seen: reply
    c = client(http_server)
    with pytest.raises(CredentialUnavailableError, match=match) as info:
        await fetch(c, use_async, caller_token=CALLER)
    assert info.value.retryable is retryable
    assert f"127.0.0.1:{http_server.port}" in str(info.value)
    assert_clean(str(info.value))
    assert http_server.count == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_timeout_and_size_bounds(http_server: ScriptedServer, use_async: bool) -> None:
    http_server.handler = lambda seen: Reply.json(CREDENTIAL, 200)
    big = client(http_server, max_response_bytes=10)
    slow = client(http_server, timeout=0.2)
    with pytest.raises(CredentialUnavailableError, match="larger than 10 bytes"):
        await fetch(big, use_async, caller_token=CALLER)
    http_server.handler = lambda seen: Reply(200, b"{}", delay=3.0)
    with pytest.raises(CredentialUnavailableError, match="timed out") as info:
        await fetch(slow, use_async, caller_token=CALLER)
    assert info.value.retryable is True


async def test_ids_are_quoted(http_server: ScriptedServer) -> None:
    http_server.handler = backend({CALLER})
    c = client(http_server)
    await c.fetch_async("gitlab", caller_token=CALLER)
    await asyncio.to_thread(c.fetch, "gitlab", caller_token=CALLER)
    for seen in http_server.requests:
        prefix, segment, suffix = seen.path.rsplit("/", 2)
        assert (prefix, suffix) == ("/api/ambient/v1/credentials", "token")
        # aiohttp may leave ":" (legal in a path) unescaped; "%" is always escaped.
        assert "%25" in segment
        assert urllib.parse.unquote(segment) == "id:with%odd"


def test_unknown_provider_and_bad_caller_token(http_server: ScriptedServer) -> None:
    c = client(http_server)
    with pytest.raises(ConfigurationError, match="no credential id configured for provider 'x'"):
        c.fetch("x", caller_token=CALLER)
    with pytest.raises(ConfigurationError, match="slashes"):
        c.fetch("../etc", caller_token=CALLER)
    for bad in ("", "has space", "line\nbreak"):
        with pytest.raises(ConfigurationError, match="caller token") as info:
            c.fetch("github", caller_token=bad)
        assert not bad or bad not in str(info.value)
    assert http_server.count == 0


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8000",
        "http://LOCALHOST",
        "http://localhost.:8000/",
        "http://127.0.0.1:8000",
        "http://127.1.2.3",
        "http://[::1]:8000",
        "http://backend.ambient.svc:8080",
        "https://backend.ambient.svc.cluster.local/base/",
        "http://backend.svc",
        # The shared locality policy (the same as for gRPC targets):
        "http://backend:8080",  # a short name, like the default gRPC target
        "http://svc",
        "http://backend.ambient.pod.cluster.local",
        "http://[::ffff:7f00:1]",  # IPv4-mapped loopback
    ],
)
def test_allowed_hosts(url: str) -> None:
    assert not check_backend_url(url).endswith("/")
    CredentialClient(url)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://evil.example.com", "not allowed"),
        ("http://10.0.0.1:8000", "not allowed"),
        ("http://169.254.169.254", "not allowed"),
        ("https://evil.example.com", "not allowed"),  # TLS does not make it in-cluster
        ("http://[::ffff:10.0.0.1]", "not allowed"),
        ("http://127.0.0.1.nip.io", "not allowed"),
        ("http://2svc", "not allowed"),
        ("http://under_score.svc", "not allowed"),
        ("http://.svc", "not allowed"),
        ("http://evil.com%2f.svc", "not allowed"),
        ("http://backend.svc.evil.com", "not allowed"),
        ("http://svc.cluster.local.evil.com", "not allowed"),
        ("http://2130706433", "not allowed"),
        ("http://user:pw@localhost", "user information"),
        ("http://localhost#frag", "fragment"),
        ("http://localhost/?q=1", "query"),
        ("ftp://localhost", "scheme"),
        ("localhost:8000", "scheme"),
    ],
)
def test_refused_hosts(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        CredentialClient(url)
    assert "pw" not in str(info.value)


def test_backend_url_from_env() -> None:
    assert backend_url_from_env({}) == DEFAULT_BACKEND_URL
    assert backend_url_from_env({"AMBIENT_API_SERVER_URL": "http://a.svc"}) == "http://a.svc"
    assert (
        backend_url_from_env(
            {"AMBIENT_API_SERVER_URL": "http://a.svc", "BACKEND_API_URL": " http://b.svc "}
        )
        == "http://b.svc"
    )


def test_parse_credential_ids() -> None:
    assert parse_credential_ids(None) == {}
    assert parse_credential_ids("  ") == {}
    assert parse_credential_ids('{"github": "abc", "jira": 42}') == {"github": "abc", "jira": "42"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('["github"]', "must be a JSON object"),
        ('"github"', "must be a JSON object"),
        ('{"github": null}', "must be a string"),
        ('{"github": true}', "must be a string"),
        ('{"github": {"id": 1}}', "must be a string"),
        ('{"github": ""}', "1 to 256"),
        ('{"": "x"}', "1 to 256"),
        ('{"github": "a/b"}', "slashes"),
        ('{"github": ".."}', "dot segment"),
        ('{"github": "a b"}', "whitespace"),
        ('{"github": "a\\u0000b"}', "control"),
        ('{"github": "' + "x" * 300 + '"}', "1 to 256"),
        ("{" + ",".join(f'"p{i}": "x"' for i in range(300)) + "}", "more than 256"),
        ("[" * 100_000, "longer than"),
        ("[" * 60_000, "not valid JSON"),
    ],
)
def test_parse_credential_ids_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        parse_credential_ids(text)


async def test_from_env(http_server: ScriptedServer, tmp_path: Path) -> None:
    sa_file = tmp_path / "token"
    sa_file.write_text(SA)
    http_server.handler = backend({SA})
    env = {
        "BACKEND_API_URL": http_server.url(""),
        "CREDENTIAL_IDS": json.dumps({"github": "cred-123"}),
    }
    c = CredentialClient.from_env(env, service_account_token_path=str(sa_file))
    assert await c.fetch_async("github") == CREDENTIAL
    assert SA not in repr(c)
    with pytest.raises(ConfigurationError, match="not allowed"):
        CredentialClient.from_env({"BACKEND_API_URL": "http://example.com"})
    with pytest.raises(ConfigurationError, match="CREDENTIAL_IDS"):
        CredentialClient.from_env({"CREDENTIAL_IDS": "[]"})
    default = CredentialClient.from_env({}, service_account_token_path=str(tmp_path / "absent"))
    assert default.base_url == DEFAULT_BACKEND_URL
