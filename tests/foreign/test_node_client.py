"""A non-Python gRPC client against our session server: Node's @grpc/grpc-js
(tests/foreign/client.js, loading proto/ambient/v1/sessions.proto at run
time) creates a session, pushes, and watches (replay, then a live message),
with the static service token and with a runner JWT from our control plane's
issuer, on the sync and the aio server; and gets UNAUTHENTICATED without a
bearer, with a wrong one, a malformed one and a forged JWT.

Needs ``node`` and ``npm ci --prefix tests/foreign`` (.ci/run does both).
Outside CI a missing Node or node_modules skips these tests; in CI
(``CI`` set) it fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.keys import other_key, signing_key
from support.server import JwksServer, run_aio_server_in_thread

from ambient_grpc_auth.controlplane.issuers import DEFAULT_AUDIENCE, JwtIssuer
from ambient_grpc_auth.controlplane.signing import SigningKey, SigningKeySet
from ambient_grpc_auth.reference.serve import start_aio_session_server, start_sync_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import API_TOKEN_ENV, ServerAuthConfig
from ambient_grpc_auth.server.jwks import JwksCache

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client.js"
CP_ISSUER = "https://cp.foreign.test"
SERVICE_TOKEN = "foreign-client-service-token-0123456789"  # noqa: S105 (test value)
RUN_TIMEOUT = 30.0


def _node() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed (apt-get install nodejs npm)"
    elif not (HERE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing = "tests/foreign/node_modules is missing (npm ci --prefix tests/foreign)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"foreign-client tests cannot run in CI: {missing}")
        pytest.skip(missing)
    assert node is not None
    return node


@dataclass
class Server:
    target: str
    cp: JwtIssuer


@pytest.fixture(scope="module")
def node() -> str:
    return _node()


@pytest.fixture(scope="module")
def cp() -> JwtIssuer:
    keys = SigningKeySet(current=SigningKey.from_private_key(other_key()))
    return JwtIssuer(signing_keys=keys, issuer=CP_ISSUER)


@pytest.fixture(scope="module")
def jwks(cp: JwtIssuer) -> Iterator[JwksServer]:
    server = JwksServer(cp.jwks())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sync", "aio"])
def server(request: pytest.FixtureRequest, cp: JwtIssuer, jwks: JwksServer) -> Iterator[Server]:
    store = SessionStore(":memory:")
    issuer = TrustedIssuer(
        issuer=CP_ISSUER,
        audiences=(DEFAULT_AUDIENCE,),
        keys=JwksCache(jwks.url),
        control_plane=True,
    )
    config = ServerAuthConfig.from_env(
        environ={API_TOKEN_ENV: SERVICE_TOKEN}, issuers=[issuer], owner_lookup=store.owner_of
    )
    if request.param == "sync":
        sync = start_sync_session_server(store, config)
        stop, target = (lambda: sync.stop(None)), f"127.0.0.1:{sync.port}"
    else:

        async def start() -> tuple[grpc.aio.Server, int]:
            aio, port, _ = await start_aio_session_server(store, config)
            return aio, port

        running = run_aio_server_in_thread(start)
        stop, target = running.stop, running.target
    try:
        yield Server(target, cp)
    finally:
        stop()
        store.close()


def _run(node: str, target: str, *args: str, **env: str) -> tuple[int, list[dict[str, Any]]]:
    environ = {"PATH": os.environ.get("PATH", ""), "TARGET": target, **env}
    done = subprocess.run(
        [node, str(CLIENT), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode in (0, 3), done.stderr[-2000:]
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def _create(node: str, target: str) -> str:
    code, out = _run(node, target, "create", "--name", "from-node", TOKEN=SERVICE_TOKEN)
    assert code == 0, out
    assert out[0]["name"] == "from-node"
    return str(out[0]["id"])


def _check_roundtrip(node: str, target: str, session_id: str, token: str) -> None:
    code, pushed = _run(
        node,
        target,
        "push",
        "--session",
        session_id,
        "--event-type",
        "e",
        "--payload",
        "first",
        TOKEN=token,
    )
    assert code == 0, pushed
    assert (pushed[0]["session_id"], pushed[0]["seq"]) == (session_id, 1)
    code, watched = _run(
        node, target, "roundtrip", "--session", session_id, "--payload", "second", TOKEN=token
    )
    assert code == 0, watched
    assert [(m["seq"], m["payload"]) for m in watched] == [
        (1, "first"),
        (2, "second"),
        (3, "second-live"),
    ]


def test_static_service_token(node: str, server: Server) -> None:
    session_id = _create(node, server.target)
    _check_roundtrip(node, server.target, session_id, SERVICE_TOKEN)


def test_runner_jwt_scoped_to_its_session(node: str, server: Server) -> None:
    session_id = _create(node, server.target)
    other = _create(node, server.target)
    token = server.cp.issue_now(session_id).token
    _check_roundtrip(node, server.target, session_id, token)
    code, out = _run(
        node, server.target, "push", "--session", other, "--event-type", "e", "--payload", "x",
        TOKEN=token,
    )  # fmt: skip
    assert code == 3
    assert out[0]["error"]["status"] == "PERMISSION_DENIED"


def _forged(cp: JwtIssuer, session_id: str) -> str:
    """A runner token with the CP's claims and kid, signed by another key."""
    real = cp.issue_now(session_id).token
    kid = cp.jwks()["keys"][0]["kid"]
    keys = SigningKeySet(current=SigningKey(signing_key(), kid))
    forged = JwtIssuer(signing_keys=keys, issuer=CP_ISSUER).issue_now(session_id).token
    assert forged != real
    return forged


@pytest.mark.parametrize("case", ["no-bearer", "wrong-token", "not-bearer", "forged-jwt"])
def test_unauthenticated(node: str, server: Server, case: str) -> None:
    session_id = _create(node, server.target)
    env = {
        "no-bearer": {},
        "wrong-token": {"TOKEN": "not-the-service-token-0123456789"},
        "not-bearer": {"AUTHORIZATION": f"Basic {SERVICE_TOKEN}"},
        "forged-jwt": {"TOKEN": _forged(server.cp, session_id)},
    }[case]
    for args in (
        ("create", "--name", "x"),
        ("push", "--session", session_id, "--event-type", "e", "--payload", "p"),
        ("roundtrip", "--session", session_id, "--payload", "p"),
    ):
        code, out = _run(node, server.target, *args, **env)
        assert code == 3, out
        error = out[-1]["error"]
        assert error["status"] == "UNAUTHENTICATED"
        assert SERVICE_TOKEN not in error["details"]
