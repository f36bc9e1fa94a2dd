"""Pod-bound proofs at the /token endpoint, against a locally generated cluster
issuer whose JWKS is served over HTTP on 127.0.0.1 (no mock verifier).

The cluster issuer is a :class:`~ambient_grpc_auth.testing.FakeIssuer`; the
token server fetches its keys through a real
:class:`~ambient_grpc_auth.server.jwks.JwksCache` from a
:class:`support.server.JwksServer`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from support.cp import copy_keys, get, public_pem, serving
from support.server import JwksServer

from ambient_grpc_auth.claims import SESSION_ID_CLAIM
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import load_public_key
from ambient_grpc_auth.controlplane.podproof import PodProofSettings
from ambient_grpc_auth.errors import ConfigurationError
from ambient_grpc_auth.proof import (
    POD_TOKEN_HEADER,
    PROOF_VERSIONS_FIELD,
    PROOF_VERSIONS_HEADER,
    encrypt_v1,
    encrypt_v2,
)
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.jwks import JwksCache
from ambient_grpc_auth.testing import FakeIssuer

CLUSTER = "https://kubernetes.default.svc.cluster.local"
CP_AUDIENCE = "ambient-control-plane"
NS = "ambient-sessions"
SID = "session-0123456789abcdef"
OTHER_SID = "session-fedcba9876543210"
ISS = "https://cp.ambient.test"


def sa_token(
    issuer: FakeIssuer,
    session_id: str = SID,
    *,
    namespace: str = NS,
    pod: bool = True,
    **kw: Any,
) -> str:
    """A projected service-account token shaped like Kubernetes' own."""
    k8s: dict[str, Any] = {
        "namespace": namespace,
        "serviceaccount": {"name": f"session-{session_id}-sa", "uid": "sa-uid-1"},
    }
    if pod:
        k8s["pod"] = {"name": f"runner-{session_id}", "uid": "pod-uid-1"}
    claims = {"kubernetes.io": k8s, **kw.pop("claims", {})}
    return issuer.mint(
        f"system:serviceaccount:{namespace}:session-{session_id}-sa", claims=claims, **kw
    )


@pytest.fixture(scope="module")
def cluster() -> FakeIssuer:
    return FakeIssuer(CLUSTER, audience=CP_AUDIENCE, kid="cluster-key-1")


@pytest.fixture
def jwks(cluster: FakeIssuer) -> Iterator[JwksServer]:
    server = JwksServer(cluster.jwks())
    yield server
    server.close()


def pod_settings(jwks: JwksServer, **kw: Any) -> PodProofSettings:
    issuer = TrustedIssuer(
        issuer=CLUSTER, audiences=(CP_AUDIENCE,), keys=JwksCache(jwks.url), algorithms=("RS256",)
    )
    return PodProofSettings(issuer=issuer, **kw)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    # 2048-bit encryption key: nothing here is about the key size.
    return copy_keys(tmp_path / "keys", encryption_key_bits=2048)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


def cfg(keys_dir: Path, **kw: Any) -> TokenServerConfig:
    return TokenServerConfig(keys_dir=keys_dir, issuer=ISS, **kw)


def pub(keys_dir: Path) -> rsa.RSAPublicKey:
    return load_public_key(public_pem(keys_dir))


def v2(keys_dir: Path, session_id: str = SID) -> str:
    return encrypt_v2(pub(keys_dir), session_id, now=time.time())


async def ask(
    http: aiohttp.ClientSession, url: str, proof: str, pod_token: str | None
) -> tuple[int, str, dict[str, str]]:
    headers = {POD_TOKEN_HEADER: pod_token} if pod_token is not None else {}
    return await get(http, url, proof, headers=headers)


