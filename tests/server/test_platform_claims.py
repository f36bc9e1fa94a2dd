"""Runner tokens name the caller for the platform's API server, and that name
grants nothing on ours.

The platform's API server (its gRPC pre-auth interceptor) names a JWT caller
by the first of ``preferred_username``, ``username``, ``sub`` that is a
non-empty string without ``:``, and makes it a service caller when that name
is its ``GRPC_SERVICE_ACCOUNT`` (or ``service-account-`` + it). Our control
plane's ``sub`` (``system:serviceaccount:...``) is skipped there, so runner
tokens carry ``preferred_username``. Our API server keeps classifying runner
tokens by issuer, ``token_use`` and ``session_id``, and names callers by
``sub``: a ``preferred_username`` equal to our own service account does not
widen a runner's scope, nor make a user a service.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from support.cp import copy_keys, public_pem, runner_style_bearer
from support.keys import jwk_of, other_key, signing_key
from support.server import IDP_ISSUER, IDP_KID, JwksServer, mint, run_aio_server_in_thread

from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.issuers import DEFAULT_USERNAME, JwtIssuer
from ambient_grpc_auth.controlplane.signing import SigningKey, SigningKeySet
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2, sessions_pb2_grpc
from ambient_grpc_auth.reference.serve import start_aio_session_server, start_sync_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import (
    API_TOKEN_ENV,
    SERVICE_ACCOUNT_ENV,
    SERVICE_ACCOUNT_ISSUER_ENV,
    ServerAuthConfig,
)
from ambient_grpc_auth.server.jwks import JwksCache

CP_ISSUER = "https://cp.platform.test"
AUDIENCE = "ambient-api-server"
SERVICE_TOKEN = "platform-claims-service-token-0123456789"  # noqa: S105 (test value)


def _platform_caller_name(claims: dict[str, Any]) -> str:
    """The name the platform's API server gives a JWT caller (see module doc)."""
    for key in ("preferred_username", "username", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value and ":" not in value:
            return value
    return ""


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _cp(**kw: Any) -> JwtIssuer:
    keys = SigningKeySet(current=SigningKey.from_private_key(other_key()))
    return JwtIssuer(signing_keys=keys, issuer=CP_ISSUER, audience=AUDIENCE, **kw)


def test_runner_tokens_carry_a_name_the_platform_classifies() -> None:
    claims = _claims(_cp().issue_now("session-0001").token)
    assert claims["preferred_username"] == DEFAULT_USERNAME == "ambient-runner"
    assert _platform_caller_name(claims) == DEFAULT_USERNAME
    # Without the claim the platform finds no name: our `sub` holds ':'.
    bare = _claims(_cp(username=None).issue_now("session-0001").token)
    assert "preferred_username" not in bare
    assert _platform_caller_name(bare) == ""
    named = _claims(_cp(username="service-account-ocm").issue_now("session-0001").token)
    assert _platform_caller_name(named) == "service-account-ocm"
    assert TokenServerConfig.username == DEFAULT_USERNAME


@pytest.mark.parametrize("bad", ["", "system:serviceaccount:ns:runner", "x" * 257])
def test_a_name_the_platform_would_skip_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        _cp(username=bad)


@pytest.mark.parametrize(("flag", "expected"), [([], DEFAULT_USERNAME), (["--username", ""], None)])
def test_token_server_username_flag(tmp_path: Path, flag: list[str], expected: str | None) -> None:
    """``token-server --username`` reaches the tokens the real endpoint issues."""
    keys = copy_keys(tmp_path / "keys")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ambient_grpc_auth", "token-server", "--keys", str(keys)]
        + ["--listen", "127.0.0.1:0", *flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(60)
        assert lines, "token-server did not start"
        url = lines[0].split()[-1]
        request = urllib.request.Request(url + "/token")
        proof = runner_style_bearer(public_pem(keys), "session-0001")
        request.add_header("Authorization", f"Bearer {proof}")
        with urllib.request.urlopen(request, timeout=10) as reply:
            token = json.loads(reply.read())["token"]
        assert _claims(token).get("preferred_username") == expected
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


# --- our API server ignores the claim ----------------------------------------------


@pytest.fixture
def cp() -> JwtIssuer:
    return _cp()


@pytest.fixture
def jwks(cp: JwtIssuer) -> Iterator[JwksServer]:
    server = JwksServer({"keys": [*cp.jwks()["keys"], jwk_of(signing_key(), IDP_KID)]})
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sync", "aio"])
def address(request: pytest.FixtureRequest, jwks: JwksServer) -> Iterator[str]:
    store = SessionStore(":memory:")
    issuers = [
        TrustedIssuer(
            issuer=CP_ISSUER, audiences=(AUDIENCE,), keys=JwksCache(jwks.url), control_plane=True
        ),
        TrustedIssuer(issuer=IDP_ISSUER, audiences=(AUDIENCE,), keys=JwksCache(jwks.url)),
    ]
    # Our own service account is the very name runner tokens carry.
    environ = {
        API_TOKEN_ENV: SERVICE_TOKEN,
        SERVICE_ACCOUNT_ENV: DEFAULT_USERNAME,
        SERVICE_ACCOUNT_ISSUER_ENV: CP_ISSUER,
    }
    config = ServerAuthConfig.from_env(
        environ=environ, issuers=issuers, owner_lookup=store.owner_of
    )
    if request.param == "sync":
        sync = start_sync_session_server(store, config)
        stop = lambda: sync.stop(None)  # noqa: E731
        target = f"127.0.0.1:{sync.port}"
    else:

        async def start() -> tuple[grpc.aio.Server, int]:
            server, port, _ = await start_aio_session_server(store, config)
            return server, port

        running = run_aio_server_in_thread(start)
        stop, target = running.stop, running.target
    try:
        yield target
    finally:
        stop()
        store.close()


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _push(stub: Any, session_id: str, token: str) -> grpc.StatusCode:
    request = sessions_pb2.PushSessionMessageRequest(
        session_id=session_id, event_type="e", payload="p"
    )
    try:
        stub.PushSessionMessage(request, metadata=_bearer(token), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_the_name_grants_nothing_on_our_server(cp: JwtIssuer, address: str) -> None:
    now = time.time()
    with grpc.insecure_channel(address) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        create = sessions_pb2.CreateSessionRequest
        mine = stub.CreateSession(create(name="a"), metadata=_bearer(SERVICE_TOKEN), timeout=10)
        other = stub.CreateSession(create(name="b"), metadata=_bearer(SERVICE_TOKEN), timeout=10)
        bob_token = mint(now, sub="bob", aud=AUDIENCE)
        bobs = stub.CreateSession(create(name="c"), metadata=_bearer(bob_token), timeout=10)

        # A runner token named like our service account stays scoped to its session.
        runner = cp.issue_now(mine.metadata.id).token
        assert _claims(runner)["preferred_username"] == DEFAULT_USERNAME
        assert _push(stub, mine.metadata.id, runner) is grpc.StatusCode.OK
        assert _push(stub, other.metadata.id, runner) is grpc.StatusCode.PERMISSION_DENIED
        assert _push(stub, bobs.metadata.id, runner) is grpc.StatusCode.PERMISSION_DENIED

        # A user whose token claims the service account's name stays a user.
        alice = mint(now, sub="alice", aud=AUDIENCE, preferred_username=DEFAULT_USERNAME)
        assert _push(stub, bobs.metadata.id, alice) is grpc.StatusCode.PERMISSION_DENIED
        assert _push(stub, mine.metadata.id, alice) is grpc.StatusCode.PERMISSION_DENIED
        # Control: bob, the owner, may push; the user IdP is trusted.
        assert _push(stub, bobs.metadata.id, bob_token) is grpc.StatusCode.OK
