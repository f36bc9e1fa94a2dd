"""Prometheus metrics, scraped from the real endpoints after real calls.

The token server serves ``GET /metrics`` on its own port; the session server
serves its registry on ``--metrics-listen``. Every test scrapes over HTTP on
127.0.0.1 and parses the text with ``prometheus_client.parser``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.cp import copy_keys, get, public_pem, serving
from support.keys import jwk_of, signing_key
from support.server import CP_ISSUER, CP_KID, JwksServer, mint, runner_token

import ambient_grpc_auth
from ambient_grpc_auth.client.channel import create_channel
from ambient_grpc_auth.client.env import token_source_from_env
from ambient_grpc_auth.client.sessions import push
from ambient_grpc_auth.controlplane.config import TokenServerConfig
from ambient_grpc_auth.controlplane.keys import load_public_key
from ambient_grpc_auth.controlplane.metrics import (
    PROOF_REFUSAL_REASONS,
    TOKEN_OUTCOMES,
    TokenServerMetrics,
)
from ambient_grpc_auth.proof import encrypt_v1, encrypt_v2
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2 as pb
from ambient_grpc_auth.proto.ambient.v1 import sessions_pb2_grpc as pb_grpc
from ambient_grpc_auth.reference.serve import start_aio_session_server, start_sync_session_server
from ambient_grpc_auth.reference.store import SessionStore
from ambient_grpc_auth.server.authn import TrustedIssuer
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.jwks import JwksCache
from ambient_grpc_auth.server.metrics import (
    DENIAL_REASONS,
    AuthMetrics,
    PrometheusMetrics,
    start_metrics_server,
)

AUDIENCE = "ambient-api"
SERVICE_TOKEN = "metrics-test-service-token-0123456789"  # noqa: S105 (test value)
CLI = [sys.executable, "-m", "ambient_grpc_auth"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(lbl)[label] for (n, lbl) in samples if n == name and label in dict(lbl)}


def _scrape(url: str) -> tuple[str, str]:
    """(content type, body) of a GET on a loopback URL."""
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (loopback http)
        return resp.headers["Content-Type"], resp.read().decode()


# --- the token server ----------------------------------------------------------


async def test_token_server_metrics_count_real_requests(tmp_path: Path) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    public = load_public_key(public_pem(keys))
    session_id = "metrics-session-0001"
    config = TokenServerConfig(keys_dir=keys, audience=(AUDIENCE,))
    async with serving(config) as server, aiohttp.ClientSession() as http:
        fresh = encrypt_v2(public, session_id, now=time.time())
        answers = [
            await get(http, server.token_url, encrypt_v1(public, session_id)),
            await get(http, server.token_url, fresh),
            await get(http, server.token_url, fresh),  # replayed
            await get(http, server.token_url),  # no header
            await get(http, server.token_url, encrypt_v1(public, "short")),  # session id rule
            await get(http, server.token_url, encrypt_v1(public, session_id), method="POST"),
        ]
        assert [status for status, _, _ in answers] == [200, 200, 401, 401, 403, 405]
        status, text, headers = await get(http, server.metrics_url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples = _parse(text)
    requests = "ambient_cp_token_requests_total"
    assert _value(samples, requests, outcome="issued") == 2
    assert _value(samples, requests, outcome="unauthorized") == 2
    assert _value(samples, requests, outcome="forbidden") == 1
    assert _value(samples, requests, outcome="method_not_allowed") == 1
    assert _value(samples, requests, outcome="busy") == 0
    refusals = "ambient_cp_proof_refusals_total"
    assert _value(samples, refusals, reason="replayed") == 1
    assert _value(samples, refusals, reason="header_missing") == 1
    assert _value(samples, refusals, reason="session_id_too_short") == 1
    assert sum(v for (n, _), v in samples.items() if n == refusals) == 3
    # Every proof that had a header went to the decryption pool.
    assert _value(samples, "ambient_cp_proof_decrypts_total") == 4
    assert _value(samples, "ambient_cp_token_request_seconds_count") == 6
    assert _value(samples, "ambient_cp_token_request_seconds_sum") > 0
    # Labels come from fixed sets; the session id never shows.
    assert _label_values(samples, requests, "outcome") == set(TOKEN_OUTCOMES)
    assert _label_values(samples, refusals, "reason") == PROOF_REFUSAL_REASONS
    assert session_id not in text


def test_token_server_metrics_fold_unknown_labels_into_other() -> None:
    metrics = TokenServerMetrics(
        lambda: {"issued": 3, "decrypts": 4, "novel-outcome": 2},
        lambda: {"stale": 1, "a-reason-from-a-hook": 5},
    )
    samples = _parse(generate_latest(metrics.registry).decode())
    assert _value(samples, "ambient_cp_token_requests_total", outcome="issued") == 3
    assert _value(samples, "ambient_cp_token_requests_total", outcome="other") == 2
    assert _value(samples, "ambient_cp_proof_refusals_total", reason="stale") == 1
    assert _value(samples, "ambient_cp_proof_refusals_total", reason="other") == 5
    assert _value(samples, "ambient_cp_proof_decrypts_total") == 4
    assert "novel-outcome" not in generate_latest(metrics.registry).decode()


def test_each_server_has_its_own_registry() -> None:
    # Two servers in one process: no clash, and no global registration.
    first, second = PrometheusMetrics(), PrometheusMetrics()
    first.allowed()
    assert (
        _value(
            _parse(generate_latest(first.registry).decode()),
            "ambient_auth_decisions_total",
            outcome="allowed",
            reason="none",
        )
        == 1
    )
    assert (
        _value(
            _parse(generate_latest(second.registry).decode()),
            "ambient_auth_decisions_total",
            outcome="allowed",
            reason="none",
        )
        == 0
    )
    assert first.registry is not second.registry
    shared = CollectorRegistry()
    PrometheusMetrics(shared)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusMetrics(shared)


# --- the session server --------------------------------------------------------


def _session_config(store: SessionStore, metrics: PrometheusMetrics, jwks_url: str) -> Any:
    issuer = TrustedIssuer(
        issuer=CP_ISSUER,
        audiences=(AUDIENCE,),
        keys=JwksCache(jwks_url, metrics=metrics),
        control_plane=True,
    )
    return ServerAuthConfig.from_env(
        environ={"AMBIENT_API_TOKEN": SERVICE_TOKEN},
        issuers=[issuer],
        owner_lookup=store.owner_of,
        metrics=metrics,
    )


def _md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer({"keys": [jwk_of(signing_key(), CP_KID)]})
    yield server
    server.close()


def _check_session_metrics(text: str, session_id: str, tokens: list[str]) -> None:
    samples = _parse(text)
    decisions = "ambient_auth_decisions_total"
    # create (service), push (runner, own session), get (service; the store
    # answers NOT_FOUND, after the auth decision)
    assert _value(samples, decisions, outcome="allowed", reason="none") == 3
    assert _value(samples, decisions, outcome="bypassed", reason="none") == 1
    assert _value(samples, decisions, outcome="denied", reason="missing") == 1
    assert _value(samples, decisions, outcome="denied", reason="out_of_scope") == 1
    assert _value(samples, decisions, outcome="denied", reason="expired") == 1
    assert _value(samples, decisions, outcome="denied", reason="other") == 0
    # service token: miss then hit; runner token: miss then hit; expired: miss
    lookups = "ambient_auth_token_cache_lookups_total"
    assert _value(samples, lookups, result="hit") == 2
    assert _value(samples, lookups, result="miss") == 3
    assert _value(samples, "ambient_auth_jwks_fetches_total", result="ok") == 1
    assert _value(samples, "ambient_auth_jwks_fetches_total", result="error") == 0
    assert _value(samples, "ambient_auth_verification_seconds_count") == 3
    assert _value(samples, "ambient_auth_verification_seconds_sum") > 0
    # Label values are fixed words only.
    assert _label_values(samples, decisions, "reason") == DENIAL_REASONS | {"other", "none"}
    for secret in (session_id, "alice", SERVICE_TOKEN, *tokens):
        assert secret not in text


def test_sync_session_server_metrics(tmp_path: Path, jwks: JwksServer) -> None:
    metrics = PrometheusMetrics()
    store = SessionStore(str(tmp_path / "s.db"))
    running = start_sync_session_server(store, _session_config(store, metrics, jwks.url))
    endpoint = start_metrics_server(metrics.registry)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            stub = pb_grpc.SessionServiceStub(channel)  # type: ignore[no-untyped-call]
            sid = stub.CreateSession(
                pb.CreateSessionRequest(name="m"), metadata=_md(SERVICE_TOKEN), timeout=10
            ).metadata.id
            now = time.time()
            runner = runner_token(now, sid, aud=AUDIENCE)
            expired = mint(now - 3600, iss=CP_ISSUER, kid=CP_KID, aud=AUDIENCE, ttl=60)
            stub.PushSessionMessage(
                pb.PushSessionMessageRequest(session_id=sid, event_type="e", payload="p"),
                metadata=_md(runner),
                timeout=10,
            )
            refused = [
                (pb.GetSessionRequest(id=sid), None),
                (pb.GetSessionRequest(id="someone-elses-session"), runner),
                (pb.GetSessionRequest(id=sid), expired),
                # the service token again: a cache hit, allowed, NOT_FOUND
                (pb.GetSessionRequest(id="no-such-session-0000"), SERVICE_TOKEN),
            ]
            for request, token in refused:
                with pytest.raises(grpc.RpcError):
                    stub.GetSession(request, metadata=_md(token) if token else None, timeout=10)
        _, text = _scrape(endpoint.url)
    finally:
        endpoint.close()
        running.stop(None)
        store.close()
    _check_session_metrics(text, sid, [runner, expired])


async def test_aio_session_server_metrics(tmp_path: Path, jwks: JwksServer) -> None:
    metrics = PrometheusMetrics()
    store = SessionStore(str(tmp_path / "s.db"))
    server, port, _ = await start_aio_session_server(
        store, _session_config(store, metrics, jwks.url)
    )
    endpoint = start_metrics_server(metrics.registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            stub = pb_grpc.SessionServiceStub(channel)  # type: ignore[no-untyped-call]
            created = await stub.CreateSession(
                pb.CreateSessionRequest(name="m"), metadata=_md(SERVICE_TOKEN), timeout=10
            )
            sid = created.metadata.id
            now = time.time()
            runner = runner_token(now, sid, aud=AUDIENCE)
            expired = mint(now - 3600, iss=CP_ISSUER, kid=CP_KID, aud=AUDIENCE, ttl=60)
            await stub.PushSessionMessage(
                pb.PushSessionMessageRequest(session_id=sid, event_type="e", payload="p"),
                metadata=_md(runner),
                timeout=10,
            )
            refused = [
                (pb.GetSessionRequest(id=sid), None),
                (pb.GetSessionRequest(id="someone-elses-session"), runner),
                (pb.GetSessionRequest(id=sid), expired),
                (pb.GetSessionRequest(id="no-such-session-0000"), SERVICE_TOKEN),
            ]
            for request, token in refused:
                with pytest.raises(grpc.RpcError):
                    await stub.GetSession(
                        request, metadata=_md(token) if token else None, timeout=10
                    )
        _, text = await asyncio.to_thread(_scrape, endpoint.url)
    finally:
        endpoint.close()
        await server.stop(None)
        store.close()
    _check_session_metrics(text, sid, [runner, expired])


def test_in_memory_metrics_time_verifications_only(tmp_path: Path) -> None:
    """The default hook counts the timed decisions too: cache misses only."""
    metrics = AuthMetrics()
    store = SessionStore(str(tmp_path / "s.db"))
    config = ServerAuthConfig.from_env(
        environ={"AMBIENT_API_TOKEN": SERVICE_TOKEN}, owner_lookup=store.owner_of, metrics=metrics
    )
    running = start_sync_session_server(store, config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.SessionServiceStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(3):
                stub.CreateSession(
                    pb.CreateSessionRequest(name="m"), metadata=_md(SERVICE_TOKEN), timeout=10
                )
    finally:
        running.stop(None)
        store.close()
    snap = metrics.snapshot()
    assert (snap.allowed, snap.cache_misses, snap.cache_hits) == (3, 1, 2)
    assert snap.verifications == 1
    assert 0 < snap.verification_seconds < 10


def test_unknown_denial_reasons_are_counted_as_other() -> None:
    metrics = PrometheusMetrics()
    metrics.denied("a-custom-authenticators-reason")
    metrics.denied("expired")
    text = generate_latest(metrics.registry).decode()
    samples = _parse(text)
    decisions = "ambient_auth_decisions_total"
    assert _value(samples, decisions, outcome="denied", reason="other") == 1
    assert _value(samples, decisions, outcome="denied", reason="expired") == 1
    assert "a-custom-authenticators-reason" not in text


def test_metrics_endpoint_refuses_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            start_metrics_server(CollectorRegistry(), "127.0.0.1", taken.getsockname()[1])


# --- the reasons stay a fixed set --------------------------------------------------


def _reason_literals(path: Path, names: set[str]) -> set[str]:
    """String literals passed first to a call of one of ``names``, also as the
    ``header_<reason>`` f-string prefix, in one source file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name not in names:
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.add(first.value)
        elif isinstance(first, ast.JoinedStr):
            found.add(
                "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in first.values)
            )
    return found