async def test_right_service_account_gets_its_session_only(
    keys_dir: Path,
    jwks: JwksServer,
    cluster: FakeIssuer,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen_tokens: list[str] = []
    bodies: list[str] = []
    async with serving(cfg(keys_dir, pod_proof=pod_settings(jwks, namespaces=(NS,)))) as srv:
        good = sa_token(cluster)
        seen_tokens.append(good)
        status, body, headers = await ask(http, srv.token_url, v2(keys_dir), good)
        bodies.append(body)
        assert status == 200, body
        claims = jwt.decode(json.loads(body)["token"], options={"verify_signature": False})
        assert claims[SESSION_ID_CLAIM] == SID
        assert headers[PROOF_VERSIONS_HEADER] == "v1,v2,pod"
        # v1 under Authorization works as well: the service account is what binds.
        status, body, _ = await ask(http, srv.token_url, encrypt_v1(pub(keys_dir), SID), good)
        bodies.append(body)
        assert status == 200

        # The SA of another session, with a valid proof for this one: 403.
        other = sa_token(cluster, OTHER_SID)
        seen_tokens.append(other)
        status, body, _ = await ask(http, srv.token_url, v2(keys_dir), other)
        bodies.append(body)
        assert (status, body) == (403, "session not allowed")
        # ... and a valid proof for the other session with this session's SA: 403.
        status, body, _ = await ask(http, srv.token_url, v2(keys_dir, OTHER_SID), good)
        bodies.append(body)
        assert status == 403
        # The right name in another namespace: 403 (namespaces are restricted).
        elsewhere = sa_token(cluster, namespace="attacker")
        seen_tokens.append(elsewhere)
        status, body, _ = await ask(http, srv.token_url, v2(keys_dir), elsewhere)
        bodies.append(body)
        assert status == 403
        reasons = srv.counters.reasons()
        assert reasons["pod_session_mismatch"] == 2
        assert reasons["pod_namespace"] == 1
        assert srv.counters.snapshot()["issued"] == 2

    for token in seen_tokens:
        signature = token.rsplit(".", 1)[1]
        for text in (caplog.text, *bodies):
            assert token not in text
            assert signature not in text
    assert "proof pod" in caplog.text


@pytest.mark.parametrize(
    "case",
    ["wrong_audience", "expired", "unknown_issuer", "forged", "not_pod_bound", "not_an_sa", "junk"],
)
async def test_invalid_service_account_tokens_are_401(
    keys_dir: Path,
    jwks: JwksServer,
    cluster: FakeIssuer,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = {
        "wrong_audience": lambda: sa_token(cluster, audience="ambient-api-server"),
        "expired": lambda: sa_token(cluster, ttl=-600),
        "unknown_issuer": lambda: sa_token(
            FakeIssuer("https://other-cluster.test", audience=CP_AUDIENCE, kid="cluster-key-1")
        ),
        # Same issuer name and kid, another key: the signature does not verify.
        "forged": lambda: sa_token(FakeIssuer(CLUSTER, audience=CP_AUDIENCE, kid="cluster-key-1")),
        "not_pod_bound": lambda: sa_token(cluster, pod=False),
        "not_an_sa": lambda: cluster.mint("alice"),
        "junk": lambda: "not-a-jwt",
    }
    token = tokens[case]()
    async with serving(cfg(keys_dir, pod_proof=pod_settings(jwks))) as srv:
        status, body, headers = await ask(http, srv.token_url, v2(keys_dir), token)
        assert (status, body) == (401, "invalid session proof")
        assert headers["WWW-Authenticate"] == "Bearer"
        assert srv.counters.snapshot().get("decrypts", 0) == 0  # refused before any decryption
    assert token not in caplog.text
    assert token.rsplit(".", 1)[-1] not in caplog.text


async def test_require_pod_proof_refuses_v1_and_v2_alone(
    keys_dir: Path, jwks: JwksServer, cluster: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    config = cfg(keys_dir, pod_proof=pod_settings(jwks), require_pod_proof=True)
    async with serving(config) as srv:
        for proof in (encrypt_v1(pub(keys_dir), SID), v2(keys_dir)):
            status, body, headers = await ask(http, srv.token_url, proof, None)
            assert (status, body) == (401, "pod-bound proof required")
            assert headers[PROOF_VERSIONS_HEADER] == "pod"
        status, _, _ = await ask(http, srv.token_url, v2(keys_dir), sa_token(cluster))
        assert status == 200
        assert srv.counters.reasons()["pod_proof_required"] == 2


async def test_pod_token_header_edge_cases(
    keys_dir: Path, jwks: JwksServer, cluster: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    good = sa_token(cluster)
    async with serving(cfg(keys_dir, pod_proof=pod_settings(jwks))) as srv:
        # Without the header the server still accepts v1/v2 (not required).
        status, _, _ = await ask(http, srv.token_url, v2(keys_dir), None)
        assert status == 200
        # Twice: refused, whatever the values.
        status, _, _ = await get(
            http,
            srv.token_url,
            v2(keys_dir),
            headers=[(POD_TOKEN_HEADER, good), (POD_TOKEN_HEADER, good)],
        )
        assert status == 401
        # Over-long: refused before verification.
        status, _, _ = await ask(http, srv.token_url, v2(keys_dir), "a" * 4097)
        assert status == 401
        reasons = srv.counters.reasons()
        assert reasons["pod_header_duplicate"] == 1
        assert reasons["pod_too_long"] == 1
    # A server not configured for pod proofs ignores the header, like any other.
    async with serving(cfg(keys_dir)) as srv:
        status, _, headers = await ask(http, srv.token_url, v2(keys_dir, OTHER_SID), good)
        assert status == 200
        assert headers[PROOF_VERSIONS_HEADER] == "v1,v2"


async def test_cluster_keys_unavailable_is_retryable_503(
    keys_dir: Path, jwks: JwksServer, cluster: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    jwks.status = 500
    async with serving(cfg(keys_dir, pod_proof=pod_settings(jwks))) as srv:
        status, body, headers = await ask(http, srv.token_url, v2(keys_dir), sa_token(cluster))
        assert (status, body) == (503, "pod token keys unavailable")
        assert "Retry-After" in headers
        assert jwks.requests == 1


async def test_versions_are_advertised_everywhere(
    keys_dir: Path, jwks: JwksServer, http: aiohttp.ClientSession
) -> None:
    cases = [
        ({}, "v1,v2"),
        ({"require_fresh_proof": True}, "v2"),
        ({"pod_proof": pod_settings(jwks)}, "v1,v2,pod"),
        ({"pod_proof": pod_settings(jwks), "require_pod_proof": True}, "pod"),
    ]
    for extra, expected in cases:
        async with serving(cfg(keys_dir, public_url="http://cp.test", **extra)) as srv:
            for url in (srv.url + "/healthz", srv.token_url, srv.jwks_url):
                _, _, headers = await get(http, url)
                assert headers[PROOF_VERSIONS_HEADER] == expected, (extra, url)
            status, body, headers = await get(http, srv.url + "/.well-known/openid-configuration")
            assert status == 200
            assert json.loads(body)[PROOF_VERSIONS_FIELD] == expected.split(",")
            assert headers[PROOF_VERSIONS_HEADER] == expected


def test_settings_validation(keys_dir: Path, jwks: JwksServer) -> None:
    with pytest.raises(ConfigurationError, match="pod_proof"):
        cfg(keys_dir, require_pod_proof=True)
    for template in ("system:serviceaccount:{namespace}:runner", "{sid}", "{session_id}{0}", "{"):
        with pytest.raises(ConfigurationError, match="template"):
            pod_settings(jwks, subject_template=template)
    with pytest.raises(ConfigurationError):
        pod_settings(jwks, namespaces=())
    fixed = pod_settings(jwks, subject_template="system:serviceaccount:ambient:s-{session_id}")
    assert fixed.namespaces is None
    built = PodProofSettings.kubernetes(
        jwks_url=jwks.url, ca_file=None, bearer_token_file=None, namespaces=["a"]
    )
    assert built.issuer.audiences == (CP_AUDIENCE,)
    assert built.namespaces == ("a",)
