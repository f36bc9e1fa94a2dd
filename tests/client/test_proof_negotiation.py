"""Proof-version negotiation: the runner sends v2 or the pod-bound proof only to
a control plane that advertises it, v1 otherwise.

Counterparts, all real servers on 127.0.0.1: the project's token server (in
process and as the ``token-server`` CLI process), and a small aiohttp
"platform-contract CP" written here that speaks only the platform's contract
(``GET /token`` with a v1 proof -> ``{"token": ...}``; 401/403/405 as in the
design; 404 for everything else, so no discovery). It decrypts the bearer the
way the platform's control plane does: the whole plaintext is the session id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from support import keys
from support.cp import copy_keys, public_pem, serving
from support.runner import make_jwt
from support.server import JwksServer

from ambient_grpc_auth.client.control_plane import ControlPlaneTokenSource
from ambient_grpc_auth.client.env import token_source_from_env
from ambient_grpc_auth.client.tokens import Token
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.podproof import PodProofSettings
from ambient_grpc_auth.errors import ConfigurationError, ProofError, TokenUnavailableError
from ambient_grpc_auth.proof import (
    POD_TOKEN_HEADER,
    PROOF_VERSIONS_HEADER,
    SessionIdRule,
    decode_proof,
)
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.jwks import JwksCache
from ambient_grpc_auth.testing import FakeIssuer

SESSION_ID = "session-0123456789abcdef"
CLUSTER = "https://kubernetes.default.svc.cluster.local"
CP_AUDIENCE = "ambient-control-plane"
NS = "ambient-sessions"
DISCOVERY = "/.well-known/openid-configuration"


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.delays.append(seconds)


# --- the platform-contract control plane ---------------------------------------


class ContractCP:
    """The platform's /token contract. With ``advertise`` set it stands for a
    control plane that understands those versions (and says so in a
    response header on everything); with None, for the platform's own."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self.key = private_key
        self.advertise: str | None = None
        self.paths: list[str] = []
        self.decrypted: list[str] = []  # what a platform CP took for the session id
        self.pod_tokens: list[str | None] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.paths.append(request.path)
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            response = web.Response(status=exc.status, text=exc.reason)
        if self.advertise is not None:
            response.headers[PROOF_VERSIONS_HEADER] = self.advertise
        return response

    async def token(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return web.Response(status=405, text="method not allowed")
        self.pod_tokens.append(request.headers.get(POD_TOKEN_HEADER))
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return web.Response(status=401, text="missing bearer")
        if self.advertise is not None:
            try:
                proof = decode_proof(self.key, auth[7:])
            except ProofError:
                return web.Response(status=401, text="invalid proof")
            if f"v{proof.version}" not in self.advertise.split(","):
                return web.Response(status=401, text="proof version not accepted")
            sid = proof.session_id
        else:
            try:
                ciphertext = base64.b64decode(auth[7:], validate=True)
                plaintext = self.key.decrypt(
                    ciphertext,
                    padding.OAEP(
                        mgf=padding.MGF1(algorithm=hashes.SHA256()),
                        algorithm=hashes.SHA256(),
                        label=None,
                    ),
                )
            except (binascii.Error, ValueError):
                return web.Response(status=401, text="invalid proof")
            sid = plaintext.decode("utf-8", "replace")
        self.decrypted.append(sid)
        if len(sid) < 8 or any(c.isspace() for c in sid):
            return web.Response(status=403, text="invalid session id")
        # Token only: older control planes send no expiry.
        return web.json_response({"token": make_jwt(1_900_000_000, session_id=sid)})

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_route("*", "/token", self.token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/token"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def platform_cp() -> AsyncIterator[ContractCP]:
    cp = ContractCP(keys.signing_key())
    await cp.start()
    try:
        yield cp
    finally:
        await cp.close()


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    """A projected service-account token file (its content matters only
    where a server verifies it)."""
    path = tmp_path / "cp-token"
    path.write_text("header.payload.signature\n")
    return path


def env_for(
    url: str, pem: str | bytes, sa_file: Path | None = None, **extra: str
) -> dict[str, str]:
    env = {
        "AMBIENT_CP_TOKEN_URL": url,
        "AMBIENT_CP_TOKEN_PUBLIC_KEY": pem.decode() if isinstance(pem, bytes) else pem,
        "SESSION_ID": SESSION_ID,
        **extra,
    }
    if sa_file is not None:
        env["AMBIENT_CP_SA_TOKEN_FILE"] = str(sa_file)
    return env


async def fetch(src: ControlPlaneTokenSource, use_async: bool) -> Token:
    if use_async:
        return await src.get_token_async()
    return await asyncio.to_thread(src.get_token)


def scope(token: Token) -> str:
    return str(jwt.decode(token.value, options={"verify_signature": False})["session_id"])


# --- against the platform's contract -------------------------------------------


@pytest.mark.parametrize("use_async", [False, True])
async def test_platform_cp_gets_v1_and_a_plain_session_id(
    platform_cp: ContractCP, sa_file: Path, use_async: bool
) -> None:
    pem = keys.public_pem(keys.signing_key())
    # A projected SA token exists, yet it is not sent: this CP does not ask for it.
    src = ControlPlaneTokenSource.from_env(env_for(platform_cp.url, pem, sa_file))
    assert src.proof == "auto"
    token = await fetch(src, use_async)
    assert scope(token) == SESSION_ID
    assert platform_cp.decrypted == [SESSION_ID]  # exactly the id, not a JSON document
    assert src.advertised == frozenset()
    assert src.last_version == "v1"
    assert platform_cp.paths == [DISCOVERY, "/token"]
    assert platform_cp.pod_tokens == [None]
    # Discovery is asked once, then cached.
    await fetch(src, use_async)
    await fetch(src, not use_async)
    assert platform_cp.paths == [DISCOVERY, "/token", "/token", "/token"]
    assert platform_cp.decrypted == [SESSION_ID] * 3


async def test_platform_cp_refusals_keep_their_meaning(platform_cp: ContractCP) -> None:
    pem = keys.public_pem(keys.signing_key())
    # A permissive local rule lets the short id reach the control plane,
    # whose own rule refuses it.
    short = ControlPlaneTokenSource(
        platform_cp.url, pem, "short", session_id_rule=SessionIdRule(min_length=1)
    )
    with pytest.raises(TokenUnavailableError) as info:
        await short.get_token_async()
    assert (info.value.status, info.value.retryable) == (403, False)
    wrong_key = ControlPlaneTokenSource(platform_cp.url, keys.other_key().public_key(), SESSION_ID)
    with pytest.raises(TokenUnavailableError) as info:
        await asyncio.to_thread(wrong_key.get_token)
    assert (info.value.status, info.value.retryable) == (401, False)
    assert platform_cp.paths.count("/token") == 2  # no retry storm after a 401


async def test_forcing_v2_on_the_platform_cp_shows_why_negotiation_matters(
    platform_cp: ContractCP,
) -> None:
    pem = keys.public_pem(keys.signing_key())
    src = ControlPlaneTokenSource.from_env(
        env_for(platform_cp.url, pem, AMBIENT_CP_PROOF_VERSION="v2")
    )
    await src.get_token_async()
    assert platform_cp.paths == ["/token"]  # an explicit version skips discovery
    (taken,) = platform_cp.decrypted
    assert taken.startswith('{"v":2,"sid":"' + SESSION_ID)  # the whole JSON became the "id"


async def test_rediscovery_when_the_control_plane_changes(platform_cp: ContractCP) -> None:
    pem = keys.public_pem(keys.signing_key())
    sleeps = Sleeps()
    src = ControlPlaneTokenSource(
        platform_cp.url, pem, SESSION_ID, sleep=sleeps.sleep, async_sleep=sleeps.async_sleep
    )
    platform_cp.advertise = "v1,v2"
    await src.get_token_async()
    assert src.last_version == "v2"
    assert platform_cp.decrypted == [SESSION_ID]

    # Replaced by the platform's CP: the one request in flight still carries
    # v2 (nothing could tell), its answer lacks the header, so the runner asks again.
    platform_cp.advertise = None
    await src.get_token_async()
    assert src.advertised is None
    await src.get_token_async()
    assert src.last_version == "v1"
    assert platform_cp.decrypted[-1] == SESSION_ID
    assert platform_cp.paths.count(DISCOVERY) == 2

    # Replaced again, by one that refuses v1 (401, advertising v2): retried at once.
    platform_cp.advertise = "v2"
    before = len(platform_cp.paths)
    token = await asyncio.to_thread(src.get_token)
    assert scope(token) == SESSION_ID
    assert platform_cp.paths[before:] == ["/token", "/token"]
    assert src.last_version == "v2"
    assert sleeps.delays == []


async def test_discovery_failure_is_retryable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps = Sleeps()
    src = ControlPlaneTokenSource(
        f"http://127.0.0.1:{port}/token",
        keys.public_pem(keys.signing_key()),
        SESSION_ID,
        attempts=2,
        async_sleep=sleeps.async_sleep,
    )
    with pytest.raises(TokenUnavailableError) as info:
        await src.get_token_async()
    assert info.value.retryable is True
    assert len(sleeps.delays) == 1
    assert src.advertised is None


# --- against our token server ----------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> FakeIssuer:
    return FakeIssuer(CLUSTER, audience=CP_AUDIENCE, kid="cluster-key-1")


@pytest.fixture
def jwks(cluster: FakeIssuer) -> Iterator[JwksServer]:
    server = JwksServer(cluster.jwks())
    yield server
    server.close()


def sa_token(issuer: FakeIssuer, session_id: str = SESSION_ID) -> str:
    return issuer.mint(
        f"system:serviceaccount:{NS}:session-{session_id}-sa",
        claims={
            "kubernetes.io": {
                "namespace": NS,
                "pod": {"name": "runner-0", "uid": "pod-uid"},
                "serviceaccount": {"name": f"session-{session_id}-sa", "uid": "sa-uid"},
            }
        },
    )


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return copy_keys(tmp_path / "keys", encryption_key_bits=2048)


def pod_settings(jwks: JwksServer) -> PodProofSettings:
    issuer = TrustedIssuer(
        issuer=CLUSTER, audiences=(CP_AUDIENCE,), keys=JwksCache(jwks.url), algorithms=("RS256",)
    )
    return PodProofSettings(issuer=issuer, namespaces=(NS,))


@pytest.mark.parametrize("use_async", [False, True])
async def test_our_token_server_gets_v2_then_pod_when_possible(
    keys_dir: Path,
    jwks: JwksServer,
    cluster: FakeIssuer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    use_async: bool,
) -> None:
    caplog.set_level(logging.INFO)
    pem = public_pem(keys_dir)
    sa_path = tmp_path / "sa-token"
    async with serving(TokenServerConfig(keys_dir=keys_dir, issuer="https://cp.test")) as srv:
        src = ControlPlaneTokenSource.from_env(env_for(srv.token_url, pem, sa_path))
        assert scope(await fetch(src, use_async)) == SESSION_ID
        assert src.advertised == frozenset({"v1", "v2"})
        assert src.last_version == "v2"
        assert "proof v2" in caplog.text

    config = TokenServerConfig(
        keys_dir=keys_dir, issuer="https://cp.test", pod_proof=pod_settings(jwks)
    )
    async with serving(config) as srv:
        # No token file yet: v2 (the best this runner can produce).
        src = ControlPlaneTokenSource.from_env(env_for(srv.token_url, pem, sa_path))
        await fetch(src, use_async)
        assert src.advertised == frozenset({"v1", "v2", "pod"})
        assert src.last_version == "v2"
        # The kubelet mounts the token: from the next fetch on, the pod-bound proof.
        sa = sa_token(cluster)
        sa_path.write_text(sa + "\n")
        caplog.clear()
        assert scope(await fetch(src, use_async)) == SESSION_ID
        assert src.last_version == "pod"
        assert "proof pod" in caplog.text
        assert sa not in caplog.text
        # The token of another session's service account: refused, not retried.
        sa_path.write_text(sa_token(cluster, "session-someone-else"))
        with pytest.raises(TokenUnavailableError) as info:
            await fetch(src, use_async)
        assert (info.value.status, info.value.retryable) == (403, False)
        # v1 forced by the environment.
        caplog.clear()
        forced = ControlPlaneTokenSource.from_env(
            env_for(srv.token_url, pem, sa_path, AMBIENT_CP_PROOF_VERSION="v1")
        )
        await fetch(forced, use_async)
        assert forced.last_version == "v1"
        assert "proof v1" in caplog.text


def test_environment_overrides(sa_file: Path, tmp_path: Path) -> None:
    pem = keys.public_pem(keys.signing_key())
    url = "http://127.0.0.1:9/token"
    assert ControlPlaneTokenSource.from_env(env_for(url, pem)).proof == "auto"
    for value, expected in (("v1", "v1"), ("V2", "v2"), (" auto ", "auto"), ("", "auto")):
        src = ControlPlaneTokenSource.from_env(env_for(url, pem, AMBIENT_CP_PROOF_VERSION=value))
        assert src.proof == expected
    pod = ControlPlaneTokenSource.from_env(
        env_for(url, pem, sa_file, AMBIENT_CP_PROOF_VERSION="pod")
    )
    assert (pod.proof, pod.sa_token_file) == ("pod", str(sa_file))
    with pytest.raises(ConfigurationError, match="AMBIENT_CP_PROOF_VERSION"):
        ControlPlaneTokenSource.from_env(env_for(url, pem, AMBIENT_CP_PROOF_VERSION="v3"))
    with pytest.raises(ConfigurationError, match="service-account token file"):
        ControlPlaneTokenSource.from_env(
            env_for(url, pem, tmp_path / "absent", AMBIENT_CP_PROOF_VERSION="pod")
        )
    # An explicit argument wins over the environment.
    explicit = ControlPlaneTokenSource.from_env(
        env_for(url, pem, AMBIENT_CP_PROOF_VERSION="v1"), proof="v2"
    )
    assert explicit.proof == "v2"
    # The runner's environment contract reaches the same settings.
    cached = token_source_from_env(env_for(url, pem, sa_file, AMBIENT_CP_PROOF_VERSION="pod"))
    assert "CachingTokenSource" in repr(cached)


# --- the CLI token server as a process -----------------------------------------------


def test_cli_token_server_requires_pod_proof(
    keys_dir: Path, jwks: JwksServer, cluster: FakeIssuer, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ambient_grpc_auth",
            "token-server",
            "--keys",
            str(keys_dir),
            "--listen",
            "127.0.0.1:0",
            "--issuer",
            "https://cp.test",
            "--pod-proof-issuer",
            CLUSTER,
            "--pod-proof-jwks",
            jwks.url,
            "--pod-proof-namespace",
            NS,
            "--require-pod-proof",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    sa = sa_token(cluster)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        token_url = line.strip().rsplit(" ", 1)[1] + "/token"
        pem = public_pem(keys_dir)
        sa_path = tmp_path / "sa-token"
        without = ControlPlaneTokenSource.from_env(env_for(token_url, pem, sa_path))
        with pytest.raises(TokenUnavailableError) as info:
            without.get_token()
        assert info.value.status == 401
        assert "requires the pod-bound proof" in str(info.value)
        assert without.advertised == frozenset({"pod"})
        sa_path.write_text(sa)
        src = ControlPlaneTokenSource.from_env(env_for(token_url, pem, sa_path))
        token = src.get_token()
        assert scope(token) == SESSION_ID
        assert src.last_version == "pod"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert "proof pod" in stderr
    assert sa not in stderr
    assert sa.rsplit(".", 1)[1] not in stderr
    assert json.dumps(sa) not in stderr