def _returned_literals(path: Path, functions: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.Return)
                    and isinstance(inner.value, ast.Constant)
                    and isinstance(inner.value.value, str)
                ):
                    found.add(inner.value.value)
    return found


PACKAGE = Path(ambient_grpc_auth.__file__).parent


def test_every_denial_reason_in_the_code_has_its_own_label() -> None:
    rejected = {"TokenRejectedError", "UnrecognizedTokenError", "__init__"}
    in_code: set[str] = set()
    for path in [*PACKAGE.glob("server/**/*.py"), PACKAGE / "_bearer.py"]:
        in_code |= _reason_literals(path, rejected)
    in_code |= _returned_literals(PACKAGE / "server/policy.py", {"session_access", "owner_access"})
    # The scan sees both kinds of source.
    assert {"not_owner", "expired", "keys_unavailable"} <= in_code
    assert in_code - DENIAL_REASONS == set()


def test_every_proof_refusal_in_the_code_has_its_own_label() -> None:
    in_code: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        in_code |= _reason_literals(path, {"ProofError"})
    formatted = {r for r in in_code if "{}" in r}
    assert formatted == {"header_{}", "pod_{}"}
    bearer = _reason_literals(PACKAGE / "_bearer.py", {"TokenRejectedError"})
    # The pod-bound proof passes on the JWT verifier's reasons.
    verifier = set()
    for path in (PACKAGE / "server").rglob("*.py"):
        verifier |= _reason_literals(path, {"TokenRejectedError", "UnrecognizedTokenError"})
    in_code = (
        (in_code - formatted)
        | {f"header_{r}" for r in bearer}
        | {f"pod_{r}" for r in verifier if "{}" not in r}
    )
    assert "replayed" in in_code  # the scan sees them
    assert in_code - PROOF_REFUSAL_REASONS == set()


