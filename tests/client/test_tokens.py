"""Token, the static/env/file/chain sources and token_source_from_env."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from support import keys
from support.client import FakeSource
from support.runner import b64_pem, make_jwt

from ambient_grpc_auth._http import excerpt, parse_rfc3339
from ambient_grpc_auth.client.caching import CachingTokenSource
from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.env import token_source_from_env
from ambient_grpc_auth.client.tokens import (
    ChainTokenSource,
    EnvTokenSource,
    FileTokenSource,
    RefreshableTokenSource,
    StaticTokenSource,
    Token,
    TokenSource,
    jwt_expiry,
)
from ambient_grpc_auth.errors import ConfigurationError, TokenUnavailableError
from ambient_grpc_auth.testing import FakeClock

SECRET = "s3cr3t-value-that-must-not-leak"


@pytest.fixture
def public_pem() -> str:
    return keys.public_pem(keys.signing_key()).decode("ascii")


# --- Token ------------------------------------------------------------------


def test_token_repr_and_str_hide_value() -> None:
    t = Token(SECRET, 123.0)
    assert SECRET not in repr(t)
    assert SECRET not in str(t)
    assert f"{t}".count("redacted") == 1
    assert "123.0" in repr(t)


def test_token_is_immutable() -> None:
    t = Token("abc")
    with pytest.raises(AttributeError):
        t.value = "x"  # type: ignore[misc]


def test_from_value_uses_explicit_expiry_over_jwt() -> None:
    value = make_jwt(2_000_000_000)
    assert Token.from_value(value, 1_900_000_000.5).expires_at == 1_900_000_000.5


def test_from_value_reads_jwt_exp_unverified() -> None:
    assert Token.from_value(make_jwt(2_000_000_000)).expires_at == 2_000_000_000.0
    # Expired JWTs still yield their exp (no validation happens).
    assert Token.from_value(make_jwt(5)).expires_at == 5.0


@pytest.mark.parametrize(
    "value",
    [
        "opaque-token",
        "a.b.c",
        "not.a.jwt!",
        make_jwt(None),  # a JWT without exp
        "",
    ],
)
def test_unknown_expiry(value: str) -> None:
    assert Token.from_value(value).expires_at is None
    assert jwt_expiry(value) is None


def test_jwt_exp_of_wrong_type_is_ignored() -> None:
    import jwt as pyjwt

    for exp in ("soon", True, None, [1]):
        value = pyjwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256")
        # PyJWT refuses to encode a non-numeric exp; craft the payload by hand.
        header, _, sig = value.split(".")
        import base64
        import json

        payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=")
        assert jwt_expiry(f"{header}.{payload.decode()}.{sig}") is None


def test_protocols_are_runtime_checkable() -> None:
    assert isinstance(StaticTokenSource("abc"), TokenSource)
    assert isinstance(CachingTokenSource(StaticTokenSource("abc")), RefreshableTokenSource)
    assert not isinstance(StaticTokenSource("abc"), RefreshableTokenSource)


# --- RFC 3339 and excerpts (shared helpers) ----------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2027-01-15T08:00:00Z", 1_800_000_000.0),
        ("2027-01-15T08:00:00.25Z", 1_800_000_000.25),
        ("2027-01-15T09:30:00+01:30", 1_800_000_000.0),
        ("2027-01-15T03:00:00-05:00", 1_800_000_000.0),
        ("2027-01-15t08:00:00z", 1_800_000_000.0),
        ("2027-01-15 08:00:00.123456789Z", 1_800_000_000.123456789),
        ("2016-12-31T23:59:60Z", 1_483_228_800.0),
    ],
)
def test_parse_rfc3339(text: str, expected: float) -> None:
    assert parse_rfc3339(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        "2027-01-15T08:00:00",  # no offset
        "2027-01-15",
        "yesterday",
        "2027-13-01T00:00:00Z",
        "2027-01-15T08:00:00+25:00",
        "2027-01-15T08:00:00Z" + " " * 60,
        "",
    ],
)
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_excerpt_scrubs_bearer_like_values() -> None:
    jwt_value = make_jwt(2_000_000_000)
    body = (
        f"denied: Bearer {SECRET} and {jwt_value} and "
        f'{{"token": "{SECRET}"}} and {"A" * 40} ok\x00\x07'
    ).encode()
    text = excerpt(body)
    assert SECRET not in text
    assert jwt_value not in text
    assert jwt_value[:10] not in text
    assert "A" * 40 not in text
    assert "\x00" not in text
    assert "\x07" not in text
    assert text.startswith("denied")


def test_excerpt_is_bounded_and_removes_known_secrets() -> None:
    assert "hunter22" not in excerpt(b"x hunter22 y", secrets=("hunter22",))
    long = excerpt(b"word " * 1000)
    assert len(long) <= 203
    assert excerpt(b"") == "<empty body>"
    assert excerpt(b"session not allowed") == "session not allowed"


# --- static / env -------------------------------------------------------------


async def test_static_source() -> None:
    src = StaticTokenSource("abc")
    assert src.get_token() == Token("abc")
    assert await src.get_token_async() == Token("abc")
    token = Token("xyz", 5.0)
    assert StaticTokenSource(token).get_token() is token
    assert "abc" not in repr(src)


@pytest.mark.parametrize("bad", ["", "with space", "ctl\x01", "nön-ascii"])
def test_static_source_rejects_unsendable_tokens(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        StaticTokenSource(bad)
    assert bad not in str(info.value) or bad == ""


async def test_env_source_reads_once() -> None:
    env = {"BOT_TOKEN": f" {SECRET}\n"}
    src = EnvTokenSource.from_env(environ=env)
    env["BOT_TOKEN"] = "changed"
    assert src.get_token().value == SECRET
    assert (await src.get_token_async()).value == SECRET
    assert SECRET not in repr(src)
    assert "BOT_TOKEN" in repr(src)


def test_env_source_missing_or_bad() -> None:
    with pytest.raises(ConfigurationError, match="BOT_TOKEN is not set"):
        EnvTokenSource.from_env(environ={})
    with pytest.raises(ConfigurationError, match="OTHER is not set"):
        EnvTokenSource.from_env("OTHER", environ={"OTHER": "  "})
    with pytest.raises(ConfigurationError) as info:
        EnvTokenSource.from_env(environ={"BOT_TOKEN": "two words"})
    assert "two words" not in str(info.value)


# --- file ---------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def test_file_source_reads_and_strips(tmp_path: Path) -> None:
    path = tmp_path / "token"
    value = make_jwt(2_000_000_000)
    _write(path, value + "\n")
    src = FileTokenSource(path, clock=FakeClock())
    token = src.get_token()
    assert token.value == value
    assert token.expires_at == 2_000_000_000.0
    assert value not in repr(src)


def test_file_source_detects_change_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "token"
    _write(path, "first-token")
    src = FileTokenSource(path, clock=FakeClock())
    assert src.get_token().value == "first-token"
    # Different size: detected immediately, no clock advance needed.
    _write(path, "second-token-longer")
    assert src.get_token().value == "second-token-longer"
    # Atomic replacement (new inode), same size as before: detected.
    tmp = tmp_path / "token.new"
    _write(tmp, "third-token-longer!")
    os.replace(tmp, path)
    assert src.get_token().value == "third-token-longer!"


def test_file_source_rereads_after_interval(tmp_path: Path) -> None:
    path = tmp_path / "token"
    _write(path, "aaaa")
    clock = FakeClock()
    src = FileTokenSource(path, clock=clock, reread_interval=60)
    assert src.get_token().value == "aaaa"
    # Same size, same inode, mtime forced back: a change stat cannot see.
    st = os.stat(path)
    _write(path, "bbbb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.get_token().value == "aaaa"
    clock.advance(59)
    assert src.get_token().value == "aaaa"
    clock.advance(1)
    assert src.get_token().value == "bbbb"


def test_file_source_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "token"
    _write(path, "good-token")
    clock = FakeClock()
    src = FileTokenSource(path, clock=clock)
    assert src.get_token().value == "good-token"
    _write(path, "")  # empty: a failure
    assert src.get_token().value == "good-token"
    path.unlink()  # missing: a failure
    clock.advance(120)
    assert src.get_token().value == "good-token"
    _write(path, "x" * 100)
    src2 = FileTokenSource(path, clock=clock, max_bytes=10)
    with pytest.raises(TokenUnavailableError, match="larger than 10 bytes"):
        src2.get_token()
    _write(path, "back-again")
    assert src.get_token().value == "back-again"
    # Something unreadable as a token (a directory) in its place: still the last good one.
    path.unlink()
    path.mkdir()
    assert src.get_token().value == "back-again"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_file_source_unreadable_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "token"
    _write(path, "good-token")
    src = FileTokenSource(path, clock=FakeClock())
    assert src.get_token().value == "good-token"
    _write(path, "new-token-unreadable")
    path.chmod(0)
    assert src.get_token().value == "good-token"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "empty"),
        ("  \n\t", "empty"),
        ("two words", "does not hold a single printable token"),
        ("b\u00e4d", "not ASCII"),
    ],
)
def test_file_source_never_good_raises(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content.encode())
    with pytest.raises(TokenUnavailableError, match=problem) as info:
        FileTokenSource(path).get_token()
    assert info.value.retryable is True
    if content.strip():
        assert content.strip() not in str(info.value)


def test_file_source_missing_and_special_files(tmp_path: Path) -> None:
    with pytest.raises(TokenUnavailableError, match="no such file"):
        FileTokenSource(tmp_path / "absent").get_token()
    with pytest.raises(TokenUnavailableError, match="not a regular file|is a directory"):
        FileTokenSource(tmp_path).get_token()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            FileTokenSource(fifo).get_token()
        except TokenUnavailableError as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading a FIFO hung"
    assert errors
    assert "not a regular file" in str(errors[0])


async def test_file_source_async(tmp_path: Path) -> None:
    path = tmp_path / "token"
    _write(path, "async-token")
    assert (await FileTokenSource(path).get_token_async()).value == "async-token"


def test_file_source_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        FileTokenSource(tmp_path / "t", reread_interval=0)
    with pytest.raises(ConfigurationError):
        FileTokenSource(tmp_path / "t", max_bytes=0)


# --- chain ----------------------------------------------------------------------


async def test_chain_first_that_yields() -> None:
    a = FakeSource(TokenUnavailableError("a down", retryable=False))
    b = FakeSource(default=Token("from-b"))
    chain = ChainTokenSource(a, b)
    assert chain.get_token().value == "from-b"
    assert a.calls == 1
    assert b.calls == 1
    a.results.append(TokenUnavailableError("a down", retryable=False))
    assert (await chain.get_token_async()).value == "from-b"


async def test_chain_all_fail_summarises() -> None:
    a = FakeSource(TokenUnavailableError("first broke", retryable=False))
    b = FakeSource(TokenUnavailableError("second broke", retryable=True, status=503))
    with pytest.raises(TokenUnavailableError) as info:
        ChainTokenSource(a, b).get_token()
    assert "first broke" in str(info.value)
    assert "second broke" in str(info.value)
    assert info.value.retryable is True
    c = FakeSource(TokenUnavailableError("only", retryable=False))
    with pytest.raises(TokenUnavailableError) as info2:
        await ChainTokenSource(c).get_token_async()
    assert info2.value.retryable is False


def test_chain_needs_sources_and_passes_other_errors() -> None:
    with pytest.raises(ConfigurationError):
        ChainTokenSource()
    boom = FakeSource(RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        ChainTokenSource(boom, StaticTokenSource("x")).get_token()


# --- from env ---------------------------------------------------------------------


def test_from_env_prefers_control_plane(public_pem: str) -> None:
    env = {
        "AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:9/token",
        "AMBIENT_CP_TOKEN_PUBLIC_KEY": public_pem,
        "SESSION_ID": "session-12345",
        "BOT_TOKEN": "bot",
    }
    src = token_source_from_env(env)
    assert isinstance(src, CachingTokenSource)
    assert isinstance(src.source, ControlPlaneTokenSource)
    # The platform also passes the key base64-encoded once more.
    env["AMBIENT_CP_TOKEN_PUBLIC_KEY"] = b64_pem(public_pem)
    assert isinstance(token_source_from_env(env).source, ControlPlaneTokenSource)


@pytest.mark.parametrize("missing", ["AMBIENT_CP_TOKEN_PUBLIC_KEY", "SESSION_ID"])
def test_from_env_control_plane_needs_key_and_session(public_pem: str, missing: str) -> None:
    env = {
        "AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:9/token",
        "AMBIENT_CP_TOKEN_PUBLIC_KEY": public_pem,
        "SESSION_ID": "session-12345",
        "BOT_TOKEN": "bot-token",
    }
    del env[missing]
    with pytest.raises(ConfigurationError, match=missing):
        token_source_from_env(env)


def test_from_env_bad_key_or_url(public_pem: str) -> None:
    env = {
        "AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:9/token",
        "AMBIENT_CP_TOKEN_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
        "SESSION_ID": "session-12345",
    }
    with pytest.raises(ConfigurationError, match="public key"):
        token_source_from_env(env)
    env["AMBIENT_CP_TOKEN_PUBLIC_KEY"] = public_pem
    env["AMBIENT_CP_TOKEN_URL"] = "ftp://cp/token"
    with pytest.raises(ConfigurationError, match="scheme"):
        token_source_from_env(env)


def test_from_env_bot_token_then_file(tmp_path: Path) -> None:
    src = token_source_from_env({"BOT_TOKEN": "bot-token"}, service_account_token_path="/nope")
    assert isinstance(src.source, EnvTokenSource)
    assert src.get_token().value == "bot-token"
    sa = tmp_path / "token"
    sa.write_text("sa-token")
    src = token_source_from_env({}, service_account_token_path=str(sa))
    assert isinstance(src.source, FileTokenSource)
    assert src.get_token().value == "sa-token"
    with pytest.raises(ConfigurationError, match="no token source configured"):
        token_source_from_env({}, service_account_token_path=str(tmp_path / "absent"))