# --- the command line, real processes ---------------------------------------------


class _Process:
    """A CLI server; ``lines`` are the first stdout lines it printed."""

    def __init__(self, args: list[str], lines: int) -> None:
        self.proc = subprocess.Popen(
            CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        reader.start()
        reader.join(60)
        if len(self.lines) < lines:
            self.stop()
            raise AssertionError(f"server did not start: {self.proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]

    def _read(self, count: int) -> None:
        assert self.proc.stdout is not None
        while len(self.lines) < count:
            line = self.proc.stdout.readline()
            if not line:
                return
            self.lines.append(line.strip())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def test_cli_servers_serve_metrics(tmp_path: Path) -> None:
    keys = copy_keys(tmp_path / "keys", encryption_key_bits=2048)
    token_file = tmp_path / "service.token"
    token_file.write_text(SERVICE_TOKEN + "\n")
    cp = _Process(["token-server", "--keys", str(keys), "--listen", "127.0.0.1:0"], 1)
    try:
        cp_url = cp.lines[0].rsplit(" ", 1)[1]
        api = _Process(
            [
                "session-server",
                "--db",
                str(tmp_path / "s.db"),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--trust",
                f"{cp_url}={cp_url}/.well-known/jwks.json",
                "--control-plane-issuer",
                cp_url,
                "--service-token-file",
                str(token_file),
            ],
            2,
        )
        try:
            address = api.lines[0].rsplit(" ", 1)[1]
            assert api.lines[1].startswith("metrics on http://127.0.0.1:")
            metrics_url = api.lines[1].rsplit(" ", 1)[1]
            service = token_source_from_env({"BOT_TOKEN": SERVICE_TOKEN})
            with create_channel(address, service, tls=False) as channel:
                stub = pb_grpc.SessionServiceStub(channel)  # type: ignore[no-untyped-call]
                sid = stub.CreateSession(pb.CreateSessionRequest(name="m"), timeout=10).metadata.id
            runner_env = {
                "AMBIENT_CP_TOKEN_URL": f"{cp_url}/token",
                "AMBIENT_CP_TOKEN_PUBLIC_KEY": (keys / "public.pem").read_text(),
                "SESSION_ID": sid,
            }
            with create_channel(address, token_source_from_env(runner_env), tls=False) as ch:
                for n in range(3):
                    push(ch, sid, "e", json.dumps({"n": n}), timeout=10)
            _, api_text = _scrape(metrics_url)
            content_type, cp_text = _scrape(f"{cp_url}/metrics")
            assert content_type.startswith("text/plain")
            # a second session server cannot take the metrics port
            port = metrics_url.split(":")[2].split("/")[0]
            clash = subprocess.run(
                [
                    *CLI,
                    "session-server",
                    "--db",
                    ":memory:",
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    f"127.0.0.1:{port}",
                    "--service-token-file",
                    str(token_file),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            assert api.stop() == 0
    finally:
        assert cp.stop() == 0
    assert clash.returncode == 1
    assert "cannot serve metrics on 127.0.0.1:" in clash.stderr
    assert len(clash.stderr.strip().splitlines()) == 1, clash.stderr

    api_samples = _parse(api_text)
    decisions = "ambient_auth_decisions_total"
    assert _value(api_samples, decisions, outcome="allowed", reason="none") == 4
    assert _value(api_samples, "ambient_auth_jwks_fetches_total", result="ok") == 1
    assert _value(api_samples, "ambient_auth_token_cache_lookups_total", result="hit") == 2
    assert _value(api_samples, "ambient_auth_token_cache_lookups_total", result="miss") == 2
    assert _value(api_samples, "ambient_auth_verification_seconds_count") == 2
    cp_samples = _parse(cp_text)
    assert _value(cp_samples, "ambient_cp_token_requests_total", outcome="issued") == 1
    assert _value(cp_samples, "ambient_cp_token_request_seconds_count") == 1
    for text in (api_text, cp_text):
        assert sid not in text
        assert SERVICE_TOKEN not in text
